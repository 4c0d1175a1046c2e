"""MQTT message formats of the edge service: this module is the documented schema.

All topics start with ``<prefix>`` = ``mqtt.topic_prefix`` (``<site>/<line>/<station>``).

``<prefix>/result`` - JSON, QoS 1, not retained, one per inspected frame (:class:`ResultMessage`)::

    {"schema": "weakrest.result/1", "seq": 1042, "frame_id": 88211, "camera": "cam0",
     "product": "bracket", "bundle_version": "2024-05-02T10-11-00", "verdict": "fail",
     "score": 0.913, "threshold": 0.62,
     "regions": [{"x": 40, "y": 12, "w": 18, "h": 9, "area_px": 131, "peak": 0.97}],
     "timings_ms": {"preprocess": 1.2, "backbone": 21.7, "total": 30.4},
     "over_budget": false, "budget_ms": 50.0,
     "captured_at": 1714644000.123, "published_at": 1714644000.161,
     "dropped_frames": 0, "error": null}

  ``seq`` increases by one per result and survives restarts (the service assigns it); results go through a
  durable queue and are delivered *at least once, in order*: after a reconnect the unacknowledged tail is
  sent again, so a consumer de-duplicates on ``seq`` (keep the first copy; a repeated or lower ``seq`` is a
  duplicate).  ``published_at`` is stamped when the message is (re)sent, so it can be much later than
  ``captured_at`` after an outage.  ``verdict`` "error" means the frame could not be inspected (``error``
  says why; ``score``/``threshold`` are then null).  Region boxes are in heatmap pixels.  With a bundle that
  fuses a logical (component) score into the verdict, ``evidence`` says why::

    "evidence": {"structural": 0.34, "logical": 10.9, "components": [0.03, 0.22, 0.37, 0.19, 0.19]}

  ``structural`` and ``logical`` are each standardised on good parts (0: a typical good part; the verdict's
  ``score`` is their fusion, by default the larger), ``components`` the area fraction of each component
  class; a part failed by ``logical`` alone has no regions (a missing part has nothing to point at).
  :func:`result_json_schema` gives the JSON Schema.

``<prefix>/status`` - JSON, QoS 1, retained::

    {"state": "online", "product": "bracket", "bundle_version": "...", "camera_state": "streaming",
     "since": 1714643000.0, "at": 1714643012.5, "pid": 4242, "version": "0.1.0"}

  ``state`` is "online" (published on every connect and on every change: camera state, bundle) or
  "offline" (published on a clean shutdown, with ``"reason": "shutdown"``).  The broker publishes the last
  will ``{"state": "offline", "reason": "connection lost"}`` when the service vanishes without
  disconnecting.  ``since``: epoch seconds at which ``state`` began (online: the connect); ``at``: when
  the message was composed.  A change while the broker is unreachable is held and published, in order, on the next
  connect, so ``at`` can be earlier than the delivery.  The service may add keys; with ``fleet.enabled``,
  ``fleet`` says what the station runs (version and OCI digest) and its rollout state (see
  ``edge_runtime/fleet/release.py``).

``<prefix>/heatmap`` - QoS 0, not retained, not queued (best effort): a PNG or JPEG image of the anomaly
map.  MQTT 5: the payload is the image; the ``ContentType`` property is ``image/png`` or ``image/jpeg`` and
the user properties ``frame_id``, ``seq`` and ``content_type`` tie it to its result.  MQTT 3.1.1 has no
properties, so the payload is framed (:func:`encode_heatmap_header` / :func:`decode_heatmap`)::

    b"WRHM" | uint32 big-endian header length | UTF-8 JSON {"frame_id", "seq", "format"} | image bytes

``<prefix>/cmd`` - JSON commands (:data:`Command`), at most 64 KiB, retained commands are refused::

    {"command": "reload", "id": "c-17"}                 re-read the current bundle of the product
    {"command": "switch_product", "product": "bracket", "id": "c-18"}
    {"command": "snapshot", "id": "c-19"}               save the last frame and its heatmap overlay on the
                                                        edge box (state dir); the reply lists the files
    {"command": "status", "id": "c-20"}                 republish the status

  ``id`` (optional, string) is echoed in the reply.  Unknown keys are refused.

``<prefix>/cmd/reply`` - JSON, QoS 1, one per command received::

    {"id": "c-18", "command": "switch_product", "ok": true, "detail": "now serving bracket 2024-05-02"}
    {"id": "c-21", "command": null, "ok": false, "error": "unknown command 'rebot': expected one of ..."}

  Handlers may add keys to a successful reply.  With MQTT 5 the request's ``CorrelationData`` is copied.
"""

from __future__ import annotations

import json
import math
import struct
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from edge_runtime.store import plain_product_name

if TYPE_CHECKING:
    import numpy as np

    from edge_runtime.publishing.command_auth import CommandAuth

RESULT_SCHEMA = "weakrest.result/1"
MAX_COMMAND_BYTES = 64 * 1024
HEATMAP_MAGIC = b"WRHM"
HEATMAP_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
WILL_PAYLOAD = b'{"state":"offline","reason":"connection lost"}'


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding of every JSON message."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------- results


class Region(BaseModel):
    """A defect region in heatmap pixels."""

    model_config = ConfigDict(extra="forbid")

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(ge=0)
    h: int = Field(ge=0)
    area_px: int = Field(ge=0)
    peak: float

    @classmethod
    def from_region(cls, region: Any) -> Region:
        """From ``edge_runtime.core.scoring.Region`` (``box``, ``area``, ``peak``), without importing it."""
        x, y, w, h = (int(v) for v in region.box)
        return cls(x=x, y=y, w=w, h=h, area_px=int(region.area), peak=round(float(region.peak), 6))


class VerdictEvidence(BaseModel):
    """Both scores behind a verdict that fuses them, each standardised on good parts (0: a typical good part),
    and the image's composition, so a MES or an operator can see why a part was rejected."""

    model_config = ConfigDict(extra="forbid")

    structural: float = Field(description="surface score (nearest-normal distance / residual Swin), standardised")
    logical: float = Field(description="composition score (component classes), standardised")
    components: list[float] | None = Field(default=None, description="area fraction of each component class")


class ResultMessage(BaseModel):
    """One inspected frame, as published on ``<prefix>/result`` (schema ``weakrest.result/1``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["weakrest.result/1"] = Field(default=RESULT_SCHEMA, alias="schema")
    seq: int = Field(ge=0, description="per-service result counter, +1 per result, survives restarts")
    frame_id: int = Field(ge=0, description="camera frame number")
    camera: str
    product: str
    bundle_version: str
    verdict: Literal["pass", "fail", "error"]
    score: float | None = None
    threshold: float | None = None
    regions: list[Region] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict, description="stage -> milliseconds")
    over_budget: bool = False
    budget_ms: float | None = None
    captured_at: float = Field(description="epoch seconds when the frame was captured")
    published_at: float | None = Field(default=None, description="epoch seconds when sent; set by the sender")
    dropped_frames: int = Field(default=0, ge=0, description="frames dropped unprocessed so far")
    evidence: VerdictEvidence | None = Field(default=None, description="with a logical score: why the verdict")
    error: str | None = None

    @model_validator(mode="after")
    def _error_iff_error_verdict(self) -> ResultMessage:
        if self.verdict == "error" and not self.error:
            raise ValueError("verdict 'error' needs an error message")
        if self.verdict != "error" and self.score is None:
            raise ValueError(f"verdict {self.verdict!r} needs a score")
        return self


def result_json_schema() -> dict:
    """JSON Schema of the result message (field names as on the wire)."""
    return ResultMessage.model_json_schema(by_alias=True)


def encode_result(message: ResultMessage) -> bytes:
    return message.model_dump_json(by_alias=True).encode("utf-8")


def decode_result(payload: bytes) -> ResultMessage:
    return ResultMessage.model_validate_json(payload)


def stamp_published_at(payload: bytes, when: float) -> bytes:
    """Set ``published_at`` in an encoded result (done by the sender at every (re)send)."""
    obj = json.loads(payload)
    obj["published_at"] = round(when, 6)
    return encode_json(obj)


# ---------------------------------------------------------------------------------------------- status


def status_payload(state: Literal["online", "offline"], info: dict[str, Any], since: float, pid: int,
                   version: str, reason: str | None = None, at: float | None = None,
                   interval_s: float | None = None) -> dict[str, Any]:
    """Status message: the fixed keys first, then whatever else ``info`` (the service) provides.

    An online status carries ``interval_s``, the refresh period: one whose ``at`` is older than
    :func:`status_expiry_s` of it is stale (the service is gone without a last will reaching the broker)."""
    out: dict[str, Any] = {"state": state, "product": None, "bundle_version": None, "camera_state": None}
    fixed = ("state", "since", "at", "pid", "version", "reason", "interval_s")
    out.update({k: v for k, v in info.items() if k not in fixed})
    out.update({"since": round(since, 3), "at": round(time.time() if at is None else at, 3), "pid": pid,
                "version": version})
    if state == "online" and interval_s is not None:
        out["interval_s"] = interval_s
    if reason is not None:
        out["reason"] = reason
    return out


def status_expiry_s(interval_s: float) -> int:
    """Seconds after which an online status that was not refreshed is stale: three missed refreshes."""
    return max(1, math.ceil(3 * interval_s))


# ---------------------------------------------------------------------------------------------- heatmaps


def encode_heatmap_header(meta: dict[str, Any], image_bytes: bytes) -> bytes:
    """MQTT 3.1.1 heatmap payload: magic, header length, JSON header ({frame_id, seq, format}), image."""
    header = encode_json(meta)
    return HEATMAP_MAGIC + struct.pack(">I", len(header)) + header + bytes(image_bytes)


def decode_heatmap(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of :func:`encode_heatmap_header`; ``ValueError`` when the payload is not framed so."""
    if len(payload) < 8 or payload[:4] != HEATMAP_MAGIC:
        raise ValueError("not a framed heatmap (missing WRHM magic)")
    (n,) = struct.unpack_from(">I", payload, 4)
    if 8 + n > len(payload):
        raise ValueError(f"heatmap header length {n} runs past the {len(payload)}-byte payload")
    try:
        meta = json.loads(payload[8:8 + n])
    except ValueError as exc:
        raise ValueError(f"heatmap header is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError("heatmap header is not a JSON object")
    return meta, bytes(payload[8 + n:])


def encode_heatmap_image(heatmap: np.ndarray, fmt: Literal["png", "jpeg"] = "png",
                         vmax: float | None = None, quality: int = 90) -> bytes:
    """8-bit grey image of an anomaly map scaled to [0, vmax] (default: its maximum), PNG or JPEG."""
    import cv2
    import numpy as np

    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(vmax) if vmax else float(heat.max(initial=0.0))
    scaled = heat * (255.0 / top) if top > 0 else np.zeros_like(heat)
    img = np.clip(scaled, 0, 255).astype(np.uint8)
    if fmt == "png":
        ok, buf = cv2.imencode(".png", img)
    elif fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        raise ValueError(f"unknown heatmap format {fmt!r} (expected png or jpeg)")
    if not ok:
        raise ValueError(f"could not encode a {img.shape} heatmap as {fmt}")
    return buf.tobytes()


# ---------------------------------------------------------------------------------------------- commands


class CommandError(ValueError):
    """A command payload was refused; ``command_id``/``command`` are set when they could be read."""

    def __init__(self, message: str, command_id: str | None = None, command: str | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.command = command


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(default=None, max_length=256, description="echoed in the reply")


class ReloadCommand(_Cmd):
    """Re-read the product's current bundle (e.g. after a new one was installed)."""

    command: Literal["reload"]


class SwitchProductCommand(_Cmd):
    """Serve another product's current bundle."""

    command: Literal["switch_product"]
    product: str = Field(min_length=1, max_length=128)

    @field_validator("product")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return plain_product_name(v)


class SnapshotCommand(_Cmd):
    """Save the last inspected frame and its heatmap overlay on the edge box; the reply lists the files."""

    command: Literal["snapshot"]


class StatusCommand(_Cmd):
    """Republish the status and reply with it."""

    command: Literal["status"]


Command = Annotated[
    ReloadCommand | SwitchProductCommand | SnapshotCommand | StatusCommand, Field(discriminator="command")
]
COMMAND_NAMES = ("reload", "switch_product", "snapshot", "status")
_COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


_EXAMPLE = 'a JSON object such as {"command": "status"}'
_EXPECTED_NAMES = f"expected one of {', '.join(COMMAND_NAMES)}"


def _json_kind(value: Any) -> str:
    """What a decoded JSON value is, in the words of JSON (``array``, ``null``), not of Python (``list``)."""
    if value is None:
        return "JSON null"
    if isinstance(value, bool):
        return f"JSON {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    kinds = {str: "a JSON string", list: "a JSON array", dict: "a JSON object"}
    return kinds.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    loc = [str(p) for p in err["loc"]]
    if loc and loc[0] in COMMAND_NAMES:  # the union tag prefixes every location
        loc = loc[1:]
    field = ".".join(loc) or "(payload)"
    if err["type"] == "missing":
        return f"missing field '{field}'"
    if err["type"] == "extra_forbidden":
        allowed = f" (allowed: {', '.join(sorted(model.model_fields))})" if model is not None else ""
        return f"unexpected field '{field}'{allowed}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {_shown(value)})"
    return f"field '{field}': {msg}{shown}"


_MODELS: dict[str, type[BaseModel]] = {
    "reload": ReloadCommand, "switch_product": SwitchProductCommand, "snapshot": SnapshotCommand,
    "status": StatusCommand,
}


def _decode(payload: bytes) -> Any:
    """Strict UTF-8, then JSON: ``json.loads`` on bytes would guess UTF-16/32 and report a codec the sender never
    used, or even read UTF-16 bytes as valid text."""
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"payload is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position "
                           f"{exc.start})") from None
    if text.startswith("\ufeff"):
        raise CommandError("payload starts with a UTF-8 byte-order mark: send the JSON text without it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = exc.msg[:1].lower() + exc.msg[1:]
        raise CommandError(f"payload is not JSON: {what} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise CommandError(f"payload is not usable JSON: {exc}") from None


def parse_command(payload: bytes, auth: CommandAuth | None = None) -> Command:
    """Validate a command payload; :class:`CommandError` says in plain words what was wrong and what was expected.

    With ``auth`` (``commands.require_auth``) the command must carry a valid signature
    (:mod:`edge_runtime.publishing.command_auth`), checked before anything else about it; without, a
    signature that is present is ignored."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload is too large: {len(payload)} bytes, at most {MAX_COMMAND_BYTES} are accepted")
    if not payload:
        raise CommandError(f"payload is empty: expected {_EXAMPLE}")
    obj = _decode(payload)
    if not isinstance(obj, dict):
        raise CommandError(f"payload is {_json_kind(obj)}: expected {_EXAMPLE}")
    if auth is not None:
        auth.verify(obj)
    obj.pop("auth", None)
    cid = obj.get("id") if isinstance(obj.get("id"), str) else None
    name = obj.get("command")
    if name is None:
        raise CommandError(f"missing field 'command': {_EXPECTED_NAMES}", cid)
    if not isinstance(name, str):
        raise CommandError(f"field 'command' is {_json_kind(name)}: {_EXPECTED_NAMES}", cid)
    if name not in COMMAND_NAMES:
        raise CommandError(f"unknown command {_shown(name)}: {_EXPECTED_NAMES}", cid)
    try:
        return _COMMAND_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        problems = "; ".join(_describe(e, _MODELS.get(name)) for e in exc.errors())
        raise CommandError(f"command '{name}': {problems}", cid, name) from None


def command_reply(command_id: str | None, command: str | None, ok: bool, *, detail: str | None = None,
                  error: str | None = None, **extra: Any) -> dict[str, Any]:
    """Reply body for ``<prefix>/cmd/reply``."""
    out: dict[str, Any] = {"id": command_id, "command": command, "ok": ok}
    if ok:
        out["detail"] = detail or ""
    else:
        out["error"] = error or "failed"
    out.update({k: v for k, v in extra.items() if k not in out})
    return out
