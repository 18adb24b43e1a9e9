"""Descriptor matching: mutual nearest neighbours with an optional Lowe ratio test.

`mutual_nn` matches one pair. `mutual_nn_many` matches one query against many candidates with one
matrix product per chunk of candidates (their descriptors concatenated, zero-padded to the longest
when their counts differ) and returns exactly what `mutual_nn` returns for each pair: the products
are the same torch dot products (bit-identical per entry, which the tests check), and every tie
is broken the same way (first index). Only cheap reductions run over the whole similarity
matrix: on a CPU they run in numpy, whose argmax along rows and max down columns are vectorised
(torch's CPU argmax is ~15x slower, and an argmax down columns slower still), and the first row
reaching a column's maximum is looked up only for the columns where several rows tie.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

CHUNK_COLUMNS = 2048
"""Candidate descriptors per matrix product on a CPU: (N_query x 2048) float32 similarities, 8 MB
for 1024 query keypoints. Measured per query (100 candidates of 1024 keypoints, 2 cores): 2048
is 10-25% faster than 1024, 3072 or 4096; larger blocks fall out of cache."""
CHUNK_COLUMNS_GPU = 131_072
"""The same on a GPU, where one large product is what makes it fast (512 MB at 1024 x 131072)."""


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


def chunks(lengths: Sequence[int], columns: int = CHUNK_COLUMNS) -> list[range]:
    """Consecutive candidate ranges whose padded size (count x longest) stays near `columns`."""
    out, start, longest = [], 0, 0
    for end, n in enumerate(lengths):
        longest = max(longest, n)
        if end > start and (end - start + 1) * longest > columns:
            out.append(range(start, end))
            start, longest = end, n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def mutual_nn_many(
    query: np.ndarray | torch.Tensor,
    candidates: Sequence[np.ndarray | torch.Tensor],
    ratio: float | None = None,
    device: torch.device | str | None = None,
    reductions: Literal["numpy", "torch"] | None = None,
) -> list[np.ndarray]:
    """`mutual_nn(query, c, ratio)` for every candidate c, from one matrix product.

    query: (Nq, D); candidates: (N_b, D) each, L2-normalised. Returns one (K_b, 2) int64 array
    per candidate, rows sorted by query index. Callers split long shortlists with `chunks`.
    reductions: where the similarity matrix is reduced; None: torch on a GPU, numpy on a CPU.
    """
    out = [np.zeros((0, 2), np.int64) for _ in candidates]
    live = [b for b, c in enumerate(candidates) if len(c)]
    if len(query) == 0 or not live:
        return out
    q = torch.as_tensor(query, dtype=torch.float32, device=device)
    lengths = np.array([len(candidates[b]) for b in live])
    n = int(lengths.max())
    cand = torch.zeros((len(live), n, q.shape[1]), dtype=torch.float32, device=q.device)
    for row, b in enumerate(live):
        cand[row, : lengths[row]] = torch.as_tensor(candidates[b], dtype=torch.float32)
    # The same dot products as mutual_nn's `d0 @ d1.T`, candidates side by side.
    sim = (q @ cand.reshape(len(live) * n, -1).T).view(len(q), len(live), n)
    padded = np.arange(n)[None] >= lengths[:, None]  # (B, n)
    pad = np.flatnonzero(padded.ravel())  # one write of only the padded columns, any device
    if len(pad):
        sim.view(len(q), -1)[:, torch.as_tensor(pad, device=q.device)] = -torch.inf
    on_torch = reductions == "torch" or (reductions is None and sim.is_cuda)
    stats = _stats_torch(sim, ratio) if on_torch else _stats_numpy(sim.cpu().numpy())
    pairs = _select(stats, padded, lengths, ratio)
    for row, b in enumerate(live):
        out[b] = pairs[row]
    return out


@dataclass(frozen=True)
class _Stats:
    """Reductions of one similarity block sim (Nq, B, n), as numpy arrays.

    nn01, best: (Nq, B) first index and value of each row's maximum per candidate; colmax,
    hits: (B * n,) maximum of each column and how many rows reach it; first_row(cols): the
    first row reaching each column's maximum; second(qi, bi): second largest value of rows.
    """

    nn01: np.ndarray
    best: np.ndarray
    colmax: np.ndarray
    hits: np.ndarray
    first_row: Callable[[np.ndarray], np.ndarray]
    second: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _stats_numpy(sim: np.ndarray) -> _Stats:
    """numpy: its argmax along rows and reductions down columns are vectorised (torch's CPU
    argmax is ~15x slower here)."""
    nq, nb, n = sim.shape
    flat = sim.reshape(nq, nb * n)
    nn01 = sim.argmax(2)
    best = np.take_along_axis(sim, nn01[..., None], 2)[..., 0]
    colmax = flat.max(0)
    count = np.uint16 if nq < np.iinfo(np.uint16).max else np.int64
    hits = (flat >= colmax).view(np.uint8).sum(0, dtype=count)

    def first_row(cols: np.ndarray) -> np.ndarray:
        return (flat[:, cols] >= colmax[cols]).argmax(0)

    def second(qi: np.ndarray, bi: np.ndarray) -> np.ndarray:
        rows = sim[qi, bi]  # (K, n) copies
        rows[np.arange(len(qi)), nn01[qi, bi]] = -np.inf  # a tied maximum stays
        return rows.max(1)

    return _Stats(nn01, best, colmax, hits, first_row, second)


def _stats_torch(sim: torch.Tensor, ratio: float | None) -> _Stats:
    """torch on the device (for a GPU); only (Nq, B) and (B * n,) arrays travel to the host."""
    nq, nb, n = sim.shape
    flat = sim.view(nq, nb * n)
    best, nn01 = sim.max(2)
    colmax = flat.amax(0)
    hits = (flat >= colmax).sum(0)
    top2 = sim.topk(min(2, n), dim=2).values[..., -1].cpu().numpy() if ratio else None

    def first_row(cols: np.ndarray) -> np.ndarray:
        c = torch.as_tensor(cols, device=sim.device)
        return (flat[:, c] >= colmax[c]).to(torch.uint8).argmax(0).cpu().numpy()

    def second(qi: np.ndarray, bi: np.ndarray) -> np.ndarray:
        assert top2 is not None
        return top2[qi, bi]

    nn01_, best_, colmax_, hits_ = (t.cpu().numpy() for t in (nn01, best, colmax, hits))
    return _Stats(nn01_, best_, colmax_, hits_, first_row, second)


def _select(
    stats: _Stats, padded: np.ndarray, lengths: np.ndarray, ratio: float | None
) -> list[np.ndarray]:
    """Mutual pairs (and ratio test) from the reductions -> (K_b, 2) per candidate."""
    nb, n = padded.shape
    colmax = np.where(padded.ravel(), np.inf, stats.colmax)  # padding never matches
    cols = stats.nn01 + np.arange(nb)[None] * n
    qi, bi = np.nonzero(stats.best >= colmax[cols])  # row i is a maximum of its column
    cols = cols[qi, bi]
    keep = np.ones(len(qi), bool)
    tied = stats.hits[cols] > 1  # several rows reach that maximum: argmax takes the first
    if tied.any():
        keep[tied] = stats.first_row(cols[tied]) == qi[tied]
    if ratio is not None and n > 1:
        top1 = stats.best[qi, bi].astype(np.float32)
        top2 = stats.second(qi, bi).astype(np.float32)
        d1, d2 = (torch.sqrt(torch.clamp(2 - 2 * torch.from_numpy(t), min=0)) for t in (top1, top2))
        keep &= (d1 < ratio * d2).numpy() | (lengths[bi] < 2)
    qi, bi = qi[keep], bi[keep]
    pairs = np.stack([qi, stats.nn01[qi, bi]], axis=1).astype(np.int64)
    order = np.argsort(bi, kind="stable")  # group by candidate, query order kept
    counts = np.bincount(bi, minlength=nb)
    return np.split(pairs[order], np.cumsum(counts)[:-1])
