"""Planar pairs with ground-truth homographies: how well matching + verification recover them.

`read_planar_pairs` reads ../shared/data/planar-pairs (`pairs.csv` and one 3x3 matrix per pair),
`estimate_homography` runs the reranker's matcher and verifier on two images' local features,
and `corner_error` scores an estimated homography the usual way (HPatches, LightGlue): the mean
distance between the image corners mapped by the estimate and by the ground truth.
`best_case_error` bounds what any robust fit could reach from a set of matches.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from features.types import LocalFeatures
from retrieval.matching import mutual_nn
from retrieval.verification import RansacConf, verify


@dataclass(frozen=True)
class PlanarPair:
    """Two images of a planar scene; `homography` (3, 3) maps image_a pixels to image_b pixels."""

    set: str
    image_a: Path
    image_b: Path
    homography: np.ndarray


def read_planar_pairs(root: Path, per_set: int | None = None) -> list[PlanarPair]:
    """The pairs of `root/pairs.csv` that have a ground-truth homography, at most `per_set` of
    each set (in file order: the smallest viewpoint change first)."""
    pairs: list[PlanarPair] = []
    with open(root / "pairs.csv", newline="") as f:
        for row in csv.DictReader(f):
            if not row["homography_file"]:
                continue
            # one HPatches sequence per folder: report them apart (their difficulty differs)
            name = Path(row["image_a"]).parent.name
            if per_set is not None and sum(p.set == name for p in pairs) >= per_set:
                continue
            H = np.loadtxt(root / row["homography_file"]).reshape(3, 3)
            pairs.append(PlanarPair(name, root / row["image_a"], root / row["image_b"], H))
    return pairs


def corner_error(H_est: np.ndarray, H_gt: np.ndarray, size_a: tuple[int, int]) -> float:
    """Mean distance (px in image_b) between the 4 corners of image_a (width, height) mapped by
    the estimated and by the ground-truth homography. Corners are the centres of the corner
    pixels, (0, 0) .. (w - 1, h - 1), in retr's pixel convention."""
    w, h = size_a
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], float)

    def project(H: np.ndarray) -> np.ndarray:
        p = corners @ H.T
        return p[:, :2] / p[:, 2:]

    return float(np.linalg.norm(project(H_est) - project(H_gt), axis=1).mean())


def estimate_homography(
    f0: LocalFeatures, f1: LocalFeatures, conf: RansacConf
) -> tuple[int, int, np.ndarray | None]:
    """(mutual-NN matches, RANSAC inliers, homography (3, 3) or None) from image 0 to image 1,
    with the reranker's matcher and verifier."""
    matches = mutual_nn(f0.descriptors, f1.descriptors)
    result = verify(f0.keypoints[matches[:, 0]], f1.keypoints[matches[:, 1]], conf)
    return len(matches), result.inliers, result.model if result.success else None


def best_case_error(
    pts0: np.ndarray, pts1: np.ndarray, H_gt: np.ndarray, size_a: tuple[int, int], px: float = 4.0
) -> float | None:
    """Corner error of the homography fitted (least squares) to the matches (K, 2) -> (K, 2)
    that lie within `px` of the ground truth: roughly the best a RANSAC on these matches could
    do. None when fewer than 4 matches qualify. Where this is far above the error wanted, the
    matches (where they lie, how precisely) are what limits the estimate, not the RANSAC."""
    mapped = np.hstack([pts0, np.ones((len(pts0), 1))]) @ H_gt.T
    close = np.linalg.norm(mapped[:, :2] / mapped[:, 2:] - pts1, axis=1) < px
    if close.sum() < 4:
        return None
    H, _ = cv2.findHomography(pts0[close].astype(np.float64), pts1[close].astype(np.float64), 0)
    return None if H is None else corner_error(H, H_gt, size_a)
