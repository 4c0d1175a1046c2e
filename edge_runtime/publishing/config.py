"""The outputs' sections of the edge config: MQTT (with TLS), Sparkplug B, commands, the result queue, OPC UA."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import Section as _Section


class TLSConfig(_Section):
    ca: Path | None = None
    cert: Path | None = Field(default=None, description="client certificate (with key)")
    key: Path | None = None
    insecure: bool = Field(default=False, description="skip host name verification (test benches only)")

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("mqtt.tls.cert and mqtt.tls.key go together")
        return self


class MQTTConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, gt=0, lt=65536)
    client_id: str | None = Field(default=None, description="None: weakrest-<station>")
    topic_prefix: str = Field(default="site/line/station", description="<site>/<line>/<station>")
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = Field(default=30, ge=5)
    status_interval_s: float = Field(default=30.0, ge=0.2, description="online status refresh; MQTT 5: a retained "
                                     "online status expires after 3 missed refreshes")
    qos: Literal[0, 1, 2] = 1
    tls: TLSConfig | None = None
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    heatmap: Literal["fail", "all", "none"] = "fail"
    heatmap_format: Literal["png", "jpeg"] = "png"

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        parts = v.split("/")
        if len(parts) != 3 or any(not p or any(c in p for c in "+#") for p in parts):
            raise ValueError("expected <site>/<line>/<station>, three non-empty levels without '+' or '#'")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> MQTTConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give mqtt.password or mqtt.password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("mqtt.password needs mqtt.username")
        return self

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        return self.password


class SparkplugConfig(_Section):
    """Sparkplug B beside the JSON topics: the edge box is an edge node, the station one of its devices.

    It uses the broker, TLS and credentials of the ``mqtt`` section over a connection of its own (its last
    will is the NDEATH), and a durable queue of its own, so no result is lost while no host application is
    online."""

    enabled: bool = False
    group_id: str = Field(default="weakrest", description="Sparkplug group id")
    edge_node_id: str | None = Field(default=None, description="None: <site>-<line> of mqtt.topic_prefix")
    device_id: str | None = Field(default=None, description="None: the station (last level of mqtt.topic_prefix)")
    primary_host_id: str | None = Field(default=None, description="hold results while this host's STATE is "
                                        "offline; None: send whenever connected")
    client_id: str | None = Field(default=None, description="None: weakrest-spb-<edge_node_id>-<device_id>")
    data_qos: Literal[0, 1] = Field(default=1, description="DDATA of results: 1 (no loss, what a line needs) or "
                                    "0 (the specification's letter)")
    queue_dir: Path | None = Field(default=None, description="None: <queue.dir>-sparkplug")

    @field_validator("group_id", "edge_node_id", "device_id", "primary_host_id")
    @classmethod
    def _sparkplug_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/+#")):
            raise ValueError("a Sparkplug id must be non-empty, without '/', '+' or '#'")
        return v


class CommandsConfig(_Section):
    """Who may command the service over MQTT, beyond the broker's ACL (see ``publishing/command_auth.py``)."""

    require_auth: bool = Field(default=False, description="take only commands signed with the shared secret")
    secret_file: Path | None = Field(default=None, description="file holding the shared secret (>= 16 bytes)")
    max_age_s: float = Field(default=60.0, gt=0, description="a signed command older or newer than this is refused")

    @model_validator(mode="after")
    def _secret(self) -> CommandsConfig:
        if self.require_auth and self.secret_file is None:
            raise ValueError("commands.require_auth needs commands.secret_file")
        return self


def default_queue_dir() -> Path:
    """``$STATE_DIRECTORY/queue`` under systemd (so each ``weakrest-edge@<station>`` instance gets its own queue
    without a line of config), else ``/var/lib/weakrest/queue``."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state or "/var/lib/weakrest") / "queue"


class QueueConfig(_Section):
    dir: Path = Field(default_factory=default_queue_dir,
                      description="on-disk result queue ($STATE_DIRECTORY/queue, else /var/lib/weakrest/queue)")
    max_mb: float = Field(default=256.0, gt=0)
    memory_max_mb: float = Field(default=16.0, gt=0, description="results held in memory while the disk refuses "
                                 "writes (full); beyond this the oldest held are dropped, counted")


class OpcUaConfig(_Section):
    """Opt-in OPC UA server for PLCs/MES: Basic256Sha256 only, clients trusted by certificate (no anonymous)."""

    enabled: bool = False
    host: str = Field(default="127.0.0.1", description="listen address; 0.0.0.0 to serve the plant network")
    port: int = Field(default=4840, gt=0, lt=65536)
    namespace: str = Field(default="urn:weakrest:edge", min_length=1, description="namespace URI of the nodes")
    station: str | None = Field(default=None, min_length=1, description="station object name; None: cfg.station")
    certificate: Path = Field(default=Path("/var/lib/weakrest/opcua/server-cert.der"),
                              description="server application certificate (DER or PEM): weakrest-edge opcua-cert")
    private_key: Path = Field(default=Path("/var/lib/weakrest/opcua/server-key.pem"))
    trusted_clients: Path = Field(default=Path("/var/lib/weakrest/opcua/trusted"),
                                  description="folder of trusted client certificates (.der/.pem)")
    security: list[Literal["Sign", "SignAndEncrypt"]] = Field(
        default_factory=lambda: ["SignAndEncrypt"], min_length=1, description="Basic256Sha256 message modes")
    allow_anonymous: bool = Field(default=False, description="also serve read-only sessions without a certificate "
                                                             "(SecurityPolicy None): test benches only")
