"""``/health``, ``/health/live`` (JSON) and ``/metrics`` (Prometheus text) over plain HTTP, in a daemon thread.

The health body says ``"state"``: ``ok``, ``degraded`` (the process works but verdicts may not reach the MES, or
reach it late: broker unreachable, results waiting in the queue, results held in memory because the queue's disk
refuses writes, camera not streaming, an output not ok) or
``failing`` (the inference thread is dead or stalled: only a restart helps), with ``"reasons"`` in plain words
and ``"ok"`` = (state == "ok").  HTTP status codes, one for each audience:

=================  ====  ========  =======  ==========================================================
path               ok    degraded  failing  for
=================  ====  ========  =======  ==========================================================
``/health``        200   503       503      a monitor: is every verdict reaching the MES?
``/health/live``   200   200       503      a supervisor that restarts a dead process (not a broker outage)
``/metrics``       200   200       200      Prometheus; ``weakrest_health_state{state=...}`` is 1 for the state
=================  ====  ========  =======  ==========================================================

With a ``live`` hub (:class:`~edge_runtime.service.live.LiveHub`, which the service always gives) the same server
also serves the operator's live page: ``/`` and ``/live`` (HTML, with ``/live.js`` and ``/live.css``), ``/events``
(server-sent events: one small JSON per result, throttled; 503 beyond the hub's client limit), ``/frame.jpg`` (the
newest frame with heatmap and defect boxes, drawn only when asked) and ``/live.json`` (one event, for scripts).

Both health paths answer 500 when computing the report itself fails.  A ``health()`` callable that returns no
``"state"`` is judged by its ``"ok"`` alone (true: ok, else failing).

The standard library's :class:`~http.server.ThreadingHTTPServer` is enough for a scrape every few seconds and
keeps the edge image free of a web framework.  The server binds whatever host the config names (default
``127.0.0.1``: the endpoint has no authentication, so exposing it beyond loopback is a deliberate config choice,
e.g. for a Prometheus on the line network).

``port=0`` here binds an ephemeral port (tests read :attr:`HealthServer.port`); ``health.port: 0`` in the edge
config means "no endpoint", and it is the service that then does not construct a server at all.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .live import EVENT_CONTENT_TYPE, PAGE_HEADERS, LiveHub, json_safe, static_file
from .metrics import HEALTH_STATES  # noqa: F401  (re-exported: the states, best first)

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

#: camera states in which frames can flow (the acquisition worker's, plus ``connected`` for simple sources);
#: the same set as ``notify.CONNECTED_STATES``, not imported so this module stays free of the watchdog code
CAMERA_UP_STATES = frozenset({"streaming", "waiting_trigger", "connected"})


def assess(*, inference_problem: str | None = None, broker: str = "", mqtt_connected: bool = True,
           queue_depth: int = 0, queue_age_s: float | None = None, queue_degraded_s: float = 10.0,
           queue_disk_error: str | None = None, queue_held: int = 0, queue_dir: str = "",
           camera: str = "camera", camera_state: str = "streaming", camera_detail: str = "",
           sinks: Mapping[str, Mapping[str, object]] | None = None) -> tuple[str, list[str]]:
    """(state, reasons) from what the service knows; pure, so every rule is testable without threads.

    ``inference_problem`` is None while the inference thread is alive, else why not (failing).  Everything else
    only degrades: the process can recover on its own (broker back, camera reconnected, queue drained).
    """
    reasons: list[str] = []
    if inference_problem:
        reasons.append(inference_problem)
    if not mqtt_connected:
        where = f" {broker}" if broker else ""
        reasons.append(f"not connected to the MQTT broker{where}: results wait in the on-disk queue, "
                       "no verdict reaches the MES")
    if queue_disk_error:
        where = f" {queue_dir}" if queue_dir else ""
        reasons.append(f"the result queue's disk{where} refuses writes ({queue_disk_error}): {queue_held} result(s) "
                       "held in memory only, lost if the service stops; they go to disk once it takes writes again")
    if queue_depth > 0 and queue_age_s is not None and queue_age_s > queue_degraded_s:
        reasons.append(f"{queue_depth} result(s) queued, the oldest for {queue_age_s:.0f} s (more than "
                       f"health.queue_degraded_s = {queue_degraded_s:g} s): verdicts reach the MES late")
    if camera_state not in CAMERA_UP_STATES:
        words = {"connecting": "connecting", "starting": "not started yet", "idle": "not started yet",
                 "finished": "finished (no more frames)"}
        detail = f" ({camera_detail})" if camera_detail else ""
        after = ", reconnecting" if camera_state == "lost" else ""
        reasons.append(f"camera {camera} {words.get(camera_state, camera_state)}{detail}{after}: "
                       "no frames are inspected")
    for name, health in (sinks or {}).items():
        state = health.get("state")
        if state != "ok":
            many = health.get("reasons")
            why = ("; ".join(map(str, many)) if isinstance(many, (list, tuple)) and many else None) \
                or health.get("reason") or health.get("detail") or health.get("error")
            reasons.append(f"output {name} is {state or 'in an unknown state'}" + (f": {why}" if why else ""))
    state = "failing" if inference_problem else "degraded" if reasons else "ok"
    return state, reasons


def _state_of(body: Mapping[str, object]) -> str:
    state = body.get("state")
    if state in HEALTH_STATES:
        return str(state)
    return "ok" if body.get("ok") else "failing"


#: HTTP status per state, per path (see the module docstring)
STATUS_CODES: dict[str, dict[str, int]] = {
    "/health": {"ok": 200, "degraded": 503, "failing": 503},
    "/health/live": {"ok": 200, "degraded": 200, "failing": 503},
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart by systemd must not fail on a TIME_WAIT socket

    def __init__(self, address: tuple[str, int], owner: HealthServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves socket.getfqdn(host), a DNS lookup that can hang for seconds on a
        # plant network without DNS; the name is only used for CGI, so skip it
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # the default prints a traceback to stderr; log it and keep serving
        log.exception("health endpoint: error serving %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that connects and says nothing does not hold a thread for ever
    server_version = "weakrest-edge"

    def do_GET(self) -> None:  # http.server dispatches on this name
        path = urlsplit(self.path).path
        owner = self.server.owner
        try:
            if path in STATUS_CODES:
                try:
                    body = owner.health()
                    status = STATUS_CODES[path][_state_of(body)]
                except Exception as exc:
                    log.exception("health endpoint: health() failed")
                    body, status = {"ok": False, "error": f"health check failed: {exc!r}"}, 500
                data = json.dumps(json_safe(body), default=str, sort_keys=True).encode()
                self._send(status, JSON_CONTENT_TYPE, data)
            elif path == "/metrics":
                try:
                    text = owner.metrics()
                except Exception as exc:
                    log.exception("health endpoint: metrics() failed")
                    self._send(500, "text/plain; charset=utf-8", f"metrics failed: {exc!r}\n".encode())
                    return
                self._send(200, METRICS_CONTENT_TYPE, text.encode())
            elif owner.live is not None and self._live(path, owner.live):
                pass
            else:
                self._send(404, "text/plain; charset=utf-8",
                           b"not found: try /health, /health/live, /metrics" +
                           (b" or /live\n" if owner.live is not None else b"\n"))
        except (BrokenPipeError, ConnectionResetError):
            log.debug("health endpoint: client went away")

    def _live(self, path: str, live: LiveHub) -> bool:
        """The live page's paths; False for any other path."""
        if path == "/events":
            self._events(live)
        elif path == "/frame.jpg":
            seq = parse_qs(urlsplit(self.path).query).get("seq", [""])[0]
            got = live.frame_jpeg(int(seq) if seq.isdigit() else None)
            if got is None:
                self._send(404, "text/plain; charset=utf-8", b"no such frame (any more): ask for a newer seq\n",
                           PAGE_HEADERS)
            else:
                self._send(200, "image/jpeg", got[1], {**PAGE_HEADERS, "X-Seq": str(got[0])})
        elif path == "/live.json":
            data = json.dumps(json_safe(live.snapshot()), default=str, sort_keys=True).encode()
            self._send(200, JSON_CONTENT_TYPE, data, PAGE_HEADERS)
        else:
            page = static_file(path)
            if page is None:
                return False
            self._send(200, page[1], page[0], PAGE_HEADERS)
        return True

    def _events(self, live: LiveHub) -> None:
        """Server-sent events until the client leaves, is dropped (does not read) or the server stops."""
        client = live.connect(self.connection)
        if client is None:
            self._send(503, "text/plain; charset=utf-8",
                       f"too many live pages open (at most {live.max_clients}): close one\n".encode(),
                       {**PAGE_HEADERS, "Retry-After": "5"})
            return
        try:
            # a small send buffer: a client that stops reading fills it in seconds and is dropped
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            self.send_response(200)
            self.send_header("Content-Type", EVENT_CONTENT_TYPE)
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            for name, value in PAGE_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            while not client.closed:
                data = client.take(1.0)
                if data:
                    self.wfile.write(data)
                elif self._peer_closed():
                    break
        except OSError:  # gone, reset, timed out, or shut down by the hub
            log.debug("live page: event client %s ended", self.address_string())
        finally:
            live.disconnect(client)
            self.close_connection = True

    def _peer_closed(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _send(self, status: int, content_type: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # base-class signature
        log.debug("health endpoint %s: " + format, self.address_string(), *args)


class HealthServer:
    """Serve ``health()`` at ``/health`` and ``/health/live`` (status codes: module docstring), ``metrics()`` at
    ``/metrics``, and with ``live`` the live page (module docstring).

    The socket is bound in the constructor (a port in use fails early, before the service reports READY);
    :meth:`start` serves in a daemon thread, :meth:`stop` shuts down and closes.  Usable as a context manager.
    """

    def __init__(self, host: str, port: int, health: Callable[[], dict[str, Any]],
                 metrics: Callable[[], str], live: LiveHub | None = None) -> None:
        self.health = health
        self.metrics = metrics
        self.live = live
        cls = _Server6 if ":" in host else _Server
        self._server = cls((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when constructed with ``port=0``)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="health-http", daemon=True)
            self._thread.start()
            log.info("health/metrics endpoint on %s (/health, /health/live, /metrics%s)", self.url,
                     ", live page /" if self.live is not None else "")
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        if self.live is not None:
            self.live.close()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
