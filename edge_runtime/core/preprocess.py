"""Decoding and resizing images into the backbone's input tensor (mean/std happen inside the graph)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

#: file suffixes treated as images when a folder is scanned
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"})


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted; other files (notes, logs) are not images and are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


#: images above this many pixels are refused from their header, before anything is decoded: a small file can
#: declare a huge image (a decompression bomb); 100 MP is far above any inspection camera
MAX_IMAGE_PIXELS = 100_000_000


class ImageReadError(ValueError):
    """An image file could not be decoded."""


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding pixels (Pillow reads headers lazily); None when
    Pillow does not know the format (OpenCV then decodes it under its own pixel limit)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb warning: we decide in decode_image
            with Image.open(io.BytesIO(data)) as im:
                return int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError as exc:  # far above Pillow's own limit: it would not even say the size
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        return (int(pixels.group(1)), 1) if pixels else (2**62, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def decode_image(data: bytes, source: str = "image", max_pixels: int = MAX_IMAGE_PIXELS,
                 flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode image bytes with OpenCV after checking the size the header declares; :class:`ImageReadError`
    names the source and the problem (empty, not an image, too large, undecodable)."""
    if not data:
        raise ImageReadError(f"{source}: empty file")
    size = _declared_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        shown = f"{size[0]}x{size[1]}" if size[1] > 1 else f"{size[0]:,}"
        raise ImageReadError(f"{source}: declares {shown} pixels, more than the {max_pixels:,} accepted (refused "
                             "before decoding)")
    if size is not None and 0 in size:
        raise ImageReadError(f"{source}: declares an empty image ({size[0]}x{size[1]})")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise ImageReadError(f"{source}: not a readable image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise ImageReadError(f"{source}: not a readable image (truncated, corrupt or an unknown format)")
    if image.size > 4 * max_pixels:  # a format Pillow could not read the header of
        raise ImageReadError(f"{source}: {image.shape[1]}x{image.shape[0]} pixels, more than {max_pixels:,}")
    return image


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode any image OpenCV reads into uint8 RGB (H, W, 3); grey and 16-bit inputs are converted."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return to_rgb8(decode_image(data, str(path), max_pixels), source=str(path))


def to_rgb8(image: np.ndarray, source: str = "frame") -> np.ndarray:
    """Normalise a decoded OpenCV image (grey, BGR, BGRA; 8 or 16 bit) to uint8 RGB."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(f"{source}: unsupported pixel type {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ImageReadError(f"{source}: unsupported image shape {image.shape}")


def resize_rgb(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Stretch-resize uint8 RGB to the input size (area filter when shrinking, bilinear when growing)."""
    height, width = size_hw
    if image.shape[:2] == (height, width):
        return image
    shrink = image.shape[0] > height or image.shape[1] > width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_input_tensor(image_rgb: np.ndarray, size_hw: tuple[int, int], scale: float = 1.0 / 255.0) -> np.ndarray:
    """uint8 RGB (any size) -> float32 (1, 3, H, W) scaled to [0, 1], ready for the backbone graph."""
    resized = resize_rgb(image_rgb, size_hw)
    return (resized.transpose(2, 0, 1)[None].astype(np.float32) * np.float32(scale))
