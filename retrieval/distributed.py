"""Building an index on Ray: extraction on workers, decisions and commits on the driver.

`retr index build CORPUS --index DIR --ray auto|ADDRESS` runs the same ingest path as a local
build (retrieval.ingest): the driver scans and hashes the corpus and plans every file
(`Ingester.plan`: new, changed, duplicate, failed — the catalog and the manifest live with it),
reads each file that needs extraction and sends its bytes to a pool of Ray actors; the actors
decode and extract (`extract_or_reason`, the same code and failure reasons as a local build);
the driver stages the results in corpus order (`Ingester.stage`), commits them in batches
through the one index writer, and publishes (whitening, vector index) as today. Ids, catalog
and features are therefore those of a single-process build (features equal within float
tolerance: a worker may run torch with another thread count than the driver would, which can
change the last bits of a reduction).

Why actors with a queue rather than Ray Data `map_batches`: the driver must keep corpus order
and its per-file decisions, and stream results into crash-safe batch commits as they arrive;
actors give that with plain method calls (no Arrow/pandas conversion of image bytes and
features, no extra dependencies), load the models once each, and Ray's actor fault tolerance
does the rest: an actor killed mid-batch is restarted (`max_restarts`) and the call retried
(`max_task_retries`), so nothing is lost or duplicated (results are keyed by position, and the
driver stages each file once). A killed driver leaves the committed batches, which the next
build, with or without Ray, resumes from.

One actor per GPU on a GPU cluster; on CPUs one actor per `cpus_per_actor` cores, each running
torch with that many threads. A bounded window of batches in flight keeps memory flat.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from features.core import ConfigError
from features.image import decode_bytes
from features.pipeline import Described, Extractors
from index.layout import IndexConfig
from retrieval.ingest import (
    FileItem,
    Ingester,
    Job,
    Outcome,
    extract_or_reason,
    prefetch,
)

logger = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'retr[ray]'"
IMAGES_PER_CALL = 4
"""Images sent to an actor in one call (amortises the call; small enough to keep actors busy)."""
CALLS_PER_ACTOR = 2
"""Calls in flight per actor: one running, one queued."""
GCS_PORT_WAIT_S = 60
"""Seconds a local Ray start waits for its GCS server (Ray's default: 30, which a start under
load on 2 cores once exceeded; env RAY_gcs_server_port_wait_time_s overrides both)."""
LOCAL_START_TRIES = 2
"""Local Ray starts made before giving up (see `connect`)."""


def require_ray() -> None:
    """ConfigError naming the extra when Ray is not installed."""
    _ray()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def connect(address: str, num_cpus: int | None = None) -> tuple[bool, float]:
    """Start a local Ray runtime ("auto") or join the cluster at `address`; returns (whether
    this call started or joined it and must shut it down, seconds it took)."""
    ray = _ray()
    if ray.is_initialized():
        return False, 0.0
    start = time.perf_counter()
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(GCS_PORT_WAIT_S))
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    # A local start: on this 2-core machine Ray's GCS server now and then never published its
    # port (no log written, nothing listening), while the next start took 2 s; so a local start
    # that times out is shut down and made once more. Joining a cluster is not retried.
    tries = LOCAL_START_TRIES if address == "auto" else 1
    for attempt in range(1, tries + 1):
        try:
            if address == "auto":
                ray.init(num_cpus=num_cpus, **options)
            else:
                ray.init(address=address, **options)
            break
        except (ConnectionError, RuntimeError, ValueError) as exc:
            text = str(exc).strip()
            if attempt < tries and "Timed out waiting for file" in text:
                logger.warning("Ray did not start (%s); starting it again", text[:120])
                ray.shutdown()
                continue
            first = text.splitlines()[0][:200] if text else type(exc).__name__
            raise ConfigError(f"cannot reach the Ray cluster at {address}: {first}") from None
    return True, time.perf_counter() - start


def disconnect() -> None:
    """Stop the runtime `connect` started, or leave the cluster it joined."""
    _ray().shutdown()


class _Worker:
    """A Ray actor holding one set of models (made remote in `RayExtraction`)."""

    def __init__(self, config: dict[str, Any], device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.models = Extractors.for_index(IndexConfig.model_validate(config), device)
        self.identity = (*self.models.fingerprints, self.models.global_dim)

    def describe(self, batch: list[tuple[str, bytes]]) -> list[tuple[Described | None, str | None]]:
        return [extract_or_reason(self.models, partial(decode_bytes, d, n)) for n, d in batch]

    def info(self) -> dict[str, Any]:
        """pid, peak resident memory (bytes) and model identity of this actor."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"pid": os.getpid(), "peak_rss": peak, "identity": self.identity}


@dataclass
class RemoteModels:
    """The models' identity as the workers report it (the ingest path's `Models`); `describe`
    runs on a worker."""

    fingerprints: tuple[str, str]
    global_dim: int
    extraction: RayExtraction = field(repr=False)

    def describe(self, image: np.ndarray) -> Described:
        ray = _ray()
        import cv2

        ok, png = cv2.imencode(".png", image[:, :, ::-1])
        result = ray.get(self.extraction.actors[0].describe.remote([("<array>", png.tobytes())]))
        described, reason = result[0]
        if described is None:
            raise ConfigError(f"extraction failed on a Ray worker: {reason}")
        return described


@dataclass
class _Entry:
    """One file in order: its outcome, or the job whose result will come back."""

    outcome: Outcome | None = None
    job: Job | None = None
    ref: Any = None
    slot: int = 0


class RayExtraction:
    """The ingest path's extraction on a pool of Ray actors (see the module docstring)."""

    def __init__(
        self,
        config: IndexConfig,
        device: str | None = None,
        cpus_per_actor: int = 1,
        actors: int | None = None,
    ) -> None:
        ray = _ray()
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = gpus > 0 and device != "cpu"
        count = actors or (
            gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // cpus_per_actor)
        )
        remote = ray.remote(_Worker).options(
            num_cpus=cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
            max_restarts=-1,
            max_task_retries=-1,
        )
        dev = "cuda" if use_gpu else "cpu"
        self.actors = [
            remote.remote(config.model_dump(), dev, cpus_per_actor) for _ in range(count)
        ]
        infos = ray.get([a.info.remote() for a in self.actors])
        g, loc, dim = infos[0]["identity"]
        self.models = RemoteModels((g, loc), dim, self)
        self._next = 0

    def worker_info(self) -> list[dict[str, Any]]:
        """pid and peak memory of every actor (for tests and measurements)."""
        return list(_ray().get([a.info.remote() for a in self.actors]))

    def outcomes(self, ingester: Ingester, files: Sequence[FileItem]) -> Iterator[Outcome]:
        """One Outcome per file, in order; extraction runs on the actors, a bounded window of
        calls ahead of the file being staged."""
        ray = _ray()
        window = CALLS_PER_ACTOR * len(self.actors)
        queue: deque[_Entry] = deque()
        batch: list[_Entry] = []
        in_flight: deque[Any] = deque()
        ahead = window * IMAGES_PER_CALL
        planned = (
            ingester.plan(item, prepared)
            for item, prepared in prefetch(files, ingester, decode=False, ahead=ahead)
        )
        for plan in planned:
            entry = _Entry(outcome=plan) if isinstance(plan, Outcome) else _Entry(job=plan)
            queue.append(entry)
            if entry.job is not None:
                batch.append(entry)
                if len(batch) >= IMAGES_PER_CALL:
                    in_flight.append(self._submit(batch))
                    batch = []
            while len(in_flight) > window:
                ray.wait([in_flight.popleft()], num_returns=1)
            yield from self._ready(queue, ingester, block=False)
        if batch:
            self._submit(batch)
        yield from self._ready(queue, ingester, block=True)

    def _submit(self, batch: list[_Entry]) -> Any:
        """Send the batch's file bytes to the next actor; returns the call's reference."""
        payload = []
        for entry in batch:
            assert entry.job is not None
            try:
                data = entry.job.item.path.read_bytes()
            except OSError as exc:  # read here, decoded there: the worker reports the reason
                data = b""
                logger.warning("%s: unreadable file: %s", entry.job.item.rel, exc)
            payload.append((entry.job.item.rel, data))
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        ref = actor.describe.remote(payload)
        for slot, entry in enumerate(batch):
            entry.ref, entry.slot = ref, slot
        return ref

    def _ready(self, queue: deque[_Entry], ingester: Ingester, block: bool) -> Iterator[Outcome]:
        """Outcomes at the head of the queue whose results are in (all of them when block)."""
        ray = _ray()
        results: dict[Any, list[tuple[Described | None, str | None]]] = {}
        while queue:
            head = queue[0]
            if head.outcome is not None:
                queue.popleft()
                yield head.outcome
                continue
            if head.ref is None:  # its batch is still being filled
                return
            if head.ref not in results:
                done, _ = ray.wait([head.ref], num_returns=1, timeout=None if block else 0)
                if not done:
                    return
                results[head.ref] = ray.get(head.ref)
            described, reason = results[head.ref][head.slot]
            queue.popleft()
            assert head.job is not None
            yield ingester.stage(head.job, described, reason)

    def close(self) -> None:
        ray = _ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
