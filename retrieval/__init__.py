"""Search, reranking and recognition on top of a retr index.

- `search`: the one search path (shortlist, rerank, catalog, vote) and its typed config.
- `matching`: mutual-nearest-neighbour descriptor matching.
- `verification`: RANSAC geometric verification with OpenCV's USAC.
- `rerank`: shortlist reranking by inlier counts.
- `recognition`: the landmark vote.
- `ingest`: the one ingest path (a file in, its outcome out); `building`, `updating`: build,
  add, remove and update on top of it.
- `api`: the Retriever facade; `cli`: the `retr` command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval.api import Match, Recognition, Retriever, SearchConf, SearchResult

__all__ = ["Match", "Recognition", "Retriever", "SearchConf", "SearchResult"]


def __getattr__(name: str) -> Any:
    """`from retrieval import Retriever` loads the API (and torch) on first use only, so the CLI
    and the index layer, which live under this package, start without it."""
    if name in __all__:
        return getattr(importlib.import_module("retrieval.api"), name)
    raise AttributeError(f"module 'retrieval' has no attribute '{name}'")
