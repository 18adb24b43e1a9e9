"""CPU time per image of DELG R50: global only, global + local in one shared pass per pyramid
level, and global + local as two separate passes.

Uses the parity fixture (../shared/fixtures/delg): its random weights have the exact R50
architecture, so the timings are those of the real model.

    python scripts/bench_delg.py [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from features.convert.delg import map_variables, write_checkpoint
from features.delg.model import DelgResNet
from features.delg.resnet import DelgNet
from features.image import load_image
from features.local.delg_local import DELGLocal

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "delg"


def fixture_checkpoint(folder: Path) -> str:
    with np.load(FIX / "delg_r50_random_fp16_weights.npz") as npz:
        tf_vars = {k: npz[k].astype(np.float32) for k in npz.files}
    net = DelgNet(50)
    net.load_state_dict(map_variables(tf_vars, 50))
    return str(write_checkpoint(net, folder / "delg_r50_gldv2.pt"))


def best_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: allocator, oneDNN kernel selection
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = fixture_checkpoint(Path(tmp))
        model = DelgResNet(weights=weights, device="cpu")
        local = DELGLocal(weights=weights, device="cpu")
    print(f"DELG R50, CPU, {args.threads} threads, best of {args.repeat}")
    print(f"{'image':<12}{'size':>10}{'global':>10}{'shared':>10}{'two passes':>12}{'ratio':>8}")
    for name in ("image0.jpg", "image1.jpg"):
        rgb = load_image(FIX / name)
        t_global, t_shared, t_two = time_image(model, local, rgb, args.repeat)
        size = f"{rgb.shape[1]}x{rgb.shape[0]}"
        print(
            f"{name:<12}{size:>10}{t_global:>9.2f}s{t_shared:>9.2f}s{t_two:>11.2f}s"
            f"{t_two / t_shared:>8.2f}"
        )


def time_image(
    model: DelgResNet, local: DELGLocal, rgb: np.ndarray, repeat: int
) -> tuple[float, float, float]:
    """Seconds for: global only; global + local, shared pass; global + local, two passes."""
    return (
        best_time(lambda: model.extract(rgb), repeat),
        best_time(lambda: model.extract_all(rgb), repeat),
        best_time(lambda: (model.extract(rgb), local.extract(rgb)), repeat),
    )


if __name__ == "__main__":
    main()
