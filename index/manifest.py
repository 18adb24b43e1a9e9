"""The manifest: which immutable files make up an index, swapped atomically at every commit.

The index's storage discipline (as Lucene and LevelDB do it):

- Features live in **segment files** (`segments/seg-<n>.h5`, index.segments): written once to
  a temporary name, fsynced, renamed, and never modified after.
- `manifest.json` lists the live segments, the ids each one no longer serves (`dead`: an image
  removed, or re-extracted into a newer segment), the whitening and vector-index files, and the
  size and SHA-256 of every file it names. A commit writes a new manifest next to the old one and
  `os.replace`s it: readers and a crash see the old manifest or the new one, never a mix.
- `pending` segments hold what an unfinished build or add has extracted (committed batch by
  batch, so a kill costs at most one batch); they are invisible to searches until the operation
  *publishes* them, in one commit together with the new whitening and vector index.
- `catalog_deletes` lists catalog rows that a committed removal must delete: the catalog lives
  in another database, so its changes follow the manifest commit and are redone by the next
  writer if a crash comes in between.
- Files that no manifest names (a crash's leftovers, replaced segments) are deleted by the next
  writer, except those of the previous generation, which a reader may still be using.
- The vectors live either in a FAISS file of the index directory (`vectors`) or in a collection
  of an external engine (`collection`, Milvus), which is edited in place: `vector_intent` and
  `vector_hidden` make those edits follow the manifest's generations
  (index.vector_backends.milvus explains how).

Ids are kept as sorted runs `[start, length]`, so a segment of consecutive ids costs a few bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from features.core import IndexError_
from index.atomic import is_tmp, write_bytes_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = 2
"""Layout version: 2 = segments + manifest (1 was global.h5 / local.h5, edited in place)."""

Runs = list[list[int]]


def pack_ids(ids: np.ndarray | list[int]) -> Runs:
    """Sorted unique ids -> runs [[start, length], ...]."""
    a = np.unique(np.asarray(ids, dtype=np.int64))
    if len(a) == 0:
        return []
    breaks = np.flatnonzero(np.diff(a) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(a)]])
    return [[int(a[s]), int(e - s)] for s, e in zip(starts, ends, strict=True)]


_OWNED = re.compile(
    r"^(whitening-\d+\.npz|vectors-\d+\.faiss|codec-\d+\.npy|segments/seg-\d+\.h5)$"
)


def owned_file(rel: str) -> bool:
    """Whether `rel` (relative to the index root) names a file the manifest manages: a
    segment, whitening, vector index or codec of some generation, or a temporary file."""
    return bool(_OWNED.match(rel)) or is_tmp(Path(rel))


def unpack_ids(runs: Runs) -> np.ndarray:
    """Runs -> sorted int64 ids."""
    if not runs:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in runs])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Model):
    """A file of the index directory, with what it must look like."""

    name: str
    bytes: int
    sha256: str


class CollectionEntry(_Model):
    """The vectors of an index in an external engine's collection (index.vector_backends)."""

    name: str
    """The collection's own name (not an alias)."""
    dim: int
    index_type: str
    """The engine's index type (e.g. Milvus HNSW)."""


COLLECTION_MARK = "collection:"
"""Prefix of a collection in `Manifest.files()` (kept for readers, like files, for a generation)."""


class SegmentEntry(FileEntry):
    encoding: str
    """How its local descriptors are stored (index.encoding)."""
    ids: Runs
    """Every image id stored in the segment."""
    dead: Runs = []
    """Ids whose copy in this segment no longer counts (removed, or stored again later)."""

    def live_ids(self) -> np.ndarray:
        ids = unpack_ids(self.ids)
        return np.setdiff1d(ids, unpack_ids(self.dead), assume_unique=True) if self.dead else ids


class Manifest(_Model):
    format: int = FORMAT
    generation: int = 0
    next_segment: int = 1
    segments: list[SegmentEntry] = []
    """Published segments, oldest first: what searches read."""
    pending: list[SegmentEntry] = []
    """Segments of an unfinished build or add, oldest first: not searchable yet."""
    pending_dead: Runs = []
    """Ids to drop from the published segments when the pending work is published."""
    whitening: FileEntry | None = None
    """The whitening searches use (its kind: `whitening_kind`)."""
    whitening_kind: str = "pca"
    """"pca" (refitted on the corpus by every build) or "learned" (retr train whitening: kept by
    builds, which refit only the PCA one, in `whitening_other`)."""
    whitening_other: FileEntry | None = None
    """The whitening of the other kind, kept so that `retr train whitening --use` switches back."""
    vectors: FileEntry | None = None
    """The FAISS file of the vectors, or None when they live in `collection`."""
    collection: CollectionEntry | None = None
    """The external collection holding the vectors (Milvus), or None."""
    vector_count: int = 0
    vector_hidden: Runs = []
    """Ids removed by a committed operation whose vectors `collection` still holds: searches skip
    them; the writer deletes them from the collection right after the commit (or, after a crash,
    the next writer does)."""
    vector_intent: Runs = []
    """Ids whose vectors a publish is writing into `collection` before its commit; when the
    commit never came, the next writer puts back what this generation holds for them."""
    codec: FileEntry | None = None
    """The product quantiser of a "pq" local store, once trained."""
    catalog_deletes: Runs = []
    """Catalog rows that a committed removal still has to delete."""
    previous_files: list[str] = []
    """Files of the generation before this one, kept for readers that still use it."""
    config: dict[str, Any] = {}
    """A copy of retr.json, so that `retr index repair` can restore it."""
    global_fingerprint: str = ""
    local_fingerprint: str = ""
    """The extractors every segment was written by (set by the first commit)."""
    index_uid: str = ""
    """This index's identity, recorded in its catalog too, so that two index directories never
    share one catalog table (index.catalog); "" for indexes made before it existed."""

    # --- views ---------------------------------------------------------------------------------

    def live_map(self, include_pending: bool = False) -> dict[int, str]:
        """id -> name of the segment that serves it (published only, unless include_pending: a
        writer's view, where pending copies win and pending_dead ids are gone)."""
        out: dict[int, str] = {}
        for seg in self.segments:
            out.update(dict.fromkeys(seg.live_ids().tolist(), seg.name))
        if include_pending:
            for i in unpack_ids(self.pending_dead).tolist():
                out.pop(i, None)
            for seg in self.pending:
                out.update(dict.fromkeys(seg.live_ids().tolist(), seg.name))
        return out

    def live_ids(self) -> np.ndarray:
        """Sorted ids that searches can return (published, live)."""
        parts = [seg.live_ids() for seg in self.segments]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def files(self) -> list[str]:
        """Names (relative to the index root) of every file this manifest references."""
        names = [f"segments/{s.name}" for s in self.segments + self.pending]
        entries = (self.whitening, self.whitening_other, self.vectors, self.codec)
        names += [e.name for e in entries if e is not None]
        if self.collection is not None:
            names.append(COLLECTION_MARK + self.collection.name)
        return names

    @property
    def published(self) -> bool:
        has_vectors = self.vectors is not None or self.collection is not None
        return has_vectors and self.whitening is not None

    # --- persistence ---------------------------------------------------------------------------

    def save(self, root: Path) -> None:
        """Commit: replace `root/manifest.json` atomically."""
        blob = json.dumps(self.model_dump(), separators=(",", ":"), sort_keys=True)
        write_bytes_atomic(root / MANIFEST_NAME, blob.encode())

    @classmethod
    def load(cls, root: Path) -> Manifest:
        path = root / MANIFEST_NAME
        try:
            data = json.loads(path.read_bytes())
            manifest = cls.model_validate(data)
        except FileNotFoundError:
            raise IndexError_(_missing(root)) from None
        except (OSError, ValueError, ValidationError) as exc:
            first = str(exc).strip().splitlines()[0][:120]
            raise IndexError_(
                f"{path} is damaged ({first}); run `retr index repair --index {root}`"
            ) from None
        if manifest.format != FORMAT:
            raise IndexError_(f"{path}: layout version {manifest.format} is not {FORMAT}")
        return manifest


def _missing(root: Path) -> str:
    if (root / "global.h5").exists() or (root / "local.h5").exists():
        return (
            f"{root} was written by an older retr (global.h5 / local.h5, no manifest.json); "
            "build it again into a new directory: `retr index build CORPUS --index NEWDIR`"
        )
    return f"{root / MANIFEST_NAME} is missing; run `retr index repair --index {root}`"
