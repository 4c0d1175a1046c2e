"""Edge runtime configuration (``configs/edge.yaml``): YAML validated into typed objects.

The camera's and the outputs' sections are defined by the packages they configure (``acquisition/config.py``,
``publishing/config.py``); this module adds the service's own (bundles, health) and composes the whole.

A bad value is refused with the dotted key, the value and what was expected (:class:`EdgeConfigError`)
before the service touches the camera or the broker.  Every field has a default except the bundle store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..acquisition.config import CameraConfig, GenICamConfig, OpenCVConfig, ReplayConfig
from ..core.signing import BundleTrust
from ..fleet.config import FleetConfig
from ..publishing.config import (
    CommandsConfig,
    MQTTConfig,
    OpcUaConfig,
    QueueConfig,
    SparkplugConfig,
    TLSConfig,
)
from ..schema import Section as _Section
from ..store import plain_product_name

#: the engine switch (``core.engines.ENGINE_NAMES``; a test checks they agree)
EngineName = Literal["auto", "cpu", "cpu-int8", "openvino", "openvino-bf16", "openvino-int8", "cuda", "tensorrt"]

__all__ = [  # each section's schema lives with the package it configures; the service composes them here
    "BundleStoreConfig", "CameraConfig", "CommandsConfig", "EdgeConfig", "EdgeConfigError", "FleetConfig",
    "GenICamConfig",
    "HealthConfig", "MQTTConfig", "OpcUaConfig", "OpenCVConfig", "QueueConfig", "ReplayConfig", "SparkplugConfig",
    "TLSConfig", "load_edge_config", "parse_edge_config",
]


class EdgeConfigError(ValueError):
    """The edge configuration could not be read or did not validate."""


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


class HealthConfig(_Section):
    host: str = Field(default="127.0.0.1", description="loopback only by default")
    port: int = Field(default=9108, ge=0, lt=65536, description="0: no health/metrics endpoint")
    queue_degraded_s: float = Field(default=10.0, gt=0, description="/health is degraded while the oldest queued "
                                    "result has waited longer than this (verdicts late at the MES)")


class EdgeConfig(_Section):
    bundles: BundleStoreConfig
    camera: CameraConfig = CameraConfig()
    mqtt: MQTTConfig = MQTTConfig()
    queue: QueueConfig = QueueConfig()
    commands: CommandsConfig = CommandsConfig()
    health: HealthConfig = HealthConfig()
    sparkplug: SparkplugConfig = SparkplugConfig()
    opcua: OpcUaConfig = OpcUaConfig()
    fleet: FleetConfig = FleetConfig()
    latency_budget_ms: float | None = Field(default=None, gt=0, description="None: the bundle's budget")
    threads: int | None = Field(default=None, ge=1, description="inference threads; None: all usable CPUs")
    engine: EngineName = Field(
        default="auto", description="inference engine (edge_runtime/core/engines.py); auto: the fastest one this "
        "machine and the bundle allow, reported in /health and weakrest_engine_info")
    engine_device: Literal["CPU", "GPU"] = Field(default="CPU", description="OpenVINO device for the openvino "
                                                 "engines (GPU: an Intel integrated GPU)")
    overlap_frames: bool = Field(
        default=False, description="run a frame's backbone while the previous frame's matching, Swin and "
        "publishing run (two threads, results still in order): more results/s with the cores for both, "
        "one frame more in flight; set threads to half the cores")
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
    if cfg.fleet.ca is not None or cfg.fleet.password_file is not None:
        updates["fleet"] = cfg.fleet.model_copy(update={k: rel(getattr(cfg.fleet, k)) or getattr(cfg.fleet, k)
                                                        for k in ("ca", "password_file")})
    if cfg.camera.replay.path is not None:
        replay = cfg.camera.replay.model_copy(update={"path": rel(cfg.camera.replay.path) or cfg.camera.replay.path})
        updates["camera"] = cfg.camera.model_copy(update={"replay": replay})
    return cfg.model_copy(update=updates)
