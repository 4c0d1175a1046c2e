"""Each engine's graphs alone (backbone, Swin), alternating call by call in one process: which engine is faster.

``make bench-peer`` times whole frames, one engine per process, which is the figure to quote; on a shared machine
whose load moves from one second to the next its per-engine figures drift apart.  Here every engine runs the same
input one after the other, ``--calls`` times, so each sees the same moment's load, and the medians' ratios say
which engine is faster at the graphs.  This is the measurement behind ``engines.AUTO_ORDER``.

    python tools/bench_graphs.py --bundle runs/engines/fast [--engines cpu,cpu-int8,openvino,openvino-bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.core.bundle import load_bundle  # noqa: E402
from edge_runtime.core.engines import EngineError, build_engine_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--engines", default="cpu,cpu-int8,openvino,openvino-bf16,openvino-int8")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    rng = np.random.default_rng(0)
    inputs = {"backbone": {"image": rng.random((1, 3, *m.preprocessing.input_size), dtype=np.float32)},
              "swin": {"residual": rng.random((1, m.backbone.grid[0] * m.backbone.grid[1], m.backbone.d_f),
                                              dtype=np.float32)}}
    sets = {}
    for name in args.engines.split(","):
        try:
            sets[name] = build_engine_set(bundle, name, threads=args.threads)
        except EngineError as exc:
            print(f"{name}: skipped ({exc})", file=sys.stderr)
    times: dict[str, dict[str, list[float]]] = {n: {"backbone": [], "swin": []} for n in sets}
    for role in ("backbone", "swin"):
        for s in sets.values():  # warm-up
            engine = s.backbone if role == "backbone" else s.swin
            for _ in range(5):
                engine.run(inputs[role])
        for _ in range(args.calls):
            for name, s in sets.items():
                engine = s.backbone if role == "backbone" else s.swin
                t0 = time.perf_counter()
                engine.run(inputs[role])
                times[name][role].append((time.perf_counter() - t0) * 1e3)
    table = {n: {role: {"p50": float(np.median(v)), "p99": float(np.percentile(v, 99))} for role, v in t.items()}
             for n, t in times.items()}
    base = table.get("cpu")
    if args.json:
        print(json.dumps({"bundle": args.bundle, "calls": args.calls, "graphs_ms": table}))
        return 0
    print(f"{'engine':<15}{'backbone p50':>14}{'swin p50':>10}{'sum':>8}{'cpu / this':>12}")
    for n, row in table.items():
        total = row["backbone"]["p50"] + row["swin"]["p50"]
        ratio = (base["backbone"]["p50"] + base["swin"]["p50"]) / total if base else float("nan")
        print(f"{n:<15}{row['backbone']['p50']:>14.2f}{row['swin']['p50']:>10.2f}{total:>8.2f}{ratio:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
