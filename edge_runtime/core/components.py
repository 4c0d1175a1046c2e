"""Logical anomalies: what an image is made of, scored against the good images' composition (after CSAD).

A wrong assembly (a missing part, one part too many, a part in the wrong place) leaves every patch looking
normal; only the composition is wrong.  Each patch is assigned to one of k component classes (cluster
centres of the good images' patch features, fitted without labels); an image is summarised by its
composition: each class's area fraction, number of connected parts and centroid, and CSAD's patch
histograms (the class histogram of each cell of a coarse grid of regions).  The summary's Mahalanobis distance
to the good images' summaries (shrinkage covariance) is the logical score.  Torch-free, so the training host
and field calibration fit it with the same code the edge scores with.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: regions per side of CSAD's patch-histogram grid
HISTOGRAM_REGIONS = 2
#: per-class entries of the summary before the histograms: area, parts, largest part, centroid row, column
PER_CLASS_GROUPS = 5


def summary_groups(k: int, regions: int) -> list[slice]:
    """The composition summary's layout: one group per per-class quantity (k entries each), then the region
    histograms (regions * regions * k); each group is scored on its own (:class:`LogicalModel`)."""
    per_class = [slice(i * k, (i + 1) * k) for i in range(PER_CLASS_GROUPS)]
    return per_class + [slice(PER_CLASS_GROUPS * k, (PER_CLASS_GROUPS + regions * regions) * k)]


def _normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: classes by the direction of a feature, not its magnitude (contrast)."""
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-6)


def kmeans(features: np.ndarray, k: int, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """k-means++ then Lloyd on unit-length rows; returns (k, d) unit-length centres (spherical k-means)."""
    x = _normalise(features)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    closest = np.full(len(x), np.inf, dtype=np.float32)
    for _ in range(1, k):
        closest = np.minimum(closest, 2.0 - 2.0 * x @ centres[-1])
        p = np.maximum(closest, 0.0)
        centres.append(x[rng.choice(len(x), p=p / p.sum())] if p.sum() > 0 else x[rng.integers(len(x))])
    c = np.stack(centres)
    for _ in range(iterations):
        labels = np.argmax(x @ c.T, axis=1)
        new = np.stack([x[labels == j].sum(0) if np.any(labels == j) else c[j] for j in range(k)])
        new = _normalise(new)
        if np.allclose(new, c, atol=1e-5):
            break
        c = new
    return c.astype(np.float32)


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labelings (1: the same partition up to renaming)."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    joint = np.zeros((ka, kb), dtype=np.float64)
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha = -float((pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = -float((pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return mi / max(np.sqrt(ha * hb), 1e-12)


def choose_k(per_image: list[np.ndarray], candidates: tuple[int, ...], seed: int = 0,
             sample: int = 20000) -> tuple[int, dict[int, float]]:
    """The number of component classes: the k whose clustering is most stable across two halves of the good
    images (NMI of the two halves' centres' labelings of the same patches); of ks within 0.01 of the most
    stable, the largest (merging two true classes is stable too, and would hide a swap between them).

    ``per_image``: one (M, d) array of patch features per good image."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(per_image))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    if min(len(h) for h in halves) < 2:
        raise ValueError(f"need at least 4 good images to choose the number of components, got {len(per_image)}")

    def pool(idx: np.ndarray) -> np.ndarray:
        x = np.concatenate([per_image[i] for i in idx])
        return x[rng.choice(len(x), min(sample, len(x)), replace=False)]

    a, b = pool(halves[0]), pool(halves[1])
    probe = _normalise(np.concatenate([a[: sample // 4], b[: sample // 4]]))
    stability = {}
    for k in candidates:
        ca, cb = kmeans(a, k, seed), kmeans(b, k, seed + 1)
        stability[k] = _nmi(np.argmax(probe @ ca.T, axis=1), np.argmax(probe @ cb.T, axis=1))
    best = max(stability.values())
    return max(k for k, s in stability.items() if s >= best - 0.01), stability


@dataclass(frozen=True)
class ComponentMap:
    """Component classes of one image's patches, and the composition summary scored by :class:`LogicalModel`."""

    labels: np.ndarray  # (h_f, w_f) int
    summary: np.ndarray  # (D,) float32


class Components:
    """Assigns patches to component classes and summarises an image's composition."""

    def __init__(self, centres: np.ndarray, grid: tuple[int, int], regions: int = HISTOGRAM_REGIONS) -> None:
        centres = np.asarray(centres, dtype=np.float32)
        if centres.ndim != 2 or centres.shape[0] < 2:
            raise ValueError(f"need at least 2 component centres (k, d), got {centres.shape}")
        self.centres = _normalise(centres)
        self.grid = (int(grid[0]), int(grid[1]))
        self.regions = regions
        self.k = int(centres.shape[0])

    @property
    def summary_dim(self) -> int:
        return self.groups()[-1].stop

    def groups(self) -> list[slice]:
        return summary_groups(self.k, self.regions)

    def __call__(self, pcf: np.ndarray) -> ComponentMap:
        """pcf: (M, d) patch features of one image, M = h_f * w_f."""
        labels = np.argmax(_normalise(pcf) @ self.centres.T, axis=1).reshape(self.grid)
        h, w = self.grid
        yy, xx = np.mgrid[:h, :w]
        area, parts, largest, cy, cx = (np.zeros(self.k, np.float32) for _ in range(5))
        hist = np.zeros((self.regions, self.regions, self.k), np.float32)
        ry, rx = np.minimum(yy * self.regions // h, self.regions - 1), np.minimum(xx * self.regions // w,
                                                                                  self.regions - 1)
        np.add.at(hist, (ry, rx, labels), 1.0)
        hist /= np.maximum(hist.sum(axis=2, keepdims=True), 1.0)
        for c in range(self.k):
            mask = labels == c
            n = int(mask.sum())
            area[c] = n / labels.size
            if n == 0:
                cy[c] = cx[c] = 0.5
                continue
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            parts[c] = np.log1p(count - 1)
            largest[c] = stats[1:, cv2.CC_STAT_AREA].max() / labels.size
            cy[c], cx[c] = yy[mask].mean() / max(h - 1, 1), xx[mask].mean() / max(w - 1, 1)
        summary = np.concatenate([area, parts, largest, cy, cx, hist.ravel()]).astype(np.float32)
        return ComponentMap(labels=labels, summary=summary)


def _group_model(x: np.ndarray, shrinkage: float, floor_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of one group of summary entries (shrinkage covariance with a variance floor)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    var = np.diag(cov)
    floor = max(floor_frac * float(var.mean()), 1e-9)
    shrunk = (1.0 - shrinkage) * cov + shrinkage * np.diag(np.maximum(var, floor)) + floor * np.eye(len(var))
    return mean, np.linalg.inv(shrunk)


class LogicalModel:
    """How far a composition summary is from the good images', group by group (areas, part counts, largest
    parts, centroids, region histograms).

    Each group gets its own Mahalanobis distance (shrinkage covariance, and a variance floor at ``floor_frac``
    of the group's mean variance, so an entry that never varies on the good parts cannot turn a tiny change into
    an enormous distance), standardised by the group's cross-fitted distances on the good images; the score is
    the largest standardised group distance: a part is as wrong as its most wrong aspect.  The precision is
    stored block-diagonal, one block per group."""

    def __init__(self, mean: np.ndarray, precision: np.ndarray, groups: list[slice], group_stats: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.precision = np.asarray(precision, dtype=np.float32)
        self.groups = list(groups)
        self.group_stats = np.asarray(group_stats, dtype=np.float32)  # (G, 2): mean and std of good distances
        if self.precision.shape != (self.mean.size, self.mean.size):
            raise ValueError(f"precision {self.precision.shape} does not match mean {self.mean.shape}")
        if self.group_stats.shape != (len(self.groups), 2) or not (self.group_stats[:, 1] > 0).all():
            raise ValueError(f"group_stats must be ({len(self.groups)}, 2) with positive spreads")

    def distances(self, summary: np.ndarray) -> np.ndarray:
        """(G,) Mahalanobis distance of each group."""
        d = np.asarray(summary, dtype=np.float32) - self.mean
        return np.array([np.sqrt(max(float(d[g] @ self.precision[g, g] @ d[g]), 0.0)) for g in self.groups],
                        dtype=np.float32)

    def __call__(self, summary: np.ndarray) -> float:
        z = (self.distances(summary) - self.group_stats[:, 0]) / self.group_stats[:, 1]
        return float(z.max())

    @classmethod
    def fit(cls, summaries: np.ndarray, groups: list[slice], shrinkage: float = 0.5, floor_frac: float = 0.1,
            folds: int = 10, seed: int = 0) -> tuple[LogicalModel, np.ndarray]:
        """The model from good images' summaries (n, D), and each image's score by a model fitted without it
        (``folds``-fold cross-fitting: in-sample distances run low, and statistics or a threshold taken on them
        would reject good parts).  Returns (model, cross-fitted scores)."""
        x = np.asarray(summaries, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 4:
            raise ValueError(f"need the summaries (n, D) of at least 4 good images, got {x.shape}")
        folds = min(folds, x.shape[0])
        dim = x.shape[1]
        mean, precision = np.zeros(dim), np.zeros((dim, dim))
        for g in groups:
            mean[g], precision[g, g] = _group_model(x[:, g], shrinkage, floor_frac)
        fold = np.random.default_rng(seed).permutation(len(x)) % folds
        crossed = np.zeros((len(x), len(groups)))
        for f in range(folds):
            for j, g in enumerate(groups):
                m, prec = _group_model(x[fold != f][:, g], shrinkage, floor_frac)
                d = x[fold == f][:, g] - m
                crossed[fold == f, j] = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, prec, d), 0.0))
        stats = np.stack([crossed.mean(0), np.maximum(crossed.std(0), 1e-6)], axis=1)
        model = cls(mean, precision, groups, stats)
        scores = ((crossed - stats[:, 0]) / stats[:, 1]).max(axis=1)
        return model, scores.astype(np.float32)


@dataclass(frozen=True)
class Standardisation:
    """A score's mean and spread on good images, so two scores of different units can be fused."""

    mean: float
    std: float

    @classmethod
    def fit(cls, good_scores) -> Standardisation:
        s = np.asarray(good_scores, dtype=np.float64)
        if s.size < 2:
            raise ValueError(f"need at least 2 good scores to standardise, got {s.size}")
        return cls(mean=float(s.mean()), std=max(float(s.std()), 1e-6))

    def __call__(self, score: float) -> float:
        return (float(score) - self.mean) / self.std


class LogicalScoring:
    """The logical score beside the structural one, and the verdict's score from both.

    Each is standardised on good images (held out of the fit, or scored by a model fitted without them), then
    fused by ``rule``: ``max`` (a part fails when either score is as far out as a defect), or ``sum``
    (``structural + weight * logical``: weak evidence in both adds up); ``logical`` (the logical score alone)
    is for evaluation."""

    def __init__(self, components: Components, model: LogicalModel, structural: Standardisation,
                 logical: Standardisation, rule: str = "max", weight: float = 1.0) -> None:
        if rule not in ("max", "sum", "logical"):
            raise ValueError(f"logical fusion must be 'max' or 'sum' (or 'logical' to evaluate), got {rule!r}")
        self.components, self.model = components, model
        self.structural, self.logical = structural, logical
        self.rule, self.weight = rule, float(weight)

    def logical_score(self, pcf: np.ndarray) -> tuple[float, ComponentMap]:
        cmap = self.components(pcf)
        return self.model(cmap.summary), cmap

    def fuse(self, structural_score: float, logical_score: float) -> tuple[float, float, float]:
        """(verdict score, standardised structural, standardised logical)."""
        zs, zl = self.structural(structural_score), self.logical(logical_score)
        fused = max(zs, zl) if self.rule == "max" else zl if self.rule == "logical" else zs + self.weight * zl
        return fused, zs, zl


class PatchSampler:
    """Keeps a random subset of each good image's patches while the bank streams past, for the clustering."""

    def __init__(self, per_image: int = 128, seed: int = 0) -> None:
        self.per_image = per_image
        self.rng = np.random.default_rng(seed)
        self.samples: list[np.ndarray] = []

    def add(self, pcf: np.ndarray) -> None:
        """pcf: (B, M, d) patch features of B images, or (M, d) of one."""
        batch = pcf[None] if pcf.ndim == 2 else pcf
        for image in batch:
            take = self.rng.choice(len(image), min(self.per_image, len(image)), replace=False)
            self.samples.append(np.asarray(image[take], dtype=np.float32))


def fit_components(samples: list[np.ndarray], grid: tuple[int, int], k: int | None,
                   candidates: tuple[int, ...] = (3, 4, 5, 6, 7, 8), seed: int = 0,
                   regions: int = HISTOGRAM_REGIONS) -> tuple[Components, dict[int, float] | None]:
    """Component classes from good images' sampled patches: ``k`` given, or chosen by stability."""
    stability = None
    if k is None:
        k, stability = choose_k(samples, candidates, seed)
    pooled = np.concatenate(samples)
    return Components(kmeans(pooled, k, seed), grid, regions), stability


def fit_logical(components: Components, bank_summaries: np.ndarray, holdout_summaries: np.ndarray,
                shrinkage: float = 0.5, seed: int = 0) -> tuple[LogicalModel, np.ndarray, np.ndarray]:
    """The good composition's model from the bank images' summaries, with the good images' logical scores a
    threshold can rest on: the bank images' cross-fitted (each by a model fitted without it) and the held-out
    images' (by the model).  Returns (model, bank scores, hold-out scores)."""
    model, bank_scores = LogicalModel.fit(bank_summaries, components.groups(), shrinkage, seed=seed)
    holdout_scores = np.array([model(s) for s in holdout_summaries], dtype=np.float32)
    return model, bank_scores, holdout_scores
