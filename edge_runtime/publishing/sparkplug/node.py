"""The edge box as a Sparkplug B edge node, the station as its device (Sparkplug 3.0).

Topics: ``spBv1.0/<group>/<TYPE>/<edge_node>[/<device>]``.  What goes out, and when:

* **NDEATH** is the MQTT last will of every connection; it carries ``bdSeq``, a number that goes up by one
  (mod 256) at every CONNECT, kept in the queue folder so a restarted service never reuses the previous
  connection's number.  A clean shutdown publishes DDEATH and NDEATH itself before it disconnects.
* **NBIRTH** (``seq`` 0, ``bdSeq``, ``Node Control/Rebirth``, the software version), then **DBIRTH** with
  every device metric and its current value, after each connect; with ``primary_host_id`` set, only once
  that host application's retained ``spBv1.0/STATE/<host>`` says ``online``, and again when it comes back.
  ``Node Control/Rebirth`` = true in an NCMD births the node again.
* **DDATA**, one per result, in ``seq`` order of the service, from a durable queue of its own: results wait
  on disk while the broker is unreachable, no host is online, or the service is down, and the unacknowledged
  tail is sent again after a reconnect (at least once, in order; ``Inspection/Seq`` tells repeats apart,
  exactly like ``seq`` on the JSON topic).  Results go at QoS 1 unless ``sparkplug.data_qos`` is 0.
  A status change (camera, bundle) is a DDATA of the ``Station/...`` metrics (not queued: the next DBIRTH
  carries the current values).  A result with a latency stage that the last DBIRTH did not declare births
  the node again first, so a host never receives an undeclared metric.

Every message but NDEATH carries the Sparkplug ``seq`` (0..255, NBIRTH is 0), assigned when the message is
handed to the client, under one lock.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import paho.mqtt.client as mqtt

from edge_runtime import __version__
from edge_runtime.publishing.config import MQTTConfig, QueueConfig, SparkplugConfig
from edge_runtime.publishing.disk_queue import DiskQueue
from edge_runtime.publishing.messages import ResultMessage, decode_result
from edge_runtime.publishing.mqtt import DurableMqttClient
from edge_runtime.publishing.sparkplug.payloads import DataType, Metric, decode, encode, metrics_by_name

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"

# Device metrics of a result: name -> (datatype, how to read it from the result's JSON)
_RESULT_METRICS: dict[str, tuple[int, Any]] = {
    "Inspection/Seq": (DataType.UInt64, lambda r: r["seq"]),
    "Inspection/Frame ID": (DataType.UInt64, lambda r: r["frame_id"]),
    "Inspection/Verdict": (DataType.String, lambda r: r["verdict"]),
    "Inspection/Score": (DataType.Double, lambda r: r.get("score")),
    "Inspection/Threshold": (DataType.Double, lambda r: r.get("threshold")),
    "Inspection/Regions": (DataType.UInt32, lambda r: len(r.get("regions") or [])),
    "Inspection/Over Budget": (DataType.Boolean, lambda r: bool(r.get("over_budget"))),
    "Inspection/Captured At": (DataType.DateTime, lambda r: int(round(r["captured_at"] * 1000))),
    "Inspection/Error": (DataType.String, lambda r: r.get("error")),
    "Inspection/Product": (DataType.String, lambda r: r.get("product")),
    "Inspection/Bundle Version": (DataType.String, lambda r: r.get("bundle_version")),
}
_COUNTERS = ("Inspected", "Passed", "Failed", "Errors")
_STATION_METRICS: dict[str, str] = {  # metric -> key of the service's status
    "Station/Camera": "camera", "Station/Camera State": "camera_state", "Station/Product": "product",
    "Station/Bundle Version": "bundle_version",
}


def _latency_metric(stage: str) -> str:
    return f"Latency/{stage} ms"


class SparkplugNode(DurableMqttClient):
    """A :class:`~edge_runtime.publishing.sink.ResultSink` speaking Sparkplug B (see the module docstring)."""

    name = "sparkplug"
    log_name = "Sparkplug"

    def __init__(self, mqtt_config: MQTTConfig, config: SparkplugConfig, queue: DiskQueue, *, edge_node_id: str,
                 device_id: str, camera: str = "", window: int = 32, connack_timeout_s: float = 5.0) -> None:
        client_id = config.client_id or f"weakrest-spb-{edge_node_id}-{device_id}"
        super().__init__(mqtt_config, queue, client_id=client_id, window=window, persistent_session=False,
                         connack_timeout_s=connack_timeout_s, result_qos=config.data_qos)
        self.spb = config
        self.edge_node_id = edge_node_id
        self.device_id = device_id
        base = f"{NAMESPACE}/{config.group_id}"
        self.topic_ndeath = f"{base}/NDEATH/{edge_node_id}"
        self.topic_nbirth = f"{base}/NBIRTH/{edge_node_id}"
        self.topic_ncmd = f"{base}/NCMD/{edge_node_id}"
        self.topic_dbirth = f"{base}/DBIRTH/{edge_node_id}/{device_id}"
        self.topic_ddata = f"{base}/DDATA/{edge_node_id}/{device_id}"
        self.topic_ddeath = f"{base}/DDEATH/{edge_node_id}/{device_id}"
        self.topic_state = f"{NAMESPACE}/STATE/{config.primary_host_id}" if config.primary_host_id else None
        self._bdseq_file = queue.directory / "bdseq"
        self._last_seq_file = queue.directory / "last_seq"
        # Sparkplug state: one re-entrant lock orders seq numbers and births across the sender, the network
        # thread (connect, NCMD, STATE) and status updates.
        self._spb_lock = threading.RLock()
        self._seq = 0
        self._bdseq = 0
        self._born = False
        self._host_online = False
        self._host_timestamp = -1
        self._declared_stages: set[str] = set()
        self._last: dict[str, Any] = {name: None for name in _RESULT_METRICS}
        self._counters = dict.fromkeys(_COUNTERS, 0)  # counted at submit, stored with each record
        self._counters_sent: dict[str, int] = {}  # those of the last record sent (the DBIRTH's values)
        self._station: dict[str, Any] = {"camera": camera}
        self.births = 0

    # ------------------------------------------------------------------ sink API

    def start(self) -> SparkplugNode:
        super().start()
        return self

    def submit_result(self, message: ResultMessage) -> None:
        """Queue the result durably with the counters as of it; the sender publishes it when it may."""
        c = self._counters
        c["Inspected"] += 1
        c[{"pass": "Passed", "fail": "Failed"}.get(message.verdict, "Errors")] += 1
        record = {"result": message.model_dump(mode="json", by_alias=True), "counters": dict(c)}
        self.queue.append(json.dumps(record, separators=(",", ":")).encode("utf-8"))
        self._note_last_seq(message.seq)
        self._notify()

    def _note_last_seq(self, seq: int) -> None:
        # not fsync'd: after a power loss it can only lag behind the queue, and catch_up then repeats a result,
        # which a consumer drops by its seq
        try:
            self._last_seq_file.write_text(f"{seq}\n", encoding="ascii")
        except OSError as exc:
            log.warning("Sparkplug: cannot note the last queued seq in %s (%s)", self._last_seq_file, exc)

    def catch_up(self, source: DiskQueue) -> int:
        """Queue the results of ``source`` (the JSON topic's queue, whose index is the seq) that came after the
        last one queued here: a SIGKILL between the two appends leaves one.  Returns how many were added."""
        try:
            last = int(self._last_seq_file.read_text().strip())
        except (OSError, ValueError):
            return 0  # first start with Sparkplug on: nothing was promised yet
        missing = source.peek(1 << 20, after=last)
        if missing and missing[0][0] > last + 1 or not missing and source.head > last:
            first = missing[0][0] if missing else source.head + 1
            log.error("Sparkplug: results %d..%d were delivered on the JSON topic before they reached the "
                      "Sparkplug queue; they are not on Sparkplug", last + 1, first - 1)
        for _, payload in missing:
            try:
                self.submit_result(decode_result(payload))
            except ValueError as exc:
                log.error("Sparkplug: cannot catch up a queued result (%s)", exc)
        if missing:
            log.warning("Sparkplug: caught up %d result(s) queued for the JSON topic only (seq %d..%d)",
                        len(missing), missing[0][0], missing[-1][0])
        return len(missing)

    def update_status(self, status: dict[str, Any]) -> None:
        """A DDATA of the station metrics that changed (nothing while not born: the next DBIRTH has them)."""
        changed = []
        with self._spb_lock:
            for metric, key in _STATION_METRICS.items():
                if key in status and status[key] != self._station.get(key):
                    self._station[key] = status[key]
                    changed.append(Metric(metric, DataType.String, status[key]))
            client = self._client
            if changed and self._born and self._connected and client is not None:
                client.publish(self.topic_ddata, encode(changed, seq=self._next_seq(), with_types=False),
                               qos=self.spb.data_qos)

    def health(self) -> dict[str, Any]:
        reasons = []
        if not self._connected:
            reasons.append(f"Sparkplug: not connected to the broker at {self.config.host}:{self.config.port}")
        elif self.topic_state is not None and not self._host_online:
            reasons.append(f"Sparkplug: primary host {self.spb.primary_host_id!r} is offline; results are held")
        depth = self.queue.depth
        return {"state": "degraded" if reasons else "ok", "reasons": reasons, "connected": self._connected,
                "born": self._born, "host_online": self._host_online if self.topic_state else None,
                "queue_depth": depth, "bdseq": self._bdseq}

    # ------------------------------------------------------------------ Sparkplug messages

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % 256
        return seq

    def _ndeath(self) -> bytes:
        return encode([Metric(BDSEQ, DataType.UInt64, self._bdseq)], seq=None)

    def _device_metrics(self) -> list[Metric]:
        metrics = [Metric(name, dt, self._last[name]) for name, (dt, _) in _RESULT_METRICS.items()]
        metrics += [Metric(_latency_metric(s), DataType.Double, self._last.get(_latency_metric(s)))
                    for s in sorted(self._declared_stages)]
        metrics += [Metric(f"Counters/{k}", DataType.UInt64, self._counters_sent.get(k, 0)) for k in _COUNTERS]
        metrics += [Metric(m, DataType.String, self._station.get(key)) for m, key in _STATION_METRICS.items()]
        return metrics

    def _birth(self, client: mqtt.Client) -> None:
        """NBIRTH (seq 0) and DBIRTH with every metric's current value.  Caller holds ``_spb_lock``."""
        self._seq = 0
        node = [Metric(BDSEQ, DataType.UInt64, self._bdseq), Metric(REBIRTH, DataType.Boolean, False),
                Metric("Properties/Software Version", DataType.String, f"weakrest-edge {__version__}")]
        client.publish(self.topic_nbirth, encode(node, seq=self._next_seq()), qos=0)
        client.publish(self.topic_dbirth, encode(self._device_metrics(), seq=self._next_seq()), qos=0)
        self._born = True
        self.births += 1
        log.info("Sparkplug: birth of %s/%s (bdSeq %d)", self.edge_node_id, self.device_id, self._bdseq)

    def _may_birth(self) -> bool:
        return self._connected and (self.topic_state is None or self._host_online)

    # ------------------------------------------------------------------ connection hooks

    def _before_connect(self, client: mqtt.Client) -> None:
        with self._spb_lock:
            self._born = False
            self._host_online = False
            self._bdseq = self._take_bdseq()
            client.will_set(self.topic_ndeath, self._ndeath(), qos=1, retain=False)

    def _take_bdseq(self) -> int:
        """This connection's bdSeq; the next one is on disk before the CONNECT goes out."""
        try:
            current = int(self._bdseq_file.read_text().strip()) % 256
        except (OSError, ValueError):
            current = 0
        tmp = self._bdseq_file.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{(current + 1) % 256}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._bdseq_file)
        except OSError as exc:
            log.error("Sparkplug: cannot keep bdSeq in %s (%s); a restart may reuse %d", self._bdseq_file, exc,
                      current)
        return current

    def _subscribe(self, client: mqtt.Client) -> None:
        client.subscribe(self.topic_ncmd, qos=1)
        if self.topic_state is not None:
            client.subscribe(self.topic_state, qos=1)

    def _session_started(self, client: mqtt.Client, flags: mqtt.ConnectFlags) -> None:
        with self._spb_lock:
            if self._may_birth():
                self._birth(client)
            else:
                log.info("Sparkplug: connected; waiting for primary host %r to be online before the birth",
                         self.spb.primary_host_id)

    def _connection_changed(self, connected: bool) -> None:
        if not connected:
            with self._spb_lock:
                self._born = False

    def _may_send(self) -> bool:
        return self._born and (self.topic_state is None or self._host_online)

    def _wire(self, index: int, payload: bytes) -> tuple[str, bytes]:
        with self._spb_lock:
            try:
                record = json.loads(payload)
                result, counters = record["result"], record["counters"]
                stages = set((result.get("timings_ms") or {}).keys())
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("Sparkplug: queued record %d is unreadable (%s); sending it as an error", index, exc)
                metrics = [Metric("Inspection/Error", DataType.String, f"queued record {index} unreadable")]
                return self.topic_ddata, encode(metrics, seq=self._next_seq(), with_types=False)
            if not stages <= self._declared_stages and self._client is not None:
                self._declared_stages |= stages
                self._birth(self._client)  # declare the new latency metrics before using them
            ts = int(round(result["captured_at"] * 1000))
            metrics = []
            for name, (dt, read) in _RESULT_METRICS.items():
                value = read(result)
                self._last[name] = value
                metrics.append(Metric(name, dt, value, ts))
            for stage, ms in sorted((result.get("timings_ms") or {}).items()):
                self._last[_latency_metric(stage)] = ms
                metrics.append(Metric(_latency_metric(stage), DataType.Double, ms, ts))
            self._counters_sent = dict(counters)
            metrics += [Metric(f"Counters/{k}", DataType.UInt64, counters.get(k, 0), ts) for k in _COUNTERS]
            return self.topic_ddata, encode(metrics, seq=self._next_seq(), with_types=False)

    def _handle_message(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topic_state:
            self._on_state(client, bytes(msg.payload))
        elif msg.topic == self.topic_ncmd:
            self._on_ncmd(client, bytes(msg.payload))

    def _on_state(self, client: mqtt.Client, payload: bytes) -> None:
        """Sparkplug 3.0 STATE: JSON ``{"online": bool, "timestamp": ms}``; an older timestamp is ignored."""
        try:
            state = json.loads(payload.decode("utf-8"))
            online, stamp = bool(state["online"]), int(state.get("timestamp", 0))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            log.warning("Sparkplug: unreadable STATE of %r ignored (%s)", self.spb.primary_host_id, exc)
            return
        with self._spb_lock:
            if stamp < self._host_timestamp:
                return
            self._host_timestamp = stamp
            was, self._host_online = self._host_online, online
            log.info("Sparkplug: primary host %r is %s", self.spb.primary_host_id, "online" if online else "offline")
            if online and not was and self._connected:
                self._birth(client)
        self._notify()

    def _on_ncmd(self, client: mqtt.Client, payload: bytes) -> None:
        try:
            values = metrics_by_name(decode(payload), {REBIRTH: DataType.Boolean})
        except ValueError as exc:
            log.warning("Sparkplug: NCMD ignored: %s", exc)
            return
        if values.get(REBIRTH) is True:
            with self._spb_lock:
                if self._may_birth():
                    log.info("Sparkplug: rebirth requested")
                    self._birth(client)
            self._notify()
        else:
            log.warning("Sparkplug: NCMD with %s ignored (this node only takes %s)", sorted(values), REBIRTH)

    def _last_words(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        with self._spb_lock:
            out = []
            if self._born:
                out.append(client.publish(self.topic_ddeath, encode([], seq=self._next_seq()), qos=1))
            out.append(client.publish(self.topic_ndeath, self._ndeath(), qos=1))
            self._born = False
            return out

    def close(self, timeout_s: float = 5.0) -> bool:
        flushed = super().close(timeout_s)
        self.queue.close()
        return flushed


def sparkplug_node(mqtt: MQTTConfig, spb: SparkplugConfig, queue_cfg: QueueConfig, camera: str) -> SparkplugNode:
    """The node ``edge.yaml`` describes, with its queue (``sparkplug.queue_dir``, else ``<queue.dir>-sparkplug``)."""
    site, line, station = mqtt.topic_prefix.split("/")
    queue_dir = spb.queue_dir or queue_cfg.dir.with_name(queue_cfg.dir.name + "-sparkplug")
    queue_dir.mkdir(parents=True, exist_ok=True)
    queue = DiskQueue(queue_dir, int(queue_cfg.max_mb * 1024 * 1024),
                      memory_max_bytes=int(queue_cfg.memory_max_mb * 1024 * 1024))
    return SparkplugNode(mqtt, spb, queue, edge_node_id=spb.edge_node_id or f"{site}-{line}",
                         device_id=spb.device_id or station, camera=camera)


