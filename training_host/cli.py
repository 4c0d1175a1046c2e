"""``weakrest-train``: fit a product bundle from good images, evaluate a bundle on a test split."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_runtime.core.bundle import BundleError

from .config import ConfigError, load_config


def cmd_fit(args: argparse.Namespace) -> int:
    from .fit import fit_product

    cfg = load_config(args.config)
    if args.product:
        cfg = cfg.model_copy(update={"product": args.product})
    if args.seed is not None:
        cfg = cfg.model_copy(update={"seed": args.seed})
    summary = fit_product(cfg, Path(args.data), Path(args.out), progress=not args.json)
    if args.json:
        print(json.dumps(summary.to_json()))
        return 0
    s = summary
    print(f"bundle {s.bundle}: {s.n_train} bank images, {s.n_holdout} held out, {s.n_bank} bank entries, "
          f"d_f {s.d_f} -> d_l {s.d_l}, threshold {s.threshold:.4g}, {s.bundle_bytes / 1e6:.1f} MB")
    print(f"time: {', '.join(f'{k} {v:.1f} s' for k, v in s.seconds.items())}; "
          f"ONNX vs torch max abs diff {s.onnx_max_abs_diff:.2g}")
    for line in s.skipped:
        print(f"skipped: {line}")
    return 0


def _fmt(v: float | None) -> str:
    return "  n/a " if v is None else f"{v:6.3f}"


def print_metrics(metrics: dict) -> None:
    keys = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")
    print(f"{'':<12}" + "".join(f"{k:>13}" for k in keys))
    print(f"{'overall':<12}" + "".join(f"{_fmt(metrics[k]):>13}" for k in keys))
    for name, row in metrics.get("per_defect", {}).items():
        print(f"{name:<12}" + "".join(f"{_fmt(row[k]):>13}" for k in keys))


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_bundle

    metrics = evaluate_bundle(Path(args.bundle), Path(args.data), Path(args.out), overlays=args.overlays,
                              progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print_metrics(metrics)
    for line in metrics["errors"]:
        print(f"skipped: {line}")
    print(f"metrics in {Path(args.out) / 'metrics.json'}, curves in {Path(args.out) / 'curves.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weakrest-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="fit a bundle from DATA/train/good")
    p.add_argument("--config", default=None, help="product YAML (default: built-in fast profile)")
    p.add_argument("--data", required=True, help="MVTec-layout dataset folder")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--product", default=None, help="override the product name")
    p.add_argument("--seed", type=int, default=None, help="override the seed")
    p.add_argument("--json", action="store_true", help="print the summary as JSON, no progress bars")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("eval", help="evaluate a bundle on DATA/test; writes OUT/metrics.json and curves.png")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overlays", type=int, default=4, help="heatmap overlays to save per defect type")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, BundleError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
