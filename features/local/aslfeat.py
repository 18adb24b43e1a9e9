"""ASLFeat: Learning Local Features of Accurate Shape and Localization (Luo et al., CVPR 2020).

A PyTorch port of the official TensorFlow extractor (github.com/lzx551402/ASLFeat, commit
ece7b4a, `models/feat_model.py` + `models/cnn_wrapper/aslfeat.py`). A plain conv backbone ends in
three modulated deformable 3x3 convolutions that give a 128-D descriptor map at 1/4 resolution.
Keypoints are peaks of a "peakiness" score computed on three levels (conv1, conv3, conv6), fused at
full resolution, filtered (threshold, 3x3 NMS, border, edge test), refined to sub-pixel precision
and described by bilinear sampling of the descriptor map. The default is the official
`configs/matching_eval.yaml`: a 3-scale image pyramid and 8000 keypoints;
`ASLFeat(pyramid=False, max_keypoints=5000, resize_max=2000)` is `configs/hseq_eval.yaml`.
Official config names: OFFICIAL_NAMES.

The official weights are a TensorFlow checkpoint: convert them once with
`retr convert aslfeat CKPT aslfeat_v2.pt` (features.convert.aslfeat).

Licence: MIT (Copyright (c) 2020 Zixin Luo) for the official code; the pretrained weights are
published by the same repository without separate terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.base import LocalConf, LocalExtractor
from features.core import CheckpointError
from features.image import to_pixel_frame
from features.registry import LOCAL_METHODS
from features.weights import load_checkpoint, load_state_dict_strict

BN_EPS = 1e-5
LEVELS = ("conv1", "conv3", "conv6")
"""Feature maps scored for detection, at strides 1, 2 and 4."""
LEVEL_DILATION = {"conv1": 3, "conv3": 2, "conv6": 1}
LEVEL_WEIGHT = (1.0, 2.0, 3.0)
PYRAMID_STEP = 1 / (2**0.5)
PYRAMID_SIGMA = 0.8


def tf_same_pad(x: torch.Tensor, stride: int, kernel: int = 3) -> torch.Tensor:
    """Zero-pad (B, C, H, W) as TF 'SAME' does: the odd pixel goes to the bottom/right."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class FrozenBatchNorm(nn.Module):
    """Inference batch norm without gamma/beta (the official layers use center=scale=False)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.running_mean, self.running_var
        return F.batch_norm(x, mean, var, training=False, eps=BN_EPS)  # type: ignore[arg-type]


class ConvLayer(nn.Module):
    """3x3 conv (no bias, TF 'SAME' padding) + BN + ReLU; also returns the pre-BN map."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(cin, cout, 3, stride, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.conv(tf_same_pad(x, self.stride))
        return raw, F.relu(self.bn(raw))


class ModulatedDeformConv(nn.Module):
    """3x3 modulated deformable conv, stride 1, no bias, as the official 'u' type.

    `offset` gives 18 channels: 2k is the row and 2k+1 the column shift of tap k = ky*3 + kx;
    `amplitude` gives 9 logits whose sigmoid scales each tap. Kernels are stored OIHW.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin, 3, 3))
        self.offset = nn.Conv2d(cin, 18, 3, padding=1)
        self.amplitude = nn.Conv2d(cin, 9, 3, padding=1)

    def forward(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None) -> Any:
        """(B, C, H, W) -> (B, F, H, W); `record` receives the offset and amplitude maps."""
        offset = self.offset(x)
        amplitude = torch.sigmoid(self.amplitude(x))
        if record is not None:
            record.update(offset=offset, amplitude=amplitude)
        return deform_conv3x3(x, offset, amplitude, self.weight)


def deform_conv3x3(
    x: torch.Tensor, offset: torch.Tensor, amplitude: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Modulated deformable 3x3 conv with the official TF sampling rule.

    x (B, C, H, W), offset (B, 18, H, W), amplitude (B, 9, H, W), weight (F, C, 3, 3)
    -> (B, F, H, W). One tap at a time keeps memory at one (H*W, C) sample per image.
    """
    b, _, h, w = x.shape
    # Pixel-major layout: each bilinear corner is then one contiguous C-vector to fetch.
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous().view(b, (h + 2) * (w + 2), -1)
    rows = torch.arange(h, dtype=x.dtype, device=x.device).view(h, 1)
    cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, w)
    out = x.new_zeros(b, h * w, weight.shape[0])
    for i in range(b):
        for k in range(9):
            ky, kx = divmod(k, 3)
            y = (rows + ky + offset[i, 2 * k]).reshape(-1)
            xx = (cols + kx + offset[i, 2 * k + 1]).reshape(-1)
            sample = gather_bilinear_clipped(padded[i], y, xx, h + 2, w + 2)
            sample = sample * amplitude[i, k].reshape(-1, 1)
            out[i] += sample @ weight[:, :, ky, kx].T
    return out.permute(0, 2, 1).reshape(b, -1, h, w)


def gather_bilinear_clipped(
    flat: torch.Tensor, y: torch.Tensor, x: torch.Tensor, hp: int, wp: int
) -> torch.Tensor:
    """Bilinear samples of a zero-bordered (hp*wp, C) map at N points (y, x) -> (N, C).

    As in the official code the point is clipped to the map, the corners are floor and floor+1
    clipped to the map, and the weights come from the clipped corners (so a point on the far
    border gets weight 0, which equals the zero border anyway).
    """
    y = y.clamp(0, hp - 1)
    x = x.clamp(0, wp - 1)
    y0, x0 = y.floor(), x.floor()
    y1, x1 = (y0 + 1).clamp(max=hp - 1), (x0 + 1).clamp(max=wp - 1)
    out = F.embedding((y0 * wp + x0).long(), flat).mul_(((y1 - y) * (x1 - x))[:, None])
    for yy, xx, wgt in (
        (y0, x1, (y1 - y) * (x - x0)),
        (y1, x0, (y - y0) * (x1 - x)),
        (y1, x1, (y - y0) * (x - x0)),
    ):
        out.addcmul_(F.embedding((yy * wp + xx).long(), flat), wgt[:, None])
    return out


class DeformLayer(nn.Module):
    """Deformable conv, then BN + ReLU unless it is the last (descriptor) layer."""

    def __init__(self, cin: int, cout: int, bn: bool) -> None:
        super().__init__()
        self.conv = ModulatedDeformConv(cin, cout)
        self.bn = FrozenBatchNorm(cout) if bn else None

    def forward(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None) -> Any:
        y = self.conv(x, record)
        return y if self.bn is None else F.relu(self.bn(y))


class InstanceMax(nn.Module):
    """Running maxima that normalise each detection level before the peakiness score."""

    def __init__(self) -> None:
        super().__init__()
        for name in LEVELS:
            self.register_buffer(name, torch.ones(()))


class ASLFeatNet(nn.Module):
    """(B, 1, H, W) normalised grey image -> the raw maps used by detection and description:
    conv1 (B, 32, H, W) and conv3 (B, 64, H/2, W/2) before BN, conv6 (B, 128, H/4, W/4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = ConvLayer(1, 32)
        self.conv1 = ConvLayer(32, 32)
        self.conv2 = ConvLayer(32, 64, stride=2)
        self.conv3 = ConvLayer(64, 64)
        self.conv4 = ConvLayer(64, 128, stride=2)
        self.conv5 = ConvLayer(128, 128)
        self.conv6_0 = DeformLayer(128, 128, bn=True)
        self.conv6_1 = DeformLayer(128, 128, bn=True)
        self.conv6 = DeformLayer(128, 128, bn=False)
        self.instance_max = InstanceMax()

    def forward(
        self, x: torch.Tensor, record: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        """`record`, when given, receives the offset/amplitude maps of each deformable layer."""
        _, x = self.conv0(x)
        conv1, x = self.conv1(x)
        _, x = self.conv2(x)
        conv3, x = self.conv3(x)
        _, x = self.conv4(x)
        _, x = self.conv5(x)
        for name in ("conv6_0", "conv6_1", "conv6"):
            rec = None if record is None else record.setdefault(name, {})
            x = getattr(self, name)(x, rec)
        return {"conv1": conv1, "conv3": conv3, "conv6": x}


def normalise_image(gray: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W) uint8 -> (1, 1, H, W) float32 with zero mean and unit (population) variance."""
    x = torch.from_numpy(np.ascontiguousarray(gray)).to(device).float()[None, None]
    mean = x.mean()
    var = (x - mean).square().mean()
    inv = torch.rsqrt(var + 1e-5)
    return x * inv - mean * inv  # the order of tf.nn.batch_normalization


def peakiness(feat: torch.Tensor, instance_max: torch.Tensor, dilation: int) -> torch.Tensor:
    """(B, C, h, w) raw map -> (B, 1, h, w) score max_c(softplus(x - local mean) *
    softplus(x - channel mean)), x = feat / instance_max, local mean over a dilated 3x3 window
    with reflect padding."""
    x = feat / instance_max
    h, w = x.shape[-2:]
    padded = F.pad(x, [dilation] * 4, mode="reflect")
    # A sum of shifted views: torch's dilated depthwise conv is very slow on CPU.
    total = padded[..., :h, :w].clone()
    for i, j in [(i, j) for i in range(3) for j in range(3)][1:]:
        total += padded[..., i * dilation : i * dilation + h, j * dilation : j * dilation + w]
    local_mean = total / 9.0
    alpha = F.softplus(x - local_mean)
    beta = F.softplus(x - x.mean(dim=1, keepdim=True))
    return (alpha * beta).amax(dim=1, keepdim=True)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `tf.image.resize` (bilinear, align_corners=False, half_pixel_centers=False).

    (B, C, h, w) -> (B, C, H, W). The source of output index i is i * in/out (no half-pixel
    shift), so it differs from torch's bilinear; the upper neighbour is clamped at the border.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # scale 1: every weight is 0, the output is the input
    (y0, y1, ly), (x0, x1, lx) = (
        _tf1_axis(n_in, n_out, x.device) for n_in, n_out in zip(x.shape[-2:], size, strict=True)
    )
    top, bottom = x.index_select(-2, y0), x.index_select(-2, y1)
    top = top.index_select(-1, x0) + (top.index_select(-1, x1) - top.index_select(-1, x0)) * lx
    left, right = bottom.index_select(-1, x0), bottom.index_select(-1, x1)
    bottom = left + (right - left) * lx
    return top + (bottom - top) * ly[:, None]


def _tf1_axis(n_in: int, n_out: int, device: torch.device) -> tuple[Any, Any, torch.Tensor]:
    scale = torch.tensor(float(n_in), device=device) / float(n_out)  # float32, like TF
    src = torch.arange(n_out, dtype=torch.float32, device=device) * scale
    low = src.floor()
    upper = src.ceil().long().clamp(max=n_in - 1)
    return low.long(), upper, src - low


def derivatives(at: Callable[[int, int], torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(d_i, d_j, d_ii, d_ij, d_jj) by central differences, from `at(dy, dx)`, the map shifted
    by (dy, dx) steps. The official code uses the same 3x3 filters."""
    centre = at(0, 0)
    di = -0.5 * at(-1, 0) + 0.5 * at(1, 0)
    dj = -0.5 * at(0, -1) + 0.5 * at(0, 1)
    dii = at(-1, 0) - 2.0 * centre + at(1, 0)
    djj = at(0, -1) - 2.0 * centre + at(0, 1)
    dij = 0.25 * at(-1, -1) - 0.25 * at(-1, 1) - 0.25 * at(1, -1) + 0.25 * at(1, 1)
    return di, dj, dii, dij, djj


def not_edge(score: torch.Tensor, threshold: float, dilation: int = 3) -> torch.Tensor:
    """(H, W) bool: the official edge test tr^2/det <= (t+1)^2/t and det > 0, on dilated
    second derivatives of the zero-padded map."""
    h, w = score.shape
    d = dilation
    padded = F.pad(score, (d, d, d, d))

    def at(dy: int, dx: int) -> torch.Tensor:
        return padded[d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w]

    _, _, dii, dij, djj = derivatives(at)
    det = dii * djj - dij * dij
    tr = dii + djj
    return (tr * tr / det <= (threshold + 1) ** 2 / threshold) & (det > 0)


def nms_mask(score: torch.Tensor, window: int) -> torch.Tensor:
    """Positions equal to the max of the window around them (TF 'SAME' pooling; ties kept)."""
    lo, hi = (window - 1) // 2, window - 1 - (window - 1) // 2
    padded = F.pad(score, (lo, hi, lo, hi), value=-math.inf)
    return score == F.max_pool2d(padded, window, stride=1)


def subpixel_offsets(score: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """One Newton step -H^-1 g on an (H, W) map at integer points -> (N, 2) (drow, dcol),
    each clipped to [-0.5, 0.5]; a singular Hessian gives 0 (divide_no_nan)."""
    padded = F.pad(score, (1, 1, 1, 1))

    def at(dy: int, dx: int) -> torch.Tensor:
        return padded[rows + 1 + dy, cols + 1 + dx]

    di, dj, dii, dij, djj = derivatives(at)
    det = dii * djj - dij * dij
    safe = torch.where(det == 0, torch.ones_like(det), det)
    inv00, inv01, inv11 = (torch.where(det == 0, 0.0, v / safe) for v in (djj, -dij, dii))
    step_i = -(inv00 * di + inv01 * dj)
    step_j = -(inv01 * di + inv11 * dj)
    return torch.stack([step_i, step_j], dim=1).clamp(-0.5, 0.5)


def sample_descriptors(desc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a (C, h, w) map at (N, 2) (row, col) -> (N, C), L2-normalised.

    Corners are floor and ceil clipped to the map; weights come from the clipped floor, as in
    the official `interpolate`."""
    h, w = desc.shape[-2:]
    i, j = pos[:, 0], pos[:, 1]
    i0, j0 = i.floor().clamp(0, h - 1), j.floor().clamp(0, w - 1)
    i1, j1 = i.ceil().clamp(0, h - 1), j.ceil().clamp(0, w - 1)
    di, dj = (i - i0)[:, None], (j - j0)[:, None]
    i0, j0, i1, j1 = (v.long() for v in (i0, j0, i1, j1))
    out = (
        (1 - di) * (1 - dj) * desc[:, i0, j0].T
        + (1 - di) * dj * desc[:, i0, j1].T
        + di * (1 - dj) * desc[:, i1, j0].T
        + di * dj * desc[:, i1, j1].T
    )
    return out / out.square().sum(dim=1, keepdim=True).clamp(min=1e-12).sqrt()


@dataclass(frozen=True)
class ScaleFeatures:
    """Detections of one pyramid level, in that level's pixels (integer = pixel centre).

    pixels: (N, 2) int64 (row, col) NMS peaks; keypoints: (N, 2) float32 refined (x, y);
    scores: (N,); descriptors: (N, 128) L2-normalised; size: (width, height) of the level.
    Rows are in descending score order.
    """

    pixels: torch.Tensor
    keypoints: torch.Tensor
    scores: torch.Tensor
    descriptors: torch.Tensor
    size: tuple[int, int]


OFFICIAL_NAMES = {
    "kpt_n": "max_keypoints",
    "max_dim": "resize_max",
    "multi_scale": "pyramid",
    "score_thld": "score_threshold",
    "edge_thld": "edge_threshold",
    "nms_size": "nms_radius",
    "eof_mask": "remove_borders",
    "kpt_refinement": "subpixel",
}
"""Official config key -> retr knob. nms_size is the side of the max-pool window: an odd
nms_size is nms_radius (nms_size - 1) / 2, so the official 3 is radius 1."""


class ASLFeatConf(LocalConf):
    """Defaults are the official configs/matching_eval.yaml (README quick start)."""

    max_keypoints: int | None = 8000
    """Kept per pyramid level and after merging the levels."""
    resize_max: int | None = 2048
    """Images whose longer side exceeds this are downscaled first, by the official rule: the grey
    image, cv2 bilinear with fx = fy (applied in `detect_pyramid`, not by the base class)."""
    pyramid: bool = True
    """The official 3-level pyramid (steps of 1/sqrt(2), Gaussian pre-blur); False: one scale."""
    score_threshold: float = 0.5
    edge_threshold: float = 10.0
    """Edge response ratio r of the tr^2/det test; <= 0 disables the test."""
    nms_radius: int = Field(default=1, ge=0)
    """A peak is the maximum of the (2r + 1) x (2r + 1) window centred on it; 0 disables NMS."""
    remove_borders: int = 5
    """Peaks closer than this many pixels to the border are dropped."""
    subpixel: bool = True
    """Refine peaks by one Newton step on the fused score map."""


class ASLFeat(LocalExtractor):
    """ASLFeat keypoints and 128-D descriptors (official multi-scale configuration).

    Licence: MIT (official code; the weights come from the same repository without separate
    terms). Input: converted to grey with OpenCV's BGR2GRAY weights, as the official loader does.
    """

    name = "aslfeat"
    Conf = ASLFeatConf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["aslfeat"].licence
    paper = "Luo et al., ASLFeat, CVPR 2020"
    weights_spec = LOCAL_METHODS["aslfeat"].weights
    conf: ASLFeatConf

    def _init(self) -> None:
        assert self.weights_path is not None
        state = load_checkpoint(self.weights_path, self.name)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{self.name}: {self.weights_path} is not a state dict; "
                "convert the official checkpoint with `retr convert aslfeat`"
            )
        self.net = ASLFeatNet()
        load_state_dict_strict(self.net, state, self.weights_path, self.name)
        self.net.eval().to(self.device)
        weights = torch.tensor(LEVEL_WEIGHT)
        self.level_weights = (weights / weights.sum()).tolist()

    @property
    def descriptor_dim(self) -> int:
        return 128

    @torch.inference_mode()
    def dense(
        self, gray: np.ndarray, record: dict[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Raw maps for one (H, W) uint8 grey image, batch dim removed.

        Returns score_level_conv{1,3,6} (h_L, w_L) before upsampling, score_map (H, W) fused,
        desc_map (128, H/4, W/4) before normalisation. `record` receives the deformable layers'
        offset (18, ...) and amplitude (9, ...) maps.
        """
        feats = self.net(normalise_image(gray, self.device), record)
        size = (gray.shape[0], gray.shape[1])
        out: dict[str, torch.Tensor] = {}
        fused = None
        for name, weight in zip(LEVELS, self.level_weights, strict=True):
            imax = getattr(self.net.instance_max, name)
            level = peakiness(feats[name], imax, LEVEL_DILATION[name])
            out[f"score_level_{name}"] = level[0, 0]
            term = weight * resize_bilinear_tf1(level, size)
            fused = term if fused is None else fused + term
        assert fused is not None
        out["score_map"] = fused[0, 0]
        out["desc_map"] = feats["conv6"][0]
        if record is not None:
            for rec in record.values():
                rec.update({k: v[0] for k, v in rec.items()})
        return out

    @torch.inference_mode()
    def detect(self, gray: np.ndarray) -> ScaleFeatures:
        """Single-scale detection and description on one (H, W) uint8 grey image."""
        maps = self.dense(gray)
        score = maps["score_map"]
        rows, cols = self._peaks(score)
        scores = score[rows, cols]
        order = torch.sort(scores, descending=True, stable=True).indices
        rows, cols, scores = rows[order], cols[order], scores[order]
        if self.conf.max_keypoints is not None:
            k = self.conf.max_keypoints
            rows, cols, scores = rows[:k], cols[:k], scores[:k]
        pos = torch.stack([rows, cols], dim=1).float()
        if self.conf.subpixel:
            pos = pos + subpixel_offsets(score, rows, cols)
        desc = sample_descriptors(maps["desc_map"], pos / 4)
        pixels = torch.stack([rows, cols], dim=1)
        size = (gray.shape[1], gray.shape[0])
        return ScaleFeatures(pixels, pos.flip(1), scores, desc, size)

    def _peaks(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and columns (raster order, as tf.where) of the candidate keypoints."""
        conf = self.conf
        s = score[None, None]
        mask = s > conf.score_threshold
        if conf.nms_radius > 0:
            mask &= nms_mask(s, 2 * conf.nms_radius + 1)
        if conf.remove_borders > 0:
            b = conf.remove_borders
            inner = torch.zeros_like(mask)
            inner[..., b:-b, b:-b] = True
            mask &= inner
        if conf.edge_threshold > 0:
            mask &= not_edge(score, conf.edge_threshold)
        rows, cols = torch.nonzero(mask[0, 0], as_tuple=True)
        return rows, cols

    def detect_pyramid(self, gray: np.ndarray) -> list[ScaleFeatures]:
        """Detections at every official scale of an (H, W) uint8 grey image, after the official
        `resize_max` (max_dim) downscaling; each level in its own pixels."""
        h, w = gray.shape
        image = gray
        longest = max(h, w)
        if self.conf.resize_max is not None and longest > self.conf.resize_max:
            ratio = self.conf.resize_max / float(longest)
            image = cv2.resize(gray, (0, 0), fx=ratio, fy=ratio)
        levels = []
        for i in range(n_scales(h, w) if self.conf.pyramid else 1):
            if i > 0:  # each level blurs and shrinks the previous one, as the official loop
                image = cv2.GaussianBlur(image, (0, 0), PYRAMID_SIGMA / PYRAMID_STEP)
                image = cv2.resize(image, None, fx=PYRAMID_STEP, fy=PYRAMID_STEP)
            levels.append(self.detect(image))
        return levels

    def _downscale(self, image: np.ndarray) -> np.ndarray:
        """Unchanged: the official rule resizes the grey image, in `detect_pyramid`."""
        return image

    def _extract(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        kpts, scores, descs = [], [], []
        for level in self.detect_pyramid(gray):
            # The official code maps level keypoints with x * W / w_level, treating the integer
            # pixel centres as corners; retr's convention is (x + 0.5) * W / w_level - 0.5.
            lw, lh = level.size
            kpts.append(to_pixel_frame(level.keypoints.cpu().numpy(), lw / w, lh / h))
            scores.append(level.scores.cpu().numpy())
            descs.append(level.descriptors.cpu().numpy())
        score = np.concatenate(scores)
        order = np.argsort(-score, kind="stable")[: self.conf.max_keypoints]
        return np.concatenate(kpts)[order], score[order], np.concatenate(descs)[order]


def n_scales(h: int, w: int) -> int:
    """Number of official pyramid levels: down to 0.3x, or 128 px on the longer side."""
    min_scale = max(0.3, 128 / max(h, w))
    return math.floor(max(math.log(min_scale) / math.log(PYRAMID_STEP), 1))
