"""Checks shared by the parity tests (tests/test_<method>.py against ../shared/fixtures).

Float32 results differ between CPU kernels (AVX2 or AVX-512, one thread or several) in the last
bits, so two reference rows whose scores are closer than the fixture's score tolerance can come
out in either order; any other change of order is a real bug and must fail.
"""

from __future__ import annotations

import numpy as np

BLOCK = 1024
"""Reference rows compared per step of the pairwise inversion check (bounds its memory)."""


def match_integer_keypoints(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Index into `mine` of each of `theirs` integer keypoints; fails unless the two are the same
    set of distinct points."""
    lookup = {tuple(k): i for i, k in enumerate(np.asarray(mine).round().astype(np.int64).tolist())}
    ref = [tuple(k) for k in np.asarray(theirs).round().astype(np.int64).tolist()]
    assert len(lookup) == len(mine) == len(ref), "duplicate keypoints or different counts"
    missing, extra = set(ref) - set(lookup), set(lookup) - set(ref)
    assert not missing and not extra, f"{len(missing)} keypoints missing, {len(extra)} extra"
    return np.array([lookup[k] for k in ref], dtype=np.int64)


def assert_order_up_to_ties(
    ref_scores: np.ndarray, idx: np.ndarray, *, rtol: float = 0.0, atol: float = 0.0
) -> None:
    """Our rows list the reference rows in the reference order, except for swaps of near-ties.

    `idx[j]` is our row of reference row j (the reference in its official order, whatever that
    order is: descending score, raster, ...). Every pair of reference rows that we list in the
    opposite order must have reference scores a, b with |a - b| <= atol + rtol * max(|a|, |b|),
    the fixture README's score tolerance.
    """
    scores = np.asarray(ref_scores, np.float64)
    pos = np.asarray(idx)
    assert len(pos) == len(scores) and len(np.unique(pos)) == len(pos)
    for start in range(0, len(pos), BLOCK):
        # Pairs (j1, j2) with j1 in this block, j1 < j2 in the reference, listed j2 first by us.
        j1 = np.arange(start, min(start + BLOCK, len(pos)))[:, None]
        j2 = np.arange(len(pos))[None, :]
        a, b = np.nonzero((j1 < j2) & (pos[j1] > pos[j2]))
        a += start
        gap = np.abs(scores[a] - scores[b])
        allowed = atol + rtol * np.maximum(np.abs(scores[a]), np.abs(scores[b]))
        bad = np.flatnonzero(gap > allowed)
        assert not len(bad), (
            f"{len(bad)} swapped pairs are not ties within the score tolerance, e.g. reference "
            f"rows {a[bad[0]]} and {b[bad[0]]} (scores {float(scores[a[bad[0]]])!r}, "
            f"{float(scores[b[bad[0]]])!r})"
        )
