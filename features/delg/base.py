"""The global-descriptor contract and the DELG multi-scale aggregation every backbone shares.

DELG extracts a raw descriptor at each scale of an image pyramid, L2-normalises each, sums them
and L2-normalises the sum. A subclass provides only the network: `_descriptor(x)` maps one
normalised (1, 3, h, w) image to a raw (D,) descriptor (GeM pooling and, for trained DELG models,
the FC whitening layer included).

GlobalExtractor is the typed base of every global model (`features.registry.load_global` builds
one). A model with a local branch of its own (DELG ResNet) also says, through `shares_pass_with`,
whether a local plug-in's features can come from its forward passes, and then `extract_all` gives
both at once.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from features.base import LocalExtractor, Plugin, PluginConf
from features.image import ImageInput, load_image
from features.types import LocalFeatures

DELG_GLOBAL_SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))


class GlobalConf(PluginConf):
    scales: tuple[float, ...] = DELG_GLOBAL_SCALES
    """Scales whose global descriptors are aggregated (DELG: 1/sqrt(2), 1, sqrt(2)). Local
    features call their image pyramid `pyramid` instead."""
    resize_max: int | None = 1024
    """Longer side after the pre-resize, before the pyramid (DELG's max_image_size)."""
    gem_p: float = 3.0


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling: (B, C, H, W) -> (B, C), mean(max(x, eps)^p)^(1/p)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def scaled_size(h: int, w: int, s: float) -> tuple[int, int]:
    """Pyramid level size as DELG computes it: round(float32(side) * s), half to even."""
    s32 = np.float32(s)
    return int(np.round(np.float32(h) * s32)), int(np.round(np.float32(w) * s32))


class GlobalExtractor(Plugin):
    """Base of every global model: image in, (D,) float32 L2-normalised descriptor out."""

    Conf: ClassVar[type[GlobalConf]] = GlobalConf
    conf: GlobalConf
    role = "global model"
    fingerprint_key = "model"

    @abstractmethod
    def _normalise(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, H, W) float network input on self.device."""

    @abstractmethod
    def _descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) normalised input -> (D,) raw descriptor of that scale."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """D, the descriptor length."""

    def _pre_resize(self, image: np.ndarray) -> np.ndarray:
        from features.image import resize_max

        return resize_max(image, self.conf.resize_max)[0]

    @torch.inference_mode()
    def per_scale(self, image: ImageInput) -> torch.Tensor:
        """(S, D) raw descriptors, one row per configured scale."""
        x = self._normalise(self._pre_resize(load_image(image)))
        h, w = x.shape[-2:]
        rows = []
        for s in self.conf.scales:
            size = scaled_size(h, w, s)
            xs = (
                x
                if size == (h, w)
                else F.interpolate(
                    x, size=size, mode="bilinear", align_corners=False, antialias=False
                )
            )
            rows.append(self._descriptor(xs))
        return torch.stack(rows)

    def extract(self, image: ImageInput) -> np.ndarray:
        """(D,) float32 L2-normalised multi-scale descriptor."""
        raw = self.per_scale(image)
        agg = F.normalize(F.normalize(raw, dim=-1).sum(0), dim=0)
        return agg.float().cpu().numpy()

    def shares_pass_with(self, local: LocalExtractor) -> bool:
        """True when `extract_all` gives exactly `local.extract`'s features from this model's own
        forward passes, so one pass per scale feeds both. False here: a plain global model has no
        local branch."""
        return False

    def extract_all(self, image: ImageInput) -> tuple[np.ndarray, LocalFeatures]:
        """(D,) global descriptor (as `extract`) and the local features of the plug-in for which
        `shares_pass_with` is True, from one forward pass per scale."""
        raise NotImplementedError(f"global model '{self.name}' has no local branch")
