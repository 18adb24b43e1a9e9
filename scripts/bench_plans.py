"""Quality of rerank plans and global-stage refinements on landmarks-mini, side by side.

Every variant is a mode of one `run_eval` over the same queries (each query is described once for
all of them; with --stored-queries, the default, a leave-one-out query uses its features stored
in the index, so nothing is extracted). A variant is written as a plan followed by SearchConf /
RerankConf settings, variants separated by ";":

    python scripts/bench_plans.py --index /tmp/idx-mini \\
        --variants "mnn; mnn+lightglue top=5; mnn+lightglue top=10; lightglue; mnn qe=2 dba=1"

With --cache FILE, the matches of LightGlue (before its confidence filter) and of mutual NN are
kept per (query, candidate) pair, in FILE across runs: variants that differ only in the
two-stage top M, the filter or the inlier threshold, and later runs, match each pair once (the
filter is applied to the kept matches exactly as LightGlue applies it: confidence > threshold;
RANSAC runs every time). Times per query are then not comparable between variants: speed is
scripts/bench_rerank.py's.

"global" is always the first mode. --kinds / --every take a subset of the queries (every query
of --kinds, every --every-th of the others), the database staying whole. Prints the evaluation
table (overall and per kind: landmark, place, wxbs).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from features.types import LocalFeatures
from retrieval.evaluation.datasets import Dataset, Query, landmarks_mini
from retrieval.evaluation.runner import format_table, run_eval, write_json
from retrieval.matchers import Matcher, Matches, load_matcher
from retrieval.matchers.lightglue import LightGlue
from retrieval.matchers.mnn import MNN
from retrieval.matchers.rules import Rule
from retrieval.rerank import RerankConf
from retrieval.search import SearchConf
from retrieval.verification import RansacConf

console = Console(width=240)
SEARCH_KEYS = {"qe": int, "dba": int, "qe_alpha": float, "dba_alpha": float, "shortlist": int}
RERANK_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "top": ("lightglue_top", int),
    "settled": ("settled_inliers", int),
    "stop": ("settled_stops_second", lambda v: bool(int(v))),
}


def variant(spec: str) -> tuple[str, SearchConf]:
    """'mnn+lightglue top=10 qe=2' -> (its name, its settings); plan 'global': no rerank."""
    plan, *settings = spec.split()
    search: dict[str, object] = {"rerank": plan != "global"}
    if plan != "global":
        search["matcher"] = plan
    rerank: dict[str, object] = {}
    default = RerankConf().rule("lightglue", "disk")
    lightglue = dict(default.settings or {})
    ransac = (default.ransac or RansacConf()).model_dump()
    least = default.min_inliers
    for item in settings:
        key, value = item.split("=")
        if key in SEARCH_KEYS:
            search[key] = SEARCH_KEYS[key](value)
        elif key in RERANK_KEYS:
            name, kind = RERANK_KEYS[key]
            rerank[name] = kind(value)
        elif key == "lg_min":  # fewest inliers of LightGlue's matches
            least = int(value)
        elif key in ("lg_conf", "lg_kpts"):  # LightGlue's filter, keypoints
            field = "filter_threshold" if key == "lg_conf" else "max_keypoints"
            lightglue[field] = float(value) if key == "lg_conf" else int(value)
        elif key in ("lg_model", "lg_px"):  # RANSAC on LightGlue's matches
            ransac["model" if key == "lg_model" else "threshold"] = (
                value if key == "lg_model" else float(value)
            )
        else:
            raise SystemExit(f"unknown setting '{key}' in '{spec}'")
    rerank["rules"] = {
        "lightglue": Rule(settings=lightglue, ransac=RansacConf(**ransac), min_inliers=least)
    }
    return spec, SearchConf(**search, rerank_conf=RerankConf(**rerank))  # type: ignore[arg-type]


def subset(dataset: Dataset, kinds: set[str], every: int) -> Dataset:
    """Every query of `kinds` and every `every`-th of the others (manifest order), taken in
    turn from each kind: a run cut short has cached LightGlue pairs of every kind."""
    others = [q for q in dataset.queries if q.kind not in kinds]
    keep = {q.name for q in dataset.queries if q.kind in kinds} | {
        q.name for q in others[:: max(every, 1)]
    }
    by_kind: dict[str | None, list[Query]] = {}
    for q in dataset.queries:
        if q.name in keep:
            by_kind.setdefault(q.kind, []).append(q)
    turns = itertools.zip_longest(*by_kind.values())
    queries = tuple(q for turn in turns for q in turn if q is not None)
    notes = dataset.notes
    if kinds or every > 1:
        note = f"queries: every {', '.join(sorted(kinds)) or '-'} query, every {every}th other"
        notes = (*notes, note)
    return replace(dataset, queries=queries, notes=notes)


PAIRS: dict[str, int] = {}
"""Pairs each matcher was asked to match in this run (cached or not): the cost of a variant."""


def cache_matches(path: Path, more: Sequence[Path] = ()) -> dict[bytes, Matches]:
    """Make every LightGlue and mutual-NN matcher of this process look its pairs up in (and
    add them to) the returned dict, loaded from `path` when it exists and from the `more`
    files (e.g. those of runs on other parts of the queries). LightGlue's matches are kept
    unfiltered and filtered per call."""
    memo: dict[bytes, Matches] = {}
    for file in (*more, path):
        if file.is_file():
            memo.update(pickle.loads(file.read_bytes()))

    def key(conf_key: str, query: LocalFeatures, cand: LocalFeatures) -> bytes:
        h = hashlib.blake2b(conf_key.encode(), digest_size=20)
        for f in (query, cand):
            h.update(f.keypoints.tobytes())
            h.update(f.descriptors.tobytes())
        return h.digest()

    def cached(cls: type[Matcher], unfiltered: Callable[[Matcher], Any], threshold: Any) -> None:
        original = cls.match_many

        def match_many(
            self: Matcher, query: LocalFeatures, candidates: Sequence[LocalFeatures]
        ) -> list[Matches]:
            PAIRS[self.name] = PAIRS.get(self.name, 0) + len(candidates)
            conf = unfiltered(self)
            keys = [key(repr(conf), query, c) for c in candidates]
            todo = [i for i, k in enumerate(keys) if k not in memo]
            if todo:
                base = load_matcher(self.name, conf, self.local_method, self.device)
                found = original(base, query, [candidates[i] for i in todo])
                memo.update((keys[i], m) for i, m in zip(todo, found, strict=True))
            least = threshold(self)
            return [memo[k] if least is None else memo[k].above(least) for k in keys]

        cls.match_many = match_many  # type: ignore[method-assign]

    cached(
        LightGlue,
        lambda m: m.conf.model_copy(update={"filter_threshold": 0.0, "batch_size": None}),
        lambda m: m.conf.filter_threshold,
    )
    cached(MNN, lambda m: m.conf, lambda m: None)
    return memo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/landmarks-mini"))
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--queries", default="all", help="first | all (leave-one-out)")
    p.add_argument("--variants", default="mnn; mnn+lightglue; lightglue")
    p.add_argument("--kinds", default="", help="subset: every query of these kinds...")
    p.add_argument("--every", type=int, default=1, help="...and every n-th of the others")
    p.add_argument("--extract-queries", action="store_true", help="never reuse stored features")
    p.add_argument("--first", type=int, default=None, help="only the first n queries (in turn)")
    p.add_argument("--part", default=None, help="i/n: every n-th query from the i-th (in turn)")
    p.add_argument("--more-cache", type=Path, nargs="*", default=(), help="cache files to read")
    p.add_argument("--cache", type=Path, default=None, help="matches per pair (see above)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    memo = cache_matches(args.cache, args.more_cache) if args.cache else None
    dataset = landmarks_mini(args.data, queries=args.queries)
    dataset = subset(dataset, {k for k in args.kinds.split(",") if k}, args.every)
    if args.first:
        note = f"the first {args.first} queries, taken in turn from each kind"
        dataset = replace(
            dataset, queries=dataset.queries[: args.first], notes=(*dataset.notes, note)
        )
    if args.part:
        i, n = (int(x) for x in args.part.split("/"))
        dataset = replace(dataset, queries=dataset.queries[i::n])
    variants = dict(variant(s.strip()) for s in args.variants.split(";") if s.strip())
    console.print(f"{len(dataset.queries)} queries, variants: {', '.join(variants)}")

    def save() -> None:
        if memo is not None:
            args.cache.write_bytes(pickle.dumps(memo))

    def progress(done: int, total: int, current: str) -> None:
        if current.startswith("query") and done % 5 == 0:
            save()
            console.print(f"{done}/{total} queries, {time.strftime('%H:%M:%S')}", highlight=False)

    try:
        result = run_eval(
            dataset,
            args.index,
            variants=variants,
            stored_queries=not args.extract_queries,
            progress=progress,
        )
    finally:
        save()
    if memo is not None:
        console.print(f"LightGlue cache: {len(memo)} pairs in {args.cache}")
        asked = ", ".join(f"{m} {n / max(len(dataset.queries), 1):.2f}" for m, n in PAIRS.items())
        console.print(f"pairs matched per query, all variants together: {asked}")
    console.print(format_table(result))
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if args.json:
        console.print(f"wrote {write_json(result, args.json)}")


if __name__ == "__main__":
    main()
