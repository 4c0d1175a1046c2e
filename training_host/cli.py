"""``weakrest-train``: fit a product bundle from good images, evaluate a bundle on a test split."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edge_runtime.core.bundle import BundleError
from edge_runtime.core.engines import ENGINE_NAMES
from edge_runtime.core.signing import new_key_pair, sign_bundle
from training_host.config import ConfigError, load_config
from training_host.errors import CheckpointError
from training_host.push import add_push_parser


def cmd_fit(args: argparse.Namespace) -> int:
    from training_host.training.fit import TrainingOptions

    overrides = list(args.set)
    if args.product:
        overrides.append(f"product={args.product}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(args.config, overrides)
    if args.mode == "supervised" and not args.supervised_from:
        raise ValueError("--mode supervised needs --supervised-from DATASET (defective test images with masks)")
    if args.mode == "weak" and not args.labels:
        raise ValueError("--mode weak needs --labels FILE (boxes, rotated boxes, tags or blocks)")
    options = TrainingOptions(
        mode=args.mode, supervised_from=Path(args.supervised_from) if args.supervised_from else None,
        n_defects=args.n_defects, defect_seed=args.defect_seed if args.defect_seed is not None else cfg.seed,
        checkpoint_dir=Path(args.checkpoints) if args.checkpoints else None, resume=args.resume,
        init=Path(args.init) if args.init else None,
        synthetic_preview=Path(args.synthetic_preview) if args.synthetic_preview else None,
        labels=Path(args.labels) if args.labels else None,
        labels_root=Path(args.labels_root) if args.labels_root else None,
        cache_dir=Path(args.cache) if args.cache else None,
    )
    if args.sign_key and not Path(args.sign_key).is_file():  # before hours of training, not after
        raise FileNotFoundError(f"--sign-key {args.sign_key}: no such private key (weakrest-train keys new)")
    summary = _fit_on_this_rank(cfg, args, options)
    if summary is None:  # a rank other than 0 under torchrun: its share is done, rank 0 writes the bundle
        return 0
    signed = sign_bundle(Path(args.out), Path(args.sign_key)) if args.sign_key else None
    if args.json:
        print(json.dumps({**summary.to_json(), "signature": str(signed) if signed else None}))
        return 0
    s = summary
    print(f"bundle {s.bundle}: {s.n_train} bank images, {s.n_holdout} held out, {s.n_bank} bank entries, "
          f"d_f {s.d_f} -> d_l {s.d_l}, threshold {s.threshold:.4g}, {s.bundle_bytes / 1e6:.1f} MB")
    t = s.threshold_estimate
    loo = t.get("n_leave_one_out", 0)
    rests = (f"{t['n_scores']} good scores ({t['n_scores'] - loo} held-out images + {loo} bank images left out "
             "of their own retrieval)" if loo else f"{t['n_scores']} held-out good images")
    print(f"threshold rests on {rests} ({t['n_above']} at or above it): false-reject "
          f"rate at most {t['frr_upper95']:.2%} with 95 % confidence (target {t['target_false_reject']:.2%}"
          + ("" if t["enough_frames"] else f", which needs at least {t['min_frames_for_target']} good scores")
          + ")")
    if loo:
        print(f"check: {t['holdout_above_threshold']} of the {t['n_holdout_images']} held-out images score at or "
              f"above it; (1 - target) quantile of the held-out scores {t['holdout_quantile']:.4g}, of the "
              f"leave-one-out scores {t['loo_quantile']:.4g}")
    print(f"time: {', '.join(f'{k} {v:.1f} s' for k, v in s.seconds.items())}; "
          f"backbone ONNX vs torch max abs diff {s.onnx_max_abs_diff:.2g}")
    if s.swin:
        fused = " fused with the nearest-normal distance" if s.anomaly_map == "fused" else ""
        print(f"anomaly map: residual Swin{fused} ({s.swin['supervision']}; {s.swin['good_fields']} good and "
              f"{s.swin['synthetic_fields']} synthetic fields, {s.swin['steps']} steps); swin.onnx vs torch max abs "
              f"diff {s.swin['onnx_max_abs_diff']:.2g}; foreground maps {'on' if s.foreground else 'off'}")
        for name in s.swin["defect_images"]:
            print(f"trained on defect: {name}")
    else:
        print("anomaly map: nearest-normal distance (swin.enabled is false)")
    for line in s.skipped:
        print(f"skipped: {line}")
    print(f"signed with {args.sign_key}: {signed}" if signed else
          "not signed (a service with bundles.require_signature refuses it): weakrest-train sign --bundle "
          f"{s.bundle} --key KEY")
    return 0


def _fit_on_this_rank(cfg, args: argparse.Namespace, options):
    """fit_product in this process, which under torchrun is one rank of the run (distributed.py): an error
    names the rank, and a collective that fails because another rank died says so."""
    from training_host.training.distributed import from_environment
    from training_host.training.fit import fit_product

    try:
        options.dist = dist = from_environment(args.dist_timeout)
    except RuntimeError as exc:  # torchrun's rendezvous reached, but this rank cannot join the process group
        raise DistributedRunError(f"rank {os.environ.get('RANK', '?')}: cannot join the other ranks ({exc})", 3) \
            from exc
    try:
        return fit_product(cfg, Path(args.data), Path(args.out), progress=not args.json, options=options)
    except (ConfigError, BundleError, CheckpointError, OSError, ValueError) as exc:
        if not dist.enabled:
            raise
        raise DistributedRunError(f"{dist.describe()}: {exc}", 2) from exc
    except RuntimeError as exc:  # gloo / NCCL: a peer closed its connection or a collective timed out
        if not dist.enabled:
            raise
        raise DistributedRunError(f"{dist.describe()}: an exchange with the other ranks failed, so one of them "
                                  f"stopped or hangs (torchrun's summary names the first that failed): {exc}",
                                  3) from exc
    finally:
        dist.close()


class DistributedRunError(RuntimeError):
    """A rank of a torchrun run failed (exit code 2: its own error; 3: another rank stopped answering)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def cmd_keys_new(args: argparse.Namespace) -> int:
    private, public = new_key_pair(Path(args.out), args.name)
    print(f"private key {private} (mode 0600: keep it off the line and out of bundles)")
    print(f"public key  {public} (copy it into the edge's bundles.trust_store)")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    signature = sign_bundle(Path(args.bundle), Path(args.key))
    print(f"{signature}: signed with {args.key}")
    return 0


def _fmt(v: float | None) -> str:
    return "  n/a " if v is None else f"{v:6.3f}"


def print_metrics(metrics: dict) -> None:
    keys = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")
    print(f"{'':<12}" + "".join(f"{k:>13}" for k in keys))
    print(f"{'overall':<12}" + "".join(f"{_fmt(metrics[k]):>13}" for k in keys))
    for name, row in metrics.get("per_defect", {}).items():
        print(f"{name:<12}" + "".join(f"{_fmt(row[k]):>13}" for k in keys))
    at = metrics.get("at_threshold")
    if at and at["false_reject_rate"] is not None and at["detection_rate"] is not None:
        print(f"bundle threshold {metrics['threshold']:.4g}: false rejects {at['false_reject_rate']:.2%} of "
              f"{at['n_good']} good (95 % upper bound {at['false_reject_upper95']:.2%}), detection "
              f"{at['detection_rate']:.2%} of {at['n_defective']} defective (95 % lower bound "
              f"{at['detection_lower95']:.2%})")
    for d in metrics.get("detection_at_frr") or []:
        shown = "" if d["resolved"] else f" (not resolved by {d['n_good']} good images)"
        print(f"at a false-reject rate of {d['false_reject_rate']:.1%}{shown}: detection {d['detection_rate']:.2%}"
              f" ({d['detected']}/{d['n_defective']})")


def cmd_eval(args: argparse.Namespace) -> int:
    from training_host.evaluation.evaluate import evaluate_bundle

    metrics = evaluate_bundle(Path(args.bundle), Path(args.data), Path(args.out), overlays=args.overlays,
                              progress=not args.json, anomaly_map=args.anomaly_map,
                              use_foreground=not args.no_foreground, fusion_rule=args.fusion_rule,
                              swin_share=args.swin_share, swin_excess=args.swin_excess,
                              distance_excess=args.distance_excess,
                              image_score=args.image_score, logical_verdict=args.verdict, engine=args.engine,
                              refine=not args.no_refine, frame_shift=args.frame_shift)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print_metrics(metrics)
    for line in metrics["errors"]:
        print(f"skipped: {line}")
    print(f"metrics in {Path(args.out) / 'metrics.json'}, curves in {Path(args.out) / 'curves.png'}, "
          f"one-page report in {Path(args.out) / 'report.html'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Add gated int8 graphs to a bundle (``training_host.models.quantize``); exit 0 whether or not any passed."""
    from training_host.models.quantize import QuantizeError, quantize_bundle

    try:
        report = quantize_bundle(Path(args.bundle), Path(args.data), Path(args.out) if args.out else None,
                                 n_calibration=args.calibration_images, graphs=tuple(args.graphs.split(",")),
                                 gate_openvino=not args.no_openvino)
    except (QuantizeError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"bundle": str(report.bundle), "int8_graphs": report.int8_graphs,
                          "calibration_images": report.calibration_images,
                          "gates": [g.model_dump() for g in report.gates]}))
    else:
        print("\n".join(report.lines()))
    return 0


def cmd_labels_stats(args: argparse.Namespace) -> int:
    from training_host.labels.weak_labels import load_labels

    labels = load_labels(Path(args.file), root=Path(args.root) if args.root else None)
    counts = labels.counts()
    if args.json:
        print(json.dumps({"counts": counts, "warnings": labels.warnings}))
        return 0
    print(f"{args.file}: {counts['total']} labelled images")
    for kind, n in counts.items():
        if kind != "total":
            print(f"  {kind:<14}{n:>6}")
    for warning in labels.warnings:
        print(f"warning: {warning}")
    return 0


def cmd_labels_from_masks(args: argparse.Namespace) -> int:
    """Weak labels derived from pixel masks, for benchmarks that follow the paper's protocol."""
    import cv2
    import numpy as np

    from training_host.data.synthetic import block_labels
    from training_host.labels.weak_labels import LabelSet, WeakLabel, weak_from_mask
    from training_host.training.residual_data import pick_defects

    rng = np.random.default_rng(args.seed)
    images = {}
    for d in pick_defects(Path(args.data), args.n_defects, args.seed):
        mask = cv2.imread(str(d.sample.mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ValueError(f"{d.sample.mask_path}: not a readable mask")
        if args.kind == "blocks":
            gh, gw = args.grid
            frac = cv2.resize((mask > 127).astype(np.float32), (gw * 8, gh * 8), interpolation=cv2.INTER_AREA)
            images[d.name] = WeakLabel(blocks=block_labels(frac, (gh, gw)))
        else:
            images[d.name] = weak_from_mask(mask > 127, args.kind, rng=rng, jitter_px=args.jitter)
    LabelSet(images=images, warnings=[]).save(Path(args.out))
    jitter = f" (box edges moved by up to {args.jitter:g} px)" if args.jitter else ""
    print(f"{args.out}: {len(images)} images labelled as {args.kind}{jitter}")
    return 0


def cmd_labels_annotate(args: argparse.Namespace) -> int:
    """Serve the annotation page until Ctrl+C (training_host/labels/annotate.py)."""
    from training_host.labels.annotate import serve

    serve(args.images, args.out, root=args.root, bundle=args.bundle, host=args.host, port=args.port,
          open_browser=not args.no_browser)
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
    p.add_argument("--mode", choices=["unsupervised", "supervised", "weak"], default="unsupervised",
                   help="unsupervised: good images + synthetic anomalies; supervised: also real defects with masks; "
                        "weak: also defects with boxes / rotated boxes / tags (ResMixMatch)")
    p.add_argument("--labels", default=None, metavar="FILE", help="weak mode: label file (see README)")
    p.add_argument("--labels-root", default=None, metavar="DIR",
                   help="folder the label file's image paths are relative to (default: --data)")
    p.add_argument("--supervised-from", default=None, metavar="DATASET",
                   help="dataset whose test split provides the real defective images (supervised mode)")
    p.add_argument("--n-defects", type=int, default=10, help="defective images taken for supervision")
    p.add_argument("--defect-seed", type=int, default=None, help="seed of the defect draw (default: config seed)")
    p.add_argument("--checkpoints", default=None, help="checkpoint folder (default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints of an interrupted run")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="reuse backbone features and residual fields of earlier fits with the same images and "
                        "settings (experiments; keyed by every setting that produced them)")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from a checkpoint's EMA weights (e.g. OUT.ckpt/unsupervised.safetensors) "
                        "instead of training the unsupervised phase; with swin.members > 1, the earlier fit's "
                        "checkpoint folder OUT.ckpt (each member from its own)")
    p.add_argument("--synthetic-preview", default=None, metavar="PNG",
                   help="write a picture grid of synthetic anomalies")
    p.add_argument("--sign-key", default=None, metavar="KEY",
                   help="sign the bundle with this private key (weakrest-train keys new)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON, no progress bars")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: the longest a rank waits for the others in one exchange before it gives "
                        "up with an error (default 1800)")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("eval", help="evaluate a bundle on DATA/test; writes OUT/metrics.json, curves.png and "
                                    "report.html (one self-contained page)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overlays", type=int, default=4, help="heatmap overlays to save per defect type")
    p.add_argument("--anomaly-map", choices=["swin", "nn_distance", "fused"], default=None,
                   help="score by this map instead of the bundle's (nn_distance: the distance baseline; fused: the "
                        "Swin and the distance, with the scales stored at fit)")
    p.add_argument("--fusion-rule", choices=["mean", "geometric", "max"], default=None,
                   help="with a fused map: this rule instead of the bundle's")
    p.add_argument("--swin-share", type=float, default=None, metavar="W",
                   help="with a fused map: the Swin's share W in (0, 1) instead of the bundle's "
                        "scoring.fusion_swin_weight (the bundle's threshold then belongs to other scores)")
    p.add_argument("--swin-excess", type=float, default=None, metavar="A",
                   help="with a fused map: the weight A >= 0 of the Swin's excess over its normal extreme instead of "
                        "the bundle's scoring.fusion_swin_excess (likewise)")
    p.add_argument("--distance-excess", type=float, default=None, metavar="B",
                   help="with a fused map: the weight B >= 0 of the distance's excess over its normal extreme "
                        "instead of the bundle's scoring.fusion_distance_excess (likewise)")
    p.add_argument("--image-score", choices=["map", "distance", "standardised", "reference_standardised"],
                   default=None, help="take the image score from the heatmap, the distance map, or the distance map "
                                      "standardised per position (against all reference images, or the K retrieved) "
                                      "instead of the bundle's way")
    p.add_argument("--no-foreground", action="store_true", help="ignore the bundle's foreground maps (ablation)")
    p.add_argument("--no-refine", action="store_true",
                   help="leave out the bundle's heatmap refinement by the frame, scoring.refine (ablation)")
    p.add_argument("--frame-shift", type=int, default=None, metavar="PX",
                   help="average the heatmap and the score over the frame shifted by PX pixels down, right and both "
                        "instead of the bundle's scoring.frame_shift (0: the frame's own; ablation, or to measure a "
                        "bundle fitted without it; the bundle's threshold then belongs to other scores: none is "
                        "reported)")
    p.add_argument("--verdict", choices=["fused", "structural", "logical"], default="fused",
                   help="with a logical score in the bundle: its fused verdict (default), or the structural or the "
                        "logical score alone (ablation)")
    p.add_argument("--engine", choices=ENGINE_NAMES, default="cpu",
                   help="inference engine as on the edge (default cpu: ONNX Runtime fp32, the reference path)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="add int8 graphs to a bundle, each kept only if it passes the accuracy gate "
                                        "against fp32 on DATA/test (and gate the OpenVINO engines)")
    p.add_argument("bundle", help="bundle folder (rewritten in place unless --out)")
    p.add_argument("--data", required=True, help="MVTec-layout folder: train/good calibrates, test/ gates")
    p.add_argument("--out", default=None, help="write the quantised bundle here instead")
    p.add_argument("--calibration-images", type=int, default=64, help="good images to calibrate on")
    p.add_argument("--graphs", default="swin,backbone", help="which graphs to try, in order (swin,backbone)")
    p.add_argument("--no-openvino", action="store_true", help="do not gate the OpenVINO engines")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)
    keys = sub.add_parser("keys", help="signing keys for bundles")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    q = ksub.add_parser("new", help="make an ECDSA P-256 key pair: NAME.key (0600) and NAME.pub")
    q.add_argument("--out", required=True, help="folder for the two files (never a bundle folder)")
    q.add_argument("--name", required=True, help="key name, e.g. line3-2026 (rotation: a new name per key)")
    q.set_defaults(func=cmd_keys_new)
    p = sub.add_parser("sign", help="sign a bundle folder (writes BUNDLE/bundle.sig, a Sigstore bundle)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--key", required=True, help="private key from 'keys new'")
    p.set_defaults(func=cmd_sign)
    labels = sub.add_parser("labels", help="weak label files: statistics, derivation from masks, annotation page")
    lsub = labels.add_subparsers(dest="labels_command", required=True)
    q = lsub.add_parser("stats", help="how many images carry each kind of label (validates the file)")
    q.add_argument("file")
    q.add_argument("--root", default=None, help="dataset folder: also check that every image exists")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_labels_stats)
    q = lsub.add_parser("from-masks", help="derive boxes, rotated boxes, tags or blocks from pixel masks")
    q.add_argument("--data", required=True, help="dataset whose test split has the defects and masks")
    q.add_argument("--kind", choices=["boxes", "rotated_boxes", "tag", "blocks"], required=True)
    q.add_argument("--n-defects", type=int, default=10)
    q.add_argument("--seed", type=int, default=0, help="the same seed picks the same images as fit --mode supervised")
    q.add_argument("--jitter", type=float, default=0.0, help="move box edges by up to this many pixels")
    q.add_argument("--grid", type=int, nargs=2, default=[32, 32], help="block grid for --kind blocks")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_labels_from_masks)
    q = lsub.add_parser("annotate", help="a local page to draw boxes / rotated boxes and tag images bad (saves the "
                                         "label file fit --labels reads)")
    q.add_argument("images", nargs="+", metavar="IMAGES", help="image folders (recursive) or image files")
    q.add_argument("--out", required=True, help="label file to write (an existing one is opened and kept)")
    q.add_argument("--root", default=None, help="folder the label keys are relative to (default: the dataset "
                                                "root above IMAGES, i.e. the folder with train/good or test)")
    q.add_argument("--bundle", default=None, help="show this bundle's heatmap as a hint (key h)")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    q.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    q.add_argument("--no-browser", action="store_true", help="only print the URL")
    q.set_defaults(func=cmd_labels_annotate)
    add_push_parser(sub)  # push: training_host/push.py
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, BundleError, CheckpointError, OSError, ValueError) as exc:  # LabelError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DistributedRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
