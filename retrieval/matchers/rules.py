"""Verification rules: how each matcher's matches verify a query-candidate pair.

A rule is one object per matcher, or per matcher x local method where the measured rule
differs: the matcher's own settings (fields of its `Conf`, e.g. LightGlue's match-confidence
filter and keypoints), the RANSAC model and threshold, and the fewest inliers of a verified pair.
`RULES` is the one table of measured rules; the rerank, `auto` and
`scripts/bench_verification.py` read it, and a search may override any part of a rule
(`RerankConf.rules`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from features.core import StrictConf, parse_conf
from retrieval.verification import RansacConf

ANY_METHOD = "*"


class Rule(StrictConf):
    """One matcher's verification rule. A field left None takes the table's value (`RULES`),
    so an override names only what it changes."""

    settings: dict[str, Any] | None = None
    """The matcher's own settings (fields of its Conf), merged over the table's."""
    ransac: RansacConf | None = None
    """RANSAC on the matcher's matches."""
    min_inliers: int | None = Field(default=None, ge=1)
    """Fewest RANSAC inliers of a verified pair."""

    def over(self, base: Rule) -> Rule:
        """This rule's fields where set, `base`'s elsewhere (settings merged key by key)."""
        return Rule(
            settings={**(base.settings or {}), **(self.settings or {})},
            ransac=self.ransac or base.ransac,
            min_inliers=self.min_inliers or base.min_inliers,
        )


RULES: dict[tuple[str, str], Rule] = {
    ("mnn", ANY_METHOD): Rule(settings={"ratio": None}, ransac=RansacConf(), min_inliers=12),
    ("lightglue", "disk"): Rule(
        settings={"max_keypoints": 1024, "filter_threshold": 0.7},
        ransac=RansacConf(model="fundamental", threshold=4.0),
        min_inliers=13,
    ),
    ("mnn", "xfeat"): Rule(
        settings={"ratio": None},
        ransac=RansacConf(model="fundamental", threshold=8.0),
        min_inliers=100,
    ),
    ("lightglue", "xfeat"): Rule(
        settings={"max_keypoints": 1024, "filter_threshold": 0.3},
        ransac=RansacConf(model="fundamental", threshold=4.0),
        min_inliers=16,
    ),
    ("mnn", "aliked"): Rule(
        settings={"ratio": None},
        ransac=RansacConf(model="fundamental", threshold=4.0),
        min_inliers=69,
    ),
    ("lightglue", "aliked"): Rule(
        settings={"max_keypoints": 1024, "filter_threshold": 0.5},
        ransac=RansacConf(model="fundamental", threshold=8.0),
        min_inliers=11,
    ),
}
"""Measured rules (scripts/bench_verification.py on 668 positive and 668 negative pairs of
../shared/data; docs/results.md, "Learned matching"):

- mnn, any method: homography, 8 px, >= 12 inliers, as published: 0.1% false positives, 54%
  true positives with DISK (a fundamental matrix with >= 38 would verify 65% at 0.7%, kept as an
  option so that `mnn` keeps its results).
- lightglue on DISK: confidence filter 0.7 (LightGlueConf's 0.1 is the official default, kept
  for parity), all 1024 stored keypoints, fundamental matrix at 4 px, >= 13 inliers: the best
  true-positive rate at <= 1% false positives of a 60-rule grid (0.3% false positives, 67% true
  positives; 10 would verify 72% at 0.9% with the same leave-one-out ranking). A lower filter
  lets unrelated pairs reach up to 100 inliers; a homography loses the wide-baseline pairs whose
  scene is not a plane.
- mnn on XFeat (1024 keypoints at 640 px): the published homography rule does not carry over
  (at 8 px and >= 12 inliers it verifies 16% of the negatives: XFeat's 64-D mutual matches are
  noisier); the best at <= 1% false positives of the 4-rule grid (homography / fundamental x
  4 / 8 px; 12 px, measured once, was no better) is a fundamental matrix at 8 px with >= 100
  inliers: 0.7% false positives, 51% true positives (homography at 8 px needs >= 24: 42%).
- lightglue on XFeat (LighterGlue, its official depth / width defaults): confidence filter
  0.3, all 1024 stored keypoints, fundamental matrix at 4 px, >= 16 inliers: the best of a
  20-rule grid (filters 0.1-0.7 x homography / fundamental x 4 / 8 px): 0.7% false positives,
  68% true positives (landmark 92%, place 59%, planar 62%, wxbs 50%). Filter 0.1 at 8 px with
  >= 44 is as good (68%, 0.9%); filters 0.5 and 0.7 verify at most 66%, some of their
  operating points at a single inlier, which no rule should trust.
- ALIKED-n16 (its defaults: 640 px, 1024 keypoints; `bench_verification.py --method aliked
  --lightglue-keypoints 1024`, the same pairs and 36-rule grid per matcher). Its mutual NN
  matches are denser than DISK's on unrelated pairs: the ANY_METHOD rule (homography 8 px, >= 12)
  would verify 11.7% of the negatives (71% of the positives). mnn on ALIKED: fundamental matrix
  at 4 px, >= 69 inliers: 61% true positives at 0.9% false positives (homography 8 px needs
  >= 24: 55% at 0.7%). lightglue on ALIKED: confidence filter 0.5, all 1024 keypoints,
  fundamental matrix at 8 px, >= 11 inliers: 77% true positives at 0.9% false positives (96%
  landmark, 68% place, 72% planar, 69% wxbs); >= 15 would verify 74% at 0.3%, and filter 0.7
  at 4 px with >= 12 verifies 71% at 0.0%.

A matcher x method without its own row takes the matcher's ANY_METHOD row, else the row of the
method the matcher was first measured on (lightglue: DISK's) until its own is measured.
"""

FIRST_MEASURED = {"lightglue": "disk"}


def base_rule(matcher: str, local_method: str) -> Rule:
    """The table's rule for `matcher` on `local_method`'s features."""
    key = matcher.lower()
    for method in (local_method.lower(), ANY_METHOD, FIRST_MEASURED.get(key, "")):
        if (key, method) in RULES:
            return RULES[key, method]
    return Rule(settings={}, ransac=RansacConf(), min_inliers=12)


def rule_for(matcher: str, local_method: str, override: Rule | None = None) -> Rule:
    """The complete rule a rerank applies: the table's, with `override`'s fields on top."""
    base = base_rule(matcher, local_method)
    return override.over(base) if override is not None else base


def matcher_settings(matcher: str, rule: Rule) -> StrictConf:
    """The rule's settings as the matcher's typed Conf (a bad key is one ConfigError line)."""
    from retrieval.matchers.registry import matcher_class

    cls = matcher_class(matcher)
    return parse_conf(cls.Conf, dict(rule.settings or {}), f"matcher '{matcher}' settings")
