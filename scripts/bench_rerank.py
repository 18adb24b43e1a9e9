"""Rerank speed and compact local stores, on the landmarks-mini held-out queries.

Part 1 times retr's rerank (shortlist loaded in one call, batched matching, RANSAC on a thread
pool) against the naive loop it replaced (load, match, verify one candidate after the other) on
the same shortlists, checks both give identical inliers, and prints the ratio, the cost per
candidate pair and the total per query. It also times the similarity products alone (the same
candidates per block, on the same worker pool, nothing else): the floor exact matching cannot go
below on this machine.

Part 3 (--matchers) times each rerank plan (mnn, lightglue, mnn+lightglue; retrieval.matchers)
on the same shortlists, side by side in one run (plans alternate within each query), with its
cost per pair per matcher and the end-to-end query latency (extraction + search + rerank) of
--default against --baseline. --lightglue-sweep times LightGlue alone per pair over keypoint
counts, adaptive depth / pruning on and off, and batch sizes.

Part 2 (--dtypes) re-encodes copies of the index's local features (float16, int8, pq...;
IndexWriter.recode), and prints bytes per image and the evaluation (mAP, global vs reranked) of
each.

    python scripts/bench_rerank.py --index /tmp/bench-idx --dtypes float16,int8,pq
    python scripts/bench_rerank.py --index /tmp/idx --skip-speed --matchers mnn,mnn+lightglue
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable, Collection
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
from retrieval.evaluation.datasets import Dataset, Query, landmarks_mini
from retrieval.evaluation.runner import prepare_index, run_eval
from retrieval.matchers import load_matcher, stages
from retrieval.matchers.lightglue import LightGlueConf
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
EXTRACTION = ("global", "local", "global+local (shared pass)")


def shortlist(
    retriever: Retriever, image: Path, size: int, exclude: Collection[str] = ()
) -> list[Candidate]:
    """The global search's candidates, as the search path takes them (`exclude`: catalog paths
    left out, e.g. the query's own copy in an index of every image)."""
    result = retriever.search(image, k=size, rerank=False, exclude=exclude)
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


def matchers(retriever: Retriever, dataset: Dataset, args: argparse.Namespace) -> None:
    """Per plan: ms per query and per pair of each matcher; then end-to-end latency."""
    plans = args.matchers.split(",")
    # every query runs every stage here (no settled-query gate), so that costs are per pair
    conf = RerankConf(workers=args.workers, settled_inliers=None, **top_option(args))
    many = retriever.local_features
    per_query: dict[str, list[float]] = {p: [] for p in plans}
    cpu: dict[str, list[float]] = {p: [] for p in plans}
    stage_sum: dict[str, Timings] = {p: Timings() for p in plans}
    # spread over the dataset's order (landmarks-mini "all": every kind)
    step = max(1, len(dataset.queries) // args.matcher_queries)
    queries = dataset.queries[::step][: args.matcher_queries]
    if args.e2e_only:
        end_to_end(retriever, queries, args)
        return
    for n, q in enumerate(queries):
        cands = shortlist(retriever, q.path, args.shortlist, itself(q, args))
        query = retriever.extractors.local.extract(q.path)
        if n == 0:  # warm up: networks loaded, first-call allocations done
            for plan in plans:
                rerank(query, cands[:2], many, conf, device=args.device, matcher=plan)
        for r in range(args.repeats):
            for plan in plans[r % len(plans) :] + plans[: r % len(plans)]:  # alternate the order
                t = Timings()
                start, start_cpu = time.perf_counter(), time.process_time()
                rerank(query, cands, many, conf, t, device=args.device, matcher=plan)
                if r == 0:
                    per_query[plan].append(time.perf_counter() - start)
                    cpu[plan].append(time.process_time() - start_cpu)
                    for k, v in t.stages.items():
                        stage_sum[plan].add(k, v)
        console.print(f"  query {n + 1}/{len(queries)}", end="\r")
    table = Table(title=f"rerank plans, shortlist {args.shortlist}, {len(queries)} queries (ms)")
    cols = ("plan", "per query", "CPU per query", "stages per query", "pairs / query")
    for col in (*cols, "ms per pair"):
        table.add_column(col, justify="left" if col in ("plan", "stages per query") else "right")
    nq = len(queries)
    for plan in plans:
        st = {k: 1e3 * v / nq for k, v in stage_sum[plan].stages.items()}
        pairs = {
            m: args.shortlist if i == 0 else conf.lightglue_top for i, m in enumerate(stages(plan))
        }
        cost = {m: st.get("matching" if m == "mnn" else m, 0.0) for m in pairs}
        cost["mnn"] = cost.get("mnn", 0.0) + (st.get("ransac", 0.0) if "mnn" in pairs else 0.0)
        table.add_row(
            plan,
            f"{1e3 * statistics.median(per_query[plan]):.0f}",
            f"{1e3 * statistics.median(cpu[plan]):.0f}",
            ", ".join(f"{k} {v:.0f}" for k, v in sorted(st.items())),
            " + ".join(f"{m} {n}" for m, n in pairs.items()),
            ", ".join(f"{m} {cost[m] / pairs[m]:.1f}" for m in pairs),
        )
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")
    end_to_end(retriever, queries, args)


def itself(query: Query, args: argparse.Namespace) -> set[str]:
    """The query's own catalog path, in case the index holds it (an index of every image)."""
    return {query.path.relative_to(args.data).as_posix()} | set(query.junk)


def top_option(args: argparse.Namespace) -> dict[str, int]:
    """--lightglue-top as a RerankConf setting, or nothing (the default M)."""
    return {} if args.lightglue_top is None else {"lightglue_top": args.lightglue_top}


def end_to_end(retriever: Retriever, queries: tuple, args: argparse.Namespace) -> None:
    """Full searches (extraction included) with the default settings and --default's plan
    against the baseline (--baseline's plan without αQE / DBA: the defaults before issue 12),
    alternating: wall and CPU time (all threads) per query, mean and per query kind. On a
    shared machine the CPU ratio is the steadier."""
    runs = {
        "default": {"matcher": args.default, "rerank_conf": RerankConf(**top_option(args))},
        "baseline": {"matcher": args.baseline, "qe": 0, "dba": 0},
    }
    wall: dict[str, list[float]] = {r: [] for r in runs}
    cpu: dict[str, list[float]] = {r: [] for r in runs}
    extraction: list[float] = []
    for n, q in enumerate(queries):
        for run in runs if n % 2 == 0 else list(runs)[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            result = retriever.search(
                q.path, shortlist=args.shortlist, exclude=itself(q, args), **runs[run]
            )
            wall[run].append(time.perf_counter() - start)
            cpu[run].append(time.process_time() - start_cpu)
            if run == "baseline":
                extraction.append(sum(v for k, v in result.timings.items() if k in EXTRACTION))
    table = Table(title=f"end to end per query (ms): {args.default} vs {args.baseline}")
    for col in ("queries", "n", "default wall / CPU", "baseline wall / CPU", "ratio wall / CPU"):
        table.add_column(col, justify="right")
    kinds = sorted({q.kind for q in queries if q.kind})
    for kind in ["all", *kinds] if len(kinds) > 1 else ["all"]:
        rows = [i for i, q in enumerate(queries) if kind in ("all", q.kind)]
        wa, wb, ca, cb = (
            statistics.mean(series[i] for i in rows)
            for series in (wall["default"], wall["baseline"], cpu["default"], cpu["baseline"])
        )
        table.add_row(
            kind, str(len(rows)), f"{1e3 * wa:.0f} / {1e3 * ca:.0f}",
            f"{1e3 * wb:.0f} / {1e3 * cb:.0f}", f"{wa / wb:.2f}x / {ca / cb:.2f}x",
        )  # fmt: skip
    console.print(table)
    worst = max(range(len(queries)), key=lambda i: cpu["default"][i] / cpu["baseline"][i])
    console.print(
        f"extraction {1e3 * statistics.mean(extraction):.0f} ms wall a query; the costliest "
        f"query: {cpu['default'][worst] / cpu['baseline'][worst]:.2f}x CPU; load average "
        f"{os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}"
    )


def lightglue_sweep(retriever: Retriever, dataset: Dataset, args: argparse.Namespace) -> None:
    """LightGlue alone, ms per pair on the top --sweep-pairs candidates of each query."""
    table = Table(title=f"LightGlue per pair on this CPU (top {args.sweep_pairs} candidates)")
    for col in ("keypoints", "adaptive", "batch", "ms / pair", "CPU ms / pair", "matches / pair"):
        table.add_column(col, justify="right")
    work = []
    for q in dataset.queries[: args.matcher_queries]:
        cands = shortlist(retriever, q.path, args.sweep_pairs, itself(q, args))
        work.append(
            (
                retriever.extractors.local.extract(q.path),
                retriever.local_features([c.id for c in cands]),
            )
        )
    for kpts in (int(k) for k in args.sweep_keypoints.split(",")):
        for adaptive in (True, False):
            for batch in (int(b) for b in args.sweep_batches.split(",")):
                default = LightGlueConf()
                conf = LightGlueConf(
                    max_keypoints=kpts,
                    batch_size=batch,
                    depth_confidence=default.depth_confidence if adaptive else -1,
                    width_confidence=default.width_confidence if adaptive else -1,
                )
                matcher = load_matcher("lightglue", conf, device=args.device)
                matcher.match_many(work[0][0], work[0][1][:1])  # warm up
                start, start_cpu, found = time.perf_counter(), time.process_time(), 0
                for query, feats in work:
                    found += sum(len(m) for m in matcher.match_many(query, feats))
                n = sum(len(f) for _, f in work)
                ms = 1e3 * (time.perf_counter() - start) / n
                ms_cpu = 1e3 * (time.process_time() - start_cpu) / n
                table.add_row(
                    str(kpts),
                    "yes" if adaptive else "no",
                    str(batch),
                    f"{ms:.0f}",
                    f"{ms_cpu:.0f}",
                    f"{found / n:.0f}",
                )
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")


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
    parser.add_argument("--matchers", default="", help="e.g. mnn,lightglue,mnn+lightglue")
    parser.add_argument("--matcher-queries", type=int, default=8, help="queries timed")
    parser.add_argument("--default", default="auto", help="end to end: the plan timed...")
    parser.add_argument("--baseline", default="mnn", help="...against this one")
    parser.add_argument("--lightglue-top", type=int, default=None, help="(default: RerankConf's)")
    parser.add_argument("--e2e-only", action="store_true", help="with --matchers: no plan table")
    parser.add_argument("--lightglue-sweep", action="store_true")
    parser.add_argument("--sweep-pairs", type=int, default=16)
    parser.add_argument("--sweep-keypoints", default="256,512,1024")
    parser.add_argument("--sweep-batches", default="1,8")
    args = parser.parse_args()

    dataset = landmarks_mini(args.data, queries=args.queries)
    retriever, build = prepare_index(dataset, args.index, None, None)
    if not build.reused:
        console.print(f"built {build.indexed} images in {build.seconds:.1f} s")
    if not args.skip_speed:
        speed(retriever, dataset, args)
    if args.matchers:
        matchers(retriever, dataset, args)
    if args.lightglue_sweep:
        lightglue_sweep(retriever, dataset, args)
    if args.dtypes:
        encodings(dataset, args)


if __name__ == "__main__":
    main()
