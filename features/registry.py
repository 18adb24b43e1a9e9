"""Names -> plug-in classes. Explicit so that a grep finds every method.

Plug-in modules are imported only when used, so a heavy or optional dependency of one method never
slows down or breaks the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from features.base import LocalExtractor
from features.core import ConfigError, parse_conf
from features.delg.base import GlobalExtractor

LOCAL_METHODS: dict[str, str] = {
    "disk": "features.local.disk:DISK",
    "superpoint": "features.local.superpoint:SuperPoint",
    "magicpoint": "features.local.magicpoint:MagicPoint",
    "d2net": "features.local.d2net:D2Net",
    "r2d2": "features.local.r2d2:R2D2",
    "sekd": "features.local.sekd:SEKD",
    "aslfeat": "features.local.aslfeat:ASLFeat",
    "mda": "features.local.mda:MDA",
    "delg": "features.local.delg_local:DELGLocal",
    "aliked": "features.local.aliked:ALIKED",
}


def local_class(name: str) -> type[LocalExtractor]:
    """The plug-in class registered as `name`; unknown names list the valid ones."""
    key = name.lower()
    if key not in LOCAL_METHODS:
        raise ConfigError(
            f"unknown local method '{name}' (available: {', '.join(sorted(LOCAL_METHODS))})"
        )
    module_name, cls_name = LOCAL_METHODS[key].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert issubclass(cls, LocalExtractor)
    return cls


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
    if name.startswith("trained:"):
        from features.delg.trained import TrainedDELG

        return TrainedDELG, {"weights": name.removeprefix("trained:")}
    key = name.lower()
    if key not in GLOBAL_MODELS:
        raise ConfigError(
            f"unknown global model '{name}' (available: "
            f"{', '.join(sorted(GLOBAL_MODELS))}, trained:CKPT)"
        )
    target, defaults = GLOBAL_MODELS[key]
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert issubclass(cls, GlobalExtractor)
    return cls, defaults


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
