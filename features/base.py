"""The local-feature extractor contract shared by every plug-in.

A plug-in subclasses LocalExtractor, declares its typed config (`Conf`), its checkpoint
(`weights_spec`) and licence, builds its network in `_init`, and implements `_extract` on an
image already decoded and downscaled by the base class. The base class maps keypoints back to
original-image pixels, sorts by score, keeps `max_keypoints`, and checks the output contract, once
for every plug-in.

One name per idea across plug-ins: `resize_max` is the longer side before extraction,
`max_keypoints` the number kept, `nms_radius` the half-side r of a (2r + 1)^2 NMS window,
`pyramid` the scales of a local-feature image pyramid (`scales` is kept for the scales of a
global descriptor, features.delg.base). Size rules that mean something else keep a `resize_`
prefix and say what they bound (`resize_max_sum`, `resize_max_height`); knobs of a pyramid's
schedule start with `pyramid_`. A plug-in whose official code names a knob otherwise maps the
official names in one `OFFICIAL_NAMES` table.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, field_validator

from features.core import StrictConf, file_sha256, parse_conf, pick_device
from features.engine import DenseRunner, pick_engine
from features.image import ImageInput, load_image, resize_max, to_pixel_frame
from features.types import LocalFeatures
from features.weights import WeightSpec, resolve_weights

logger = logging.getLogger(__name__)


class PluginConf(StrictConf):
    """What every plug-in's config has: where its checkpoint is."""

    weights: str | None = None
    """Explicit checkpoint path; otherwise the standard resolution order (features.weights)."""


class LocalConf(PluginConf):
    """Knobs every local method has. Plug-ins subclass this with their own defaults."""

    max_keypoints: int | None = 2048
    """Keep at most this many keypoints (best scores first); None keeps all."""
    resize_max: int | None = 1024
    """Downscale so the longer side is at most this many pixels before extraction; None: never.
    (`_downscale` applies it; a plug-in whose official code resizes with its own arithmetic
    applies it that way.)"""

    @field_validator("max_keypoints", "resize_max", check_fields=False)
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("must be a positive number of keypoints/pixels, or None")
        return value


def image_to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device)
    return t.permute(2, 0, 1)[None].float().div_(255.0)


class Plugin(ABC):
    """What every model plug-in shares: a strict typed config, a device, its checkpoint resolved
    (explicit path, cache, package, URL), and a fingerprint of all three that feature stores
    record so that two configurations never mix.

    Subclasses set `name`, `Conf`, `licence`, `weights_spec` (None for weight-free models) and
    build their network in `_init`. `engine` (torch, onnxruntime, openvino; default
    $RETR_ENGINE, then features.engine.DEFAULT_ENGINE) runs the dense passes a plug-in wraps in
    `dense_runner`; like `device`, it is not part of the config or the fingerprint.
    """

    name: ClassVar[str]
    Conf: ClassVar[type[PluginConf]]
    licence: ClassVar[str] = ""
    weights_spec: ClassVar[WeightSpec | None] = None
    role: ClassVar[str]
    """What the plug-in is, in error messages ("local method", "global model")."""
    fingerprint_key: ClassVar[str] = "method"
    """The fingerprint's name field; fixed per role so that existing indexes keep opening."""

    def __init__(
        self,
        conf: StrictConf | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        engine: str | None = None,
        **overrides: Any,
    ) -> None:
        values = conf.model_dump() if isinstance(conf, BaseModel) else dict(conf or {})
        values.update(overrides)
        self.conf = parse_conf(self.Conf, values, f"{self.role} '{self.name}'")
        self.device = pick_device(device)
        self.engine = pick_engine(engine)
        self.weights_path: Path | None = None
        spec = self._weights_spec()
        if spec is not None:
            self.weights_path = resolve_weights(spec, self.conf.weights, what=self.name)
        self._init()

    def _weights_spec(self) -> WeightSpec | None:
        """The checkpoint of this configuration: `weights_spec`, unless a plug-in with variants
        picks one per variant (`weights_spec` is then its default variant's)."""
        return self.weights_spec

    @abstractmethod
    def _init(self) -> None:
        """Build the network and load `self.weights_path`."""

    def dense_runner(self, module: torch.nn.Module, part: str) -> DenseRunner:
        """`module` ((B, 3, H, W) -> (B, C, h, w), already on self.device) as run by this
        plug-in's engine; its exported graph is cached under the plug-in's fingerprint."""
        return DenseRunner(
            module,
            key=lambda: f"{self.name}-{part}-{self.fingerprint}",
            engine=self.engine,
            device=self.device,
            what=f"{self.role} '{self.name}' ({part})",
        )

    @cached_property
    def fingerprint(self) -> str:
        """Identity of everything that changes the output: name, config, weights content."""
        conf = self.conf.model_dump(exclude={"weights"})
        digest = file_sha256(self.weights_path) if self.weights_path else None
        blob = {self.fingerprint_key: self.name, "conf": conf, "weights": digest}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class LocalExtractor(Plugin):
    """Base class of every local-feature plug-in: a Plugin that also implements `_extract`
    (and may cite its `paper`)."""

    Conf: ClassVar[type[LocalConf]] = LocalConf
    conf: LocalConf
    role = "local method"
    paper: ClassVar[str] = ""

    @abstractmethod
    def _extract(self, image: np.ndarray) -> tuple[Any, Any, Any]:
        """Extract from an (H, W, 3) uint8 RGB image.

        Returns keypoints (N, 2) x, y in the pixels of `image`, scores (N,), descriptors (N, D),
        as numpy arrays or tensors. Order and count are fixed by the base class.
        """

    @property
    @abstractmethod
    def descriptor_dim(self) -> int:
        """D, the length of one descriptor."""

    def _downscale(self, image: np.ndarray) -> np.ndarray:
        """The (h, w, 3) uint8 image `_extract` runs on: longer side at most `conf.resize_max`
        (OpenCV area interpolation). A plug-in whose official code downscales with other
        arithmetic overrides this, or returns `image` unchanged when it applies `resize_max`
        itself inside `_extract` (and returns keypoints in the pixels of `image`)."""
        return resize_max(image, self.conf.resize_max)[0]

    @torch.inference_mode()
    def extract(self, image: ImageInput) -> LocalFeatures:
        """Local features of one image, in original-image pixels (see features.types)."""
        rgb = load_image(image)
        h, w = rgb.shape[:2]
        small = self._downscale(rgb)
        kpts, scores, desc = (_numpy(x) for x in self._extract(small))
        kpts = kpts.astype(np.float32).reshape(-1, 2)
        if small.shape[:2] != (h, w):
            kpts = to_pixel_frame(kpts, small.shape[1] / w, small.shape[0] / h)
        desc = desc.astype(np.float32).reshape(len(kpts), self.descriptor_dim)
        norms = np.linalg.norm(desc, axis=1, keepdims=True)
        desc = desc / np.maximum(norms, 1e-12)
        feats = LocalFeatures(kpts, scores.astype(np.float32).reshape(-1), desc, (w, h))
        order = np.argsort(-feats.scores, kind="stable")
        feats = LocalFeatures(kpts[order], feats.scores[order], desc[order], (w, h))
        return feats.top(self.conf.max_keypoints)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)
