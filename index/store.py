"""The feature store: the local features and raw global descriptors of one manifest generation.

A view over the segments a manifest lists (index.manifest, index.segments): it maps each live
image id to the segment that serves it and reads features from there, one segment at a time.
Segments are opened lazily and kept open (up to MAX_OPEN), so opening a store costs only the
manifest, whatever the number of images; a shortlist read opens each segment it touches once.

Every segment records the fingerprints of the extractors that wrote it; a store refuses a
segment whose fingerprints differ from the index's, so two configurations never mix.
"""

from __future__ import annotations

import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from features.core import IndexError_, StoreMismatchError
from features.types import LocalFeatures
from index.encoding import ProductQuantizer
from index.manifest import Manifest, SegmentEntry, unpack_ids
from index.segments import SEGMENTS_DIR, SegmentReader


def _max_open() -> int:
    """Segments kept open at once: each holds two file descriptors (the HDF5 file and its memory
    map), and together they take at most half of the process's descriptor limit, between 64
    and 4096 segments (1,024 descriptors, a common default, keep 256 open; a 1M-image store
    after compaction has about 500 segments, so `ulimit -n 4096` keeps every one open)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(64, min(4096, soft // 4))


MAX_OPEN = _max_open()


class FeatureStore:
    """Features by image id. `pending`: also the segments of unfinished work (a writer's view,
    where the newest copy of an id wins)."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        fingerprints: tuple[str, str] | None = None,
        pending: bool = False,
    ) -> None:
        self.root = Path(root)
        self.entries: list[SegmentEntry] = manifest.segments + (manifest.pending if pending else [])
        self.fingerprints = fingerprints
        self.pq = ProductQuantizer.load(self.root / manifest.codec.name) if manifest.codec else None
        self._ids, self._where = _live_table(manifest, pending)
        self._open: OrderedDict[int, SegmentReader] = OrderedDict()
        self._lock = threading.Lock()

    # --- lookups -------------------------------------------------------------------------------

    def ids(self) -> np.ndarray:
        """Sorted live ids."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def served_by(self, seg: int) -> np.ndarray:
        """Sorted live ids whose features `self.entries[seg]` serves."""
        return self._ids[self._where == seg]

    def __contains__(self, image_id: int) -> bool:
        i = np.searchsorted(self._ids, image_id)
        return bool(i < len(self._ids) and self._ids[i] == image_id)

    def segments_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Index into `self.entries` of the segment serving each id (IndexError_ if not live)."""
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(self._ids, ids)
        pos = np.minimum(pos, max(len(self._ids) - 1, 0))
        bad = (len(self._ids) == 0) | (self._ids[pos] != ids) if len(ids) else np.zeros(0, bool)
        if np.any(bad):
            raise IndexError_(
                f"{self.root}: images {ids[bad][:5].tolist()} have no stored features; run "
                f"`retr index check --index {self.root}`"
            )
        return self._where[pos]

    # --- reads ---------------------------------------------------------------------------------

    def local_features(self, ids: Sequence[int] | np.ndarray) -> list[LocalFeatures]:
        """Local features of every id, in order; descriptors decoded to float32 unit rows. Each
        segment involved is read once."""
        ids_arr = np.asarray(ids, np.int64)
        out: list[LocalFeatures | None] = [None] * len(ids_arr)
        for seg, positions in self._by_segment(ids_arr):
            reader = self.reader(seg)
            feats = reader.local(reader.rows(ids_arr[positions]), self.pq)
            for p, f in zip(positions, feats, strict=True):
                out[p] = f
        return [f for f in out if f is not None]

    def global_descriptors(self, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """(N, Dg) raw global descriptors of `ids` (all live ids, ascending, when None)."""
        ids_arr = self._ids if ids is None else np.asarray(ids, np.int64)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for seg, positions in self._by_segment(ids_arr):
            reader = self.reader(seg)
            rows = reader.rows(ids_arr[positions])
            parts.append((positions, np.asarray(reader.column("global"))[rows]))
        if not parts:
            return np.zeros((0, 0), np.float32)
        out = np.zeros((len(ids_arr), parts[0][1].shape[1]), np.float32)
        for positions, block in parts:
            out[positions] = block
        return out

    def sha256(self, ids: Sequence[int] | np.ndarray | None = None) -> dict[int, str]:
        """id -> content hash of the file each live image's features came from (all live ids
        when None)."""
        ids_arr = self._ids if ids is None else np.asarray(ids, np.int64)
        out: dict[int, str] = {}
        for seg, positions in self._by_segment(ids_arr):
            reader = self.reader(seg)
            wanted = ids_arr[positions]
            hashes = reader.sha256()
            out.update(
                (int(i), hashes[int(r)]) for i, r in zip(wanted, reader.rows(wanted), strict=True)
            )
        return out

    def _by_segment(self, ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        where = self.segments_of(ids)
        for seg in np.unique(where):
            yield int(seg), np.flatnonzero(where == seg)

    def reader(self, seg: int) -> SegmentReader:
        """The open reader of `self.entries[seg]` (opened and checked on first use)."""
        with self._lock:
            reader = self._open.get(seg)
            if reader is not None:
                self._open.move_to_end(seg)
                return reader
            entry = self.entries[seg]
            path = self.root / SEGMENTS_DIR / entry.name
            try:
                reader = SegmentReader(path)
            except FileNotFoundError:
                raise IndexError_(
                    f"segment {path} is missing; run `retr index repair --index {self.root}`"
                ) from None
            self._check(reader)
            self._open[seg] = reader
            while len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)[1].close()
            return reader

    def _check(self, reader: SegmentReader) -> None:
        if self.fingerprints is None:
            return
        mine = (reader.meta.global_fingerprint, reader.meta.local_fingerprint)
        if mine != self.fingerprints:
            reader.close()
            raise StoreMismatchError(
                f"segment {reader.path} holds features of extractors {mine}, not "
                f"{self.fingerprints} of this index; use another --index directory, or build "
                "this one again from scratch"
            )

    def close(self) -> None:
        with self._lock:
            for reader in self._open.values():
                reader.close()
            self._open.clear()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _live_table(manifest: Manifest, pending: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sorted live ids, index of the serving segment) for the published segments, or for
    published + pending where later copies win and pending_dead ids are gone."""
    entries = manifest.segments + (manifest.pending if pending else [])
    ids = [e.live_ids() for e in entries]
    seg = [np.full(len(a), k, np.int64) for k, a in enumerate(ids)]
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    all_ids, all_seg = np.concatenate(ids), np.concatenate(seg)
    if pending and manifest.pending_dead:
        published = all_seg < len(manifest.segments)
        drop = published & np.isin(all_ids, unpack_ids(manifest.pending_dead))
        all_ids, all_seg = all_ids[~drop], all_seg[~drop]
    if len(all_ids) < 2 or bool(np.all(all_ids[1:] > all_ids[:-1])):
        return all_ids, all_seg  # sorted and unique already (ids grow with segments)
    # the last copy of each id wins: a stable sort by id keeps copies in segment order (the
    # runs of each segment are sorted, which the stable sort exploits); keep each id's last
    order = np.argsort(all_ids, kind="stable")
    all_ids, all_seg = all_ids[order], all_seg[order]
    last = np.append(all_ids[1:] != all_ids[:-1], True)
    return all_ids[last], all_seg[last]
