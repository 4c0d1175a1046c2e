"""Evaluation metrics for anomaly detection: image/pixel AUROC, pixel AP and PRO (MVTec AD).

All metrics are exact and tie-aware. Scores are sorted once (O(P log P)); equal scores form one
threshold, as in scikit-learn. No scikit-learn dependency: only numpy and scipy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "roc_auc",
    "average_precision",
    "roc_curve",
    "pr_curve",
    "pro_curve",
    "pro_auc",
    "evaluate_maps",
    "save_curve_plot",
]

_MAX_PLOT_POINTS = 2000


# --------------------------------------------------------------------------- helpers


def _as_bool(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Binary labels (bool, or numeric 0/1) -> bool array of the same shape."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be boolean or numeric 0/1, got dtype {arr.dtype}")
    pos = arr == 1
    if not np.all(pos | (arr == 0)):
        raise ValueError(f"{name} must contain only 0/1 (or bool) values")
    return pos


def _as_mask(masks: np.ndarray) -> np.ndarray:
    """Ground-truth masks (bool, 0/1 or 0/255, possibly float) -> bool; pixels > 0.5 are defective."""
    arr = np.asarray(masks)
    return arr if arr.dtype == bool else arr > 0.5


def _as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """Numeric, finite scores; float32/float64 kept as is (no upcast of large maps)."""
    arr = np.asarray(scores)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _descending_counts(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Cumulative counts at every distinct score t, in descending order of t.

    Returns (n_ge, pos_ge, w_ge): the number of samples with score >= t, the number of positive
    samples with score >= t and, if ``weights`` (one per positive sample, in flat order) is given,
    the sum of their weights. Equal scores form one threshold. Only the values are sorted (no
    argsort): positives are mapped to their threshold group by binary search and accumulated with
    ``np.bincount``, which is several times faster than an argsort on large pixel sets.
    """
    flat = scores.ravel()
    sorted_scores = np.sort(flat)
    is_start = np.empty(flat.size, dtype=bool)
    is_start[0] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    del is_start
    values = sorted_scores[starts]
    del sorted_scores
    n_ge = (flat.size - starts)[::-1]
    group = np.searchsorted(values, flat[positive.ravel()])
    pos_ge = np.cumsum(np.bincount(group, minlength=values.size)[::-1])
    w_ge = None
    if weights is not None:
        w_ge = np.cumsum(np.bincount(group, weights=weights, minlength=values.size)[::-1])
    return n_ge, pos_ge, w_ge


def _binary_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Cumulative (fps, tps) at each distinct threshold, descending, plus (n_neg, n_pos)."""
    y = _as_bool(labels).ravel()
    s = _as_scores(scores).ravel()
    if y.size != s.size:
        raise ValueError(f"labels and scores differ in size: {y.size} != {s.size}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    n_ge, tps, _ = _descending_counts(s, y)
    fps = n_ge - tps
    n_pos = int(tps[-1])
    return fps, tps, y.size - n_pos, n_pos


def _auc_from_counts(fps: np.ndarray, tps: np.ndarray, n_neg: int, n_pos: int) -> float:
    """Trapezoidal ROC area (equals Mann-Whitney U / (n_pos n_neg), ties counted as 1/2)."""
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC is undefined with only one class present (n_pos={n_pos}, n_neg={n_neg})")
    f = np.concatenate(([0.0], fps.astype(np.float64)))
    t = np.concatenate(([0.0], tps.astype(np.float64)))
    area = np.sum(np.diff(f) * (t[1:] + t[:-1])) / 2.0
    return float(area / (float(n_pos) * float(n_neg)))


def _ap_from_counts(fps: np.ndarray, tps: np.ndarray, n_pos: int) -> float:
    """Step-wise AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds (scikit-learn definition)."""
    if n_pos == 0:
        raise ValueError("average precision is undefined without positive labels")
    t = tps.astype(np.float64)
    precision = t / (t + fps)
    recall_gain = np.diff(t, prepend=0.0) / n_pos
    return float(np.sum(recall_gain * precision))


def _subsample(n: int, max_points: int | None) -> np.ndarray | slice:
    """Evenly spaced indices (first and last kept) when n exceeds max_points."""
    if max_points is None or n <= max_points:
        return slice(None)
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def _curve_up_to(x: np.ndarray, y: np.ndarray, max_x: float) -> tuple[np.ndarray, np.ndarray]:
    """Points of a monotone curve with x <= max_x, plus a linearly interpolated point at max_x."""
    if not 0.0 < max_x <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_x}")
    stop = int(np.searchsorted(x, max_x, side="right"))
    xs, ys = x[:stop], y[:stop]
    if stop < x.size and xs[-1] < max_x:
        x0, x1, y0, y1 = x[stop - 1], x[stop], y[stop - 1], y[stop]
        y_at = y0 + (y1 - y0) * (max_x - x0) / (x1 - x0)
        xs, ys = np.append(xs, max_x), np.append(ys, y_at)
    return xs, ys


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


# --------------------------------------------------------------------------- binary metrics


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; tied scores count 1/2. ValueError if only one class is present."""
    fps, tps, n_neg, n_pos = _binary_counts(labels, scores)
    return _auc_from_counts(fps, tps, n_neg, n_pos)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, identical to ``sklearn.metrics.average_precision_score`` (no interpolation)."""
    fps, tps, _, n_pos = _binary_counts(labels, scores)
    return _ap_from_counts(fps, tps, n_pos)


def roc_curve(
    labels: np.ndarray, scores: np.ndarray, max_points: int | None = _MAX_PLOT_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1), one point per distinct threshold, subsampled to max_points."""
    fps, tps, n_neg, n_pos = _binary_counts(labels, scores)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC curve needs both classes (n_pos={n_pos}, n_neg={n_neg})")
    fpr = np.concatenate(([0.0], fps / n_neg))
    tpr = np.concatenate(([0.0], tps / n_pos))
    idx = _subsample(fpr.size, max_points)
    return fpr[idx], tpr[idx]


def pr_curve(
    labels: np.ndarray, scores: np.ndarray, max_points: int | None = _MAX_PLOT_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) with recall increasing, starting at (1, 0) as in scikit-learn."""
    fps, tps, _, n_pos = _binary_counts(labels, scores)
    if n_pos == 0:
        raise ValueError("PR curve is undefined without positive labels")
    t = tps.astype(np.float64)
    precision = np.concatenate(([1.0], t / (t + fps)))
    recall = np.concatenate(([0.0], t / n_pos))
    idx = _subsample(precision.size, max_points)
    return precision[idx], recall[idx]


# --------------------------------------------------------------------------- PRO


def _check_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = _as_mask(masks)
    amaps = _as_scores(maps, "maps")
    if gt.ndim == 2:
        gt = gt[None]
    if amaps.ndim == 2:
        amaps = amaps[None]
    if gt.ndim != 3 or gt.shape != amaps.shape:
        raise ValueError(f"masks and maps must both be (N, H, W), got {gt.shape} and {amaps.shape}")
    return gt, amaps


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap curve (Bergmann et al., MVTec AD) over every distinct threshold.

    Regions are the 8-connected components of each ground-truth mask. At threshold t,
    PRO(t) is the mean over all regions of the fraction of the region with map >= t, and
    FPR(t) the fraction of all ground-truth-negative pixels with map >= t. Returns (fpr, pro),
    non-decreasing, starting at (0, 0) and ending at (1, 1).
    """
    gt, amaps = _check_maps(masks, maps)
    # A 3-D structure that is empty off the middle plane labels each image separately.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(gt, structure=structure)
    if n_regions == 0:
        raise ValueError("PRO is undefined: the ground-truth masks contain no defect region")
    region_ids = regions.ravel()
    del regions
    sizes = np.bincount(region_ids, minlength=n_regions + 1).astype(np.float64)
    n_neg = int(sizes[0])
    if n_neg == 0:
        raise ValueError("PRO is undefined: the ground-truth masks contain no negative pixel")
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (n_regions * sizes[1:])

    positive = region_ids > 0
    n_ge, pos_ge, overlap = _descending_counts(amaps, positive, weight[region_ids[positive]])
    assert overlap is not None
    negatives = n_ge - pos_ge
    fpr = np.concatenate(([0.0], negatives / n_neg))
    pro = np.concatenate(([0.0], np.clip(overlap, 0.0, 1.0)))
    pro[-1] = 1.0  # every region fully covered at the lowest threshold (removes rounding error)
    return fpr, pro


def pro_auc(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under PRO(FPR) for FPR in [0, max_fpr] (linear interpolation at max_fpr) / max_fpr."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(masks, maps)
    xs, ys = _curve_up_to(fpr, pro, max_fpr)
    return _trapezoid(xs, ys) / max_fpr


# --------------------------------------------------------------------------- evaluation


def _metric_or_none(func: Any, *args: Any) -> float | None:
    try:
        return func(*args)
    except ValueError:
        return None


def _pixel_metrics(gt: np.ndarray, amaps: np.ndarray) -> tuple[float | None, float | None]:
    """(pixel AUROC, pixel AP) from one sort; None where undefined."""
    fps, tps, n_neg, n_pos = _binary_counts(gt, amaps)
    auroc = _auc_from_counts(fps, tps, n_neg, n_pos) if n_pos and n_neg else None
    ap = _ap_from_counts(fps, tps, n_pos) if n_pos else None
    return auroc, ap


def _evaluate_subset(
    labels: np.ndarray, scores: np.ndarray, gt: np.ndarray, amaps: np.ndarray, max_fpr: float
) -> dict[str, Any]:
    pixel_auroc, pixel_ap = _pixel_metrics(gt, amaps)
    return {
        "image_auroc": _metric_or_none(roc_auc, labels, scores),
        "pixel_auroc": pixel_auroc,
        "pro": _metric_or_none(pro_auc, gt, amaps, max_fpr),
        "pixel_ap": pixel_ap,
        "n_images": int(labels.size),
        "n_defective": int(labels.sum()),
    }


def evaluate_maps(
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    defect_types: list[str] | None = None,
    max_fpr: float = 0.3,
) -> dict[str, Any]:
    """Image AUROC, pixel AUROC, PRO (up to ``max_fpr``) and pixel AP, overall and per defect type.

    Per-defect metrics use the good images (``defect_types[i] == "good"``) plus the images of
    that type. Metrics that are undefined on a subset (e.g. no defect pixel) are None.
    """
    labels = _as_bool(image_labels, "image_labels").ravel()
    scores = _as_scores(image_scores, "image_scores").ravel()
    gt, amaps = _check_maps(masks, maps)
    n = labels.size
    if scores.size != n or gt.shape[0] != n:
        raise ValueError(
            f"inconsistent number of images: labels {n}, scores {scores.size}, maps {gt.shape[0]}"
        )
    result = _evaluate_subset(labels, scores, gt, amaps, max_fpr)
    per_defect: dict[str, dict[str, Any]] = {}
    if defect_types is not None:
        types = np.asarray([str(t) for t in defect_types])
        if types.size != n:
            raise ValueError(f"defect_types has {types.size} entries for {n} images")
        good = types == "good"
        for name in dict.fromkeys(t for t in types.tolist() if t != "good"):
            sel = np.flatnonzero(good | (types == name))
            per_defect[name] = _evaluate_subset(labels[sel], scores[sel], gt[sel], amaps[sel], max_fpr)
    result["per_defect"] = per_defect
    return result


# --------------------------------------------------------------------------- plotting


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def save_curve_plot(
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    path: str | Path,
    title: str = "",
    max_fpr: float = 0.3,
) -> None:
    """Write a PNG with image-level ROC, pixel-level PR and PRO-vs-FPR (up to max_fpr) panels.

    The annotated areas are exact; only the plotted curves are subsampled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gt, amaps = _check_maps(masks, maps)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    try:
        ax = axes[0]
        try:
            fpr, tpr = roc_curve(image_labels, image_scores)
            ax.plot(fpr, tpr, lw=1.5)
            auc = roc_auc(image_labels, image_scores)
        except ValueError:
            auc = None
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set(xlabel="FPR", ylabel="TPR", xlim=(0, 1), ylim=(0, 1.02), title="Image ROC")
        ax.text(0.55, 0.08, f"AUROC = {_fmt(auc)}", transform=ax.transAxes)

        ax = axes[1]
        fps, tps, _, n_pos = _binary_counts(gt, amaps)
        ap = None
        if n_pos:
            ap = _ap_from_counts(fps, tps, n_pos)
            t = tps.astype(np.float64)
            precision = np.concatenate(([1.0], t / (t + fps)))
            recall = np.concatenate(([0.0], t / n_pos))
            idx = _subsample(precision.size, _MAX_PLOT_POINTS)
            ax.step(recall[idx], precision[idx], where="post", lw=1.5)
        del fps, tps
        ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.02), title="Pixel PR")
        ax.text(0.05, 0.08, f"AP = {_fmt(ap)}", transform=ax.transAxes)

        ax = axes[2]
        try:
            fpr, pro = pro_curve(gt, amaps)
            xs, ys = _curve_up_to(fpr, pro, max_fpr)
            score = _trapezoid(xs, ys) / max_fpr
            idx = _subsample(xs.size, _MAX_PLOT_POINTS)
            ax.plot(xs[idx], ys[idx], lw=1.5)
        except ValueError:
            score = None
        ax.set(xlabel="FPR", ylabel="PRO", xlim=(0, max_fpr), ylim=(0, 1.02), title=f"PRO (FPR <= {max_fpr})")
        ax.text(0.45, 0.08, f"PRO-AUC = {_fmt(score)}", transform=ax.transAxes)

        for ax in axes:
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(path), format="png", dpi=100)
    finally:
        plt.close(fig)
