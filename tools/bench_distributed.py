"""Fit time of one process against N processes under torchrun, on the same data, one after the other.

Each round runs ``weakrest-train fit`` in one process (torch's default threads: every core), then
``torchrun --standalone --nproc-per-node N`` on the same config (each rank gets cores // N threads), each
into its own bundle folder, and records the wall time and the fit's own stage times.  Afterwards it
compares the two bundles' bank, PCA and reference arrays (they are bit-identical when both fits ran
with the same threads per process; with different thread counts oneDNN's kernels may differ in the last
bit) and evaluates both on the test split.  Prints a table, writes ``<out>/report.json``.  Usage::

    .venv/bin/python tools/bench_distributed.py --data ../shared/data/mtd --out runs/dist [--nproc 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ("bank", "bank_image", "pca_components", "pca_mean", "ref_descriptors", "reference_distances")
KEYS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")


def _fit(cmd: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "seconds": summary["seconds"], "bundle": str(out)}


def _compare(a: Path, b: Path) -> dict:
    x, y = load_file(str(a / "arrays.safetensors")), load_file(str(b / "arrays.safetensors"))
    return {k: {"equal": bool(np.array_equal(x[k], y[k])),
                "max_abs_diff": float(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)).max())}
            for k in ARRAYS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mtd")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "products" / "fast.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "dist")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate 1 and N processes this many times")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (both fits)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = [x for kv in args.set for x in ("--set", kv)]
    runs: dict[str, list[dict]] = {"1": [], str(args.nproc): []}
    for r in range(args.rounds):
        for n in (1, args.nproc):
            out = args.out / f"n{n}-r{r}"
            fit = ["fit", "--config", str(args.config), "--data", str(args.data), "--out", str(out), "--json",
                   *overrides]
            launcher = ([sys.executable, "-m", "training_host.cli"] if n == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                         "-m", "training_host.cli"])
            runs[str(n)].append(_fit([*launcher, *fit], out))
            print(f"round {r}, {n} process(es): {runs[str(n)][-1]}", flush=True)
    from training_host.evaluation.evaluate import evaluate_bundle

    first = {n: Path(v[0]["bundle"]) for n, v in runs.items()}
    metrics = {n: {k: evaluate_bundle(b, args.data, args.out / f"eval-n{n}", overlays=0, progress=False)[k]
                   for k in KEYS} for n, b in first.items()}
    report = {"cores": len(os.sched_getaffinity(0)), "config": str(args.config), "overrides": args.set,
              "runs": runs, "arrays_vs_single": _compare(first["1"], first[str(args.nproc)]), "metrics": metrics,
              "median_wall_s": {n: statistics.median(x["wall_s"] for x in v) for n, v in runs.items()}}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    stages = sorted({k for v in runs.values() for x in v for k in x["seconds"]})
    print(f"{'processes':<10}{'wall s':>9}" + "".join(f"{k:>11}" for k in stages) + "".join(f"{k:>13}" for k in KEYS))
    for n, v in runs.items():
        sec = {k: statistics.median(x["seconds"].get(k, 0.0) for x in v) for k in stages}
        print(f"{n:<10}{report['median_wall_s'][n]:>9.1f}" + "".join(f"{sec[k]:>11.1f}" for k in stages)
              + "".join(f"{metrics[n][k]:>13.4f}" for k in KEYS))
    same = [k for k, c in report["arrays_vs_single"].items() if c["equal"]]
    print(f"arrays equal to the single-process fit: {', '.join(same) or 'none'}; "
          + "; ".join(f"{k} max |diff| {c['max_abs_diff']:.3g}" for k, c in report["arrays_vs_single"].items()
                      if not c["equal"]))
    print(f"report: {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
