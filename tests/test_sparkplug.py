"""Sparkplug B against a real broker: births, data, deaths and rebirth decoded with the specification's schema,
the primary host's STATE holding results, and the service's faults (broker restart, SIGKILL) with every
result's seq delivered as on the JSON topic."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from edge_runtime.publishing.disk_queue import DiskQueue
from edge_runtime.publishing.messages import ResultMessage
from edge_runtime.publishing.sparkplug import payloads as spb
from edge_runtime.publishing.sparkplug.node import SparkplugNode
from edge_runtime.service.config import MQTTConfig, SparkplugConfig
from tests.mqtt_fixtures import require_mosquitto, wait_until
from tests.test_edge_service import PREFIX, _config, _results, _Service, replay_dir, store  # noqa: F401

SPB = "spBv1.0/plant"
NODE, DEVICE = "line3", "st2"

# A DDATA encoded by pysparkplug 0.6.1 (an independent implementation of the Eclipse Tahu schema): seq 7, a
# string, a double, a uint64, an Int32 of -3 (two's complement in int_value), a historical boolean, a DateTime.
PYSPARKPLUG_DDATA = bytes.fromhex(
    "08c8d395ffbc3112210a12496e7370656374696f6e2f5665726469637418fbd095ffbc317a046661696c12220a10496e7370656374"
    "696f6e2f53636f726518fbd095ffbc31699eefa7c64b37ed3f121a0a0e496e7370656374696f6e2f53657118fbd095ffbc31589208"
    "12210a12496e7370656374696f6e2f526567696f6e7318fbd095ffbc3150fdffffff0f12220a15496e7370656374696f6e2f486973"
    "746f726963616c18fbd095ffbc312801700112260a16496e7370656374696f6e2f436170747572656420417418fbd095ffbc3158fb"
    "d095ffbc311807")


def test_schema_reads_what_another_implementation_wrote_and_round_trips():
    p = spb.decode(PYSPARKPLUG_DDATA)
    assert p.seq == 7 and p.timestamp == 1700000000456
    values = spb.metrics_by_name(p, {"Inspection/Regions": spb.DataType.Int32})
    assert values == {"Inspection/Verdict": "fail", "Inspection/Score": 0.913, "Inspection/Seq": 1042,
                      "Inspection/Regions": -3, "Inspection/Historical": True,
                      "Inspection/Captured At": 1700000000123}
    assert [m.is_historical for m in p.metrics] == [False, False, False, False, True, False]
    ours = spb.encode([spb.Metric("a", spb.DataType.Int8, -5), spb.Metric("b", spb.DataType.Int64, -(2 ** 40)),
                       spb.Metric("c", spb.DataType.Double, None), spb.Metric("d", spb.DataType.Bytes, b"\x00\xff")],
                      seq=255, timestamp=1)
    back = spb.decode(ours)
    assert back.seq == 255 and spb.metrics_by_name(back) == {"a": -5, "b": -(2 ** 40), "c": None, "d": b"\x00\xff"}
    assert [spb.DataType.Name(m.datatype) for m in back.metrics] == ["Int8", "Int64", "Double", "Bytes"]
    with pytest.raises(ValueError, match="not a Sparkplug B payload"):
        spb.decode(b"\xff\xff\xff")


def test_generated_module_matches_the_schema(tmp_path):
    """``sparkplug_b_pb2.py`` is what protoc makes of ``sparkplug_b.proto`` today (run ``make proto`` if not)."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (the dev extra) regenerates the schema")
    here = Path(spb.__file__).parent
    assert protoc.main(["protoc", f"-I{here}", f"--python_out={tmp_path}", str(here / "sparkplug_b.proto")]) == 0
    assert (tmp_path / "sparkplug_b_pb2.py").read_text() == (here / "sparkplug_b_pb2.py").read_text()


def result(seq: int, stages: tuple[str, ...] = ("backbone", "total")) -> ResultMessage:
    return ResultMessage(seq=seq, frame_id=100 + seq, camera="cam0", product="bracket", bundle_version="v1",
                         verdict="fail" if seq % 3 == 0 else "pass", score=0.25 + seq, threshold=0.6,
                         timings_ms={s: 1.5 for s in stages}, budget_ms=50.0, captured_at=1700000000.0 + seq)


class Spb:
    """Decoded Sparkplug messages of one subscriber, in arrival order."""

    def __init__(self, sub) -> None:
        self.sub = sub

    def of(self, kind: str) -> list:
        return [spb.decode(m.payload) for m in self.sub.messages if m.topic.split("/")[2] == kind]

    def kinds(self) -> list[str]:
        return [m.topic.split("/")[2] for m in self.sub.messages]

    def result_seqs(self) -> list[int]:
        return [v["Inspection/Seq"] for p in self.of("DDATA") if "Inspection/Seq" in (v := spb.metrics_by_name(p))]


@pytest.fixture
def node_factory(tmp_path):
    made = []

    def make(port: int, **kw) -> SparkplugNode:
        cfg = SparkplugConfig(enabled=True, group_id="plant", **kw)
        queue = DiskQueue(tmp_path / f"spb{len(made)}", 1 << 22)
        node = SparkplugNode(MQTTConfig(port=port, topic_prefix=f"plant/{NODE}/{DEVICE}", protocol="3.1.1"), cfg,
                             queue, edge_node_id=NODE, device_id=DEVICE, camera="cam0")
        made.append(node)
        return node.start()

    yield make
    for node in made:
        node.close(timeout_s=1.0)


def test_birth_data_rebirth_and_death(broker, subscriber, node_factory):
    got = Spb(subscriber(f"{SPB}/#"))
    node = node_factory(broker.port)
    assert got.sub.wait_for(lambda ms: len(ms) >= 2, 10), "no NBIRTH/DBIRTH"
    (nbirth,) = got.of("NBIRTH")
    birth = spb.metrics_by_name(nbirth)
    assert nbirth.seq == 0 and birth["bdSeq"] == 0 and birth["Node Control/Rebirth"] is False
    (dbirth,) = got.of("DBIRTH")
    declared = {m.name: m.datatype for m in dbirth.metrics}
    assert dbirth.seq == 1 and declared["Inspection/Verdict"] == spb.DataType.String
    assert declared["Inspection/Seq"] == spb.DataType.UInt64 and "Station/Camera State" in declared

    node.submit_result(result(0))  # its latency stages are new: the node is born again before the DDATA
    for i in range(1, 5):
        node.submit_result(result(i))
    assert got.sub.wait_for(lambda ms: len(got.result_seqs()) >= 5, 10), got.kinds()
    assert got.result_seqs() == [0, 1, 2, 3, 4]
    assert got.kinds()[2:] == ["NBIRTH", "DBIRTH"] + ["DDATA"] * 5
    assert "Latency/backbone ms" in {m.name for m in got.of("DBIRTH")[-1].metrics}
    datas = got.of("DDATA")
    assert [p.seq for p in datas] == [2, 3, 4, 5, 6]  # after NBIRTH 0, DBIRTH 1: one per message, mod 256
    last = spb.metrics_by_name(datas[-1])
    assert last["Inspection/Verdict"] == "pass" and last["Inspection/Score"] == 4.25
    assert last["Counters/Inspected"] == 5 and last["Counters/Failed"] == 2 and last["Counters/Passed"] == 3
    assert last["Inspection/Captured At"] == 1700000004000

    node.update_status({"camera_state": "lost", "product": "bracket"})
    assert got.sub.wait_for(lambda ms: any(spb.metrics_by_name(p).get("Station/Camera State") == "lost"
                                           for p in got.of("DDATA")), 10)

    # a host application asks for a rebirth
    got.sub.client.publish(f"{SPB}/NCMD/{NODE}", spb.encode([spb.Metric("Node Control/Rebirth",
                                                                         spb.DataType.Boolean, True)], seq=0),
                           qos=1)
    assert got.sub.wait_for(lambda ms: len(got.of("DBIRTH")) == 3, 10), got.kinds()
    rebirth = got.of("DBIRTH")[-1]
    values = spb.metrics_by_name(rebirth)
    assert values["Inspection/Seq"] == 4 and values["Station/Camera State"] == "lost"
    assert values["Counters/Inspected"] == 5 and got.of("NBIRTH")[-1].seq == 0

    node.close(timeout_s=5.0)  # clean: DDEATH, then NDEATH with this connection's bdSeq
    assert got.sub.wait_for(lambda ms: len(got.of("NDEATH")) == 1, 10)
    assert got.kinds()[-2:] == ["DDEATH", "NDEATH"]
    assert spb.metrics_by_name(got.of("NDEATH")[0]) == {"bdSeq": 0}
    assert not got.of("NDEATH")[0].HasField("seq")


def test_results_wait_for_the_primary_host(broker, subscriber, node_factory):
    got = Spb(subscriber(f"{SPB}/#"))
    host = subscriber("spBv1.0/STATE/scada")
    state = json.dumps({"online": False, "timestamp": int(time.time() * 1000)})
    host.client.publish("spBv1.0/STATE/scada", state, qos=1, retain=True).wait_for_publish(5)
    node = node_factory(broker.port, primary_host_id="scada")
    wait_until(lambda: node.connected and node._host_timestamp >= 0, 10, "the node to read the host's STATE")
    for i in range(6):
        node.submit_result(result(i))
    health = node.health()
    assert health["state"] == "degraded" and "primary host 'scada' is offline" in health["reasons"][0]
    assert node.queue.depth == 6 and got.kinds() == []  # no birth, no data while no host is online
    state = json.dumps({"online": True, "timestamp": int(time.time() * 1000) + 1})
    host.client.publish("spBv1.0/STATE/scada", state, qos=1, retain=True).wait_for_publish(5)
    assert got.sub.wait_for(lambda ms: len(got.result_seqs()) >= 6, 10), got.kinds()
    assert got.kinds()[:2] == ["NBIRTH", "DBIRTH"] and got.result_seqs() == list(range(6))
    wait_until(lambda: node.queue.depth == 0 and node.health()["state"] == "ok", 10, "the queue to drain")
    host.client.publish("spBv1.0/STATE/scada", b"", qos=1, retain=True).wait_for_publish(5)


def test_service_faults_deliver_every_seq_as_the_json_topic(tmp_path, store, make_broker, make_subscriber,  # noqa: F811
                                                            replay_dir):  # noqa: F811
    """The real service with Sparkplug on: a broker restart, then SIGKILL (the broker sends the NDEATH with the
    last birth's bdSeq), a restart (bdSeq goes on), SIGTERM (DDEATH + NDEATH).  The Sparkplug results, first
    copies, are exactly the JSON topic's."""
    broker = make_broker(persistence=True)
    require_mosquitto(broker, "the subscribers' sessions must survive the broker restart")
    sub = make_subscriber(broker.port, [f"{PREFIX}/result", "spBv1.0/weakrest/#"], persistent=True,
                          client_id="mes-and-scada")
    got = Spb(sub)
    cfg = _config(tmp_path, store, broker.port, {"source": "replay", "replay": {"path": str(replay_dir), "fps": 40}},
                  sparkplug={"enabled": True})
    cfg["mqtt"]["heatmap"] = "none"

    def distinct(values: list[int]) -> list[int]:
        seen: list[int] = []
        for v in values:
            if v not in seen:
                seen.append(v)
        return seen

    svc = _Service(tmp_path, cfg, "first").start()
    try:
        wait_until(lambda: len(set(got.result_seqs())) >= 20, 120, "20 Sparkplug results")
        broker.stop()
        time.sleep(1.0)  # results keep coming into both on-disk queues meanwhile
        broker.start()
        wait_until(lambda: len(set(got.result_seqs())) >= 60, 120, "60 Sparkplug results after the restart")
        svc.signal(signal.SIGKILL)
        svc.wait(10)
    finally:
        svc.kill()
    wait_until(lambda: len(got.of("NDEATH")) >= 1, 30, "the NDEATH (last will) after SIGKILL")
    births = [spb.metrics_by_name(p)["bdSeq"] for p in got.of("NBIRTH")]
    assert spb.metrics_by_name(got.of("NDEATH")[-1])["bdSeq"] == births[-1]
    again = _Service(tmp_path, cfg, "second").start()
    try:
        wait_until(lambda: len(got.of("NBIRTH")) > len(births), 120, "the birth after the restart")
        new_bdseq = spb.metrics_by_name(got.of("NBIRTH")[-1])["bdSeq"]
        assert new_bdseq == (births[-1] + 1) % 256, (births, new_bdseq)
        wait_until(lambda: len(set(got.result_seqs())) >= 90, 120, "90 Sparkplug results")
        again.signal(signal.SIGTERM)
        assert again.wait(60) == 0
    finally:
        again.kill()
    wait_until(lambda: len(got.of("NDEATH")) >= 2, 30, "the NDEATH of the clean stop")
    assert got.kinds()[-2:] == ["DDEATH", "NDEATH"]
    json_seqs = distinct([r.seq for r in _results(sub)])
    spb_seqs = distinct(got.result_seqs())
    assert json_seqs == list(range(len(json_seqs))), "the JSON topic lost or reordered a result"
    assert spb_seqs == json_seqs
    print(f"{len(spb_seqs)} results on both paths; {len(got.result_seqs()) - len(spb_seqs)} Sparkplug repeats, "
          f"births with bdSeq {births + [new_bdseq]}")
