"""Index building: scan a corpus, ingest new or changed files, publish the index.

A bad file is recorded as failed with its reason and never aborts the build. Features are
committed batch by batch (retrieval.ingest, index.writer): a killed build keeps every batch it
committed, and running it again processes only what is missing. The whitening is refitted and
the vector index rebuilt when the build publishes, in one commit: searches see the index as it
was before the build or as it is after it.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.core import ConfigError
from features.image import path_problem
from features.pipeline import Extractors
from index.layout import IndexConfig, IndexPaths, settle_config
from index.writer import IndexWriter
from retrieval.ingest import Extraction, FileItem, Ingester, Models, Progress, ingest_files

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm",
}  # fmt: skip
"""Names that announce an image: such an entry that is not a readable file is recorded as
failed (other odd entries are ignored)."""


@dataclass
class BuildReport:
    indexed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    ignored_labels: list[str] = field(default_factory=list)
    """Rows of the --labels CSV that name no corpus file."""
    seconds: float = 0.0
    total_indexed: int = 0
    generation: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)
    """Ray builds: each worker's pid and peak memory (bytes), and `ray_start_s` the seconds
    taken to start or join the runtime."""
    ray_start_s: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0


def scan_corpus(root: Path) -> list[tuple[Path, str | None]]:
    """(entry, problem) for every non-hidden file under `root`, sorted: problem is None for a
    readable regular file (or a link to one), else why the entry cannot be read (a dangling
    link, a link loop, a directory or device named like an image). Linked directories are
    followed once each."""
    if not root.is_dir():
        raise ConfigError(f"corpus {root} is not a directory")
    out: list[tuple[Path, str | None]] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            out.append((Path(folder), f"unreadable folder: {exc.strerror}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            kind, problem = _classify(path)
            if kind == "dir":
                stack.append(path)
            if problem is not None and (kind != "dir" or path.suffix.lower() in IMAGE_SUFFIXES):
                out.append((path, problem))
            elif kind == "file":
                out.append((path, None))
    return sorted(out)


def _classify(path: Path) -> tuple[str, str | None]:
    """("file" | "dir" | "other", problem); problems are features.image.path_problem's."""
    problem = path_problem(path)
    if problem is None:
        return "file", None
    if os.path.isdir(path):
        return "dir", problem
    if os.path.exists(path) and path.suffix.lower() not in IMAGE_SUFFIXES:
        return "other", "skip"  # a device or pipe that is not named like an image
    return "other", problem


def read_labels(csv_path: Path, corpus: Path) -> tuple[dict[str, str], list[str]]:
    """path -> label from a CSV with columns `path,label` (paths relative to the corpus, or
    absolute inside it), and the rows that cannot apply (absolute paths outside the corpus)."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read labels file {csv_path}: {exc}") from None
    if rows and not {"path", "label"} <= set(rows[0]):
        raise ConfigError(f"{csv_path}: expected columns 'path,label', got {list(rows[0])}")
    labels: dict[str, str] = {}
    ignored = []
    for r in rows:
        rel = (r.get("path") or "").replace("\\", "/")
        if Path(rel).is_absolute():
            inside = Path(os.path.abspath(rel))
            if not inside.is_relative_to(corpus):
                ignored.append(f"{rel} (outside the corpus {corpus})")
                continue
            rel = inside.relative_to(corpus).as_posix()
        if r.get("label"):
            labels[rel] = str(r["label"])
    return labels, ignored


@contextmanager
def _extraction(
    config: IndexConfig, device: Any, ray: str | None, report: BuildReport
) -> Iterator[tuple[Models, Extraction | None]]:
    """The models and where extraction runs: here (None), or on Ray workers."""
    if ray is None:
        yield Extractors.for_index(config, device), None
        return
    from retrieval import distributed

    started, report.ray_start_s = distributed.connect(ray)
    pool = None
    try:
        pool = distributed.RayExtraction(config, None if device == "auto" else device)
        yield pool.models, pool
        report.workers = pool.worker_info()
    finally:
        if pool is not None:
            pool.close()
        if started:
            distributed.disconnect()


def corpus_items(corpus: Path, labels: dict[str, str] | None) -> list[FileItem]:
    """Every entry of the corpus as a FileItem: label from `labels` when given, else the first
    sub-folder."""
    items = []
    for path, problem in scan_corpus(corpus):
        if problem == "skip":
            continue
        rel = path.relative_to(corpus).as_posix()
        if labels is not None:
            label = labels.get(rel)
        else:
            parts = rel.split("/")
            label = parts[0] if len(parts) > 1 else None
        items.append(FileItem(path, rel, label, problem))
    return items


def build_index(
    corpus: str | Path,
    index_dir: str | Path,
    config: IndexConfig | None = None,
    labels_csv: str | Path | None = None,
    progress: Progress | None = None,
    device: Any = None,
    wait: float | None = None,
    ray: str | None = None,
) -> BuildReport:
    """Index every new or changed file of `corpus` into `index_dir` (created if needed).

    `config`: a new index takes it; an existing index keeps its own, and the fields `config`
    was given (`IndexConfig.parse`) must agree with it (index.layout.settle_config). wait:
    seconds to wait for another writer to finish (None: fail at once). ray: "auto" (a local
    Ray runtime) or a cluster address: extraction runs on Ray workers
    (retrieval.distributed), everything else as here.
    """
    start = time.perf_counter()
    if ray is not None:
        from retrieval.distributed import require_ray

        require_ray()  # refused before anything is written
    corpus = Path(corpus).resolve()
    labels, ignored = read_labels(Path(labels_csv), corpus) if labels_csv else (None, [])
    items = corpus_items(corpus, labels)
    if labels is not None:
        known = {i.rel for i in items}
        ignored += sorted(f"{rel} (no such file in the corpus)" for rel in set(labels) - known)
    requested = config or IndexConfig()
    paths = IndexPaths(index_dir)
    with IndexWriter.open(paths, settle_config(None, requested, str(corpus)), wait=wait) as writer:
        settled = settle_config(writer.config, requested, str(corpus))
        rebuilt = settled != writer.config
        if rebuilt:
            writer.set_config(settled)
        report = BuildReport(ignored_labels=ignored)
        with _extraction(settled, device, ray, report) as (models, extraction):
            ingester = Ingester(writer, models)
            ingested = ingest_files(ingester, items, progress, extraction)
        report.indexed = len(ingested.indexed) + len(ingested.updated)
        report.unchanged = ingested.unchanged
        report.failed, report.duplicates = ingested.failed, ingested.duplicates
        m = writer.manifest
        if rebuilt or m.pending or m.pending_dead or not m.published:
            report.generation = writer.publish(refit=True).generation
        report.total_indexed = writer.manifest.vector_count
    report.seconds = time.perf_counter() - start
    return report
