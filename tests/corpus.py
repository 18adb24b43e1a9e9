"""Test corpora assembled at test time from ../shared/data (symlinks, never copies in the repo)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from index.layout import IndexConfig
from tests.conftest import DATA

MINI = DATA / "landmarks-mini"

# Cheap settings for tests only (the defaults stay untouched): small images, few keypoints.
FAST_OPTIONS = {
    "local_conf": {"resize_max": 320, "max_keypoints": 512},
    "global_conf": {"resize_max": 384},
}
TINY_OPTIONS = {
    "local_conf": {"resize_max": 256, "max_keypoints": 128},
    "global_conf": {"resize_max": 256, "scales": [1.0]},
}
"""Cheapest settings: for tests of the index machinery, not of retrieval quality."""


def tiny(**more: object) -> IndexConfig:
    """TINY_OPTIONS (and `more` fields) as an IndexConfig."""
    return IndexConfig.parse({**TINY_OPTIONS, **more})


@dataclass(frozen=True)
class Row:
    path: str
    group: str
    kind: str


def manifest() -> list[Row]:
    with open(MINI / "manifest.csv", newline="") as f:
        return [Row(r["path"], r["group"], r["kind"]) for r in csv.DictReader(f)]


def heldout_queries(rows: list[Row]) -> list[Row]:
    """One query per group of kind `landmark`: the first of the group in manifest order."""
    seen: dict[str, Row] = {}
    for r in rows:
        if r.kind == "landmark" and r.group not in seen:
            seen[r.group] = r
    return list(seen.values())


def make_corpus(root: Path, rows: list[Row]) -> Path:
    """Lay `rows` out as a corpus: labelled images in <group>/, distractors at the top level."""
    root.mkdir(parents=True, exist_ok=True)
    for r in rows:
        name = Path(r.path).name
        dest = root / r.group / name if r.group else root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(MINI / r.path)
    return root
