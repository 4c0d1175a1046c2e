"""A fleet fed from one registry, on real parts: Debian's docker-registry (the reference OCI registry) and a real
Mosquitto on loopback, real bundle stores, the real service (in process, and three ``weakrest-edge run``
processes on replayed cameras).  The rollout policy's state machine is walked on its own first."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as hs

from edge_runtime.core.bundle import ARRAYS, MANIFEST, load_bundle, write_bundle
from edge_runtime.fleet.announce import announce
from edge_runtime.fleet.config import FleetConfig
from edge_runtime.fleet.oci import DigestMismatch, NotABundle, RegistryUnavailable, pull_bundle, push_bundle
from edge_runtime.fleet.release import FleetMessageError, ReleaseMessage, parse_canary, parse_release
from edge_runtime.fleet.rollout import Rollout, Target, Verdict
from edge_runtime.publishing.broker import free_port
from edge_runtime.publishing.config import MQTTConfig
from edge_runtime.publishing.messages import decode_result
from edge_runtime.service.config import parse_edge_config
from edge_runtime.service.runner import EdgeService
from edge_runtime.store import BundleStore
from tests.mqtt_fixtures import require_mosquitto
from tests.mqtt_fixtures import wait_until as _wait

REPO = Path(__file__).resolve().parents[1]
SITE = "plant"
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def derive(bundle: Path, out: Path, version: str, threshold: float | None = None) -> Path:
    """A new bundle version from a fitted one, through the project's own writer (so it validates);
    ``threshold``: another image threshold (a very low one rejects every frame)."""
    b = load_bundle(bundle)
    m = b.manifest
    update: dict = {"bundle_version": version}
    if threshold is not None:
        update["thresholds"] = m.thresholds.model_copy(update={"image": threshold})
    files = {name: bundle / name for name in m.files if name != ARRAYS}
    return write_bundle(out, m.model_copy(update=update), files, dict(b.arrays))


# ---- the rollout policy, without a broker or a registry ----------------------------------------------

def test_rollout_manual_and_auto():
    v2 = Target("v2", D2)
    manual = Rollout("manual", "st1", running=Target("v1", D1))
    assert [a.kind for a in manual.release(v2)] == ["pull"] and manual.state == "pulling"
    assert manual.pull_failed(v2, "connection refused", retry=True, retry_in_s=2) == []
    assert manual.state == "retrying" and "connection refused" in manual.detail and "2 s" in manual.detail
    assert manual.staged(v2) == [] and manual.state == "staged" and "weakrest-calibrate activate v2" in manual.detail
    assert manual.release(v2) == [], "the retained announcement coming back does not start over"

    auto = Rollout("auto", "st1", running=Target("v1", D1))
    auto.release(v2)
    assert [a.kind for a in auto.staged(v2)] == ["activate"]
    assert auto.activated(v2, ok=True) == [] and auto.state == "active" and auto.running == v2
    assert auto.release(Target("v2-again", D2)) == [] and auto.state == "active", "the digest it already runs"
    v3 = Target("v3", "sha256:" + "3" * 64)
    auto.release(v3)
    assert auto.pull_failed(v3, "the bundle layer's bytes do not match its digest", retry=False) == []
    assert auto.state == "refused" and "do not match" in auto.detail
    auto.release(v3)
    auto.staged(v3)
    assert auto.activated(v3, ok=False, error="swin.onnx: sha256 differs") == []
    assert auto.state == "refused" and auto.running == v2 and "swin.onnx" in auto.detail


def test_rollout_canary_passes_then_followers_go():
    v2 = Target("v2", D2)
    canary = Rollout("canary", "st1", ["st1"], canary_frames=4, max_reject_rate=0.25)
    follower = Rollout("canary", "st2", ["st1"], canary_frames=4, max_reject_rate=0.25)
    canary.release(v2), follower.release(v2)
    assert follower.staged(v2) == [] and follower.state == "waiting" and "st1" in follower.detail
    assert [a.kind for a in canary.staged(v2)] == ["activate"]
    started = canary.activated(v2, ok=True)
    assert [(a.kind, a.verdict.verdict) for a in started] == [("publish_canary", "running")]
    assert follower.canary(started[0].verdict) == [] and follower.state == "waiting"
    assert canary.result("v1", "fail") == [], "a frame of the old version does not count"
    actions = []
    for verdict in ("pass", "fail", "pass", "pass"):  # 1 reject in 4: within 25 %
        actions += canary.result("v2", verdict)
    assert canary.state == "active" and [a.verdict.verdict for a in actions] == ["passed"]
    assert [a.kind for a in follower.canary(actions[0].verdict)] == ["activate"]


def test_rollout_canary_fails_rolls_back_and_followers_hold():
    v3 = Target("v3", D2)
    canary = Rollout("canary", "st1", ["st1", "st9"], canary_frames=10, max_reject_rate=0.2,
                     running=Target("v2", D1))
    follower = Rollout("canary", "st2", ["st1", "st9"], canary_frames=10, max_reject_rate=0.2)
    canary.release(v3), canary.staged(v3), canary.activated(v3, ok=True)
    assert canary.result("v3", "fail") == [] and canary.result("v3", "error") == []
    actions = canary.result("v3", "fail")  # 3 rejects > 20 % of 10: the bound can no longer hold
    assert [a.kind for a in actions] == ["publish_canary", "rollback"] and canary.state == "rolling_back"
    failed = actions[0].verdict
    assert failed.verdict == "failed" and failed.frames == 3 and failed.rejects == 3
    assert canary.rolled_back(v3, ok=True, now_serving=Target("v2", D1)) == [] and canary.state == "rolled_back"
    # a follower that hears the verdict before its pull ends, and one that hears it after
    follower.release(v3)
    follower.canary(failed)
    assert follower.staged(v3) == [] and follower.state == "held" and "st1 failed" in follower.detail
    late = Rollout("canary", "st3", ["st1", "st9"], canary_frames=10, max_reject_rate=0.2)
    late.release(v3), late.staged(v3)
    assert late.state == "waiting" and late.canary(failed) == [] and late.state == "held"
    # after a restart the canary hears its own retained verdict and does not take the release again
    again = Rollout("canary", "st1", ["st1", "st9"], canary_frames=10, max_reject_rate=0.2, running=Target("v2", D1))
    again.canary(failed)
    assert again.release(v3) == [] and again.state == "rolled_back"
    assert Rollout("canary", "st2", ["st1"]).canary(Verdict("st7", v3, "failed")) == [], "not a canary station"


def test_fleet_messages_and_config_refuse_bad_input():
    good = ReleaseMessage(product="demo", version="v2", repository="127.0.0.1:5000/weakrest/demo", digest=D2)
    assert parse_release(good.model_dump_json(by_alias=True).encode()) == good
    for payload, words in ((b"{", "not UTF-8 JSON"), (b"[]", "expected a JSON object"),
                           (json.dumps({**good.model_dump(by_alias=True), "digest": "sha256:abc"}).encode(),
                            "digest: expected sha256:<64 lowercase hex digits>"),
                           (json.dumps({**good.model_dump(by_alias=True), "version": "../v1"}).encode(), "version"),
                           (json.dumps({**good.model_dump(by_alias=True), "repository": "demo:v2"}).encode(),
                            "repository"),
                           (json.dumps({**good.model_dump(by_alias=True), "extra": 1}).encode(), "extra")):
        with pytest.raises(FleetMessageError, match="release announcement") as err:
            parse_release(payload)
        assert words in str(err.value)
    with pytest.raises(FleetMessageError, match="verdict"):
        parse_canary(json.dumps({"station": "st1", "verdict": "maybe"}).encode())
    with pytest.raises(ValueError, match="canary_stations"):
        FleetConfig(enabled=True, rollout="canary")
    with pytest.raises(ValueError, match="host\\[:port\\]"):
        FleetConfig(registry="https://registry.plant/v2")
    cfg = parse_edge_config({"bundles": {"store": "/s", "product": "demo"},
                             "fleet": {"enabled": True, "rollout": "canary", "canary_stations": ["st1"]}})
    assert cfg.fleet.canary_frames == 500 and cfg.fleet.max_reject_rate == 0.05


@pytest.mark.fuzz
@given(hs.binary(max_size=400) | hs.dictionaries(hs.sampled_from(["schema", "product", "version", "repository",
                                                                  "digest", "station", "verdict", "frames", "x"]),
                                                 hs.none() | hs.integers() | hs.text(max_size=80)).map(
    lambda d: json.dumps(d).encode()))
def test_fleet_messages_never_raise_anything_but_a_clear_error(payload):
    for parse in (parse_release, parse_canary):
        try:
            parse(payload)
        except FleetMessageError as exc:
            assert str(exc).startswith(("release announcement: ", "canary verdict: "))


def test_the_fleet_code_is_torch_free():
    code = ("import sys, edge_runtime.fleet.agent, edge_runtime.fleet.view, edge_runtime.fleet.oci, oras.provider, "
            "calibration.fleet; bad = [m for m in ('torch', 'training_host') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr


# ---- the registry: push, pull by digest, every byte checked --------------------------------------------

def test_push_pull_by_digest_and_what_is_refused(tmp_path, fitted, registry):
    bundle, _ = fitted
    pushed = push_bundle(bundle, f"{registry.host}/weakrest/demo:v1", insecure=True)
    assert pushed.repository == f"{registry.host}/weakrest/demo" and pushed.digest.startswith("sha256:")
    out = pull_bundle(pushed.repository, pushed.digest, tmp_path / "work", insecure=True)
    assert load_bundle(out).manifest.bundle_version == load_bundle(bundle).manifest.bundle_version
    assert not list((tmp_path / "work").glob("*.part"))

    with pytest.raises(RegistryUnavailable, match="404") as err:  # a digest the registry does not hold
        pull_bundle(pushed.repository, D1, tmp_path / "work", insecure=True)
    assert err.value.retry
    manifest = json.loads((registry.storage / "docker/registry/v2/blobs/sha256" / pushed.digest[7:9] /
                           pushed.digest[7:] / "data").read_bytes())
    layer = manifest["layers"][0]["digest"]
    blob = registry.blob_path(layer)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte altered behind the registry's back
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match="do not match its digest") as err:
        pull_bundle(pushed.repository, pushed.digest, tmp_path / "work", insecure=True)
    assert not err.value.retry and not list((tmp_path / "work").glob("*.part"))

    other = tmp_path / "not-a-bundle.txt"  # an artifact that is not a bundle, pushed with oras as anyone could
    other.write_text("hello")
    from edge_runtime.fleet.oci import _registry

    reg = _registry(registry.host, insecure=True, ca=None, username=None, password=None, timeout_s=10)
    resp = reg.push(target=f"{registry.host}/weakrest/other:v1", files=[str(other)], disable_path_validation=True,
                    quiet=True)
    with pytest.raises(NotABundle, match="not a weakrest bundle"):
        pull_bundle(f"{registry.host}/weakrest/other", resp.headers["Docker-Content-Digest"], tmp_path / "work",
                    insecure=True)
    registry.stop()
    with pytest.raises(RegistryUnavailable, match="connection refused"):
        pull_bundle(pushed.repository, pushed.digest, tmp_path / "work", insecure=True)


def test_push_command_refuses_what_it_cannot_push(tmp_path, fitted, capsys):
    from training_host.cli import main as train

    bundle, _ = fitted
    assert train(["push", str(bundle), "weakrest/demo:v1", "--insecure"]) == 2
    assert "expected REGISTRY/PATH:VERSION with a registry host" in capsys.readouterr().err
    assert train(["push", str(bundle), "127.0.0.1:1/weakrest/demo:-v1", "--insecure"]) == 2
    assert "not a plain name" in capsys.readouterr().err
    broken = derive(bundle, tmp_path / "broken", "v9")
    (broken / "swin.onnx").write_bytes(b"not a graph")
    assert train(["push", str(broken), "127.0.0.1:1/weakrest/demo:v9", "--insecure"]) == 2
    assert "swin.onnx" in capsys.readouterr().err  # refused before any registry is contacted
    port = free_port()  # nothing listens there
    assert train(["push", str(bundle), f"127.0.0.1:{port}/weakrest/demo:v1", "--insecure"]) == 2
    assert "connection refused" in capsys.readouterr().err
    assert train(["push", str(bundle), f"127.0.0.1:{port}/weakrest/demo:v1", "--announce"]) == 2
    assert "--announce needs --site" in capsys.readouterr().err


# ---- one station in process: what leaves the running bundle serving, and says why ---------------------

def _fleet_status(sub, prefix: str) -> dict:
    statuses = [json.loads(m.payload) for m in sub.on(f"{prefix}/status")]
    return next((s["fleet"] for s in reversed(statuses) if s.get("fleet")), {})


def test_a_station_refuses_bad_releases_and_keeps_serving(tmp_path, fitted, demo_data, broker, subscriber,
                                                          registry):
    require_mosquitto(broker, "retained messages as the fleet uses them")
    bundle, _ = fitted
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", bundle, version="v1"))
    prefix = f"{SITE}/line/st1"
    sub = subscriber([f"{prefix}/status", f"{prefix}/result"])
    cfg = parse_edge_config({
        "bundles": {"store": str(store.root), "product": "demo"},
        "camera": {"source": "replay", "replay": {"path": str(demo_data / "test" / "good"), "fps": 10}},
        "mqtt": {"port": broker.port, "topic_prefix": prefix, "heatmap": "none", "client_id": "svc-st1"},
        "queue": {"dir": str(tmp_path / "queue")}, "health": {"port": 0}, "threads": 1,
        "fleet": {"enabled": True, "rollout": "auto", "insecure": True, "retry_initial_s": 0.2, "retry_max_s": 0.5}})
    mqtt = MQTTConfig(port=broker.port)

    def release(version: str, folder: Path, verify: bool = True) -> ReleaseMessage:
        pushed = push_bundle(folder, f"{registry.host}/weakrest/demo:{version}", insecure=True, verify=verify)
        msg = ReleaseMessage(product="demo", version=version, repository=pushed.repository, digest=pushed.digest)
        announce(msg, mqtt, SITE)
        return msg

    def results() -> list:
        return [decode_result(m.payload) for m in sub.on(f"{prefix}/result")]

    def serving_on(version: str, more: int = 3) -> None:
        n = len(results())
        _wait(lambda: len(results()) >= n + more, 30, f"{more} more results")
        # the newest ones: a result inspected just before a swap may arrive after the status that announced it
        assert {r.bundle_version for r in results()[-more:]} == {version}
        assert service.served.version == version and store.current("demo") == version

    service = EdgeService(cfg)
    service.start()
    try:
        _wait(lambda: _fleet_status(sub, prefix).get("state") == "idle", 30, "the fleet agent's first status")
        # 1. a byte altered in the registry: refused, naming the digest. Altered before the release is announced: the
        # station pulls as soon as it hears of it, and a pull before the alteration would rightly find v2 intact
        pushed_v2 = push_bundle(derive(bundle, tmp_path / "v2", "v2"), f"{registry.host}/weakrest/demo:v2",
                                insecure=True)
        blob = next(p for p in registry.storage.rglob("data") if p.stat().st_size > 1_000_000)
        data = bytearray(blob.read_bytes())
        data[-100] ^= 0xFF
        blob.write_bytes(bytes(data))
        v2 = ReleaseMessage(product="demo", version="v2", repository=pushed_v2.repository, digest=pushed_v2.digest)
        announce(v2, mqtt, SITE)
        _wait(lambda: _fleet_status(sub, prefix).get("state") == "refused", 30, "v2 refused")
        fleet = _fleet_status(sub, prefix)
        assert "do not match its digest" in fleet["detail"] and fleet["release"]["digest"] == v2.digest
        serving_on("v1")
        assert "v2" not in store.versions("demo")
        # 2. a bundle that fails validation (pushed past the push's own check): the store refuses it, naming the file
        broken = derive(bundle, tmp_path / "v3", "v3")
        manifest = json.loads((broken / MANIFEST).read_text())
        manifest["thresholds"]["image"] = "high"
        (broken / MANIFEST).write_text(json.dumps(manifest))
        release("v3", broken, verify=False)
        _wait(lambda: _fleet_status(sub, prefix).get("release", {}).get("version") == "v3"
              and _fleet_status(sub, prefix).get("state") == "refused", 30, "v3 refused")
        assert "manifest.json" in _fleet_status(sub, prefix)["detail"]
        serving_on("v1")
        # 3. the registry is down: retried with back-off while v1 serves; once it is back, v4 goes live between frames
        v4_folder = derive(bundle, tmp_path / "v4", "v4")
        pushed = push_bundle(v4_folder, f"{registry.host}/weakrest/demo:v4", insecure=True)
        registry.stop()
        announce(ReleaseMessage(product="demo", version="v4", repository=pushed.repository, digest=pushed.digest),
                 mqtt, SITE)
        _wait(lambda: _fleet_status(sub, prefix).get("state") == "retrying", 30, "v4 retrying")
        assert "connection refused" in _fleet_status(sub, prefix)["detail"]
        serving_on("v1")
        registry.start()
        _wait(lambda: _fleet_status(sub, prefix).get("state") == "active", 30, "v4 active")
        assert _fleet_status(sub, prefix)["running"] == {"version": "v4", "digest": pushed.digest}
        serving_on("v4")
    finally:
        service.stop()
    seqs = sorted({r.seq for r in results()})
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "every result delivered throughout"


def test_manual_policy_stages_and_the_operator_activates(tmp_path, fitted, demo_data, broker, subscriber, registry,
                                                         capsys):
    require_mosquitto(broker, "retained messages as the fleet uses them")
    from calibration.cli import main as calibrate
    from edge_runtime.service.config import load_edge_config

    bundle, _ = fitted
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", bundle, version="v1"))
    prefix = f"{SITE}/line/st5"
    sub = subscriber([f"{prefix}/status"])
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump({
        "bundles": {"store": str(store.root), "product": "demo"},
        "camera": {"source": "replay", "replay": {"path": str(demo_data / "test" / "good"), "fps": 10}},
        "mqtt": {"port": broker.port, "topic_prefix": prefix, "heatmap": "none"},
        "queue": {"dir": str(tmp_path / "queue")}, "health": {"port": 0}, "threads": 1,
        "fleet": {"enabled": True, "insecure": True}}))  # rollout: manual, the default
    service = EdgeService(load_edge_config(path))
    service.start()
    try:
        pushed = push_bundle(derive(bundle, tmp_path / "v2", "v2"), f"{registry.host}/weakrest/demo:v2", insecure=True)
        announce(ReleaseMessage(product="demo", version="v2", repository=pushed.repository, digest=pushed.digest),
                 MQTTConfig(port=broker.port), SITE)
        _wait(lambda: _fleet_status(sub, prefix).get("state") == "staged", 30, "v2 staged")
        assert "weakrest-calibrate activate v2" in _fleet_status(sub, prefix)["detail"]
        assert store.versions("demo") == ["v1", "v2"] and store.current("demo") == "v1"
        assert service.served.version == "v1"
        assert calibrate(["activate", "v2", "--config", str(path), "--timeout", "30"]) == 0, capsys.readouterr()
        _wait(lambda: _fleet_status(sub, prefix).get("state") == "active", 30, "v2 active after the operator")
        fleet = _fleet_status(sub, prefix)
        assert fleet["running"] == {"version": "v2", "digest": pushed.digest} and "operator" in fleet["detail"]
        assert service.served.version == "v2"
    finally:
        service.stop()


# ---- the fleet: three `weakrest-edge run` processes, one registry, one broker ---------------------------

def test_fleet_of_three_stations_canary_rollback_and_registry_outage(tmp_path, fitted, demo_data, broker, registry,
                                                                     make_relay, make_subscriber):
    """A release announced once reaches three stations (the canary st1 first, the others after its verdict); a
    bundle whose threshold rejects everything fails on the canary, which rolls back, and the others never
    activate it; the registry going down in the middle of a pull leaves every station serving, and the release
    arrives once it is back.  Stations pull through a relay (their ``fleet.registry`` mirror) that can cut a
    transfer part-way and then refuse connections."""
    require_mosquitto(broker, "retained messages as the fleet uses them")
    bundle, _ = fitted
    relay = make_relay(registry.port)
    stations = ["st1", "st2", "st3"]
    prefixes = {st: f"{SITE}/line/{st}" for st in stations}
    sub = make_subscriber(broker.port, [f"{SITE}/line/+/status", f"{SITE}/line/+/result", f"{SITE}/fleet/#"],
                          protocol=broker.protocol)
    mqtt = MQTTConfig(port=broker.port)
    stores, procs = {}, {}
    for st in stations:
        store = BundleStore(tmp_path / st / "store")
        store.activate("demo", store.add("demo", bundle, version="v1"))
        stores[st] = store
        cfg = {"bundles": {"store": str(store.root), "product": "demo"},
               "camera": {"source": "replay", "name": st,
                          "replay": {"path": str(demo_data / "test" / "good"), "fps": 10}},
               "mqtt": {"port": broker.port, "topic_prefix": prefixes[st], "heatmap": "none"},
               "queue": {"dir": str(tmp_path / st / "queue")}, "health": {"port": 0}, "threads": 1,
               "fleet": {"enabled": True, "rollout": "canary", "canary_stations": ["st1"], "canary_frames": 8,
                         "max_reject_rate": 0.75, "registry": relay.host, "insecure": True,
                         "retry_initial_s": 0.3, "retry_max_s": 1.0}}
        path = tmp_path / st / "edge.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = open(tmp_path / st / "service.log", "ab")
        procs[st] = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(path)],
                                     stdout=log, stderr=log, cwd=REPO)

    def results(st: str) -> list:
        return [decode_result(m.payload) for m in sub.on(f"{prefixes[st]}/result")]

    def fleet(st: str) -> dict:
        return _fleet_status(sub, prefixes[st])

    def canary(digest: str) -> list[dict]:
        return [json.loads(m.payload) for m in sub.on(f"{SITE}/fleet/demo/canary/st1")
                if json.loads(m.payload)["digest"] == digest]

    def release(version: str, folder: Path) -> str:
        pushed = push_bundle(folder, f"{registry.host}/weakrest/demo:{version}", insecure=True)
        announce(ReleaseMessage(product="demo", version=version, repository=pushed.repository, digest=pushed.digest),
                 mqtt, SITE)
        return pushed.digest

    def all_on(version: str, state: str = "active") -> bool:
        return all(fleet(st).get("state") == state and (fleet(st).get("running") or {}).get("version") == version
                   for st in stations)

    def still_serving(version: str, more: int = 3) -> None:
        counts = {st: len(results(st)) for st in stations}
        _wait(lambda: all(len(results(st)) >= counts[st] + more for st in stations), 30, "every station serving")
        for st in stations:
            assert {r.bundle_version for r in results(st)[-more:]} == {version}, st

    try:
        _wait(lambda: all(len(results(st)) >= 3 for st in stations), 90, "three stations serving v1")
        # 1. one announcement: the canary takes it, passes, then the others follow
        v2_folder = derive(bundle, tmp_path / "v2", "v2")
        t0 = time.monotonic()
        push = subprocess.run([sys.executable, "-m", "training_host.cli", "push", str(v2_folder),
                               f"{registry.host}/weakrest/demo:v2", "--insecure", "--announce", "--broker",
                               f"127.0.0.1:{broker.port}", "--site", SITE, "--product", "demo", "--json"],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert push.returncode == 0, push.stderr
        pushed = json.loads(push.stdout)
        d2 = pushed["digest"]
        assert pushed["announced_on"] == f"{SITE}/fleet/demo/release" and pushed["version"] == "v2"
        _wait(lambda: all_on("v2"), 60, "v2 on every station")
        took = {"v2 weakrest-train push --announce -> active on 3 stations": time.monotonic() - t0}
        passed = [v for v in canary(d2) if v["verdict"] == "passed"]
        assert passed and passed[0]["frames"] == 8 and passed[0]["reject_rate"] <= 0.75
        for st in ("st2", "st3"):
            _wait(lambda st=st: any(r.bundle_version == "v2" for r in results(st)), 30, f"a v2 result from {st}")
            first_v2 = next(r for r in results(st) if r.bundle_version == "v2")
            assert first_v2.captured_at >= passed[0]["at"], f"{st} activated v2 before the canary passed"
            assert fleet(st)["running"]["digest"] == d2 and fleet(st)["role"] == "follower"
        # 2. a bad bundle (its threshold rejects every frame): the canary rolls back, the others never activate it
        v3_folder = derive(bundle, tmp_path / "v3", "v3", threshold=-1e9)
        t0 = time.monotonic()
        d3 = release("v3", v3_folder)
        _wait(lambda: any(v["verdict"] == "failed" for v in canary(d3)), 60, "the canary's failed verdict on v3")
        _wait(lambda: fleet("st1").get("state") == "rolled_back" and all(fleet(st).get("state") == "held"
                                                                         for st in ("st2", "st3")), 60,
              "st1 rolled back, st2 and st3 holding")
        took["v3 push+announce -> canary rolled back, others held"] = time.monotonic() - t0
        failed = next(v for v in canary(d3) if v["verdict"] == "failed")
        assert failed["reject_rate"] == 1.0 and failed["rejects"] == 7, failed  # 7 > 75 % of 8: no need for the 8th
        v3_results = [r for r in results("st1") if r.bundle_version == "v3"]
        assert v3_results and {r.verdict for r in v3_results} == {"fail"}
        still_serving("v2")
        assert stores["st1"].current("demo") == "v2" and stores["st1"].previous("demo") == "v3"
        for st in ("st2", "st3"):
            assert "st1 failed" in fleet(st)["detail"]
            assert not any(r.bundle_version == "v3" for r in results(st)), f"{st} served the failed release"
            assert stores[st].current("demo") == "v2" and "v3" in stores[st].versions("demo")  # staged, never live
        # 3. the registry goes down in the middle of the pull: everything keeps serving, and v4 arrives once it is back
        relay.cut.set()
        d4 = release("v4", derive(bundle, tmp_path / "v4", "v4"))
        assert relay.wait_cuts(1, 30), "no transfer was under way to cut"
        _wait(lambda: all(fleet(st).get("state") == "retrying" for st in stations), 30, "every station retrying")
        assert all("v4" in fleet(st)["detail"] for st in stations)
        still_serving("v2")
        relay.restore()
        t0 = time.monotonic()
        _wait(lambda: all_on("v4"), 60, "v4 on every station after the outage")
        took["registry back -> v4 active on 3 stations"] = time.monotonic() - t0
        assert all(fleet(st)["running"]["digest"] == d4 for st in stations)
        # what the field engineer sees
        listing = subprocess.run([sys.executable, "-m", "calibration.cli", "list", "--fleet", "--broker",
                                  f"127.0.0.1:{broker.port}", "--site", SITE, "--json"],
                                 capture_output=True, text=True, timeout=60, cwd=REPO)
        assert listing.returncode == 0, listing.stderr
        view = json.loads(listing.stdout)
        assert {name: s["bundle_version"] for name, s in view["stations"].items()} == {
            f"line/{st}": "v4" for st in stations}
        assert view["releases"]["demo"]["digest"] == d4 and view["canaries"]["demo"]["st1"]["verdict"] == "passed"
        text = subprocess.run([sys.executable, "-m", "calibration.cli", "list", "--fleet", "--broker",
                               f"127.0.0.1:{broker.port}", "--site", SITE], capture_output=True, text=True,
                              timeout=60, cwd=REPO).stdout
        assert "line/st2" in text and d4[:19] in text and "canary st1: passed" in text
        print(text)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    for st in stations:
        seqs = sorted({r.seq for r in results(st)})
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{st}: a result is missing"
    print(f"fleet: results per station {[len({r.seq for r in results(st)}) for st in stations]}, "
          f"relay cuts {relay.cuts}, connections refused while down {relay.refused}; "
          + ", ".join(f"{k}: {v:.1f} s" for k, v in took.items()))
