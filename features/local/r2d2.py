"""R2D2: Repeatable and Reliable Detector and Descriptor (Revaud et al., NeurIPS 2019).

A fully convolutional L2-Net variant (strides replaced by dilations, so every map has the input's
size) predicts a 128-D descriptor map, a reliability map and a repeatability map. Keypoints are
the 3x3 local maxima of repeatability where both maps reach 0.7, collected over an image pyramid
and ranked by reliability x repeatability, as the official `extract.py` (naver/r2d2) does with its
default settings.

Licence of the official code and of the `r2d2_WASF_N16.pt` weights: CC BY-NC-SA 3.0
(non-commercial use only).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.base import LocalConf, LocalExtractor, image_to_tensor
from features.core import CheckpointError
from features.registry import LOCAL_METHODS
from features.weights import load_checkpoint, load_state_dict_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (out channels, kernel, dilation, then BN, then ReLU) for Quad_L2Net with mchan=4 and dim=128.
# Dilation doubles after each layer that is strided in the original L2-Net; padding keeps H x W.
LAYERS = (
    (32, 3, 1, True, True),
    (32, 3, 1, True, True),
    (64, 3, 1, True, True),
    (64, 3, 2, True, True),
    (128, 3, 2, True, True),
    (128, 3, 4, True, True),
    (128, 2, 4, True, False),
    (128, 2, 8, True, False),
    (128, 2, 16, False, False),
)
ARCHITECTURE = re.compile(r"\s*Quad_L2Net_ConfCFS\s*\(\s*\)\s*")


class R2D2Maps(NamedTuple):
    """Dense outputs for one image: descriptors (128, H, W) unit-norm per pixel,
    reliability (H, W) and repeatability (H, W), both in [0, 1]."""

    descriptors: torch.Tensor
    reliability: torch.Tensor
    repeatability: torch.Tensor


class QuadL2NetConfCFS(nn.Module):
    """(B, 3, H, W) ImageNet-normalised RGB -> R2D2Maps with a batch dimension.

    Module indices in `ops` follow the official checkpoint (conv, BN, ReLU, conv, ...).
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout, k, dilation, bn, relu in LAYERS:
            pad = (k - 1) * dilation // 2
            layers.append(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation))
            if bn:
                layers.append(nn.BatchNorm2d(cout, affine=False))
            if relu:
                layers.append(nn.ReLU(inplace=True))
            cin = cout
        self.ops = nn.Sequential(*layers)
        self.clf = nn.Conv2d(128, 2, 1)
        self.sal = nn.Conv2d(128, 1, 1)

    def forward(self, x: torch.Tensor) -> R2D2Maps:
        x = self.ops(x)
        reliability = F.softmax(self.clf(x**2), dim=1)[:, 1]
        # s / (1 + s) of a softplus stays in [0, 1] with fewer plateaus than a sigmoid.
        sal = F.softplus(self.sal(x**2))[:, 0]
        return R2D2Maps(F.normalize(x, p=2, dim=1), reliability, sal / (1 + sal))


OFFICIAL_NAMES = {
    "--top-k": "max_keypoints",
    "--reliability-thr": "reliability_threshold",
    "--repeatability-thr": "repeatability_threshold",
    "--scale-f": "pyramid_scale_factor",
    "--min-scale": "pyramid_min_scale",
    "--max-scale": "pyramid_max_scale",
    "--min-size": "pyramid_min_side",
    "--max-size": "pyramid_max_side",
}
"""extract.py option -> retr knob. The pyramid's schedule is bounded by scales and by the
longer side of a level, not by resizing the image: the `pyramid_` knobs."""


class R2D2Conf(LocalConf):
    max_keypoints: int | None = 5000
    """Official --top-k."""
    resize_max: int | None = None
    """None: the pyramid's own bounds decide the first level (official behaviour); a value
    downscales the image before the pyramid, as for every plug-in."""
    reliability_threshold: float = 0.7
    repeatability_threshold: float = 0.7
    pyramid_scale_factor: float = Field(2**0.25, gt=1.0)
    """Ratio between consecutive pyramid levels."""
    pyramid_min_scale: float = 0.0
    """Smallest pyramid scale; set 1.0 for single-scale extraction."""
    pyramid_max_scale: float = 1.0
    """Largest pyramid scale."""
    pyramid_min_side: int = 256
    """Levels whose longer side would fall below this are not computed (images smaller than this
    yield no keypoints, as in the official code)."""
    pyramid_max_side: int = 1024
    """Levels whose longer side exceeds this are skipped (computed through, not run)."""


class R2D2(LocalExtractor):
    """R2D2 keypoints and 128-D descriptors from the official multi-scale pipeline.

    Licence: CC BY-NC-SA 3.0 (non-commercial) for the official code and weights.
    Output keypoints use retr's pixel-centre convention, see `_level_to_image`.
    """

    name = "r2d2"
    Conf = R2D2Conf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["r2d2"].licence
    paper = "Revaud et al., R2D2: Repeatable and Reliable Detector and Descriptor, NeurIPS 2019"
    weights_spec = LOCAL_METHODS["r2d2"].weights
    conf: R2D2Conf

    def _init(self) -> None:
        assert self.weights_path is not None
        ckpt = load_checkpoint(self.weights_path, self.name)
        state = _checked_state_dict(ckpt, self.weights_path, self.name)
        self.net = QuadL2NetConfCFS()
        load_state_dict_strict(self.net, state, self.weights_path, self.name)
        self.net.eval().to(self.device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def descriptor_dim(self) -> int:
        return 128

    def normalise(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 ImageNet-normalised network input."""
        return (image_to_tensor(image, self.device) - self.mean) / self.std

    @torch.inference_mode()
    def dense(self, image: np.ndarray) -> R2D2Maps:
        """Network outputs at scale 1 for an (H, W, 3) uint8 image, without batch dimension."""
        maps = self.net(self.normalise(image))
        return R2D2Maps(*(m[0] for m in maps))

    def _extract(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.normalise(image)
        h, w = x.shape[-2:]
        found = [self._detect(x_level, h, w) for x_level in pyramid(x, self.conf)]
        if not found:
            return torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, 128)
        kpts, scores, desc = zip(*found, strict=True)
        return torch.cat(kpts), torch.cat(scores), torch.cat(desc)

    def _detect(
        self, x: torch.Tensor, h: int, w: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One level: keypoints (N, 2) in (h, w) image pixels, scores (N,), descriptors (N, 128)."""
        desc, rel, rep = (m[0] for m in self.net(x))
        peaks = rep == F.max_pool2d(rep[None], 3, stride=1, padding=1)[0]
        keep = peaks & (rep >= self.conf.repeatability_threshold)
        keep &= rel >= self.conf.reliability_threshold
        ys, xs = torch.nonzero(keep, as_tuple=True)
        kpts = _level_to_image(xs, ys, rep.shape, (h, w))
        return kpts, rel[ys, xs] * rep[ys, xs], desc[:, ys, xs].T


def pyramid(x: torch.Tensor, conf: R2D2Conf) -> list[torch.Tensor]:
    """The levels (1, C, h_s, w_s) the official loop runs the network on, largest first.

    Each level is resized from the previous one (a cascade, no antialiasing) to the rounded size of
    the original (1, C, H, W) times the running scale s, as extract_multiscale does; levels above
    pyramid_max_side are resized through but not returned.
    """
    h, w = x.shape[-2:]
    lowest = max(conf.pyramid_min_scale, conf.pyramid_min_side / max(h, w))
    highest = min(conf.pyramid_max_scale, conf.pyramid_max_side / max(h, w))
    levels, s = [], 1.0
    while s + 0.001 >= lowest:  # the official loop's tolerances, kept for identical levels
        if s - 0.001 <= highest:
            levels.append(x)
        s /= conf.pyramid_scale_factor
        if s + 0.001 >= lowest:
            x = F.interpolate(x, (round(h * s), round(w * s)), mode="bilinear", align_corners=False)
    return levels


def _level_to_image(
    xs: torch.Tensor, ys: torch.Tensor, level_hw: tuple[int, ...], image_hw: tuple[int, int]
) -> torch.Tensor:
    """(N, 2) x, y in image pixels of level pixels (xs, ys), pixel centres at integers.

    The official code maps x -> x * W / w, which puts the centre of level pixel 0 on image pixel 0;
    the levels are resampled with align_corners=False, for which the centre of level pixel x lies
    at (x + 0.5) * W / w - 0.5. retr uses the latter; both agree at scale 1 and differ by at most
    (W / w - 1) / 2 px (0.69 px at the coarsest default level).
    """
    sx, sy = image_hw[1] / level_hw[1], image_hw[0] / level_hw[0]
    return torch.stack([(xs + 0.5) * sx - 0.5, (ys + 0.5) * sy - 0.5], dim=1).float()


def _checked_state_dict(ckpt: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    """The checkpoint's state_dict without DataParallel's `module.` prefix.

    The official file names its architecture as a Python expression under `net`; it is matched
    against the one architecture built here, never evaluated.
    """
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{what}: checkpoint {path} has no 'state_dict' entry")
    arch = ckpt.get("net", "Quad_L2Net_ConfCFS()")
    if not isinstance(arch, str) or not ARCHITECTURE.fullmatch(arch):
        raise CheckpointError(
            f"{what}: checkpoint {path} is for architecture {arch!r}; "
            "only Quad_L2Net_ConfCFS() (r2d2_WASF_N16.pt) is supported"
        )
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
