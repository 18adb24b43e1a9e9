"""The in-process search API.

    from retrieval import Retriever
    r = Retriever.build("photos/", "idx")          # or Retriever.open("idx")
    result = r.search("query.jpg", k=10)           # SearchResult: matches, recognition, timings
    r.recognize("query.jpg")                       # Recognition(label, confidence, evidence)

`image` arguments accept a path, an (H, W, 3) uint8 RGB array, or a PIL image.

A Retriever reads one published generation of the index at a time (index.snapshot), never
blocks writers, and moves to the newest generation between searches (`refresh`, automatic when
the manifest changed). It holds no per-search state: threads may share one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from functools import cached_property
from pathlib import Path
from typing import Any

from features.core import IndexError_, StoreMismatchError, parse_conf
from features.image import ImageInput
from features.pipeline import Described, Extractors
from features.types import LocalFeatures
from index.catalog import Catalog, mask_url
from index.layout import IndexConfig, IndexPaths
from index.snapshot import IndexSnapshot
from retrieval.building import BuildReport, build_index
from retrieval.ingest import Progress
from retrieval.search import Match, Recognition, SearchConf, SearchResult, search

logger = logging.getLogger(__name__)

__all__ = ["Match", "Recognition", "Retriever", "SearchConf", "SearchResult"]


class Retriever:
    """An open index: global shortlist, local rerank, recognition."""

    def __init__(self, index_dir: str | Path, db: str | None = None, device: Any = None) -> None:
        self.paths = IndexPaths(index_dir)
        if not self.paths.exists():
            self.paths.read_config()  # raises "not a retr index"
        self._snapshot = IndexSnapshot.open(self.paths)
        config = self._snapshot.config
        self.config: IndexConfig = config.model_copy(update={"db_url": db}) if db else config
        self.device = device
        self.catalog = Catalog(self.paths.db_url(self.config), hint=self.paths.repair_hint())
        self._lock = threading.Lock()
        self.build_report: BuildReport | None = None
        self._check_catalog()
        self._warn_lost()

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
        wait: float | None = None,
        ray: str | None = None,
        **options: Any,
    ) -> Retriever:
        """Build (or update) the index of `corpus` and open it. `options` are IndexConfig
        fields, e.g. local_method="disk", local_conf={"max_keypoints": 1024}, db_url=...;
        ray: "auto" or a cluster address to extract on Ray workers (retrieval.distributed)."""
        config = IndexConfig.parse(options)
        report = build_index(corpus, index_dir, config, labels, progress, device, wait, ray)
        retriever = cls(index_dir, db=options.get("db_url"), device=device)
        retriever.build_report = report
        return retriever

    def _check_catalog(self) -> None:
        """A catalog without the rows of a non-empty index is an error, not empty results."""
        held = self._snapshot.manifest.vector_count
        if held and self.catalog.is_empty():
            raise IndexError_(
                f"catalog {mask_url(self.catalog.url)} is empty but {self.paths.root} holds "
                f"{held} images; pass the --db it was built with, or {self.paths.repair_hint()}"
            )

    def _warn_lost(self) -> None:
        """Say once, at open, when a repair left images without features: searches cannot
        return them until `retr index update` extracts them again."""
        lost = self.catalog.lost_features()
        if lost:
            logger.warning(
                "%s: %d images lost their features in a repair and are not searchable; run "
                "`retr index update --index %s` to extract them again",
                self.paths.root,
                lost,
                self.paths.root,
            )

    # --- the index generation ------------------------------------------------------------------

    def snapshot(self) -> IndexSnapshot:
        """The newest published generation (re-read only when the manifest changed)."""
        if self._snapshot.changed():
            self.refresh()
        return self._snapshot

    def refresh(self) -> bool:
        """Move to the newest published generation; returns whether it changed. Searches
        running on the old one finish on it."""
        with self._lock:
            if not self._snapshot.changed():
                return False
            fresh = IndexSnapshot.open(self.paths)
            changed = fresh.generation != self._snapshot.generation
            self._snapshot = fresh
            return changed

    @property
    def generation(self) -> int:
        return self._snapshot.generation

    @cached_property
    def extractors(self) -> Extractors:
        models = Extractors.for_index(self.config, self.device)
        stored = (
            self._snapshot.manifest.global_fingerprint,
            self._snapshot.manifest.local_fingerprint,
        )
        if stored[0] and models.fingerprints != stored:
            raise StoreMismatchError(
                f"{self.paths.root} was built by extractors {stored}, but its configuration now "
                f"loads {models.fingerprints} (a weights file changed?); restore the weights "
                "or build a new index"
            )
        return models

    # --- searching -----------------------------------------------------------------------------

    def search(
        self,
        image: ImageInput | Described,
        conf: SearchConf | None = None,
        *,
        exclude: Collection[str] = (),
        **options: Any,
    ) -> SearchResult:
        """The best matches of `image` (or of its features from `self.extractors.describe`),
        the landmark it shows and timings. `options` are SearchConf fields (k, rerank,
        shortlist, vote_top, rerank_conf, matcher, qe, dba...) over `conf`, e.g.
        `matcher="lightglue"`; `exclude`: catalog paths left out of the results and the vote."""
        conf = _search_conf(conf, options)
        args = (self.catalog, self.extractors, image, conf, self.device, exclude)
        try:
            return search(self.snapshot(), *args)
        except IndexError_:
            if not self.refresh():  # a writer replaced a file this generation used: retry once
                raise
            return search(self._snapshot, *args)

    def recognize(
        self, image: ImageInput, conf: SearchConf | None = None, **options: Any
    ) -> Recognition:
        """The landmark shown in `image`: inlier-weighted vote over the verified top results."""
        return self.search(image, conf, **options).recognition

    def local_features(self, image_ids: list[int]) -> list[LocalFeatures]:
        """Stored local features of indexed images, in order."""
        return self.snapshot().store.local_features(image_ids)

    def info(self) -> dict[str, Any]:
        """What `retr index info` shows (index.info.index_info)."""
        from index.info import index_info

        return index_info(self.paths.root, db=self.config.db_url)


def _search_conf(conf: SearchConf | None, options: dict[str, Any]) -> SearchConf:
    base = (conf or SearchConf()).model_dump(exclude_unset=conf is None)
    return parse_conf(SearchConf, {**base, **options}, "search options")
