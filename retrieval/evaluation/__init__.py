"""Evaluation of retr on landmark benchmarks (Revisited Oxford/Paris, GLDv2, landmarks-mini).

- `metrics`: revisitop AP / mAP / mP@k and the Easy / Medium / Hard protocols, GLDv2 GAP,
  recall@k.
- `datasets`: dataset adapters; `downloads`: fetching the official files.
- `planar`: homography recovery on planar pairs (corner error).
- `runner`: `run_eval`, global-only vs reranked side by side; `format_table`, `write_json`.
- `plots`: per-query AP before vs after reranking (needs matplotlib: `retr[eval]`).
"""

from features.core import DatasetError, DownloadError, PlotError
from retrieval.evaluation.datasets import (
    Dataset,
    DbImage,
    Query,
    gldv2,
    landmarks_mini,
    open_dataset,
    revisited,
)
from retrieval.evaluation.downloads import (
    download_gldv2,
    download_revisitop1m,
    download_roxford5k,
    download_rparis6k,
)
from retrieval.evaluation.plots import plot
from retrieval.evaluation.runner import EvalResult, format_table, run_eval, write_json

__all__ = [
    "Dataset",
    "DatasetError",
    "DbImage",
    "DownloadError",
    "EvalResult",
    "PlotError",
    "Query",
    "download_gldv2",
    "download_revisitop1m",
    "download_roxford5k",
    "download_rparis6k",
    "format_table",
    "gldv2",
    "landmarks_mini",
    "open_dataset",
    "plot",
    "revisited",
    "run_eval",
    "write_json",
]
