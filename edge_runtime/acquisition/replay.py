"""Replay a folder of images or a video file as if it were a camera, at a fixed frame rate.

Used for commissioning and tests without a camera: frames are paced on the monotonic clock so the
service sees a realistic rate, and a non-looping replay ends with :class:`SourceExhausted` (not
:class:`CameraLost`) so the worker stops instead of reconnecting.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np

from ..core.preprocess import ImageReadError, decode_image
from .frames import CameraLost, Frame, SourceError, SourceExhausted, SourceStats, wait_until_due

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm"})


def bgr_to_rgb(img: np.ndarray) -> np.ndarray:
    """OpenCV's BGR / grey / BGRA image to a new H x W x 3 uint8 RGB C-contiguous array."""
    if img.dtype != np.uint8:
        scale = 255.0 / float(np.iinfo(img.dtype).max) if np.issubdtype(img.dtype, np.integer) else 255.0
        img = np.clip(img.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(np.ascontiguousarray(img.reshape(img.shape[:2])), cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


class ReplaySource:
    """Images (sorted, recursive) or a video, delivered at ``fps``; loops unless ``loop`` is False."""

    triggered = False

    def __init__(self, path: Path | str, fps: float = 10.0, loop: bool = True) -> None:
        if fps <= 0:
            raise SourceError(f"replay fps must be > 0, got {fps}")
        self.path = Path(path)
        self.period = 1.0 / float(fps)
        self.loop = loop
        self.name = f"replay:{self.path}"
        self.stats = SourceStats()
        self._files: list[Path] | None = None
        self._cap: cv2.VideoCapture | None = None
        self._open = False
        self._pos = 0
        self._in_pass = 0  # frames delivered since the last wrap (a pass with none would loop forever)
        self._counter = 0
        self._next_due = 0.0

    def open(self) -> None:
        """List the images (or open the video); SourceError when there is nothing to replay."""
        if self._open:
            return
        if not self.path.exists():
            raise SourceError(f"replay path not found: {self.path}")
        if self.path.is_dir():
            files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                exts = " ".join(sorted(IMAGE_EXTENSIONS))
                raise SourceError(f"replay folder {self.path} holds no image ({exts})")
            self._files = files
        elif self.path.suffix.lower() in IMAGE_EXTENSIONS:
            self._files = [self.path]
        else:
            self._cap = self._open_video()
        self._pos = self._in_pass = 0
        self._next_due = time.monotonic()
        self._open = True
        log.info("%s: replaying %s at %.3g fps%s", self.name,
                 f"{len(self._files)} images" if self._files is not None else "a video",
                 1.0 / self.period, " (loop)" if self.loop else "")

    def grab(self, timeout_s: float) -> Frame | None:
        """Next frame when it is due; None if it is not due within ``timeout_s`` (not counted as a timeout)."""
        if not self._open:
            raise CameraLost(f"{self.name}: not open")
        if not wait_until_due(self._next_due, timeout_s):
            return None
        image = self._next_image()
        captured_at, captured_mono = time.time(), time.monotonic()
        # Paced on a fixed schedule; after a stall deliver one frame at once, not a burst to catch up.
        self._next_due = max(self._next_due + self.period, captured_mono)
        self._counter += 1
        self._in_pass += 1
        self.stats.frames += 1
        return Frame(image=image, frame_id=self._counter, captured_at=captured_at, captured_mono=captured_mono,
                     source=self.name)

    def close(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            except Exception as exc:  # noqa: BLE001
                log.debug("%s: release failed: %s", self.name, exc)
        self._cap = None
        self._files = None
        self._open = False

    # -- helpers -------------------------------------------------------------------------------------------

    def _wrap(self) -> None:
        if not self.loop:
            raise SourceExhausted(f"{self.name}: replay finished after {self._counter} frames")
        if self._in_pass == 0:
            raise SourceError(f"{self.name}: nothing readable to replay")
        self._in_pass = 0
        self._pos = 0

    def _next_image(self) -> np.ndarray:
        if self._cap is not None:
            return self._next_video_frame()
        assert self._files is not None
        while True:
            if not self._files:
                raise SourceError(f"{self.name}: no readable image")
            if self._pos >= len(self._files):
                self._wrap()
            path = self._files[self._pos]
            try:
                img = decode_image(path.read_bytes(), str(path), flags=cv2.IMREAD_COLOR)
            except (OSError, ImageReadError) as exc:
                img = None
                why = str(exc)
            if img is None:
                # Counted once: the file is dropped from the list so a loop does not count it again.
                self.stats.converted_errors += 1
                log.warning("%s: skipped unreadable image (%s)", self.name, why)
                del self._files[self._pos]
                continue
            self._pos += 1
            return bgr_to_rgb(img)

    def _next_video_frame(self) -> np.ndarray:
        assert self._cap is not None
        ok, img = self._cap.read()
        if not ok or img is None:
            self._wrap()
            self._cap.release()
            self._cap = self._open_video()
            ok, img = self._cap.read()
            if not ok or img is None:
                raise SourceError(f"{self.name}: video yields no frame after rewinding")
        return bgr_to_rgb(img)

    def _open_video(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.path} as a video (and it is not an image folder)")
        return cap
