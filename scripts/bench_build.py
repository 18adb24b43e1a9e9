"""Index build throughput against the bare forward passes of its models, on the same images.

The bare pass runs the global and local extractors on images already decoded in memory; the
build does everything else too (hashing, decoding ahead on a thread pool, storing features,
catalog, whitening and FAISS index). The ratio says how much of the build is model time.
With --ray, single-process and Ray builds of the same images alternate instead, and the table
gives Ray's throughput against the single process, its start-up time and each worker's memory.

    python scripts/bench_build.py --images 24 --data ../shared/data/landmarks-mini
    python scripts/bench_build.py --images 181 --ray auto
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from features.image import load_image
from features.pipeline import Extractors
from index.layout import IndexConfig
from retrieval.building import build_index, scan_corpus

console = Console(width=150)


def bare(images: list[Path], config: IndexConfig) -> tuple[float, float]:
    """(model loading seconds, forward-pass seconds over all images)."""
    start = time.perf_counter()
    c = config
    models = Extractors.for_index(c)
    _ = models.fingerprints  # loads both models
    loaded = time.perf_counter()
    decoded = [load_image(p) for p in images]
    start_pass = time.perf_counter()
    for rgb in decoded:
        models.describe(rgb)
    return loaded - start, time.perf_counter() - start_pass


def build(images: list[Path], workdir: Path, ray: str | None = None) -> tuple[float, float, Any]:
    """(build seconds end to end, seconds from the first image staged to the end, report)."""
    corpus = workdir / "corpus"
    if not corpus.exists():
        for p in images:
            link = corpus / p.parent.name / p.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(p.resolve())
    first: list[float] = []

    def progress(done: int, total: int, current: str) -> None:
        if done and not first:
            first.append(time.perf_counter())

    shutil.rmtree(workdir / "idx", ignore_errors=True)
    start = time.perf_counter()
    report = build_index(corpus, workdir / "idx", progress=progress, ray=ray)
    end = time.perf_counter()
    assert report.indexed == len(images), report.failed
    return end - start, end - first[0], report


def ray_side_by_side(images: list[Path], workdir: Path, address: str, rounds: int) -> None:
    """Single-process and Ray builds of the same images, alternated, in one run."""
    times: dict[str, list[float]] = {"single process": [], f"Ray ({address})": []}
    reports = []
    for _ in range(rounds):
        times["single process"].append(build(images, workdir)[0])
        total, _, report = build(images, workdir, ray=address)
        times[f"Ray ({address})"].append(total)
        reports.append(report)
    n = len(images)
    base = statistics.median(times["single process"])
    table = Table(title=f"build of {n} images, median of {rounds} alternated rounds (defaults)")
    for col in ("", "seconds", "images/s", "vs single process"):
        table.add_column(col, justify="right")
    for name, values in times.items():
        t = statistics.median(values)
        table.add_row(name, f"{t:.1f}", f"{n / t:.2f}", f"{base / t:.2f}")
    console.print(table)
    starts = [r.ray_start_s for r in reports]
    peaks = [w["peak_rss"] / 2**20 for r in reports for w in r.workers]
    console.print(
        f"Ray start-up (inside 'seconds'): median {statistics.median(starts):.1f} s; workers "
        f"{len(reports[-1].workers)}, peak memory per worker {min(peaks):.0f}-{max(peaks):.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/landmarks-mini"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--ray", default=None, help="also build on Ray: auto or an address")
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds for --ray")
    args = parser.parse_args()

    found = [p for p, problem in scan_corpus(args.data / "images") if problem is None]
    images = [p for p in found if p.suffix == ".jpg"][: args.images]
    config = IndexConfig()
    if args.ray:
        with tempfile.TemporaryDirectory() as tmp:
            ray_side_by_side(images, Path(tmp), args.ray, args.rounds)
        return
    loading, forward = bare(images, config)
    with tempfile.TemporaryDirectory() as tmp:
        total, loop, _ = build(images, Path(tmp))
    n = len(images)
    table = Table(title=f"{n} images, {config.global_model} + {config.local_method} (defaults)")
    for col in ("", "seconds", "images/s", "vs bare forward"):
        table.add_column(col, justify="right")
    table.add_row(
        "bare forward passes (decoded images)", f"{forward:.1f}", f"{n / forward:.2f}", "1.00"
    )
    table.add_row(
        "build, first image to end", f"{loop:.1f}", f"{n / loop:.2f}", f"{forward / loop:.2f}"
    )
    table.add_row("build, end to end", f"{total:.1f}", f"{n / total:.2f}", f"{forward / total:.2f}")
    console.print(table)
    console.print(
        f"model loading {loading:.1f} s (inside 'end to end'); torch threads "
        f"{torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
