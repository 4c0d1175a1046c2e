"""Reading a folder of calibration frames once, and refusing a set that cannot come from one camera.

Why a separate pass: a field set mixing grey and colour frames, or frames of different sizes, means
frames from another camera (or a crop tool) got in; the bank would silently absorb them.  So every frame
is decoded once here, its file hashed (the new bundle records the hashes), its size and pixel format
compared with the rest, and it is kept already resized to the bundle's input (a few hundred KiB each),
so the fit never decodes it again.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.core.preprocess import ImageReadError, decode_image, list_images, resize_rgb, to_rgb8

from .errors import CalibrationError

#: how many offending file names an error message lists before "and N more"
MAX_NAMED = 8


@dataclass(frozen=True)
class LoadedFrame:
    """One calibration frame: its file, file hash, original size/format and the resized RGB image."""

    path: Path
    sha256: str
    size_hw: tuple[int, int]
    pixel_format: str  # e.g. "grey8", "colour8", "grey16"
    image: np.ndarray  # uint8 RGB at the bundle's input size


@dataclass
class FrameSet:
    """The accepted frames (sorted by name) and what was dropped on the way, for the report."""

    frames: list[LoadedFrame]
    duplicates: list[str]  # files identical to an earlier one (dropped, kept first)

    @property
    def digest(self) -> str:
        """sha256 over the sorted per-file sha256s: one value naming the calibration data."""
        return digest_of([f.sha256 for f in self.frames])


def digest_of(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode("ascii")).hexdigest()


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:MAX_NAMED])
    return shown + (f" and {len(paths) - MAX_NAMED} more" if len(paths) > MAX_NAMED else "")


def _pixel_format(image: np.ndarray) -> str:
    grey = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)
    bits = 16 if image.dtype == np.uint16 else 8
    return f"{'grey' if grey else 'colour'}{bits}"


def _decode(path: Path) -> tuple[str, np.ndarray]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path.name}: cannot read ({exc.strerror or exc})") from None
    image = decode_image(data, path.name)
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{path.name}: unsupported pixel type {image.dtype}")
    return hashlib.sha256(data).hexdigest(), image


def load_frames(folder: Path, input_hw: tuple[int, int], min_frames: int, mixed_sizes: bool = False) -> FrameSet:
    """Decode, hash and check every image in ``folder``; :class:`CalibrationError` names the files at fault.

    Refused: fewer than ``min_frames`` images, unreadable files, a mix of grey and colour (or 8/16-bit)
    frames, and (unless ``mixed_sizes``) frames whose size differs from the most common one.  Files
    identical to an earlier one are dropped (a held-out copy of a bank frame would fake a low score).
    """
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: not a folder of frames")
    paths = list_images(folder)
    if len(paths) < min_frames:
        raise CalibrationError(f"{folder}: {len(paths)} images, calibration needs at least {min_frames} good frames")
    frames: list[LoadedFrame] = []
    unreadable: list[str] = []
    duplicates: list[str] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            sha, raw = _decode(path)
            rgb = to_rgb8(raw, source=path.name)
        except ImageReadError as exc:
            unreadable.append(str(exc))
            continue
        if sha in seen:
            duplicates.append(f"{path.name} (= {seen[sha]})")
            continue
        seen[sha] = path.name
        frames.append(LoadedFrame(path, sha, (int(raw.shape[0]), int(raw.shape[1])), _pixel_format(raw),
                                  resize_rgb(rgb, input_hw)))
    if unreadable:
        raise CalibrationError(f"{folder}: {len(unreadable)} unreadable frame(s): {_names(unreadable)}")
    _refuse_minority(folder, frames, lambda f: f.pixel_format, "pixel format",
                     "grey and colour frames (or 8- and 16-bit) cannot come from one camera setting")
    if not mixed_sizes:
        _refuse_minority(folder, frames, lambda f: f"{f.size_hw[1]}x{f.size_hw[0]}", "size",
                         f"frames from one camera share one size; pass --mixed-sizes if the set is meant to mix "
                         f"sizes (every frame is stretched to {input_hw[1]}x{input_hw[0]} anyway)")
    if len(frames) < min_frames:
        raise CalibrationError(f"{folder}: {len(frames)} distinct images after dropping {len(duplicates)} "
                               f"duplicate(s), calibration needs at least {min_frames} good frames")
    return FrameSet(frames=frames, duplicates=duplicates)


def _refuse_minority(folder: Path, frames: list[LoadedFrame], key, what: str, why: str) -> None:
    counts = Counter(key(f) for f in frames)
    if len(counts) <= 1:
        return
    common, n = counts.most_common(1)[0]
    odd = [f"{f.path.name} ({key(f)})" for f in frames if key(f) != common]
    raise CalibrationError(f"{folder}: {len(odd)} frame(s) differ in {what} from the other {n} ({common}): "
                           f"{_names(odd)}; {why}")
