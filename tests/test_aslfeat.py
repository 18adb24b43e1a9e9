"""ASLFeat parity with the official lzx551402/ASLFeat TensorFlow extractor
(../shared/fixtures/aslfeat, random weights), and the checkpoint converter.

The weights go through `map_variables`, the converter's TF-free half, exactly as a real
checkpoint does after it is read. Measured float32 noise of the network (TF vs this port, and this
port in float32 vs float64) grows to ~2e-4 on the raw descriptor map after three deformable
layers, so a few tolerances below bound the worst element and a tight bound holds for 99.5%.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from features.convert.aslfeat import convert_aslfeat, map_variables
from features.core import CheckpointError, ConfigError, WeightsNotFoundError
from features.image import load_image
from features.local.aslfeat import (
    OFFICIAL_NAMES,
    ASLFeat,
    ASLFeatConf,
    ScaleFeatures,
    resize_bilinear_tf1,
    tf_same_pad,
)
from tests.conftest import fixture_dir, require_tensorflow

FIX = fixture_dir("aslfeat")
SINGLE_SCALE = {"pyramid": False, "max_keypoints": 5000, "resize_max": 2000}
"""The official configs/hseq_eval.yaml (multi_scale false, kpt_n 5000, max_dim 2000)."""


def _variables() -> dict[str, np.ndarray]:
    with np.load(FIX / "variables.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("aslfeat") / "aslfeat_v2.pt"
    torch.save(map_variables(_variables()), path)
    return path


@pytest.fixture(scope="module")
def aslfeat(weights: Path) -> ASLFeat:
    return ASLFeat(weights=str(weights))


def _gray(image: str) -> np.ndarray:
    return np.load(FIX / f"{image}_input.npz")["image_gray_uint8"]


@pytest.fixture(scope="module")
def levels0(aslfeat: ASLFeat) -> list[ScaleFeatures]:
    """The default (multi-scale) pyramid of image0; level 0 is the official base-scale graph."""
    return aslfeat.detect_pyramid(_gray("image0"))


def _match(mine: np.ndarray, theirs: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest keypoints closer than `tol` px -> (indices into mine, into theirs)."""
    matcher = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True)
    pairs = [m for m in matcher.match(theirs.astype(np.float32), mine.astype(np.float32))]
    pairs = [m for m in pairs if m.distance <= tol]
    return np.array([m.trainIdx for m in pairs]), np.array([m.queryIdx for m in pairs])


def _assert_parity(kpts, scores, desc, ref) -> None:
    """The README's comparison: as sets, >= 99.5% of the official keypoints within 1e-3 px."""
    assert len(kpts) == len(ref["keypoints"])
    i, j = _match(kpts, ref["keypoints"], tol=1e-3)
    assert len(j) >= 0.995 * len(ref["keypoints"])
    assert np.abs(scores[i] - ref["scores"][j]).max() <= 1e-4
    err = np.abs(desc[i] - ref["descriptors"][j]).max(axis=1)
    assert np.quantile(err, 0.995) <= 1e-4
    assert err.max() <= 1e-3


def test_grey_input_matches_the_official_loader() -> None:
    for image in ("image0", "image1"):
        rgb = load_image(FIX / f"{image}.jpg")
        np.testing.assert_array_equal(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), _gray(image))


def test_tf1_resize_and_same_padding_conventions() -> None:
    x = torch.arange(4.0).view(1, 1, 1, 4)
    out = resize_bilinear_tf1(x, (1, 8))  # source index = i * 4/8, no half-pixel shift
    assert out.flatten().tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]
    even, odd = torch.ones(1, 1, 4, 4), torch.ones(1, 1, 5, 5)
    assert tf_same_pad(even, stride=2)[0, 0].sum(1).tolist() == [4, 4, 4, 4, 0]
    assert tf_same_pad(odd, stride=2)[0, 0].sum(1).tolist() == [0, 5, 5, 5, 5, 5, 0]


def test_dense_maps_match_official(aslfeat: ASLFeat) -> None:
    ref = np.load(FIX / "image0_dense.npz")
    record: dict = {}
    out = {k: v.numpy() for k, v in aslfeat.dense(_gray("image0"), record).items()}
    for level in ("conv1", "conv3"):  # before the deformable layers: float32 rounding only
        assert np.abs(out[f"score_level_{level}"] - ref[f"score_level_{level}"]).max() <= 1e-5
    assert np.abs(out["score_level_conv6"] - ref["score_level_conv6"]).max() <= 1e-4
    assert np.abs(out["score_map"] - ref["score_map"]).max() <= 1e-4
    desc_err = np.abs(out["desc_map"].transpose(1, 2, 0)[::3, ::3] - ref["desc_map_conv6_sub3"])
    assert np.quantile(desc_err, 0.995) <= 1e-4 and desc_err.max() <= 1e-3
    for layer, step in (("conv6_0", 2), ("conv6_1", 4), ("conv6", 4)):
        for kind, tol in (("offset", 1e-3), ("amplitude", 1e-4)):
            mine = record[layer][kind].numpy().transpose(1, 2, 0)[::step, ::step]
            assert np.abs(mine - ref[f"dcn_{kind}_{layer}_sub{step}"]).max() <= tol


def test_base_scale_candidates_match_official(levels0: list[ScaleFeatures]) -> None:
    ref = np.load(FIX / "image0_dense.npz")
    found = levels0[0]
    assert abs(len(found.scores) - len(ref["base_scores"])) <= 0.005 * len(ref["base_scores"])
    mine = {p: i for i, p in enumerate(map(tuple, found.pixels.tolist()))}
    theirs = {p: j for j, p in enumerate(map(tuple, ref["base_kpt_inds_int"].tolist()))}
    common = [k for k in theirs if k in mine]
    assert len(common) >= 0.995 * len(theirs)
    i = np.array([mine[k] for k in common])
    j = np.array([theirs[k] for k in common])
    assert np.abs(found.scores.numpy()[i] - ref["base_scores"][j]).max() <= 1e-4
    kpt_err = np.abs(found.keypoints.numpy()[i] - ref["base_kpts"][j]).max(axis=1)
    assert np.quantile(kpt_err, 0.995) <= 1e-3 and kpt_err.max() <= 0.05


@pytest.mark.parametrize("image", ["image0", "image1"])
def test_single_scale_matches_official(weights: Path, image: str) -> None:
    single = ASLFeat(weights=str(weights), **SINGLE_SCALE)
    feats = single.extract(FIX / f"{image}.jpg")
    _assert_parity(
        feats.keypoints, feats.scores, feats.descriptors, np.load(FIX / f"{image}_single_scale.npz")
    )
    assert np.all(np.diff(feats.scores) <= 0)


def _official_merge(levels: list[ScaleFeatures], size: tuple[int, int], n: int):
    """feat_model._run: level keypoints times (W/w, H/h), concatenated, top n by score.
    Also returns the shift retr adds to reach pixel-centre coordinates, 0.5 * (W/w - 1)."""
    ratios = [np.array(np.divide(size, level.size), np.float32) for level in levels]
    kpts = np.concatenate([lv.keypoints.numpy() * r for lv, r in zip(levels, ratios, strict=True)])
    shift = np.concatenate(
        [np.tile(0.5 * (r - 1), (len(lv.scores), 1)) for lv, r in zip(levels, ratios, strict=True)]
    )
    scores = np.concatenate([lv.scores.numpy() for lv in levels])
    desc = np.concatenate([lv.descriptors.numpy() for lv in levels])
    order = np.argsort(-scores, kind="stable")[:n]
    return kpts[order], scores[order], desc[order], shift[order]


def test_default_multi_scale_matches_official(
    aslfeat: ASLFeat, levels0: list[ScaleFeatures]
) -> None:
    assert [lv.size for lv in levels0] == [(640, 412), (453, 291), (320, 206)]
    kpts, scores, desc, shift = _official_merge(levels0, (640, 412), 8000)
    _assert_parity(kpts, scores, desc, np.load(FIX / "image0_default.npz"))
    feats = aslfeat.extract(FIX / "image0.jpg")  # the default config, from the file
    np.testing.assert_allclose(feats.keypoints, kpts + shift, atol=1e-4)
    np.testing.assert_array_equal(feats.scores, scores)
    np.testing.assert_allclose(feats.descriptors, desc, atol=1e-6)  # renormalised by the base


def test_resize_max_downscales_and_maps_back_to_original_pixels(weights: Path) -> None:
    small = ASLFeat(weights=str(weights), pyramid=False, resize_max=320, max_keypoints=500)
    gray = _gray("image0")
    (level,) = small.detect_pyramid(gray)
    assert level.size == (320, 206)  # cv2.resize(fx=fy=320/640), as the official code
    feats = small.extract(np.repeat(gray[:, :, None], 3, axis=2))
    expected = (level.keypoints.numpy() + 0.5) * np.array([640 / 320, 412 / 206]) - 0.5
    np.testing.assert_allclose(feats.keypoints, expected, atol=1e-4)
    assert feats.image_size == (640, 412) and len(feats) == 500


@pytest.mark.slow
def test_default_multi_scale_matches_official_image1(aslfeat: ASLFeat) -> None:
    levels = aslfeat.detect_pyramid(_gray("image1"))
    assert [lv.size for lv in levels] == [(640, 480), (453, 339), (320, 240)]
    kpts, scores, desc, _ = _official_merge(levels, (640, 480), 8000)
    _assert_parity(kpts, scores, desc, np.load(FIX / "image1_default.npz"))


def test_defaults_are_the_official_matching_config() -> None:
    conf = ASLFeatConf()
    assert set(OFFICIAL_NAMES.values()) <= set(ASLFeatConf.model_fields)
    assert (conf.max_keypoints, conf.resize_max, conf.pyramid) == (8000, 2048, True)
    assert (conf.score_threshold, conf.edge_threshold) == (0.5, 10.0)
    assert (conf.nms_radius, conf.remove_borders, conf.subpixel) == (1, 5, True)  # nms_size 3


def test_map_variables_lays_kernels_out_as_oihw() -> None:
    variables = _variables()
    state = map_variables(variables)
    assert len(state) == len(variables) == 40
    tf_kernel = variables["deform_param/conv6/offset/kernel"].astype(np.float32)
    torch_kernel = state["conv6.conv.offset.weight"].numpy()
    assert torch_kernel.shape == (18, 128, 3, 3)
    assert torch_kernel[5, 7, 0, 2] == tf_kernel[0, 2, 7, 5]
    assert state["instance_max.conv3"].item() == pytest.approx(7.73828125)


def test_map_variables_names_every_unmapped_and_missing_variable() -> None:
    variables = _variables()
    del variables["conv3/bn/moving_mean"]
    variables["conv6/weights"] = variables.pop("conv6/kernel")
    variables["deform_param/conv6/ori/kernel"] = np.zeros((3, 3, 128, 2), np.float16)
    with pytest.raises(CheckpointError) as err:
        map_variables(variables)
    for name in ("conv6/weights", "deform_param/conv6/ori/kernel"):
        assert name in str(err.value)
    for key in ("conv3.bn.running_mean", "conv6.conv.weight"):
        assert key in str(err.value)


def test_map_variables_rejects_wrong_shapes_and_skips_optimizer_state() -> None:
    variables = _variables()
    variables["conv0/kernel/Adam"] = variables["conv0/kernel"]
    variables["global_step"] = np.array(60000)
    assert len(map_variables(variables)) == 40
    variables["conv2/kernel"] = np.zeros((3, 3, 64, 32), np.float32)
    with pytest.raises(CheckpointError, match="conv2/kernel"):
        map_variables(variables)


def test_checkpoint_with_a_renamed_key_is_refused(tmp_path: Path) -> None:
    state = map_variables(_variables())
    state["conv6.conv.kernel"] = state.pop("conv6.conv.weight")
    path = tmp_path / "renamed.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="renamed.pt") as err:
        ASLFeat(weights=str(path))
    assert "conv6.conv.weight" in str(err.value)


def test_missing_weights_say_how_to_convert_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RETR_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="retr convert aslfeat") as err:
        ASLFeat()
    assert str(tmp_path / "aslfeat_v2.pt") in str(err.value)


def test_convert_without_tensorflow_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import now fails even if installed
    with pytest.raises(ConfigError, match=r"pip install 'retr\[tf\]'"):
        convert_aslfeat(tmp_path / "model.ckpt-60000", tmp_path / "out.pt")


def test_convert_reads_a_tensorflow_checkpoint(tmp_path: Path) -> None:
    tf = require_tensorflow()
    variables = {k: v.astype(np.float32) for k, v in _variables().items()}
    prefix = str(tmp_path / "model.ckpt-60000")
    names = sorted(variables)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(variables[n]) for n in names],
    )
    out = convert_aslfeat(prefix + ".index", tmp_path / "aslfeat_v2.pt")
    state = torch.load(out, weights_only=True)
    expected = map_variables(variables)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
