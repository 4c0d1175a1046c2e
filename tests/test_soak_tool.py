"""tools/soak.py on the small demo product for half a minute: one row per window, the broker really restarted (a
new mosquitto process each time), the service back on it, and every seq at the subscriber."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from edge_runtime.publishing.broker import find_mosquitto

REPO = Path(__file__).resolve().parents[1]


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_tool", REPO / "tools" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_restarts_the_broker_and_loses_no_seq(tmp_path, demo_data, fitted_slice, capsys):
    if find_mosquitto() is None:
        pytest.skip("needs Mosquitto (the soak stops and starts a real broker with persistence): "
                    "apt-get install mosquitto")
    bundle, _ = fitted_slice
    out = tmp_path / "soak.json"
    # 0.5 min, restarts at 0.2 and 0.4 min (each waited out until the service reconnected and caught up), windows of
    # 6 s; 20 frames/s offered keeps the shared machine's cores for others (the soak itself runs at full rate)
    rc = _soak_module().main(["--minutes", "0.5", "--broker-restart-minutes", "0.2", "--window-minutes", "0.1",
                              "--broker-down-seconds", "1", "--fps", "20", "--bundle", str(bundle),
                              "--images", str(demo_data / "test"), "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert rc == (0 if report["pass"] else 1), report["fail_reasons"]

    windows = report["windows"]
    assert [w["window"] for w in windows] == [1, 2, 3, 4, 5]
    assert all(w["rss_mb"] > 0 and w["fds"] > 0 and w["threads"] > 0 for w in windows)
    assert sum(w["results"] for w in windows) > 0
    assert all(w["total_ms_p50"] is not None for w in windows if w["results"])
    assert printed.count("\n") > 5 and "results/s" in printed and ("PASS" in printed or "FAIL" in printed)

    restarts = report["restarts"]
    assert len(restarts) == 2 and sum(w["restarts"] for w in windows) == 2
    for r in restarts:
        assert r["new_pid"] != r["old_pid"]  # a real stop and start: another mosquitto process
        assert r["reconnect_s"] is not None and r["caught_up_s"] is not None and r["subscriber_reconnected"]
        assert r["subscriber_session_present"] is not False  # the broker kept the MES stand-in's session
    assert restarts[0]["new_pid"] == restarts[1]["old_pid"]

    seq = report["seq"]
    assert report["service_alive_at_end"] and report["drained"]["all_delivered"]
    assert seq["first"] == 0 and seq["missing"] == 0 and seq["missing_seqs"] == []
    assert seq["received"] >= report["drained"]["produced_at_end"] > 0
    memory = report["memory"]
    assert memory["rss_after_warmup_mb"] == windows[0]["rss_mb"] and memory["rss_growth_pct"] is not None
    assert report["pass"] == (memory["rss_growth_pct"] < 5.0)  # the only other way to fail is a missing seq
    assert Path(report["service_log"]["path"]).is_file()
