"""`retr index check`: find what a crash, a full disk or a stray edit did to an index, without
changing it.

`check` verifies that the parts agree: every file the manifest names is there with its recorded
size (and, `deep`, its recorded SHA-256, and every segment column readable); segments hold the
ids and fingerprints the manifest says; the vector index holds exactly the live ids, whitened to
the whitening's dimension; the catalog has a row for every live image and no `indexed` row
without features (and, `deep`, passes SQLite's integrity check). Each problem is one line naming
the file and the command that fixes it. Mending is index.repair's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.core import IndexError_, RetrError, file_sha256
from index.catalog import Catalog, Status
from index.layout import IndexConfig, IndexPaths, parse_config
from index.manifest import FileEntry, Manifest, SegmentEntry, owned_file, unpack_ids
from index.segments import SEGMENTS_DIR, SegmentReader
from index.vector_backends import vector_backend
from index.whitening import Whitening

logger = logging.getLogger(__name__)


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


# --- check ---


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
