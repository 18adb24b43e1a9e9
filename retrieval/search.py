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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.image import ImageInput
from features.pipeline import Described, Extractors
from features.types import LocalFeatures
from index.catalog import Catalog
from index.snapshot import IndexSnapshot
from retrieval.expansion import ExcludedFn, Expansion, Refiner
from retrieval.matchers import resolve_plan
from retrieval.recognition import vote
from retrieval.rerank import Candidate, Timings, rerank
from retrieval.search_conf import SearchConf


@dataclass(frozen=True)
class Match:
    """One search result. global_score: cosine similarity of whitened global descriptors (with
    αQE / DBA on, as by default: of the expanded query and the image's DBA descriptor)."""

    id: int
    path: str
    label: str | None
    global_score: float
    inliers: int
    verified: bool
    matcher: str = ""
    """The matcher whose inliers rank this result ("" = global ranking only)."""


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
    matcher: str = ""
    """The rerank plan the search ran ("" = global ranking only)."""


def result_json(image: Path | str, result: SearchResult) -> dict[str, Any]:
    """One query's result as JSON: what `retr query --json` prints and the HTTP service sends."""
    rec = result.recognition
    return {
        "query": str(image),
        "landmark": rec.label,
        "confidence": rec.confidence,
        "evidence": [m.id for m in rec.evidence],
        "results": [asdict(m) for m in result.matches],
        "timings": result.timings,
        "generation": result.generation,
    }


def search(
    snapshot: IndexSnapshot,
    catalog: Catalog,
    extractors: Extractors,
    image: ImageInput | Described,
    conf: SearchConf,
    device: Any = None,
    exclude: Collection[str] = (),
) -> SearchResult:
    """Search `image` in one snapshot of an index (see the module docstring). `image` may also
    be its features, already extracted by `extractors.describe` (with local features when
    reranking). `exclude`: catalog paths left out of the shortlist, the results and the vote
    (e.g. the query itself when it is indexed, in a leave-one-out evaluation)."""
    timings = Timings()
    if isinstance(image, Described):
        described = image
    else:
        described = extractors.describe(image, with_local=conf.rerank)
        for stage, seconds in described.seconds.items():
            timings.add(stage, seconds)
    t0 = time.perf_counter()
    desc = snapshot.whitening.apply(described.descriptor)
    needed = max(conf.k, conf.vote_top) + len(exclude)
    depth = max(needed, conf.shortlist + len(exclude)) if conf.rerank else needed
    excluded = _excluded(catalog, exclude)
    scores, ids = _refiner(snapshot, conf, excluded).ranking(desc, depth)
    timings.add("faiss", time.perf_counter() - t0)
    keep = ~excluded(ids)
    cands = [Candidate(int(i), float(s)) for s, i in zip(scores[keep], ids[keep], strict=True)]
    plan = ""
    if conf.rerank and cands:
        assert described.local is not None, "rerank needs the query's local features"
        method = snapshot.config.local_method
        plan = resolve_plan(conf.matcher or snapshot.config.matcher, method, device)
        head = rerank(
            described.local,
            cands[: conf.shortlist],
            snapshot.store.local_features,
            conf.rerank_conf,
            timings,
            device=device,
            matcher=plan,
            local_method=method,
        )
        cands = head + cands[conf.shortlist :]
    t1 = time.perf_counter()
    matches = [m for m in _matches(catalog, cands[:needed]) if m.path not in exclude]
    timings.add("catalog", time.perf_counter() - t1)
    label, confidence, evidence = vote(matches[: conf.vote_top])
    recognition = Recognition(label, confidence, [matches[i] for i in evidence])
    return SearchResult(
        matches[: conf.k],
        recognition,
        dict(timings.stages),
        snapshot.generation,
        described.local,
        plan,
    )


def _refiner(snapshot: IndexSnapshot, conf: SearchConf, excluded: ExcludedFn) -> Refiner:
    """The global ranking of one search, with αQE / DBA when asked (retrieval.expansion)."""

    def vectors(ids: np.ndarray) -> np.ndarray:
        return snapshot.whitening.apply(snapshot.store.global_descriptors(ids))

    expansion = Expansion(conf.qe, conf.qe_alpha, conf.dba, conf.dba_alpha)
    return Refiner(expansion, snapshot.vectors.search, vectors, excluded)


def _excluded(catalog: Catalog, exclude: Collection[str]) -> ExcludedFn:
    """Which ids are excluded: the catalog ids of the `exclude` paths, looked up once per
    search (and not at all when nothing is excluded)."""
    gone = np.array(sorted(r.id for r in catalog.by_paths(exclude).values()) if exclude else [])

    def excluded(ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, gone)

    return excluded


def _matches(catalog: Catalog, cands: list[Candidate]) -> list[Match]:
    """Candidates with their catalog rows; a candidate whose row is gone (removed while this
    search ran on the previous generation) is left out."""
    records = catalog.get(c.id for c in cands)
    out = []
    for c in cands:
        rec = records.get(c.id)
        if rec is not None:
            out.append(
                Match(c.id, rec.path, rec.label, c.global_score, c.inliers, c.verified, c.matcher)
            )
    return out
