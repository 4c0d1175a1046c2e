"""systemd integration without libsystemd: ``sd_notify`` datagrams and an honest watchdog.

systemd's ``Type=notify`` protocol is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=VALUE`` lines sent to
``$NOTIFY_SOCKET``; implementing it here keeps the edge image free of ``python-systemd`` / ``sdnotify``.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op, so the service code never branches on it.

The watchdog pings are only worth something if they mean "frames are being inspected": a thread that pings
unconditionally keeps a wedged service alive forever.  :class:`WatchdogPolicy` decides when a ping is honest and
:class:`WatchdogThread` withholds it otherwise, so ``WatchdogSec=`` + ``Restart=on-failure`` restart the service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: camera states in which the camera is up: frames flow or it waits for a trigger (the acquisition worker's
#: ``streaming``/``waiting_trigger``; ``connected`` for sources that report no finer state)
CONNECTED_STATES = frozenset({"streaming", "waiting_trigger", "connected"})
#: camera states of a reconnect in progress; every state not in CONNECTED_STATES (``idle``/``starting`` before
#: the first open, ``finished``, ``stopped``, unknown ones) gets the same grace-then-withhold treatment
RECONNECTING_STATES = frozenset({"connecting", "lost"})


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC=`` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval_s(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The ``WatchdogSec=`` systemd gave us (``$WATCHDOG_USEC``) in seconds; None when not configured.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for: a child that inherited the
    environment must not think it owns the watchdog, so a mismatch with our pid gives None.
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not positive", raw)
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        own = os.getpid() if pid is None else pid
        try:
            if int(wpid) != own:
                log.debug("WATCHDOG_PID=%s is not this process (%d): no watchdog", wpid, own)
                return None
        except ValueError:
            log.warning("ignoring watchdog: WATCHDOG_PID=%r is not a pid", wpid)
            return None
    return usec / 1e6


class SystemdNotifier:
    """Send ``sd_notify`` messages to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket).

    Disabled (``enabled`` False, every method a no-op returning False) when the variable is absent or unusable.
    Sending never raises: a lost status message must not take the inspection service down; the first failure
    is logged as a warning, repeats at debug level until a send succeeds again.
    """

    def __init__(self, address: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if env is None else env
        raw = address if address is not None else self._env.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = self._parse_address(raw) if raw else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @staticmethod
    def _parse_address(raw: str) -> str | bytes | None:
        if raw.startswith("@"):
            return b"\0" + raw[1:].encode()  # Linux abstract namespace
        if raw.startswith("/"):
            return raw
        log.warning("NOTIFY_SOCKET=%r is not supported (expected a path or @abstract): systemd notify off", raw)
        return None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram; True when it went out."""
        if self._address is None:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec by default
                    # never block the caller: a receiver that stops reading (a full datagram queue holds only
                    # net.unix.max_dgram_qlen = 10 messages) must not freeze the service's main loop
                    self._sock.setblocking(False)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                if not self._failing:
                    log.warning("sd_notify to %r failed: %s (repeats logged at debug level)", self._address, exc)
                else:
                    log.debug("sd_notify to %r failed again: %s", self._address, exc)
                self._failing = True
                return False
            if self._failing:
                log.info("sd_notify to %r works again", self._address)
                self._failing = False
            return True

    @staticmethod
    def _status_field(text: str) -> str:
        return "STATUS=" + " ".join(text.splitlines())  # one line: a newline would start a new field

    def ready(self, status: str = "") -> bool:
        """Startup (or a reload) finished: systemd starts the watchdog clock and ``systemctl start`` returns."""
        fields = ["READY=1"]
        if status:
            fields.append(self._status_field(status))
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """Free-form one-line state shown by ``systemctl status``."""
        return self.notify(self._status_field(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """Start of a reload; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd >= 253) to match the message to the
        reload; older systemd and ``Type=notify`` ignore the extra field.
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}")

    def extend_timeout(self, usec: int) -> bool:
        """Ask for ``usec`` more microseconds of start/stop time (a slow bundle load, a long queue flush)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(usec)}")

    @contextlib.contextmanager
    def extending_start(self, what: str, period_s: float = 20.0, extend_s: float = 60.0,
                        max_s: float = 1800.0) -> Iterator[threading.Thread | None]:
        """While a slow start step runs (loading a bundle, building TensorRT plans on a Jetson), ask systemd every
        ``period_s`` for ``extend_s`` more start time and show ``what`` as the status, so the unit's
        ``TimeoutStartSec`` bounds a hang rather than a long build; after ``max_s`` it stops asking, and a step
        that is still running is then a hang that systemd ends.  Yields the keepalive thread (None when disabled)."""
        if not self.enabled:
            yield None
            return
        done = threading.Event()
        until = time.monotonic() + max_s

        def keep_alive() -> None:
            while time.monotonic() < until:
                self.notify(f"EXTEND_TIMEOUT_USEC={int(extend_s * 1e6)}", self._status_field(what))
                if done.wait(period_s):
                    return

        thread = threading.Thread(target=keep_alive, name="start-keepalive", daemon=True)
        thread.start()
        try:
            yield thread
        finally:
            done.set()
            thread.join()

    def watchdog_interval_s(self) -> float | None:
        """``WatchdogSec=`` in seconds from this notifier's environment; None when not configured."""
        return watchdog_interval_s(self._env)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Heartbeat:
    """Last-beat time of a loop (e.g. the inference loop); ``alive(max_age_s)`` feeds the watchdog probe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: float | None = None

    def beat(self) -> None:
        self._last = self._clock()  # a float store: atomic enough across threads

    @property
    def last(self) -> float | None:
        return self._last

    def alive(self, max_age_s: float) -> bool:
        last = self._last
        return last is not None and self._clock() - last <= max_age_s


class WatchdogPolicy:
    """Decide whether a watchdog ping is honest, i.e. whether restarting the service could not help.

    * The inference loop must be alive (its heartbeat recent): a wedged inference thread is exactly what a
      restart fixes, whatever the camera does.
    * Free-run with the camera connected: a frame within ``idle_s`` (counted from the later of the last frame
      and the moment the camera came up, so a freshly reconnected camera gets ``idle_s`` to deliver).  A
      connected camera that delivers nothing is a stuck acquisition; a restart re-opens the device.
    * Trigger mode with the camera connected: healthy without frames.  The line may simply be idle; waiting an
      hour for the next part is not a fault, and a restart would not make a part arrive.
    * Camera reconnecting (``connecting``/``lost``, or any state not in :data:`CONNECTED_STATES`): the service's own
      reconnect loop is the right tool for a short hiccup (cable bump, camera power cycle, switch reboot), and a
      restart would only add a bundle reload on top.  So it stays healthy for a grace period of ``grace_factor
      * idle_s`` (default 3x) from the first probe that saw the camera down.  A camera gone longer stops the
      pings, systemd kills the service after ``WatchdogSec`` and ``Restart=on-failure`` starts it fresh, which
      also clears any wedged transport-layer (GenTL) state that in-process reconnects cannot.

    The grace clock starts when this policy first *observes* the state (probes run every ``WatchdogSec/2``), so
    the camera may have been down up to half an interval longer; that only lengthens the grace slightly.
    Not thread-safe by design: one :class:`WatchdogThread` owns it.
    """

    def __init__(self, idle_s: float, clock: Callable[[], float] = time.monotonic, grace_factor: float = 3.0) -> None:
        if idle_s <= 0:
            raise ValueError(f"idle_s must be positive, got {idle_s}")
        if grace_factor <= 0:
            raise ValueError(f"grace_factor must be positive, got {grace_factor}")
        self.idle_s = float(idle_s)
        self.grace_s = float(grace_factor) * self.idle_s
        self._clock = clock
        self._down_since: float | None = None
        self._up_since: float | None = None

    def healthy(self, last_frame_mono: float | None, camera_state: str, triggered: bool,
                inference_alive: bool) -> tuple[bool, str]:
        """(ping?, why) for the current service state; ``last_frame_mono`` is a ``time.monotonic()`` value."""
        now = self._clock()
        if camera_state in CONNECTED_STATES:
            self._down_since = None
            if self._up_since is None:
                self._up_since = now
        else:
            self._up_since = None
            if self._down_since is None:
                self._down_since = now
        if not inference_alive:
            return False, "inference loop not alive (no recent heartbeat)"
        if self._down_since is not None:
            down_for = now - self._down_since
            if down_for <= self.grace_s:
                return True, f"camera {camera_state} for {down_for:.1f} s (grace {self.grace_s:.0f} s)"
            return False, f"camera {camera_state} for {down_for:.1f} s, beyond the {self.grace_s:.0f} s grace"
        if triggered:
            return True, "camera connected, waiting for triggers"
        up_since = now if self._up_since is None else self._up_since
        if last_frame_mono is not None and last_frame_mono >= up_since:
            idle = now - last_frame_mono
            why = f"last frame {idle:.1f} s ago"
        else:
            idle = now - up_since
            why = f"camera up {idle:.1f} s, no frame yet"
        if idle <= self.idle_s:
            return True, why
        return False, f"no frame for {idle:.1f} s in free-run (limit {self.idle_s:.0f} s)"


class WatchdogThread:
    """Ping the systemd watchdog every half interval while ``policy`` says the service is healthy.

    ``probe()`` returns the keyword arguments of :meth:`WatchdogPolicy.healthy` (``last_frame_mono``,
    ``camera_state``, ``triggered``, ``inference_alive``).  A probe that raises counts as unhealthy: a service
    that cannot even report its state should not vouch for itself.  Withheld pings are logged (warning) and
    shown in ``systemctl status`` (``STATUS=``); the recovery is logged once.  Without a watchdog
    (``interval_s`` None and no ``$WATCHDOG_USEC``) :meth:`start` does nothing and returns False.
    """

    def __init__(self, notifier: SystemdNotifier, policy: WatchdogPolicy, probe: Callable[[], dict[str, Any]],
                 interval_s: float | None = None) -> None:
        self.notifier = notifier
        self.policy = policy
        self.probe = probe
        self.interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s()
        self.pings = 0
        self.withheld = 0
        self.last_ok: bool | None = None
        self.last_reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def period_s(self) -> float | None:
        return None if self.interval_s is None else self.interval_s / 2

    def start(self) -> bool:
        if self.interval_s is None or not self.notifier.enabled:
            log.info("systemd watchdog not configured: no pings")
            return False
        if self._thread is not None:
            return True
        log.info("systemd watchdog every %.1f s (WatchdogSec %.1f s)", self.interval_s / 2, self.interval_s)
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def tick(self) -> bool:
        """One check-and-maybe-ping; True when a ping was sent.  The thread calls it; tests may too."""
        try:
            ok, reason = self.policy.healthy(**self.probe())
        except Exception as exc:  # the probe is service code; its bug must not kill the watchdog thread
            log.exception("watchdog probe failed")
            ok, reason = False, f"probe failed: {exc!r}"
        if ok:
            if self.last_ok is False:
                log.info("watchdog pings resume: %s", reason)
                self.notifier.status(f"healthy again: {reason}")
            self.notifier.watchdog()
            self.pings += 1
        else:
            log.warning("withholding the systemd watchdog ping: %s", reason)
            self.notifier.status(f"unhealthy, watchdog withheld: {reason}")
            self.withheld += 1
        self.last_ok, self.last_reason = ok, reason
        return ok

    def _run(self) -> None:
        assert self.interval_s is not None
        period = self.interval_s / 2
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.tick()
            next_at += period
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspend, overload): do not burst pings to catch up
                next_at, delay = time.monotonic(), 0.0
            if self._stop.wait(delay):
                break
