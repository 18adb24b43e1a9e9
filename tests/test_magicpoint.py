"""MagicPoint parity with eric-yyjau/pytorch-superpoint (../shared/fixtures/magicpoint).

The fixture's weights are random (SuperPointNet_gauss2 layout), so these tests check the network,
both BatchNorm modes, the key mapping and the post-processing, not detection quality.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from features.core import CheckpointError, ConfigError, WeightsNotFoundError
from features.local.magicpoint import (
    MagicPoint,
    MagicPointConf,
    greedy_nms,
    sample_head_descriptors,
)
from features.registry import local_class
from tests.conftest import fixture_dir
from tests.parity import assert_order_up_to_ties, match_integer_keypoints

FIX = fixture_dir("magicpoint")
WEIGHTS = FIX / "superPointNet_0_checkpoint.pth.tar"
TAG = {"image": "trainbn", "running": "evalbn"}  # our batchnorm option -> fixture variant
IMAGES = ("image0", "image1")
SCORE_ATOL = 2e-5
"""The README's score tolerance (a float64 run of the reference differs by up to 5.6e-6)."""


def _gray(image: str) -> np.ndarray:
    return np.load(FIX / f"{image}_input.npz")["image_gray_uint8"]


def _model(batchnorm: str = "image", **extra: object) -> MagicPoint:
    conf = {"resize_max": None, "batchnorm": batchnorm, **extra}
    return MagicPoint(weights=str(WEIGHTS), **conf)


@pytest.fixture(scope="module")
def semi() -> dict[tuple[str, str], torch.Tensor]:
    """One network pass per (BN mode, image), shared by the post-processing tests."""
    out = {}
    for batchnorm in TAG:
        model = _model(batchnorm)
        out.update({(batchnorm, image): model.dense(_gray(image)) for image in IMAGES})
    return out


@pytest.mark.parametrize("batchnorm", list(TAG))
def test_dense_logits_match_reference(semi, batchnorm: str) -> None:
    ref = np.load(FIX / f"image0_dense_{TAG[batchnorm]}.npz")["semi"]
    assert semi[batchnorm, "image0"].shape == (65, 51, 80)
    np.testing.assert_allclose(semi[batchnorm, "image0"].numpy(), ref, rtol=0, atol=1e-4)


def test_image_statistics_leave_the_running_buffers_alone() -> None:
    model = _model("image")
    model.dense(_gray("image0")[:128, :128])
    state = torch.load(WEIGHTS, weights_only=True)["model_state_dict"]
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("batchnorm", list(TAG))
@pytest.mark.parametrize("image", IMAGES)
def test_detections_match_reference(semi, batchnorm: str, image: str) -> None:
    ref = np.load(FIX / f"{image}_{TAG[batchnorm]}.npz")
    det = _model(batchnorm).postprocess(semi[batchnorm, image])
    idx = match_integer_keypoints(det.keypoints_int.numpy(), ref["keypoints_int"])
    np.testing.assert_allclose(det.scores.numpy()[idx], ref["scores"], rtol=0, atol=SCORE_ATOL)
    np.testing.assert_allclose(det.keypoints.numpy()[idx], ref["keypoints_subpixel_f64"], atol=1e-3)
    # The reference order, up to swaps of points whose scores are closer than the score
    # tolerance: such near-ties (down to 1e-8 apart) come out in either order on other CPU kernels.
    assert_order_up_to_ties(ref["scores"], idx, atol=SCORE_ATOL)


def test_without_subpixel_keypoints_are_the_nms_pixels(semi) -> None:
    ref = np.load(FIX / "image1_trainbn.npz")
    det = _model(subpixel=False).postprocess(semi["image", "image1"])
    np.testing.assert_array_equal(det.keypoints.numpy(), det.keypoints_int.numpy())
    idx = match_integer_keypoints(det.keypoints_int.numpy(), ref["keypoints_int"])
    assert_order_up_to_ties(ref["scores"], idx, atol=SCORE_ATOL)


def test_rgb_jpeg_gives_the_reference_gray_input() -> None:
    """The reference converts BGR data with RGB2GRAY (0.299 on blue); so do we, from RGB."""
    for image in IMAGES:
        rgb = np.asarray(Image.open(FIX / f"{image}.jpg").convert("RGB"))
        np.testing.assert_array_equal(_model().gray(rgb), _gray(image))
    standard = _model(gray_from_bgr=False).gray(rgb)
    np.testing.assert_array_equal(standard, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    assert not np.array_equal(standard, _gray("image1"))


def _match_subpixel(mine: np.ndarray, theirs: np.ndarray, atol: float = 1e-3) -> np.ndarray:
    """Index into `mine` of the keypoint within `atol` px of each of `theirs`, one to one."""
    assert len(mine) == len(theirs)
    dist = np.abs(np.asarray(theirs)[:, None] - mine[None]).max(axis=2)
    idx = dist.argmin(axis=1)
    assert dist[np.arange(len(idx)), idx].max() <= atol
    assert len(set(idx.tolist())) == len(idx)
    return idx


def test_extractor_keeps_the_reference_top_1000() -> None:
    """Default config (image-statistics BN, max_keypoints 1000) through a JPEG path."""
    ref = np.load(FIX / "image1_trainbn.npz")
    feats = MagicPoint(weights=str(WEIGHTS), resize_max=None).extract(FIX / "image1.jpg")
    assert len(feats) == 1000 and feats.descriptors.shape == (1000, 128)
    idx = _match_subpixel(feats.keypoints, ref["keypoints_subpixel_f64"][:1000])
    np.testing.assert_allclose(feats.scores[idx], ref["scores"][:1000], rtol=0, atol=SCORE_ATOL)
    assert np.all(np.diff(feats.scores) <= 0)
    assert np.all(feats.descriptors >= 0)  # RootSIFT: square roots
    np.testing.assert_allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # the default-config test above already runs the whole extractor
def test_extractor_with_running_statistics_matches_reference_as_sets() -> None:
    ref = np.load(FIX / "image0_evalbn.npz")
    feats = _model("running", max_keypoints=None).extract(_gray("image0"))
    idx = _match_subpixel(feats.keypoints, ref["keypoints_subpixel_f64"])
    np.testing.assert_allclose(feats.scores[idx], ref["scores"], rtol=0, atol=SCORE_ATOL)


def test_rootsift_descriptors_follow_the_keypoints() -> None:
    """Crop the same content at a (32, 16) px offset: interior keypoints and their descriptors
    must move with it (running BN keeps the net shift-equivariant for multiples of 8)."""
    gray = _gray("image1")[:336, :448]
    model = _model("running", max_keypoints=None)
    big, small = model.extract(gray), model.extract(gray[16:, 32:])
    inner = np.all((small.keypoints >= 64) & (small.keypoints < [416 - 64, 320 - 64]), axis=1)
    moved = small.keypoints[inner] + [32, 16]
    dist = np.abs(moved[:, None] - big.keypoints[None]).max(axis=2)
    partner, found = dist.argmin(axis=1), dist.min(axis=1) < 1e-2
    assert inner.sum() > 100 and found.mean() > 0.95
    desc_small, desc_big = small.descriptors[inner][found], big.descriptors[partner[found]]
    assert np.median(np.sum(desc_small * desc_big, axis=1)) > 0.999
    nearest = np.argmax(desc_small @ big.descriptors.T, axis=1)
    assert np.mean(nearest == partner[found]) > 0.9


def test_head_descriptors_use_the_reference_sampling() -> None:
    """The reference samples at x / (8w / 2) - 1 with align_corners: cell x * (w - 1) / (8w)."""
    torch.manual_seed(0)
    h, w = 6, 10
    desc = F.normalize(torch.randn(256, h, w), dim=0)
    kpts = torch.tensor([[0, 0], [79, 47], [17, 30], [40, 8], [63, 5]])
    out = sample_head_descriptors(desc, kpts).numpy()
    grid = desc.numpy()
    for row, (x, y) in zip(out, kpts.tolist(), strict=True):
        cx, cy = x * (w - 1) / (8 * w), y * (h - 1) / (8 * h)
        x0, y0 = int(cx), int(cy)
        x1, y1, ax, ay = min(x0 + 1, w - 1), min(y0 + 1, h - 1), cx - x0, cy - y0
        top = (1 - ax) * grid[:, y0, x0] + ax * grid[:, y0, x1]
        bottom = (1 - ax) * grid[:, y1, x0] + ax * grid[:, y1, x1]
        expected = (1 - ay) * top + ay * bottom
        np.testing.assert_allclose(row, expected / np.linalg.norm(expected), atol=1e-5)


def test_head_descriptor_option() -> None:
    model = _model(descriptor="head", max_keypoints=50)
    feats = model.extract(_gray("image0")[:160, :240])
    assert model.descriptor_dim == 256 and feats.descriptors.shape == (len(feats), 256)
    assert 0 < len(feats) <= 50
    np.testing.assert_allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, atol=1e-5)


def _greedy_brute_force(heatmap: np.ndarray, threshold: float, radius: int) -> np.ndarray:
    """The reference algorithm, one candidate at a time; ties go to the lower row-major index."""
    h, w = heatmap.shape
    ys, xs = np.nonzero(heatmap >= threshold)
    order = np.lexsort((ys * w + xs, -heatmap[ys, xs]))
    kept = np.zeros((h, w), bool)
    for y, x in zip(ys[order], xs[order], strict=True):
        window = kept[max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1]
        if not window.any():
            kept[y, x] = True
    return kept


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_greedy_nms_equals_the_sequential_algorithm(radius: int) -> None:
    rng = np.random.default_rng(radius)
    heatmap = np.round(rng.random((40, 56)) * 20) / 20  # coarse levels: many exact ties
    heatmap = heatmap.astype(np.float32)
    mine = greedy_nms(torch.from_numpy(heatmap), 0.5, radius).numpy()
    np.testing.assert_array_equal(mine, _greedy_brute_force(heatmap, 0.5, radius))


def test_bad_checkpoints_raise_checkpoint_error_naming_the_file(tmp_path) -> None:
    ckpt = torch.load(WEIGHTS, weights_only=True)
    state = ckpt["model_state_dict"]
    state["bnPb.running_average"] = state.pop("bnPb.running_mean")
    torch.save(ckpt, tmp_path / "renamed.pth.tar")
    with pytest.raises(CheckpointError, match=r"renamed\.pth\.tar.*bnPb\.running_mean"):
        MagicPoint(weights=str(tmp_path / "renamed.pth.tar"))
    torch.save([1, 2], tmp_path / "list.pth.tar")
    with pytest.raises(CheckpointError, match=r"list\.pth\.tar"):
        MagicPoint(weights=str(tmp_path / "list.pth.tar"))


def test_bare_state_dict_loads_too(tmp_path) -> None:
    state = torch.load(WEIGHTS, weights_only=True)["model_state_dict"]
    torch.save(state, tmp_path / "bare.pth")
    model = MagicPoint(weights=str(tmp_path / "bare.pth"))
    assert torch.equal(model.net.convPb.weight, state["convPb.weight"])


def test_missing_weights_say_which_file_and_where(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RETR_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="superPointNet_100000_checkpoint.pth.tar"):
        MagicPoint()


def test_reference_defaults_and_strict_config() -> None:
    conf = MagicPointConf()
    assert (conf.keypoint_threshold, conf.nms_radius, conf.remove_borders) == (0.015, 4, 4)
    assert conf.max_keypoints == 1000 and conf.subpixel and conf.gray_from_bgr
    assert (conf.batchnorm, conf.descriptor) == ("image", "rootsift")
    assert local_class("magicpoint") is MagicPoint
    assert _model().descriptor_dim == 128
    with pytest.raises(ConfigError, match="descriptor"):
        MagicPoint(weights=str(WEIGHTS), descriptor="sift")
    with pytest.raises(ConfigError, match="batchnorm"):
        MagicPoint(weights=str(WEIGHTS), batchnorm="eval")
