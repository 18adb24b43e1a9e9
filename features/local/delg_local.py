"""DELG local features (Cao, Araujo, Sim: "Unifying Deep Local and Global Features for Image
Search", ECCV 2020) as a retr local plug-in.

The official extractor (tensorflow/models `research/delf`) on a ResNet-50/101 DELG model:
PIL-bilinear pre-resize to a longer side of 1024, a 7-level image pyramid (0.25 ... 2), an
attention score per block3 cell (stride 32) with the official threshold, 128-D descriptors from
the autoencoder's reduction layer, the best 1000 by score. See features.delg.official for every
step and features.delg.model for global + local features from a shared forward pass (it imports
this module; what both use is in features.delg.official).

Keypoints: the official (y, x) cell centres 32 i / s, swapped to retr's (x, y); the official frame
already has the centre of the top-left pixel at 0.

Weights: a retr checkpoint converted from the official TensorFlow release (Apache-2.0), or a
`retr train global` checkpoint passed as `weights` (features.delg.trained: its attention and
autoencoder branch, cells of the stride-16 map; `score_threshold` None keeps the strongest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.base import LocalConf, LocalExtractor
from features.delg import official, trained
from features.delg.official import Dataset, Depth, load_net, to_local_features
from features.registry import LOCAL_METHODS


class DELGLocalConf(LocalConf):
    """Official names of these knobs: features.delg.official.OFFICIAL_NAMES."""

    max_keypoints: int | None = 1000
    """Features kept, best attention first."""
    resize_max: int | None = 1024
    """Longer side after the pre-resize, which the official extractor does itself (PIL bilinear,
    keypoints mapped back by its own factors); None: never resize."""
    depth: Depth = 50
    dataset: Dataset = "gldv2-clean"
    """Training set of the official model: GLDv2-clean or GLDv1 (selects weights, threshold)."""
    pyramid: tuple[float, ...] = official.IMAGE_SCALES
    """Scales of the image pyramid the local features come from."""
    score_threshold: float | None = None
    """Keep cells whose attention is >= this; None: the official config's for depth/dataset
    (r50: 454.6 GLDv2-clean, 175.0 GLDv1; r101: 357.48, 166.1)."""


class DELGLocal(LocalExtractor):
    """DELG attention-selected keypoints with 128-D descriptors. Licence: Apache-2.0."""

    name = "delg"
    Conf = DELGLocalConf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["delg"].licence
    paper = "Cao et al., Unifying Deep Local and Global Features for Image Search, ECCV 2020"
    weights_spec = None  # depends on depth/dataset: resolved in _init from the preset
    conf: DELGLocalConf

    def _init(self) -> None:
        self.trained: trained.DelgTrainNet | None = None
        if trained.is_trained_checkpoint(self.conf.weights):  # a `retr train global` model
            self.weights_path = Path(str(self.conf.weights))
            self.trained = trained.load_trained(self.weights_path, self.name).to(self.device)
            return
        self.preset = official.preset_for(self.conf.depth, self.conf.dataset)
        what = f"{self.name}-r{self.conf.depth}"
        self.net, self.weights_path = load_net(self.preset, self.conf.weights, self.device, what)

    @property
    def descriptor_dim(self) -> int:
        return 128 if self.trained is None else self.trained.arch.local_dim

    @property
    def settings(self) -> official.Settings:
        """This config in the official extractor's terms (global scales unused here)."""
        threshold = self.conf.score_threshold
        return official.Settings(
            image_scales=self.conf.pyramid,
            global_scales_ind=(),
            score_threshold=(
                self.preset.settings.score_threshold if threshold is None else threshold
            ),
            max_feature_num=self.conf.max_keypoints or np.iinfo(np.int32).max,
            max_image_size=self.conf.resize_max,
        )

    @torch.inference_mode()
    def dense(self, image: np.ndarray, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs at one pyramid level of an (H, W, 3) uint8 image (no pre-resize):
        attention scores (h, w) and the local feature map (128, h, w) before normalisation."""
        x = official.resize_level(official.normalise(image, self.device), scale)
        prob, local = self.net.local_head(self.net.block3(x))
        return prob[0], local[0]

    def _downscale(self, image: np.ndarray) -> np.ndarray:
        """Unchanged: the official extractor pre-resizes to `resize_max` itself."""
        return image if self.trained is None else super()._downscale(image)

    def _extract(self, image: np.ndarray) -> tuple[Any, Any, Any]:
        if self.trained is not None:
            c = self.conf
            return trained.local_features(
                self.trained, image, c.pyramid, c.max_keypoints, c.score_threshold, self.device
            )
        feats = official.extract(self.net, image, self.settings, want_global=False)
        local = to_local_features(feats, (image.shape[1], image.shape[0]))
        return local.keypoints, local.scores, local.descriptors
