"""Signed MQTT commands: who may change what the line does, even on a broker many clients can write to.

The broker's ACL decides who may publish on ``<prefix>/cmd``; this is the service's own check behind it
(``commands.require_auth``), so a misconfigured broker or a leaked broker password still cannot switch
products.  A command carries an ``auth`` object::

    {"command": "switch_product", "product": "bracket", "id": "c-18",
     "auth": {"ts": 1714644000.123, "nonce": "4f1c9a0e3b7d2a61", "hmac": "<hex>"}}

``hmac`` is HMAC-SHA256, keyed by the shared secret (``commands.secret_file``, at least 16 bytes), over the
canonical JSON (sorted keys, no spaces, UTF-8) of the whole command with ``hmac`` left out of ``auth``.  The
service refuses a command that is unsigned, wrongly signed, older or newer than ``commands.max_age_s`` by its
``ts`` (clocks are NTP-synchronised on a line), or whose ``nonce`` it has already seen within that window (a
replay).  It works on MQTT 3.1.1 and 5 alike.  :func:`CommandAuth.sign` is what a client does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.publishing.messages import CommandError

AUTH = "auth"
MIN_SECRET_BYTES = 16


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def read_secret(path: str | os.PathLike) -> bytes:
    """The shared secret from its file (surrounding whitespace stripped); ValueError naming the problem."""
    p = Path(path)
    try:
        secret = p.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"commands.secret_file {p}: cannot read it ({exc.strerror or exc})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"commands.secret_file {p}: the secret has {len(secret)} bytes, at least "
                         f"{MIN_SECRET_BYTES} are needed (e.g. head -c 32 /dev/urandom | base64 > {p.name})")
    return secret


class CommandAuth:
    """Signs and verifies commands with one shared secret; remembers recent nonces to refuse replays."""

    def __init__(self, secret: bytes, max_age_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the command secret must have at least {MIN_SECRET_BYTES} bytes")
        self._secret = bytes(secret)
        self.max_age_s = float(max_age_s)
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def _mac(self, obj: dict[str, Any]) -> str:
        return hmac.new(self._secret, canonical(obj), hashlib.sha256).hexdigest()

    def sign(self, command: dict[str, Any], *, ts: float | None = None, nonce: str | None = None) -> dict[str, Any]:
        """``command`` with its ``auth`` object (a client's side)."""
        body = {k: v for k, v in command.items() if k != AUTH}
        body[AUTH] = {"ts": round(self._clock() if ts is None else ts, 3), "nonce": nonce or secrets.token_hex(12)}
        body[AUTH]["hmac"] = self._mac(body)
        return body

    def verify(self, obj: dict[str, Any]) -> None:
        """Check the ``auth`` of a decoded command; :class:`CommandError` says why it is refused."""
        cid = obj.get("id") if isinstance(obj.get("id"), str) else None
        name = obj.get("command") if isinstance(obj.get("command"), str) else None

        def refuse(why: str) -> CommandError:
            return CommandError(f"command refused: {why}", cid, name)

        auth = obj.get(AUTH)
        if auth is None:
            raise refuse("it is not signed, and this service takes only signed commands (commands.require_auth; "
                         "add an 'auth' object: see the README)")
        if not isinstance(auth, dict) or set(auth) != {"ts", "nonce", "hmac"}:
            raise refuse("field 'auth' must be an object with exactly 'ts', 'nonce' and 'hmac'")
        ts, nonce, mac = auth["ts"], auth["nonce"], auth["hmac"]
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            raise refuse("auth.ts must be a number (epoch seconds)")
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 128:
            raise refuse("auth.nonce must be a string of 8 to 128 characters")
        if not isinstance(mac, str):
            raise refuse("auth.hmac must be a hex string")
        body = dict(obj)
        body[AUTH] = {"ts": ts, "nonce": nonce}
        if not hmac.compare_digest(self._mac(body), mac.lower()):
            raise refuse("wrong signature (auth.hmac does not match: another secret, or the command was altered)")
        now = self._clock()
        if abs(now - ts) > self.max_age_s:
            raise refuse(f"signed {now - ts:+.0f} s from now, outside the {self.max_age_s:g} s window "
                         "(a replay, or a clock that is off: check NTP)")
        with self._lock:
            for old in [n for n, t in self._seen.items() if now - t > 2 * self.max_age_s]:
                del self._seen[old]
            if nonce in self._seen:
                raise refuse("this nonce was already used (a replayed command)")
            self._seen[nonce] = now
