"""MDA on seeded random weights: no official code or weights exist, so these tests check the
architecture, the checkpoint layout, the selection and the pixel mapping against answers computed
by hand (docs/mda_checkpoint.md, features/local/mda.py)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from features.core import CheckpointError, ConfigError, ImageReadError, WeightsNotFoundError
from features.local.mda import (
    FORMAT,
    HOW_SCALES,
    MDA,
    OFFICIAL_NAMES,
    Level,
    MdaArch,
    MDANet,
    backbone_from_torchvision,
    cell_centres,
    resnet_trunk,
    save_checkpoint,
    select_local,
)
from features.registry import local_class

PHOTO = "data/landmarks-mini/images/sacre_coeur/hloc_03903474_1471484089.jpg"


def _random_net(seed: int = 0, **arch: object) -> MDANet:
    """A fresh network whose mapping and heads are perturbed, so that the heads differ."""
    torch.manual_seed(seed)
    net = MDANet(MdaArch.model_validate(arch))
    with torch.no_grad():
        net.channel_map.weight.add_(0.05 * torch.randn_like(net.channel_map.weight))
        for head in net.heads:
            head.indicator.weight.normal_(0.0, 0.01)
            head.indicator.bias.uniform_(0.0, 1.0)
    return net.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(_random_net(), tmp_path_factory.mktemp("mda") / "mda_r50.pt")


@pytest.fixture(scope="module")
def mda(ckpt: Path) -> MDA:
    return MDA(weights=str(ckpt))


@pytest.fixture(scope="module")
def photo(shared: Path) -> np.ndarray:
    """A real landmark photo (1024x659) shrunk to 128x82 to keep the pyramid cheap."""
    bgr = cv2.imread(str(shared / PHOTO))
    assert bgr is not None
    return cv2.cvtColor(cv2.resize(bgr, (128, 82), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def _cells(h: int, w: int, scales: tuple[float, ...]) -> int:
    """Pyramid locations: each kept scale gives ceil(floor(side * s) / 16) cells per side."""
    kept = [s for s in scales if math.floor(min(h, w) * s) >= 16]
    return sum(math.ceil(math.floor(h * s) / 16) * math.ceil(math.floor(w * s) / 16) for s in kept)


def test_defaults_are_how_and_registry_finds_mda(mda: MDA) -> None:
    assert local_class("mda") is MDA
    assert mda.conf.max_keypoints == 1000 and mda.conf.resize_max == 1024
    assert mda.conf.pyramid == HOW_SCALES and mda.descriptor_dim == 128 and mda.num_heads == 4
    assert set(OFFICIAL_NAMES.values()) <= set(MDA.Conf.model_fields)
    with pytest.raises(ConfigError, match="scales.*pyramid"):  # HOW's name for it is refused
        MDA(weights=mda.conf.weights, scales=(1.0,))
    with pytest.raises(ConfigError, match="pyramid"):
        MDA(weights=mda.conf.weights, pyramid=(1.0, -0.5))


def test_dense_outputs_and_output_contract(mda: MDA, photo: np.ndarray) -> None:
    dense = mda.dense(photo)
    assert dense.attention.shape == (4, 6, 8) and dense.descriptors.shape == (128, 6, 8)
    assert bool((dense.attention > 0).all())
    feats = mda.extract(photo)
    assert len(feats) == _cells(82, 128, HOW_SCALES) < 1000
    assert feats.keypoints.dtype == np.float32 and feats.descriptors.shape == (len(feats), 128)
    assert feats.scores.dtype == np.float32 and feats.descriptors.dtype == np.float32
    assert np.all(np.diff(feats.scores) <= 0) and feats.scores[0] == pytest.approx(1.0)
    assert feats.scores[-1] > 0
    np.testing.assert_allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, atol=1e-5)
    assert feats.image_size == (128, 82)
    assert np.all(feats.keypoints >= -0.5) and np.all(feats.keypoints <= [127.5, 81.5])


def test_extract_keeps_the_strongest_attention_cells(ckpt: Path, photo: np.ndarray) -> None:
    """Single scale, 5 features: the cells of largest max-over-heads attention, by hand."""
    mda = MDA(weights=str(ckpt), pyramid=(1.0,), max_keypoints=5)
    dense = mda.dense(photo)
    strength = dense.attention.amax(0)
    best = torch.topk(strength.flatten(), 5).indices
    rows, cols = best // strength.shape[1], best % strength.shape[1]
    feats = mda.extract(photo)
    np.testing.assert_array_equal(feats.keypoints, torch.stack([cols, rows], 1).numpy() * 16.0)
    expected = (strength.flatten()[best] / strength.max()).numpy()
    np.testing.assert_allclose(feats.scores, expected, rtol=1e-6)
    desc = F.normalize(dense.descriptors[:, rows, cols].T, dim=1).numpy()
    np.testing.assert_allclose(feats.descriptors, desc, atol=1e-6)


def test_selection_ranks_all_heads_together_and_keeps_a_location_once() -> None:
    """Two levels, two heads, known maxima: location (1, 2) fires in both heads but comes once."""
    att_a = torch.zeros(2, 3, 4)
    att_a[0, 1, 2], att_a[1, 1, 2], att_a[1, 0, 0] = 5.0, 1.0, 8.0
    att_b = torch.full((2, 2, 2), 0.1)
    att_b[1, 1, 1], att_b[0, 0, 1] = 10.0, 4.0
    ids_a = torch.arange(12.0).view(1, 3, 4).repeat(3, 1, 1)
    ids_b = 100 + torch.arange(4.0).view(1, 2, 2).repeat(3, 1, 1)
    levels = [Level(1.0, att_a, ids_a), Level(0.5, att_b, ids_b)]
    xy, scores, desc = select_local(levels, 4)
    np.testing.assert_allclose(scores.numpy(), [1.0, 0.8, 0.5, 0.4])
    np.testing.assert_allclose(desc[:, 0].numpy(), [103, 0, 6, 101])
    np.testing.assert_allclose(xy.numpy(), [[32.5, 32.5], [0, 0], [32, 16], [32.5, 0.5]])
    assert len(select_local(levels, None)[1]) == 12 + 4


def test_cell_centre_is_the_receptive_field_centre() -> None:
    """With positive weights every path is active, so the input pixels that reach cell (i, j) are
    exactly its receptive field (267 px); the centre of their bounding box must be (16 j, 16 i).
    The max pool becomes an average pool of the same geometry (a max passes gradient to one pixel).
    """
    trunk = resnet_trunk((3, 4, 6))
    trunk[3] = nn.AvgPool2d(3, 2, padding=1)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
    trunk.eval()
    x = torch.ones(1, 3, 304, 320, requires_grad=True)
    out = trunk(x)
    centres = cell_centres(*out.shape[-2:], 1.0).view(*out.shape[-2:], 2)
    i, j = 9, 11  # a cell whose whole field lies inside the image; i != j catches an x/y swap
    (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x)
    ys, xs = torch.nonzero(grad[0].abs().sum(0) > 0, as_tuple=True)
    assert xs.max() - xs.min() + 1 == 267 and ys.max() - ys.min() + 1 == 267
    found = [float(xs.min() + xs.max()) / 2, float(ys.min() + ys.max()) / 2]
    assert found == centres[i, j].tolist() == [16.0 * j, 16.0 * i]


@pytest.mark.parametrize("scale", [2.0, 1.414, 0.707, 0.353])
def test_cell_centres_follow_the_pyramid_resize(scale: float) -> None:
    """Resizing a ramp of x coordinates the way MDA.dense does tells, at each resized pixel, which
    original x it samples: at pixel 16 j it must be the centre cell_centres reports."""
    w = 200
    ramp = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, 4, w)
    resized = F.interpolate(ramp, scale_factor=scale, mode="bilinear", align_corners=False)
    cols = torch.arange(0, resized.shape[-1], 16)
    expected = cell_centres(1, len(cols), scale)[:, 0]
    inside = (expected >= 0) & (expected <= w - 1)  # bilinear clamps outside the image
    assert int(inside.sum()) >= len(cols) - 1
    np.testing.assert_allclose(resized[0, 0, 0, cols][inside], expected[inside], atol=1e-4)


def test_downscaled_image_maps_keypoints_back(ckpt: Path, shared: Path) -> None:
    """Extracting from 256x164 with resize_max=128 equals extracting from the 128x82 image the
    base class resizes to, with keypoints mapped by x_big = (x_small + 0.5) * 2 - 0.5."""
    bgr = cv2.resize(cv2.imread(str(shared / PHOTO)), (256, 164), interpolation=cv2.INTER_AREA)
    big = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    small = cv2.resize(big, (128, 82), interpolation=cv2.INTER_AREA)
    scales = (1.414, 0.707)
    on_big = MDA(weights=str(ckpt), resize_max=128, pyramid=scales).extract(big)
    on_small = MDA(weights=str(ckpt), resize_max=None, pyramid=scales).extract(small)
    assert on_big.image_size == (256, 164) and len(on_big) == len(on_small) > 0
    np.testing.assert_allclose(on_big.keypoints, (on_small.keypoints + 0.5) * 2 - 0.5, atol=1e-4)
    np.testing.assert_allclose(on_big.scores, on_small.scores, atol=1e-6)
    np.testing.assert_allclose(on_big.descriptors, on_small.descriptors, atol=1e-6)
    assert np.all(on_big.keypoints >= -0.5) and np.all(on_big.keypoints <= [255.5, 163.5])


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.5)])
def test_global_descriptor_is_the_attention_weighted_sum(
    mda: MDA, photo: np.ndarray, scales: tuple[float, ...]
) -> None:
    levels = [mda.dense(photo, s) for s in scales]
    pooled = sum((lv.attention[:, None] * lv.descriptors[None]).sum((2, 3)) for lv in levels)
    by_hand = (pooled / pooled.norm(dim=1, keepdim=True)).numpy()
    heads = mda.head_descriptors(photo, scales)
    assert heads.shape == (4, 128)
    np.testing.assert_allclose(heads, by_hand, atol=1e-5)
    assert np.abs(heads[1:] - heads[0]).max(axis=1).min() > 1e-3  # a swapped head would fail
    glob = mda.global_descriptor(photo, scales)
    np.testing.assert_allclose(glob, by_hand.reshape(-1) / 2.0, atol=1e-5)
    assert glob.shape == (512,) and np.linalg.norm(glob) == pytest.approx(1.0, abs=1e-5)


def test_fresh_network_attention_is_how_per_channel_group() -> None:
    """Training starts from HOW: identity mapping and unit indicators give each head the L2 norm
    of its channel group of the backbone map."""
    torch.manual_seed(1)
    net = MDANet().eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        attention, _ = net(x)
        feats = net.backbone(x)
    how = torch.stack([g.norm(dim=1)[0] for g in feats.split(256, dim=1)])
    np.testing.assert_allclose(attention[0].numpy(), how.numpy(), rtol=1e-4)


def test_checkpoint_round_trip_gives_identical_outputs(
    mda: MDA, photo: np.ndarray, tmp_path: Path
) -> None:
    again = MDA(weights=str(save_checkpoint(mda, tmp_path / "copy.pt")), pyramid=(1.0, 0.5))
    first = MDA(weights=mda.conf.weights, pyramid=(1.0, 0.5))
    a, b = first.extract(photo), again.extract(photo)
    assert len(a) > 0
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    raw = torch.load(tmp_path / "copy.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["config"]["num_heads"] == 4


def _broken(ckpt: Path, tmp_path: Path, how: str) -> Path:
    raw = torch.load(ckpt, weights_only=True)
    state = raw["state_dict"]
    if how == "missing key":
        del state["heads.3.indicator.bias"]
    elif how == "renamed key":
        state["reduction.kernel"] = state.pop("reduction.weight")
    elif how == "extra key":
        state["backbone.7.0.conv1.weight"] = torch.zeros(1)
    elif how == "wrong format":
        raw["format"] = "retr-mda-v0"
    elif how == "bare state dict":
        raw = state
    elif how == "unknown config key":
        raw["config"]["heads"] = 4
    elif how == "config disagrees with weights":
        raw["config"]["num_heads"] = 8
    path = tmp_path / "broken.pt"
    torch.save(raw, path)
    return path


@pytest.mark.parametrize(
    "how",
    [
        "missing key",
        "renamed key",
        "extra key",
        "wrong format",
        "bare state dict",
        "unknown config key",
        "config disagrees with weights",
    ],
)
def test_wrong_checkpoint_raises_naming_the_file(ckpt: Path, tmp_path: Path, how: str) -> None:
    path = _broken(ckpt, tmp_path, how)
    with pytest.raises(CheckpointError, match="broken.pt"):
        MDA(weights=str(path))


def test_image_too_small_for_every_scale_is_refused(ckpt: Path) -> None:
    tiny = np.full((40, 60, 3), 128, np.uint8)
    with pytest.raises(ImageReadError, match="too small"):
        MDA(weights=str(ckpt), pyramid=(0.25,)).extract(tiny)


def test_missing_weights_say_where_to_put_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RETR_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="mda_r50.pt") as err:
        MDA()
    assert str(tmp_path / "mda_r50.pt") in str(err.value) and "save_checkpoint" in str(err.value)


def test_torchvision_backbone_names_map_onto_mda() -> None:
    """Keys and shapes of torchvision's resnet50 land on MDANet's backbone; layer4 and fc drop."""
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.5.bn3.running_var": (1024,),
        "layer4.0.conv1.weight": (512, 1024, 1, 1),
        "fc.weight": (1000, 2048),
    }
    mapped = backbone_from_torchvision({k: torch.zeros(v) for k, v in shapes.items()})
    ours = MDANet().state_dict()
    assert len(mapped) == 5
    for key, value in mapped.items():
        assert ours[key].shape == value.shape, key
    assert "backbone.6.5.bn3.running_var" in mapped


@pytest.mark.slow
def test_default_extraction_on_a_full_size_photo(ckpt: Path, shared: Path) -> None:
    """Official settings on a 1024x659 photo: seven scales, 1000 features inside the image."""
    feats = MDA(weights=str(ckpt)).extract(shared / PHOTO)
    assert len(feats) == 1000 and feats.image_size == (1024, 659)
    assert np.all(feats.keypoints >= -0.5) and np.all(feats.keypoints <= [1023.5, 658.5])
    on_grid = (feats.keypoints + 0.5) * np.array(HOW_SCALES)[:, None, None] - 0.5
    assert np.all(np.isclose(on_grid / 16, np.round(on_grid / 16), atol=1e-3).all(-1).any(0))


@pytest.mark.slow
def test_resnet101_checkpoint_round_trip(tmp_path: Path, photo: np.ndarray) -> None:
    path = save_checkpoint(_random_net(3, architecture="resnet101", num_heads=2), tmp_path / "r.pt")
    mda = MDA(weights=str(path), pyramid=(1.0,))
    assert mda.num_heads == 2 and mda.dense(photo).attention.shape == (2, 6, 8)
    assert len(mda.extract(photo)) == 48
