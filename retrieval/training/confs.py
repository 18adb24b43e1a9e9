"""The training configs whose defaults `retr train` shows, in a module that loads no network
(nor torch): LoopConf (retrieval.training.loop) and LearnedWhiteningConf
(retrieval.training.whitening), which those modules re-export.
"""

from __future__ import annotations

from pydantic import Field

from features.core import StrictConf


class LoopConf(StrictConf):
    steps: int = Field(default=1000, ge=1)
    """Optimiser steps in all (the learning rate reaches 0 at the last)."""
    batch_size: int = Field(default=32, ge=1)
    """Images per step."""
    lr: float = Field(default=0.01, gt=0)
    """Initial learning rate of SGD (momentum 0.9), decayed linearly to 0."""
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    seed: int = 0
    """Seed of the batches, the augmentation and the initialisation."""
    save_every: int = Field(default=100, ge=1)
    """Steps between checkpoints (one is always written at the end)."""
    amp: bool | None = None
    """Mixed precision; None: on when training on a CUDA device."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""


class LearnedWhiteningConf(StrictConf):
    shortlist: int = Field(default=20, ge=1)
    """Candidates per image verified by the local rerank."""
    shrinkage: float = Field(default=0.1, ge=0, le=1)
    """Shrinkage of the pair-difference covariance toward a multiple of the identity."""
    mix: float = Field(default=0.0, ge=0, le=1)
    """Share of the corpus covariance (the PCA whitening's) mixed into the pairs' (0: pure Lw)."""
    min_pairs: int = Field(default=5, ge=1)
    """Fewest verified pairs to learn from; fewer is an error."""
    matcher: str | None = None
    """Matcher of the rerank that verifies pairs (None: the index's)."""
