"""Incremental updates of a built index: add files, remove images, refresh changed files.

Each runs as one writer (index.writer) through the same ingest path as a build
(retrieval.ingest), without a rebuild: ids stay stable (a changed file keeps its id), and the
whitening stays the one fitted by the last `retr index build`, so new vectors are whitened with
it and only a build refits it (which moves every vector). FAISS removes vectors natively where
the index type can (Flat, IVF); otherwise (HNSW) they become tombstones, skipped by search and
purged by the next build (index.vectors). Every operation publishes in one commit: searches see
the index before it or after it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.core import IndexError_
from features.pipeline import Extractors
from index.catalog import ImageRecord
from index.layout import IndexPaths
from index.writer import IndexWriter
from retrieval.building import scan_corpus
from retrieval.ingest import FileItem, Ingester, IngestReport, Models, Progress, ingest_files

logger = logging.getLogger(__name__)


@dataclass
class UpdateReport:
    """What an add, remove or update did. Paths are catalog paths."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[int] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    tombstones: int = 0
    """Removed vectors the FAISS index could only hide (purged by the next build)."""
    added_ids: dict[str, int] = field(default_factory=dict)
    """Catalog id of every added or updated path."""

    def take(self, ingested: IngestReport) -> None:
        self.added += ingested.indexed
        self.updated += ingested.updated
        self.unchanged += ingested.unchanged
        self.failed += ingested.failed
        self.duplicates += ingested.duplicates


def add_images(
    index_dir: str | Path,
    targets: Sequence[str | Path],
    label: str | None = None,
    progress: Progress | None = None,
    device: Any = None,
    tombstone: bool | None = None,
    wait: float | None = None,
    models: Models | None = None,
) -> UpdateReport:
    """Index files and folders (recursively) into an existing index. A file under the corpus
    root recorded at build time is catalogued by its path relative to that root and labelled
    by its first sub-folder, like `retr index build` does; files elsewhere by their absolute
    path, unlabelled. `label` overrides both. Known unchanged files are left alone, known
    changed ones re-extracted under their id. `models`: already loaded models of this index
    (e.g. a running service's), instead of loading them again."""
    paths = IndexPaths(index_dir)
    with IndexWriter.open(paths, wait=wait) as writer:
        corpus = Path(writer.config.corpus) if writer.config.corpus else None
        files = [f for t in targets for f in _expand(Path(t), corpus, label)]
        report = UpdateReport()
        _ingest(writer, files, report, progress, models or _models(writer, device), tombstone)
    return report


def update_images(
    index_dir: str | Path,
    targets: Sequence[str | Path] = (),
    progress: Progress | None = None,
    device: Any = None,
    tombstone: bool | None = None,
    wait: float | None = None,
) -> UpdateReport:
    """Re-check catalogued files (all, or those at or under `targets`): a file whose content
    changed (by SHA-256) is re-extracted under its id, a file that is gone is removed."""
    paths = IndexPaths(index_dir)
    report = UpdateReport()
    with IndexWriter.open(paths, wait=wait) as writer:
        corpus = Path(writer.config.corpus) if writer.config.corpus else None
        records = _select(writer.catalog.all(), targets, corpus, report)
        present = [(_file_of(r.path, corpus), r) for r in records]
        gone = [r.id for f, r in present if not os.path.lexists(f)]
        files = [FileItem(f, r.path, r.label) for f, r in present if os.path.lexists(f)]
        models = _models(writer, device) if files else None
        _ingest(writer, files, report, progress, models, tombstone, remove=gone)
        report.removed.extend(sorted(gone))
    return report


def remove_images(
    index_dir: str | Path,
    targets: Sequence[str | int | Path],
    tombstone: bool | None = None,
    wait: float | None = None,
) -> UpdateReport:
    """Remove images by catalog id (an int, or a string of digits) or by path (a file, or a
    folder for everything under it; relative to the corpus root, or absolute)."""
    paths = IndexPaths(index_dir)
    report = UpdateReport()
    with IndexWriter.open(paths, wait=wait) as writer:
        corpus = Path(writer.config.corpus) if writer.config.corpus else None
        records = _select(writer.catalog.all(), targets, corpus, report)
        ids = [r.id for r in records]
        if ids:
            report.tombstones += writer.remove(ids, tombstone).tombstones
        report.removed.extend(sorted(ids))
    return report


def _models(writer: IndexWriter, device: Any) -> Extractors:
    """The index's models, built on first use."""
    return Extractors.for_index(writer.config, device)


def _ingest(
    writer: IndexWriter,
    files: list[FileItem],
    report: UpdateReport,
    progress: Progress | None,
    models: Models | None,
    tombstone: bool | None,
    remove: Sequence[int] = (),
) -> None:
    """Ingest `files` and publish, keeping the whitening (no rebuild), with the removal of the
    published images `remove` in the same commit."""
    if files:
        assert models is not None
        ingested = ingest_files(Ingester(writer, models), files, progress)
        report.take(ingested)
        indexed = ingested.indexed + ingested.updated
        report.added_ids.update((rel, ingested.ids[rel]) for rel in indexed)
    m = writer.manifest
    if remove and not m.published:  # nothing searchable yet: a plain removal
        report.tombstones += writer.remove(remove, tombstone).tombstones
        remove = ()
    if m.pending or m.pending_dead or remove or (files and not m.published):
        published = writer.publish(refit=False, tombstone=tombstone, remove=remove)
        report.tombstones += published.tombstones


# --- paths -------------------------------------------------------------------------------------


def _catalog_path(path: Path, corpus: Path | None) -> str:
    """The catalog path of a file: relative to the corpus root when inside it, else absolute.
    Links are not resolved (a corpus of symlinks is catalogued by the links' names)."""
    absolute = Path(os.path.abspath(path))
    if corpus is not None:
        for candidate in (absolute, absolute.parent.resolve() / absolute.name):
            if candidate.is_relative_to(corpus):
                return candidate.relative_to(corpus).as_posix()
    return absolute.as_posix()


def _file_of(rel: str, corpus: Path | None) -> Path:
    path = Path(rel)
    return path if path.is_absolute() or corpus is None else corpus / rel


def _expand(target: Path, corpus: Path | None, label: str | None) -> list[FileItem]:
    """Files of `target` (itself, or every non-hidden entry under a folder) with catalog
    paths, labels and the problem of unreadable entries."""
    if target.is_dir():
        entries = [(p, why) for p, why in scan_corpus(target) if why != "skip"]
    elif os.path.lexists(target):
        entries = [(target, None if target.is_file() else _problem(target))]
    else:
        raise IndexError_(f"{target}: no such file or folder")
    items = []
    for f, problem in entries:
        rel = _catalog_path(f, corpus)
        parts = rel.split("/")
        inside = not Path(rel).is_absolute()
        own = label if label is not None else (parts[0] if inside and len(parts) > 1 else None)
        items.append(FileItem(f, rel, own, problem))
    return items


def _problem(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return f"dangling symbolic link (to {os.readlink(path)})"
    return "a directory, not an image file" if path.is_dir() else "not a regular file"


def _select(
    records: list[ImageRecord],
    targets: Sequence[str | int | Path],
    corpus: Path | None,
    report: UpdateReport,
) -> list[ImageRecord]:
    """Records named by `targets` (ids, catalog paths, files or folders); all when empty."""
    if not targets:
        return records
    chosen: dict[int, ImageRecord] = {}
    for target in targets:
        hits = _matching(records, target, corpus)
        if not hits:
            report.not_found.append(str(target))
        chosen.update((r.id, r) for r in hits)
    return [chosen[i] for i in sorted(chosen)]


def _matching(
    records: list[ImageRecord], target: str | int | Path, corpus: Path | None
) -> list[ImageRecord]:
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return [r for r in records if r.id == int(target)]
    names = {str(target).replace("\\", "/").rstrip("/")}
    if Path(target).exists():
        names.add(_catalog_path(Path(target), corpus))
    return [r for r in records if any(r.path == n or r.path.startswith(n + "/") for n in names)]
