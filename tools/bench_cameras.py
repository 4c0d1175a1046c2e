"""Several cameras on one box (``make bench-cameras``): one ``weakrest-edge run`` process per station.

For each count in ``--cameras`` (1,2,4 by default), that many stations are started at once, as the systemd
template unit ``weakrest-edge@<station>.service`` starts them: one process per station, each with its own
config, replay camera at ``--fps``, result topic, queue and health port, all serving the same bundle from one
bundle store, through one Mosquitto on loopback and one subscriber that stands in for the MES.

Per station, over a ``--seconds`` window after warm-up: results/s, grab -> delivery p50/p99 at the subscriber,
the pipeline's own time (the result's ``timings_ms.total``) p50/p99, their ratio, and where the rest goes: the
time inside the service outside the pipeline (``published_at - captured_at - total``: the frame waiting in its
slot for a core while another station computes, decoding, the hand-off to the queue and publisher) and the
broker hop (arrival - ``published_at``).
Memory at the end of the window from ``/proc/<pid>/smaps_rollup``: RSS, unique memory (private clean + dirty:
what killing that process alone would free) and PSS (each shared page divided among the processes that map it,
so the sum is the box's true total).  Every seq from the first to the last result of a station must arrive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_service import bundle_store, open_bundle, start_service  # noqa: E402

PREFIX = "bench/line"


def smaps_mb(pid: int) -> dict[str, float]:
    """RSS, USS (private clean + dirty) and PSS of a process in MB (MiB), from /proc/<pid>/smaps_rollup."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = float(parts[1]) / 1024.0
    return {"rss": fields.get("Rss", float("nan")), "pss": fields.get("Pss", float("nan")),
            "uss": fields.get("Private_Clean", 0.0) + fields.get("Private_Dirty", 0.0),
            "shared": fields.get("Shared_Clean", 0.0) + fields.get("Shared_Dirty", 0.0)}


def run_count(n: int, store: Path, product: str, images: Path, fps: float, seconds: float, work: Path,
              threads: int | None, warmup_s: float) -> dict:
    """``n`` stations at ``fps`` each through one broker: per-station latency, memory and seq figures."""
    from edge_runtime.publishing.broker import LocalBroker, free_port
    from edge_runtime.publishing.messages import decode_result
    from edge_runtime.publishing.subscriber import Subscriber

    received: dict[int, list[tuple[float, bytes]]] = {k: [] for k in range(n)}
    lock = threading.Lock()
    with LocalBroker(workdir=work / f"broker-{n}") as broker:
        broker.start()

        def on_message(client, userdata, m) -> None:
            k = int(m.topic.split("/")[2].removeprefix("station"))
            with lock:
                received[k].append((time.time(), bytes(m.payload)))

        sub = Subscriber(broker.port, f"{PREFIX}/+/result", protocol=broker.protocol)
        sub.client.on_message = on_message
        procs = []
        try:
            for k in range(n):
                procs.append(start_service(store, product, images, fps, broker.port, f"{PREFIX}/station{k}",
                                           work / f"run-{n}", f"station{k}", threads, free_port()))
            deadline = time.monotonic() + 180
            while any(not received[k] for k in range(n)):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit(f"not every station published within 180 s ({n} stations)")
                time.sleep(0.1)
            time.sleep(warmup_s)
            with lock:
                n0 = {k: len(v) for k, v in received.items()}
            start = time.time()
            time.sleep(seconds)
            memory = [smaps_mb(p.pid) for p in procs]
            with lock:
                window = {k: [(t, decode_result(p)) for t, p in v[n0[k]:] if t <= start + seconds]
                          for k, v in received.items()}
                everything = {k: [decode_result(p).seq for _, p in v] for k, v in received.items()}
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            sub.close()
    stations = []
    for k in range(n):
        rows = window[k]
        g2d = [(t - r.captured_at) * 1e3 for t, r in rows]
        total = [r.timings_ms["total"] for _, r in rows if "total" in r.timings_ms]
        # where grab -> delivery goes beyond the pipeline: before and after it inside the service (the frame
        # waiting in the slot for a core, decoding, the hand-off to the queue and publisher), then the broker hop
        sent = [(t, r) for t, r in rows if r.published_at is not None and "total" in r.timings_ms]
        in_service = [(r.published_at - r.captured_at) * 1e3 - r.timings_ms["total"] for _, r in sent]
        hop = [(t - r.published_at) * 1e3 for t, r in sent]
        seqs = sorted(set(everything[k]))
        missing = (seqs[-1] - seqs[0] + 1 - len(seqs)) if seqs else 0
        p50 = lambda v: float(np.percentile(v, 50)) if v else float("nan")  # noqa: E731
        p99 = lambda v: float(np.percentile(v, 99)) if v else float("nan")  # noqa: E731
        stations.append({"station": k, "results": len(rows), "results_per_s": len(rows) / seconds,
                         "g2d_p50": p50(g2d), "g2d_p99": p99(g2d), "total_p50": p50(total), "total_p99": p99(total),
                         "ratio_p50": p50(g2d) / p50(total) if total else float("nan"),
                         "outside_pipeline_p50": p50(in_service), "broker_hop_p50": p50(hop),
                         "seq_first": seqs[0] if seqs else None, "seq_last": seqs[-1] if seqs else None,
                         "seq_missing": missing, "duplicates": len(everything[k]) - len(seqs),
                         "memory_mb": memory[k]})
    return {"cameras": n, "fps_each": fps, "seconds": seconds, "threads": threads, "stations": stations,
            "rss_total_mb": sum(m["rss"] for m in memory), "pss_total_mb": sum(m["pss"] for m in memory),
            "uss_total_mb": sum(m["uss"] for m in memory)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="demo_out/bundle", help="bundle every station serves")
    parser.add_argument("--images", default="demo_out/data/test", help="images each replay camera cycles through")
    parser.add_argument("--cameras", default="1,2,4", help="station counts to run, one after the other")
    parser.add_argument("--fps", type=float, default=10.0, help="frames/s offered by each camera")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window per count")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after every station's first result")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads per station (default: the box's cores divided among the stations)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every figure there")
    args = parser.parse_args(argv)
    bundle = open_bundle(args.bundle)
    if bundle is None:
        return 2
    images = Path(args.images).resolve()
    counts = [int(v) for v in args.cameras.split(",") if v.strip()]
    cores = len(os.sched_getaffinity(0))
    report = {"bundle": str(bundle), "cores": cores, "runs": []}
    with tempfile.TemporaryDirectory(prefix="weakrest-bench-cameras-") as tmp:
        work = Path(tmp)
        store, product = bundle_store(bundle, work)
        for n in counts:
            (work / f"run-{n}").mkdir()
            threads = args.threads or max(1, cores // n)
            report["runs"].append(run_count(n, store, product, images, args.fps, args.seconds, work, threads,
                                            args.warmup))
    print(f"stations on one box: bundle {bundle}, replay of {images} at {args.fps:g} fps per camera, "
          f"{args.seconds:g} s window, {cores} cores")
    print(f"{'cameras':>7}{'station':>8}{'results/s':>10}{'g2d p50':>9}{'p99':>8}{'total p50':>10}{'p99':>8}"
          f"{'g2d/total':>10}{'service rest':>13}{'hop':>6}{'seq missing':>12}{'RSS MB':>8}{'USS MB':>8}{'PSS MB':>8}")
    for run in report["runs"]:
        for s in run["stations"]:
            m = s["memory_mb"]
            print(f"{run['cameras']:>7}{s['station']:>8}{s['results_per_s']:>10.2f}{s['g2d_p50']:>9.1f}"
                  f"{s['g2d_p99']:>8.1f}{s['total_p50']:>10.1f}{s['total_p99']:>8.1f}{s['ratio_p50']:>10.2f}"
                  f"{s['outside_pipeline_p50']:>13.1f}{s['broker_hop_p50']:>6.1f}{s['seq_missing']:>12}{m['rss']:>8.0f}{m['uss']:>8.0f}{m['pss']:>8.0f}")
        print(f"{run['cameras']:>7}{'all':>8}  threads/station {run['threads']}; RSS sum "
              f"{run['rss_total_mb']:.0f} MB, USS sum {run['uss_total_mb']:.0f} MB, PSS sum (true total) "
              f"{run['pss_total_mb']:.0f} MB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
