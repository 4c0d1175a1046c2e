"""Issue 19, "a status that never lies": a real ``weakrest-edge run`` against a real Mosquitto.

While the broker is down no verdict reaches the MES, so ``/health`` must say so (503, ``degraded``, a reason
naming the broker) even though the process itself is fine (``/health/live`` stays 200); once the broker is back
it must say ``ok`` again, and the ``weakrest_health_state`` gauge follows.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.mqtt_fixtures import wait_until as _wait
from tests.test_edge_service import _config, _Service, replay_dir, store  # noqa: F401  (fixtures)


def _get(port: int, path: str) -> tuple[int, dict | str]:
    """(HTTP status, JSON body or text); (0, {}) while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            code, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:  # 503 still carries the report
        with exc:
            code, data, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    except OSError:
        return 0, {}
    return code, json.loads(data) if ctype.startswith("application/json") else data.decode()


def _health_states(port: int) -> dict[str, float]:
    code, text = _get(port, "/metrics")
    assert code == 200, code
    out = {}
    for line in text.splitlines():
        if line.startswith("weakrest_health_state{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('state="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def test_health_reports_a_broker_outage_and_recovers(tmp_path, store, make_broker, replay_dir):  # noqa: F811
    broker = make_broker()
    cfg = _config(tmp_path, store, broker.port, {"source": "replay", "replay": {"path": str(replay_dir),
                                                                                "fps": 20}})
    cfg["mqtt"]["heatmap"] = "none"
    port = cfg["health"]["port"]
    svc = _Service(tmp_path, cfg).start()
    seen: dict = {}

    def health_is(code: int, check) -> bool:
        seen["last"] = got = _get(port, "/health")
        return got[0] == code and isinstance(got[1], dict) and check(got[1])

    try:
        _wait(lambda: "READY=1" in svc.drain_notify(), 120, "READY=1 from the service")
        _wait(lambda: health_is(200, lambda b: b.get("ok") is True and b.get("results", 0) >= 3), 60,
              "200 ok with results flowing")

        broker.stop()
        try:
            _wait(lambda: health_is(503, lambda b: b.get("state") == "degraded"
                                    and any("broker" in r and str(broker.port) in r for r in b.get("reasons", ()))),
                  30, "/health 503 degraded naming the broker")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last /health: {seen['last']}") from None
        body = seen["last"][1]
        assert body["ok"] is False and body["mqtt_connected"] is False
        live_code, live = _get(port, "/health/live")
        assert live_code == 200 and live["state"] == "degraded", (live_code, live)  # the process is fine
        assert _health_states(port) == {"ok": 0, "degraded": 1, "failing": 0}

        broker.restart()
        try:
            _wait(lambda: health_is(200, lambda b: b.get("state") == "ok" and b.get("ok") is True
                                    and b.get("reasons") == []), 60, "/health 200 ok after the broker is back")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last /health: {seen['last']}") from None
        assert seen["last"][1]["mqtt_connected"] is True
        assert _get(port, "/health/live")[0] == 200
        _wait(lambda: _health_states(port) == {"ok": 1, "degraded": 0, "failing": 0}, 30, "the gauge back at ok")
    finally:
        svc.kill()
