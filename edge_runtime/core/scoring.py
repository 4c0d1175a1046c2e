"""From a block-level anomaly map to a heatmap, an image score and defect regions (step 10; the threshold:
:mod:`edge_runtime.core.thresholds`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np


@functools.lru_cache(maxsize=64)
def _axis_operator(n_in: int, n_out: int, sigma: float, pool: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of one axis of the heatmap's linear steps: OpenCV's bilinear resize
    ``n_in -> n_out``, its Gaussian blur of ``sigma`` (reflected border) and, for ``pool > 1``, the image score's
    ``pool``-wide box average (reflected border).

    All three are separable and linear, so a heatmap is ``A_y @ block_map @ A_x.T``: two small matrix products
    from the (h_f, w_f) map instead of filtering a full-size image (0.03 ms against 0.25 ms per map at 256x256).
    The matrices are the OpenCV operations' own responses to unit impulses, so the heatmap is OpenCV's to
    float rounding (tests/test_posfar_core.py)."""
    columns = np.empty((n_out, n_in), np.float32)
    for j in range(n_in):
        impulse = np.zeros((n_in, 1), np.float32)
        impulse[j, 0] = 1.0
        # a one-pixel-wide image: the x taps all read the same pixel (reflected), so only the y axis acts
        column = cv2.resize(impulse, (1, n_out), interpolation=cv2.INTER_LINEAR) if n_out != n_in else impulse
        if sigma > 0:
            ksize = 2 * int(round(4.0 * sigma)) + 1
            column = cv2.GaussianBlur(column, (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                                      borderType=cv2.BORDER_REFLECT)
        if pool > 1:
            column = cv2.blur(column, (pool, pool), borderType=cv2.BORDER_REFLECT)
        columns[:, j] = column.reshape(n_out)
    columns.setflags(write=False)
    return columns


def _filtered(block_map: np.ndarray, size_hw: tuple[int, int], sigma: float, pool: int) -> np.ndarray:
    block_map = np.asarray(block_map, dtype=np.float32)
    height, width = size_hw
    rows = _axis_operator(block_map.shape[0], int(height), float(sigma), int(pool))
    cols = _axis_operator(block_map.shape[1], int(width), float(sigma), int(pool))
    return rows @ block_map @ cols.T


def heatmap_from_blocks(block_map: np.ndarray, size_hw: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Bilinear upsampling of the (h_f, w_f) map to the input size, then Gaussian blur of ``sigma`` px."""
    return _filtered(block_map, size_hw, sigma, 1)


def block_map_score(block_map: np.ndarray, size_hw: tuple[int, int], sigma: float = 4.0, pool: int = 8) -> float:
    """``image_score(heatmap_from_blocks(block_map, size_hw, sigma), pool)`` without the full-size heatmap."""
    return float(_filtered(block_map, size_hw, sigma, pool).max())


def shift_offsets(shift_px: int) -> tuple[tuple[int, int], ...]:
    """The offsets (down, right) a frame is scored at with ``scoring.frame_shift``: the frame itself and the frame
    moved by ``shift_px`` down, right and both.  With half the backbone's stride, the four block grids interleave
    into one of twice the resolution, so a small defect is no longer smeared over the one stride-8 block it falls
    in."""
    if shift_px < 0:
        raise ValueError(f"shift_px must be >= 0, got {shift_px}")
    return ((0, 0),) if shift_px == 0 else ((0, 0), (0, shift_px), (shift_px, 0), (shift_px, shift_px))


def check_frame_shift(shift_px: int, stride: int) -> None:
    """``scoring.frame_shift`` must be at least 0 and less than the backbone's stride: a whole block's shift makes no
    finer grid.  One check for the fit, the bundle and the inspector's override."""
    if shift_px < 0:
        raise ValueError(f"scoring.frame_shift is {shift_px} px: it must be at least 0 (0: off)")
    if shift_px >= stride:
        raise ValueError(f"scoring.frame_shift is {shift_px} px, not less than the backbone's stride {stride}: a "
                         f"whole block's shift makes no finer grid (half the stride is {stride // 2})")


def shifted_frame(tensor: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The (B, 3, H, W) input with its content moved ``dy`` px down and ``dx`` px right; the strip uncovered at
    the top and left is the frame's own edge mirrored (a constant fill would be an edge the bank never saw)."""
    height, width = tensor.shape[-2:]
    padded = np.pad(tensor, ((0, 0), (0, 0), (dy, 0), (dx, 0)), mode="reflect")
    return np.ascontiguousarray(padded[..., :height, :width])


def unshifted_heatmap(heatmap: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """A shifted frame's (H, W) heatmap moved back onto the frame's own pixels; the last ``dy`` rows and ``dx``
    columns, which the shifted frame did not show, repeat the nearest ones it did."""
    return np.pad(heatmap[dy:, dx:], ((0, dy), (0, dx)), mode="edge")


@dataclass(frozen=True)
class HeatmapRefiner:
    """The heatmap shaped back onto the frame's own pixels, so that small defects rank first inside it.

    Blocks are 8 px and the heatmap is their bilinear upsampling, blurred: a pit or a thin crack becomes a
    blob several times its size, centred near it, and pixel AP and PRO score the pixels.  Two steps use the
    frame itself (its grey input, the guide):

    1. a guided filter (He et al., TPAMI 2013) of ``guide_radius`` px and regularisation ``guide_eps``: an
       edge-aware smoothing that keeps each window's mean heat but lets it follow the image's edges;
    2. each pixel's heat times ``1 + contrast_weight * c``, where ``c`` is the pixel's local contrast
       (``|grey - its Gaussian mean of 2 * contrast_sigma|``, averaged over 2x2 pixels and blurred by 1.5 px)
       over the frame's own 99th percentile (at least ``CONTRAST_FLOOR``), clipped at ``CONTRAST_CLIP``: within a
       hot region the dark pit or the crack line comes first, and a flat region keeps its heat.

    The threshold on heat (``thresholds.pixel``) and the image score stay on the unrefined map's scale: the
    guided filter keeps each window's mean heat and the contrast factor is at most ``1 + contrast_weight *
    CONTRAST_CLIP``.  Measured on MTD
    (fast profile, seeds 0 / 1 / 2, ``tools/map_study.py``): pixel AP +1.1 / +0.7 / +1.2 points, PRO +1.6 /
    +1.7 / +1.6, blowhole AP 0.22 -> 0.46 at seed 0.

    Then, once the regions are taken, :meth:`relative` scales the whole heatmap by ``(reference / peak) **
    peak_power``, ``peak`` the frame's own highest heat: a frame at the reference keeps its scale, a frame with a
    strong defect is compressed towards it.  The ranking inside a frame does not change, only the ranking between
    frames, and pixel AP and PRO rank the pixels of all frames together: without it, the halo around a strong break
    outranks the core of a faint finish defect in another frame.  Measured on MTD (``peak_power`` 0.25 with
    ``guide_radius`` 16, the profiles', against radius 8 without it; fast profile, seeds 0 / 1 / 2,
    ``docs/sweeps/peak.yaml``): pixel AP +1.6 / +1.8 / +2.0 points, PRO +1.2 / +1.4 / +1.1.
    """

    guide_radius: int = 8
    guide_eps: float = 1e-3
    contrast_weight: float = 0.15
    contrast_sigma: float = 4.0
    peak_power: float = 0.0

    #: a pixel's contrast counts at most this many times the frame's 99th percentile
    CONTRAST_CLIP = 3.0
    #: ... and that percentile is at least 2 grey levels, so a flat frame's sensor noise is not made contrast
    CONTRAST_FLOOR = 2.0 / 255.0
    #: a blank frame's peak (and a reference) counts as at least this, so that it is not scaled by a division by 0
    PEAK_FLOOR = 1e-6

    def __post_init__(self) -> None:
        if self.guide_radius < 0 or not self.guide_eps > 0:
            raise ValueError(f"guide_radius must be >= 0 and guide_eps > 0, got {self.guide_radius}, "
                             f"{self.guide_eps}")
        if self.contrast_weight < 0 or not self.contrast_sigma > 0:
            raise ValueError(f"contrast_weight must be >= 0 and contrast_sigma > 0, got {self.contrast_weight}, "
                             f"{self.contrast_sigma}")
        if not 0.0 <= self.peak_power < 1.0:
            raise ValueError(f"peak_power must be in [0, 1), got {self.peak_power}")

    @staticmethod
    def guide_of(tensor: np.ndarray) -> np.ndarray:
        """The guide of a backbone input (1, 3, H, W) in [0, 1]: its channels' mean (H, W).  By three strided
        slices, not ``mean(axis=0)``: the input keeps the decoded image's pixel-interleaved layout, where numpy's
        reduction takes 0.8 ms at 256x256 against 0.05 ms."""
        return (tensor[0, 0] + tensor[0, 1] + tensor[0, 2]) * np.float32(1.0 / 3.0)

    def __call__(self, heatmap: np.ndarray, guide: np.ndarray) -> np.ndarray:
        """``heatmap`` (H, W) float32 and ``guide`` (H, W), the frame's grey input in [0, 1] (:meth:`guide_of`).

        The local models and the contrast are computed at half resolution and applied to the full-resolution
        guide and heat in place (He and Sun's fast guided filter): three full-size arrays per frame instead of a
        dozen, about 0.45 ms at 256x256 inside the pipeline (the heat and the contrast weight are smooth at that
        scale; a pit's contrast is taken at full resolution before it is averaged down)."""
        h = np.asarray(heatmap, dtype=np.float32)
        g = np.asarray(guide, dtype=np.float32)
        if g.shape != h.shape:
            raise ValueError(f"the guide {g.shape} must have the heatmap's shape {h.shape}")
        rows, cols = g.shape
        full, half = (cols, rows), (max(1, cols // 2), max(1, rows // 2))
        factor = self._contrast_factor(g, half) if self.contrast_weight > 0 else None
        if self.guide_radius == 0:
            return h * cv2.resize(factor, full, interpolation=cv2.INTER_LINEAR) if factor is not None else h.copy()
        g_half = cv2.resize(g, half, interpolation=cv2.INTER_AREA)
        a, b = self._linear_model(cv2.resize(h, half, interpolation=cv2.INTER_AREA), g_half)
        if factor is not None:  # (a g + b) f = (a f) g + (b f): the smooth factor folded in at half size
            a *= factor
            b *= factor
        out = cv2.resize(a, full, interpolation=cv2.INTER_LINEAR)
        out *= g
        out += cv2.resize(b, full, interpolation=cv2.INTER_LINEAR)
        return out

    def relative(self, heatmap: np.ndarray, reference: float) -> np.ndarray:
        """The refined ``heatmap`` times ``(reference / its peak) ** peak_power`` (the heatmap itself when
        ``peak_power`` is 0).  ``reference``: the bundle's pixel threshold, so that a frame whose peak is at the
        threshold keeps its scale and the overlay's anchor; the regions are taken before, on the refined map."""
        if self.peak_power == 0:
            return heatmap
        peak = max(float(heatmap.max()), self.PEAK_FLOOR)
        return heatmap * np.float32((max(float(reference), self.PEAK_FLOOR) / peak) ** self.peak_power)

    def _linear_model(self, p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The guided filter's per-pixel (a, b), box-averaged, of heat ``p`` on guide ``g`` (both half size)."""
        k = (2 * max(1, self.guide_radius // 2) + 1,) * 2

        def box(x: np.ndarray) -> np.ndarray:
            return cv2.boxFilter(x, -1, k, borderType=cv2.BORDER_REFLECT)

        mean_g, mean_p = box(g), box(p)
        var_g = box(g * g) - mean_g * mean_g
        a = (box(g * p) - mean_g * mean_p) / (var_g + np.float32(self.guide_eps))
        b = mean_p - a * mean_g
        return box(a), box(b)

    def _contrast_factor(self, g: np.ndarray, half: tuple[int, int]) -> np.ndarray:
        """``1 + contrast_weight * c`` at half size: |g - local mean| at full size, then averaged down."""
        rows, cols = g.shape
        quarter = cv2.resize(g, (max(1, cols // 4), max(1, rows // 4)), interpolation=cv2.INTER_AREA)
        dev = cv2.resize(cv2.GaussianBlur(quarter, (0, 0), 0.5 * self.contrast_sigma, borderType=cv2.BORDER_REFLECT),
                         (cols, rows), interpolation=cv2.INTER_LINEAR)
        np.subtract(g, dev, out=dev)
        np.abs(dev, out=dev)
        c = cv2.resize(dev, half, interpolation=cv2.INTER_AREA)
        rank = int(0.99 * (c.size - 1))
        q = max(float(np.partition(c.ravel(), rank)[rank]), self.CONTRAST_FLOOR)
        np.minimum(c, np.float32(self.CONTRAST_CLIP * q), out=c)
        c = cv2.GaussianBlur(c, (0, 0), 0.75, borderType=cv2.BORDER_REFLECT)
        c *= np.float32(self.contrast_weight / q)
        c += np.float32(1.0)
        return c


class DistanceStandardiser:
    """Each block's distance as a z-score against good images' distances at that position.

    Normal distances differ by position (the border, a tile's edges, a part's fixed features): a raw maximum
    is set by where an image is most variable, not by where it is defective.  ``maps`` holds every reference
    image's leave-one-out block distances (matched with itself left out, as a new good image would be).
    Standardised against all of them (``references=None``) or, sharper, against only the K references
    retrieved for the image being scored (the statistics of its own kind of part): MTD image AUROC 0.946 raw,
    0.965 against all, 0.979 against the K references.  Used for the verdict only: pixel maps standardised
    this way lost pixel AP in an exploratory test, because quiet positions are amplified.
    """

    #: a position whose good distances barely vary must not turn noise into a defect
    STD_FLOOR = 1e-3

    def __init__(self, maps: np.ndarray) -> None:
        """maps: (n_reference_images, h_f, w_f), row j the leave-one-out distances of reference image j."""
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim != 3 or maps.shape[0] < 2:
            raise ValueError(f"need the block maps (n, h_f, w_f) of at least 2 good images, got {maps.shape}")
        if not np.isfinite(maps).all():
            raise ValueError("good images' block distances must be finite")
        self.maps = maps
        mean, std = maps.mean(axis=0, dtype=np.float64), maps.std(axis=0, dtype=np.float64)
        self.floor = max(self.STD_FLOOR * float(std.mean()), 1e-6)
        self.mean = mean.astype(np.float32)
        self.std = np.maximum(std, self.floor).astype(np.float32)

    def __call__(self, distance_map: np.ndarray, references: np.ndarray | None = None) -> np.ndarray:
        """``references``: indices of the retrieved reference images; None standardises against all."""
        d = np.asarray(distance_map, dtype=np.float32)
        if references is None:
            return (d - self.mean) / self.std
        ref = self.maps[np.asarray(references)]
        return (d - ref.mean(axis=0)) / np.maximum(ref.std(axis=0), self.floor)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"reference_distances": self.maps.astype(np.float16)}


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
