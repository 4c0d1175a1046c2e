"""From a block-level anomaly map to a heatmap, an image score and defect regions (step 10; the threshold:
:mod:`edge_runtime.core.thresholds`)."""

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
