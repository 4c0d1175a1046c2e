"""Announcing a release: one retained MQTT message that every station of the site hears, now or at its next
connect (``weakrest-train push --announce`` calls this after the push)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ..publishing.config import MQTTConfig
from ..publishing.mqtt import apply_security
from .release import ReleaseMessage, encode, release_topic


class FleetBrokerError(RuntimeError):
    """The broker could not be reached or refused (an announcement, a fleet read)."""


def paho_client(cfg: MQTTConfig, client_id: str) -> mqtt.Client:
    """A plain MQTT 3.1.1 client with the TLS and credentials of ``cfg`` (the fleet's own connections)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=True)
    apply_security(client, cfg)
    return client


@contextlib.contextmanager
def broker_session(client: mqtt.Client, cfg: MQTTConfig, ready: threading.Event, refused: list[str],
                   timeout_s: float) -> Iterator[mqtt.Client]:
    """Connect ``client``, run its network loop, and wait for ``ready`` (set by the caller's callbacks once the
    connection is usable; ``refused`` holds the broker's reason when it refused); disconnect on exit.  One
    short-lived session for the announcement and the fleet view alike."""
    try:
        client.connect(cfg.host, cfg.port, cfg.keepalive_s)
    except OSError as exc:
        raise FleetBrokerError(f"broker {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
    client.loop_start()
    try:
        if not ready.wait(timeout_s) or refused:
            why = refused[0] if refused else f"no answer within {timeout_s:.0f} s"
            raise FleetBrokerError(f"broker {cfg.host}:{cfg.port} refused the connection: {why}")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def announce(release: ReleaseMessage, cfg: MQTTConfig, site: str, timeout_s: float = 10.0) -> str:
    """Publish ``release`` retained at QoS 1 on ``<site>/fleet/<product>/release``; returns the topic."""
    topic = release_topic(site, release.product)
    client = paho_client(cfg, f"weakrest-announce-{os.getpid()}")
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    with broker_session(client, cfg, connected, refused, timeout_s):
        info = client.publish(topic, encode(release), qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise FleetBrokerError(f"broker {cfg.host}:{cfg.port} did not confirm the announcement on {topic}")
    return topic
