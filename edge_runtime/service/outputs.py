"""Builds the plant-facing outputs (sinks) that ``edge.yaml`` switches on, beside the plain JSON topics.

One place decides which sinks exist, so the runner never imports an optional protocol library it does not
use: each branch imports its module only when its section is enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..publishing import Command
from ..publishing.sink import ResultSink
from .config import EdgeConfig


def build_sinks(cfg: EdgeConfig, on_command: Callable[[Command], dict[str, Any]]) -> list[ResultSink]:
    """The sinks enabled in ``cfg``; ``on_command`` runs an operator command exactly as MQTT's ``cmd`` does."""
    sinks: list[ResultSink] = []
    if cfg.sparkplug.enabled:
        from ..publishing.sparkplug.node import sparkplug_node

        sinks.append(sparkplug_node(cfg.mqtt, cfg.sparkplug, cfg.queue, cfg.camera.name))
    if cfg.opcua.enabled:
        from ..publishing.opcua import OpcUaServer

        sinks.append(OpcUaServer(cfg.opcua, cfg.station, on_command))
    return sinks
