"""Positive and negative image pairs, to choose a verification rule on both at once.

`verification_pairs` builds the pair set from ../shared/data: positives are every same-group
pair of landmarks-mini (landmark, place and wxbs groups) and every planar pair with a
ground-truth homography; negatives are more pairs of images that show different things, drawn
with a fixed seed: labelled images of different groups, and labelled images against distractors
(never two distractors: some VPR distractors show the same street without being labelled so).

A rule (the matches kept above a confidence, RANSAC's model and threshold) turns each pair into
an inlier count; `operating_point` finds the fewest inliers that keeps the false-positive rate
at most `max_fpr` on the negatives, and the true-positive rate it leaves on the positives.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.types import LocalFeatures
from retrieval.evaluation.planar import read_planar_pairs
from retrieval.matchers import Matches
from retrieval.verification import RansacConf, verify


@dataclass(frozen=True)
class ImagePair:
    """Two images; kind: the group kind of a positive (landmark, place, wxbs, planar) or how a
    negative was drawn (cross-group, distractor)."""

    a: Path
    b: Path
    positive: bool
    kind: str


def verification_pairs(
    mini_root: Path, planar_root: Path, negatives_per_positive: float = 1.5, seed: int = 0
) -> list[ImagePair]:
    """Positives (all of them), then `negatives_per_positive` times as many negatives, half
    cross-group and half against distractors (see the module docstring)."""
    with open(mini_root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labelled = [r for r in rows if r["group"]]
    distractors = [r for r in rows if not r["group"]]
    pos = [
        ImagePair(mini_root / a["path"], mini_root / b["path"], True, a["kind"])
        for a, b in itertools.combinations(labelled, 2)
        if a["group"] == b["group"]
    ]
    pos += [ImagePair(p.image_a, p.image_b, True, "planar") for p in read_planar_pairs(planar_root)]
    cross = [(a, b) for a, b in itertools.combinations(labelled, 2) if a["group"] != b["group"]]
    against = list(itertools.product(labelled, distractors))
    rng = np.random.default_rng(seed)
    wanted = int(np.ceil(negatives_per_positive * len(pos)))
    neg = []
    for kind, pool, n in (
        ("cross-group", cross, wanted // 2),
        ("distractor", against, wanted - wanted // 2),
    ):
        for i in np.sort(rng.choice(len(pool), min(n, len(pool)), replace=False)):
            a, b = pool[i]
            neg.append(ImagePair(mini_root / a["path"], mini_root / b["path"], False, kind))
    return pos + neg


def rule_inliers(
    fa: LocalFeatures,
    fb: LocalFeatures,
    matches: Matches,
    min_confidence: float | None,
    ransac: RansacConf,
) -> int:
    """RANSAC inliers of the matches whose confidence exceeds `min_confidence` (None: all)."""
    kept = matches if min_confidence is None else matches.above(min_confidence)
    pairs = kept.pairs
    return verify(fa.keypoints[pairs[:, 0]], fb.keypoints[pairs[:, 1]], ransac).inliers


@dataclass(frozen=True)
class OperatingPoint:
    """min_inliers: fewest inliers of a verified pair; tpr / fpr: the shares of positives /
    negatives it verifies."""

    min_inliers: int
    tpr: float
    fpr: float


def operating_point(
    positives: np.ndarray, negatives: np.ndarray, max_fpr: float = 0.01
) -> OperatingPoint:
    """The smallest inlier threshold whose false-positive rate is at most `max_fpr`."""
    negatives = np.asarray(negatives)
    positives = np.asarray(positives)
    top = int(max(negatives.max(initial=0), 0)) + 1
    for t in range(1, top + 1):
        fpr = float((negatives >= t).mean()) if len(negatives) else 0.0
        if fpr <= max_fpr:
            tpr = float((positives >= t).mean()) if len(positives) else 0.0
            return OperatingPoint(t, tpr, fpr)
    raise AssertionError("unreachable: no negative reaches max + 1")


def rate_at(positives: np.ndarray, negatives: np.ndarray, min_inliers: int) -> OperatingPoint:
    """TPR and FPR of a given inlier threshold."""
    tpr = float((np.asarray(positives) >= min_inliers).mean()) if len(positives) else 0.0
    fpr = float((np.asarray(negatives) >= min_inliers).mean()) if len(negatives) else 0.0
    return OperatingPoint(min_inliers, tpr, fpr)
