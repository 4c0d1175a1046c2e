"""Pytest fixtures for fleet tests against a real OCI registry: Debian's ``docker-registry`` (the reference
registry, github.com/distribution/distribution) on loopback, with its own config and a temporary storage folder.

``registry``: a running :class:`LocalRegistry` (skips, naming the package, when the binary is missing).
``make_relay(upstream_port)``: a :class:`CuttingRelay` in front of it, a loopback TCP relay that can break off
a blob transfer part-way and then refuse every connection (a registry that goes down in the middle of a pull).

Register with ``pytest_plugins = ["tests.registry_fixtures"]``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from edge_runtime.publishing.broker import free_port

REGISTRY_BINARY = "docker-registry"


def find_registry() -> str | None:
    return shutil.which(REGISTRY_BINARY) or next(
        (p for p in ("/usr/bin/docker-registry", "/usr/sbin/docker-registry") if Path(p).is_file()), None)


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1:<port> with storage in ``workdir``; :meth:`stop`/:meth:`start` again
    keep the stored artifacts."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = find_registry()
        if binary is None:
            raise FileNotFoundError("docker-registry is not installed (apt-get install docker-registry)")
        self.binary, self.workdir, self.port = binary, Path(workdir), port or free_port()
        self.storage = self.workdir / "storage"
        self.config = self.workdir / "config.yml"
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> LocalRegistry:
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump({
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "weakrest-test-registry"},
        }))
        self.log = open(self.workdir / "registry.log", "ab")
        self.proc = subprocess.Popen([self.binary, "serve", str(self.config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}; see "
                                   f"{self.workdir / 'registry.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"docker-registry did not answer on {self.host} within {timeout_s} s")
            time.sleep(0.05)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to alter them behind the registry's back)."""
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "log", None) is not None:
            self.log.close()


class CuttingRelay:
    """A loopback TCP relay to ``upstream``.  While :attr:`cut` is set, a connection that asks for a blob gets
    the first ``cut_after`` bytes of the answer and is then broken off, and from then on every new connection
    is closed at once (the registry is "down") until :meth:`restore`.  ``cuts`` counts broken-off transfers."""

    def __init__(self, upstream_port: int, cut_after: int = 64 * 1024) -> None:
        self.upstream_port, self.cut_after = upstream_port, cut_after
        self.cut = threading.Event()
        self.down = threading.Event()
        self.cuts = 0
        self.refused = 0
        self._cond = threading.Condition()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.cut.clear()
        self.down.clear()

    def wait_cuts(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.cuts < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down.is_set():
                with self._cond:
                    self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            state = {"blob": False}
            threading.Thread(target=self._pipe, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, state, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict, request: bool) -> None:
        sent_after_blob = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if request:
                    if b"/blobs/sha256:" in data and data.startswith(b"GET"):
                        state["blob"] = True
                elif state["blob"] and self.cut.is_set():
                    room = self.cut_after - sent_after_blob
                    if len(data) >= room:
                        dst.sendall(data[:room])
                        self.down.set()
                        with self._cond:
                            self.cuts += 1
                            self._cond.notify_all()
                        break
                    sent_after_blob += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture
def registry(tmp_path) -> Iterator[LocalRegistry]:
    if find_registry() is None:
        pytest.skip("no OCI registry: install Debian's docker-registry (apt-get install docker-registry)")
    reg = LocalRegistry(tmp_path / "registry").start()
    yield reg
    reg.stop()


@pytest.fixture
def make_relay() -> Iterator:
    relays: list[CuttingRelay] = []

    def make(upstream_port: int, **kwargs) -> CuttingRelay:
        relay = CuttingRelay(upstream_port, **kwargs)
        relays.append(relay)
        return relay

    yield make
    for r in relays:
        r.close()
