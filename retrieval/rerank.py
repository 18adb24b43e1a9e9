"""Shortlist reranking: match local features against each candidate, verify, sort by inliers.

`rerank` loads the shortlist's features in one call and runs the plan its `matcher` names
(retrieval.matchers.registry): one matcher over the whole shortlist, or the two-stage
"mnn+lightglue", where LightGlue re-scores the best `lightglue_top` candidates of the mutual-NN
stage, unless mutual NN settled the query (`settled_inliers`). Each matcher has its own
verification rule (RANSAC settings, fewest inliers; LightGlue also its match-confidence
filter), chosen on positive and negative pairs (scripts/bench_verification.py,
docs/results.md).

Mutual NN matches chunks of candidates with one matrix product each (on the GPU when a CUDA
device is given) and verifies their pairs, chunks spread over a thread pool; LightGlue runs
batches of candidates through one forward pass each with all of torch's threads, then verifies
on the pool. The result is exactly that of `rerank_sequential`, the one-pair-at-a-time loop
(kept as the reference for tests and benchmarks) for mutual NN: the matches are the same, and
RANSAC is seeded per pair, so neither chunking nor the number of threads changes an inlier
count; for LightGlue, batching changes float rounding only (tests/test_matchers.py).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, model_validator

from features.core import StrictConf, pick_device
from features.types import LocalFeatures
from retrieval.matchers import Matcher, Matches, load_matcher, stages
from retrieval.matchers.rules import Rule, matcher_settings, rule_for
from retrieval.verification import RansacConf, Verification, default_workers, verify

LIGHTGLUE_KEYPOINTS = 1024
"""Keypoints per image in the LightGlue stage (all 1024 that DISK stores by default). On the
leave-one-out queries of landmarks-mini, 1024 instead of 512 raised the two-stage plan's wxbs
mAP by 3-4 points; a pair costs about 2.5x as much, which the settled-query gate pays for
(docs/results.md)."""
LIGHTGLUE_TOP = 6
"""Two-stage plan: candidates LightGlue may re-score. Best leave-one-out mAP of M = 4, 5, 6, 8,
10 at 1024 keypoints (M = 8 ties at more pairs; docs/results.md)."""
SETTLED_INLIERS = 30
"""Two-stage plan: a query whose best mutual-NN candidate has this many inliers is settled and
skips LightGlue, and LightGlue stops at the first candidate it verifies with this many. With
M = 6 on the leave-one-out queries, LightGlue then runs 1.4 pairs a query instead of 6 at the
same mAP: it runs where mutual NN failed (the wide-baseline queries), and stops once it has
found the match (docs/results.md)."""


class RerankConf(StrictConf):
    """How shortlisted candidates are matched and verified: per-matcher rules (the measured
    table `retrieval.matchers.rules.RULES`, with overrides) and the two-stage plan's settings."""

    rules: dict[str, Rule] = {}
    """Overrides of the table's rules by matcher name ("mnn", "lightglue"); a field left out
    keeps the table's value."""
    workers: int | None = Field(default=None, ge=1)
    """Threads matching and verifying chunks of candidates (None: one per CPU core); results do
    not depend on it."""
    lightglue_top: int = Field(default=LIGHTGLUE_TOP, ge=1)
    """Two-stage plan ("mnn+lightglue"): candidates LightGlue re-scores, the best of the
    mutual-NN stage."""
    settled_inliers: int | None = Field(default=SETTLED_INLIERS, ge=1)
    """Two-stage plan: when the first stage's best candidate has at least this many inliers,
    the query is settled and the second stage does not run (None: it always runs)."""
    settled_stops_second: bool = True
    """Two-stage plan: the second stage re-scores its candidates one at a time and stops at the
    first one it verifies with `settled_inliers` or more."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, values: Any) -> Any:
        """The flat fields of earlier versions (min_inliers, ratio, ransac for mutual NN;
        lightglue, lightglue_min_inliers, lightglue_ransac) become rule overrides."""
        if not isinstance(values, dict) or not set(values) & set(LEGACY_FIELDS):
            return values
        values = dict(values)
        rules = {k: dict(_dumped(v)) for k, v in dict(values.pop("rules", {})).items()}
        for old, (matcher, part) in LEGACY_FIELDS.items():
            if old not in values:
                continue
            value = _dumped(values.pop(old))
            entry = rules.setdefault(matcher, {})
            if part == "ratio":
                entry["settings"] = {**entry.get("settings", {}), "ratio": value}
            else:
                entry[part] = value
        values["rules"] = rules
        return values

    def rule(self, matcher: str, local_method: str = "disk") -> Rule:
        """The complete rule that verifies `matcher`'s matches of `local_method`'s features."""
        return rule_for(matcher, local_method, self.rules.get(matcher.lower()))

    def matcher_conf(self, matcher: str, local_method: str = "disk") -> StrictConf:
        """The matcher's typed settings under its rule."""
        return matcher_settings(matcher, self.rule(matcher, local_method))


LEGACY_FIELDS = {
    "min_inliers": ("mnn", "min_inliers"),
    "ratio": ("mnn", "ratio"),
    "ransac": ("mnn", "ransac"),
    "lightglue": ("lightglue", "settings"),
    "lightglue_min_inliers": ("lightglue", "min_inliers"),
    "lightglue_ransac": ("lightglue", "ransac"),
}
"""RerankConf's field names before per-matcher rules -> (matcher, rule field)."""


def _dumped(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


@dataclass(frozen=True)
class Candidate:
    id: int
    global_score: float
    inliers: int = 0
    verified: bool = False
    matcher: str = ""
    """The matcher whose inliers these are ("" = not reranked)."""


@dataclass
class Timings:
    """Seconds spent per stage of one query."""

    stages: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] += seconds


def rerank(
    query: LocalFeatures,
    candidates: list[Candidate],
    load_many: Callable[[list[int]], Sequence[LocalFeatures]],
    conf: RerankConf,
    timings: Timings | None = None,
    *,
    device: Any = None,
    matcher: str = "mnn",
    local_method: str = "disk",
) -> list[Candidate]:
    """Verified candidates first (most inliers, then best global score), then the others in
    their global order. `load_many(ids)` reads the candidates' features in one call; `device`
    runs the matching there (None: CPU when no GPU); `matcher`: a resolved plan
    (retrieval.matchers.resolve_plan) for features of `local_method`."""
    timings = timings if timings is not None else Timings()
    t0 = time.perf_counter()
    feats = dict(
        zip((c.id for c in candidates), load_many([c.id for c in candidates]), strict=True)
    )
    timings.add("load", time.perf_counter() - t0)

    def score(name: str, cands: list[Candidate]) -> list[Candidate]:
        found = count_inliers(
            query, [feats[c.id] for c in cands], conf, device, timings, name, local_method
        )
        return _scored(cands, found, conf, name, local_method)

    return run_plan(candidates, score, conf, matcher)


def run_plan(
    candidates: list[Candidate],
    score: Callable[[str, list[Candidate]], list[Candidate]],
    conf: RerankConf,
    plan: str,
) -> list[Candidate]:
    """The stages of `plan` over the candidates; `score(matcher, cands)` verifies them.

    Two stages: the second matcher re-scores the best `lightglue_top` of the first, and its
    verdict wins there; the order is then its verified candidates, the first stage's verified
    ones below the top, and every unverified candidate in global order. A query the first stage
    settled (`settled_inliers`) skips the second.
    """
    first, *later = stages(plan)
    ordered = order_candidates(score(first, candidates))
    if not later or settled(ordered, conf.settled_inliers):
        return ordered
    top, rest = ordered[: conf.lightglue_top], ordered[conf.lightglue_top :]
    if conf.settled_stops_second and conf.settled_inliers is not None:
        # one candidate at a time, in the first stage's order, until one settles the query;
        # the candidates left keep the first stage's verdict
        done: list[Candidate] = []
        while top and not settled(done[-1:], conf.settled_inliers):
            done += score(later[0], top[:1])
            top = top[1:]
        top, rest = done, top + rest
        rescored = order_candidates(top)
    else:
        rescored = order_candidates(score(later[0], top))
    unverified = [c for c in rescored + rest if not c.verified]
    unverified.sort(key=lambda c: -c.global_score)
    return [c for c in rescored if c.verified] + [c for c in rest if c.verified] + unverified


def settled(ordered: list[Candidate], least: int | None) -> bool:
    """Whether the best of `ordered` candidates verified with at least `least` inliers."""
    return (
        least is not None and bool(ordered) and ordered[0].verified and ordered[0].inliers >= least
    )


def _scored(
    cands: list[Candidate],
    inliers: list[int],
    conf: RerankConf,
    matcher: str,
    local_method: str,
) -> list[Candidate]:
    least = conf.rule(matcher, local_method).min_inliers or 1
    return [
        Candidate(c.id, c.global_score, n, n >= least, matcher)
        for c, n in zip(cands, inliers, strict=True)
    ]


def count_inliers(
    query: LocalFeatures,
    feats: Sequence[LocalFeatures],
    conf: RerankConf,
    device: Any = None,
    timings: Timings | None = None,
    matcher: str = "mnn",
    local_method: str = "disk",
) -> list[int]:
    """RANSAC inliers of the query against each candidate with `matcher`, in order."""
    if not feats:
        return []
    dev = pick_device(device)
    rule = conf.rule(matcher, local_method)
    m = load_matcher(matcher, matcher_settings(matcher, rule), local_method, dev)
    run = _chunked if m.parallel_batches else _batched
    timings = timings if timings is not None else Timings()
    ransac = rule.ransac or RansacConf()
    return run(query, feats, m, ransac, conf.workers or default_workers(), timings)


def _chunked(
    query: LocalFeatures,
    feats: Sequence[LocalFeatures],
    matcher: Matcher,
    ransac: RansacConf,
    workers: int,
    timings: Timings,
) -> list[int]:
    """Cheap matchers (mutual NN): chunks of candidates run on a thread pool (torch, numpy and
    OpenCV release the GIL), each task matching its chunk with one matrix product, then
    verifying its pairs."""
    on_gpu = matcher.device.type == "cuda"
    # A GPU takes one product at a time.
    gate: AbstractContextManager[Any] = threading.Semaphore(1) if on_gpu else nullcontext()

    def run(rows: range) -> tuple[list[int], float, float]:
        with gate:
            t0 = time.perf_counter()
            found = matcher.match_many(query, [feats[i] for i in rows])
            t1 = time.perf_counter()
        inliers = [
            _verify(query, feats[i], f, ransac).inliers for i, f in zip(rows, found, strict=True)
        ]
        return inliers, t1 - t0, time.perf_counter() - t1

    start = time.perf_counter()
    with worker_pool(workers, on_gpu) as pool:
        done = list(pool.map(run, matcher.batches([len(f) for f in feats])))
    # stages overlap: split the wall time as the threads spent it
    wall = time.perf_counter() - start
    matching, verifying = sum(d[1] for d in done), sum(d[2] for d in done)
    share = matching / max(matching + verifying, 1e-12)
    timings.add("matching", wall * share)
    timings.add("ransac", wall * (1 - share))
    return [n for d in done for n in d[0]]


def _batched(
    query: LocalFeatures,
    feats: Sequence[LocalFeatures],
    matcher: Matcher,
    ransac: RansacConf,
    workers: int,
    timings: Timings,
) -> list[int]:
    """Network matchers (LightGlue): their batches run one after the other with all of torch's
    threads, then the pool verifies every pair."""
    t0 = time.perf_counter()
    found = matcher.match_many(query, feats)
    t1 = time.perf_counter()
    with worker_pool(workers, matcher.device.type == "cuda") as pool:
        pairs = zip(feats, found, strict=True)
        inliers = list(pool.map(lambda p: _verify(query, p[0], p[1], ransac).inliers, pairs))
    timings.add(matcher.name, t1 - t0)
    timings.add("ransac", time.perf_counter() - t1)
    return inliers


def _verify(
    query: LocalFeatures, cand: LocalFeatures, matches: Matches, ransac: RansacConf
) -> Verification:
    pairs = matches.pairs
    return verify(query.keypoints[pairs[:, 0]], cand.keypoints[pairs[:, 1]], ransac)


def worker_pool(workers: int, on_gpu: bool = False) -> ThreadPoolExecutor:
    """The rerank's thread pool. On a CPU each worker runs its chunks' products, reductions and
    RANSAC on one core: measured 1.3-1.6x faster per query than products sharing torch's threads
    while the numpy reductions run one at a time. torch's thread count is per OS thread (OpenMP),
    so it is set in each worker and the caller's own setting is left alone."""
    import torch  # here, not at the top: RerankConf (the CLI's defaults) loads without torch

    threads = 1 if not on_gpu and workers > 1 else torch.get_num_threads()
    return ThreadPoolExecutor(
        workers, "rerank", initializer=torch.set_num_threads, initargs=(threads,)
    )


@dataclass(frozen=True)
class PairMatch:
    """How one query-candidate pair matched: `matches` (K, 2) index pairs (query row, candidate
    row) and their `confidence` (K,), the verification, whose `mask` (K,) marks the inliers,
    and the `matcher` that matched them."""

    matches: np.ndarray
    verification: Verification
    confidence: np.ndarray | None = None
    matcher: str = "mnn"
    min_inliers: int = 1
    """The matcher's rule: fewest inliers of a verified pair."""

    @property
    def inliers(self) -> int:
        return self.verification.inliers

    @property
    def verified(self) -> bool:
        return self.verification.inliers >= self.min_inliers


def verify_pair(
    query: LocalFeatures,
    candidate: LocalFeatures,
    conf: RerankConf,
    matcher: str = "mnn",
    local_method: str = "disk",
    device: Any = None,
) -> PairMatch:
    """Match and verify one pair exactly as the rerank does with `matcher` (a match picture
    draws this: pass `Match.matcher`, the matcher that scored the result)."""
    rule = conf.rule(matcher, local_method)
    m = load_matcher(matcher, matcher_settings(matcher, rule), local_method, device)
    found = m.match(query, candidate)
    result = _verify(query, candidate, found, rule.ransac or RansacConf())
    return PairMatch(found.pairs, result, found.confidence, matcher, rule.min_inliers or 1)


def rerank_sequential(
    query: LocalFeatures,
    candidates: list[Candidate],
    load: Callable[[int], LocalFeatures],
    conf: RerankConf,
    timings: Timings | None = None,
    *,
    matcher: str = "mnn",
    local_method: str = "disk",
    device: Any = None,
) -> list[Candidate]:
    """The reference: load, match and verify one candidate after the other."""
    timings = timings if timings is not None else Timings()

    def score(name: str, cands: list[Candidate]) -> list[Candidate]:
        found = []
        for cand in cands:
            t0 = time.perf_counter()
            feats = load(cand.id)
            t1 = time.perf_counter()
            pair = verify_pair(query, feats, conf, name, local_method, device)
            timings.add("load", t1 - t0)
            timings.add("match+verify", time.perf_counter() - t1)
            found.append(pair.inliers)
        return _scored(cands, found, conf, name, local_method)

    return run_plan(candidates, score, conf, matcher)


def order_candidates(cands: list[Candidate]) -> list[Candidate]:
    verified = sorted((c for c in cands if c.verified), key=lambda c: (-c.inliers, -c.global_score))
    rest = [c for c in cands if not c.verified]
    rest.sort(key=lambda c: -c.global_score)
    return verified + rest
