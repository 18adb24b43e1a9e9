"""Index build throughput against the bare forward passes of its models, on the same images.

The bare pass runs the global and local extractors on images already decoded in memory; the
build does everything else too (hashing, decoding ahead on a thread pool, storing features,
catalog, whitening and FAISS index). The ratio says how much of the build is model time.

    python scripts/bench_build.py --images 24 --data ../shared/data/landmarks-mini
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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
    models = Extractors(c.global_model, c.global_conf, c.local_method, c.local_conf)
    _ = models.fingerprints  # loads both models
    loaded = time.perf_counter()
    decoded = [load_image(p) for p in images]
    start_pass = time.perf_counter()
    for rgb in decoded:
        models.describe(rgb)
    return loaded - start, time.perf_counter() - start_pass


def build(images: list[Path], workdir: Path) -> tuple[float, float]:
    """(build seconds end to end, seconds from the first image to the end of the build)."""
    corpus = workdir / "corpus"
    for p in images:
        link = corpus / p.parent.name / p.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(p.resolve())
    first: list[float] = []

    def progress(done: int, total: int, current: str) -> None:
        if not first:
            first.append(time.perf_counter())

    start = time.perf_counter()
    report = build_index(corpus, workdir / "idx", progress=progress)
    end = time.perf_counter()
    assert report.indexed == len(images), report.failed
    return end - start, end - first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/landmarks-mini"))
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()

    found = [p for p, problem in scan_corpus(args.data / "images") if problem is None]
    images = [p for p in found if p.suffix == ".jpg"][: args.images]
    config = IndexConfig()
    loading, forward = bare(images, config)
    with tempfile.TemporaryDirectory() as tmp:
        total, loop = build(images, Path(tmp))
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
