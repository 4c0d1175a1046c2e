"""The status topic never lies: a retained ``online`` of a dead service expires, the status is refreshed with
its period in it, and a command published with the retain flag is refused even when it arrives live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_runtime.publishing.messages import status_expiry_s
from tests.mqtt_fixtures import require_mosquitto, wait_until
from tests.test_mqtt_publisher import CMD, REPLY, STATUS, config, publishers, queue  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def _retained_status(make_subscriber, port: int) -> list[dict]:
    """The retained status a new subscriber gets now (empty when there is none).

    The subscriber also listens on a marker topic and publishes one marker after its SUBACK: the broker
    sends retained messages before anything published later on the same connection, so once the marker is
    back every retained status has arrived; no waiting for a quiet period."""
    marker = f"test/marker/{uuid.uuid4().hex[:8]}"
    sub = make_subscriber(port, [STATUS, marker])
    sub.client.publish(marker, b"m", qos=1)
    assert sub.wait_for(lambda ms: any(m.topic == marker for m in ms), 10), "marker never came back"
    got = [json.loads(m.payload) for m in sub.on(STATUS) if m.retain and m.payload]
    sub.close()
    return got


_FROZEN_SERVICE = """
import sys, threading
from edge_runtime.publishing.disk_queue import DiskQueue
from edge_runtime.publishing.mqtt import MqttPublisher
from edge_runtime.service.config import MQTTConfig
cfg = MQTTConfig(host="127.0.0.1", port=int(sys.argv[1]), topic_prefix="site/line/st1", protocol="5",
                 client_id="frozen-edge", status_interval_s=1.0, keepalive_s=60)
MqttPublisher(cfg, DiskQueue(sys.argv[2], 1 << 20)).start()
threading.Event().wait()
"""


def test_online_status_of_a_frozen_service_expires(broker, make_subscriber, tmp_path):
    # A service that stops without its connection closing (process frozen, VM paused, host cut off) leaves its
    # retained "online" until the broker's keepalive check sends the will, 1.5 keepalives later (90 s here), or
    # for ever where the broker lost the session but kept its retained messages.  Now the retained online
    # status carries an MQTT 5 message expiry of three refresh periods and disappears by itself.
    require_mosquitto(broker, "MQTT 5 message expiry")
    proc = subprocess.Popen([sys.executable, "-c", _FROZEN_SERVICE, str(broker.port), str(tmp_path / "q")],
                            cwd=REPO)
    try:
        wait_until(lambda: any(s["state"] == "online" for s in _retained_status(make_subscriber, broker.port)),
                   30, "the retained online status")
        os.kill(proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        expiry = status_expiry_s(1.0)
        wait_until(lambda: not _retained_status(make_subscriber, broker.port), expiry + 20,
                   "the frozen service's retained online status to expire")
        assert time.monotonic() - frozen < 60, "expired only through the keepalive's last will"
    finally:
        proc.kill()
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(10)


def test_online_status_is_refreshed_and_says_its_period(broker, subscriber, queue, publishers):  # noqa: F811
    sub = subscriber(STATUS)
    publishers(config(broker, status_interval_s=0.5), queue)
    # a refresh is a new message with a later "at"; its period tells a 3.1.1 consumer when it is stale
    assert sub.wait_for(lambda ms: len([m for m in ms if m.topic == STATUS]) >= 3, 15), "no status refresh"
    got = [json.loads(m.payload) for m in sub.on(STATUS)]
    assert all(s["state"] == "online" and s["interval_s"] == 0.5 for s in got)
    assert got[-1]["at"] > got[0]["at"] and got[-1]["since"] == got[0]["since"]
    if broker.impl == "mosquitto" and "5" in broker.protocols:
        expiry = [getattr(m.properties, "MessageExpiryInterval", None) for m in sub.on(STATUS)]
        assert set(expiry) == {status_expiry_s(0.5)}


def test_retained_command_arriving_live_is_refused(broker, subscriber, queue, publishers):  # noqa: F811
    # A command published with the retain flag while the service is subscribed arrives live; MQTT 3.1.1 and
    # MQTT 5 without retain-as-published clear the flag on the way, and the service ran it.
    require_mosquitto(broker, "MQTT 5 retain-as-published")
    calls = []
    replies = subscriber(REPLY)
    pub = publishers(config(broker, protocol="5"), queue, on_command=lambda c: calls.append(c) or {})
    wait_until(lambda: pub.commands_ready, 10, "the publisher to subscribe to its commands")
    # a live, non-retained command first: it runs
    replies.client.publish(CMD, '{"command": "status", "id": "live"}', qos=1).wait_for_publish(5)
    replies.wait_count(REPLY, 1)
    replies.client.publish(CMD, '{"command": "reload", "id": "r1"}', qos=1, retain=True).wait_for_publish(5)
    msgs = replies.wait_count(REPLY, 2)
    r = json.loads(msgs[1].payload)
    assert r["id"] == "r1" and not r["ok"] and "retained" in r["error"], r
    assert [c.id for c in calls] == ["live"]
    info = replies.client.publish(CMD, b"", qos=1, retain=True)  # clear it
    info.wait_for_publish(5)
    assert info.rc == mqtt.MQTT_ERR_SUCCESS
