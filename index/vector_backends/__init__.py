"""Where an index keeps its whitened global descriptors: FAISS files (default) or Milvus.

`IndexConfig.vector_store` (`retr index build --vectors`) chooses the backend:

    None or "faiss"                      one FAISS file per generation in the index directory,
                                         `vectors-<g>.faiss` (faiss_files; index.vectors)
    "milvus://[USER:PASSWORD@]HOST:PORT/COLLECTION"
                                         a Milvus server (standalone or distributed) (milvus)
    "milvus-lite://PATH.db/COLLECTION"   an embedded Milvus Lite file, for tests and one-process
                                         use (a relative PATH is inside the index directory)

Both backends take part in the writer's commit protocol (index.writer) through one contract,
`VectorBackend`: a publish either rebuilds the vectors for the next generation or edits the
current ones, and only the manifest commit makes the result searchable; readers open the vectors
of their generation (`open`) and search them through `Vectors`. The FAISS backend writes a new
file per generation, so the commit alone switches readers; the Milvus backend edits one shared
collection in place and relies on the manifest's `vector_intent` / `vector_hidden` records and a
generation stamp on every row (`in_place`; its module docstring explains the guarantees).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from features.core import ConfigError, IndexError_
from index.manifest import Manifest

FAISS = "faiss"
MILVUS_SCHEMES = ("milvus://", "milvus-lite://")

Published = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""published(ids) -> (ids that the committed generation holds, their whitened (N, D) vectors)."""


class Vectors(Protocol):
    """The vectors of one generation, as searches see them."""

    factory: str
    """The index type (a FAISS factory string, or the engine's index type)."""

    @property
    def dim(self) -> int: ...

    @property
    def tombstones(self) -> int:
        """Removed vectors still held and skipped by searches."""
        ...

    def __len__(self) -> int: ...

    def ids(self) -> np.ndarray:
        """Sorted live ids (for checks: O(N))."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) queries -> scores (M, k') and ids (M, k'), k' = min(k, live N), best first;
        slots an approximate index could not fill hold id -1 and score -inf."""
        ...


class VectorBackend(ABC):
    """One index's vector storage, driven by its writer (index.writer) and opened by readers."""

    in_place: bool = False
    """Whether edits change storage that readers of the current generation use (then the writer
    records `vector_intent` before an edit and `vector_hidden` for removals)."""

    @abstractmethod
    def where(self, manifest: Manifest) -> str:
        """Where `manifest`'s vectors are, for messages (passwords masked)."""

    @abstractmethod
    def open(self, manifest: Manifest) -> Vectors:
        """The vectors of `manifest`'s (published) generation; IndexError_ naming what is wrong
        when they are missing, damaged, unreachable or of another shape than recorded."""

    @abstractmethod
    def rebuild(self, new: Manifest, gen: int, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store (N, D) whitened `vectors` under `ids` as generation `gen`, unseen by readers
        until `new` (whose vector fields this sets) is committed."""

    @abstractmethod
    def edit(
        self,
        old: Manifest,
        new: Manifest,
        gen: int,
        gone: np.ndarray,
        fresh: tuple[np.ndarray, np.ndarray],
        tombstone: bool | None,
    ) -> int:
        """Generation `gen` from `old`'s vectors: without `gone` ids, with `fresh` (ids, (N, D)
        vectors) added or replacing the stored ones. Sets `new`'s vector fields; returns the
        tombstones it added."""

    @abstractmethod
    def remove(
        self, old: Manifest, new: Manifest, gen: int, ids: np.ndarray, tombstone: bool | None
    ) -> int:
        """Generation `gen` from `old`'s vectors without `ids`; returns the tombstones added."""

    def recover(self, manifest: Manifest, published: Published) -> bool:
        """Undo what a killed publish wrote ahead of its commit; True when `manifest` changed
        (the writer then saves it)."""
        return False

    def finish(self, manifest: Manifest) -> bool:
        """Work that follows a commit (deleting hidden vectors, moving an alias); True when
        `manifest` changed. Idempotent: the next writer calls it again after a crash."""
        return False

    def collect_garbage(self, keep: set[str]) -> list[str]:
        """Drop stored generations that no name in `keep` (Manifest.files() of the current and
        previous generation) refers to; returns what was dropped. Files are the writer's job."""
        return []

    def check(self, manifest: Manifest, live: np.ndarray, dim: int) -> list[str]:
        """Problems (one line each) of the stored vectors against the live ids and the
        whitening's dimension; [] when they agree."""
        try:
            vectors = self.open(manifest)
        except IndexError_ as exc:
            return [str(exc)]
        return compare(self.where(manifest), vectors, live, dim)

    def close(self) -> None:  # noqa: B027 (optional: only backends with connections need it)
        """Release connections."""


def compare(
    where: str, vectors: Vectors, live: np.ndarray, dim: int, ignore: np.ndarray | None = None
) -> list[str]:
    """Problems of `vectors` against the live ids and the whitening's dimension (ids in
    `ignore` left out of the comparison)."""
    problems = []
    if vectors.dim != dim:
        problems.append(f"{where} has {vectors.dim} dims, the whitening {dim}")
    held = vectors.ids()
    if ignore is not None and len(ignore):
        held, live = np.setdiff1d(held, ignore), np.setdiff1d(live, ignore)
    if not np.array_equal(held, live):
        extra, missing = np.setdiff1d(held, live), np.setdiff1d(live, held)
        problems.append(
            f"{where} disagrees with the live images ({len(extra)} extra ids, {len(missing)} "
            "missing)"
        )
    return problems


def mask_store(value: str) -> str:
    """A `vector_store` setting with its password (USER:PASSWORD@) replaced by ***."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", value)


def check_vector_store(value: str | None) -> str | None:
    """A valid `vector_store` setting (None for the default FAISS files); ValueError otherwise."""
    if value is None or value == FAISS:
        return None
    if value.startswith(MILVUS_SCHEMES):
        from index.vector_backends.milvus import MilvusTarget

        MilvusTarget.parse(value)  # raises ValueError naming what is wrong
        return value
    raise ValueError(
        f"unknown vector store '{value}': use faiss, milvus://HOST:PORT/COLLECTION or "
        "milvus-lite://PATH.db/COLLECTION"
    )


def vector_backend(root: Path, vector_store: str | None, index_type: str) -> VectorBackend:
    """The backend of an index directory `root` for its configured store and index type."""
    if vector_store is None or vector_store == FAISS:
        from index.vector_backends.faiss_files import FaissFiles

        return FaissFiles(root, index_type)
    if vector_store.startswith(MILVUS_SCHEMES):
        from index.vector_backends.milvus import MilvusBackend

        return MilvusBackend(vector_store, root, index_type)
    raise ConfigError(f"unknown vector store '{vector_store}'")
