"""Reference-image retrieval (paper step 5): the K training images most like the test image.

Each image is summarised by a descriptor: early-stage backbone features average-pooled to a small grid
(G cells of C channels).  Two images are compared by a robust distance: the per-cell distances, summed
over all but the worst ``trim`` fraction of cells, so that a defect (or any local change) in the test
image does not push its true neighbours away.  Matching then only searches the bank entries of these K
images, which bounds its cost whatever the number of training images.
"""

from __future__ import annotations

import numpy as np


class ReferenceIndex:
    """Descriptors of the training images, searched by robust distance."""

    def __init__(self, descriptors: np.ndarray, trim: float = 0.25) -> None:
        descriptors = np.asarray(descriptors, dtype=np.float32)
        if descriptors.ndim != 3:
            raise ValueError(f"reference descriptors must be (n_images, cells, channels), got {descriptors.shape}")
        if not 0.0 <= trim < 1.0:
            raise ValueError(f"trim must be in [0, 1), got {trim}")
        self.descriptors = descriptors
        self.sq_norms = np.einsum("ngc,ngc->ng", descriptors, descriptors)
        self.trim = trim
        self.n_keep = max(1, int(round(descriptors.shape[1] * (1.0 - trim))))

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    def distances(self, descriptor: np.ndarray) -> np.ndarray:
        """Robust distance from one (cells, channels) descriptor to every reference image."""
        descriptor = np.asarray(descriptor, dtype=np.float32).reshape(self.descriptors.shape[1:])
        dots = np.einsum("ngc,gc->ng", self.descriptors, descriptor)
        cell_sq = self.sq_norms - 2.0 * dots + np.einsum("gc,gc->g", descriptor, descriptor)[None]
        cell = np.sqrt(np.maximum(cell_sq, 0.0))
        if self.n_keep < cell.shape[1]:
            cell = np.partition(cell, self.n_keep - 1, axis=1)[:, : self.n_keep]
        return cell.sum(axis=1)

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
