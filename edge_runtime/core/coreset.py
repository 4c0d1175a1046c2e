"""Greedy k-center coreset selection on a random projection (PatchCore's subsampling, made fast).

Why per image: the edge matcher only ever searches the bank entries of the K retrieved reference
images (paper step 6), so what matters is that *each* training image keeps a good cover of its own
patches.  Selecting the coreset image by image is therefore the right objective as well as the fast one:
all images advance together in one vectorised loop, so a 762-image product takes seconds instead of the
hours a global greedy k-center over ~800k patches needs at a 10 % ratio.
"""

from __future__ import annotations

import numpy as np


def random_projection(dim_in: int, dim_out: int, seed: int = 0) -> np.ndarray:
    """Gaussian Johnson-Lindenstrauss projection matrix (dim_in, dim_out); identity-like if not smaller."""
    if dim_out >= dim_in:
        return np.eye(dim_in, dtype=np.float32)
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / np.sqrt(dim_out)).astype(np.float32)


def greedy_kcenter(points: np.ndarray, n_select: int, start: int = 0) -> np.ndarray:
    """Indices of ``n_select`` points chosen by greedy k-center (farthest-point) selection.

    Each step adds the point farthest from everything chosen so far, which minimises the largest
    distance from any point to its nearest selected point within a factor of two.
    """
    points = np.asarray(points, dtype=np.float32)
    return greedy_kcenter_batched(points[None], n_select, starts=np.array([start]))[0]


def greedy_kcenter_batched(
    points: np.ndarray, n_select: int, starts: np.ndarray | None = None
) -> np.ndarray:
    """Greedy k-center run independently on each of B point sets at once.

    points: (B, N, D) float32.  Returns (B, n_select) int64 indices into axis 1.
    """
    points = np.asarray(points, dtype=np.float32)
    batch, n_points, _ = points.shape
    if not 1 <= n_select <= n_points:
        raise ValueError(f"n_select must be in [1, {n_points}], got {n_select}")
    rows = np.arange(batch)
    current = np.zeros(batch, dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
    chosen = np.empty((batch, n_select), dtype=np.int64)
    sq_norms = np.einsum("bnd,bnd->bn", points, points)
    min_dist = np.full((batch, n_points), np.inf, dtype=np.float32)
    for step in range(n_select):
        chosen[:, step] = current
        centre = points[rows, current]  # (B, D)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one batched mat-vec per step
        dots = np.einsum("bnd,bd->bn", points, centre)
        dist = sq_norms - 2.0 * dots + sq_norms[rows, current][:, None]
        np.minimum(min_dist, dist, out=min_dist)
        min_dist[rows, current] = -np.inf  # never pick a chosen point again
        current = np.argmax(min_dist, axis=1)
    return chosen


def select_per_image(
    features: np.ndarray, ratio: float, projection_dim: int = 128, seed: int = 0, chunk: int = 64
) -> np.ndarray:
    """Coreset indices for every image's patches.

    features: (n_images, n_patches, d) patch features.  Returns (n_images, k) patch indices with
    k = max(1, round(ratio * n_patches)).  Distances are measured after a random projection to
    ``projection_dim`` dimensions; images are processed ``chunk`` at a time to bound memory.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    n_images, n_patches, dim = features.shape
    n_select = max(1, int(round(ratio * n_patches)))
    proj = random_projection(dim, projection_dim, seed)
    rng = np.random.default_rng(seed)
    out = np.empty((n_images, n_select), dtype=np.int64)
    for lo in range(0, n_images, chunk):
        block = np.asarray(features[lo : lo + chunk], dtype=np.float32) @ proj
        starts = rng.integers(0, n_patches, size=block.shape[0])
        out[lo : lo + chunk] = greedy_kcenter_batched(block, n_select, starts)
    return out
