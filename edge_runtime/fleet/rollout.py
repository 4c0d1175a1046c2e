"""The rollout policy of one station as a small state machine: events in, actions out, no I/O.

Events: a release was announced (:meth:`Rollout.release`), its pull succeeded or failed (:meth:`staged`,
:meth:`pull_failed`), the service activated it or refused it (:meth:`activated`), rolled it back
(:meth:`rolled_back`), a result was served (:meth:`result`), a canary station published a verdict
(:meth:`canary`).  Each returns the :class:`Action` s for the agent to carry out, in order.  Keeping the
decisions here lets a test walk every path of ``manual``/``auto``/``canary`` without a broker or a registry.

States (``state``, with ``detail`` saying why in plain words):

    idle         no release announced (or none for this product)
    pulling      fetching the announced release; ``retrying`` after a failure, with the reason
    staged       in the store, waiting for an operator (manual)
    waiting      in the store, waiting for the canary stations' verdicts (canary, not a canary station)
    activating   asked the service to serve it
    canary       serving it as a canary, counting frames and rejects
    active       serving the announced release
    held         never activated: a canary failed it
    rolling_back a canary over its reject bound, going back to the previous version
    rolled_back  back on the previous version after a failed canary
    refused      the release cannot be served (digest mismatch, not a bundle, failed validation)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["manual", "auto", "canary"]
ActionKind = Literal["pull", "activate", "rollback", "publish_canary"]


@dataclass(frozen=True)
class Target:
    """A release: the version name it gets in the store and the OCI digest it is pulled by."""

    version: str
    digest: str


@dataclass(frozen=True)
class Verdict:
    """What a canary station says about a release (the payload fields of the canary message)."""

    station: str
    target: Target
    verdict: Literal["running", "passed", "failed"]
    frames: int = 0
    rejects: int = 0
    detail: str = ""

    @property
    def reject_rate(self) -> float | None:
        return self.rejects / self.frames if self.frames else None


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    target: Target
    verdict: Verdict | None = None


@dataclass
class Rollout:
    policy: Policy
    station: str
    canary_stations: list[str] = field(default_factory=list)
    canary_frames: int = 500
    max_reject_rate: float = 0.05
    running: Target | None = None  # what the service serves, when its digest is known
    state: str = "idle"
    detail: str = "no release announced"
    target: Target | None = None
    frames: int = 0
    rejects: int = 0
    verdicts: dict[str, dict[str, Verdict]] = field(default_factory=dict)  # digest -> station -> verdict

    @property
    def is_canary(self) -> bool:
        return self.policy == "canary" and self.station in self.canary_stations

    # ---- events ---------------------------------------------------------------------------------------
    def release(self, target: Target) -> list[Action]:
        """A release was announced (also again: a retained announcement comes back at every reconnect)."""
        if target == self.target and self.state not in ("idle", "refused"):
            return []
        self.target, self.frames, self.rejects = target, 0, 0
        if self.running is not None and self.running.digest == target.digest:
            return self._set("active", f"serving {target.version} ({_short(target.digest)})")
        failed = self._failed(target)
        if failed is not None:
            own = failed.station == self.station
            return self._set("rolled_back" if own else "held", self._failed_text(failed))
        self._set("pulling", f"pulling {target.version} ({_short(target.digest)})")
        return [Action("pull", target)]

    def pull_failed(self, target: Target, reason: str, retry: bool, retry_in_s: float | None = None) -> list[Action]:
        if target != self.target:
            return []
        if retry:
            when = f"; next attempt in {retry_in_s:.3g} s" if retry_in_s is not None else ""
            return self._set("retrying", f"pull of {target.version} failed: {reason}{when}")
        return self._set("refused", f"{target.version} refused: {reason}")

    def staged(self, target: Target) -> list[Action]:
        """The release is in the store, verified."""
        if target != self.target:
            return []
        return self._decide()

    def activated(self, target: Target, ok: bool, error: str = "") -> list[Action]:
        if target != self.target:
            return []
        if not ok:
            return self._set("refused", f"{target.version} refused at activation: {error}")
        self.running = target
        if self.is_canary:
            self.frames = self.rejects = 0
            self._set("canary", self._canary_text())
            return [Action("publish_canary", target, Verdict(self.station, target, "running"))]
        return self._set("active", f"serving {target.version} ({_short(target.digest)})")

    def result(self, version: str, verdict: str) -> list[Action]:
        """One served frame's verdict ("pass", "fail" or "error"); counts only while this station is a canary."""
        target = self.target
        if self.state != "canary" or target is None or version != target.version:
            return []
        self.frames += 1
        self.rejects += verdict != "pass"
        if self.rejects > self.max_reject_rate * self.canary_frames:  # the bound can no longer hold
            self.state = "rolling_back"
            self.detail = (f"canary of {target.version} failed: {self.rejects} rejects in {self.frames} frames, "
                           f"more than {self.max_reject_rate:.0%} of {self.canary_frames}; rolling back")
            verdict_ = Verdict(self.station, target, "failed", self.frames, self.rejects, self.detail)
            return [Action("publish_canary", target, verdict_), Action("rollback", target)]
        if self.frames >= self.canary_frames:
            self._set("active", f"serving {target.version} ({_short(target.digest)}); canary passed with "
                                f"{self.rejects} rejects in {self.frames} frames")
            return [Action("publish_canary", target,
                           Verdict(self.station, target, "passed", self.frames, self.rejects, self.detail))]
        self.detail = self._canary_text()
        return []

    def rolled_back(self, target: Target, ok: bool, now_serving: Target | None, error: str = "") -> list[Action]:
        self.running = now_serving
        if not ok:
            return self._set("refused", f"rollback after the failed canary of {target.version} failed: {error}")
        return self._set("rolled_back", f"canary of {target.version} failed ({self.rejects} rejects in {self.frames} "
                                        f"frames); back on the previous version")

    def canary(self, verdict: Verdict) -> list[Action]:
        """A canary station's verdict (the retained ones arrive at every connect)."""
        if verdict.station not in self.canary_stations:
            return []
        self.verdicts.setdefault(verdict.target.digest, {})[verdict.station] = verdict
        if self.target is None or verdict.target.digest != self.target.digest:
            return []
        if self.state == "waiting":
            return self._decide()
        return []

    # ---- decisions ------------------------------------------------------------------------------------
    def _decide(self) -> list[Action]:
        target = self.target
        assert target is not None
        if self.policy == "manual":
            return self._set("staged", f"{target.version} is staged; activate it with weakrest-calibrate activate "
                                       f"{target.version}")
        if self.policy == "auto":
            return self._activate(target)
        failed = self._failed(target)
        if failed is not None:
            own = failed.station == self.station
            return self._set("rolled_back" if own else "held", self._failed_text(failed))
        if self.is_canary:
            return self._activate(target)
        said = self.verdicts.get(target.digest, {})
        missing = [s for s in self.canary_stations if s not in said or said[s].verdict != "passed"]
        if not missing:
            return self._activate(target)
        return self._set("waiting", f"{target.version} is staged; waiting for canary station(s) "
                                    f"{', '.join(missing)}")

    def _activate(self, target: Target) -> list[Action]:
        self._set("activating", f"activating {target.version}")
        return [Action("activate", target)]

    def _failed(self, target: Target) -> Verdict | None:
        for v in self.verdicts.get(target.digest, {}).values():
            if v.verdict == "failed":
                return v
        return None

    @staticmethod
    def _failed_text(v: Verdict) -> str:
        rate = f"{v.reject_rate:.0%}" if v.reject_rate is not None else "?"
        return (f"{v.target.version} is not activated: canary {v.station} failed it ({v.rejects} rejects in "
                f"{v.frames} frames, {rate})")

    def _canary_text(self) -> str:
        assert self.target is not None
        return (f"canary of {self.target.version}: {self.frames}/{self.canary_frames} frames, {self.rejects} rejects "
                f"(bound {self.max_reject_rate:.0%})")

    def _set(self, state: str, detail: str) -> list[Action]:
        self.state, self.detail = state, detail
        return []


def _short(digest: str) -> str:
    return digest[:19]
