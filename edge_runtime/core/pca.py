"""PCA used only to make the nearest-patch search cheap (paper step 4: gamma = W (p - mu))."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PCA:
    """components: (d_l, d_f) rows are principal axes; mean: (d_f,)."""

    components: np.ndarray
    mean: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> PCA:
        """The fitted projection a bundle stores (its ``pca_components`` and ``pca_mean`` arrays)."""
        return cls(components=arrays["pca_components"], mean=arrays["pca_mean"])

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project (n, d_f) features to (n, d_l) float32."""
        return (np.asarray(x, dtype=np.float32) - self.mean) @ self.components.T


def fit_pca(x: np.ndarray, n_components: int | None = None, variance: float = 0.95) -> PCA:
    """Fit on (n, d_f) samples; keep ``n_components`` axes, or enough to explain ``variance``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs a (n >= 2, d) matrix, got shape {x.shape}")
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    if n_components is None:
        explained = np.cumsum(eigval) / max(eigval.sum(), 1e-12)
        n_components = int(np.searchsorted(explained, variance) + 1)
    n_components = int(min(max(n_components, 1), x.shape[1]))
    return PCA(components=eigvec[:, :n_components].T.astype(np.float32), mean=mean.astype(np.float32))
