"""Weak-label figures on the real MTD data (``make bench-weak``): the paper's protocol, one table per seed.

For each seed, 10 defective test images are drawn (``pick_defects``, that seed) and labelled several ways,
all derived from their masks (``weakrest-train labels from-masks``): pixel masks (the supervised mode, learned as
the config's ``swin.finetune_objective`` says), the same masks as block labels in weak mode, boxes, image tags, and on
request rotated boxes and boxes perturbed by +-3 / +-7 pixels.  Every
labelled row fine-tunes the same unsupervised model (``--init``) on the same bank (the config's own seed: the
seed picks the defects only) and is scored on the same test images as the unsupervised row, the seed's 10
labelled defects left out of all of them.  The last table
gives each row's mean over the seeds and its difference from the unsupervised row, seed by seed.

The unsupervised bundle is fitted once (``OUT/unsupervised``); with ``--init CKPT`` its Swin is taken from an
earlier fit's checkpoint (e.g. a sweep's ``fast/bundle.ckpt/unsupervised.safetensors``) instead of being
trained again.  ``--cache`` reuses a sweep's backbone features and residual fields.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mtd import KEYS, MTD, ROOT, _fmt, _row, print_table  # noqa: E402

KINDS = {  # row name -> (label kind for `labels from-masks`, jitter px); "masks" is the supervised mode
    "masks": ("masks", 0),
    "boxes": ("boxes", 0),
    "tags": ("tag", 0),
    "blocks": ("blocks", 0),
    "rotated boxes": ("rotated_boxes", 0),
    "boxes +-3 px": ("boxes", 3),
    "boxes +-7 px": ("boxes", 7),
}


def summary_table(report: dict, seeds: list[int], names: list[str]) -> list[str]:
    """Markdown lines: each row's mean over the seeds, and its pixel-AP / PRO gain over unsupervised per seed."""
    lines = ["| labels | seeds | image AUROC | pixel AUROC | PRO | pixel AP | AP gain per seed (pts) "
             "| PRO gain per seed (pts) |", "|---|---|---|---|---|---|---|---|"]
    for name in ["unsupervised", *names]:
        rows = {s: report["rows"].get(f"{name} seed{s}") for s in seeds}
        rows = {s: r for s, r in rows.items() if r}
        if not rows:
            continue
        means = [statistics.fmean(r[k] for r in rows.values() if r[k] is not None) for k in KEYS]
        gains = {}
        for key in ("pixel_ap", "pro"):
            gains[key] = ", ".join(
                f"{100 * (r[key] - report['rows'][f'unsupervised seed{s}'][key]):+.1f}"
                for s, r in rows.items() if f"unsupervised seed{s}" in report["rows"])
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(_fmt(m) for m in means)
                     + f" | {gains['pixel_ap'] if name != 'unsupervised' else '-'}"
                     + f" | {gains['pro'] if name != 'unsupervised' else '-'} |")
    return lines


def write_markdown(report: dict, path: Path) -> None:
    """Every row of the report, grouped by seed (overall, then pixel AP / PRO per defect type), and the
    summary over seeds of every row name found on more than one seed."""
    by_seed: dict[int, list[dict]] = {}
    for name, row in report["rows"].items():
        by_seed.setdefault(int(name.rsplit("seed", 1)[1]), []).append(row)
    seeds = sorted(by_seed)
    lines = ["| labels | seed | image AUROC | pixel AUROC | PRO | pixel AP | fit s | per type: pixel AP / PRO |",
             "|---|---|---|---|---|---|---|---|"]
    for seed in seeds:
        for r in by_seed[seed]:
            types = "; ".join(f"{t} {_fmt(d['pixel_ap'])} / {_fmt(d['pro'])}"
                              for t, d in sorted(r["per_defect"].items()))
            fit = f"{r['fit_s']:.0f}" if r.get("fit_s") else "-"
            lines.append(f"| {r['variant'].rsplit(' seed', 1)[0]} | {seed} | "
                         + " | ".join(_fmt(r[k]) for k in KEYS) + f" | {fit} | {types} |")
    names = sorted({n.rsplit(" seed", 1)[0] for n in report["rows"]} - {"unsupervised"})
    multi = [n for n in names if sum(f"{n} seed{s}" in report["rows"] for s in seeds) > 1]
    lines += ["", f"Over seeds {seeds} (mean; gains against the unsupervised row of the same seed):", ""]
    lines += summary_table(report, seeds, multi)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(MTD))
    parser.add_argument("--config", default=str(ROOT / "configs" / "products" / "fast.yaml"))
    parser.add_argument("--out", default="runs/weak")
    parser.add_argument("--init", default=None, metavar="CKPT",
                        help="unsupervised Swin checkpoint to start from, or with swin.members > 1 the "
                             "checkpoint folder of a fit with as many (default: train it in OUT)")
    parser.add_argument("--cache", default=None, metavar="DIR", help="fit cache folder (default OUT/cache)")
    parser.add_argument("--n-defects", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=["masks", "blocks", "boxes", "tags"], choices=list(KINDS),
                        help="label kinds to fit, each on every seed (blocks: the masks as block labels, "
                             "in weak mode)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="row names to (re)fit even when the report has them, e.g. boxes tags")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the labelled fits (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the labelled rows' names, to compare method variants")
    parser.add_argument("--table", default=None, metavar="FILE",
                        help="also write every row of the report (all variants, all seeds) as Markdown to FILE")
    args = parser.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not (data / "train" / "good").is_dir():
        print(f"skipped: no MTD data at {data} (../shared/data is absent in a fresh clone)")
        return 0

    from edge_runtime.core.bundle import load_bundle
    from training_host import cli as train_cli
    from training_host.config import load_config
    from training_host.evaluation.evaluate import evaluate_bundle
    from training_host.labels.weak_labels import load_labels
    from training_host.training.fit import TrainingOptions, fit_product
    from training_host.training.residual_data import pick_defects

    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "cache"
    report_path = out / "report.json"
    report: dict = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.setdefault("fits", {})
    report.setdefault("rows", {})

    def save() -> None:
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    def fit(name: str, options: TrainingOptions, overrides: list[str]) -> Path:
        cfg = load_config(args.config, ["product=mtd", *overrides])
        t0 = time.perf_counter()
        summary = fit_product(cfg, data, out / name, options=options, progress=False)
        report["fits"][name] = {**summary.to_json(), "wall_s": round(time.perf_counter() - t0, 1)}
        save()
        return out / name

    unsup = out / "unsupervised"
    init = Path(args.init) if args.init else out / "unsupervised.ckpt" / "unsupervised.safetensors"
    if not (unsup / "manifest.json").is_file():
        fit("unsupervised", TrainingOptions(cache_dir=cache, init=Path(args.init) if args.init else None), [])

    def score(row: str, bundle: Path, held: set[str], fit_name: str | None) -> None:
        metrics = evaluate_bundle(bundle, data, out / f"eval_{row.replace(' ', '_')}", overlays=0,
                                  also_exclude=held, progress=False)
        report["rows"][row] = {**_row(row, metrics, report["fits"].get(fit_name) if fit_name else None),
                               "supervision": load_bundle(bundle).manifest.training.supervision}
        save()

    names = [f"{k}{args.tag}" for k in args.kinds]
    for seed in args.seeds:
        held = {d.sha256 for d in pick_defects(data, args.n_defects, seed)}
        if f"unsupervised seed{seed}" not in report["rows"]:
            score(f"unsupervised seed{seed}", unsup, held, None)
        for kind_name, name in zip(args.kinds, names, strict=True):
            row = f"{name} seed{seed}"
            if row in report["rows"] and (args.only is None or name not in args.only):
                continue
            kind, jitter = KINDS[kind_name]
            key = row.replace(" ", "_").replace("+-", "pm")
            overrides = list(args.overrides)  # the fit's own seed stays the unsupervised bundle's: same bank
            if kind == "masks":
                options = TrainingOptions(mode="supervised", supervised_from=data, n_defects=args.n_defects,
                                          defect_seed=seed, init=init, cache_dir=cache)
            else:
                labels = out / f"{key}.labels.json"
                code = train_cli.main(["labels", "from-masks", "--data", str(data), "--kind", kind, "--n-defects",
                                       str(args.n_defects), "--seed", str(seed), "--jitter", str(jitter),
                                       "--out", str(labels)])
                if code:
                    return code
                options = TrainingOptions(mode="weak", labels=labels, init=init, cache_dir=cache)
            bundle = fit(key, options, overrides)
            trained = {d.sha256 for d in load_bundle(bundle).manifest.training.defect_images}
            if trained != held:
                raise RuntimeError(f"{row}: trained on other images than seed {seed}'s picked defects")
            score(row, bundle, held, key)
            if kind != "masks":
                report["rows"][row]["labels"] = load_labels(labels, root=data).counts()
            save()

    for seed in args.seeds:
        rows = [report["rows"][r] for r in [f"unsupervised seed{seed}", *(f"{n} seed{seed}" for n in names)]
                if r in report["rows"]]
        print(f"\nMTD, seed {seed}: the same {args.n_defects} defects labelled each way (left out of every row); "
              f"{rows[0]['n_images']} test images")
        print_table(rows)
    print(f"\nover seeds {args.seeds} (gains against the unsupervised row of the same seed):\n")
    print("\n".join(summary_table(report, args.seeds, names)))
    if args.table:
        write_markdown(report, Path(args.table))
        print(f"every row: {args.table}")
    print(f"\nmetrics {', '.join(KEYS)}; report in {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
