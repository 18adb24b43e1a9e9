"""The official DELG extraction pipeline (tensorflow/models `research/delf`: `extractor.py`,
`export_model_utils.py`, `feature_extractor.py`), step for step, on a PyTorch DelgNet.

1. Pre-resize: if the longer side exceeds `max_image_size`, PIL bilinear resize to
   round(side * max_image_size / longer side) (Python's round, half to even).
2. Normalise: (pixel - 128) / 128 on every RGB channel.
3. Pyramid: each level has size round(float32(side) * float32(s)) (tf.round, half to even) and
   is resized from the normalised image with TF's bilinear kernel (half-pixel centres, no
   antialiasing, TF's float32 rounding); one forward pass per level gives block3, from which
   the local heads and, at the global levels, the global head are computed.
4. Global: the raw descriptors of the global levels are L2-normalised, summed, L2-normalised.
5. Local: at each level keep the cells whose attention score is >= the threshold (row-major),
   concatenate the levels in order, sort by score (descending, ties keep the earlier cell) and
   keep `max_feature_num`; descriptors are the L2-normalised autoencoder outputs. The location
   of cell (i, j) at scale s is the centre of its receptive box, computed as the official code
   does: ((32 i - 145) / s + (32 i + 145) / s) / 2, (y, x) order, then divided by the
   pre-resize factors. This is DELG's fixed convention (32 i / s), not the exact geometric
   centre of the SAME-padded receptive field; `scales` = 1 / s.

Presets hold the settings of the four official configs (`r{50,101}delg_{gld,gldv2clean}_config
.pbtxt`), selectable by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from features.core import ConfigError
from features.delg.base import scaled_size
from features.delg.resnet import GEM_P, LOCAL_DIM, DelgNet, load_delg_net
from features.types import LocalFeatures
from features.weights import WeightSpec, resolve_weights

IMAGE_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
GLOBAL_SCALES_IND = (3, 4, 5)
RF_SIZE, RF_STRIDE, RF_PADDING = 291.0, 32.0, 145.0
"""Receptive boxes of block3 cells (official: rf 291, stride 16 x 2 for block3_strides, pad 145)."""
PIXEL_OFFSET, PIXEL_SCALE = 128.0, 128.0
MIN_SIDE = 10
"""Below this many pixels after the pre-resize the official extractor returns no features."""
WEIGHTS_SOURCE = "convert the official DELG release with `retr convert delg SRC OUT.pt`"


OFFICIAL_NAMES = {
    "image_scales": "pyramid",
    "global_scales_ind": "scales",
    "max_image_size": "resize_max",
    "max_feature_num": "max_keypoints",
}
"""DelfConfig field -> retr knob, for both DELG plug-ins (DelgResNet, DELGLocal; same name:
score_threshold). `scales` lists the global scales themselves, not their indices into the
pyramid; max_feature_num has no "all" value, retr's max_keypoints None. Each plug-in's `settings`
property converts its config to these Settings."""


@dataclass(frozen=True)
class Settings:
    """The DelfConfig fields the DELG extractor reads (official names, see OFFICIAL_NAMES)."""

    image_scales: tuple[float, ...] = IMAGE_SCALES
    global_scales_ind: tuple[int, ...] = GLOBAL_SCALES_IND
    score_threshold: float = 454.6
    max_feature_num: int = 1000
    max_image_size: int | None = 1024

    @property
    def global_scales(self) -> tuple[float, ...]:
        return tuple(self.image_scales[i] for i in self.global_scales_ind)


@dataclass(frozen=True)
class Preset:
    """One official DELG model: its backbone, training set, release archive and config."""

    name: str
    depth: int
    dataset: str
    release: str
    settings: Settings = field(default_factory=Settings)

    @property
    def weights_spec(self) -> WeightSpec:
        filename = f"delg_r{self.depth}_{self.dataset.removesuffix('-clean')}.pt"
        where = f"storage.googleapis.com/delf/{self.release}.tar.gz"
        return WeightSpec(filename=filename, source=f"{WEIGHTS_SOURCE}, SRC from {where}")


def _preset(depth: int, dataset: str, release: str, threshold: float) -> Preset:
    name = f"r{depth}-{dataset}"
    return Preset(name, depth, dataset, release, Settings(score_threshold=threshold))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset(50, "gldv1", "r50delg_gld_20200814", 175.0),
        _preset(50, "gldv2-clean", "r50delg_gldv2clean_20200914", 454.6),
        _preset(101, "gldv1", "r101delg_gld_20200814", 166.1),
        _preset(101, "gldv2-clean", "r101delg_gldv2clean_20200914", 357.48),
    )
}
"""Official configs by name, `r<depth>-<training set>`; they differ only in the threshold."""
Depth = Literal[50, 101]
Dataset = Literal["gldv2-clean", "gldv1"]
"""The knobs that select a preset (both DELG plug-ins' `depth` and `dataset`)."""


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown DELG preset '{name}' (available: {', '.join(PRESETS)})")
    return PRESETS[name]


def preset_for(depth: int, dataset: str) -> Preset:
    return get_preset(f"r{depth}-{dataset}")


def load_net(
    preset: Preset, explicit: str | None, device: torch.device, what: str
) -> tuple[DelgNet, Path]:
    """Resolve the preset's checkpoint (explicit path, cache, ...) and build the network."""
    path = resolve_weights(preset.weights_spec, explicit, what=what)
    return load_delg_net(path, preset.depth, what).to(device), path


@dataclass
class Level:
    """Network outputs of one pyramid level (None where that head was not run).

    raw_global: (2048,) before normalisation; attention: (h, w) softplus scores;
    local_map: (128, h, w) autoencoder output before normalisation.
    """

    scale: float
    input_hw: tuple[int, int]
    raw_global: torch.Tensor | None
    attention: torch.Tensor | None
    local_map: torch.Tensor | None


@dataclass(frozen=True)
class DelgFeatures:
    """What the official extractor returns, in its own conventions (numpy float32).

    global_descriptor: (2048,) L2-normalised, or None when not requested.
    locations: (N, 2) (y, x) in the pixels of the image given to `extract`.
    descriptors: (N, 128) L2-normalised. scales: (N,) 1 / s. attention: (N,) scores.
    Local features are sorted by attention, descending.
    """

    global_descriptor: np.ndarray | None
    locations: np.ndarray
    descriptors: np.ndarray
    scales: np.ndarray
    attention: np.ndarray


def pre_resize(image: np.ndarray, max_image_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Official ResizeImage: (H, W, 3) uint8 -> resized image and factors (new/old) as (h, w)."""
    h, w = image.shape[:2]
    if max_image_size is None or max_image_size < 0 or max(h, w) <= max_image_size:
        return image, np.ones(2)
    factor = max_image_size / max(h, w)
    new_w, new_h = int(round(w * factor)), int(round(h * factor))
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized), np.array([new_h / h, new_w / w])


def normalise(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 (pixel - 128) / 128."""
    t = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)
    return ((t - PIXEL_OFFSET) / PIXEL_SCALE).permute(2, 0, 1)[None].contiguous()


def resize_level(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(1, 3, H, W) -> the pyramid level at `scale`, resized as tf.image.resize does."""
    h, w = x.shape[-2:]
    size = scaled_size(h, w, scale)
    return x if size == (h, w) else tf_resize_bilinear(x, size)


def tf_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *size): TF's ResizeBilinear with half-pixel centres and no
    antialiasing, in TF's float32 arithmetic. F.interpolate(mode="bilinear") samples the same
    points, but its rounding of the source coordinates differs by up to ~4e-5 on normalised
    pixels, which the network amplifies to ~6e-4 on attention scores."""
    y0, y1, wy = _tf_resize_axis(x.shape[-2], size[0], x.device)
    x0, x1, wx = _tf_resize_axis(x.shape[-1], size[1], x.device)
    top, bottom = x[..., y0, :], x[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def _tf_resize_axis(
    n_in: int, n_out: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower and upper source indices (n_out,) and the weight of the upper one along one axis;
    each float32 operation rounds separately, as in TF's kernel."""
    scale = torch.tensor(np.float32(n_in) / np.float32(n_out), device=device)
    src = (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) * scale - 0.5
    low = torch.floor(src)
    upper = torch.ceil(src).clamp(max=n_in - 1).long()
    return low.clamp(min=0).long(), upper, src - low


def run_pyramid(
    net: DelgNet,
    x: torch.Tensor,
    scales: Sequence[float],
    global_ind: Sequence[int] = (),
    local_ind: Sequence[int] = (),
    gem_p: float = GEM_P,
) -> list[Level]:
    """One forward pass per level of `scales` over the normalised (1, 3, H, W) image; the
    global head runs at the `global_ind` levels, the local heads at the `local_ind` levels."""
    levels = []
    for k, s in enumerate(scales):
        xs = resize_level(x, s)
        b3 = net.block3(xs)
        raw = net.global_head(b3, gem_p)[0] if k in global_ind else None
        prob, local = net.local_head(b3) if k in local_ind else (None, None)
        levels.append(
            Level(
                float(s),
                (xs.shape[-2], xs.shape[-1]),
                raw,
                None if prob is None else prob[0],
                None if local is None else local[0],
            )
        )
    return levels


def aggregate_global(raw: torch.Tensor) -> torch.Tensor:
    """(S, D) raw descriptors -> (D,): L2 per scale, sum, L2."""
    return F.normalize(F.normalize(raw, dim=-1).sum(0), dim=0)


def cell_locations(h: int, w: int, scale: float) -> torch.Tensor:
    """(h*w, 2) (y, x) receptive-box centres of an (h, w) block3 grid at `scale`, row-major,
    with the official float32 arithmetic (box corners divided by s, then averaged)."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([i, j], -1).reshape(-1, 2).float() * RF_STRIDE
    s = torch.tensor(np.float32(scale))
    low = (grid - RF_PADDING) / s
    high = (grid - RF_PADDING + RF_SIZE - 1.0) / s
    return (low + high) / 2.0


def select_local(
    levels: Sequence[Level], threshold: float, max_feature_num: int
) -> tuple[torch.Tensor, ...]:
    """Keypoint selection over the levels that have local outputs.

    Returns locations (N, 2) (y, x) in the pyramid's input frame, raw descriptors (N, 128),
    scales (N,) and attention (N,), sorted by attention (descending, stable), N <= max.
    """
    locs, descs, scales, scores = [], [], [], []
    for lv in levels:
        if lv.attention is None or lv.local_map is None:
            continue
        h, w = lv.attention.shape
        prob = lv.attention.reshape(-1)
        keep = torch.nonzero(prob >= threshold)[:, 0]
        locs.append(cell_locations(h, w, lv.scale).to(prob.device)[keep])
        descs.append(lv.local_map.reshape(lv.local_map.shape[0], -1).T[keep])
        scales.append(torch.full((len(keep),), 1.0 / np.float32(lv.scale), device=prob.device))
        scores.append(prob[keep])
    if not scores:
        raise ValueError("no pyramid level has local outputs")
    score = torch.cat(scores)
    order = torch.sort(score, descending=True, stable=True).indices[:max_feature_num]
    return torch.cat(locs)[order], torch.cat(descs)[order], torch.cat(scales)[order], score[order]


def postprocess(
    levels: Sequence[Level], settings: Settings, factors: np.ndarray | None = None
) -> DelgFeatures:
    """Official post-processing of the network outputs; `factors` (h, w) undo the pre-resize."""
    raws = [lv.raw_global for lv in levels if lv.raw_global is not None]
    glob = aggregate_global(torch.stack(raws)).cpu().numpy() if raws else None
    if not any(lv.attention is not None for lv in levels):
        return DelgFeatures(glob, *_empty_local(LOCAL_DIM))
    locs, desc, scales, att = select_local(
        levels, settings.score_threshold, settings.max_feature_num
    )
    locations = locs.cpu().numpy()
    if factors is not None:
        locations = (locations / factors).astype(np.float32)
    desc = F.normalize(desc, dim=1)
    return DelgFeatures(glob, locations, *(t.float().cpu().numpy() for t in (desc, scales, att)))


def _empty_local(dim: int) -> tuple[np.ndarray, ...]:
    return (
        np.zeros((0, 2), np.float32),
        np.zeros((0, dim), np.float32),
        np.zeros(0, np.float32),
        np.zeros(0, np.float32),
    )


@torch.inference_mode()
def extract(
    net: DelgNet,
    image: np.ndarray,
    settings: Settings,
    want_global: bool = True,
    want_local: bool = True,
) -> DelgFeatures:
    """The official extractor on an (H, W, 3) uint8 RGB image: one forward pass per level."""
    resized, factors = pre_resize(image, settings.max_image_size)
    if min(resized.shape[:2]) < MIN_SIDE:
        return DelgFeatures(None, *_empty_local(LOCAL_DIM))
    device = next(net.parameters()).device
    n = len(settings.image_scales)
    levels = run_pyramid(
        net,
        normalise(resized, device),
        settings.image_scales,
        settings.global_scales_ind if want_global else (),
        range(n) if want_local else (),
    )
    return postprocess(levels, settings, factors)


def to_local_features(feats: DelgFeatures, image_size: tuple[int, int]) -> LocalFeatures:
    """Official (y, x) locations -> retr keypoints (x, y). The official frame already puts the
    centre of the top-left pixel at 0, so only the axes swap; the 32 i / s cell centres are
    kept as the official code defines them (see the module docstring)."""
    kpts = np.ascontiguousarray(feats.locations[:, ::-1], dtype=np.float32)
    return LocalFeatures(kpts, feats.attention, feats.descriptors, image_size)
