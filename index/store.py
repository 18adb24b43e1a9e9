"""HDF5 feature stores: arrays keyed by catalog id, for one extractor configuration.

The file records its schema version, what it holds (`kind`), and the fingerprint of the extractor
configuration that wrote it; opening it with another fingerprint raises, so two configurations
never mix in one file. A write that fails half-way deletes its group (nothing half-written stays).

Local descriptors are stored in the encoding `IndexConfig.local_dtype` names (LocalFeatureStore):

    float16 (default)  D * 2 bytes per descriptor
    float32            D * 4
    int8               D bytes: each descriptor scaled by its own max |value| to [-127, 127]; the
                       scale is not stored because decoding re-normalises to unit length anyway
    pq, pq<M>          M bytes: a product quantiser (M sub-vectors of D/M dims, 256 centroids
                       each; "pq" = D/4 sub-vectors) trained with FAISS on the corpus descriptors;
                       its centroids live in the file (group `_codec`), codes are decoded at query
                       time to the nearest centroids and re-normalised

A group is self-describing (`descriptors`, `descriptors_int8` or `descriptors_pq`), so reading
never needs the configuration. A product quantiser needs the corpus before it can encode: until it
is trained (`finalize`, at the end of a build), groups hold float16 descriptors, which `finalize`
then encodes and rewrites the file without them (HDF5 never shrinks a file on its own).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from features.core import ConfigError, IndexError_, StoreMismatchError
from features.types import LocalFeatures
from index.reading import GroupReader

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CODEC_GROUP = "_codec"
LOCAL_DTYPES = ("float16", "float32", "int8", "pq")
PQ_BITS = 8
PQ_MIN_TRAIN = 1 << PQ_BITS
"""Fewest descriptors a product quantiser can be trained on (one per centroid)."""
PQ_MAX_TRAIN = 65_536
"""Training sample size (FAISS wants >= 39 per centroid, 9984; more adds little)."""


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
        self.kind = kind
        self.fingerprint = fingerprint
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise IndexError_(f"feature store {self.path} is missing; rebuild the index")
        self.file = self._open()
        attrs = self.file.attrs
        if "schema_version" not in attrs and not readonly:
            attrs["schema_version"] = SCHEMA_VERSION
            attrs["kind"] = kind
            attrs["fingerprint"] = fingerprint
            attrs["config"] = json.dumps(config or {}, sort_keys=True)
        self._check(kind, fingerprint)

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r" if self.readonly else "a")
        except OSError as exc:
            raise IndexError_(f"cannot open feature store {self.path}: {exc}") from None

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

    @staticmethod
    def open_existing(path: Path, kind: str, readonly: bool = False) -> FeatureStore:
        """Open a store under the configuration it records (e.g. to delete groups without
        loading the extractor that wrote it)."""
        if not Path(path).is_file():
            raise IndexError_(f"feature store {path} is missing; rebuild the index")
        with h5py.File(path, "r") as f:
            fingerprint = str(f.attrs.get("fingerprint", ""))
        return FeatureStore(path, kind, fingerprint, readonly=readonly)

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
        return sorted(int(k) for k in self.file if k.isdigit())

    def flush(self) -> None:
        self.file.flush()

    def repack(self) -> None:
        """Rewrite the file with only its live content (temp file + os.replace)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with h5py.File(tmp, "w") as out:
            out.attrs.update(dict(self.file.attrs))
            for name in self.file:
                self.file.copy(self.file[name], out, name=name)
        self.close()
        os.replace(tmp, self.path)
        self.file = self._open()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- local descriptors -------------------------------------------------------------------------


def check_local_dtype(dtype: str) -> str:
    """`dtype` if it names a local descriptor encoding, else ConfigError listing them."""
    if not re.fullmatch(r"float16|float32|int8|pq\d*", dtype) or dtype == "pq0":
        raise ConfigError(
            f"unknown local_dtype '{dtype}' (available: {', '.join(LOCAL_DTYPES)}, pq<M>)"
        )
    return dtype


def pq_subvectors(dtype: str, dim: int) -> int:
    """M of "pq<M>" ("pq": D/4); D must split into M equal sub-vectors."""
    m = int(dtype[2:]) if len(dtype) > 2 else max(1, dim // 4)
    if dim % m:
        raise ConfigError(f"local_dtype {dtype}: descriptor size {dim} does not split into {m}")
    return m


def encode_int8(desc: np.ndarray) -> np.ndarray:
    """(N, D) float -> (N, D) int8, each row scaled so its largest |value| is 127."""
    peak = np.abs(desc).max(axis=1, keepdims=True)
    return np.rint(desc / np.maximum(peak, 1e-12) * 127).astype(np.int8)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class ProductQuantizer:
    """centroids: (M, 256, D/M) float32, one codebook per sub-vector."""

    centroids: np.ndarray

    @classmethod
    def train(cls, desc: np.ndarray, m: int) -> ProductQuantizer:
        """Learn M codebooks on (N, D) descriptors (N >= 256) with FAISS's k-means."""
        import faiss

        x = np.ascontiguousarray(desc, dtype=np.float32)
        pq = faiss.ProductQuantizer(x.shape[1], m, PQ_BITS)
        pq.cp.seed = 1234
        pq.train(x)
        centroids = faiss.vector_to_array(pq.centroids)
        return cls(centroids.reshape(m, 1 << PQ_BITS, -1).astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[0] * self.centroids.shape[2])

    def encode(self, desc: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, M) uint8 nearest-centroid indices per sub-vector."""
        import faiss

        m, k, _ = self.centroids.shape
        pq = faiss.ProductQuantizer(self.dim, m, PQ_BITS)
        faiss.copy_array_to_vector(self.centroids.ravel(), pq.centroids)
        codes = pq.compute_codes(np.ascontiguousarray(desc, dtype=np.float32))
        return np.asarray(codes, dtype=np.uint8).reshape(len(desc), m)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, M) uint8 -> (N, D) float32 unit rows."""
        m = self.centroids.shape[0]
        parts = self.centroids[np.arange(m), codes.astype(np.intp)]  # (N, M, D/M)
        return _unit_rows(parts.reshape(len(codes), self.dim))


class LocalFeatureStore(FeatureStore):
    """Local features (keypoints, scores, encoded descriptors, image size) by catalog id."""

    def __init__(
        self,
        path: Path,
        fingerprint: str,
        config: dict[str, Any] | None = None,
        readonly: bool = False,
        dtype: str = "float16",
    ) -> None:
        super().__init__(path, "local", fingerprint, config, readonly)
        self.dtype = check_local_dtype(dtype)
        self.pq: ProductQuantizer | None = None
        if CODEC_GROUP in self.file:
            self.pq = ProductQuantizer(self.file[CODEC_GROUP]["pq_centroids"][()])

    def encode(self, desc: np.ndarray) -> dict[str, np.ndarray]:
        """The datasets that hold (N, D) descriptors in this store's encoding."""
        if self.dtype == "int8":
            return {"descriptors_int8": encode_int8(desc)}
        if self.dtype.startswith("pq") and self.pq is not None:
            return {"descriptors_pq": self.pq.encode(desc)}
        if self.dtype == "float32":
            return {"descriptors": desc.astype(np.float32)}
        return {"descriptors": desc.astype(np.float16)}  # also a pq store before training

    def put_features(self, key: int, feats: LocalFeatures) -> None:
        self.put(
            key,
            attrs={"image_size": feats.image_size},
            keypoints=feats.keypoints.astype(np.float32),
            scores=feats.scores.astype(np.float32),
            **self.encode(feats.descriptors),
        )

    def get_features(self, key: int) -> LocalFeatures:
        return self.get_features_many([key])[0]

    def get_features_many(self, keys: Sequence[int]) -> list[LocalFeatures]:
        """Features of every key, in order; descriptors decoded to float32 unit rows."""
        return self._read(keys, self.pq)

    def _read(self, keys: Sequence[int], pq: ProductQuantizer | None) -> list[LocalFeatures]:
        groups = [self._reader.group(k) for k in keys]
        desc = _decode_all([(g.encoding, g.descriptors) for g in groups], pq, self.path)
        return [
            LocalFeatures(
                g.keypoints.astype(np.float32, copy=False),
                g.scores.astype(np.float32, copy=False),
                d,
                _size(g.image_size),
            )
            for g, d in zip(groups, desc, strict=True)
        ]

    @cached_property
    def _reader(self) -> GroupReader:
        return GroupReader(self.file, self.readonly)

    def close(self) -> None:
        if "_reader" in self.__dict__:
            self.__dict__.pop("_reader").close()
        super().close()

    def recode(self, dtype: str) -> None:
        """Re-encode every group as `dtype` (a PQ one retrains its quantiser) and rewrite the
        file. Decoding first means an encoding never improves on the one it replaces."""
        self.dtype = check_local_dtype(dtype)
        old, self.pq = self.pq, None  # new PQ codes wait, as float16, for a new quantiser
        for i in self.ids():
            self.put_features(i, self._read([i], old)[0])
        if CODEC_GROUP in self.file:
            del self.file[CODEC_GROUP]
        if not self.finalize():
            self.repack()

    def finalize(self) -> bool:
        """For a PQ store: train the quantiser once the corpus is large enough, then encode the
        groups still holding float16 descriptors and rewrite the file without them. Returns
        whether the file was rewritten."""
        if not self.dtype.startswith("pq"):
            return False
        pending = [i for i in self.ids() if "descriptors" in self.file[str(i)]]
        if not pending:
            return False
        if self.pq is None:
            self.pq = self._train_pq(pending)
            if self.pq is None:
                return False
        for i in pending:
            group = self.file[str(i)]
            codes = self.pq.encode(group["descriptors"][()].astype(np.float32))
            group.create_dataset("descriptors_pq", data=codes)
            del group["descriptors"]
        self.repack()
        return True

    def _train_pq(self, ids: list[int]) -> ProductQuantizer | None:
        sample = _training_sample([self.file[str(i)]["descriptors"] for i in ids])
        if len(sample) < PQ_MIN_TRAIN:
            logger.warning(
                "%s: %d descriptors are too few to train a product quantiser; keeping float16 "
                "until the corpus grows",
                self.path,
                len(sample),
            )
            return None
        m = pq_subvectors(self.dtype, sample.shape[1])
        pq = ProductQuantizer.train(sample, m)
        codec = self.file.require_group(CODEC_GROUP)
        codec.create_dataset("pq_centroids", data=pq.centroids)
        logger.info("trained a %d-byte product quantiser on %d descriptors", m, len(sample))
        return pq


def _decode_all(
    data: list[tuple[str, np.ndarray]], pq: ProductQuantizer | None, path: Path
) -> list[np.ndarray]:
    """(dataset name, stored array) per group -> (N, D) float32; the PQ codes of all groups
    go through one gather."""
    decoded: dict[int, np.ndarray] = {}
    pq_rows = [i for i, (kind, _) in enumerate(data) if kind == "descriptors_pq"]
    if pq_rows:
        if pq is None:
            raise IndexError_(f"{path}: PQ codes without a trained quantiser")
        flat = pq.decode(np.concatenate([data[i][1] for i in pq_rows]))
        splits = np.cumsum([len(data[i][1]) for i in pq_rows])[:-1]
        decoded = dict(zip(pq_rows, np.split(flat, splits), strict=True))
    for i, (kind, arr) in enumerate(data):
        if kind == "descriptors_int8":
            decoded[i] = _unit_rows(arr.astype(np.float32))
        elif kind == "descriptors":  # torch converts float16 ~10x faster than numpy
            decoded[i] = torch.from_numpy(arr).float().numpy()
    return [decoded[i] for i in range(len(data))]


def _size(value: Any) -> tuple[int, int]:
    return int(value[0]), int(value[1])


def _training_sample(datasets: list[h5py.Dataset]) -> np.ndarray:
    """Up to PQ_MAX_TRAIN descriptors drawn evenly (fixed seed) from every image."""
    total = sum(len(d) for d in datasets)
    keep = min(1.0, PQ_MAX_TRAIN / max(total, 1))
    rng = np.random.default_rng(0)
    parts = []
    for d in datasets:
        x = d[()].astype(np.float32)
        if keep < 1.0:
            x = x[rng.random(len(x)) < keep]
        parts.append(x)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
