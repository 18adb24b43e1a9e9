"""The in-process search API.

    from retrieval import Retriever
    r = Retriever.build("photos/", "idx")          # or Retriever.open("idx")
    r.search("query.jpg", k=10)                    # -> list[Match]
    r.recognize("query.jpg")                       # -> Recognition(label, confidence, evidence)

`image` arguments accept a path, an (H, W, 3) uint8 RGB array, or a PIL image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from features.base import LocalExtractor
from features.core import parse_conf
from features.image import ImageInput, load_image
from features.registry import load_global, load_local
from features.types import LocalFeatures
from index.catalog import Catalog
from index.layout import IndexConfig, IndexPaths
from index.store import LocalFeatureStore
from index.vectors import VectorIndex
from index.whitening import Whitening
from retrieval.building import BuildReport, Progress, build_index, shares_pass
from retrieval.recognition import vote
from retrieval.rerank import Candidate, RerankConf, Timings
from retrieval.rerank import rerank as rerank_shortlist

logger = logging.getLogger(__name__)


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
    label: str
    confidence: float
    evidence: list[Match]


class Retriever:
    """An open index: global shortlist, local rerank, recognition."""

    def __init__(self, index_dir: str | Path, db: str | None = None, device: Any = None) -> None:
        self.paths = IndexPaths(index_dir)
        self.config: IndexConfig = self.paths.read_config()
        if db is not None:
            self.config = self.config.model_copy(update={"db_url": db})
        self.device = device
        self.catalog = Catalog(self.paths.db_url(self.config))
        self.vectors = VectorIndex.load(self.paths.vectors, self.config.index_type)
        self.whitening = Whitening.load(self.paths.whitening)
        self.last_timings = Timings()
        self.last_build: BuildReport | None = None

    @classmethod
    def open(cls, index_dir: str | Path, db: str | None = None, device: Any = None) -> Retriever:
        return cls(index_dir, db=db, device=device)

    @classmethod
    def build(
        cls,
        corpus: str | Path,
        index_dir: str | Path,
        *,
        labels: str | Path | None = None,
        progress: Progress | None = None,
        device: Any = None,
        **options: Any,
    ) -> Retriever:
        """Build (or update) the index of `corpus` and open it. `options` are IndexConfig
        fields, e.g. local_method="disk", local_conf={"max_keypoints": 1024}, db_url=..."""
        report = build_index(
            corpus, index_dir, options, labels_csv=labels, progress=progress, device=device
        )
        retriever = cls(index_dir, db=options.get("db_url"), device=device)
        retriever.last_build = report
        return retriever

    @cached_property
    def global_model(self) -> Any:
        return load_global(self.config.global_model, self.config.global_conf, self.device)

    @cached_property
    def local(self) -> LocalExtractor:
        return load_local(self.config.local_method, self.config.local_conf, self.device)

    @cached_property
    def local_store(self) -> LocalFeatureStore:
        return LocalFeatureStore(self.paths.local_store, self.local.fingerprint, readonly=True)

    def load_local(self, image_id: int) -> LocalFeatures:
        return self.local_store.get_features(image_id)

    def load_local_many(self, image_ids: list[int]) -> list[LocalFeatures]:
        return self.local_store.get_features_many(image_ids)

    def search(
        self,
        image: ImageInput,
        k: int = 10,
        rerank: bool = True,
        shortlist: int | None = None,
        **rerank_options: Any,
    ) -> list[Match]:
        """The k best matches of `image`: global shortlist, then (by default) local rerank."""
        conf = parse_conf(
            RerankConf,
            {**({"shortlist": shortlist} if shortlist else {}), **rerank_options},
            "search options",
        )
        timings = Timings()
        rgb = load_image(image)
        t0 = time.perf_counter()
        query: LocalFeatures | None = None
        if rerank and shares_pass(self.global_model, self.local):
            raw, query = self.global_model.extract_all(rgb)
            timings.add("global+local (shared pass)", time.perf_counter() - t0)
        else:
            raw = self.global_model.extract(rgb)
            timings.add("global", time.perf_counter() - t0)
            if rerank:
                t_local = time.perf_counter()
                query = self.local.extract(rgb)
                timings.add("local", time.perf_counter() - t_local)
        t0 = time.perf_counter()
        desc = self.whitening.apply(raw)
        t1 = time.perf_counter()
        scores, ids = self.vectors.search(desc[None], max(conf.shortlist, k))
        t2 = time.perf_counter()
        timings.add("faiss", t2 - t1)
        cands = [
            Candidate(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0
        ]
        if rerank and cands:
            assert query is not None
            head = rerank_shortlist(
                query,
                cands[: conf.shortlist],
                self.load_local,
                conf,
                timings,
                load_many=self.load_local_many,
                device=self.device,
            )
            cands = head + cands[conf.shortlist :]
        self.last_timings = timings
        return self._matches(cands[:k])

    def recognize(self, image: ImageInput, k: int = 10, **search_options: Any) -> Recognition:
        """The landmark shown in `image`: inlier-weighted vote over the verified top-k."""
        matches = self.search(image, k=k, **search_options)
        label, confidence, evidence = vote(matches)
        return Recognition(label, confidence, [matches[i] for i in evidence])

    def _matches(self, cands: list[Candidate]) -> list[Match]:
        records = self.catalog.get(c.id for c in cands)
        out = []
        for c in cands:
            rec = records.get(c.id)
            if rec is None:  # in FAISS but gone from the catalog: never show a dangling id
                continue
            out.append(Match(c.id, rec.path, rec.label, c.global_score, c.inliers, c.verified))
        return out

    def info(self) -> dict[str, Any]:
        return {
            "index": str(self.paths.root),
            "config": self.config.model_dump(),
            "images": self.catalog.status_counts(),
            "vectors": len(self.vectors),
            "dim": self.vectors.dim,
            "bytes": self.paths.sizes(),
        }
