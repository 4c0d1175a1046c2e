"""GenICam cameras through a GenTL producer (.cti) and harvesters.

Why it looks the way it does:

* One :class:`~harvesters.core.Harvester` per open source, reset on close.  A GenTL producer loaded twice in
  one process lists no devices the second time, so the previous source must be closed before a new one
  opens (the worker does that on reconnect) and two sources on the same .cti cannot be open at once.
* ``try_fetch`` returns None both on a timeout and when it drops an incomplete buffer; the acquirer's
  ``INCOMPLETE_BUFFER`` callback tells the two apart, so incomplete buffers are counted, not mistaken for
  timeouts.  A buffer flagged complete but shorter than its image needs (a producer that delivers lost
  packets as a short payload) is dropped and counted the same way.  ``grab`` returns None for them (the
  next call fetches the next buffer), and the reason is logged (the first one, then at most one line per
  ``_DROP_LOG_INTERVAL_S`` with the count): a damaged frame is never inspected, and never stops the stream.
* Buffers are re-queued right after conversion (:func:`to_rgb8` copies), so the driver never starves.
* harvesters installs its own SIGINT handler when an acquirer is created on the main thread (it destroys the
  acquirer instead of raising KeyboardInterrupt); :meth:`GenICamSource.open` restores the previous one.
* harvesters times ``try_fetch``'s timeout with ``time.time()``: after an NTP step backwards a fetch would wait
  until the wall clock caught up (an hour for an hour's step) instead of timing out.  Its module is given the
  monotonic clock instead (:class:`_MonotonicTime`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import types
from pathlib import Path
from typing import Any, Literal

from .frames import CameraLost, Frame, IncompleteBuffer, SourceError, SourceStats
from .pixels import to_rgb8

log = logging.getLogger(__name__)

TriggerMode = Literal["free_run", "software", "hardware"]
GENTL_ENV = "GENICAM_GENTL64_PATH"
# Native wait per GenTL EventGetData call inside harvesters' fetch loop: long enough not to spin a core,
# short enough that a grab overruns its timeout by at most this much.  Frames still arrive immediately.
_EVENT_WAIT_MS = 20
_DROP_LOG_INTERVAL_S = 10.0


def resolve_cti(cti: Path | str | None) -> Path:
    """The producer to load: ``cti`` itself, else the first .cti on ``GENICAM_GENTL64_PATH``."""
    if cti is not None:
        path = Path(cti).expanduser()
        if not path.is_file():
            raise SourceError(f"GenTL producer not found: {path}")
        return path
    env = os.environ.get(GENTL_ENV, "")
    for entry in (e for e in env.split(os.pathsep) if e.strip()):
        path = Path(entry.strip()).expanduser()
        if path.is_file() and path.suffix.lower() == ".cti":
            return path
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".cti" and p.is_file())
            if found:
                return found[0]
    raise SourceError(
        f"no GenTL producer: camera.genicam.cti is not set and {GENTL_ENV}={env!r} names no .cti file "
        "(install the camera vendor's GenTL producer or set camera.genicam.cti)"
    )


def _harvesters() -> tuple[Any, type[Exception], type[Exception]]:
    """Imported lazily: harvesters/genicam are optional (edge extra) and load native libraries."""
    try:
        from genicam.genapi import GenericException as GenApiError
        from genicam.gentl import GenericException as GenTLError
        from harvesters import core
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise SourceError(
            f"GenICam support needs harvesters and genicam (pip install 'weakrest-edge[edge]'): {exc}"
        ) from exc
    if getattr(core, "time", None) is time:
        core.time = _MonotonicTime()
    return core, GenTLError, GenApiError


class _MonotonicTime(types.ModuleType):
    """The ``time`` module as harvesters.core sees it: ``time()`` is the monotonic clock (see the module
    docstring), everything else is the real module's."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return time.monotonic()


class GenICamSource:
    """A GenICam camera: enumerate, configure (pixel format, exposure, trigger), stream, convert to RGB."""

    def __init__(
        self,
        cti: Path | str | None = None,
        serial: str | None = None,
        index: int = 0,
        pixel_format: str | None = None,
        exposure_us: float | None = None,
        trigger: TriggerMode = "free_run",
        trigger_source: str = "Line0",
        fetch_timeout_ms: int = 1000,
        buffers: int = 4,
        lost_after_timeouts: int = 5,
    ) -> None:
        if trigger not in ("free_run", "software", "hardware"):
            raise SourceError(f"trigger must be free_run, software or hardware, got {trigger!r}")
        self.cti = cti
        self.serial = serial
        self.index = index
        self.pixel_format = pixel_format
        self.exposure_us = exposure_us
        self.trigger: TriggerMode = trigger
        self.trigger_source = trigger_source
        self.fetch_timeout_s = fetch_timeout_ms / 1000.0
        self.buffers = buffers
        self.lost_after_timeouts = lost_after_timeouts
        self.triggered = trigger != "free_run"
        self.stats = SourceStats()
        self.name = f"genicam:{serial}" if serial else f"genicam:#{index}"
        self.device_id: str | None = None
        self._h: Any = None
        self._ia: Any = None
        self._incomplete_events = 0
        self._consecutive_timeouts = 0
        self._counter = 0
        self._drops_unlogged: dict[str, int] = {}  # per kind of damage: dropped since its last log line
        self._drop_logged_at: dict[str, float] = {}

    # -- lifecycle -----------------------------------------------------------------------------------------

    def open(self) -> None:
        """Enumerate, pick the device, configure it and start streaming; idempotent."""
        if self._ia is not None:
            return
        core, GenTLError, GenApiError = _harvesters()
        cti = resolve_cti(self.cti)
        h = core.Harvester()
        self._h = h
        try:
            h.add_file(str(cti))
            h.update()
            devices = list(h.device_info_list)
            if not devices:
                raise SourceError(
                    f"GenTL producer {cti} lists no device (not connected, the .cti failed to load, or another "
                    "source in this process already holds this producer)"
                )
            pos = self._select(devices)
            info = devices[pos]
            self.device_id = str(_info(info, "id_") or pos)
            self.name = f"genicam:{self.device_id}"
            config = core.ParameterSet({core.ParameterKey.TIMEOUT_PERIOD_ON_UPDATE_EVENT_DATA_CALL: _EVENT_WAIT_MS})
            self._ia = _keep_sigint(lambda: h.create(pos, config=config))
            incomplete = core.ImageAcquirer.Events.INCOMPLETE_BUFFER
            self._ia.add_callback(incomplete, _callback(core.Callback, self._on_incomplete))
            self._set_buffers()
            self._configure(self._ia.remote_device.node_map)
            self._ia.start()
        except SourceError:
            self.close()
            raise
        except (GenTLError, GenApiError, ValueError, IndexError) as exc:
            self.close()
            raise CameraLost(f"{self.name}: cannot open device ({type(exc).__name__}: {exc})") from exc
        self._consecutive_timeouts = 0
        log.info("%s: streaming (%s, trigger %s)", self.name, self._current_format(), self.trigger)

    def close(self) -> None:
        """Stop, destroy the acquirer and reset the Harvester (unloads the producer); never raises."""
        ia, h = self._ia, self._h
        self._ia = self._h = None
        if ia is not None:
            for step in (ia.remove_callbacks, ia.stop, ia.destroy):
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 - closing a lost device may fail any way it likes
                    log.debug("%s: %s failed while closing: %s", self.name, step.__name__, exc)
        if h is not None:
            try:
                h.reset()
            except Exception as exc:  # noqa: BLE001
                log.debug("%s: Harvester.reset failed: %s", self.name, exc)

    # -- acquisition ---------------------------------------------------------------------------------------

    def grab(self, timeout_s: float) -> Frame | None:
        """Next frame within ``timeout_s``; None on a timeout, an incomplete or an unconvertible buffer.

        Free-run: ``lost_after_timeouts`` consecutive timeouts raise :class:`CameraLost`, as does any
        GenTL/harvesters error during the fetch (cable pulled, device reset, acquirer destroyed).
        """
        ia = self._ia
        if ia is None or not ia.is_valid():
            raise CameraLost(f"{self.name}: not open (or the acquirer turned obsolete)")
        before = self._incomplete_events
        try:
            buffer = ia.try_fetch(timeout=max(float(timeout_s), 1e-3))
        except Exception as exc:  # noqa: BLE001 - harvesters surfaces device loss as many exception types
            raise CameraLost(f"{self.name}: fetch failed ({type(exc).__name__}: {exc})") from exc
        if buffer is None:
            if self._incomplete_events != before:
                self._dropped_incomplete(self._incomplete_events - before, "flagged", "the transport flagged "
                                         "the buffer incomplete (lost packets or a truncated transfer)")
                return None
            self.stats.timeouts += 1
            self._consecutive_timeouts += 1
            if not self.triggered and self._consecutive_timeouts >= self.lost_after_timeouts:
                raise CameraLost(f"{self.name}: no frame in {self._consecutive_timeouts} consecutive fetches "
                                 f"of {timeout_s:g} s")
            return None
        captured_at, captured_mono = time.time(), time.monotonic()
        self._consecutive_timeouts = 0
        try:
            return self._to_frame(buffer, captured_at, captured_mono)
        finally:
            try:
                buffer.queue()
            except Exception as exc:  # noqa: BLE001 - a failed requeue shows up as timeouts / loss next time
                log.warning("%s: could not re-queue a buffer: %s", self.name, exc)

    def software_trigger(self) -> bool:
        """Fire TriggerSoftware; False (with a warning) when the camera has no such command."""
        if self.trigger != "software":
            raise SourceError(f"{self.name}: software_trigger() needs trigger 'software', not {self.trigger!r}")
        ia = self._ia
        if ia is None:
            raise CameraLost(f"{self.name}: not open")
        node = _node(ia.remote_device.node_map, "TriggerSoftware")
        if node is None:
            log.warning("%s: camera has no TriggerSoftware command", self.name)
            return False
        try:
            node.execute()
        except Exception as exc:  # noqa: BLE001
            raise CameraLost(f"{self.name}: TriggerSoftware failed ({exc})") from exc
        return True

    @property
    def node_map(self) -> Any:
        """The camera's GenApi node map for settings this class does not cover (None when closed)."""
        return None if self._ia is None else self._ia.remote_device.node_map

    # -- helpers -------------------------------------------------------------------------------------------

    def _on_incomplete(self) -> None:
        self._incomplete_events += 1

    def _dropped_incomplete(self, n: int, kind: str, why: str) -> None:
        """Count ``n`` dropped incomplete buffers; log why (per ``kind``: the first, then one line per interval)."""
        self.stats.incomplete += n
        self._drops_unlogged[kind] = self._drops_unlogged.get(kind, 0) + n
        now = time.monotonic()
        last = self._drop_logged_at.get(kind)
        if last is None or now - last >= _DROP_LOG_INTERVAL_S:
            log.warning("%s: dropped %d incomplete buffer(s) since the last report (%d in all): %s", self.name,
                        self._drops_unlogged[kind], self.stats.incomplete, why)
            self._drop_logged_at[kind], self._drops_unlogged[kind] = now, 0

    def _to_frame(self, buffer: Any, captured_at: float, captured_mono: float) -> Frame | None:
        try:
            components = buffer.payload.components
            if not components:
                raise SourceError("buffer carries no image component")
            comp = components[0]
            image = to_rgb8(comp.data, comp.data_format, int(comp.width), int(comp.height))
        except IncompleteBuffer as exc:
            self._dropped_incomplete(1, "short", str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - one bad buffer must not stop the stream
            self.stats.converted_errors += 1
            log.warning("%s: dropped a buffer that could not be converted: %s", self.name, exc)
            return None
        self._counter += 1
        try:
            frame_id = int(buffer.module.frame_id)
        except Exception:  # noqa: BLE001 - producers without frame ids
            frame_id = self._counter
        self.stats.frames += 1
        return Frame(image=image, frame_id=frame_id, captured_at=captured_at, captured_mono=captured_mono,
                     source=self.name)

    def _select(self, devices: list[Any]) -> int:
        if self.serial is not None:
            for pos, info in enumerate(devices):
                if self.serial in (str(_info(info, "serial_number")), str(_info(info, "id_"))):
                    return pos
            listed = ", ".join(f"{_info(d, 'serial_number')} ({_info(d, 'id_')})" for d in devices)
            raise SourceError(f"no GenICam device with serial {self.serial!r}; available serials: {listed}")
        if not 0 <= self.index < len(devices):
            listed = ", ".join(f"#{i} {_info(d, 'id_')}" for i, d in enumerate(devices))
            raise SourceError(f"no GenICam device at index {self.index}; available: {listed}")
        return self.index

    def _set_buffers(self) -> None:
        wanted = max(self.buffers, int(self._ia.min_num_buffers))
        if wanted != self.buffers:
            log.warning("%s: %d buffers requested, the producer needs at least %d", self.name, self.buffers, wanted)
        self._ia.num_buffers = wanted

    def _configure(self, nm: Any) -> None:
        if self.pixel_format is not None:
            _set_enum(nm, "PixelFormat", self.pixel_format, self.name, required=True)
        if self.exposure_us is not None:
            if _node(nm, "ExposureAuto") is not None:
                _set_enum(nm, "ExposureAuto", "Off", self.name)
            legacy = _node(nm, "ExposureTime") is None and _node(nm, "ExposureTimeAbs") is not None
            name = "ExposureTimeAbs" if legacy else "ExposureTime"  # SFNC < 2 cameras
            _set_value(nm, name, float(self.exposure_us), self.name)
        if _node(nm, "TriggerSelector") is not None:
            _set_enum(nm, "TriggerSelector", "FrameStart", self.name)
        if self.trigger == "free_run":
            if _node(nm, "TriggerMode") is not None:
                _set_enum(nm, "TriggerMode", "Off", self.name)
            return
        source = "Software" if self.trigger == "software" else self.trigger_source
        _set_enum(nm, "TriggerSource", source, self.name, required=True)
        _set_enum(nm, "TriggerMode", "On", self.name)

    def _current_format(self) -> str:
        node = _node(self._ia.remote_device.node_map, "PixelFormat")
        try:
            return str(node.value) if node is not None else "?"
        except Exception:  # noqa: BLE001
            return "?"


def _callback(base: type, fn: Any) -> Any:
    """A harvesters ``Callback`` calling ``fn``; made here because the base class is imported lazily."""

    class _Callback(base):  # type: ignore[misc, valid-type]
        def emit(self, context: object | None = None) -> None:
            fn()

    return _Callback()


def _keep_sigint(create: Any) -> Any:
    """Run ``create`` and put back the SIGINT handler harvesters replaces on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return create()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return create()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _info(info: Any, key: str) -> Any:
    try:
        return getattr(info, key)
    except Exception:  # noqa: BLE001 - GenTL raises for properties a producer does not report
        return None


def _node(nm: Any, name: str) -> Any:
    try:
        return getattr(nm, name)
    except Exception:  # noqa: BLE001 - absent nodes raise AttributeError or a GenApi exception
        return None


def _writable(node: Any) -> bool:
    from genicam.genapi import is_writable

    try:
        return bool(is_writable(node))
    except Exception:  # noqa: BLE001
        return False


def _set_enum(nm: Any, name: str, value: str, source: str, required: bool = False) -> None:
    """Set an enumeration; a value the camera does not offer is a configuration error when ``required``."""
    node = _node(nm, name)
    if node is None:
        log.warning("%s: camera has no %s node; %s=%s not applied", source, name, name, value)
        return
    try:
        offered = [str(s) for s in node.symbolics]
    except Exception:  # noqa: BLE001
        offered = []
    if offered and value not in offered:
        if required:
            raise SourceError(f"{source}: {name} {value!r} is not offered by the camera; offered: {', '.join(offered)}")
        log.warning("%s: %s %r not offered (offered: %s); left as is", source, name, value, ", ".join(offered))
        return
    _set_value(nm, name, value, source)


def _set_value(nm: Any, name: str, value: Any, source: str) -> None:
    node = _node(nm, name)
    if node is None:
        log.warning("%s: camera has no %s node; %s=%s not applied", source, name, name, value)
        return
    if not _writable(node):
        log.warning("%s: %s is not writable now; %s=%s not applied", source, name, name, value)
        return
    try:
        node.value = value
    except Exception as exc:  # noqa: BLE001 - out of range, locked...: keep streaming with the camera's value
        log.warning("%s: setting %s=%s failed (%s); left as is", source, name, value, exc)
        return
    log.debug("%s: %s=%s", source, name, value)
