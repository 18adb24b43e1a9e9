"""The FAISS inner-product index over whitened global descriptors, keyed by catalog ids.

`IndexConfig.index_type` is a FAISS factory string, or "auto" (the default), which picks one from
the corpus size N when the index is built (`choose_factory`):

    N < 50_000              "Flat"                     exact; 4*D bytes/vector; brute force is
                                                       a few ms per query at this size
    50_000 <= N < 1_000_000 "HNSW32"                   graph search with efSearch 128: recall@10
                                                       0.99 at 100k (scripts/bench_index.py);
                                                       (4*D + ~300) bytes/vector; cannot remove
    N >= 1_000_000          "OPQ{m}_{d},IVF{nlist},PQ{m}"  OPQ rotation to d <= 256 dims, inverted
                                                       lists, PQ codes of m = d/4 bytes/vector;
                                                       nlist ~ 4*sqrt(N) (a power of two),
                                                       nprobe = nlist/8

Indexes that are trained (IVF, PQ, OPQ) learn on the corpus vectors given to `build`. Flat and
graph indexes are wrapped in an IDMap2 so FAISS ids are catalog ids; IVF indexes store ids
natively (IDMap's removal assumes the inner index renumbers, which IVF does not).

Removal uses FAISS `remove_ids` where the index supports it (Flat, IVF). Where it does not (HNSW),
or when asked (`tombstone=True`), the removed vector stays in the index but its id-map slot is set
to -1: searches skip it, it is saved with the index, and `retr index build` purges it by
rebuilding. Search asks FAISS for more than k results while tombstones crowd out live ones (at
most k + tombstones), so k live ones come back.

Saved atomically (index.atomic: temp file, fsync, os.replace). With a FAISS GPU build and a
CUDA device, an IVF's k-means trains on the GPUs and searches run on a GPU copy of the index; the
CPU index stays the master that is edited and saved, and the GPU copy is refreshed after every
change. Only the CPU path is tested.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from features.core import ConfigError, IndexError_
from index.atomic import write_atomic

logger = logging.getLogger(__name__)

AUTO = "auto"
FLAT_BELOW = 50_000
"""Corpus sizes below this get the exact index."""
HNSW_BELOW = 1_000_000
"""Corpus sizes below this (and from FLAT_BELOW) get HNSW32; larger ones OPQ + IVF-PQ."""
HNSW_EF_SEARCH = 128
"""Search beam of HNSW indexes (FAISS's default of 16 loses recall at k >= 10)."""
OPQ_ITERATIONS = 10
"""Rotation updates when training OPQ (FAISS's default of 50 takes ~5x longer, for a rotation
that has mostly settled after 10)."""
TRAIN_PER_LIST = 64
"""Training vectors per inverted list (FAISS warns below 39); the rest of the corpus is not
needed to place the centroids."""


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def choose_factory(n: int, dim: int) -> str:
    """The factory string "auto" stands for, for N vectors of dimension D (see module doc)."""
    if n < FLAT_BELOW:
        return "Flat"
    if n < HNSW_BELOW:
        return "HNSW32"
    return ivfpq_factory(n, dim)


def ivf_lists(n: int) -> int:
    """Inverted lists for N vectors: ~4*sqrt(N), a power of two."""
    return 1 << round(math.log2(4 * math.sqrt(max(n, 1))))


def ivfpq_factory(n: int, dim: int) -> str:
    """OPQ rotation to at most 256 dims, ~4*sqrt(N) inverted lists (a power of two), and PQ
    codes of one byte per 4 dims."""
    nlist = ivf_lists(n)
    out = min(dim, 256) // 16 * 16 or dim
    m = out // 4 if out % 4 == 0 else out
    return f"OPQ{m}_{out},IVF{nlist},PQ{m}"


def _ivf_nlist(factory: str) -> int | None:
    found = re.search(r"IVF(\d+)", factory)
    return int(found.group(1)) if found else None


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return False
    return True


def _new_index(dim: int, factory: str) -> faiss.Index:
    """An empty index for `factory`; IDMap2-wrapped unless it stores ids itself (IVF)."""
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1]
        raise ConfigError(f"bad FAISS index type '{factory}': {first}") from None
    if _is_ivf(inner):
        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(inner))
        ivf.nprobe = max(1, ivf.nlist // 8)  # 1/16 lost ~1/4 of recall@10 in bench_index
        if hasattr(ivf, "do_polysemous_training"):  # Hamming filtering unused; costs minutes
            ivf.do_polysemous_training = False
        chain: Any = getattr(inner, "chain", None)  # the transforms of an IndexPreTransform
        for i in range(chain.size() if chain is not None else 0):
            step = faiss.downcast_VectorTransform(chain.at(i))
            if isinstance(step, faiss.OPQMatrix):
                step.niter = OPQ_ITERATIONS
        return inner
    hnsw = getattr(faiss.downcast_index(inner), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = HNSW_EF_SEARCH
    return faiss.IndexIDMap2(inner)


def _train(index: faiss.Index, vectors: np.ndarray, factory: str) -> None:
    nlist = _ivf_nlist(factory) or 1
    if len(vectors) < nlist:
        raise ConfigError(
            f"index type '{factory}' needs at least {nlist} vectors to train, the corpus has "
            f"{len(vectors)}; use --index-type auto or a smaller IVF"
        )
    sample = TRAIN_PER_LIST * max(nlist, 256)
    if len(vectors) > sample:  # a fixed-seed subset: the build stays reproducible
        rows = np.random.default_rng(0).choice(len(vectors), sample, replace=False)
        vectors = vectors[np.sort(rows)]
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index)) if _is_ivf(index) else None
    if ivf is not None and gpu_count() > 0:
        try:  # FAISS's way to run an IVF's k-means on GPUs while the index stays on the CPU
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        except Exception as exc:  # a GPU that cannot take it: k-means on the CPU
            logger.warning("GPU k-means unavailable (%s); training on CPU", exc)
    index.train(vectors)
    if ivf is not None:
        ivf.clustering_index = None


class VectorIndex:
    """Inner-product search over (N, D) float32 vectors with int64 catalog ids."""

    def __init__(self, index: faiss.Index, factory: str) -> None:
        self.index = index
        self.factory = factory
        self._id_map = isinstance(index, faiss.IndexIDMap2)
        self._tombstones = self._count_tombstones()
        self._gpu_resources: Any = None
        self._search_index = self._search_copy()

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, factory: str = "Flat") -> VectorIndex:
        """Index (N, D) `vectors` under `ids`; factory "auto" chooses by N (choose_factory)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        resolved = choose_factory(n, dim) if factory == AUTO else factory
        index = _new_index(dim, resolved)
        if not index.is_trained:
            _train(index, vectors, resolved)
        if n:
            index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        logger.info("built FAISS %s over %d vectors", resolved, n)
        return cls(index, resolved)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def tombstones(self) -> int:
        """Removed vectors still inside the index (skipped by search)."""
        return self._tombstones

    def __len__(self) -> int:
        """Live vectors."""
        return int(self.index.ntotal) - self._tombstones

    def ids(self) -> np.ndarray:
        """Sorted ids of the live vectors (for consistency checks; O(N))."""
        if isinstance(self.index, faiss.IndexIDMap2):
            slots = faiss.vector_to_array(self.index.id_map)
        else:
            invlists: Any = faiss.extract_index_ivf(self.index).invlists
            slots = np.concatenate(
                [np.zeros(0, np.int64)]
                + [
                    faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                    for i in range(invlists.nlist)
                ]
            )
        return np.sort(slots[slots >= 0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) queries -> scores (M, k') and ids (M, k'), k' = min(k, live N); best first.

        With tombstones, or an approximate index that finds fewer than k', missing slots hold
        id -1 and score -inf at the end of the row.
        """
        k = min(k, len(self))
        m = len(queries)
        if k == 0:
            return np.zeros((m, 0), np.float32), np.zeros((m, 0), np.int64)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        limit = min(k + self._tombstones, int(self.index.ntotal))  # enough in the worst case
        fetch = min(2 * k, limit) if self._tombstones else k
        while True:  # widen while tombstones crowd out live results
            scores, ids = self._search_index.search(q, fetch)
            if fetch >= limit or bool(((ids >= 0).sum(1) >= k).all()):
                break
            fetch = min(4 * fetch, limit)
        if fetch == k and (ids >= 0).all():
            return scores, ids
        return _drop_missing(scores, ids, k)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (N, D) vectors under new `ids` (the index must be trained already)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(vectors):
            self.index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            self._search_index = self._search_copy()

    def remove(self, ids: np.ndarray, tombstone: bool | None = None) -> int:
        """Remove every vector stored under `ids`; returns how many were removed.

        tombstone=None removes natively where FAISS can and falls back to tombstones; True
        forces tombstones (an IDMap-wrapped index only), False forbids them.
        """
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return 0
        removed = None if tombstone else self._remove_native(ids)
        if removed is None:
            if tombstone is False or not self._id_map:
                raise IndexError_(f"FAISS index {self.factory} cannot remove vectors")
            removed = self._mark_tombstones(ids)
        self._search_index = self._search_copy()
        return removed

    def _remove_native(self, ids: np.ndarray) -> int | None:
        try:
            return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))
        except RuntimeError as exc:  # e.g. HNSW: "remove_ids not implemented"
            logger.debug("native removal unsupported by %s: %s", self.factory, exc)
            return None

    def _mark_tombstones(self, ids: np.ndarray) -> int:
        index = self.index
        assert isinstance(index, faiss.IndexIDMap2)
        slots = faiss.vector_to_array(index.id_map)
        hit = np.isin(slots, ids)
        slots[hit] = -1
        faiss.copy_array_to_vector(slots, index.id_map)
        index.construct_rev_map()
        self._tombstones += int(hit.sum())
        return int(hit.sum())

    def _count_tombstones(self) -> int:
        if not isinstance(self.index, faiss.IndexIDMap2):
            return 0
        return int((faiss.vector_to_array(self.index.id_map) < 0).sum())

    def _search_copy(self) -> faiss.Index:
        """The index searches run on: a GPU copy when possible, else the master itself."""
        if gpu_count() == 0:
            return self.index
        try:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
            logger.info("FAISS index copied to GPU 0")
            return gpu
        except Exception as exc:  # an index type without a GPU version stays on the CPU
            logger.warning("FAISS GPU unavailable for %s (%s); searching on CPU", self.factory, exc)
            return self.index

    def save(self, path: Path) -> None:
        """Write the index as `path` (temp file, fsync, rename)."""
        write_atomic(path, lambda tmp: faiss.write_index(self.index, str(tmp)))

    @classmethod
    def load(cls, path: Path, factory: str = "Flat") -> VectorIndex:
        """Read a saved index; a missing or damaged file is one IndexError_ naming it."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            what = "missing" if not path.is_file() else "damaged"
            detail = str(exc).strip().splitlines()[-1][:120] if what == "damaged" else ""
            raise IndexError_(
                f"vector index {path} is {what}{f' ({detail})' if detail else ''}; run "
                f"`retr index repair --index {path.parent}`"
            ) from None
        return cls(index, factory)


def _drop_missing(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first k results with id >= 0 of each row, order unchanged; pad with -1/-inf."""
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for row, (s, i) in enumerate(zip(scores, ids, strict=True)):
        live = i >= 0
        n = min(k, int(live.sum()))
        out_s[row, :n] = s[live][:n]
        out_i[row, :n] = i[live][:n]
    return out_s, out_i
