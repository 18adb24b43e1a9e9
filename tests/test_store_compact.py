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
from index.encoding import ProductQuantizer, decode, encode, encode_int8, pq_subvectors
from index.layout import IndexConfig
from index.manifest import Manifest
from retrieval import Retriever
from retrieval.building import build_index
from retrieval.matching import mutual_nn
from tests.corpus import MINI, tiny

BASIS = np.random.default_rng(0).normal(size=(24, 64))


def _descriptors(n: int, seed: int) -> np.ndarray:
    """Unit 64-dim descriptors with the low-dimensional structure real ones have."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 24)) @ BASIS + 0.3 * rng.normal(size=(n, 64))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _feats(desc: np.ndarray, seed: int) -> LocalFeatures:
    kpts = np.random.default_rng(seed).uniform(0, 500, (len(desc), 2)).astype(np.float32)
    return LocalFeatures(kpts, np.linspace(1, 0, len(desc), dtype=np.float32), desc, (500, 400))


def test_int8_round_trip_is_within_its_quantisation_bound() -> None:
    desc = _descriptors(2000, 1)
    stored = encode(desc, "int8", None)
    assert stored.dtype == np.int8 and stored.shape == desc.shape  # 1 byte a dimension
    back = decode(stored, "int8", None)
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
    build_index(corpus, tmp_path / "idx", tiny(local_dtype="pq"))
    manifest = Manifest.load(tmp_path / "idx")
    assert manifest.codec is not None and {s.encoding for s in manifest.segments} == {"pq"}
    codec = ProductQuantizer.load(tmp_path / "idx" / manifest.codec.name)
    assert codec.centroids.shape == (32, 256, 4)  # DISK: 128 dims, 32 bytes
    with h5py.File(tmp_path / "idx/segments" / manifest.segments[0].name, "r") as f:
        assert f["descriptors"].dtype == np.uint8 and f["descriptors"].shape[1] == 32
    query = sorted((MINI / "images/sacre_coeur").glob("*.jpg"))[1]  # indexed: finds itself
    top = Retriever.open(tmp_path / "idx").search(query, k=2).matches[0]
    assert top.path == f"sacre_coeur/{query.name}" and top.verified
