"""Vector index types against brute force: FAISS's exact Flat, HNSW, OPQ + IVF-PQ, the "auto"
choice, native removal and the tombstone fallback; and the search layer of both vector backends
(FAISS files, Milvus Lite) through the writer's contract: exact top-k, ids, add / replace /
remove consistency across generations, Milvus's own index types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.core import ConfigError, IndexError_
from index.layout import IndexConfig
from index.vector_backends.milvus import choose_index_type, index_params
from index.vectors import FLAT_BELOW, HNSW_BELOW, VectorIndex, choose_factory
from tests.vector_stores import BACKENDS, StoredVectors


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


BASIS = np.random.default_rng(0).normal(size=(16, 64))


def _structured(n: int, seed: int) -> np.ndarray:
    """Unit vectors near a 16-dim subspace of R^64: like real descriptors, they have structure
    approximate indexes exploit (uniform random vectors have none)."""
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(n, 16)) @ BASIS + 0.1 * rng.normal(size=(n, 64)))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _structured(6000, 1)
    ids = np.random.default_rng(1).choice(10**9, size=len(x), replace=False).astype(np.int64)
    return ids, x, _structured(50, 2)


def _truth(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]]


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want, strict=True)]))


def test_auto_chooses_by_corpus_size() -> None:
    assert choose_factory(0, 1280) == "Flat"
    assert choose_factory(FLAT_BELOW - 1, 1280) == "Flat"
    assert choose_factory(FLAT_BELOW, 1280) == "HNSW32"
    assert choose_factory(HNSW_BELOW - 1, 1280) == "HNSW32"
    # 4 * sqrt(N) rounded to a power of two; OPQ down to 256 dims, 64 one-byte sub-vectors
    assert choose_factory(HNSW_BELOW, 1280) == "OPQ64_256,IVF4096,PQ64"
    assert choose_factory(100_000_000, 1280) == "OPQ64_256,IVF32768,PQ64"
    assert choose_factory(2_000_000, 64) == "OPQ16_64,IVF4096,PQ16"
    assert IndexConfig().index_type == "auto"


def test_auto_on_a_small_corpus_is_exact(data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, "auto")
    assert index.factory == "Flat"
    scores, got = index.search(q, 10)
    assert np.array_equal(got, _truth(ids, x, q, 10))
    np.testing.assert_allclose(scores[:, 0], (q @ x.T).max(1), atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "min_recall"),
    [
        ("HNSW32", 0.95),
        ("IVF64,PQ16", 0.4),  # 16 bytes a vector, 8 of 64 lists probed
        pytest.param("OPQ16_64,IVF64,PQ16", 0.4, marks=pytest.mark.slow),  # OPQ trains ~1 min
    ],
)
def test_approximate_indexes_against_brute_force(data, factory: str, min_recall: float) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, factory)
    scores, got = index.search(q, 10)
    assert got.shape == (len(q), 10) and set(got.ravel()) <= set(ids)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert _recall(got, _truth(ids, x, q, 10)) >= min_recall
    assert len(index) == len(x) and np.array_equal(index.ids(), np.sort(ids))


def test_ivf_removes_natively_and_survives_save(data, tmp_path: Path) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, "IVF32,Flat")
    gone = _truth(ids, x, q[:3], 2).ravel()
    assert index.remove(gone) == len(set(gone)) and index.tombstones == 0
    index.save(tmp_path / "v.faiss")
    again = VectorIndex.load(tmp_path / "v.faiss")
    assert len(again) == len(x) - len(set(gone))
    assert not set(again.search(q[:3], 20)[1].ravel()) & set(gone)
    assert not set(again.ids()) & set(gone)


def test_flat_removal_is_native_and_exact(data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, "Flat")
    gone = _truth(ids, x, q, 1).ravel()
    index.remove(gone)
    keep = ~np.isin(ids, gone)
    assert index.tombstones == 0 and len(index) == int(keep.sum())
    assert np.array_equal(index.search(q, 5)[1], _truth(ids[keep], x[keep], q, 5))


def test_hnsw_removal_falls_back_to_tombstones(data, tmp_path: Path) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, "HNSW32")
    gone = _truth(ids, x, q, 3).ravel()
    removed = index.remove(gone)
    assert removed == len(set(gone)) == index.tombstones
    assert len(index) == len(x) - removed
    with pytest.raises(IndexError_, match="cannot remove"):
        index.remove(ids[:1], tombstone=False)
    index.save(tmp_path / "h.faiss")
    again = VectorIndex.load(tmp_path / "h.faiss")
    assert again.tombstones == removed
    _, got = again.search(q, 10)
    assert (got >= 0).all() and not set(got.ravel()) & set(gone)  # k live results per query
    assert not set(again.ids()) & set(gone)


def test_forced_tombstones_then_readd_under_the_same_id(data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, "Flat")
    target = _truth(ids, x, q[:1], 1)[0, 0]
    assert index.remove(np.array([target]), tombstone=True) == 1 and index.tombstones == 1
    keep = ids != target
    assert np.array_equal(index.search(q, 5)[1], _truth(ids[keep], x[keep], q, 5))
    index.add(np.array([target]), q[:1])  # "updated" content under the old id
    scores, got = index.search(q[:1], 1)
    assert got[0, 0] == target and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert len(index) == len(x) and index.tombstones == 1


def test_search_beyond_the_live_count_and_on_an_empty_index(data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids[:5], x[:5], "HNSW32")
    index.remove(ids[:2])
    scores, got = index.search(q[:2], 10)
    assert got.shape == (2, 3) and set(got.ravel()) == set(ids[2:5])
    empty = VectorIndex.build(np.zeros(0, np.int64), np.zeros((0, 64), np.float32), "auto")
    assert empty.search(q[:2], 5)[1].shape == (2, 0) and len(empty) == 0


def test_bad_index_types_are_config_errors(data) -> None:
    ids, x, _ = data
    with pytest.raises(ConfigError, match="needs at least 4096 vectors"):
        VectorIndex.build(ids[:100], x[:100], "IVF4096,Flat")
    with pytest.raises(ConfigError, match="bad FAISS index type 'NoSuch'"):
        VectorIndex.build(ids[:100], x[:100], "NoSuch")


def test_search_widens_past_many_tombstones(data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, "Flat")
    crowd = _truth(ids, x, q[:1], 50)[0]  # the 50 best of q[0] become tombstones
    index.remove(crowd, tombstone=True)
    keep = ~np.isin(ids, crowd)
    scores, got = index.search(q[:4], 10)
    assert np.array_equal(got, _truth(ids[keep], x[keep], q[:4], 10))
    assert np.isfinite(scores).all()


# --- both backends, through the writer's contract ---------------------------------------------


@pytest.fixture(params=BACKENDS)
def stored(request: pytest.FixtureRequest, tmp_path: Path):
    vectors = StoredVectors(request.param, tmp_path)
    yield vectors
    vectors.close()


def test_exact_search_matches_brute_force_with_catalog_ids(stored: StoredVectors, data) -> None:
    ids, x, q = data
    index = stored.build(ids, x)
    scores, got = index.search(q, 10)
    assert np.array_equal(got, _truth(ids, x, q, 10))
    np.testing.assert_allclose(scores, -np.sort(-(q @ x.T), axis=1)[:, :10], atol=1e-5)
    assert len(index) == len(ids) and index.dim == x.shape[1]
    assert np.array_equal(index.ids(), np.sort(ids))
    assert np.array_equal(stored.reopen().search(q, 10)[1], got)  # as a reader opens it


def test_add_replace_remove_stay_consistent(stored: StoredVectors, data) -> None:
    ids, x, q = data
    stored.build(ids, x)
    gone = np.unique(_truth(ids, x, q[:5], 2).ravel())  # the best two of five queries
    new_ids = np.array([10**9 + 1, 10**9 + 2], np.int64)
    replaced = ids[100]
    fresh_ids = np.append(new_ids, replaced)
    fresh_x = np.stack([q[5], q[6], q[7]])  # each the exact answer to its query
    index = stored.edit(fresh_ids, fresh_x, gone=gone)
    keep = ~np.isin(ids, np.append(gone, replaced))
    want_ids = np.concatenate([ids[keep], fresh_ids])
    want_x = np.concatenate([x[keep], fresh_x])
    assert len(index) == len(want_ids) and np.array_equal(index.ids(), np.sort(want_ids))
    scores, got = index.search(q, 10)
    assert np.array_equal(got, _truth(want_ids, want_x, q, 10))
    assert got[5, 0] == new_ids[0] and got[7, 0] == replaced
    assert scores[7, 0] == pytest.approx(1.0, abs=1e-5)
    index = stored.remove(new_ids)
    left = ~np.isin(want_ids, new_ids)
    assert np.array_equal(index.search(q, 10)[1], _truth(want_ids[left], want_x[left], q, 10))
    assert np.array_equal(stored.reopen().ids(), np.sort(want_ids[left]))


def test_search_beyond_the_live_count_and_empty(stored: StoredVectors, data) -> None:
    ids, x, q = data
    index = stored.build(ids[:5], x[:5])
    index = stored.remove(ids[:2])
    scores, got = index.search(q[:2], 10)
    assert got.shape == (2, 3) and set(got.ravel()) == set(ids[2:5])
    assert np.isfinite(scores).all()
    empty = stored.build(np.zeros(0, np.int64), np.zeros((0, x.shape[1]), np.float32))
    assert empty.search(q[:2], 5)[1].shape == (2, 0) and len(empty) == 0


def test_milvus_auto_chooses_by_corpus_size() -> None:
    assert choose_index_type(FLAT_BELOW - 1, lite=False) == "FLAT"
    assert choose_index_type(FLAT_BELOW, lite=False) == "HNSW"
    assert choose_index_type(HNSW_BELOW, lite=False) == "IVF_PQ"
    assert choose_index_type(HNSW_BELOW, lite=True) == "IVF_SQ8"  # Milvus Lite has no IVF_PQ
    assert index_params("IVF_PQ", HNSW_BELOW, 1280) == {"nlist": 4096, "m": 64, "nbits": 8}
    assert index_params("HNSW", 10, 64)["M"] == 32


@pytest.mark.parametrize(
    ("index_type", "min_recall"), [("HNSW", 0.95), ("IVF_FLAT", 0.6), ("IVF_SQ8", 0.6)]
)
def test_milvus_index_types_against_brute_force(
    tmp_path: Path, data, index_type: str, min_recall: float
) -> None:
    ids, x, q = data
    stored = StoredVectors("milvus", tmp_path, index_type)
    try:
        index = stored.build(ids, x)
        assert index.factory == index_type
        scores, got = index.search(q, 10)
        assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
        assert _recall(got, _truth(ids, x, q, 10)) >= min_recall
        assert np.array_equal(index.ids(), np.sort(ids))
    finally:
        stored.close()


def test_milvus_refuses_index_types_it_does_not_offer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IVF_PQ.*valid: auto, FLAT, HNSW"):
        StoredVectors("milvus", tmp_path, "IVF_PQ")  # not in Milvus Lite
    with pytest.raises(ConfigError, match="'HNSW32' is not one"):
        StoredVectors("milvus", tmp_path, "HNSW32")  # a FAISS factory string
