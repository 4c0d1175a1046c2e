"""``weakrest-train``: fit a product bundle from good images, evaluate a bundle on a test split."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_runtime.core.bundle import BundleError

from .config import ConfigError, load_config
from .train_swin import CheckpointError


def cmd_fit(args: argparse.Namespace) -> int:
    from .fit import TrainingOptions, fit_product

    overrides = list(args.set)
    if args.product:
        overrides.append(f"product={args.product}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(args.config, overrides)
    if args.mode == "supervised" and not args.supervised_from:
        raise ValueError("--mode supervised needs --supervised-from DATASET (defective test images with masks)")
    options = TrainingOptions(
        mode=args.mode, supervised_from=Path(args.supervised_from) if args.supervised_from else None,
        n_defects=args.n_defects, defect_seed=args.defect_seed if args.defect_seed is not None else cfg.seed,
        checkpoint_dir=Path(args.checkpoints) if args.checkpoints else None, resume=args.resume,
        init=Path(args.init) if args.init else None,
        synthetic_preview=Path(args.synthetic_preview) if args.synthetic_preview else None,
    )
    summary = fit_product(cfg, Path(args.data), Path(args.out), progress=not args.json, options=options)
    if args.json:
        print(json.dumps(summary.to_json()))
        return 0
    s = summary
    print(f"bundle {s.bundle}: {s.n_train} bank images, {s.n_holdout} held out, {s.n_bank} bank entries, "
          f"d_f {s.d_f} -> d_l {s.d_l}, threshold {s.threshold:.4g}, {s.bundle_bytes / 1e6:.1f} MB")
    print(f"time: {', '.join(f'{k} {v:.1f} s' for k, v in s.seconds.items())}; "
          f"backbone ONNX vs torch max abs diff {s.onnx_max_abs_diff:.2g}")
    if s.swin:
        print(f"anomaly map: residual Swin ({s.swin['supervision']}; {s.swin['good_fields']} good and "
              f"{s.swin['synthetic_fields']} synthetic fields, {s.swin['steps']} steps); swin.onnx vs torch max abs "
              f"diff {s.swin['onnx_max_abs_diff']:.2g}; foreground maps {'on' if s.foreground else 'off'}")
        for name in s.swin["defect_images"]:
            print(f"trained on defect: {name}")
    else:
        print("anomaly map: nearest-normal distance (swin.enabled is false)")
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
                              progress=not args.json, anomaly_map=args.anomaly_map,
                              use_foreground=not args.no_foreground)
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set swin.steps=300 (repeatable)")
    p.add_argument("--mode", choices=["unsupervised", "supervised"], default="unsupervised",
                   help="unsupervised: good images + synthetic anomalies; supervised: also real defects with masks")
    p.add_argument("--supervised-from", default=None, metavar="DATASET",
                   help="dataset whose test split provides the real defective images (supervised mode)")
    p.add_argument("--n-defects", type=int, default=10, help="defective images taken for supervision")
    p.add_argument("--defect-seed", type=int, default=None, help="seed of the defect draw (default: config seed)")
    p.add_argument("--checkpoints", default=None, help="checkpoint folder (default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints of an interrupted run")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from a checkpoint's EMA weights (e.g. OUT.ckpt/unsupervised.safetensors) "
                        "instead of training the unsupervised phase")
    p.add_argument("--synthetic-preview", default=None, metavar="PNG",
                   help="write a picture grid of synthetic anomalies")
    p.add_argument("--json", action="store_true", help="print the summary as JSON, no progress bars")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("eval", help="evaluate a bundle on DATA/test; writes OUT/metrics.json and curves.png")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overlays", type=int, default=4, help="heatmap overlays to save per defect type")
    p.add_argument("--anomaly-map", choices=["swin", "nn_distance"], default=None,
                   help="score by this map instead of the bundle's (nn_distance: the distance baseline)")
    p.add_argument("--no-foreground", action="store_true", help="ignore the bundle's foreground maps (ablation)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, BundleError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
