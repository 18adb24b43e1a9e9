"""The one search path: an image in, ranked matches, the recognised landmark and timings out.

`search` is what `Retriever.search` runs, and through it `retr query`, the HTTP service, the
evaluation runner and the benchmarks: global descriptor -> whitening -> FAISS shortlist ->
(optionally) local rerank -> catalog lookup -> landmark vote. It keeps no state: everything a
call needs comes in as arguments (one snapshot of the index), everything it finds goes out in
the SearchResult, so threads can share a Retriever.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from features.core import StrictConf
from features.image import ImageInput
from features.pipeline import Extractors
from features.types import LocalFeatures
from index.catalog import Catalog
from index.snapshot import IndexSnapshot
from retrieval.recognition import vote
from retrieval.rerank import Candidate, RerankConf, Timings, rerank


class SearchConf(StrictConf):
    """Everything one search can be asked: the CLI's `retr query` options, the service's query
    parameters and `Retriever.search`'s keywords are these fields."""

    k: int = Field(default=10, ge=1)
    """Results returned."""
    rerank: bool = True
    """Rerank the shortlist with local features (False: global ranking only)."""
    shortlist: int = Field(default=100, ge=1)
    """Global candidates reranked."""
    vote_top: int = Field(default=10, ge=1)
    """Results the landmark vote looks at, whatever k is (so -k 3 names the same landmark)."""
    rerank_conf: RerankConf = RerankConf()
    """Matching and verification of the reranked candidates."""


@dataclass(frozen=True)
class Match:
    """One search result. global_score: cosine similarity of whitened global descriptors."""

    id: int
    path: str
    label: str | None
    global_score: float
    inliers: int
    verified: bool


@dataclass(frozen=True)
class Recognition:
    """The landmark a query shows: label ("unknown" when nothing verifies), confidence in
    [0, 1], and the results that voted for it."""

    label: str
    confidence: float
    evidence: list[Match]


@dataclass(frozen=True)
class SearchResult:
    matches: list[Match]
    recognition: Recognition
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage of this search."""
    generation: int = 0
    """The index generation (index.manifest) the search ran on."""
    query: LocalFeatures | None = field(default=None, repr=False, compare=False)
    """The query's local features (when reranked): what match pictures are drawn from."""


def search(
    snapshot: IndexSnapshot,
    catalog: Catalog,
    extractors: Extractors,
    image: ImageInput,
    conf: SearchConf,
    device: Any = None,
    exclude: Collection[str] = (),
) -> SearchResult:
    """Search `image` in one snapshot of an index (see the module docstring). `exclude`:
    catalog paths left out of the results and the vote (e.g. the query itself when it is
    indexed, in a leave-one-out evaluation)."""
    timings = Timings()
    described = extractors.describe(image, with_local=conf.rerank)
    for stage, seconds in described.seconds.items():
        timings.add(stage, seconds)
    t0 = time.perf_counter()
    desc = snapshot.whitening.apply(described.descriptor)
    needed = max(conf.k, conf.vote_top) + len(exclude)
    depth = max(needed, conf.shortlist) if conf.rerank else needed
    scores, ids = snapshot.vectors.search(desc[None], depth)
    timings.add("faiss", time.perf_counter() - t0)
    cands = [Candidate(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
    if conf.rerank and cands:
        assert described.local is not None
        head = rerank(
            described.local,
            cands[: conf.shortlist],
            snapshot.store.local_features,
            conf.rerank_conf,
            timings,
            device=device,
        )
        cands = head + cands[conf.shortlist :]
    t1 = time.perf_counter()
    matches = [m for m in _matches(catalog, cands[:needed]) if m.path not in exclude]
    timings.add("catalog", time.perf_counter() - t1)
    label, confidence, evidence = vote(matches[: conf.vote_top])
    recognition = Recognition(label, confidence, [matches[i] for i in evidence])
    return SearchResult(
        matches[: conf.k], recognition, dict(timings.stages), snapshot.generation, described.local
    )


def _matches(catalog: Catalog, cands: list[Candidate]) -> list[Match]:
    """Candidates with their catalog rows; a candidate whose row is gone (removed while this
    search ran on the previous generation) is left out."""
    records = catalog.get(c.id for c in cands)
    out = []
    for c in cands:
        rec = records.get(c.id)
        if rec is not None:
            out.append(Match(c.id, rec.path, rec.label, c.global_score, c.inliers, c.verified))
    return out
