"""Encodings of local descriptors in the feature store (`IndexConfig.local_dtype`).

    float16 (default)  D * 2 bytes per descriptor
    float32            D * 4
    int8               D bytes: each descriptor scaled by its own max |value| to [-127, 127]; the
                       scale is not stored because decoding re-normalises to unit length anyway
    pq, pq<M>          M bytes: a product quantiser (M sub-vectors of D/M dims, 256 centroids
                       each; "pq" = D/4 sub-vectors) trained with FAISS on the corpus descriptors;
                       codes are decoded at query time to the nearest centroids and re-normalised

A product quantiser needs the corpus before it can encode: until one is trained (when a build
publishes), segments hold float16 descriptors, and the publish re-encodes them.
"""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.core import ConfigError, IndexError_

LOCAL_DTYPES = ("float16", "float32", "int8", "pq")
PQ_BITS = 8
PQ_MIN_TRAIN = 1 << PQ_BITS
"""Fewest descriptors a product quantiser can be trained on (one per centroid)."""
PQ_MAX_TRAIN = 65_536
"""Training sample size (FAISS wants >= 39 per centroid, 9984; more adds little)."""


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
    peak = np.abs(desc).max(axis=1, keepdims=True) if len(desc) else np.ones((0, 1))
    return np.rint(desc / np.maximum(peak, 1e-12) * 127).astype(np.int8)


def unit_rows(x: np.ndarray) -> np.ndarray:
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

        m = self.centroids.shape[0]
        if len(desc) == 0:
            return np.zeros((0, m), np.uint8)
        pq = faiss.ProductQuantizer(self.dim, m, PQ_BITS)
        faiss.copy_array_to_vector(self.centroids.ravel(), pq.centroids)
        codes = pq.compute_codes(np.ascontiguousarray(desc, dtype=np.float32))
        return np.asarray(codes, dtype=np.uint8).reshape(len(desc), m)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, M) uint8 -> (N, D) float32 unit rows."""
        m = self.centroids.shape[0]
        parts = self.centroids[np.arange(m), codes.astype(np.intp)]  # (N, M, D/M)
        return unit_rows(parts.reshape(len(codes), self.dim))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.save(buf, self.centroids, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def load(cls, path: Path) -> ProductQuantizer:
        try:
            return cls(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise IndexError_(f"product quantiser {path} is unreadable ({exc})") from None


def encoding_of(dtype: str, pq: ProductQuantizer | None) -> str:
    """What a new segment stores for `dtype`: a PQ store without a quantiser yet waits as
    float16."""
    if dtype.startswith("pq"):
        return "pq" if pq is not None else "float16"
    return dtype


def encode(desc: np.ndarray, encoding: str, pq: ProductQuantizer | None) -> np.ndarray:
    """(N, D) float32 unit rows -> the stored array of `encoding` (see encoding_of)."""
    if encoding == "int8":
        return encode_int8(desc)
    if encoding == "pq":
        assert pq is not None
        return pq.encode(desc)
    if encoding == "float32":
        return desc.astype(np.float32)
    return desc.astype(np.float16)


def decode(stored: np.ndarray, encoding: str, pq: ProductQuantizer | None) -> np.ndarray:
    """The stored array of `encoding` -> (N, D) float32 unit rows."""
    if encoding == "pq":
        if pq is None:
            raise IndexError_("PQ codes without a trained quantiser; run `retr index repair`")
        return pq.decode(stored)
    if encoding == "int8":
        return unit_rows(stored.astype(np.float32))
    torch = sys.modules.get("torch")
    if stored.dtype == np.float16 and torch is not None:
        # torch converts float16 ~10x faster than numpy (the same exact values); searches have
        # it loaded, and the maintenance commands, which never load it, convert with numpy
        return torch.from_numpy(np.ascontiguousarray(stored)).float().numpy()
    return np.asarray(stored, np.float32)


def training_sample(chunks: list[np.ndarray]) -> np.ndarray:
    """Up to PQ_MAX_TRAIN descriptors drawn evenly (fixed seed) from (N_i, D) chunks."""
    total = sum(len(c) for c in chunks)
    keep = min(1.0, PQ_MAX_TRAIN / max(total, 1))
    rng = np.random.default_rng(0)
    parts = []
    for c in chunks:
        x = np.asarray(c, np.float32)
        if keep < 1.0:
            x = x[rng.random(len(x)) < keep]
        parts.append(x)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
