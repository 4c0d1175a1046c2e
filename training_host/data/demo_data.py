"""Offline demo *product dataset* in the MVTec AD folder layout.

Builds a small, deterministic anomaly-detection dataset from images that ship inside the installed
scikit-image package (``skimage.data.brick()``, ``gravel()``, ``grass()``, ``coins()``, ``text()``; all of
them are stored in the package's own ``data`` folder, so no network access is needed), with defects drawn
procedurally and pixel-exact ground-truth masks::

    <out>/train/good/000.png                      defect-free
    <out>/test/good/000.png                       defect-free
    <out>/test/<defect>/000.png                   defective
    <out>/ground_truth/<defect>/000_mask.png      0/255 uint8 mask, same size as the image

Products
--------
``texture``  random crops of a (tinted) brick-wall photo with slight brightness/contrast jitter, flips and
             sensor noise -- a "surface" category like MVTec's carpet/tile.
``object``   a turned metal flange (disc with a centre bore and four bolt holes) whose surface is a gravel
             photo mapped into the shape, on a plain, slightly noisy background; every piece is shifted by a
             few pixels and rotated by a few degrees -- an "object" category like MVTec's metal_nut.

Defects (one folder each): ``scratch`` (thin curved polyline, darker or brighter), ``stain`` (irregular,
noise-bounded blob with changed intensity/colour), ``foreign`` (patch of a different bundled texture pasted
in an irregular shape) and ``crack`` (jagged dark line with a side branch).  For ``object`` the defects lie
on the part (foreground) only.  A mask marks exactly the pixels a defect altered: outside the mask the image
is identical to the defect-free rendering of the same piece.

Run ``python -m training_host.data.demo_data --out DIR`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

PRODUCTS: tuple[str, ...] = ("texture", "object")
DEFECTS: tuple[str, ...] = ("scratch", "stain", "foreign", "crack")

_MARKER = "demo_dataset.json"
_SPLIT_IDS = {"train": 0, "test": 1}
# Minimum defect strength kept in the alpha map; pixels below it are left untouched so that the mask is
# exactly the set of altered pixels.
_ALPHA_CUT = 0.04
# Accepted mask area (fraction of the image) of a single defect; out-of-range draws are redrawn.
_MIN_AREA, _MAX_AREA = 0.0012, 0.03

# Texture host / foreign-texture sources per product (names of skimage.data functions).
_HOST = {"texture": "brick", "object": "gravel"}
_FOREIGN = {"texture": ("gravel", "grass", "coins"), "object": ("brick", "grass", "text")}
# BGR colour gains of the products.
_TINT = {
    "texture": np.array([0.74, 0.86, 1.0], np.float32),
    "object": np.array([0.97, 0.99, 1.0], np.float32),
}


# ----------------------------------------------------------------------------------------------- sources
@functools.cache
def _bundled(name: str) -> np.ndarray:
    """Grayscale float32 [0, 255] image from ``skimage.data`` (files shipped with the package)."""
    import skimage.data

    try:
        img = np.asarray(getattr(skimage.data, name)())
    except Exception as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            f"skimage.data.{name}() is not available offline in this installation: {exc}"
        ) from exc
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
    img = img.astype(np.float32)
    if img.max() <= 1.0:
        img *= 255.0
    img.setflags(write=False)
    return img


def _random_crop(rng, src: np.ndarray, size: int, frac: tuple[float, float]) -> np.ndarray:
    """Square crop of ``frac`` times the shorter side of ``src`` at a random place, resized to ``size``."""
    h, w = src.shape[:2]
    side = int(round(min(h, w) * rng.uniform(*frac)))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = src[y : y + side, x : x + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Smooth Perlin-like noise (sum of upsampled random grids), roughly zero-mean in [-1, 1]."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        gh = max(2, int(math.ceil(h / cell)) + 2)
        gw = max(2, int(math.ceil(w / cell)) + 2)
        grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
        big = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
        oy = int(rng.integers(0, max(1, big.shape[0] - h)))
        ox = int(rng.integers(0, max(1, big.shape[1] - w)))
        out += amp * big[oy : oy + h, ox : ox + w]
        total += amp
        amp *= 0.5
        cell = max(1.5, cell / 2.0)
    return out / total


# ----------------------------------------------------------------------------------------------- products
def _render_texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A defect-free texture crop (float32 BGR, [0, 255]) and its foreground (all ones)."""
    g = _random_crop(rng, _bundled(_HOST["texture"]), size, (0.5, 0.66))
    if rng.random() < 0.5:
        g = g[:, ::-1]
    if rng.random() < 0.5:
        g = g[::-1, :]
    mean = float(g.mean())
    g = (g - mean) * rng.uniform(0.92, 1.08) + mean * rng.uniform(0.94, 1.06)
    img = g[..., None] * _TINT["texture"] + 8.0
    return np.ascontiguousarray(img, dtype=np.float32), np.ones((size, size), np.float32)


def _render_object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A defect-free flange on a plain background (float32 BGR) and its soft foreground alpha."""
    s = size / 256.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Background: plain grey, gentle illumination gradient and low-frequency blotches.
    gy = rng.uniform(-4, 4)
    bg = 58.0 + gy * (yy / size - 0.5) * 2 + 2.5 * _value_noise(rng, size, size, 48 * s, 2)

    # Pose: small shift and rotation per piece.
    cx = size / 2 + rng.uniform(-4, 4) * s
    cy = size / 2 + rng.uniform(-4, 4) * s
    theta = math.radians(rng.uniform(-5, 5))
    X, Y = xx - cx, yy - cy
    r = np.sqrt(X * X + Y * Y)
    R, rh, rb, rpitch = 0.37 * size, 0.13 * size, 0.034 * size, 0.255 * size

    fg = np.clip(R - r + 0.5, 0, 1) * np.clip(r - rh + 0.5, 0, 1)
    bolt_ring = np.zeros_like(r)
    for k in range(4):
        phi = theta + math.pi / 4 + k * math.pi / 2
        d = np.sqrt((X - rpitch * math.cos(phi)) ** 2 + (Y - rpitch * math.sin(phi)) ** 2)
        fg = fg * np.clip(d - rb + 0.5, 0, 1)
        bolt_ring = np.maximum(bolt_ring, np.clip(1.0 - np.abs(d - rb - 1.5 * s) / (1.5 * s), 0, 1))

    # Surface: a gravel crop rotated with the part, smoothed and low contrast, plus lathe marks.
    tex = _random_crop(rng, _bundled(_HOST["object"]), size, (0.45, 0.6))
    rot = cv2.getRotationMatrix2D((cx, cy), -math.degrees(theta), 1.0)
    tex = cv2.warpAffine(tex, rot, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    tex = cv2.GaussianBlur(tex, (0, 0), 1.0 * s)
    tex = (tex - tex.mean()) / (tex.std() + 1e-6)
    surf = 160.0 + 8.0 * tex + 3.0 * np.sin(r * (2 * math.pi / (4.5 * s)))
    surf *= 1.0 - 0.07 * (X + Y) / (R * math.sqrt(2))  # lit from the top-left
    surf += 26.0 * np.clip(1.0 - np.abs(r - (R - 2.5 * s)) / (2.5 * s), 0, 1)  # outer chamfer
    surf -= 30.0 * np.clip(1.0 - np.abs(r - (rh + 2.0 * s)) / (2.0 * s), 0, 1)  # bore bevel
    surf -= 18.0 * bolt_ring
    surf *= rng.uniform(0.96, 1.04)

    gray = bg * (1.0 - fg) + surf * fg
    img = gray[..., None] * _TINT["object"]
    return np.ascontiguousarray(img, dtype=np.float32), fg.astype(np.float32)


_RENDER = {"texture": _render_texture, "object": _render_object}


# ----------------------------------------------------------------------------------------------- defects
def _sample_point(rng: np.random.Generator, allowed: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(allowed)
    i = int(rng.integers(0, len(xs)))
    return float(xs[i]), float(ys[i])


def _walk(rng, start, heading, length, step, jitter, revert) -> np.ndarray:
    """Random-walk polyline: heading drifts (``jitter``) and reverts towards the initial heading."""
    pts = [start]
    h0 = h = heading
    curv = rng.normal(0, 0.04)
    x, y = start
    for _ in range(max(2, int(length / step))):
        h += curv + rng.normal(0, jitter) - revert * (h - h0)
        x += step * math.cos(h)
        y += step * math.sin(h)
        pts.append((x, y))
    return np.asarray(pts, np.float32)


def _draw_lines(size: int, lines: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """Antialiased polylines rendered at 4x and downsampled -> coverage in [0, 1]."""
    ss = 4
    canvas = np.zeros((size * ss, size * ss), np.uint8)
    for pts, thick in lines:
        p = np.round(pts * ss * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [p], False, 255, thickness=int(thick * ss), lineType=cv2.LINE_AA, shift=4)
    return cv2.resize(canvas.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)


def _blob(rng: np.random.Generator, size: int, centre, area: float, rough: float) -> np.ndarray:
    """Irregular elliptical region of about ``area`` pixels with a noisy, soft boundary, in [0, 1]."""
    aspect = rng.uniform(1.0, 2.6)
    a = math.sqrt(area * aspect / math.pi)
    b = area / (math.pi * a)
    ang = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - centre[0], yy - centre[1]
    u = (dx * math.cos(ang) + dy * math.sin(ang)) / a
    v = (-dx * math.sin(ang) + dy * math.cos(ang)) / b
    field = np.sqrt(u * u + v * v) + rough * _value_noise(rng, size, size, max(3.0, 0.9 * b), 3)
    edge = 0.22
    t = np.clip((1.0 + edge - field) / (2 * edge), 0, 1)
    return t * t * (3 - 2 * t)


def _defect_alpha(rng, kind: str, size: int, allowed: np.ndarray, img: np.ndarray, product: str):
    """Alpha (strength map in [0, 1]) and the function turning the clean image into the defective one."""
    n = size * size
    centre = _sample_point(rng, allowed)
    heading = rng.uniform(0, 2 * math.pi)
    s = size / 256.0
    if kind == "scratch":
        length = rng.uniform(0.2, 0.45) * size
        thick = int(rng.choice([1, 2, 2, 3])) * max(1, round(s))
        pts = _walk(rng, centre, heading, length, 3.0 * s, 0.05, 0.02)
        pts -= (pts[-1] - pts[0]) / 2  # centre the stroke on the sampled point
        cover = _draw_lines(size, [(pts, thick)])
        cover *= 0.55 + 0.45 * np.clip(0.5 + _value_noise(rng, size, size, 24 * s, 2), 0, 1)
        if rng.random() < 0.6:
            k = rng.uniform(0.35, 0.55)
            return cover, lambda im: im * (1.0 - k)
        k = rng.uniform(0.35, 0.55)
        return cover, lambda im: im + (235.0 - im) * k
    if kind == "crack":
        length = rng.uniform(0.15, 0.35) * size
        main = _walk(rng, centre, heading, length, 2.0 * s, 0.35, 0.25)
        main -= (main[-1] - main[0]) / 2
        lines = [(main, max(1, round(1.5 * s)))]
        for _ in range(int(rng.integers(1, 3))):
            j = int(rng.integers(len(main) // 4, max(len(main) // 4 + 1, 3 * len(main) // 4)))
            side = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
            branch = _walk(rng, tuple(main[j]), side, length * rng.uniform(0.2, 0.45), 2.0 * s, 0.35, 0.25)
            lines.append((branch, max(1, round(s))))
        cover = _draw_lines(size, lines)
        k = rng.uniform(0.5, 0.68)
        return cover, lambda im: im * (1.0 - k)
    if kind == "stain":
        area = math.exp(rng.uniform(math.log(0.003), math.log(0.014))) * n
        shape = _blob(rng, size, centre, area, 0.35)
        inner = 0.7 + 0.3 * np.clip(0.5 + _value_noise(rng, size, size, 10 * s, 2), 0, 1)
        cover = shape * inner
        if rng.random() < 0.7:  # dark, slightly coloured (oil / rust / discolouration)
            k = rng.uniform(0.25, 0.42)
            tint = np.array([1.0, 0.85, 0.6], np.float32) * rng.uniform(0.7, 1.0) + rng.uniform(0, 0.3)
            return cover, lambda im: im * (1.0 - k * tint)
        k = rng.uniform(0.25, 0.4)  # whitish residue
        return cover, lambda im: im + (230.0 - im) * k
    if kind == "foreign":
        area = math.exp(rng.uniform(math.log(0.004), math.log(0.016))) * n
        shape = _blob(rng, size, centre, area, 0.45)
        src = rng.choice(_FOREIGN[product])
        f = _random_crop(rng, _bundled(str(src)), size, (0.25, 0.6))
        w = shape / max(float(shape.sum()), 1e-6)  # match the patch to the host statistics under it
        host = img.mean(axis=2)
        h_mean = float((w * host).sum())
        h_std = math.sqrt(max(float((w * (host - h_mean) ** 2).sum()), 0.0))
        f_mean = float((w * f).sum())
        f_std = math.sqrt(max(float((w * (f - f_mean) ** 2).sum()), 0.0))
        gain = rng.choice([-1, 1]) * rng.uniform(0.1, 0.25) + 1.0
        f = (f - f_mean) / (f_std + 1e-3) * (h_std * rng.uniform(0.9, 1.5) + 4.0) + h_mean * gain
        colour = img.reshape(-1, 3).mean(axis=0)
        colour = colour / colour.mean() * rng.uniform(0.94, 1.06, 3).astype(np.float32)
        layer = (f[..., None] * colour).astype(np.float32)
        return shape, lambda im: layer
    raise ValueError(f"unknown defect {kind!r}; expected one of {DEFECTS}")


@dataclass
class Sample:
    """One rendered image: ``image`` (uint8 BGR), ``mask`` (uint8 0/255, all zero for good samples),
    ``foreground`` (bool, the product's pixels; all True for ``texture``) and ``clean`` (uint8 BGR, the same
    piece with the same sensor noise but without the defect)."""

    image: np.ndarray
    mask: np.ndarray
    foreground: np.ndarray
    clean: np.ndarray


def make_sample(product: str, defect: str | None, rng: np.random.Generator, size: int = 256) -> Sample:
    """Render one image of ``product`` with ``defect`` (``None`` or ``"good"`` for a defect-free one)."""
    if product not in PRODUCTS:
        raise ValueError(f"unknown product {product!r}; expected one of {PRODUCTS}")
    img, fg_alpha = _RENDER[product](rng, size)
    foreground = fg_alpha > 0.5
    noise = rng.normal(0.0, 2.0, img.shape).astype(np.float32)
    clean = np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)
    if defect in (None, "good"):
        return Sample(clean, np.zeros((size, size), np.uint8), foreground, clean)

    # Defects only where the product is fully present (eroded a little for the object).
    core = (fg_alpha >= 1.0).astype(np.uint8)
    if product == "object":
        core = cv2.erode(core, np.ones((5, 5), np.uint8))
    inner = cv2.erode(core, np.ones((3, 3), np.uint8), iterations=max(1, size // 32))
    allowed = inner if inner.any() else core
    best, best_err = None, math.inf
    for _ in range(30):  # redraw until the defect has a sane, non-trivial area
        alpha, apply = _defect_alpha(rng, defect, size, allowed.astype(bool), img, product)
        alpha = alpha * core
        alpha = np.where(alpha >= _ALPHA_CUT, alpha, 0.0).astype(np.float32)
        frac = np.count_nonzero(alpha) / alpha.size
        err = 0.0 if frac == 0 else max(_MIN_AREA / frac, frac / _MAX_AREA)
        if frac > 0 and err < best_err:
            best, best_err = (alpha, apply), err
        if err and err <= 1.0:
            break
    if best is None:  # pragma: no cover - practically unreachable
        raise RuntimeError(f"could not draw a {defect!r} defect on {product!r} at size {size}")
    alpha, apply = best
    a = alpha[..., None]
    out = np.where(a > 0, img * (1.0 - a) + apply(img) * a, img).astype(np.float32)
    image = np.clip(np.rint(out + noise), 0, 255).astype(np.uint8)
    mask = np.where(alpha > 0, 255, 0).astype(np.uint8)
    return Sample(image, mask, foreground, clean)


# ----------------------------------------------------------------------------------------------- dataset
def _rng(seed: int, product: str, split: str, defect: str, idx: int) -> np.random.Generator:
    key = [int(seed) & 0xFFFFFFFF, PRODUCTS.index(product), _SPLIT_IDS[split],
           (["good", *DEFECTS]).index(defect), int(idx)]
    return np.random.default_rng(np.random.SeedSequence(key))


def _prepare_out(root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        if not (root / _MARKER).is_file():
            raise FileExistsError(f"{root} is not empty and is not a demo dataset; refusing to overwrite it")
        for sub in ("train", "test", "ground_truth"):
            if (root / sub).exists():
                shutil.rmtree(root / sub)
        (root / _MARKER).unlink()
    root.mkdir(parents=True, exist_ok=True)


def _write_png(path: Path, img: np.ndarray) -> None:
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"could not write {path}")


def make_demo_dataset(
    out: str | Path,
    *,
    product: str = "texture",
    n_train: int = 120,
    n_test_good: int = 30,
    n_test_per_defect: int = 15,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Build the demo dataset for ``product`` under ``out`` (MVTec AD layout) and return ``out``.

    Deterministic: the same arguments give byte-identical files.  Every image has its own random stream
    (derived from ``seed``, split, defect type and index), so changing one count does not change the other
    images.  An existing demo dataset at ``out`` is replaced; any other non-empty folder is refused.
    """
    if product not in PRODUCTS:
        raise ValueError(f"unknown product {product!r}; expected one of {PRODUCTS}")
    if size < 64:
        raise ValueError("size must be at least 64")
    if min(n_train, n_test_good, n_test_per_defect) < 0:
        raise ValueError("counts must be non-negative")
    root = Path(out)
    _prepare_out(root)
    plan = [("train", "good", n_train), ("test", "good", n_test_good)]
    plan += [("test", d, n_test_per_defect) for d in DEFECTS]
    counts: dict[str, int] = {}
    areas: list[float] = []
    for split, kind, count in plan:
        img_dir = root / split / kind
        img_dir.mkdir(parents=True, exist_ok=True)
        if kind != "good":
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        width = max(3, len(str(max(count - 1, 0))))
        for i in range(count):
            smp = make_sample(product, kind, _rng(seed, product, split, kind, i), size)
            name = f"{i:0{width}d}"
            _write_png(img_dir / f"{name}.png", smp.image)
            if kind != "good":
                _write_png(root / "ground_truth" / kind / f"{name}_mask.png", smp.mask)
                areas.append(float(np.count_nonzero(smp.mask)) / smp.mask.size)
        counts[f"{split}/{kind}"] = count
    meta = {
        "product": product,
        "seed": seed,
        "size": size,
        "counts": counts,
        "defects": list(DEFECTS),
        "mask_area_fraction": {
            "min": min(areas) if areas else None,
            "median": float(np.median(areas)) if areas else None,
            "max": max(areas) if areas else None,
        },
        "source": "procedural defects on scikit-image bundled images (skimage.data)",
    }
    (root / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return root


def summarize(root: str | Path) -> str:
    """One-line summary of the counts per split/type of a dataset in MVTec layout."""
    root = Path(root)
    parts = []
    for split in ("train", "test"):
        for d in sorted((root / split).iterdir()) if (root / split).is_dir() else []:
            if d.is_dir():
                parts.append(f"{split}/{d.name}={len(list(d.glob('*.png')))}")
    n_masks = len(list((root / "ground_truth").glob("*/*_mask.png")))
    return f"{root}: " + " ".join(parts) + f" masks={n_masks}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training_host.data.demo_data",
        description="Build an offline demo anomaly-detection dataset (MVTec AD layout) from scikit-image's "
        "bundled images with procedurally drawn defects and masks.",
    )
    p.add_argument("--out", required=True, help="dataset root to create (e.g. data/demo/texture)")
    p.add_argument("--product", choices=PRODUCTS, default="texture")
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-test-good", type=int, default=30)
    p.add_argument("--n-test-per-defect", type=int, default=15)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = make_demo_dataset(
        a.out, product=a.product, n_train=a.n_train, n_test_good=a.n_test_good,
        n_test_per_defect=a.n_test_per_defect, size=a.size, seed=a.seed,
    )
    meta = json.loads((root / _MARKER).read_text())
    med = meta["mask_area_fraction"]["median"]
    extra = f" median_mask_area={100 * med:.2f}%" if med is not None else ""
    print(f"demo dataset [{a.product}] {summarize(root)}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
