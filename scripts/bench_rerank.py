"""Rerank speed and compact local stores, on the landmarks-mini held-out queries.

Part 1 times retr's rerank (shortlist loaded in one call, batched matching, RANSAC on a thread
pool) against the naive loop it replaced (load, match, verify one candidate after the other) on
the same shortlists, checks both give identical inliers, and prints the ratio, the cost per
candidate pair and the total per query. It also times the similarity products alone (the same
candidates per block, on the same worker pool, nothing else): the floor exact matching cannot go
below on this machine.

Part 2 (--dtypes) re-encodes copies of the index's local features (float16, int8, pq...;
IndexWriter.recode), and prints bytes per image and the evaluation (mAP, global vs reranked) of
each.

    python scripts/bench_rerank.py --index /tmp/bench-idx --dtypes float16,int8,pq
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from index.layout import IndexPaths
from index.manifest import Manifest
from index.writer import IndexWriter
from retrieval.api import Retriever, SearchConf
from retrieval.evaluation.datasets import Dataset, landmarks_mini
from retrieval.evaluation.runner import prepare_index, run_eval
from retrieval.matching import CHUNK_COLUMNS, chunks
from retrieval.rerank import (
    Candidate,
    RerankConf,
    Timings,
    rerank,
    rerank_sequential,
    worker_pool,
)
from retrieval.verification import default_workers

console = Console(width=150)
STAGES = ("load", "matching", "ransac")


def shortlist(retriever: Retriever, image: Path, size: int) -> list[Candidate]:
    """The global search's candidates, as the search path takes them."""
    result = retriever.search(image, k=size, rerank=False)
    return [Candidate(m.id, m.global_score) for m in result.matches]


def timed(fn: Callable[[Timings], object], repeats: int) -> tuple[float, float, object, Timings]:
    """Median wall and CPU seconds (all threads) of `repeats` calls of fn(timings), its last
    result and stage times. CPU time is what a busy machine cannot hide."""
    wall, cpu, result, timings = [], [], None, Timings()
    for _ in range(repeats):
        timings = Timings()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn(timings)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), result, timings


def products_only(query: np.ndarray, cands: list[np.ndarray], workers: int) -> tuple[float, float]:
    """(seconds, GFLOP) of the rerank's similarity products alone: the same candidates per block
    (without padding) on the rerank's own worker pool."""
    q = torch.from_numpy(query)
    blocks = [
        torch.from_numpy(np.concatenate([cands[i] for i in part])).T.contiguous()
        for part in chunks([len(c) for c in cands], CHUNK_COLUMNS)
    ]
    flop = 2 * q.shape[0] * q.shape[1] * sum(b.shape[1] for b in blocks) / 1e9
    with worker_pool(workers) as pool:
        start = time.perf_counter()
        list(pool.map(lambda b: q @ b, blocks))
        return time.perf_counter() - start, flop


@dataclass(frozen=True)
class Row:
    pairs: int
    keypoints: int
    naive: tuple[float, float]
    """wall, CPU seconds"""
    retr: tuple[float, float]
    identical: bool
    stages: Timings
    products: tuple[float, float]
    """seconds (best of the repeats), GFLOP"""


def one_query(retriever: Retriever, image: Path, args: argparse.Namespace) -> Row:
    conf = RerankConf(workers=args.workers)
    cands = shortlist(retriever, image, args.shortlist)
    query = retriever.extractors.local.extract(image)
    many = retriever.local_features
    *naive, want, _ = timed(
        lambda t: rerank_sequential(query, cands, lambda i: many([i])[0], conf, t), args.repeats
    )
    *fast, got, stages = timed(
        lambda t: rerank(query, cands, many, conf, t, device=args.device), args.repeats
    )
    feats = many([c.id for c in cands])
    workers = args.workers or default_workers()
    floor = min(
        (products_only(query.descriptors, [f.descriptors for f in feats], workers)
         for _ in range(args.repeats)),
        key=lambda r: r[0],
    )  # fmt: skip
    return Row(
        len(cands), len(query), (naive[0], naive[1]), (fast[0], fast[1]), got == want, stages,
        floor,
    )  # fmt: skip


def speed(retriever: Retriever, dataset: Dataset, args: argparse.Namespace) -> None:
    title = f"rerank of a {args.shortlist}-candidate shortlist (ms, median of {args.repeats})"
    table = Table(title=title)
    columns = (
        "query",
        "pairs",
        "kpts",
        "naive",
        "retr",
        "ratio",
        "naive CPU",
        "retr CPU",
        "ratio CPU",
        "identical",
    )
    for col in columns:
        table.add_column(col, justify="right")
    rows = [one_query(retriever, q.path, args) for q in dataset.queries]
    for q, r in zip(dataset.queries, rows, strict=True):
        table.add_row(
            Path(q.name).stem[-20:], str(r.pairs), str(r.keypoints),
            f"{1e3 * r.naive[0]:.0f}", f"{1e3 * r.retr[0]:.0f}", f"{r.naive[0] / r.retr[0]:.2f}x",
            f"{1e3 * r.naive[1]:.0f}", f"{1e3 * r.retr[1]:.0f}", f"{r.naive[1] / r.retr[1]:.2f}x",
            "yes" if r.identical else "NO",
        )  # fmt: skip
    console.print(table)
    n, pairs = len(rows), sum(r.pairs for r in rows)
    naive = [sum(r.naive[i] for r in rows) for i in (0, 1)]
    fast = [sum(r.retr[i] for r in rows) for i in (0, 1)]
    stage = {k: sum(r.stages.stages.get(k, 0.0) for r in rows) / n for k in STAGES}
    floor, gflop = (sum(r.products[i] for r in rows) for i in (0, 1))
    console.print(
        f"per query, wall: naive {1e3 * naive[0] / n:.0f} ms, retr {1e3 * fast[0] / n:.0f} ms "
        f"(load {1e3 * stage['load']:.0f}, matching {1e3 * stage['matching']:.0f}, RANSAC "
        f"{1e3 * stage['ransac']:.0f}), ratio {naive[0] / fast[0]:.2f}x; CPU: naive "
        f"{1e3 * naive[1] / n:.0f} ms, retr {1e3 * fast[1] / n:.0f} ms, ratio "
        f"{naive[1] / fast[1]:.2f}x\nper pair, wall: naive {1e3 * naive[0] / pairs:.2f} ms, retr "
        f"{1e3 * fast[0] / pairs:.2f} ms; CPU: naive {1e3 * naive[1] / pairs:.2f} ms, retr "
        f"{1e3 * fast[1] / pairs:.2f} ms\nsimilarity products alone (exact matching's floor): "
        f"{1e3 * floor / n:.0f} ms per query, {gflop / n:.1f} GFLOP at {gflop / floor:.0f} "
        f"GFLOPS; retr / products {fast[0] / floor:.2f}x\nCPU cores usable {default_workers()}, "
        "torch threads "
        f"{torch.get_num_threads()}, rerank workers {args.workers or default_workers()}, "
        f"device {args.device}, load average {os.getloadavg()[0]:.1f}"
    )


def encodings(dataset: Dataset, args: argparse.Namespace) -> None:
    table = Table(title="local descriptor encodings (same extraction, re-encoded)")
    for col in ("local_dtype", "segments MB", "KB / image", "mAP global", "mAP rerank", "Δ rerank"):
        table.add_column(col, justify="right")
    base = None
    search = SearchConf(shortlist=args.shortlist)
    for dtype in args.dtypes.split(","):
        target = args.index.with_name(f"{args.index.name}-{dtype}")
        if not target.exists():
            shutil.copytree(args.index, target, symlinks=True)
            with IndexWriter.open(IndexPaths(target)) as writer:
                writer.recode(dtype)
        result = run_eval(dataset, target, search=search)
        size = sum(s.bytes for s in Manifest.load(target).segments)
        maps = [result.modes[m].protocols["all"].map for m in ("global", "rerank")]
        base = maps[1] if base is None else base
        table.add_row(
            dtype, f"{size / 1e6:.2f}", f"{size / 1e3 / result.n_database:.1f}",
            f"{100 * maps[0]:.2f}", f"{100 * maps[1]:.2f}", f"{100 * (maps[1] - base):+.2f}",
        )  # fmt: skip
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/landmarks-mini"))
    parser.add_argument("--index", type=Path, default=Path("bench-index"))
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="RANSAC threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", default="first", help="landmarks-mini query mode: first|all")
    parser.add_argument("--dtypes", default="", help="e.g. float16,int8,pq (first = baseline)")
    parser.add_argument("--skip-speed", action="store_true", help="only the encodings part")
    args = parser.parse_args()

    dataset = landmarks_mini(args.data, queries=args.queries)
    retriever, build = prepare_index(dataset, args.index, None, None)
    if not build.reused:
        console.print(f"built {build.indexed} images in {build.seconds:.1f} s")
    if not args.skip_speed:
        speed(retriever, dataset, args)
    if args.dtypes:
        encodings(dataset, args)


if __name__ == "__main__":
    main()
