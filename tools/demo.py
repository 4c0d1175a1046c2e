"""The main job on built-in defaults (``make demo``): a demo product end to end, offline, on a CPU.

1. build a small product dataset from images that scikit-image ships, with procedural defects and masks
2. fit the fast profile: coreset bank, PCA, references, and the residual Swin trained on good images and
   synthetic anomalies (fewer steps than the profile's default, so the demo stays short); export a bundle
3. check the bundle and inspect the test images with the edge runtime (results.jsonl + heatmaps)
4. evaluate: image AUROC, pixel AUROC, PRO, pixel AP, overall and per defect type
5. benchmark the edge inference path
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _in_fresh_process(edge_args: list[str]) -> int:
    """``weakrest-edge ARGS`` in its own process: the training's torch threads and memory stay out of it."""
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *edge_args], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="working folder")
    parser.add_argument("--product", choices=["texture", "object"], default="texture")
    parser.add_argument("--config", default=str(ROOT / "configs" / "products" / "fast.yaml"))
    parser.add_argument("--swin-steps", type=int, default=500, help="Swin training steps (the profile has 1500)")
    args = parser.parse_args(argv)

    from edge_runtime import cli as edge_cli
    from training_host import cli as train_cli
    from training_host.demo_data import make_demo_dataset

    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"[1/5] building the demo '{args.product}' dataset", flush=True)
    data = make_demo_dataset(out / "data", product=args.product)
    bundle = out / "bundle"
    steps = [
        (
            "[2/5] fitting the fast profile (bank, PCA, references, residual Swin)",
            train_cli.main,
            [
                "fit",
                "--config",
                args.config,
                "--data",
                str(data),
                "--out",
                str(bundle),
                "--product",
                f"demo-{args.product}",
                "--set",
                f"swin.steps={args.swin_steps}",
                "--synthetic-preview",
                str(out / "synthetic_anomalies.png"),
            ],
        ),
        ("[3/5] checking the bundle", edge_cli.main, ["check-bundle", str(bundle)]),
        (
            "[3/5] inspecting the test images on the edge runtime",
            edge_cli.main,
            [
                "inspect",
                "--bundle",
                str(bundle),
                "--images",
                str(data / "test"),
                "--out",
                str(out / "inspect"),
                "--heatmaps",
                "fail",
            ],
        ),
        (
            "[4/5] evaluating",
            train_cli.main,
            ["eval", "--bundle", str(bundle), "--data", str(data), "--out", str(out / "eval")],
        ),
        (
            "[5/5] benchmarking batch-1 inference (a fresh process, as the edge runs it: no torch loaded)",
            _in_fresh_process,
            ["bench", "--bundle", str(bundle), "--images", str(data / "test"), "--frames", "100"],
        ),
    ]
    for title, func, cmd in steps:
        print(title, flush=True)
        code = func(cmd)
        if code not in (0,):
            print(f"demo step failed ({title}): exit {code}", file=sys.stderr)
            return code
    print(
        f"demo finished in {time.perf_counter() - t0:.0f} s: bundle {bundle}, heatmaps {out / 'inspect' / 'heatmaps'}, "
        f"metrics {out / 'eval' / 'metrics.json'}, curves {out / 'eval' / 'curves.png'}, "
        f"synthetic anomalies {out / 'synthetic_anomalies.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
