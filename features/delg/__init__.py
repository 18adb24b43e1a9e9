"""DELG (Cao, Araujo, Sim; ECCV 2020): global descriptors for the shortlist and its local branch.

- `base`: GlobalExtractor, the typed base of every global model (multi-scale pyramid, per-scale
  L2, sum, L2; `shares_pass_with` and `extract_all` for a pass shared with a local plug-in), GeM.
- `efficientnet`: the offline default, a DELG global head (GeM, p=3) on an ImageNet
  EfficientNet-Lite backbone; no trained whitening exists for it, so the index learns a PCA
  whitening on the corpus at build time (`index/whitening.py`).
- `model`, `resnet`, `official`: the official DELG ResNet-50/101 models, their network and the
  official extraction pipeline (global + local features, one forward pass per pyramid level).
"""
