"""PCA whitening learned on the corpus's global descriptors, with eigenvalue shrinkage.

Plain PCA whitening divides every principal direction by its standard deviation, which blows up
the noisy low-variance directions when the corpus is small. Shrinkage pulls the covariance toward
a multiple of the identity first (Ledoit-Wolf style):

    cov' = (1 - shrinkage) * cov + shrinkage * (trace(cov) / D) * I

shrinkage = 0 is plain whitening, 1 is centring only. The whitened descriptor is re-normalised.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.core import IndexError_
from index.atomic import write_atomic


@dataclass(frozen=True)
class Whitening:
    """y = normalise(P @ (x - mean)); P is (D_out, D), mean is (D,)."""

    mean: np.ndarray
    projection: np.ndarray
    shrinkage: float

    @classmethod
    def identity(cls, dim: int) -> Whitening:
        return cls(np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32), 1.0)

    @classmethod
    def fit(cls, x: np.ndarray, shrinkage: float = 0.5, dim: int | None = None) -> Whitening:
        """Learn from (N, D) descriptors. With fewer than 2 of them, return the identity."""
        n, d = x.shape
        if n < 2:
            return cls.identity(d)
        x64 = x.astype(np.float64)
        mean = x64.mean(0)
        centred = x64 - mean
        cov = centred.T @ centred / (n - 1)
        cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1][: dim or d]
        scale = 1.0 / np.sqrt(np.maximum(eigval[order], 1e-12))
        proj = (eigvec[:, order] * scale).T
        return cls(mean.astype(np.float32), proj.astype(np.float32), shrinkage)

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, D) or (D,) -> whitened, L2-normalised float32 of the same rank."""
        single = x.ndim == 1
        y = (np.atleast_2d(x).astype(np.float32) - self.mean) @ self.projection.T
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y[0] if single else y

    def save(self, path: Path) -> None:
        """Write as `path` (npz; temp file, fsync, rename)."""

        def fill(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, projection=self.projection, shrinkage=self.shrinkage)

        write_atomic(path, fill)

    @classmethod
    def load(cls, path: Path) -> Whitening:
        """Read a saved whitening; a missing or damaged file is one IndexError_ naming it."""
        try:
            with np.load(path, allow_pickle=False) as z:
                out = cls(z["mean"], z["projection"], float(z["shrinkage"]))
        except FileNotFoundError:
            raise IndexError_(
                f"whitening {path} is missing; run `retr index repair --index {path.parent}`"
            ) from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            # numpy's text for a file that is not an archive suggests an unsafe pickle load
            why = "not a whitening archive" if "pickle" in str(exc) else str(exc)[:100]
            raise IndexError_(
                f"whitening {path} is damaged ({why or type(exc).__name__}); run "
                f"`retr index repair --index {path.parent}`"
            ) from None
        if out.projection.ndim != 2 or out.mean.shape != (out.projection.shape[1],):
            raise IndexError_(
                f"whitening {path} is damaged (shapes {out.mean.shape}, "
                f"{out.projection.shape}); run `retr index repair --index {path.parent}`"
            )
        return out
