"""Feature-store reads: the memory-mapped path of a read-only store returns exactly what HDF5
returns, falls back to HDF5 where a dataset is not one contiguous run, and survives closing."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from features.core import IndexError_
from features.types import LocalFeatures
from index.store import LocalFeatureStore


def _features(rng: np.random.Generator, n: int, dim: int = 32) -> LocalFeatures:
    desc = rng.normal(size=(n, dim))
    desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    return LocalFeatures(
        rng.uniform(0, 500, (n, 2)).astype(np.float32),
        rng.uniform(0, 1, n).astype(np.float32),
        desc.astype(np.float32),
        (500, 400 + n),
    )


def _same(a: LocalFeatures, b: LocalFeatures) -> bool:
    return (
        np.array_equal(a.keypoints, b.keypoints)
        and np.array_equal(a.scores, b.scores)
        and np.array_equal(a.descriptors, b.descriptors)
        and a.image_size == b.image_size
    )


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_mapped_reads_equal_hdf5_reads(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "local.h5"
    feats = {i: _features(rng, n) for i, n in enumerate([0, 1, 7, 300], start=10)}
    with LocalFeatureStore(path, "fp", dtype=dtype) as store:
        for i, f in feats.items():
            store.put_features(i, f)
        written = store.get_features_many(list(feats))  # through HDF5: the file is writable
    with LocalFeatureStore(path, "fp", readonly=True) as ro:
        assert ro._reader._map is not None
        mapped = ro.get_features_many(list(feats)[::-1])[::-1]
        assert all(_same(a, b) for a, b in zip(written, mapped, strict=True))
        assert mapped[0].keypoints.shape == (0, 2) and mapped[0].descriptors.shape == (0, 32)
        mapped[3].keypoints[0] = -1  # callers may scale keypoints in place; the file is safe
        with pytest.raises(KeyError):
            ro.get_features(99)
    with LocalFeatureStore(path, "fp", readonly=True) as again:
        assert _same(again.get_features(13), written[3])


def test_chunked_or_compressed_datasets_are_read_through_hdf5(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "local.h5"
    f = _features(rng, 50)
    with LocalFeatureStore(path, "fp") as store:
        store.put_features(1, f)
    with h5py.File(path, "a") as h5:  # as another HDF5 writer might have stored it
        group = h5.create_group("2")
        group.create_dataset("keypoints", data=f.keypoints, chunks=(10, 2))
        group.create_dataset("scores", data=f.scores, compression="gzip")
        group.create_dataset("descriptors", data=f.descriptors.astype(np.float16), chunks=True)
        group.attrs["image_size"] = f.image_size
    with LocalFeatureStore(path, "fp", readonly=True) as ro:
        one, two = ro.get_features_many([1, 2])
        assert _same(one, two)


def test_reader_follows_a_repacked_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "local.h5"
    with LocalFeatureStore(path, "fp", dtype="float32") as store:
        first = _features(rng, 20)
        store.put_features(1, first)
        store.get_features(1)  # the reader exists before the file is rewritten
        store.recode("int8")  # rewrites the file (temp file + os.replace)
        back = store.get_features(1)
    assert np.abs(back.descriptors - first.descriptors).max() < 0.02


def test_a_group_without_descriptors_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "local.h5"
    with LocalFeatureStore(path, "fp") as store:
        store.put_features(1, _features(np.random.default_rng(3), 5))
    with h5py.File(path, "a") as h5:
        del h5["1/descriptors"]
    ro = LocalFeatureStore(path, "fp", readonly=True)
    with ro, pytest.raises(IndexError_, match=r"local\.h5: feature group 1 holds no descriptors"):
        ro.get_features(1)
