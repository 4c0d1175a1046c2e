"""The edge service end to end, on real parts: the simulated GenICam camera (viky.cti through harvesters) or
replayed images, a real Mosquitto, the on-disk queue, sd_notify on a real datagram socket, SIGHUP/SIGTERM/
SIGKILL of the real ``weakrest-edge run`` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from edge_runtime.acquisition import CameraLost, ReplaySource
from edge_runtime.publishing.broker import free_port
from edge_runtime.publishing.messages import decode_heatmap, decode_result
from edge_runtime.publishing.subscriber import Subscriber
from edge_runtime.service.config import parse_edge_config
from edge_runtime.service.runner import EdgeService, ServiceError
from edge_runtime.store import BundleStore
from tests.mqtt_fixtures import require_mosquitto
from tests.mqtt_fixtures import wait_until as _wait

PREFIX = "plant/line/st1"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, fitted) -> BundleStore:
    bundle, _ = fitted
    s = BundleStore(tmp_path / "store")
    s.activate("demo", s.add("demo", bundle, version="v1"))
    s.add("demo", bundle, version="v2")
    return s


@pytest.fixture
def replay_dir(demo_data) -> Path:
    return demo_data / "test"


def _config(tmp_path: Path, store: BundleStore, port: int, camera: dict, **extra) -> dict:
    cfg = {
        "bundles": {"store": str(store.root), "product": "demo"},
        "camera": camera,
        "mqtt": {"port": port, "topic_prefix": PREFIX, "heatmap": "all", "client_id": f"svc-{port}"},
        "queue": {"dir": str(tmp_path / "state" / "queue"), "max_mb": 64},
        "health": {"port": free_port()},
        "latency_budget_ms": 500,
        "threads": 1,
    }
    cfg.update(extra)
    return cfg


def _results(sub: Subscriber) -> list:
    return [decode_result(m.payload) for m in sub.on(f"{PREFIX}/result")]


def _status(sub: Subscriber) -> list[dict]:
    return [json.loads(m.payload) for m in sub.on(f"{PREFIX}/status")]


def _health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 503 still carries the report
        return json.loads(exc.read())




def _check_delivery(results: list, expected_first: int = 0) -> tuple[int, int]:
    """Every seq from ``expected_first`` to the highest seen arrived, in order once duplicates are dropped.
    Returns (distinct results, duplicates)."""
    seen, order, dups = set(), [], 0
    for r in results:
        if r.seq in seen:
            dups += 1
            continue
        seen.add(r.seq)
        order.append(r.seq)
    assert order == sorted(order), "results arrived out of order"
    assert order == list(range(expected_first, expected_first + len(order))), "a result is missing"
    return len(order), dups


# ---- in-process: the real GenICam camera ------------------------------------------------------------

def test_genicam_frames_are_inspected_and_published(tmp_path, store, broker, subscriber):
    import genicam

    cti = Path(genicam.__file__).parent / "viky.cti"
    sub = subscriber(f"{PREFIX}/#")
    cfg = parse_edge_config(_config(tmp_path, store, broker.port,
                                    {"source": "genicam", "name": "viky", "genicam": {"cti": str(cti)}}))
    service = EdgeService(cfg)
    service.start()
    try:
        assert sub.wait_for(lambda ms: sum(m.topic.endswith("/result") for m in ms) >= 5, 60)
        health = _health(cfg.health.port)
        assert health["ok"] and health["camera_state"] == "streaming" and health["results"] >= 5
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{cfg.health.port}/metrics", timeout=2).read().decode()
        assert "weakrest_frames_total" in metrics and 'weakrest_stage_latency_ms_bucket{stage="backbone"' in metrics
    finally:
        service.stop()
    sub.wait_for(lambda ms: any(json.loads(m.payload).get("state") == "offline" for m in ms
                                if m.topic.endswith("/status")), 10)
    results = _results(sub)
    _check_delivery(results)
    for r in results:  # the schema is enforced by decode_result; check the content
        assert r.camera == "viky" and r.product == "demo" and r.bundle_version == "v1"
        assert r.verdict in ("pass", "fail") and r.score is not None and r.threshold is not None
        assert r.frame_id >= 1 and r.published_at >= r.captured_at
        assert {"preprocess", "backbone", "matching", "total"} <= set(r.timings_ms)
        assert r.over_budget == (r.timings_ms["total"] > 500)
    statuses = _status(sub)
    assert statuses[0]["state"] == "online" and statuses[-1]["state"] == "offline"
    assert any(s.get("camera_state") == "streaming" for s in statuses)
    heatmaps = sub.on(f"{PREFIX}/heatmap")
    assert heatmaps, "heatmap policy 'all' publishes one per frame"
    h = heatmaps[0]
    if h.user_properties:
        assert int(h.user_properties["seq"]) in {r.seq for r in results} and h.payload[:4] == b"\x89PNG"
    else:
        meta, image = decode_heatmap(h.payload)
        assert meta["seq"] in {r.seq for r in results} and image[:4] == b"\x89PNG"


# ---- in-process: camera lost, commands --------------------------------------------------------------

class _Unplugged(ReplaySource):
    """Real replayed frames; the first instance 'loses the cable' after a few frames."""

    instances = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).instances += 1
        self._nth = type(self).instances
        self._served = 0

    def grab(self, timeout_s):
        if self._nth == 1 and self._served >= 4:
            raise CameraLost("cable unplugged")
        frame = super().grab(timeout_s)
        self._served += frame is not None
        return frame


def test_camera_loss_reconnects_and_commands_are_answered(tmp_path, store, broker, subscriber, replay_dir):
    sub = subscriber([f"{PREFIX}/#"])
    cfg = parse_edge_config(_config(tmp_path, store, broker.port,
                                    {"source": "replay", "replay": {"path": str(replay_dir), "fps": 20},
                                     "reconnect_initial_s": 0.3}, watchdog_idle_s=1.0))
    _Unplugged.instances = 0
    service = EdgeService(cfg, source_factory=lambda: _Unplugged(replay_dir, fps=20))
    service.start()
    cmd = subscriber(f"{PREFIX}/cmd/reply")

    def command(payload: bytes | str) -> dict:
        n = len(cmd.on(f"{PREFIX}/cmd/reply"))
        cmd.client.publish(f"{PREFIX}/cmd", payload, qos=1)
        got = cmd.wait_count(f"{PREFIX}/cmd/reply", n + 1, 30)
        assert len(got) > n, f"no reply to {payload!r}"
        return json.loads(got[n].payload)

    try:
        _wait(lambda: service.worker.stats.reconnects >= 1 and service.results >= 8, 60, "reconnect and frames")
        # the status follows the connection (on amqtt, MQTT 5 is refused first and 3.1.1 tried after 5 s)
        _wait(lambda: [s["camera_state"] for s in _status(sub)][-1:] == ["streaming"], 60, "status: streaming")
        states = [s["camera_state"] for s in _status(sub)]  # published on every change of the camera state
        states = [a for a, b in zip(states, [None, *states][:-1], strict=True) if a != b]
        assert states[-5:] == ["connecting", "streaming", "lost", "connecting", "streaming"], states
        lost = [s for s in _status(sub) if s.get("camera_state") == "lost"]
        assert lost and "cable unplugged" in lost[0]["camera_detail"]
        # the watchdog policy saw an honest picture all along: healthy now that frames flow again
        assert service.watchdog is None  # no WATCHDOG_USEC in this process; the policy is checked directly:
        from edge_runtime.service.notify import WatchdogPolicy
        ok, why = WatchdogPolicy(1.0).healthy(**service._watchdog_probe())
        assert ok, why

        _wait(lambda: service.publisher.commands_ready, 30, "the command subscription")
        assert service.health_report()["mqtt_commands_ready"] is True
        bad = command(b"{not json")
        assert bad["ok"] is False and "json" in bad["error"].lower()
        bad = command(json.dumps({"command": "reboot", "id": "x1"}))
        assert bad["ok"] is False and bad["id"] == "x1" and "reboot" in bad["error"]
        bad = command(json.dumps({"command": "switch_product", "id": "x2"}))
        assert bad["ok"] is False and "product" in bad["error"]
        missing = command(json.dumps({"command": "switch_product", "product": "nosuch", "id": "x3"}))
        assert missing["ok"] is False and "nosuch" in missing["error"] and missing["bundle_version"] == "v1"
        before = service.results
        _wait(lambda: service.results >= before + 3, 30, "frames after the refused commands")

        store.activate("demo", "v2")
        ok = command(json.dumps({"command": "reload", "id": "r1"}))
        assert ok["ok"] is True and ok["bundle_version"] == "v2" and service.served.version == "v2"
        snap = command(json.dumps({"command": "snapshot", "id": "s1"}))
        assert snap["ok"] is True and all(Path(f).is_file() for f in snap["files"])
        _wait(lambda: any(r.bundle_version == "v2" for r in _results(sub)), 30, "a result from v2")
    finally:
        cmd.close()
        service.stop()
    _check_delivery(_results(sub))
    assert any(s.get("bundle_version") == "v2" and s["state"] == "online" for s in _status(sub))


def test_overlapped_frames_are_all_published_in_order_and_scored_as_one_at_a_time(tmp_path, store, broker,
                                                                                  subscriber, replay_dir, fitted):
    """overlap_frames: the backbone of frame n+1 runs while frame n is concluded; every result still arrives, in
    order, with the score the one-frame-at-a-time inspector gives the same image, across a bundle switch."""
    from edge_runtime.core.pipeline import open_inspector

    reference = ReplaySource(replay_dir, fps=1000)
    reference.open()
    n_files = len(reference._files)
    inspector = open_inspector(fitted[0], threads=1)
    expected = {}
    for _ in range(n_files):
        frame = reference.grab(5.0)
        expected[(frame.frame_id - 1) % n_files] = inspector.inspect(frame.image).score
    reference.close()
    sub = subscriber(f"{PREFIX}/#")
    cfg = parse_edge_config(_config(tmp_path, store, broker.port,
                                    {"source": "replay", "replay": {"path": str(replay_dir), "fps": 40}},
                                    overlap_frames=True))
    service = EdgeService(cfg)
    service.start()
    try:
        _wait(lambda: service.results >= 10, 60, "overlapped results")
        assert service._front is not None and service._front.name == "backbone" and service._inference_alive()
        assert _health(cfg.health.port)["ok"]
        store.activate("demo", "v2")
        assert service.switch().version == "v2"
        _wait(lambda: any(r.bundle_version == "v2" for r in _results(sub)), 30, "a result from v2")
    finally:
        service.stop()
    results = _results(sub)
    distinct, _ = _check_delivery(results)
    assert distinct == service.results  # the frame handed over at the stop was concluded and published too
    for r in results:
        assert r.verdict in ("pass", "fail") and r.error is None
        assert r.score == pytest.approx(expected[(r.frame_id - 1) % n_files], abs=1e-5)
        assert {"preprocess", "backbone", "matching", "total"} <= set(r.timings_ms)
    frame_ids = [r.frame_id for r in results]
    assert frame_ids == sorted(frame_ids)


def test_bad_config_and_missing_bundle_are_clear_errors(tmp_path, store):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"bundles": {"store": str(store.root), "product": "demo"},
                                   "mqtt": {"topic_prefix": "only/two", "qos": 3}}))
    run = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "mqtt.topic_prefix" in run.stderr and "mqtt.qos" in run.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"bundles": {"store": str(store.root), "product": "other"},
                                       "queue": {"dir": str(tmp_path / "q")}}))
    run = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(missing)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no current bundle for product 'other'" in run.stderr
    with pytest.raises(ServiceError, match="no current bundle"):
        EdgeService(parse_edge_config({"bundles": {"store": str(store.root), "product": "other"}}))


# ---- the real process: broker restart, SIGKILL, SIGHUP, sd_notify ------------------------------------

class _Service:
    """``weakrest-edge run`` as a child process, with a datagram socket as its systemd notify socket."""

    def __init__(self, tmp_path: Path, cfg: dict, name: str = "svc", prefix: list[str] | tuple = ()) -> None:
        self.cfg = cfg
        self.prefix = list(prefix)  # e.g. a sandbox wrapper that execs the service
        self.path = tmp_path / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.notify_path = tmp_path / f"{name}.notify"
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "ab")
        self.proc: subprocess.Popen | None = None
        self.notes: list[str] = []

    def start(self) -> _Service:
        if self.notify_path.exists():
            self.notify_path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.settimeout(0.2)
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        # PYTHONFAULTHANDLER: a service that does not stop in time is sent SIGABRT by wait(), and writes every
        # thread's stack into its log first, so that a rare hang says where it hangs
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "WATCHDOG_USEC": "2000000",
               "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "edge_runtime.cli", "run", "--config",
                                      str(self.path)],
                                     stdout=self.log, stderr=self.log, env=env, cwd=REPO)
        return self

    def _read_notify(self) -> None:
        """Read the notify socket all the time, as systemd does."""
        while True:
            try:
                self.notes.extend(self.sock.recv(4096).decode().splitlines())
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:  # closed
                return

    def drain_notify(self) -> list[str]:
        return list(self.notes)

    def health(self) -> dict:
        try:
            return _health(self.cfg["health"]["port"])
        except OSError:
            return {}

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # the fault handler writes every thread's stack to the log
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.flush()
            tail = self.log_path.read_text(errors="replace")[-6000:]
            raise AssertionError(f"the service did not end within {timeout} s; its log ends:\n{tail}") from None
        time.sleep(0.3)  # the reader takes the last datagrams
        self.sock.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_broker_restart_loses_no_result_and_sighup_reloads(tmp_path, store, make_broker, replay_dir):
    """1000 results while the broker is stopped and restarted: every seq arrives, in order, duplicates
    detectable; the status goes back online; SIGHUP swaps to v2 with the camera running; SIGTERM flushes."""
    broker = make_broker(persistence=True)
    require_mosquitto(broker, "the subscriber's session must survive the broker restart")
    sub = Subscriber(broker.port, [f"{PREFIX}/result", f"{PREFIX}/status"], persistent=True,
                     client_id="mes-subscriber", protocol=broker.protocol)
    cfg = _config(tmp_path, store, broker.port, {"source": "replay", "replay": {"path": str(replay_dir),
                                                                                "fps": 400}})
    cfg["mqtt"]["heatmap"] = "none"
    svc = _Service(tmp_path, cfg).start()
    try:
        _wait(lambda: "READY=1" in svc.drain_notify(), 120, "READY=1 from the service")
        _wait(lambda: len({r.seq for r in _results(sub)}) >= 300, 180, "300 results")
        broker.stop()
        time.sleep(1.5)  # results keep coming into the on-disk queue meanwhile
        assert svc.health().get("mqtt_connected") is False
        broker.restart()
        _wait(lambda: len({r.seq for r in _results(sub)}) >= 600, 180, "600 results after the restart")
        store.activate("demo", "v2")
        svc.signal(signal.SIGHUP)
        _wait(lambda: any(r.bundle_version == "v2" for r in _results(sub)), 60, "a v2 result after SIGHUP")
        _wait(lambda: len({r.seq for r in _results(sub)}) >= 1000, 180, "1000 results")
        assert "WATCHDOG=1" in svc.drain_notify(), "watchdog pings while frames flow"
        svc.signal(signal.SIGTERM)
        assert svc.wait(60) == 0
    finally:
        svc.kill()
    sub.wait_for(lambda ms: json.loads(ms[-1].payload).get("state") == "offline", 10)
    sub.close()
    distinct, dups = _check_delivery(_results(sub))
    assert distinct >= 1000
    notes = svc.notes
    assert "RELOADING=1" in notes and "STOPPING=1" in notes
    statuses = _status(sub)
    assert statuses[-1]["state"] == "offline" and statuses[-1].get("reason") == "shutdown"
    # online at start, online again once reconnected after the broker restart, online after the reload
    assert sum(s["state"] == "online" and s.get("camera_state") == "streaming" for s in statuses) >= 3
    versions = [r.bundle_version for r in _results(sub)]
    assert versions.index("v2") > 0 and set(versions[versions.index("v2"):]) == {"v2"}
    print(f"delivered {distinct} distinct results, {dups} duplicates after the broker restart")


def test_sigkill_with_queued_results_delivers_them_after_restart(tmp_path, store, replay_dir):
    """The broker is down: results pile up in the on-disk queue; SIGKILL; broker up; the restarted service
    delivers every one of them, then its own, with seq continuing."""
    from edge_runtime.publishing.broker import LocalBroker

    port = free_port()
    cfg = _config(tmp_path, store, port, {"source": "replay", "replay": {"path": str(replay_dir), "fps": 30}})
    svc = _Service(tmp_path, cfg, "first").start()
    try:
        _wait(lambda: svc.health().get("queue_depth", 0) >= 20, 120, "20 results queued while the broker is down")
        produced = svc.health()["results"]
        svc.signal(signal.SIGKILL)
        svc.wait(10)
    finally:
        svc.kill()
    with LocalBroker(port=port, workdir=tmp_path / "broker") as broker:
        broker.start()
        sub = Subscriber(port, [f"{PREFIX}/result", f"{PREFIX}/status"], protocol=broker.protocol)
        again = _Service(tmp_path, cfg, "second").start()
        try:
            _wait(lambda: len({r.seq for r in _results(sub)}) >= produced + 5, 120, "the queued results and more")
            again.signal(signal.SIGKILL)  # now connected: the broker publishes the last will
            again.wait(10)
            _wait(lambda: any(s["state"] == "offline" and s.get("reason") == "connection lost"
                              for s in _status(sub)), 30, "the last will")
        finally:
            again.kill()
            sub.close()
        distinct, _ = _check_delivery(_results(sub))
        assert distinct >= produced + 5
