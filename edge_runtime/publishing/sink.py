"""What the service hands every plant-facing output besides the plain JSON topics (Sparkplug B, OPC UA).

The service owns one :class:`~edge_runtime.publishing.mqtt.MqttPublisher` (the documented JSON topics) and
any number of *sinks*.  A sink receives every result and every status change; it must never block the
inference loop (queue or hand off to its own thread) and never raise into it: the service logs and counts
what a sink raises and carries on.  A sink that must not lose a result keeps its own durable queue.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from edge_runtime.publishing.messages import ResultMessage


@runtime_checkable
class ResultSink(Protocol):
    """An output of the service.  ``name`` appears in logs and in ``/health`` (``sinks.<name>``)."""

    name: str

    def start(self) -> None:
        """Begin serving (connect in the background: an unreachable peer must not block the service)."""

    def submit_result(self, message: ResultMessage) -> None:
        """One inspected frame, in ``seq`` order; returns at once."""

    def update_status(self, status: dict[str, Any]) -> None:
        """The service's status changed (camera state, bundle, broker connection); ``status`` is complete."""

    def health(self) -> dict[str, Any]:
        """``{"state": "ok" | "degraded" | "failing", ...}`` with whatever explains a state other than ok."""

    # Optional: ``catch_up(queue)`` - a sink with a durable queue of its own takes the results of the JSON
    # topic's queue (index = seq) that a kill left between the two appends; called once before the start.

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout_s`` (keeping the rest durable) and stop."""
