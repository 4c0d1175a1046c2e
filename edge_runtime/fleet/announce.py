"""Announcing a release: one retained MQTT message that every station of the site hears, now or at its next
connect (``weakrest-train push --announce`` calls this after the push)."""

from __future__ import annotations

import os
import threading

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
    try:
        client.connect(cfg.host, cfg.port, cfg.keepalive_s)
    except OSError as exc:
        raise FleetBrokerError(f"broker {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
    client.loop_start()
    try:
        if not connected.wait(timeout_s) or refused:
            why = refused[0] if refused else f"no answer within {timeout_s:.0f} s"
            raise FleetBrokerError(f"broker {cfg.host}:{cfg.port} refused the connection: {why}")
        info = client.publish(topic, encode(release), qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise FleetBrokerError(f"broker {cfg.host}:{cfg.port} did not confirm the announcement on {topic}")
    finally:
        client.disconnect()
        client.loop_stop()
    return topic
