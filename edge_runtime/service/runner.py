"""The edge service loop: camera -> newest-frame slot -> inspector -> durable MQTT results.

Threads and why:

- the acquisition worker grabs frames and drops them into a one-frame slot (newest wins), so a slow
  inference never queues frames without bound and the camera's buffers never run dry;
- the inference thread takes one frame at a time, inspects it and hands the result to the publisher, which
  writes it to the on-disk queue (fsync) before sending it: a verdict survives a broker outage or a kill;
- with ``overlap_frames``, a backbone thread runs the first half of each frame (preprocessing, backbone) and
  hands it over (one frame at most) to the inference thread, which concludes it while the next frame's backbone
  runs: results stay in frame order, each frame is concluded with the bundle its backbone ran with, and a frame
  handed over is concluded and published even when the service stops;
- bundle switches (SIGHUP, the ``reload``/``switch_product`` commands) load and validate the new bundle
  off the inference thread, then swap it in between two frames: the camera keeps running and no frame is
  inspected by half a bundle.  A bundle that fails validation is refused and the old one keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import __version__
from ..acquisition import AcquisitionWorker, Frame, FrameSource, fetch_timeout_s, open_source
from ..core.bundle import BundleError
from ..core.overlay import heatmap_overlay
from ..core.pipeline import Inspector, open_inspector
from ..publishing import Command, DiskQueue, MqttPublisher, QueueLockedError, Region, ResultMessage
from ..publishing.command_auth import CommandAuth, read_secret
from ..store import BundleStore, StoreError
from .config import EdgeConfig
from .health import HealthServer, assess
from .live import LiveHub
from .metrics import ServiceMetrics
from .notify import SystemdNotifier, WatchdogPolicy, WatchdogThread
from .outputs import build_sinks

log = logging.getLogger(__name__)


class FrameSlot:
    """Holds at most one frame: a new frame replaces an unconsumed one, which is counted as dropped."""

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify()

    def take(self, timeout_s: float) -> Frame | None:
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout_s)
            frame, self._frame = self._frame, None
            return frame


@dataclass
class Served:
    """The bundle being served, swapped as a whole."""

    product: str
    version: str
    path: Path
    inspector: Inspector


class ServiceError(RuntimeError):
    """The service cannot start (no bundle to serve, unusable queue directory, ...)."""


class EdgeService:
    def __init__(self, cfg: EdgeConfig, source_factory: Callable[[], FrameSource] | None = None,
                 notifier: SystemdNotifier | None = None) -> None:
        self.cfg = cfg
        self.store = BundleStore(cfg.bundles.store, trust=cfg.bundles.trust())
        if not cfg.bundles.require_signature:
            log.warning("bundles.require_signature is off: any intact bundle in %s is served, whoever made it "
                        "(set it with bundles.trust_store on a production line)", cfg.bundles.store)
        self.source_factory = source_factory or (lambda: open_source(cfg.camera))
        self.notifier = notifier or SystemdNotifier()
        self.metrics = ServiceMetrics()
        self.slot = FrameSlot()
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._swap_lock = threading.Lock()
        self._pending: Served | None = None
        self.heartbeat = time.monotonic()
        self._started_mono = time.monotonic()
        self.camera_state = "starting"
        self.camera_detail = ""
        self.triggered = False
        self.last_frame: tuple[Frame, np.ndarray | None, float] | None = None  # frame, heatmap, threshold
        self.results = 0
        # a first start with engine: tensorrt may build the plans (minutes on a Jetson): keep systemd's start
        # timeout from ending it while that runs
        with self.notifier.extending_start(f"loading {cfg.bundles.product}'s bundle (engine {cfg.engine})"):
            self.served = self._load(cfg.bundles.product)
        self.metrics.bundle_info(self.served.product, self.served.version)
        try:
            cfg.queue.dir.mkdir(parents=True, exist_ok=True)
            self.queue = DiskQueue(cfg.queue.dir, int(cfg.queue.max_mb * 1024 * 1024),
                                   memory_max_bytes=int(cfg.queue.memory_max_mb * 1024 * 1024))
        except OSError as exc:
            raise ServiceError(f"queue.dir {cfg.queue.dir}: cannot use it ({exc.strerror or exc})") from None
        except QueueLockedError as exc:
            raise ServiceError(f"queue.dir {cfg.queue.dir}: {exc}") from None
        command_auth = None
        if cfg.commands.require_auth:
            try:
                command_auth = CommandAuth(read_secret(cfg.commands.secret_file), cfg.commands.max_age_s)
            except ValueError as exc:
                self.queue.close()
                raise ServiceError(str(exc)) from None
        self.publisher = MqttPublisher(cfg.mqtt, self.queue, on_command=self._on_command,
                                       on_connection=self._on_connection, status_provider=self._status,
                                       command_auth=command_auth)
        self.worker = AcquisitionWorker(self._make_source, on_frame=self.slot.put, on_state=self._on_camera_state,
                                        fetch_timeout_s=fetch_timeout_s(cfg.camera),
                                        reconnect_initial_s=cfg.camera.reconnect_initial_s,
                                        reconnect_max_s=cfg.camera.reconnect_max_s)
        try:
            self.sinks = build_sinks(cfg, self._on_command, store=self.store,
                                     report_status=self.publisher.publish_status)
        except (OSError, QueueLockedError, ValueError) as exc:
            self.queue.close()
            raise ServiceError(f"cannot start an output: {exc}") from None
        except Exception:
            self.queue.close()
            raise
        for sink in self.sinks:  # a durable sink takes what a kill left on the JSON queue only
            catch_up = getattr(sink, "catch_up", None)
            try:
                if catch_up is not None:
                    catch_up(self.queue)
            except Exception:
                log.exception("output %s: catching up with the result queue failed", sink.name)
        self.health: HealthServer | None = None
        self.live: LiveHub | None = None  # the operator's live page, on the health port (same opt-in)
        if cfg.health.port:
            try:
                self.live = LiveHub(self.health_report, broker=f"{cfg.mqtt.host}:{cfg.mqtt.port}",
                                    camera=cfg.camera.name)
                self.health = HealthServer(cfg.health.host, cfg.health.port, health=self.health_report,
                                           metrics=self.render_metrics, live=self.live)
            except OSError as exc:
                self.queue.close()
                raise ServiceError(f"health.port {cfg.health.port} on {cfg.health.host}: cannot listen "
                                   f"({exc.strerror or exc})") from None
        self.watchdog: WatchdogThread | None = None
        interval = self.notifier.watchdog_interval_s()
        if interval:
            self.watchdog = WatchdogThread(self.notifier, WatchdogPolicy(cfg.watchdog_idle_s), self._watchdog_probe)
        self._inference = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        # overlap_frames: the frame's first half on its own thread, one extracted frame at most between them
        self._front: threading.Thread | None = None
        self._handoff: queue.Queue | None = None
        self.front_heartbeat = time.monotonic()
        if cfg.overlap_frames:
            self._handoff = queue.Queue(maxsize=1)
            self._front = threading.Thread(target=self._front_loop, name="backbone", daemon=True)

    # ---- bundles -------------------------------------------------------------------------------------
    def _load(self, product: str) -> Served:
        """Resolve the product's current bundle and load it fully (hashes, arrays, a smoke run of each graph)."""
        try:
            path = self.store.current_path(product)
            signer = self.store.trust.check(path)
            inspector = open_inspector(path, threads=self.cfg.threads, engine=self.cfg.engine,
                                       device=self.cfg.engine_device)
        except StoreError as exc:
            raise ServiceError(str(exc)) from None
        except BundleError as exc:
            raise ServiceError(f"bundle refused: {exc}") from None
        if self.cfg.latency_budget_ms is not None:
            inspector.budget_ms = self.cfg.latency_budget_ms
        if signer is not None:
            log.info("bundle %s@%s is signed by %s", product, path.name, signer)
        m = inspector.bundle.manifest
        if m.product != product:
            log.warning("store product %r serves a bundle made for %r", product, m.product)
        return Served(product=product, version=path.name, path=path, inspector=inspector)

    def switch(self, product: str | None = None) -> Served:
        """Load and validate a bundle off the inference thread; it is swapped in before the next frame.

        Raises :class:`ServiceError` (the old bundle keeps serving)."""
        served = self._load(product or self.served.product)
        with self._swap_lock:
            self._pending = served
        swapper = self._front or self._inference  # the thread that starts frames swaps bundles in
        deadline = time.monotonic() + 30.0
        while swapper.is_alive() and time.monotonic() < deadline:
            with self._swap_lock:
                if self._pending is None:
                    break
            time.sleep(0.005)
        if not swapper.is_alive():
            self._swap_in()
        return served

    def _swap_in(self) -> None:
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        old = self.served
        self.served = pending
        self.metrics.bundle_info(pending.product, pending.version)
        log.info("now serving %s@%s (was %s@%s)", pending.product, pending.version, old.product, old.version)
        self.publisher.publish_status({})
        self._sinks_status()

    def _reload_from_signal(self) -> None:
        try:
            served = self.switch()
            self.metrics.reloads_total.inc(result="ok")
            log.info("SIGHUP: reloaded %s@%s", served.product, served.version)
        except ServiceError as exc:
            self.metrics.reloads_total.inc(result="failed")
            log.error("SIGHUP: reload refused, still serving %s@%s: %s", self.served.product, self.served.version,
                      exc)

    # ---- callbacks -----------------------------------------------------------------------------------
    def _make_source(self) -> FrameSource:
        source = self.source_factory()
        self.triggered = bool(getattr(source, "triggered", False))
        return source

    def _on_camera_state(self, state: str, detail: str) -> None:
        self.camera_state, self.camera_detail = state, detail
        self.metrics.camera_state(state)
        log.log(logging.WARNING if state == "lost" else logging.INFO, "camera %s: %s %s", self.cfg.camera.name,
                state, detail)
        self.publisher.publish_status({})
        self._sinks_status()

    def _on_connection(self, connected: bool) -> None:
        self.metrics.mqtt_connected.set(1.0 if connected else 0.0)
        self._sinks_status()

    def _to_sinks(self, method: str, *args: object) -> None:
        """Call ``method`` on every sink; a sink that raises is logged and never stops the others or the loop."""
        for sink in getattr(self, "sinks", ()):
            try:
                getattr(sink, method)(*args)
            except Exception:
                log.exception("output %s: %s failed", sink.name, method)

    def _sinks_status(self) -> None:
        self._to_sinks("update_status", {**self._status(), "mqtt_connected": bool(self.publisher.connected)})

    def _status(self) -> dict:
        return {"product": self.served.product, "bundle_version": self.served.version,
                "camera_state": self.camera_state, "camera_detail": self.camera_detail, "pid": os.getpid(),
                "version": __version__}

    def _engine(self) -> dict | None:
        """Which engine runs the served bundle (``auto``: what it chose and passed over)."""
        engines = self.served.inspector.engines
        return engines.describe() if engines is not None else None

    def _on_command(self, cmd: Command) -> dict:
        if cmd.command == "reload":
            return self._command_switch(None)
        if cmd.command == "switch_product":
            return self._command_switch(cmd.product)
        if cmd.command == "snapshot":
            return self._snapshot()
        if cmd.command == "status":
            return {"ok": True, **self._status(), "results": self.results, "dropped_frames": self.slot.dropped,
                    "queue_depth": self.queue.depth}
        return {"ok": False, "error": f"command {cmd.command!r} is not handled"}

    def _command_switch(self, product: str | None) -> dict:
        try:
            served = self.switch(product)
        except ServiceError as exc:
            self.metrics.reloads_total.inc(result="failed")
            return {"ok": False, "error": str(exc), "product": self.served.product,
                    "bundle_version": self.served.version}
        self.metrics.reloads_total.inc(result="ok")
        return {"ok": True, "product": served.product, "bundle_version": served.version}

    def _snapshot(self) -> dict:
        last = self.last_frame
        if last is None:
            return {"ok": False, "error": "no frame inspected yet"}
        frame, heatmap, threshold = last
        folder = self.cfg.queue.dir.parent / "snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-frame{frame.frame_id}"
        cv2.imwrite(f"{stem}.png", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
        files = [f"{stem}.png"]
        if heatmap is not None:
            cv2.imwrite(f"{stem}-heatmap.png", heatmap_overlay(frame.image, heatmap, threshold))
            files.append(f"{stem}-heatmap.png")
        return {"ok": True, "frame_id": frame.frame_id, "files": files}

    # ---- inference -----------------------------------------------------------------------------------
    def _inference_loop(self) -> None:
        while not self._stop.is_set() or self._handing_over():
            self.heartbeat = time.monotonic()
            if self._handoff is None:
                self._swap_in()
                frame = self.slot.take(0.2)
                if frame is None:
                    continue
                item: tuple = (frame, self.served, None)
            else:
                try:
                    item = self._handoff.get(timeout=0.2)
                except queue.Empty:
                    continue
            try:
                self._inspect_and_publish(*item)
            except Exception:  # never let one frame end the loop
                log.exception("frame %s: publishing failed", item[0].frame_id)

    def _handing_over(self) -> bool:
        """Overlapped: a frame is extracted or on its way, so the inference thread must not stop yet."""
        return self._handoff is not None and (not self._handoff.empty()
                                              or (self._front is not None and self._front.is_alive()))

    def _front_loop(self) -> None:
        """overlap_frames: preprocessing and backbone of the next frame, handed to the inference thread."""
        while not self._stop.is_set():
            self.front_heartbeat = time.monotonic()
            self._swap_in()
            frame = self.slot.take(0.2)
            if frame is None:
                continue
            served = self.served
            try:
                extracted: object = served.inspector.extract(frame.image)
            except Exception as exc:  # concluded as an error verdict, in order, by the inference thread
                log.exception("frame %s: backbone failed", frame.frame_id)
                extracted = exc
            while self._inference.is_alive():
                try:
                    self._handoff.put((frame, served, extracted), timeout=0.2)
                    break
                except queue.Full:
                    self.front_heartbeat = time.monotonic()

    def _inspect_and_publish(self, frame: Frame, served: Served | None = None, extracted: object = None) -> None:
        served = served or self.served
        inspector = served.inspector
        heatmap = None
        t0 = time.monotonic()
        try:
            if isinstance(extracted, Exception):
                raise extracted
            result = inspector.inspect(frame.image) if extracted is None else inspector.conclude(extracted)
        except Exception as exc:  # an engine failure is reported as an error verdict, never as pass/fail
            log.exception("frame %s: inspection failed", frame.frame_id)
            fields = {"verdict": "error", "score": None, "threshold": inspector.threshold, "regions": [],
                      "timings_ms": {"total": (time.monotonic() - t0) * 1e3}, "over_budget": False,
                      "error": f"{type(exc).__name__}: {exc}"}
        else:
            heatmap = result.heatmap
            fields = {"verdict": result.verdict, "score": result.score, "threshold": result.threshold,
                      "regions": [Region.from_region(r) for r in result.regions], "timings_ms": result.timings_ms,
                      "over_budget": result.over_budget, "evidence": result.evidence, "error": None}
        message = ResultMessage(seq=self.queue.next_index, frame_id=frame.frame_id, camera=self.cfg.camera.name,
                                product=served.product, bundle_version=served.version,
                                budget_ms=inspector.budget_ms, captured_at=frame.captured_at,
                                dropped_frames=self.slot.dropped, **fields)
        self.publisher.submit_result(message)
        self._to_sinks("submit_result", message)
        self.results += 1
        self.last_frame = (frame, heatmap, inspector.threshold)
        if getattr(self, "live", None) is not None:  # a reference store for the live page, no drawing here
            self.live.publish(message, frame, heatmap)
        self._count(message, frame)
        policy = self.cfg.mqtt.heatmap
        if heatmap is not None and (policy == "all" or (policy == "fail" and message.verdict == "fail")):
            self._publish_heatmap(frame, heatmap, inspector.threshold, message.seq)

    def _publish_heatmap(self, frame: Frame, heatmap: np.ndarray, threshold: float, seq: int) -> None:
        fmt = self.cfg.mqtt.heatmap_format
        picture = heatmap_overlay(frame.image, heatmap, threshold)
        ok, data = cv2.imencode(".png" if fmt == "png" else ".jpg", picture)
        if ok:
            self.publisher.publish_heatmap(frame_id=frame.frame_id, seq=seq, image=data.tobytes(), fmt=fmt)

    def _count(self, message: ResultMessage, frame: Frame) -> None:
        m = self.metrics
        m.frames_total.inc()
        m.verdicts_total.inc(verdict=message.verdict)
        for stage, ms in message.timings_ms.items():
            m.stage_latency_ms.observe(ms, stage=stage)
        m.end_to_end_latency_ms.observe((time.monotonic() - frame.captured_mono) * 1e3)
        if message.over_budget:
            m.over_budget_total.inc()

    # ---- health --------------------------------------------------------------------------------------
    def _watchdog_probe(self) -> dict:
        return {"last_frame_mono": self.worker.last_frame_mono, "camera_state": self.camera_state,
                "triggered": self.triggered, "inference_alive": self._inference_alive()}

    def _threads(self) -> list[tuple[threading.Thread, float]]:
        """The frame threads with their last heartbeats."""
        threads = [(self._inference, self.heartbeat)]
        if self._front is not None:
            threads.append((self._front, self.front_heartbeat))
        return threads

    def _inference_alive(self) -> bool:
        return self._inference_problem() is None

    def _inference_problem(self) -> str | None:
        now = time.monotonic()
        for thread, beat in self._threads():
            if not thread.is_alive():
                return f"the {thread.name} thread is not running: no frame is inspected (restart the service)"
            if now - beat >= 30.0:
                return (f"the {thread.name} thread is stalled: no heartbeat for {now - beat:.0f} s "
                        "(restart the service)")
        return None

    def _oldest_queued_age_s(self) -> float | None:
        """Seconds the oldest queued result has waited, None when none waits.

        A result queued by this process is timed on the monotonic clock (an NTP step of the wall clock must neither
        hide a stuck queue nor invent one).  One left by a previous run can only be timed by its own
        ``captured_at``, and is at least as old as this process."""
        mono = self.queue.oldest_appended_mono()
        if mono is not None:
            return max(0.0, time.monotonic() - mono)
        try:
            oldest = self.queue.peek(1)
            captured = float(json.loads(oldest[0][1])["captured_at"]) if oldest else None
        except Exception:  # noqa: BLE001 - a closed queue (shutdown) or a record that is not a result
            log.debug("health: cannot read the oldest queued result", exc_info=True)
            captured = None
        if captured is None:
            return None
        return max(0.0, time.time() - captured, time.monotonic() - self._started_mono)

    def _health_state(self) -> tuple[str, list[str], dict]:
        """(state, reasons, details) for ``/health``; also sets the ``weakrest_health_state`` gauge."""
        sinks: dict[str, dict] = {}
        for sink in getattr(self, "sinks", ()):
            try:
                sinks[sink.name] = dict(sink.health())
            except Exception as exc:  # noqa: BLE001 - one broken output must not break /health
                log.exception("output %s: health() failed", sink.name)
                sinks[sink.name] = {"state": "failing", "error": f"health() failed: {type(exc).__name__}: {exc}"}
        connected = bool(self.publisher.connected)
        depth, held, disk_error = self.queue.depth, self.queue.held, self.queue.disk_error
        age = self._oldest_queued_age_s() if depth else None
        mqtt = self.cfg.mqtt
        state, reasons = assess(inference_problem=self._inference_problem(), broker=f"{mqtt.host}:{mqtt.port}",
                                mqtt_connected=connected, queue_depth=depth, queue_age_s=age,
                                queue_degraded_s=self.cfg.health.queue_degraded_s, queue_disk_error=disk_error,
                                queue_held=held, queue_dir=str(self.cfg.queue.dir), camera=self.cfg.camera.name,
                                camera_state=self.camera_state, camera_detail=self.camera_detail, sinks=sinks)
        self.metrics.health_state(state)
        return state, reasons, {"mqtt_connected": connected,
                                # false while connected: the broker has not (or has refused to) let commands in
                                "mqtt_commands_ready": bool(self.publisher.commands_ready), "queue_depth": depth,
                                "queue_oldest_age_s": age,
                                "queue_held": held, "queue_disk_error": disk_error, "sinks": sinks}

    def health_report(self) -> dict:
        """The ``/health`` body: ``state`` ok/degraded/failing with plain-words ``reasons``, and the counters."""
        stats = self.worker.stats
        state, reasons, details = self._health_state()
        return {**self._status(), "engine": self._engine(), **details, "ok": state == "ok", "state": state,
                "reasons": reasons,
                "inference_alive": self._inference_alive(), "latency_ms": self.metrics.latency_summary(),
                "results": self.results, "dropped_frames": self.slot.dropped,
                "queue_dropped": self.queue.dropped, "frames": stats.frames, "incomplete_frames": stats.incomplete,
                "fetch_timeouts": stats.timeouts, "camera_reconnects": stats.reconnects}

    def render_metrics(self) -> str:
        m = self.metrics
        stats = self.worker.stats
        m.dropped_frames_total.set_total(self.slot.dropped)
        m.incomplete_frames_total.set_total(stats.incomplete)
        m.fetch_timeouts_total.set_total(stats.timeouts)
        m.camera_reconnects_total.set_total(stats.reconnects)
        m.queue_depth.set(self.queue.depth)
        m.queue_held.set(self.queue.held)
        m.queue_dropped_total.set_total(self.queue.dropped)
        self._health_state()  # sets weakrest_health_state
        engine = self._engine()
        if engine is not None:
            m.engine_info(engine=engine["engine"], requested=engine["requested"])
        return m.render()

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.publisher.start()
        self._to_sinks("start")
        self._sinks_status()
        if self.health is not None:
            self.health.start()
        self._inference.start()
        if self._front is not None:
            self._front.start()
        self.worker.start()
        if self.watchdog is not None:
            self.watchdog.start()
        self.notifier.ready(f"serving {self.served.product}@{self.served.version}")
        log.info("serving %s@%s from camera %s (%s)", self.served.product, self.served.version,
                 self.cfg.camera.name, self.cfg.camera.source)

    def request_reload(self) -> None:
        self._reload_requested.set()

    def request_stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the bundle.  Returns the process exit code."""
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        self.start()
        while not self._stop.wait(0.2):
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.notifier.reloading()
                self._reload_from_signal()
                self.notifier.ready(f"serving {self.served.product}@{self.served.version}")
        self.stop()
        return 0

    def stop(self, flush_timeout_s: float = 10.0) -> None:
        """Stop the camera, finish the frame in flight, flush the result queue, publish offline."""
        self.notifier.stopping()
        self._stop.set()
        self.worker.stop()
        if self._front is not None and self._front.is_alive():
            self._front.join(timeout=30.0)
        if self._inference.is_alive():  # overlapped: after concluding the frame handed over
            self._inference.join(timeout=30.0)
        if self.watchdog is not None:
            self.watchdog.stop()
        delivered = self.publisher.close(flush_timeout_s)
        self._to_sinks("close", flush_timeout_s)
        if self.health is not None:
            self.health.stop()
        if self.queue.write_held():
            log.error("%d result(s) the full disk refused are held in memory only and are lost with this process",
                      self.queue.held)
        log.info("stopped after %d results; %d still queued on disk%s", self.results, self.queue.depth,
                 "" if delivered else " (broker unreachable: they are sent after the next start)")

