"""Result publishing: a durable on-disk queue in front of an MQTT publisher.

* :mod:`.disk_queue` - :class:`DiskQueue`, the fsync'd write-ahead log results go through (no loss on a
  broker outage or a SIGKILL, delivery in order).
* :mod:`.messages`   - the documented message schema (result, status, heatmap, commands).
* :mod:`.mqtt`       - :class:`MqttPublisher` (paho-mqtt): at-least-once, ordered results; status with last
  will; heatmaps; commands.
* :mod:`.broker`     - :class:`LocalBroker`, a throw-away Mosquitto (or amqtt) for tests and demos.

``MqttPublisher`` and ``LocalBroker`` are imported on first use so that the queue and the schema do not
need paho-mqtt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_runtime.publishing.disk_queue import DiskQueue, QueueLockedError
from edge_runtime.publishing.messages import (
    Command,
    CommandError,
    Region,
    ResultMessage,
    decode_heatmap,
    encode_heatmap_header,
    parse_command,
    result_json_schema,
)

if TYPE_CHECKING:
    from edge_runtime.publishing.broker import LocalBroker
    from edge_runtime.publishing.mqtt import MqttPublisher

__all__ = [
    "Command", "CommandError", "DiskQueue", "LocalBroker", "MqttPublisher", "QueueLockedError", "Region",
    "ResultMessage", "decode_heatmap", "encode_heatmap_header", "parse_command", "result_json_schema",
]


def __getattr__(name: str) -> Any:
    if name == "MqttPublisher":
        from edge_runtime.publishing.mqtt import MqttPublisher

        return MqttPublisher
    if name == "LocalBroker":
        from edge_runtime.publishing.broker import LocalBroker

        return LocalBroker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
