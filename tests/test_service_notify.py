"""sd_notify against real datagram sockets, WATCHDOG_USEC parsing, the watchdog policy and thread."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.service.notify import (
    Heartbeat,
    SystemdNotifier,
    WatchdogPolicy,
    WatchdogThread,
    watchdog_interval_s,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, monkeypatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX/SOCK_DGRAM socket standing in for systemd; NOTIFY_SOCKET points at it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    with tempfile.TemporaryDirectory(prefix="wrn-") as d:  # short: sun_path holds 107 bytes
        if request.param == "path":
            addr = str(Path(d) / "notify")
            sock.bind(addr)
            env_value = addr
        else:
            name = f"weakrest-test-{secrets.token_hex(6)}"
            sock.bind("\0" + name)
            env_value = "@" + name
        monkeypatch.setenv("NOTIFY_SOCKET", env_value)
        try:
            yield sock
        finally:
            sock.close()


def _drain(sock: socket.socket, duration: float) -> list[tuple[float, bytes]]:
    """Every datagram arriving within ``duration`` seconds, with its monotonic arrival time."""
    out = []
    end = time.monotonic() + duration
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        out.append((time.monotonic(), data))
    return out


def test_messages_arrive_as_exact_datagrams(notify_socket):
    n = SystemdNotifier()
    assert n.enabled
    assert n.ready("serving texture v3")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving texture v3"
    assert n.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert n.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert n.status("camera lost\nreconnecting")  # a newline would start a new field
    assert notify_socket.recv(4096) == b"STATUS=camera lost reconnecting"
    assert n.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert n.extend_timeout(5_000_000)
    assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=5000000"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", notify_socket.recv(4096))
    assert m and before <= int(m.group(1)) <= after
    n.close()


def test_no_notify_socket_is_a_silent_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    assert not n.enabled
    assert not any([n.ready("x"), n.status("x"), n.watchdog(), n.stopping(), n.reloading(), n.extend_timeout(1)])
    assert n._sock is None  # not even a socket was created


def test_unsupported_address_disables(monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/notify")
    with caplog.at_level(logging.WARNING):
        n = SystemdNotifier()
    assert not n.enabled and "not supported" in caplog.text


def test_send_failure_never_raises_and_logs_once(monkeypatch, caplog):
    with tempfile.TemporaryDirectory(prefix="wrn-") as d:
        addr = str(Path(d) / "notify")
        monkeypatch.setenv("NOTIFY_SOCKET", addr)  # nobody listening yet
        n = SystemdNotifier()
        with caplog.at_level(logging.DEBUG, logger="edge_runtime.service.notify"):
            assert [n.watchdog() for _ in range(3)] == [False, False, False]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "sd_notify" in warnings[0].getMessage()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.settimeout(2.0)
        sock.bind(addr)
        try:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="edge_runtime.service.notify"):
                assert n.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1" and "works again" in caplog.text
        finally:
            sock.close()
            n.close()


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "OWN"}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "OTHER"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": ""}, None),
])
def test_watchdog_interval_from_environment(env, expected, monkeypatch):
    pids = {"OWN": str(os.getpid()), "OTHER": str(os.getpid() + 1)}
    env = {k: pids.get(v, v) for k, v in env.items()}
    assert watchdog_interval_s(env) == expected
    for key in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert SystemdNotifier(address="/nonexistent").watchdog_interval_s() == expected  # reads os.environ


# ---------------------------------------------------------------------------------------------------- policy


def test_policy_inference_loop_must_be_alive():
    clock = FakeClock()
    p = WatchdogPolicy(idle_s=10, clock=clock)
    for triggered in (False, True):
        ok, why = p.healthy(clock.t, "connected", triggered, inference_alive=False)
        assert not ok and "inference" in why


def test_policy_free_run_needs_a_recent_frame():
    clock = FakeClock(100.0)
    p = WatchdogPolicy(idle_s=10, clock=clock)
    assert p.healthy(100.0, "connected", False, True)[0]
    clock.t = 109.5
    ok, why = p.healthy(100.0, "connected", False, True)
    assert ok and "last frame 9.5 s ago" in why
    clock.t = 111.0
    ok, why = p.healthy(100.0, "connected", False, True)
    assert not ok and "no frame for 11.0 s" in why
    assert p.healthy(110.9, "connected", False, True)[0]


def test_policy_free_run_counts_idle_from_camera_up_when_no_frame_yet():
    clock = FakeClock(0.0)
    p = WatchdogPolicy(idle_s=10, clock=clock)
    ok, why = p.healthy(None, "connected", False, True)
    assert ok and "no frame yet" in why
    clock.t = 10.0
    assert p.healthy(None, "connected", False, True)[0]
    clock.t = 10.5
    assert not p.healthy(None, "connected", False, True)[0]


def test_policy_trigger_mode_waits_for_parts_indefinitely():
    clock = FakeClock(0.0)
    p = WatchdogPolicy(idle_s=10, clock=clock)
    for t in (0.0, 60.0, 3600.0, 86400.0):
        clock.t = t
        ok, why = p.healthy(None if t < 60 else 1.0, "connected", True, True)
        assert ok and "waiting for triggers" in why


@pytest.mark.parametrize("triggered", [False, True])
def test_policy_reconnect_grace_then_withhold(triggered):
    clock = FakeClock(0.0)
    p = WatchdogPolicy(idle_s=10, clock=clock)  # grace 30 s
    assert p.grace_s == 30.0
    assert p.healthy(0.0, "connected", triggered, True)[0]
    clock.t = 5.0
    ok, why = p.healthy(4.0, "lost", triggered, True)  # the grace clock starts here
    assert ok and "camera lost" in why
    for t, state in ((20.0, "connecting"), (35.0, "lost")):  # a reconnect attempt does not reset it
        clock.t = t
        assert p.healthy(4.0, state, triggered, True)[0]
    clock.t = 35.5
    ok, why = p.healthy(4.0, "connecting", triggered, True)
    assert not ok and "beyond the 30 s grace" in why
    # back: a fresh camera gets idle_s to deliver its first frame, the old last frame does not count against it
    clock.t = 40.0
    assert p.healthy(4.0, "connected", triggered, True)[0]
    clock.t = 49.0
    assert p.healthy(4.0, "connected", triggered, True)[0]
    clock.t = 51.0
    assert p.healthy(4.0, "connected", triggered, True)[0] is triggered
    # lost again later: a fresh grace period
    clock.t = 100.0
    assert p.healthy(50.0, "lost", triggered, True)[0]
    clock.t = 129.0
    assert p.healthy(50.0, "lost", triggered, True)[0]


def test_policy_acquisition_worker_states():
    """The worker's streaming/waiting_trigger are both "up"; flipping between them is not a reconnect."""
    clock = FakeClock(0.0)
    p = WatchdogPolicy(idle_s=10, clock=clock)
    assert p.healthy(None, "idle", False, True)[0]  # before the first open: grace
    clock.t = 1.0
    assert p.healthy(None, "streaming", False, True)[0]
    clock.t = 8.0
    assert p.healthy(None, "waiting_trigger", True, True)[0]
    clock.t = 11.5
    ok, why = p.healthy(None, "streaming", False, True)
    assert not ok and "no frame for 10.5 s" in why  # idle counted from t=1, not from the flip at t=8
    clock.t = 11.9
    assert p.healthy(None, "waiting_trigger", True, True)[0]


def test_policy_unknown_state_is_treated_as_down_with_grace():
    clock = FakeClock(0.0)
    p = WatchdogPolicy(idle_s=2, clock=clock, grace_factor=2)
    assert p.healthy(None, "stopped", False, True)[0]
    clock.t = 4.5
    ok, why = p.healthy(None, "stopped", False, True)
    assert not ok and "camera stopped" in why


def test_policy_rejects_bad_parameters():
    with pytest.raises(ValueError):
        WatchdogPolicy(idle_s=0)
    with pytest.raises(ValueError):
        WatchdogPolicy(idle_s=1, grace_factor=0)


def test_heartbeat():
    clock = FakeClock(0.0)
    hb = Heartbeat(clock)
    assert not hb.alive(5) and hb.last is None
    hb.beat()
    clock.t = 5.0
    assert hb.alive(5)
    clock.t = 5.1
    assert not hb.alive(5)


# ---------------------------------------------------------------------------------------------------- thread


class _Probe:
    """Thread-safe switchable probe for the watchdog thread."""

    def __init__(self) -> None:
        self.alive = True
        self.lock = threading.Lock()

    def __call__(self) -> dict:
        with self.lock:
            alive = self.alive
        return {"last_frame_mono": time.monotonic(), "camera_state": "streaming", "triggered": False,
                "inference_alive": alive}


def test_watchdog_thread_pings_at_half_the_interval(notify_socket):
    wd = WatchdogThread(SystemdNotifier(), WatchdogPolicy(idle_s=5), _Probe(), interval_s=0.4)
    assert wd.period_s == 0.2
    started = time.monotonic()
    assert wd.start()
    try:
        got = _drain(notify_socket, 1.05)
    finally:
        wd.stop()
    assert got and all(data == b"WATCHDOG=1" for _, data in got)
    times = [t for t, _ in got]
    assert times[0] - started < 0.15  # the first ping goes out at once
    assert 4 <= len(times) <= 7  # 0, 0.2, ..., 1.0 s (a loaded CI box may miss one)
    mean_gap = (times[-1] - times[0]) / (len(times) - 1)
    assert 0.15 <= mean_gap <= 0.3
    assert wd.pings == len(times) and wd.withheld == 0


def test_watchdog_thread_withholds_while_unhealthy_and_resumes(notify_socket, caplog):
    probe = _Probe()
    probe.alive = False
    wd = WatchdogThread(SystemdNotifier(), WatchdogPolicy(idle_s=5), probe, interval_s=0.2)
    with caplog.at_level(logging.INFO, logger="edge_runtime.service.notify"):
        assert wd.start()
        try:
            time.sleep(0.35)  # datagrams wait in the socket buffer
            with probe.lock:
                probe.alive = True
            time.sleep(0.3)
        finally:
            wd.stop()
    got = [d for _, d in _drain(notify_socket, 0.2)]
    turn = next(i for i, d in enumerate(got) if d.startswith(b"STATUS=healthy again:"))
    assert turn >= 2 and all(d.startswith(b"STATUS=unhealthy, watchdog withheld: inference loop not alive")
                             for d in got[:turn])
    assert len(got) > turn + 1 and all(d == b"WATCHDOG=1" for d in got[turn + 1:])
    assert wd.withheld == turn and wd.pings == len(got) - turn - 1 and wd.last_ok is True
    assert "withholding the systemd watchdog ping: inference loop not alive" in caplog.text
    assert "watchdog pings resume" in caplog.text


def test_watchdog_thread_probe_error_counts_as_unhealthy(notify_socket, caplog):
    def broken() -> dict:
        raise RuntimeError("probe bug")

    wd = WatchdogThread(SystemdNotifier(), WatchdogPolicy(idle_s=5), broken, interval_s=1.0)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.service.notify"):
        assert wd.tick() is False
    assert notify_socket.recv(4096).startswith(b"STATUS=unhealthy, watchdog withheld: probe failed")
    assert "probe bug" in caplog.text and wd.withheld == 1 and wd.pings == 0


def test_watchdog_thread_interval_from_environment_and_disabled_without(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    wd = WatchdogThread(SystemdNotifier(), WatchdogPolicy(idle_s=5), _Probe())
    assert wd.interval_s == 0.4 and wd.period_s == 0.2
    monkeypatch.delenv("WATCHDOG_USEC")
    wd = WatchdogThread(SystemdNotifier(), WatchdogPolicy(idle_s=5), _Probe())
    assert wd.interval_s is None and wd.start() is False
    monkeypatch.delenv("NOTIFY_SOCKET")
    wd = WatchdogThread(SystemdNotifier(), WatchdogPolicy(idle_s=5), _Probe(), interval_s=1.0)
    assert wd.start() is False  # nobody to ping


def test_a_receiver_that_stops_reading_never_blocks_the_sender(tmp_path, monkeypatch):
    """The datagram queue of a Unix socket holds about 10 messages: beyond that a blocking send would hang the
    service's main loop (seen with a test harness that read the socket only now and then)."""
    import socket as _socket
    import time as _time

    path = tmp_path / "full.sock"
    receiver = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        notifier = SystemdNotifier(env={"NOTIFY_SOCKET": str(path)})
        t0 = _time.monotonic()
        sent = [notifier.watchdog() for _ in range(200)]
        assert _time.monotonic() - t0 < 5.0
        assert sent[0] is True and sent[-1] is False  # the queue filled up: later pings are dropped, not waited on
    finally:
        receiver.close()


@pytest.mark.parametrize("notify_socket", ["path"], indirect=True)
def test_a_slow_start_asks_for_more_time_until_it_is_done_or_too_long(notify_socket):
    """A long bundle load (TensorRT plans built at start) keeps extending the start timeout while it runs, and
    stops asking when it is done, or after ``max_s``, when a step still running is a hang for systemd to end."""
    n = SystemdNotifier()
    with n.extending_start("building plans", period_s=0.05, extend_s=2.0) as keepalive:
        got = []
        while len(got) < 3:  # a message at once, then one per period for as long as the step runs
            got.append(notify_socket.recv(4096))
        assert keepalive.is_alive()
    assert not keepalive.is_alive()  # joined on exit: nothing is sent after the step
    assert set(got) == {b"EXTEND_TIMEOUT_USEC=2000000\nSTATUS=building plans"}
    with n.extending_start("a hang", period_s=0.05, extend_s=2.0, max_s=0.2) as keepalive:
        keepalive.join(timeout=10)
        assert not keepalive.is_alive()  # gave up asking although the step has not returned
    n.close()
    with SystemdNotifier(env={}).extending_start("no systemd") as keepalive:
        assert keepalive is None
