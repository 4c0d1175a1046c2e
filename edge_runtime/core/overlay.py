"""Heatmap overlays for people: the colour scale is anchored at the bundle's threshold."""

from __future__ import annotations

import cv2
import numpy as np

from .preprocess import resize_rgb


def heatmap_overlay(image_rgb: np.ndarray, heatmap: np.ndarray, threshold: float, alpha: float = 0.45,
                    regions: list | None = None) -> np.ndarray:
    """uint8 BGR picture at the heatmap's size: JET colours where 0 is blue, the threshold is the middle
    (green-yellow) and twice the threshold or more is red, blended over the image; regions boxed."""
    base = resize_rgb(image_rgb, heatmap.shape[:2])
    level = np.clip(heatmap / max(2.0 * threshold, 1e-12), 0.0, 1.0)
    colour = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(cv2.cvtColor(base, cv2.COLOR_RGB2BGR), 1.0 - alpha, colour, alpha, 0.0)
    for region in regions or []:
        x, y, w, h = region.box
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), 1)
    return out
