"""CPU time per image of the default models under each inference engine (features.engine), in
one run, and the quality of lower precisions.

DISK (640 px, 1024 keypoints) and the default global model (EfficientNet-Lite2, 512 px, scales
1/sqrt(2), 1, sqrt(2)) extract landmarks-mini images with torch, onnxruntime and openvino in
float32: the engines alternate image by image, and a row is the median over rounds and images of
`extract` (the whole plug-in call, not the dense pass alone). "max |d|" compares with torch: the
global descriptor's largest coordinate difference; DISK's share of torch keypoints found at the
same pixel and their descriptors' mean cosine.

With --low-precision, also openvino bf16 (where the CPU has AVX512-BF16 or AMX) and
onnxruntime int8 (static QDQ quantisation of the convolutions, calibrated on other corpus images
than the ones timed),
and for the global model the global-only mAP of all of landmarks-mini under each precision
(openvino float32 standing for torch, whose pass over 181 images would dominate the run).

    python scripts/bench_engine.py [--images 8] [--rounds 2] [--threads 2] [--low-precision]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from features.base import Plugin
from features.engine import ENGINES, DenseRunner, open_session
from features.image import load_image
from features.local.disk import DISK
from features.registry import DEFAULT_GLOBAL, global_class
from features.types import LocalFeatures

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "landmarks-mini"


def corpus(n: int, skip: int = 0) -> list[np.ndarray]:
    """n images, one per group in turn (so sizes and scenes vary), after the first `skip`."""
    groups = sorted(p for p in (DATA / "images").iterdir() if p.is_dir())
    files = [sorted(g.glob("*.jpg")) for g in groups]
    picked = [f[i] for i in range(max(map(len, files))) for f in files if i < len(f)]
    return [load_image(p) for p in picked[skip : skip + n]]


def build(model: str, engine: str) -> tuple[Plugin, DenseRunner]:
    if model == "disk":
        disk = DISK(engine=engine, device="cpu")
        return disk, disk.run_unet
    cls, defaults = global_class(model)
    glob = cls(defaults, device="cpu", engine=engine)
    return glob, glob.run_backbone  # type: ignore[attr-defined]


def time_engines(
    plugins: dict[str, Plugin], images: list[np.ndarray], rounds: int
) -> tuple[dict[str, float], dict[str, list]]:
    """Median ms per image of each plug-in's `extract`, alternating plug-ins per image, and the
    outputs of the last round."""
    for p in plugins.values():
        p.extract(images[0])  # warm-up: export/load, kernel selection
    times: dict[str, list[float]] = {k: [] for k in plugins}
    outputs: dict[str, list] = {k: [] for k in plugins}
    for r in range(rounds):
        for img in images:
            for name, p in plugins.items():
                start = time.perf_counter()
                out = p.extract(img)  # type: ignore[attr-defined]
                times[name].append(time.perf_counter() - start)
                if r == rounds - 1:
                    outputs[name].append(out)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}, outputs


def agreement(model: str, ref: list, out: list) -> str:
    if model != "disk":
        pairs = list(zip(ref, out, strict=True))
        diff = max(float(np.abs(a - b).max()) for a, b in pairs)
        return f"max |d| {diff:.1e}, min cos {min(float(a @ b) for a, b in pairs):.5f}"
    found, cos = [], []
    for a, b in zip(ref, out, strict=True):
        share, c = keypoint_agreement(a, b)
        found.append(share)
        cos.append(c)
    return f"kpts {np.mean(found):.3f}, desc cos {np.mean(cos):.4f}"


def keypoint_agreement(ref: LocalFeatures, out: LocalFeatures) -> tuple[float, float]:
    """Share of `ref` keypoints that `out` has at the same pixel (DISK keypoints are integer
    pixels, mapped back to the original image), and the mean cosine of their descriptors."""
    index = {tuple(np.round(k, 2)): i for i, k in enumerate(out.keypoints)}
    keys = [tuple(np.round(k, 2)) for k in ref.keypoints]
    pairs = [(i, index[k]) for i, k in enumerate(keys) if k in index]
    if not pairs:
        return 0.0, 0.0
    ri, oi = np.array(pairs).T
    cos = np.sum(ref.descriptors[ri] * out.descriptors[oi], axis=1)
    return len(pairs) / max(len(ref), 1), float(cos.mean())


def low_precision(
    model: str, base: DenseRunner, calib: list[np.ndarray], capture: Callable
) -> dict[str, Callable]:
    """Sessions of lower precision on the float32 graph of `base`: openvino bf16, onnxruntime
    int8 (calibrated on the dense inputs of `calib`)."""
    assert base.graph_path is not None
    sessions: dict[str, Callable] = {}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        sessions["openvino bf16"] = open_session("openvino", base.graph_path, "bf16")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    inputs = capture(calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {"image": x}

    out = Path(tempfile.mkdtemp()) / f"{model}-int8.onnx"
    quantize_static(
        str(base.graph_path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        # Convolutions only: quantising DISK's InstanceNorm arithmetic too kept 21% of its
        # keypoints (descriptor cosine 0.19), convolutions alone about 87% (0.92).
        op_types_to_quantize=["Conv"],
    )
    sessions["onnxruntime int8"] = open_session("onnxruntime", out)
    return sessions


def dense_inputs(plugin: Plugin, runner: DenseRunner) -> Callable:
    """A function: images -> the float32 arrays `runner` receives while `plugin` extracts them."""

    def capture(images: list[np.ndarray]) -> list[np.ndarray]:
        seen: list[np.ndarray] = []
        hook = runner.module.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach().numpy().copy())
        )
        if runner.engine != "torch":
            raise ValueError("capture needs the torch runner")
        try:
            for img in images:
                plugin.extract(img)  # type: ignore[attr-defined]
        finally:
            hook.remove()
        return seen

    return capture


def corpus_map(plugin: Plugin) -> float:
    """Global-only mAP on landmarks-mini: each image of a group queries all other images
    (distractors included), positives are the rest of its group; raw descriptors, no whitening."""
    from retrieval.evaluation.metrics import Relevance, ranking_metrics

    paths = sorted((DATA / "images").glob("*/*.jpg")) + sorted((DATA / "distractors").glob("*.jpg"))
    desc = np.stack([plugin.extract(load_image(p)) for p in paths])  # type: ignore[attr-defined]
    groups = [p.parent.name if p.parent.parent.name == "images" else None for p in paths]
    rankings, relevances = [], []
    for q, group in enumerate(groups):
        if group is None:
            continue
        order = [int(i) for i in np.argsort(-(desc @ desc[q]), kind="stable") if i != q]
        rankings.append(order)
        relevances.append(Relevance(frozenset(i for i in order if groups[i] == group)))
    return 100 * ranking_metrics(rankings, relevances).map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=8, help="int8 calibration images")
    parser.add_argument("--low-precision", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    images = corpus(args.images)
    print(
        f"CPU, {args.threads} threads, {len(images)} landmarks-mini images, "
        f"median of {args.rounds} alternated rounds; ms per image of extract()"
    )
    print(f"{'model':<22}{'engine':<20}{'ms/image':>10}{'vs torch':>10}  agreement with torch")
    for model in ("disk", DEFAULT_GLOBAL):
        built = {eng: build(model, eng) for eng in ENGINES}
        plugins = {eng: p for eng, (p, _) in built.items()}
        if args.low_precision:
            torch_plugin, torch_runner = built["torch"]
            capture = dense_inputs(torch_plugin, torch_runner)
            calib = corpus(args.calibration, skip=args.images)
            built["onnxruntime"][1].prepare()
            sessions = low_precision(model, built["onnxruntime"][1], calib, capture)
            for label, session in sessions.items():
                plugin, runner = build(model, "torch")
                runner.use_session(session)
                plugins[label] = plugin
        ms, outputs = time_engines(plugins, images, args.rounds)
        for name in plugins:
            agree = "-" if name == "torch" else agreement(model, outputs["torch"], outputs[name])
            print(f"{model:<22}{name:<20}{ms[name]:>10.0f}{ms['torch'] / ms[name]:>9.2f}x  {agree}")
        if args.low_precision and model != "disk":
            # torch's own pass over the corpus would take long here; openvino float32 stands for
            # it (the rows above: equal within 1e-6).
            names = [n for n in plugins if n not in ("torch", "onnxruntime")]
            maps = ", ".join(f"{n} {corpus_map(plugins[n]):.2f}" for n in names)
            print(f"{model}: global-only mAP on all of landmarks-mini: {maps}")


if __name__ == "__main__":
    main()
