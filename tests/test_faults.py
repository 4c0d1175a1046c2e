"""Issue 16 part 5: faults a production line meets, each on real parts.

The edge service runs in-process on the tests' demo bundle, with replayed images or the simulated GenICam camera
(``viky.cti``, a real GenTL producer), against a real Mosquitto, with the real on-disk queue and bundle store.  The
faults are real where this machine allows it: a full disk is a small tmpfs filled to ENOSPC and a read-only store is
a read-only bind mount (both need root; without it the full disk is ENOSPC injected at the queue's file-write layer,
``disk_queue._write_all``, and the read-only test skips), the broker is SIGKILLed, the clock is stepped by patching
``time.time`` in-process, incomplete buffers come from the real harvesters fetch path with the transport's
"complete" flag or the payload falsified, and ``activate`` is SIGKILLed in a subprocess at random points.  Every
wait polls a condition with a deadline.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.publishing import disk_queue
from edge_runtime.publishing.broker import free_port
from edge_runtime.publishing.disk_queue import HEADER_BYTES, DiskQueue
from edge_runtime.service.config import parse_edge_config
from edge_runtime.service.runner import EdgeService
from edge_runtime.store import BundleStore, StoreError
from tests.mqtt_fixtures import require_mosquitto
from tests.mqtt_fixtures import wait_until as _wait
from tests.test_edge_service import PREFIX, _check_delivery, _config, _health, _results, replay_dir, store  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ------------------------------------------------------------------------------------------------------

def _can_mount() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class SmallDisk:
    """A small file system to fill up: a tmpfs of ``size_bytes`` where root may mount (the kernel's own ENOSPC),
    else ENOSPC injected at the queue's file-write layer while "full"."""

    def __init__(self, path: Path, size_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
        path.mkdir(parents=True)
        self.path = path
        self.full = False
        self.mounted = _can_mount() and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "weakrest-test", str(path)],
            capture_output=True).returncode == 0
        self.how = f"a {size_bytes >> 10} KiB tmpfs filled to ENOSPC" if self.mounted else \
            "ENOSPC injected into disk_queue._write_all (cannot mount here)"
        if not self.mounted:
            real = disk_queue._write_all

            def write_all(fd: int, data: bytes) -> None:
                if self.full:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real(fd, data)

            monkeypatch.setattr(disk_queue, "_write_all", write_all)

    def fill(self) -> None:
        self.full = True
        if not self.mounted:
            return
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 1 << 12, 1):  # down to the last byte of the last page
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def free(self) -> None:
        self.full = False
        if self.mounted:
            (self.path / "filler").unlink()

    def close(self) -> None:
        if self.mounted:
            _umount(self.path)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    disks: list[SmallDisk] = []

    def make(size_bytes: int = 2 << 20) -> SmallDisk:
        disk = SmallDisk(tmp_path / f"disk{len(disks)}", size_bytes, monkeypatch)
        disks.append(disk)
        return disk

    yield make
    for d in disks:
        d.close()


def _reasons(port: int) -> list[str]:
    return list(_health(port).get("reasons", ()))


def _service(tmp_path: Path, store: BundleStore, port: int, camera: dict, **extra) -> EdgeService:  # noqa: F811
    cfg = _config(tmp_path, store, port, camera, **extra)
    cfg["mqtt"]["heatmap"] = "none"
    return EdgeService(parse_edge_config(cfg))


def _replay(folder: Path, fps: float = 20) -> dict:
    return {"source": "replay", "replay": {"path": str(folder), "fps": fps}}


# ---- a. the queue's disk full -------------------------------------------------------------------------------------

def test_queue_on_a_full_disk_holds_results_in_memory_and_loses_nothing_queued(small_disk):
    """DiskQueue on a disk that fills up: what is on disk stays; new records are held in memory, in order, up to the
    bound (beyond it the oldest *held* ones are dropped, counted); acknowledging still works; once space returns the
    held records are written behind the others and survive a reopen."""
    disk = small_disk(1 << 20)
    print(f"full disk: {disk.how}")
    size = 200
    rec = [bytes([i % 251]) * size for i in range(60)]
    q = DiskQueue(disk.path / "queue", max_bytes=512 << 10, memory_max_bytes=10 * (HEADER_BYTES + size))
    for i in range(10):
        assert q.append(rec[i]) == i
    disk.fill()
    for i in range(10, 40):
        assert q.append(rec[i]) == i  # never raises: held when the disk refuses
    assert q.held > 0 and "No space left on device" in (q.disk_error or "")
    assert q.held_bytes <= q.memory_max_bytes
    got = q.peek(100)
    indices = [i for i, _ in got]
    assert indices == sorted(indices) and set(range(10)) <= set(indices), "a record on disk was lost"
    assert all(payload == rec[i] for i, payload in got)
    lost = sorted(set(range(40)) - set(indices))
    assert len(lost) == q.dropped and (not lost or lost == list(range(lost[0], lost[-1] + 1))), lost
    assert not lost or lost[0] >= 10  # only the oldest of the *held* ones, never one on disk
    q.ack(4)  # delivery goes on while the disk is full (the state write fails quietly and is retried)
    assert [i for i, _ in q.peek(1)] == [5]
    disk.free()
    _wait(lambda: q.write_held() == 0, 10, "the held records written once space returned")
    assert q.disk_error is None
    q.append(rec[40])
    q.close()
    q = DiskQueue(disk.path / "queue", max_bytes=512 << 10, memory_max_bytes=10 * (HEADER_BYTES + size))
    try:
        assert [i for i, _ in q.peek(100)] == [i for i in indices if i > 4] + [40]  # the held ones made it to disk
        assert all(payload == rec[i] for i, payload in q.peek(100)) and q.next_index == 41
        # full again, and what is held is delivered from memory before space returns: the next write clears it
        disk.fill()
        for i in range(41, 60):
            q.append(rec[i])
            if q.held:
                break
        assert q.held and q.disk_error
        q.ack(q.next_index - 1)
        disk.free()
        last = q.append(rec[0])
        assert q.held == 0 and q.disk_error is None and [i for i, _ in q.peek(100)] == [last]
    finally:
        q.close()


def test_service_on_a_full_disk_is_degraded_and_delivers_every_result_in_order(tmp_path, store, broker,  # noqa: F811
                                                                              subscriber, replay_dir, small_disk):  # noqa: F811
    """The service's queue disk fills up while results wait for the broker: nothing queued is lost, new results are
    held in memory and ``/health`` says so (degraded, naming the disk and the reason); when space returns they are
    written, and once the broker answers again every result arrives, in seq order."""
    disk = small_disk(2 << 20)
    print(f"full disk: {disk.how}")
    sub = subscriber(f"{PREFIX}/result")
    service = _service(tmp_path, store, broker.port, _replay(replay_dir),
                       queue={"dir": str(disk.path / "queue"), "max_mb": 64, "memory_max_mb": 4})
    port = service.cfg.health.port
    service.start()
    try:
        _wait(lambda: len(_results(sub)) >= 5, 60, "5 results delivered")
        broker.pause()  # connected but silent: results stay queued (on disk) meanwhile
        try:
            _wait(lambda: service.queue.depth - service.queue.held >= 5, 30, "5 results queued on disk")
            disk.fill()
            on_disk = [i for i, _ in service.queue.peek(10_000)]
            _wait(lambda: service.queue.held >= 5, 30, "5 results held in memory")
            _wait(lambda: any("refuses writes" in r for r in _reasons(port)), 10, "/health naming the full disk")
            health = _health(port)
            reason = next(r for r in health["reasons"] if "refuses writes" in r)
            assert health["state"] == "degraded" and health["ok"] is False and health["queue_held"] >= 5
            assert str(disk.path / "queue") in reason and "No space left on device" in reason, reason
            assert set(on_disk) <= {i for i, _ in service.queue.peek(10_000)}, "a queued result was lost"
            disk.free()
            _wait(lambda: service.queue.held == 0 and service.queue.disk_error is None, 10,
                  "the held results written to disk")
            _wait(lambda: not any("refuses writes" in r for r in _reasons(port)), 10, "/health without the disk")
        finally:
            broker.resume()
        produced = service.queue.next_index
        _wait(lambda: len({r.seq for r in _results(sub)} & set(range(produced))) == produced, 60,
              f"all {produced} results delivered")
    finally:
        service.stop()
    distinct, dups = _check_delivery(_results(sub))
    assert distinct >= produced and service.queue.dropped == 0
    print(f"full disk: {distinct} results delivered in order, {dups} duplicates, none lost")


# ---- b. a clock that jumps backwards -------------------------------------------------------------------------------

def test_clock_stepped_back_keeps_seq_order_and_monotonic_timings(tmp_path, store, broker, subscriber,  # noqa: F811
                                                                   replay_dir, monkeypatch):  # noqa: F811
    """An NTP step of an hour backwards mid-run (``time.time`` patched in-process): results keep their seq order
    with no gap, stage and end-to-end timings stay sane (monotonic clock), and a result waiting in the queue is still
    reported late by ``/health`` (its age is timed on the monotonic clock, not by its wall-clock capture time)."""
    sub = subscriber(f"{PREFIX}/result")
    service = _service(tmp_path, store, broker.port, _replay(replay_dir),
                       health={"port": free_port(), "queue_degraded_s": 1.0})
    port = service.cfg.health.port
    real_time = time.time
    service.start()
    try:
        _wait(lambda: len(_results(sub)) >= 5, 60, "5 results delivered")
        broker.pause()
        try:
            _wait(lambda: service.queue.depth >= 3, 30, "3 results queued before the step")
            monkeypatch.setattr(time, "time", lambda: real_time() - 3600.0)
            step_seq = service.queue.next_index
            _wait(lambda: any("queued, the oldest for" in r for r in _reasons(port)), 15,
                  "/health: results late although the wall clock went back")
            age = _health(port)["queue_oldest_age_s"]
            assert 1.0 < age < 600, age
        finally:
            broker.resume()
        _wait(lambda: len({r.seq for r in _results(sub) if r.seq >= step_seq}) >= 10, 60, "10 results after the step")
        from edge_runtime.service.notify import WatchdogPolicy

        ok, why = WatchdogPolicy(5.0).healthy(**service._watchdog_probe())
        assert ok, why
        latency = service.metrics.latency_summary()
    finally:
        service.stop()
    results = _results(sub)
    _check_delivery(results)
    by_seq = {r.seq: r for r in results}
    seqs = sorted(by_seq)
    jumps = [b for a, b in zip(seqs, seqs[1:], strict=False)
             if by_seq[a].captured_at - by_seq[b].captured_at > 3000]
    assert jumps, "the wall clock step shows in captured_at"  # the step happened mid-run, seq order held
    assert all(0 <= ms < 60_000 for r in results for ms in r.timings_ms.values())
    assert 0 <= latency["p50"] <= latency["p99"] < 60_000, latency
    print(f"clock step: seq {jumps[0]} captured {by_seq[jumps[0] - 1].captured_at - by_seq[jumps[0]].captured_at:.0f} "
          f"s 'before' seq {jumps[0] - 1}; {len(seqs)} results in seq order, end-to-end p99 {latency['p99']:.0f} ms")


def test_genicam_fetch_times_out_on_the_monotonic_clock(monkeypatch):
    """harvesters times a fetch with ``time.time()``; with the wall clock going back (every call an hour... here 10 s
    earlier) an idle camera's fetch would wait for the next frame, or for ever.  The source gives harvesters the
    monotonic clock, so the fetch times out when it should."""
    import genicam

    from edge_runtime.acquisition import GenICamSource

    src = GenICamSource(Path(genicam.__file__).parent / "viky.cti")
    src.open()
    try:
        src.node_map.AcquisitionFrameRate.value = 1.0  # the slowest viky goes: a frame a second
        assert src.grab(10.0) is not None and src.grab(10.0) is not None  # just after a frame: the next is 1 s away
        clock = {"t": time.time()}

        def stepping_back() -> float:
            clock["t"] -= 10.0
            return clock["t"]

        monkeypatch.setattr(time, "time", stepping_back)
        t0 = time.monotonic()
        assert src.grab(0.3) is None, "the fetch waited for the next frame instead of timing out"
        assert time.monotonic() - t0 < 0.9 and src.stats.timeouts == 1
    finally:
        src.close()


# ---- c. the broker SIGKILLed with persistence ---------------------------------------------------------------------

def test_broker_sigkilled_with_persistence_loses_no_seq(tmp_path, store, make_broker, make_subscriber,  # noqa: F811
                                                        replay_dir):  # noqa: F811
    """Mosquitto with ``persistence true`` hangs (SIGSTOP) with results in flight, is SIGKILLed and restarted.
    Mosquitto saves its database only at ``autosave_interval`` or a clean stop, so the subscriber's session is
    checkpointed first (SIGUSR1, what an autosave does).  The MES stand-in has a persistent session at QoS 1; the
    service resends what the dead broker never acknowledged.  No seq may be missing at the subscriber; duplicates
    are counted and reported."""
    broker = make_broker(persistence=True)
    require_mosquitto(broker, "persistence and a persistent session across the restart")
    sub = make_subscriber(broker.port, f"{PREFIX}/result", persistent=True, client_id="mes-faults", protocol="5")
    broker.checkpoint()
    service = _service(tmp_path, store, broker.port, _replay(replay_dir, fps=30))
    service.start()
    try:
        _wait(lambda: len({r.seq for r in _results(sub)}) >= 30, 60, "30 results before the kill")
        broker.pause()  # hung first, so results are in flight unacknowledged when it dies
        _wait(lambda: service.queue.depth >= 5, 30, "5 results in flight to the hung broker")
        before = service.publisher.stats()
        broker.kill()
        at_kill = service.queue.next_index
        _wait(lambda: not service.publisher.connected and service.queue.depth >= 10, 30,
              "10 results queued while the broker is dead")
        broker.start()
        _wait(lambda: len({r.seq for r in _results(sub)} & set(range(at_kill + 20))) == at_kill + 20, 60,
              "every result up to 20 past the kill")
        after = service.publisher.stats()
    finally:
        service.stop()
    produced = service.queue.next_index
    sub.wait_for(lambda ms: len({json.loads(m.payload)["seq"] for m in ms}) >= produced, 30)
    distinct, dups = _check_delivery(_results(sub))
    assert distinct == produced, f"{produced - distinct} result(s) missing at the subscriber"
    assert sub.sessions_present[-1] is True, "the subscriber's session did not survive the kill"
    assert after["resent"] > before["resent"], "nothing was resent, so the kill hit no unacknowledged result"
    print(f"broker SIGKILL with persistence: {produced} results, {distinct} distinct at the subscriber, "
          f"{dups} duplicates; the service resent {after['resent'] - before['resent']} unacknowledged, "
          f"{after['published'] - before['published']} PUBLISH packets since the kill at seq {at_kill}; "
          f"subscriber sessions present on connect: {sub.sessions_present}")


# ---- d. a camera delivering incomplete buffers --------------------------------------------------------------------

def test_incomplete_camera_buffers_are_dropped_counted_and_logged(tmp_path, store, broker, subscriber,  # noqa: F811
                                                                  monkeypatch, caplog):
    """The simulated GenICam camera through harvesters, with every 4th buffer flagged incomplete by the transport
    (harvesters re-queues it and fires INCOMPLETE_BUFFER) and every 5th delivered short (fewer bytes than width x
    height needs): those frames are dropped, counted as incomplete and logged with the reason; the camera keeps
    streaming without a reconnect and every inspected frame's result is delivered."""
    import genicam
    import genicam.gentl
    from harvesters.core import Component

    counts = {"complete": 0, "data": 0}
    lock = threading.Lock()
    real_complete, real_data = genicam.gentl.Buffer.is_complete, Component.data

    def is_complete(self):
        with lock:
            counts["complete"] += 1
            flagged = counts["complete"] % 4 == 0
        return False if flagged else real_complete(self)

    def data(self):
        with lock:
            counts["data"] += 1
            short = counts["data"] % 5 == 0
        arr = real_data.fget(self)
        return arr[: arr.size // 2] if short and arr is not None else arr

    monkeypatch.setattr(genicam.gentl.Buffer, "is_complete", is_complete)
    monkeypatch.setattr(Component, "data", property(data))
    caplog.set_level(logging.WARNING, logger="edge_runtime.acquisition.genicam")
    cti = Path(genicam.__file__).parent / "viky.cti"
    sub = subscriber(f"{PREFIX}/result")
    service = _service(tmp_path, store, broker.port, {"source": "genicam", "name": "viky",
                                                      "genicam": {"cti": str(cti)}})
    port = service.cfg.health.port
    service.start()
    try:
        _wait(lambda: service.worker.stats.incomplete >= 6 and service.results >= 10, 90,
              "6 incomplete buffers and 10 results")
        health = _health(port)
        assert health["state"] == "ok" and health["camera_state"] == "streaming", health
        assert health["incomplete_frames"] >= 6 and health["camera_reconnects"] == 0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        line = next(ln for ln in metrics.splitlines() if ln.startswith("weakrest_incomplete_frames_total"))
        assert float(line.split()[-1]) >= 6
        stats = service.worker.stats
        assert stats.converted_errors == 0  # a short buffer is an incomplete frame, not a conversion error
    finally:
        service.stop()
    text = caplog.text
    assert "flagged the buffer incomplete" in text, text[-2000:]
    assert "the buffer holds only" in text, text[-2000:]
    assert service.results <= stats.frames  # a dropped frame is never inspected
    _check_delivery(_results(sub))
    print(f"incomplete buffers: {stats.incomplete} dropped ({counts}), {stats.frames} frames inspected, "
          f"{stats.reconnects} reconnects")


# ---- e. a bundle store on a read-only file system -----------------------------------------------------------------

def test_read_only_store_refuses_changes_and_the_running_bundle_keeps_serving(tmp_path, store, broker,  # noqa: F811
                                                                               subscriber, replay_dir, fitted):  # noqa: F811
    """The store is remounted read-only (a bind mount) under a running service: ``add`` and ``activate`` fail with
    a StoreError naming the folder and the reason, ``current`` is unchanged, a reload re-reads it fine and the
    service goes on inspecting with the same bundle."""
    if not _can_mount():
        pytest.skip("needs root to bind-mount the store read-only")
    sub = subscriber(f"{PREFIX}/result")
    service = _service(tmp_path, store, broker.port, _replay(replay_dir))
    port = service.cfg.health.port
    service.start()
    root = store.root
    mounted = False
    try:
        _wait(lambda: len(_results(sub)) >= 3, 60, "3 results from v1")
        assert subprocess.run(["mount", "--bind", str(root), str(root)], capture_output=True).returncode == 0
        mounted = True
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], capture_output=True, text=True)
        assert ro.returncode == 0, ro.stderr
        with pytest.raises(OSError, match="Read-only file system"):
            (root / "probe").write_text("x")
        pdir = str(store.product_dir("demo"))
        with pytest.raises(StoreError) as refused:
            store.activate("demo", "v2")
        assert pdir in str(refused.value) and "Read-only file system" in str(refused.value), refused.value
        with pytest.raises(StoreError) as refused:
            store.add("demo", fitted[0], version="v3")
        assert pdir in str(refused.value) and "Read-only file system" in str(refused.value), refused.value
        assert store.current("demo") == "v1" and store.versions("demo") == ["v1", "v2"]
        assert service.switch().version == "v1"  # a reload only reads: fine on a read-only store
        n = len(_results(sub))
        _wait(lambda: len(_results(sub)) >= n + 5, 60, "5 more results after the refusals")
        health = _health(port)
        assert health["state"] == "ok" and health["bundle_version"] == "v1", health
    finally:
        service.stop()
        if mounted:
            _umount(root)
    results = _results(sub)
    _check_delivery(results)
    assert {r.bundle_version for r in results} == {"v1"}


# ---- f. power loss during activate --------------------------------------------------------------------------------

_SWITCHER = """
import sys
from edge_runtime.store import BundleStore

store = BundleStore(sys.argv[1])
print("ready", flush=True)
i = 0
while True:  # switch back and forth until killed
    store.activate("demo", "v1" if i % 2 else "v2", validate=lambda path: None)
    i += 1
"""


def _assert_store_valid(store: BundleStore) -> None:  # noqa: F811
    assert store.current("demo") in ("v1", "v2"), store.current("demo")
    assert (store.current_path("demo") / "manifest.json").is_file()
    assert store.previous("demo") in (None, "v1", "v2")


def test_activate_killed_at_random_points_never_leaves_the_store_without_current(tmp_path):
    """SIGKILL a process that switches ``current`` back and forth, at random moments (seeded), 30 times: after each
    kill ``current`` names a whole version; the next writer cleans up what a killed one left and switches.  The
    versions hold only a manifest (validation is skipped), so the loop spends its time in the switch itself."""
    mini = BundleStore(tmp_path / "store")
    pdir = mini.product_dir("demo")
    for version in ("v1", "v2"):
        (pdir / version).mkdir(parents=True)
        (pdir / version / "manifest.json").write_text("{}")
    mini.activate("demo", "v1", validate=lambda path: None)
    rng = random.Random(16)
    mid_switch = 0
    for _ in range(30):
        proc = subprocess.Popen([sys.executable, "-c", _SWITCHER, str(mini.root)], stdout=subprocess.PIPE,
                                cwd=REPO, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.02))  # the kill point (seeded), not a wait for a condition
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
        mid_switch += bool(list(pdir.glob(".*.tmp")))
        _assert_store_valid(mini)
    target = "v1" if mini.current("demo") == "v2" else "v2"
    mini.activate("demo", target, validate=lambda path: None)
    assert mini.current("demo") == target and not list(pdir.glob(".*.tmp"))
    print(f"activate SIGKILLed 30 times, {mid_switch} of them between a temporary link and its rename")


def test_activate_failing_between_any_two_steps_keeps_a_valid_current(tmp_path, store, monkeypatch):  # noqa: F811
    """Power cut after each step of ``activate`` in turn (symlink, rename, fsync: the k-th one fails): every time the
    store still has a valid ``current`` (old or new), the error names the folder, and the next activate succeeds."""
    import edge_runtime.store as store_module

    steps = {"n": 0, "fail_at": 0, "names": []}

    def faulty(name, real):
        def call(*args, **kwargs):
            steps["n"] += 1
            steps["names"].append(name)
            if steps["n"] == steps["fail_at"]:
                raise OSError(errno.EIO, f"power lost at {name}")
            return real(*args, **kwargs)
        return call

    for name in ("symlink", "replace", "fsync"):
        monkeypatch.setattr(store_module.os, name, faulty(name, getattr(os, name)))
    k, failed = 0, 0
    while True:
        k += 1
        steps.update(fail_at=0)
        if store.current("demo") != "v1":
            store.activate("demo", "v1")
        steps.update(n=0, fail_at=k, names=[])
        try:
            store.activate("demo", "v2")
        except StoreError as exc:
            failed += 1
            assert str(store.product_dir("demo")) in str(exc) and "power lost" in str(exc)
            _assert_store_valid(store)
            continue
        assert steps["n"] < k, "activate succeeded although a step failed"
        break
    _assert_store_valid(store)
    assert store.current("demo") == "v2" and failed >= 4, steps["names"]
    print(f"activate interrupted after each of its {failed} steps ({' '.join(steps['names'])}): current always valid")


def test_add_and_activate_make_their_work_durable_before_publishing_it(tmp_path, store, fitted, monkeypatch):  # noqa: F811
    """What survives a power cut is what was fsync'd: ``add`` fsyncs every copied file and folder before the rename
    that makes the version exist, and the product folder after; ``activate`` fsyncs the version and then the
    product folder after each link switch."""
    import edge_runtime.store as store_module

    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    monkeypatch.setattr(store_module.os, "replace", replace)
    pdir = store.product_dir("demo").resolve()
    store.add("demo", fitted[0], version="v3")
    rename = next(i for i, (op, what) in enumerate(log) if op == "replace" and what.endswith(str(pdir / "v3")))
    synced = {what for op, what in log[:rename] if op == "fsync"}
    staging = pdir / ".v3.incoming"
    files = {str(staging / p.relative_to(pdir / "v3")) for p in (pdir / "v3").rglob("*")} | {str(staging)}
    assert files <= synced, f"not fsync'd before the rename: {sorted(files - synced)}"
    assert ("fsync", str(pdir)) in log[rename + 1:], "the product folder is not fsync'd after the rename"
    log.clear()
    store.activate("demo", "v3")
    switch = next(i for i, (op, what) in enumerate(log) if op == "replace" and what.endswith(str(pdir / "current")))
    assert {str(p) for p in (pdir / "v3").rglob("*")} <= {w for op, w in log[:switch] if op == "fsync"}
    assert ("fsync", str(pdir)) in log[switch + 1:]
