"""What every matcher shares: its result type and a small base class.

A matcher takes the query's and candidates' LocalFeatures (keypoints in original-image pixels,
L2-normalised descriptors, image size) and returns, per candidate, the matched index pairs and a
confidence per match. Matchers never raise on data: a side without keypoints gives no matches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from features.core import StrictConf, parse_conf, pick_device
from features.matcher_names import check_features
from features.types import LocalFeatures


@dataclass(frozen=True)
class Matches:
    """pairs: (K, 2) int64 (query row, candidate row); confidence: (K,) float32, higher is
    surer (cosine similarity for mutual NN, the assignment probability for LightGlue)."""

    pairs: np.ndarray
    confidence: np.ndarray

    @classmethod
    def empty(cls) -> Matches:
        return cls(np.zeros((0, 2), np.int64), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.pairs)

    def above(self, threshold: float) -> Matches:
        """The matches whose confidence exceeds `threshold`."""
        keep = self.confidence > threshold
        return Matches(self.pairs[keep], self.confidence[keep])


class Matcher(ABC):
    """Base of every matcher plug-in: a strict config, a device, the local method it serves.

    Subclasses set `name` and `Conf`, may restrict `check_features`, and implement `match_many`.
    """

    name: ClassVar[str]
    Conf: ClassVar[type[StrictConf]]
    parallel_batches: ClassVar[bool] = True
    """True: batches are cheap and independent, so the rerank runs them on its thread pool, one
    core each. False: one batch is a network pass that uses every core by itself."""

    def __init__(
        self,
        conf: StrictConf | dict[str, Any] | None = None,
        local_method: str = "disk",
        device: Any = None,
    ) -> None:
        self.check_features(local_method)
        values = conf.model_dump() if isinstance(conf, BaseModel) else dict(conf or {})
        self.conf = parse_conf(self.Conf, values, f"matcher '{self.name}'")
        self.local_method = local_method
        self.device = pick_device(device)

    @classmethod
    def check_features(cls, local_method: str) -> None:
        """Raise ConfigError when this matcher cannot match `local_method`'s features (the
        table features.matcher_names.MATCHED_METHODS says which)."""
        check_features(cls.name, local_method)

    @abstractmethod
    def match_many(
        self, query: LocalFeatures, candidates: Sequence[LocalFeatures]
    ) -> list[Matches]:
        """The query matched against each candidate, in order."""

    def match(self, query: LocalFeatures, candidate: LocalFeatures) -> Matches:
        return self.match_many(query, [candidate])[0]

    def batches(self, lengths: Sequence[int]) -> list[range]:
        """Consecutive candidate ranges that one `match_many` call should serve."""
        return [range(0, len(lengths))] if lengths else []
