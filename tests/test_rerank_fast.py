"""The batched, parallel rerank gives exactly the sequential one-pair-at-a-time result."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from features.types import LocalFeatures
from index.layout import IndexConfig, IndexPaths
from index.manifest import Manifest
from index.store import FeatureStore
from index.writer import Extracted, IndexWriter
from retrieval.matching import chunks, mutual_nn, mutual_nn_many
from retrieval.rerank import (
    Candidate,
    RerankConf,
    Timings,
    count_inliers,
    rerank,
    rerank_sequential,
)
from retrieval.verification import RansacConf, verify
from tests.corpus import MINI

DIM = 64


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _query(rng: np.random.Generator, n: int = 400) -> LocalFeatures:
    kpts = rng.uniform(0, 640, (n, 2)).astype(np.float32)
    return LocalFeatures(kpts, np.ones(n, np.float32), _unit(rng.normal(size=(n, DIM))), (640, 640))


def _candidate(
    rng: np.random.Generator, query: LocalFeatures, n: int, shared: float
) -> LocalFeatures:
    """n features, a fraction `shared` of them the query's seen through a random homography
    (descriptors perturbed), the rest random; rounded through float16 like the store."""
    k = min(int(shared * n), len(query))
    h = np.eye(3) + rng.normal(scale=[[0.05, 0.05, 20], [0.05, 0.05, 20], [1e-5, 1e-5, 0]])
    src = rng.choice(len(query), k, replace=False)
    projected = np.c_[query.keypoints[src], np.ones(k)] @ h.T
    warped = projected[:, :2] / projected[:, 2:]
    kpts = np.concatenate(
        [warped + rng.normal(scale=1.0, size=warped.shape), rng.uniform(0, 640, (n - k, 2))]
    )
    desc = np.concatenate(
        [
            query.descriptors[src] + 0.5 * rng.normal(size=(k, DIM)) / np.sqrt(DIM),
            rng.normal(size=(n - k, DIM)),
        ]
    )
    desc = _unit(desc).astype(np.float16).astype(np.float32)
    order = rng.permutation(n)
    return LocalFeatures(
        kpts[order].astype(np.float32), np.ones(n, np.float32), desc[order], (640, 640)
    )


@pytest.fixture(scope="module")
def scene() -> tuple[LocalFeatures, dict[int, LocalFeatures]]:
    rng = np.random.default_rng(0)
    query = _query(rng)
    sizes = [0, 1, 3, 500, 500, 450, 300, 500, 200, 500] * 3
    shares = [0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.3, 0.5, 0.8, 0.02] * 3
    feats = {
        100 + i: _candidate(rng, query, n, s)
        for i, (n, s) in enumerate(zip(sizes, shares, strict=True))
    }
    dup = feats[103]  # repeated descriptors: ties that argmax must break like the reference
    rows = np.concatenate([np.arange(250), np.arange(250)])
    feats[999] = LocalFeatures(
        dup.keypoints[rows], dup.scores[rows], dup.descriptors[rows], (640, 640)
    )
    return query, feats


def test_batched_mutual_nn_equals_pairwise_with_ties_and_ratio(scene) -> None:
    query, feats = scene
    cands = [f.descriptors for f in feats.values()]
    tied_query = np.concatenate([query.descriptors, query.descriptors[:50]])  # column ties
    close_ties = query.descriptors.copy()  # duplicate rows side by side and a few apart
    close_ties[[6, 16, 40, 399]] = close_ties[[5, 15, 33, 398]]
    for q in (query.descriptors, tied_query, close_ties):
        for ratio in (None, 0.95, 0.8):
            want = [mutual_nn(q, c, ratio) for c in cands]
            for reductions in ("numpy", "torch"):  # torch: the GPU code path, run on the CPU
                got = mutual_nn_many(q, cands, ratio, reductions=reductions)
                assert all(np.array_equal(w, g) for w, g in zip(want, got, strict=True)), ratio
    assert sum(len(m) for m in want) > 100  # the scene does produce matches
    assert mutual_nn_many(query.descriptors[:0], cands)[0].shape == (0, 2)


def test_chunks_cover_the_shortlist_in_order() -> None:
    lengths = [1024] * 5 + [0, 3000, 10, 5000]
    parts = chunks(lengths, 4096)
    assert [i for p in parts for i in p] == list(range(len(lengths)))
    assert all(len(p) * max(lengths[i] for i in p) <= 4096 or len(p) == 1 for p in parts)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("ratio", [None, 0.9])
def test_rerank_equals_the_sequential_reference(scene, workers: int, ratio) -> None:
    query, feats = scene
    cands = [Candidate(i, 1.0 - 0.01 * n) for n, i in enumerate(feats)]
    conf = RerankConf(min_inliers=12, ratio=ratio, workers=workers)
    want = rerank_sequential(query, cands, feats.__getitem__, conf)
    timings = Timings()
    got = rerank(query, cands, lambda ids: [feats[i] for i in ids], conf, timings)
    assert got == want
    assert sum(c.verified for c in got) >= 5 and not all(c.verified for c in got)
    assert {"load", "matching", "ransac"} <= set(timings.stages)


def test_verify_many_equals_verify_in_any_thread(scene) -> None:
    query, feats = scene
    pairs = []
    for f in feats.values():
        m = mutual_nn(query.descriptors, f.descriptors)
        pairs.append((query.keypoints[m[:, 0]], f.keypoints[m[:, 1]]))
    conf = RansacConf()
    want = [verify(a, b, conf).inliers for a, b in pairs]

    def run(pairs: list, workers: int) -> list[int]:
        with ThreadPoolExecutor(workers) as pool:
            return [v.inliers for v in pool.map(lambda ab: verify(*ab, conf), pairs)]

    assert run(pairs, 4) == want
    assert run(pairs[::-1], 2) == want[::-1]


def test_store_batch_load_equals_single_loads(scene, tmp_path: Path) -> None:
    query, feats = scene
    writer = IndexWriter.open(IndexPaths(tmp_path / "idx"), IndexConfig())
    writer.bind_extractors("g", "l", 4)
    for i, f in feats.items():  # one segment per image: the loads cross segments
        writer.commit_batch([Extracted(f"{i}.jpg", str(i), None, np.ones(4, np.float32), f)])
    writer.publish(refit=True)
    paths = {r.path: r.id for r in writer.catalog.all()}
    writer.close()
    with FeatureStore(tmp_path / "idx", Manifest.load(tmp_path / "idx")) as store:
        ids = [paths[f"{i}.jpg"] for i in feats][::-1]
        many = store.local_features(ids)
        for i, f in zip(list(feats)[::-1], many, strict=True):
            one = store.local_features([paths[f"{i}.jpg"]])[0]
            assert np.array_equal(f.descriptors, one.descriptors)
            assert np.array_equal(f.descriptors, feats[i].descriptors)  # float16-exact input
            assert np.array_equal(f.keypoints, feats[i].keypoints) and f.image_size == (640, 640)
        conf = RerankConf()
        assert count_inliers(query, many, conf) == count_inliers(
            query, [feats[i] for i in list(feats)[::-1]], conf
        )


@pytest.mark.slow
def test_rerank_equals_sequential_on_real_disk_features() -> None:
    from features.registry import load_local

    images = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))[:6]
    images += sorted((MINI / "distractors").glob("*.jpg"))[:6]
    disk = load_local("disk", {"max_keypoints": 1024})
    feats = {i: disk.extract(p) for i, p in enumerate(images)}
    query = feats.pop(0)
    cands = [Candidate(i, 0.0) for i in feats]
    conf = RerankConf()
    want = rerank_sequential(query, cands, feats.__getitem__, conf)
    got = rerank(query, cands, lambda ids: [feats[i] for i in ids], conf)
    assert got == want and got[0].verified
