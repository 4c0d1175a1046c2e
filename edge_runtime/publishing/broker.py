"""A throw-away local MQTT broker for tests and demos: Mosquitto as a subprocess, amqtt as a fallback.

:class:`LocalBroker` starts Mosquitto on 127.0.0.1 on a free port with its own config and log in a temp
folder, and can stop, kill and restart it *on the same port* (to simulate broker outages).  Without a
``mosquitto`` binary it runs the pure-Python ``amqtt`` broker (``pip install amqtt``) in a subprocess
instead; amqtt speaks MQTT 3.1.1 only (see :attr:`LocalBroker.protocols`) and has no persistence.

``python -m edge_runtime.publishing.broker [--port N]`` runs one in the foreground for a demo.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib.util
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

_MOSQUITTO_PLACES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto",
                     "/usr/local/opt/mosquitto/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary: ``$MOSQUITTO``, then ``PATH``, then the usual sbin folders."""
    env = os.environ.get("MOSQUITTO")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in _MOSQUITTO_PLACES if os.access(p, os.X_OK)), None)


def amqtt_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, for a server started a little later.

    Taken outside the kernel's ephemeral range: a port from there (bind to 0, close) can be handed to any
    outgoing connection (an MQTT client's socket) before our server binds it, and the server then fails."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65536) if not low <= p <= high]
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # everything outside is taken: fall back
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalBroker:
    """A local broker subprocess on 127.0.0.1; a context manager.

    ``impl``: "auto" (Mosquitto if installed, else amqtt), "mosquitto" or "amqtt".  ``persistence`` keeps
    sessions and queued messages across a *clean* :meth:`stop` / :meth:`restart` (Mosquitto only).
    ``tls``: (CA, certificate, key) PEM files to serve MQTT over TLS instead of plain TCP (Mosquitto only);
    ``require_certificate`` refuses clients without a certificate from that CA and takes a certificate's CN as
    the user name that ``acl_file`` (a Mosquitto ACL file) is written for.
    """

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, *, impl: Literal["auto", "mosquitto", "amqtt"] = "auto",
                 persistence: bool = False, workdir: str | os.PathLike | None = None,
                 tls: tuple[str | os.PathLike, str | os.PathLike, str | os.PathLike] | None = None,
                 require_certificate: bool = False, acl_file: str | os.PathLike | None = None,
                 start_timeout_s: float = 10.0) -> None:
        mosquitto = find_mosquitto() if impl in ("auto", "mosquitto") else None
        if impl == "mosquitto" and mosquitto is None:
            raise RuntimeError("mosquitto not found (install it: apt-get install mosquitto)")
        if mosquitto is None and not amqtt_available():
            raise RuntimeError("no MQTT broker available: install mosquitto, or amqtt (pip install amqtt)")
        self.impl: Literal["mosquitto", "amqtt"] = "mosquitto" if mosquitto else "amqtt"
        self._binary = mosquitto
        if tls is not None and self.impl != "mosquitto":
            raise RuntimeError("TLS needs mosquitto")
        self.tls = tuple(Path(p).resolve() for p in tls) if tls is not None else None
        if (require_certificate or acl_file is not None) and self.tls is None:
            raise RuntimeError("require_certificate and acl_file need tls (the identity is the certificate's CN)")
        self.require_certificate = require_certificate
        self.acl_file = Path(acl_file).resolve() if acl_file is not None else None
        if persistence and self.impl == "amqtt":
            log.warning("amqtt has no persistence: sessions are lost on restart")
        self.persistence = persistence
        self._own_workdir = workdir is None
        # absolute: the broker is handed paths inside it and may run from another directory
        workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="weakrest-broker-"))
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "broker.log"
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._started_once = False

    @property
    def protocols(self) -> tuple[str, ...]:
        """MQTT protocol versions the broker accepts."""
        return ("5", "3.1.1") if self.impl == "mosquitto" else ("3.1.1",)

    @property
    def protocol(self) -> str:
        """The newest MQTT protocol version the broker accepts (what a client should ask for)."""
        return self.protocols[0]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _write_config(self) -> Path:
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true", "log_dest stdout",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "connection_messages true", "log_timestamp true", "max_queued_messages 100000",
                 f"persistence {'true' if self.persistence else 'false'}"]
        if self.tls is not None:
            ca, cert, key = self.tls
            lines[1:1] = [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if self.require_certificate:
            # a client without a certificate signed by the CA is refused; its CN is its user name for the ACL
            i = lines.index("allow_anonymous true")
            lines[i:i + 1] = ["allow_anonymous false", "require_certificate true", "use_identity_as_username true"]
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.persistence:
            lines.append(f"persistence_location {self.workdir}/")
        if os.geteuid() == 0:
            lines.append(f"user {getpass.getuser()}")  # do not drop to 'mosquitto', which cannot write here
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return conf

    def _command(self) -> list[str]:
        if self.impl == "mosquitto":
            return [str(self._binary), "-c", str(self._write_config())]
        return [sys.executable, "-m", "edge_runtime.publishing.broker", "--amqtt-child", "--port", str(self.port)]

    def start(self) -> LocalBroker:
        """Start the broker and wait until it accepts connections; retries while the port is still busy."""
        if self.running:
            return self
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            self._spawn()
            if self._wait_ready(deadline):
                self._started_once = True
                return self
            self._reap()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.impl} did not start on port {self.port}:\n{self.read_log()[-2000:]}")
            if not self._fixed_port and not self._started_once:
                self.port = free_port()  # someone took the port between free_port() and bind
            time.sleep(0.1)

    def _spawn(self) -> None:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - held while the process lives
        env = dict(os.environ)
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(self._command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=self.workdir)

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if _port_open(self.host, self.port):
                return True
            time.sleep(0.02)
        return False

    def _reap(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is read or acknowledged."""
        if self.running:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Clean shutdown (SIGTERM; Mosquitto then saves its persistence file).  Also ends a paused broker."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            self._proc.send_signal(signal.SIGCONT)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("broker pid %d ignored SIGTERM for %.1f s: killing it", self._proc.pid, timeout_s)
        self._reap()

    @property
    def persistence_file(self) -> Path:
        """Where Mosquitto keeps sessions and queued messages (with ``persistence``)."""
        return self.workdir / "mosquitto.db"

    def checkpoint(self, timeout_s: float = 10.0) -> None:
        """Make Mosquitto write its persistence file now (SIGUSR1) and wait until it has.

        Mosquitto saves only every ``autosave_interval`` (30 min by default) and at a clean stop, so a broker
        SIGKILLed before its first save restarts without the sessions of its subscribers."""
        if self.impl != "mosquitto" or not self.persistence:
            raise RuntimeError("checkpoint needs Mosquitto with persistence")
        path = self.persistence_file
        before = path.stat().st_mtime_ns if path.exists() else None
        self._proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while not (path.exists() and path.stat().st_mtime_ns != before):
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto did not write {path} within {timeout_s} s")
            time.sleep(0.02)

    def kill(self) -> None:
        """Abrupt death (SIGKILL): no goodbye to clients, no persistence save."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def restart(self) -> LocalBroker:
        """Start again on the same port (after :meth:`stop` or :meth:`kill`, or stop first)."""
        self.stop()
        return self.start()

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalBroker({self.impl}, port={self.port}, running={self.running})"


def _run_amqtt(port: int) -> None:
    """Child process body of the amqtt fallback: serve until SIGTERM."""
    import asyncio

    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def serve() -> None:
        broker = Broker(config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 3)

    asyncio.run(serve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local MQTT broker (Mosquitto, or amqtt as a fallback).")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--impl", choices=["auto", "mosquitto", "amqtt"], default="auto")
    parser.add_argument("--amqtt-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.amqtt_child:
        _run_amqtt(args.port)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through the with block: stops the broker
    with LocalBroker(args.port, impl=args.impl) as broker:
        print(f"{broker.impl} listening on {broker.host}:{broker.port} (log {broker.log_path}); Ctrl-C stops it",
              flush=True)
        try:
            while broker.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
