"""Decoding and resizing images into the backbone's input tensor (mean/std happen inside the graph)."""

from __future__ import annotations

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


class ImageReadError(ValueError):
    """An image file could not be decoded."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode any image OpenCV reads into uint8 RGB (H, W, 3); grey and 16-bit inputs are converted."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageReadError(f"{path}: not a readable image")
    return to_rgb8(image, source=str(path))


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
