"""Training what retr uses: `retr train whitening|global|local mda`.

- `data`: labelled folders and the GLDv2 CSV layout, decoded once, deterministic batches;
- `loop`: the shared loop (seeded, resumable bit-identically, AMP on a GPU, progress, CSV log);
- `checkpoint`: atomic saves (a full disk never costs the previous checkpoint);
- `delg`: DELG's recipe (GeM + FC whitening + ArcFace; attention + autoencoder local branch);
- `mda`: MDA's losses (per-head classification, attention diversity) on features.local.mda;
- `whitening`: learned whitening Lw from the index's own verified pairs.

Heavy modules are imported by the caller, not here.
"""
