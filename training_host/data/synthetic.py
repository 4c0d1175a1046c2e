"""Synthetic anomalies (MemSeg / DRAEM style) to train the residual classifier from good images only.

A Perlin-noise mask (random scale per axis, randomly rotated, and often cut down to one or a few connected
blobs, because real defects are small) selects where a *foreign texture* is alpha-blended into a good image.
The texture is one of

(a) another good image (a *donor*) with random crop, flip, rotation by 90 degrees and brightness/contrast jitter,
(b) the image itself cut into ``tile_grid x tile_grid`` tiles that are shuffled (and possibly rotated): locally
    plausible surface, structurally wrong,
(c) a texture bundled with scikit-image (``skimage.data``; the files ship inside the wheel, no download).

Besides these Perlin blobs, ``shape_weights`` draws small pits (filled ellipses) and thin curved cracks, which
darken or brighten the image itself: the shapes of the small defects that blobs cannot imitate.  ``band_fraction``
draws *finish bands*: a large region with straight, slightly tilted sides, often running in from the image's edge,
where the surface has another finish (another good image at the same orientation, or the image's own texture with
its contrast and brightness changed).  That is what an "uneven" surface looks like on a ground or pressed part:
two normal finishes on one part, which no Perlin blob of foreign texture imitates.

The returned mask is exactly the set of pixels that were changed; :func:`block_labels` turns it into block
targets (paper Eq. 15).  Everything is numpy + OpenCV and deterministic under a seed / ``np.random.Generator``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# skimage.data images used as packaged foreign textures.  All of them are files inside the installed package;
# one that does not load (another installation) is skipped.
TEXTURE_NAMES: tuple[str, ...] = (
    "brick", "grass", "gravel", "camera", "coins", "moon", "text",
    "rocket", "coffee", "chelsea", "astronaut", "hubble_deep_field",
)

_MASK_TRIES = 20  # perlin_mask redraws before the rectangle fallback
_MAKE_TRIES = 10  # AnomalySynthesizer.make redraws while the mask misses the foreground
_PASTE_TRIES = 4  # ... and the texture while the paste is fainter than min_contrast
_MIN_CELL_PX = 4  # Perlin cells are at least this many pixels, else the "noise" is just salt and pepper
_JITTER_CONTRAST = (0.7, 1.3)
_JITTER_BRIGHTNESS = (-40.0, 40.0)
_BAND_AREA = (0.05, 0.5)  # a finish band's share of the image


# ----------------------------------------------------------------------------------------------- helpers
def _as_rgb_uint8(img: np.ndarray, what: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) view/copy of a grey, single-channel, RGB or RGBA (alpha dropped) uint8/bool image."""
    a = np.asarray(img)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_GRAY2RGB)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
        raise ValueError(f"{what} must be (H, W) or (H, W, 3), got shape {a.shape}")
    return np.ascontiguousarray(a)


@functools.cache
def packaged_textures() -> tuple[tuple[str, np.ndarray], ...]:
    """``(name, RGB uint8)`` for the loadable :data:`TEXTURE_NAMES`; loaded once per process, read-only."""
    try:
        import skimage.data
    except ImportError:  # pragma: no cover - the train extra installs scikit-image
        return ()
    out = []
    for name in TEXTURE_NAMES:
        try:
            rgb = _as_rgb_uint8(np.asarray(getattr(skimage.data, name)()), f"skimage.data.{name}()")
        except Exception:  # pragma: no cover - depends on the installation (missing file, no network)
            continue
        rgb.setflags(write=False)
        out.append((name, rgb))
    return tuple(out)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize to (h, w): INTER_AREA when shrinking (no aliasing), INTER_LINEAR when enlarging."""
    if img.shape[:2] == (h, w):
        return img
    shrink = img.shape[0] * img.shape[1] > h * w
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _random_crop(src: np.ndarray, h: int, w: int, frac: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Crop with the aspect ratio of (h, w), ``frac`` of the largest such crop, at a random place."""
    sh, sw = src.shape[:2]
    side = min(sh / h, sw / w) * rng.uniform(*frac)  # source pixels per target pixel
    ch, cw = max(1, min(sh, round(h * side))), max(1, min(sw, round(w * side)))
    y = int(rng.integers(0, sh - ch + 1))
    x = int(rng.integers(0, sw - cw + 1))
    return src[y : y + ch, x : x + cw]


def _flip_rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal/vertical flip and rotation by a multiple of 90 degrees (cv2, so it stays fast)."""
    code = int(rng.integers(-1, 3))  # -1 both, 0 vertical, 1 horizontal, 2 none
    if code != 2:
        img = cv2.flip(img, code)
    k = int(rng.integers(0, 4))
    if k:
        img = cv2.rotate(img, (cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)[k - 1])
    return img


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness/contrast jitter around the image mean, applied with a lookup table."""
    c = rng.uniform(*_JITTER_CONTRAST)
    b = rng.uniform(*_JITTER_BRIGHTNESS)
    mean = float(np.mean(cv2.mean(img)[:3]))
    lut = np.clip(np.rint(np.arange(256, dtype=np.float32) * c + (1.0 - c) * mean + b), 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` translated by (dy, dx) without wrap-around (what leaves the image is dropped)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


# ----------------------------------------------------------------------------------------------- masks
def perlin_noise(shape: tuple[int, int], scale: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise (float32, roughly in [-1, 1]: scaled by sqrt(2) as in DRAEM) with ``scale`` gradient cells
    per axis.

    The shape need not be divisible by the scale: every pixel is mapped to continuous lattice coordinates, which
    gives the same result as generating on a larger, divisible grid and cropping, without the extra pixels.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(scale[0]), int(scale[1])
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"shape {shape} and scale {scale} must be positive")
    angles = rng.uniform(0.0, 2.0 * math.pi, (ry + 1, rx + 1))
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)

    ty = np.arange(h, dtype=np.float64) * (ry / h)
    tx = np.arange(w, dtype=np.float64) * (rx / w)
    iy = np.minimum(ty.astype(np.intp), ry - 1)
    ix = np.minimum(tx.astype(np.intp), rx - 1)
    fy = (ty - iy).astype(np.float32)[:, None]
    fx = (tx - ix).astype(np.float32)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        rows = iy + dy
        cols = ix + dx
        return gx[rows][:, cols] * (fx - dx) + gy[rows][:, cols] * (fy - dy)

    u = fx * fx * fx * (fx * (fx * 6.0 - 15.0) + 10.0)  # quintic fade
    v = fy * fy * fy * (fy * (fy * 6.0 - 15.0) + 10.0)
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = n00 + u * (n01 - n00)
    bottom = n10 + u * (n11 - n10)
    return (math.sqrt(2.0) * (top + v * (bottom - top))).astype(np.float32)


def _keep_some_components(mask: np.ndarray, rng: np.random.Generator, min_px: int) -> np.ndarray:
    """One to three random connected components of ``mask`` (uint8), preferring those of at least ``min_px``."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 2:  # background plus at most one component
        return mask
    ids = np.arange(1, n)
    big = ids[stats[1:, cv2.CC_STAT_AREA] >= min_px]
    pool = big if len(big) else ids
    k = min(int(rng.integers(1, 4)), len(pool))
    keep = np.zeros(n, np.uint8)
    keep[rng.choice(pool, size=k, replace=False)] = 1
    return keep[labels]


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    threshold: float = 0.5,
    max_area: float = 0.3,
    min_area_px: int = 16,
    keep_components_prob: float = 0.5,
) -> np.ndarray:
    """Binary float32 {0, 1} anomaly mask from thresholded, randomly rotated Perlin noise (DRAEM style).

    The scale is ``2**a`` cells per axis, ``a`` drawn in [min_scale_exp, max_scale_exp] separately per axis (capped
    so that a cell has at least 4 pixels).  With probability ``keep_components_prob`` only one to three random
    connected components are kept: real defects are small (about 0.5 % of the image), so many masks must be too.
    Draws whose area is not in [min_area_px, max_area * H * W] are redrawn (at most 20 times; the threshold is
    raised after a too-large draw and lowered after a too-small one); should all fail, a random rectangle of
    admissible area is returned, so the bounds always hold.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    if not 0 <= min_scale_exp <= max_scale_exp:
        raise ValueError(f"need 0 <= min_scale_exp <= max_scale_exp, got {min_scale_exp}, {max_scale_exp}")
    max_px = max_area * h * w
    if min_area_px < 1 or min_area_px > max_px:
        raise ValueError(
            f"no admissible area: min_area_px={min_area_px}, max_area={max_area} of {h}x{w} = {max_px:.1f} px"
        )
    thr = float(threshold)
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    for _ in range(_MASK_TRIES):
        ey, ex = rng.integers(min_scale_exp, max_scale_exp + 1, size=2)
        sy = max(1, min(2 ** int(ey), h // _MIN_CELL_PX))
        sx = max(1, min(2 ** int(ex), w // _MIN_CELL_PX))
        noise = perlin_noise((h, w), (sy, sx), rng)
        rot = cv2.getRotationMatrix2D(centre, rng.uniform(-90.0, 90.0), 1.0)
        noise = cv2.warpAffine(noise, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        mask = (noise > thr).astype(np.uint8)
        if rng.random() < keep_components_prob:
            mask = _keep_some_components(mask, rng, min_area_px)
        area = cv2.countNonZero(mask)
        if min_area_px <= area <= max_px:
            return mask.astype(np.float32)
        thr = min(thr + 0.05, 0.9) if area > max_px else max(thr - 0.05, 0.2)

    # Fallback (rare, e.g. tiny images): an axis-aligned rectangle of about the geometric mean admissible area.
    target = math.sqrt(min_area_px * max_px)
    rh = int(min(h, max(1, round(math.sqrt(target)))))
    rw = int(min(w, max(1, round(target / rh), math.ceil(min_area_px / rh))))
    rw = max(1, min(rw, int(max_px // rh)))
    y = int(rng.integers(0, h - rh + 1))
    x = int(rng.integers(0, w - rw + 1))
    out = np.zeros((h, w), np.float32)
    out[y : y + rh, x : x + rw] = 1.0
    return out


def pit_mask(shape: tuple[int, int], rng: np.random.Generator, radius_px: tuple[float, float] = (2.5, 10.0)
             ) -> np.ndarray:
    """One to three small filled ellipses (pits, blowholes, inclusions): float32 {0, 1} (H, W).

    Semi-axes in ``radius_px`` (pixels at the given shape), each ellipse randomly rotated; Perlin blobs of this
    size would be cut to pieces by the noise, and real pits are compact."""
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), np.uint8)
    lo, hi = radius_px
    for _ in range(int(rng.integers(1, 4))):
        a, b = rng.uniform(lo, hi), rng.uniform(lo, hi)
        b = min(b, a * 2.5) if b > a else max(b, a / 2.5)
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.ellipse(mask, centre, (max(1, round(a)), max(1, round(b))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(np.float32)


def band_mask(shape: tuple[int, int], rng: np.random.Generator, area: tuple[float, float] = _BAND_AREA
              ) -> np.ndarray:
    """A large region with straight, slightly tilted sides (a finish band): float32 {0, 1} (H, W).

    Two times in three it runs in from one of the image's sides, to a depth that gives ``area``, its inner side
    tilted by up to 10 degrees and sometimes spanning only part of the side; else it is a tilted quadrilateral
    inside the image.  Uneven finishes on real parts are bounded by the tool's path, not by noise."""
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), np.uint8)
    frac = rng.uniform(*area)
    if rng.random() < 2 / 3:
        side = int(rng.integers(4))  # 0 top, 1 bottom, 2 left, 3 right
        along, across = (w, h) if side < 2 else (h, w)
        start, stop = 0.0, float(along)
        if rng.random() < 0.4:  # only part of the side
            span = rng.uniform(0.4, 0.9) * along
            start = rng.uniform(0, along - span)
            stop = start + span
        depth = min(0.95, frac * along / (stop - start)) * across
        tilt = math.tan(math.radians(rng.uniform(-10.0, 10.0)))
        mid = (start + stop) / 2
        inner = [depth + tilt * (start - mid), depth + tilt * (stop - mid)]
        pts = np.array([[start, 0.0], [stop, 0.0], [stop, inner[1]], [start, inner[0]]])
        if side == 1:
            pts[:, 1] = across - pts[:, 1]
        elif side in (2, 3):
            pts = pts[:, ::-1]
            if side == 3:
                pts[:, 0] = across - pts[:, 0]
    else:
        bh = math.sqrt(frac * h * w * rng.uniform(0.4, 2.5))
        bw = frac * h * w / bh
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        angle = math.radians(rng.uniform(-15.0, 15.0))
        corners = np.array([[-bw, -bh], [bw, -bh], [bw, bh], [-bw, bh]]) / 2
        corners += rng.uniform(-0.1, 0.1, corners.shape) * np.array([bw, bh])
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = corners @ rot.T + [cx, cy]
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], 1)
    return mask.astype(np.float32)


def crack_mask(shape: tuple[int, int], rng: np.random.Generator, length_px: tuple[float, float] = (24.0, 120.0),
               width_px: tuple[int, int] = (1, 3)) -> np.ndarray:
    """A thin curved line, sometimes branched (cracks, scratches, hairlines): float32 {0, 1} (H, W).

    A random walk of 3 to 8 segments whose direction turns by up to 35 degrees at each joint; total length in
    ``length_px`` and width in ``width_px`` pixels.  Perlin masks cannot make these: their finest features
    are ``min_feature_px`` wide blobs."""
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), np.uint8)
    thickness = int(rng.integers(width_px[0], width_px[1] + 1))

    def walk(start: np.ndarray, angle: float, length: float) -> np.ndarray:
        n = int(rng.integers(3, 9))
        points = [start]
        for _ in range(n):
            angle += math.radians(rng.uniform(-35.0, 35.0))
            points.append(points[-1] + (length / n) * np.array([math.cos(angle), math.sin(angle)]))
        pts = np.round(np.array(points)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(mask, [pts], False, 1, thickness=thickness)
        return np.array(points)

    length = rng.uniform(*length_px)
    trunk = walk(np.array([rng.uniform(0, w), rng.uniform(0, h)]), rng.uniform(0, 2 * math.pi), length)
    if rng.random() < 0.3:  # a branch from a point along the crack
        walk(trunk[int(rng.integers(1, len(trunk)))], rng.uniform(0, 2 * math.pi), length * rng.uniform(0.2, 0.5))
    return mask.astype(np.float32)


def _finish_texture(image: np.ndarray, donors: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Another finish of the same surface: a donor at the image's own orientation (flips only, since a ground or
    brushed finish has a direction), or the image's own texture with its contrast and brightness changed."""
    h, w = image.shape[:2]
    if donors and rng.random() < 0.5:
        donor = donors[int(rng.integers(len(donors)))]
        crop = _random_crop(donor, h, w, (0.6, 1.0), rng)
        if rng.random() < 0.5:
            crop = cv2.flip(crop, int(rng.integers(0, 2)))
        src = _resize(crop, h, w)
    else:
        src = image
    img = src.astype(np.float32)
    local = cv2.GaussianBlur(img, (0, 0), sigmaX=max(2.0, min(h, w) / 32))
    gain = rng.uniform(1.3, 2.5) if rng.random() < 0.7 else rng.uniform(0.3, 0.7)  # stronger or flatter texture
    offset = rng.uniform(-25.0, 40.0)
    return np.clip(local + gain * (img - local) + offset, 0, 255).astype(np.uint8)


def _intensity_texture(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image itself, darker (three times in four: pits and cracks are mostly shadowed) or brighter."""
    gain = rng.uniform(0.15, 0.6) if rng.random() < 0.75 else rng.uniform(1.4, 2.2)
    return np.clip(image.astype(np.float32) * gain + (0 if gain < 1 else 20), 0, 255).astype(np.uint8)


def _is_grey(image: np.ndarray) -> bool:
    """Whether an RGB uint8 image is grey (all three channels equal)."""
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))


SHAPES = ("blob", "pit", "crack")


# ----------------------------------------------------------------------------------------------- synthesis
@dataclass
class SyntheticConfig:
    """Knobs of :class:`AnomalySynthesizer`."""

    opacity: tuple[float, float] = (0.5, 1.0)  # range of the foreign texture's weight inside the mask
    source_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)  # donor image / own shuffled tiles / packaged
    max_area: float = 0.25  # largest Perlin mask, fraction of the image (finish bands: _BAND_AREA)
    small_fraction: float = 0.5  # share of masks cut down to one to three connected pieces (small defects)
    min_feature_px: int = 12  # finest Perlin cell: thinner streaks vanish in the 8-px blocks the labels use
    min_area_px: int = 48  # smallest mask, about the area that can make an 8x8 block positive
    min_contrast: float = 12.0  # mean |change| in grey levels inside the mask; fainter pastes are redrawn
    foreground_threshold: float = 0.5  # resized foreground map must be strictly above this
    tile_grid: int = 8  # tiles per axis for source (b)
    # how often each mask shape is drawn: Perlin blob (foreign texture) / small pits / thin cracks (the last two
    # darken or brighten the image itself, as real pits and cracks do)
    shape_weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    # a grey image (R = G = B) gets its foreign texture in grey too: a grey product never shows colour, and a colour
    # shift the Swin learns to flag teaches it nothing about the product's real defects
    match_colour: bool = False
    # share of anomalies that are finish bands (:func:`band_mask` filled by :func:`_finish_texture`), drawn before
    # the shape above: two normal finishes on one part, as an "uneven" surface shows
    band_fraction: float = 0.0


def _validate(cfg: SyntheticConfig) -> None:
    lo, hi = cfg.opacity
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"opacity must satisfy 0 <= lo <= hi <= 1, got {cfg.opacity}")
    if len(cfg.source_weights) != 3 or min(cfg.source_weights) < 0 or sum(cfg.source_weights) <= 0:
        raise ValueError(f"source_weights must be three non-negative numbers with a positive sum, "
                         f"got {cfg.source_weights}")
    if not 0.0 < cfg.max_area <= 1.0:
        raise ValueError(f"max_area must be in (0, 1], got {cfg.max_area}")
    if cfg.tile_grid < 1:
        raise ValueError(f"tile_grid must be >= 1, got {cfg.tile_grid}")
    if len(cfg.shape_weights) != 3 or min(cfg.shape_weights) < 0 or sum(cfg.shape_weights) <= 0:
        raise ValueError(f"shape_weights (blob, pit, crack) must be three non-negative numbers with a positive sum, "
                         f"got {cfg.shape_weights}")
    if not 0.0 <= cfg.band_fraction <= 1.0:
        raise ValueError(f"band_fraction must be in [0, 1], got {cfg.band_fraction}")


class AnomalySynthesizer:
    """Turns a good image into ``(anomalous image, exact mask)`` by blending a foreign texture into a Perlin mask."""

    def __init__(self, donors: list[np.ndarray], config: SyntheticConfig | None = None, seed: int = 0) -> None:
        """``donors``: other good images (RGB or grey uint8, any size) used as foreign texture (a).  The packaged
        skimage textures (c) are loaded once per process; without donors/textures their weight goes to (b)."""
        self.config = config if config is not None else SyntheticConfig()
        _validate(self.config)
        self.donors = [_as_rgb_uint8(d, f"donor {i}") for i, d in enumerate(donors)]
        self.textures = packaged_textures() if self.config.source_weights[2] > 0 else ()
        weights = np.asarray(self.config.source_weights, np.float64)
        weights *= [bool(self.donors), True, bool(self.textures)]
        if weights.sum() <= 0:
            weights = np.array([0.0, 1.0, 0.0])
        self._weights = weights / weights.sum()
        shapes = np.asarray(self.config.shape_weights, np.float64)
        self._shape_weights = shapes / shapes.sum()
        self._rng = np.random.default_rng(seed)

    # --------------------------------------------------------------------------------------- texture sources
    def _donor_texture(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        donor = self.donors[int(rng.integers(len(self.donors)))]
        crop = _flip_rotate(_random_crop(donor, h, w, (0.5, 1.0), rng), rng)
        return _jitter(_resize(crop, h, w), rng)

    def _tile_texture(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        g = max(1, min(self.config.tile_grid, h, w))
        th, tw = h // g, w // g
        tiles = image[: g * th, : g * tw].reshape(g, th, g, tw, 3).swapaxes(1, 2).reshape(g * g, th, tw, 3)
        tiles = tiles[rng.permutation(g * g)]
        if rng.random() < 0.5:  # rotate tiles too (by 90 degree steps if square, else only by 180)
            ks = rng.integers(0, 4, g * g) if th == tw else 2 * rng.integers(0, 2, g * g)
            for k in (1, 2, 3):
                sel = ks == k
                if sel.any():
                    tiles[sel] = np.rot90(tiles[sel], k, axes=(1, 2))
        out = tiles.reshape(g, g, th, tw, 3).swapaxes(1, 2).reshape(g * th, g * tw, 3)
        return _resize(np.ascontiguousarray(out), h, w)

    def _packaged_texture(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        _, tex = self.textures[int(rng.integers(len(self.textures)))]
        crop = _flip_rotate(_random_crop(tex, h, w, (0.25, 0.75), rng), rng)
        return _jitter(_resize(crop, h, w), rng)

    # --------------------------------------------------------------------------------------- main entry
    def make(
        self, image: np.ndarray, foreground: np.ndarray | None = None, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(augmented RGB uint8 (H, W, 3), mask float32 (H, W) in {0, 1})`` for ``image`` (RGB or grey
        uint8).

        ``foreground``: optional float map in [0, 1] of any size (e.g. a 32x32 block map), resized to (H, W) with
        INTER_LINEAR; the mask is confined to pixels strictly above ``config.foreground_threshold``.  The mask is
        exactly the set of pixels where the blend ``(1 - beta) * image + beta * texture`` (beta ~ U(opacity)) was
        applied; outside it the output equals the input.  If no mask pixel can be placed on the foreground (e.g.
        it is empty) the image is returned unchanged with an all-zero mask.  ``rng`` defaults to the instance's
        own generator seeded in ``__init__``.
        """
        rng = self._rng if rng is None else rng
        img = _as_rgb_uint8(image, "image")
        if img is image:
            img = img.copy()
        h, w = img.shape[:2]
        empty = np.zeros((h, w), np.float32)
        max_px = self.config.max_area * h * w
        if max_px < 1:
            return img, empty

        fg = None
        if foreground is not None:
            fmap = np.asarray(foreground, np.float32)
            if fmap.ndim != 2 or min(fmap.shape) < 1:
                raise ValueError(f"foreground must be a 2-D map, got shape {fmap.shape}")
            if fmap.shape != (h, w):
                fmap = cv2.resize(fmap, (w, h), interpolation=cv2.INTER_LINEAR)
            fg = fmap > self.config.foreground_threshold
            if not fg.any():
                return img, empty
            if fg.all():
                fg = None
        fg_y, fg_x = np.nonzero(fg) if fg is not None else (None, None)

        mask = None
        min_px = int(min(self.config.min_area_px, max_px))
        max_exp = max(0, int(np.floor(np.log2(max(1.0, min(h, w) / max(1, self.config.min_feature_px))))))
        # no draw at band_fraction 0: a profile without bands makes exactly the anomalies (and cache keys' content)
        # it made before bands existed
        if self.config.band_fraction > 0 and rng.random() < self.config.band_fraction:
            shape = "band"
        else:
            shape = SHAPES[int(rng.choice(3, p=self._shape_weights))] if self._shape_weights[0] < 1 else "blob"
        scale = min(h, w) / 256.0  # pit and crack sizes are given for a 256-px image
        for _ in range(_MAKE_TRIES):
            if shape == "pit":
                m = pit_mask((h, w), rng, (2.5 * scale, 10.0 * scale))
            elif shape == "band":
                m = band_mask((h, w), rng)
            elif shape == "crack":
                m = crack_mask((h, w), rng, (24.0 * scale, 120.0 * scale), (1, max(1, round(3 * scale))))
            else:
                m = perlin_mask((h, w), rng, max_scale_exp=max_exp, max_area=self.config.max_area,
                                min_area_px=min_px, keep_components_prob=self.config.small_fraction)
            if fg is not None:
                # Move the mask so that one of its pixels lands on a random foreground pixel, then confine it.
                my, mx = np.nonzero(m)
                i, j = int(rng.integers(len(my))), int(rng.integers(len(fg_y)))
                m = _shift(m, int(fg_y[j] - my[i]), int(fg_x[j] - mx[i])) * fg
            if m.any():
                mask = m
                break
        if mask is None:  # pragma: no cover - the shift above makes this practically unreachable
            return img, empty

        # A paste that barely changes the pixels would be labelled anomalous while looking normal: redraw the
        # texture and opacity a few times and keep the most visible one.
        sel = mask > 0
        grey = self.config.match_colour and _is_grey(img)
        best, best_change = None, -1.0
        for _ in range(_PASTE_TRIES):
            source = int(rng.choice(3, p=self._weights)) if shape == "blob" else -1
            if shape == "band":
                tex = _finish_texture(img, self.donors, rng)
            elif source == -1:
                tex = _intensity_texture(img, rng)
            elif source == 0:
                tex = self._donor_texture(h, w, rng)
            elif source == 1:
                tex = self._tile_texture(img, rng)
            else:
                tex = self._packaged_texture(h, w, rng)
            if grey and source in (0, 2):  # foreign textures (a donor, a packaged one); the image's own are grey
                tex = cv2.cvtColor(cv2.cvtColor(tex, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            beta = float(rng.uniform(*self.config.opacity))
            blended = cv2.addWeighted(img, 1.0 - beta, tex, beta, 0.0)
            change = float(np.abs(blended[sel].astype(np.int16) - img[sel].astype(np.int16)).mean())
            if change > best_change:
                best, best_change = blended, change
            if change >= self.config.min_contrast:
                break
        np.copyto(img, best, where=sel[..., None])
        return img, sel.astype(np.float32)


# ----------------------------------------------------------------------------------------------- real defects
_TRANSPLANT_RING_PX = 4  # the ring around a defect whose brightness is matched to the target's at the new place


def transplant_defect(source: np.ndarray, mask: np.ndarray, target: np.ndarray, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A real defect (``source`` RGB uint8 and its pixel ``mask``) pasted into another good image ``target`` of
    the same size, flipped at random and moved to a random place where it fits whole.

    Why: ten labelled defects are ten fixed fields, which a fine-tuned model learns by heart (place included);
    the same defects in other images and places teach what the defect looks like.  The defect's brightness is
    matched to the target's around the new place (a ring of a few pixels), and its edge is feathered (2 px at most),
    so the seam does not become the lesson.  Returns ``(image, mask float32 in {0, 1})``, the mask moved with the
    defect; an empty mask returns the target unchanged.
    """
    src = _as_rgb_uint8(source, "source")
    dst = _as_rgb_uint8(target, "target")
    if src.shape != dst.shape or mask.shape != dst.shape[:2]:
        raise ValueError(f"source {src.shape}, mask {mask.shape} and target {dst.shape} must be the same size")
    m = np.asarray(mask) > 0.5
    if not m.any():
        return dst.copy(), np.zeros(m.shape, np.float32)
    if rng.random() < 0.5:
        src, m = src[:, ::-1], m[:, ::-1]
    if rng.random() < 0.5:
        src, m = src[::-1], m[::-1]
    h, w = m.shape
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * _TRANSPLANT_RING_PX + 1,) * 2)
    grown = cv2.dilate(m.astype(np.uint8), k) > 0
    ys, xs = np.nonzero(grown)
    dy = int(rng.integers(0, h - (ys.max() - ys.min()))) - int(ys.min())
    dx = int(rng.integers(0, w - (xs.max() - xs.min()))) - int(xs.min())
    moved = np.stack([_shift(np.ascontiguousarray(src[..., c]), dy, dx) for c in range(3)], -1).astype(np.float32)
    m_new, grown_new = _shift(m, dy, dx), _shift(grown, dy, dx)
    ring = grown_new & ~m_new
    if ring.any():  # the defect's surroundings there as bright as here
        moved += dst[ring].astype(np.float32).mean(0) - moved[ring].mean(0)
    alpha = np.maximum(cv2.GaussianBlur(m_new.astype(np.float32), (5, 5), 1.0), m_new)[..., None]  # 2 px at most
    out = dst.astype(np.float32) * (1.0 - alpha) + moved * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), m_new.astype(np.float32)


# ----------------------------------------------------------------------------------------------- labels
def block_labels(mask: np.ndarray, grid: tuple[int, int], eps_pos: float = 0.5, eps_neg: float = 0.1,
                 min_positive_px: int = 0) -> np.ndarray:
    """Block targets of paper Eq. 15 from a pixel mask (nonzero = defect) of shape (H, W).

    ``grid`` = (h, w) blocks per axis (the output shape); H and W must be divisible by it.  With ``f`` the
    fraction of defective pixels in a block: 1 if ``f > eps_pos``, 0 if ``f < eps_neg``, else -1 (ignored in the
    loss: a partly covered block is neither a clean negative nor a convincing positive).  ``min_positive_px`` > 0
    also makes a block positive when it holds at least that many defective pixels: a thin crack or a small pit
    never covers half a block, and by Eq. 15 alone would never be a positive example.  Returns int8 (h, w).
    """
    if min_positive_px < 0:
        raise ValueError(f"min_positive_px must be >= 0, got {min_positive_px}")
    if not 0.0 <= eps_neg <= eps_pos <= 1.0:
        raise ValueError(f"need 0 <= eps_neg <= eps_pos <= 1, got eps_neg={eps_neg}, eps_pos={eps_pos}")
    m = np.asarray(mask)
    frac = _block_shares(m != 0, grid)
    labels = np.full(frac.shape, -1, np.int8)
    labels[frac > eps_pos] = 1
    labels[frac < eps_neg] = 0
    if min_positive_px > 0:
        labels[frac * (m.shape[0] // frac.shape[0]) * (m.shape[1] // frac.shape[1]) >= min_positive_px] = 1
    return labels


def boundary_ignored(labels: np.ndarray, width: int) -> np.ndarray:
    """Block labels (..., h, w) with each normal block (0) within ``width`` blocks (chessboard distance) of an
    anomalous or ignored one made ignored (-1).

    Around a pasted anomaly the backbone's receptive fields carry it into the neighbouring blocks: their residuals
    are nearly as large as the anomaly's own (MTD, fast profile: median 3.0 against 3.5 times the same block's
    residual on the clean image).  Labelled normal, they teach the Swin to keep a sharp edge that the features do
    not show.  ``width`` 0 returns the labels unchanged."""
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    labels = np.asarray(labels)
    if width == 0 or labels.size == 0:
        return labels.copy()
    marked = (labels != 0).astype(np.uint8).reshape(-1, *labels.shape[-2:])
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    near = np.stack([cv2.dilate(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) for m in marked])
    out = labels.copy()
    out[(near.reshape(labels.shape) != 0) & (labels == 0)] = -1
    return out


def _block_shares(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """float (h, w) the share of each block a boolean (H, W) mask covers; H and W must be divisible by ``grid``."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    gh, gw = int(grid[0]), int(grid[1])
    hh, ww = mask.shape
    if gh < 1 or gw < 1 or hh % gh or ww % gw:
        raise ValueError(f"mask shape {mask.shape} is not divisible by grid {tuple(grid)}")
    return mask.reshape(gh, hh // gh, gw, ww // gw).mean(axis=(1, 3))


def covered_blocks(frac: np.ndarray, share: float) -> np.ndarray:
    """Boolean, the blocks one region covers more than ``share`` of (``frac``: the share of each block it covers).

    A region too thin or too small to cover any block that much (a hairline crack straddling two block columns, a pit
    smaller than a block) gets the blocks it covers at least half as much as its best-covered one instead: the defect
    is there, and a rule that named no block for it would drop the label.  An empty region names none."""
    frac = np.asarray(frac, dtype=np.float64)
    best = float(frac.max()) if frac.size else 0.0
    if best > share:
        return frac > share
    return frac >= 0.5 * best if best > 0 else np.zeros(frac.shape, bool)


def region_blocks(mask: np.ndarray, grid: tuple[int, int], share: float) -> np.ndarray:
    """Boolean (h, w): the union over the mask's 8-connected defect regions of each one's :func:`covered_blocks`, so
    every region names at least one block.  ``mask`` (H, W), nonzero = defect, H and W divisible by ``grid``."""
    from scipy import ndimage

    m = np.asarray(mask) != 0
    out = np.zeros(_block_shares(m, grid).shape, bool)  # also checks the shapes
    regions, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    for r in range(1, n + 1):
        out |= covered_blocks(_block_shares(regions == r, grid), share)
    return out


# ----------------------------------------------------------------------------------------------- preview
def save_sample_grid(samples: list[tuple[np.ndarray, np.ndarray]], path: Path, columns: int = 4,
                     tile: int = 160) -> Path:
    """Write a PNG grid for a person to check the synthetic anomalies: each (image, mask) becomes a ``tile`` x
    ``tile`` picture with the mask outline in red, ``columns`` per row (fewer if there are fewer samples).
    Parent folders are created; returns ``path``."""
    if not samples:
        raise ValueError("no samples to draw")
    if columns < 1 or tile < 1:
        raise ValueError(f"columns and tile must be positive, got {columns}, {tile}")
    cols = min(columns, len(samples))
    rows = math.ceil(len(samples) / cols)
    canvas = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    for k, (image, mask) in enumerate(samples):
        rgb = np.ascontiguousarray(_resize(_as_rgb_uint8(image, f"sample {k}"), tile, tile))
        m = cv2.resize((np.asarray(mask) > 0).astype(np.uint8), (tile, tile), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(rgb, contours, -1, (255, 0, 0), 1)
        r, c = divmod(k, cols)
        canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = rgb
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
