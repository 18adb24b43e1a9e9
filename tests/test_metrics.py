"""Evaluation metrics on hand-computed cases, and against a loop-by-loop reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from retrieval.evaluation.metrics import (
    Prediction,
    Relevance,
    RevisitedGT,
    average_precision,
    global_average_precision,
    positive_ranks,
    precision_at_k,
    protocol_relevance,
    ranking_from_scores,
    ranking_metrics,
    recognition_accuracy,
    revisited_metrics,
    score_query,
)
from retrieval.evaluation.planar import best_case_error


def rel(positives: str, junk: str = "") -> Relevance:
    return Relevance(frozenset(positives), frozenset(junk))


def ap(ranking: str, positives: str, junk: str = "") -> float | None:
    return score_query(list(ranking), rel(positives, junk)).ap


# --- average precision ---------------------------------------------------------------------------


def test_perfect_ranking_has_ap_one() -> None:
    assert ap("abxy", "ab") == pytest.approx(1.0)


def test_one_relevant_at_rank_three_uses_the_trapezoid() -> None:
    # revisitop: (precision before = 0/2 + precision at = 1/3) / 2 = 1/6, not the usual 1/3.
    assert ap("xya", "a") == pytest.approx(1 / 6)


def test_two_positives_hand_computed() -> None:
    # ranks 0 and 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2 = 1/2 + 7/24
    assert ap("axb", "ab") == pytest.approx(19 / 24)


def test_junk_is_removed_before_scoring() -> None:
    assert ap("ja", "a", junk="j") == pytest.approx(1.0)
    assert ap("ja", "a") == pytest.approx(0.25)
    assert ap("ajxb", "ab", junk="j") == pytest.approx(19 / 24)


def test_positive_that_is_also_junk_counts_as_positive() -> None:
    assert positive_ranks(list("xab"), rel("ab", junk="a")).tolist() == [1, 2]


def test_all_wrong_and_missing_positives_score_zero() -> None:
    score = score_query(list("xyz"), rel("a"))
    assert score.ap == 0.0
    assert score.precision == {1: 0.0, 5: 0.0, 10: 0.0}
    assert score.hit == {1: False, 5: False, 10: False}


def test_positives_missing_from_a_truncated_ranking_add_nothing() -> None:
    # b is never retrieved: only a's trapezoid, over 2 positives.
    assert ap("ax", "ab") == pytest.approx(0.5)


def test_average_precision_refuses_zero_positives() -> None:
    with pytest.raises(ValueError):
        average_precision(np.array([0]), 0)


# --- precision@k and recall@k --------------------------------------------------------------------


def test_precision_at_k_cuts_at_the_last_positive_like_revisitop() -> None:
    ranks = positive_ranks(list("axyb") + list("zzzzzz"), rel("ab"))
    assert precision_at_k(ranks, 2, 1) == 1.0
    assert precision_at_k(ranks, 2, 5) == pytest.approx(2 / 4)  # cut-off min(5, 4)
    assert precision_at_k(ranks, 2, 10) == pytest.approx(2 / 4)
    # A single positive at rank 1 gives P@5 = 1 (cut-off 1), not 1/5.
    assert precision_at_k(np.array([0]), 1, 5) == 1.0


def test_precision_at_k_when_some_positives_were_not_retrieved() -> None:
    ranks = positive_ranks(list("axy"), rel("ab"))
    assert precision_at_k(ranks, 2, 5) == pytest.approx(1 / 5)


def test_recall_at_k_is_the_share_of_queries_with_a_hit() -> None:
    m = ranking_metrics([list("xya"), list("bxy")], [rel("a"), rel("b")], ks=(1, 3))
    assert m.recall == {1: 0.5, 3: 1.0}
    assert m.n_queries == 2


# --- aggregation and protocols -------------------------------------------------------------------


def test_queries_without_positives_are_skipped() -> None:
    m = ranking_metrics([list("ab"), list("ab"), list("ab")], [rel("a"), rel(""), rel("b")])
    assert m.per_query_ap[1] is None
    assert m.n_queries == 2
    assert m.map == pytest.approx((1.0 + 0.25) / 2)


def test_no_query_with_positives_gives_nan() -> None:
    m = ranking_metrics([list("ab")], [rel("")])
    assert m.n_queries == 0 and math.isnan(m.map)


def test_ranking_and_ground_truth_counts_must_match() -> None:
    with pytest.raises(ValueError):
        ranking_metrics([list("ab")], [rel("a"), rel("b")])


def test_easy_medium_hard_protocols() -> None:
    gt = RevisitedGT(frozenset("e"), frozenset("h"), frozenset("j"))
    assert protocol_relevance(gt, "easy") == Relevance(frozenset("e"), frozenset("jh"))
    assert protocol_relevance(gt, "medium") == Relevance(frozenset("eh"), frozenset("j"))
    assert protocol_relevance(gt, "hard") == Relevance(frozenset("h"), frozenset("je"))
    out = revisited_metrics([list("xejh")], [gt])
    assert out["easy"].map == pytest.approx(0.25)  # cleaned: x e
    assert out["medium"].map == pytest.approx(5 / 12)  # cleaned: x e h
    assert out["hard"].map == pytest.approx(0.25)  # cleaned: x h
    with pytest.raises(ValueError, match="available"):
        protocol_relevance(gt, "extreme")


def test_hard_protocol_skips_queries_without_hard_positives() -> None:
    gt = RevisitedGT(frozenset("e"), frozenset(), frozenset())
    out = revisited_metrics([list("ex")], [gt])
    assert out["hard"].n_queries == 0
    assert out["easy"].map == 1.0


def _reference_ap(ranking: list[int], positives: set[int], junk: set[int]) -> float:
    """Loop form of revisitop: shift each positive's rank by the junk seen before it."""
    pos = [i for i, x in enumerate(ranking) if x in positives]
    jnk = [i for i, x in enumerate(ranking) if x in junk and x not in positives]
    shifted = [p - sum(1 for j in jnk if j < p) for p in pos]
    total = 0.0
    for j, r in enumerate(shifted):
        p0 = 1.0 if r == 0 else j / r
        total += (p0 + (j + 1) / (r + 1)) / 2 / len(positives)
    return total


def test_matches_the_loop_reference_on_random_cases() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        ranking = rng.sample(range(n), n)
        positives = set(rng.sample(range(n), rng.randint(1, n)))
        junk = set(rng.sample(range(n), rng.randint(0, n // 2)))
        got = score_query(ranking, Relevance(frozenset(positives), frozenset(junk))).ap
        assert got == pytest.approx(_reference_ap(ranking, positives, junk), abs=1e-12)


def test_ties_in_scores_keep_the_input_order() -> None:
    assert ranking_from_scores(["a", "b", "c", "d"], np.array([0.5, 0.9, 0.5, 0.5])) == [
        "b",
        "a",
        "c",
        "d",
    ]


# --- GAP -----------------------------------------------------------------------------------------


def test_gap_counts_non_landmark_predictions_as_wrong() -> None:
    solution = {"q1": {"A"}, "q2": {"B"}, "q3": set(), "q4": {"C"}}
    preds = {
        "q1": Prediction("A", 0.9),  # right: precision 1/1
        "q3": Prediction("A", 0.8),  # a landmark claimed on a non-landmark image: wrong
        "q2": Prediction("B", 0.7),  # right: precision 2/3
        "q4": None,  # abstained; still counts in M
    }
    # (1 + 2/3) / M, M = 3 queries with a landmark (q1, q2, q4)
    assert global_average_precision(preds, solution) == pytest.approx(5 / 9)


def test_gap_breaks_confidence_ties_by_query_id() -> None:
    solution = {"q1": {"B"}, "q2": {"C"}}
    preds = {"q2": Prediction("C", 0.5), "q1": Prediction("A", 0.5)}
    # q1 (wrong) ranks first, so q2 is right at precision 1/2.
    assert global_average_precision(preds, solution) == pytest.approx(0.25)


def test_gap_perfect_all_wrong_and_undefined() -> None:
    solution = {"q1": {"A"}, "q2": {"B"}}
    right = {"q1": Prediction("A", 0.1), "q2": Prediction("B", 0.2)}
    wrong = {"q1": Prediction("B", 0.1), "q2": Prediction("A", 0.2)}
    assert global_average_precision(right, solution) == pytest.approx(1.0)
    assert global_average_precision(wrong, solution) == 0.0
    assert global_average_precision({}, solution) == 0.0
    assert math.isnan(global_average_precision({"q": Prediction("A", 1.0)}, {"q": set()}))


def test_gap_rejects_predictions_for_unknown_queries() -> None:
    with pytest.raises(ValueError, match="q9"):
        global_average_precision({"q9": Prediction("A", 1.0)}, {"q1": {"A"}})


def test_recognition_accuracy_ignores_non_landmark_queries() -> None:
    solution = {"q1": {"A"}, "q2": {"B"}, "q3": set()}
    preds = {"q1": Prediction("A", 0.1), "q2": None, "q3": Prediction("A", 0.9)}
    assert recognition_accuracy(preds, solution) == 0.5


def test_best_case_error_fits_only_the_matches_the_ground_truth_keeps() -> None:
    """Exact matches plus gross outliers: the fit ignores the outliers and recovers H; fewer
    than 4 matches within reach of the ground truth give None."""
    H = np.array([[1.1, 0.02, 5.0], [-0.01, 0.95, 7.0], [1e-5, 2e-5, 1.0]])
    rng = np.random.default_rng(0)
    pts0 = rng.uniform(0, 600, (40, 2))
    mapped = np.hstack([pts0, np.ones((40, 1))]) @ H.T
    pts1 = mapped[:, :2] / mapped[:, 2:]
    pts1[30:] += 80.0  # outliers
    assert best_case_error(pts0, pts1, H, (640, 480)) == pytest.approx(0.0, abs=1e-3)
    assert best_case_error(pts0[27:], pts1[27:], H, (640, 480)) is None
