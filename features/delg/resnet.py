"""The DELG network in PyTorch: the Keras ResNet-50/101 backbone of tensorflow/models
`research/delf` and its three heads (GeM + FC whitening, attention, autoencoder reduction).

The Keras backbone differs from torchvision's ResNet in ways that change every output, so it is
rebuilt here rather than borrowed:

- every convolution has a bias, including those followed by batch norm;
- batch norm uses Keras' epsilon 1e-3;
- `conv1` (7x7, stride 2) uses TF "SAME" padding, which is asymmetric: the extra pixel goes to
  the bottom/right;
- the stem max pool is 3x3, stride 2, with no padding ("VALID");
- bottlenecks are Caffe-style: the stride sits on the first 1x1 conv and on the 1x1 shortcut;
- the output of stage 4 (l4) is subsampled by 2 (a 1x1 max pool with stride 2): this is
  "block3", the input of the local heads; stage 5 (l5) then runs at stride 1, so block3 and
  block4 both have stride 32.

Module names follow torchvision (conv1, bn1, layer1..layer4, conv1/bn1..conv3/bn3,
downsample.0/1) so the converter's mapping reads like the usual one. Licence: Apache-2.0 (the
architecture of tensorflow/models).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from features.core import CheckpointError
from features.delg.base import gem
from features.weights import load_checkpoint, load_state_dict_strict

BN_EPS = 1e-3
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
"""Bottlenecks per stage (l2, l3, l4, l5) for each depth."""
WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 1)
"""l5 runs at stride 1 because block3 is subsampled instead (official block3_strides=True)."""
GLOBAL_DIM = 2048
LOCAL_DIM = 128
BLOCK3_DIM = 1024
GEM_P = 3.0


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) as TF "SAME" does: total = max((ceil(n/s)-1)*s + k - n, 0) per
    axis, the smaller half before and the larger half after."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad wants the last axis first
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Bottleneck(nn.Module):
    """Keras `_ConvBlock` (with shortcut conv) or `_IdentityBlock`: (B, Cin, H, W) ->
    (B, 4*width, ceil(H/stride), ceil(W/stride))."""

    def __init__(self, cin: int, width: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, stride=stride)
        self.bn1 = bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)  # SAME at stride 1 is symmetric
        self.bn2 = bn(width)
        self.conv3 = nn.Conv2d(width, cout, 1)
        self.bn3 = bn(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), bn(cout)) if shortcut else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


def make_stage(cin: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """The first block of every stage has a shortcut conv (l2a too: 64 -> 256 channels)."""
    layers = [Bottleneck(cin, width, stride, shortcut=True)]
    layers += [Bottleneck(4 * width, width, 1, shortcut=False) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """block3 (B, 1024, h, w) -> attention logits (B, 1, h, w); softplus gives the score."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(BLOCK3_DIM, 512, 1)
        self.bn = bn(512)
        self.conv2 = nn.Conv2d(512, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn(self.conv1(x))))


class Autoencoder(nn.Module):
    """The inference half of DELG's autoencoder: a linear 1x1 conv 1024 -> 128 (no activation).
    The expanding conv2 is used only by the training loss and is not kept."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(BLOCK3_DIM, LOCAL_DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


class DelgNet(nn.Module):
    """DELG with a ResNet-`depth` backbone. Inputs are (B, 3, H, W) RGB in (pixel - 128) / 128."""

    def __init__(self, depth: int = 50) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"DELG depth must be one of {sorted(BLOCKS)}, got {depth}")
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2)
        self.bn1 = bn(64)
        stages = [
            make_stage(cin, width, blocks, stride)
            for cin, width, blocks, stride in zip(
                (64, *[4 * w for w in WIDTHS[:-1]]), WIDTHS, BLOCKS[depth], STRIDES, strict=True
            )
        ]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.embedding = nn.Linear(GLOBAL_DIM, GLOBAL_DIM)
        self.attention = Attention()
        self.autoencoder = Autoencoder()
        # oneDNN runs these convolutions ~20% faster on CPU in channels-last layout
        for param in self.parameters():
            if param.ndim == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)

    def _nhwc(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> block0, (B, 64, ceil(H/2), ceil(W/2)), before the max pool."""
        return F.relu(self.bn1(self.conv1(self._nhwc(tf_same_pad(x, 7, 2)))))

    def block3(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1024, h, w), stride 32: the input of every head."""
        x = F.max_pool2d(self.stem(x), 3, 2)
        x = self.layer3(self.layer2(self.layer1(x)))
        return x[:, :, ::2, ::2]

    def global_head(self, block3: torch.Tensor, gem_p: float = GEM_P) -> torch.Tensor:
        """block3 -> (B, 2048) raw global descriptor: l5, GeM (trained with p=3), whitening FC;
        not normalised."""
        return self.embedding(gem(self.layer4(block3), gem_p))

    def local_head(self, block3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block3 -> attention score (B, h, w) after softplus, and the reduced local feature
        map (B, 128, h, w) before L2 normalisation."""
        return F.softplus(self.attention(block3))[:, 0], self.autoencoder(block3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> raw global (B, 2048), attention (B, h, w), local map (B, 128, h, w)."""
        b3 = self.block3(x)
        return (self.global_head(b3), *self.local_head(b3))

    def intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every named stage of one forward pass (what the official `intermediates_dict` and
        heads expose), for layer-by-layer parity checks. Shapes are (B, C, h, w) or (B, C)."""
        out = {"block0": self.stem(x)}
        out["block0mp"] = F.max_pool2d(out["block0"], 3, 2)
        out["block1"] = self.layer1(out["block0mp"])
        out["block2"] = self.layer2(out["block1"])
        out["block3"] = self.layer3(out["block2"])[:, :, ::2, ::2]
        out["block4"] = self.layer4(out["block3"])
        out["gem_pooled"] = gem(out["block4"], GEM_P)
        out["global_embedding"] = self.embedding(out["gem_pooled"])
        out["attention_logits"] = self.attention(out["block3"])[:, 0]
        out["attention_prob"] = F.softplus(out["attention_logits"])
        out["autoencoder_reduced"] = self.autoencoder(out["block3"])
        return out


CHECKPOINT_FORMAT = "retr-delg-v1"


def checkpoint_dict(net: DelgNet) -> dict[str, object]:
    """What a converted checkpoint file holds: {"format", "depth", "state_dict"}."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "depth": net.depth, "state_dict": state}


def load_delg_net(path: Path, depth: int, what: str) -> DelgNet:
    """Build DelgNet(depth) from a converted checkpoint (weights_only, strict keys). A file of
    another format or depth raises CheckpointError naming it."""
    ckpt = load_checkpoint(path, what)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{what}: {path} is not a converted DELG checkpoint (format '{CHECKPOINT_FORMAT}'); "
            "convert the official release with `retr convert delg SRC OUT.pt`"
        )
    if ckpt.get("depth") != depth:
        raise CheckpointError(
            f"{what}: {path} holds a ResNet-{ckpt.get('depth')} DELG, expected ResNet-{depth}"
        )
    net = DelgNet(depth)
    load_state_dict_strict(net, ckpt["state_dict"], path, what)
    return net.eval()
