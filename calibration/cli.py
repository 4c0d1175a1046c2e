"""``weakrest-calibrate``: adapt a bundle to a new product or a moved camera on site, from good frames only.

  capture   grab good frames from the configured camera into a folder (PNG + capture.json)
  fit       refit bank, PCA, references, foreground maps and threshold on top of a base bundle; the
            backbone and the residual Swin carry over (the Swin classifies residuals, not appearance)
  verify    false-reject rate on good frames, detection rate on defective ones, heatmap contact sheet
  list      versions in the edge bundle store, with current/previous marks (--fleet: every station of the
            site, what it serves and its rollout state, from the broker)
  activate  switch the store's current link to a validated version, then tell the service to reload
  rollback  switch back to the previous version, then tell the service to reload

Torch-free: runs on the edge box (ONNX Runtime).  Bad input is refused with "error: ..." and exit code 2;
the store's active bundle is never modified.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_runtime.core.bundle import BundleError
from edge_runtime.service.config import EdgeConfigError, load_edge_config

from .errors import CalibrationError
from .fleet import add_fleet_args

#: exit codes: 0 done (and confirmed where a service was told), 1 done but a check failed, 2 refused
EXIT_OK, EXIT_CHECK, EXIT_REFUSED = 0, 1, 2


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_capture(args: argparse.Namespace) -> int:
    from .capture import capture

    try:
        cfg = load_edge_config(args.config)
    except EdgeConfigError as exc:
        raise CalibrationError(str(exc)) from None
    report = capture(cfg.camera, args.count, Path(args.out), append=args.append, timeout_s=args.timeout,
                     quiet=args.json)
    if args.json:
        _print_json(report.to_json())
    else:
        print(f"captured {report.written} frames into {report.out} in {report.seconds:.1f} s "
              f"({report.duplicates} duplicates and {report.incomplete} incomplete buffers skipped); "
              f"log: {Path(report.out) / 'capture.json'}")
    return EXIT_OK


def cmd_fit(args: argparse.Namespace) -> int:
    from .fit import calibrate, describe

    if (args.store is None) != (args.product is None):
        raise CalibrationError("--store and --product go together")
    report = calibrate(Path(args.base), Path(args.images), Path(args.out) if args.out else None,
                       holdout=args.holdout, target_false_reject=args.target_false_reject, seed=args.seed,
                       quiet=args.json, mixed_sizes=args.mixed_sizes, version=args.version,
                       product=args.name or args.product, store=Path(args.store) if args.store else None,
                       overwrite=args.overwrite, sign_key=Path(args.sign_key) if args.sign_key else None)
    if args.json:
        _print_json(report.to_json())
    else:
        for line in describe(report):
            print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import describe, verify

    report = verify(Path(args.bundle), Path(args.good), Path(args.bad) if args.bad else None,
                    Path(args.out) if args.out else None, max_tiles=args.max_tiles, quiet=args.json)
    if args.json:
        _print_json(report.to_json())
    else:
        print("\n".join(describe(report)))
    if args.max_false_reject is not None and report.false_reject_rate > args.max_false_reject:
        print(f"error: false-reject rate {report.false_reject_rate:.2%} is above --max-false-reject "
              f"{args.max_false_reject:.2%}", file=sys.stderr)
        return EXIT_CHECK
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from .deploy import format_listing, list_versions, resolve_target

    if args.fleet:
        from .fleet import list_fleet

        view, lines = list_fleet(args)
        if args.json:
            _print_json(view)
        else:
            print("\n".join(lines))
        return EXIT_OK
    target = resolve_target(args.store, args.product, args.config, need_product=False)
    listing = list_versions(target, all_products=not target.product)
    if args.json:
        _print_json({p: [v.to_json() for v in infos] for p, infos in listing.items()})
    else:
        print("\n".join(format_listing(listing)) or f"{target.store.root}: no products")
    return EXIT_OK


def _switch(args: argparse.Namespace, version: str | None) -> int:
    from .deploy import resolve_target, switch, tell_service

    target = resolve_target(args.store, args.product, args.config)
    before, now = switch(target, version)
    outcome = tell_service(target, now, args.pid, args.timeout)
    action = "rolled back" if version is None else "activated"
    if args.json:
        _print_json({"product": target.product, "previous": before, "current": now, "action": action,
                     "service": outcome.to_json() if outcome else None})
    else:
        print(f"{action} {target.product}: current {before or 'unset'} -> {now}")
        if outcome is None:
            print("service not told (give --config or --pid to reload a running service)")
        elif outcome.confirmed:
            print(f"confirmed: {outcome.detail}")
        else:
            print(f"warning: not confirmed: {outcome.detail}; the switch stays done (a restarted service "
                  f"serves {now})", file=sys.stderr)
    return EXIT_OK


def cmd_activate(args: argparse.Namespace) -> int:
    return _switch(args, args.version)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _switch(args, None)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="bundle store folder (default: bundles.store of --config)")
    p.add_argument("--product", help="product name (default: bundles.product of --config)")
    p.add_argument("--config", help="edge.yaml of the running service: its store/product, and its broker to "
                                    "send the reload command to")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weakrest-calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("capture", help="grab good frames from the configured camera")
    p.add_argument("--config", required=True, help="edge.yaml (its camera section is used)")
    p.add_argument("--count", type=int, required=True, help="number of (distinct) frames to write")
    p.add_argument("--out", required=True, help="folder for the PNG frames and capture.json")
    p.add_argument("--append", action="store_true", help="add to a non-empty folder")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds without a new frame before giving up")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("fit", help="refit bank, PCA, references, foreground and threshold from good frames")
    p.add_argument("--base", required=True, help="base bundle (folder or .tar): its backbone and Swin are reused")
    p.add_argument("--images", required=True, help="folder of good frames")
    p.add_argument("--out", help="new bundle folder (must not exist unless --overwrite)")
    p.add_argument("--store", help="also add the new bundle to this store (not activated)")
    p.add_argument("--product", help="store product to add it under (also its manifest product)")
    p.add_argument("--name", help="product name in the new manifest (default: --product, else the base's)")
    p.add_argument("--version", help="bundle version (default: <date>-<time>-cal)")
    p.add_argument("--holdout", type=_fraction, default=0.2, help="fraction of frames held out for the threshold")
    p.add_argument("--target-false-reject", type=_fraction, default=None,
                   help="target false-reject rate on good frames (default: the base bundle's, 0.005)")
    p.add_argument("--mixed-sizes", action="store_true",
                   help="accept frames of different sizes (a dataset of crops, not one camera)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--sign-key", help="private key (weakrest-train keys new) to sign the new bundle with; a "
                   "service with bundles.require_signature refuses an unsigned one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("verify", help="false-reject / detection rates and a heatmap contact sheet")
    p.add_argument("--bundle", required=True)
    p.add_argument("--good", required=True, help="folder of good frames (searched recursively)")
    p.add_argument("--bad", help="folder of defective frames (searched recursively)")
    p.add_argument("--out", help="folder for contact_sheet.png, verify.json and report.html")
    p.add_argument("--max-tiles", type=int, default=48, help="frames on the contact sheet")
    p.add_argument("--max-false-reject", type=float, help="exit 1 when the false-reject rate is above this")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("list", help="versions in the bundle store (--fleet: the site's stations, from the broker)")
    _store_args(p)
    add_fleet_args(p)  # calibration/fleet.py
    p.set_defaults(func=cmd_list)

    for name, func, what in (("activate", cmd_activate, "make VERSION current"),
                             ("rollback", cmd_rollback, "go back to the previous version")):
        p = sub.add_parser(name, help=f"{what}, then tell the service to reload")
        if name == "activate":
            p.add_argument("version", help="a version in the store (see 'list')")
        _store_args(p)
        p.add_argument("--pid", type=int, help="send SIGHUP to this service process instead of the MQTT command")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the service to confirm")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CalibrationError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:  # anything not caught closer to the file (a full disk, a vanished folder)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
