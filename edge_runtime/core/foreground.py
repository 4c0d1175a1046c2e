"""Foreground estimation for object products (WeakREST paper, section III-E), trained without labels.

For a part lying on a plain background, the anomaly probability map is multiplied by a foreground map so
that the background can never raise an alarm.  The foreground map of each training image comes from a
two-class LDA on patch features whose training labels come for free from the per-image coreset:

* a uniform background gives patches that all look alike, so greedy k-center covers the whole background
  with one or two centres and picks background positions *rarely*;
* the object's patches are diverse (edges, holes, texture), so k-center spends most of its budget there
  and picks object positions *often*.

Ranking grid positions by how often the coreset selects them across the training images therefore gives
positive (object) and negative (background) candidates.  Positives are not taken at the grid border,
where parts are rarely centred and where padding artefacts make background patches look "diverse".
At test time the factor comes from the stored maps of the K retrieved reference images (not from the
test image itself, whose defect could look like background), max-pooled to forgive small misalignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_LOGIT_95 = float(np.log(19.0))  # sigmoid(ln 19) = 0.95


@dataclass
class ForegroundLDA:
    """Linear foreground classifier: prob = sigmoid(scale * (x @ weights + bias))."""

    weights: np.ndarray  # (d,) float32, unit norm
    bias: float
    scale: float

    def probability(self, features: np.ndarray) -> np.ndarray:
        """(..., d) -> (...) float32 foreground probability in [0, 1]."""
        features = np.asarray(features)
        if features.ndim < 1 or features.shape[-1] != self.weights.shape[0]:
            raise ValueError(f"features must end in d={self.weights.shape[0]}, got shape {features.shape}")
        projected = np.asarray(features, dtype=np.float32) @ self.weights
        logit = self.scale * (projected.astype(np.float64) + self.bias)
        # 0.5 * (1 + tanh(z / 2)) is the logistic function without exp overflow for large |z|
        return (0.5 * (1.0 + np.tanh(0.5 * logit))).astype(np.float32)


def fit_lda(features: np.ndarray, is_foreground: np.ndarray, shrinkage: float = 0.1) -> ForegroundLDA:
    """Two-class Fisher LDA with shrinkage on (N, d) features and (N,) bool labels.

    Shrinkage pulls the pooled within-class covariance toward (trace / d) * I, which keeps the solve stable
    when d is comparable to the number of sampled patches (CNN features have hundreds of dimensions).  The
    boundary sits midway between the projected class means, and the slope maps those means to 0.05 / 0.95.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(is_foreground, dtype=bool)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need (N, d) features and (N,) labels, got {x.shape} and {y.shape}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    n_fg, n_bg = int(y.sum()), int((~y).sum())
    if n_fg < 2 or n_bg < 2:
        raise ValueError(f"LDA needs at least 2 foreground and 2 background samples, got {n_fg} and {n_bg}")
    fg, bg = x[y], x[~y]
    mu_fg, mu_bg = fg.mean(axis=0), bg.mean(axis=0)
    centred = np.concatenate([fg - mu_fg, bg - mu_bg])
    within = centred.T @ centred / (x.shape[0] - 2)
    dim = x.shape[1]
    ridge = float(np.trace(within)) / dim
    if ridge <= 0.0:  # both classes constant: any positive ridge keeps the system solvable
        ridge = 1.0
    sigma = (1.0 - shrinkage) * within + shrinkage * ridge * np.eye(dim)
    if shrinkage == 0.0:
        sigma += 1e-9 * ridge * np.eye(dim)  # a singular covariance (N < d) still has a direction to solve for
    weights = np.linalg.solve(sigma, mu_fg - mu_bg)
    norm = float(np.linalg.norm(weights))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("foreground and background samples have the same mean: no direction separates them")
    weights /= norm
    m_fg, m_bg = float(mu_fg @ weights), float(mu_bg @ weights)
    gap = m_fg - m_bg  # = (mu_fg - mu_bg)^T Sigma^-1 (mu_fg - mu_bg) / norm > 0 for a positive definite Sigma
    if gap <= 0.0:
        raise ValueError("projected class means do not separate: the covariance is degenerate")
    return ForegroundLDA(weights=weights.astype(np.float32), bias=-0.5 * (m_fg + m_bg), scale=2.0 * _LOGIT_95 / gap)


def selection_frequency(chosen: np.ndarray, n_patches: int) -> np.ndarray:
    """(n_images, k) coreset indices -> (n_patches,) float32 fraction of images whose coreset includes each position.

    A position listed twice in one image's coreset counts once for that image.
    """
    chosen = np.asarray(chosen)
    if chosen.ndim != 2 or chosen.shape[0] == 0:
        raise ValueError(f"chosen must be (n_images >= 1, k), got shape {chosen.shape}")
    if chosen.size and (chosen.min() < 0 or chosen.max() >= n_patches):
        raise ValueError(f"coreset indices must lie in [0, {n_patches}), got [{chosen.min()}, {chosen.max()}]")
    mask = np.zeros((chosen.shape[0], n_patches), dtype=bool)
    mask[np.arange(chosen.shape[0])[:, None], chosen] = True
    return mask.mean(axis=0, dtype=np.float64).astype(np.float32)


def border_mask(grid: tuple[int, int], border: int) -> np.ndarray:
    """(h * w,) bool, True for positions within ``border`` cells of the grid edge (row-major)."""
    height, width = grid
    rows, cols = np.divmod(np.arange(height * width), width)
    return (rows < border) | (rows >= height - border) | (cols < border) | (cols >= width - border)


def sample_training_patches(
    features: np.ndarray,
    chosen: np.ndarray,
    grid: tuple[int, int],
    rng: np.random.Generator,
    per_image: int = 32,
    quantile: float = 0.3,
    border: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Label-free LDA training set: often-selected positions are foreground, rarely-selected ones background.

    features (n_images, M, d), chosen (n_images, k).  The top ``quantile`` of positions by selection
    frequency are positive candidates, the bottom ``quantile`` negative candidates (ties broken at random,
    so a run of never-selected positions is not cut in raster order).  Border positions are dropped from
    the positives unless none would be left.  Each image contributes up to ``per_image`` random positives
    and ``per_image`` random negatives.  Returns (X (N, d) float32, y (N,) bool).
    """
    features = np.asarray(features)
    height, width = grid
    n_patches = height * width
    if features.ndim != 3 or features.shape[1] != n_patches:
        raise ValueError(f"features must be (n_images, {n_patches}, d) for grid {grid}, got {features.shape}")
    if np.asarray(chosen).shape[0] != features.shape[0]:
        raise ValueError("features and chosen must hold the same images")
    if not 0.0 < quantile <= 0.5:
        raise ValueError(f"quantile must be in (0, 0.5] so positives and negatives do not overlap, got {quantile}")
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    freq = selection_frequency(chosen, n_patches)
    n_cand = max(1, int(round(quantile * n_patches)))
    order = np.lexsort((rng.random(n_patches), freq))  # ascending frequency, random among equals
    negatives = order[:n_cand]
    positives = order[-n_cand:]
    interior = positives[~border_mask(grid, border)[positives]]
    if interior.size:
        positives = interior
    xs, ys = [], []
    for image in features:
        pos = rng.choice(positives, size=min(per_image, positives.size), replace=False)
        neg = rng.choice(negatives, size=min(per_image, negatives.size), replace=False)
        xs.append(image[np.concatenate([pos, neg])])
        ys.append(np.concatenate([np.ones(pos.size, dtype=bool), np.zeros(neg.size, dtype=bool)]))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


class ForegroundBuilder:
    """Streams batches: keeps features of the first ``fit_images`` images, fits the LDA once it has them
    (or at finish()), then maps every image (buffered ones retroactively).

    Memory holds at most ``fit_images`` images' features plus one (h, w) map per image, so it runs
    alongside the coreset stream of a product with thousands of training images.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        fit_images: int = 64,
        per_image: int = 32,
        quantile: float = 0.3,
        shrinkage: float = 0.1,
        seed: int = 0,
    ) -> None:
        if fit_images < 2:
            raise ValueError(f"fit_images must be >= 2, got {fit_images}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.fit_images = fit_images
        self.per_image = per_image
        self.quantile = quantile
        self.shrinkage = shrinkage
        self.seed = seed
        self.lda: ForegroundLDA | None = None
        self.n_images = 0
        self._features: np.ndarray | None = None  # (fit_images, M, d) until the fit
        self._chosen: list[np.ndarray] = []
        self._n_buffered = 0
        self._maps: list[np.ndarray] = []

    def add(self, features: np.ndarray, chosen: np.ndarray) -> None:
        """features (B, M, d) patch features of B images; chosen (B, k) their coreset indices."""
        features = np.asarray(features)
        chosen = np.asarray(chosen)
        n_patches = self.grid[0] * self.grid[1]
        if features.ndim != 3 or features.shape[1] != n_patches:
            raise ValueError(f"features must be (B, {n_patches}, d) for grid {self.grid}, got {features.shape}")
        if chosen.ndim != 2 or chosen.shape[0] != features.shape[0]:
            raise ValueError(f"chosen must be (B={features.shape[0]}, k), got shape {chosen.shape}")
        if features.shape[0] == 0:
            return
        if self.lda is None:
            take = min(self.fit_images - self._n_buffered, features.shape[0])
            self._buffer(features[:take], chosen[:take])
            features = features[take:]
            if self._n_buffered == self.fit_images:
                self._fit()
        if features.shape[0]:
            self._maps.append(self._map(features))
        self.n_images = self._n_buffered + sum(m.shape[0] for m in self._maps)

    def finish(self) -> tuple[ForegroundLDA, np.ndarray]:
        """The LDA and the maps of all images added, (n_images, h, w) float32 in [0, 1], in arrival order."""
        if self.n_images < 2:
            raise ValueError(f"need at least 2 images to fit the foreground LDA, got {self.n_images}")
        if self.lda is None:
            self._fit()
        assert self.lda is not None
        return self.lda, np.concatenate(self._maps)

    def _buffer(self, features: np.ndarray, chosen: np.ndarray) -> None:
        if self._features is None:
            dtype = features.dtype if np.issubdtype(features.dtype, np.floating) else np.float32
            self._features = np.empty((self.fit_images, *features.shape[1:]), dtype=dtype)
        elif features.shape[2] != self._features.shape[2]:
            raise ValueError(f"feature dimension changed from {self._features.shape[2]} to {features.shape[2]}")
        self._features[self._n_buffered : self._n_buffered + features.shape[0]] = features
        self._chosen.append(chosen)
        self._n_buffered += features.shape[0]

    def _fit(self) -> None:
        assert self._features is not None
        buffered = self._features[: self._n_buffered]
        x, y = sample_training_patches(buffered, np.concatenate(self._chosen), self.grid,
                                       np.random.default_rng(self.seed), self.per_image, self.quantile)
        self.lda = fit_lda(x, y, self.shrinkage)
        self._maps.insert(0, self._map(buffered))  # nothing was mapped before the fit
        self._features, self._chosen, self._n_buffered = None, [], 0

    def _map(self, features: np.ndarray) -> np.ndarray:
        assert self.lda is not None
        if features.shape[2] != self.lda.weights.shape[0]:
            raise ValueError(f"feature dimension {features.shape[2]} != LDA dimension {self.lda.weights.shape[0]}")
        return self.lda.probability(features).reshape(-1, *self.grid)


def reference_foreground(maps: np.ndarray, references: np.ndarray, power: float, pool: int = 3) -> np.ndarray:
    """Foreground factor of a test image from its K retrieved references' stored maps.

    maps: (n_images, h, w) (any float dtype); references: indices of the K references.  Returns the (h, w)
    float32 factor [max over references of the pool x pool max-pooled map] ** power, in [0, 1].  The max
    over references and the dilation make the factor generous: a slightly shifted part keeps its full
    anomaly score, only clear background is suppressed.  power == 0 disables it (all ones).
    """
    maps = np.asarray(maps)
    references = np.asarray(references, dtype=np.int64).reshape(-1)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (n_images, h, w), got shape {maps.shape}")
    if references.size == 0:
        raise ValueError("need at least one reference image")
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"pool must be a positive odd size (a centred window), got {pool}")
    if power == 0:
        return np.ones(maps.shape[1:], dtype=np.float32)
    # dilation commutes with the pointwise max, so pool once after taking the max over references
    factor = np.asarray(maps[references], dtype=np.float32).max(axis=0)
    if pool > 1:
        factor = cv2.dilate(factor, np.ones((pool, pool), dtype=np.uint8))
    return np.clip(factor, 0.0, 1.0) ** np.float32(power)
