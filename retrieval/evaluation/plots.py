"""Per-query AP before vs after reranking, as a scatter plot (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from features.core import PlotError

if TYPE_CHECKING:
    from retrieval.evaluation.runner import EvalResult


def main_protocol(result: EvalResult) -> str:
    """The protocol plotted: Medium for the revisited datasets, else the only one."""
    return "medium" if "medium" in result.protocols else result.protocols[0]


def ap_pairs(result: EvalResult, protocol: str) -> list[tuple[float, float]]:
    """(AP global, AP reranked) of every query with a positive under `protocol`."""
    pairs = []
    for q in result.queries:
        before = q.ap.get("global", {}).get(protocol)
        after = q.ap.get("rerank", {}).get(protocol)
        if before is not None and after is not None:
            pairs.append((before, after))
    return pairs


def plot(result: EvalResult, path: str | Path) -> Path:
    """Scatter of each query's AP with global search (x) and with reranking (y); points above
    the diagonal are queries the rerank improved. Written to `path` (format from its suffix)."""
    try:
        # Figure without pyplot: no global backend or figure registry is touched.
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'retr[eval]'") from None
    if "rerank" not in result.modes:
        raise PlotError("the plot compares global and reranked search: run with rerank=True")
    protocol = main_protocol(result)
    pairs = ap_pairs(result, protocol)
    if not pairs:
        raise PlotError(f"no query has a positive under the '{protocol}' protocol")
    xs = [x for x, _ in pairs]
    ys = [y for _, y in pairs]
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, linestyle="--")
    ax.scatter(xs, ys, s=18, alpha=0.75)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
    ax.set_xlabel("AP, global search")
    ax.set_ylabel("AP, reranked")
    gm = result.modes["global"].protocols[protocol].map
    rm = result.modes["rerank"].protocols[protocol].map
    ax.set_title(f"{result.dataset} ({protocol}): mAP {100 * gm:.1f} -> {100 * rm:.1f}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
