"""Retrieval, matching and the PosFAR residual on one array module: numpy on the host or CuPy on a GPU.

The same code runs on both, so the GPU path's math is checked on a CPU-only machine by running it with numpy
against :class:`~edge_runtime.core.matching.MemoryBank` and :class:`~edge_runtime.core.retrieval.ReferenceIndex`
(tests/test_device.py): both run the same formulas (``matching.nearest_candidates``,
``retrieval.trimmed_distances``).  Every shape here is static for a given bundle: the K retrieved images' bank rows are
gathered through a padded (n_images, max_rows) table (the per-image coreset gives every image the same number of
rows, so there is no padding in practice), which is what keeps the search free of host round trips: the test
image's features come in as device arrays and the residual leaves as one, ready for the Swin.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .matching import QUERY_CHUNK, MemoryBank, augmented_query, nearest_candidates
from .retrieval import ReferenceIndex, trimmed_distances

Array = Any  # numpy.ndarray or cupy.ndarray: whichever module the matcher was built on


@dataclass(frozen=True)
class DeviceMatch:
    """One image's matching on the matcher's array module (nothing has left the device)."""

    references: Array  # (K,) int64, the retrieved training images, closest first
    bank_rows: Array  # (M,) int64, the nearest bank entry of each test patch
    distance: Array  # (M,) float32, full-space distance to it
    residual: Array  # (M, d_f) float32, the PosFAR residual field (the Swin's input)


class DeviceMatcher:
    """The bank, its PCA projection and the reference descriptors held on ``xp``'s device.

    ``xp`` is ``numpy`` or ``cupy``; arrays are uploaded once here and stay there for every frame."""

    def __init__(self, bank: MemoryBank, references: ReferenceIndex, k: int, thetas: tuple[float, ...],
                 xp: ModuleType = np) -> None:
        self.xp = xp
        self.k = min(int(k), len(references))
        if self.k < 1:
            raise ValueError("reference retrieval needs at least one reference image")
        if bank.n_images != len(references):
            raise ValueError(f"bank has rows of {bank.n_images} images, the reference index {len(references)}")
        self.thetas = tuple(float(t) for t in thetas)
        counts = (bank.ends - bank.starts).astype(np.int64)
        width = int(counts.max()) if len(counts) else 0
        # row table: image -> its bank rows, padded with row 0 and masked (+inf score) where an image has fewer
        table = bank.starts[:, None] + np.arange(width)[None, :]
        valid = np.arange(width)[None, :] < counts[:, None]
        self.rows_per_image = width
        self.padded = not bool(valid.all())
        self.row_table = xp.asarray(np.where(valid, table, 0).astype(np.int64))
        # a padded slot's score is -inf: never the argmax
        self.row_invalid = xp.asarray(np.where(valid, 0.0, -np.inf).astype(np.float32))
        self.features = xp.asarray(bank.features)  # stored dtype (fp16 in bundles): widened per matched row
        self.projected_aug = xp.asarray(bank.projected_aug)
        self.pca_mean = xp.asarray(bank.pca.mean.astype(np.float32))
        self.pca_components_t = xp.asarray(np.ascontiguousarray(bank.pca.components.T, dtype=np.float32))
        self.by_cell = xp.asarray(references.by_cell)
        self.descriptor_sq = xp.asarray(references.sq_norms.astype(np.float32))  # (n, cells)
        self.n_keep = int(references.n_keep)
        # numpy: in cache-sized blocks, as the host matcher does; a GPU takes the whole product at once
        self.chunk = QUERY_CHUNK if xp is np else None

    def graph_inputs(self) -> dict[str, Array]:
        """The bank arrays as ``matcher.onnx``'s inputs (same device buffers, no copies but a reshape)."""
        if self.padded:
            raise ValueError("matcher.onnx needs the per-image bank layout (every image the same number of rows)")
        n_images = self.row_table.shape[0]
        return {"bank_features": self.features,
                "bank_projected_aug": self.projected_aug.reshape(n_images, self.rows_per_image, -1),
                "ref_by_cell": self.by_cell, "ref_sq_norms": self.descriptor_sq, "pca_mean": self.pca_mean,
                "pca_components_t": self.pca_components_t}

    def retrieve(self, descriptor: Array) -> Array:
        """The K nearest training images by the trimmed per-cell distance (closest first), as (K,) int64."""
        xp = self.xp
        dist = trimmed_distances(xp, self.by_cell, self.descriptor_sq, descriptor, self.n_keep)
        return xp.argsort(dist, kind="stable")[: self.k] if xp is np else xp.argsort(dist)[: self.k]

    def match(self, pcf: Array, descriptor: Array) -> DeviceMatch:
        """Retrieval, nearest normal patch among the K images' rows (in PCA space) and the residual."""
        xp = self.xp
        pcf = pcf.astype(xp.float32, copy=False)
        refs = self.retrieve(descriptor)
        rows = self.row_table[refs].reshape(-1)  # (K * rows_per_image,)
        query = augmented_query(xp, (pcf - self.pca_mean) @ self.pca_components_t)  # (M, d_l + 1)
        candidates = self.projected_aug[rows]
        if self.padded:  # the padded slots' score column -> -inf
            candidates[:, -1] += self.row_invalid[refs].reshape(-1)
        best = rows[nearest_candidates(xp, query, candidates, self.chunk)]
        diff = xp.abs(pcf - self.features[best].astype(xp.float32))
        distance = xp.sqrt((diff * diff).sum(axis=1))
        residual = sum(diff if t == 1.0 else diff**t for t in self.thetas) / len(self.thetas)
        return DeviceMatch(references=refs, bank_rows=best, distance=distance.astype(xp.float32, copy=False),
                           residual=residual.astype(xp.float32, copy=False))
