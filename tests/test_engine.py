"""Inference engines (features.engine): float32 parity of the exported graphs with PyTorch on
real images, the graph cache (reuse, damage, versions), and the fallbacks to PyTorch.

Tolerances: DISK's heatmap logits reach about 400 on these images, so 0.02 is a relative error
of 5e-5 (PyTorch's own float32-vs-float64 error at 640 px is 0.001, the engines' 0.006 at
most); descriptors are compared after L2 normalisation. The global descriptor is L2-normalised
and compared coordinate by coordinate.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import features.engine as engine_mod
from features.base import Plugin, PluginConf
from features.core import ConfigError
from features.delg.efficientnet import EfficientNetDELG
from features.engine import pick_engine, sidecar
from features.image import load_image, resize_max
from features.local.disk import DISK
from tests.conftest import DATA

ENGINES = ("onnxruntime", "openvino")
IMAGES = [
    DATA / "landmarks-mini/images/sacre_coeur/hloc_02928139_3448003521.jpg",
    DATA / "landmarks-mini/images/tower_bridge",
]


@pytest.fixture(scope="module", autouse=True)
def graph_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Graphs of this module go to a fresh cache (weights still resolve from their packages)."""
    folder = tmp_path_factory.mktemp("weights")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETR_WEIGHTS_DIR", str(folder))
        mp.delenv("RETR_ENGINE", raising=False)
        yield folder


def _image(i: int) -> np.ndarray:
    path = IMAGES[i]
    if path.is_dir():
        path = sorted(path.glob("*.jpg"))[0]
    return load_image(path)


def _exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every export the engine makes from now on."""
    seen: list[Path] = []
    real = engine_mod._export_to

    def counting(module: nn.Module, dest: Path) -> None:
        seen.append(dest)
        real(module, dest)

    monkeypatch.setattr(engine_mod, "_export_to", counting)
    return seen


# --- parity on real images ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def disk_torch() -> DISK:
    return DISK(engine="torch", device="cpu")


def _check_disk_dense(ref: torch.Tensor, out: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert float(ref[128].abs().max()) > 50  # a real heatmap, not a blank one
    assert float((out[128] - ref[128]).abs().max()) <= 2e-2
    unit_ref = torch.nn.functional.normalize(ref[:128], dim=0)
    unit_out = torch.nn.functional.normalize(out[:128], dim=0)
    assert float((unit_out - unit_ref).abs().max()) <= 1e-3


@pytest.mark.parametrize("engine", ENGINES)
def test_disk_dense_output_matches_pytorch(disk_torch: DISK, engine: str) -> None:
    disk = DISK(engine=engine, device="cpu")
    # Two sizes through one graph: height and width are dynamic, not the traced example's.
    for i, side in ((0, 320), (1, 272)):
        small = resize_max(_image(i), side)[0]
        _check_disk_dense(disk_torch.dense(small), disk.dense(small))
    assert disk.run_unet.active == engine


@pytest.mark.parametrize("engine", ENGINES)
def test_disk_keypoints_match_pytorch(disk_torch: DISK, engine: str) -> None:
    conf = {"resize_max": 320}
    ref = DISK(conf, engine="torch", device="cpu").extract(_image(0))
    out = DISK(conf, engine=engine, device="cpu").extract(_image(0))
    index = {tuple(k): j for j, k in enumerate(out.keypoints.tolist())}
    pairs = [
        (i, index[tuple(k)]) for i, k in enumerate(ref.keypoints.tolist()) if tuple(k) in index
    ]
    assert len(ref) > 500 and len(pairs) >= 0.99 * len(ref)
    ri, oi = np.array(pairs).T
    assert np.abs(ref.descriptors[ri] - out.descriptors[oi]).max() <= 1e-3
    assert np.abs(ref.scores[ri] - out.scores[oi]).max() <= 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_disk_dense_output_matches_pytorch_at_640(disk_torch: DISK, engine: str) -> None:
    small = resize_max(_image(0), 640)[0]
    _check_disk_dense(disk_torch.dense(small), DISK(engine=engine, device="cpu").dense(small))


def _global(engine: str, resize: int) -> EfficientNetDELG:
    return EfficientNetDELG({"variant": "lite2", "resize_max": resize}, engine=engine, device="cpu")


@pytest.mark.parametrize("engine", ENGINES)
def test_global_descriptor_matches_pytorch(engine: str) -> None:
    ref_model, model = _global("torch", 256), _global(engine, 256)
    for i in (0, 1):
        ref, out = ref_model.extract(_image(i)), model.extract(_image(i))
        assert np.abs(out - ref).max() <= 1e-5
    assert model.run_backbone.active == engine
    # The batch axis is dynamic too: two images of one size in one call.
    x = torch.stack(
        [ref_model._normalise(resize_max(_image(i), 192)[0][:128, :128])[0] for i in (0, 1)]
    )
    with torch.inference_mode():
        want = ref_model.run_backbone(x)
    got = model.run_backbone(x)
    assert got.shape == want.shape and got.shape[0] == 2
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_default_global_model_matches_pytorch_at_its_scales(engine: str) -> None:
    ref, out = _global("torch", 512).extract(_image(0)), _global(engine, 512).extract(_image(0))
    assert np.abs(out - ref).max() <= 1e-5


def test_engine_is_not_part_of_the_fingerprint() -> None:
    fingerprints = {DISK(engine=e, device="cpu").fingerprint for e in ("torch",) + ENGINES}
    assert len(fingerprints) == 1


def test_engine_choice_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETR_ENGINE", "onnxruntime")
    assert pick_engine(None) == "onnxruntime" and pick_engine("torch") == "torch"
    monkeypatch.delenv("RETR_ENGINE")
    assert pick_engine(None) == engine_mod.DEFAULT_ENGINE
    with pytest.raises(ConfigError, match="onnxruntime, openvino"):
        pick_engine("tensorrt")


# --- the cache and the fallbacks, on a small network ---------------------------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class NotExportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=3)[0]  # no ONNX symbolic in opset 17


class Small(Plugin):
    name = "small"
    Conf = PluginConf
    role = "test model"
    net: nn.Module = SmallNet()

    def _init(self) -> None:
        self.run = self.dense_runner(self.net.eval(), "net")


class Broken(Small):
    name = "broken"
    net = NotExportable()


def _run(plugin: Small) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return plugin.run(x), plugin.net(x)


@pytest.mark.parametrize("engine", ENGINES)
def test_second_load_reuses_the_cached_graph(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    exports = _exports(monkeypatch)
    first = Small(engine=engine)
    out, ref = _run(first)
    assert first.run.active == engine and len(exports) == 1
    assert float((out - ref).abs().max()) <= 1e-5
    second = Small(engine=engine)
    out, _ = _run(second)
    assert second.run.active == engine and len(exports) == 1  # no second export
    assert second.run.graph_path == first.run.graph_path
    assert float((out - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no sidecar"])
def test_damaged_graph_is_rebuilt_not_loaded(monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    built = Small(engine="onnxruntime").run
    built.prepare()
    graph = built.graph_path
    assert graph is not None and graph.is_file()
    size = graph.stat().st_size
    if damage == "garbage":
        graph.write_bytes(np.random.default_rng(0).bytes(size))
    elif damage == "truncated":
        graph.write_bytes(graph.read_bytes()[: size // 2])
    else:
        sidecar(graph).unlink()
    exports = _exports(monkeypatch)
    plugin = Small(engine="onnxruntime")
    out, ref = _run(plugin)
    assert plugin.run.active == "onnxruntime" and exports and len(exports) == 1
    assert float((out - ref).abs().max()) <= 1e-5
    assert graph.stat().st_size == size and sidecar(graph).is_file()


def test_graph_of_other_versions_is_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    old = Small(engine="openvino").run
    old.prepare()
    real = engine_mod.engine_versions
    monkeypatch.setattr(engine_mod, "engine_versions", lambda e: {**real(e), "torch": "99.0"})
    exports = _exports(monkeypatch)
    new = Small(engine="openvino").run
    assert new.prepare() == "openvino" and len(exports) == 1
    assert new.graph_path != old.graph_path
    assert old.graph_path is not None and not old.graph_path.exists()  # stale sibling removed


@pytest.mark.parametrize("engine", ENGINES)
def test_missing_engine_falls_back_to_pytorch_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, engine: str
) -> None:
    monkeypatch.setitem(sys.modules, engine, None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="features.engine"):
        plugin = Small(engine=engine)
        out, ref = _run(plugin)
        _run(plugin)
    assert plugin.run.active == "torch" and torch.equal(out, ref)
    lines = [r.getMessage() for r in caplog.records if r.name == "features.engine"]
    assert len(lines) == 1 and "not installed" in lines[0] and "\n" not in lines[0]


def test_failed_export_falls_back_to_pytorch_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="features.engine"):
        plugin = Broken(engine="onnxruntime")
        out, ref = _run(plugin)
        _run(plugin)
    assert plugin.run.active == "torch" and torch.equal(out, ref)
    lines = [r.getMessage() for r in caplog.records if r.name == "features.engine"]
    assert len(lines) == 1 and "cummax" in lines[0] and "\n" not in lines[0]
    assert all(r.exc_info is None for r in caplog.records)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "IR graph" not in captured.out + captured.err
    assert not list(Path(engine_mod.cache_dir(), "graphs").glob("broken-net-*"))
