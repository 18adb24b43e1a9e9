"""The default vector backend: one FAISS file per generation, `vectors-<g>.faiss`, in the index
directory (index.vectors holds the index itself).

Every publish writes a new file (temp file, fsync, rename) that the manifest commit names, so
readers switch at the commit and nothing they use is ever changed; files of generations before
the previous one are deleted by the writer's garbage collection (index.writer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from features.core import IndexError_, file_sha256
from index.manifest import FileEntry, Manifest
from index.vector_backends import VectorBackend, compare
from index.vectors import VectorIndex


class FaissFiles(VectorBackend):
    in_place = False

    def __init__(self, root: Path, index_type: str) -> None:
        self.root = Path(root)
        self.index_type = index_type

    def where(self, manifest: Manifest) -> str:
        name = manifest.vectors.name if manifest.vectors else "vectors-?.faiss"
        return f"vector index {self.root / name}"

    def _load(self, manifest: Manifest) -> VectorIndex:
        if manifest.vectors is None:
            raise IndexError_(
                f"{self.root}: the manifest names no FAISS vector file; run `retr index repair "
                f"--index {self.root}`"
            )
        return VectorIndex.load(self.root / manifest.vectors.name, self.index_type)

    def open(self, manifest: Manifest) -> VectorIndex:
        vectors = self._load(manifest)
        if len(vectors) != manifest.vector_count:
            raise IndexError_(
                f"{self.where(manifest)} holds {len(vectors)} vectors, the manifest expects "
                f"{manifest.vector_count}; run `retr index repair --index {self.root}`"
            )
        return vectors

    def rebuild(self, new: Manifest, gen: int, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._save(new, gen, VectorIndex.build(ids, vectors, self.index_type))

    def edit(
        self,
        old: Manifest,
        new: Manifest,
        gen: int,
        gone: np.ndarray,
        fresh: tuple[np.ndarray, np.ndarray],
        tombstone: bool | None,
    ) -> int:
        vectors = self._load(old)
        before = vectors.tombstones
        gone = np.union1d(gone, fresh[0])  # a changed image's old vector goes too
        vectors.remove(gone[np.isin(gone, vectors.ids())], tombstone)
        if len(fresh[0]):
            vectors.add(*fresh)
        self._save(new, gen, vectors)
        return vectors.tombstones - before

    def remove(
        self, old: Manifest, new: Manifest, gen: int, ids: np.ndarray, tombstone: bool | None
    ) -> int:
        vectors = self._load(old)
        before = vectors.tombstones
        vectors.remove(ids[np.isin(ids, vectors.ids())], tombstone)
        self._save(new, gen, vectors)
        return vectors.tombstones - before

    def _save(self, new: Manifest, gen: int, vectors: VectorIndex) -> None:
        name = f"vectors-{gen}.faiss"
        path = self.root / name
        vectors.save(path)
        new.vectors = FileEntry(name=name, bytes=path.stat().st_size, sha256=file_sha256(path))
        new.collection = None
        new.vector_count = len(vectors)

    def check(self, manifest: Manifest, live: np.ndarray, dim: int) -> list[str]:
        try:
            vectors = self._load(manifest)  # the count is compared through the ids
        except IndexError_ as exc:
            return [str(exc)]
        return compare(self.where(manifest), vectors, live, dim)
