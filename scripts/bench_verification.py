"""Choose the verification rule on positives and negatives: inliers per matcher and rule.

The pair set is retrieval.evaluation.pairs.verification_pairs over ../shared/data (every
same-group pair of landmarks-mini, every planar pair; --negatives times as many cross-group and
distractor negatives). Each matcher matches every pair once (LightGlue with no confidence
filter, so that every filter can be applied afterwards; matches are cached under --work per
first image, so a cut run resumes, and `--shard i/n` processes can fill the cache in parallel
with one torch thread each), then every rule of
the grid (LightGlue's match-confidence filter x RANSAC model x RANSAC threshold) gives an
inlier count per pair. Printed per rule: the inlier distribution on positives and negatives,
and the fewest inliers that keeps false positives at or under --max-fpr with the true-positive
rate it leaves (overall and per positive kind).

    python scripts/bench_verification.py --index /tmp/idx-mini --work /tmp/verif --json out.json
    OMP_NUM_THREADS=1 python scripts/bench_verification.py ... --shard 0/2  # and 1/2, first

--index: an index of landmarks-mini built with the default settings (e.g. by `retr eval mini`),
whose stored DISK features are used; images it lacks (the planar pairs) are extracted with the
same settings and cached under --work. --method: another local method (e.g. xfeat), whose
features are extracted for every image at that method's defaults (no index needed) and cached
under --work; every matcher then runs with that method's weights and rules.

    python scripts/bench_verification.py --method xfeat --work /tmp/verif --json xfeat.json
    python scripts/bench_verification.py --method aliked --work /tmp/verif-aliked
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from features.pipeline import Extractors
from features.registry import load_local
from features.types import LocalFeatures
from retrieval.api import Retriever
from retrieval.evaluation.pairs import (
    ImagePair,
    operating_point,
    rate_at,
    rule_inliers,
    verification_pairs,
)
from retrieval.evaluation.planar import best_case_error, corner_error, read_planar_pairs
from retrieval.matchers import Matches, load_matcher
from retrieval.matchers.lightglue import LightGlueConf
from retrieval.matchers.mnn import MNNConf
from retrieval.matchers.rules import Rule
from retrieval.rerank import RerankConf, verify_pair
from retrieval.verification import RansacConf

console = Console(width=220)


def load_features(
    pairs: list[ImagePair], index: Path | None, work: Path, method: str | None = None
) -> tuple[dict[Path, LocalFeatures], str]:
    """Features of every image of the pairs and their local method: stored in the index when it
    holds `method`'s (None: the index's method), else extracted and cached under --work."""
    mini = {p.a for p in pairs} | {p.b for p in pairs}
    out: dict[Path, LocalFeatures] = {}
    retriever = Retriever.open(index) if index is not None else None
    if retriever is not None and method in (None, retriever.config.local_method):
        by_path = {r.path: r.id for r in retriever.catalog.all() if r.status == "indexed"}
        stored = {p: by_path[_rel(p)] for p in mini if _rel(p) in by_path}
        for p, f in zip(stored, retriever.local_features(list(stored.values())), strict=True):
            out[p] = f
        c = retriever.config
        method = c.local_method
        extract = Extractors.for_index(c).local
        folder = work / "features"
    else:
        method = method or "disk"
        extract = load_local(method)
        folder = work / f"features-{method}"
    for p in sorted(mini - set(out)):
        cache = folder / (p.parent.name + "__" + p.stem + ".npz")
        if not cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            f = extract.extract(p)
            np.savez(cache, k=f.keypoints, s=f.scores, d=f.descriptors, size=f.image_size)
        with np.load(cache) as z:
            out[p] = LocalFeatures(z["k"], z["s"], z["d"], (int(z["size"][0]), int(z["size"][1])))
    return out, method


def _rel(path: Path) -> str:
    """The catalog path of a landmarks-mini image in an index built by `retr eval mini`."""
    parts = path.parts
    return "/".join(parts[parts.index("landmarks-mini") + 1 :]) if "landmarks-mini" in parts else ""


def match_all(
    name: str,
    conf: Any,
    pairs: list[ImagePair],
    feats: dict[Path, LocalFeatures],
    work: Path,
    shard: tuple[int, int] = (0, 1),
    method: str = "disk",
) -> tuple[list[Matches], float]:
    """Matches of every pair and the matching time in ms per pair. Matches are cached under
    --work per first image, so a run can be cut and resumed, and --shard i/n processes can
    share the work (each takes every n-th first image and only fills the cache)."""
    groups: dict[Path, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[p.a].append(i)
    found_by: dict[int, Matches] = {}
    seconds = 0.0
    matcher = None
    for n, (a, rows) in enumerate(groups.items()):
        if n % shard[1] != shard[0]:
            continue
        folder = f"matches-{name}" if method == "disk" else f"matches-{method}-{name}"
        cache = work / folder / f"{_key(a, [pairs[i].b for i in rows])}.npz"
        if not cache.is_file():
            matcher = matcher or load_matcher(name.split("@")[0], conf, method)
            t0 = time.perf_counter()
            got = matcher.match_many(feats[a], [feats[pairs[i].b] for i in rows])
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                cache,
                pairs=np.concatenate([m.pairs for m in got]).reshape(-1, 2),
                conf=np.concatenate([m.confidence for m in got]),
                counts=np.array([len(m) for m in got]),
                seconds=time.perf_counter() - t0,
            )
        with np.load(cache) as z:
            cuts = np.cumsum(z["counts"])[:-1]
            parts = zip(np.split(z["pairs"], cuts), np.split(z["conf"], cuts), strict=True)
            for i, (kept, conf_) in zip(rows, parts, strict=True):
                found_by[i] = Matches(kept, conf_)
            seconds += float(z["seconds"])
        console.print(f"  {name}: {n + 1}/{len(groups)} query images", end="\r")
    ms = 1000 * seconds / max(1, len(found_by))
    return [found_by[i] for i in sorted(found_by)], ms


def _key(a: Path, bs: list[Path]) -> str:
    """A cache file name for the pairs of image `a` with images `bs`."""
    digest = hashlib.blake2b("\n".join(map(str, [a, *bs])).encode(), digest_size=8).hexdigest()
    return f"{a.parent.name}__{a.stem}-{digest}"


def score_rules(
    name: str,
    found: list[Matches],
    pairs: list[ImagePair],
    feats: dict[Path, LocalFeatures],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """One row per rule of the grid."""
    confidences: list[float | None] = [None] if name == "mnn" else list(args.confidences)
    is_pos = np.array([p.positive for p in pairs])
    kinds = np.array([p.kind for p in pairs])
    rows = []
    for conf_min in confidences:
        for model in args.models:
            for threshold in args.thresholds:
                ransac = RansacConf(model=model, threshold=threshold)
                n = np.array(
                    [
                        rule_inliers(feats[p.a], feats[p.b], m, conf_min, ransac)
                        for p, m in zip(pairs, found, strict=True)
                    ]
                )
                op = operating_point(n[is_pos], n[~is_pos], args.max_fpr)
                row = {
                    "matcher": name,
                    "min_confidence": conf_min,
                    "model": model,
                    "threshold": threshold,
                    "pos_median": float(np.median(n[is_pos])),
                    "pos_p10": float(np.percentile(n[is_pos], 10)),
                    "neg_median": float(np.median(n[~is_pos])),
                    "neg_p99": float(np.percentile(n[~is_pos], 99)),
                    "neg_max": int(n[~is_pos].max()),
                    "min_inliers": op.min_inliers,
                    "tpr": op.tpr,
                    "fpr": op.fpr,
                    "tpr_by_kind": {
                        k: float((n[is_pos & (kinds == k)] >= op.min_inliers).mean())
                        for k in sorted(set(kinds[is_pos]))
                    },
                    "inliers": n.tolist(),
                }
                for fixed in args.fixed:
                    row[f"tpr@{fixed}"] = rate_at(n[is_pos], n[~is_pos], fixed).tpr
                    row[f"fpr@{fixed}"] = rate_at(n[is_pos], n[~is_pos], fixed).fpr
                rows.append(row)
                console.print(
                    f"  {name} conf>{conf_min} {model} {threshold}px: t={op.min_inliers} "
                    f"TPR {op.tpr:.3f}",
                    highlight=False,
                )
    return rows


def planar_table(
    feats: dict[Path, LocalFeatures], args: argparse.Namespace, method: str = "disk"
) -> list[dict[str, Any]]:
    """Every planar pair with a ground-truth homography: inliers and mean corner error (px) of
    the homography each matcher estimates with its rerank filter (retrieval.rerank.verify_pair;
    RANSAC fits a homography at 8 px for every matcher, whatever model its rule verifies with:
    a planar scene is a homography). "lightglue f0.1": the official match filter."""
    homography = RansacConf()

    def planar(settings: dict[str, Any] | None = None) -> RerankConf:
        return RerankConf(rules={"lightglue": Rule(settings=settings, ransac=homography)})

    plans: dict[str, RerankConf] = {"mnn": RerankConf(), "lightglue": planar()}
    for k in args.planar_keypoints:
        plans[f"lightglue@{k}"] = planar({"max_keypoints": k})
        plans[f"lightglue f0.1@{k}"] = planar({"max_keypoints": k, "filter_threshold": 0.1})
    rows = []
    for pair in read_planar_pairs(args.data / "planar-pairs"):
        fa, fb = feats[pair.image_a], feats[pair.image_b]
        row: dict[str, Any] = {"pair": f"{pair.set} {pair.image_a.stem}->{pair.image_b.stem}"}
        every = []
        for name, conf in plans.items():
            found = verify_pair(fa, fb, conf, name.split("@")[0].split()[0], method)
            model = found.verification.model
            err = corner_error(model, pair.homography, fa.image_size) if model is not None else None
            row[name] = (found.inliers, err)
            every.append(found.matches)
        both = np.unique(np.concatenate(every), axis=0)
        row["best case"] = best_case_error(
            fa.keypoints[both[:, 0]], fb.keypoints[both[:, 1]], pair.homography, fa.image_size
        )
        rows.append(row)
    table = Table(title="planar pairs: inliers / mean corner error (px) of the rerank's homography")
    table.add_column("pair")
    for name in (*plans, "best case"):
        table.add_column(name, justify="right")
    for row in rows:
        cells = [f"{n} / {'fail' if e is None else f'{e:.1f}'}" for n, e in (row[k] for k in plans)]
        best = row["best case"]
        table.add_row(row["pair"], *cells, "-" if best is None else f"{best:.1f}")
    for name in (*plans, "best case"):
        evd = [row[name] for row in rows if row["pair"].startswith("evd")]
        errors = [e if name == "best case" else e[1] for e in evd]
        good = sum(e is not None and e < 10 for e in errors)
        console.print(f"{name}: {good} of {len(evd)} EVD pairs under 10 px", highlight=False)
    console.print(
        "best case: corner error of a least-squares homography on every matcher's matches that "
        "lie within 4 px of the ground truth (evaluation.planar.best_case_error)",
        highlight=False,
    )
    console.print(table)
    return rows


def print_table(
    rows: list[dict[str, Any]], ms: dict[str, float], args: argparse.Namespace, method: str
) -> None:
    kinds = sorted(rows[0]["tpr_by_kind"])
    table = Table(title=f"verification rules on {method}: TPR at FPR <= {args.max_fpr:.0%}")
    cols = ["matcher", "ms/pair", "conf >", "model", "px", "pos med / p10", "neg med / p99 / max"]
    cols += ["min inliers", "TPR", "FPR", *(f"TPR {k}" for k in kinds)]
    cols += [f"TPR/FPR @{f}" for f in args.fixed]
    for c in cols:
        table.add_column(c, justify="left" if c in ("matcher", "model") else "right")
    for r in rows:
        table.add_row(
            r["matcher"],
            f"{ms[r['matcher']]:.0f}",
            "-" if r["min_confidence"] is None else f"{r['min_confidence']:.1f}",
            r["model"][0].upper(),
            f"{r['threshold']:g}",
            f"{r['pos_median']:.0f} / {r['pos_p10']:.0f}",
            f"{r['neg_median']:.0f} / {r['neg_p99']:.0f} / {r['neg_max']}",
            str(r["min_inliers"]),
            f"{r['tpr']:.3f}",
            f"{r['fpr']:.3f}",
            *(f"{r['tpr_by_kind'][k]:.2f}" for k in kinds),
            *(f"{r[f'tpr@{f}']:.2f}/{r[f'fpr@{f}']:.3f}" for f in args.fixed),
        )
    console.print(table)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--index", type=Path, default=None, help="a default-settings mini index")
    p.add_argument("--method", default=None, help="local method (default: the index's, or disk)")
    p.add_argument("--work", type=Path, default=Path("/tmp/retr-verification"))
    p.add_argument("--negatives", type=float, default=1.0, help="negatives per positive")
    p.add_argument("--limit", type=int, default=None, help="first N pairs of each side (quick)")
    p.add_argument("--lightglue-keypoints", default="512", help="comma-separated, e.g. 512,1024")
    p.add_argument("--confidences", default="0.1,0.2,0.3,0.5,0.7")
    p.add_argument("--models", default="homography,fundamental")
    p.add_argument("--thresholds", default="4,8,12")
    p.add_argument("--fixed", default="12,15", help="inlier thresholds also reported as is")
    p.add_argument("--max-fpr", type=float, default=0.01)
    p.add_argument("--planar-keypoints", default="1024", help="also LightGlue at these counts")
    p.add_argument("--planar-only", action="store_true", help="only the planar-pair table")
    p.add_argument("--skip-planar", action="store_true", help="no planar-pair table")
    p.add_argument("--shard", default=None, help="i/n: only fill the match cache (see match_all)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    args.planar_keypoints = [int(x) for x in args.planar_keypoints.split(",") if x]
    args.confidences = [float(x) for x in args.confidences.split(",")]
    args.models = args.models.split(",")
    args.thresholds = [float(x) for x in args.thresholds.split(",")]
    args.fixed = [int(x) for x in args.fixed.split(",") if x]
    return args


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pairs = verification_pairs(
        args.data / "landmarks-mini", args.data / "planar-pairs", args.negatives
    )
    if args.limit:
        pairs = [p for p in pairs if p.positive][: args.limit] + [
            p for p in pairs if not p.positive
        ][: args.limit]
    n_pos = sum(p.positive for p in pairs)
    console.print(f"{n_pos} positive and {len(pairs) - n_pos} negative pairs")
    feats, method = load_features(pairs, args.index, args.work, args.method)
    planar = [] if args.skip_planar or args.shard else planar_table(feats, args, method)
    if args.planar_only:
        return
    matchers: dict[str, Any] = {"mnn": MNNConf()}
    for k in args.lightglue_keypoints.split(","):
        matchers[f"lightglue@{k}"] = LightGlueConf(max_keypoints=int(k), filter_threshold=0.0)
    if args.shard:  # fill the caches of the network matchers, nothing else
        for name, conf in matchers.items():
            if name != "mnn":
                match_all(name, conf, pairs, feats, args.work, args.shard, method)
        return
    rows, ms = [], {}
    for name, conf in matchers.items():
        found, ms[name] = match_all(name, conf, pairs, feats, args.work, method=method)
        console.print(f"{name}: {ms[name]:.0f} ms per pair")
        rows += score_rules(name, found, pairs, feats, args)
    print_table(rows, ms, args, method)
    if args.json:
        names = [f"{p.a.name} -> {p.b.name} ({p.kind})" for p in pairs]
        out = {
            "method": method,
            "pairs": names,
            "positive": [p.positive for p in pairs],
            "ms": ms,
            "rules": rows,
            "planar": planar,
        }
        args.json.write_text(json.dumps(out))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
