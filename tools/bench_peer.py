"""Our CPU frame time against the peer's, alternating in one run (``make bench-peer``).

The peer is anomalib's PatchCore as anomalib exports it (``../shared/peer/patchcore.onnx``, the same offline
EfficientNet-Lite0 backbone), timed by ``../shared/peer/time_peer.py``; ours is ``weakrest-edge bench`` on a
fitted bundle.  Both run on the same images (default: MTD's good test images), each in a fresh process, one
after the other, for ``--rounds`` rounds: these machines are shared and absolute times move by tens of percent
from one minute to the next, so the figure that means something is the ratio within a round.  Prints each
round's p50 / p99 and the ratio of p50s, then the median ratio and its range over the rounds; ``--json`` writes
it all.  By default every CPU engine this machine and the bundle can run is timed (:func:`cpu_engines`: ``cpu``,
``cpu-int8`` with int8 graphs, ``openvino`` / ``openvino-bf16`` / ``openvino-int8`` with the package, bf16
instructions, int8 graphs), each in its own process, alternating with the peer within every round.  Skips with a
message when ``../shared`` is absent (a user's fresh clone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PEER = SHARED / "peer" / "time_peer.py"
IMAGES = SHARED / "data" / "mtd" / "test" / "good"


def ours(bundle: Path, images: Path, frames: int, engine: str | None) -> dict:
    """``weakrest-edge bench`` in a fresh process: per-stage p50 / p99 (ms)."""
    cmd = [sys.executable, "-m", "edge_runtime.cli", "bench", "--bundle", str(bundle), "--images", str(images),
           "--frames", str(frames), "--json"]
    if engine is not None:
        cmd += ["--engine", engine]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    total, backbone = out["stages_ms"]["total"], out["stages_ms"]["backbone"]
    return {"p50": total["p50"], "p99": total["p99"], "backbone_p50": backbone["p50"],
            "engine": out.get("engine"), "total_over_backbone": total["p50"] / backbone["p50"]}


def peer(images: Path, frames: int) -> dict:
    """``time_peer.py`` in a fresh process (its own JSON line: per-frame ms)."""
    run = subprocess.run([sys.executable, str(PEER), str(images), str(frames)], check=True, capture_output=True,
                         text=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return {"p50": float(out["per_image_ms_p50"]), "p99": float(out["p99"])}


def cpu_engines(bundle: Path) -> list[str]:
    """The CPU engines this machine and the bundle can run (named engines run even where the bundle's accuracy
    gate refused them: this measures speed; the gate's figures are in the manifest)."""
    sys.path.insert(0, str(ROOT))
    from edge_runtime.core.bundle import load_bundle
    from edge_runtime.core.engines import cpu_has_bf16, openvino_devices

    has_int8 = bool(load_bundle(bundle).int8_paths)
    engines = ["cpu"] + (["cpu-int8"] if has_int8 else [])
    if "CPU" in openvino_devices():
        engines += ["openvino"] + (["openvino-bf16"] if cpu_has_bf16() else []) + (["openvino-int8"] if has_int8
                                                                                   else [])
    return engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a bundle fitted on MTD (make sweep or make bench-mtd)")
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--frames", type=int, default=100, help="timed frames per run, each side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine", action="append", default=None,
                        help="our engine(s) to time (repeatable; default: every CPU engine available here)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    if not PEER.is_file() or not args.images.is_dir():
        print(f"skipped: no peer at {PEER} or no images at {args.images} (../shared is absent in a fresh clone)")
        return 0
    bundle = Path(args.bundle)
    if not bundle.is_dir():
        print(f"error: no bundle at {bundle} (fit one: make sweep, or make bench-mtd)", file=sys.stderr)
        return 2
    engines = args.engine or cpu_engines(bundle)
    print(f"engines: {', '.join(e or 'default' for e in engines)}; {args.rounds} rounds of {args.frames} frames",
          flush=True)
    rounds = []
    for r in range(args.rounds):
        row = {"peer": peer(args.images, args.frames)}
        for engine in engines:
            row[engine or "default"] = ours(bundle, args.images, args.frames, engine)
        rounds.append(row)
        cells = [f"peer {row['peer']['p50']:.1f} / {row['peer']['p99']:.1f} ms"]
        for name in (e or "default" for e in engines):
            o = row[name]
            cells.append(f"{name} ({o['engine']}) {o['p50']:.1f} / {o['p99']:.1f} ms, "
                         f"{row['peer']['p50'] / o['p50']:.2f}x, total/backbone {o['total_over_backbone']:.2f}")
        print(f"round {r + 1}: " + "; ".join(cells), flush=True)
    summary = {}
    for name in (e or "default" for e in engines):
        ratios = [row["peer"]["p50"] / row[name]["p50"] for row in rounds]
        summary[name] = {
            "ours_p50_median": statistics.median(row[name]["p50"] for row in rounds),
            "ours_p99_median": statistics.median(row[name]["p99"] for row in rounds),
            "peer_p50_median": statistics.median(row["peer"]["p50"] for row in rounds),
            "peer_p99_median": statistics.median(row["peer"]["p99"] for row in rounds),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "total_over_backbone_median": statistics.median(row[name]["total_over_backbone"] for row in rounds),
        }
        s = summary[name]
        print(f"{name}: ours p50 {s['ours_p50_median']:.1f} ms (p99 {s['ours_p99_median']:.1f}), peer p50 "
              f"{s['peer_p50_median']:.1f} ms (p99 {s['peer_p99_median']:.1f}); peer / ours {s['ratio_median']:.2f}x "
              f"(rounds {s['ratio_min']:.2f}-{s['ratio_max']:.2f}), "
              f"total/backbone {s['total_over_backbone_median']:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bundle": str(bundle), "images": str(args.images), "frames": args.frames,
                                         "rounds": rounds, "summary": summary}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
