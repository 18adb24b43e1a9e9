"""HDF5 feature store: arrays keyed by catalog id, for one extractor configuration.

The file records its schema version, what it holds (`kind`), and the fingerprint of the extractor
configuration that wrote it; opening it with another fingerprint raises, so two configurations
never mix in one file. A write that fails half-way deletes its group (nothing half-written stays).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from features.errors import IndexError_, StoreMismatchError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class FeatureStore:
    """Groups `/<id>/<name>` of arrays, plus file attributes describing the configuration."""

    def __init__(
        self,
        path: Path,
        kind: str,
        fingerprint: str,
        config: dict[str, Any] | None = None,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise IndexError_(f"feature store {self.path} is missing; rebuild the index")
        try:
            self.file = h5py.File(self.path, "r" if readonly else "a")
        except OSError as exc:
            raise IndexError_(f"cannot open feature store {self.path}: {exc}") from None
        attrs = self.file.attrs
        if "schema_version" not in attrs and not readonly:
            attrs["schema_version"] = SCHEMA_VERSION
            attrs["kind"] = kind
            attrs["fingerprint"] = fingerprint
            attrs["config"] = json.dumps(config or {}, sort_keys=True)
        self._check(kind, fingerprint)

    def _check(self, kind: str, fingerprint: str) -> None:
        attrs = self.file.attrs
        if int(attrs.get("schema_version", -1)) != SCHEMA_VERSION:
            raise StoreMismatchError(
                f"{self.path}: schema version {attrs.get('schema_version')} is not "
                f"{SCHEMA_VERSION}; rebuild the index"
            )
        if attrs["kind"] != kind or attrs["fingerprint"] != fingerprint:
            raise StoreMismatchError(
                f"{self.path} holds {attrs['kind']} features of configuration "
                f"{attrs['fingerprint']} ({attrs['config']}), not {kind} {fingerprint}; "
                "use another --index directory or delete this one to rebuild"
            )

    @property
    def config(self) -> dict[str, Any]:
        return dict(json.loads(self.file.attrs["config"]))

    def put(self, key: int, attrs: dict[str, Any] | None = None, **arrays: np.ndarray) -> None:
        name = str(key)
        if name in self.file:
            del self.file[name]
        try:
            group = self.file.create_group(name)
            for k, v in arrays.items():
                group.create_dataset(k, data=v)
            for k, v in (attrs or {}).items():
                group.attrs[k] = v
        except BaseException:
            if name in self.file:
                del self.file[name]
            raise

    def get(self, key: int) -> dict[str, np.ndarray]:
        group = self.file[str(key)]
        return {k: group[k][()] for k in group}

    def attrs(self, key: int) -> dict[str, Any]:
        return dict(self.file[str(key)].attrs)

    def delete(self, key: int) -> None:
        if str(key) in self.file:
            del self.file[str(key)]

    def __contains__(self, key: int) -> bool:
        return str(key) in self.file

    def ids(self) -> list[int]:
        return sorted(int(k) for k in self.file)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
