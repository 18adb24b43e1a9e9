"""Index building: scan a corpus, extract features for new or changed files, write the index.

A bad file is recorded as failed with its reason and never aborts the build. The catalog marks an
image indexed only after both of its feature groups are written, and the whitening and vector
index are rebuilt from the stores at the end, so an interrupted build loses nothing that a
previous build finished.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.base import LocalExtractor
from features.core import ConfigError, ImageReadError, RetrError, file_sha256
from features.image import load_image
from features.registry import load_global, load_local
from features.types import LocalFeatures
from index.catalog import Catalog, ImageRecord, Status
from index.layout import IndexConfig, IndexPaths
from index.store import FeatureStore, LocalFeatureStore
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


def extract_both(
    global_model: Any, local: LocalExtractor, rgb: np.ndarray
) -> tuple[np.ndarray, LocalFeatures]:
    """Global descriptor and local features of one image, sharing the forward passes when
    `shares_pass` allows it."""
    if shares_pass(global_model, local):
        return global_model.extract_all(rgb)  # type: ignore[no-any-return]
    return global_model.extract(rgb), local.extract(rgb)


def shares_pass(global_model: Any, local: LocalExtractor) -> bool:
    """True when the global model is DELG and the local method is DELG's own branch with the
    same weights, pyramid and selection: then one forward pass per scale feeds both heads (as
    the paper intends) instead of two."""
    if local.name != "delg" or not hasattr(global_model, "extract_all"):
        return False
    if local.weights_path != global_model.weights_path:
        return False
    a, b = global_model.settings, local.settings  # type: ignore[attr-defined]
    fields = ("image_scales", "score_threshold", "max_feature_num", "max_image_size")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


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
        self.lstore = LocalFeatureStore(
            paths.local_store,
            self.local.fingerprint,
            {"method": config.local_method, **self.local.conf.model_dump()},
            dtype=config.local_dtype,
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
        self,
        path: Path,
        rel: str,
        label: str | None,
        rec: ImageRecord | None,
        sha: str,
        image: Callable[[], np.ndarray] | None = None,
    ) -> tuple[Status, str | None]:
        """Extract and store one file; returns its status and the reason when not indexed.
        `image()`, when given, returns the file already decoded (or raises what decoding did)."""
        dup = self.catalog.find_indexed_by_hash(sha)
        if dup is not None and dup.path != rel:
            reason = f"same content as {dup.path}"
            self._record(rec, rel, sha, label, Status.DUPLICATE, reason)
            return Status.DUPLICATE, reason
        try:
            rgb = image() if image is not None else load_image(path)
            desc, feats = extract_both(self.global_model, self.local, rgb)
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
        self.gstore.put(saved.id, descriptor=desc.astype(np.float32))
        self.lstore.put_features(saved.id, feats)  # encoded as config.local_dtype
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
        self.lstore.finalize()  # a product quantiser is trained once the corpus is known
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
        for done, (path, rel, label, prepared) in enumerate(prefetch(files, known)):
            if progress:
                progress(done, len(files), rel)
            _process(builder, report, path, rel, label, known.get(rel), prepared)
        report.total_indexed = builder.finish()
    finally:
        builder.close()
    if progress:
        progress(len(files), len(files), "")
    report.seconds = time.perf_counter() - start
    return report


Prepared = tuple[str, Callable[[], np.ndarray] | None]
"""(sha256, image()) of a file hashed ahead of time; image is None when the catalog says the file
is unchanged (nothing to extract), and image() re-raises what decoding raised."""
PREFETCH = 4
"""Files hashed and decoded ahead of extraction (hashlib and Pillow release the GIL, so two
threads overlap them with the model's forward passes)."""


def prefetch(
    files: list[tuple[Path, str, str | None]], known: dict[str, ImageRecord]
) -> Iterator[tuple[Path, str, str | None, Future[Prepared]]]:
    """The files in order, each with its `_prepare` job, PREFETCH files ahead."""
    with ThreadPoolExecutor(2, thread_name_prefix="decode") as pool:
        pending: deque[tuple[Path, str, str | None, Future[Prepared]]] = deque()
        for path, rel, label in files:
            pending.append((path, rel, label, pool.submit(_prepare, path, known.get(rel))))
            if len(pending) > PREFETCH:
                yield pending.popleft()
        yield from pending


def _prepare(path: Path, rec: ImageRecord | None) -> Prepared:
    sha = file_sha256(path)  # OSError reaches _process through the future
    if rec is not None and rec.sha256 == sha and rec.status == Status.INDEXED.value:
        return sha, None
    try:
        rgb = load_image(path)
    except Exception as exc:  # raised again inside add_file, whose handlers decide
        return sha, _raiser(exc)
    return sha, lambda: rgb


def _raiser(exc: Exception) -> Callable[[], np.ndarray]:
    def fail() -> np.ndarray:
        raise exc

    return fail


def _process(
    builder: Builder,
    report: BuildReport,
    path: Path,
    rel: str,
    label: str | None,
    rec: ImageRecord | None,
    prepared: Future[Prepared] | None = None,
) -> None:
    try:
        sha, image = prepared.result() if prepared is not None else (file_sha256(path), None)
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
    status, reason = builder.add_file(path, rel, label, rec, sha, image)
    if status == Status.INDEXED:
        report.indexed += 1
    elif status == Status.DUPLICATE:
        report.duplicates.append((rel, reason or ""))
    else:
        report.failed.append((rel, reason or ""))


REBUILT = {"index_type"}
"""Options a later build may change: what they decide is rebuilt from the stores every time."""


def _settle_config(paths: IndexPaths, options: dict[str, Any], corpus: Path) -> IndexConfig:
    """The config of an existing index wins; options that contradict it are an error."""
    from features.core import parse_conf

    if not paths.exists():
        return parse_conf(IndexConfig, {**options, "corpus": str(corpus)}, "index options")
    existing = paths.read_config()
    wanted = parse_conf(IndexConfig, {**existing.model_dump(), **options}, "index options")
    diff = sorted(
        k for k in options if getattr(wanted, k) != getattr(existing, k) and k not in REBUILT
    )
    if diff:
        raise ConfigError(
            f"{paths.root} was built with other settings ({', '.join(diff)} differ); "
            "use a new --index directory, or drop those options to reuse its settings"
        )
    return wanted if any(k in REBUILT for k in options) else existing
