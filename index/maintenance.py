"""`retr index check` and `retr index repair`: find and mend what a crash, a full disk or a stray
edit did to an index.

`check` verifies that the parts agree: every file the manifest names is there with its recorded
size (and, `deep`, its recorded SHA-256, and every segment column readable); segments hold the
ids and fingerprints the manifest says; the vector index holds exactly the live ids, whitened to
the whitening's dimension; the catalog has a row for every live image and no `indexed` row
without features (and, `deep`, passes SQLite's integrity check). Each problem is one line naming
the file and the command that fixes it.

`repair` (under the write lock) rebuilds whatever can be derived and reports what cannot:
- retr.json from the manifest's copy; the manifest from the segment files (each names its ids,
  hashes, paths and labels; the newest copy of an id wins; the catalog, when sound, decides which
  images still exist);
- a damaged or missing SQLite catalog from the segments (failed and duplicate rows are lost:
  the next build finds those files again), the old file kept beside it;
- a damaged segment is dropped, and the images only it held are listed: their rows turn
  `pending`, and `retr index update` (or a build) extracts them again;
- the whitening is refitted if it is damaged, the vector index rebuilt if it is damaged or
  disagrees with the live ids; files no manifest names are deleted.
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
from index.derived import derive, whitenings
from index.encoding import ProductQuantizer
from index.layout import IndexConfig, IndexPaths, parse_config
from index.lock import WriteLock
from index.manifest import FileEntry, Manifest, SegmentEntry, owned_file, pack_ids, unpack_ids
from index.segments import SEGMENTS_DIR, SegmentReader
from index.store import FeatureStore
from index.vector_backends import mask_store, vector_backend
from index.whitening import Whitening
from index.writer import IndexWriter

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    """One line each: what is wrong, where, and the command that fixes it."""
    notes: list[str] = field(default_factory=list)
    """Facts that need no repair (an unfinished build, leftovers the next writer deletes)."""
    images: int = 0
    segments: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RepairReport:
    actions: list[str] = field(default_factory=list)
    reextract: list[str] = field(default_factory=list)
    """Catalog paths whose features were lost: `retr index update` extracts them again."""


# --- check -------------------------------------------------------------------------------------


def check_index(index_dir: str | Path, deep: bool = False, db: str | None = None) -> CheckReport:
    """Verify an index without changing it (see the module docstring)."""
    paths = IndexPaths(index_dir)
    report = CheckReport()
    fix = paths.repair_hint()
    if not paths.exists():
        paths.read_config()  # raises "not a retr index"
    try:
        manifest = Manifest.load(paths.root)
    except IndexError_ as exc:
        report.problems.append(str(exc))
        return report
    config = _check_config(paths, manifest, report)
    live = manifest.live_ids()
    report.images, report.segments = len(live), len(manifest.segments)
    _check_files(paths, manifest, deep, report)
    _check_segments(paths, manifest, deep, report)
    if manifest.published and config is not None:
        _check_vectors(paths, manifest, config, live, report)
    if manifest.pending:
        waiting = sum(len(s.live_ids()) for s in manifest.pending)
        report.notes.append(
            f"an unfinished build or add left {waiting} extracted images in "
            f"{len(manifest.pending)} pending segments; `retr index build` finishes it"
        )
    if config is not None:
        _check_catalog(paths, manifest, config, db, deep, live, report)
    orphans = _orphans(paths, manifest)
    if orphans:
        report.notes.append(
            f"{len(orphans)} files no manifest names (left by a killed writer; the next write "
            f"deletes them): {', '.join(orphans[:3])}{'...' if len(orphans) > 3 else ''}"
        )
    if not report.ok:
        report.notes.append(f"to fix: {fix}")
    return report


def _check_config(paths: IndexPaths, manifest: Manifest, report: CheckReport) -> IndexConfig | None:
    try:
        stored = parse_config(manifest.config)
    except ValueError as exc:
        report.problems.append(f"{paths.manifest}: bad config copy ({exc}); {paths.repair_hint()}")
        return None
    try:
        on_disk = paths.read_config()
    except IndexError_ as exc:
        report.problems.append(str(exc))
        return stored
    if on_disk != stored:
        report.problems.append(
            f"{paths.config} disagrees with the manifest's copy; {paths.repair_hint()}"
        )
    return stored


def _check_files(paths: IndexPaths, manifest: Manifest, deep: bool, report: CheckReport) -> None:
    entries: list[FileEntry] = list(manifest.segments + manifest.pending)
    derived = (manifest.whitening, manifest.whitening_other, manifest.vectors, manifest.codec)
    entries += [e for e in derived if e]
    for entry in entries:
        rel = f"{SEGMENTS_DIR}/{entry.name}" if isinstance(entry, SegmentEntry) else entry.name
        problem = _file_problem(paths.root / rel, entry, deep)
        if problem:
            report.problems.append(f"{paths.root / rel} {problem}; {paths.repair_hint()}")


def _file_problem(path: Path, entry: FileEntry, deep: bool) -> str | None:
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry.bytes:
        return f"has {size} bytes, the manifest recorded {entry.bytes}"
    if deep and file_sha256(path) != entry.sha256:
        return "does not match its recorded SHA-256 (its content changed)"
    return None


def _check_segments(paths: IndexPaths, manifest: Manifest, deep: bool, report: CheckReport) -> None:
    fps = (manifest.global_fingerprint, manifest.local_fingerprint)
    for entry in manifest.segments + manifest.pending:
        path = paths.segments / entry.name
        if not path.is_file():
            continue  # reported by _check_files
        try:
            reader = SegmentReader(path, mapped=False)
        except (RetrError, OSError) as exc:
            report.problems.append(f"{exc}")
            continue
        try:
            if not np.array_equal(reader.ids, unpack_ids(entry.ids)):
                report.problems.append(
                    f"{path} holds other ids than the manifest lists; {paths.repair_hint()}"
                )
            if (reader.meta.global_fingerprint, reader.meta.local_fingerprint) != fps:
                report.problems.append(
                    f"{path} was written by other extractors than the "
                    f"index's; {paths.repair_hint()}"
                )
            if deep:
                reader.data()  # every column read back
        except (RetrError, OSError, ValueError) as exc:
            report.problems.append(f"{path}: unreadable columns ({exc}); {paths.repair_hint()}")
        finally:
            reader.close()


def _check_vectors(
    paths: IndexPaths,
    manifest: Manifest,
    config: IndexConfig,
    live: np.ndarray,
    report: CheckReport,
) -> None:
    """The vector backend's own check (index.vector_backends) against the live ids."""
    assert manifest.whitening is not None
    try:
        whitening = Whitening.load(paths.root / manifest.whitening.name)
        backend = vector_backend(paths.root, config.vector_store, config.index_type)
    except RetrError as exc:
        report.problems.append(str(exc))
        return
    try:
        problems = backend.check(manifest, live, whitening.dim)
    finally:
        backend.close()
    hint = paths.repair_hint()
    report.problems += [p if p.endswith(hint) else f"{p}; {hint}" for p in problems]
    if manifest.vector_intent:
        report.notes.append(
            f"an interrupted publish left {len(unpack_ids(manifest.vector_intent))} vectors in "
            f"{backend.where(manifest)} ahead of its commit; the next write puts them back"
        )


def _check_catalog(
    paths: IndexPaths,
    manifest: Manifest,
    config: IndexConfig,
    db: str | None,
    deep: bool,
    live: np.ndarray,
    report: CheckReport,
) -> None:
    url = db or paths.db_url(config)
    try:
        catalog = Catalog(url, hint=paths.repair_hint())
        if deep:
            for line in catalog.integrity_problems()[:3]:
                report.problems.append(f"catalog {catalog.shown}: {line}; {paths.repair_hint()}")
        records = {r.id: r for r in catalog.all()}
    except IndexError_ as exc:
        report.problems.append(str(exc))
        return
    finally:
        if "catalog" in locals():
            catalog.dispose()
    rowless = [int(i) for i in live if int(i) not in records]
    if rowless:
        report.problems.append(
            f"{len(rowless)} indexed images have no catalog row (ids {rowless[:5]}); "
            f"{paths.repair_hint()}"
        )
    live_set = set(live.tolist())
    waiting = set(manifest.live_map(include_pending=True)) - live_set
    deleting = set(unpack_ids(manifest.catalog_deletes).tolist())
    if deleting:
        report.notes.append(
            f"{len(deleting)} removed images still have catalog rows; the next write deletes them"
        )
    accounted = live_set | waiting | deleting
    lost = [
        r.path for r in records.values() if r.status == Status.INDEXED and r.id not in accounted
    ]
    if lost:
        report.problems.append(
            f"{len(lost)} catalog rows say indexed but have no features (first: {lost[0]}); "
            f"{paths.repair_hint()}"
        )
    pending = [r for r in records.values() if r.status == Status.PENDING and r.id not in live_set]
    if pending:
        report.notes.append(
            f"{len(pending)} images wait for extraction (first: {pending[0].path}); "
            "`retr index build` or `retr index update` extracts them"
        )


def _orphans(paths: IndexPaths, manifest: Manifest) -> list[str]:
    keep = set(manifest.files()) | set(manifest.previous_files)
    found = []
    for folder in (paths.root, paths.segments):
        if folder.is_dir():
            for p in folder.iterdir():
                rel = p.relative_to(paths.root).as_posix()
                if p.is_file() and owned_file(rel) and rel not in keep:
                    found.append(rel)
    return sorted(found)


# --- repair ------------------------------------------------------------------------------------


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
                    shrinkage=config.whitening_shrinkage, dim=_global_dim(store),
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


def _global_dim(store: FeatureStore) -> int:
    """The global descriptors' length (1 for an empty store: only the identity's size)."""
    ids = store.ids()
    return int(store.global_descriptors(ids[:1]).shape[1]) if len(ids) else 1


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


# --- info --------------------------------------------------------------------------------------


def index_info(index_dir: str | Path, db: str | None = None) -> dict[str, object]:
    """What `retr index info` shows: configuration (password masked), generation, catalog
    counts by status (one GROUP BY), vectors, segments and bytes on disk. Reads the manifest and
    the catalog only (never the vector index), so it is fast at any size."""
    from index.catalog import mask_url

    paths = IndexPaths(index_dir)
    if not paths.exists():
        paths.read_config()  # raises "not a retr index"
    manifest = Manifest.load(paths.root)
    config = parse_config(manifest.config)
    if db:
        config = config.model_copy(update={"db_url": db})
    catalog = Catalog(paths.db_url(config), hint=paths.repair_hint())
    try:
        counts = catalog.status_counts()
    finally:
        catalog.dispose()
    shown = config.model_dump()
    if shown.get("db_url"):
        shown["db_url"] = mask_url(shown["db_url"])
    if shown.get("vector_store"):
        shown["vector_store"] = mask_store(shown["vector_store"])
    sizes = {"segments": sum(s.bytes for s in manifest.segments + manifest.pending)}
    for entry in (manifest.vectors, manifest.whitening, manifest.codec):
        if entry is not None:
            sizes[entry.name.split("-")[0]] = entry.bytes
    if manifest.whitening_other is not None:
        sizes["inactive whitening"] = manifest.whitening_other.bytes
    if paths.catalog.is_file():
        sizes["catalog"] = paths.catalog.stat().st_size
    return {
        "index": str(paths.root),
        "generation": manifest.generation,
        "config": shown,
        "images": counts,
        "vectors": manifest.vector_count,
        "collection": manifest.collection.name if manifest.collection else None,
        "segments": len(manifest.segments),
        "pending": sum(len(s.live_ids()) for s in manifest.pending),
        "bytes": sizes,
    }
