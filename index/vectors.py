"""The FAISS inner-product index over whitened global descriptors, keyed by catalog ids.

Built from a FAISS factory string (exact "Flat" by default), wrapped in an IDMap so FAISS ids are
catalog ids. Saved atomically (temp file + os.replace). Searches run on a GPU when a FAISS GPU
build and a CUDA device are present.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from features.errors import IndexError_

logger = logging.getLogger(__name__)


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


class VectorIndex:
    """Inner-product search over (N, D) float32 vectors with int64 catalog ids."""

    def __init__(self, index: faiss.Index, factory: str) -> None:
        self.index = index
        self.factory = factory
        self._search_index = index
        if gpu_count() > 0:
            try:
                res = faiss.StandardGpuResources()
                self._search_index = faiss.index_cpu_to_gpu(res, 0, index)
                self._gpu_resources = res
                logger.info("FAISS index moved to GPU 0")
            except Exception as exc:  # an index type without a GPU version stays on the CPU
                logger.warning("FAISS GPU unavailable for %s (%s); searching on CPU", factory, exc)

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, factory: str = "Flat") -> VectorIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vectors)
        if len(ids):
            index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        return cls(index, factory)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) queries -> scores (M, k') and ids (M, k'), k' = min(k, N); best first."""
        k = min(k, len(self))
        if k == 0:
            m = len(queries)
            return np.zeros((m, 0), np.float32), np.zeros((m, 0), np.int64)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self._search_index.search(q, k)
        return scores, ids

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, factory: str = "Flat") -> VectorIndex:
        if not path.is_file():
            raise IndexError_(f"vector index {path} is missing; run `retr index build` again")
        return cls(faiss.read_index(str(path)), factory)
