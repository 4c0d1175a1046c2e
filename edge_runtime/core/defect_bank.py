"""The labelled defects' own patch features: the distance map raised where a block looks like a known defect.

Why: labels reach the Swin, but the fused map is mostly the nearest-normal distance (the fast profile's 0.7), so
ten masked defects used to move pixel AP by 2 to 3 points at most.  A bank of the labelled defect blocks' features
(PCFs, the full feature space the distance is taken in) lets the distance branch learn from them too: a block
nearer a known defect patch than its nearest normal patch has its distance multiplied by

    1 + boost x min(max(d_normal / d_defect - 1, 0), cap - 1)

Every block that looks less like a labelled defect than like a normal patch keeps its distance, so a defect of a
kind no label showed is scored as before.  Only the map is raised: a verdict taken on the distance (the
profiles' ``reference_standardised``) stays on the plain one.  (MTD, ten masked defects, boost 1, cap 2: pixel AP
0.406 / 0.419 / 0.442 against 0.402 / 0.400 / 0.412 at seeds 0 / 1 / 2 in the fast profile;
docs/sweeps/defect_bank.md.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .matching import QUERY_CHUNK, SERIAL, SearchThreads, augmented_projection, augmented_query

#: (M, d_f) patch features -> (M,) each one's best q.b - |b|^2 / 2 over the bank's blocks b: the nearest block's
#: score, from which :meth:`DefectBank.nearest_distance` takes the distance.  :class:`NumpyBankSearch` is the
#: reference; an OpenVINO engine brings its own (``engines.OpenVinoBankSearch``: numpy keeps one BLAS thread
#: beside OpenVINO's pool, and this product is the bank stage's whole work)
BankSearch = Callable[[np.ndarray], np.ndarray]


def raised(ratio: np.ndarray, boost: float, cap: float) -> np.ndarray:
    """The factor on a block's distance from d_normal / d_defect: 1 + boost x min(max(ratio - 1, 0), cap - 1)."""
    return (1.0 + boost * np.clip(ratio - 1.0, 0.0, cap - 1.0)).astype(np.float32)


class NumpyBankSearch:
    """The bank's search on the host: the augmented product in blocks of queries and its maximum (numpy BLAS), the
    blocks shared by ``threads``.

    The blocks (n, d_f) are kept as rows [b, -|b|^2 / 2] (``matching.augmented_projection``), so one product per
    chunk gives q.b - |b|^2 / 2, whose maximum is the nearest block (the matcher's form; half the time of |q|^2 -
    2 q.b + |b|^2 here: 1.4 against 3.0 ms for 1 049 blocks)."""

    def __init__(self, features: np.ndarray, threads: SearchThreads = SERIAL) -> None:
        self.augmented = augmented_projection(np.asarray(features, dtype=np.float32))
        self.threads = threads

    def __call__(self, pcf: np.ndarray) -> np.ndarray:
        best = np.empty(len(pcf), np.float32)

        def block(lo: int, hi: int) -> None:
            best[lo:hi] = (augmented_query(np, pcf[lo:hi]) @ self.augmented.T).max(axis=1)

        self.threads.run(block, len(pcf), QUERY_CHUNK)
        return best


class DefectBank:
    """Labelled defect blocks' features (n, d_f) and how far a block near one is raised (``boost``, ``cap``);
    ``search``: an engine's own search over them (None: numpy's)."""

    def __init__(self, features: np.ndarray, boost: float, cap: float, search: BankSearch | None = None) -> None:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or not len(features):
            raise ValueError(f"a defect bank needs (n >= 1, d_f) features, got shape {list(features.shape)}")
        if not np.isfinite(features).all():
            raise ValueError("a defect bank's features must be finite")
        if boost <= 0 or cap <= 1:
            raise ValueError(f"a defect bank needs boost > 0 and cap > 1, got boost {boost}, cap {cap}")
        self.features = features
        self.boost = float(boost)
        self.cap = float(cap)
        self.search: BankSearch = search or NumpyBankSearch(features)

    @property
    def d_f(self) -> int:
        return self.features.shape[1]

    def nearest_distance(self, pcf: np.ndarray) -> np.ndarray:
        """(M,) each patch's Euclidean distance to its nearest defect block."""
        pcf = np.asarray(pcf, dtype=np.float32)
        if pcf.ndim != 2 or pcf.shape[1] != self.d_f:
            raise ValueError(f"patch features are {list(pcf.shape)}, the defect bank has {self.d_f} channels")
        best = np.asarray(self.search(pcf), np.float32)
        return np.sqrt(np.maximum(np.einsum("md,md->m", pcf, pcf) - 2.0 * best, 0.0))

    def factor(self, pcf: np.ndarray, distance: np.ndarray) -> np.ndarray:
        """(M,) float32 the factor on each block's nearest-normal ``distance``: 1 where no defect block is nearer."""
        ratio = np.asarray(distance, np.float32) / np.maximum(self.nearest_distance(pcf), 1e-6)
        return raised(ratio, self.boost, self.cap)
