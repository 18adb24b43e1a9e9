"""Matchers: a query's and a candidate's local features in, index pairs with a confidence out.

One file per matcher on one small base (`base.Matcher`); `registry` maps names to classes and
turns a `matcher` option ("auto", "mnn", "lightglue", "mnn+lightglue") into the plan a rerank
runs.

- `mnn`: mutual nearest neighbours (optional ratio test), any local method.
- `lightglue`: LightGlue (ICCV 2023) with the official weights of the local method (DISK).
"""

from retrieval.matchers.base import Matcher, Matches
from retrieval.matchers.registry import (
    AUTO,
    MATCHERS,
    PLANS,
    TWO_STAGE,
    check_plan,
    load_matcher,
    matcher_class,
    resolve_plan,
    stages,
)

__all__ = [
    "AUTO",
    "MATCHERS",
    "PLANS",
    "TWO_STAGE",
    "Matcher",
    "Matches",
    "check_plan",
    "load_matcher",
    "matcher_class",
    "resolve_plan",
    "stages",
]
