"""`retr index repair` (under the write lock): rebuild whatever can be derived after a crash, a
full disk or a stray edit, and report what cannot (index.check finds the problems):
- retr.json from the manifest's copy; the manifest from the segment files (each names its ids,
  hashes, paths and labels; the newest copy of an id wins; the catalog, when sound, decides which
  images still exist);
- a damaged or missing SQLite catalog from the segments (failed and duplicate rows are lost:
  the next build finds those files again), the old file kept beside it;
- a damaged segment is dropped, and the images only it held are listed: their rows turn
  `pending`, and `retr index update` (or a build) extracts them again;
- the whitening is refitted if it is damaged, the vector index rebuilt if it is damaged or
  disagrees with the live ids (index.derived, as a build derives them); files no manifest names
  are deleted.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from features.core import IndexError_, RetrError, file_sha256
from index.catalog import LOST_FEATURES, Catalog, CatalogUnreachableError, ImageRecord, Status
from index.check import _file_problem
from index.derived import derive, whitenings
from index.encoding import ProductQuantizer
from index.layout import IndexConfig, IndexPaths, parse_config
from index.lock import WriteLock
from index.manifest import FileEntry, Manifest, SegmentEntry, pack_ids, unpack_ids
from index.segments import SegmentReader
from index.store import FeatureStore
from index.vector_backends import vector_backend
from index.whitening import Whitening
from index.writer import IndexWriter

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RepairReport:
    actions: list[str] = field(default_factory=list)
    reextract: list[str] = field(default_factory=list)
    """Catalog paths whose features were lost: `retr index update` extracts them again."""


def repair_index(
    index_dir: str | Path, db: str | None = None, wait: float | None = None
) -> RepairReport:
    """Rebuild what can be derived; list what must be extracted again (module docstring)."""
    paths = IndexPaths(index_dir)
    report = RepairReport()
    if not paths.root.is_dir():
        raise IndexError_(f"{paths.root} is not a directory")
    with WriteLock(paths.root, wait):
        manifest = _repaired_manifest(paths, report)
        config = parse_config(manifest.config)
        if not paths.config.is_file() or _config_or_none(paths) != config:
            paths.write_config(config)
            report.actions.append(f"restored {paths.config} from the manifest")
        url = db or paths.db_url(config)
        catalog = _repaired_catalog(paths, url, manifest, report)
        try:
            manifest = _drop_damaged(paths, manifest, catalog, report)
            manifest = _reconcile(paths, manifest, catalog, report)
            manifest = _rebuild_derived(paths, manifest, config, report)
            manifest.generation += 1
            manifest.save(paths.root)
        finally:
            catalog.dispose()
    writer = IndexWriter.open(paths, wait=wait, db=db)  # finishes the catalog, deletes orphans
    writer.close()
    if not report.actions:
        report.actions.append("nothing to repair")
    return report


def _config_or_none(paths: IndexPaths) -> IndexConfig | None:
    try:
        return paths.read_config()
    except IndexError_:
        return None


def _repaired_manifest(paths: IndexPaths, report: RepairReport) -> Manifest:
    try:
        return Manifest.load(paths.root)
    except IndexError_ as exc:
        if not paths.segments.is_dir() and not paths.config.is_file():
            raise
        reason = str(exc).split(";")[0]
    config = _config_or_none(paths)
    if config is None:
        raise IndexError_(
            f"{paths.root}: both {paths.manifest.name} and {paths.config.name} are lost; build "
            "the index again into a new directory"
        )
    manifest = _manifest_from_segments(paths, config)
    report.actions.append(
        f"rebuilt {paths.manifest.name} from {len(manifest.segments)} segment files ({reason})"
    )
    return manifest


def _manifest_from_segments(paths: IndexPaths, config: IndexConfig) -> Manifest:
    """Every readable segment, newest copy of an id winning; whitening and codec: the newest
    file of each kind that loads."""
    entries: list[SegmentEntry] = []
    fps = ("", "")
    seen: set[int] = set()
    files = sorted(paths.segments.glob("seg-*.h5"), reverse=True) if paths.segments.is_dir() else []
    for path in files:
        try:
            reader = SegmentReader(path, mapped=False)
        except (RetrError, OSError):
            continue
        ids = reader.ids
        dead = [int(i) for i in ids if int(i) in seen]
        seen.update(int(i) for i in ids)
        fps = fps if fps[0] else (reader.meta.global_fingerprint, reader.meta.local_fingerprint)
        entries.append(
            SegmentEntry(
                name=path.name,
                bytes=path.stat().st_size,
                sha256=file_sha256(path),
                encoding=reader.meta.encoding,
                ids=pack_ids(ids),
                dead=pack_ids(dead),
            )
        )
        reader.close()
    numbers = [int(p.stem.split("-")[1]) for p in files] or [0]
    manifest = Manifest(
        segments=list(reversed(entries)),
        next_segment=max(numbers) + 1,
        config=config.model_dump(),
        global_fingerprint=fps[0],
        local_fingerprint=fps[1],
    )
    manifest.whitening = _newest_loadable(paths, "whitening-*.npz", Whitening.load)
    manifest.codec = _newest_loadable(paths, "codec-*.npy", ProductQuantizer.load)
    return manifest


def _newest_loadable(
    paths: IndexPaths, pattern: str, load: Callable[[Path], object]
) -> FileEntry | None:
    def number(p: Path) -> int:
        return int(p.stem.split("-")[1])

    for p in sorted(paths.root.glob(pattern), key=number, reverse=True):
        try:
            load(p)
        except IndexError_:
            continue
        return FileEntry(name=p.name, bytes=p.stat().st_size, sha256=file_sha256(p))
    return None


def _repaired_catalog(
    paths: IndexPaths, url: str, manifest: Manifest, report: RepairReport
) -> Catalog:
    """The catalog, or, for a missing or damaged SQLite catalog, a new one filled from the
    segments (the damaged file kept as catalog.sqlite.damaged-<time>)."""
    problem = None
    try:
        catalog = Catalog(url, hint=paths.repair_hint())
        problem = "; ".join(catalog.integrity_problems()[:2]) or None
        if problem is None:
            catalog.count()
            return catalog
        catalog.dispose()
    except CatalogUnreachableError:
        raise  # the server is down, not the data damaged: nothing to repair
    except IndexError_ as exc:
        problem = str(exc)
    if (
        not url.startswith("sqlite:///")
        or Path(url[len("sqlite:///") :]) != paths.catalog.resolve()
    ):
        raise IndexError_(
            f"the catalog database is damaged ({problem}); restore it from a backup, then run "
            "`retr index repair` again"
        )
    if paths.catalog.exists():
        aside = paths.catalog.with_name(f"{paths.catalog.name}.damaged-{int(time.time())}")
        shutil.move(paths.catalog, aside)
        for suffix in ("-wal", "-shm"):
            Path(f"{paths.catalog}{suffix}").unlink(missing_ok=True)
        report.actions.append(f"moved the damaged catalog aside to {aside.name}")
    catalog = Catalog(url, create=True)
    rows = _rows_from_segments(paths, manifest)
    catalog.insert_with_ids(rows)
    report.actions.append(
        f"rebuilt the catalog from the segments: {len(rows)} images (failed and duplicate "
        "files are found again by the next `retr index build`)"
    )
    return catalog


def _rows_from_segments(paths: IndexPaths, manifest: Manifest) -> list[ImageRecord]:
    rows: dict[int, ImageRecord] = {}
    for entry in manifest.segments + manifest.pending:
        try:
            reader = SegmentReader(paths.segments / entry.name, mapped=False)
        except (RetrError, OSError):
            continue
        try:
            data = reader.data()
        finally:
            reader.close()
        live = set(entry.live_ids().tolist())
        status = Status.INDEXED if entry in manifest.segments else Status.PENDING
        for r, i in enumerate(data.ids.tolist()):
            if i in live:
                w, h = (int(v) for v in data.image_size[r])
                rows[i] = ImageRecord(
                    id=i,
                    path=data.paths[r],
                    sha256=data.sha256[r],
                    label=data.labels[r] or None,
                    status=status.value,
                    reason=None,
                    width=w,
                    height=h,
                )
    return [rows[i] for i in sorted(rows)]


def _drop_damaged(
    paths: IndexPaths, manifest: Manifest, catalog: Catalog, report: RepairReport
) -> Manifest:
    """Segments that are missing, altered or unreadable leave the manifest; the images only
    they held turn pending in the catalog."""
    pq_ok = True
    if manifest.codec is not None:
        try:
            ProductQuantizer.load(paths.root / manifest.codec.name)
        except IndexError_:
            pq_ok = False
            report.actions.append(f"dropped the damaged product quantiser {manifest.codec.name}")
            manifest.codec = None
    bad: list[SegmentEntry] = []
    for entry in manifest.segments + manifest.pending:
        path = paths.segments / entry.name
        problem = _file_problem(path, entry, deep=True)
        if problem is None:
            try:
                SegmentReader(path, mapped=False).close()
            except (RetrError, OSError) as exc:
                problem = f"is unreadable ({exc})"
        if problem is None and entry.encoding == "pq" and not pq_ok:
            problem = "needs the lost product quantiser"
        if problem is not None:
            bad.append(entry)
            report.actions.append(f"dropped segment {entry.name}: it {problem}")
    if not bad:
        return manifest
    before = manifest.live_map(include_pending=True)
    manifest.segments = [s for s in manifest.segments if s not in bad]
    manifest.pending = [s for s in manifest.pending if s not in bad]
    lost = sorted(set(before) - set(manifest.live_map(include_pending=True)))
    records = catalog.get(lost)
    catalog.set_status(
        list(records),
        Status.PENDING,
        f"{LOST_FEATURES} in a damaged segment; `retr index update` extracts them again",
    )
    report.reextract += sorted(r.path for r in records.values())
    return manifest


def _reconcile(
    paths: IndexPaths, manifest: Manifest, catalog: Catalog, report: RepairReport
) -> Manifest:
    """Catalog and manifest agree afterwards: removals recorded in the manifest are carried
    out, features without a catalog row are dropped, indexed rows without features turn
    pending."""
    if manifest.catalog_deletes:
        catalog.remove(unpack_ids(manifest.catalog_deletes).tolist())
        manifest.catalog_deletes = []
    records = {r.id: r for r in catalog.all()}
    live = manifest.live_map(include_pending=True)
    rowless = sorted(set(live) - set(records))
    if rowless:
        for seg in manifest.segments + manifest.pending:
            hit = np.intersect1d(unpack_ids(seg.ids), rowless)
            seg.dead = pack_ids(np.union1d(unpack_ids(seg.dead), hit))
        report.actions.append(
            f"dropped the features of {len(rowless)} images without a catalog row"
        )
    lost = [r for r in records.values() if r.status == Status.INDEXED and r.id not in live]
    if lost:
        catalog.set_status(
            [r.id for r in lost],
            Status.PENDING,
            f"{LOST_FEATURES}; `retr index update` extracts them again",
        )
        report.reextract += sorted(r.path for r in lost)
    manifest.segments = [s for s in manifest.segments if len(s.live_ids())]
    manifest.pending = [s for s in manifest.pending if len(s.live_ids())]
    return manifest


def _rebuild_derived(
    paths: IndexPaths, manifest: Manifest, config: IndexConfig, report: RepairReport
) -> Manifest:
    """Whitening refitted if it is lost or damaged (a lost learned one falls back to PCA);
    vector index rebuilt if it is lost, damaged or disagrees with the live ids. Both through
    index.derived.derive, as a build derives them."""
    if not manifest.segments and not manifest.published:
        return manifest
    store = FeatureStore(paths.root, manifest)
    gen = manifest.generation + 1
    try:
        live = store.ids()
        sound = {
            kind: entry
            for kind, entry in whitenings(manifest).items()
            if _load_or_none(paths, entry, Whitening.load) is not None
        }
        kind = manifest.whitening_kind if manifest.whitening_kind in sound else "pca"
        if kind != manifest.whitening_kind:
            report.actions.append(
                "the learned whitening was lost: searches use the PCA whitening until "
                f"`retr train whitening --index {paths.root}` runs again"
            )
        other_lost = manifest.whitening_other is not None and len(sound) < len(whitenings(manifest))
        if other_lost and kind == manifest.whitening_kind:
            report.actions.append("dropped the damaged inactive whitening")
        refit = kind not in sound
        backend = vector_backend(paths.root, config.vector_store, config.index_type)
        try:
            active = None if refit else Whitening.load(paths.root / sound[kind].name)
            vectors_sound = (
                active is not None
                and kind == manifest.whitening_kind
                and manifest.published
                and _file_sound(paths, manifest.vectors)
                and not backend.check(manifest, live, active.dim)
            )
            if vectors_sound:
                manifest.whitening_other = sound.get("learned" if kind == "pca" else "pca")
            else:
                derive(
                    paths.root, manifest, store, backend, gen, _save_entry(paths),
                    shrinkage=config.whitening_shrinkage, dim=1,  # dim: an empty store only
                    refit=refit, available=sound,
                )  # fmt: skip
                if refit:
                    name = manifest.whitening.name if manifest.whitening else "?"
                    report.actions.append(f"refitted the whitening on {len(live)} images ({name})")
                report.actions.append(
                    f"rebuilt the vectors over {len(live)} images ({backend.where(manifest)})"
                )
        finally:
            backend.close()
    finally:
        store.close()
    return manifest


def _save_entry(paths: IndexPaths) -> Callable[[str, Callable[[Path], object]], FileEntry]:
    def save(name: str, write: Callable[[Path], object]) -> FileEntry:
        write(paths.root / name)
        return _entry(paths.root / name)

    return save


def _file_sound(paths: IndexPaths, entry: FileEntry | None) -> bool:
    """Whether a recorded file is there as recorded (True when none is recorded)."""
    return entry is None or _file_problem(paths.root / entry.name, entry, deep=True) is None


def _load_or_none(
    paths: IndexPaths, entry: FileEntry | None, load: Callable[[Path], T]
) -> T | None:
    """The file loaded, or None when it is missing, altered or unreadable."""
    if entry is None:
        return None
    path = paths.root / entry.name
    if _file_problem(path, entry, deep=True) is not None:
        return None
    try:
        return load(path)
    except IndexError_:
        return None


def _entry(path: Path) -> FileEntry:
    return FileEntry(name=path.name, bytes=path.stat().st_size, sha256=file_sha256(path))
