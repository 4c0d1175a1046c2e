"""A small MQTT subscriber that records what it receives: the MES stand-in of the demo, the service
benchmark and the tests (a real paho client; it reconnects and re-subscribes by itself)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: Any = None
    user_properties: dict[str, str] = field(default_factory=dict)


class Subscriber:
    """A paho client that records what it receives; reconnects by itself (re-subscribing each time)."""

    def __init__(self, port: int, topics: str | list[str], *, protocol: str = "5", client_id: str | None = None,
                 persistent: bool = False, host: str = "127.0.0.1") -> None:
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.messages: list[Received] = []
        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self.connects = 0
        self.sessions_present: list[bool] = []  # per successful connect: did the broker still have our session?
        v5 = protocol == "5"
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": not persistent}
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-sub-{id(self):x}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, **kwargs)
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_disconnect = lambda *a: self._subscribed.clear()
        self.client.on_message = self._on_message
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600 if persistent else 0
            self.client.connect_async(host, port, 30, clean_start=not persistent, properties=props)
        else:
            self.client.connect_async(host, port, 30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"subscriber could not subscribe to {self.topics} on port {port}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        self.connects += 1
        self.sessions_present.append(bool(flags.session_present))
        client.subscribe([(t, 1) for t in self.topics])

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Wait until the current connection's subscription is acknowledged (cleared at every disconnect)."""
        return self._subscribed.wait(timeout) and self.client.is_connected()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or []) if props is not None else {}
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, props, user))
            self._lock.notify_all()

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(messages)`` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
            return True

    def wait_count(self, topic: str, n: int, timeout: float = 10.0) -> list[Received]:
        """Wait for at least ``n`` messages on ``topic``; returns them (fewer on timeout)."""
        self.wait_for(lambda ms: sum(m.topic == topic for m in ms) >= n, timeout)
        return self.on(topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
