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
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge_runtime.publishing.broker import LocalBroker, amqtt_available, find_mosquitto
from edge_runtime.publishing.subscriber import Received, Subscriber  # noqa: F401  (re-exported for tests)


def broker_available() -> bool:
    return find_mosquitto() is not None or amqtt_available()


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; an AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def require_mosquitto(broker: LocalBroker, why: str) -> None:
    """Skip a test that needs what only Mosquitto has (MQTT 5, persistence, TLS), naming what to install."""
    if broker.impl != "mosquitto":
        pytest.skip(f"needs Mosquitto ({why}; this run has {broker.impl}): apt-get install mosquitto")


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
        if kwargs.setdefault("protocol", broker.protocol) not in broker.protocols:
            kwargs["protocol"] = broker.protocol
        return make_subscriber(broker.port, topics, **kwargs)

    return make
