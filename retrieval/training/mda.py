"""MDA's training (Wu, Wang, Zhou, Li: "Learning Deep Local Features with Multiple Dynamic
Attentions for Large-Scale Image Retrieval", ICCV 2021), for `retr train local mda`.

The network is features.local.mda.MDANet (ResNet trunk to conv4_x, channel mapping, N dynamic
attention heads, reduction T); its checkpoint is written in the `retr-mda-v1` layout
(docs/mda_checkpoint.md), so `--local mda --local-conf '{"weights": "CKPT"}'` loads it. Losses:

- classification: each head's global feature G_i = l2n(sum_xy A_i L) (features.local.mda,
  choice 6) is classified by one shared ArcFace classifier (margin 0.1, learned scale); the
  loss is the mean of the N heads' cross-entropies. The paper trains with a per-head loss on
  labelled landmarks; with class labels a classification loss is what this loop can drive
  (HOW's contrastive tuples need mined positives, not available for a labelled folder).
- attention diversity: the heads' attention maps, each normalised to a distribution over
  locations, are pushed apart by maximising their pairwise Hellinger distance
  H(p, q) = ||sqrt(p) - sqrt(q)||_2 / sqrt(2) in [0, 1]; the loss is mean(1 - H) over pairs.
- total = classification + diversity_weight * diversity.

BatchNorm statistics stay frozen (HOW and MDA fine-tune with frozen BN). Without `--backbone
PATH` (a torchvision ResNet state dict, renamed by features.local.mda.backbone_from_torchvision)
the trunk starts from torchvision's random initialisation: no ImageNet ResNet weights ship with
retr.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.core import CheckpointError, StrictConf
from features.local.mda import FORMAT, MdaArch, MDANet, backbone_from_torchvision
from features.weights import load_checkpoint
from retrieval.training.data import Augment, TrainingSet, make_batch
from retrieval.training.delg import ArcFace


class MdaTrainConf(StrictConf):
    arch: MdaArch = MdaArch()
    image_size: int = Field(default=512, ge=32)
    """Side of the square training crops."""
    margin: float = Field(default=0.1, ge=0)
    diversity_weight: float = Field(default=1.0, ge=0)
    backbone: str | None = None
    """A torchvision ResNet state dict to start the trunk from (None: random initialisation)."""


class MdaTraining(nn.Module):
    def __init__(self, conf: MdaTrainConf, classes: int) -> None:
        super().__init__()
        self.net = MDANet(conf.arch)
        self.arcface = ArcFace(conf.arch.descriptor_dim, classes, conf.margin)


def head_features(attention: torch.Tensor, desc: torch.Tensor) -> torch.Tensor:
    """(B, N, h, w) attention, (B, D, h, w) descriptors -> (B, N, D) per-head L2-normalised
    attention-weighted sums (features.local.mda choice 6)."""
    return F.normalize(torch.einsum("bnhw,bdhw->bnd", attention, desc), dim=-1)


def diversity_loss(attention: torch.Tensor) -> torch.Tensor:
    """Mean over head pairs of 1 - Hellinger distance between the heads' attention maps (each
    normalised to sum to 1 over locations). 0 when the heads attend to disjoint locations."""
    b, n = attention.shape[:2]
    if n < 2:
        return attention.new_zeros(())
    p = attention.flatten(2)
    root = (p / p.sum(-1, keepdim=True).clamp_min(1e-12)).clamp_min(0).sqrt()
    pairs = [
        1 - (root[:, i] - root[:, j]).norm(dim=-1) / 2**0.5
        for i, j in itertools.combinations(range(n), 2)
    ]
    return torch.stack(pairs).mean()


def load_backbone(net: MDANet, path: Path) -> None:
    state = load_checkpoint(path, "MDA backbone")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    renamed = backbone_from_torchvision(state)
    if not renamed:
        raise CheckpointError(
            f"{path}: no torchvision ResNet keys (conv1., layer1. ...) to start the MDA trunk from"
        )
    missing, unexpected = net.load_state_dict(renamed, strict=False)
    if unexpected or any(k.startswith("backbone.") for k in missing):
        raise CheckpointError(f"{path}: does not fit the {net.arch.architecture} trunk")


class MdaTask:
    """The loop's task (training.loop.Task) for MDA."""

    def __init__(self, data: TrainingSet, conf: MdaTrainConf, batch_size: int, seed: int):
        torch.manual_seed(seed)
        self.data, self.conf, self.batch_size, self.seed = data, conf, batch_size, seed
        self.model = MdaTraining(conf, data.num_classes)
        if conf.backbone:
            load_backbone(self.model.net, Path(conf.backbone))
        self.aug = Augment(size=conf.image_size)
        self.meta: dict[str, Any] = {
            "task": "mda",
            "conf": conf.model_dump(mode="json"),
            "classes": data.classes,
            "images": len(data),
        }

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = make_batch(self.data, self.aug, self.batch_size, self.seed, step)
        return images / 255.0, labels

    def set_train(self) -> None:
        self.model.train()
        for m in self.model.modules():  # frozen BatchNorm statistics (HOW, MDA)
            if isinstance(m, nn.BatchNorm2d):
                m.eval()

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) RGB in [0, 1] (normalised here, on the model's device)."""
        attention, desc = self.model.net(self.model.net.normalise(images))
        heads = head_features(attention.float(), desc.float())
        n = heads.shape[1]
        cls = torch.stack(
            [F.cross_entropy(self.model.arcface(heads[:, i], labels), labels) for i in range(n)]
        ).mean()
        div = diversity_loss(attention.float())
        total = cls + self.conf.diversity_weight * div
        return {"loss": total, "classification": cls, "diversity": div}

    def export(self) -> dict[str, Any]:
        """The retr-mda-v1 checkpoint (docs/mda_checkpoint.md)."""
        net = self.model.net
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return {"format": FORMAT, "config": net.arch.model_dump(mode="json"), "state_dict": state}
