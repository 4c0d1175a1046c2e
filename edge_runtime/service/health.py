"""``/health`` (JSON) and ``/metrics`` (Prometheus text) over plain HTTP, in a daemon thread.

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
import math
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"


def _finite(obj: Any) -> Any:
    """NaN/Inf become null: ``json.dumps`` would write bare ``NaN``, which strict JSON parsers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


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
            if path == "/health":
                try:
                    body = owner.health()
                    status = 200 if body.get("ok") else 503
                except Exception as exc:
                    log.exception("health endpoint: health() failed")
                    body, status = {"ok": False, "error": f"health check failed: {exc!r}"}, 500
                data = json.dumps(_finite(body), default=str, sort_keys=True).encode()
                self._send(status, JSON_CONTENT_TYPE, data)
            elif path == "/metrics":
                try:
                    text = owner.metrics()
                except Exception as exc:
                    log.exception("health endpoint: metrics() failed")
                    self._send(500, "text/plain; charset=utf-8", f"metrics failed: {exc!r}\n".encode())
                    return
                self._send(200, METRICS_CONTENT_TYPE, text.encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /health or /metrics\n")
        except (BrokenPipeError, ConnectionResetError):
            log.debug("health endpoint: client went away")

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # base-class signature
        log.debug("health endpoint %s: " + format, self.address_string(), *args)


class HealthServer:
    """Serve ``health()`` at ``/health`` (200 when ``["ok"]`` is true, else 503) and ``metrics()`` at ``/metrics``.

    The socket is bound in the constructor (a port in use fails early, before the service reports READY);
    :meth:`start` serves in a daemon thread, :meth:`stop` shuts down and closes.  Usable as a context manager.
    """

    def __init__(self, host: str, port: int, health: Callable[[], dict[str, Any]],
                 metrics: Callable[[], str]) -> None:
        self.health = health
        self.metrics = metrics
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
            log.info("health/metrics endpoint on %s (/health, /metrics)", self.url)
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
