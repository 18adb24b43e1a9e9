"""A DELG model trained by `retr train global` (retrieval.training.delg), as a global model.

Registered under the name `trained:<CKPT>` (features.registry): the checkpoint path resolves
through features.weights like every other plug-in's, and its SHA-256 is part of the fingerprint,
so an index built with one checkpoint refuses features of another.

The network (Cao, Araujo, Sim: "Unifying Deep Local and Global Features for Image Search", ECCV
2020) on an ImageNet EfficientNet-Lite backbone:
- global branch: GeM (p = 3) over the last feature map (stride 32), then DELG's FC whitening
  layer (`whiten`, C -> global_dim, with bias); descriptor L2-normalised per scale as in
  features.delg.base;
- local branch on the last stride-16 block, divided by its RMS (`rms_normalised`): attention MLP
  (1x1 conv -> ReLU -> 1x1 conv -> softplus) and an autoencoder (1x1 conv C16 -> local_dim, the
  local descriptors, and back; no final ReLU, as these blocks' outputs are signed). Training
  passes the stride-16 map through a stop-gradient into this branch, so local losses never move
  the backbone (DELG's recipe).

Checkpoint (`retr-delg-trained-v1`): a dict with `format`, `config` (TrainedArch) and
`state_dict` (this network); the resumable training state (classifiers, optimiser, step) lives
beside it in CKPT.train (retrieval.training.loop). Licence: the trainer's (the backbone's
ImageNet weights are Apache-2.0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.core import CheckpointError, ConfigError, StrictConf, parse_conf
from features.delg.base import GlobalConf, GlobalExtractor, gem
from features.delg.efficientnet import MEAN, STD, VARIANTS
from features.weights import WeightSpec, load_checkpoint, load_state_dict_strict

FORMAT = "retr-delg-trained-v1"
PREFIX = "trained:"
"""Global model names `trained:<path>` load a checkpoint of this format."""


class TrainedArch(StrictConf):
    """Architecture of a trained DELG model, stored as a checkpoint's "config"."""

    backbone: Literal["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"] = (
        "efficientnet-lite0"
    )
    global_dim: Annotated[int, Field(ge=8)] = 512
    """Output of the FC whitening layer (DELG: 2048 on ResNet; smaller on a small backbone)."""
    local_dim: Annotated[int, Field(ge=8)] = 128
    """Autoencoder bottleneck: the local descriptor length (DELG: 128)."""
    attention_hidden: Annotated[int, Field(ge=8)] = 512
    """Hidden channels of the attention MLP (DELG: 512)."""


def _lite(backbone: str) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(backbone)


def stride16_block(net: Any) -> tuple[int, int]:
    """(index of the last block at stride 16, its output channels), found by one tiny pass."""
    x = torch.zeros(1, 3, 64, 64)
    last, channels = -1, 0
    was = net.training
    net.eval()
    with torch.no_grad():
        x = net._swish(net._bn0(net._conv_stem(x)))
        for i, block in enumerate(net._blocks):
            x = block(x)
            if x.shape[-1] == 4:
                last, channels = i, x.shape[1]
    net.train(was)
    return last, channels


class DelgTrainNet(nn.Module):
    """Backbone + DELG global head (GeM, FC whitening) + local branch (attention, autoencoder)."""

    def __init__(self, arch: TrainedArch | None = None) -> None:
        super().__init__()
        self.arch = arch or TrainedArch()
        self.backbone = _lite(self.arch.backbone)
        self.mid_block, mid = stride16_block(self.backbone)
        deep = VARIANTS[self.arch.backbone.removeprefix("efficientnet-")][2]
        self.whiten = nn.Linear(deep, self.arch.global_dim)
        self.attention = nn.Sequential(
            nn.Conv2d(mid, self.arch.attention_hidden, 1),
            nn.ReLU(),
            nn.Conv2d(self.arch.attention_hidden, 1, 1),
            nn.Softplus(),
        )
        self.encoder = nn.Conv2d(mid, self.arch.local_dim, 1)
        self.decoder = nn.Conv2d(self.arch.local_dim, mid, 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, 3, H, W) -> stride-16 map (B, C16, H/16, W/16) and the last map
        (B, C, H/32, W/32)."""
        net: Any = self.backbone
        y = net._swish(net._bn0(net._conv_stem(x)))
        mid = y
        n = len(net._blocks)
        rate = net._global_params.drop_connect_rate
        for i, block in enumerate(net._blocks):
            y = block(y, drop_connect_rate=rate * i / n if rate else None)
            if i == self.mid_block:
                mid = y
        return mid, net._swish(net._bn1(net._conv_head(y)))

    def global_head(self, deep: torch.Tensor, p: float = 3.0) -> torch.Tensor:
        """(B, C, h, w) -> (B, global_dim) raw (unnormalised) descriptors."""
        return self.whiten(gem(deep, p))

    def local_head(self, mid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C16, h, w) -> attention (B, 1, h, w) >= 0, local descriptors (B, local_dim, h, w)
        and the autoencoder's reconstruction (B, C16, h, w) of `rms_normalised(mid)`."""
        mid = rms_normalised(mid)
        code = self.encoder(mid)
        return self.attention(mid), code, self.decoder(code)


def rms_normalised(mid: torch.Tensor) -> torch.Tensor:
    """Each image's map divided by its root mean square. EfficientNet's stride-16 blocks end in
    a linear projection whose scale varies a lot (unlike the post-ReLU ResNet block DELG uses):
    unscaled, the local branch's losses diverge with SGD at DELG's learning rate."""
    return mid / mid.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)


def load_trained(path: Path, what: str) -> DelgTrainNet:
    """The network a retr-delg-trained-v1 checkpoint describes, weights loaded strictly."""
    ckpt = load_checkpoint(path, what)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "state_dict" not in ckpt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{what}: {path} is not a {FORMAT} checkpoint (format {found!r}); make one with "
            "`retr train global DATA --out CKPT`"
        )
    try:
        arch = parse_conf(TrainedArch, dict(ckpt["config"]), f"{what} checkpoint {path} config")
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    net = DelgTrainNet(arch)
    load_state_dict_strict(net, ckpt["state_dict"], path, what)
    return net.eval()


class TrainedConf(GlobalConf):
    resize_max: int | None = 512
    """Longer side before the pyramid (as the EfficientNet-Lite default)."""


class TrainedDELG(GlobalExtractor):
    """(H, W, 3) image -> global_dim-D DELG descriptor of a `retr train global` checkpoint."""

    name = "delg-trained"
    Conf = TrainedConf
    licence = "the trainer's (backbone weights: Apache-2.0)"
    weights_spec = WeightSpec(
        filename="delg_trained.pt",
        source="train one with `retr train global DATA --out CKPT`, then use --global trained:CKPT",
    )
    conf: TrainedConf

    def _init(self) -> None:
        assert self.weights_path is not None
        self.net = load_trained(self.weights_path, self.name).to(self.device)

    @property
    def dim(self) -> int:
        return self.net.arch.global_dim

    def _normalise(self, image: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(image, dtype=np.float32)).to(self.device)
        return ((t - MEAN) / STD).permute(2, 0, 1)[None]

    def _descriptor(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.global_head(self.net.features(x)[1], self.conf.gem_p)[0]


def trained_name(path: str | Path) -> str:
    return f"{PREFIX}{path}"


@torch.inference_mode()
def local_features(
    net: DelgTrainNet,
    image: np.ndarray,
    pyramid: tuple[float, ...],
    max_keypoints: int | None,
    threshold: float | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DELG local features of the trained local branch over an image pyramid.

    image: (H, W, 3) uint8. Returns keypoints (K, 2) x, y in the pixels of `image` (cell (i, j)
    at the centre of its 16x16 block of the level, (16 j + 7.5, 16 i + 7.5), mapped back as
    (x + 0.5) / s - 0.5), attention scores (K,) and raw descriptors (K, local_dim): the K
    strongest attention values over all levels (those >= threshold when one is given).
    """
    x = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)
    x = ((x - MEAN) / STD).permute(2, 0, 1)[None]
    xy, scores, desc = [], [], []
    for s in pyramid:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear")
        if min(xs.shape[-2:]) < 32:
            continue
        attention, code, _ = net.local_head(net.features(xs)[0])
        h, w = attention.shape[-2:]
        ys, xs_ = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        cells = torch.stack([xs_.flatten(), ys.flatten()], 1).float() * 16 + 7.5
        xy.append((cells + 0.5) / s - 0.5)
        scores.append(attention[0, 0].flatten())
        desc.append(code[0].flatten(1).T)
    if not xy:
        return torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, net.arch.local_dim)
    all_xy, all_scores, all_desc = torch.cat(xy), torch.cat(scores), torch.cat(desc)
    keep = all_scores >= threshold if threshold is not None else slice(None)
    all_xy, all_scores, all_desc = all_xy[keep], all_scores[keep], all_desc[keep]
    order = torch.sort(all_scores, descending=True, stable=True).indices[:max_keypoints]
    return all_xy[order], all_scores[order], all_desc[order]


def is_trained_checkpoint(path: str | Path | None) -> bool:
    """Whether `path` names a retr-delg-trained-v1 file (checked by its content)."""
    if path is None or not Path(path).is_file():
        return False
    try:
        ckpt = load_checkpoint(Path(path), "delg")
    except CheckpointError:
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT
