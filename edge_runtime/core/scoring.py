"""From a block-level anomaly map to a heatmap, an image score, defect regions and a threshold (step 10)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def heatmap_from_blocks(block_map: np.ndarray, size_hw: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Bilinear upsampling of the (h_f, w_f) map to the input size, then Gaussian blur of ``sigma`` px."""
    height, width = size_hw
    up = cv2.resize(np.asarray(block_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        ksize = 2 * int(round(4.0 * sigma)) + 1
        up = cv2.GaussianBlur(up, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return up


def image_score(heatmap: np.ndarray, pool: int = 8) -> float:
    """Max of the heatmap after a ``pool`` x ``pool`` box average: robust to one-pixel spikes."""
    if pool > 1:
        heatmap = cv2.blur(heatmap, (pool, pool), borderType=cv2.BORDER_REFLECT)
    return float(heatmap.max())


@dataclass(frozen=True)
class Region:
    """A connected defect region in heatmap pixels: box [x, y, w, h], area and peak score."""

    box: tuple[int, int, int, int]
    area: int
    peak: float

    def to_json(self) -> dict:
        return {"box": list(self.box), "area": self.area, "peak": round(self.peak, 6)}


def defect_regions(heatmap: np.ndarray, threshold: float, max_regions: int = 32) -> list[Region]:
    """Connected components of ``heatmap >= threshold``, largest peak first."""
    mask = (heatmap >= threshold).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    for label in range(1, n_labels):
        x, y, w, h, area = (int(v) for v in stats[label])
        peak = float(heatmap[labels == label].max())
        regions.append(Region(box=(x, y, w, h), area=area, peak=peak))
    regions.sort(key=lambda r: r.peak, reverse=True)
    return regions[:max_regions]


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen image threshold and what it rests on."""

    threshold: float
    n_images: int
    target_false_reject: float
    margin: float

    def to_json(self) -> dict:
        return {
            "threshold": self.threshold,
            "n_images": self.n_images,
            "target_false_reject": self.target_false_reject,
            "margin": self.margin,
        }


def choose_threshold(
    good_scores: np.ndarray, target_false_reject: float = 0.005, margin: float = 0.05
) -> ThresholdChoice:
    """Threshold from scores of good images that were *not* in the bank.

    Takes the (1 - target) quantile of the held-out good scores (the highest score when there are too
    few images to resolve the target rate) and adds ``margin`` times the spread (q99 - median) so that
    the threshold is not pinned to a single frame.
    """
    scores = np.asarray(good_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("cannot choose a threshold without held-out good scores")
    base = float(np.quantile(scores, 1.0 - target_false_reject, method="higher"))
    spread = float(np.quantile(scores, 0.99) - np.median(scores))
    return ThresholdChoice(
        threshold=base + margin * spread,
        n_images=int(scores.size),
        target_false_reject=target_false_reject,
        margin=margin,
    )
