"""``weakrest-calibrate``: adapt a bundle to a new product or a moved camera from good frames only.

``fit`` reuses the base bundle's backbone and residual Swin graphs (ONNX Runtime, no torch, no GPU) and
refits the coreset bank, the PCA, the reference index, the foreground maps (when the base has them) and
the image threshold from a folder of good images, writing a new bundle version whose manifest names its
parent.  The Swin carries over because it classifies residuals, not appearance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_runtime.core import bundle as B
from edge_runtime.core.fitting import BankBuilder, split_holdout
from edge_runtime.core.foreground import ForegroundBuilder
from edge_runtime.core.pipeline import Inspector
from edge_runtime.core.preprocess import ImageReadError, list_images, read_image
from edge_runtime.core.scoring import choose_threshold

MIN_IMAGES = 10


def _features(inspector: Inspector, paths: list[Path], desc: str, skipped: list[str], quiet: bool):
    for path in tqdm(paths, desc=desc, unit="img", disable=quiet):
        try:
            yield inspector.features(read_image(path))
        except ImageReadError as exc:
            skipped.append(str(exc))


def calibrate(
    base: Path, images: Path, out: Path, holdout: float, target_false_reject: float, seed: int = 0, quiet: bool = False
) -> dict:
    t0 = time.perf_counter()
    bundle = B.load_bundle(base)
    m = bundle.manifest
    inspector = Inspector(bundle)
    paths = list_images(images)
    if len(paths) < MIN_IMAGES:
        raise ValueError(f"{images}: {len(paths)} images, calibration needs at least {MIN_IMAGES} good frames")
    bank_paths, holdout_paths = split_holdout(paths, holdout, seed)
    skipped: list[str] = []
    foreground = ForegroundBuilder(tuple(m.backbone.grid), seed=seed) if m.foreground is not None else None
    builder = BankBuilder(m.posfar.coreset_ratio, seed=seed, foreground=foreground)
    for pcf, desc in _features(inspector, bank_paths, "bank frames", skipped, quiet):
        builder.add(pcf[None], desc[None])
    fitted = builder.build(m.posfar.d_l)
    fg = m.foreground
    scorer = fitted.scorer(m.posfar.k_references, tuple(m.backbone.grid), tuple(m.preprocessing.input_size),
                           m.posfar.retrieval_trim, m.scoring.blur_sigma, m.scoring.score_pool,
                           classifier=inspector.scorer.classifier, foreground_power=fg.power if fg else 0.0,
                           foreground_pool=fg.pool if fg else 3)
    scores = [
        scorer.score(p, d).score for p, d in _features(inspector, holdout_paths, "hold-out frames", skipped, quiet)
    ]
    choice = choose_threshold(np.array(scores), target_false_reject, m.thresholds.margin)
    manifest = m.model_copy(
        update={
            "bundle_version": time.strftime("%Y%m%d-%H%M%S") + "-cal",
            "created_at": B.now_iso(),
            "parent": f"{m.product}@{m.bundle_version}",
            "posfar": m.posfar.model_copy(
                update={"n_reference_images": builder.n_images, "n_bank": int(fitted.bank.shape[0])}
            ),
            "thresholds": B.Thresholds(
                image=choice.threshold,
                pixel=choice.threshold,
                n_holdout_images=choice.n_images,
                target_false_reject=target_false_reject,
                margin=m.thresholds.margin,
            ),
            "foreground": (fg.model_copy(update={"n_fit_images": min(foreground.fit_images, builder.n_images)})
                           if fg is not None else None),
            "files": {},
        }
    )
    files = {B.BACKBONE: bundle.backbone_path}
    if bundle.swin_path is not None:
        files[B.SWIN] = bundle.swin_path
    B.write_bundle(out, manifest, files, fitted.arrays())
    B.load_bundle(out)  # never hand out a bundle that does not verify
    return {
        "bundle": str(out),
        "parent": manifest.parent,
        "n_bank_images": builder.n_images,
        "n_holdout": choice.n_images,
        "threshold": choice.threshold,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def cmd_fit(args: argparse.Namespace) -> int:
    report = calibrate(
        Path(args.base),
        Path(args.images),
        Path(args.out),
        args.holdout,
        args.target_false_reject,
        args.seed,
        quiet=args.json,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"bundle {report['bundle']} (parent {report['parent']}): {report['n_bank_images']} bank frames, "
            f"threshold {report['threshold']:.4g} from {report['n_holdout']} held-out frames, "
            f"{report['seconds']:.1f} s"
        )
        for line in report["skipped"]:
            print(f"skipped: {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weakrest-calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="refit bank, PCA, references and threshold from good images")
    p.add_argument("--base", required=True, help="base bundle (folder or .tar)")
    p.add_argument("--images", required=True, help="folder of good frames")
    p.add_argument("--out", required=True, help="new bundle folder")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of frames held out for the threshold")
    p.add_argument("--target-false-reject", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (B.BundleError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
