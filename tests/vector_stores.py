"""Vector backends under test: FAISS files and Milvus Lite driven through the writer's contract
(index.vector_backends.VectorBackend), so that one search-layer test runs on both."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index.manifest import Manifest, SegmentEntry, pack_ids
from index.vector_backends import VectorBackend, Vectors, vector_backend
from index.vector_backends.milvus import MilvusTarget, release

BACKENDS = ["faiss", "milvus"]
EXACT = {"faiss": "Flat", "milvus": "FLAT"}


def lite_store(root: Path, name: str = "retr_test") -> str:
    """A Milvus Lite target in `root`."""
    return f"milvus-lite://{root / 'vectors.db'}/{name}"


def release_lite(value: str | None) -> None:
    """Stop this process's embedded Milvus Lite server of `value` (frees the file)."""
    if value and value.startswith("milvus-lite://"):
        release(MilvusTarget.parse(value))


def segment(ids: np.ndarray) -> SegmentEntry:
    """A stand-in segment entry whose live ids are `ids` (no file behind it)."""
    return SegmentEntry(name="seg-0.h5", bytes=0, sha256="", encoding="float16", ids=pack_ids(ids))


class StoredVectors:
    """One backend's vectors as the writer drives them: a manifest whose live ids are the
    stored ids, rebuilt, edited and removed from one generation to the next, and reopened the
    way a reader opens them."""

    def __init__(self, kind: str, root: Path, index_type: str | None = None) -> None:
        self.kind = kind
        self.root = root
        self.store = None if kind == "faiss" else lite_store(root)
        self.backend: VectorBackend = vector_backend(root, self.store, index_type or EXACT[kind])
        self.manifest = Manifest()

    def _next(self, ids: np.ndarray) -> Manifest:
        new = self.manifest.model_copy(deep=True)
        new.segments = [segment(ids)] if len(ids) else []
        new.generation = self.manifest.generation + 1
        return new

    def _commit(self, new: Manifest) -> Vectors:
        self.backend.finish(new)
        self.manifest = new
        return self.backend.open(new)

    def build(self, ids: np.ndarray, x: np.ndarray) -> Vectors:
        new = self._next(ids)
        self.backend.rebuild(new, new.generation, np.asarray(ids, np.int64), x)
        return self._commit(new)

    def edit(self, fresh_ids: np.ndarray, fresh_x: np.ndarray, gone: object = ()) -> Vectors:
        """Add or replace `fresh_ids`, drop `gone` (an add or update's publish)."""
        dropped = np.asarray(gone, np.int64)
        live = np.union1d(np.setdiff1d(self.manifest.live_ids(), dropped), fresh_ids)
        new = self._next(live)
        fresh = (np.asarray(fresh_ids, np.int64), np.asarray(fresh_x, np.float32))
        self.backend.edit(self.manifest, new, new.generation, dropped, fresh, None)
        return self._commit(new)

    def remove(self, ids: np.ndarray, tombstone: bool | None = None) -> Vectors:
        ids = np.asarray(ids, np.int64)
        new = self._next(np.setdiff1d(self.manifest.live_ids(), ids))
        self.backend.remove(self.manifest, new, new.generation, ids, tombstone)
        return self._commit(new)

    def reopen(self) -> Vectors:
        return self.backend.open(self.manifest)

    def close(self) -> None:
        self.backend.close()
        release_lite(self.store)
