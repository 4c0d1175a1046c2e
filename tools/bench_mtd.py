"""Figures on the real MTD data (``make bench-mtd``): the residual Swin against the distance baseline.

1. fit the fast profile (unsupervised Swin) on all of ``../shared/data/mtd/train/good``
2. fine-tune it with 10 real defective test images (supervised, the paper's protocol; seed 0)
3. ablations on MTD: no token masking/jitter, no position code (lambda_P = 0)
4. ablation on an object-like demo product: no foreground maps (trained and scored without them;
   1000 Swin steps, the product is small)
5. evaluate all on the same test images (the 10 supervised defects left out of every row): image AUROC,
   pixel AUROC, PRO, pixel AP, overall and per defect type; the NN-distance baseline is the unsupervised
   bundle scored by distance alone
6. ``weakrest-edge bench`` on the unsupervised bundle (stage p50/p99), and a distance-only bundle of 100
   images against the full one, to show matching cost bounded by K
The images are only read from ../shared/data; the subset is a folder of symbolic links in --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MTD = ROOT.parent / "shared" / "data" / "mtd"
KEYS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")


def _bench(bundle: Path, images: Path, frames: int) -> dict:
    """``weakrest-edge bench`` in a fresh process: after training, this process's torch thread pool and its
    peak memory would distort both the latency and the RSS figures."""
    cmd = [sys.executable, "-m", "edge_runtime.cli", "bench", "--bundle", str(bundle), "--images", str(images),
           "--frames", str(frames), "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _row(name: str, metrics: dict, fit: dict | None) -> dict:
    row = {"variant": name, **{k: metrics[k] for k in KEYS}, "n_images": metrics["n_images"],
           "n_defective": metrics["n_defective"],
           "per_defect": {t: {k: v[k] for k in KEYS} for t, v in metrics.get("per_defect", {}).items()},
           "at_threshold": metrics.get("at_threshold")}
    if fit is not None:
        row["fit_s"] = fit["seconds"].get("total")
        row["fit_seconds"] = fit["seconds"]
    return row


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_table(rows: list[dict]) -> None:
    """Markdown: one line per variant (overall), then per defect type."""
    print("\n| variant | image AUROC | pixel AUROC | PRO | pixel AP | fit s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fit = f"{r['fit_s']:.0f}" if r.get("fit_s") else "-"
        print(f"| {r['variant']} | " + " | ".join(_fmt(r[k]) for k in KEYS) + f" | {fit} |")
    types = sorted({t for r in rows for t in r["per_defect"]})
    if types:
        print("\nper defect type (image AUROC / pixel AUROC / PRO / pixel AP):\n")
        print("| variant | " + " | ".join(types) + " |")
        print("|---|" + "---|" * len(types))
        for r in rows:
            cells = [" / ".join(_fmt(r["per_defect"][t][k]) for k in KEYS) if t in r["per_defect"] else "-"
                     for t in types]
            print(f"| {r['variant']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(MTD))
    parser.add_argument("--config", default=str(ROOT / "configs" / "products" / "fast.yaml"))
    parser.add_argument("--out", default="runs/mtd")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--n-defects", type=int, default=10)
    parser.add_argument("--skip-ablations", action="store_true", help="only baseline, unsupervised, supervised")
    parser.add_argument("--object-steps", type=int, default=1000, help="Swin steps on the small object demo product")
    args = parser.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not (data / "train" / "good").is_dir():
        print(f"skipped: no MTD data at {data} (../shared/data is absent in a fresh clone)")
        return 0

    from edge_runtime.core.bundle import load_bundle
    from training_host.config import load_config
    from training_host.data.dataset import subset_dataset
    from training_host.data.demo_data import make_demo_dataset
    from training_host.evaluation.evaluate import evaluate_bundle
    from training_host.training.fit import TrainingOptions, fit_product

    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"fits": {}, "rows": [], "object_rows": []}

    def fit(name: str, root: Path, overrides: list[str], options: TrainingOptions | None = None,
            config: str = args.config) -> Path:
        cfg = load_config(config, ["product=mtd", *overrides])
        t0 = time.perf_counter()
        summary = fit_product(cfg, root, out / name, options=options)
        report["fits"][name] = {**summary.to_json(), "wall_s": round(time.perf_counter() - t0, 1)}
        return out / name

    unsup = fit("unsupervised", data, [])
    sup = fit("supervised", data, [], TrainingOptions(
        mode="supervised", supervised_from=data, n_defects=args.n_defects, defect_seed=0,
        init=out / "unsupervised.ckpt" / "unsupervised.safetensors"))
    # the supervised bundle's training defects are left out of every row, so all rows score the same images
    held = {d.sha256 for d in load_bundle(sup).manifest.training.defect_images}
    variants = [("NN distance (baseline)", unsup, {"anomaly_map": "nn_distance"}, None),
                ("unsupervised Swin", unsup, {}, "unsupervised"),
                ("supervised Swin (10 defects)", sup, {}, "supervised")]
    if not args.skip_ablations:
        nomask = fit("no_mask_jitter", data, ["swin.mask_ratio=0", "swin.jitter=0"])
        nopos = fit("no_position", data, ["posfar.lambda_p=0"])
        variants += [("unsupervised, no masking/jitter", nomask, {}, "no_mask_jitter"),
                     ("unsupervised, no position code", nopos, {}, "no_position")]
    for name, bundle, kw, fit_name in variants:
        metrics = evaluate_bundle(bundle, data, out / f"eval_{bundle.name}{'_nn' if kw else ''}", overlays=3,
                                  also_exclude=held, **kw)
        report["rows"].append(_row(name, metrics, report["fits"].get(fit_name) if fit_name else None))

    if not args.skip_ablations:
        obj = make_demo_dataset(out / "demo_object_data", product="object")
        for name, fg in (("object demo, foreground maps", True), ("object demo, no foreground", False)):
            key = "object_fg" if fg else "object_nofg"
            bundle = fit(key, obj, ["posfar.lambda_p=0.15", f"foreground.enabled={str(fg).lower()}",
                                    f"swin.steps={args.object_steps}"])
            metrics = evaluate_bundle(bundle, obj, out / f"eval_{key}", overlays=3)
            report["object_rows"].append(_row(name, metrics, report["fits"][key]))

    test_images = data / "test"
    report["bench_unsupervised"] = _bench(unsup, test_images, args.frames)
    subset = fit("subset100_nn", subset_dataset(data, out / "subset100_data", 100), ["swin.enabled=false"])
    full_nn = fit("all_nn", data, ["swin.enabled=false"])
    report["bench_all_nn"] = _bench(full_nn, test_images, args.frames)
    report["bench_subset100_nn"] = _bench(subset, test_images, args.frames)
    sa, ss = report["bench_all_nn"]["stages_ms"], report["bench_subset100_nn"]["stages_ms"]
    report["matching_ratio_all_over_100"] = sa["matching"]["p50"] / ss["matching"]["p50"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nMTD, fast profile; every row scored on the same {report['rows'][0]['n_images']} test images "
          f"({report['rows'][0]['n_defective']} defective; the {len(held)} supervised training defects left out)")
    print_table(report["rows"])
    if report["object_rows"]:
        print("\nobject demo product (foreground ablation):")
        print_table(report["object_rows"])
    for row in report["rows"]:
        if row["at_threshold"]:
            print(f"at threshold, {row['variant']}: {row['at_threshold']}")
    f = report["fits"]["unsupervised"]
    print(f"\nunsupervised fit: {f['wall_s']} s wall ({f['seconds']}); swin.onnx vs torch max abs diff "
          f"{f['swin']['onnx_max_abs_diff']:.2g}; bundle {f['bundle_bytes'] / 1e6:.1f} MB")
    b = report["bench_unsupervised"]
    stages = ", ".join(f"{k} {v['p50']:.2f}/{v['p99']:.2f}" for k, v in b["stages_ms"].items())
    print(f"bench unsupervised Swin bundle: p50/p99 ms {stages}; {b['fps']:.1f} fps; "
          f"total/backbone {b['total_over_backbone_p50']:.2f}; peak RSS {b['peak_rss_mb']:.0f} MB")
    print(f"matching p50 ratio (762 / 100 training images, distance-only bundles) = "
          f"{report['matching_ratio_all_over_100']:.2f}")
    print(f"report in {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
