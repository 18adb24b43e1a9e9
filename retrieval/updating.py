"""Incremental updates of a built index: add files, remove images, refresh changed files.

The catalog, both feature stores and the FAISS index are edited in place, without a rebuild, and
ids stay stable: a changed file keeps its id. The whitening stays the one fitted by the last
`retr index build`: new vectors are whitened with it, and it is refitted (which moves every
vector) only by a build. FAISS removes vectors natively where the index type can (Flat, IVF);
otherwise (HNSW) they become tombstones, skipped by search and purged by the next build (see
index.vectors).

Write order, so an interruption never shows a wrong result: adding writes features, then the
catalog, then saves the FAISS index; removing deletes catalog rows, then features, then vectors.
At worst the FAISS index lags the catalog: search never shows an id the catalog does not hold,
and the next build rebuilds the FAISS index from the stores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from features.core import IndexError_, parse_conf
from index.catalog import Catalog, ImageRecord, Status
from index.layout import IndexConfig, IndexPaths
from index.store import FeatureStore, LocalFeatureStore
from index.vectors import VectorIndex
from index.whitening import Whitening
from retrieval.building import Builder, Progress, prefetch, scan_corpus

logger = logging.getLogger(__name__)

FileItem = tuple[Path, str, str | None]
"""(file, catalog path, label)."""


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


def add_images(
    index_dir: str | Path,
    targets: Sequence[str | Path],
    label: str | None = None,
    progress: Progress | None = None,
    device: Any = None,
    tombstone: bool | None = None,
) -> UpdateReport:
    """Index files and folders (recursively) into an existing index. A file under the corpus
    root recorded at build time is catalogued by its path relative to that root and labelled
    by its first sub-folder, like `retr index build` does; files elsewhere by their absolute
    path, unlabelled. `label` overrides both. Known unchanged files are left alone, known
    changed ones re-extracted under their id."""
    paths = IndexPaths(index_dir)
    config = paths.read_config()
    corpus = Path(config.corpus) if config.corpus else None
    files = [f for t in targets for f in _expand(Path(t), corpus, label)]
    report = UpdateReport()
    _add_files(paths, config, files, report, progress, device, tombstone)
    return report


def update_images(
    index_dir: str | Path,
    targets: Sequence[str | Path] = (),
    progress: Progress | None = None,
    device: Any = None,
    tombstone: bool | None = None,
) -> UpdateReport:
    """Re-check catalogued files (all, or those at or under `targets`): a file whose content
    changed (by SHA-256) is re-extracted under its id, a file that is gone is removed."""
    paths = IndexPaths(index_dir)
    config = paths.read_config()
    corpus = Path(config.corpus) if config.corpus else None
    report = UpdateReport()
    records = _select(Catalog(paths.db_url(config)).all(), targets, corpus, report)
    present = [(_file_of(r.path, corpus), r.path, r.label) for r in records]
    gone = [r.id for (f, _, _), r in zip(present, records, strict=True) if not f.is_file()]
    if gone:
        _remove_ids(paths, config, gone, report, tombstone)
    files = [item for item in present if item[0].is_file()]
    _add_files(paths, config, files, report, progress, device, tombstone)
    return report


def remove_images(
    index_dir: str | Path, targets: Sequence[str | int | Path], tombstone: bool | None = None
) -> UpdateReport:
    """Remove images by catalog id (an int, or a string of digits) or by path (a file, or a
    folder for everything under it; relative to the corpus root, or absolute)."""
    paths = IndexPaths(index_dir)
    config = paths.read_config()
    corpus = Path(config.corpus) if config.corpus else None
    report = UpdateReport()
    records = _select(Catalog(paths.db_url(config)).all(), targets, corpus, report)
    _remove_ids(paths, config, [r.id for r in records], report, tombstone)
    return report


def convert_local_dtype(index_dir: str | Path, dtype: str) -> None:
    """Re-encode the local features of an index as `dtype` (float16, float32, int8, pq, pq<M>)
    and record it in the index configuration; e.g. to compare encodings on one extraction."""
    paths = IndexPaths(index_dir)
    config = parse_conf(
        IndexConfig, {**paths.read_config().model_dump(), "local_dtype": dtype}, "local_dtype"
    )
    with FeatureStore.open_existing(paths.local_store, "local", readonly=True) as store:
        fingerprint = store.fingerprint
    local = LocalFeatureStore(paths.local_store, fingerprint, dtype=dtype)
    try:
        local.recode(dtype)
    finally:
        local.close()
    paths.write_config(config)


# --- adding ------------------------------------------------------------------------------------


@contextmanager
def _open_vectors(
    paths: IndexPaths, config: IndexConfig
) -> Iterator[tuple[VectorIndex, Whitening]]:
    """The FAISS index and whitening of a built index; the index is saved on success."""
    if not paths.whitening.is_file() or not paths.vectors.is_file():
        raise IndexError_(
            f"{paths.root} has no whitening or vector index yet; run `retr index build` first"
        )
    vectors = VectorIndex.load(paths.vectors, config.index_type)
    yield vectors, Whitening.load(paths.whitening)
    vectors.save(paths.vectors)


def _add_files(
    paths: IndexPaths,
    config: IndexConfig,
    files: list[FileItem],
    report: UpdateReport,
    progress: Progress | None,
    device: Any,
    tombstone: bool | None,
) -> None:
    if not files:
        return
    builder = Builder(paths, config, device)
    stale: list[int] = []  # old vectors of changed files
    fresh: dict[int, np.ndarray] = {}  # id -> raw global descriptor to add
    try:
        with _open_vectors(paths, config) as (vectors, whitening):
            known = builder.catalog.by_path()
            for done, (path, rel, label, prepared) in enumerate(prefetch(files, known)):
                if progress:
                    progress(done, len(files), rel)
                try:
                    sha, image = prepared.result()
                except OSError as exc:
                    report.failed.append((rel, f"unreadable file: {exc}"))
                    continue
                item = (path, rel, label)
                _add_one(builder, report, item, known.get(rel), sha, image, stale, fresh)
            # One batch each: FAISS removal scans the whole index per call.
            before = vectors.tombstones
            vectors.remove(np.array(stale, np.int64), tombstone)
            report.tombstones += vectors.tombstones - before
            if fresh:
                raw = np.stack(list(fresh.values()))
                vectors.add(np.array(list(fresh), np.int64), whitening.apply(raw))
            builder.lstore.finalize()
    finally:
        builder.close()
    if progress:
        progress(len(files), len(files), "")


def _add_one(
    builder: Builder,
    report: UpdateReport,
    item: FileItem,
    rec: ImageRecord | None,
    sha: str,
    image: Any,
    stale: list[int],
    fresh: dict[int, np.ndarray],
) -> None:
    """Extract one new or changed file; its old vector goes to `stale`, its new one to
    `fresh`."""
    path, rel, label = item
    if builder.is_current(rec, sha):
        if rec is not None and rec.label != label:
            size = (rec.width or 0, rec.height or 0)
            builder._record(rec, rel, sha, label, Status.INDEXED, None, size)
        report.unchanged += 1
        return
    if rec is not None and rec.status == Status.INDEXED.value:
        stale.append(rec.id)  # whatever happens to the new content
    status, reason = builder.add_file(path, rel, label, rec, sha, image)
    if status == Status.DUPLICATE:
        report.duplicates.append((rel, reason or ""))
    elif status == Status.FAILED:
        report.failed.append((rel, reason or ""))
    else:
        saved = _record_at(builder.catalog, rel)
        fresh[saved.id] = builder.gstore.get(saved.id)["descriptor"]
        (report.updated if rec is not None else report.added).append(rel)


def _record_at(catalog: Catalog, rel: str) -> ImageRecord:
    with catalog.session() as s:
        rec = s.scalars(select(ImageRecord).where(ImageRecord.path == rel)).one()
        return rec


# --- removing ----------------------------------------------------------------------------------


def _remove_ids(
    paths: IndexPaths,
    config: IndexConfig,
    ids: list[int],
    report: UpdateReport,
    tombstone: bool | None,
) -> None:
    if not ids:
        return
    catalog = Catalog(paths.db_url(config))
    indexed = [r.id for r in catalog.get(ids).values() if r.status == Status.INDEXED.value]
    catalog.remove(ids)
    for path, kind in ((paths.global_store, "global"), (paths.local_store, "local")):
        if path.is_file():
            with FeatureStore.open_existing(path, kind) as store:
                for i in ids:
                    store.delete(i)
    if indexed:
        with _open_vectors(paths, config) as (vectors, _):
            before = vectors.tombstones
            vectors.remove(np.array(indexed), tombstone)
            report.tombstones += vectors.tombstones - before
    report.removed.extend(sorted(ids))


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
    """Files of `target` (itself, or every non-hidden file under a folder) with catalog paths
    and labels."""
    if target.is_dir():
        files = scan_corpus(target)
    elif target.exists():
        files = [target]
    else:
        raise IndexError_(f"{target}: no such file or folder")
    items = []
    for f in files:
        rel = _catalog_path(f, corpus)
        parts = rel.split("/")
        inside = not Path(rel).is_absolute()
        own = label if label is not None else (parts[0] if inside and len(parts) > 1 else None)
        items.append((f, rel, own))
    return items


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
