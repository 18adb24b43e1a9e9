"""The pair of models an index uses: one global model and one local method, loaded once.

`Extractors.describe` is the one place an image becomes features, for indexing and for queries
alike: the global descriptor, and the local features when asked, sharing the forward passes
when the global model can serve the local method too (DELG's own local branch with the same
weights and pyramid: `GlobalExtractor.shares_pass_with`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from features.image import ImageInput, load_image
from features.registry import load_global, load_local
from features.types import LocalFeatures

if TYPE_CHECKING:  # the networks load when first used (the maintenance commands never do)
    from features.base import LocalExtractor
    from features.delg.base import GlobalExtractor


@dataclass(frozen=True)
class Described:
    """One image's features. descriptor: (Dg,) float32, L2-normalised, before whitening."""

    descriptor: np.ndarray
    local: LocalFeatures | None
    image_size: tuple[int, int]
    """(width, height) of the decoded image."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Time per model ("global", "local", or "global+local (shared pass)")."""


class ModelsConfig(Protocol):
    """The model fields of an index configuration (index.layout.IndexConfig has them; features
    does not import the index layer)."""

    @property
    def global_model(self) -> str: ...
    @property
    def global_conf(self) -> dict[str, Any]: ...
    @property
    def local_method(self) -> str: ...
    @property
    def local_conf(self) -> dict[str, Any]: ...


@dataclass
class Extractors:
    """The models of one index configuration, built on first use."""

    global_name: str
    global_conf: dict[str, Any]
    local_name: str
    local_conf: dict[str, Any]
    device: Any = None

    @classmethod
    def for_index(cls, config: ModelsConfig, device: Any = None) -> Extractors:
        """The models an index's configuration names (index.layout.IndexConfig, or anything
        with its four model fields): the one way every caller builds an index's models."""
        return cls(
            config.global_model, config.global_conf, config.local_method, config.local_conf, device
        )

    @cached_property
    def global_model(self) -> GlobalExtractor:
        return load_global(self.global_name, self.global_conf, self.device)

    @cached_property
    def local(self) -> LocalExtractor:
        return load_local(self.local_name, self.local_conf, self.device)

    @property
    def fingerprints(self) -> tuple[str, str]:
        """(global, local) fingerprints: what feature stores record."""
        return self.global_model.fingerprint, self.local.fingerprint

    @property
    def global_dim(self) -> int:
        return self.global_model.dim

    def describe(self, image: ImageInput, with_local: bool = True) -> Described:
        """Features of one image (a path, an array or a PIL image)."""
        rgb = load_image(image)
        h, w = rgb.shape[:2]
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        if with_local and self.global_model.shares_pass_with(self.local):
            desc, both = self.global_model.extract_all(rgb)
            seconds["global+local (shared pass)"] = time.perf_counter() - t0
            return Described(desc, both, (w, h), seconds)
        desc = self.global_model.extract(rgb)
        seconds["global"] = time.perf_counter() - t0
        local: LocalFeatures | None = None
        if with_local:
            t1 = time.perf_counter()
            local = self.local.extract(rgb)
            seconds["local"] = time.perf_counter() - t1
        return Described(desc, local, (w, h), seconds)
