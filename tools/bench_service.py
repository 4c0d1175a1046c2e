"""The running edge service on CPU (``make bench-service``): throughput and end-to-end latency.

``weakrest-edge run`` is started as its own process (no torch in it, as on the edge box) on a throw-away
bundle store holding the bundle, with a replay camera, a real Mosquitto on loopback and a subscriber that
stands in for the MES.  Two runs:

1. saturated: the replay offers frames faster than the service can inspect them; frames/s is what the
   service sustains, and the newest-frame-wins slot drops the rest (counted in every result);
2. paced: frames at ``--paced-fps`` (below capacity), so latency is not queueing: per-stage p50/p99 from
   the results, and grab -> delivery at the subscriber (the broker forwards a QoS 1 message when it
   acknowledges it, so this is grab -> PUBACK plus one loopback hop).

Peak resident memory of the service process comes from /proc/<pid>/status (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def _run(bundle_store: Path, product: str, images: Path, fps: float, seconds: float, work: Path, threads: int | None
         ) -> dict:
    from edge_runtime.publishing.broker import LocalBroker, free_port
    from edge_runtime.publishing.messages import decode_result
    from edge_runtime.publishing.subscriber import Subscriber

    prefix = "bench/line/station"
    with LocalBroker(workdir=work / f"broker-{fps:g}") as broker:
        broker.start()
        received: list[tuple[float, bytes]] = []
        sub = Subscriber(broker.port, f"{prefix}/result", protocol=broker.protocol)
        sub.client.on_message = lambda c, u, m: received.append((time.time(), bytes(m.payload)))
        cfg = {"bundles": {"store": str(bundle_store), "product": product},
               "camera": {"source": "replay", "replay": {"path": str(images), "fps": fps}},
               "mqtt": {"port": broker.port, "topic_prefix": prefix, "heatmap": "fail"},
               "queue": {"dir": str(work / f"queue-{fps:g}")}, "health": {"port": free_port()}, "threads": threads}
        path = work / f"edge-{fps:g}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(path),
                                 "--log-level", "WARNING"], cwd=ROOT)
        try:
            deadline = time.monotonic() + 120
            while not received and time.monotonic() < deadline:  # start-up: bundle load, engine warm-up
                time.sleep(0.1)
            if not received:
                raise SystemExit("the service published nothing within 120 s")
            time.sleep(2.0)  # warm-up
            start, n0 = time.time(), len(received)
            time.sleep(seconds)
            window = [(t, decode_result(p)) for t, p in received[n0:] if t <= start + seconds]
            peak_rss = _vm(proc.pid, "VmHWM")
            rss = _vm(proc.pid, "VmRSS")
        finally:
            proc.terminate()
            proc.wait(30)
            sub.close()
    results = [r for _, r in window]
    latency = [(t - r.captured_at) * 1e3 for t, r in window]
    stages = sorted({k for r in results for k in r.timings_ms})
    table = {s: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
             for s in stages if (v := [r.timings_ms[s] for r in results if s in r.timings_ms])}
    seqs = [r.seq for r in results]
    return {
        "offered_fps": fps, "seconds": seconds, "results": len(results), "fps": len(results) / seconds,
        "dropped_frames_in_window": results[-1].dropped_frames - results[0].dropped_frames if results else 0,
        "grab_to_delivery_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99))},
        "stages_ms": table, "seq_contiguous": seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else False,
        "over_budget": sum(r.over_budget for r in results), "verdicts": {v: sum(r.verdict == v for r in results)
                                                                        for v in ("pass", "fail", "error")},
        "peak_rss_mb": peak_rss, "rss_mb": rss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="demo_out/bundle", help="bundle to serve (make demo leaves one here)")
    parser.add_argument("--images", default="demo_out/data/test", help="images the replay camera cycles through")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per run")
    parser.add_argument("--paced-fps", type=float, default=10.0)
    parser.add_argument("--saturate-fps", type=float, default=100.0,
                        help="offered rate of the saturated run: above capacity, but not so far above that decoding "
                             "replayed files (which a real camera does not cost) eats the CPU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    bundle, images = Path(args.bundle).resolve(), Path(args.images).resolve()
    if not (bundle / "manifest.json").is_file():
        print(f"error: no bundle at {bundle} (run `make demo` first, or pass --bundle)", file=sys.stderr)
        return 2

    from edge_runtime.core.bundle import load_bundle
    from edge_runtime.store import BundleStore

    product = load_bundle(bundle).manifest.product
    with tempfile.TemporaryDirectory(prefix="weakrest-bench-service-") as tmp:
        work = Path(tmp)
        store = BundleStore(work / "store")
        store.activate(product, store.add(product, bundle, version="bench"))
        report = {"bundle": str(bundle), "product": product,
                  "saturated": _run(store.root, product, images, args.saturate_fps, args.seconds, work,
                                    args.threads),
                  "paced": _run(store.root, product, images, args.paced_fps, args.seconds, work, args.threads)}
    if args.json:
        print(json.dumps(report))
        return 0
    s, p = report["saturated"], report["paced"]
    print(f"edge service, bundle {bundle} ({product}), replay of {images}, {args.seconds:.0f} s per run")
    print(f"saturated: {s['fps']:.1f} results/s ({s['results']} results, {s['dropped_frames_in_window']} frames "
          f"dropped by newest-wins, seq contiguous: {s['seq_contiguous']}); peak RSS {s['peak_rss_mb']:.0f} MB")
    print(f"paced at {args.paced_fps:g} fps: {p['fps']:.1f} results/s; grab -> delivery p50 "
          f"{p['grab_to_delivery_ms']['p50']:.1f} ms, p99 {p['grab_to_delivery_ms']['p99']:.1f} ms; "
          f"over budget {p['over_budget']}; peak RSS {p['peak_rss_mb']:.0f} MB")
    print(f"{'stage (paced)':<14}{'p50 ms':>9}{'p99 ms':>9}")
    for name, row in p["stages_ms"].items():
        print(f"{name:<14}{row['p50']:>9.2f}{row['p99']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
