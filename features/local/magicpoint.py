"""MagicPoint: the detector-only stage of SuperPoint (DeTone, Malisiewicz, Rabinovich;
CVPR Workshops 2018), trained on synthetic shapes before homographic adaptation.

Magic Leap never released MagicPoint, so the reference is the PyTorch re-implementation
eric-yyjau/pytorch-superpoint (commit 5eb75d74): the network `SuperPointNet_gauss2` (a
SuperPoint with BatchNorm after every conv; MagicPoint is that net trained with the descriptor
loss off) and the front end `Val_model_heatmap` used by its `export.py`: threshold `>=`, greedy
NMS, border removal, then a soft-argmax over a 5x5 heatmap patch for sub-pixel keypoints.

Descriptors. MagicPoint detects; retr's reranker also needs descriptors, so `descriptor` picks:
* "rootsift" (default): OpenCV SIFT descriptors computed at the MagicPoint keypoints (upright,
  one fixed support size `sift_size`), turned into RootSIFT (L1-normalise, square root), 128-D.
  Useful with any MagicPoint checkpoint.
* "head": the checkpoint's own 256-D descriptor head, sampled as the reference does. It means
  something only for a checkpoint trained with the descriptor loss (a SuperPoint trained by that
  repository); a real MagicPoint's head was never trained and gives noise.

BatchNorm. The reference front end never calls `.eval()`, so every BN layer normalises with the
statistics of the one input image. `batchnorm="image"` (default) reproduces that, without the
reference's side effect of updating the running buffers; "running" uses the checkpoint's running
statistics (`.eval()`).

Licence: the reference code is MIT-licensed (eric-yyjau/pytorch-superpoint). Checkpoints carry
the terms of whoever trained them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
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

HEAD_DIM = 256
SIFT_DIM = 128
PATCH = 5
"""Side of the heatmap patch of the sub-pixel soft-argmax (reference `subpixel.patch_size`)."""


class DoubleConv(nn.Module):
    """(conv3x3 -> BN -> ReLU) x 2. The nesting (`.conv` Sequential) mirrors the checkpoint keys."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class InConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.mpconv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mpconv(x)


class MagicPointNet(nn.Module):
    """SuperPointNet_gauss2: (B, 1, H, W) gray in [0, 1] -> semi (B, 65, H/8, W/8) detector
    logits and, when asked, desc (B, 256, H/8, W/8) L2-normalised over channels (H/8, W/8
    floored). Attribute names are the checkpoint's keys."""

    def __init__(self) -> None:
        super().__init__()
        self.inc = InConv(1, 64)
        self.down1, self.down2, self.down3 = Down(64, 64), Down(64, 128), Down(128, 128)
        self.convPa, self.bnPa = nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256)
        self.convPb, self.bnPb = nn.Conv2d(256, 65, 1), nn.BatchNorm2d(65)
        self.convDa, self.bnDa = nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256)
        self.convDb, self.bnDb = nn.Conv2d(256, HEAD_DIM, 1), nn.BatchNorm2d(HEAD_DIM)

    def forward(
        self, x: torch.Tensor, describe: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.down3(self.down2(self.down1(self.inc(x))))
        semi = self.bnPb(self.convPb(F.relu(self.bnPa(self.convPa(x)))))
        if not describe:
            return semi, None
        desc = self.bnDb(self.convDb(F.relu(self.bnDa(self.convDa(x)))))
        return semi, F.normalize(desc, p=2, dim=1)


class MagicPointConf(LocalConf):
    max_keypoints: int | None = Field(default=1000, gt=0)
    """Reference `top_k: 1000`, applied by its evaluation to the score-sorted points."""
    resize_max: int | None = 1024
    keypoint_threshold: float = Field(default=0.015, ge=0.0)
    """Candidates have heatmap >= this probability (reference `detection_threshold`; note >=)."""
    nms_radius: int = Field(default=4, ge=0)
    """Greedy NMS: a kept point suppresses weaker ones within this Chebyshev distance."""
    remove_borders: int = Field(default=4, ge=0)
    """Drop keypoints closer than this to the border of the (8-floored) heatmap."""
    subpixel: bool = True
    """Refine with the soft-argmax of the 5x5 heatmap patch (reference `subpixel.enable`)."""
    batchnorm: Literal["image", "running"] = "image"
    """BN statistics: of the input image, as the reference runs it, or the checkpoint's."""
    gray_from_bgr: bool = True
    """Gray as the reference loaders make it: OpenCV's RGB2GRAY applied to BGR data, so 0.299
    weighs blue and 0.114 red. The networks of that repository were trained on such input."""
    descriptor: Literal["rootsift", "head"] = "rootsift"
    """"rootsift": RootSIFT at the keypoints (128-D); "head": the net's descriptor head (256-D)."""
    sift_size: float = Field(default=8.0, gt=0)
    """OpenCV KeyPoint.size (px) of the RootSIFT support; the 4x4-cell window spans ~6x this."""


@dataclass(frozen=True)
class Detections:
    """MagicPoint detections in the reference order (descending score).

    keypoints_int: (N, 2) int64 x, y of the NMS maxima on the heatmap.
    keypoints: (N, 2) float32 x, y after sub-pixel refinement (= keypoints_int without it).
    scores: (N,) float32 heatmap probability at keypoints_int.
    """

    keypoints_int: torch.Tensor
    keypoints: torch.Tensor
    scores: torch.Tensor


class MagicPoint(LocalExtractor):
    """MagicPoint keypoints with RootSIFT (default) or head descriptors.

    Reference: eric-yyjau/pytorch-superpoint (MIT). Licence of a checkpoint: that of its trainer.
    """

    name = "magicpoint"
    Conf = MagicPointConf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["magicpoint"].licence
    paper = "DeTone et al., SuperPoint (MagicPoint stage), CVPR Workshops 2018"
    weights_spec = LOCAL_METHODS["magicpoint"].weights
    conf: MagicPointConf

    def _init(self) -> None:
        assert self.weights_path is not None
        ckpt = load_checkpoint(self.weights_path, self.name)
        if not isinstance(ckpt, dict):
            raise CheckpointError(
                f"{self.name}: checkpoint {self.weights_path} is not a dict "
                f"(got {type(ckpt).__name__})"
            )
        # A training checkpoint wraps the weights next to the optimizer state; only they matter.
        state = ckpt.get("model_state_dict", ckpt)
        self.net = MagicPointNet()
        load_state_dict_strict(self.net, state, self.weights_path, self.name)
        self.net.to(self.device)
        if self.conf.batchnorm == "running":
            self.net.eval()
        else:
            # Train-mode BN normalises with the batch (here: this image) statistics; with
            # track_running_stats off it also leaves the loaded running buffers untouched.
            self.net.train()
            for module in self.net.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.track_running_stats = False

    @property
    def descriptor_dim(self) -> int:
        return HEAD_DIM if self.conf.descriptor == "head" else SIFT_DIM

    def gray(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 network input for an (H, W, 3) RGB image (gray input passes through)."""
        return to_gray(image, swap_red_blue=self.conf.gray_from_bgr)

    @torch.inference_mode()
    def dense(self, image: np.ndarray) -> torch.Tensor:
        """semi (65, H//8, W//8): detector logits before softmax (channel 64 is the dustbin) for
        an (H, W) uint8 gray or (H, W, 3) uint8 RGB image."""
        return self.net(gray_tensor(self.gray(image), self.device))[0][0]

    @torch.inference_mode()
    def postprocess(self, semi: torch.Tensor) -> Detections:
        """The reference detections from `dense` logits (65, h, w): all of them, by descending
        score, before the max_keypoints cut."""
        conf = self.conf
        heatmap = logits_to_heatmap(semi)
        keep = greedy_nms(heatmap, conf.keypoint_threshold, conf.nms_radius)
        ys, xs = torch.nonzero(keep, as_tuple=True)
        scores = heatmap[ys, xs]
        order = torch.sort(scores, descending=True, stable=True).indices
        ys, xs, scores = ys[order], xs[order], scores[order]
        inside = inside_border(ys, xs, conf.remove_borders, *heatmap.shape)
        ys, xs, scores = ys[inside], xs[inside], scores[inside]
        kpts_int = torch.stack([xs, ys], dim=1)
        kpts = kpts_int.float()
        if conf.subpixel and len(scores):
            kpts = kpts + soft_argmax_offsets(heatmap, ys, xs)
        return Detections(kpts_int, kpts, scores)

    @torch.inference_mode()
    def _extract(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gray = self.gray(image)
        head = self.conf.descriptor == "head"
        semi, desc = self.net(gray_tensor(gray, self.device), describe=head)
        det = self.postprocess(semi[0])
        n = len(det.scores) if self.conf.max_keypoints is None else self.conf.max_keypoints
        kpts_int, kpts, scores = det.keypoints_int[:n], det.keypoints[:n], det.scores[:n]
        if len(scores) == 0:
            return no_features(self.descriptor_dim)
        kpts_np = kpts.cpu().numpy()
        if desc is not None:
            descriptors = sample_head_descriptors(desc[0], kpts_int).cpu().numpy()
        else:
            descriptors = rootsift(gray, kpts_np, self.conf.sift_size)
        return kpts_np, scores.cpu().numpy(), descriptors


def greedy_nms(heatmap: torch.Tensor, threshold: float, radius: int) -> torch.Tensor:
    """(H, W) bool mask of the points kept by the reference's greedy NMS (`nms_fast`).

    The reference visits candidates (heatmap >= threshold) by descending score and keeps one
    unless an already-kept point lies within Chebyshev distance `radius`. Rather than a Python
    loop over thousands of candidates this resolves, in a few parallel rounds, every candidate
    that is the strongest still-undecided one in its window: nothing can suppress it, so it is
    kept, and the undecided candidates around it are dropped. This gives exactly the greedy
    result; ties are broken towards the lower row-major index (max_pool's first maximum).
    """
    h, w = heatmap.shape
    k = 2 * radius + 1
    own = torch.arange(h * w, device=heatmap.device).view(h, w)
    undecided = heatmap >= threshold
    kept = torch.zeros_like(undecided)
    while bool(undecided.any()):
        values = torch.where(undecided, heatmap, torch.full_like(heatmap, -1.0))
        _, argmax = F.max_pool2d(values[None, None], k, 1, radius, return_indices=True)
        winners = undecided & (argmax[0, 0] == own)
        kept |= winners
        undecided &= ~(window_max(winners.float(), radius) > 0)
    return kept


def soft_argmax_offsets(heatmap: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """(N, 2) float32 dx, dy sub-pixel offsets from the 5x5 heatmap patches around (xs, ys).

    As the reference: the patch (zero outside the map) is divided by its sum + 1e-6, its log
    goes through a max-shifted softmax whose denominator gets + 1e-6 (torchgeometry's
    SpatialSoftArgmax2d), and the expected position minus the centre is the offset. Up to the
    epsilons this is the heatmap-weighted centroid of the patch.
    """
    r = PATCH // 2
    padded = F.pad(heatmap, (r, r, r, r))
    steps = torch.arange(PATCH, device=heatmap.device)
    rows = (ys[:, None] + steps)[:, :, None]  # padded row of patch row i is ys + i
    cols = (xs[:, None] + steps)[:, None, :]
    patches = padded[rows, cols].reshape(len(ys), -1)  # (N, 25), row-major
    patches = patches / (patches.sum(dim=1, keepdim=True) + 1e-6)
    logits = torch.log(patches)
    weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    weights = weights / (weights.sum(dim=1, keepdim=True) + 1e-6)
    grid_y, grid_x = torch.meshgrid(steps.float(), steps.float(), indexing="ij")
    dx = (weights * grid_x.reshape(1, -1)).sum(dim=1) - r
    dy = (weights * grid_y.reshape(1, -1)).sum(dim=1) - r
    return torch.stack([dx, dy], dim=1)


def sample_head_descriptors(desc: torch.Tensor, kpts_int: torch.Tensor) -> torch.Tensor:
    """(N, 256) head descriptors at integer pixels (N, 2) x, y from the (256, h, w) coarse map.

    The reference (`sample_desc_from_points`) maps pixel x to x / (8w / 2) - 1 and samples with
    align_corners=True, so x = 0 hits the centre of the first cell and x = 8w that of the last:
    a slight stretch compared with cell centres at 8j + 3.5, kept because it is the reference.
    """
    _, h, w = desc.shape
    half = torch.tensor([w * CELL / 2, h * CELL / 2], device=desc.device)
    grid = (kpts_int.to(desc.dtype) / half - 1)[None, None]
    out = F.grid_sample(desc[None], grid, mode="bilinear", align_corners=True)
    return F.normalize(out[0, :, 0].T, p=2, dim=1)


def rootsift(gray: np.ndarray, kpts: np.ndarray, size: float) -> np.ndarray:
    """(N, 128) float32 RootSIFT at keypoints (N, 2) x, y of an (H, W) uint8 image.

    Upright (angle 0) and one support size for all, since MagicPoint gives neither orientation
    nor scale. OpenCV's pixel convention is retr's, so the keypoints go in unchanged.
    """
    points = [cv2.KeyPoint(float(x), float(y), size, 0.0) for x, y in kpts]
    _, desc = cv2.SIFT.create().compute(gray, points)
    if desc is None or len(desc) != len(points):  # compute() must not drop or add points
        raise RuntimeError(
            f"OpenCV SIFT returned {0 if desc is None else len(desc)} descriptors "
            f"for {len(points)} keypoints"
        )
    sift = np.asarray(desc, dtype=np.float32)
    return np.sqrt(sift / np.maximum(sift.sum(axis=1, keepdims=True), 1e-12))
