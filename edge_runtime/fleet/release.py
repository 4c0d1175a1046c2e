"""The fleet's MQTT messages: this module is their documented schema.

``<site>/fleet/<product>/release`` - JSON, QoS 1, **retained** (a station that starts or reconnects later
still learns of it); published once per release by ``weakrest-train push --announce``::

    {"schema": "weakrest.release/1", "product": "bracket", "version": "2026-12-04.1",
     "repository": "registry.plant:5000/weakrest/bracket",
     "digest": "sha256:9f2c...", "size": 5242880, "announced_at": 1796371200.0}

  ``repository`` is where the artifact was pushed (a station's ``fleet.registry`` may name a mirror host to
  pull the same path from); ``digest`` is the OCI manifest's: a station pulls by it, never by tag, and
  checks every byte against it.  ``version`` becomes the version name in the station's store.

``<site>/fleet/<product>/canary/<station>`` - JSON, QoS 1, retained, one per canary station; what the
others decide from (all canaries ``passed`` for the release's digest: activate; any ``failed``: never)::

    {"schema": "weakrest.canary/1", "station": "st1", "product": "bracket", "version": "2026-12-04.1",
     "digest": "sha256:9f2c...", "verdict": "failed", "frames": 7, "rejects": 7, "reject_rate": 1.0,
     "max_reject_rate": 0.05, "canary_frames": 500, "detail": "...", "at": 1796371230.5}

  ``verdict`` is ``running`` while the canary counts, then ``passed`` or ``failed`` (a failed canary has
  rolled back).  What each station runs, and its rollout state, is in the ``fleet`` key of its ordinary
  ``<site>/<line>/<station>/status``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..store import check_version_name, plain_product_name

RELEASE_SCHEMA = "weakrest.release/1"
CANARY_SCHEMA = "weakrest.canary/1"
MAX_MESSAGE_BYTES = 16 * 1024
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_REPOSITORY = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)+")


class FleetMessageError(ValueError):
    """A fleet message was refused; the text names the field and what was expected."""


def release_topic(site: str, product: str) -> str:
    return f"{site}/fleet/{product}/release"


def canary_topic(site: str, product: str, station: str) -> str:
    return f"{site}/fleet/{product}/canary/{station}"


def check_digest(value: str) -> str:
    if not _DIGEST.fullmatch(value):
        raise ValueError("expected sha256:<64 lowercase hex digits>")
    return value


class ReleaseMessage(BaseModel):
    """One release of a product's bundle, announced to every station of the site."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["weakrest.release/1"] = Field(default=RELEASE_SCHEMA, alias="schema")
    product: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=128)
    repository: str = Field(min_length=3, max_length=512, description="registry host[:port]/path")
    digest: str
    size: int | None = Field(default=None, ge=0, description="bytes of the bundle layer")
    announced_at: float = Field(default_factory=time.time)

    @field_validator("product")
    @classmethod
    def _product(cls, v: str) -> str:
        return plain_product_name(v)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        try:
            return check_version_name(v)
        except Exception as exc:  # StoreError: say it in the field's words
            raise ValueError(str(exc)) from None

    @field_validator("repository")
    @classmethod
    def _repository(cls, v: str) -> str:
        if not _REPOSITORY.fullmatch(v):
            raise ValueError("expected host[:port]/path of an OCI repository (lowercase path, no tag or digest)")
        return v

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        return check_digest(v)

    @property
    def host(self) -> str:
        return self.repository.split("/", 1)[0]

    @property
    def path(self) -> str:
        return self.repository.split("/", 1)[1]


class CanaryVerdict(BaseModel):
    """A canary station's verdict on one release."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["weakrest.canary/1"] = Field(default=CANARY_SCHEMA, alias="schema")
    station: str = Field(min_length=1, max_length=128)
    product: str
    version: str
    digest: str
    verdict: Literal["running", "passed", "failed"]
    frames: int = Field(ge=0)
    rejects: int = Field(ge=0)
    reject_rate: float | None = Field(ge=0.0, le=1.0)
    max_reject_rate: float = Field(ge=0.0, le=1.0)
    canary_frames: int = Field(ge=1)
    detail: str = ""
    at: float = Field(default_factory=time.time)

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        return check_digest(v)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(by_alias=True).encode("utf-8")


def _parse(model: type[BaseModel], payload: bytes, what: str) -> BaseModel:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise FleetMessageError(f"{what}: {len(payload)} bytes, at most {MAX_MESSAGE_BYTES} are accepted")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FleetMessageError(f"{what}: not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise FleetMessageError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(payload)"
            value = err.get("input")
            shown = "" if isinstance(value, (dict, list)) or err["type"] == "missing" else f" (got {value!r:.60})"
            problems.append(f"{field}: {str(err['msg']).removeprefix('Value error, ')}{shown}")
        raise FleetMessageError(f"{what}: {'; '.join(problems)}") from None


def parse_release(payload: bytes) -> ReleaseMessage:
    return _parse(ReleaseMessage, payload, "release announcement")  # type: ignore[return-value]


def parse_canary(payload: bytes) -> CanaryVerdict:
    return _parse(CanaryVerdict, payload, "canary verdict")  # type: ignore[return-value]
