"""Builds the plant-facing outputs (sinks) that ``edge.yaml`` switches on, beside the plain JSON topics.

One place decides which sinks exist, so the runner never imports an optional protocol library it does not
use: each branch imports its module only when its section is enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..publishing import Command
from ..publishing.messages import ReloadCommand
from ..publishing.sink import ResultSink
from ..store import BundleStore
from .config import EdgeConfig


def build_sinks(cfg: EdgeConfig, on_command: Callable[[Command], dict[str, Any]], *,
                store: BundleStore | None = None,
                report_status: Callable[[dict[str, Any]], Any] | None = None) -> list[ResultSink]:
    """The sinks enabled in ``cfg``; ``on_command`` runs an operator command exactly as MQTT's ``cmd`` does.

    The fleet agent also needs the service's ``store`` and ``report_status`` (adds keys to the retained status)."""
    sinks: list[ResultSink] = []
    if cfg.fleet.enabled:
        from ..fleet.agent import FleetAgent

        if store is None or report_status is None:
            raise ValueError("fleet.enabled needs the service's bundle store and status")
        sinks.append(FleetAgent(cfg.fleet, cfg.mqtt, store, cfg.bundles.product, cfg.station,
                                reload=lambda: on_command(ReloadCommand(command="reload", id="fleet")),
                                report=report_status))
    if cfg.sparkplug.enabled:
        from ..publishing.sparkplug.node import sparkplug_node

        sinks.append(sparkplug_node(cfg.mqtt, cfg.sparkplug, cfg.queue, cfg.camera.name))
    if cfg.opcua.enabled:
        from ..publishing.opcua import OpcUaServer

        sinks.append(OpcUaServer(cfg.opcua, cfg.station, on_command))
    return sinks
