"""Learned whitening from an index's own verified pairs (`retr train whitening`). No labels.

Radenović, Tolias, Chum: "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2019,
"learned whitening" Lw:

1. Pairs: every indexed image is searched in its own index through the one search path
   (Retriever.search, with the local rerank; the image itself excluded), from its stored
   features (nothing is extracted again). A shortlisted image whose RANSAC inliers reach the
   verified threshold forms a matching pair with it.
2. Whitening: P1 = C_S^(-1/2), C_S the covariance of the pairs' descriptor differences, shrunk
   toward a multiple of the identity (few pairs, many dimensions) and optionally mixed with the
   corpus covariance (the one the PCA whitening inverts, itself shrunk as the index's config
   says): C = (1 - mix) C_S / tr(C_S) + mix C_corpus / tr(C_corpus).
3. Rotation: PCA of the whitened corpus, P = V^T P1 (a rotation: cosine similarities do not
   change while all dimensions are kept).

The result is stored in the index as its "learned" whitening and every vector re-projected, in
one commit through the writer (IndexWriter.set_whitening); the PCA whitening stays, and
`use_whitening(DIR, "pca")` switches back. Later builds keep the learned whitening (refitting
only the PCA one beside it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.core import ConfigError
from features.pipeline import Described
from index.layout import IndexPaths
from index.whitening import Whitening
from index.writer import IndexWriter, PublishReport
from retrieval.api import Retriever
from retrieval.training.confs import LearnedWhiteningConf

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass
class MinedPairs:
    """Verified pairs of image ids (i < j), with their inliers."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    inliers: list[int] = field(default_factory=list)
    searched: int = 0


def mine_pairs(
    retriever: Retriever,
    conf: LearnedWhiteningConf,
    ids: list[int] | None = None,
    progress: Progress | None = None,
) -> MinedPairs:
    """Verified pairs among the images of `retriever`'s index (a retrieval.api.Retriever):
    each image of `ids` (default: all) searched with the rerank, from its stored features."""
    snap = retriever.snapshot()
    ids = [int(i) for i in (snap.store.ids() if ids is None else ids)]
    records = retriever.catalog.get(ids)
    found: dict[tuple[int, int], int] = {}
    out = MinedPairs()
    for done, i in enumerate(ids):
        if progress:
            progress(done, len(ids), records[i].path if i in records else str(i))
        if i not in records:
            continue
        local = snap.store.local_features([i])[0]
        described = Described(snap.store.global_descriptors([i])[0], local, local.image_size)
        result = retriever.search(
            described,
            k=conf.shortlist,
            shortlist=conf.shortlist,
            rerank=True,
            matcher=conf.matcher,
            exclude={records[i].path},
        )
        out.searched += 1
        for m in result.matches:
            if m.verified and m.id != i:
                key = (min(i, m.id), max(i, m.id))
                found[key] = max(found.get(key, 0), m.inliers)
    if progress:
        progress(len(ids), len(ids), "")
    out.pairs, out.inliers = list(found), list(found.values())
    return out


def learn_whitening(
    corpus: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    shrinkage: float = 0.1,
    mix: float = 0.0,
    corpus_shrinkage: float = 0.9,
) -> Whitening:
    """Lw from (N, D) raw corpus descriptors and (P, D) matching pairs a[k] ~ b[k]."""
    x = corpus.astype(np.float64)
    d = x.shape[1]
    mean = x.mean(0)
    diff = (a - b).astype(np.float64)
    cov_s = _shrunk(diff.T @ diff / max(len(diff), 1), shrinkage)
    if mix > 0:
        centred = x - mean
        cov_c = _shrunk(centred.T @ centred / max(len(x) - 1, 1), corpus_shrinkage)
        cov_s = (1 - mix) * cov_s / np.trace(cov_s) + mix * cov_c / np.trace(cov_c)
    val, vec = np.linalg.eigh(cov_s)
    p1 = (vec / np.sqrt(np.maximum(val, 1e-12 * val.max()))).T
    y = (x - mean) @ p1.T
    val2, vec2 = np.linalg.eigh(y.T @ y)
    proj = vec2[:, np.argsort(val2)[::-1]].T @ p1
    assert proj.shape == (d, d)
    return Whitening(mean.astype(np.float32), proj.astype(np.float32), shrinkage)


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    d = cov.shape[0]
    return (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)


@dataclass
class WhiteningReport:
    pairs: int
    searched: int
    generation: int
    use: str


def train_whitening(
    index_dir: str | Path,
    conf: LearnedWhiteningConf | None = None,
    *,
    wait: float | None = None,
    progress: Progress | None = None,
) -> WhiteningReport:
    """Mine the index's verified pairs, learn Lw, and make it the index's whitening."""
    conf = conf or LearnedWhiteningConf()
    retriever = Retriever.open(index_dir)
    mined = mine_pairs(retriever, conf, progress=progress)
    if len(mined.pairs) < conf.min_pairs:
        raise ConfigError(
            f"{index_dir}: only {len(mined.pairs)} verified pairs among {mined.searched} images "
            f"(need {conf.min_pairs}); index more images of the same places, or raise --shortlist"
        )
    store = retriever.snapshot().store
    corpus = store.global_descriptors()
    pa, pb = (np.array(side, np.int64) for side in zip(*mined.pairs, strict=True))
    whitening = learn_whitening(
        corpus,
        store.global_descriptors(pa),
        store.global_descriptors(pb),
        conf.shrinkage,
        conf.mix,
        retriever.config.whitening_shrinkage,
    )
    report = publish_whitening(index_dir, whitening, wait=wait)
    logger.info(
        "learned whitening from %d pairs: generation %d", len(mined.pairs), report.generation
    )
    return WhiteningReport(len(mined.pairs), mined.searched, report.generation, "learned")


def publish_whitening(
    index_dir: str | Path, learned: Whitening, *, wait: float | None = None
) -> PublishReport:
    """Store `learned` as the index's whitening and re-project its vectors (one commit)."""
    with IndexWriter.open(IndexPaths(index_dir), wait=wait) as writer:
        return writer.set_whitening("learned", learned)


def use_whitening(index_dir: str | Path, use: str, *, wait: float | None = None) -> PublishReport:
    """Switch an index between its "pca" and "learned" whitening (both kept)."""
    if use not in ("pca", "learned"):
        raise ConfigError(f"unknown whitening '{use}' (available: pca, learned)")
    with IndexWriter.open(IndexPaths(index_dir), wait=wait) as writer:
        return writer.set_whitening(use)
