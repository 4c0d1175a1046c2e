"""Sweep config overrides on one dataset and write one table: accuracy, fit time and frame time per variant.

    .venv/bin/python tools/sweep.py --grid docs/sweeps/levers.yaml --out runs/sweep
    .venv/bin/python tools/sweep.py --variant steps6000=swin.steps=6000 --variant d64=swin.embed_dim=64

A grid file (YAML)::

    config: configs/products/fast.yaml     # base profile (default: the fast profile)
    data: ../shared/data/mtd               # dataset (default: MTD beside the repository)
    maps: [nn_distance, fused:geometric]   # optional: more maps evaluated from each variant's bundle
    variants:                              # name -> list of KEY=VALUE overrides
      baseline: []
      steps6000: [swin.steps=6000]
    axes:                                  # optional: every combination, named key=value,...
      swin.embed_dim: [32, 64]
      swin.depth: [2, 4]

Each variant is fitted with the fit cache (``--cache``, default ``OUT/cache``: backbone features and residual
fields are computed once for all variants that share them), evaluated on the test split (image AUROC, pixel
AUROC, PRO, pixel AP overall and per defect type, detection at FRR 0.5 / 1 / 2 %), and benchmarked with
``weakrest-edge bench`` in a fresh process (frame and backbone p50).  Each map named in ``maps`` (or
``--maps``) is one more row per variant with a Swin (``nn_distance``: the distance alone; ``swin``;
``fused:RULE``: the two fused, with the scales stored at fit; ``...@distance``: with the image score taken from
the distance map; ``...@standardised`` or ``...@reference_standardised``: from the distance map standardised per
position; ``.../shiftN``: each frame also scored shifted by N px, heatmap and score averaged,
``scoring.frame_shift``, and ``/shiftN`` alone: the bundle's own map so); without ``maps``, the first variant's
distance is one more row.  Results go to ``OUT/<variant>/result.json`` (a variant whose result exists with the
same overrides is not fitted again; maps it lacks are evaluated from its bundle) and to ``OUT/table.csv`` and
``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MTD = ROOT.parent / "shared" / "data" / "mtd"
FAST = ROOT / "configs" / "products" / "fast.yaml"
KEYS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")


def load_grid(path: Path | None, extra: list[str]) -> tuple[dict, dict[str, list[str]]]:
    """The grid file's settings and its variants (named lists of overrides), plus ``--variant`` ones."""
    grid: dict = {}
    if path is not None:
        grid = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(grid, dict):
            raise SystemExit(f"{path}: expected a mapping with 'variants' and/or 'axes'")
    variants: dict[str, list[str]] = {}
    for name, overrides in (grid.get("variants") or {}).items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise SystemExit(f"{path}: variants.{name} must be a list of KEY=VALUE strings")
        variants[str(name)] = list(overrides)
    axes = grid.get("axes") or {}
    if axes:
        keys = list(axes)
        for values in itertools.product(*(axes[k] for k in keys)):
            overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in zip(keys, values,
                                                                                             strict=True)]
            variants[",".join(overrides)] = overrides
    for spec in extra:
        name, sep, rest = spec.partition("=")
        if not name or not sep:
            raise SystemExit(f"--variant {spec!r}: expected NAME=KEY=VALUE[,KEY=VALUE...] (NAME= for the base profile)")
        variants[name] = rest.split(",") if rest else []
    if not variants:
        raise SystemExit("nothing to run: give --grid with variants/axes, or --variant")
    return grid, variants


def bench(bundle: Path, images: Path, frames: int) -> dict | None:
    """``weakrest-edge bench`` in a fresh process (the fit's torch threads would distort it)."""
    if frames <= 0:
        return None
    cmd = [sys.executable, "-m", "edge_runtime.cli", "bench", "--bundle", str(bundle), "--images", str(images),
           "--frames", str(frames), "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    stages = out["stages_ms"]
    total = stages["total"]["p50"]
    backbone = stages["backbone"]["p50"]
    return {"frame_ms_p50": total, "backbone_ms_p50": backbone, "frame_over_backbone": total / backbone}


def parse_map(map_name: str) -> dict:
    """``[KIND[:RULE][@IMAGE_SCORE]][/shiftN]`` (see above) as ``evaluate_bundle``'s keyword arguments; an empty
    part is the bundle's own.  A name it cannot read is refused, naming what it can."""
    from edge_runtime.core.pipeline import IMAGE_SCORES

    spec, _, shift = map_name.partition("/")
    spec, at, verdict = spec.partition("@")
    kind, _, rule = spec.partition(":")
    if (kind not in ("", "nn_distance", "swin", "fused") or (at and verdict not in IMAGE_SCORES)
            or (shift and not (shift.startswith("shift") and shift[5:].isdigit())) or map_name in ("", "/")):
        raise SystemExit(f"maps: unknown map {map_name!r} (nn_distance, swin, fused:mean|geometric|max, each "
                         "optionally @distance, @standardised, @reference_standardised or @map, and /shiftN; "
                         "/shiftN alone: the bundle's own map)")
    return {"anomaly_map": kind or None, "fusion_rule": rule or None, "image_score": verdict or None,
            "frame_shift": int(shift[5:]) if shift else None}


def evaluate_map(folder: Path, data: Path, map_name: str) -> dict:
    """Metrics of a variant's bundle scored by another map (``parse_map``)."""
    from training_host.evaluation.evaluate import evaluate_bundle

    out = folder / f"eval_{map_name.replace(':', '_').replace('@', '_at_').replace('/', '_')}"
    return evaluate_bundle(folder / "bundle", data, out, progress=False, **parse_map(map_name))


def applicable(maps: list[str], anomaly_map: str) -> list[str]:
    """The extra maps a variant can be scored by: a distance-only bundle has no Swin to fuse or score with."""
    if anomaly_map != "nn_distance":
        return maps
    return [m for m in maps if (p := parse_map(m))["anomaly_map"] is None
            or (p["anomaly_map"] == "nn_distance" and (p["image_score"] or p["frame_shift"] is not None))]


def row_of(name: str, overrides: list[str], metrics: dict, fit: dict | None, speed: dict | None) -> dict:
    frr = {f"det@frr{d['false_reject_rate']:g}": d["detection_rate"] for d in metrics.get("detection_at_frr") or []}
    row = {"variant": name, "overrides": " ".join(overrides), **{k: metrics[k] for k in KEYS}, **frr}
    for t, v in sorted(metrics.get("per_defect", {}).items()):
        row[f"{t}_pro"] = v["pro"]
        row[f"{t}_ap"] = v["pixel_ap"]
    if fit is not None:
        row["fit_s"] = fit["seconds"]["total"]
        row["bundle_mb"] = fit["bundle_bytes"] / 1e6
    if speed is not None:
        row.update(speed)
    return row


def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_tables(rows: list[dict], out: Path) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    with (out / "table.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=None, help="YAML grid file (see above)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--config", default=None, help="base product config (default: the grid's, else fast)")
    parser.add_argument("--data", default=None, help="dataset (default: the grid's, else ../shared/data/mtd)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--cache", type=Path, default=None, help="fit cache folder (default OUT/cache)")
    parser.add_argument("--frames", type=int, default=100, help="bench frames per variant (0: no timing)")
    parser.add_argument("--no-baseline", action="store_true", help="no nearest-normal distance row")
    parser.add_argument("--maps", default=None, help="comma-separated extra maps per variant (see above)")
    parser.add_argument("--force", action="store_true", help="rerun variants that already have a result")
    args = parser.parse_args(argv)
    grid, variants = load_grid(args.grid, args.variant)
    config = str(Path(args.config or grid.get("config") or FAST).resolve())  # one spelling, for --force checks
    data = Path(args.data or grid.get("data") or MTD)
    if not (data / "train" / "good").is_dir():
        print(f"skipped: no dataset at {data} (../shared/data is absent in a fresh clone)")
        return 0
    from training_host.config import load_config
    from training_host.evaluation.evaluate import evaluate_bundle
    from training_host.training.fit import TrainingOptions, fit_product

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or out / "cache"
    maps = args.maps.split(",") if args.maps else list(grid.get("maps") or [])
    for name in maps:
        parse_map(name)  # refused before any fit
    rows = []
    for i, (name, overrides) in enumerate(variants.items()):
        folder = out / name.replace("/", "_")
        result_path = folder / "result.json"
        extra = maps if maps else (["nn_distance"] if i == 0 and not args.no_baseline else [])
        if result_path.is_file() and not args.force:
            old = json.loads(result_path.read_text(encoding="utf-8"))
            if old.get("overrides") == overrides and old.get("config") == str(config):
                done = set(old.get("maps", []))
                missing = [m for m in applicable(extra, old["fit"].get("anomaly_map")) if m not in done]
                if missing and (folder / "bundle").is_dir():
                    print(f"[{i + 1}/{len(variants)}] {name}: kept, evaluating {', '.join(missing)}", flush=True)
                    old["rows"] += [row_of(f"{name}: {m}", overrides, evaluate_map(folder, data, m), None, None)
                                    for m in missing]
                    old["maps"] = sorted(done | set(missing))
                    result_path.write_text(json.dumps(old, indent=2, default=str) + "\n", encoding="utf-8")
                    missing = []
                if not missing:
                    print(f"[{i + 1}/{len(variants)}] {name}: kept from {result_path}", flush=True)
                    rows += old["rows"]
                    write_tables(rows, out)
                    continue
        print(f"[{i + 1}/{len(variants)}] {name}: {' '.join(overrides) or '(base profile)'}", flush=True)
        cfg = load_config(config, overrides)
        t0 = time.perf_counter()
        summary = fit_product(cfg, data, folder / "bundle", progress=False, options=TrainingOptions(cache_dir=cache))
        fit = {**summary.to_json(), "wall_s": round(time.perf_counter() - t0, 1)}
        metrics = evaluate_bundle(folder / "bundle", data, folder / "eval", progress=False)
        variant_rows = [row_of(name, overrides, metrics, fit, bench(folder / "bundle", data / "test", args.frames))]
        variant_rows += [row_of(f"{name}: {m}", overrides, evaluate_map(folder, data, m), None, None)
                         for m in applicable(extra, summary.anomaly_map)]
        result_path.write_text(json.dumps({"config": str(config), "overrides": overrides,
                                           "maps": applicable(extra, summary.anomaly_map), "fit": fit,
                                           "rows": variant_rows}, indent=2, default=str) + "\n", encoding="utf-8")
        rows += variant_rows
        write_tables(rows, out)
        r = variant_rows[0]
        print("    " + ", ".join(f"{k} {_cell(r[k])}" for k in (*KEYS, "fit_s") if k in r), flush=True)
    write_tables(rows, out)
    print(f"table: {out / 'table.md'} and {out / 'table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
