"""Reference-image retrieval (paper step 5): the K training images most like the test image.

Each image is summarised by a descriptor: early-stage backbone features average-pooled to a small grid
(G cells of C channels).  Two images are compared by a robust distance: the per-cell distances, summed
over all but the worst ``trim`` fraction of cells, so that a defect (or any local change) in the test
image does not push its true neighbours away.  Matching then only searches the bank entries of these K
images, which bounds its cost whatever the number of training images.
"""

from __future__ import annotations

import numpy as np


def trimmed_distances(xp, by_cell, sq_norms, descriptor, n_keep: int):
    """Per-cell Euclidean distances of one descriptor to every reference (cell-major ``by_cell`` (G, n, C), its
    squared norms (n, G)), summed over the ``n_keep`` closest cells of each reference; numpy or CuPy."""
    g, _, c = by_cell.shape
    descriptor = descriptor.reshape(g, c).astype(xp.float32, copy=False)
    dots = xp.matmul(by_cell, descriptor[:, :, None])[:, :, 0].T  # (n, G)
    cell_sq = sq_norms - 2.0 * dots + (descriptor * descriptor).sum(axis=1)[None, :]
    cell = xp.sqrt(xp.maximum(cell_sq, 0.0))
    if n_keep < g:
        cell = xp.partition(cell, n_keep - 1, axis=1)[:, :n_keep]
    return cell.sum(axis=1)


class ReferenceIndex:
    """Descriptors of the training images, searched by robust distance."""

    def __init__(self, descriptors: np.ndarray, trim: float = 0.25) -> None:
        descriptors = np.asarray(descriptors, dtype=np.float32)
        if descriptors.ndim != 3:
            raise ValueError(f"reference descriptors must be (n_images, cells, channels), got {descriptors.shape}")
        if not 0.0 <= trim < 1.0:
            raise ValueError(f"trim must be in [0, 1), got {trim}")
        # stored cell-major (cells, n, C): the per-cell dot products with a test descriptor are then one batched
        # matrix product (0.1 ms on MTD's 686 images, against 0.27 ms for the einsum over (n, cells, C))
        self.by_cell = np.ascontiguousarray(descriptors.transpose(1, 0, 2))
        self.sq_norms = np.einsum("gnc,gnc->ng", self.by_cell, self.by_cell)
        self.trim = trim
        self.n_keep = max(1, int(round(descriptors.shape[1] * (1.0 - trim))))

    @property
    def descriptors(self) -> np.ndarray:
        """(n_images, cells, channels), a view of the cell-major store."""
        return self.by_cell.transpose(1, 0, 2)

    def __len__(self) -> int:
        return int(self.by_cell.shape[1])

    def distances(self, descriptor: np.ndarray) -> np.ndarray:
        """Robust distance from one (cells, channels) descriptor to every reference image."""
        return trimmed_distances(np, self.by_cell, self.sq_norms, descriptor, self.n_keep)

    def nearest(self, descriptor: np.ndarray, k: int, exclude: int | None = None) -> np.ndarray:
        """Indices of the k nearest reference images, closest first (``exclude``: leave-one-out)."""
        dist = self.distances(descriptor)
        if exclude is not None:
            dist[exclude] = np.inf
        k = min(k, len(self) - (1 if exclude is not None else 0))
        if k < 1:
            raise ValueError("reference retrieval needs at least one other reference image")
        idx = np.argpartition(dist, k - 1)[:k] if k < len(dist) else np.arange(len(dist))
        return idx[np.argsort(dist[idx], kind="stable")]
