"""Pytest fixtures for MQTT tests against a real local broker (Mosquitto, else amqtt).

``broker``: a function-scoped running :class:`LocalBroker`.  ``make_broker(**kw)``: more brokers or other
options (``persistence=True``, ``impl="amqtt"``).  ``subscriber(topic, ...)``: a real paho client on the
``broker`` fixture that collects every message it receives (see :class:`Subscriber`); ``make_subscriber(port,
topic, ...)`` the same for any broker.  Subscribers are closed at teardown.

Register with ``pytest_plugins = ["tests.mqtt_fixtures"]`` (in ``tests/conftest.py`` or a test module).
``MQTT_TEST_BROKER=amqtt`` runs the tests on the pure-Python fallback broker even where Mosquitto exists.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.publishing.broker import LocalBroker, amqtt_available, find_mosquitto


def broker_available() -> bool:
    return find_mosquitto() is not None or amqtt_available()


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
        v5 = protocol == "5"
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": not persistent}
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-sub-{id(self):x}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, **kwargs)
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
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
        client.subscribe([(t, 1) for t in self.topics])

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


@pytest.fixture
def make_broker(tmp_path) -> Iterator[Callable[..., LocalBroker]]:
    if not broker_available():
        pytest.skip("no MQTT broker: install mosquitto (apt-get install mosquitto) or amqtt")
    brokers: list[LocalBroker] = []

    def make(**kwargs: Any) -> LocalBroker:
        kwargs.setdefault("workdir", tmp_path / f"broker{len(brokers)}")
        kwargs.setdefault("impl", os.environ.get("MQTT_TEST_BROKER", "auto"))
        b = LocalBroker(**kwargs)
        brokers.append(b)
        return b.start()

    yield make
    for b in brokers:
        b.close()


@pytest.fixture
def broker(make_broker) -> LocalBroker:
    return make_broker()


@pytest.fixture
def make_subscriber() -> Iterator[Callable[..., Subscriber]]:
    """``make_subscriber(port, topics, protocol="5", persistent=False, client_id=None)`` -> a started Subscriber."""
    subs: list[Subscriber] = []

    def make(port: int, topics: str | list[str], **kwargs: Any) -> Subscriber:
        s = Subscriber(port, topics, **kwargs)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()


@pytest.fixture
def subscriber(broker, make_subscriber) -> Callable[..., Subscriber]:
    """``subscriber(topics, protocol="5", persistent=False, client_id=None)`` on the ``broker`` fixture."""

    def make(topics: str | list[str], **kwargs: Any) -> Subscriber:
        if kwargs.get("protocol", "5") not in broker.protocols:
            kwargs["protocol"] = "3.1.1"
        return make_subscriber(broker.port, topics, **kwargs)

    return make
