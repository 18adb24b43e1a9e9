"""Landmark recognition: an inlier-weighted vote over the verified top results.

Each verified result votes for its label with its inlier count; unlabelled verified results
vote for nobody but still count in the total. The confidence of the winning label is

    share * (1 - exp(-votes / saturation))

where share = votes for the label / all verified votes, and saturation (inliers) sets how much
geometric evidence makes a sure answer. With nothing verified the answer is `unknown`, 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

UNKNOWN = "unknown"


class Votable(Protocol):
    @property
    def label(self) -> str | None: ...
    @property
    def inliers(self) -> int: ...
    @property
    def verified(self) -> bool: ...


def vote(results: Sequence[Votable], saturation: float = 50.0) -> tuple[str, float, list[int]]:
    """(label, confidence in [0, 1], indices of the results that voted for it)."""
    votes: dict[str, float] = defaultdict(float)
    total = 0.0
    for r in results:
        if r.verified:
            total += r.inliers
            if r.label:
                votes[r.label] += r.inliers
    if not votes or total <= 0:
        return UNKNOWN, 0.0, []
    label = max(votes, key=lambda k: votes[k])
    share = votes[label] / total
    confidence = share * (1.0 - math.exp(-votes[label] / saturation))
    evidence = [i for i, r in enumerate(results) if r.verified and r.label == label]
    return label, float(min(max(confidence, 0.0), 1.0)), evidence
