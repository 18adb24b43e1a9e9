"""The one writer of an index directory: the commit protocol that makes an index crash-safe.

Every change to an index goes through an `IndexWriter`, which holds the write lock
(index.lock) from `open` to `close`. Its steps are ordered so that a kill at any point leaves
the index as it was before the operation or as it is after it (readers see one manifest
generation; index.manifest explains the files):

Batch commit (build, add, update; `commit_batch`), for a batch of extracted images:
  1. catalog: rows of the batch's images written as `pending` (new ones get their ids);
  2. a new segment file with their features (temp file, fsync, rename);
  3. manifest: the segment joins `pending`, and ids that lose their features (a changed file
     that now fails, a copy demoted to duplicate) join `pending_dead`;
  4. catalog: rows of failed and duplicate files.
  A kill before 3 leaves pending rows without committed features, which the rerun extracts
  again (and an orphan file that the next writer deletes); after 3 the batch is kept, and the
  rerun skips it (same path, same SHA-256). A kill costs at most one batch.

Publish (end of build / add / update; `publish`):
  1. whitening refitted on every live descriptor (a build) or kept (add, update), and the
     vectors of the next generation: rebuilt (build) or the current ones edited (add, update),
     through the index's vector backend (index.vector_backends: a new FAISS file, or a Milvus
     collection, which an edit changes in place after recording `vector_intent`);
  2. manifest: the pending segments become searchable, in one commit with the new whitening and
     vectors (the *commit point*: readers switch here);
  3. vectors: what follows the commit in the backend (Milvus: deleting hidden ids, the alias);
  4. catalog: pending rows whose features are now published turn `indexed`;
  5. compaction merges small segments and rewrites mostly-dead ones (each merge one commit);
  6. files (and collections) that neither this generation nor the previous one names are
     deleted.
  A kill before 2 leaves the previous generation searchable and the batches pending (the rerun
  publishes them; a Milvus edit's `vector_intent` is undone at open); after 2, the next writer
  finishes 3, 4 (`_recover` at open) and 6.

An update publishes its changed files and removes its gone ones in that same commit
(`publish(remove=...)`).

Remove (`remove`): one manifest commit marks the ids dead, stores vectors without them (a new
FAISS file, or Milvus ids hidden until deleted) and records the catalog rows to delete
(`catalog_deletes`); then the rows are deleted and the record cleared. A kill after the commit
is finished by the next writer at open.

The catalog is written only after the manifest commit that makes its new content true, or
before one in a state (`pending`) that readers do not depend on: searches take their ids from
the vector index of the manifest, and only paths and labels from the catalog.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from features.core import IndexError_, StoreMismatchError, file_sha256
from features.types import LocalFeatures
from index.atomic import write_bytes_atomic
from index.catalog import Catalog, RowChange, Status
from index.derived import derive
from index.encoding import (
    PQ_MIN_TRAIN,
    ProductQuantizer,
    decode,
    encode,
    encoding_of,
    pq_subvectors,
    training_sample,
)
from index.faults import checkpoint
from index.layout import IndexConfig, IndexPaths, parse_config
from index.lock import WriteLock
from index.manifest import FileEntry, Manifest, SegmentEntry, owned_file, pack_ids, unpack_ids
from index.segments import (
    ImageFeatures,
    SegmentData,
    SegmentMeta,
    segment_name,
    write_segment,
)
from index.store import FeatureStore
from index.vector_backends import VectorBackend, vector_backend
from index.whitening import Whitening

logger = logging.getLogger(__name__)

MERGE_FANOUT = 8
"""Segments of one size tier (live images within a factor of 8) merged together."""
MAX_SEGMENT_IMAGES = 2048
"""Compaction never makes a segment larger than this (a merge holds it in memory: ~560 MB of
DISK features at 1024 keypoints, float16)."""
CODEC_IMAGES = 2000
"""Images a product quantiser's training sample is drawn from."""
DEAD_SHARE = 0.5
"""A segment with at least this share of dead images is rewritten without them."""


@dataclass(frozen=True)
class Extracted:
    """One image's features, waiting for a batch commit. id: its catalog id when the path is
    already catalogued (a changed file keeps its id)."""

    path: str
    sha256: str
    label: str | None
    descriptor: np.ndarray
    local: LocalFeatures
    id: int | None = None


@dataclass
class PublishReport:
    """What a publish did."""

    generation: int = 0
    images: int = 0
    refit: bool = False
    tombstones: int = 0
    """Removed vectors the FAISS index could only hide (purged by the next build)."""
    merged: int = 0
    removed_files: list[str] = field(default_factory=list)


class IndexWriter:
    """Holds the write lock of one index; see the module docstring for the protocol."""

    def __init__(
        self,
        paths: IndexPaths,
        config: IndexConfig,
        manifest: Manifest,
        catalog: Catalog,
        lock: WriteLock,
    ) -> None:
        self.paths = paths
        self.config = config
        self.manifest = manifest
        self.catalog = catalog
        self.lock = lock
        self.fingerprints: tuple[str, str] | None = None
        self.global_dim = 0
        self._view: FeatureStore | None = None
        self._removing = np.zeros(0, np.int64)
        """Ids a running `publish` removes in its commit (the view leaves them out)."""
        self._replaced: set[str] = set()
        """Files of the generations this writer's commits replaced (`_commit`)."""
        self.vectors: VectorBackend = vector_backend(
            paths.root, config.vector_store, config.index_type
        )

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        paths: IndexPaths,
        config: IndexConfig | None = None,
        *,
        wait: float | None = None,
        db: str | None = None,
    ) -> IndexWriter:
        """Take the lock, load (or, given `config` and no index yet, create) the index, and
        finish whatever a killed writer left half-done."""
        lock = WriteLock(paths.root, wait).acquire()
        try:
            manifest, config = _load_or_create(paths, config)
            if db is not None:
                config = config.model_copy(update={"db_url": db})
            catalog = Catalog(
                paths.db_url(config),
                create=not manifest.published and not manifest.pending,
                hint=paths.repair_hint(),
            )
            _bind_catalog(paths, manifest, catalog)
            writer = cls(paths, config, manifest, catalog, lock)
            writer._recover()
        except BaseException:
            lock.release()
            raise
        return writer

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None
        self.vectors.close()
        self.catalog.dispose()
        self.lock.release()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_config(self, config: IndexConfig) -> None:
        """Record a changed configuration (options a build may change, e.g. index_type)."""
        if (config.vector_store, config.index_type) != (
            self.config.vector_store,
            self.config.index_type,
        ):
            backend = vector_backend(self.paths.root, config.vector_store, config.index_type)
            self.vectors.close()
            self.vectors = backend
        self.config = config
        self.manifest.config = config.model_dump()
        self._save(self.manifest)
        self.paths.write_config(config)

    def bind_extractors(self, global_fp: str, local_fp: str, global_dim: int) -> None:
        """Declare the extractors whose features this writer commits; refuses others than those
        the index's segments were written by (two configurations never mix)."""
        m = self.manifest
        if m.global_fingerprint and (m.global_fingerprint, m.local_fingerprint) != (
            global_fp,
            local_fp,
        ):
            raise StoreMismatchError(
                f"{self.paths.root} holds features of extractors ({m.global_fingerprint}, "
                f"{m.local_fingerprint}), not ({global_fp}, {local_fp}) of this configuration; "
                "use another --index directory, or delete this one to rebuild"
            )
        self.fingerprints = (global_fp, local_fp)
        self.global_dim = global_dim

    # --- the writer's view ---------------------------------------------------------------------

    def view(self) -> FeatureStore:
        """Features as this writer sees them: published and pending, newest copy winning."""
        if self._view is None:
            m = self.manifest
            if len(self._removing):
                dead = np.union1d(unpack_ids(m.pending_dead), self._removing)
                m = m.model_copy(update={"pending_dead": pack_ids(dead)})
            self._view = FeatureStore(self.paths.root, m, pending=True)
        return self._view

    def _invalidate(self) -> None:
        if self._view is not None:
            self._view.close()
            self._view = None

    def current_sha(self, ids: Sequence[int]) -> dict[int, str]:
        """id -> hash of the stored features, for those of `ids` that have features."""
        view = self.view()
        return view.sha256([i for i in ids if i in view])

    # --- batches -------------------------------------------------------------------------------

    def commit_batch(
        self, extracted: Sequence[Extracted], records: Sequence[RowChange] = ()
    ) -> list[int]:
        """Commit one batch (module docstring, steps 1-4); returns the ids of `extracted`.
        `records`: rows without features (failed, duplicate); those that had features lose
        them when the work is published."""
        m = self.manifest
        ids: list[int] = []
        if extracted:
            ids = self.catalog.upsert(
                [
                    RowChange(
                        e.path, e.sha256, e.label, Status.PENDING, None, e.id, e.local.image_size
                    )
                    for e in extracted
                ]
            )
            checkpoint("batch:catalog")
            self._set_fingerprints_if_new()
            entry = self._write_segment(
                [
                    ImageFeatures(i, e.sha256, e.path, e.label, e.descriptor, e.local)
                    for i, e in zip(ids, extracted, strict=True)
                ]
            )
            checkpoint("batch:segment")
            m.pending.append(entry)
        known = [r.id for r in records if r.id is not None]
        view = self.view() if known else None  # the view costs O(live images) to build
        kill = [i for i in known if view is not None and i in view]
        if kill:
            m.pending_dead = pack_ids(np.concatenate([unpack_ids(m.pending_dead), kill]))
        if extracted or kill:
            self._save(m)
            self._invalidate()
            checkpoint("batch:manifest")
        if records:
            self.catalog.upsert(records)
            checkpoint("batch:records")
        return ids

    def _set_fingerprints_if_new(self) -> None:
        if self.fingerprints is None:
            raise IndexError_("IndexWriter.bind_extractors must be called before committing")
        if not self.manifest.global_fingerprint:
            self.manifest.global_fingerprint, self.manifest.local_fingerprint = self.fingerprints

    def _write_segment(self, images: Sequence[ImageFeatures]) -> SegmentEntry:
        pq = self._codec()
        encoding = encoding_of(self.config.local_dtype, pq)
        data = SegmentData.from_images(images, encoding, pq)
        return self._write_data(data, encoding)

    def _write_data(self, data: SegmentData, encoding: str) -> SegmentEntry:
        m = self.manifest
        name = segment_name(m.next_segment)
        m.next_segment += 1
        meta = SegmentMeta(
            m.global_fingerprint,
            m.local_fingerprint,
            encoding,
            m.codec.sha256 if m.codec and encoding == "pq" else "",
        )
        size, sha = write_segment(self.paths.segments / name, data, meta)
        return SegmentEntry(
            name=name, bytes=size, sha256=sha, encoding=encoding, ids=pack_ids(data.ids)
        )

    # --- publishing ----------------------------------------------------------------------------

    def publish(
        self,
        refit: bool = False,
        tombstone: bool | None = None,
        compact: bool = True,
        remove: Sequence[int] = (),
    ) -> PublishReport:
        """Make the pending work searchable (module docstring). refit: a build's refit of the
        whitening and rebuild of the vector index; without it the current whitening is kept
        and the vector index edited (an add or update), unless there is none yet. tombstone:
        how the vector index removes (index.vectors.VectorIndex.remove). compact=False leaves
        the merging of small segments to a later `compact()` (a bulk load that publishes
        first). remove: published images (catalog rows and features) that go in the same
        commit (an update's files that are gone), so that a kill leaves all of it or none."""
        m = self.manifest
        report = PublishReport(refit=refit or not m.published)
        if not remove:  # the common case: the writer's current view serves as it is
            return self._publish(m, report, tombstone, compact)
        self._removing = np.unique(np.asarray(list(remove), np.int64))
        self._invalidate()  # the view leaves the removed ids out (`view`)
        try:
            return self._publish(m, report, tombstone, compact)
        finally:
            self._removing = np.zeros(0, np.int64)
            self._invalidate()

    def _publish(
        self, m: Manifest, report: PublishReport, tombstone: bool | None, compact: bool
    ) -> PublishReport:
        view = self.view()
        gen = m.generation + 1
        new = m.model_copy(deep=True)
        if report.refit:
            self._rebuild_vectors(view, gen, new)
        else:
            report.tombstones = self._edit_vectors(view, m, new, gen, tombstone)
        checkpoint("publish:vectors")
        if self.config.local_dtype.startswith("pq") and new.codec is None:
            new.codec = self._train_codec(view)
            new.next_segment = m.next_segment
        new.segments = _with_dead(m.segments + m.pending, view)
        new.pending, new.pending_dead = [], []
        if len(self._removing):
            deletes = np.union1d(unpack_ids(m.catalog_deletes), self._removing)
            new.catalog_deletes = pack_ids(deletes)
        new.generation = gen
        self._commit(new)
        checkpoint("publish:manifest")
        report.generation, report.images = gen, len(view)
        self._finish_vectors()
        self._sync_catalog()
        checkpoint("publish:catalog")
        report.merged = self.compact() if compact else 0
        report.removed_files = self.collect_garbage()
        return report

    def _rebuild_vectors(self, view: FeatureStore, gen: int, new: Manifest) -> None:
        """Refit the PCA whitening on every live descriptor and build new vectors with the
        active whitening (a learned one stays active, the refit kept beside it)."""
        derive(
            self.paths.root, new, view, self.vectors, gen, self._save_file,
            shrinkage=self.config.whitening_shrinkage, dim=self.global_dim, refit=True,
        )  # fmt: skip

    def set_whitening(self, use: str, learned: Whitening | None = None) -> PublishReport:
        """Make `use` ("pca" or "learned") the whitening searches apply, storing `learned` first
        when given, and re-project every vector with it, in one commit. The whitening of the
        other kind stays in the manifest (`whitening_other`), so a later call switches back."""
        m = self.manifest
        if m.pending or not m.published:
            raise IndexError_(
                f"{self.paths.root} has unfinished work; run `retr index build` or "
                "`retr index add` to finish it first"
            )
        gen = m.generation + 1
        new = m.model_copy(deep=True)
        view = self.view()
        derive(
            self.paths.root, new, view, self.vectors, gen, self._save_file,
            shrinkage=self.config.whitening_shrinkage, dim=self.global_dim, use=use,
            learned=learned,
        )  # fmt: skip
        images = len(view.ids())
        new.generation = gen
        self._commit(new)
        checkpoint("whitening:manifest")
        self._finish_vectors()
        return PublishReport(gen, images, removed_files=self.collect_garbage())

    def _edit_vectors(
        self, view: FeatureStore, m: Manifest, new: Manifest, gen: int, tombstone: bool | None
    ) -> int:
        """The current vectors without the ids that went, with the pending ones (new or
        changed) whitened with the current whitening; returns the tombstones added. A backend
        that edits in place gets the ids it will write recorded first (`vector_intent`)."""
        assert m.whitening is not None
        whitening = Whitening.load(self.paths.root / m.whitening.name)
        published = len(m.segments)
        fresh = np.concatenate(
            [np.zeros(0, np.int64)]
            + [view.served_by(k) for k in range(published, published + len(m.pending))]
        )
        vectors = (
            whitening.apply(view.global_descriptors(fresh))
            if len(fresh)
            else np.zeros((0, whitening.dim), np.float32)
        )
        if self.vectors.in_place and len(fresh):
            m.vector_intent = pack_ids(fresh)
            self._save(m)
            checkpoint("publish:intent")
        gone = np.union1d(unpack_ids(m.pending_dead), self._removing)
        return self.vectors.edit(m, new, gen, gone, (fresh, vectors), tombstone)

    def _finish_vectors(self) -> None:
        """The vector backend's work after a commit (index.vector_backends.VectorBackend.finish).
        A failure here is only logged: the commit stands, readers skip what is left, and the
        next writer finishes it."""
        try:
            finished = self.vectors.finish(self.manifest)
        except IndexError_ as exc:
            logger.warning("%s", exc)
            return
        if finished:
            checkpoint("finish:vectors")
            self._save(self.manifest)

    def _published_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids of `ids` that the committed generation holds, their whitened vectors)."""
        m = self.manifest
        assert m.whitening is not None
        whitening = Whitening.load(self.paths.root / m.whitening.name)
        with FeatureStore(self.paths.root, m) as store:
            held = ids[np.isin(ids, store.ids())]
            raw = store.global_descriptors(held) if len(held) else None
        if raw is None:
            return held, np.zeros((0, whitening.dim), np.float32)
        return held, whitening.apply(raw)

    def _train_codec(self, view: FeatureStore) -> FileEntry | None:
        """Train the product quantiser of a "pq" store once the corpus has enough descriptors
        (drawn from at most CODEC_IMAGES images, fixed seed)."""
        ids = view.ids()
        if len(ids) > CODEC_IMAGES:
            ids = np.sort(np.random.default_rng(0).choice(ids, CODEC_IMAGES, replace=False))
        chunks = [f.descriptors for f in view.local_features(ids)]
        sample = training_sample(chunks)
        if len(sample) < PQ_MIN_TRAIN:
            logger.warning(
                "%s: %d descriptors are too few to train a product quantiser; keeping float16 "
                "until the corpus grows",
                self.paths.root,
                len(sample),
            )
            return None
        m = pq_subvectors(self.config.local_dtype, sample.shape[1])
        pq = ProductQuantizer.train(sample, m)
        logger.info("trained a %d-byte product quantiser on %d descriptors", m, len(sample))
        name = f"codec-{self.manifest.next_segment}.npy"  # a number never used again
        self.manifest.next_segment += 1
        return self._save_file(name, lambda p: write_bytes_atomic(p, pq.to_bytes()))

    def _codec(self) -> ProductQuantizer | None:
        c = self.manifest.codec
        return ProductQuantizer.load(self.paths.root / c.name) if c else None

    def _save_file(self, name: str, save: object) -> FileEntry:
        path = self.paths.root / name
        save(path)  # type: ignore[operator]
        return FileEntry(name=name, bytes=path.stat().st_size, sha256=file_sha256(path))

    def _commit(self, new: Manifest) -> None:
        """The one manifest switch (the commit point of every operation). Every switch raises
        the generation, and `previous_files` are the files of every generation this writer
        replaced since it opened: readers still on one of them keep their files until the
        next writer's garbage collection (`collect_garbage` keeps the current and the previous
        files, nothing else)."""
        old = self.manifest
        new.generation = max(new.generation, old.generation + 1)
        self._replaced.update(old.files())
        new.previous_files = sorted(self._replaced - set(new.files()))
        self._save(new)
        self.manifest = new
        self._invalidate()

    def _save(self, manifest: Manifest) -> None:
        manifest.save(self.paths.root)

    def _sync_catalog(self) -> None:
        """Catalog rows follow the committed manifest: deletions it records are carried out,
        pending rows whose features are published (same content hash) turn indexed."""
        m = self.manifest
        if m.catalog_deletes:
            self.catalog.remove(unpack_ids(m.catalog_deletes).tolist())
            checkpoint("sync:deleted")
            m.catalog_deletes = []
            self._save(m)
        pending = self.catalog.pending_hashes()
        if not pending:
            return
        published = FeatureStore(self.paths.root, m)
        try:
            live = [i for i in pending if i in published]
            sha = published.sha256(live)
        finally:
            published.close()
        done = [i for i in live if sha.get(i) == pending[i]]
        if done:
            self.catalog.set_status(done, Status.INDEXED)

    # --- removing ------------------------------------------------------------------------------

    def remove(self, ids: Sequence[int], tombstone: bool | None = None) -> PublishReport:
        """Remove images (catalog rows and features) in one commit; see the module docstring.
        Unknown ids are ignored (the caller reports them)."""
        m = self.manifest
        ids_arr = np.unique(np.asarray(list(ids), np.int64))
        report = PublishReport()
        if len(ids_arr) == 0:
            return report
        new = m.model_copy(deep=True)
        for seg in new.segments + new.pending:
            hit = np.intersect1d(unpack_ids(seg.ids), ids_arr)
            if len(hit):
                seg.dead = pack_ids(np.union1d(unpack_ids(seg.dead), hit))
        new.pending_dead = pack_ids(np.setdiff1d(unpack_ids(m.pending_dead), ids_arr))
        new.catalog_deletes = pack_ids(np.union1d(unpack_ids(m.catalog_deletes), ids_arr))
        if m.published:
            gen = m.generation + 1
            report.tombstones = self.vectors.remove(m, new, gen, ids_arr, tombstone)
            new.generation = gen
            report.generation = gen
        new.segments = [s for s in new.segments if len(s.live_ids())]
        new.pending = [s for s in new.pending if len(s.live_ids())]
        checkpoint("remove:vectors")
        self._commit(new)
        checkpoint("remove:manifest")
        self._finish_vectors()
        self._sync_catalog()
        report.merged = self.compact()
        report.removed_files = self.collect_garbage()
        return report

    # --- compaction ----------------------------------------------------------------------------

    def compact(self, full: bool = False) -> int:
        """Merge small published segments by size tier, rewrite mostly-dead ones and ones in
        another encoding than the store's; full: merge everything (up to MAX_SEGMENT_IMAGES per
        segment). Returns the number of segments merged away."""
        merged = 0
        while True:
            target = encoding_of(self.config.local_dtype, self._codec())
            plan = merge_plan(self.manifest.segments, target, full)
            if not plan:
                return merged
            self._merge(plan, target)
            merged += len(plan) - 1
            checkpoint("compact:manifest")

    def _merge(self, group: list[int], target: str) -> None:
        m = self.manifest
        store = FeatureStore(self.paths.root, m)
        pq = self._codec()
        parts = []
        try:
            for k in group:
                reader = store.reader(k)
                live = m.segments[k].live_ids()
                data = reader.data().take(reader.rows(live))
                if reader.meta.encoding != target:
                    flat = decode(data.descriptors, reader.meta.encoding, pq)
                    data = _replace_descriptors(data, encode(flat, target, pq))
                parts.append(data)
        finally:
            store.close()
        entry = self._write_data(SegmentData.concat(parts), target)
        new = m.model_copy(deep=True)
        keep = [s for k, s in enumerate(m.segments) if k not in group]
        new.segments = keep[: group[0]] + [entry] + keep[group[0] :]
        self._commit(new)

    # --- re-encoding ---------------------------------------------------------------------------

    def recode(self, dtype: str) -> None:
        """Store every image's local descriptors as `dtype` (float16, float32, int8, pq, pq<M>;
        a PQ one trains a new quantiser on the current descriptors) and record it in the
        config, in one commit. Decoding first means an encoding never improves on the one it
        replaces; e.g. to compare encodings on one extraction."""
        config = self.config.model_validate({**self.config.model_dump(), "local_dtype": dtype})
        old = self.manifest
        store = FeatureStore(self.paths.root, old)  # decodes with the old quantiser
        try:
            new = old.model_copy(deep=True)
            new.codec, new.config = None, config.model_dump()
            self.manifest, self.config = new, config  # new segment numbers and codec from here
            if dtype.startswith("pq"):
                new.codec = self._train_codec(store)
            pq = self._codec()
            target = encoding_of(dtype, pq)
            rewritten = []
            for k, seg in enumerate(old.segments):
                reader = store.reader(k)
                data = reader.data().take(reader.rows(seg.live_ids()))
                flat = decode(data.descriptors, reader.meta.encoding, store.pq)
                data = _replace_descriptors(data, encode(flat, target, pq))
                rewritten.append(self._write_data(data, target))
        except BaseException:
            self.manifest, self.config = old, parse_config(old.config)
            raise
        finally:
            store.close()
        new.segments = rewritten
        self._commit(new)
        self.paths.write_config(config)

    # --- garbage -------------------------------------------------------------------------------

    def collect_garbage(self) -> list[str]:
        """Delete index files (and the vector backend's stored generations) that neither this
        generation nor the previous one names, and temporary files of killed writers. Returns
        the deleted names."""
        keep = set(self.manifest.files()) | set(self.manifest.previous_files)
        try:
            removed = self.vectors.collect_garbage(keep)
        except IndexError_ as exc:  # the next writer drops them
            logger.warning("%s", exc)
            removed = []
        candidates = [p for p in self.paths.root.iterdir() if p.is_file()]
        if self.paths.segments.is_dir():
            candidates += [p for p in self.paths.segments.iterdir() if p.is_file()]
        for p in candidates:
            rel = p.relative_to(self.paths.root).as_posix()
            if owned_file(rel) and rel not in keep:
                p.unlink(missing_ok=True)
                removed.append(rel)
        return removed

    # --- recovery ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Finish what a killed writer left: vector and catalog steps after a committed
        manifest, vectors written ahead of a commit that never came, and files no manifest
        names."""
        self._finish_vectors()
        if self.vectors.recover(self.manifest, self._published_vectors):
            checkpoint("recover:vectors")
            self._save(self.manifest)
        self._sync_catalog()
        removed = self.collect_garbage()
        if removed:
            logger.info("removed %d files left by an interrupted write", len(removed))


def _load_or_create(paths: IndexPaths, config: IndexConfig | None) -> tuple[Manifest, IndexConfig]:
    """The manifest and config of an index; a new index when there is neither and `config` is
    given. retr.json is restored from the manifest when it is missing or disagrees."""
    if not paths.manifest.is_file():
        if paths.exists() or (paths.root / "global.h5").exists():
            Manifest.load(paths.root)  # raises the right message (old layout, lost manifest)
        if config is None:
            paths.read_config()  # raises "not a retr index"
            raise IndexError_(f"{paths.manifest} is missing; {paths.repair_hint()}")
        manifest = Manifest(config=config.model_dump(), index_uid=uuid.uuid4().hex)
        paths.root.mkdir(parents=True, exist_ok=True)
        manifest.save(paths.root)
        paths.write_config(config)
        return manifest, config
    manifest = Manifest.load(paths.root)
    try:
        stored = parse_config(manifest.config)
    except ValueError as exc:
        raise IndexError_(f"{paths.manifest}: bad config copy ({exc})") from None
    if not paths.config.is_file() or _read_config_quietly(paths) != stored:
        paths.write_config(stored)  # the manifest is the commit point
    return manifest, stored


def _bind_catalog(paths: IndexPaths, manifest: Manifest, catalog: Catalog) -> None:
    """The catalog belongs to this index (index.catalog: Catalog.bind). An index without an id
    (made before ids, or a manifest rebuilt by repair) takes its catalog's, or a new one."""
    if not manifest.index_uid:
        manifest.index_uid = catalog.owner() or uuid.uuid4().hex
        manifest.save(paths.root)
    catalog.bind(manifest.index_uid, paths.root)


def _read_config_quietly(paths: IndexPaths) -> IndexConfig | None:
    try:
        return paths.read_config()
    except IndexError_:
        return None


def _with_dead(entries: list[SegmentEntry], view: FeatureStore) -> list[SegmentEntry]:
    """Each segment with `dead` = its ids that the view serves from elsewhere or not at all;
    segments with nothing live left are dropped."""
    out = []
    for k, seg in enumerate(entries):
        mine = view.served_by(k)
        ids = unpack_ids(seg.ids)
        if len(mine) == 0:
            continue
        out.append(seg.model_copy(update={"dead": pack_ids(np.setdiff1d(ids, mine))}))
    return out


def merge_plan(segments: list[SegmentEntry], target: str, full: bool = False) -> list[int]:
    """Indices of the next segments to merge into one (empty: nothing to do)."""
    live = [len(s.live_ids()) for s in segments]
    total = [len(unpack_ids(s.ids)) for s in segments]
    for k, s in enumerate(segments):  # mostly dead, or in another encoding: rewrite alone
        if s.encoding != target or (total[k] and live[k] / total[k] <= 1 - DEAD_SHARE):
            return [k]
    if full:
        small = [k for k in range(len(segments)) if live[k] < MAX_SEGMENT_IMAGES]
        return _fill(small, live) if len(small) > 1 else []
    tiers: dict[int, list[int]] = {}
    for k, n in enumerate(live):
        if n < MAX_SEGMENT_IMAGES:
            tiers.setdefault(int(math.log(max(n, 1), MERGE_FANOUT)), []).append(k)
    for tier in sorted(tiers):
        members = tiers[tier]
        if len(members) >= MERGE_FANOUT:
            group = _fill(members, live)
            if len(group) > 1:
                return group
    return []


def _fill(candidates: list[int], live: list[int]) -> list[int]:
    """As many of `candidates` (smallest first) as fit in MAX_SEGMENT_IMAGES, in index order."""
    chosen, size = [], 0
    for k in sorted(candidates, key=lambda k: live[k]):
        if size + live[k] > MAX_SEGMENT_IMAGES:
            break
        chosen.append(k)
        size += live[k]
    return sorted(chosen)


def _replace_descriptors(data: SegmentData, descriptors: np.ndarray) -> SegmentData:
    from dataclasses import replace

    return replace(data, descriptors=descriptors)
