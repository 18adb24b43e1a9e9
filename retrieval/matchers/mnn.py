"""Mutual nearest neighbours (optionally with Lowe's ratio test): what the seed methods were
published with, for any local method. The batched products live in retrieval.matching; this
plug-in only adds each match's cosine similarity as its confidence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from pydantic import Field

from features.core import StrictConf
from features.types import LocalFeatures
from retrieval.matchers.base import Matcher, Matches
from retrieval.matching import CHUNK_COLUMNS, CHUNK_COLUMNS_GPU, chunks, mutual_nn_many


class MNNConf(StrictConf):
    ratio: float | None = Field(default=None, gt=0)
    """Lowe ratio test on top of mutual nearest neighbours (None: off)."""


class MNN(Matcher):
    name = "mnn"
    Conf: ClassVar[type[StrictConf]] = MNNConf
    conf: MNNConf
    parallel_batches = True

    def match_many(
        self, query: LocalFeatures, candidates: Sequence[LocalFeatures]
    ) -> list[Matches]:
        """One matrix product for all `candidates` (split long lists with `batches`): exactly
        `retrieval.matching.mutual_nn` per pair."""
        descs = [c.descriptors for c in candidates]
        found = mutual_nn_many(query.descriptors, descs, self.conf.ratio, self.device)
        return [_with_similarity(query, c, m) for c, m in zip(candidates, found, strict=True)]

    def batches(self, lengths: Sequence[int]) -> list[range]:
        return chunks(lengths, CHUNK_COLUMNS_GPU if self.device.type == "cuda" else CHUNK_COLUMNS)


def _with_similarity(query: LocalFeatures, cand: LocalFeatures, pairs: np.ndarray) -> Matches:
    a = query.descriptors[pairs[:, 0]]
    b = cand.descriptors[pairs[:, 1]]
    return Matches(pairs, np.einsum("kd,kd->k", a, b, dtype=np.float32))
