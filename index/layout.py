"""What an index directory holds, and the configuration that built it (`retr.json`).

retr.json            IndexConfig, written at the first build (a copy lives in the manifest)
manifest.json        the commit record: live segments, whitening, vectors (index.manifest)
segments/seg-*.h5    immutable feature segments (index.segments)
whitening-<g>.npz    PCA whitening of generation g (index.whitening)
vectors-<g>.faiss    FAISS index of generation g (index.vectors), unless the vectors live in
                     Milvus (vector_store, index.vector_backends)
codec-<g>.npy        product quantiser of a "pq" local store (index.encoding)
catalog.sqlite       the catalog, unless `db_url` names another database (index.catalog)
write.lock           the writer's lock (index.lock)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError, ValidationInfo, field_validator, model_validator

from features.core import ConfigError, IndexError_, StrictConf, parse_conf, validation_message
from features.matcher_names import check_plan
from features.registry import (
    DEFAULT_GLOBAL,
    DEFAULT_LOCAL,
    check_confs,
    check_global_name,
    check_local_name,
)
from index.atomic import write_bytes_atomic
from index.encoding import check_local_dtype
from index.lock import LOCK_NAME
from index.manifest import MANIFEST_NAME
from index.segments import SEGMENTS_DIR

CONFIG_NAME = "retr.json"
STORED = "stored"
"""Validation context key of a config read back from an index (parse_config)."""


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
    (index.encoding)."""
    db_url: str | None = None
    """SQLAlchemy URL of the catalog; None = catalog.sqlite inside the index directory."""
    vector_store: str | None = None
    """Where the vectors live: None = FAISS files in the index directory, or
    milvus://HOST:PORT/COLLECTION, milvus-lite://PATH.db/COLLECTION (index.vector_backends);
    with Milvus, index_type is a Milvus index type (FLAT, HNSW, IVF_FLAT, IVF_SQ8, IVF_PQ)."""
    matcher: str = "auto"
    """Matcher of the rerank: auto (measured best for the device), mnn, lightglue or
    mnn+lightglue (retrieval.matchers); a query may override it."""
    corpus: str | None = None

    @field_validator("local_dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return check_local_dtype(value)

    @field_validator("vector_store")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        from index.vector_backends import check_vector_store

        return check_vector_store(value)

    @field_validator("matcher")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @field_validator("whitening_shrinkage")
    @classmethod
    def _unit_interval(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be between 0 and 1")
        return value

    @model_validator(mode="after")
    def _known_plugins(self, info: ValidationInfo) -> IndexConfig:
        """Plug-in names and their config keys are checked here, at the boundary, not when a
        network is first built. A config read back from an index (`parse_config`) was checked
        so when it was written: its names are checked again, but its plug-in keys only when a
        plug-in is built, so that reading an index (`retr index info`, `check`...) loads no
        network."""
        if (info.context or {}).get(STORED):
            check_global_name(self.global_model)
            check_local_name(self.local_method)
        else:
            check_confs(self.global_model, self.global_conf, self.local_method, self.local_conf)
        check_plan(self.matcher, self.local_method)
        return self

    @classmethod
    def parse(cls, values: dict[str, Any], what: str = "index options") -> IndexConfig:
        """Validated config; a bad key or value is one ConfigError line. Which fields were
        given is kept (`model_fields_set`): `settle_config` compares only those."""
        return parse_conf(cls, values, what)


REBUILT = {"index_type", "vector_store"}
"""Options a later build may change: what they decide is rebuilt from the stores every time."""


def settle_config(
    existing: IndexConfig | None, requested: IndexConfig | None, corpus: str | None = None
) -> IndexConfig:
    """The config an index is (re)built with: a new index takes `requested` (with `corpus`);
    an existing one keeps its own, and requested options that contradict it are an error,
    except those in REBUILT, which win."""
    requested = requested or IndexConfig()
    given = requested.model_fields_set - {"corpus"}
    if existing is None:
        return requested.model_copy(update={"corpus": corpus or requested.corpus})
    diff = sorted(
        k for k in given if getattr(requested, k) != getattr(existing, k) and k not in REBUILT
    )
    if diff:
        raise ConfigError(
            f"the index was built with other settings ({', '.join(diff)} differ); use a new "
            "--index directory, or drop those options to reuse its settings"
        )
    rebuilt = {k: getattr(requested, k) for k in given & REBUILT}
    return existing.model_copy(update=rebuilt) if rebuilt else existing


class IndexPaths:
    """The files of one index directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / CONFIG_NAME
        self.manifest = self.root / MANIFEST_NAME
        self.segments = self.root / SEGMENTS_DIR
        self.catalog = self.root / "catalog.sqlite"
        self.lock = self.root / LOCK_NAME

    def db_url(self, config: IndexConfig) -> str:
        return config.db_url or f"sqlite:///{self.catalog.resolve()}"

    def exists(self) -> bool:
        """Whether the directory holds an index (its config, or a manifest to restore it from)."""
        return self.config.is_file() or self.manifest.is_file()

    def repair_hint(self) -> str:
        return f"run `retr index repair --index {self.root}`"

    def read_config(self) -> IndexConfig:
        if not self.exists():
            raise IndexError_(
                f"{self.root} is not a retr index (no {CONFIG_NAME}); "
                f"build one with `retr index build CORPUS --index {self.root}`"
            )
        try:
            return parse_config(json.loads(self.config.read_bytes()))
        except (OSError, ValueError, ValidationError) as exc:
            detail = validation_message(exc) if isinstance(exc, ValidationError) else exc
            raise IndexError_(
                f"index config {self.config} is damaged ({str(detail)[:160]}); {self.repair_hint()}"
            ) from None

    def write_config(self, config: IndexConfig) -> None:
        blob = json.dumps(config.model_dump(), indent=2, sort_keys=True)
        write_bytes_atomic(self.config, blob.encode())


def parse_config(data: Any) -> IndexConfig:
    """The config an index recorded (retr.json, the manifest's copy)."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return IndexConfig.model_validate(data, context={STORED: True})
