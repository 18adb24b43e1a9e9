"""Retrieval and recognition metrics, in numpy.

- Average precision as the Revisited Oxford/Paris evaluation computes it (Radenovic et al., CVPR
  2018, `revisitop`): each retrieved positive adds a trapezoid of width 1/n_positives between the
  precision just before it and the precision at it, and junk images are taken out of the ranking
  first. mP@k follows revisitop too: the cut-off is min(k, rank of the last positive).
- The Easy / Medium / Hard protocols of the revisited datasets.
- Global Average Precision (GAP, micro-AP) of the Google Landmark Recognition challenges.
- recall@k: the share of queries with at least one positive among the first k results.

Rankings are sequences of database ids (any hashable: paths, integers) best first. A ranking may
stop before the end of the database; positives it misses then add nothing to AP (a lower bound of
the full-ranking AP, exact when the ranking covers the whole database).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PROTOCOLS = ("easy", "medium", "hard")
"""The three setups of the revisited datasets."""
DEFAULT_KS = (1, 5, 10)


@dataclass(frozen=True)
class Relevance:
    """Ground truth of one query: what counts as correct, and what is ignored (junk)."""

    positives: frozenset[Hashable]
    junk: frozenset[Hashable] = frozenset()


def positive_ranks(ranking: Iterable[Hashable], rel: Relevance) -> np.ndarray:
    """0-based ranks of the positives in `ranking` once the junk has been taken out.

    An id that is both positive and junk counts as positive, as in revisitop.
    """
    ranks = []
    position = 0
    for item in ranking:
        if item in rel.positives:
            ranks.append(position)
        elif item in rel.junk:
            continue
        position += 1
    return np.asarray(ranks, dtype=np.int64)


def average_precision(ranks: np.ndarray, n_positives: int) -> float:
    """revisitop's AP from the sorted 0-based `ranks` of the retrieved positives.

    The j-th positive (0-based) at rank r adds (p0 + p1) / 2 / n_positives, where p1 = (j+1)/(r+1)
    is the precision at it and p0 = j/r the precision just before it (1 when r = 0).
    """
    if n_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    r = np.asarray(ranks, dtype=np.float64)
    j = np.arange(len(r), dtype=np.float64)
    before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    at = (j + 1) / (r + 1)
    return float(np.sum(before + at) / (2.0 * n_positives))


def precision_at_k(ranks: np.ndarray, n_positives: int, k: int) -> float:
    """revisitop's P@k: positives within the cut-off min(k, rank of the last positive).

    When the ranking misses some positives, the last one lies beyond the ranking, so the cut-off
    is k (the full-ranking value as long as the ranking is at least k long).
    """
    if len(ranks) == 0:
        return 0.0
    one_based = np.asarray(ranks) + 1
    last = int(one_based.max()) if len(ranks) == n_positives else k
    cut = min(last, k)
    return float(np.count_nonzero(one_based <= cut) / cut)


@dataclass(frozen=True)
class QueryScore:
    """Scores of one query; None when the query has no positive (skipped, as revisitop does)."""

    ap: float | None
    precision: dict[int, float | None]
    hit: dict[int, bool | None]


def score_query(
    ranking: Sequence[Hashable], rel: Relevance, ks: Sequence[int] = DEFAULT_KS
) -> QueryScore:
    """AP, P@k and hit@k of one ranking."""
    if not rel.positives:
        return QueryScore(None, dict.fromkeys(ks), dict.fromkeys(ks))
    ranks = positive_ranks(ranking, rel)
    n = len(rel.positives)
    return QueryScore(
        average_precision(ranks, n),
        {k: precision_at_k(ranks, n, k) for k in ks},
        {k: bool(len(ranks) and ranks[0] < k) for k in ks},
    )


@dataclass(frozen=True)
class RankingMetrics:
    """Means over the queries that have at least one positive.

    map: mean average precision; mp: mean precision at k (revisitop); recall: recall@k.
    per_query_ap: one entry per query, None where the query was skipped.
    """

    map: float
    mp: dict[int, float]
    recall: dict[int, float]
    n_queries: int
    per_query_ap: list[float | None] = field(default_factory=list)


def ranking_metrics(
    rankings: Sequence[Sequence[Hashable]],
    relevances: Sequence[Relevance],
    ks: Sequence[int] = DEFAULT_KS,
) -> RankingMetrics:
    """mAP, mP@k and recall@k over queries; queries without positives are left out of the means."""
    if len(rankings) != len(relevances):
        raise ValueError(f"{len(rankings)} rankings but {len(relevances)} ground truths")
    scores = [score_query(r, g, ks) for r, g in zip(rankings, relevances, strict=True)]
    kept = [s for s in scores if s.ap is not None]
    n = len(kept)

    def mean(values: Iterable[float]) -> float:
        return float(np.mean(list(values))) if n else math.nan

    return RankingMetrics(
        map=mean(s.ap for s in kept if s.ap is not None),
        mp={k: mean(float(s.precision[k] or 0.0) for s in kept) for k in ks},
        recall={k: mean(float(bool(s.hit[k])) for s in kept) for k in ks},
        n_queries=n,
        per_query_ap=[s.ap for s in scores],
    )


@dataclass(frozen=True)
class RevisitedGT:
    """Ground truth of one revisited query: database ids by difficulty."""

    easy: frozenset[Hashable]
    hard: frozenset[Hashable]
    junk: frozenset[Hashable]


def protocol_relevance(gt: RevisitedGT, protocol: str) -> Relevance:
    """Easy: easy are positive, hard ignored; Medium: easy + hard positive; Hard: hard positive,
    easy ignored. The dataset's junk is ignored in all three."""
    if protocol == "easy":
        return Relevance(gt.easy, gt.junk | gt.hard)
    if protocol == "medium":
        return Relevance(gt.easy | gt.hard, gt.junk)
    if protocol == "hard":
        return Relevance(gt.hard, gt.junk | gt.easy)
    raise ValueError(f"unknown protocol '{protocol}' (available: {', '.join(PROTOCOLS)})")


def revisited_metrics(
    rankings: Sequence[Sequence[Hashable]],
    gts: Sequence[RevisitedGT],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, RankingMetrics]:
    """Metrics of the Easy, Medium and Hard protocols."""
    return {
        p: ranking_metrics(rankings, [protocol_relevance(g, p) for g in gts], ks) for p in PROTOCOLS
    }


@dataclass(frozen=True)
class Prediction:
    """One recognition answer: a label and a confidence (higher = surer)."""

    label: str
    confidence: float


def global_average_precision(
    predictions: Mapping[str, Prediction | None],
    solution: Mapping[str, Collection[str]],
) -> float:
    """GAP of the Google Landmark Recognition challenge (micro-AP over queries).

    predictions: query id -> its single prediction, None (or absent) when the system abstains.
    solution: query id -> its true landmark labels; empty for a query showing no landmark.

    Predictions are sorted by confidence (descending), ties by query id then label (the Kaggle
    convention). GAP = sum over ranks i of precision@i * correct(i) / M, where M counts the
    queries with a true label, whether or not they got a prediction, and whether or not that label
    exists in the database. Predictions made for non-landmark queries count as wrong. NaN when M
    is 0.
    """
    missing = [q for q, p in predictions.items() if p is not None and q not in solution]
    if missing:
        raise ValueError(f"predictions for queries without ground truth: {missing[:5]}")
    m = sum(1 for labels in solution.values() if labels)
    if m == 0:
        return math.nan
    made = sorted(
        ((q, p) for q, p in predictions.items() if p is not None),
        key=lambda item: (-item[1].confidence, item[0], item[1].label),
    )
    correct = np.array([p.label in solution[q] for q, p in made], dtype=np.float64)
    if correct.size == 0:
        return 0.0
    precision = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    return float(np.sum(precision * correct) / m)


def recognition_accuracy(
    predictions: Mapping[str, Prediction | None], solution: Mapping[str, Collection[str]]
) -> float:
    """Top-1 accuracy over the queries with a true label (abstaining counts as wrong)."""
    labelled = [q for q, labels in solution.items() if labels]
    if not labelled:
        return math.nan
    hits = 0
    for q in labelled:
        p = predictions.get(q)
        hits += int(p is not None and p.label in solution[q])
    return hits / len(labelled)


def ranking_from_scores(ids: Sequence[Hashable], scores: np.ndarray) -> list[Hashable]:
    """`ids` sorted by descending score; equal scores keep their input order (stable)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [ids[i] for i in order]
