"""USB (UVC) cameras, RTSP streams and video URLs through ``cv2.VideoCapture``.

For benches and cheap stations without GenICam.  ``cv2.VideoCapture.read`` blocks on its own terms
(an RTSP stall can block for the backend's timeout), so ``grab``'s timeout only bounds the pacing wait;
a failed read means the device or stream is gone: :class:`CameraLost`, and the worker reconnects.
"""

from __future__ import annotations

import logging
import re
import time

import cv2

from .frames import CameraLost, Frame, SourceError, SourceStats, wait_until_due
from .replay import bgr_to_rgb

log = logging.getLogger(__name__)


def redact(device: int | str) -> str:
    """The device for names and logs, without the password of a ``scheme://user:password@host`` URL."""
    return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", str(device))


class OpenCVSource:
    """A ``cv2.VideoCapture`` device (index) or URL; ``fps`` asks the device for a rate and paces delivery."""

    triggered = False

    def __init__(self, device: int | str = 0, fps: float | None = None) -> None:
        if fps is not None and fps <= 0:
            raise SourceError(f"opencv fps must be > 0, got {fps}")
        if isinstance(device, str) and device.strip().isdigit():
            device = int(device.strip())  # "0" from a config string means the first USB camera
        self.device = device
        self.fps = fps
        self.name = f"opencv:{redact(device)}"
        self.stats = SourceStats()
        self._cap: cv2.VideoCapture | None = None
        self._counter = 0
        self._next_due = 0.0

    def open(self) -> None:
        if self._cap is not None:
            return
        cap = cv2.VideoCapture(self.device)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.name}: cv2.VideoCapture could not open the device")
        if self.fps is not None:
            cap.set(cv2.CAP_PROP_FPS, float(self.fps))  # a request; files and many streams ignore it
        self._cap = cap
        self._next_due = time.monotonic()
        log.info("%s: opened", self.name)

    def grab(self, timeout_s: float) -> Frame | None:
        """Next frame (paced to ``fps`` when set); None if not due within ``timeout_s``; CameraLost on read failure."""
        cap = self._cap
        if cap is None:
            raise CameraLost(f"{self.name}: not open")
        if self.fps is not None and not wait_until_due(self._next_due, timeout_s):
            return None
        try:
            ok, img = cap.read()
        except cv2.error as exc:
            raise CameraLost(f"{self.name}: read failed ({exc})") from exc
        if not ok or img is None:
            raise CameraLost(f"{self.name}: read failed (device unplugged, stream down or end of file)")
        captured_at, captured_mono = time.time(), time.monotonic()
        try:
            image = bgr_to_rgb(img)
        except (cv2.error, ValueError, IndexError) as exc:
            self.stats.converted_errors += 1
            log.warning("%s: dropped a frame that could not be converted: %s", self.name, exc)
            return None
        if self.fps is not None:
            self._next_due = max(self._next_due + 1.0 / self.fps, captured_mono)
        self._counter += 1
        self.stats.frames += 1
        return Frame(image=image, frame_id=self._counter, captured_at=captured_at, captured_mono=captured_mono,
                     source=self.name)

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            try:
                cap.release()
            except Exception as exc:  # noqa: BLE001
                log.debug("%s: release failed: %s", self.name, exc)
