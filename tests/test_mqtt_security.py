"""MQTT that authenticates and is authorised: a real Mosquitto with TLS, client certificates from a throw-away
CA and an ACL file; and the service's own check behind it, signed commands (``commands.require_auth``)."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.publishing.command_auth import CommandAuth, read_secret
from edge_runtime.publishing.disk_queue import DiskQueue
from edge_runtime.publishing.messages import CommandError, parse_command
from edge_runtime.publishing.mqtt import MqttPublisher
from edge_runtime.service.config import MQTTConfig, TLSConfig
from tests.mqtt_fixtures import require_mosquitto, wait_until
from tests.test_mqtt_publisher import result

PREFIX = "plant/line/st1"
ACL = f"""# the station's service: publishes under its prefix, reads only its command topic
user edge-st1
topic write {PREFIX}/#
topic read {PREFIX}/cmd

# the MES: reads everything of the station, may publish results (a replay tool) but no commands
user mes
topic read {PREFIX}/#
topic write {PREFIX}/result

# the operator's tool: commands and their replies
user operator
topic write {PREFIX}/cmd
topic read {PREFIX}/cmd/reply
"""


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


def _certificate(name: str, key, issuer_name, issuer_key, *, ca: bool = False, server: bool = False):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throw-away CA, the broker's certificate, client certificates named by identity, and one client
    certificate from a CA the broker does not know."""
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("pki")
    out: dict[str, Path] = {}
    for ca_name in ("ca", "rogue-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"test {ca_name}", key, None, key, ca=True)
        out[f"{ca_name}.key"], out[f"{ca_name}.crt"] = d / f"{ca_name}.key", d / f"{ca_name}.crt"
        out[f"{ca_name}.key"].write_bytes(_pem(key))
        out[f"{ca_name}.crt"].write_bytes(_pem(cert))
        out[f"_{ca_name}"] = (key, cert)  # type: ignore[assignment]
    for name, ca_name, server in (("server", "ca", True), ("edge-st1", "ca", False), ("mes", "ca", False),
                                  ("operator", "ca", False), ("intruder", "rogue-ca", False)):
        ca_key, ca_cert = out[f"_{ca_name}"]  # type: ignore[misc]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("127.0.0.1" if server else name, key, ca_cert.subject, ca_key, server=server)
        out[f"{name}.key"], out[f"{name}.crt"] = d / f"{name}.key", d / f"{name}.crt"
        out[f"{name}.key"].write_bytes(_pem(key))
        out[f"{name}.crt"].write_bytes(_pem(cert))
    (d / "acl").write_text(ACL)
    out["acl"] = d / "acl"
    return out


@pytest.fixture
def secure_broker(make_broker, pki):
    b = make_broker(impl="mosquitto" if require_mosquitto_available() else "auto",
                    tls=(pki["ca.crt"], pki["server.crt"], pki["server.key"]), require_certificate=True,
                    acl_file=pki["acl"])
    require_mosquitto(b, "TLS with client certificates and an ACL")
    return b


def require_mosquitto_available() -> bool:
    from edge_runtime.publishing.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("needs Mosquitto (TLS, client certificates, ACL): apt-get install mosquitto")
    return True


class Client:
    """A paho MQTT 5 client with a client certificate (or none), recording messages and PUBACK reason codes."""

    def __init__(self, port: int, pki: dict, identity: str | None, ca: str = "ca.crt") -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.pubacks: dict[int, mqtt.ReasonCode] = {}
        self.connack: mqtt.ReasonCode | None = None
        self.disconnected = threading.Event()
        self.cond = threading.Condition()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"{identity or 'anon'}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(pki[ca]), certfile=str(pki[f"{identity}.crt"]) if identity else None,
                            keyfile=str(pki[f"{identity}.key"]) if identity else None, cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.port = port

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self.cond:
            self.connack = reason_code
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.cond:
            self.pubacks[mid] = reason_code
            self.cond.notify_all()

    def connect(self) -> Client:
        self.client.connect("127.0.0.1", self.port, 30)
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, 10, "CONNACK")
        assert not self.connack.is_failure, self.connack
        return self

    def publish(self, topic: str, payload: bytes | str) -> mqtt.ReasonCode:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.pubacks, 10, f"the PUBACK for {topic}")
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _tls_config(broker, pki, identity: str, **kw) -> MQTTConfig:
    return MQTTConfig(host="127.0.0.1", port=broker.port, topic_prefix=PREFIX, protocol="5",
                      client_id=f"svc-{uuid.uuid4().hex[:6]}",
                      tls=TLSConfig(ca=pki["ca.crt"], cert=pki[f"{identity}.crt"], key=pki[f"{identity}.key"]), **kw)


def _refused(port: int, pki: dict, identity: str | None) -> str:
    """How the broker refused the client: during the TLS handshake, or by dropping it right after."""
    c = Client(port, pki, identity)
    try:
        c.client.connect("127.0.0.1", port, 30)
    except (ssl.SSLError, OSError) as exc:
        return f"TLS handshake failed ({type(exc).__name__})"
    c.client.loop_start()
    try:
        # TLS 1.3 finishes the client's side of the handshake before the server checks the certificate
        wait_until(lambda: c.disconnected.is_set() or (c.connack is not None and c.connack.is_failure), 10,
                   f"the broker to refuse {identity or 'a client without a certificate'}")
        return "dropped after the handshake"
    finally:
        c.client.loop_stop()


def test_broker_refuses_clients_without_a_certificate_of_its_ca(secure_broker, pki):
    assert _refused(secure_broker.port, pki, None)
    assert _refused(secure_broker.port, pki, "intruder")  # a certificate, but from another CA
    Client(secure_broker.port, pki, "mes").connect().close()  # the same broker takes a known client


def test_service_works_inside_its_acl_and_cannot_leave_it(secure_broker, pki, tmp_path):
    mes = Client(secure_broker.port, pki, "mes").connect()
    mes.client.subscribe(f"{PREFIX}/#", qos=1)
    queue = DiskQueue(tmp_path / "q", 1 << 20)
    pub = MqttPublisher(_tls_config(secure_broker, pki, "edge-st1"), queue).start()
    try:
        wait_until(lambda: pub.connected, 15, "the service to connect with its certificate")
        for i in range(3):
            pub.submit_result(result(i))
        assert pub.flush(10) and pub.acked == 3 and pub.rejected == 0
        wait_until(lambda: sum(m.topic == f"{PREFIX}/result" for m in mes.messages) >= 3, 10, "3 results at the MES")
    finally:
        pub.close(timeout_s=2)
        queue.close()
    # the station's identity may not publish outside its prefix
    station = Client(secure_broker.port, pki, "edge-st1").connect()
    try:
        assert station.publish("plant/line/st2/result", b"{}").value == 0x87  # not authorised
        assert station.publish(f"{PREFIX}/result", b"{}").value == 0  # its own prefix: fine
    finally:
        station.close()
        mes.close()


def test_a_client_allowed_results_but_not_commands_cannot_switch_products(secure_broker, pki, tmp_path):
    calls = []
    queue = DiskQueue(tmp_path / "q", 1 << 20)
    pub = MqttPublisher(_tls_config(secure_broker, pki, "edge-st1"), queue,
                        on_command=lambda c: calls.append(c) or {}).start()
    mes = Client(secure_broker.port, pki, "mes").connect()
    operator = Client(secure_broker.port, pki, "operator").connect()
    operator.client.subscribe(f"{PREFIX}/cmd/reply", qos=1)
    try:
        wait_until(lambda: pub.commands_ready, 15, "the service to subscribe to its commands")
        switch = json.dumps({"command": "switch_product", "product": "other", "id": "from-mes"})
        assert mes.publish(f"{PREFIX}/cmd", switch).value == 0x87  # the broker refuses it: never delivered
        # the operator may: the service runs it and replies (which also shows the refused one never came)
        ok = json.dumps({"command": "status", "id": "from-operator"})
        assert operator.publish(f"{PREFIX}/cmd", ok).value == 0
        wait_until(lambda: any(json.loads(m.payload).get("id") == "from-operator" for m in operator.messages), 10,
                   "the operator's reply")
        assert [c.id for c in calls] == ["from-operator"]
    finally:
        for c in (mes, operator):
            c.close()
        pub.close(timeout_s=2)
        queue.close()


# ---- signed commands --------------------------------------------------------------------------------------

SECRET = b"0123456789abcdef-line3-secret"


def test_command_auth_refuses_unsigned_altered_stale_and_replayed_commands():
    now = [1_000_000.0]
    auth = CommandAuth(SECRET, max_age_s=60, clock=lambda: now[0])
    signed = auth.sign({"command": "switch_product", "product": "bracket", "id": "c1"})
    assert parse_command(json.dumps(signed).encode(), auth).product == "bracket"
    with pytest.raises(CommandError, match="already used"):
        parse_command(json.dumps(signed).encode(), auth)  # the same message again: a replay

    cases = [
        ({"command": "reload", "id": "c2"}, "not signed"),
        ({**auth.sign({"command": "reload"}), "command": "status"}, "wrong signature"),
        (CommandAuth(b"another-secret-of-16+", clock=lambda: now[0]).sign({"command": "reload"}), "wrong signature"),
        (auth.sign({"command": "reload"}, ts=now[0] - 120), "outside the 60 s window"),
        (auth.sign({"command": "reload"}, ts=now[0] + 120), "outside the 60 s window"),
        ({"command": "reload", "auth": {"ts": now[0], "nonce": "abcdefgh"}}, "exactly 'ts', 'nonce' and 'hmac'"),
        ({"command": "reload", "auth": "x"}, "must be an object"),
    ]
    for obj, why in cases:
        with pytest.raises(CommandError, match=why):
            parse_command(json.dumps(obj).encode(), auth)
    # an unknown field is refused after the signature, like any malformed command
    with pytest.raises(CommandError, match="unexpected field"):
        parse_command(json.dumps(auth.sign({"command": "reload", "force": True})).encode(), auth)
    # a service that does not require signatures ignores one
    assert parse_command(json.dumps(auth.sign({"command": "reload", "id": "c3"})).encode()).id == "c3"


def test_secret_file_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match="cannot read it"):
        read_secret(tmp_path / "missing")
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16 are needed"):
        read_secret(tmp_path / "short")
    (tmp_path / "ok").write_bytes(SECRET + b"\n")
    assert read_secret(tmp_path / "ok") == SECRET


def test_service_with_require_auth_runs_only_signed_commands(broker, subscriber, tmp_path):
    calls = []
    queue = DiskQueue(tmp_path / "q", 1 << 20)
    auth = CommandAuth(SECRET)
    cfg = MQTTConfig(host="127.0.0.1", port=broker.port, topic_prefix=PREFIX,
                     protocol="5" if "5" in broker.protocols else "3.1.1", client_id=f"svc-{uuid.uuid4().hex[:6]}")
    pub = MqttPublisher(cfg, queue, on_command=lambda c: calls.append(c) or {}, command_auth=CommandAuth(SECRET))
    pub.start()
    replies = subscriber(f"{PREFIX}/cmd/reply")
    try:
        wait_until(lambda: pub.commands_ready, 15, "the service to subscribe to its commands")
        send = [json.dumps({"command": "switch_product", "product": "x", "id": "unsigned"}),
                json.dumps(auth.sign({"command": "status", "id": "signed"})),
                json.dumps(CommandAuth(b"not-the-line-secret!").sign({"command": "reload", "id": "forged"}))]
        topic = f"{PREFIX}/cmd/reply"

        def answers(messages) -> list[dict]:
            return [json.loads(m.payload) for m in messages if m.topic == topic]

        for payload in send:
            replies.client.publish(f"{PREFIX}/cmd", payload, qos=1).wait_for_publish(5)
        # QoS 1 is at least once: a command may arrive twice on a busy machine and be answered twice, so wait for
        # an answer to each id rather than for a count, and read each id's first answer
        assert replies.wait_for(lambda ms: {"unsigned", "signed", "forged"} <= {a["id"] for a in answers(ms)}, 15), \
            f"answers so far: {answers(replies.on(topic))}"
        by_id: dict[str, dict] = {}
        for answer in answers(replies.on(topic)):
            by_id.setdefault(answer["id"], answer)
        assert by_id["signed"]["ok"] is True
        assert not by_id["unsigned"]["ok"] and "not signed" in by_id["unsigned"]["error"]
        assert not by_id["forged"]["ok"] and "wrong signature" in by_id["forged"]["error"]
        assert [c.id for c in calls] == ["signed"]
        replies.client.publish(f"{PREFIX}/cmd", send[1], qos=1).wait_for_publish(5)  # replayed
        assert replies.wait_for(lambda ms: any("already used" in (a.get("error") or "") for a in answers(ms)), 15), \
            f"answers so far: {answers(replies.on(topic))}"
        assert len(calls) == 1
    finally:
        pub.close(timeout_s=2)
        queue.close()
