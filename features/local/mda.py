"""MDA: Learning deep local features with multiple dynamic attentions for large-scale image
retrieval (Wu, Wang, Zhou, Li; ICCV 2021).

The authors' repository (github.com/CHANWH/MDA, MIT licence) holds only a README: no code and no
weights exist, so this is a re-implementation of the paper's architecture, with a checkpoint layout
of our own (docs/mda_checkpoint.md). Where the paper is silent we follow HOW (Tolias, Jenicek,
Chum, ECCV 2020; github.com/gtolias/how), which MDA builds on. Choices, in network order:

1. Backbone: ResNet-50 truncated after conv4_x (`layer3`) as HOW's "R50-" (skip_layer=1): 1024
   channels at stride 16, torchvision's v1.5 layout (stride in the 3x3 conv), built from plain torch
   layers. BatchNorm always uses running statistics (HOW freezes them during training too).
2. Input: RGB in [0, 1] normalised with ImageNet mean/std (HOW's runtime `mean_std`); images are
   downscaled so the longer side is at most 1024 px (HOW's `image_size`; done by the base class).
3. Channel mapping (paper): a 1x1 conv C->C with bias and no activation reorganises the channels;
   the mapped map is cut into N heads of floor(C/N) consecutive channels (leftovers unused).
   N = 4 by default: the paper's value could not be read here; a checkpoint states its own.
4. Dynamic attention head (paper): indicator g = ReLU(W_g avgpool(F) + b_g), one vector per image
   and head. RECONSTRUCTED: how g and F make the map could not be read from the accessible text; we
   use the gated L2 strength A = ||g * F||_2 over channels (HOW's 1e-10 inside the root), which is
   non-negative as weighted-sum pooling needs and equals HOW's attention for N=1, identity mapping
   and g = 1 -- the state a fresh model starts from (mapping = identity, W_g = 0, b_g = 1).
5. Local descriptors: L = T(smooth(S)), S the backbone map; HOW's 3x3 average smoothing (paper
   silent) then T, a 1x1 conv C -> 128 with bias (HOW's dimension and whitening layer; HOW
   initialises it by PCA whitening before training). Output rows are L2-normalised.
6. Global feature (training): G_i = l2n(sum_xy A_i L) per head; over several scales the sums are
   added (HOW's weighted SPoC, whose division by the maximum attention is a common factor that the
   L2 normalisation removes). `global_descriptor` returns
   the N heads concatenated and divided by sqrt(N): unit norm, its dot product is the mean per-head
   cosine that the paper's summed per-head contrastive loss compares. Training scale: 1.
7. Local features: HOW's pyramid (2, 1.414, 1, 0.707, 0.5, 0.353, 0.25) of bilinear resizes
   (align_corners=False); attention divided by its maximum over heads and scales (HOW); the values
   of all heads are ranked together and a location is kept once, at its strongest head (= ranking
   locations by their maximum over heads); the best 1000 are kept (HOW's `features_num`; the
   paper's n could not be read here).
8. Keypoints: HOW returns feature-grid indices; we return the receptive-field centre of cell (i, j),
   pixel (16 j, 16 i) of the resized image (every ResNet layer pads symmetrically), mapped back as
   (x + 0.5) / s - 0.5, PyTorch's coordinate rule for `scale_factor`. Convention: centre of the
   top-left pixel at (0, 0). Scales that leave the shorter side under 16 px (one cell) are
   skipped; HOW never meets such small images.

Training: retrieval.training.mda (`retr train local mda`: per-head classification loss and a
Hellinger attention-diversity term) writes checkpoints in this layout. Not implemented: ASMK.
Licence: MIT (authors' repository). No official weights exist; a trained checkpoint carries the
licence its trainer gives it (ImageNet-initialised backbones inherit ImageNet's terms).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from features.base import LocalConf, LocalExtractor, image_to_tensor
from features.core import CheckpointError, ConfigError, ImageReadError, StrictConf, parse_conf
from features.image import ImageInput, load_image
from features.registry import LOCAL_METHODS
from features.weights import load_checkpoint, load_state_dict_strict

FORMAT = "retr-mda-v1"
STRIDE = 16
BLOCKS = {"resnet50": (3, 4, 6), "resnet101": (3, 4, 23)}
"""Bottleneck blocks of layer1..layer3; layer4 is dropped as in HOW."""
HOW_SCALES = (2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25)


class MdaArch(StrictConf):
    """Architecture hyper-parameters, stored as a checkpoint's "config"."""

    architecture: Literal["resnet50", "resnet101"] = "resnet50"
    num_heads: Annotated[int, Field(ge=1, le=1024)] = 4  # at most one channel per head
    """N. Not readable from the paper's accessible text; a checkpoint states its own."""
    descriptor_dim: Annotated[int, Field(ge=1)] = 128
    smoothing_kernel: Annotated[int, Field(ge=1)] = 3
    """Side of HOW's average smoothing before the reduction (odd, to keep the map size); 1: off."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("smoothing_kernel")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"must be odd, got {k}")
        return k


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (same parameter names)."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


def resnet_trunk(blocks: tuple[int, int, int]) -> nn.Sequential:
    """conv1 .. layer3 as one Sequential (indices 0-6, as in HOW's `features`): (B, 3, H, W) ->
    (B, 1024, ceil(H/16), ceil(W/16)), non-negative (ends with a ReLU)."""
    stem = [
        nn.Conv2d(3, 64, 7, 2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
    ]
    layers, cin = [], 64
    for i, n in enumerate(blocks):
        width = 64 * 2**i
        layer = [Bottleneck(cin, width, stride=2 if i else 1)]  # layer1 keeps the resolution
        layer += [Bottleneck(4 * width, width, stride=1) for _ in range(n - 1)]
        layers.append(nn.Sequential(*layer))
        cin = 4 * width
    return nn.Sequential(*stem, *layers)


class DynamicAttentionHead(nn.Module):
    """One head: (B, c, h, w) channel group -> (B, h, w) attention (choice 4 of the docstring)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.indicator = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():  # fresh heads start as HOW: the indicator is 1 for every image
            self.indicator.weight.zero_()
            self.indicator.get_parameter("bias").fill_(1.0)

    def forward(self, group: torch.Tensor) -> torch.Tensor:
        gate = F.relu(self.indicator(group.mean(dim=(2, 3), keepdim=True)))
        return ((group * gate).pow(2).sum(1) + 1e-10).sqrt()


class MDANet(nn.Module):
    """Backbone, channel mapping, N dynamic attention heads and the descriptor reduction T."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, arch: MdaArch | None = None) -> None:
        super().__init__()
        self.arch = arch or MdaArch()
        channels = 1024  # layer3 of every bottleneck ResNet
        self.group = channels // self.arch.num_heads
        self.backbone = resnet_trunk(BLOCKS[self.arch.architecture])
        self.channel_map = nn.Conv2d(channels, channels, 1)
        self.heads = nn.ModuleList(
            DynamicAttentionHead(self.group) for _ in range(self.arch.num_heads)
        )
        self.reduction = nn.Conv2d(channels, self.arch.descriptor_dim, 1)
        self.register_buffer("mean", torch.tensor(self.arch.mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(self.arch.std).view(1, 3, 1, 1), False)
        # Training-start state: torchvision's conv init, identity mapping (HOW-equivalent heads).
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.dirac_(self.channel_map.weight)
        nn.init.zeros_(self.channel_map.get_parameter("bias"))

    def normalise(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> network input."""
        return (rgb - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, 3, H, W) -> attention (B, N, h, w) >= 0 and raw local descriptors
        (B, D, h, w), h = ceil(H / 16), w = ceil(W / 16)."""
        feats = self.backbone(x)
        mapped = self.channel_map(feats)
        groups = mapped[:, : self.group * len(self.heads)].split(self.group, dim=1)
        attention = torch.stack(
            [head(g) for head, g in zip(self.heads, groups, strict=True)], dim=1
        )
        k = self.arch.smoothing_kernel
        if k > 1:
            feats = F.avg_pool2d(feats, k, stride=1, padding=k // 2, count_include_pad=False)
        return attention, self.reduction(feats)


TORCHVISION_PREFIXES = {
    "conv1.": "backbone.0.",
    "bn1.": "backbone.1.",
    "layer1.": "backbone.4.",
    "layer2.": "backbone.5.",
    "layer3.": "backbone.6.",
}


def backbone_from_torchvision(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a torchvision ResNet state dict to MDANet's `backbone.*` keys; layer4 and fc, which
    MDA drops, are left out. Load the result with strict=False into a fresh MDANet."""
    out = {}
    for key, value in state.items():
        for old, new in TORCHVISION_PREFIXES.items():
            if key.startswith(old):
                out[new + key.removeprefix(old)] = value
    return out


def save_checkpoint(model: MDANet | MDA, path: str | Path) -> Path:
    """Write `model` in the retr-mda-v1 layout (docs/mda_checkpoint.md), atomically."""
    net = model.net if isinstance(model, MDA) else model
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    ckpt = {"format": FORMAT, "config": net.arch.model_dump(mode="json"), "state_dict": state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def load_network(path: Path, what: str = "mda") -> MDANet:
    """Build the network a retr-mda-v1 checkpoint describes and load its weights strictly."""
    ckpt = load_checkpoint(path, what)
    keys = set(ckpt) if isinstance(ckpt, dict) else set()
    if keys != {"format", "config", "state_dict"} or ckpt["format"] != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{what}: {path} is not a {FORMAT} checkpoint (keys {sorted(map(str, keys))}, "
            f"format {found!r}); see docs/mda_checkpoint.md"
        )
    try:
        arch = parse_conf(MdaArch, dict(ckpt["config"]), f"{what} checkpoint {path} config")
        net = MDANet(arch)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    load_state_dict_strict(net, ckpt["state_dict"], path, what)
    return net.eval()


def cell_centres(h: int, w: int, scale: float, device: Any = None) -> torch.Tensor:
    """(h * w, 2) x, y of the receptive-field centres of an (h, w) grid computed on the input
    resized by `scale`, in the pixels of the unresized input (row-major, like `.flatten()`)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    xy = torch.stack([xs.flatten(), ys.flatten()], dim=1).float() * STRIDE
    return (xy + 0.5) / scale - 0.5


@dataclass(frozen=True)
class Level:
    """Network outputs at one pyramid scale: attention (N, h, w), raw descriptors (D, h, w)."""

    scale: float
    attention: torch.Tensor
    descriptors: torch.Tensor


def select_local(
    levels: list[Level], k: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k locations with the strongest attention of any head, over all levels.

    Returns keypoints (K, 2) x, y in the pixels of the pyramid's base image, scores (K,) in
    (0, 1] (attention / its maximum over heads and levels), raw descriptors (K, D).
    """
    top = max(float(lv.attention.max()) for lv in levels)
    xy, scores, desc = [], [], []
    for lv in levels:
        _, h, w = lv.attention.shape
        xy.append(cell_centres(h, w, lv.scale, lv.attention.device))
        scores.append(lv.attention.amax(0).flatten() / max(top, 1e-12))
        desc.append(lv.descriptors.flatten(1).T)
    all_scores = torch.cat(scores)
    order = torch.sort(all_scores, descending=True, stable=True).indices[:k]
    return torch.cat(xy)[order], all_scores[order], torch.cat(desc)[order]


PositiveFloat = Annotated[float, Field(gt=0)]


OFFICIAL_NAMES = {"features_num": "max_keypoints", "image_size": "resize_max", "scales": "pyramid"}
"""HOW's inference option (MDA has no official code; HOW is its reference) -> retr knob."""


class MdaConf(LocalConf):
    max_keypoints: int | None = 1000
    """The paper keeps the top n locations (HOW: 1000)."""
    resize_max: int | None = 1024
    """Downscale to this longer side, never upscale (HOW: 1024)."""
    pyramid: tuple[PositiveFloat, ...] = Field(HOW_SCALES, min_length=1)
    """Scales of the local features' image pyramid (HOW's multi-scale inference)."""


class MDA(LocalExtractor):
    """MDA local features: 128-D descriptors at the strongest multi-head attention locations.

    Licence: MIT (authors' repository, README only). No official weights exist: train MDA and
    save it with `save_checkpoint`; a checkpoint carries its trainer's licence.
    """

    name = "mda"
    Conf = MdaConf
    # licence and weights live in features.registry: `retr features list` reads them there
    licence = LOCAL_METHODS["mda"].licence
    paper = "Wu et al., Learning Deep Local Features with Multiple Dynamic Attentions, ICCV 2021"
    weights_spec = LOCAL_METHODS["mda"].weights
    conf: MdaConf

    def _init(self) -> None:
        assert self.weights_path is not None
        self.net = load_network(self.weights_path, self.name).to(self.device)

    @property
    def descriptor_dim(self) -> int:
        return self.net.arch.descriptor_dim

    @property
    def num_heads(self) -> int:
        return len(self.net.heads)

    @torch.inference_mode()
    def dense(self, image: np.ndarray, scale: float = 1.0) -> Level:
        """Raw outputs for an (H, W, 3) uint8 image resized by `scale`: attention (N, h, w) and
        descriptors (D, h, w) before L2 normalisation, h = ceil(H * scale / 16)."""
        x = self.net.normalise(image_to_tensor(image, self.device))
        if scale != 1.0:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        attention, desc = self.net(x)
        return Level(scale, attention[0], desc[0])

    def _pyramid(self, image: np.ndarray, scales: tuple[float, ...]) -> list[Level]:
        short = min(image.shape[:2])
        levels = [self.dense(image, s) for s in scales if math.floor(short * s) >= STRIDE]
        if not levels:  # only when resize_max or tiny scales leave < 16 px: skip the image
            reason = f"too small for the scales {scales}: no level reaches {STRIDE} px"
            raise ImageReadError(f"<{image.shape[1]}x{image.shape[0]} image>", reason)
        return levels

    def _extract(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self._pyramid(image, self.conf.pyramid)
        return select_local(levels, self.conf.max_keypoints)

    @torch.inference_mode()
    def head_descriptors(self, image: ImageInput, scales: tuple[float, ...] = (1.0,)) -> np.ndarray:
        """(N, D) training-time global features, one L2-normalised row per head (choice 6), pooled
        over the global `scales` (not the local `pyramid`)."""
        small = self._downscale(load_image(image))
        levels = self._pyramid(small, scales)
        pooled = torch.zeros(self.num_heads, self.descriptor_dim, device=self.device)
        for lv in levels:
            pooled += torch.einsum("nhw,dhw->nd", lv.attention, lv.descriptors)
        return F.normalize(pooled, dim=1).cpu().numpy()

    def global_descriptor(
        self, image: ImageInput, scales: tuple[float, ...] = (1.0,)
    ) -> np.ndarray:
        """(N * D,) unit-norm concatenation of `head_descriptors` divided by sqrt(N)."""
        heads = self.head_descriptors(image, scales)
        return (heads.reshape(-1) / math.sqrt(len(heads))).astype(np.float32)
