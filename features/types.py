"""Typed results shared by every extractor.

Pixel convention everywhere in retr: (x, y) = (column, row) in original-image pixels, with the
centre of the top-left pixel at (0, 0) (OpenCV's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LocalFeatures:
    """Local features of one image.

    keypoints: (N, 2) float32 x, y in original-image pixels.
    scores: (N,) float32, higher is better, sorted descending by the extractor.
    descriptors: (N, D) float32, L2-normalised rows.
    image_size: (width, height) of the original image in pixels.
    """

    keypoints: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        n = len(self.keypoints)
        if self.keypoints.shape != (n, 2) or self.scores.shape != (n,):
            raise ValueError(
                f"bad local feature shapes: keypoints {self.keypoints.shape}, "
                f"scores {self.scores.shape}"
            )
        if self.descriptors.ndim != 2 or len(self.descriptors) != n:
            raise ValueError(f"bad descriptor shape {self.descriptors.shape} for {n} keypoints")

    def __len__(self) -> int:
        return len(self.keypoints)

    @classmethod
    def empty(cls, dim: int, image_size: tuple[int, int]) -> LocalFeatures:
        return cls(
            np.zeros((0, 2), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0, dim), np.float32),
            image_size,
        )

    def top(self, k: int | None) -> LocalFeatures:
        """The k best-scoring features (all when k is None or larger than N)."""
        if k is None or k >= len(self):
            return self
        order = np.argsort(-self.scores, kind="stable")[:k]
        return LocalFeatures(
            self.keypoints[order], self.scores[order], self.descriptors[order], self.image_size
        )
