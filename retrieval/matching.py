"""Descriptor matching: mutual nearest neighbours with an optional Lowe ratio test."""

from __future__ import annotations

import numpy as np
import torch


def mutual_nn(
    desc0: np.ndarray | torch.Tensor,
    desc1: np.ndarray | torch.Tensor,
    ratio: float | None = None,
) -> np.ndarray:
    """Indices (K, 2) of pairs (i, j) where desc0[i] and desc1[j] are each other's nearest
    neighbour by cosine similarity; with `ratio`, the first neighbour of i must also be closer
    (Euclidean, unit vectors) than `ratio` times the second. Inputs are (N, D) L2-normalised."""
    d0 = torch.as_tensor(desc0, dtype=torch.float32)
    d1 = torch.as_tensor(desc1, dtype=torch.float32)
    if len(d0) == 0 or len(d1) == 0:
        return np.zeros((0, 2), np.int64)
    sim = d0 @ d1.T
    nn01 = sim.argmax(1)
    nn10 = sim.argmax(0)
    idx0 = torch.arange(len(d0))
    keep = nn10[nn01] == idx0
    if ratio is not None and len(d1) > 1:
        top2 = sim.topk(2, dim=1).values
        dist = torch.sqrt(torch.clamp(2 - 2 * top2, min=0))
        keep &= dist[:, 0] < ratio * dist[:, 1]
    return torch.stack([idx0[keep], nn01[keep]], dim=1).numpy()
