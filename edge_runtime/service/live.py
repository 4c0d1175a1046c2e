"""The live operator page's state: the newest result, server-sent events to browsers and the lazily drawn frame.

Operators look at images, not JSON, so the health server also serves a page (``/`` and ``/live``) that shows the
newest frame with its heatmap and defect boxes, the verdict in large type, counters, stage latencies and the
state of camera, broker and health.  It must cost the inspection loop nothing measurable, hence the split:

- the inference thread calls :meth:`LiveHub.publish`, which stores one reference to the newest result and
  appends it to a bounded deque (counters are plain ints only that thread writes): no lock, no encoding, no
  per-client work, and the same few stores whether anyone watches or not;
- one pump thread, running only while a browser is connected, looks at the newest result at most
  ``rate_hz`` times a second, builds one small JSON event and drops it into every client's one-event slot
  (newest wins), so a browser that reads slowly just skips events;
- each browser's ``/events`` request has its own HTTP thread that takes from its slot and writes; a client
  whose slot stays full for ``stall_s`` (it does not read: its socket buffer is full) is dropped by the pump,
  which shuts its socket down, so a stuck browser never holds anything else up;
- the JPEG (frame + heatmap + boxes scaled to the image) is drawn only when a page asks for
  ``/frame.jpg?seq=N``, on that request's thread, once per event seq (the pump keeps the last few events'
  results, so a page gets exactly the frame of the verdict it shows): at most ``rate_hz`` pictures a second
  whatever the number of clients, and none when nobody watches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..core.overlay import heatmap_overlay

log = logging.getLogger(__name__)

PAGES = Path(__file__).with_name("pages")
#: static files of the page: URL path -> (file in ``pages/``, content type)
STATIC: dict[str, tuple[str, str]] = {
    "/": ("live.html", "text/html; charset=utf-8"),
    "/live": ("live.html", "text/html; charset=utf-8"),
    "/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/live.css": ("live.css", "text/css; charset=utf-8"),
}
#: headers on every page response: the page loads nothing from elsewhere (no CDN) and runs no inline script
PAGE_HEADERS: dict[str, str] = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
}
EVENT_CONTENT_TYPE = "text/event-stream; charset=utf-8"


@dataclass(frozen=True)
class _Latest:
    message: Any  # ResultMessage (seq, verdict, score, threshold, regions, timings_ms, ...)
    image: np.ndarray  # the frame, H x W x 3 uint8 RGB
    heatmap: np.ndarray | None


def render_frame(image: np.ndarray, heatmap: np.ndarray | None, threshold: float | None, regions: Any = (),
                 max_side: int = 720) -> np.ndarray:
    """BGR picture for the page: the frame (shrunk to ``max_side``), the heatmap stretched over it with the
    colour scale of :func:`~edge_runtime.core.overlay.heatmap_overlay`, and the regions (heatmap pixels)
    scaled to the picture and outlined."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w, 1))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = image if scale == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if heatmap is None or threshold is None or not math.isfinite(float(threshold)):
        return cv2.cvtColor(base, cv2.COLOR_RGB2BGR)
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim == 3:
        hm = hm[..., 0]
    out = heatmap_overlay(base, cv2.resize(hm, size, interpolation=cv2.INTER_LINEAR), float(threshold))
    sx, sy = size[0] / hm.shape[1], size[1] / hm.shape[0]
    thick = max(2, round(max(size) / 300))
    for r in regions or ():
        x0, y0 = round(r.x * sx), round(r.y * sy)
        x1, y1 = round((r.x + r.w) * sx) - 1, round((r.y + r.h) * sy) - 1
        cv2.rectangle(out, (x0, y0), (max(x0, x1), max(y0, y1)), (255, 255, 255), thick + 2)  # halo
        cv2.rectangle(out, (x0, y0), (max(x0, x1), max(y0, y1)), (0, 0, 255), thick)
    return out


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), (50, 99))
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}


def json_safe(obj: Any) -> Any:
    """NaN/Inf become null: ``json.dumps`` would write bare ``NaN``, which strict JSON parsers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class LiveClient:
    """One ``/events`` reader: a one-event slot (newest wins) its HTTP thread takes from."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock
        self._cond = threading.Condition()
        self._data: bytes | None = None
        self.full_since: float | None = None  # when the slot last went from empty to full
        self.closed = False
        self.skipped = 0  # events replaced before this client took them

    def offer(self, data: bytes) -> None:
        with self._cond:
            if self._data is None:
                self.full_since = time.monotonic()
            else:
                self.skipped += 1
            self._data = data
            self._cond.notify()

    def take(self, timeout_s: float) -> bytes | None:
        """The pending event, or None after ``timeout_s`` (or once dropped)."""
        with self._cond:
            if self._data is None and not self.closed:
                self._cond.wait(timeout_s)
            data, self._data = self._data, None
            self.full_since = None
            return data

    def stalled(self, now: float, stall_s: float) -> bool:
        since = self.full_since
        return since is not None and now - since > stall_s

    def drop(self) -> None:
        """End this client: wakes its thread and unblocks a write stuck on a full socket buffer."""
        with self._cond:
            self.closed = True
            self._cond.notify()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


class LiveHub:
    """Newest result for the live page, fanned out to at most ``max_clients`` server-sent-event readers.

    ``status()`` is the service's health report (``state``, ``reasons``, ``camera_state``, ``mqtt_connected``,
    ``queue_depth``, ``product``, ``bundle_version``, ``latency_ms``, ...), asked at most once per
    ``status_interval_s`` and only while someone watches.
    """

    def __init__(self, status: Callable[[], Mapping[str, Any]] | None = None, *, broker: str = "",
                 camera: str = "", max_clients: int = 8, rate_hz: float = 5.0, reject_window: int = 100,
                 latency_window: int = 1000, status_interval_s: float = 1.0, stall_s: float = 5.0,
                 resend_s: float = 2.0) -> None:
        self.status = status or dict
        self.broker, self.camera = broker, camera
        self.max_clients = max_clients
        self.period_s = 1.0 / rate_hz
        self.reject_window = reject_window
        self.status_interval_s = status_interval_s
        self.stall_s = stall_s
        self.resend_s = resend_s  # an unchanged state is sent again this often: the page knows it is alive
        # written by the inference thread only (publish); read by the pump and HTTP threads
        self._latest: _Latest | None = None
        self._recent: deque[Any] = deque(maxlen=max(reject_window, latency_window))
        self.inspected = 0
        self.rejected = 0
        self.errors = 0
        # everything below belongs to the HTTP and pump threads
        self._lock = threading.Lock()
        self._clients: list[LiveClient] = []
        self._wake = threading.Event()
        self._pump: threading.Thread | None = None
        self._closed = False
        self._last_event: bytes | None = None
        self._pinned: deque[_Latest] = deque(maxlen=6)  # the results of the last events (pump thread)
        self._jpeg_lock = threading.Lock()
        self._jpegs: dict[int, bytes] = {}
        self.jpeg_encodes = 0
        self.dropped_clients = 0

    # ---- the inference thread ------------------------------------------------------------------------
    def publish(self, message: Any, frame: Any, heatmap: np.ndarray | None) -> None:
        """Called once per result on the inference thread: reference stores and int adds, nothing else."""
        self._recent.append(message)
        self.inspected += 1
        if message.verdict == "fail":
            self.rejected += 1
        elif message.verdict == "error":
            self.errors += 1
        self._latest = _Latest(message, frame.image, heatmap)

    # ---- clients -------------------------------------------------------------------------------------
    @property
    def clients(self) -> int:
        return len(self._clients)

    def connect(self, sock: socket.socket | None = None) -> LiveClient | None:
        """A new ``/events`` reader, or None when ``max_clients`` already read (the caller answers 503)."""
        with self._lock:
            if self._closed or len(self._clients) >= self.max_clients:
                return None
            client = LiveClient(sock)
            self._clients.append(client)
            if self._last_event is not None:
                client.offer(self._last_event)
            if self._pump is None or not self._pump.is_alive():
                self._pump = threading.Thread(target=self._pump_loop, name="live-events", daemon=True)
                self._pump.start()
        self._wake.set()
        return client

    def disconnect(self, client: LiveClient) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        client.drop()

    def close(self) -> None:
        """Drop every client and stop the pump (the health server is stopping)."""
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for c in clients:
            c.drop()
        self._wake.set()

    # ---- the pump ------------------------------------------------------------------------------------
    def _pump_loop(self) -> None:
        """Runs while someone watches: one event per change, at most ``rate_hz`` a second, into every slot."""
        status: Mapping[str, Any] = {}
        status_at = -math.inf
        sent_key: tuple | None = None
        sent_at = -math.inf
        while True:
            with self._lock:
                clients = list(self._clients)
                if not clients or self._closed:
                    self._pump = None
                    return
            now = time.monotonic()
            if now - status_at >= self.status_interval_s:
                status, status_at = self._status(), now
            latest = self._latest
            seq = latest.message.seq if latest is not None else None
            key = (seq, id(status))
            if key != sent_key or now - sent_at >= self.resend_s:
                if latest is not None and (not self._pinned or self._pinned[-1] is not latest):
                    self._pinned.append(latest)
                data = self._encode(self.snapshot(latest, status))
                with self._lock:
                    self._last_event = data
                for c in clients:
                    c.offer(data)
                sent_key, sent_at = key, now
            for c in clients:
                if c.stalled(now, self.stall_s):
                    log.info("live page: dropping a client that does not read its events")
                    self.dropped_clients += 1
                    self.disconnect(c)
            self._wake.wait(self.period_s)
            self._wake.clear()

    def _status(self) -> Mapping[str, Any]:
        try:
            return dict(self.status())
        except Exception as exc:  # noqa: BLE001 - the page shows it; the service goes on
            log.exception("live page: status failed")
            return {"state": "failing", "reasons": [f"status failed: {type(exc).__name__}: {exc}"]}

    @staticmethod
    def _encode(event: Mapping[str, Any]) -> bytes:
        body = json.dumps(json_safe(dict(event)), default=str, separators=(",", ":"))
        seq = event.get("seq")
        head = f"id: {seq}\n" if seq is not None else ""
        return f"{head}data: {body}\n\n".encode()

    def snapshot(self, latest: _Latest | None = None, status: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The event the page renders (also ``/live.json``)."""
        if latest is None:
            latest = self._latest
        if status is None:
            status = self._status()
        while True:
            try:
                recent = list(self._recent)
                break
            except RuntimeError:  # appended to while copied
                continue
        last_n = recent[-self.reject_window:]
        stages: dict[str, list[float]] = {}
        for m in recent:
            for stage, ms in (m.timings_ms or {}).items():
                stages.setdefault(stage, []).append(float(ms))
        event: dict[str, Any] = {
            "seq": None, "verdict": None, "frame": None,
            "inspected": self.inspected, "rejected": self.rejected, "errors": self.errors,
            "window": {"n": len(last_n), "rejected": sum(m.verdict == "fail" for m in last_n),
                       "errors": sum(m.verdict == "error" for m in last_n), "size": self.reject_window},
            "stages_ms": {s: {**_quantiles(v), "n": len(v)} for s, v in stages.items()},
            "end_to_end_ms": status.get("latency_ms"),
            "camera": {"name": self.camera, "state": status.get("camera_state"),
                       "detail": status.get("camera_detail", "")},
            "broker": {"address": self.broker, "connected": status.get("mqtt_connected"),
                       "queue_depth": status.get("queue_depth")},
            "health": {"state": status.get("state"), "reasons": list(status.get("reasons") or ())},
            "product": status.get("product"), "bundle_version": status.get("bundle_version"),
            "dropped_frames": status.get("dropped_frames"), "clients": len(self._clients),
            "server_time": time.time(),
        }
        if latest is not None:
            m = latest.message
            event.update({"seq": m.seq, "frame_id": m.frame_id, "verdict": m.verdict, "score": m.score,
                          "threshold": m.threshold, "captured_at": m.captured_at, "regions": len(m.regions),
                          "over_budget": m.over_budget, "error": m.error, "frame": m.seq,
                          "heatmap": latest.heatmap is not None, "result_product": m.product,
                          "result_bundle_version": m.bundle_version})
        return event

    # ---- the picture ---------------------------------------------------------------------------------
    def frame_jpeg(self, seq: int | None = None, quality: int = 80) -> tuple[int, bytes] | None:
        """(seq, JPEG) of an event's result (the newest event's when ``seq`` is None), None when that result is
        no longer (or not yet) kept.  Drawn on the asking HTTP thread, once per seq however many pages ask."""
        pinned = list(self._pinned)
        if seq is None:  # a script's plain /frame.jpg: the newest result, whether or not a page watches
            latest = self._latest
            if latest is None:
                return None
        else:
            latest = next((p for p in reversed(pinned) if p.message.seq == seq), None)
            if latest is None:
                return None
        seq = int(latest.message.seq)
        with self._jpeg_lock:
            data = self._jpegs.get(seq)
            if data is None:
                m = latest.message
                picture = render_frame(latest.image, latest.heatmap, m.threshold, m.regions)
                ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not ok:
                    return None
                data = self._jpegs[seq] = encoded.tobytes()
                self.jpeg_encodes += 1
                kept = {int(p.message.seq) for p in pinned}
                for old in [k for k in self._jpegs if k not in kept]:
                    del self._jpegs[old]
            return seq, data


def static_file(path: str) -> tuple[bytes, str] | None:
    """(bytes, content type) of a page file for a URL path, None if it is not one."""
    entry = STATIC.get(path)
    if entry is None:
        return None
    name, ctype = entry
    return (PAGES / name).read_bytes(), ctype
