"""The ``fleet`` section of ``edge.yaml``: where releases come from and how this station rolls them out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import Section

_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?")
_STATION = re.compile(r"[^/+#]+")


class FleetConfig(Section):
    """Off by default: a station that is not in a fleet never talks to a registry.

    ``rollout``: ``manual`` pulls and stages a release (an operator activates it with ``weakrest-calibrate
    activate``); ``auto`` activates it as soon as it is staged; ``canary``: the stations named in
    ``canary_stations`` activate it first, and the others only once every canary has served ``canary_frames``
    frames of it with a reject rate of at most ``max_reject_rate`` (a canary above it rolls back, and the others
    never activate that release)."""

    enabled: bool = False
    site: str | None = Field(default=None, description="None: the first level of mqtt.topic_prefix; releases are "
                             "announced on <site>/fleet/<product>/release")
    registry: str | None = Field(default=None, description="host[:port] to pull from instead of the host named in "
                                 "the announcement (a plant mirror); None: the announced one")
    insecure: bool = Field(default=False, description="plain HTTP to the registry (a loopback test registry only)")
    ca: Path | None = Field(default=None, description="CA bundle for the registry's TLS certificate; None: the "
                            "system's")
    username: str | None = None
    password_file: Path | None = Field(default=None, description="file holding the registry password or token")
    rollout: Literal["manual", "auto", "canary"] = "manual"
    canary_stations: list[str] = Field(default_factory=list, description="stations (last level of their "
                                       "mqtt.topic_prefix) that take a release first; the same list on every station")
    canary_frames: int = Field(default=500, ge=1, description="frames a canary serves a release before it passes")
    max_reject_rate: float = Field(default=0.05, ge=0.0, le=1.0, description="a canary rejecting (fail or error) "
                                   "more than this fraction of its frames rolls back")
    retry_initial_s: float = Field(default=2.0, gt=0, description="first wait after a failed pull (then doubled)")
    retry_max_s: float = Field(default=300.0, gt=0, description="longest wait between pull attempts")
    timeout_s: float = Field(default=30.0, gt=0, description="registry connect/read timeout")
    max_bundle_mb: float = Field(default=1024.0, gt=0, description="a larger artifact is refused before download")

    @field_validator("registry")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not _HOST.fullmatch(v):
            raise ValueError("expected host[:port] of an OCI registry (no scheme, no path)")
        return v

    @field_validator("site")
    @classmethod
    def _site(cls, v: str | None) -> str | None:
        if v is not None and not _STATION.fullmatch(v):
            raise ValueError("expected one topic level (no '/', '+' or '#')")
        return v

    @field_validator("canary_stations")
    @classmethod
    def _stations(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _STATION.fullmatch(name):
                raise ValueError(f"station {name!r} is not one topic level (no '/', '+' or '#')")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FleetConfig:
        if self.rollout == "canary" and not self.canary_stations:
            raise ValueError("fleet.rollout 'canary' needs fleet.canary_stations (the stations that go first)")
        if self.password_file is not None and self.username is None:
            raise ValueError("fleet.password_file needs fleet.username")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("fleet.retry_max_s must be at least fleet.retry_initial_s")
        return self

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text(encoding="utf-8").strip()
