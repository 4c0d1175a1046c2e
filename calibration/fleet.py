"""``weakrest-calibrate list --fleet``: every station of a site, what it serves (version and OCI digest), its
rollout state, and each product's release with its canary verdicts, read from the broker's retained messages."""

from __future__ import annotations

import argparse

from edge_runtime.publishing.config import MQTTConfig

from .errors import CalibrationError


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", action="store_true", help="list the site's stations from the broker instead of the "
                                                        "store (the broker of --config, or --broker)")
    p.add_argument("--broker", help="HOST:PORT of the plant broker (default: the mqtt section of --config)")
    p.add_argument("--site", help="site (default: the first level of --config's mqtt.topic_prefix)")
    p.add_argument("--wait", type=float, default=5.0, help="seconds at most to collect the retained messages")


def list_fleet(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """(JSON view, text lines) of the fleet; :class:`CalibrationError` when the broker cannot be read."""
    from edge_runtime.fleet.announce import FleetBrokerError
    from edge_runtime.fleet.view import format_fleet, read_fleet

    cfg, site = _broker(args)
    try:
        view = read_fleet(cfg, site, wait_s=args.wait)
    except FleetBrokerError as exc:
        raise CalibrationError(f"cannot read the fleet: {exc}") from None
    return view.to_json(), format_fleet(view)


def _broker(args: argparse.Namespace) -> tuple[MQTTConfig, str]:
    cfg: MQTTConfig | None = None
    site = args.site
    if args.config:
        from edge_runtime.service.config import EdgeConfigError, load_edge_config

        try:
            edge = load_edge_config(args.config)
        except EdgeConfigError as exc:
            raise CalibrationError(str(exc)) from None
        cfg = edge.mqtt
        site = site or edge.fleet.site or edge.mqtt.topic_prefix.split("/", 1)[0]
    if args.broker:
        host, _, port = args.broker.rpartition(":")
        if not host or not port.isdigit():
            raise CalibrationError(f"--broker {args.broker!r}: expected HOST:PORT")
        cfg = (cfg or MQTTConfig()).model_copy(update={"host": host, "port": int(port)})
    if cfg is None:
        raise CalibrationError("--fleet needs the broker: give --config (the station's edge.yaml) or --broker")
    if not site:
        raise CalibrationError("--fleet needs the site: give --site (or --config)")
    return cfg, site
