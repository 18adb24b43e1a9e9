"""Recent searches, kept so that their match pictures can be drawn later.

Each search leaves one file `<scratch>/<search id>.npz`: the uploaded bytes, the query's local
features (when the search reranked) and its search options. Files, not memory, so that every
worker process of `retr serve --workers N` finds a search whichever worker ran it; the newest
`keep` are kept. Search ids are random (uuid4 hex): one client cannot list another's queries.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.types import LocalFeatures
from retrieval.search import SearchConf

SEARCH_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class RecentSearch:
    image: bytes
    """The uploaded file, as sent."""
    features: LocalFeatures | None
    conf: SearchConf
    matchers: dict[int, str]
    """Result id -> the matcher that scored it (retrieval.search.Match.matcher)."""


class RecentSearches:
    def __init__(self, folder: Path, keep: int) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(
        self,
        image: bytes,
        features: LocalFeatures | None,
        conf: SearchConf,
        matchers: dict[int, str],
    ) -> str:
        """Keep one search; returns its id."""
        search_id = uuid.uuid4().hex
        arrays: dict[str, np.ndarray] = {
            "image": np.frombuffer(image, np.uint8),
            "conf": np.array(conf.model_dump_json()),
            "matchers": np.array(json.dumps(matchers)),
        }
        if features is not None:
            arrays.update(
                keypoints=features.keypoints,
                scores=features.scores,
                descriptors=features.descriptors,
                image_size=np.asarray(features.image_size, np.int64),
            )
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        part = self.folder / f"{search_id}.part"  # scratch: renamed whole, never fsynced
        part.write_bytes(buf.getvalue())
        os.replace(part, self.folder / f"{search_id}.npz")
        self._prune()
        return search_id

    def get(self, search_id: str) -> RecentSearch | None:
        """The search `search_id`, or None when unknown or no longer kept."""
        if not SEARCH_ID.match(search_id):
            return None
        try:
            with np.load(self.folder / f"{search_id}.npz") as data:
                features = None
                if "keypoints" in data:
                    w, h = (int(v) for v in data["image_size"])
                    features = LocalFeatures(
                        data["keypoints"], data["scores"], data["descriptors"], (w, h)
                    )
                conf = SearchConf.model_validate_json(str(data["conf"]))
                matchers = {int(k): v for k, v in json.loads(str(data["matchers"])).items()}
                return RecentSearch(data["image"].tobytes(), features, conf, matchers)
        except FileNotFoundError:
            return None

    def _prune(self) -> None:
        entries = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".npz"):
                try:
                    entries.append((entry.stat().st_mtime_ns, entry.path))
                except FileNotFoundError:  # pruned by another worker
                    continue
        entries.sort()
        for _, path in entries[: max(0, len(entries) - self.keep)]:
            Path(path).unlink(missing_ok=True)
