"""The OPC UA server against a real asyncua client over Basic256Sha256: subscriptions and their latency, who is
let in (trusted certificate only), the command methods, and the real edge service on the replay camera."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("asyncua", reason="the OPC UA server needs asyncua: pip install 'weakrest-edge[opcua]'")

from asyncua import Client, ua  # noqa: E402

from edge_runtime.publishing.broker import free_port  # noqa: E402
from edge_runtime.publishing.messages import (  # noqa: E402
    CommandError,
    ResultMessage,
    decode_result,
    encode_json,
    parse_command,
)
from edge_runtime.publishing.opcua import OpcUaServer, make_certificate  # noqa: E402
from edge_runtime.service.config import OpcUaConfig, parse_edge_config  # noqa: E402
from edge_runtime.store import BundleStore  # noqa: E402

NS = "urn:weakrest:edge"
CLIENT_URI = "urn:test:plc"
PREFIX = "plant/line/st7"


async def _until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` (in the client's loop) until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


@pytest.fixture
def certs(tmp_path) -> dict[str, Path]:
    """Server, trusted client and stranger certificates, made with the code path of ``weakrest-edge opcua-cert``."""
    server_cert, server_key = make_certificate(tmp_path / "server", "localhost")
    client_cert, client_key = make_certificate(tmp_path / "client", "localhost", application_uri=CLIENT_URI,
                                               client=True)
    stranger_cert, stranger_key = make_certificate(tmp_path / "stranger", "localhost", application_uri=CLIENT_URI,
                                                   client=True)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "plc.der").write_bytes(client_cert.read_bytes())
    return {"server_cert": server_cert, "server_key": server_key, "client_cert": client_cert,
            "client_key": client_key, "stranger_cert": stranger_cert, "stranger_key": stranger_key,
            "trusted": trusted}


def _opcua_cfg(certs: dict[str, Path], **extra) -> dict:
    return {"enabled": True, "port": free_port(), "certificate": str(certs["server_cert"]),
            "private_key": str(certs["server_key"]), "trusted_clients": str(certs["trusted"]), **extra}


@pytest.fixture
def make_server(certs):
    servers: list[OpcUaServer] = []

    def make(on_command=None, **extra) -> OpcUaServer:
        s = OpcUaServer(OpcUaConfig.model_validate(_opcua_cfg(certs, **extra)), "st7", on_command)
        servers.append(s)
        s.start()
        return s

    yield make
    for s in servers:
        s.close()


async def _client(server: OpcUaServer, cert: Path | None, key: Path | None, mode: str = "SignAndEncrypt") -> Client:
    client = Client(server.endpoint, timeout=10)
    client.application_uri = CLIENT_URI
    if cert is not None:
        await client.set_security_string(f"Basic256Sha256,{mode},{cert},{key}")
    return client


def _node(client: Client, idx: int, name: str):
    return client.get_node(ua.NodeId(f"st7.{name}" if name else "st7", idx))


def _result(seq: int, verdict: str = "pass") -> ResultMessage:
    return ResultMessage(seq=seq, frame_id=seq + 100, camera="cam0", product="demo", bundle_version="v1",
                         verdict=verdict, score=0.9 if verdict == "fail" else 0.1, threshold=0.5,
                         captured_at=time.time())


class _Collect:
    """Subscription handler: (node name, value, arrival time) of every data change."""

    def __init__(self, names: dict) -> None:
        self.names = names
        self.seen: list[tuple[str, object, float]] = []

    def datachange_notification(self, node, val, data) -> None:
        self.seen.append((self.names[node.nodeid], val, time.perf_counter()))

    def last(self, name: str):
        vals = [v for n, v, _ in self.seen if n == name]
        return vals[-1] if vals else None


# ---- (a) subscriptions -----------------------------------------------------------------------------------

def test_trusted_client_sees_every_verdict_within_100ms(make_server, certs):
    server = make_server()
    assert server.health()["state"] == "ok", server.health()
    names = ["Verdict", "Score", "Seq", "FrameId", "Inspected", "Passed", "Failed", "Errors", "CameraState",
             "Product", "MqttConnected", "LastResultTime"]

    async def run() -> list[float]:
        client = await _client(server, certs["client_cert"], certs["client_key"])
        async with client:
            idx = await client.get_namespace_index(NS)
            nodes = {n: _node(client, idx, n) for n in names}
            handler = _Collect({node.nodeid: n for n, node in nodes.items()})
            sub = await client.create_subscription(10, handler)
            await sub.subscribe_data_change(list(nodes.values()), sampling_interval=0)
            await _until(lambda: handler.last("Seq") == 0, 5, "the initial values")
            server.update_status({"camera_state": "streaming", "product": "demo", "bundle_version": "v1",
                                  "mqtt_connected": True})
            await _until(lambda: handler.last("CameraState") == "streaming" and handler.last("MqttConnected"), 5,
                         "the status variables")
            latencies = []
            for seq in range(1, 41):
                verdict = ("pass", "fail", "error")[seq % 3] if seq % 7 else "fail"
                msg = _result(seq, verdict) if verdict != "error" else ResultMessage(
                    seq=seq, frame_id=seq + 100, camera="cam0", product="demo", bundle_version="v1", verdict="error",
                    error="camera frame unreadable", captured_at=time.time())
                mark = len(handler.seen)
                t0 = time.perf_counter()
                server.submit_result(msg)
                assert time.perf_counter() - t0 < 0.01, "submit_result must return at once"

                def arrived(seq=seq, verdict=verdict, mark=mark) -> bool:
                    new = handler.seen[mark:]
                    return any(n == "Seq" and v == seq for n, v, _ in new) and handler.last("Verdict") == verdict

                await _until(arrived, 5, f"result {seq} on the subscription")
                changed = [t for n, v, t in handler.seen[mark:] if (n, v) in (("Seq", seq), ("Verdict", verdict))]
                latencies.append((max(changed) - t0) * 1000.0)
            await _until(lambda: handler.last("Inspected") == 40, 5, "the counters")
            counts = {n: handler.last(n) for n in ("Inspected", "Passed", "Failed", "Errors")}
            assert counts["Passed"] + counts["Failed"] + counts["Errors"] == 40
            assert counts["Errors"] == sum(1 for s in range(1, 41) if s % 7 and s % 3 == 2)
            assert handler.last("FrameId") == 140 and handler.last("Product") == "demo"
            assert handler.last("LastResultTime").year >= 2020
            await sub.delete()
            return latencies

    latencies = asyncio.run(run())
    med, top = statistics.median(latencies), max(latencies)
    print(f"\nOPC UA verdict latency over {len(latencies)} results: median {med:.1f} ms, max {top:.1f} ms")
    assert top < 100.0, f"a verdict took {top:.1f} ms to reach the subscriber (median {med:.1f} ms)"


# ---- (b) who gets in --------------------------------------------------------------------------------------

async def _rogue_none_session(server: OpcUaServer) -> None:
    """A SecurityPolicy None channel that asks for an anonymous session anyway: the server must refuse it."""
    from asyncua.common.utils import create_nonce

    rogue = Client(server.endpoint, timeout=10)
    await rogue.connect_socket()
    try:
        await rogue.send_hello()
        await rogue.open_secure_channel()
        params = ua.CreateSessionParameters()
        params.ClientDescription = ua.ApplicationDescription(ApplicationUri=CLIENT_URI,
                                                             ApplicationType=ua.ApplicationType.Client)
        params.EndpointUrl, params.SessionName = server.endpoint, "rogue"
        params.ClientNonce, params.RequestedSessionTimeout = create_nonce(32), 60000
        await rogue.uaclient.create_session(params)
        with pytest.raises(ua.UaStatusCodeError) as denied:
            await rogue.uaclient.read_attributes([ua.NodeId(ua.ObjectIds.Server_ServerStatus)],
                                                 ua.AttributeIds.Value)
        assert "Bad" in repr(denied.value)
        activate = ua.ActivateSessionParameters()
        activate.UserIdentityToken = ua.AnonymousIdentityToken(PolicyId="anonymous")
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied|BadIdentityTokenRejected"):
            await rogue.uaclient.activate_session(activate)
    finally:
        rogue.disconnect_socket()


def test_untrusted_anonymous_and_none_clients_are_refused(make_server, certs):
    server = make_server()

    async def run() -> None:
        stranger = await _client(server, certs["stranger_cert"], certs["stranger_key"])
        with pytest.raises(Exception) as refused:
            async with stranger:
                pass
        assert "BadCertificateUntrusted" in repr(refused.value), repr(refused.value)
        with pytest.raises(ua.UaError, match="No matching endpoints"):  # no None endpoint is offered ...
            async with await _client(server, None, None):
                pass
        await _rogue_none_session(server)  # ... and a client that ignores that gets no session
        endpoints = await (await _client(server, None, None)).connect_and_get_server_endpoints()
        assert {e.SecurityPolicyUri.rsplit("#", 1)[-1] for e in endpoints} == {"Basic256Sha256"}
        assert {e.SecurityMode for e in endpoints} == {ua.MessageSecurityMode.SignAndEncrypt}
        with pytest.raises(ua.UaError, match="No matching endpoints"):  # Sign is not configured
            async with await _client(server, certs["client_cert"], certs["client_key"], mode="Sign"):
                pass

    asyncio.run(run())
    health = server.health()
    assert health["state"] == "ok" and health["refused_clients"] >= 1
    assert "refused client 'urn:test:plc': BadCertificateUntrusted" in health["last_error"]


def test_a_certificate_put_in_the_trust_folder_is_trusted_without_restart(make_server, certs):
    server = make_server()

    async def connect() -> None:
        async with await _client(server, certs["stranger_cert"], certs["stranger_key"]) as c:
            await c.get_namespace_index(NS)

    with pytest.raises(ua.UaStatusCodeError, match="not trusted"):
        asyncio.run(connect())
    (certs["trusted"] / "stranger.der").write_bytes(certs["stranger_cert"].read_bytes())
    asyncio.run(connect())


def test_anonymous_sessions_when_allowed_are_read_only(make_server, certs):
    calls = []
    server = make_server(on_command=lambda cmd: calls.append(cmd) or {"ok": True}, allow_anonymous=True)
    server.submit_result(_result(3, "fail"))

    async def run() -> None:
        async with await _client(server, None, None) as client:
            idx = await client.get_namespace_index(NS)
            deadline = time.monotonic() + 5
            while await _node(client, idx, "Seq").read_value() != 3:
                assert time.monotonic() < deadline, "anonymous read never saw seq 3"
                await asyncio.sleep(0.01)
            with pytest.raises(ua.UaStatusCodeError) as denied:
                await _node(client, idx, "").call_method(ua.NodeId("st7.Status", idx))
            assert "BadUserAccessDenied" in repr(denied.value)

    asyncio.run(run())
    assert calls == []


# ---- (c) methods ------------------------------------------------------------------------------------------

def test_methods_validate_like_mqtt_and_run_in_a_worker_thread(make_server, certs):
    calls: list[tuple[object, str]] = []

    def on_command(cmd):
        calls.append((cmd, threading.current_thread().name))
        if cmd.command == "snapshot":
            raise RuntimeError("no camera")
        return {"ok": True, "product": getattr(cmd, "product", "demo"), "bundle_version": "v9"}

    server = make_server(on_command=on_command)
    with pytest.raises(CommandError) as bad:
        parse_command(encode_json({"command": "switch_product", "product": "../etc"}))

    async def run() -> dict:
        async with await _client(server, certs["client_cert"], certs["client_key"]) as client:
            idx = await client.get_namespace_index(NS)
            station = _node(client, idx, "")
            out = {}
            for method, args in (("SwitchProduct", ["../etc"]), ("SwitchProduct", ["bracket"]), ("Reload", []),
                                 ("Snapshot", []), ("Status", [])):
                out[(method, *args)] = await station.call_method(ua.NodeId(f"st7.{method}", idx), *args)
            return out

    out = asyncio.run(run())
    assert out[("SwitchProduct", "../etc")] == [False, str(bad.value)]
    ok, detail = out[("SwitchProduct", "bracket")]
    assert ok is True and json.loads(detail) == {"product": "bracket", "bundle_version": "v9"}
    assert out[("Reload",)][0] is True
    assert out[("Snapshot",)] == [False, "RuntimeError: no camera"]
    assert out[("Status",)][0] is True
    assert [c.command for c, _ in calls] == ["switch_product", "reload", "snapshot", "status"]
    assert calls[0][0].product == "bracket"
    assert all(name != "opcua" for _, name in calls), "commands must not run on the server's event loop"


def test_missing_certificate_and_busy_port_are_reported_not_raised(make_server, certs, tmp_path):
    missing = make_server(certificate=str(tmp_path / "nope" / "server-cert.der"))
    health = missing.health()
    assert health["state"] == "failing"
    assert str(tmp_path / "nope" / "server-cert.der") in health["reason"] and "opcua-cert" in health["reason"]
    missing.submit_result(_result(1))  # still never raises
    first = make_server()
    busy = make_server(port=first.cfg.port)
    assert busy.health()["state"] == "failing" and "cannot listen" in busy.health()["reason"]
    busy.update_status({"camera_state": "streaming"})
    assert first.health()["state"] == "ok"


def test_cli_writes_a_certificate_with_the_application_uri(tmp_path):
    from cryptography import x509

    from edge_runtime.cli import main

    assert main(["opcua-cert", "--out", str(tmp_path / "pki"), "--hostname", "edge-7"]) == 0
    cert = x509.load_der_x509_certificate((tmp_path / "pki" / "server-cert.der").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:edge-7:weakrest:edge"]
    assert san.get_values_for_type(x509.DNSName) == ["edge-7"]
    assert (tmp_path / "pki" / "server-key.pem").stat().st_mode & 0o777 == 0o600


# ---- (d) the real service ---------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path, fitted_slice) -> BundleStore:
    bundle, _ = fitted_slice
    s = BundleStore(tmp_path / "store")
    s.activate("demo", s.add("demo", bundle, version="v1"))
    return s


def test_edge_service_serves_the_mqtt_results_over_opcua(tmp_path, store, demo_data, broker, subscriber, certs):
    from edge_runtime.service.runner import EdgeService

    sub = subscriber(f"{PREFIX}/result")
    opcua = _opcua_cfg(certs, station="st7")
    cfg = parse_edge_config({
        "bundles": {"store": str(store.root), "product": "demo"},
        "camera": {"source": "replay", "name": "replay", "replay": {"path": str(demo_data / "test"), "fps": 20,
                                                                    "loop": False}},
        "mqtt": {"port": broker.port, "topic_prefix": PREFIX, "heatmap": "none", "client_id": f"svc-{broker.port}"},
        "queue": {"dir": str(tmp_path / "state" / "queue"), "max_mb": 64},
        "health": {"port": 0}, "latency_budget_ms": 500, "threads": 1, "opcua": opcua,
    })
    service = EdgeService(cfg)
    [server] = [s for s in service.sinks if isinstance(s, OpcUaServer)]
    service.start()

    async def run() -> _Collect:
        async with await _client(server, certs["client_cert"], certs["client_key"]) as client:
            idx = await client.get_namespace_index(NS)
            nodes = {n: _node(client, idx, n) for n in ("Seq", "Verdict", "Inspected", "Product", "CameraState")}
            handler = _Collect({node.nodeid: n for n, node in nodes.items()})
            subscription = await client.create_subscription(10, handler)
            await subscription.subscribe_data_change(list(nodes.values()), sampling_interval=0)
            await _until(lambda: len(sub.on(f"{PREFIX}/result")) >= 3, 60, "3 results on MQTT")
            await _until(lambda: handler.last("CameraState") == "streaming" and handler.last("Product") == "demo", 10,
                         "the status on OPC UA")
            ok, detail = await _node(client, idx, "").call_method(ua.NodeId("st7.Status", idx))
            assert ok is True and json.loads(detail)["product"] == "demo"
            ok, detail = await _node(client, idx, "").call_method(ua.NodeId("st7.SwitchProduct", idx), "nope")
            assert ok is False and "nope" in detail
            # the replay ends after one pass: once every frame is inspected or dropped and every result is on
            # MQTT, OPC UA must show the last one, before the service stops
            await _until(lambda: service.camera_state == "finished" and service.slot._frame is None
                         and service.results + service.slot.dropped == service.worker.stats.frames, 60,
                         "the replay's frames to be inspected")
            await _until(lambda: len({decode_result(m.payload).seq for m in sub.on(f"{PREFIX}/result")})
                         == service.results, 30, "every result on MQTT")
            mqtt_seqs = {decode_result(m.payload).seq for m in sub.on(f"{PREFIX}/result")}
            await _until(lambda: handler.last("Seq") == max(mqtt_seqs), 10, "the last MQTT seq on OPC UA")
            await asyncio.get_running_loop().run_in_executor(None, service.stop)
            return handler

    try:
        handler = asyncio.run(run())
    finally:
        service.stop()
    results = {}
    for m in sub.on(f"{PREFIX}/result"):
        r = decode_result(m.payload)
        results.setdefault(r.seq, r)
    seen = [v for n, v, _ in handler.seen if n == "Seq" and v]
    assert seen and set(seen) <= set(results), f"OPC UA seq values {sorted(set(seen) - set(results))} not on MQTT"
    assert seen == sorted(seen), "OPC UA seq went backwards"
    assert handler.last("Verdict") == results[max(results)].verdict
    assert handler.last("Inspected") == len(results) == service.results
