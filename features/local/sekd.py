"""SEKD: Self-Evolving Keypoint Detection and Description (Song et al., arXiv 2020).

A small pre-activation ResNet on the grayscale image predicts a full-resolution keypoint
confidence map (through two transposed-conv skip stages) and a 1/4-resolution 128-D descriptor
map. Keypoints are the maxima of the confidence map in a 9x9 window above 0.55, best 500 kept;
descriptors are bilinearly sampled from the coarse map. This reproduces `nets.SEKD.detectAndCompute`
of aliyun/Self-Evolving-Keypoint-Demo with the settings of its live demo (`live_demo_tracking.py`),
including the demo's downscaling of frames larger than 640 x 480.

Licence: MIT (official code and `sekd.pth`, Copyright (c) 2020 Alibaba Cloud).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.base import LocalConf, LocalExtractor
from features.image import to_pixel_frame
from features.registry import LOCAL_METHODS
from features.weights import load_checkpoint, load_state_dict_strict

STRIDE = 4
"""Descriptor-map stride; the input is cropped to multiples of it."""


class ResBlock(nn.Module):
    """Pre-activation block: BN -> ReLU -> conv, plus an identity or 1x1 (no bias) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.convb = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, stride, padding=1)
        )
        self.conv_residual = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.conv_residual is None else self.conv_residual(x)
        return self.convb(x) + shortcut


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(cin, cout, stride), ResBlock(cout, cout), ResBlock(cout, cout))


def _upsample(cin: int, cout: int) -> nn.Sequential:
    """BN -> ReLU -> grouped 3x3 transposed conv that exactly doubles H and W."""
    return nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, groups=8),
    )


class SEKDMaps(NamedTuple):
    """Dense outputs: confidence (B, H, W) in [0, 1]; raw descriptors (B, 128, H/4, W/4)."""

    confidence: torch.Tensor
    descriptors: torch.Tensor


class SEKDNet(nn.Module):
    """(B, 1, H, W) gray in [0, 1], H and W multiples of 4 -> SEKDMaps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 32, 5, padding=2)
        self.resblock0 = _stage(32, 32, 1)
        self.resblock1 = _stage(32, 64, 2)
        self.resblock2 = _stage(64, 128, 2)
        self.deconv0 = _upsample(128, 64)
        self.deconv1 = _upsample(64, 32)
        self.detector = nn.Conv2d(32, 2, 3, padding=1)
        self.descriptor = ResBlock(128, 128)

    def forward(self, x: torch.Tensor) -> SEKDMaps:
        f0 = self.resblock0(self.conv0(x))
        f1 = self.resblock1(f0)
        f2 = self.resblock2(f1)
        f1 = f1 + self.deconv0(f2)
        f0 = f0 + self.deconv1(f1)
        confidence = F.softmax(self.detector(f0), dim=1)[:, 1]
        return SEKDMaps(confidence, self.descriptor(f2))


OFFICIAL_NAMES = {
    "max_height": "resize_max_height",
    "max_width": "resize_max_width",
    "conf_thresh": "confidence_threshold",
}
"""live_demo_tracking.py option -> retr knob (same name: max_keypoints, nms_radius). The demo
bounds height and width separately, unlike `resize_max` (the longer side): hence the names."""


class SEKDConf(LocalConf):
    max_keypoints: int | None = 500
    resize_max: int | None = None
    """None: only the demo's box rule (resize_max_height, resize_max_width) downscales."""
    resize_max_height: int | None = 480
    """Frames taller than resize_max_height or wider than resize_max_width are downscaled to fit
    that box, as the demo does (demo default: 640 x 480); None lifts that bound."""
    resize_max_width: int | None = 640
    nms_radius: int = 4
    """A keypoint is the maximum of the (2r+1) x (2r+1) window centred on it."""
    confidence_threshold: float = 0.55
    """Strict lower bound on the detector confidence (demo: 0.55; the HPatches export uses 0.4)."""


class SEKD(LocalExtractor):
    """SEKD keypoints and 128-D descriptors, single scale, integer keypoint positions.

    Licence: MIT (code and weights).
    """

    name = "sekd"
    Conf = SEKDConf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["sekd"].licence
    paper = "Song et al., SEKD: Self-Evolving Keypoint Detection and Description, arXiv 2020"
    weights_spec = LOCAL_METHODS["sekd"].weights
    conf: SEKDConf

    def _init(self) -> None:
        assert self.weights_path is not None
        ckpt = load_checkpoint(self.weights_path, self.name)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        self.net = SEKDNet()
        load_state_dict_strict(self.net, state, self.weights_path, self.name)
        self.net.eval().to(self.device)

    @property
    def descriptor_dim(self) -> int:
        return 128

    def gray(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) RGB, uint8 or float32 in [0, 1] -> (1, 1, H', W') float32 gray in [0, 1],
        cropped (top-left kept) to multiples of 4."""
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        # Gray from the float BGR image, as the official code does: OpenCV's RGB2GRAY on the RGB
        # image sums the channels in another order and differs by 1 ulp.
        gray = cv2.cvtColor(np.ascontiguousarray(image[..., ::-1]), cv2.COLOR_BGR2GRAY)
        h, w = gray.shape
        gray = gray[: h - h % STRIDE, : w - w % STRIDE]
        return torch.from_numpy(np.ascontiguousarray(gray))[None, None].to(self.device)

    @torch.inference_mode()
    def dense(self, image: np.ndarray) -> SEKDMaps:
        """Network outputs for an (H, W, 3) image (no demo resize), batch dimension removed."""
        maps = self.net(self.gray(image))
        return SEKDMaps(maps.confidence[0], maps.descriptors[0])

    def _extract(self, image: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        h, w = image.shape[:2]
        small = self._demo_resize(image.astype(np.float32) / 255.0)
        kpts, scores, desc = self._detect(self.dense(small))
        xy = kpts.cpu().numpy()
        if small.shape[:2] != (h, w):
            xy = to_pixel_frame(xy, small.shape[1] / w, small.shape[0] / h)
        return xy, scores, desc

    def _demo_resize(self, image: np.ndarray) -> np.ndarray:
        """The live demo's rule on the float (H, W, 3) frame: shrink bilinearly by
        min(max_h / H, max_w / W) when the frame exceeds either bound. On the float frame, as the
        demo, so it stays here rather than in `_downscale` (which sees uint8)."""
        h, w = image.shape[:2]
        max_h, max_w = self.conf.resize_max_height or h, self.conf.resize_max_width or w
        if h <= max_h and w <= max_w:
            return image
        r = min(max_h / h, max_w / w)
        return cv2.resize(image, (int(r * w), int(r * h)), interpolation=cv2.INTER_LINEAR)

    def _detect(self, maps: SEKDMaps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keypoints (N, 2) integer x, y, scores (N,) and unit descriptors (N, 128), best first."""
        conf, r = maps.confidence, self.conf.nms_radius
        pooled = F.max_pool2d(conf[None], 2 * r + 1, stride=1, padding=r)[0]
        ys, xs = torch.nonzero(
            (conf > self.conf.confidence_threshold) & (conf == pooled), as_tuple=True
        )
        scores, order = conf[ys, xs].sort(descending=True)
        order = order[: self.conf.max_keypoints]
        kpts = torch.stack([xs[order], ys[order]], dim=1).float()
        return kpts, scores[: self.conf.max_keypoints], sample_descriptors(maps.descriptors, kpts)


def sample_descriptors(desc: torch.Tensor, kpts: torch.Tensor) -> torch.Tensor:
    """Unit descriptors (N, 128) bilinearly sampled from the raw (128, h, w) map at (N, 2) x, y
    input pixels; the input is STRIDE times the map's size.

    Map position (x / 4 - 0.5, y / 4 - 0.5), zeros outside: the official grid_sample call with
    PyTorch's default align_corners=False.
    """
    h, w = desc.shape[-2:]
    size = kpts.new_tensor([w * STRIDE, h * STRIDE])
    grid = (2 * kpts / size - 1)[None, None]
    out = F.grid_sample(desc[None], grid, mode="bilinear", align_corners=False)
    return F.normalize(out[0, :, 0].T, dim=1)
