"""MQTT publisher of the edge service: results through the durable queue, status, heatmaps and commands.

Delivery of results is *at least once, in order*:

* :meth:`MqttPublisher.submit_result` appends the encoded result to the :class:`DiskQueue` (fsync'd) and
  returns; nothing is sent that is not on disk first.
* One sender thread drains the queue in index order at QoS 1 with at most ``window`` messages in flight
  (less when an MQTT 5 broker announces a smaller Receive Maximum).  It acknowledges the queue only up to
  the highest *contiguous* index whose PUBACK arrived, so an ack never skips a message still in flight.
* The sender is the only source of retransmission.  paho keeps its own copy of every unacknowledged
  message (also of one published after the socket died) and sends them all right after the next CONNACK;
  that copy can hold a *later* record than one the broker never received, which would then arrive first.
  So on every successful connect (in ``on_connect``, which paho runs *before* its own resend loop) the
  publisher calls ``drop_out_messages()`` and bumps a connection epoch, and the sender restarts from the
  oldest unacknowledged record of the queue.  A publish is only issued under a lock that also covers that
  drop-and-bump, for the epoch it was decided in, so no message of an older connection can slip into a
  newer one ahead of the resend.  Results always go at QoS 1, whatever ``mqtt.qos`` says.
* The subscriber therefore sees increasing runs of ``seq`` where a run may restart at or below where the
  previous one stopped, never above it: keeping the first copy of each ``seq`` gives every result once,
  in order.  A PUBACK with a failure reason code (MQTT 5, e.g. not authorised) is logged at ERROR,
  counted in ``rejected`` and acknowledged, since resending cannot change the broker's decision and would
  block the queue for good.

Status messages are kept in memory, not on disk: one composed while the broker is unreachable (a camera
state change, a reload) is held, and on the next connect the held ones go out first, in the order they
happened, then the current status, so a subscriber sees every transition (at most ``MAX_HELD_STATUS`` are
held; the oldest go first).  Command replies and heatmaps are not queued: heatmaps are best effort (QoS 0,
dropped while offline).

Sessions are persistent (MQTT 5: clean start off with a session expiry; 3.1.1: clean session off) so the
command subscription and commands sent during a short outage survive.  ``protocol: auto`` tries MQTT 5
and, as long as no MQTT 5 connection has succeeded yet, falls back to 3.1.1 for good when the broker
refuses it: CONNACK "unsupported protocol version", no CONNACK within ``connack_timeout_s`` of a TCP
connection, or the connection closed before CONNACK twice in a row (3.1.1-only brokers do each of these).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_runtime import __version__
from edge_runtime.publishing.command_auth import CommandAuth
from edge_runtime.publishing.config import MQTTConfig
from edge_runtime.publishing.disk_queue import DiskQueue
from edge_runtime.publishing.messages import (
    HEATMAP_CONTENT_TYPES,
    WILL_PAYLOAD,
    Command,
    CommandError,
    ResultMessage,
    command_reply,
    encode_heatmap_header,
    encode_json,
    encode_result,
    parse_command,
    stamp_published_at,
    status_expiry_s,
    status_payload,
)

log = logging.getLogger(__name__)


def apply_security(client: mqtt.Client, cfg: MQTTConfig) -> None:
    """The broker's TLS (server verified; optional client certificate) and credentials of ``cfg`` on a paho client:
    one place for every connection this project opens (the service, the fleet, the calibration CLI)."""
    if cfg.tls is not None:
        client.tls_set(ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
                       certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                       keyfile=str(cfg.tls.key) if cfg.tls.key else None,
                       cert_reqs=ssl.CERT_REQUIRED)
        if cfg.tls.insecure:
            client.tls_insecure_set(True)
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.resolved_password())


class _NotConnectedNoise(logging.Filter):
    """paho logs "Client is not connected" at ERROR on every reconnect attempt and once at a clean
    shutdown, and "failed to receive on socket" when a broker restarts under it (the soak saw one per few
    restarts); this module logs the connection state itself (lost, with paho's reason / reconnecting /
    connected), so those lines go to DEBUG instead of alarming whoever reads the journal."""

    NOISE = ("Client is not connected", "failed to receive on socket")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(self.NOISE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_PAHO_LOG = logging.getLogger(f"{__name__}.paho")
_PAHO_LOG.addFilter(_NotConnectedNoise())

MAX_HELD_STATUS = 64  # status messages held while disconnected (transitions beyond that lose the oldest)
_UNSUPPORTED_PROTOCOL = (1, 0x84)  # 3.1.1 "unacceptable protocol version", MQTT 5 "unsupported protocol version"
_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class Topics:
    """Topic names under ``<site>/<line>/<station>``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.result = f"{prefix}/result"
        self.status = f"{prefix}/status"
        self.heatmap = f"{prefix}/heatmap"
        self.cmd = f"{prefix}/cmd"
        self.reply = f"{prefix}/cmd/reply"


class DurableMqttClient(ABC):
    """One MQTT connection (with the ``auto`` protocol fallback) and the durable, ordered sender of a queue.

    Subclasses say what the connection carries: :meth:`_configure` (last will, ...), :meth:`_subscribe`,
    :meth:`_session_started` (first messages of a session, run while a concurrent :meth:`_session_lock`
    holder waits), :meth:`_may_send` (hold the queue, e.g. while no host application is online),
    :meth:`_wire` (topic and bytes of one queued record, called in queue order), :meth:`_handle_message`.
    """

    log_name = "MQTT"

    def __init__(self, config: MQTTConfig, queue: DiskQueue, *, client_id: str,
                 on_connection: Callable[[bool], None] | None = None, window: int = 32,
                 session_expiry_s: int = 3600, connack_timeout_s: float = 5.0, persistent_session: bool = True,
                 protocol: Literal["auto", "5", "3.1.1"] | None = None, result_qos: Literal[0, 1] = 1) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.config = config
        self.queue = queue
        self.client_id = client_id
        self.window = window
        self.session_expiry_s = session_expiry_s
        self.connack_timeout_s = connack_timeout_s
        self.persistent_session = persistent_session
        self.result_qos = result_qos  # 0 confirms nothing: a record counts as delivered once handed to the socket
        self._protocol_setting = protocol or config.protocol
        self._on_connection = on_connection
        # Held by on_connect from "connected" to the end of the session's first messages, and by whoever
        # publishes session-ordered messages (the JSON status), so none can overtake those first messages.
        self._session_lock = threading.Lock()
        self._protocol = mqtt.MQTTv311 if self._protocol_setting == "3.1.1" else mqtt.MQTTv5
        self._client: mqtt.Client | None = None
        # Connection state, written by the paho network thread only; _send_lock makes "check epoch and
        # publish" (sender) atomic against "drop paho's buffer and bump the epoch" (on_connect).
        self._send_lock = threading.Lock()
        self._epoch = 0
        self._connected = False
        self._receive_maximum = 65535
        self._since = time.time()
        # protocol "auto": MQTT 5 attempts without a CONNACK yet, and when the current attempt began
        self._v5_confirmed = False
        self._v5_failures = 0
        self._attempt_started: float | None = None
        self._falling_back = False
        self._fallback_thread: threading.Thread | None = None
        # Sender wake-up: set by submit, PUBACKs and connection changes.  Never held while calling paho.
        self._wake = threading.Condition()
        self._wake_pending = False
        self._rejected_mids: dict[int, str] = {}
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._started = False
        self._closed = False
        self.published = 0  # result PUBLISH packets issued, resends included
        self.acked = 0  # result PUBLISH packets PUBACKed (their records are then acknowledged in the queue)
        self.resent = 0  # result PUBLISH packets that repeat an earlier one (after a reconnect)
        self.rejected = 0  # results whose PUBACK carried a failure reason code

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        """Protocol in use (after an ``auto`` fallback: "3.1.1")."""
        return "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"

    def start(self) -> DurableMqttClient:
        """Start connecting (in the background: a broker that is down does not block) and sending."""
        if self._started:
            return self
        self._started = True
        self._sender = threading.Thread(target=self._sender_main, name=f"{self.log_name.lower()}-sender",
                                        daemon=True)
        self._sender.start()
        self._connect(self._make_client(self._protocol))
        return self

    def __enter__(self) -> DurableMqttClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued result is acknowledged by the broker; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.queue.depth > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        """Flush, say goodbye (:meth:`_last_words`), disconnect cleanly (no last will) and stop the threads.

        Returns whether every queued result was delivered; what is left stays on disk for the next start.
        """
        if self._closed or not self._started:
            self._closed = True
            return not self.queue.closed and self.queue.depth == 0
        self._closed = True
        flushed = self.flush(timeout_s) if self._connected and self._may_send() else self.queue.depth == 0
        if not flushed:
            log.warning("%s: closing with %d result(s) still queued; they are sent after the next start",
                        self.log_name, self.queue.depth)
        self._stop.set()
        self._notify()
        if self._sender is not None:
            self._sender.join(timeout=max(1.0, timeout_s))
        if self._fallback_thread is not None:
            self._fallback_thread.join(timeout=max(1.0, timeout_s))  # so that the client below is the last one
        client = self._client
        if client is not None:
            if self._connected:
                for info in self._last_words(client):
                    try:
                        info.wait_for_publish(timeout=min(2.0, timeout_s))
                    except (RuntimeError, ValueError) as exc:
                        log.warning("%s: goodbye message not confirmed: %s", self.log_name, exc)
            client.disconnect()
            client.loop_stop()
        self._closed_hook()
        self._connected = False
        return flushed

    def stats(self) -> dict[str, Any]:
        """Counters for metrics."""
        return {"connected": self._connected, "published": self.published, "acked": self.acked,
                "resent": self.resent, "rejected": self.rejected, "queue_depth": self.queue.depth,
                "queue_bytes": self.queue.bytes, "queue_dropped": self.queue.dropped, "queue_held": self.queue.held}

    # ------------------------------------------------------------------ what subclasses fill in

    def _configure(self, client: mqtt.Client) -> None:
        """Set up a new paho client (last will...) before its first connect."""

    def _before_connect(self, client: mqtt.Client) -> None:
        """Runs before every CONNECT, reconnects included (network thread)."""

    def _subscribe(self, client: mqtt.Client) -> None:
        """Subscribe after every successful connect."""

    def _session_started(self, client: mqtt.Client, flags: mqtt.ConnectFlags) -> None:
        """First messages of a session, published under :attr:`_session_lock` (network thread)."""

    def _may_send(self) -> bool:
        """False holds the queue (the sender waits for :meth:`_notify`)."""
        return True

    @abstractmethod
    def _wire(self, index: int, payload: bytes) -> tuple[str, bytes]:
        """Topic and bytes of queued record ``index``, called under the send lock in queue order."""

    def _handle_message(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        """An incoming message on a subscription (network thread: hand long work to another thread)."""

    def _last_words(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        """Messages a clean shutdown publishes before DISCONNECT (a DISCONNECT suppresses the last will)."""
        return []

    def _closed_hook(self) -> None:
        """After the client is disconnected at :meth:`close`."""

    def _connection_changed(self, connected: bool) -> None:
        """After every connect and disconnect (network thread)."""

    # ------------------------------------------------------------------ client setup

    def _make_client(self, protocol: int) -> mqtt.Client:
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = not self.persistent_session
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=protocol, reconnect_on_failure=True, **kwargs)
        client.enable_logger(_PAHO_LOG)
        # an exception in one of our callbacks is logged by paho and the network thread goes on: a dead network
        # thread would leave ``connected`` true while nothing moves
        client.suppress_exceptions = True
        client.reconnect_delay_set(min_delay=0.5, max_delay=10)  # type: ignore[arg-type]  # floats work
        client.max_inflight_messages_set(self.window + 8)  # room for status/replies beside the window
        apply_security(client, cfg)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._configure(client)
        return client

    def _connect(self, client: mqtt.Client) -> None:
        with self._send_lock:
            self._client = client
            self._protocol = client.protocol
        if client.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s if self.persistent_session else 0
            client.connect_async(self.config.host, self.config.port, self.config.keepalive_s,
                                 clean_start=not self.persistent_session, properties=props)
        else:
            client.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        client.loop_start()
        log.info("%s: connecting to %s:%d as %s (MQTT %s)", self.log_name, self.config.host, self.config.port,
                 self.client_id, self.protocol)

    def _auto_v5_pending(self, client: mqtt.Client) -> bool:
        return (self._protocol_setting == "auto" and client.protocol == mqtt.MQTTv5 and not self._v5_confirmed
                and not self._falling_back)

    def _start_fallback(self, client: mqtt.Client, why: str) -> None:
        if self._falling_back or self._closed:
            return
        self._falling_back = True
        log.warning("%s: broker at %s:%d does not take MQTT 5 (%s): falling back to 3.1.1", self.log_name,
                    self.config.host,
                    self.config.port, why)
        self._fallback_thread = threading.Thread(target=self._fall_back_to_311, args=(client,),
                                                 name="mqtt-fallback", daemon=True)
        self._fallback_thread.start()

    def _fall_back_to_311(self, old: mqtt.Client) -> None:
        """Replace an MQTT 5 client the broker refused by a 3.1.1 one (own thread: loop_stop joins paho's)."""
        old.disconnect()
        old.loop_stop()
        if not self._closed:
            self._connect(self._make_client(mqtt.MQTTv311))
        self._falling_back = False

    def _check_connack_timeout(self) -> None:
        """protocol auto: a broker that leaves an MQTT 5 CONNECT unanswered is taken as refusing MQTT 5."""
        client, started = self._client, self._attempt_started
        if (client is not None and started is not None and not self._connected and self._auto_v5_pending(client)
                and client.socket() is not None and time.monotonic() - started > self.connack_timeout_s):
            self._start_fallback(client, f"no CONNACK within {self.connack_timeout_s:g} s")

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._attempt_started = time.monotonic()
        if client is self._client:
            self._before_connect(client)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: mqtt.ReasonCode, properties: Properties | None) -> None:
        if client is not self._client:
            return
        self._attempt_started = None
        if reason_code.is_failure:
            if self._auto_v5_pending(client) and reason_code.value in _UNSUPPORTED_PROTOCOL:
                self._start_fallback(client, str(reason_code))
            else:
                log.error("%s: connection refused by %s:%d: %s", self.log_name, self.config.host, self.config.port,
                          reason_code)
            return
        if client.protocol == mqtt.MQTTv5:
            self._v5_confirmed = True
        receive_maximum = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        with self._session_lock:  # a session-ordered message composed meanwhile waits for the first ones
            with self._send_lock:
                # paho would resend its unacknowledged copies right after this callback; the sender resends
                # them from the queue instead, in order (see the module docstring).
                stale = client.drop_out_messages()
                self._receive_maximum = int(receive_maximum) if receive_maximum else 65535
                self._epoch += 1
                self._connected = True
            self._since = time.time()
            log.info("%s: connected to %s:%d (MQTT %s, session present: %s, %d unacknowledged to resend)",
                     self.log_name, self.config.host, self.config.port, self.protocol, flags.session_present,
                     len(stale))
            self._subscribe(client)
            self._session_started(client, flags)
        self._notify()
        self._tell_connection(True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: mqtt.ReasonCode, properties: Properties | None) -> None:
        if client is not self._client:
            return
        if not self._connected and self._attempt_started is not None and self._auto_v5_pending(client):
            self._v5_failures += 1  # closed after CONNECT, before any CONNACK
            if self._v5_failures >= 2:
                self._start_fallback(client, "connection closed before CONNACK")
        self._attempt_started = None
        was = self._connected
        self._connected = False
        self._epoch += 1
        self._notify()
        if was:
            if self._closed:
                log.info("%s: disconnected", self.log_name)
            else:
                log.warning("%s: connection to %s:%d lost (%s); %d result(s) queued, reconnecting",
                            self.log_name, self.config.host, self.config.port, reason_code, self.queue.depth)
            self._tell_connection(False)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: mqtt.ReasonCode,
                    properties: Properties | None) -> None:
        # Runs under paho's message lock: must not take _send_lock (the sender holds it while publishing).
        if reason_code.is_failure:
            self._rejected_mids[mid] = str(reason_code)
        self._notify()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if client is self._client:
            self._handle_message(client, msg)

    def _tell_connection(self, connected: bool) -> None:
        self._connection_changed(connected)
        if self._on_connection is None:
            return
        try:
            self._on_connection(connected)
        except Exception:
            log.exception("on_connection callback failed")

    # ------------------------------------------------------------------ sender thread

    def _notify(self) -> None:
        with self._wake:
            self._wake_pending = True
            self._wake.notify()

    def _tick(self) -> None:
        """Runs on every pass of the sender (at least twice a second): periodic work of a subclass."""

    def _sender_main(self) -> None:
        while not self._stop.is_set() and not self.queue.closed:
            try:
                self._send_loop()
            except Exception:
                if self._stop.is_set() or self.queue.closed:
                    break
                # e.g. a disk error while reading the queue: results stay on disk, try again shortly
                log.exception("%s sender failed; retrying in 1 s", self.log_name)
                self._stop.wait(1.0)

    def _send_loop(self) -> None:
        inflight: deque[tuple[int, mqtt.MQTTMessageInfo]] = deque()
        epoch = -1
        last_sent: int | None = None  # highest index published in this epoch
        max_sent = -1  # highest index ever published (to count resends)
        blocked = False  # publish found no connection: wait for the epoch to change
        while not self._stop.is_set():
            with self._wake:
                if not self._wake_pending:
                    self._wake.wait(0.5)
                self._wake_pending = False
            self._check_connack_timeout()
            self.queue.write_held()  # results a full disk refused go to disk as soon as it takes them again
            # 1. Acknowledge the contiguous PUBACKed prefix of the window.
            top = None
            while inflight and _published(inflight[0][1]):
                index, info = inflight.popleft()
                reason = self._rejected_mids.pop(info.mid, None)
                if reason is not None:
                    self.rejected += 1
                    log.error("%s: broker rejected result record %d (%s); it is not resent", self.log_name, index,
                              reason)
                self.acked += 1
                top = index
            if top is not None:
                self.queue.ack(top)  # one fsync'd state write per batch of PUBACKs
            # 2. A connect or disconnect since the last pass: forget the window, resend from the queue head.
            if self._epoch != epoch:
                epoch, last_sent, blocked = self._epoch, None, False
                inflight.clear()
                self._rejected_mids.clear()
            self._tick()
            if not self._connected or blocked or not self._may_send():
                continue
            # 3. Fill the window.
            window = max(1, min(self.window, self._receive_maximum - 4))
            room = window - len(inflight)
            if room <= 0:
                continue
            records = self.queue.peek(room, after=last_sent)
            if not records:
                continue
            with self._send_lock:
                client = self._client
                if self._epoch != epoch or not self._connected or client is None:
                    self._notify()
                    continue
                for index, payload in records:
                    topic, data = self._wire(index, payload)
                    info = client.publish(topic, data, qos=self.result_qos)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        # Socket gone before on_disconnect ran; paho's copy is dropped at the next connect.
                        blocked = True
                        break
                    inflight.append((index, info))
                    last_sent = index
                    self.published += 1
                    if index <= max_sent:
                        self.resent += 1
                    max_sent = max(max_sent, index)


class MqttPublisher(DurableMqttClient):
    """Publishes results (durably, in order), status, heatmaps; executes commands from ``<prefix>/cmd``.

    ``status_provider()`` returns the service's part of the status (product, bundle_version, camera_state,
    ...); ``on_command(cmd)`` runs in a worker thread and returns extra reply keys (``detail``...) or raises;
    ``on_connection(connected)`` is told about every connect and disconnect.  Call :meth:`start`, then
    :meth:`close` (or use it as a context manager).
    """

    def __init__(self, config: MQTTConfig, queue: DiskQueue, *,
                 status_provider: Callable[[], dict[str, Any]] | None = None,
                 on_command: Callable[[Command], dict[str, Any] | None] | None = None,
                 on_connection: Callable[[bool], None] | None = None,
                 window: int = 32, session_expiry_s: int = 3600, connack_timeout_s: float = 5.0,
                 command_auth: CommandAuth | None = None) -> None:
        super().__init__(config, queue,
                         client_id=config.client_id or f"weakrest-{config.topic_prefix.rsplit('/', 1)[-1]}",
                         on_connection=on_connection, window=window, session_expiry_s=session_expiry_s,
                         connack_timeout_s=connack_timeout_s)
        self.topics = Topics(config.topic_prefix)
        if config.qos != 1:
            # QoS 0 confirms nothing; QoS 2 state in the broker's session would outlive the resends with new
            # packet ids that follow a reconnect.  The queue plus ``seq`` give exactly-once downstream anyway.
            log.warning("mqtt.qos is %d, but results are always published at QoS 1", config.qos)
        self._status_provider = status_provider
        self._on_command = on_command
        self._command_auth = command_auth  # None: any well-formed command is taken (the broker's ACL decides)
        self._status_extra: dict[str, Any] = {}
        self._held_status: deque[bytes] = deque(maxlen=MAX_HELD_STATUS)
        self._status_sent = time.monotonic()  # last online status handed to paho (for the refresh)
        self._commands: ThreadPoolExecutor | None = None
        self._commands_ready = threading.Event()  # the broker acknowledged the command subscription
        self._command_subscription: int | None = None  # the SUBSCRIBE's packet id, to match its SUBACK
        self.heatmaps = 0
        self.commands = 0

    def start(self) -> MqttPublisher:
        if not self._started:
            self._commands = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqtt-cmd")
        super().start()
        return self

    def __enter__(self) -> MqttPublisher:
        return self.start()

    @property
    def commands_ready(self) -> bool:
        """True once the broker has acknowledged the command subscription of the current connection.

        ``connected`` comes first (at CONNACK): a command published by another client between the two is not
        delivered on a first connect (a persistent session keeps the subscription across reconnects)."""
        return self._commands_ready.is_set()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "heatmaps": self.heatmaps, "commands": self.commands,
                "commands_ready": self.commands_ready}

    # ------------------------------------------------------------------ publishing API

    def submit_result(self, message: ResultMessage) -> int:
        """Queue a result durably and wake the sender; returns its queue index.  Does not wait for the broker."""
        index = self.queue.append(encode_result(message))
        self._notify()
        return index

    def publish_heatmap(self, image: bytes, *, frame_id: int, seq: int,
                        fmt: Literal["png", "jpeg"] | None = None) -> bool:
        """Best-effort heatmap (QoS 0); False when not connected.  ``image`` is already PNG/JPEG encoded."""
        fmt = fmt or self.config.heatmap_format
        client = self._client
        if client is None or not self._connected:
            return False
        content_type = HEATMAP_CONTENT_TYPES.get(fmt)
        if content_type is None:
            raise ValueError(f"unknown heatmap format {fmt!r} (expected png or jpeg)")
        if self._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
            props.UserProperty = [("frame_id", str(frame_id)), ("seq", str(seq)), ("content_type", content_type)]
            info = client.publish(self.topics.heatmap, bytes(image), qos=0, properties=props)
        else:
            payload = encode_heatmap_header({"frame_id": frame_id, "seq": seq, "format": fmt}, image)
            info = client.publish(self.topics.heatmap, payload, qos=0)
        ok = info.rc == mqtt.MQTT_ERR_SUCCESS
        self.heatmaps += ok
        return ok

    def publish_status(self, extra: dict[str, Any] | None = None) -> bool:
        """Publish the online status now (retained); ``extra`` keys are kept for later status messages too.

        Returns False when not connected: the status is then held and published, in order, on the next
        connect (see the module docstring)."""
        with self._session_lock:
            if extra:
                self._status_extra.update(extra)
            payload = encode_json(self._status("online"))
            client = self._client
            if client is not None and self._connected:
                info = self._publish_online(client, payload)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    return True
            # Not connected (or the socket died before on_disconnect ran): paho's copy of a failed publish
            # is dropped at the next connect, so hold our own.
            if len(self._held_status) == self._held_status.maxlen:
                log.warning("MQTT: %d status messages held while disconnected; dropping the oldest",
                            len(self._held_status))
            self._held_status.append(payload)
            return False

    def _publish_online(self, client: mqtt.Client, payload: bytes) -> mqtt.MQTTMessageInfo:
        """A retained online status; on MQTT 5 it expires by itself unless refreshed (see the module docstring)."""
        props = None
        if client.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = status_expiry_s(self.config.status_interval_s)
        self._status_sent = time.monotonic()
        return client.publish(self.topics.status, payload, qos=1, retain=True, properties=props)

    # ------------------------------------------------------------------ connection hooks

    def _configure(self, client: mqtt.Client) -> None:
        client.will_set(self.topics.status, WILL_PAYLOAD, qos=1, retain=True)
        client.on_subscribe = self._on_subscribe

    def _subscribe(self, client: mqtt.Client) -> None:
        if client.protocol == mqtt.MQTTv5:
            # retain-as-published: a command published with the retain flag keeps it when it arrives live,
            # so it is refused like one delivered from the broker's store at subscribe time
            _, mid = client.subscribe(self.topics.cmd, options=SubscribeOptions(qos=1, retainAsPublished=True))
        else:
            _, mid = client.subscribe(self.topics.cmd, qos=1)
        self._command_subscription = mid

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[mqtt.ReasonCode],
                      properties: Properties | None) -> None:
        if client is not self._client or mid != self._command_subscription:
            return
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            self._commands_ready.clear()
            log.error("MQTT: the broker refused the subscription to %s (%s): commands will not arrive; check the "
                      "broker's ACL for this client", self.topics.cmd, ", ".join(refused))
        else:
            self._commands_ready.set()

    def _connection_changed(self, connected: bool) -> None:
        if not connected:
            self._commands_ready.clear()

    def _session_started(self, client: mqtt.Client, flags: mqtt.ConnectFlags) -> None:
        if self._held_status:
            log.info("MQTT: publishing %d status message(s) held while disconnected", len(self._held_status))
        while self._held_status:
            client.publish(self.topics.status, self._held_status.popleft(), qos=1, retain=True)
        self._publish_online(client, encode_json(self._status("online")))

    def _wire(self, index: int, payload: bytes) -> tuple[str, bytes]:
        return self.topics.result, _stamp(payload)

    def _tick(self) -> None:
        if self._connected and time.monotonic() - self._status_sent >= self.config.status_interval_s:
            self.publish_status()  # refreshes ``at`` and, on MQTT 5, the expiry of the retained online status

    def _handle_message(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        if self._commands is None:
            return
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties is not None else None
        try:
            self._commands.submit(self._run_command, bytes(msg.payload), msg.retain, correlation)
        except RuntimeError:  # executor shut down: closing
            pass

    def _last_words(self, client: mqtt.Client) -> list[mqtt.MQTTMessageInfo]:
        return [client.publish(self.topics.status, encode_json(self._status("offline", "shutdown")), qos=1,
                               retain=True)]

    def _closed_hook(self) -> None:
        if self._commands is not None:
            self._commands.shutdown(wait=False, cancel_futures=True)

    def _status(self, state: Literal["online", "offline"], reason: str | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self._status_provider is not None:
            try:
                info = dict(self._status_provider())
            except Exception:
                log.exception("status provider failed; publishing a status without its fields")
        info.update(self._status_extra)
        since = self._since if state == "online" else time.time()
        return status_payload(state, info, since=since, pid=os.getpid(), version=__version__, reason=reason,
                              interval_s=self.config.status_interval_s)

    # ------------------------------------------------------------------ commands (worker thread)

    def _run_command(self, payload: bytes, retained: bool, correlation: bytes | None) -> None:
        self.commands += 1
        try:
            cmd = parse_command(payload, self._command_auth)
            if retained:
                raise CommandError("retained commands are refused (they would run again at every reconnect); "
                                   "publish it without the retain flag, and clear the retained message",
                                   cmd.id, cmd.command)
        except CommandError as exc:
            log.warning("MQTT: refused command on %s: %s", self.topics.cmd, exc)
            self._reply(command_reply(exc.command_id, exc.command, False, error=str(exc)), correlation)
            return
        if self._on_command is None:
            self._reply(command_reply(cmd.id, cmd.command, False, error="this service takes no commands"),
                        correlation)
            return
        log.info("MQTT: command %s (id %s)", cmd.command, cmd.id)
        try:
            extra = dict(self._on_command(cmd) or {})
        except Exception as exc:
            log.exception("command %s (id %s) failed", cmd.command, cmd.id)
            reply = command_reply(cmd.id, cmd.command, False, error=f"{type(exc).__name__}: {exc}")
        else:
            ok = bool(extra.pop("ok", True))
            detail, error = extra.pop("detail", None), extra.pop("error", None)
            reply = command_reply(cmd.id, cmd.command, ok, detail=detail, error=error, **extra)
        self._reply(reply, correlation)

    def _reply(self, reply: dict[str, Any], correlation: bytes | None) -> None:
        client = self._client
        if client is None:
            return
        props = None
        if correlation is not None and client.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        try:
            payload = encode_json(reply)
        except (TypeError, ValueError) as exc:
            log.error("command reply is not JSON-serialisable (%s): %r", exc, reply)
            payload = encode_json(command_reply(reply.get("id"), reply.get("command"), False,
                                                error="reply could not be encoded"))
        client.publish(self.topics.reply, payload, qos=1, properties=props)


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # publish failed (no connection): never becomes published
        return False


def _stamp(payload: bytes) -> bytes:
    try:
        return stamp_published_at(payload, time.time())
    except ValueError:
        log.error("queued result is not JSON; sending it as stored")
        return payload
