"""The one ingest path: a corpus file in, its outcome out (indexed, unchanged, duplicate, failed).

`Ingester.ingest` decides what one file needs, extracts its features and hands them to the
index writer, which commits them in batches (by count and by time: a kill costs at most one
batch; index.writer). `retr index build`, `index add` and `index update` all feed their files
through it, hashed and decoded ahead on a thread pool (`prefetch`).

Decisions, per file:
- unreadable (permissions, I/O error, a link to nowhere): failed, with the reason;
- same path, same content (SHA-256), features stored for that content: unchanged (its label is
  updated if it changed);
- same content as another path that has features: duplicate of it, unless this path has a label
  and the other has none: then this path takes over (it is indexed, the other becomes its
  duplicate), so a copy never takes a label away;
- otherwise decoded and extracted; a file that cannot be decoded or extracted is failed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from features.core import ImageReadError, RetrError, file_sha256
from features.image import load_image
from features.pipeline import Described
from index.catalog import ImageRecord, RowChange, Status
from index.writer import Extracted, IndexWriter

logger = logging.getLogger(__name__)

BATCH_IMAGES = int(os.environ.get("RETR_COMMIT_IMAGES", "64"))
"""Images per committed batch at most (environment: RETR_COMMIT_IMAGES)."""
BATCH_SECONDS = float(os.environ.get("RETR_COMMIT_SECONDS", "30"))
"""Seconds of extraction per committed batch at most (environment: RETR_COMMIT_SECONDS)."""
PREFETCH = 4
"""Files hashed and decoded ahead of extraction (hashlib and Pillow release the GIL, so two
threads overlap them with the model's forward passes)."""

Progress = Callable[[int, int, str], None]
"""progress(done, total, current_path) callback."""


@dataclass(frozen=True)
class FileItem:
    """A file to ingest: where it is, its catalog path, its label. `problem`: why it cannot be
    read at all (a dangling link, a loop, a directory named like an image), found by the scan."""

    path: Path
    rel: str
    label: str | None
    problem: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What ingesting one file did. status: indexed (new), updated (changed content, same id),
    unchanged, duplicate or failed. id: the catalog id, when the file already had one (a new
    file gets its id when its batch is committed: `IngestReport.ids`)."""

    rel: str
    status: str
    reason: str | None = None
    id: int | None = None


@dataclass
class IngestReport:
    indexed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    """Catalog id of every ingested path that has one (filled in as batches commit)."""

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "indexed":
            self.indexed.append(outcome.rel)
        elif outcome.status == "updated":
            self.updated.append(outcome.rel)
        elif outcome.status == "unchanged":
            self.unchanged += 1
        elif outcome.status == "duplicate":
            self.duplicates.append((outcome.rel, outcome.reason or ""))
        else:
            self.failed.append((outcome.rel, outcome.reason or ""))


@dataclass(frozen=True)
class Job:
    """A file that needs extraction (`Ingester.plan`); rec_id: its catalog id if it has one."""

    item: FileItem
    rec_id: int | None
    sha: str
    image: Callable[[], np.ndarray] | None = None
    """The file decoded ahead (re-raising what decoding raised), when it was."""
    replaces: bool = False
    """Whether its catalog row was indexed: its new features replace searchable ones (an
    update); a row that never got features (pending after a failed commit, failed before) is
    added."""

    def rgb(self) -> np.ndarray:
        return self.image() if self.image is not None else load_image(self.item.path)


def extract_or_reason(
    extractors: Models, source: Callable[[], np.ndarray]
) -> tuple[Described | None, str | None]:
    """(features, None) of the image `source()` returns, or (None, reason) when it cannot be
    decoded or extracted: the one place a failure becomes the reason the catalog records,
    whether extraction runs here or in a worker (retrieval.distributed)."""
    try:
        return extractors.describe(source()), None
    except ImageReadError as exc:
        return None, exc.reason
    except (RetrError, RuntimeError, ValueError, MemoryError) as exc:
        reason = f"extraction failed: {type(exc).__name__}: {exc}"
        logger.warning("%s", reason)
        return None, reason


Prepared = tuple[str, Callable[[], np.ndarray] | None]
"""(sha256, image()) of a file hashed ahead of time; image is None when the file is known and
unchanged (nothing to decode), and image() re-raises what decoding raised."""


class Models(Protocol):
    """What ingesting needs of the models: their identity, and extraction (local models:
    features.pipeline.Extractors; remote ones: retrieval.distributed)."""

    @property
    def fingerprints(self) -> tuple[str, str]: ...

    @property
    def global_dim(self) -> int: ...

    def describe(self, image: np.ndarray) -> Described: ...


class Ingester:
    """Feeds files into one open IndexWriter; call `flush` at the end."""

    def __init__(self, writer: IndexWriter, extractors: Models) -> None:
        self.writer = writer
        self.extractors = extractors
        writer.bind_extractors(*extractors.fingerprints, extractors.global_dim)
        self.known: dict[str, ImageRecord] = {}
        """Catalog rows of the files announced with `expect`, by path."""
        self.stored_sha: dict[int, str] = {}
        """id -> hash of the content its stored features came from (for the ids seen)."""
        self.by_sha: dict[str, ImageRecord] = {}
        """content -> the record holding its features: claimed in this run, or found in the
        catalog (`_original`, asked once per content)."""
        self._asked: set[str] = set()
        self._dropped: set[int] = set()
        """Ids whose stored features this run replaces or drops."""
        self._batch: list[Extracted] = []
        self._records: list[RowChange] = []
        self._batch_start = time.monotonic()
        self.ids: dict[str, int] = {}
        """Catalog path -> id of what this ingester committed."""

    def expect(self, files: Sequence[FileItem]) -> None:
        """Look up the catalog rows of `files` (batched, never the whole table) before they
        are planned: adding a few photos to a large index reads only their rows."""
        found = self.writer.catalog.by_paths(f.rel for f in files if f.rel not in self.known)
        self.known.update(found)
        with_features = [
            r.id
            for r in found.values()
            if r.status in (Status.INDEXED, Status.PENDING) and r.id not in self._dropped
        ]
        self.stored_sha.update(self.writer.current_sha(with_features))

    def _original(self, sha: str) -> ImageRecord | None:
        """The record whose stored features hold this content, if any (the lowest id)."""
        if sha not in self.by_sha and sha not in self._asked:
            self._asked.add(sha)
            rows = self.writer.catalog.find_by_hash(sha, (Status.INDEXED, Status.PENDING))
            rows = [r for r in rows if r.id not in self._dropped]
            stored = self.writer.current_sha([r.id for r in rows])
            for r in rows:
                if stored.get(r.id) == sha:
                    self.stored_sha[r.id] = sha
                    self.by_sha[sha] = self.known.get(r.path, r)
                    break
        return self.by_sha.get(sha)

    def unchanged(self, rec: ImageRecord | None, sha: str) -> bool:
        return rec is not None and rec.sha256 == sha and self.stored_sha.get(rec.id) == sha

    def plan(self, item: FileItem, prepared: Future[Prepared] | None = None) -> Outcome | Job:
        """Decide what one file needs (see the module docstring): an Outcome when it needs no
        extraction, else the Job to extract. The file's content is claimed at once, so a copy
        planned later is its duplicate even before its features are committed."""
        rec = self.known.get(item.rel)
        if item.problem is not None:
            return self._fail(item, rec, "", item.problem)
        try:
            sha, image = (
                prepared.result() if prepared is not None else (file_sha256(item.path), None)
            )
        except OSError as exc:
            return self._fail(item, rec, "", f"unreadable file: {exc}")
        if self.unchanged(rec, sha):
            assert rec is not None
            if rec.label != item.label:
                self.writer.catalog.set_label(rec.id, item.label)
            return Outcome(item.rel, "unchanged", id=rec.id)
        original = self._original(sha)
        if original is not None and original.path != item.rel:
            if original.id is None or not (item.label and not original.label):
                return self._record(
                    item, rec, sha, Status.DUPLICATE, f"same content as {original.path}"
                )
            self._records.append(_demoted(original, item.rel))  # this labelled copy takes over
            self._forget(original.id)
        rec_id = rec.id if rec is not None else None
        self._forget(rec_id)
        self.by_sha[sha] = ImageRecord(id=rec_id, path=item.rel, sha256=sha, label=item.label)
        replaces = rec is not None and rec.status == Status.INDEXED.value
        return Job(item, rec_id, sha, image, replaces)

    def stage(self, job: Job, described: Described | None, reason: str | None) -> Outcome:
        """Hand one extracted file to the writer (committed with its batch), or record why its
        extraction failed."""
        if described is None or described.local is None:
            claim = self.by_sha.get(job.sha)
            if claim is not None and claim.path == job.item.rel:
                del self.by_sha[job.sha]
            rec = self.known.get(job.item.rel)
            return self._fail(job.item, rec, job.sha, reason or "extraction failed")
        self._batch.append(
            Extracted(
                job.item.rel, job.sha, job.item.label, described.descriptor, described.local,
                job.rec_id,
            )
        )  # fmt: skip
        if self._due():
            self.flush()
        return Outcome(job.item.rel, "updated" if job.replaces else "indexed", id=job.rec_id)

    def ingest(self, item: FileItem, prepared: Future[Prepared] | None = None) -> Outcome:
        """Plan, extract (here, in this process) and stage one file."""
        planned = self.plan(item, prepared)
        if isinstance(planned, Outcome):
            return planned
        return self.stage(planned, *extract_or_reason(self.extractors, planned.rgb))

    def _forget(self, rec_id: int | None) -> None:
        """The stored features of `rec_id` are being replaced or dropped."""
        if rec_id is None:
            return
        self._dropped.add(rec_id)
        old = self.stored_sha.pop(rec_id, None)
        if old is not None and self.by_sha.get(old) is not None and self.by_sha[old].id == rec_id:
            del self.by_sha[old]

    def _due(self) -> bool:
        return (
            len(self._batch) >= BATCH_IMAGES
            or time.monotonic() - self._batch_start >= BATCH_SECONDS
        )

    def _fail(self, item: FileItem, rec: ImageRecord | None, sha: str, reason: str) -> Outcome:
        return self._record(item, rec, sha, Status.FAILED, reason)

    def _record(
        self, item: FileItem, rec: ImageRecord | None, sha: str, status: Status, reason: str
    ) -> Outcome:
        rec_id = rec.id if rec is not None else None
        self._records.append(RowChange(item.rel, sha, item.label, status, reason, rec_id))
        self._forget(rec_id)
        if self._due():
            self.flush()
        return Outcome(item.rel, status.value, reason, rec_id)

    def flush(self) -> None:
        """Commit what is staged (one batch)."""
        if self._batch or self._records:
            ids = self.writer.commit_batch(self._batch, self._records)
            for e, i in zip(self._batch, ids, strict=True):
                self.ids[e.path] = i
                self.stored_sha[i] = e.sha256
                self.by_sha[e.sha256] = ImageRecord(
                    id=i, path=e.path, sha256=e.sha256, label=e.label
                )
        self._batch, self._records = [], []
        self._batch_start = time.monotonic()


def _demoted(original: ImageRecord, by: str) -> RowChange:
    """`original` becomes a duplicate of the labelled copy `by`."""
    return RowChange(
        original.path,
        original.sha256,
        original.label,
        Status.DUPLICATE,
        f"same content as {by}",
        original.id,
    )


class Extraction(Protocol):
    """Where the ingest path's extraction runs: here (`LocalExtraction`) or on workers
    (retrieval.distributed.RayExtraction). Either yields one Outcome per file, in order, from
    the same Ingester.plan / stage calls."""

    def outcomes(self, ingester: Ingester, files: Sequence[FileItem]) -> Iterator[Outcome]: ...


class LocalExtraction:
    """Extraction in this process, files hashed and decoded ahead on a thread pool."""

    def outcomes(self, ingester: Ingester, files: Sequence[FileItem]) -> Iterator[Outcome]:
        for item, prepared in prefetch(files, ingester):
            yield ingester.ingest(item, prepared)


def ingest_files(
    ingester: Ingester,
    files: Sequence[FileItem],
    progress: Progress | None = None,
    extraction: Extraction | None = None,
) -> IngestReport:
    """Ingest every file (labelled ones first, so a labelled copy is the one indexed) and
    commit the last batch."""
    order = sorted(files, key=lambda f: (f.label is None, f.rel))
    ingester.expect(order)
    report = IngestReport()
    if progress:
        progress(0, len(order), "")
    steps = (extraction or LocalExtraction()).outcomes(ingester, order)
    for done, outcome in enumerate(steps, start=1):
        report.add(outcome)
        if progress:
            progress(done, len(order), outcome.rel)
    ingester.flush()
    report.ids = {
        i.rel: ingester.ids.get(i.rel) or ingester.known[i.rel].id
        for i in order
        if i.rel in ingester.ids or i.rel in ingester.known
    }
    if progress:
        progress(len(order), len(order), "")
    return report


def prefetch(
    files: Sequence[FileItem], ingester: Ingester, decode: bool = True, ahead: int = PREFETCH
) -> Iterator[tuple[FileItem, Future[Prepared] | None]]:
    """The files in order, each with its hash (and, with `decode`, decode) job, `ahead` files
    ahead."""
    with ThreadPoolExecutor(2, thread_name_prefix="decode") as pool:
        pending: deque[tuple[FileItem, Future[Prepared] | None]] = deque()
        for item in files:
            job = None
            if item.problem is None:
                rec = ingester.known.get(item.rel)
                job = pool.submit(_prepare, item.path, rec, ingester, decode)
            pending.append((item, job))
            if len(pending) > ahead:
                yield pending.popleft()
        yield from pending


def _prepare(path: Path, rec: ImageRecord | None, ingester: Ingester, decode: bool) -> Prepared:
    sha = file_sha256(path)  # OSError reaches `plan` through the future
    if not decode or ingester.unchanged(rec, sha):
        return sha, None
    try:
        rgb = load_image(path)
    except Exception as exc:  # raised again inside `ingest`, whose handlers decide
        return sha, _raiser(exc)
    return sha, lambda: rgb


def _raiser(exc: Exception) -> Callable[[], np.ndarray]:
    def fail() -> np.ndarray:
        raise exc

    return fail
