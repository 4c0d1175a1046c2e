"""Field calibration end to end on real parts: capture from the simulated GenICam camera (viky.cti), fit on
those frames over the ``fitted`` bundle, activate while ``weakrest-edge run`` serves the same camera
(real Mosquitto), watch the status switch with no result lost, then roll back by SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from calibration.cli import main
from edge_runtime.core.bundle import load_bundle
from edge_runtime.publishing.messages import decode_result
from edge_runtime.publishing.subscriber import Subscriber
from edge_runtime.store import BundleStore
from tests.mqtt_fixtures import wait_until as _wait

PREFIX = "plant/line/cal"
REPO = Path(__file__).resolve().parents[1]




def test_capture_fit_activate_rollback_with_the_service_running(fitted, tmp_path, broker, capsys):
    import genicam

    cti = Path(genicam.__file__).parent / "viky.cti"
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", fitted[0], version="v1"))
    cfg = {"bundles": {"store": str(store.root), "product": "demo"},
           "camera": {"source": "genicam", "name": "viky", "genicam": {"cti": str(cti)}},
           "mqtt": {"port": broker.port, "topic_prefix": PREFIX, "heatmap": "none", "client_id": "svc-cal"},
           "queue": {"dir": str(tmp_path / "state" / "queue"), "max_mb": 16},
           "health": {"port": 0}, "latency_budget_ms": 500, "threads": 1}
    config = tmp_path / "edge.yaml"
    config.write_text(yaml.safe_dump(cfg))

    # 1. capture good frames from the camera (its source is closed again before the service opens it)
    frames = tmp_path / "frames"
    assert main(["capture", "--config", str(config), "--count", "14", "--out", str(frames), "--json"]) == 0
    captured = json.loads(capsys.readouterr().out)
    log = json.loads((frames / "capture.json").read_text())
    assert captured["written"] == 14 and len(log["frames"]) == 14
    assert log["camera"]["source"] == "genicam" and log["camera"]["device_id"] and log["camera"]["PixelFormat"]
    assert len({f["sha256"] for f in log["frames"]}) == 14 and log["frames"][0]["width"] == 400

    # 2. fit on them, straight into the store (not active)
    assert main(["fit", "--base", str(fitted[0]), "--images", str(frames), "--store", str(store.root),
                 "--product", "demo", "--version", "cal1", "--holdout", "0.25", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["n_bank_frames"] == 10 and store.current("demo") == "v1"
    assert fit["threshold"]["n_scores"] - fit["threshold"]["n_leave_one_out"] == 4  # held out
    new = load_bundle(store.product_dir("demo") / "cal1").manifest
    assert new.parent.endswith(load_bundle(fitted[0]).manifest.bundle_version)
    assert json.loads((store.product_dir("demo") / "cal1" / "calibration.json").read_text())["camera"]["source"] \
        == "genicam"

    # 3. the service serves v1 from the same camera
    sub = Subscriber(broker.port, [f"{PREFIX}/result", f"{PREFIX}/status"], protocol=broker.protocol)
    log_file = open(tmp_path / "service.log", "ab")
    service = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(config)],
                               stdout=log_file, stderr=log_file, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})

    def results() -> list:
        return [decode_result(m.payload) for m in sub.on(f"{PREFIX}/result")]

    def status() -> dict:
        got = sub.on(f"{PREFIX}/status")
        return json.loads(got[-1].payload) if got else {}

    try:
        _wait(lambda: len(results()) >= 5, 90, "results from v1")
        assert status()["bundle_version"] == "v1"

        # 4. activate: the switch, then the MQTT reload command, confirmed by the status
        assert main(["activate", "cal1", "--config", str(config), "--timeout", "60"]) == 0
        out = capsys.readouterr().out
        assert "current v1 -> cal1" in out and "confirmed: service" in out and "now serves cal1" in out
        _wait(lambda: status().get("bundle_version") == "cal1" and status()["state"] == "online", 10,
              "the status showing cal1")
        _wait(lambda: any(r.bundle_version == "cal1" for r in results()), 30, "a result from cal1")
        n_cal = len(results())
        _wait(lambda: len(results()) >= n_cal + 3, 30, "more results from cal1")

        # 5. roll back by SIGHUP, confirmed through the status topic
        assert main(["rollback", "--config", str(config), "--pid", str(service.pid), "--timeout", "60"]) == 0
        assert "confirmed: service" in capsys.readouterr().out
        _wait(lambda: status().get("bundle_version") == "v1", 10, "the status showing v1 again")
        assert store.current("demo") == "v1" and store.previous("demo") == "cal1"
        n_back = len(results())
        _wait(lambda: len(results()) >= n_back + 3, 30, "results after the rollback")
        service.send_signal(signal.SIGTERM)
        assert service.wait(60) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(10)
        log_file.close()
    sub.wait_for(lambda ms: json.loads(ms[-1].payload).get("state") == "offline", 10)
    sub.close()

    # no result lost across the two switches: seq contiguous once duplicates are dropped, versions in order
    seen, order = set(), []
    for r in results():
        if r.seq not in seen:
            seen.add(r.seq)
            order.append(r)
    seqs = [r.seq for r in order]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a result is missing"
    versions = [r.bundle_version for r in order]
    first_cal, last_cal = versions.index("cal1"), len(versions) - 1 - versions[::-1].index("cal1")
    assert set(versions[:first_cal]) == {"v1"} and set(versions[first_cal:last_cal + 1]) == {"cal1"}
    assert set(versions[last_cal + 1:]) == {"v1"} and len(versions) > last_cal + 1
    assert all(r.verdict in ("pass", "fail") for r in order)
