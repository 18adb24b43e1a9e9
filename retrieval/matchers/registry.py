"""Matcher names -> plug-in classes, and the rerank plans built from them. Explicit, so a grep
finds every matcher.

A plan (the `matcher` option of an index, a query, the CLI) is one matcher over the whole
shortlist ("mnn", "lightglue"), the two-stage "mnn+lightglue" (mutual NN and RANSAC over the
shortlist, then LightGlue re-scores the best `lightglue_top`), or "auto": the plan measured best
on the device for the index's local method (AUTO_PLAN; docs/results.md). The plan names and
which local methods each matcher matches live in features.matcher_names, torch-free, for the
configs that check them.
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache
from typing import Any

from features.core import ConfigError, RetrError, StrictConf, pick_device
from features.matcher_names import AUTO, PLANS, TWO_STAGE, check_plan, stages
from retrieval.matchers.base import Matcher

logger = logging.getLogger(__name__)

MATCHERS: dict[str, str] = {
    "mnn": "retrieval.matchers.mnn:MNN",
    "lightglue": "retrieval.matchers.lightglue:LightGlue",
}
AUTO_PLAN = {"cuda": "lightglue", "cpu": TWO_STAGE}
"""What "auto" runs per device when the local method has LightGlue weights (else "mnn"). On a
CPU the two-stage plan: mutual NN over the shortlist, then LightGlue (1024 keypoints) on the
best `RerankConf.lightglue_top` (6) of the queries mutual NN did not settle, stopping at the
first candidate it settles. Measured on the 2-core CPU (leave-one-out landmarks-mini): mAP 82.4
against 77.5 for mutual NN alone without αQE / DBA, wxbs 77.0 against 66.7, at 1.35x its
end-to-end latency (1.85x on wide-baseline queries, 1.06x on the others). On a GPU, LightGlue
over the whole shortlist in batches (chosen by design: no GPU was available to measure it).
docs/results.md, "Learned matching"."""


def matcher_class(name: str) -> type[Matcher]:
    """The plug-in class registered as `name`; unknown names list the valid ones."""
    key = name.lower()
    if key not in MATCHERS:
        raise ConfigError(f"unknown matcher '{name}' (available: {', '.join(sorted(MATCHERS))})")
    module_name, cls_name = MATCHERS[key].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert issubclass(cls, Matcher)
    return cls


def resolve_plan(plan: str, local_method: str, device: Any = None) -> str:
    """The plan a search runs: `plan` checked, "auto" replaced by AUTO_PLAN for the device,
    or "mnn" when LightGlue has no weights for the method (or its file cannot be found, which
    is logged)."""
    key = check_plan(plan, local_method)
    if key != AUTO:
        return key
    chosen = AUTO_PLAN.get(pick_device(device).type, TWO_STAGE)
    return chosen if _lightglue_available(local_method.lower()) else "mnn"


@lru_cache(maxsize=16)
def _lightglue_available(local_method: str) -> bool:
    """Whether LightGlue has weights for the method and they can be found (said once)."""
    from features.weights import resolve_weights
    from retrieval.matchers.lightglue import WEIGHTS

    if local_method not in WEIGHTS:
        return False
    try:
        resolve_weights(WEIGHTS[local_method], what=f"lightglue ({local_method})")
    except RetrError as exc:
        logger.warning("matcher auto falls back to mutual NN: %s", exc)
        return False
    return True


def load_matcher(
    name: str, conf: StrictConf | None = None, local_method: str = "disk", device: Any = None
) -> Matcher:
    """The matcher `name` with `conf`, built once per (name, conf, method, device) and shared:
    matchers hold no per-call state, and a network is loaded once per process."""
    dev = pick_device(device)
    return _cached(name.lower(), conf, local_method.lower(), str(dev))


@lru_cache(maxsize=8)
def _cached(name: str, conf: StrictConf | None, local_method: str, device: str) -> Matcher:
    import torch  # here, not at the top: the plan names load without torch

    return matcher_class(name)(conf, local_method, torch.device(device))


__all__ = [
    "AUTO",
    "AUTO_PLAN",
    "MATCHERS",
    "PLANS",
    "TWO_STAGE",
    "check_plan",
    "load_matcher",
    "matcher_class",
    "resolve_plan",
    "stages",
]
