"""Compact local stores: int8 and product-quantised descriptors, round-trip error bounds, and a
PQ index end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from features.core import ConfigError, parse_conf
from features.types import LocalFeatures
from index.layout import IndexConfig
from index.store import LocalFeatureStore, ProductQuantizer, encode_int8, pq_subvectors
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.matching import mutual_nn
from tests.corpus import MINI

BASIS = np.random.default_rng(0).normal(size=(24, 64))


def _descriptors(n: int, seed: int) -> np.ndarray:
    """Unit 64-dim descriptors with the low-dimensional structure real ones have."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 24)) @ BASIS + 0.3 * rng.normal(size=(n, 64))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _feats(desc: np.ndarray, seed: int) -> LocalFeatures:
    kpts = np.random.default_rng(seed).uniform(0, 500, (len(desc), 2)).astype(np.float32)
    return LocalFeatures(kpts, np.linspace(1, 0, len(desc), dtype=np.float32), desc, (500, 400))


def test_int8_round_trip_is_within_its_quantisation_bound(tmp_path: Path) -> None:
    desc = _descriptors(2000, 1)
    with LocalFeatureStore(tmp_path / "s.h5", "fp", dtype="int8") as store:
        store.put_features(7, _feats(desc, 1))
        stored = store.file["7"]["descriptors_int8"][()]
        assert stored.dtype == np.int8 and stored.shape == desc.shape  # 1 byte a dimension
        back = store.get_features(7).descriptors
    # |error| <= peak/254 per dimension before re-normalising, at most twice that after
    peak = np.abs(desc).max(1)
    bound = 2 * np.sqrt(desc.shape[1]) * peak / 254
    assert (np.linalg.norm(back - desc, axis=1) <= bound + 1e-6).all()
    assert np.abs(np.linalg.norm(back, axis=1) - 1).max() < 1e-5
    assert np.array_equal(encode_int8(desc), stored)
    other = _descriptors(2000, 2)
    exact = {tuple(m) for m in mutual_nn(other, desc).tolist()}
    approx = {tuple(m) for m in mutual_nn(other, back).tolist()}
    assert len(exact & approx) >= 0.95 * len(exact)


def test_product_quantiser_round_trip() -> None:
    train, test = _descriptors(3000, 3), _descriptors(500, 4)
    pq = ProductQuantizer.train(train, pq_subvectors("pq16", 64))
    codes = pq.encode(test)
    assert codes.shape == (500, 16) and codes.dtype == np.uint8  # 16 bytes, not 128
    back = pq.decode(codes)
    cosine = (back * test).sum(1)
    assert cosine.mean() > 0.9 and cosine.min() > 0.7
    # the decoded vector is the nearest codeword: re-encoding it gives the same code
    assert (pq.encode(pq.decode(codes)) == codes).mean() > 0.99
    with pytest.raises(ConfigError, match="does not split"):
        pq_subvectors("pq7", 64)
    assert pq_subvectors("pq", 128) == 32


def test_pq_store_trains_on_finalize_and_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "pq.h5"
    images = {i: _feats(_descriptors(300, 10 + i), i) for i in range(1, 9)}
    with LocalFeatureStore(path, "fp", {"m": 1}, dtype="pq16") as store:
        for i, f in images.items():
            store.put_features(i, f)  # float16 until the quantiser exists
        assert "descriptors" in store.file["1"] and store.pq is None
        before = path.stat().st_size
        store.finalize()
        assert store.pq is not None and "descriptors" not in store.file["1"]
        assert store.file["1"]["descriptors_pq"].shape == (300, 16)
        store.put_features(20, images[1])  # after training: encoded directly
        assert "descriptors_pq" in store.file["20"]
    assert path.stat().st_size < 0.6 * before
    with LocalFeatureStore(path, "fp", readonly=True) as ro:
        assert ro.ids() == [*images, 20]  # the codec group is not an image
        loaded = ro.get_features_many([3, 1])
        assert np.array_equal(loaded[1].keypoints, images[1].keypoints)
        assert loaded[0].image_size == (500, 400)
        assert ((loaded[0].descriptors * images[3].descriptors).sum(1)).mean() > 0.9
        assert np.array_equal(ro.get_features(20).descriptors, loaded[1].descriptors)


def test_pq_store_with_too_few_descriptors_keeps_float16(tmp_path: Path) -> None:
    with LocalFeatureStore(tmp_path / "s.h5", "fp", dtype="pq") as store:
        store.put_features(1, _feats(_descriptors(100, 5), 5))
        store.finalize()
        assert store.pq is None and store.file["1"]["descriptors"].dtype == np.float16
        assert store.get_features(1).descriptors.dtype == np.float32


def test_local_dtype_is_validated() -> None:
    for ok in ("float16", "float32", "int8", "pq", "pq32"):
        assert IndexConfig(local_dtype=ok).local_dtype == ok
    with pytest.raises(ConfigError, match="unknown local_dtype 'int4'"):
        parse_conf(IndexConfig, {"local_dtype": "int4"}, "index options")
    with pytest.raises(ConfigError, match="pq0"):
        parse_conf(IndexConfig, {"local_dtype": "pq0"}, "index options")


def test_pq_index_end_to_end(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    for group in ("sacre_coeur", "tower_bridge"):
        (corpus / group).mkdir(parents=True)
        for p in sorted((MINI / "images" / group).glob("*.jpg"))[1:3]:
            shutil.copy(p, corpus / group / p.name)
    options = {
        "local_conf": {"resize_max": 256, "max_keypoints": 128},
        "global_conf": {"resize_max": 256, "scales": [1.0]},
        "local_dtype": "pq",
    }
    build_index(corpus, tmp_path / "idx", options)
    with h5py.File(tmp_path / "idx/local.h5", "r") as f:
        groups = [f[k] for k in f if k.isdigit()]
        assert len(groups) == 4 and all(set(g) >= {"descriptors_pq"} for g in groups)
        assert all("descriptors" not in g for g in groups)
        assert f["_codec/pq_centroids"].shape == (32, 256, 4)  # DISK: 128 dims, 32 bytes
    query = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))[1]  # indexed: finds itself
    top = Retriever.open(tmp_path / "idx").search(query, k=2)[0]
    assert top.path == f"sacre_coeur/{query.name}" and top.verified


def test_recode_moves_a_store_between_encodings(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    images = {i: _feats(_descriptors(200, 30 + i), i) for i in range(1, 6)}
    with LocalFeatureStore(path, "fp") as store:
        for i, f in images.items():
            store.put_features(i, f)
        float16 = path.stat().st_size
        store.recode("int8")
        assert "descriptors_int8" in store.file["2"] and path.stat().st_size < 0.7 * float16
        as_int8 = store.get_features(2).descriptors
        store.recode("pq16")
        assert store.pq is not None and "descriptors_pq" in store.file["2"]
        store.recode("float16")
        assert store.pq is None and "_codec" not in store.file
        back = store.get_features(2)
    assert np.array_equal(back.keypoints, images[2].keypoints)
    assert ((back.descriptors * as_int8).sum(1)).mean() > 0.9  # pq's loss, nothing more
