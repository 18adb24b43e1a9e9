"""Shortlist reranking: match local features against each candidate, verify, sort by inliers."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from features.base import StrictConf
from features.types import LocalFeatures
from retrieval.matching import mutual_nn
from retrieval.verification import RansacConf, verify


class RerankConf(StrictConf):
    shortlist: int = 100
    """Candidates taken from the global search and reranked."""
    min_inliers: int = 12
    """Fewest RANSAC inliers for a candidate to count as verified."""
    ratio: float | None = None
    """Lowe ratio test on top of mutual nearest neighbours (None: off)."""
    ransac: RansacConf = RansacConf()


@dataclass(frozen=True)
class Candidate:
    id: int
    global_score: float
    inliers: int = 0
    verified: bool = False


@dataclass
class Timings:
    """Seconds spent per stage of one query."""

    stages: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] += seconds


def rerank(
    query: LocalFeatures,
    candidates: list[Candidate],
    load: Callable[[int], LocalFeatures],
    conf: RerankConf,
    timings: Timings | None = None,
) -> list[Candidate]:
    """Verified candidates first (most inliers, then best global score), then the others in
    their global order."""
    timings = timings or Timings()
    scored = []
    for cand in candidates:
        t0 = time.perf_counter()
        feats = load(cand.id)
        t1 = time.perf_counter()
        matches = mutual_nn(query.descriptors, feats.descriptors, conf.ratio)
        t2 = time.perf_counter()
        result = verify(query.keypoints[matches[:, 0]], feats.keypoints[matches[:, 1]], conf.ransac)
        t3 = time.perf_counter()
        timings.add("load", t1 - t0)
        timings.add("matching", t2 - t1)
        timings.add("ransac", t3 - t2)
        ok = result.inliers >= conf.min_inliers
        scored.append(Candidate(cand.id, cand.global_score, result.inliers, ok))
    return order_candidates(scored)


def order_candidates(cands: list[Candidate]) -> list[Candidate]:
    verified = sorted((c for c in cands if c.verified), key=lambda c: (-c.inliers, -c.global_score))
    rest = [c for c in cands if not c.verified]
    rest.sort(key=lambda c: -c.global_score)
    return verified + rest


def stored_features(arrays: dict[str, np.ndarray], image_size: tuple[int, int]) -> LocalFeatures:
    """LocalFeatures from a feature-store group (descriptors back to float32)."""
    return LocalFeatures(
        arrays["keypoints"].astype(np.float32),
        arrays["scores"].astype(np.float32),
        arrays["descriptors"].astype(np.float32),
        image_size,
    )
