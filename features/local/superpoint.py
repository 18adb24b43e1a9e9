"""SuperPoint: Self-Supervised Interest Point Detection and Description (DeTone, Malisiewicz,
Rabinovich; CVPR Workshops 2018).

A VGG-style encoder reduces the gray image 8x; a detector head gives 65 logits per 8x8 cell (64
pixels + a "no keypoint" dustbin) and a descriptor head a 256-D map at 1/8 resolution. This file
reproduces Magic Leap's inference code (magicleap/SuperGluePretrainedNetwork,
models/superpoint.py): max-pool NMS, a strict `>` threshold, border removal, top-k, then
bilinear sampling of the L2-normalised coarse descriptors.

Licence: the weights `superpoint_v1.pth` (and Magic Leap's code) are under Magic Leap's academic /
non-profit research licence: NON-COMMERCIAL research use only. Never commit the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.base import LocalConf, LocalExtractor
from features.core import CheckpointError
from features.local._superpoint_common import (
    CELL,
    gray_tensor,
    inside_border,
    logits_to_heatmap,
    no_features,
    to_gray,
    window_max,
)
from features.registry import LOCAL_METHODS
from features.weights import load_checkpoint, load_state_dict_strict

DESCRIPTOR_DIM = 256


def _conv(cin: int, cout: int, kernel: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2)


class SuperPointNet(nn.Module):
    """(B, 1, H, W) gray in [0, 1] -> semi (B, 65, H/8, W/8) logits and desc (B, 256, H/8, W/8),
    the descriptor head's raw output before L2 normalisation. H/8 and W/8 are floored (each
    2x2 max-pool drops an odd last row or column). Attribute names are the checkpoint's keys."""

    def __init__(self) -> None:
        super().__init__()
        widths = (1, 64, 64, 128, 128)
        for stage in range(4):
            cin, cout = widths[stage], widths[stage + 1]
            setattr(self, f"conv{stage + 1}a", _conv(cin, cout))
            setattr(self, f"conv{stage + 1}b", _conv(cout, cout))
        self.convPa, self.convPb = _conv(128, 256), _conv(256, 65, kernel=1)
        self.convDa, self.convDb = _conv(128, 256), _conv(256, DESCRIPTOR_DIM, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for stage in range(1, 5):
            if stage > 1:
                x = F.max_pool2d(x, 2, 2)
            x = F.relu(getattr(self, f"conv{stage}a")(x))
            x = F.relu(getattr(self, f"conv{stage}b")(x))
        semi = self.convPb(F.relu(self.convPa(x)))
        desc = self.convDb(F.relu(self.convDa(x)))
        return semi, desc


class SuperPointConf(LocalConf):
    max_keypoints: int | None = Field(default=None, gt=0)
    """Official default -1 (keep every keypoint) maps to None."""
    resize_max: int | None = 1024
    nms_radius: int = Field(default=4, ge=0)
    """Half-side of the max-pool NMS window (official: 4, a 9x9 window)."""
    keypoint_threshold: float = Field(default=0.005, ge=0.0)
    """Keep heatmap maxima strictly above this probability (official: 0.005)."""
    remove_borders: int = Field(default=4, ge=0)
    """Drop keypoints closer than this to the border of the (8-floored) heatmap (official: 4)."""


class SuperPoint(LocalExtractor):
    """SuperPoint keypoints and 256-D descriptors, as Magic Leap's reference inference code.

    Licence: Magic Leap SuperPoint licence, NON-COMMERCIAL research use only (weights and
    reference code); this re-implementation does not change the terms of the weights.
    """

    name = "superpoint"
    Conf = SuperPointConf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["superpoint"].licence
    paper = "DeTone et al., SuperPoint, CVPR Workshops 2018"
    weights_spec = LOCAL_METHODS["superpoint"].weights
    conf: SuperPointConf

    def _init(self) -> None:
        assert self.weights_path is not None
        state = load_checkpoint(self.weights_path, self.name)
        if not isinstance(state, dict):  # the official file is a bare state_dict
            raise CheckpointError(
                f"{self.name}: checkpoint {self.weights_path} is not a state_dict "
                f"(got {type(state).__name__})"
            )
        self.net = SuperPointNet()
        load_state_dict_strict(self.net, state, self.weights_path, self.name)
        self.net.eval().to(self.device)

    @property
    def descriptor_dim(self) -> int:
        return DESCRIPTOR_DIM

    @torch.inference_mode()
    def dense(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs for an (H, W) uint8 gray or (H, W, 3) uint8 RGB image.

        Returns semi (65, H//8, W//8), the detector logits before softmax (channel 64 is the
        dustbin), and desc (256, H//8, W//8), the descriptor head before L2 normalisation.
        """
        semi, desc = self.net(gray_tensor(to_gray(image), self.device))
        return semi[0], desc[0]

    def _extract(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.features_from_gray(to_gray(image))

    def features_from_gray(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keypoints (N, 2) x, y, scores (N,), descriptors (N, 256) for an (H, W) uint8 image,
        in the official order (see `postprocess`)."""
        return self.postprocess(*self.dense(gray))

    @torch.inference_mode()
    def postprocess(
        self, semi: torch.Tensor, desc: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keypoints (N, 2) x, y, scores (N,), descriptors (N, 256) from the `dense` outputs.

        The order is the official one: row-major when max_keypoints is None, else descending
        score. Keypoints are integer pixel indices, so they are already in retr's convention
        (centre of the top-left pixel at (0, 0)) and need no offset.
        """
        ys, xs, scores = self._detect(logits_to_heatmap(semi))
        if len(scores) == 0:
            return no_features(DESCRIPTOR_DIM)
        kpts = torch.stack([xs, ys], dim=1).float()
        descriptors = sample_descriptors(F.normalize(desc, p=2, dim=0), kpts)
        return kpts.cpu().numpy(), scores.cpu().numpy(), descriptors.cpu().numpy()

    def _detect(self, heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H, W) probabilities -> rows (N,), columns (N,), scores (N,) of the kept maxima."""
        conf = self.conf
        peaks = max_pool_nms(heatmap, conf.nms_radius)
        ys, xs = torch.nonzero(peaks > conf.keypoint_threshold, as_tuple=True)
        keep = inside_border(ys, xs, conf.remove_borders, *heatmap.shape)
        ys, xs = ys[keep], xs[keep]
        scores = peaks[ys, xs]
        if conf.max_keypoints is not None and conf.max_keypoints < len(scores):
            scores, top = torch.topk(scores, conf.max_keypoints)
            ys, xs = ys[top], xs[top]
        return ys, xs, scores


def max_pool_nms(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) scores with every value that is not a kept local maximum set to 0.

    A pixel is a maximum when it equals the max of its (2r+1)^2 window. Two further passes let
    maxima that only lost to an already-suppressed neighbourhood come back, as the official
    `simple_nms` does, so a plateau or a chain of close peaks is not wiped out entirely.
    """
    zeros = torch.zeros_like(scores)
    is_max = scores == window_max(scores, radius)
    for _ in range(2):
        suppressed = window_max(is_max.float(), radius) > 0
        rest = torch.where(suppressed, zeros, scores)
        is_max = is_max | ((rest == window_max(rest, radius)) & ~suppressed)
    return torch.where(is_max, scores, zeros)


def sample_descriptors(desc: torch.Tensor, kpts: torch.Tensor) -> torch.Tensor:
    """Bilinear descriptors (N, D) at pixel keypoints (N, 2) x, y from a (D, h, w) coarse map.

    Magic Leap's mapping, kept exactly because it is what the weights were evaluated with: pixel
    x goes to (x - 3.5) / (8w - 4.5) in [0, 1], then to [-1, 1] for grid_sample with
    align_corners=True (so -1 and +1 are the centres of the first and last cells). This is not
    the plain "cell j is centred on pixel 8j + 3.5" mapping: the two drift apart linearly, by up
    to 3.5 px at the far border. Rows are L2-normalised.
    """
    _, h, w = desc.shape
    offset = CELL / 2 - 0.5
    span = torch.tensor([w * CELL - offset - 1, h * CELL - offset - 1], device=kpts.device)
    grid = ((kpts - offset) / span * 2 - 1).to(desc.dtype)
    out = F.grid_sample(desc[None], grid[None, None], mode="bilinear", align_corners=True)
    return F.normalize(out[0, :, 0].T, p=2, dim=1)
