"""The fleet as the broker knows it: every station's retained status, every release and canary verdict of a site.

``weakrest-calibrate list --fleet`` prints it.  Retained messages arrive right after subscribing; the read
ends once none came for ``quiet_s`` (or after ``wait_s`` in all), so it takes about a second on a plant network.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..publishing.config import MQTTConfig
from .announce import broker_session, paho_client
from .release import FleetMessageError, parse_canary, parse_release


@dataclass
class FleetView:
    site: str
    stations: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<line>/<station>" -> status
    releases: dict[str, dict[str, Any]] = field(default_factory=dict)  # product -> release
    canaries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # product -> station -> verdict
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "stations": self.stations, "releases": self.releases, "canaries": self.canaries,
                "problems": self.problems}


def read_fleet(cfg: MQTTConfig, site: str, wait_s: float = 5.0, quiet_s: float = 0.5) -> FleetView:
    """Subscribe to the site's statuses and fleet topics and collect the retained messages."""
    view = FleetView(site)
    cond = threading.Condition()
    last = [time.monotonic()]
    subscribed = threading.Event()
    refused: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            refused.append(str(reason_code))
            subscribed.set()
            return
        client.subscribe([(f"{site}/+/+/status", 1), (f"{site}/fleet/+/release", 1),
                          (f"{site}/fleet/+/canary/+", 1)])

    def on_subscribe(*_args) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    def on_message(client, userdata, msg) -> None:
        with cond:
            _take(view, msg.topic, bytes(msg.payload))
            last[0] = time.monotonic()

    client = paho_client(cfg, f"weakrest-fleet-view-{os.getpid()}")
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    deadline = time.monotonic() + wait_s
    with broker_session(client, cfg, subscribed, refused, wait_s):
        while time.monotonic() < deadline and time.monotonic() - last[0] < quiet_s:
            time.sleep(0.05)
    return view


def _take(view: FleetView, topic: str, payload: bytes) -> None:
    parts = topic.split("/")
    if not payload:
        return
    try:
        if len(parts) == 4 and parts[1] == "fleet" and parts[3] == "release":
            view.releases[parts[2]] = parse_release(payload).model_dump(by_alias=True)
        elif len(parts) == 5 and parts[1] == "fleet" and parts[3] == "canary":
            view.canaries.setdefault(parts[2], {})[parts[4]] = parse_canary(payload).model_dump(by_alias=True)
        elif len(parts) == 4 and parts[3] == "status":
            status = json.loads(payload)
            if not isinstance(status, dict):
                raise ValueError("not a JSON object")
            view.stations[f"{parts[1]}/{parts[2]}"] = status
    except (FleetMessageError, ValueError) as exc:
        view.problems.append(f"{topic}: {exc}")


def format_fleet(view: FleetView) -> list[str]:
    """A table: one line per station (what it runs, its rollout state), then releases and canary verdicts."""
    lines = [f"site {view.site}: {len(view.stations)} station(s)"]
    header = f"  {'line/station':<22}{'state':<9}{'product':<14}{'serving':<22}{'digest':<20}{'fleet':<12}detail"
    if view.stations:
        lines.append(header)
    for name, s in sorted(view.stations.items()):
        fleet = s.get("fleet") or {}
        running = fleet.get("running") or {}
        digest = str(running.get("digest") or "")[:19]
        lines.append(f"  {name:<22}{str(s.get('state')):<9}{str(s.get('product')):<14}"
                     f"{str(s.get('bundle_version')):<22}{digest or '-':<20}{str(fleet.get('state', '-')):<12}"
                     f"{fleet.get('detail', '') if s.get('state') == 'online' else s.get('reason', '')}")
    for product, r in sorted(view.releases.items()):
        lines.append(f"release {product} {r['version']} {r['digest'][:19]} from {r['repository']}")
        for station, v in sorted(view.canaries.get(product, {}).items()):
            if v["digest"] != r["digest"]:
                continue
            rate = "-" if v["reject_rate"] is None else f"{v['reject_rate']:.1%}"
            lines.append(f"  canary {station}: {v['verdict']} ({v['frames']} frames, reject rate {rate}, "
                         f"bound {v['max_reject_rate']:.1%})")
    lines.extend(f"problem: {p}" for p in view.problems)
    return lines
