"""D2-Net: a trainable CNN for joint detection and description of local features
(Dusmanu, Rocco, Pajdla, Pollefeys, Sivic, Torii, Sattler; CVPR 2019).

VGG16 up to conv4_3, with pool3 replaced by a 2x2 stride-1 average pool and conv4_* dilated by 2,
gives a 512-channel dense map at stride 4. A keypoint is a cell that is the maximum over channels,
the 3x3 maximum of its channel and not on an edge (Hessian test); one Newton step refines it to
sub-cell precision; its descriptor is the bilinearly interpolated feature vector and its score the
activation. This is the official test-time pipeline (mihaidusmanu/d2-net@0a3356c:
extract_features.py with lib/model_test.py, lib/pyramid.py, lib/utils.py) with its defaults:
caffe preprocessing, the official size policy (`resize_max`, then `resize_max_sum`), single scale
unless `pyramid` lists more scales. Official option names: OFFICIAL_NAMES.
(The soft detection score of lib/model.py, SoftDetectionModule, serves only training; the official
extractor detects with HardDetectionModule, reproduced here.)

Licence of the official code and the `d2_tf.pth` / `d2_ots.pth` weights: BSD-3-Clause-Clear.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch import nn

from features.base import LocalConf, LocalExtractor
from features.registry import D2NET_WEIGHTS, LOCAL_METHODS
from features.weights import WeightSpec, load_checkpoint, load_state_dict_strict

# VGG16 conv1_1 .. conv4_3 as in lib/model_test.py: numbers are conv widths, "M" a 2x2 max-pool,
# "A" the 2x2 stride-1 average pool that replaces pool3. The convs after it are dilated by 2 so
# they see the same context as in the stride-8 network the weights come from.
VGG_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "A", 512, 512, 512)
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68]).reshape(3, 1, 1)
TORCH_MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
TORCH_STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
MULTISCALE = (0.5, 1.0, 2.0)
"""process_multiscale's default scales, coarse to fine: the `pyramid` of --multiscale."""
OFFICIAL_NAMES = {
    "max_edge": "resize_max",
    "max_sum_edges": "resize_max_sum",
    "multiscale": "pyramid",
    "model_file": "model",
}
"""extract_features.py option -> retr knob (same name: preprocessing, use_relu). --multiscale
is pyramid=MULTISCALE, its absence pyramid=(1.0,); model_file d2_tf.pth / d2_ots.pth is
model="d2_tf" / "d2_ots"."""
EDGE_THRESHOLD = 5.0
"""HardDetectionModule's edge_threshold r: keep tr(H)^2 / det(H) <= (r + 1)^2 / r."""
CHECKPOINT_PREFIX = "dense_feature_extraction.model."
MIN_LEVEL_SIDE = 8
"""Smallest level side VGG runs on: two 2x2 pools and the 2x2 average pool leave one cell."""

# 3x3 finite-difference stencils of lib/model_test.py (rows = i, columns = j; zero padding).
DI = ((0.0, -0.5, 0.0), (0.0, 0.0, 0.0), (0.0, 0.5, 0.0))
DJ = ((0.0, 0.0, 0.0), (-0.5, 0.0, 0.5), (0.0, 0.0, 0.0))
DII = ((0.0, 1.0, 0.0), (0.0, -2.0, 0.0), (0.0, 1.0, 0.0))
DJJ = ((0.0, 0.0, 0.0), (1.0, -2.0, 1.0), (0.0, 0.0, 0.0))
DIJ = ((0.25, 0.0, -0.25), (0.0, 0.0, 0.0), (-0.25, 0.0, 0.25))

WEIGHTS = D2NET_WEIGHTS


def vgg16_conv4_3() -> nn.Sequential:
    """(B, 3, H, W) -> (B, 512, H // 4 - 1, W // 4 - 1), conv4_3 before its ReLU.

    Module indices match the official keys `dense_feature_extraction.model.<index>`.
    """
    layers: list[nn.Module] = []
    cin, dilation = 3, 1
    for item in VGG_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
        elif item == "A":
            layers.append(nn.AvgPool2d(2, stride=1))
            dilation = 2
        else:
            assert isinstance(item, int)
            layers += [nn.Conv2d(cin, item, 3, padding=dilation, dilation=dilation), nn.ReLU(True)]
            cin = item
    return nn.Sequential(*layers[:-1])


class _WeightsForModel:
    """`weights_spec` that follows `conf.model`; read on the class, it is the default's (d2_tf)."""

    def __get__(self, obj: D2Net | None, owner: type | None = None) -> WeightSpec:
        return WEIGHTS[obj.conf.model if obj is not None else "d2_tf"]


class D2NetConf(LocalConf):
    max_keypoints: int | None = 4096
    """The official extractor keeps every detection (10k+ on large images); retr caps the count
    because reranking cost grows with it. None keeps all, as the official code does."""
    resize_max: int | None = 1600
    """Official max_edge: downscale (never upscale) so the longer side is at most this, with the
    official arithmetic (`official_resize`); None: no bound."""
    resize_max_sum: int | None = 2800
    """Official max_sum_edges: then downscale so that height + width is at most this; None: no
    bound."""
    model: Literal["d2_tf", "d2_ots"] = "d2_tf"
    """d2_tf: VGG16 tuned on MegaDepth (official default); d2_ots: off-the-shelf Caffe VGG16."""
    pyramid: tuple[Annotated[float, Field(gt=0)], ...] = Field((1.0,), min_length=1)
    """Image scales, coarse to fine, as process_multiscale: (1.0,) is the official single scale,
    MULTISCALE (0.5, 1, 2) the official --multiscale."""
    preprocessing: Literal["caffe", "torch"] = "caffe"
    """Network input normalisation: caffe (BGR, mean-subtracted 0-255) or torch (ImageNet)."""
    use_relu: bool = True
    """ReLU on the dense features (extract_features.py --no-relu turns it off)."""


class D2Net(LocalExtractor):
    """D2-Net keypoints and 512-D descriptors. Licence: BSD-3-Clause-Clear (code and weights).

    Keypoints are in retr's convention (centre of the top-left pixel at (0, 0)); see
    `fmap_to_pixels` for how this differs from the official output.
    """

    name = "d2net"
    Conf = D2NetConf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["d2net"].licence
    paper = "Dusmanu et al., D2-Net: A Trainable CNN for Joint Detection and Description, CVPR 2019"
    # The checkpoint file depends on conf.model, which the base class reads through this.
    weights_spec = _WeightsForModel()
    conf: D2NetConf

    def _init(self) -> None:
        assert self.weights_path is not None
        ckpt = load_checkpoint(self.weights_path, self.name)
        state = ckpt.get("model") if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):  # not the official {"model": state_dict} layout
            state = {}
        # Keys without the official prefix are kept as they are, so the strict load reports them.
        state = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in state.items()}
        self.vgg = vgg16_conv4_3()
        load_state_dict_strict(self.vgg, state, self.weights_path, self.name)
        self.vgg.eval().to(self.device)

    @property
    def descriptor_dim(self) -> int:
        return 512

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32, as lib/utils.py preprocess_image.

        The arithmetic is float64 then cast, as the official numpy code does, so that the input
        is bit-identical to the official one.
        """
        x = image.astype(np.float64).transpose(2, 0, 1)
        if self.conf.preprocessing == "caffe":
            x = x[::-1] - CAFFE_MEAN_BGR
        else:
            x = (x.astype(np.float32) / np.float32(255.0) - TORCH_MEAN) / TORCH_STD
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.device)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) network input -> (512, H // 4 - 1, W // 4 - 1) dense features."""
        dense = self.vgg(x)[0]
        return F.relu(dense) if self.conf.use_relu else dense

    @torch.inference_mode()
    def dense(self, image: np.ndarray) -> torch.Tensor:
        """(512, H // 4 - 1, W // 4 - 1) single-scale dense features of an (H, W, 3) uint8 image,
        taken as it is (no size policy)."""
        return self._features(self.network_input(image))

    def _downscale(self, image: np.ndarray) -> np.ndarray:
        """extract_features.py's size policy instead of the base class's area resize."""
        return official_resize(image, self.conf.resize_max, self.conf.resize_max_sum)

    def _extract(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keypoints in the pixels of `image`, in the official order (level, channel, row, col)."""
        return self.process_multiscale(self.network_input(image))

    def process_multiscale(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """lib/pyramid.py process_multiscale on a (1, 3, H, W) network input.

        Returns keypoints (N, 2) x, y in the pixels of `x`, scores (N,), descriptors (N, 512).
        Each level's features are summed with the upsampled sum of the coarser levels, and cells
        already detected at a coarser level are banned.
        """
        found = []
        previous: torch.Tensor | None = None
        banned: torch.Tensor | None = None
        for idx, scale in enumerate(self.conf.pyramid):
            level = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
            if min(level.shape[-2:]) < MIN_LEVEL_SIDE:
                continue  # the official code crashes on such a level; here it yields nothing
            dense = self._features(level)
            if previous is not None:
                dense += _resize(previous, dense.shape[-2:])
            detected = hard_detections(dense)
            banned = _apply_ban(detected, banned)
            level_feats = refine_and_describe(dense, detected.nonzero().T)
            # The official loop skips a level without keypoints before keeping its features, so
            # the next level is not summed with them.
            previous = dense if level_feats is not None else None
            if level_feats is None:
                continue
            cij, pos, desc = level_feats
            kpts = fmap_to_pixels(pos, level.shape[-2:], x.shape[-2:])
            found.append((kpts, dense[cij[0], cij[1], cij[2]] / (idx + 1), desc))
        if not found:
            return torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, self.descriptor_dim)
        kpts, scores, desc = (torch.cat(parts) for parts in zip(*found, strict=True))
        return kpts, scores, desc


def official_resize(
    image: np.ndarray, max_edge: int | None, max_sum_edges: int | None
) -> np.ndarray:
    """extract_features.py's size policy on an (H, W, 3) uint8 image (never upscales).

    First the longer side is brought to max_edge, then height + width to max_sum_edges (None:
    that step is skipped), each with scipy.misc.imresize(image, factor): the size is truncated and
    PIL bilinear does the resampling. Not reproduced: when both steps apply, imresize also
    stretched the contrast of the (float) intermediate image to 0..255, a side effect of that
    deprecated function.
    """
    if max_edge is not None and max(image.shape[:2]) > max_edge:
        image = _imresize(image, max_edge / max(image.shape[:2]))
    if max_sum_edges is not None and sum(image.shape[:2]) > max_sum_edges:
        image = _imresize(image, max_sum_edges / sum(image.shape[:2]))
    return image


def _imresize(image: np.ndarray, factor: float) -> np.ndarray:
    w, h = (np.array([image.shape[1], image.shape[0]]) * factor).astype(int)
    return np.asarray(Image.fromarray(image).resize((int(w), int(h)), Image.Resampling.BILINEAR))


def _apply_ban(detected: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """Clear (in place) detections (C, h, w) at cells detected on a coarser level; return the
    (h, w) ban for the next level. The ban is carried across levels by nearest-neighbour
    resizing, as the official pyramid does."""
    if banned is None:
        return detected.any(0)
    banned = F.interpolate(banned[None, None].float(), size=detected.shape[-2:])[0, 0] > 0
    detected &= ~banned
    return banned | detected.any(0)


def _resize(maps: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """(C, h, w) -> (C, *size), bilinear with align_corners=True as the official pyramid."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=True)[0]


def _stencil(maps: torch.Tensor, kernel: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    """A 3x3 stencil applied to every channel of (C, h, w) maps, zero padding -> (C, h, w)."""
    weight = torch.tensor(kernel, dtype=maps.dtype, device=maps.device).view(1, 1, 3, 3)
    return F.conv2d(maps[:, None], weight, padding=1)[:, 0]


def hard_detections(dense: torch.Tensor) -> torch.Tensor:
    """(C, h, w) dense features -> (C, h, w) bool: HardDetectionModule of lib/model_test.py.

    A detection is the maximum over channels (ties all count), the 3x3 maximum of its channel,
    and has a Hessian with det > 0 and tr^2 / det <= (r + 1)^2 / r. The Hessian is computed only
    on channels holding a candidate: the others cannot detect anything.
    """
    found = (dense == dense.max(0).values) & (dense == F.max_pool2d(dense, 3, 1, padding=1))
    channels = found.flatten(1).any(1).nonzero()[:, 0]
    maps = dense[channels]
    dii, dij, djj = _stencil(maps, DII), _stencil(maps, DIJ), _stencil(maps, DJJ)
    det = dii * djj - dij * dij
    trace = dii + djj
    threshold = (EDGE_THRESHOLD + 1) ** 2 / EDGE_THRESHOLD
    found[channels] &= (trace * trace / det <= threshold) & (det > 0)
    return found


def displacements(dense: torch.Tensor, cij: torch.Tensor) -> torch.Tensor:
    """Newton step -H^-1 grad at detections: HandcraftedLocalizationModule of lib/model_test.py.

    dense (C, h, w); cij (3, N) channel, row, column -> (2, N) step along rows, columns, in cells.
    """
    channels, local = cij[0].unique(return_inverse=True)
    maps = dense[channels]

    def at(kernel: tuple[tuple[float, ...], ...]) -> torch.Tensor:
        return _stencil(maps, kernel)[local, cij[1], cij[2]]

    di, dj, dii, dij, djj = at(DI), at(DJ), at(DII), at(DIJ), at(DJJ)
    det = dii * djj - dij * dij
    inv_ii, inv_ij, inv_jj = djj / det, -dij / det, dii / det
    return torch.stack([-(inv_ii * di + inv_ij * dj), -(inv_ij * di + inv_jj * dj)])


def refine_and_describe(
    dense: torch.Tensor, cij: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Sub-cell keypoints and descriptors at detections, as lib/pyramid.py and lib/utils.py.

    dense (C, h, w); cij (3, N). Drops steps of half a cell or more and positions whose four
    bilinear corners are not all inside the map. Returns the kept cij (3, M), positions (M, 2)
    (row, column) in cells and unit descriptors (M, C); None when nothing is kept.
    """
    if cij.shape[1] == 0:
        return None
    step = displacements(dense, cij)
    keep = (step.abs() < 0.5).all(0)
    cij, pos = cij[:, keep], (cij[1:, keep].float() + step[:, keep]).T
    h, w = dense.shape[-2:]
    upper = pos.ceil()
    inside = (pos >= 0).all(1) & (upper[:, 0] < h) & (upper[:, 1] < w)
    if not inside.any():
        return None
    cij, pos = cij[:, inside], pos[inside]
    return cij, pos, F.normalize(bilinear(dense, pos), dim=1)


def bilinear(dense: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(C, h, w) maps sampled at (N, 2) row, column positions inside the map -> (N, C).

    Written out (not grid_sample) to keep the official corner weights and summation order.
    """
    top, left = pos.floor().long().unbind(1)
    bottom, right = pos.ceil().long().unbind(1)
    di, dj = (pos - pos.floor()).unbind(1)
    out = (1 - di) * (1 - dj) * dense[:, top, left] + (1 - di) * dj * dense[:, top, right]
    out = out + di * (1 - dj) * dense[:, bottom, left] + di * dj * dense[:, bottom, right]
    return out.T


def fmap_to_pixels(
    pos: torch.Tensor, level_size: tuple[int, ...] | torch.Size, input_size: tuple[int, ...]
) -> torch.Tensor:
    """(N, 2) row, column feature-map positions of a pyramid level -> (N, 2) x, y input pixels.

    retr's convention, centre of the top-left pixel at (0, 0). The official code maps a cell p to
    4p + 1.5 (upscale_positions: 2p + 0.5 per 2x2 pooling, already centre-based) and a level to
    the input by H / h_level. Two corrections give the true centres:
    * +2 px: the 2x2 stride-1 average pool puts cell p half a cell (2 px) after the stride-8 cell
      the weights were trained on, whose centre is 8(p / 2) + 3.5 = 4p + 3.5;
    * (H - 1) / (h_level - 1): levels are resampled with align_corners=True.
    In single scale this is the official keypoint + 2 px in x and y.
    """
    level_px = 4 * pos + 3.5
    ratio = [(n - 1) / (m - 1) for n, m in zip(input_size[-2:], level_size[-2:], strict=True)]
    return (level_px * torch.tensor(ratio, device=pos.device)).flip(1)
