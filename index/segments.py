"""Segment files: the immutable HDF5 files that hold the features of a batch of images.

One segment holds, for n images sorted by id, column arrays (every dataset contiguous, never
chunked or compressed, so that a reader can take slices straight from a memory map):

    ids          (n,)      int64 catalog ids, ascending
    sha256       (n,)      S64   content hash of the file the features came from
    paths        (n,)      str   catalog path, and `labels` (n,) str ("" = none): what
                                 `retr index repair` needs to rebuild a lost catalog
    image_size   (n, 2)    int32 (width, height)
    global       (n, Dg)   float32 raw global descriptors (before whitening)
    offsets      (n + 1,)  int64 image i's local features are rows offsets[i]:offsets[i+1] of
    keypoints    (K, 2)    float32 x, y in original-image pixels
    scores       (K,)      float32
    descriptors  (K, D) float16 / float32 / int8, or (K, M) uint8 PQ codes (attribute
                 `encoding`, index.encoding)

Attributes record the layout version, the fingerprints of the global and local extractors, the
encoding, and the SHA-256 of the PQ codebook the codes refer to. A segment is written once
(index.atomic.write_atomic) and never changed; the manifest records its size and SHA-256.

Reading: the small columns (ids, offsets, sizes) are read when a segment is first opened; the
big ones through a private copy-on-write memory map at the offset HDF5 reports, so a shortlist
read costs a slice per candidate instead of one HDF5 call per dataset (about 0.5 ms per image
through h5py's objects, measured on the previous one-group-per-image layout). Segments are
opened read-only with HDF5 file locking off: readers never block a writer, and a writer never
touches a published file.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from features.core import IndexError_, file_sha256
from features.types import LocalFeatures
from index.atomic import write_atomic
from index.encoding import ProductQuantizer, decode, encode

SEGMENT_FORMAT = 2
SEGMENTS_DIR = "segments"
_STR = h5py.string_dtype("utf-8")


def segment_name(number: int) -> str:
    return f"seg-{number:08d}.h5"


@dataclass(frozen=True)
class ImageFeatures:
    """What a segment stores for one image."""

    id: int
    sha256: str
    path: str
    label: str | None
    descriptor: np.ndarray
    """(Dg,) raw global descriptor."""
    local: LocalFeatures


@dataclass(frozen=True)
class SegmentMeta:
    global_fingerprint: str
    local_fingerprint: str
    encoding: str
    codec_sha256: str = ""

    def attrs(self) -> dict[str, Any]:
        return {
            "format": SEGMENT_FORMAT,
            "global_fingerprint": self.global_fingerprint,
            "local_fingerprint": self.local_fingerprint,
            "encoding": self.encoding,
            "codec_sha256": self.codec_sha256,
        }


@dataclass(frozen=True)
class SegmentData:
    """The columns of a segment (see the module docstring), in memory."""

    ids: np.ndarray
    sha256: list[str]
    paths: list[str]
    labels: list[str]
    image_size: np.ndarray
    globals_: np.ndarray
    offsets: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray

    @classmethod
    def from_images(
        cls, images: Sequence[ImageFeatures], encoding: str, pq: ProductQuantizer | None
    ) -> SegmentData:
        images = sorted(images, key=lambda im: im.id)
        counts = [len(im.local) for im in images]
        dim = images[0].local.descriptors.shape[1] if images else 0
        desc = (
            np.concatenate([im.local.descriptors for im in images])
            if images
            else np.zeros((0, dim), np.float32)
        )
        return cls(
            ids=np.array([im.id for im in images], np.int64),
            sha256=[im.sha256 for im in images],
            paths=[im.path for im in images],
            labels=[im.label or "" for im in images],
            image_size=np.array([im.local.image_size for im in images], np.int32).reshape(-1, 2),
            globals_=np.stack([im.descriptor.astype(np.float32) for im in images])
            if images
            else np.zeros((0, 0), np.float32),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            keypoints=_cat([im.local.keypoints for im in images], (0, 2), np.float32),
            scores=_cat([im.local.scores for im in images], (0,), np.float32),
            descriptors=encode(desc, encoding, pq),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> SegmentData:
        """The images at `rows` (ascending), local arrays gathered."""
        spans = [np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]
        flat = np.concatenate(spans) if spans else np.zeros(0, np.int64)
        counts = [len(s) for s in spans]
        return SegmentData(
            ids=self.ids[rows],
            sha256=[self.sha256[r] for r in rows],
            paths=[self.paths[r] for r in rows],
            labels=[self.labels[r] for r in rows],
            image_size=self.image_size[rows],
            globals_=self.globals_[rows],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            keypoints=self.keypoints[flat],
            scores=self.scores[flat],
            descriptors=self.descriptors[flat],
        )

    @staticmethod
    def concat(parts: Sequence[SegmentData]) -> SegmentData:
        """One segment's columns from several, re-sorted by id."""
        shifts = np.cumsum([0] + [len(p.keypoints) for p in parts[:-1]])
        offsets = np.concatenate(
            [[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)]
        ).astype(np.int64)
        merged = SegmentData(
            ids=np.concatenate([p.ids for p in parts]),
            sha256=[x for p in parts for x in p.sha256],
            paths=[x for p in parts for x in p.paths],
            labels=[x for p in parts for x in p.labels],
            image_size=np.concatenate([p.image_size for p in parts]),
            globals_=np.concatenate([p.globals_ for p in parts]),
            offsets=offsets,
            keypoints=np.concatenate([p.keypoints for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            descriptors=np.concatenate([p.descriptors for p in parts]),
        )
        return merged.take(np.argsort(merged.ids, kind="stable"))


def _cat(arrays: list[np.ndarray], empty: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty, dtype)


def write_segment(path: Path, data: SegmentData, meta: SegmentMeta) -> tuple[int, str]:
    """Write `data` as the segment file `path` (atomically); returns (bytes, sha256)."""

    def fill(tmp: Path) -> None:
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs.update(meta.attrs())
            f.create_dataset("ids", data=data.ids)
            f.create_dataset("sha256", data=np.array(data.sha256, dtype="S64"))
            f.create_dataset("paths", data=data.paths, dtype=_STR)
            f.create_dataset("labels", data=data.labels, dtype=_STR)
            f.create_dataset("image_size", data=data.image_size.astype(np.int32))
            f.create_dataset("global", data=data.globals_.astype(np.float32))
            f.create_dataset("offsets", data=data.offsets)
            f.create_dataset("keypoints", data=data.keypoints.astype(np.float32))
            f.create_dataset("scores", data=data.scores.astype(np.float32))
            f.create_dataset("descriptors", data=data.descriptors)

    write_atomic(path, fill, exclusive=True)  # a segment name is never published twice
    return path.stat().st_size, file_sha256(path)


class SegmentReader:
    """One segment, open read-only. `mapped`: big columns through a memory map."""

    def __init__(self, path: Path, mapped: bool = True) -> None:
        self.path = path
        try:
            self.file = h5py.File(path, "r", locking=False)
            attrs = self.file.attrs
            self.meta = SegmentMeta(
                str(attrs["global_fingerprint"]),
                str(attrs["local_fingerprint"]),
                str(attrs["encoding"]),
                str(attrs["codec_sha256"]),
            )
            self.ids = self.file["ids"][()]
            self.offsets = self.file["offsets"][()]
            self.image_size = self.file["image_size"][()]
        except FileNotFoundError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise IndexError_(
                f"segment {path} is damaged ({exc}); run `retr index repair --index "
                f"{path.parent.parent}`"
            ) from None
        self._map: mmap.mmap | None = None
        if mapped:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._columns: dict[str, np.ndarray] = {}

    def column(self, name: str) -> np.ndarray:
        """A whole column: a view on the memory map when possible, else read through HDF5."""
        if name not in self._columns:
            self._columns[name] = self._read(name)
        return self._columns[name]

    def _read(self, name: str) -> np.ndarray:
        try:
            dset = self.file[name]
            shape, dtype = dset.shape, dset.dtype
            count = int(np.prod(shape))
            offset = dset.id.get_offset() if self._map is not None and count else None
            if (
                self._map is not None
                and offset is not None
                and dtype.kind in "fiu"
                and offset + count * dtype.itemsize <= len(self._map)
            ):
                return np.frombuffer(self._map, dtype, count, offset).reshape(shape)
            return np.asarray(dset[()])
        except (OSError, KeyError, ValueError) as exc:
            raise IndexError_(
                f"segment {self.path}: column {name} is unreadable ({exc}); run "
                f"`retr index repair --index {self.path.parent.parent}`"
            ) from None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (which must be in the segment)."""
        rows = np.searchsorted(self.ids, ids)
        if len(ids) and (rows.max() >= len(self.ids) or (self.ids[rows] != ids).any()):
            missing = np.setdiff1d(ids, self.ids)
            raise IndexError_(
                f"segment {self.path} lacks ids {missing[:5].tolist()}; run "
                f"`retr index repair --index {self.path.parent.parent}`"
            )
        return rows

    def local(self, rows: np.ndarray, pq: ProductQuantizer | None) -> list[LocalFeatures]:
        """Local features of the images at `rows`, descriptors decoded to float32 unit rows."""
        kp, sc, desc = (self.column(n) for n in ("keypoints", "scores", "descriptors"))
        out = []
        for r in rows:
            a, b = int(self.offsets[r]), int(self.offsets[r + 1])
            w, h = (int(v) for v in self.image_size[r])
            d = decode(desc[a:b], self.meta.encoding, pq)
            out.append(LocalFeatures(np.array(kp[a:b]), np.array(sc[a:b]), d, (w, h)))
        return out

    def data(self) -> SegmentData:
        """Every column, in memory (for compaction, repair and checks)."""
        strings = {n: [_text(x) for x in self.file[n][()]] for n in ("sha256", "paths", "labels")}
        return SegmentData(
            ids=self.ids,
            sha256=strings["sha256"],
            paths=strings["paths"],
            labels=strings["labels"],
            image_size=self.image_size,
            globals_=np.array(self.column("global")),
            offsets=self.offsets,
            keypoints=np.array(self.column("keypoints")),
            scores=np.array(self.column("scores")),
            descriptors=np.array(self.column("descriptors")),
        )

    def sha256(self) -> list[str]:
        return [_text(x) for x in self.file["sha256"][()]]

    def close(self) -> None:
        self._columns.clear()
        if self._map is not None:
            with suppress(BufferError):  # arrays over it are still in use: they keep it alive
                self._map.close()
            self._map = None
        with suppress(Exception):
            self.file.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
