"""DELG (Cao, Araujo, Sim; ECCV 2020): global descriptors for the shortlist and its local branch.

- `base`: the global-extractor contract (multi-scale pyramid, per-scale L2, sum, L2) and GeM.
- `efficientnet`: the offline default, a DELG global head (GeM, p=3) on an ImageNet
  EfficientNet-Lite backbone; whitening is learned on the corpus at build time
  (`features.delg.whitening`).
"""
