"""Edge runtime configuration (``configs/edge.yaml``): YAML validated into typed objects.

A bad value is refused with the dotted key, the value and what was expected (:class:`EdgeConfigError`)
before the service touches the camera or the broker.  Every field has a default except the bundle store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.signing import BundleTrust
from ..store import plain_product_name


class EdgeConfigError(ValueError):
    """The edge configuration could not be read or did not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleStoreConfig(_Section):
    """Bundles live in ``<store>/<product>/<version>/``; ``<store>/<product>/current`` links the active one."""

    store: Path = Field(description="bundle store directory")
    product: str = Field(min_length=1, description="product whose current bundle is served")
    require_signature: bool = Field(default=False, description="serve only bundles signed by a key in "
                                    "trust_store (refused at add, activate, reload and start)")
    trust_store: Path | None = Field(default=None, description="directory of trusted public keys (*.pub)")

    @field_validator("product")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return plain_product_name(v)

    @model_validator(mode="after")
    def _trust(self) -> BundleStoreConfig:
        if self.require_signature and self.trust_store is None:
            raise ValueError("bundles.require_signature needs bundles.trust_store (a directory of *.pub keys)")
        return self

    def trust(self) -> BundleTrust:
        return BundleTrust(require=self.require_signature, store=self.trust_store)


class GenICamConfig(_Section):
    cti: Path | None = Field(default=None, description="GenTL producer (.cti); None: GENICAM_GENTL64_PATH")
    serial: str | None = Field(default=None, description="device serial number; None: use index")
    index: int = Field(default=0, ge=0)
    pixel_format: str | None = Field(default=None, description="e.g. Mono8, RGB8, BayerRG8; None: camera default")
    exposure_us: float | None = Field(default=None, gt=0)
    trigger: Literal["free_run", "software", "hardware"] = "free_run"
    trigger_source: str = Field(default="Line0", description="hardware trigger input")
    fetch_timeout_ms: int = Field(default=1000, gt=0)
    buffers: int = Field(default=4, ge=1, le=256)
    lost_after_timeouts: int = Field(default=5, ge=1, description="free-run: consecutive timeouts = camera lost")


class ReplayConfig(_Section):
    path: Path | None = Field(default=None, description="folder of images or a video file")
    fps: float = Field(default=10.0, gt=0)
    loop: bool = True


class OpenCVConfig(_Section):
    device: int | str = Field(default=0, description="device index or URL (rtsp://..., file)")
    fps: float | None = Field(default=None, gt=0)


class CameraConfig(_Section):
    source: Literal["genicam", "replay", "opencv"] = "genicam"
    name: str = Field(default="cam0", min_length=1, description="camera name in results and metrics")
    genicam: GenICamConfig = GenICamConfig()
    replay: ReplayConfig = ReplayConfig()
    opencv: OpenCVConfig = OpenCVConfig()
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _source_complete(self) -> CameraConfig:
        if self.source == "replay" and self.replay.path is None:
            raise ValueError("camera.replay.path is required when camera.source is 'replay'")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("camera.reconnect_max_s must not be below camera.reconnect_initial_s")
        return self


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


class QueueConfig(_Section):
    dir: Path = Field(default=Path("/var/lib/weakrest/queue"), description="on-disk result queue")
    max_mb: float = Field(default=256.0, gt=0)
    memory_max_mb: float = Field(default=16.0, gt=0, description="results held in memory while the disk refuses "
                                 "writes (full); beyond this the oldest held are dropped, counted")


class HealthConfig(_Section):
    host: str = Field(default="127.0.0.1", description="loopback only by default")
    port: int = Field(default=9108, ge=0, lt=65536, description="0: no health/metrics endpoint")
    queue_degraded_s: float = Field(default=10.0, gt=0, description="/health is degraded while the oldest queued "
                                    "result has waited longer than this (verdicts late at the MES)")


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


class EdgeConfig(_Section):
    bundles: BundleStoreConfig
    camera: CameraConfig = CameraConfig()
    mqtt: MQTTConfig = MQTTConfig()
    queue: QueueConfig = QueueConfig()
    commands: CommandsConfig = CommandsConfig()
    health: HealthConfig = HealthConfig()
    sparkplug: SparkplugConfig = SparkplugConfig()
    opcua: OpcUaConfig = OpcUaConfig()
    latency_budget_ms: float | None = Field(default=None, gt=0, description="None: the bundle's budget")
    threads: int | None = Field(default=None, ge=1, description="inference threads; None: all usable CPUs")
    watchdog_idle_s: float = Field(default=10.0, gt=0,
                                   description="free-run: no frame for this long stops the watchdog pings")

    @property
    def station(self) -> str:
        return self.mqtt.topic_prefix.rsplit("/", 1)[-1]


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{key}: {err['msg']}{shown}")
    return "; ".join(lines)


def parse_edge_config(data: dict, source: str = "config") -> EdgeConfig:
    try:
        return EdgeConfig.model_validate(data)
    except ValidationError as exc:
        raise EdgeConfigError(f"{source}: {_format_error(exc)}") from None


def load_edge_config(path: str | os.PathLike) -> EdgeConfig:
    """Read and validate an edge config; relative paths in it are taken from the file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EdgeConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise EdgeConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise EdgeConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    cfg = parse_edge_config(data, str(path))
    return _resolve_paths(cfg, path.parent.resolve())


def _resolve_paths(cfg: EdgeConfig, base: Path) -> EdgeConfig:
    def rel(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else base / p

    updates = {
        "bundles": cfg.bundles.model_copy(update={"store": rel(cfg.bundles.store) or cfg.bundles.store,
                                                  "trust_store": rel(cfg.bundles.trust_store)
                                                  or cfg.bundles.trust_store}),
        "queue": cfg.queue.model_copy(update={"dir": rel(cfg.queue.dir) or cfg.queue.dir}),
    }
    updates["opcua"] = cfg.opcua.model_copy(update={k: rel(getattr(cfg.opcua, k)) or getattr(cfg.opcua, k)
                                                    for k in ("certificate", "private_key", "trusted_clients")})
    if cfg.commands.secret_file is not None:
        updates["commands"] = cfg.commands.model_copy(update={"secret_file": rel(cfg.commands.secret_file)
                                                              or cfg.commands.secret_file})
    if cfg.sparkplug.queue_dir is not None:
        updates["sparkplug"] = cfg.sparkplug.model_copy(update={"queue_dir": rel(cfg.sparkplug.queue_dir)
                                                                or cfg.sparkplug.queue_dir})
    if cfg.camera.replay.path is not None:
        replay = cfg.camera.replay.model_copy(update={"path": rel(cfg.camera.replay.path) or cfg.camera.replay.path})
        updates["camera"] = cfg.camera.model_copy(update={"replay": replay})
    return cfg.model_copy(update=updates)
