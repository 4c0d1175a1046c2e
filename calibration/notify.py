"""Telling a running edge service to reload after a switch, and confirming that it did.

Two ways: the MQTT ``reload`` command (``<prefix>/cmd``, reply on ``<prefix>/cmd/reply``) or SIGHUP to the
service's pid.  Either way the proof is the service's retained status (``<prefix>/status``) showing the
new ``bundle_version`` while online: a reply alone says the command arrived, the status says what is
served.  A service that cannot be reached is not an error for the switch (it is already done, and the
service loads ``current`` when it starts): the outcome says "not confirmed" and why.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.publishing.command_auth import CommandAuth
from edge_runtime.publishing.config import MQTTConfig
from edge_runtime.publishing.mqtt import apply_security

_UNSUPPORTED_PROTOCOL = (1, 0x84)  # 3.1.1 "unacceptable protocol version", MQTT 5 "unsupported protocol version"
_CONNECT_WAIT_S = 5.0


@dataclass
class ReloadOutcome:
    """Whether the service confirmed serving ``expected``, how it was asked, and what it said."""

    method: str  # "mqtt" | "sighup"
    expected: str
    confirmed: bool
    detail: str
    reply: dict | None = None
    status: dict | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


class _Watch:
    """A paho client subscribed to the reply and status topics, recording what arrives."""

    def __init__(self, cfg: MQTTConfig, protocol: int) -> None:
        self.cfg = cfg
        self.prefix = cfg.topic_prefix
        self.cond = threading.Condition()
        self.connack: Any = None
        self.subscribed = False
        self.replies: list[dict] = []
        self.status: dict | None = None
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"weakrest-calibrate-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                                  protocol=protocol)
        apply_security(self.client, cfg)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self.cond:
            self.connack = reason_code
            self.cond.notify_all()
        if not reason_code.is_failure:
            client.subscribe([(f"{self.prefix}/cmd/reply", 1), (f"{self.prefix}/status", 1)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self.cond:
            self.subscribed = True
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        with self.cond:
            if msg.topic.endswith("/cmd/reply"):
                self.replies.append(body)
            else:
                self.status = body
            self.cond.notify_all()

    def start(self) -> None:
        """Connect (raises OSError when the broker cannot be reached) and start the network thread."""
        self.client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive_s)
        self.client.loop_start()

    def wait(self, predicate, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.2))
            return True

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def _connect(cfg: MQTTConfig) -> _Watch:
    """A connected, subscribed watcher; protocol "auto" tries MQTT 5 and falls back to 3.1.1."""
    protocols = {"5": [mqtt.MQTTv5], "3.1.1": [mqtt.MQTTv311], "auto": [mqtt.MQTTv5, mqtt.MQTTv311]}[cfg.protocol]
    last = "no answer"
    for protocol in protocols:
        watch = _Watch(cfg, protocol)
        watch.start()
        got = watch.wait(lambda w=watch: w.connack is not None, _CONNECT_WAIT_S)
        if got and not watch.connack.is_failure and watch.wait(lambda w=watch: w.subscribed, _CONNECT_WAIT_S):
            return watch
        last = str(watch.connack) if got else f"no CONNACK in {_CONNECT_WAIT_S:g} s"
        watch.close()
        if got and watch.connack.value not in _UNSUPPORTED_PROTOCOL:
            break  # refused for another reason (credentials...): another protocol will not help
    raise ConnectionError(f"broker {cfg.host}:{cfg.port} refused the connection ({last})")


def _serving(status: dict | None, expected: str) -> bool:
    return bool(status) and status.get("state") == "online" and status.get("bundle_version") == expected


def _status_text(status: dict | None) -> str:
    if status is None:
        return "no retained status on the topic"
    return (f"status {status.get('state')} serving {status.get('product')}@{status.get('bundle_version')}"
            + (f" ({status['reason']})" if status.get("reason") else ""))


def reload_over_mqtt(cfg: MQTTConfig, expected: str, timeout_s: float = 30.0,
                     send_command: bool = True, command_auth: CommandAuth | None = None) -> ReloadOutcome:
    """Send ``reload`` (unless ``send_command`` is False: SIGHUP was sent) and wait for the status to show
    ``expected``; never raises for an unreachable broker or a silent service.  ``command_auth`` signs the
    command (a service with ``commands.require_auth`` refuses an unsigned one)."""
    method = "mqtt" if send_command else "sighup"
    where = f"{cfg.host}:{cfg.port} {cfg.topic_prefix}"
    try:
        watch = _connect(cfg)
    except (OSError, ConnectionError, ssl.SSLError) as exc:
        return ReloadOutcome(method, expected, False, f"broker {where} not reachable ({exc})")
    try:
        command_id = f"calibrate-{uuid.uuid4().hex[:8]}"
        if send_command:
            command = {"command": "reload", "id": command_id}
            payload = json.dumps(command_auth.sign(command) if command_auth is not None else command)
            watch.client.publish(f"{cfg.topic_prefix}/cmd", payload, qos=1)

        def reply() -> dict | None:
            return next((r for r in watch.replies if r.get("id") == command_id), None)

        def done() -> bool:
            r = reply()
            if r is not None and not r.get("ok"):
                return True  # refused: no point waiting for the status
            return (r is not None or not send_command) and _serving(watch.status, expected)

        watch.wait(done, timeout_s)
        with watch.cond:
            r, status = reply(), dict(watch.status) if watch.status else None
    finally:
        watch.close()
    if r is not None and not r.get("ok"):
        return ReloadOutcome(method, expected, False, f"the service refused the reload: {r.get('error')}", r, status)
    if _serving(status, expected) and (r is not None or not send_command):
        return ReloadOutcome(method, expected, True, f"service at {where} now serves {expected}", r, status)
    if send_command and r is None:
        why = f"no reply to the reload command on {where} within {timeout_s:g} s ({_status_text(status)})"
    else:
        why = f"the status on {where} did not show {expected} within {timeout_s:g} s ({_status_text(status)})"
    return ReloadOutcome(method, expected, False, why, r, status)


def send_sighup(pid: int) -> str | None:
    """SIGHUP to the service; returns a problem description instead of raising (the switch is done anyway)."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return f"no process with pid {pid}"
    except PermissionError:
        return f"not allowed to signal pid {pid} (run as the service's user or root)"
    return None
