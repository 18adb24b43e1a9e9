"""Honest small checks of `retr train` on landmarks-mini and the planar pairs (CPU-sized).

landmarks-mini's labelled groups are split by group (sorted by name, every other group held
out): models train on the train groups only, and are scored on the held-out groups, which no
training step, and no mined pair, ever sees.

    python scripts/bench_training.py global --steps 150 --size 128 --out /tmp/bt
    python scripts/bench_training.py mda --steps 60 --size 128 --out /tmp/bt
    python scripts/bench_training.py whitening --out /tmp/bt

- global: leave-one-out global mAP on the held-out groups (each of their images queries the
  others and the distractors, PCA whitening fitted on that database as an index does), for the
  untrained EfficientNet-Lite0 DELG head and for the trained model.
- mda: RANSAC inliers (mutual NN, MAGSAC++ homography) and corner error on the planar pairs, for
  the trained MDA model and its random initialisation (same seed).
- whitening: `retr train whitening`'s Lw, mined from an index of the train groups (+ the
  distractors), applied to an index of the held-out groups: global mAP (retr eval mini, all-images
  protocol restricted to those groups) with the PCA and with the learned whitening.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.registry import load_global
from index.whitening import Whitening
from retrieval.evaluation.metrics import Relevance, average_precision, positive_ranks

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "landmarks-mini"
PLANAR = ROOT.parent / "shared" / "data" / "planar-pairs"


def split() -> tuple[list[str], list[str], list[dict[str, str]]]:
    with open(MINI / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups = sorted({r["group"] for r in rows if r["group"]})
    return groups[0::2], groups[1::2], rows


def loo_map(descs: np.ndarray, labels: list[str | None]) -> float:
    """Mean AP of every labelled image queried against all the others (itself excluded)."""
    w = Whitening.fit(descs, 0.9)
    x = w.apply(descs)
    aps = []
    for q, lab in enumerate(labels):
        if lab is None:
            continue
        order = [i for i in np.argsort(-(x @ x[q])) if i != q]
        pos = frozenset(i for i, other in enumerate(labels) if other == lab and i != q)
        aps.append(average_precision(positive_ranks(order, Relevance(pos)), len(pos)))
    return 100 * float(np.mean(aps))


def eval_images(held: list[str], rows: list[dict[str, str]]) -> tuple[list[Path], list[str | None]]:
    keep = [r for r in rows if r["group"] in held or r["kind"] == "distractor"]
    return [MINI / r["path"] for r in keep], [r["group"] or None for r in keep]


def bench_global(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.training.data import open_training_set
    from retrieval.training.delg import DelgTask, DelgTrainConf
    from retrieval.training.loop import LoopConf, train

    train_groups, held, rows = split()
    data = open_training_set(MINI / "images", classes=train_groups, keep_side=2 * args.size)
    conf = DelgTrainConf(image_size=args.size, freeze_bn=not args.train_bn)
    task = DelgTask(data, conf, args.batch, seed=0)
    ckpt = Path(args.out) / ("delg-bn.pt" if args.train_bn else "delg.pt")
    for p in (ckpt, ckpt.with_name(ckpt.name + ".train")):
        p.unlink(missing_ok=True)
    loop = LoopConf(steps=args.steps, batch_size=args.batch, lr=args.lr, save_every=args.steps)
    report = train(task, loop, ckpt)
    paths, labels = eval_images(held, rows)
    gconf = {"resize_max": args.eval_size}
    out: dict[str, Any] = {
        "train_groups": len(train_groups),
        "train_images": len(data),
        "held_out_groups": len(held),
        "eval_images": len(paths),
        "steps": args.steps,
        "images_per_s": report.images_per_s,
        "loss_first": report.first,
        "loss_last": report.last,
    }
    names = [f"trained:{ckpt}"] if args.no_baseline else ["efficientnet-lite0", f"trained:{ckpt}"]
    for name in names:
        model = load_global(name, gconf)
        t0 = time.perf_counter()
        descs = np.stack([model.extract(p) for p in paths])
        out[name.split(":")[0]] = {"mAP": loo_map(descs, labels), "s": time.perf_counter() - t0}
    return out


def bench_mda(args: argparse.Namespace) -> dict[str, Any]:
    from features.local.mda import MDA
    from retrieval.evaluation.planar import corner_error, estimate_homography, read_planar_pairs
    from retrieval.training.data import open_training_set
    from retrieval.training.loop import LoopConf, train
    from retrieval.training.mda import MdaTask, MdaTrainConf
    from retrieval.verification import RansacConf

    train_groups, _, _ = split()
    data = open_training_set(MINI / "images", classes=train_groups, keep_side=2 * args.size)
    task = MdaTask(data, MdaTrainConf(image_size=args.size), args.batch, seed=0)
    out_dir = Path(args.out)
    init = out_dir / "mda_init.pt"
    torch.save(task.export(), init)  # the random initialisation, same seed
    ckpt = out_dir / "mda.pt"
    for p in (ckpt, ckpt.with_name("mda.pt.train")):
        p.unlink(missing_ok=True)
    loop = LoopConf(steps=args.steps, batch_size=args.batch, lr=args.lr, save_every=args.steps)
    report = train(task, loop, ckpt)
    pairs = read_planar_pairs(PLANAR, per_set=args.per_set)
    out: dict[str, Any] = {
        "train_images": len(data),
        "steps": args.steps,
        "images_per_s": report.images_per_s,
        "loss_first": report.first,
        "loss_last": report.last,
        "pairs": len(pairs),
    }
    opts = {"resize_max": args.eval_size, "pyramid": (1.0,), "max_keypoints": 1000}
    for name, path in (("random init", init), ("trained", ckpt)):
        mda = MDA(weights=str(path), **opts)
        inliers, errors = [], []
        for pair in pairs:
            fa, fb = mda.extract(pair.image_a), mda.extract(pair.image_b)
            _, n, H = estimate_homography(fa, fb, RansacConf())
            inliers.append(n)
            errors.append(
                corner_error(H, pair.homography, fa.image_size) if H is not None else None
            )
        ok = [e for e in errors if e is not None and e < 10]
        out[name] = {
            "mean_inliers": float(np.mean(inliers)),
            "pairs_under_10px": len(ok),
            "per_pair_inliers": inliers,
        }
    return out


def index_loo_map(index_dir: Path) -> float:
    """retr eval mini's all-images protocol, global mode, on an index holding exactly the
    evaluation database: every labelled image queries the others (itself excluded), ranked by
    the cosine of its stored descriptor whitened as searches whiten it (PCA or learned)."""
    from retrieval.api import Retriever

    r = Retriever.open(index_dir)
    snap = r.snapshot()
    ids = snap.store.ids()
    records = r.catalog.get(ids)
    labels = [records[int(i)].label or None for i in ids]
    x = snap.whitening.apply(snap.store.global_descriptors(ids))
    aps = []
    for q, lab in enumerate(labels):
        if lab is None:
            continue
        order = [i for i in np.argsort(-(x @ x[q]), kind="stable") if i != q]
        pos = frozenset(i for i, other in enumerate(labels) if other == lab and i != q)
        aps.append(average_precision(positive_ranks(order, Relevance(pos)), len(pos)))
    return 100 * float(np.mean(aps))


def bench_whitening(args: argparse.Namespace) -> dict[str, Any]:
    from index.layout import IndexConfig
    from retrieval.api import Retriever
    from retrieval.evaluation.datasets import landmarks_mini
    from retrieval.evaluation.runner import prepare_index
    from retrieval.training.whitening import (
        LearnedWhiteningConf,
        learn_whitening,
        mine_pairs,
        publish_whitening,
        use_whitening,
    )

    train_groups, held, _ = split()
    out_dir = Path(args.out)
    options = {
        "global_conf": {"resize_max": args.eval_size},
        "local_conf": {"resize_max": args.local_size, "max_keypoints": 512},
    }
    config = IndexConfig.parse(options)
    kw = {"max_distractors": args.distractors}
    train_ds = landmarks_mini(MINI, queries="all", groups=train_groups, **kw)
    eval_ds = landmarks_mini(MINI, queries="all", groups=held, **kw)
    t0 = time.perf_counter()
    prepare_index(train_ds, out_dir / "idx-train", config, None)
    prepare_index(eval_ds, out_dir / "idx-eval", config, None)
    build_s = time.perf_counter() - t0
    if _has_learned(out_dir / "idx-eval"):  # a rerun starts from the PCA whitening
        use_whitening(out_dir / "idx-eval", "pca")
    conf = LearnedWhiteningConf(shortlist=args.shortlist, matcher=args.matcher)
    train_r = Retriever.open(out_dir / "idx-train")
    t1 = time.perf_counter()
    mined = mine_pairs(train_r, conf)
    mine_s = time.perf_counter() - t1
    store = train_r.snapshot().store
    pa, pb = (np.array(s, np.int64) for s in zip(*mined.pairs, strict=True))
    raw_a, raw_b = store.global_descriptors(pa), store.global_descriptors(pb)
    corpus = store.global_descriptors()
    labels = {r.id: r.label for r in train_r.catalog.get(store.ids()).values()}
    same = sum(bool(labels[a]) and labels[a] == labels[b] for a, b in mined.pairs)
    res: dict[str, Any] = {
        "train_images": len(train_ds.database),
        "eval_queries": len(eval_ds.queries),
        "eval_database": len(eval_ds.database),
        "pairs": len(mined.pairs),
        "pairs_same_group (checked after, never used)": same,
        "searched": mined.searched,
        "build_s": build_s,
        "mine_s": mine_s,
        "pca": index_loo_map(out_dir / "idx-eval"),
    }
    for mix in (0.0, 0.5):
        w = learn_whitening(corpus, raw_a, raw_b, conf.shrinkage, mix, config.whitening_shrinkage)
        publish_whitening(out_dir / "idx-eval", w)
        res[f"learned mix={mix}"] = index_loo_map(out_dir / "idx-eval")
    use_whitening(out_dir / "idx-eval", "pca")
    res["pca again"] = index_loo_map(out_dir / "idx-eval")
    return res


def _has_learned(index_dir: Path) -> bool:
    from index.manifest import Manifest

    return Manifest.load(index_dir).whitening_kind == "learned"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("global", "mda", "whitening"))
    parser.add_argument("--out", default="/tmp/bench-training")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--size", type=int, default=128, help="training crop side")
    parser.add_argument("--eval-size", type=int, default=256, help="longer side at evaluation")
    parser.add_argument("--local-size", type=int, default=320)
    parser.add_argument("--per-set", type=int, default=2, help="planar pairs per set")
    parser.add_argument("--distractors", type=int, default=20)
    parser.add_argument("--shortlist", type=int, default=20)
    parser.add_argument("--matcher", default=None, help="rerank matcher that verifies pairs")
    parser.add_argument("--no-baseline", action="store_true", help="global: trained model only")
    parser.add_argument("--train-bn", action="store_true", help="global: train BatchNorm stats")
    parser.add_argument("--json")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run = {"global": bench_global, "mda": bench_mda, "whitening": bench_whitening}[args.what]
    result = run(args)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
