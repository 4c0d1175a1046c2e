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

``--live-clients 0,1,4`` instead measures what the live operator page costs the service: one saturated service
process, and phases of ``--live-seconds`` with 0, 1 and 4 live-page clients attached, alternating over
``--live-rounds`` rounds (forward, then backward order) so a noisy machine hurts every count alike.  A client
reads ``/events`` as a browser's EventSource does and fetches ``/frame.jpg?seq=N`` for every new frame an event
names, one at a time, as the page does.  Reported per count: median frames/s over the phases, the median ratio to
the first count's frames/s in the same round, median (p99) frame time (the result's ``timings_ms.total``) pooled
over the phases, and the service process's CPU time per result (all its threads: HTTP, events, JPEG included).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/<pid>/status (``VmRSS``: "287340 kB", ``Threads``: "23", ...)."""
    fields = (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: v.strip() for k, v in fields}


def vm_mb(pid: int, key: str, status: dict[str, str] | None = None) -> float:
    """A memory figure of /proc/<pid>/status (``VmRSS``, ``VmHWM``...) in MB (MiB); NaN when absent."""
    value = (status if status is not None else proc_status(pid)).get(key)
    return float(value.split()[0]) / 1024.0 if value else float("nan")


SATURATE_FPS = 100.0  # offered rate of a saturated run (see --saturate-fps)
PREFIX = "bench/line/station"  # topic prefix of the service under test


def open_bundle(bundle: str | Path, hint: str = "run `make demo` first, or pass --bundle") -> Path | None:
    """The bundle folder, resolved; None (after an error line with ``hint``) when there is no bundle there."""
    path = Path(bundle).resolve()
    if not (path / "manifest.json").is_file():
        print(f"error: no bundle at {path} ({hint})", file=sys.stderr)
        return None
    return path


def bundle_store(bundle: Path, work: Path) -> tuple[Path, str]:
    """A throw-away bundle store in ``work`` holding ``bundle`` as the active version: (store root, product)."""
    from edge_runtime.core.bundle import load_bundle
    from edge_runtime.store import BundleStore

    product = load_bundle(bundle).manifest.product
    store = BundleStore(work / "store")
    store.activate(product, store.add(product, bundle, version="bench"))
    return store.root, product


def start_service(bundle_store: Path, product: str, images: Path, fps: float, broker_port: int, prefix: str,
                  work: Path, name: str, threads: int | None, health_port: int, out=None,
                  settings: dict | None = None) -> subprocess.Popen:
    """``weakrest-edge run`` in its own process: a replay camera at ``fps``, results on ``<prefix>/result``, its own
    queue folder and health port in ``work`` (named ``name``), the store's current bundle of ``product``."""
    cfg = {"bundles": {"store": str(bundle_store), "product": product},
           "camera": {"source": "replay", "replay": {"path": str(images), "fps": fps}},
           "mqtt": {"port": broker_port, "topic_prefix": prefix, "heatmap": "fail"},
           "queue": {"dir": str(work / f"queue-{name}")}, "health": {"port": health_port}, "threads": threads,
           **(settings or {})}
    path = work / f"edge-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(path),
                             "--log-level", "WARNING"], cwd=ROOT, stdout=out, stderr=out)


@dataclasses.dataclass
class Serving:
    """What :func:`serving` runs: the service process, the broker, the MES stand-in and the health port."""

    proc: subprocess.Popen
    broker: object  # LocalBroker
    subscriber: object  # Subscriber
    health_port: int
    received: list[tuple[float, bytes]]  # (arrival time, payload) of each result, unless ``record`` takes them


@contextlib.contextmanager
def serving(bundle_store: Path, product: str, images: Path, fps: float, work: Path, name: str,
            threads: int | None, health_port: int, *, record: Callable[[float, bytes], None] | None = None,
            broker_impl: str = "auto", persistence: bool = False, persistent_subscriber: bool = False,
            warmup_s: float = 2.0, service_log: Path | None = None, settings: dict | None = None
            ) -> Iterator[Serving]:
    """A broker, an MES stand-in recording (arrival time, payload) of each result, and ``weakrest-edge run`` in
    its own process, warmed up (first result plus ``warmup_s``); everything stopped on exit.

    ``record(arrival, payload)`` takes each result instead of :attr:`Serving.received`.  ``persistence`` keeps the
    broker's sessions across a clean restart (Mosquitto), and ``persistent_subscriber`` gives the MES stand-in a
    persistent session (MQTT 5 session expiry / 3.1.1 clean session off) subscribed at QoS 1, so a broker restart
    loses nothing the broker accepted.  ``service_log``: the service's stdout and stderr go there."""
    from edge_runtime.publishing.broker import LocalBroker
    from edge_runtime.publishing.subscriber import Subscriber

    with LocalBroker(workdir=work / f"broker-{name}", impl=broker_impl, persistence=persistence) as broker:
        broker.start()
        received: list[tuple[float, bytes]] = []
        keep = record or (lambda t, payload: received.append((t, payload)))
        first = threading.Event()

        def on_message(client, userdata, m) -> None:
            keep(time.time(), bytes(m.payload))
            first.set()

        sub = Subscriber(broker.port, f"{PREFIX}/result", protocol=broker.protocol,
                         persistent=persistent_subscriber,
                         client_id=f"weakrest-{name}-mes" if persistent_subscriber else None)
        sub.client.on_message = on_message
        out = open(service_log, "ab") if service_log is not None else None  # noqa: SIM115 - closed below
        proc = start_service(bundle_store, product, images, fps, broker.port, PREFIX, work, name, threads,
                             health_port, out=out, settings=settings)
        try:
            if not first.wait(120):  # start-up: bundle load, engine warm-up
                raise SystemExit("the service published nothing within 120 s")
            time.sleep(warmup_s)  # warm-up
            yield Serving(proc, broker, sub, health_port, received)
        finally:
            proc.terminate()
            proc.wait(30)
            sub.close()
            if out is not None:
                out.close()


def _run(bundle_store: Path, product: str, images: Path, fps: float, seconds: float, work: Path, threads: int | None,
         settings: dict | None = None) -> dict:
    from edge_runtime.publishing.broker import free_port
    from edge_runtime.publishing.messages import decode_result

    with serving(bundle_store, product, images, fps, work, f"{fps:g}", threads, free_port(),
                 settings=settings) as run:
        proc, received = run.proc, run.received
        start, n0 = time.time(), len(received)
        time.sleep(seconds)
        window = [(t, decode_result(p)) for t, p in received[n0:] if t <= start + seconds]
        peak_rss = vm_mb(proc.pid, "VmHWM")
        rss = vm_mb(proc.pid, "VmRSS")
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


class _LiveClient(threading.Thread):
    """A live page without the browser: reads ``/events`` and fetches each new frame, one at a time."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.events = 0
        self.frames = 0
        self.frame_bytes = 0
        self.status = 0
        self._halt = threading.Event()

    def run(self) -> None:
        buf, shown = b"", None
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
            s.settimeout(0.5)
            while not self._halt.is_set():
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buf += chunk
                if not self.status and b"\r\n" in buf:
                    self.status = int(buf.split(b" ", 2)[1])
                *done, buf = buf.split(b"\n\n")
                frame = None
                for block in done:
                    for line in block.split(b"\n"):
                        if line.startswith(b"data:"):
                            self.events += 1
                            frame = json.loads(line[5:]).get("frame")
                if frame is not None and frame != shown:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/frame.jpg?seq={frame}",
                                                    timeout=10) as r:
                            self.frame_bytes += len(r.read())
                        self.frames += 1
                        shown = frame
                    except OSError:  # 404: that frame is gone already; the next event names a newer one
                        pass

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _live_run(bundle_store: Path, product: str, images: Path, fps: float, counts: list[int], rounds: int,
              seconds: float, work: Path, threads: int | None) -> dict:
    """Frames/s and frame time of one saturated service with ``counts`` live clients, phases alternating."""
    from edge_runtime.publishing.broker import free_port
    from edge_runtime.publishing.messages import decode_result

    port = free_port()
    phases: list[dict] = []
    with serving(bundle_store, product, images, fps, work, "live", threads, port) as run:
        proc, received = run.proc, run.received
        for r in range(rounds):
            for n in counts if r % 2 == 0 else counts[::-1]:
                clients = [_LiveClient(port) for _ in range(n)]
                for c in clients:
                    c.start()
                settle = time.monotonic() + 5
                while any(c.frames == 0 for c in clients) and time.monotonic() < settle:
                    time.sleep(0.05)
                start, n0, cpu0 = time.time(), len(received), _cpu_s(proc.pid)
                events0 = sum(c.events for c in clients)
                frames0 = sum(c.frames for c in clients)
                time.sleep(seconds)
                cpu = _cpu_s(proc.pid) - cpu0
                events = sum(c.events for c in clients) - events0
                frames = sum(c.frames for c in clients) - frames0
                for c in clients:
                    c.stop()
                results = [decode_result(p) for t, p in received[n0:] if t <= start + seconds]
                phases.append({"clients": n, "round": r, "fps": len(results) / seconds,
                               "cpu_ms_per_result": cpu * 1e3 / len(results) if results else float("nan"),
                               "frame_ms": [r.timings_ms["total"] for r in results if "total" in r.timings_ms],
                               "events_per_client_s": events / seconds / n if n else 0.0,
                               "frames_per_client_s": frames / seconds / n if n else 0.0,
                               "rejected_503": sum(c.status == 503 for c in clients)})
    table = {}
    base = {p["round"]: p["fps"] for p in phases if p["clients"] == counts[0]}
    for n in counts:
        mine = [p for p in phases if p["clients"] == n]
        ms = [v for p in mine for v in p["frame_ms"]]
        table[n] = {"phases": len(mine), "fps_median": statistics.median(p["fps"] for p in mine),
                    "fps_vs_first_count": statistics.median(p["fps"] / base[p["round"]] for p in mine
                                                            if base.get(p["round"])),
                    "cpu_ms_per_result": statistics.median(p["cpu_ms_per_result"] for p in mine),
                    "fps_per_phase": [round(p["fps"], 2) for p in mine],
                    "frame_ms_p50": float(np.percentile(ms, 50)) if ms else float("nan"),
                    "frame_ms_p99": float(np.percentile(ms, 99)) if ms else float("nan"),
                    "events_per_client_s": statistics.median(p["events_per_client_s"] for p in mine),
                    "frames_per_client_s": statistics.median(p["frames_per_client_s"] for p in mine),
                    "rejected_503": sum(p["rejected_503"] for p in mine)}
    return {"offered_fps": fps, "seconds_per_phase": seconds, "rounds": rounds, "clients": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="demo_out/bundle", help="bundle to serve (make demo leaves one here)")
    parser.add_argument("--images", default="demo_out/data/test", help="images the replay camera cycles through")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per run")
    parser.add_argument("--paced-fps", type=float, default=10.0)
    parser.add_argument("--saturate-fps", type=float, default=SATURATE_FPS,
                        help="offered rate of the saturated run: above capacity, but not so far above that decoding "
                             "replayed files (which a real camera does not cost) eats the CPU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--live-clients", default=None, metavar="N,N,...",
                        help="measure the live page's cost instead: phases with these numbers of live-page clients "
                             "(e.g. 0,1,4) on one saturated service, alternating")
    parser.add_argument("--live-rounds", type=int, default=4, help="rounds of phases (with --live-clients)")
    parser.add_argument("--live-seconds", type=float, default=6.0, help="seconds per phase (with --live-clients)")
    parser.add_argument("--engine", default=None, help="the service's engine (default: the config's, auto)")
    parser.add_argument("--compare-overlap", type=int, default=0, metavar="ROUNDS",
                        help="saturated results/s with overlap_frames off and on, alternating for ROUNDS rounds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    bundle = open_bundle(args.bundle)
    if bundle is None:
        return 2
    images = Path(args.images).resolve()
    with tempfile.TemporaryDirectory(prefix="weakrest-bench-service-") as tmp:
        work = Path(tmp)
        store_root, product = bundle_store(bundle, work)
        base = {"engine": args.engine} if args.engine else {}
        if args.compare_overlap:
            runs: dict[str, list[dict]] = {"off": [], "on": []}
            for _ in range(args.compare_overlap):
                for mode in ("off", "on"):
                    runs[mode].append(_run(store_root, product, images, args.saturate_fps, args.seconds, work,
                                           args.threads, {**base, "overlap_frames": mode == "on"}))
            summary = {mode: {"fps_median": float(np.median([r["fps"] for r in rs])),
                              "fps_per_round": [round(r["fps"], 2) for r in rs],
                              "total_ms_p50_median": float(np.median([r["stages_ms"]["total"]["p50"] for r in rs])),
                              "seq_contiguous": all(r["seq_contiguous"] for r in rs)}
                       for mode, rs in runs.items()}
            if args.json:
                print(json.dumps({"bundle": str(bundle), "product": product, "overlap": summary, "runs": runs}))
                return 0
            print(f"edge service, bundle {bundle} ({product}), replay offered at {args.saturate_fps:g} fps "
                  f"(saturated), {args.seconds:g} s per run, {args.compare_overlap} alternating rounds, threads "
                  f"{args.threads}")
            for mode, row in summary.items():
                print(f"overlap_frames {mode:<4} {row['fps_median']:7.1f} results/s (rounds {row['fps_per_round']}), "
                      f"frame total p50 {row['total_ms_p50_median']:.2f} ms, seq contiguous {row['seq_contiguous']}")
            return 0
        if args.live_clients is not None:
            counts = [int(v) for v in args.live_clients.split(",") if v.strip()]
            live = _live_run(store_root, product, images, args.saturate_fps, counts, args.live_rounds,
                             args.live_seconds, work, args.threads)
            if args.json:
                print(json.dumps({"bundle": str(bundle), "product": product, "live": live}))
                return 0
            print(f"edge service, bundle {bundle} ({product}), replay of {images} offered at {args.saturate_fps:g} fps "
                  f"(saturated); {args.live_rounds} rounds x {args.live_seconds:g} s per client count, alternating")
            print(f"{'live clients':>12}{'results/s':>11}{'vs ' + str(counts[0]):>8}{'frame ms p50':>14}{'p99':>8}"
                  f"{'CPU ms/result':>15}{'events/s/client':>17}{'frames/s/client':>17}  results/s per phase")
            for n, row in live["clients"].items():
                print(f"{n:>12}{row['fps_median']:>11.2f}{row['fps_vs_first_count']:>8.3f}{row['frame_ms_p50']:>14.2f}"
                      f"{row['frame_ms_p99']:>8.2f}{row['cpu_ms_per_result']:>15.2f}{row['events_per_client_s']:>17.2f}"
                      f"{row['frames_per_client_s']:>17.2f}  {row['fps_per_phase']}")
            return 0
        report = {"bundle": str(bundle), "product": product,
                  "saturated": _run(store_root, product, images, args.saturate_fps, args.seconds, work,
                                    args.threads),
                  "paced": _run(store_root, product, images, args.paced_fps, args.seconds, work, args.threads)}
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
