"""Global-stage refinements of landmark retrieval (Radenović, Tolias, Chum; TPAMI 2019).

- αQE, α-weighted query expansion: the query descriptor q is replaced by
  normalise(q + sum_i w_i d_i) over its `qe` best database neighbours d_i, w_i = max(q.d_i, 0)^α,
  and the index is searched again.
- DBA, database-side augmentation: every database descriptor d is replaced by
  normalise(sum_j w_j d_j) over its `dba` nearest database neighbours (itself first),
  w_j = max(d.d_j, 0)^α. Here it is applied at query time to the candidates of the ranking
  (their neighbours found with the vector index), so an index needs no rebuild to use it; images
  ranked below `depth` keep their plain descriptor.

Both work on whitened, L2-normalised descriptors (what the vector index holds). Images excluded
from a search (in a leave-one-out evaluation, the query itself) are never used as neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""(M, D) queries, k -> scores (M, k) and ids (M, k), best first, id -1 for empty slots."""
VectorsFn = Callable[[np.ndarray], np.ndarray]
"""ids (N,) -> their whitened descriptors (N, D)."""
ExcludedFn = Callable[[np.ndarray], np.ndarray]
"""ids (N,) -> (N,) bool, True for images a search must not use."""
SPARE = 4
"""Extra neighbours fetched per DBA image, to stand in for excluded ones."""


@dataclass(frozen=True)
class Expansion:
    """qe / dba: neighbours used (0: off); alphas: the weight exponents."""

    qe: int = 0
    qe_alpha: float = 3.0
    dba: int = 0
    dba_alpha: float = 3.0


def weighted_mean(anchor: np.ndarray, vectors: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(sum_j max(anchor.v_j, 0)^alpha v_j): anchor (D,), vectors (n, D) -> (D,)."""
    weights = np.maximum(vectors @ anchor, 0.0) ** alpha
    out = (weights @ vectors).astype(np.float32)
    return out / max(float(np.linalg.norm(out)), 1e-12)


def expand_query(query: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """αQE: the query (D,) with its neighbours (n, D) -> the expanded query (D,)."""
    return weighted_mean(query, np.concatenate([query[None], neighbours]), alpha)


class Refiner:
    """αQE and DBA over one vector index, for one search."""

    def __init__(
        self, conf: Expansion, search: SearchFn, vectors: VectorsFn, excluded: ExcludedFn
    ) -> None:
        self.conf = conf
        self.search = search
        self.vectors = vectors
        self.excluded = excluded
        self._augmented: dict[int, np.ndarray] = {}

    def ranking(self, query: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n,) and ids (n,) of the best `depth` images for `query` (D,)."""
        scores, ids = self._ranked(query, depth)
        if self.conf.qe > 0:
            usable = ids[~self.excluded(ids)][: self.conf.qe]
            if len(usable):
                found = self._descriptors(usable)
                query = expand_query(query, found, self.conf.qe_alpha)
                scores, ids = self._ranked(query, depth)
        return scores, ids

    def _ranked(self, query: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.search(query[None], depth)
        scores, ids = scores[0], ids[0]
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        if self.conf.dba > 0 and len(ids):
            scores = self._descriptors(ids) @ query
            order = np.argsort(-scores, kind="stable")
            scores, ids = scores[order], ids[order]
        return scores.astype(np.float32), ids

    def _descriptors(self, ids: np.ndarray) -> np.ndarray:
        """The descriptors the ranking uses: augmented with DBA, else as indexed."""
        if self.conf.dba <= 0:
            return self.vectors(ids)
        missing = np.array([i for i in ids if int(i) not in self._augmented], np.int64)
        if len(missing):
            for i, v in zip(missing, self._augment(missing), strict=True):
                self._augmented[int(i)] = v
        return np.stack([self._augmented[int(i)] for i in ids])

    def _augment(self, ids: np.ndarray) -> np.ndarray:
        """DBA descriptors of `ids`: each one's weighted mean with its nearest neighbours."""
        own = self.vectors(ids)
        # itself first, then spare neighbours in case some are excluded
        _, near = self.search(own, 2 * self.conf.dba + SPARE)
        flat = np.unique(near[near >= 0])
        usable = flat[~self.excluded(flat)]
        mine = np.isin(ids, usable)  # neighbours among `ids` are in `own` already: no re-read
        table = dict(zip(ids[mine].tolist(), own[mine], strict=True))
        rest = np.setdiff1d(usable, ids)
        if len(rest):
            table.update(zip(rest.tolist(), self.vectors(rest), strict=True))
        out = np.empty_like(own)
        for r, (i, row) in enumerate(zip(ids, near, strict=True)):
            others = [table[j] for j in row.tolist() if j in table and j != i][: self.conf.dba]
            group = np.stack([own[r], *others])
            out[r] = weighted_mean(own[r], group, self.conf.dba_alpha)
        return out
