"""Unit tests of the search stages against brute-force references and hand-made cases (the
exact vector search on both backends: FAISS and Milvus Lite)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from index.vectors import VectorIndex
from index.whitening import Whitening
from retrieval.cli import app
from retrieval.matching import mutual_nn
from retrieval.recognition import UNKNOWN, vote
from retrieval.rerank import Candidate, order_candidates
from retrieval.verification import RansacConf, verify
from tests.vector_stores import BACKENDS, StoredVectors


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_index_matches_brute_force_with_catalog_ids(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(500, 64)))
    ids = rng.choice(10_000, size=500, replace=False)
    index = VectorIndex.build(ids, x)
    q = _unit(rng.normal(size=(7, 64)))
    scores, got = index.search(q, 10)
    sims = q @ x.T
    want = ids[np.argsort(-sims, axis=1)[:, :10]]
    assert np.array_equal(got, want)
    np.testing.assert_allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :10], atol=1e-5)
    index.save(tmp_path / "v.faiss")
    again = VectorIndex.load(tmp_path / "v.faiss")
    assert np.array_equal(again.search(q, 10)[1], got)
    assert index.search(q, 10_000)[1].shape == (7, 500)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_backends_agree_with_brute_force(tmp_path, backend: str) -> None:
    """The exact index of each vector backend (FAISS Flat, Milvus FLAT) returns the brute-force
    top-k under catalog ids, as a reader reopening the generation sees it."""
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(500, 64)))
    ids = rng.choice(10_000, size=500, replace=False)
    q = _unit(rng.normal(size=(7, 64)))
    stored = StoredVectors(backend, tmp_path)
    try:
        stored.build(ids, x)
        scores, got = stored.reopen().search(q, 10)
        sims = q @ x.T
        assert np.array_equal(got, ids[np.argsort(-sims, axis=1)[:, :10]])
        np.testing.assert_allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :10], atol=1e-5)
        assert stored.reopen().search(q, 10_000)[1].shape == (7, 500)
    finally:
        stored.close()


def test_whitening_decorrelates_and_shrinkage_interpolates() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 8)) * np.array([10, 5, 2, 1, 1, 0.5, 0.2, 0.1])
    w = Whitening.fit(x, shrinkage=0.0)
    y = (x - w.mean) @ w.projection.T
    np.testing.assert_allclose(np.cov(y.T), np.eye(8), atol=1e-6)
    centred_only = Whitening.fit(x, shrinkage=1.0)  # a rotation of the centred data, scaled
    xc = _unit(x - centred_only.mean)
    np.testing.assert_allclose(
        centred_only.apply(x) @ centred_only.apply(x[:5]).T, xc @ xc[:5].T, atol=1e-4
    )
    half = Whitening.fit(x, shrinkage=0.5).apply(x)
    spread = [
        np.var(w.apply(x) @ np.linalg.eigh(np.cov(x.T))[1], axis=0).max() for w in (w, centred_only)
    ]
    assert np.isfinite(half).all() and spread[0] < spread[1]
    assert Whitening.fit(x[:1]).projection.shape == (8, 8)  # too few samples: identity


def test_mutual_nn_and_ratio_test() -> None:
    d0 = _unit(np.array([[1, 0.01, 0], [0, 1, 0], [0, 0, 1]], np.float32))
    d1 = _unit(np.array([[1, 0, 0], [1, 0.03, 0], [0, 1, 0.1], [0, -1, 0]], np.float32))
    m = mutual_nn(d0, d1)
    assert {tuple(r) for r in m.tolist()} == {(0, 0), (1, 2)}  # d0[2] has no mutual partner
    # d0[0] is about half as far from d1[0] as from d1[1]: ambiguous for a 0.4 ratio
    assert {tuple(r) for r in mutual_nn(d0, d1, ratio=0.8).tolist()} == {(0, 0), (1, 2)}
    assert {tuple(r) for r in mutual_nn(d0, d1, ratio=0.4).tolist()} == {(1, 2)}
    assert mutual_nn(d0[:0], d1).shape == (0, 2)


def test_verification_recovers_a_homography_and_never_raises() -> None:
    rng = np.random.default_rng(2)
    h = np.array([[0.9, 0.1, 20], [-0.05, 1.1, 5], [1e-4, 2e-4, 1]])
    src = rng.uniform(0, 600, (200, 2)).astype(np.float32)
    dst = cv2.perspectiveTransform(src[None], h)[0]
    dst[:60] = rng.uniform(0, 600, (60, 2))
    result = verify(src, dst, RansacConf(threshold=3.0))
    assert result.success and 135 <= result.inliers <= 145
    assert not result.mask[:60].all()
    again = verify(src, dst, RansacConf(threshold=3.0))
    assert again.inliers == result.inliers  # seeded: deterministic
    assert verify(src, dst, RansacConf(model="fundamental", threshold=3.0)).inliers > 130
    affine = np.array([[0.9, 0.1, 20], [-0.05, 1.1, 5]])
    dst_a = src @ affine[:, :2].T + affine[:, 2]
    dst_a[:60] = rng.uniform(0, 600, (60, 2))
    assert 135 <= verify(src, dst_a, RansacConf(model="affine", threshold=3.0)).inliers <= 145
    assert verify(src[:3], dst[:3], RansacConf()).inliers == 0  # too few matches
    same = np.zeros((50, 2), np.float32)
    for model in ("homography", "fundamental", "affine"):  # all points identical: no model
        degenerate = verify(same, same, RansacConf(model=model))
        assert not degenerate.success and degenerate.inliers == 0, model


def test_candidates_order_verified_first() -> None:
    cands = [
        Candidate(1, 0.9, 5, False),
        Candidate(2, 0.5, 40, True),
        Candidate(3, 0.7, 40, True),
        Candidate(4, 0.8, 100, True),
        Candidate(5, 0.95, 0, False),
    ]
    assert [c.id for c in order_candidates(cands)] == [4, 3, 2, 5, 1]


@dataclass
class R:
    label: str | None
    inliers: int
    verified: bool


def test_vote_weights_by_inliers_and_reports_unknown() -> None:
    label, conf, ev = vote(
        [R("a", 100, True), R("b", 30, True), R("a", 20, True), R(None, 0, False)]
    )
    assert label == "a" and ev == [0, 2]
    assert 0.5 < conf < 1
    weak_label, weak, _ = vote([R("a", 15, True)])
    assert weak_label == "a" and weak < conf
    assert vote([R("a", 5, False)]) == (UNKNOWN, 0.0, [])
    mixed_label, mixed, _ = vote([R("a", 100, True), R(None, 100, True)])
    assert mixed_label == "a" and mixed < conf  # unlabelled verified matches lower confidence


def test_features_list_shows_every_method_and_licence() -> None:
    out = CliRunner().invoke(app, ["features", "list"])
    assert out.exit_code == 0, out.output
    for name in ("disk", "superpoint", "r2d2", "sekd", "d2net", "aslfeat", "mda", "magicpoint"):
        assert name in out.stdout
    assert "Apache-2.0" in out.stdout


# --- αQE and DBA (retrieval.expansion) -------------------------------------------------------


def _dba_brute_force(x: np.ndarray, k: int, alpha: float, banned: set[int]) -> np.ndarray:
    """Every vector replaced by its α-weighted mean with its k nearest others (none banned)."""
    sims = x @ x.T
    out = np.empty_like(x)
    for i in range(len(x)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i and j not in banned]
        group = np.concatenate([x[i : i + 1], x[order[:k]]])
        w = np.maximum(group @ x[i], 0) ** alpha
        v = w @ group
        out[i] = v / np.linalg.norm(v)
    return out


def test_alpha_query_expansion_and_dba_match_brute_force() -> None:
    from retrieval.expansion import Expansion, Refiner, expand_query

    rng = np.random.default_rng(3)
    centres = _unit(rng.normal(size=(6, 32)))
    x = _unit(np.repeat(centres, 20, axis=0) + 0.4 * rng.normal(size=(120, 32)))
    ids = np.arange(1000, 1120)
    index = VectorIndex.build(ids, x)
    q = _unit(centres[:1] + 0.5 * rng.normal(size=(1, 32)))[0]

    def vectors(some: np.ndarray) -> np.ndarray:
        return x[np.asarray(some) - 1000]

    banned = {1000 + int(np.argmax(x @ q))}  # e.g. the query's own copy in a leave-one-out run

    def excluded(some: np.ndarray) -> np.ndarray:
        return np.isin(some, list(banned))

    # αQE: one expansion with the best 3 usable neighbours, then the whole index again
    got_s, got = Refiner(Expansion(qe=3, qe_alpha=3.0), index.search, vectors, excluded).ranking(
        q, 120
    )
    first = [i for i in np.argsort(-(x @ q), kind="stable") if i + 1000 not in banned][:3]
    q2 = expand_query(q, x[first], 3.0)
    w = np.maximum(np.concatenate([q[None], x[first]]) @ q, 0) ** 3
    np.testing.assert_allclose(
        q2, _unit((w @ np.concatenate([q[None], x[first]]))[None])[0], atol=1e-6
    )
    np.testing.assert_allclose(got_s, np.sort(x @ q2)[::-1], atol=1e-5)
    assert np.array_equal(got, ids[np.argsort(-(x @ q2), kind="stable")])

    # DBA over the whole ranking equals DBA of the whole database, banned images never used
    aug = _dba_brute_force(x, 2, 3.0, {b - 1000 for b in banned})
    dba = Refiner(Expansion(dba=2, dba_alpha=3.0), index.search, vectors, excluded)
    got_s, got = dba.ranking(q, 120)
    np.testing.assert_allclose(got_s, np.sort(aug @ q)[::-1], atol=1e-5)
    assert np.array_equal(got, ids[np.argsort(-(aug @ q), kind="stable")])
    off_s, off = Refiner(Expansion(), index.search, vectors, excluded).ranking(q, 10)
    assert np.array_equal(off, index.search(q[None], 10)[1][0])
