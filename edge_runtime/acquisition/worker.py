"""A daemon thread that keeps a frame source streaming: grab, hand over, reconnect when the camera goes.

Cameras get unplugged, switches reboot, producers hiccup; the service must come back by itself.  On
:class:`CameraLost` (or any :class:`SourceError`) the worker closes the source, backs off exponentially
(interruptible by :meth:`AcquisitionWorker.stop`) and builds a *new* source from the factory, so the
device list is enumerated afresh.  :class:`SourceExhausted` (a finished replay) ends the thread instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import fields

from .frames import Frame, FrameSource, SourceError, SourceExhausted, SourceStats

log = logging.getLogger(__name__)

# States reported through on_state(state, detail) and the ``state`` attribute.
IDLE, CONNECTING, STREAMING, WAITING_TRIGGER, LOST, FINISHED, STOPPED = (
    "idle", "connecting", "streaming", "waiting_trigger", "lost", "finished", "stopped")
_COUNTERS = tuple(f.name for f in fields(SourceStats) if f.name != "reconnects")


class AcquisitionWorker:
    """Runs ``source_factory()`` sources in a thread and calls ``on_frame`` for every frame.

    ``stats`` accumulates over every source the worker has used (the sources' own counters restart on
    each reconnect); ``stats.reconnects`` counts successful re-opens after a loss.  ``on_state`` is called
    on changes only, from the worker thread, with (state, detail); ``last_frame_mono`` is the monotonic
    time of the last frame (None before the first), for watchdogs.
    """

    def __init__(
        self,
        source_factory: Callable[[], FrameSource],
        on_frame: Callable[[Frame], None],
        on_state: Callable[[str, str], None] | None = None,
        fetch_timeout_s: float = 1.0,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        name: str = "acquisition",
    ) -> None:
        if fetch_timeout_s <= 0 or reconnect_initial_s <= 0 or reconnect_max_s < reconnect_initial_s:
            raise ValueError("need fetch_timeout_s > 0 and 0 < reconnect_initial_s <= reconnect_max_s")
        self._factory = source_factory
        self._on_frame = on_frame
        self._on_state = on_state
        self.fetch_timeout_s = fetch_timeout_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.name = name
        self.stats = SourceStats()
        self.state = IDLE
        self.detail = ""
        self.last_frame_mono: float | None = None
        self._source: FrameSource | None = None
        self._base = SourceStats()  # totals of the sources already replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> FrameSource | None:
        """The current source (e.g. for ``software_trigger()``); None between sources."""
        return self._source

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to end and wait; it closes its source itself.  True when it has ended.

        The source is closed by the worker thread, never from here, because GenTL calls must not race a
        fetch in progress; the wait is therefore up to one grab (``fetch_timeout_s``) plus the close.
        """
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("%s: still running %.1f s after stop()", self.name, timeout)
            return False
        return True

    # -- thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.reconnect_initial_s
        had_source = False
        try:
            while not self._stop.is_set():
                self._set_state(CONNECTING)
                try:
                    source = self._factory()
                    self._source = source
                    source.open()
                    if had_source:
                        self.stats.reconnects += 1
                    had_source = True
                    self._sync(source)
                    if self._stream(source):  # returns True after the first frame of this connection
                        delay = self.reconnect_initial_s
                except SourceExhausted as exc:
                    self._set_state(FINISHED, str(exc))
                    return
                except SourceError as exc:  # CameraLost included
                    self._lost(str(exc))
                except Exception as exc:  # noqa: BLE001 - a driver bug must not end acquisition for good
                    log.exception("%s: unexpected error from the source", self.name)
                    self._lost(f"{type(exc).__name__}: {exc}")
                finally:
                    self._retire()
                if self._stop.is_set():
                    break
                if self.state == LOST:
                    log.info("%s: reconnecting in %.2g s", self.name, delay)
                    self._stop.wait(delay)
                    delay = min(delay * 2.0, self.reconnect_max_s)
        finally:
            self._retire()
            if self.state != FINISHED:
                self._set_state(STOPPED)

    def _stream(self, source: FrameSource) -> bool:
        """Grab until stop or an exception; True if at least one frame came."""
        got_frame = False
        self._set_state(WAITING_TRIGGER if source.triggered else STREAMING)
        while not self._stop.is_set():
            frame = source.grab(self.fetch_timeout_s)
            self._sync(source)
            if frame is None:
                if source.triggered:
                    self._set_state(WAITING_TRIGGER)
                continue
            got_frame = True
            self.last_frame_mono = frame.captured_mono
            self._set_state(STREAMING)
            try:
                self._on_frame(frame)
            except Exception:  # noqa: BLE001 - a consumer bug must not stop acquisition
                log.exception("%s: on_frame failed for frame %d", self.name, frame.frame_id)
        return got_frame

    def _lost(self, detail: str) -> None:
        log.warning("%s: source lost: %s", self.name, detail)
        self._set_state(LOST, detail)

    def _retire(self) -> None:
        """Close the current source and fold its counters into the totals."""
        source, self._source = self._source, None
        if source is None:
            return
        try:
            source.close()
        except Exception:  # noqa: BLE001 - close() must not raise, but do not trust it
            log.exception("%s: close() raised", self.name)
        self._sync(source)
        for name in _COUNTERS:
            setattr(self._base, name, getattr(self._base, name) + getattr(source.stats, name))

    def _sync(self, source: FrameSource) -> None:
        for name in _COUNTERS:
            setattr(self.stats, name, getattr(self._base, name) + getattr(source.stats, name))

    def _set_state(self, state: str, detail: str = "") -> None:
        if state == self.state and detail == self.detail:
            return
        self.state, self.detail = state, detail
        if self._on_state is None:
            return
        try:
            self._on_state(state, detail)
        except Exception:  # noqa: BLE001
            log.exception("%s: on_state failed", self.name)
