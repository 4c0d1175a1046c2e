"""What every frame source hands out (:class:`Frame`), how it fails, and what it counts.

The service codes against :class:`FrameSource` only, so a GenICam camera, a replayed folder and an
OpenCV device are interchangeable; failures are split into "fix the configuration" (:class:`SourceError`)
and "the device went away, reconnect" (:class:`CameraLost`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One grabbed image, already converted so the pipeline never sees camera pixel formats."""

    image: np.ndarray  # H x W x 3 uint8, RGB, C-contiguous, owned (never a view of a driver buffer)
    frame_id: int  # the camera's frame/buffer id when it has one, else a per-source counter
    captured_at: float  # time.time() (epoch s) at grab, for results
    captured_mono: float  # time.monotonic() at grab, for latency
    source: str  # e.g. "genicam:VikyTL_DEV_red" or "replay:/path"


def wait_until_due(due_mono: float, timeout_s: float) -> bool:
    """Pacing of file and stream sources: sleep until ``due_mono`` and return True, or, when it is further
    away than ``timeout_s``, sleep the timeout and return False (the grab then returns None)."""
    wait = due_mono - time.monotonic()
    if wait > timeout_s:
        time.sleep(max(timeout_s, 0.0))
        return False
    if wait > 0:
        time.sleep(wait)
    return True


class SourceError(Exception):
    """Bad configuration: producer missing, no such device, unreadable folder, unsupported pixel format..."""


class IncompleteBuffer(SourceError):
    """A buffer that holds less than its image needs (lost packets, a truncated transfer): drop the frame."""


class CameraLost(SourceError):
    """The device went away or stopped delivering: the caller should close, re-enumerate and reconnect."""


class SourceExhausted(SourceError):
    """A non-looping replay delivered its last frame: nothing will come any more, do not reconnect."""


@dataclass
class SourceStats:
    """Monotonic counters; plain ints so other threads (metrics, health) can read them without a lock."""

    frames: int = 0
    incomplete: int = 0  # dropped: flagged incomplete by the transport, or shorter than width x height needs
    timeouts: int = 0
    converted_errors: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@runtime_checkable
class FrameSource(Protocol):
    """A camera-like source; one thread calls open/grab/close, others may read ``stats``."""

    name: str
    stats: SourceStats
    triggered: bool  # frames only come on a trigger: timeouts are then legitimate idleness

    def open(self) -> None:
        """Connect and start delivering; idempotent.  May raise SourceError / CameraLost."""
        ...

    def grab(self, timeout_s: float) -> Frame | None:
        """Next frame, or None when none came within ``timeout_s``.  Raises CameraLost."""
        ...

    def close(self) -> None:
        """Release the device; idempotent, never raises."""
        ...
