"""Index building: scan a corpus, extract features for new or changed files, write the index.

A bad file is recorded as failed with its reason and never aborts the build. The catalog marks an
image indexed only after both of its feature groups are written, and the whitening and vector
index are rebuilt from the stores at the end, so an interrupted build loses nothing that a
previous build finished.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.base import LocalExtractor
from features.errors import ConfigError, ImageReadError, RetrError
from features.image import load_image
from features.registry import load_global, load_local
from index.catalog import Catalog, ImageRecord, Status
from index.layout import IndexConfig, IndexPaths
from index.store import FeatureStore
from index.vectors import VectorIndex
from index.whitening import Whitening

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""progress(done, total, current_path) callback."""


@dataclass
class BuildReport:
    indexed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    total_indexed: int = 0

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0


def scan_corpus(root: Path) -> list[Path]:
    """Every regular, non-hidden file under `root`, sorted."""
    if not root.is_dir():
        raise ConfigError(f"corpus {root} is not a directory")
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files)


def read_labels(csv_path: Path) -> dict[str, str]:
    """path -> label from a CSV with columns `path,label` (paths relative to the corpus)."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConfigError(f"cannot read labels file {csv_path}: {exc}") from None
    if rows and not {"path", "label"} <= set(rows[0]):
        raise ConfigError(f"{csv_path}: expected columns 'path,label', got {list(rows[0])}")
    return {r["path"].replace("\\", "/"): r["label"] for r in rows if r.get("label")}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Builder:
    """Holds the open models and stores of one build."""

    def __init__(self, paths: IndexPaths, config: IndexConfig, device: Any = None) -> None:
        self.paths = paths
        self.config = config
        self.catalog = Catalog(paths.db_url(config))
        self.global_model = load_global(config.global_model, config.global_conf, device)
        self.local: LocalExtractor = load_local(config.local_method, config.local_conf, device)
        self.gstore = FeatureStore(
            paths.global_store,
            "global",
            self.global_model.fingerprint,
            {"model": config.global_model, **self.global_model.conf.model_dump()},
        )
        self.lstore = FeatureStore(
            paths.local_store,
            "local",
            self.local.fingerprint,
            {"method": config.local_method, **self.local.conf.model_dump()},
        )

    def close(self) -> None:
        self.gstore.close()
        self.lstore.close()

    def is_current(self, rec: ImageRecord | None, sha: str) -> bool:
        return (
            rec is not None
            and rec.sha256 == sha
            and rec.status == Status.INDEXED.value
            and rec.id in self.gstore
            and rec.id in self.lstore
        )

    def add_file(
        self, path: Path, rel: str, label: str | None, rec: ImageRecord | None, sha: str
    ) -> tuple[Status, str | None]:
        """Extract and store one file; returns its status and the reason when not indexed."""
        dup = self.catalog.find_indexed_by_hash(sha)
        if dup is not None and dup.path != rel:
            reason = f"same content as {dup.path}"
            self._record(rec, rel, sha, label, Status.DUPLICATE, reason)
            return Status.DUPLICATE, reason
        try:
            rgb = load_image(path)
            desc = self.global_model.extract(rgb)
            feats = self.local.extract(rgb)
        except ImageReadError as exc:
            self._record(rec, rel, sha, label, Status.FAILED, exc.reason)
            return Status.FAILED, exc.reason
        except (RetrError, RuntimeError, ValueError, MemoryError) as exc:
            reason = f"extraction failed: {type(exc).__name__}: {exc}"
            logger.warning("%s: %s", rel, reason)
            self._record(rec, rel, sha, label, Status.FAILED, reason)
            return Status.FAILED, reason
        h, w = rgb.shape[:2]
        # The record goes in as failed first so the id exists; it turns indexed only once both
        # feature groups are on disk.
        saved = self._record(
            rec, rel, sha, label, Status.FAILED, "interrupted while writing", size=(w, h)
        )
        dtype = np.dtype(self.config.local_dtype)
        self.gstore.put(saved.id, descriptor=desc.astype(np.float32))
        self.lstore.put(
            saved.id,
            attrs={"image_size": feats.image_size},
            keypoints=feats.keypoints.astype(np.float32),
            scores=feats.scores.astype(np.float32),
            descriptors=feats.descriptors.astype(dtype),
        )
        self._record(saved, rel, sha, label, Status.INDEXED, None, size=(w, h))
        return Status.INDEXED, None

    def _record(
        self,
        rec: ImageRecord | None,
        rel: str,
        sha: str,
        label: str | None,
        status: Status,
        reason: str | None,
        size: tuple[int, int] | None = None,
    ) -> ImageRecord:
        if rec is not None and status != Status.INDEXED:
            self.gstore.delete(rec.id)  # stale features of a file that changed
            self.lstore.delete(rec.id)
        new = ImageRecord(
            id=rec.id if rec is not None else None,
            path=rel,
            sha256=sha,
            label=label,
            status=status.value,
            reason=reason,
            width=size[0] if size else None,
            height=size[1] if size else None,
        )
        return self.catalog.save(new)

    def finish(self) -> int:
        """Refit the whitening and rebuild the vector index from every indexed image."""
        ids = [i for i in self.catalog.indexed_ids() if i in self.gstore]
        dim = self.global_model.dim
        raw = (
            np.stack([self.gstore.get(i)["descriptor"] for i in ids])
            if ids
            else np.zeros((0, dim), np.float32)
        )
        whitening = Whitening.fit(raw, self.config.whitening_shrinkage)
        whitening.save(self.paths.whitening)
        vectors = whitening.apply(raw) if len(raw) else np.zeros((0, whitening.dim), np.float32)
        VectorIndex.build(np.array(ids, np.int64), vectors, self.config.index_type).save(
            self.paths.vectors
        )
        self.gstore.flush()
        self.lstore.flush()
        return len(ids)


def iter_corpus(
    corpus: Path, labels: dict[str, str] | None
) -> Iterator[tuple[Path, str, str | None]]:
    """(file, path relative to the corpus, label) for every file of the corpus."""
    for path in scan_corpus(corpus):
        rel = path.relative_to(corpus).as_posix()
        if labels is not None:
            label = labels.get(rel)
        else:
            parts = rel.split("/")
            label = parts[0] if len(parts) > 1 else None
        yield path, rel, label


def build_index(
    corpus: str | Path,
    index_dir: str | Path,
    options: dict[str, Any] | None = None,
    labels_csv: str | Path | None = None,
    progress: Progress | None = None,
    device: Any = None,
) -> BuildReport:
    """Index every new or changed file of `corpus` into `index_dir` (created if needed).

    `options` are IndexConfig fields; the first build writes them (over the defaults) to the
    index, and later builds reuse that configuration: options that contradict it are an error.
    """
    corpus = Path(corpus).resolve()
    paths = IndexPaths(index_dir)
    config = _settle_config(paths, options or {}, corpus)
    labels = read_labels(Path(labels_csv)) if labels_csv else None
    files = list(iter_corpus(corpus, labels))
    start = time.perf_counter()
    paths.root.mkdir(parents=True, exist_ok=True)
    builder = Builder(paths, config, device)
    paths.write_config(config)
    report = BuildReport()
    try:
        known = builder.catalog.by_path()
        for done, (path, rel, label) in enumerate(files):
            if progress:
                progress(done, len(files), rel)
            _process(builder, report, path, rel, label, known.get(rel))
        report.total_indexed = builder.finish()
    finally:
        builder.close()
    if progress:
        progress(len(files), len(files), "")
    report.seconds = time.perf_counter() - start
    return report


def _process(
    builder: Builder,
    report: BuildReport,
    path: Path,
    rel: str,
    label: str | None,
    rec: ImageRecord | None,
) -> None:
    try:
        sha = sha256_of(path)
    except OSError as exc:
        report.failed.append((rel, f"unreadable file: {exc}"))
        return
    if builder.is_current(rec, sha):
        if rec is not None and rec.label != label:
            builder._record(
                rec, rel, sha, label, Status.INDEXED, None, (rec.width or 0, rec.height or 0)
            )
        report.unchanged += 1
        return
    status, reason = builder.add_file(path, rel, label, rec, sha)
    if status == Status.INDEXED:
        report.indexed += 1
    elif status == Status.DUPLICATE:
        report.duplicates.append((rel, reason or ""))
    else:
        report.failed.append((rel, reason or ""))


def _settle_config(paths: IndexPaths, options: dict[str, Any], corpus: Path) -> IndexConfig:
    """The config of an existing index wins; options that contradict it are an error."""
    from features.base import parse_conf

    if not paths.exists():
        return parse_conf(IndexConfig, {**options, "corpus": str(corpus)}, "index options")
    existing = paths.read_config()
    wanted = parse_conf(IndexConfig, {**existing.model_dump(), **options}, "index options")
    diff = sorted(k for k in options if getattr(wanted, k) != getattr(existing, k))
    if diff:
        raise ConfigError(
            f"{paths.root} was built with other settings ({', '.join(diff)} differ); "
            "use a new --index directory, or drop those options to reuse its settings"
        )
    return existing
