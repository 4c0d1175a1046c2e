"""The station's fleet agent: hears releases over MQTT, pulls them by digest, stages them in the store, and
has the service activate them between frames as the rollout policy says (:mod:`.rollout`).

It is one of the service's outputs (a :class:`~edge_runtime.publishing.sink.ResultSink`): the service hands it
every result (a canary counts its rejects from them) and every status change (what it serves), and gives it
two callables, ``reload`` (swap in the store's current bundle between frames; returns the command reply) and
``report`` (add keys to the station's retained status).  Its own MQTT connection only subscribes to the
release and canary topics and publishes this station's canary verdicts (retained, again at every connect).

One worker thread does everything slow (pulls, store writes, reloads) one event at a time; a failed pull is
tried again with a doubling back-off, and a newer announcement meanwhile replaces the one being retried.  The
running bundle serves throughout: nothing here touches it until the service has loaded the new one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from ..core.bundle import MANIFEST
from ..publishing.config import MQTTConfig
from ..publishing.messages import ResultMessage
from ..store import BundleStore, StoreError
from .announce import paho_client
from .config import FleetConfig
from .oci import PullError, pull_bundle
from .release import (
    CanaryVerdict,
    FleetMessageError,
    ReleaseMessage,
    canary_topic,
    encode,
    parse_canary,
    parse_release,
    release_topic,
)
from .rollout import Action, Rollout, Target, Verdict

log = logging.getLogger(__name__)
DIGESTS = ".fleet-digests.json"  # version -> OCI digest, beside the versions in <store>/<product>/


class DigestBook:
    """Which OCI digest each stored version came from (so a station can say what it runs, and a restart
    does not pull again what it already has)."""

    def __init__(self, store: BundleStore, product: str) -> None:
        self.store, self.product = store, product
        self.path = store.product_dir(product) / DIGESTS

    def read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("fleet: %s is not readable (%s); digests of stored versions are unknown", self.path, exc)
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, version: str | None) -> str | None:
        return None if version is None else self.read().get(version)

    def record(self, version: str, digest: str) -> None:
        with self.store.locked(self.product) as pdir:
            book = self.read()
            book[version] = digest
            tmp = pdir / f"{DIGESTS}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(book, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)


class FleetAgent:
    name = "fleet"

    def __init__(self, cfg: FleetConfig, mqtt_cfg: MQTTConfig, store: BundleStore, product: str, station: str,
                 reload: Callable[[], dict[str, Any]], report: Callable[[dict[str, Any]], Any]) -> None:
        try:
            import oras.provider  # noqa: F401  - refuse at start, not at the first release
        except ImportError:
            raise ValueError("fleet.enabled needs the oras package: pip install 'weakrest-edge[fleet]'") from None
        if mqtt_cfg.topic_prefix.split("/")[1] == "fleet":
            raise ValueError(f"mqtt.topic_prefix {mqtt_cfg.topic_prefix!r}: the line level 'fleet' is taken by the "
                             "fleet's topics (<site>/fleet/<product>/...); name the line otherwise")
        self.cfg, self.mqtt_cfg, self.store, self.product, self.station = cfg, mqtt_cfg, store, product, station
        self.site = cfg.site or mqtt_cfg.topic_prefix.split("/", 1)[0]
        self._reload, self._report = reload, report
        self.release_topic = release_topic(self.site, product)
        self.canary_filter = canary_topic(self.site, product, "+")
        self.digests = DigestBook(store, product)
        self.workdir = store.root / f".incoming-{station}"
        self._lock = threading.RLock()
        running = store.current(product)
        digest = self.digests.get(running)
        self.rollout = Rollout(cfg.rollout, station, list(cfg.canary_stations), cfg.canary_frames,
                               cfg.max_reject_rate, running=Target(running, digest) if running and digest else None)
        self.served_product, self.served_version = product, running
        self.release: ReleaseMessage | None = None
        self.last_problem: str | None = None  # the last message refused, in plain words
        self._events: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._retry_at: float | None = None
        self._attempts = 0
        self._verdicts_out: dict[str, bytes] = {}  # topic -> retained payload, published again at every connect
        self._stop = threading.Event()
        self._last_reported = ""
        self._connected = False
        self._worker = threading.Thread(target=self._work, name="fleet-agent", daemon=True)
        self._client = self._make_client()

    # ---- ResultSink ----------------------------------------------------------------------------------
    def start(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)  # what a killed pull left
        self._worker.start()
        cfg = self.mqtt_cfg
        self._client.connect_async(cfg.host, cfg.port, cfg.keepalive_s)
        self._client.loop_start()
        self._publish_state()
        log.info("fleet: %s policy for %s, listening on %s", self.cfg.rollout, self.product, self.release_topic)

    def submit_result(self, message: ResultMessage) -> None:
        if message.product != self.product:
            return
        with self._lock:
            before = self.rollout.state
            actions = self.rollout.result(message.bundle_version, message.verdict)
            changed = self.rollout.state != before
        if actions or changed:
            self._events.put(lambda: self._carry_out(actions))

    def update_status(self, status: dict[str, Any]) -> None:
        product, version = status.get("product"), status.get("bundle_version")
        with self._lock:
            self.served_product, self.served_version = product, version
            if product == self.product and version is not None:
                digest = self.digests.get(version)
                r = self.rollout
                if r.state not in ("activating", "canary", "rolling_back"):
                    r.running = Target(version, digest) if digest else None
                    if r.target is not None and r.running == r.target and r.state in ("staged", "waiting"):
                        r.state, r.detail = "active", f"serving {version} (activated by an operator)"
                        self._events.put(self._publish_state)  # not from here: this is the inference thread

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"state": "ok", "fleet_state": self.rollout.state, "detail": self.rollout.detail,
                    "broker_connected": self._connected}

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._events.put(None)
        self._worker.join(timeout=max(1.0, timeout_s))
        self._client.disconnect()
        self._client.loop_stop()

    # ---- what the station reports --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            r = self.rollout
            out: dict[str, Any] = {
                "product": self.product, "policy": r.policy,
                "role": "canary" if r.is_canary else ("follower" if r.policy == "canary" else None),
                "state": r.state, "detail": r.detail,
                "release": {"version": r.target.version, "digest": r.target.digest} if r.target else None,
                "running": {"version": r.running.version, "digest": r.running.digest} if r.running else None,
                "at": round(time.time(), 3)}
            if r.state in ("canary", "rolling_back"):
                out["canary"] = {"frames": r.frames, "rejects": r.rejects, "canary_frames": r.canary_frames,
                                 "max_reject_rate": r.max_reject_rate}
            if self.last_problem:
                out["problem"] = self.last_problem
            return out

    def _publish_state(self) -> None:
        """Report the state on the status topic when it changed (a canary's frame count alone does not)."""
        snap = self.snapshot()
        key = json.dumps({k: v for k, v in snap.items() if k not in ("at", "canary")}, sort_keys=True)
        if key == self._last_reported:
            return
        self._last_reported = key
        log.info("fleet: %s - %s", snap["state"], snap["detail"])
        try:
            self._report({"fleet": snap})
        except Exception:  # noqa: BLE001 - a status that cannot go out must not stop the rollout
            log.exception("fleet: reporting the state failed")

    # ---- MQTT (network thread: parse, then hand over to the worker) ----------------------------------
    def _make_client(self) -> mqtt.Client:
        client = paho_client(self.mqtt_cfg, f"weakrest-fleet-{self.station}-{os.getpid()}")
        client.suppress_exceptions = True
        client.reconnect_delay_set(min_delay=0.5, max_delay=10)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("fleet: the broker refused the connection: %s", reason_code)
            return
        self._connected = True
        # verdicts first, so a release that comes back retained is judged with them
        client.subscribe(self.canary_filter, qos=1)
        client.subscribe(self.release_topic, qos=1)
        with self._lock:
            pending = list(self._verdicts_out.items())
        for topic, payload in pending:
            client.publish(topic, payload, qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected = False

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:  # a cleared retained message
            return
        try:
            if msg.topic == self.release_topic:
                release = parse_release(msg.payload)
                if release.product != self.product:
                    raise FleetMessageError(f"release announcement: product {release.product!r} on the topic of "
                                            f"{self.product!r}")
                self._events.put(lambda: self._on_release(release))
            else:
                verdict = parse_canary(msg.payload)
                if verdict.product != self.product or msg.topic != canary_topic(self.site, self.product,
                                                                                 verdict.station):
                    raise FleetMessageError(f"canary verdict on {msg.topic}: it names station {verdict.station!r} "
                                            f"and product {verdict.product!r}")
                self._events.put(lambda: self._on_canary(verdict))
        except FleetMessageError as exc:
            text = f"ignored a message on {msg.topic}: {exc}"
            log.warning("fleet: %s", text)
            self._events.put(lambda: self._problem(text))

    # ---- the worker: one event at a time -------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            timeout = None if self._retry_at is None else max(0.0, self._retry_at - time.monotonic())
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                event = self._retry
            if event is None:
                return
            try:
                event()
            except Exception:  # noqa: BLE001 - the agent must outlive any one event
                log.exception("fleet: handling an event failed")

    def _problem(self, text: str) -> None:
        with self._lock:
            self.last_problem = text
        self._publish_state()

    def _on_release(self, release: ReleaseMessage) -> None:
        with self._lock:
            target = Target(release.version, release.digest)
            if self.rollout.target != target:
                self.release, self._attempts, self._retry_at = release, 0, None
            actions = self.rollout.release(target)
        self._carry_out(actions)

    def _on_canary(self, msg: CanaryVerdict) -> None:
        verdict = Verdict(msg.station, Target(msg.version, msg.digest), msg.verdict, msg.frames, msg.rejects,
                          msg.detail)
        with self._lock:
            before = self.rollout.state
            actions = self.rollout.canary(verdict)
            changed = self.rollout.state != before
        if actions or changed:
            self._carry_out(actions)

    def _retry(self) -> None:
        with self._lock:
            self._retry_at = None
            release = self.release
            due = release is not None and self.rollout.state == "retrying" and self.rollout.target == Target(
                release.version, release.digest)
        if due:
            self._carry_out([Action("pull", Target(release.version, release.digest))])

    def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if self._stop.is_set():
                return
            follow = getattr(self, f"_do_{action.kind}")(action)
            if follow:
                self._carry_out(follow)
        self._publish_state()

    def _do_pull(self, action: Action) -> list[Action]:
        target, release = action.target, self.release
        if release is None or Target(release.version, release.digest) != target:
            return []
        known = self.digests.get(target.version)
        if known == target.digest and target.version in self.store.versions(self.product):
            with self._lock:
                return self.rollout.staged(target)
        self._attempts += 1
        cfg = self.cfg
        try:
            folder = pull_bundle(release.repository, release.digest, self.workdir, registry=cfg.registry,
                                 insecure=cfg.insecure, ca=cfg.ca, username=cfg.username, password=cfg.password(),
                                 timeout_s=cfg.timeout_s, max_bytes=int(cfg.max_bundle_mb * 1024 * 1024))
        except PullError as exc:
            return self._pull_failed(target, str(exc), exc.retry)
        except OSError as exc:  # the work folder (disk full, read-only)
            return self._pull_failed(target, f"{self.workdir}: {exc.strerror or exc}", True)
        try:
            self._stage(target, folder)
        except StoreError as exc:
            return self._pull_failed(target, str(exc), False)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("fleet: staged %s@%s from %s/%s@%s", self.product, target.version, cfg.registry or release.host,
                 release.path, target.digest)
        with self._lock:
            self._attempts = 0
            return self.rollout.staged(target)

    def _stage(self, target: Target, folder: Path) -> None:
        """Add the pulled bundle under the release's version (validated and signature-checked by the store)."""
        try:
            self.store.add(self.product, folder, version=target.version)
        except StoreError:
            # already there: another station on this box sharing the store staged it, or a hand copy
            stored = self.store.product_dir(self.product) / target.version / MANIFEST
            if target.version not in self.store.versions(self.product):
                raise
            if stored.read_bytes() != (folder / MANIFEST).read_bytes():
                raise StoreError(f"a different bundle is already stored as version {target.version!r} "
                                 f"({self.store.product_dir(self.product)})") from None
        self.digests.record(target.version, target.digest)

    def _pull_failed(self, target: Target, reason: str, retry: bool) -> list[Action]:
        delay = min(self.cfg.retry_initial_s * 2 ** max(0, self._attempts - 1), self.cfg.retry_max_s)
        log.log(logging.WARNING if retry else logging.ERROR, "fleet: pull of %s@%s failed (%s)%s; still serving %s",
                self.product, target.version, reason, f", retrying in {delay:.3g} s" if retry else "",
                self.served_version)
        with self._lock:
            if retry:
                self._retry_at = time.monotonic() + delay
            return self.rollout.pull_failed(target, reason, retry, delay if retry else None)

    def _do_activate(self, action: Action) -> list[Action]:
        target = action.target
        try:
            self.store.activate(self.product, target.version)
        except StoreError as exc:
            with self._lock:
                return self.rollout.activated(target, False, str(exc))
        ok, error = self._reload_if_served()
        if not ok:
            try:
                self.store.rollback(self.product)  # current points at what still serves
            except StoreError as exc:
                error = f"{error}; and the store could not go back: {exc}"
        with self._lock:
            return self.rollout.activated(target, ok, error)

    def _do_rollback(self, action: Action) -> list[Action]:
        try:
            back = self.store.rollback(self.product)
        except StoreError as exc:
            with self._lock:
                return self.rollout.rolled_back(action.target, False, self.rollout.running, str(exc))
        ok, error = self._reload_if_served()
        digest = self.digests.get(back)
        with self._lock:
            return self.rollout.rolled_back(action.target, ok, Target(back, digest) if digest else None, error)

    def _reload_if_served(self) -> tuple[bool, str]:
        """Have the service swap in the store's current bundle (if it serves this product now)."""
        with self._lock:
            served = self.served_product
        if served != self.product:
            return True, ""
        try:
            reply = self._reload()
        except Exception as exc:  # noqa: BLE001
            return False, f"{type(exc).__name__}: {exc}"
        return bool(reply.get("ok")), str(reply.get("error") or "")

    def _do_publish_canary(self, action: Action) -> list[Action]:
        v = action.verdict
        assert v is not None
        msg = CanaryVerdict(station=self.station, product=self.product, version=v.target.version,
                            digest=v.target.digest, verdict=v.verdict, frames=v.frames, rejects=v.rejects,
                            reject_rate=v.reject_rate, max_reject_rate=self.cfg.max_reject_rate,
                            canary_frames=self.cfg.canary_frames, detail=v.detail)
        topic, payload = canary_topic(self.site, self.product, self.station), encode(msg)
        with self._lock:
            self._verdicts_out[topic] = payload
        self._client.publish(topic, payload, qos=1, retain=True)  # queued by paho while disconnected
        log.info("fleet: canary verdict %s for %s (%d frames, %d rejects)", v.verdict, v.target.version, v.frames,
                 v.rejects)
        return []
