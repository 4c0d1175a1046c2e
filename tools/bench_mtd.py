"""Figures on the real MTD data (``make bench-mtd``): fit time, bundle size, metrics, latency, K-bound.

1. fit the fast profile on all of ``../shared/data/mtd/train/good`` and on a 100-image subset
2. evaluate the full bundle (four metrics, overall and per defect type)
3. ``weakrest-edge bench`` both bundles on the same test images: stage p50/p99, and the ratios
   matching(762) / matching(100) (bounded by K) and total / backbone
The images are only read from ../shared/data; the subset is a folder of symbolic links in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MTD = ROOT.parent / "shared" / "data" / "mtd"


def _subset(src: Path, dst: Path, n: int) -> Path:
    """A dataset of n evenly spaced training images of src, as symbolic links (nothing is copied)."""
    from edge_runtime.core.preprocess import list_images

    good = dst / "train" / "good"
    good.mkdir(parents=True, exist_ok=True)
    images = list_images(src / "train" / "good")
    for p in images[:: max(1, len(images) // n)][:n]:
        link = good / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    return dst


def _bench(bundle: Path, images: Path, frames: int) -> dict:
    from edge_runtime import cli as edge_cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        edge_cli.main(["bench", "--bundle", str(bundle), "--images", str(images), "--frames", str(frames), "--json"])
    return json.loads(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(MTD))
    parser.add_argument("--config", default=str(ROOT / "configs" / "products" / "fast.yaml"))
    parser.add_argument("--out", default="runs/mtd")
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not (data / "train" / "good").is_dir():
        print(f"skipped: no MTD data at {data} (../shared/data is absent in a fresh clone)")
        return 0

    from training_host.cli import print_metrics
    from training_host.config import load_config
    from training_host.evaluate import evaluate_bundle
    from training_host.fit import fit_product

    cfg = load_config(args.config).model_copy(update={"product": "mtd"})
    report: dict = {}
    for name, root in (("all", data), ("subset100", _subset(data, out / "subset100_data", 100))):
        t0 = time.perf_counter()
        summary = fit_product(cfg, root, out / f"bundle_{name}")
        report[f"fit_{name}"] = {**summary.to_json(), "wall_s": round(time.perf_counter() - t0, 1)}
    metrics = evaluate_bundle(out / "bundle_all", data, out / "eval_all", overlays=3)
    report["metrics"] = {
        k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "per_defect", "at_threshold")
    }
    test_images = data / "test"
    report["bench_all"] = _bench(out / "bundle_all", test_images, args.frames)
    report["bench_subset100"] = _bench(out / "bundle_subset100", test_images, args.frames)
    sa, ss = report["bench_all"]["stages_ms"], report["bench_subset100"]["stages_ms"]
    report["matching_ratio_all_over_100"] = sa["matching"]["p50"] / ss["matching"]["p50"]
    report["retrieval_ratio_all_over_100"] = sa["retrieval"]["p50"] / ss["retrieval"]["p50"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    fit = report["fit_all"]
    print(
        f"\nfit on {fit['n_train']} + {fit['n_holdout']} held-out images: {fit['wall_s']} s wall "
        f"({fit['seconds']}), bundle {fit['bundle_bytes'] / 1e6:.1f} MB, {fit['n_bank']} bank entries"
    )
    print_metrics(report["metrics"])
    print(f"at threshold: {report['metrics']['at_threshold']}")
    for name in ("all", "subset100"):
        b = report[f"bench_{name}"]
        stages = ", ".join(f"{k} {v['p50']:.2f}/{v['p99']:.2f}" for k, v in b["stages_ms"].items())
        print(
            f"bench {name} ({b['n_reference_images']} refs, {b['n_bank']} bank): p50/p99 ms {stages}; "
            f"{b['fps']:.1f} fps; total/backbone {b['total_over_backbone_p50']:.2f}; peak RSS {b['peak_rss_mb']:.0f} MB"
        )
    print(
        f"matching p50 ratio (all / 100 images) = {report['matching_ratio_all_over_100']:.2f}; "
        f"retrieval ratio = {report['retrieval_ratio_all_over_100']:.2f}"
    )
    print(f"report in {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
