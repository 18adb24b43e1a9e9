"""Inference engines for a plug-in's dense network: PyTorch, ONNX Runtime or OpenVINO.

A plug-in routes its dense forward pass (DISK's U-Net, the EfficientNet-Lite backbone of the
global model) through `Plugin.dense_runner` (features.base), which returns a `DenseRunner`:
a callable (B, 3, H, W) float32 tensor -> (B, C, H', W') tensor. With the engine "torch" it is the
module itself; otherwise, on first call, the module is exported to ONNX with dynamic batch, height
and width, and the graph is run by the engine. Everything after the dense pass (NMS, sampling,
GeM, aggregation) stays in PyTorch.

Choosing the engine: the `engine` argument of a plug-in (like `device`), else the environment
variable `RETR_ENGINE` (torch | onnxruntime | openvino), else DEFAULT_ENGINE. The engine is not a
config field on purpose: config fields enter the plug-in's fingerprint, which feature stores
record and refuse to mix, and float32 outputs of every engine match PyTorch within the tolerances
of tests/test_engine.py (far inside what NMS ties and RANSAC notice), so an index built with one
engine keeps accepting queries from another. Engines are CPU-only here: on another device the
runner is the module.

DEFAULT_ENGINE is "onnxruntime", by measurement (scripts/bench_engine.py, docs/results.md): on
this project's 2-core AVX-512 CPU, in float32, it ran DISK at 640 px 1.28x (one thread) and
1.65x (two threads) faster than PyTorch against OpenVINO's 1.13x and 1.48x, and the
EfficientNet-Lite2 pyramid 3.3x faster (one thread) against OpenVINO's 2.9x, in the same runs;
it is also the smaller dependency. Lower precisions change the outputs, so they are not offered
as an engine (they would have to enter the fingerprint): the benchmark measures them (OpenVINO
bf16 is the fastest, 4.1x on DISK, but keeps 94% of DISK's keypoints; int8 keeps 86%).

The exported graph is cached beside the weights (features.weights.cache_dir()/graphs), named by
the plug-in's fingerprint and a digest of the versions that could change it (this recipe, torch,
onnx, the opset, the engine and its version); it is written atomically (temp file, fsync,
os.replace) with a JSON sidecar holding its SHA-256, so a process reuses it and never exports
again, a damaged graph is rebuilt instead of loaded, and a graph of other versions is never
opened (its stale siblings are removed when the new one is written). A missing engine, a failed
export (an op ONNX cannot express) or a graph the engine cannot load falls back to PyTorch with
one warning line.

Numerics: InstanceNorm (DISK) is exported as explicit means reduced over W, then over H. With
ONNX's InstanceNormalization, or one ReduceMean over H x W (about 10^5 values per channel at
640 px), DISK's heatmap (logits up to about 420) ended 0.07 (ONNX Runtime) and 0.56 (OpenVINO)
away from PyTorch; with the two shorter reductions 0.001 and 0.006, against 0.0013 between
PyTorch's float32 and float64 (measured on a landmarks-mini image).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from features.core import ConfigError, file_sha256
from features.weights import cache_dir

logger = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime", "openvino")
DEFAULT_ENGINE = "onnxruntime"
ENV = "RETR_ENGINE"
OPSET = 17
RECIPE = 1
"""Version of the export recipe below; bumping it rebuilds every cached graph."""
EXAMPLE_SIDE = 64
"""Side of the dummy input the graph is traced with (a multiple of 32: every plug-in accepts it)."""

Array = np.ndarray
Session = Callable[[Array], Array]


def pick_engine(engine: str | None) -> str:
    """`engine`, else $RETR_ENGINE, else DEFAULT_ENGINE; an unknown name lists the valid ones."""
    name = (engine or os.environ.get(ENV) or DEFAULT_ENGINE).lower()
    if name not in ENGINES:
        raise ConfigError(f"unknown inference engine '{name}' (available: {', '.join(ENGINES)})")
    return name


class MethodOf(nn.Module):
    """A module whose forward is another module's method (EfficientNet's `extract_features`), so
    that the exporter traces exactly the call the plug-in makes."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.method)(x)


class DenseRunner:
    """`module`'s forward through `engine`, built on first call; falls back to the module.

    key: a file-name-safe identity of the network and its weights
    (`<plug-in>-<part>-<fingerprint>`), a callable so that building a plug-in hashes nothing.
    """

    def __init__(
        self,
        module: nn.Module,
        key: Callable[[], str],
        engine: str,
        device: torch.device,
        what: str,
    ) -> None:
        self.module = module
        self.key = key
        self.engine = engine if device.type == "cpu" else "torch"
        self.what = what
        self._session: Session | None = None
        self._built = self.engine == "torch"
        self._lock = threading.Lock()
        self.graph_path: Path | None = None

    def prepare(self) -> str:
        """Load (or export) the graph now instead of on the first call; returns `active`."""
        with self._lock:  # the service's worker threads share one plug-in
            if not self._built:
                self._session = self._build()
                self._built = True
        return self.active

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare()
        if self._session is None:
            return self.module(x)
        out = self._session(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(out)

    def use_session(self, session: Session) -> None:
        """Run the network with `session` from now on (the benchmark's lower-precision graphs)."""
        self._session, self._built = session, True

    @property
    def active(self) -> str:
        """The engine that runs the network now ("torch" until a graph is built)."""
        return self.engine if self._session is not None else "torch"

    def _build(self) -> Session | None:
        try:
            versions = engine_versions(self.engine)
        except ImportError as exc:
            logger.warning(
                "%s: inference engine %s is not installed (%s; pip install 'retr[engine]'); "
                "running it with PyTorch",
                self.what,
                self.engine,
                exc,
            )
            return None
        try:
            path = graph_path(self.key(), self.engine, versions)
            self.graph_path = path
            return load_or_export(self.module, path, self.engine, versions, self.what)
        except Exception as exc:  # the exporter and the engines raise many unrelated types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            logger.warning(
                "%s: %s cannot run it (%s: %s); running it with PyTorch",
                self.what,
                self.engine,
                type(exc).__name__,
                first[:200],
            )
            return None


# --- versions and cache paths ------------------------------------------------------------------


def engine_versions(engine: str) -> dict[str, str]:
    """Everything whose version can change the cached graph or how it is read. ImportError when
    the engine (or onnx) is missing."""
    import onnx

    versions = {"recipe": str(RECIPE), "opset": str(OPSET), "torch": torch.__version__}
    versions["onnx"] = onnx.__version__
    if engine == "onnxruntime":
        import onnxruntime

        versions[engine] = onnxruntime.__version__
    elif engine == "openvino":
        import openvino

        versions[engine] = openvino.get_version()
    return versions


def graph_path(key: str, engine: str, versions: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "graphs" / f"{key}-{engine}-{digest}.onnx"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def is_intact(path: Path, versions: dict[str, str]) -> bool:
    """True when `path` and its sidecar exist, the sidecar names these versions and the graph's
    SHA-256 matches it."""
    try:
        meta = json.loads(sidecar(path).read_text())
        return meta.get("versions") == versions and meta.get("sha256") == file_sha256(path)
    except (OSError, ValueError, AttributeError):
        return False


# --- export ------------------------------------------------------------------------------------


def load_or_export(
    module: nn.Module, path: Path, engine: str, versions: dict[str, str], what: str
) -> Session:
    """A session on the cached graph at `path`, exported first when it is missing or damaged; a
    cached graph the engine cannot load is exported once more before giving up."""
    if is_intact(path, versions):
        try:
            return open_session(engine, path)
        except Exception as exc:
            logger.warning(
                "%s: cached graph %s does not load (%s); exporting again", what, path, exc
            )
    else:
        if path.exists():
            logger.warning("%s: cached graph %s is damaged; exporting again", what, path)
    export(module, path, versions)
    return open_session(engine, path)


def export(module: nn.Module, path: Path, versions: dict[str, str]) -> None:
    """Export `module` ((B, 3, H, W) -> (B, C, h, w)) to ONNX at `path`, atomically, with its
    sidecar; remove graphs of the same key made with other versions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda tmp: _export_to(module, tmp))
    meta = json.dumps({"sha256": file_sha256(path), "versions": versions}, sort_keys=True)
    _write_atomic(sidecar(path), lambda tmp: tmp.write_text(meta))
    stem = path.name.rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{stem}-*.onnx"):
        if stale != path:
            stale.unlink(missing_ok=True)
            sidecar(stale).unlink(missing_ok=True)
    logger.info("exported %s", path)


def _export_to(module: nn.Module, dest: Path) -> None:
    import warnings

    example = torch.zeros(1, 3, EXAMPLE_SIDE, EXAMPLE_SIDE)
    param = next(module.parameters(), None)
    if param is not None:
        example = example.to(param.device)
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.register_custom_op_symbolic("aten::instance_norm", _instance_norm, OPSET)
    try:
        with warnings.catch_warnings(), torch.no_grad(), _c_stdout_silenced():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                module.eval(),
                (example,),
                str(dest),
                dynamo=False,
                opset_version=OPSET,
                input_names=["image"],
                output_names=["dense"],
                dynamic_axes={"image": axes, "dense": axes},
            )
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::instance_norm", OPSET)


@contextlib.contextmanager
def _c_stdout_silenced() -> Iterator[None]:
    """Drop what C++ code writes to file descriptor 1 meanwhile: the TorchScript exporter turns
    its ONNX log on whatever the caller set (torch 2.13) and dumps the whole IR graph to stdout
    when an op is not exportable, which would bury the one warning line of the fallback."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _instance_norm(g: Any, x: Any, weight: Any, bias: Any, *rest: Any) -> Any:
    """aten::instance_norm (input statistics) as means over W then H: see the module docstring.
    The default symbolic also needs the channel count at export time, which DISK's resized skip
    connections do not give."""
    from torch.onnx import symbolic_helper as sh

    use_input_stats, eps = sh._maybe_get_const(rest[2], "b"), sh._maybe_get_const(rest[4], "f")
    if not use_input_stats:
        raise RuntimeError("instance_norm with running statistics is not exported")

    def mean_hw(t: Any) -> Any:
        over_w = g.op("ReduceMean", t, axes_i=[3], keepdims_i=1)
        return g.op("ReduceMean", over_w, axes_i=[2], keepdims_i=1)

    centred = g.op("Sub", x, mean_hw(x))
    var = mean_hw(g.op("Mul", centred, centred))
    eps_t = g.op("Constant", value_t=torch.tensor(float(eps), dtype=torch.float32))
    y = g.op("Div", centred, g.op("Sqrt", g.op("Add", var, eps_t)))
    shape = g.op("Constant", value_t=torch.tensor([1, -1, 1, 1], dtype=torch.int64))
    if not sh._is_none(weight):
        y = g.op("Mul", y, g.op("Reshape", weight, shape))
    if not sh._is_none(bias):
        y = g.op("Add", y, g.op("Reshape", bias, shape))
    return y


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temporary file beside `path`, fsync it, then rename it to `path`."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- sessions ----------------------------------------------------------------------------------


def open_session(engine: str, path: Path, precision: str = "f32") -> Session:
    """A function running the graph at `path` on one float32 array, with as many threads as
    PyTorch uses. precision (OpenVINO only): "f32", or "bf16" for the benchmark's quality check."""
    threads = torch.get_num_threads()
    if engine == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # ORT's idle workers spin by default, which takes the cores from PyTorch's steps around
        # the graph (NMS, resizing) and from the other model between calls.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"image": x})[0]
    if engine == "openvino":
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        request = compiled.create_infer_request()
        lock = threading.Lock()  # one infer request, which threads must not share at once

        def run(x: Array) -> Array:
            with lock:
                request.infer({0: x})
                return np.array(request.get_output_tensor(0).data, copy=True)

        return run
    raise ConfigError(f"no session for engine '{engine}' (available: {', '.join(ENGINES[1:])})")
