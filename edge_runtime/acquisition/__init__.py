"""Frame sources for the edge service: GenICam cameras, replayed folders/videos, OpenCV devices.

Every source satisfies :class:`FrameSource` and hands out :class:`Frame` objects (H x W x 3 uint8 RGB);
:class:`AcquisitionWorker` keeps one streaming in a thread and reconnects when it is lost.  Typical use::

    worker = AcquisitionWorker(lambda: open_source(cfg.camera), on_frame, on_state,
                               fetch_timeout_s=fetch_timeout_s(cfg.camera),
                               reconnect_initial_s=cfg.camera.reconnect_initial_s,
                               reconnect_max_s=cfg.camera.reconnect_max_s)
    worker.start()

No torch here; harvesters/genicam are imported only when a GenICam source opens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .frames import CameraLost, Frame, FrameSource, IncompleteBuffer, SourceError, SourceExhausted, SourceStats
from .genicam import GenICamSource, resolve_cti
from .opencv_source import OpenCVSource
from .pixels import SUPPORTED_FORMATS, to_rgb8
from .replay import ReplaySource
from .worker import AcquisitionWorker

if TYPE_CHECKING:
    from .config import CameraConfig

__all__ = [
    "SUPPORTED_FORMATS",
    "AcquisitionWorker",
    "CameraLost",
    "Frame",
    "FrameSource",
    "GenICamSource",
    "IncompleteBuffer",
    "OpenCVSource",
    "ReplaySource",
    "SourceError",
    "SourceExhausted",
    "SourceStats",
    "fetch_timeout_s",
    "open_source",
    "resolve_cti",
    "to_rgb8",
]


def open_source(cfg: CameraConfig) -> FrameSource:
    """Build the source ``cfg.source`` names, *not yet opened* (``open()`` is idempotent).

    A new, unopened object on every call is what :class:`AcquisitionWorker` needs from its factory:
    it opens it in its thread and builds a fresh one (fresh device enumeration) after a loss.
    """
    if cfg.source == "genicam":
        g = cfg.genicam
        return GenICamSource(cti=g.cti, serial=g.serial, index=g.index, pixel_format=g.pixel_format,
                             exposure_us=g.exposure_us, trigger=g.trigger, trigger_source=g.trigger_source,
                             fetch_timeout_ms=g.fetch_timeout_ms, buffers=g.buffers,
                             lost_after_timeouts=g.lost_after_timeouts)
    if cfg.source == "replay":
        if cfg.replay.path is None:
            raise SourceError("camera.replay.path is required when camera.source is 'replay'")
        return ReplaySource(cfg.replay.path, fps=cfg.replay.fps, loop=cfg.replay.loop)
    if cfg.source == "opencv":
        return OpenCVSource(cfg.opencv.device, fps=cfg.opencv.fps)
    raise SourceError(f"unknown camera.source {cfg.source!r}")


def fetch_timeout_s(cfg: CameraConfig) -> float:
    """The grab timeout to run a worker with: the GenICam fetch timeout, else one second.

    Replay and OpenCV sources wait at most this long for a paced frame before returning None, so it
    also bounds how long :meth:`AcquisitionWorker.stop` takes.
    """
    if cfg.source == "genicam":
        return cfg.genicam.fetch_timeout_ms / 1000.0
    return 1.0
