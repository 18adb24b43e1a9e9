"""Per-stage query latency of retr on the landmarks-mini held-out queries.

Builds (or reuses) an index of the mini set's database (every image except one held-out query per
landmark group), runs every held-out query with reranking, and prints the mean seconds of each
stage (global extraction, FAISS search, local extraction, feature loading, matching, RANSAC,
total) and the rerank cost per candidate pair.

    python scripts/bench_query.py --data ../shared/data/landmarks-mini --index /tmp/bench-idx
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from retrieval.evaluation.datasets import landmarks_mini
from retrieval.evaluation.runner import prepare_index

STAGES = ("global", "faiss", "local", "load", "matching", "ransac")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/landmarks-mini"))
    parser.add_argument("--index", type=Path, default=Path("bench-index"))
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    dataset = landmarks_mini(args.data)
    retriever, build = prepare_index(dataset, args.index, None, None)
    if not build.reused:
        print(f"built {build.indexed} images in {build.seconds:.1f} s")
    totals: dict[str, list[float]] = defaultdict(list)
    pairs = 0
    for _ in range(args.repeats):
        for q in dataset.queries:
            start = time.perf_counter()
            result = retriever.search(q.path, k=10, shortlist=args.shortlist)
            totals["total"].append(time.perf_counter() - start)
            for stage in STAGES:
                totals[stage].append(result.timings.get(stage, 0.0))
            pairs += min(args.shortlist, len(retriever.snapshot().vectors))
    n = len(totals["total"])
    table = Table(title=f"query latency, {n} queries, shortlist {args.shortlist} (seconds)")
    for col in ("stage", "mean", "max", "share of total"):
        table.add_column(col, justify="right")
    mean_total = sum(totals["total"]) / n
    for stage in (*STAGES, "total"):
        mean = sum(totals[stage]) / n
        table.add_row(stage, f"{mean:.4f}", f"{max(totals[stage]):.4f}", f"{mean / mean_total:.0%}")
    Console().print(table)
    rerank = sum(sum(totals[s]) for s in ("load", "matching", "ransac"))
    print(f"rerank cost per candidate pair: {1000 * rerank / max(pairs, 1):.2f} ms")


if __name__ == "__main__":
    main()
