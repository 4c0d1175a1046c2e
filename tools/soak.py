"""Soak test of the edge service (``make soak``): hours at full rate through a broker that restarts.

``weakrest-edge run`` runs as its own process on a throw-away bundle store with a replay camera cycling through
the MTD test images (``../shared/data/mtd/test``) offered faster than the service inspects them, against a real
Mosquitto on loopback with persistence, and a subscriber standing in for the MES: a persistent session (MQTT 5
session expiry, clean start off) subscribed at QoS 1, so what the broker accepted survives a restart, and what it
did not acknowledge the service's on-disk queue sends again.  The service, the broker and the subscriber are
started by :func:`tools.bench_service.serving`, the same harness as ``make bench-service``.

For ``--minutes`` (default 60) the broker is stopped (SIGTERM, it saves its sessions) and started again, a new
mosquitto process on the same port, every ``--broker-restart-minutes`` (default 10), down for
``--broker-down-seconds``; after each restart the tool waits until the service says it is connected again
and until every result produced during the outage reached the subscriber, and records how long that took.

Per window of ``--window-minutes`` (default 10), by arrival time at the subscriber: results/s (first copies),
the results' inspection time ``timings_ms.total`` p50/p99, grab -> delivery at the subscriber p50/p99/max (the
frame's ``captured_at`` to the message's arrival; it includes the outage for results held in the queue), and at
the window's end the service process's RSS (``VmRSS`` of /proc/<pid>/status), open file descriptors (entries
of /proc/<pid>/fd) and threads, the largest queue depth seen (``/health``), restarts and duplicates.

The seq check: the subscriber must hold every seq from 0 (the fresh queue's first) to the last it received and
everything the service had produced when the time was up (it waits for those before stopping the service):
none missing; duplicates (at-least-once delivery across a restart) are counted, not failed.  Memory must stay
flat: RSS growth from the end of the first window (the warm-up) to the end below ``--max-rss-growth`` (5 %).
PASS needs both (and a service that stayed up); FAIL exits 1.  Everything goes into ``--out`` (JSON), the
service's log beside it.

Without ``../shared/data`` (a fresh clone) the soak is skipped with a message (exit 0) unless ``--images`` names
other images.  It needs a fitted bundle, like ``make bench-service``: ``--bundle`` (default
``runs/mtd/unsupervised``, which ``make bench-mtd`` fits on MTD), and Mosquitto (``apt-get install mosquitto``).

    .venv/bin/python tools/soak.py --minutes 60 --broker-restart-minutes 10 --window-minutes 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.bench_service import SATURATE_FPS, bundle_store, open_bundle, proc_status, serving, vm_mb  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
MTD_TEST = SHARED_DATA / "mtd" / "test"
DEFAULT_BUNDLE = ROOT / "runs" / "mtd" / "unsupervised"
BUNDLE_HINT = ("run `make bench-mtd` to fit the MTD bundle there, or pass --bundle PATH (e.g. demo_out/bundle "
               "from `make demo`)")


class Tally:
    """What the MES stand-in received: the first copy of each seq with its arrival time (epoch s), inspection
    time and grab -> delivery latency; duplicates counted; thread-safe (paho's network thread calls it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.arrival: list[float] = []
        self.seq: list[int] = []
        self.total_ms: list[float] = []
        self.delivery_ms: list[float] = []
        self.seen: set[int] = set()
        self.duplicate_arrivals: list[float] = []
        self.out_of_order = 0  # first copies with a seq below one already received (a gap filled later)
        self.undecodable = 0
        self.contiguous = 0  # the lowest seq not received yet
        self.highest = -1

    def __call__(self, arrival: float, payload: bytes) -> None:
        from edge_runtime.publishing.messages import decode_result

        try:
            r = decode_result(payload)
        except Exception:  # noqa: BLE001 - counted; the check below then finds its seq missing
            with self._cond:
                self.undecodable += 1
            return
        with self._cond:
            if r.seq in self.seen:
                self.duplicate_arrivals.append(arrival)
                return
            self.seen.add(r.seq)
            if r.seq < self.highest:
                self.out_of_order += 1
            self.highest = max(self.highest, r.seq)
            self.arrival.append(arrival)
            self.seq.append(r.seq)
            self.total_ms.append(float(r.timings_ms.get("total", math.nan)))
            self.delivery_ms.append((arrival - r.captured_at) * 1e3)
            while self.contiguous in self.seen:
                self.contiguous += 1
            self._cond.notify_all()

    def wait_contiguous(self, n: int, timeout_s: float) -> bool:
        """Wait until every seq below ``n`` has arrived; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.contiguous < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[float]]:
        with self._cond:
            return (np.array(self.arrival), np.array(self.seq), np.array(self.total_ms), np.array(self.delivery_ms),
                    list(self.duplicate_arrivals))


def health(port: int, timeout_s: float = 5.0) -> dict:
    """The service's ``/health`` body (also when it answers 503: degraded); {} when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except ValueError:
            return {}
    except (OSError, ValueError):
        return {}


def sample(pid: int, port: int, t0: float) -> dict:
    """RSS, fds, threads of the service process and what its /health says, ``t_s`` seconds into the soak."""
    t_s, wall = round(time.monotonic() - t0, 3), time.time()
    status = proc_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))  # before /health: its request would be counted as one more
    h = health(port)
    return {"t_s": t_s, "wall": wall, "rss_mb": vm_mb(pid, "VmRSS", status),
            "hwm_mb": vm_mb(pid, "VmHWM", status), "fds": fds,
            "threads": int(status.get("Threads", "0")), "results": h.get("results"),
            "queue_depth": h.get("queue_depth"), "mqtt_connected": h.get("mqtt_connected"),
            "state": h.get("state"), "dropped_frames": h.get("dropped_frames"), "queue_dropped": h.get("queue_dropped")}


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def _window_stats(index: int, start: dict, end: dict, tally: Tally, samples: list[dict],
                  restarts: list[dict]) -> dict:
    arrival, _, total, delivery, dups = tally.snapshot()
    inside = (arrival > start["wall"]) & (arrival <= end["wall"])
    seconds = end["wall"] - start["wall"]
    depths = [s["queue_depth"] for s in samples if start["t_s"] < s["t_s"] <= end["t_s"]
              and s["queue_depth"] is not None]
    depths += [r["queue_depth_max"] for r in restarts if start["t_s"] <= r["t_s"] < end["t_s"]]
    return {"window": index, "start_s": start["t_s"], "end_s": end["t_s"], "results": int(inside.sum()),
            "results_per_s": round(float(inside.sum()) / seconds, 2) if seconds > 0 else None,
            "total_ms_p50": _pct(total[inside], 50), "total_ms_p99": _pct(total[inside], 99),
            "delivery_ms_p50": _pct(delivery[inside], 50), "delivery_ms_p99": _pct(delivery[inside], 99),
            "delivery_ms_max": _pct(delivery[inside], 100),
            "rss_mb": round(end["rss_mb"], 1), "fds": end["fds"], "threads": end["threads"],
            "queue_depth_max": max(depths, default=0),
            "restarts": sum(start["t_s"] <= r["t_s"] < end["t_s"] for r in restarts),
            "duplicates": sum(start["wall"] < t <= end["wall"] for t in dups)}


HEADER = (f"{'window':>6} {'minutes':>13} {'results/s':>9} {'total ms p50':>12} {'p99':>7} "
          f"{'grab->delivery ms p50':>21} {'p99':>8} {'max':>8} {'RSS MB':>7} {'fds':>4} {'threads':>7} "
          f"{'queue max':>9} {'restarts':>8} {'dups':>5}")


def _row(w: dict, digits: int = 1) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    minutes = f"{w['start_s'] / 60:.{digits}f}-{w['end_s'] / 60:.{digits}f}"
    return (f"{w['window']:>6} {minutes:>13} {f(w['results_per_s'], '.2f'):>9} "
            f"{f(w['total_ms_p50'], '.1f'):>12} {f(w['total_ms_p99'], '.1f'):>7} "
            f"{f(w['delivery_ms_p50'], '.1f'):>21} {f(w['delivery_ms_p99'], '.1f'):>8} "
            f"{f(w['delivery_ms_max'], '.0f'):>8} {w['rss_mb']:>7.1f} {w['fds']:>4} {w['threads']:>7} "
            f"{w['queue_depth_max']:>9} {w['restarts']:>8} {w['duplicates']:>5}")


def _restart(broker, sub, port: int, tally: Tally, t0: float, down_s: float, timeout_s: float) -> dict:
    """Stop the broker process, leave it down ``down_s``, start a new one; wait for the service to reconnect and
    for everything produced until then to reach the subscriber."""
    before = health(port)
    old_pid, connects = broker.pid, sub.connects
    at = time.monotonic()
    broker.stop()
    stopped = time.monotonic()
    time.sleep(down_s)  # the outage itself: a fixed length by design
    broker.start()
    back = time.monotonic()
    record = {"t_s": round(at - t0, 3), "old_pid": old_pid, "new_pid": broker.pid,
              "stop_s": round(stopped - at, 3), "down_s": round(back - stopped, 3),
              "results_before": before.get("results"), "reconnect_s": None, "caught_up_s": None,
              "subscriber_reconnected": False, "queue_depth_max": before.get("queue_depth") or 0}
    deadline = back + timeout_s
    produced = None
    while time.monotonic() < deadline:
        h = health(port)
        record["queue_depth_max"] = max(record["queue_depth_max"], h.get("queue_depth") or 0)
        if h.get("mqtt_connected") and record["reconnect_s"] is None:
            record["reconnect_s"] = round(time.monotonic() - back, 3)
            produced = h.get("results")
        if produced is not None and tally.contiguous >= produced:
            record["caught_up_s"] = round(time.monotonic() - back, 3)  # every result until reconnect delivered
            break
        time.sleep(0.2)
    record["results_at_reconnect"] = produced
    record["subscriber_reconnected"] = sub.connects > connects
    present = getattr(sub, "sessions_present", None)  # per connect: did the broker still hold the session?
    record["subscriber_session_present"] = bool(present[-1]) if present and record["subscriber_reconnected"] else None
    return record


def _log_summary(path: Path) -> dict:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    bad = [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")]
    return {"lines": len(lines), "warnings": sum(" WARNING " in ln for ln in lines), "errors": len(bad),
            "error_lines": bad[-20:]}


def soak(args: argparse.Namespace, bundle: Path, images: Path, work: Path, log_path: Path) -> dict:
    from edge_runtime.publishing.broker import free_port

    duration = args.minutes * 60.0
    window = args.window_minutes * 60.0
    every = args.broker_restart_minutes * 60.0 if args.broker_restart_minutes > 0 else math.inf
    period = args.sample_seconds or min(5.0, window / 5)
    n_windows = max(1, math.ceil(duration / window - 1e-9))
    window_ends = [min((k + 1) * window, duration) for k in range(n_windows)]
    restart_at = [j * every for j in range(1, math.ceil(duration / every) + 1)] if every < math.inf else []
    restart_at = [t for t in restart_at if t < duration - 1e-9]

    store_root, product = bundle_store(bundle, work)
    tally = Tally()
    port = free_port()
    report: dict = {"bundle": str(bundle), "product": product, "images": str(images), "offered_fps": args.fps,
                    "minutes": args.minutes, "broker_restart_minutes": args.broker_restart_minutes,
                    "broker_down_s": args.broker_down_seconds, "window_minutes": args.window_minutes,
                    "sample_s": period, "max_rss_growth_pct": args.max_rss_growth}
    with serving(store_root, product, images, args.fps, work, "soak", args.threads, port, record=tally,
                 broker_impl="mosquitto", persistence=True, persistent_subscriber=True, warmup_s=0.0,
                 service_log=log_path) as run:
        pid, broker, sub = run.proc.pid, run.broker, run.subscriber
        report["broker"] = {"impl": broker.impl, "port": broker.port, "persistence": broker.persistence,
                            "protocol": broker.protocol}
        t0 = time.monotonic()
        start = sample(pid, port, t0)
        report["start"] = start
        print(f"start: RSS {start['rss_mb']:.1f} MB, {start['fds']} fds, {start['threads']} threads "
              f"(first result in; the first window is the warm-up)", flush=True)
        print(HEADER, flush=True)
        samples, restarts, windows = [start], [], []
        boundary = start
        next_sample = period
        while window_ends:
            if run.proc.poll() is not None:
                report["service_exit_code"] = run.proc.returncode
                print(f"the service exited ({run.proc.returncode}) at {time.monotonic() - t0:.0f} s", flush=True)
                break
            due = min(window_ends[0], restart_at[0] if restart_at else math.inf, next_sample)
            left = due - (time.monotonic() - t0)
            if left > 0:
                time.sleep(min(left, 1.0))  # the schedule: windows, restarts and samples fall due by the clock
                continue
            now = time.monotonic() - t0
            if run.proc.poll() is not None:
                continue  # reported at the top of the loop
            if now >= window_ends[0]:  # a window's end before a restart due at the same time
                window_ends.pop(0)
                end = sample(pid, port, t0)
                samples.append(end)
                windows.append(_window_stats(len(windows) + 1, boundary, end, tally, samples, restarts))
                print(_row(windows[-1], 1 if args.window_minutes >= 1 else 2), flush=True)
                boundary = end
            elif restart_at and now >= restart_at[0]:
                restart_at.pop(0)
                restarts.append(_restart(broker, sub, port, tally, t0, args.broker_down_seconds,
                                         args.recover_timeout))
            else:
                samples.append(sample(pid, port, t0))
                next_sample = now + period
        alive = run.proc.poll() is None
        end = samples[-1]  # the last window's end (or the last sample before the service died)
        report["end"] = end
        produced = end.get("results") if alive else None
        waited = time.monotonic()
        drained = tally.wait_contiguous(produced, args.drain_timeout) if produced is not None else False
        report["drained"] = {"produced_at_end": produced, "all_delivered": drained,
                             "wait_s": round(time.monotonic() - waited, 3)}
        report["service_alive_at_end"] = alive
    report["windows"], report["restarts"], report["samples"] = windows, restarts, samples
    arrival, seqs, _, _, dups = tally.snapshot()
    last = int(seqs.max()) if len(seqs) else -1
    top = max(last + 1, produced or 0)
    missing = sorted(set(range(top)) - tally.seen)
    first = int(seqs.min()) if len(seqs) else None
    report["seq"] = {"first": first, "last": last, "received": len(tally.seen), "expected": top,
                     "missing": len(missing), "missing_between_first_and_last":
                         sum(first is not None and first <= s <= last for s in missing),
                     "missing_seqs": missing[:100], "duplicates": len(dups), "out_of_order": tally.out_of_order,
                     "undecodable": tally.undecodable}
    warm = windows[0]["rss_mb"] if windows else None
    growth = (end["rss_mb"] - warm) / warm * 100 if warm else None
    report["memory"] = {"rss_start_mb": round(start["rss_mb"], 1), "rss_after_warmup_mb": warm,
                        "rss_end_mb": round(end["rss_mb"], 1), "rss_growth_pct": None if growth is None
                        else round(growth, 2), "rss_peak_mb": round(end["hwm_mb"], 1),
                        "fds_start": start["fds"], "fds_after_warmup": windows[0]["fds"] if windows else None,
                        "fds_end": end["fds"], "threads_start": start["threads"], "threads_end": end["threads"]}
    reasons = []
    if not report["service_alive_at_end"]:
        reasons.append("the service process died")
    if len(windows) < n_windows:
        reasons.append(f"only {len(windows)} of {n_windows} windows completed")
    if missing:
        reasons.append(f"{len(missing)} seq(s) missing")
    if growth is None or growth >= args.max_rss_growth:
        reasons.append(f"RSS grew {growth:.2f} % after warm-up (limit {args.max_rss_growth:g} %)"
                       if growth is not None else "no RSS after warm-up")
    report["pass"], report["fail_reasons"] = not reasons, reasons
    return report


def _summary(r: dict) -> None:
    m, s = r["memory"], r["seq"]
    print(f"end:   RSS {m['rss_end_mb']:.1f} MB, {m['fds_end']} fds, {m['threads_end']} threads "
          f"(start {m['rss_start_mb']:.1f} MB, {m['fds_start']} fds, {m['threads_start']} threads; "
          f"peak RSS {m['rss_peak_mb']:.1f} MB)")
    if r["restarts"]:
        rec = [x["reconnect_s"] for x in r["restarts"] if x["reconnect_s"] is not None]
        cau = [x["caught_up_s"] for x in r["restarts"] if x["caught_up_s"] is not None]
        print(f"broker restarts: {len(r['restarts'])} (mosquitto pids "
              f"{' -> '.join(str(x) for x in [r['restarts'][0]['old_pid']] + [x['new_pid'] for x in r['restarts']])}"
              f"), each down {statistics.median(x['down_s'] for x in r['restarts']):.1f} s; service reconnected "
              f"{len(rec)}/{len(r['restarts'])}, after max {max(rec, default=math.nan):.1f} s; outage's results "
              f"delivered {len(cau)}/{len(r['restarts'])}, within max {max(cau, default=math.nan):.1f} s; "
              f"queue depth max {max(x['queue_depth_max'] for x in r['restarts'])}; subscriber's session kept "
              f"{sum(bool(x.get('subscriber_session_present')) for x in r['restarts'])}/{len(r['restarts'])}")
    else:
        print("broker restarts: none")
    d = r["drained"]
    print(f"seq check: {s['first']}..{s['last']} at the subscriber ({s['received']} distinct; the service had "
          f"produced {d['produced_at_end']} when the time was up, all delivered: {d['all_delivered']}); missing "
          f"{s['missing']}, duplicates {s['duplicates']}, out of order {s['out_of_order']}")
    growth = m["rss_growth_pct"]
    print(f"memory: RSS after warm-up (end of window 1) {m['rss_after_warmup_mb']} MB -> end {m['rss_end_mb']} MB: "
          f"{'-' if growth is None else format(growth, '+.2f')} % (limit < {r['max_rss_growth_pct']:g} %); fds "
          f"{m['fds_after_warmup']} -> {m['fds_end']}")
    lg = r.get("service_log", {})
    print(f"service log: {lg.get('warnings', 0)} warning, {lg.get('errors', 0)} error line(s)")
    print("PASS" if r["pass"] else "FAIL: " + "; ".join(r["fail_reasons"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to soak")
    parser.add_argument("--broker-restart-minutes", type=float, default=10.0,
                        help="stop and start the broker this often (0: never)")
    parser.add_argument("--broker-down-seconds", type=float, default=5.0, help="how long each restart keeps it down")
    parser.add_argument("--window-minutes", type=float, default=10.0, help="one table row per window")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle to serve (default: what make "
                        "bench-mtd fits on MTD)")
    parser.add_argument("--images", default=str(MTD_TEST), help="images the replay camera cycles through")
    parser.add_argument("--fps", type=float, default=SATURATE_FPS,
                        help="offered frame rate: above what the service sustains, so it runs at full rate")
    parser.add_argument("--threads", type=int, default=None, help="the service's inference threads")
    parser.add_argument("--max-rss-growth", type=float, default=5.0, help="PASS limit, %% RSS growth after warm-up")
    parser.add_argument("--sample-seconds", type=float, default=None,
                        help="RSS/fds/queue sample period (default min(5 s, window / 5))")
    parser.add_argument("--recover-timeout", type=float, default=120.0,
                        help="longest wait after a restart for the service to reconnect and catch up")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="longest wait at the end for every produced result to arrive")
    parser.add_argument("--out", default=str(ROOT / "runs" / "soak" / "soak.json"), help="JSON report")
    args = parser.parse_args(argv)
    out = Path(args.out)
    images = Path(args.images).resolve()
    if not images.is_dir():
        if images == MTD_TEST.resolve() and not SHARED_DATA.is_dir():
            print(f"soak skipped: {SHARED_DATA} is absent (a fresh clone has no MTD images); pass --images DIR to "
                  "replay other images")
            return 0
        print(f"error: no images at {images}", file=sys.stderr)
        return 2
    bundle = open_bundle(args.bundle, BUNDLE_HINT)
    if bundle is None:
        return 2
    from edge_runtime.publishing.broker import find_mosquitto

    if find_mosquitto() is None:
        print("error: the soak restarts a real Mosquitto (with persistence): apt-get install mosquitto "
              "(or make system-deps)",
              file=sys.stderr)
        return 2
    if min(args.minutes, args.window_minutes) <= 0:
        print("error: --minutes and --window-minutes must be > 0", file=sys.stderr)
        return 2
    print(f"soak: weakrest-edge run, bundle {bundle}, replay of {images} offered at {args.fps:g} frames/s (full "
          f"rate), Mosquitto on loopback with persistence, MES stand-in on a persistent QoS 1 session; "
          f"{args.minutes:g} min, broker restart every {args.broker_restart_minutes:g} min (down "
          f"{args.broker_down_seconds:g} s), windows of {args.window_minutes:g} min", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_copy = out.with_name(out.stem + ".service.log")
    with tempfile.TemporaryDirectory(prefix="weakrest-soak-") as tmp:
        work = Path(tmp)
        log_path = work / "service.log"
        report = soak(args, bundle, images, work, log_path)
        report["service_log"] = {"path": str(log_copy), **_log_summary(log_path)}
        if log_path.is_file():
            shutil.copyfile(log_path, log_copy)
    out.write_text(json.dumps(report, indent=1))
    _summary(report)
    print(f"report: {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
