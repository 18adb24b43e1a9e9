"""What an index directory holds, and the configuration that built it (`retr.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import field_validator

from features.core import IndexError_, StrictConf
from features.registry import DEFAULT_GLOBAL, DEFAULT_LOCAL
from index.store import check_local_dtype

CONFIG_NAME = "retr.json"


class IndexConfig(StrictConf):
    """Everything that decides what an index contains. Written once, at the first build."""

    version: int = 1
    global_model: str = DEFAULT_GLOBAL
    global_conf: dict[str, Any] = {}
    local_method: str = DEFAULT_LOCAL
    local_conf: dict[str, Any] = {}
    whitening_shrinkage: float = 0.9
    """Eigenvalue shrinkage of the corpus PCA whitening (0 = plain whitening, 1 = none)."""
    index_type: str = "auto"
    """FAISS factory string of the vector index ("Flat", "HNSW32", "OPQ64_256,IVF4096,PQ64"...),
    or "auto": chosen by corpus size at each build (index.vectors.choose_factory)."""
    local_dtype: str = "float16"
    """Encoding of local descriptors in the feature store: float16, float32, int8, pq or pq<M>
    (index.store)."""
    db_url: str | None = None
    """SQLAlchemy URL of the catalog; None = catalog.sqlite inside the index directory."""
    corpus: str | None = None

    @field_validator("local_dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return check_local_dtype(value)


class IndexPaths:
    """The files of one index directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / CONFIG_NAME
        self.catalog = self.root / "catalog.sqlite"
        self.global_store = self.root / "global.h5"
        self.local_store = self.root / "local.h5"
        self.vectors = self.root / "vectors.faiss"
        self.whitening = self.root / "whitening.npz"

    def db_url(self, config: IndexConfig) -> str:
        return config.db_url or f"sqlite:///{self.catalog.resolve()}"

    def exists(self) -> bool:
        return self.config.is_file()

    def read_config(self) -> IndexConfig:
        if not self.exists():
            raise IndexError_(
                f"{self.root} is not a retr index (no {CONFIG_NAME}); "
                f"build one with `retr index build CORPUS --index {self.root}`"
            )
        return IndexConfig.model_validate(json.loads(self.config.read_text()))

    def write_config(self, config: IndexConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(config.model_dump(), indent=2, sort_keys=True))
        os.replace(tmp, self.config)

    def sizes(self) -> dict[str, int]:
        """Bytes on disk of each file of the index (files that exist)."""
        files = [self.config, self.catalog, self.global_store, self.local_store]
        files += [self.vectors, self.whitening]
        return {f.name: f.stat().st_size for f in files if f.is_file()}
