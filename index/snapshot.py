"""A reader's view of an index: one published manifest generation, never blocked by writers.

`IndexSnapshot.open` reads the manifest, the whitening and the vectors it names (a FAISS file,
or a Milvus collection seen as of this generation: index.vector_backends), and maps the segments
lazily (index.store). Every file it reads is immutable, and segments are opened
with HDF5 file locking off, so any number of readers run beside the one writer. A reader stays
on its generation until it asks for a newer one (`changed` / re-open), which the Retriever does
between queries.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from features.core import IndexError_
from index.layout import IndexConfig, IndexPaths, parse_config
from index.manifest import Manifest
from index.store import FeatureStore
from index.vector_backends import Vectors, vector_backend
from index.whitening import Whitening

logger = logging.getLogger(__name__)

OPEN_TRIES = 3
Stamp = tuple[int, int, int]
"""(inode, mtime ns, size) of manifest.json: a new one means a new generation."""


def manifest_stamp(paths: IndexPaths) -> Stamp | None:
    try:
        st = os.stat(paths.manifest)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass
class IndexSnapshot:
    paths: IndexPaths
    config: IndexConfig
    manifest: Manifest
    store: FeatureStore
    vectors: Vectors
    whitening: Whitening
    stamp: Stamp | None

    @classmethod
    def open(cls, paths: IndexPaths) -> IndexSnapshot:
        """The newest published generation. A writer that commits twice while this reads may
        delete a file it named: then the newer manifest is read instead (a few tries)."""
        for _ in range(OPEN_TRIES - 1):
            stamp = manifest_stamp(paths)
            try:
                return cls._open(paths)
            except IndexError_:
                if manifest_stamp(paths) == stamp:
                    raise
        return cls._open(paths)

    @classmethod
    def _open(cls, paths: IndexPaths) -> IndexSnapshot:
        stamp = manifest_stamp(paths)
        manifest = Manifest.load(paths.root)
        if not manifest.published:
            raise IndexError_(_unfinished(paths, manifest))
        try:
            config = parse_config(manifest.config)
        except ValueError as exc:
            raise IndexError_(
                f"{paths.manifest}: bad config copy ({exc}); {paths.repair_hint()}"
            ) from None
        assert manifest.whitening is not None
        whitening = Whitening.load(paths.root / manifest.whitening.name)
        backend = vector_backend(paths.root, config.vector_store, config.index_type)
        vectors = backend.open(manifest)
        if vectors.dim != whitening.dim:
            raise IndexError_(
                f"{backend.where(manifest)} holds vectors of {vectors.dim} dims, the whitening "
                f"{paths.root / manifest.whitening.name} makes {whitening.dim}; "
                f"{paths.repair_hint()}"
            )
        fingerprints = (manifest.global_fingerprint, manifest.local_fingerprint)
        store = FeatureStore(paths.root, manifest, fingerprints if fingerprints[0] else None)
        return cls(paths, config, manifest, store, vectors, whitening, stamp)

    @property
    def generation(self) -> int:
        return self.manifest.generation

    def changed(self) -> bool:
        """Whether a writer has committed since this snapshot was taken (one stat call)."""
        return manifest_stamp(self.paths) != self.stamp

    def close(self) -> None:
        self.store.close()


def _unfinished(paths: IndexPaths, manifest: Manifest) -> str:
    waiting = sum(len(s.live_ids()) for s in manifest.pending)
    kept = f" ({waiting} images already extracted are kept)" if waiting else ""
    return (
        f"{paths.root} has no finished build yet{kept}; run `retr index build CORPUS --index "
        f"{paths.root}` to finish it"
    )
