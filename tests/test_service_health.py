"""Prometheus text rendering (parsed back), the service metrics, and the /health + /metrics HTTP endpoint."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from edge_runtime.service.health import HealthServer, assess
from edge_runtime.service.metrics import (
    LATENCY_BUCKETS_MS,
    Counter,
    Gauge,
    Histogram,
    InfoGauge,
    QuantileWindow,
    Registry,
    ServiceMetrics,
    StateGauge,
)

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\["\\n])*)"(,|$)')


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def parse_exposition(text: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, dict[str, str], float]]]:
    """({name: (type, help)}, [(sample name, labels, value)]); fails on any line not in format 0.0.4."""
    assert text.endswith("\n")
    meta: dict[str, list[str]] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            meta.setdefault(name, ["", ""])[1] = _unescape(help_)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            meta.setdefault(name, ["", ""])[0] = kind
        else:
            m = _SAMPLE.fullmatch(line)
            assert m, f"not a sample line: {line!r}"
            labels: dict[str, str] = {}
            raw = m.group(2) or ""
            pos = 0
            while pos < len(raw):
                lm = _LABEL.match(raw, pos)
                assert lm, f"bad labels in {line!r}"
                assert lm.group(1) not in labels
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
            samples.append((m.group(1), labels, float(m.group(3))))
    return {k: (v[0], v[1]) for k, v in meta.items()}, samples


def _family(sample_name: str, meta: dict) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample_name.removesuffix(suffix)
        if base != sample_name and meta.get(base, ("",))[0] == "histogram":
            return base
    return sample_name


def check_histograms(meta: dict, samples: list) -> int:
    """Every histogram series: buckets cumulative in increasing ``le``, ``+Inf`` == ``_count``; returns #series."""
    series: dict[tuple[str, tuple], dict] = {}
    for name, labels, value in samples:
        fam = _family(name, meta)
        if meta[fam][0] != "histogram":
            continue
        key = (fam, tuple(sorted((k, v) for k, v in labels.items() if k != "le")))
        row = series.setdefault(key, {"buckets": []})
        if name.endswith("_bucket"):
            row["buckets"].append((float(labels["le"]), value))
        else:
            row[name[len(fam) + 1:]] = value
    for row in series.values():
        les = [le for le, _ in row["buckets"]]
        counts = [c for _, c in row["buckets"]]
        assert les == sorted(les) and les[-1] == math.inf
        assert counts == sorted(counts)
        assert counts[-1] == row["count"]
        assert "sum" in row
    return len(series)


# ---------------------------------------------------------------------------------------------------- registry


def test_render_parses_back_with_escaping_and_cumulative_buckets():
    r = Registry()
    c = r.counter("demo_events_total", 'Events with "quotes", a back\\slash and a\nnewline', ["kind"])
    g = r.gauge("demo_temperature", "A gauge")
    h = r.histogram("demo_latency_ms", "Latency", ["stage"])
    tricky = 'a"b\\c\nd'
    c.labels(kind=tricky).inc(2)
    c.inc(kind="plain")
    c.inc(1.5, "plain")
    g.set(-3.25)
    for v in (0.5, 1, 3, 7, 150, 5000, 1e9):
        h.observe(v, stage="backbone")
    h.labels(stage="io").observe(2)

    text = r.render()
    meta, samples = parse_exposition(text)
    assert meta["demo_events_total"] == ("counter", 'Events with "quotes", a back\\slash and a\nnewline')
    assert meta["demo_temperature"][0] == "gauge" and meta["demo_latency_ms"][0] == "histogram"
    assert ("demo_events_total", {"kind": tricky}, 2.0) in samples
    assert ("demo_events_total", {"kind": "plain"}, 2.5) in samples
    assert ("demo_temperature", {}, -3.25) in samples
    assert check_histograms(meta, samples) == 2
    buckets = {lab["le"]: v for n, lab, v in samples if n == "demo_latency_ms_bucket" and lab["stage"] == "backbone"}
    assert list(buckets) == [repr(float(b)) for b in LATENCY_BUCKETS_MS] + ["+Inf"]  # le="1.0", ..., "+Inf"
    assert buckets["1.0"] == 2 and buckets["5.0"] == 3 and buckets["10.0"] == 4 and buckets["200.0"] == 5
    assert buckets["2000.0"] == 5 and buckets["+Inf"] == 7
    assert ("demo_latency_ms_sum", {"stage": "backbone"}, 0.5 + 1 + 3 + 7 + 150 + 5000 + 1e9) in samples
    assert ("demo_latency_ms_count", {"stage": "io"}, 1.0) in samples
    # HELP and TYPE come first for each family, in registration order
    assert text.index("# TYPE demo_events_total counter") < text.index("# HELP demo_temperature")
    assert h.snapshot(stage="backbone")[2] == 7


def test_unlabelled_metrics_export_zero_and_labelled_ones_nothing_until_used():
    r = Registry()
    r.counter("a_total", "a")
    r.gauge("b", "b")
    r.histogram("c_ms", "c", buckets=(1, 10))
    r.counter("d_total", "d", ["x"])
    meta, samples = parse_exposition(r.render())
    assert ("a_total", {}, 0.0) in samples and ("b", {}, 0.0) in samples
    assert ("c_ms_bucket", {"le": "+Inf"}, 0.0) in samples and ("c_ms_count", {}, 0.0) in samples
    assert "d_total" in meta and not [s for s in samples if s[0] == "d_total"]


def test_special_values_and_gauge_moves():
    r = Registry()
    g = r.gauge("g", "g", ["k"])
    g.set(math.inf, k="up")
    g.set(math.nan, k="nan")
    g.inc(5, k="n")
    g.dec(2, k="n")
    g.labels(k="child").inc()
    text = r.render()
    assert 'g{k="up"} +Inf' in text and 'g{k="nan"} NaN' in text and 'g{k="n"} 3' in text
    assert g.get(k="child") == 1.0
    g.remove(k="up")
    assert 'k="up"' not in r.render()


def test_invalid_use_is_refused():
    r = Registry()
    c = r.counter("ok_total", "ok", ["verdict"])
    with pytest.raises(ValueError):
        r.counter("ok_total", "again")
    for bad in ("0starts_with_digit", "has-dash", "sp ace", ""):
        with pytest.raises(ValueError):
            Counter(bad, "x")
    with pytest.raises(ValueError):
        Gauge("g", "x", ["__reserved"])
    with pytest.raises(ValueError):
        Histogram("h", "x", ["le"])
    with pytest.raises(ValueError):
        Histogram("h", "x", buckets=(1, 1))
    with pytest.raises(ValueError):
        c.inc(-1, verdict="pass")
    with pytest.raises(ValueError):
        c.labels(verdict="pass").inc(-1)
    with pytest.raises(ValueError):
        c.inc(1, wrong="x")
    with pytest.raises(ValueError):
        c.inc()  # missing label


def test_concurrent_updates_are_not_lost():
    r = Registry()
    c = r.counter("n_total", "n", ["t"])
    h = r.histogram("h_ms", "h")

    def work(i: int) -> None:
        child = c.labels(t="shared")
        for k in range(2000):
            child.inc()
            h.observe(i)
            if k % 500 == 0:
                parse_exposition(r.render())  # rendering while others write

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.get(t="shared") == 8000
    assert h.snapshot()[2] == 8000 and h.snapshot()[1] == 2000 * (0 + 1 + 2 + 3)


def test_quantile_window_is_bounded_and_interpolates():
    w = QuantileWindow(size=100)
    assert w.quantile(0.5) is None and w.summary() == {"p50": None, "p99": None, "n": 0}
    for v in range(1000, 0, -1):  # only the last 100 (100..1) stay
        w.add(v)
    assert len(w) == 100
    assert w.quantile(0.5) == pytest.approx(50.5)
    assert w.quantile(0.99) == pytest.approx(99.01)
    assert w.quantile(0.0) == 1 and w.quantile(1.0) == 100
    with pytest.raises(ValueError):
        w.quantile(1.5)
    one = QuantileWindow(5)
    one.add(7)
    assert one.summary() == {"p50": 7.0, "p99": 7.0, "n": 1}


# ---------------------------------------------------------------------------------------------------- service metrics

EXPECTED = {
    "weakrest_frames_total": "counter", "weakrest_verdicts_total": "counter",
    "weakrest_dropped_frames_total": "counter", "weakrest_incomplete_frames_total": "counter",
    "weakrest_fetch_timeouts_total": "counter", "weakrest_camera_reconnects_total": "counter",
    "weakrest_stage_latency_ms": "histogram", "weakrest_end_to_end_latency_ms": "histogram",
    "weakrest_over_budget_total": "counter", "weakrest_queue_depth": "gauge", "weakrest_queue_held": "gauge",
    "weakrest_queue_dropped_total": "counter", "weakrest_mqtt_connected": "gauge",
    "weakrest_camera_state": "gauge", "weakrest_bundle_info": "gauge", "weakrest_engine_info": "gauge",
    "weakrest_reloads_total": "counter",
    "weakrest_health_state": "gauge",
}


def test_service_metrics_families_and_updates():
    m = ServiceMetrics(window=50)
    meta, samples = parse_exposition(m.render())
    assert {k: v[0] for k, v in meta.items()} == EXPECTED
    assert ("weakrest_verdicts_total", {"verdict": "fail"}, 0.0) in samples  # exists before the first fail
    assert ("weakrest_reloads_total", {"result": "failed"}, 0.0) in samples
    assert ("weakrest_camera_state", {"state": "idle"}, 1.0) in samples
    assert not [s for s in samples if s[0] == "weakrest_bundle_info"]
    m.health_state("degraded")  # the service sets it at every scrape
    _, samples = parse_exposition(m.render())
    assert {lab["state"]: v for n, lab, v in samples if n == "weakrest_health_state"} == {
        "ok": 0, "degraded": 1, "failing": 0}

    m.record_result("pass", {"preprocess": 1.2, "backbone": 30.0}, end_to_end_ms=40.0)
    m.record_result("fail", {"preprocess": 1.1, "backbone": 80.0}, end_to_end_ms=90.0, over_budget=True)
    m.camera_state("streaming")
    m.set_camera_state("rebooting")  # a state not listed up front still gets a one-hot series
    m.bundle_info("texture", "3")
    m.set_bundle("texture", "4")  # reload: the old version's series goes away
    m.reloads_total.inc(result="ok")
    m.queue_depth.set(12)
    m.mqtt_connected.set(1)
    m.fetch_timeouts_total.set_total(7)  # mirrored from the acquisition stats at scrape time

    meta, samples = parse_exposition(m.render())
    got = {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples}
    assert got[("weakrest_frames_total", ())] == 2
    assert got[("weakrest_verdicts_total", (("verdict", "pass"),))] == 1
    assert got[("weakrest_over_budget_total", ())] == 1
    assert got[("weakrest_stage_latency_ms_count", (("stage", "backbone"),))] == 2
    assert got[("weakrest_end_to_end_latency_ms_sum", ())] == 130.0
    states = {lab["state"]: v for n, lab, v in samples if n == "weakrest_camera_state"}
    assert states == {"idle": 0, "connecting": 0, "streaming": 0, "waiting_trigger": 0, "lost": 0, "finished": 0,
                      "stopped": 0, "rebooting": 1}
    assert [lab for n, lab, _ in samples if n == "weakrest_bundle_info"] == [{"product": "texture", "version": "4"}]
    assert got[("weakrest_reloads_total", (("result", "ok"),))] == 1
    assert got[("weakrest_queue_depth", ())] == 12 and got[("weakrest_mqtt_connected", ())] == 1
    assert got[("weakrest_fetch_timeouts_total", ())] == 7
    assert check_histograms(meta, samples) == 3
    assert m.latency_summary() == {"p50": 65.0, "p99": pytest.approx(89.5), "n": 2}
    m.end_to_end_latency_ms.observe(10.0)  # observing the histogram directly feeds the window too
    assert m.latency_summary()["n"] == 3


def test_counter_set_total_and_state_info_gauges():
    r = Registry()
    c = r.counter("mirrored_total", "m")
    c.set_total(5)
    c.set_total(9)
    assert c.get() == 9
    with pytest.raises(ValueError):
        c.set_total(-1)
    s = StateGauge("s", "s", "mode", ["a", "b"])
    i = InfoGauge("i_info", "i", ["v"])
    r.register(s)
    r.register(i)
    _, samples = parse_exposition(r.render())
    assert ("s", {"mode": "a"}, 0.0) in samples and ("s", {"mode": "b"}, 0.0) in samples
    s("b")
    i(v="1")
    i("2")
    _, samples = parse_exposition(r.render())
    assert ("s", {"mode": "b"}, 1.0) in samples and ("s", {"mode": "a"}, 0.0) in samples
    assert [x for x in samples if x[0] == "i_info"] == [("i_info", {"v": "2"}, 1.0)]


def test_service_package_does_not_import_torch():
    code = ("import sys, edge_runtime.service.notify, edge_runtime.service.metrics, edge_runtime.service.health; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


# ---------------------------------------------------------------------------------------------------- HTTP


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


@pytest.fixture
def served():
    state = {"health": {"ok": True, "camera": "connected", "p99_ms": 12.5}, "raise": False}
    metrics = ServiceMetrics()

    def health() -> dict:
        if state["raise"]:
            raise RuntimeError("health broke")
        return state["health"]

    server = HealthServer("127.0.0.1", 0, health, metrics.render).start()
    try:
        yield server, state, metrics
    finally:
        server.stop()


def test_health_endpoint_status_follows_ok(served):
    server, state, _ = served
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    code, headers, body = _get(server.url + "/health")
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"ok": True, "camera": "connected", "p99_ms": 12.5}
    state["health"] = {"ok": False, "reason": "camera lost", "p99_ms": math.nan}
    code, _, body = _get(server.url + "/health?verbose=1")
    assert code == 503 and json.loads(body) == {"ok": False, "reason": "camera lost", "p99_ms": None}
    state["health"] = {"camera": "connected"}  # no "ok": not healthy
    assert _get(server.url + "/health")[0] == 503


def test_metrics_endpoint_and_unknown_paths(served):
    server, _, metrics = served
    metrics.frames_total.inc(3)
    code, headers, body = _get(server.url + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    meta, samples = parse_exposition(body.decode())
    assert ("weakrest_frames_total", {}, 3.0) in samples and set(meta) == set(EXPECTED)
    for path in ("/", "/healthz", "/metrics/x", "/../etc/passwd"):
        assert _get(server.url + path)[0] == 404


def test_handler_errors_do_not_kill_the_server(served):
    server, state, _ = served
    state["raise"] = True
    code, _, body = _get(server.url + "/health")
    assert code == 500 and json.loads(body)["ok"] is False and "health broke" in json.loads(body)["error"]
    state["raise"] = False
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:  # garbage request line
        s.sendall(b"\x00\x01 nonsense\r\n\r\n")
        s.recv(1024)
    assert _get(server.url + "/health")[0] == 200


def test_stop_releases_the_port():
    server = HealthServer("127.0.0.1", 0, lambda: {"ok": True}, lambda: "").start()
    port = server.port
    assert _get(f"http://127.0.0.1:{port}/health")[0] == 200
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with HealthServer("127.0.0.1", port, lambda: {"ok": True}, lambda: "") as again:  # rebinding works
        assert _get(again.url + "/health")[0] == 200


def test_ipv6_loopback():
    try:
        server = HealthServer("::1", 0, lambda: {"ok": True}, lambda: "")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with server:
        assert server.url.startswith("http://[::1]:")
        assert _get(server.url + "/health")[0] == 200


# ---------------------------------------------------------------------------------------------------- states


def test_assess_ok_degraded_failing_with_plain_reasons():
    assert assess() == ("ok", [])
    state, reasons = assess(mqtt_connected=False, broker="10.0.0.5:1883")
    assert state == "degraded" and reasons == ["not connected to the MQTT broker 10.0.0.5:1883: results wait in "
                                               "the on-disk queue, no verdict reaches the MES"]
    # queued results degrade only once the oldest has waited longer than the configured age
    assert assess(queue_depth=40, queue_age_s=9.0, queue_degraded_s=10) == ("ok", [])
    state, reasons = assess(queue_depth=40, queue_age_s=12.4, queue_degraded_s=10)
    assert state == "degraded" and reasons == ["40 result(s) queued, the oldest for 12 s (more than "
                                               "health.queue_degraded_s = 10 s): verdicts reach the MES late"]
    for camera_state, words in [("connecting", "camera cam0 connecting"), ("starting", "camera cam0 not started"),
                                ("lost", "camera cam0 lost (cable unplugged), reconnecting"),
                                ("finished", "camera cam0 finished")]:
        state, reasons = assess(camera="cam0", camera_state=camera_state, camera_detail="cable unplugged"
                                if camera_state == "lost" else "")
        assert state == "degraded" and reasons[0].startswith(words), reasons
    assert assess(camera_state="waiting_trigger") == ("ok", [])  # an idle line in trigger mode is fine
    # a queue disk that refuses writes (full): results only in memory, whatever their age
    state, reasons = assess(queue_depth=7, queue_age_s=0.2, queue_disk_error="No space left on device", queue_held=3,
                            queue_dir="/var/lib/weakrest/queue")
    assert state == "degraded" and reasons == [
        "the result queue's disk /var/lib/weakrest/queue refuses writes (No space left on device): 3 result(s) held "
        "in memory only, lost if the service stops; they go to disk once it takes writes again"]
    state, reasons = assess(sinks={"opcua": {"state": "ok"}, "sparkplug": {"state": "failing", "reason": "no cert"}})
    assert state == "degraded" and reasons == ["output sparkplug is failing: no cert"]
    state, reasons = assess(sinks={"sparkplug": {"state": "degraded", "reasons": ["host offline", "3 queued"]}})
    assert reasons == ["output sparkplug is degraded: host offline; 3 queued"]
    # a dead inference thread is failing, whatever else holds; every reason is listed
    state, reasons = assess(inference_problem="the inference thread is not running", mqtt_connected=False)
    assert state == "failing" and len(reasons) == 2 and reasons[0] == "the inference thread is not running"


def test_health_and_live_status_codes_follow_the_state(served):
    server, state, _ = served
    table = {"ok": (200, 200), "degraded": (503, 200), "failing": (503, 503)}
    for name, (health_code, live_code) in table.items():
        state["health"] = {"ok": name == "ok", "state": name, "reasons": [] if name == "ok" else ["why"]}
        code, _, body = _get(server.url + "/health")
        assert code == health_code and json.loads(body)["state"] == name, name
        code, _, body = _get(server.url + "/health/live")
        assert code == live_code and json.loads(body)["state"] == name, name
    state["health"] = {"ok": False}  # a report without a state: judged by "ok" alone
    assert _get(server.url + "/health/live")[0] == 503
    state["raise"] = True
    assert _get(server.url + "/health/live")[0] == 500


class _Sink:
    def __init__(self, name, health):
        self.name, self._health = name, health

    def health(self):
        if isinstance(self._health, Exception):
            raise self._health
        return self._health


def test_service_health_reads_the_oldest_queued_result_and_the_sinks(tmp_path, monkeypatch):
    """The runner's own health code on a real on-disk queue; the rest of the service is stood in for.  A result
    queued by this process is timed on the monotonic clock, one left by a previous run by its ``captured_at``."""
    import time
    from types import SimpleNamespace

    from edge_runtime.publishing import DiskQueue
    from edge_runtime.publishing.messages import ResultMessage, encode_result
    from edge_runtime.service.config import EdgeConfig
    from edge_runtime.service.runner import EdgeService

    cfg = EdgeConfig.model_validate({"bundles": {"store": str(tmp_path), "product": "p"},
                                     "health": {"queue_degraded_s": 5}})
    metrics = ServiceMetrics()

    class Fake:
        _health_state = EdgeService._health_state
        _oldest_queued_age_s = EdgeService._oldest_queued_age_s

        def _inference_problem(self):
            return None

    real_monotonic, later = time.monotonic, {"s": 0.0}
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + later["s"])
    with DiskQueue(tmp_path / "q", 1 << 20) as q:
        svc = Fake()
        svc.cfg, svc.queue, svc.metrics = cfg, q, metrics
        svc._started_mono = time.monotonic()
        svc.publisher = SimpleNamespace(connected=True, commands_ready=True)
        svc.camera_state, svc.camera_detail = "streaming", ""
        svc.sinks = [_Sink("opcua", {"state": "ok", "clients": 1})]
        assert svc._health_state() == ("ok", [], {"mqtt_connected": True, "mqtt_commands_ready": True,
                                                  "queue_depth": 0,
                                                  "queue_oldest_age_s": None, "queue_held": 0,
                                                  "queue_disk_error": None,
                                                  "sinks": {"opcua": {"state": "ok", "clients": 1}}})
        for seq in (0, 1):
            q.append(encode_result(ResultMessage(seq=seq, frame_id=seq, camera="cam0", product="p",
                                                 bundle_version="v1", verdict="pass", score=0.1,
                                                 captured_at=time.time() - 3600)))  # the wall clock is not asked
            later["s"] += 7.0 if seq == 0 else 0.0  # record 0 has waited 7 s when record 1 comes
        state, reasons, details = svc._health_state()
        assert state == "degraded" and details["queue_depth"] == 2 and 7.0 <= details["queue_oldest_age_s"] < 60
        assert reasons[0].startswith("2 result(s) queued, the oldest for 7 s")
        assert metrics.health_state.get("degraded") == 1 and metrics.health_state.get("ok") == 0
        q.ack(0)  # the old one delivered: the one left is young
        assert svc._health_state()[0] == "ok" and metrics.health_state.get("ok") == 1
        svc.sinks.append(_Sink("sparkplug", RuntimeError("socket gone")))
        state, reasons, details = svc._health_state()
        assert state == "degraded" and details["sinks"]["sparkplug"]["state"] == "failing"
        assert reasons == ["output sparkplug is failing: health() failed: RuntimeError: socket gone"]
    # a result left by a previous run: only its captured_at can tell its age
    old = encode_result(ResultMessage(seq=5, frame_id=5, camera="cam0", product="p", bundle_version="v1",
                                      verdict="pass", score=0.1, captured_at=time.time() - 30))
    with DiskQueue(tmp_path / "q2", 1 << 20) as q2:
        q2.append(old)
    with DiskQueue(tmp_path / "q2", 1 << 20) as q2:
        svc.queue, svc.sinks = q2, []
        state, reasons, details = svc._health_state()
        assert state == "degraded" and 30 <= details["queue_oldest_age_s"] < 60, details
        assert reasons[0].startswith("1 result(s) queued, the oldest for 30 s")
