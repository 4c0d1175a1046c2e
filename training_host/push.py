"""``weakrest-train push BUNDLE REGISTRY/PRODUCT:VERSION``: a bundle to an OCI registry, and (``--announce``) its
release to every station of a site over MQTT.

The push verifies the bundle first (a broken one never reaches the registry); the announcement names the
digest the registry gave the artifact, which is what stations pull by and check every byte against.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_runtime.core.bundle import MANIFEST


def add_push_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="push a bundle to an OCI registry (Harbor, GitLab, a cloud registry) and "
                                    "optionally announce the release to the fleet")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder")
    p.add_argument("reference", metavar="REGISTRY/PRODUCT:VERSION",
                   help="e.g. registry.plant:5000/weakrest/bracket:2026-12-04.1 (VERSION names it in the stores)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (a loopback test registry only)")
    p.add_argument("--ca", help="CA bundle for the registry's TLS certificate")
    p.add_argument("--username", help="registry user (a robot account)")
    p.add_argument("--password-file", help="file holding the registry password or token")
    p.add_argument("--announce", action="store_true",
                   help="publish the retained release on <site>/fleet/<product>/release")
    p.add_argument("--config", help="edge.yaml whose mqtt section (broker, TLS, credentials; site = first level of "
                                    "topic_prefix) the announcement uses")
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the broker (without --config)")
    p.add_argument("--site", help="site to announce to (default: from --config)")
    p.add_argument("--product", help="product the release is for (default: the bundle manifest's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from edge_runtime.fleet.announce import FleetBrokerError, announce
    from edge_runtime.fleet.oci import PullError, push_bundle, split_reference
    from edge_runtime.fleet.release import ReleaseMessage
    from edge_runtime.store import StoreError, check_version_name

    _, _, tag = split_reference(args.reference)
    try:
        check_version_name(tag)
    except StoreError as exc:
        raise ValueError(f"{args.reference}: the tag becomes the version name in the stores: {exc}") from None
    mqtt_cfg, site = _broker(args) if args.announce else (None, None)
    password = Path(args.password_file).read_text(encoding="utf-8").strip() if args.password_file else None
    try:
        pushed = push_bundle(args.bundle, args.reference, insecure=args.insecure,
                             ca=Path(args.ca) if args.ca else None, username=args.username, password=password)
    except PullError as exc:
        raise ValueError(f"push failed: {exc}") from None
    product = args.product or json.loads((Path(args.bundle) / MANIFEST).read_text(encoding="utf-8"))["product"]
    report = {"reference": pushed.reference, "repository": pushed.repository, "version": pushed.tag,
              "digest": pushed.digest, "size": pushed.size, "product": product, "announced_on": None}
    if args.announce:
        release = ReleaseMessage(product=product, version=pushed.tag, repository=pushed.repository,
                                 digest=pushed.digest, size=pushed.size)
        try:
            report["announced_on"] = announce(release, mqtt_cfg, site)
        except FleetBrokerError as exc:
            raise ValueError(f"pushed {pushed.repository}@{pushed.digest}, but the announcement failed: {exc}") \
                from None
    if args.json:
        print(json.dumps(report))
    else:
        print(f"pushed {args.bundle} to {pushed.reference} ({pushed.size / 1e6:.1f} MB), digest {pushed.digest}")
        if report["announced_on"]:
            print(f"announced {product} {pushed.tag} on {report['announced_on']} (retained)")
    return 0


def _broker(args: argparse.Namespace):
    from edge_runtime.publishing.config import MQTTConfig

    if args.config:
        from edge_runtime.service.config import load_edge_config

        cfg = load_edge_config(args.config)
        return cfg.mqtt, args.site or cfg.fleet.site or cfg.mqtt.topic_prefix.split("/", 1)[0]
    if not args.site:
        raise ValueError("--announce needs --site (or --config with the station's edge.yaml)")
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--broker {args.broker!r}: expected HOST:PORT")
    return MQTTConfig(host=host, port=int(port)), args.site
