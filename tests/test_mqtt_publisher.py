"""MqttPublisher against a real broker: status and last will, ordered at-least-once results through outages,
restart from a queue left by a killed process, heatmaps (MQTT 5 properties / 3.1.1 framing), commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from edge_runtime.publishing.broker import LocalBroker, find_mosquitto, free_port
from edge_runtime.publishing.disk_queue import DiskQueue
from edge_runtime.publishing.messages import ResultMessage, decode_heatmap, decode_result
from edge_runtime.publishing.mqtt import MqttPublisher
from edge_runtime.service.config import MQTTConfig, TLSConfig
from tests.mqtt_fixtures import require_mosquitto

REPO = Path(__file__).resolve().parents[1]
PREFIX = "site/line/st1"
RESULT, STATUS, HEATMAP, CMD, REPLY = (f"{PREFIX}/{t}" for t in ("result", "status", "heatmap", "cmd", "cmd/reply"))


def config(target: LocalBroker | int, **kw) -> MQTTConfig:
    """Publisher config for a broker (MQTT 3.1.1 when it has no MQTT 5, e.g. amqtt) or a bare port."""
    kw.setdefault("client_id", f"edge-{uuid.uuid4().hex[:8]}")
    if isinstance(target, LocalBroker):
        if "5" not in target.protocols:
            kw.setdefault("protocol", "3.1.1")
        target = target.port
    return MQTTConfig(host="127.0.0.1", port=target, topic_prefix=PREFIX, **kw)


def needs_mqtt5(b: LocalBroker) -> None:
    if "5" not in b.protocols:
        require_mosquitto(b, "MQTT 5")


def result(seq: int) -> ResultMessage:
    return ResultMessage(seq=seq, frame_id=1000 + seq, camera="cam0", product="bracket", bundle_version="v1",
                         verdict="fail" if seq % 7 == 0 else "pass", score=0.5, threshold=0.6,
                         regions=[{"x": 1, "y": 2, "w": 3, "h": 4, "area_px": 9, "peak": 0.9}] if seq % 7 == 0 else [],
                         timings_ms={"total": 12.5}, budget_ms=50.0, captured_at=time.time())


def seqs(sub) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in sub.on(RESULT)]


def first_copies(values: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def wait_until(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture
def queue(tmp_path):
    q = DiskQueue(tmp_path / "queue", 1 << 22)
    yield q
    q.close()


@pytest.fixture
def publishers():
    made: list[MqttPublisher] = []

    def make(cfg: MQTTConfig, q: DiskQueue, **kw) -> MqttPublisher:
        kw.setdefault("status_provider", lambda: {"product": "bracket", "bundle_version": "v1",
                                                  "camera_state": "streaming"})
        pub = MqttPublisher(cfg, q, **kw).start()
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.close(timeout_s=1.0)


def statuses(sub) -> list[dict]:
    return [json.loads(m.payload) for m in sub.on(STATUS)]


# ----------------------------------------------------------------------------------------- status / will


def test_online_status_is_retained_and_clean_close_publishes_offline_without_will(broker, subscriber, queue,
                                                                                 publishers):
    pub = publishers(config(broker), queue)
    assert wait_until(lambda: pub.connected)
    late = subscriber(STATUS)  # subscribes after the status was published: gets the retained copy
    msg = late.wait_count(STATUS, 1)[0]  # QoS 1: a copy may come twice (amqtt does that now and then)
    status = json.loads(msg.payload)
    assert msg.retain and status["state"] == "online"
    assert status["product"] == "bracket" and status["camera_state"] == "streaming"
    assert status["pid"] == os.getpid() and status["version"] and status["since"] <= time.time()
    assert pub.protocol == broker.protocols[0]

    assert pub.close() is True  # nothing was left queued
    assert late.wait_for(lambda ms: any(json.loads(m.payload)["state"] == "offline" for m in ms))
    time.sleep(0.3)
    assert first_copies([s["state"] for s in statuses(late)]) == ["online", "offline"]
    assert statuses(late)[-1]["state"] == "offline"
    assert {s.get("reason") for s in statuses(late) if s["state"] == "offline"} == {"shutdown"}  # not the will
    after = subscriber(STATUS)
    got = after.wait_count(STATUS, 1)
    # QoS 1 is at least once: amqtt sometimes delivers the retained copy twice, which is allowed
    assert got and all(m.payload == got[0].payload for m in got)
    assert got[0].retain and json.loads(got[0].payload)["reason"] == "shutdown"


def test_status_changes_while_not_connected_arrive_in_order_on_connect(broker, subscriber, queue, publishers):
    """A camera that goes connecting -> streaming -> lost -> connecting -> streaming before MQTT connects: a
    subscriber sees every transition, in order, then the current status; a change after the connect comes
    after them.  The broker is frozen (SIGSTOP) so the publisher's CONNECT stays unanswered meanwhile."""
    sub = subscriber(STATUS)  # subscribed before anything is published: no retained copy, every message counts
    broker.pause()
    state = {"camera_state": "starting"}
    pub = publishers(config(broker, protocol=broker.protocol), queue, status_provider=lambda: dict(state))
    for s in ("connecting", "streaming", "lost", "connecting", "streaming"):
        state["camera_state"] = s
        assert pub.publish_status({}) is False  # held, not dropped
    assert not pub.connected
    broker.resume()
    assert wait_until(lambda: pub.connected, 30)
    state["camera_state"] = "waiting_trigger"
    assert pub.publish_status({}) is True
    assert sub.wait_for(lambda ms: [s["camera_state"] for s in map(json.loads, (m.payload for m in ms))][-1:]
                        == ["waiting_trigger"], 10)
    got = [s["camera_state"] for s in statuses(sub)]
    # the held ones, the status of the connect (current state), then the later change
    assert got == ["connecting", "streaming", "lost", "connecting", "streaming", "streaming", "waiting_trigger"]
    assert all(s["state"] == "online" for s in statuses(sub))
    at = [s["at"] for s in statuses(sub)]
    assert at == sorted(at) and at[-1] <= time.time()


CHILD = r"""
import sys, time
from edge_runtime.publishing.disk_queue import DiskQueue
from edge_runtime.publishing.messages import ResultMessage
from edge_runtime.publishing.mqtt import MqttPublisher
from edge_runtime.service.config import MQTTConfig, TLSConfig

port, qdir, n, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
pub = MqttPublisher(MQTTConfig(port=port, topic_prefix="site/line/st1", client_id="edge-child"),
                    DiskQueue(qdir, 1 << 22), status_provider=lambda: {"product": "child"}).start()
for i in range(n):
    pub.submit_result(ResultMessage(seq=i, frame_id=i, camera="cam0", product="child", bundle_version="v1",
                                    verdict="pass", score=0.1, captured_at=time.time()))
if mode == "connect":
    deadline = time.time() + 10
    while not pub.connected and time.time() < deadline:
        time.sleep(0.02)
print("READY", pub.connected, flush=True)
time.sleep(60)
"""


def run_child(port: int, qdir: Path, n: int, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(port), str(qdir), str(n), mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise AssertionError(f"child failed: {line}{proc.stderr.read()}")
    return proc


def test_last_will_marks_offline_when_the_process_dies(broker, subscriber, tmp_path):
    sub = subscriber(STATUS)
    child = run_child(broker.port, tmp_path / "q", 0, "connect")
    try:
        assert sub.wait_for(lambda ms: any(json.loads(m.payload)["state"] == "online" for m in ms))
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        assert sub.wait_for(lambda ms: json.loads(ms[-1].payload)["state"] == "offline", timeout=10)
        assert json.loads(sub.on(STATUS)[-1].payload) == {"state": "offline", "reason": "connection lost"}
    finally:
        child.kill()
        child.wait()


def test_results_from_a_killed_process_are_delivered_by_the_next_one(broker, subscriber, tmp_path, publishers):
    """The killed service never reached the broker; its fsync'd queue is the only copy of the results."""
    qdir = tmp_path / "q"
    child = run_child(free_port(), qdir, 25, "offline")  # nothing listens there
    child.send_signal(signal.SIGKILL)
    child.wait(5)
    sub = subscriber(RESULT)
    q = DiskQueue(qdir, 1 << 22)  # the dead process' lock is gone with it
    try:
        assert q.depth == 25
        pub = publishers(config(broker), q)
        sub.wait_count(RESULT, 25)
        assert seqs(sub) == list(range(25))
        assert pub.flush(5) and q.depth == 0
        pub.close()
    finally:
        q.close()


# ----------------------------------------------------------------------------------------- results


def test_results_arrive_in_order_with_the_schema(broker, subscriber, queue, publishers):
    sub = subscriber(RESULT)
    pub = publishers(config(broker), queue)
    t0 = time.time()
    for i in range(60):
        pub.submit_result(result(i))
    assert pub.flush(10)
    msgs = sub.wait_count(RESULT, 60)
    assert seqs(sub) == list(range(60))
    for m in msgs:
        assert m.qos == 1 and not m.retain
        r = decode_result(m.payload)  # validates against the schema
        assert r.schema_ == "weakrest.result/1" and r.published_at is not None
        assert t0 - 1 <= r.captured_at <= r.published_at <= time.time()
    assert json.loads(msgs[7].payload)["regions"][0]["area_px"] == 9
    assert queue.depth == 0 and pub.acked == 60 and pub.published == 60


def test_result_submitted_while_broker_is_down_at_start(make_broker, make_subscriber, queue, publishers):
    port = free_port()
    pub = publishers(config(port), queue)  # start() must not block or fail without a broker
    pub.submit_result(result(0))
    pub.submit_result(result(1))
    time.sleep(1.0)  # paho's next retry is due at about 1.5 s: the subscriber below is in place by then
    assert not pub.connected and queue.depth == 2
    b = make_broker(port=port)
    sub = make_subscriber(b.port, RESULT, protocol=b.protocols[0])
    sub.wait_count(RESULT, 2, timeout=15)
    assert seqs(sub) == [0, 1]
    assert pub.flush(5)


def test_broker_outage_during_a_stream_of_300_results(make_broker, make_subscriber, queue, publishers):
    """Broker stopped and restarted mid-stream: every seq arrives at least once, in order once de-duplicated.

    The broker is frozen first so that a full window is in flight (unacknowledged) when it goes down.  It
    keeps sessions across the restart (persistence, clean stop), as a production broker would: what the
    broker acknowledged is its responsibility, the publisher's part is to resend what it did not.
    """
    b = make_broker(persistence=True)
    require_mosquitto(b, "persistent sessions across a broker restart")
    sub = make_subscriber(b.port, RESULT, client_id="outage-sub", persistent=True)
    pub = publishers(config(b), queue)
    assert wait_until(lambda: pub.connected)
    n = 300
    depth_during_outage = []

    def produce() -> None:
        for i in range(n):
            pub.submit_result(result(i))
            time.sleep(0.004)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        assert sub.wait_for(lambda ms: len(ms) >= 60)
        b.pause()
        wait_until(lambda: pub.published - pub.acked >= 16, 2)
        b.stop()
        assert wait_until(lambda: not pub.connected, 5)
        time.sleep(0.5)
        depth_during_outage.append(queue.depth)
        b.start()  # same port
    finally:
        producer.join(30)
    assert pub.flush(20), f"queue not drained: {queue.depth} left"
    assert sub.wait_for(lambda ms: set(range(n)) <= {json.loads(m.payload)["seq"] for m in ms}, timeout=15)
    got = seqs(sub)
    assert first_copies(got) == list(range(n))
    assert depth_during_outage[0] > 0  # results piled up on disk meanwhile
    assert pub.resent > 0  # the window in flight at the outage went again
    assert queue.depth == 0 and queue.dropped == 0


def test_in_flight_window_is_resent_in_order_after_a_reconnect(broker, subscriber, queue, publishers):
    """Messages published but not PUBACKed when the connection breaks are resent from the queue, in order,
    and paho's own copies do not jump ahead of the resend."""
    sub = subscriber(RESULT)
    pub = publishers(config(broker), queue)
    assert wait_until(lambda: pub.connected)
    for i in range(5):
        pub.submit_result(result(i))
    assert pub.flush(5)
    os.kill(broker.pid, signal.SIGSTOP)  # the broker stops reading: PUBACKs stop coming
    try:
        for i in range(5, 40):
            pub.submit_result(result(i))
        assert wait_until(lambda: pub.published >= 5 + 16, 5)  # a full window in flight
        pub._client.socket().shutdown(socket.SHUT_RDWR)  # the connection breaks under it
        assert wait_until(lambda: not pub.connected, 5)
        for i in range(40, 50):  # submitted while disconnected
            pub.submit_result(result(i))
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert pub.flush(15)
    assert sub.wait_for(lambda ms: {json.loads(m.payload)["seq"] for m in ms} >= set(range(50)))
    assert first_copies(seqs(sub)) == list(range(50))
    assert pub.resent >= 1


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (EC keys: fast)."""
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "1", "-extfile", "san.ext")
    return d / "ca.crt", d / "server.crt", d / "server.key"


def test_results_over_tls(make_broker, queue, publishers, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    ca, cert, key = make_certs(tmp_path / "certs")
    if find_mosquitto() is None:
        pytest.skip("needs Mosquitto (TLS listener): apt-get install mosquitto")
    b = make_broker(impl="mosquitto", tls=(ca, cert, key))
    pub = publishers(config(b, tls=TLSConfig(ca=ca)), queue)
    assert wait_until(lambda: pub.connected, 10), b.read_log()[-1000:]
    for i in range(3):
        pub.submit_result(result(i))
    assert pub.flush(5) and pub.acked == 3


# ----------------------------------------------------------------------------------------- heatmaps


def test_heatmap_with_mqtt5_user_properties(broker, subscriber, queue, publishers):
    needs_mqtt5(broker)
    sub = subscriber(HEATMAP)
    pub = publishers(config(broker, protocol="5"), queue)
    assert wait_until(lambda: pub.connected)
    image = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10
    assert pub.publish_heatmap(image, frame_id=77, seq=12, fmt="png")
    (msg,) = sub.wait_count(HEATMAP, 1)
    assert msg.payload == image and msg.qos == 0
    assert msg.user_properties == {"frame_id": "77", "seq": "12", "content_type": "image/png"}
    assert msg.properties.ContentType == "image/png"


def test_heatmap_with_header_on_mqtt311(broker, subscriber, queue, publishers):
    sub = subscriber(HEATMAP, protocol="3.1.1")
    pub = publishers(config(broker, protocol="3.1.1"), queue)
    assert wait_until(lambda: pub.connected)
    assert pub.protocol == "3.1.1"
    image = b"\xff\xd8\xff" + bytes(range(256))
    assert pub.publish_heatmap(image, frame_id=5, seq=3, fmt="jpeg")
    (msg,) = sub.wait_count(HEATMAP, 1)
    meta, data = decode_heatmap(msg.payload)
    assert meta == {"frame_id": 5, "seq": 3, "format": "jpeg"} and data == image


def test_heatmap_is_dropped_while_offline(queue, publishers):
    pub = publishers(config(free_port()), queue)
    assert not pub.publish_heatmap(b"png", frame_id=1, seq=1)


# ----------------------------------------------------------------------------------------- commands


def test_commands_valid_malformed_and_failing(broker, subscriber, queue, publishers):
    calls = []

    def handler(cmd):
        calls.append(cmd)
        if cmd.command == "snapshot":
            raise RuntimeError("camera busy")
        if cmd.command == "switch_product":
            return {"detail": f"now serving {cmd.product}", "bundle_version": "v2"}
        return {"detail": "done"}

    replies = subscriber(REPLY)
    pub = publishers(config(broker), queue, on_command=handler)
    assert wait_until(lambda: pub.commands_ready)  # the broker holds the subscription: a command now arrives
    sender = replies.client

    def ask(payload: bytes | str, n: int) -> dict:
        sender.publish(CMD, payload, qos=1)
        return json.loads(replies.wait_count(REPLY, n)[n - 1].payload)

    assert ask('{"command": "reload", "id": "a1"}', 1) == {"id": "a1", "command": "reload", "ok": True,
                                                           "detail": "done"}
    r = ask('{"command": "switch_product", "product": "gear", "id": "a2"}', 2)
    assert r["ok"] and r["detail"] == "now serving gear" and r["bundle_version"] == "v2"
    assert calls[1].product == "gear"

    r = ask("{not json", 3)
    assert not r["ok"] and "not JSON" in r["error"] and r["id"] is None
    r = ask('{"command": "reboot", "id": "a4"}', 4)
    assert not r["ok"] and r["id"] == "a4" and "unknown command 'reboot'" in r["error"]
    r = ask('{"command": "switch_product", "id": "a5"}', 5)
    assert not r["ok"] and r["id"] == "a5" and "missing field 'product'" in r["error"]
    r = ask('{"command": "status", "id": "a6", "force": true}', 6)
    assert not r["ok"] and "unexpected field 'force'" in r["error"]
    assert len(calls) == 2  # malformed commands never reach the handler

    r = ask('{"command": "snapshot", "id": "a7"}', 7)
    assert r == {"id": "a7", "command": "snapshot", "ok": False, "error": "RuntimeError: camera busy"}

    # still working: commands and results
    assert ask('{"command": "status", "id": "a8"}', 8)["ok"]
    results = subscriber(RESULT)
    pub.submit_result(result(0))
    assert results.wait_count(RESULT, 1) and pub.flush(5)


def test_commands_are_ready_only_while_the_broker_holds_the_subscription(broker, subscriber, queue, publishers):
    """``connected`` comes at CONNACK, ``commands_ready`` at the command subscription's SUBACK; it goes with the
    connection and comes back with the next one, and a command sent once it is set is answered."""
    replies = subscriber(REPLY)
    pub = publishers(config(broker), queue, on_command=lambda c: {"detail": "done"})
    assert wait_until(lambda: pub.commands_ready) and pub.connected and pub.stats()["commands_ready"] is True
    broker.stop()
    assert wait_until(lambda: not pub.connected)
    assert not pub.commands_ready and pub.stats()["commands_ready"] is False
    broker.start()
    assert wait_until(lambda: pub.commands_ready, 30)
    assert wait_until(lambda: replies.wait_subscribed(0.1), 30)  # the reply subscriber reconnects by itself
    replies.client.publish(CMD, '{"command": "status", "id": "after"}', qos=1)
    assert replies.wait_for(lambda ms: any(json.loads(m.payload)["id"] == "after" for m in ms if m.topic == REPLY),
                            15)


def test_a_refused_command_subscription_is_logged_and_leaves_commands_not_ready(broker, queue, publishers, caplog):
    """Brokers that check their ACL at subscribe time answer the SUBSCRIBE with a failure code (Mosquitto grants it
    and filters at delivery, so the refusal is handed to the running publisher's callback as such a broker sends it)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    pub = publishers(config(broker), queue, on_command=lambda c: {})
    assert wait_until(lambda: pub.commands_ready)
    with caplog.at_level("ERROR", logger="edge_runtime.publishing.mqtt"):
        pub._on_subscribe(pub._client, None, pub._command_subscription,
                          [ReasonCode(PacketTypes.SUBACK, identifier=0x87)], None)
    assert not pub.commands_ready and pub.connected
    assert f"refused the subscription to {CMD} (Not authorized)" in caplog.text
    pub._on_subscribe(pub._client, None, pub._command_subscription + 1, [ReasonCode(PacketTypes.SUBACK, identifier=1)],
                      None)
    assert not pub.commands_ready  # another packet's SUBACK says nothing about the command subscription


def test_invalid_utf8_and_bad_json_commands_are_refused_in_plain_words(broker, subscriber, queue, publishers):
    """Bytes that are not UTF-8 reach a running publisher through the broker: the reply names the byte, never a
    codec that ``json.loads`` guessed (``b"{\\x00..."`` used to be read as UTF-16-LE)."""
    calls = []
    replies = subscriber(REPLY)
    pub = publishers(config(broker), queue, on_command=lambda c: calls.append(c) or {"detail": "done"})
    assert wait_until(lambda: pub.commands_ready)

    def ask(payload: bytes, n: int) -> dict:
        replies.client.publish(CMD, payload, qos=1)
        got = replies.wait_count(REPLY, n)
        assert len(got) >= n, f"no reply to {payload!r}"
        return json.loads(got[n - 1].payload)

    r = ask(b'{"command": "\xff"}', 1)
    assert r["ok"] is False and r["id"] is None
    assert r["error"] == "payload is not UTF-8 text (byte 0xff at position 13)", r
    r = ask(b"{\x00\x00\xd8\x00", 2)  # json.loads guessed UTF-16-LE for this one
    assert r["error"] == "payload is not UTF-8 text (byte 0xd8 at position 3)", r
    r = ask(b"\xff\xfe{\x00}\x00", 3)  # json.loads read this as the UTF-16 text "{}"
    assert r["error"] == "payload is not UTF-8 text (byte 0xff at position 0)", r
    assert not any("utf-16" in json.loads(m.payload)["error"].lower() for m in replies.on(REPLY))
    r = ask(b'{"command": "reload",\n "id": }', 4)
    assert r["error"] == "payload is not JSON: expecting value at line 2 column 8", r
    assert ask('{"command": "reload", "id": "ü-1"}'.encode(), 5) == {"id": "ü-1", "command": "reload", "ok": True,
                                                                     "detail": "done"}
    assert len(calls) == 1  # only the valid one reached the handler


@pytest.mark.parametrize(("payload", "expected"), [
    (b"", "payload is empty: expected a JSON object such as {\"command\": \"status\"}"),
    (b"x" * 70000, "payload is too large: 70000 bytes, at most 65536 are accepted"),
    (b"[1, 2]", "payload is a JSON array: expected a JSON object such as {\"command\": \"status\"}"),
    (b'"reload"', "payload is a JSON string: expected a JSON object such as {\"command\": \"status\"}"),
    (b"null", "payload is JSON null: expected a JSON object such as {\"command\": \"status\"}"),
    (b'{"id": "a"}', "missing field 'command': expected one of reload, switch_product, snapshot, status"),
    (b'{"command": 3}', "field 'command' is the number 3: expected one of reload, switch_product, snapshot, status"),
    (b'{"command": "rebot"}', "unknown command 'rebot': expected one of reload, switch_product, snapshot, status"),
    (b'{"command": "switch_product"}', "command 'switch_product': missing field 'product'"),
    (b'{"command": "status", "force": true}',
     "command 'status': unexpected field 'force' (allowed: command, id)"),
    (b'{"command": "switch_product", "product": ""}',
     "command 'switch_product': field 'product': String should have at least 1 character (got '')"),
    (b'{"command": "reload", "id": 7}', "command 'reload': field 'id': Input should be a valid string (got 7)"),
    (b"\xef\xbb\xbf{}", "payload starts with a UTF-8 byte-order mark: send the JSON text without it"),
    (b"{,", "payload is not JSON: expecting property name enclosed in double quotes at line 1 column 2"),
])
def test_command_errors_say_what_was_wrong_and_what_was_expected(payload, expected):
    from edge_runtime.publishing.messages import CommandError, parse_command

    with pytest.raises(CommandError) as info:
        parse_command(payload)
    assert str(info.value) == expected


def test_retained_command_is_refused(broker, subscriber, queue, publishers):
    calls = []
    replies = subscriber(REPLY)
    replies.client.publish(CMD, '{"command": "reload", "id": "r1"}', qos=1, retain=True).wait_for_publish(5)
    publishers(config(broker), queue, on_command=lambda c: calls.append(c) or {})
    (msg,) = replies.wait_count(REPLY, 1)
    r = json.loads(msg.payload)
    assert not r["ok"] and "retained" in r["error"] and calls == []
    replies.client.publish(CMD, b"", qos=1, retain=True).wait_for_publish(5)  # clear it


# ----------------------------------------------------------------------------------------- protocol fallback


def test_auto_protocol_falls_back_to_311(make_broker, make_subscriber, queue, publishers):
    pytest.importorskip("amqtt")
    b = make_broker(impl="amqtt")  # speaks MQTT 3.1.1 only
    sub = make_subscriber(b.port, RESULT, protocol="3.1.1")
    # amqtt leaves an MQTT 5 CONNECT (with a will) unanswered: the CONNACK timeout triggers the fallback
    pub = publishers(config(b, protocol="auto"), queue, connack_timeout_s=1.0)
    assert wait_until(lambda: pub.connected, 10)
    assert pub.protocol == "3.1.1"
    for i in range(5):
        pub.submit_result(result(i))
    sub.wait_count(RESULT, 5)
    assert seqs(sub) == list(range(5))
