"""Weak-label figures on the real MTD data (``make bench-weak``): the paper's protocol, one table.

The same 10 defective test images (seed 0, as ``make bench-mtd``'s supervised row) are labelled five ways:
pixel masks (the supervised mode), block labels, rotated boxes, boxes and image tags, all derived from
the masks (``weakrest-train labels from-masks``), plus boxes perturbed by +-3 and +-7 pixels.  Each
variant fine-tunes the same unsupervised model (``--init``) and is scored on the same test images, the 10
labelled ones left out of every row.

The unsupervised and supervised bundles of ``make bench-mtd`` (``--base runs/mtd``) are reused when they
are there; otherwise they are fitted first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mtd import KEYS, MTD, ROOT, _row, print_table  # noqa: E402

VARIANTS = (  # (row name, label kind, jitter px)
    ("blocks", "blocks", 0),
    ("rotated boxes", "rotated_boxes", 0),
    ("boxes", "boxes", 0),
    ("image tags", "tag", 0),
    ("boxes +-3 px", "boxes", 3),
    ("boxes +-7 px", "boxes", 7),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(MTD))
    parser.add_argument("--config", default=str(ROOT / "configs" / "products" / "fast.yaml"))
    parser.add_argument("--base", default="runs/mtd", help="where make bench-mtd left its bundles")
    parser.add_argument("--out", default="runs/weak")
    parser.add_argument("--n-defects", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="row names to (re)run, e.g. boxes 'image tags'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the weak fits (repeatable)")
    args = parser.parse_args(argv)
    data, base, out = Path(args.data), Path(args.base), Path(args.out)
    if not (data / "train" / "good").is_dir():
        print(f"skipped: no MTD data at {data} (../shared/data is absent in a fresh clone)")
        return 0

    from edge_runtime.core.bundle import load_bundle
    from training_host import cli as train_cli
    from training_host.config import load_config
    from training_host.evaluation.evaluate import evaluate_bundle
    from training_host.labels.weak_labels import load_labels
    from training_host.training.fit import TrainingOptions, fit_product

    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report: dict = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.setdefault("fits", {})
    report.setdefault("rows", {})

    def fit(name: str, options: TrainingOptions, overrides: list[str], where: Path) -> Path:
        cfg = load_config(args.config, ["product=mtd", *overrides])
        t0 = time.perf_counter()
        summary = fit_product(cfg, data, where / name, options=options)
        report["fits"][name] = {**summary.to_json(), "wall_s": round(time.perf_counter() - t0, 1)}
        return where / name

    init = base / "unsupervised.ckpt" / "unsupervised.safetensors"
    unsup, sup = base / "unsupervised", base / "supervised"
    if not (init.is_file() and (unsup / "manifest.json").is_file()):
        unsup = fit("unsupervised", TrainingOptions(), [], base)
    if not (sup / "manifest.json").is_file():
        sup = fit("supervised", TrainingOptions(mode="supervised", supervised_from=data, n_defects=args.n_defects,
                                                defect_seed=0, init=init), [], base)
    held = {d.sha256 for d in load_bundle(sup).manifest.training.defect_images}

    def score(name: str, bundle: Path, fit_name: str | None) -> None:
        metrics = evaluate_bundle(bundle, data, out / f"eval_{bundle.name}", overlays=3, also_exclude=held)
        row = _row(name, metrics, report["fits"].get(fit_name) if fit_name else None)
        row["supervision"] = load_bundle(bundle).manifest.training.supervision
        report["rows"][name] = row
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    for name, bundle in (("unsupervised", unsup), ("pixel masks (supervised)", sup)):
        if name not in report["rows"] or (args.only is not None and name in args.only):
            score(name, bundle, None)
    for name, kind, jitter in VARIANTS:
        if args.only is not None and name not in args.only:
            continue
        key = f"{kind}_j{jitter}"
        labels = out / f"{key}.labels.json"
        code = train_cli.main(["labels", "from-masks", "--data", str(data), "--kind", kind, "--n-defects",
                               str(args.n_defects), "--seed", "0", "--jitter", str(jitter), "--out", str(labels)])
        if code:
            return code
        counts = load_labels(labels, root=data).counts()
        bundle = fit(key, TrainingOptions(mode="weak", labels=labels, init=init), args.overrides, out)
        score(name, bundle, key)
        report["rows"][name]["labels"] = counts
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    order = ["unsupervised", "pixel masks (supervised)", *(v[0] for v in VARIANTS)]
    rows = [report["rows"][n] for n in order if n in report["rows"]]
    print(f"\nMTD, fast profile, the same {args.n_defects} defects labelled each way (left out of every row); "
          f"{rows[0]['n_images']} test images")
    print_table(rows)
    ref = report["rows"].get("pixel masks (supervised)")
    if ref:
        print("\npixel AP against pixel-mask supervision: " + ", ".join(
            f"{r['variant']} {100 * (r['pixel_ap'] - ref['pixel_ap']):+.1f} pts" for r in rows))
    print(f"metrics {', '.join(KEYS)}; report in {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
