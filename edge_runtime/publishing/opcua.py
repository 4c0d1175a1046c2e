"""OPC UA server for PLCs and MES: the station's latest verdict, counters and status as subscribable variables,
and the operator commands as methods (sink protocol of :mod:`edge_runtime.publishing.sink`).

The asyncua server runs in its own daemon thread with its own event loop, so a slow or hostile client never
touches the inference loop: ``submit_result``/``update_status`` only store the newest values under a lock and
wake the loop (values are coalesced: a client sees the latest result, the counters count every one).

Security: SecurityPolicy Basic256Sha256 (Sign and/or SignAndEncrypt) only; a client is served only if its
application certificate is in the ``trusted_clients`` folder (re-read at every new session, so trusting a
client needs no restart).  Such a session may call the methods.  ``allow_anonymous`` adds a SecurityPolicy
None endpoint whose sessions are read-only (browse, read, subscribe; no Call, no Write).

Address space (``ns`` = index of the configured namespace URI, string node ids)::

    Objects/<station>                         ns=<ns>;s=<station>
        Verdict, Score, Threshold, Seq, FrameId, RegionsCount, LastResultTime,
        Inspected, Passed, Failed, Errors, CameraState, Product, BundleVersion, MqttConnected
                                              ns=<ns>;s=<station>.<Name>
        Reload(), SwitchProduct(product), Snapshot(), Status() -> (Ok, Detail)
                                              ns=<ns>;s=<station>.<Method>
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.publishing.messages import Command, CommandError, ResultMessage, encode_json, parse_command

if TYPE_CHECKING:
    from .config import OpcUaConfig

log = logging.getLogger(__name__)

OPCUA_CERT_HINT = "make one with: weakrest-edge opcua-cert --out DIR [--hostname H]"
DEFAULT_CERT_NAME = "server-cert.der"
DEFAULT_KEY_NAME = "server-key.pem"
SHUTDOWN_GRACE_S = 0.3  # at close: subscribers' publishing cycles deliver the last values before the server stops


class OpcUaError(RuntimeError):
    """The OPC UA server cannot serve (missing or unusable certificate, port in use, ...)."""


# ---------------------------------------------------------------------------------------------- certificates


def default_application_uri(hostname: str) -> str:
    return f"urn:{hostname}:weakrest:edge"


def make_certificate(out_dir: str | os.PathLike, hostname: str | None = None, *, application_uri: str | None = None,
                     client: bool = False, days: int = 3650, name: str | None = None) -> tuple[Path, Path]:
    """Write a self-signed OPC UA application certificate (DER) and its key (PEM, mode 0600) into ``out_dir``.

    The certificate carries ``application_uri`` (default ``urn:<hostname>:weakrest:edge``) as its URI
    SubjectAltName, as OPC UA requires, the host name as DNS (or IP) name, and the server (or, with
    ``client``, the client) extended key usage.  Returns (certificate path, key path).
    """
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    hostname = hostname or socket.gethostname()
    uri = application_uri or default_application_uri(hostname)
    role = "client" if client else "server"
    stem = name or role
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        host_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        host_name = x509.DNSName(hostname)
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, f"weakrest-edge {role} {hostname}", {}, [x509.UniformResourceIdentifier(uri), host_name],
        [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH], days=days)
    from cryptography.hazmat.primitives.serialization import Encoding

    cert_path, key_path = out / f"{stem}-cert.der", out / f"{stem}-key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(cert_gen.dump_private_key_as_pem(key))
    os.chmod(key_path, 0o600)  # an existing file keeps its mode on O_CREAT
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    return cert_path, key_path


def certificate_application_uri(path: Path) -> str:
    """The application URI a certificate carries (its URI SubjectAltName): the server must use exactly it."""
    from cryptography import x509

    data = path.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise OpcUaError(f"opcua.certificate {path}: not a DER or PEM certificate ({exc}); {OPCUA_CERT_HINT}") from None
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise OpcUaError(f"opcua.certificate {path}: carries no application URI (URI SubjectAltName), which OPC UA "
                         f"requires; {OPCUA_CERT_HINT}")
    return uris[0]


# ---------------------------------------------------------------------------------------------- server

_VARIABLES: tuple[tuple[str, str, Any], ...] = (  # name, VariantType name, initial value
    ("Verdict", "String", ""),
    ("Score", "Double", 0.0),
    ("Threshold", "Double", 0.0),
    ("Seq", "UInt64", 0),
    ("FrameId", "UInt64", 0),
    ("RegionsCount", "UInt32", 0),
    ("LastResultTime", "DateTime", dt.datetime(1601, 1, 1, tzinfo=dt.timezone.utc)),  # OPC UA's null time
    ("Inspected", "UInt64", 0),
    ("Passed", "UInt64", 0),
    ("Failed", "UInt64", 0),
    ("Errors", "UInt64", 0),
    ("CameraState", "String", ""),
    ("Product", "String", ""),
    ("BundleVersion", "String", ""),
    ("MqttConnected", "Boolean", False),
)
_METHODS = ("Reload", "SwitchProduct", "Snapshot", "Status")


def _permission_ruleset(read_only_role: Any, operator_role: Any) -> Any:
    """Operators (trusted certificate) may do what a user may except Write; anonymous sessions only read."""
    from asyncua import ua
    from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset

    write = ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)
    call = ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)
    user = {ua.NodeId(t) for t in USER_TYPES} - {write}

    class _Rules(PermissionRuleset):
        def check_validity(self, user_: Any, action_type_id: Any, body: Any) -> bool:
            if user_ is None:  # a session not yet activated
                return False
            if user_.role == operator_role:
                return action_type_id in user
            if user_.role == read_only_role:
                return action_type_id in user and action_type_id != call
            return False

    return _Rules()


class OpcUaServer:
    """The OPC UA sink: serves the station's results and status; never blocks or raises into the service."""

    name = "opcua"

    def __init__(self, cfg: OpcUaConfig, station: str,
                 on_command: Callable[[Command], dict[str, Any] | None] | None = None) -> None:
        self.cfg = cfg
        self.station = cfg.station or station
        self.on_command = on_command
        self.endpoint = f"opc.tcp://{cfg.host}:{cfg.port}"
        self._lock = threading.Lock()
        self._result: ResultMessage | None = None
        self._status: dict[str, Any] | None = None
        self._counts = {"Inspected": 0, "Passed": 0, "Failed": 0, "Errors": 0}
        self._state, self._reason = "degraded", "not started"
        self._last_error: str | None = None
        self.refused_clients = 0
        self.commands = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.application_uri: str | None = None
        self.namespace_index: int | None = None

    # ---- sink protocol -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server thread; returns once it listens or failed (about a second, at most 10 s)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)

    def submit_result(self, message: ResultMessage) -> None:
        with self._lock:
            self._result = message
            self._counts["Inspected"] += 1
            key = {"pass": "Passed", "fail": "Failed"}.get(message.verdict, "Errors")
            self._counts[key] += 1
        self._poke()

    def update_status(self, status: dict[str, Any]) -> None:
        with self._lock:
            self._status = dict(status)
        self._poke()

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self._state, "endpoint": self.endpoint, "refused_clients": self.refused_clients,
                               "commands": self.commands}
        if self._state != "ok":
            out["reason"] = self._reason
        if self._last_error:
            out["last_error"] = self._last_error
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop already ended
                pass
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._state == "ok":
            self._state, self._reason = "degraded", "closed"

    # ---- the loop ------------------------------------------------------------------------------------
    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # loop closed: the server failed or stopped; health says so
            pass

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # never into the service: health carries it
            self._fail(f"{type(exc).__name__}: {exc}")
            log.exception("OPC UA server stopped")
        finally:
            self._ready.set()

    def _fail(self, reason: str) -> None:
        self._state, self._reason = "failing", reason

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake, self._stopping = asyncio.Event(), asyncio.Event()
        try:
            server = await self._build()
            await server.start()
        except (OpcUaError, OSError) as exc:
            reason = str(exc) if isinstance(exc, OpcUaError) else \
                f"cannot listen on {self.cfg.host}:{self.cfg.port} ({exc.strerror or exc})"
            self._fail(reason)
            log.error("OPC UA server not started: %s", reason)
            self._ready.set()
            return
        self._state, self._reason = "ok", ""
        log.info("OPC UA server on %s (namespace %s index %s, station %s, application URI %s)", self.endpoint,
                 self.cfg.namespace, self.namespace_index, self.station, self.application_uri)
        self._ready.set()
        writer = asyncio.create_task(self._writer(server))
        try:
            await self._stopping.wait()
        finally:
            # the newest values still reach the variables, and subscribers get a moment to receive them
            self._wake.set()
            try:
                await asyncio.wait_for(writer, 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                writer.cancel()
            await asyncio.sleep(SHUTDOWN_GRACE_S)
            try:
                await server.stop()
            except Exception:  # stopping must not hide the shutdown
                log.exception("OPC UA server stop failed")

    async def _build(self) -> Any:
        from asyncua import Server, ua
        from asyncua.crypto.permission_rules import User, UserRole
        from asyncua.crypto.truststore import TrustStore
        from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

        cfg = self.cfg
        for what, path in (("certificate", cfg.certificate), ("private_key", cfg.private_key)):
            if not path.is_file():
                raise OpcUaError(f"opcua.{what} {path} does not exist; {OPCUA_CERT_HINT} and set opcua.certificate/"
                                 f"opcua.private_key to the files it writes ({DEFAULT_CERT_NAME}, {DEFAULT_KEY_NAME})")
        try:
            cfg.trusted_clients.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OpcUaError(f"opcua.trusted_clients {cfg.trusted_clients}: cannot use it "
                             f"({exc.strerror or exc})") from None
        self.application_uri = certificate_application_uri(cfg.certificate)
        trust = TrustStore([cfg.trusted_clients], [])
        await trust.load()
        if not any(cfg.trusted_clients.glob("*.*")):
            log.warning("OPC UA: no client certificate in %s yet: no client can connect until one is put there",
                        cfg.trusted_clients)
        checks = CertificateValidator(CertificateValidatorOptions.TRUSTED_VALIDATION
                                      | CertificateValidatorOptions.PEER_CLIENT, trust)

        async def validate(cert: Any, app: Any) -> None:
            await trust.load_trust()  # a certificate put in the folder is trusted without a restart
            try:
                await checks.validate(cert, app)
            except Exception as exc:
                self.refused_clients += 1
                code = getattr(exc, "code", None)
                why = ua.StatusCode(code).name if isinstance(code, int) else f"{type(exc).__name__}: {exc}"
                self._last_error = f"refused client {app.ApplicationUri!r}: {why}"
                log.warning("OPC UA: %s (trust it by copying its certificate into %s)", self._last_error,
                            cfg.trusted_clients)
                raise

        anonymous = cfg.allow_anonymous

        class _Users:
            """A session whose certificate is trusted is an operator; without one, read-only if anonymous is on."""

            def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                         certificate: Any = None) -> Any:
                if username is not None:
                    return None
                if certificate:  # the user token's certificate, else the secure channel's (b"" on None)
                    from cryptography import x509

                    cert = certificate if isinstance(certificate, x509.Certificate) else \
                        x509.load_der_x509_certificate(bytes(certificate))
                    return User(role=UserRole.User, name=cert.subject.rfc4514_string()) \
                        if trust.is_trusted(cert) else None
                return User(role=UserRole.Anonymous) if anonymous else None

        server = Server(user_manager=_Users())
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"weakrest-edge {self.station}")
        await server.set_application_uri(self.application_uri)
        try:
            await server.load_certificate(str(cfg.certificate))
            await server.load_private_key(str(cfg.private_key))
        except Exception as exc:
            raise OpcUaError(f"opcua.certificate {cfg.certificate} / opcua.private_key {cfg.private_key}: cannot load "
                             f"({type(exc).__name__}: {exc}); {OPCUA_CERT_HINT}") from None
        policies = [{"Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                     "SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}[m]
                    for m in dict.fromkeys(cfg.security)]
        if anonymous:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies, permission_ruleset=_permission_ruleset(UserRole.Anonymous, UserRole.User))
        server.set_identity_tokens([ua.AnonymousIdentityToken, ua.X509IdentityToken])  # who: get_user
        server.set_certificate_validator(validate)
        await self._address_space(server)
        return server

    async def _address_space(self, server: Any) -> None:
        from asyncua import ua

        idx = await server.register_namespace(self.cfg.namespace)
        self.namespace_index = idx
        st = self.station
        obj = await server.nodes.objects.add_object(ua.NodeId(st, idx), ua.QualifiedName(st, idx))
        self._nodes: dict[str, Any] = {}
        for name, vtype, initial in _VARIABLES:
            variant = ua.Variant(initial, getattr(ua.VariantType, vtype))
            node = await obj.add_variable(ua.NodeId(f"{st}.{name}", idx), ua.QualifiedName(name, idx), variant)
            self._nodes[name] = node
        outs = [_argument("Ok", ua.ObjectIds.Boolean, "the command succeeded"),
                _argument("Detail", ua.ObjectIds.String, "what was done, or why not (JSON for Status)")]
        for method in _METHODS:
            ins = [_argument("product", ua.ObjectIds.String, "product to serve")] if method == "SwitchProduct" else []
            await obj.add_method(ua.NodeId(f"{st}.{method}", idx), ua.QualifiedName(method, idx),
                                 self._method(method), ins, outs)

    def _method(self, method: str) -> Callable[..., Any]:
        command = {"Reload": "reload", "SwitchProduct": "switch_product", "Snapshot": "snapshot",
                   "Status": "status"}[method]

        async def call(parent: Any, *args: Any) -> list[Any]:
            values = [getattr(a, "Value", a) for a in args]
            ok, detail = await asyncio.get_running_loop().run_in_executor(None, self.run_command, command, values)
            from asyncua import ua

            return [ua.Variant(ok, ua.VariantType.Boolean), ua.Variant(detail, ua.VariantType.String)]

        return call

    def run_command(self, command: str, args: list[Any]) -> tuple[bool, str]:
        """Validate and run one command like the MQTT ``cmd`` topic does; (ok, detail or error).  Worker thread."""
        body: dict[str, Any] = {"command": command, "id": f"opcua-{self.commands + 1}"}
        if command == "switch_product":
            if len(args) != 1:
                return False, f"switch_product: expected 1 argument (product), got {len(args)}"
            body["product"] = args[0]
        try:
            cmd = parse_command(encode_json(body))
        except (CommandError, TypeError, ValueError) as exc:
            log.warning("OPC UA: refused command %s: %s", command, exc)
            return False, str(exc)
        if self.on_command is None:
            return False, "this service takes no commands"
        self.commands += 1
        log.info("OPC UA: command %s", cmd.command)
        try:
            reply = dict(self.on_command(cmd) or {})
        except Exception as exc:
            log.exception("OPC UA: command %s failed", command)
            return False, f"{type(exc).__name__}: {exc}"
        ok = bool(reply.pop("ok", True))
        detail, error = reply.pop("detail", None), reply.pop("error", None)
        if not ok:
            return False, str(error or "failed")
        if reply:  # the extra keys (product, files, status...) as JSON after the detail
            extra = json.dumps(reply, default=str, separators=(",", ":"))
            return True, f"{detail} {extra}" if detail else extra
        return True, str(detail or "")

    async def _writer(self, server: Any) -> None:
        """Write the newest result/status whenever woken; a failing write is logged and reported, never fatal."""
        assert self._wake is not None
        last_result: ResultMessage | None = None
        last_status: dict[str, Any] | None = None
        self._wake.set()  # values given before the server listened
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                result, status, counts = self._result, self._status, dict(self._counts)
            try:
                if status is not None and status is not last_status:
                    await self._write_status(server, status)
                    last_status = status
                if result is not None and result is not last_result:
                    await self._write_result(server, result, counts)
                    last_result = result
                if self._state != "ok" and self._reason.startswith("cannot update"):
                    self._state, self._reason = "ok", ""
            except Exception as exc:
                self._state, self._reason = "degraded", f"cannot update the variables ({type(exc).__name__}: {exc})"
                log.exception("OPC UA: cannot update the variables")
            if self._stopping is not None and self._stopping.is_set():
                return

    async def _write(self, server: Any, name: str, value: Any) -> None:
        from asyncua import ua

        vtype = dict((n, t) for n, t, _ in _VARIABLES)[name]
        await server.write_attribute_value(self._nodes[name].nodeid,
                                           ua.DataValue(ua.Variant(value, getattr(ua.VariantType, vtype))))

    async def _write_result(self, server: Any, r: ResultMessage, counts: dict[str, int]) -> None:
        for name, value in (("Verdict", r.verdict), ("Score", float(r.score) if r.score is not None else float("nan")),
                            ("Threshold", float(r.threshold) if r.threshold is not None else float("nan")),
                            ("FrameId", r.frame_id), ("RegionsCount", len(r.regions)),
                            ("LastResultTime", dt.datetime.fromtimestamp(r.captured_at, dt.timezone.utc)),
                            *counts.items(), ("Seq", r.seq)):  # Seq last: a client that sees it sees the rest
            await self._write(server, name, value)

    async def _write_status(self, server: Any, s: dict[str, Any]) -> None:
        for name, key in (("CameraState", "camera_state"), ("Product", "product"),
                          ("BundleVersion", "bundle_version")):
            await self._write(server, name, str(s.get(key) or ""))
        await self._write(server, "MqttConnected", bool(s.get("mqtt_connected")))


def _argument(name: str, type_id: int, description: str) -> Any:
    from asyncua import ua

    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(type_id)
    arg.ValueRank = -1
    arg.Description = ua.LocalizedText(description)
    return arg
