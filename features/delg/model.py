"""DELG with the official ResNet-50/101 backbones (Cao, Araujo, Sim: "Unifying Deep Local and
Global Features for Image Search", ECCV 2020), as a retr global model, plus global + local
features from one forward pass per pyramid level.

Registered as "delg-r50" and "delg-r101". The defaults are those of the official GLDv2-clean
configs (`r{50,101}delg_gldv2clean_config.pbtxt`): pre-resize to a longer side of 1024 (PIL
bilinear, as the official extractor), (pixel - 128) / 128, global scales 1/sqrt(2), 1, sqrt(2)
of the 7-level pyramid, GeM (p=3) and the trained whitening FC; `dataset="gldv1"` selects the
GLDv1 models. Weights: retr checkpoints converted from the official TensorFlow release
(features.convert.delg). Licence: Apache-2.0 (tensorflow/models code and released models).
"""

from __future__ import annotations

import numpy as np
import torch

from features.base import LocalExtractor
from features.core import ConfigError, ImageReadError
from features.delg import official
from features.delg.base import GlobalConf, GlobalExtractor
from features.delg.official import Dataset, Depth, load_net, to_local_features
from features.delg.resnet import GLOBAL_DIM
from features.image import ImageInput, load_image
from features.local.delg_local import DELGLocal
from features.types import LocalFeatures


def check_subset(inner: tuple[float, ...], outer: tuple[float, ...], what: str) -> None:
    """Global scales are levels of the pyramid (official: indices into image_scales)."""
    levels = [np.float32(s) for s in outer]
    extra = [s for s in inner if np.float32(s) not in levels]
    if extra:
        raise ConfigError(f"{what}: scales {extra} are not levels of the pyramid {outer}")


class DelgResNetConf(GlobalConf):
    """Official names of these knobs: features.delg.official.OFFICIAL_NAMES. `pyramid`,
    `score_threshold`, `max_keypoints` and `resize_max` mean what they mean in DELGLocalConf."""

    scales: tuple[float, ...] = official.Settings().global_scales
    """Global scales: levels 3, 4, 5 (0.7071, 1, 1.4142) of the official pyramid."""
    resize_max: int | None = 1024
    """Longer side after the PIL bilinear pre-resize."""
    depth: Depth = 50
    dataset: Dataset = "gldv2-clean"
    """Training set of the official model: GLDv2-clean or GLDv1 (selects weights, threshold)."""
    pyramid: tuple[float, ...] = official.IMAGE_SCALES
    """All pyramid levels; local features come from every level (extract_all only)."""
    score_threshold: float | None = None
    """Attention threshold of local features; None: the official config's for depth/dataset."""
    max_keypoints: int | None = 1000
    """Local features kept by extract_all, best scores first."""


class DelgResNet(GlobalExtractor):
    """2048-D DELG descriptor from a ResNet-50/101 DELG model; `extract_all` adds the local
    features (128-D, attention-selected) computed in the same forward passes."""

    name = "delg-resnet"
    Conf = DelgResNetConf
    licence = "Apache-2.0"
    paper = "Cao et al., Unifying Deep Local and Global Features for Image Search, ECCV 2020"
    conf: DelgResNetConf

    def _init(self) -> None:
        check_subset(self.conf.scales, self.conf.pyramid, f"global model '{self.name}'")
        self.preset = official.preset_for(self.conf.depth, self.conf.dataset)
        what = f"delg-r{self.conf.depth}"
        self.net, self.weights_path = load_net(self.preset, self.conf.weights, self.device, what)

    @property
    def dim(self) -> int:
        return GLOBAL_DIM

    @property
    def settings(self) -> official.Settings:
        """This config in the official extractor's terms."""
        pyramid = [np.float32(s) for s in self.conf.pyramid]
        threshold = self.conf.score_threshold
        return official.Settings(
            image_scales=self.conf.pyramid,
            global_scales_ind=tuple(pyramid.index(np.float32(s)) for s in self.conf.scales),
            score_threshold=(
                self.preset.settings.score_threshold if threshold is None else threshold
            ),
            max_feature_num=self.conf.max_keypoints or np.iinfo(np.int32).max,
            max_image_size=self.conf.resize_max,
        )

    def _pre_resize(self, image: np.ndarray) -> np.ndarray:
        return official.pre_resize(image, self.conf.resize_max)[0]

    def _normalise(self, image: np.ndarray) -> torch.Tensor:
        return official.normalise(image, self.device)

    def _descriptor(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.global_head(self.net.block3(x), self.conf.gem_p)[0]

    @torch.inference_mode()
    def per_scale(self, image: ImageInput) -> torch.Tensor:
        """(S, 2048) raw descriptors. Overrides the base pyramid only to resize with TF's
        bilinear arithmetic (official.resize_level), as the shared pass does."""
        x = self._normalise(self._pre_resize(load_image(image)))
        return torch.stack(
            [self._descriptor(official.resize_level(x, s)) for s in self.conf.scales]
        )

    def extract_official(self, image: ImageInput) -> official.DelgFeatures:
        """Global + local features in the official extractor's conventions ((y, x) locations)."""
        return official.extract(self.net, load_image(image), self.settings)

    def shares_pass_with(self, local: LocalExtractor) -> bool:
        """True when `local` is DELG's local plug-in on the same weights with the same pyramid,
        score threshold, feature count and pre-resize: then `extract_all` gives its features
        from the global model's forward passes (as the paper intends) instead of a second run."""
        if not isinstance(local, DELGLocal) or local.weights_path != self.weights_path:
            return False
        mine, theirs = self.settings, local.settings
        fields = ("image_scales", "score_threshold", "max_feature_num", "max_image_size")
        return all(getattr(mine, f) == getattr(theirs, f) for f in fields)

    def extract_all(self, image: ImageInput) -> tuple[np.ndarray, LocalFeatures]:
        """(D,) global descriptor and local features (retr conventions) of one image, from one
        forward pass per pyramid level: the levels shared by both skip a second backbone run.
        They equal `local.extract`'s for any `local` with `shares_pass_with(local)`."""
        rgb = load_image(image)
        feats = official.extract(self.net, rgb, self.settings)
        if feats.global_descriptor is None:
            raise ImageReadError("<image>", f"too small for DELG after the pre-resize: {rgb.shape}")
        size = (rgb.shape[1], rgb.shape[0])
        return feats.global_descriptor.astype(np.float32), to_local_features(feats, size)
