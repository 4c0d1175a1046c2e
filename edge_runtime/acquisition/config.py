"""The ``camera`` section of the edge config: which source, and how it is opened and streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..schema import Section as _Section


class GenICamConfig(_Section):
    cti: Path | None = Field(default=None, description="GenTL producer (.cti); None: GENICAM_GENTL64_PATH")
    serial: str | None = Field(default=None, description="device serial number; None: use index")
    index: int = Field(default=0, ge=0)
    pixel_format: str | None = Field(default=None, description="e.g. Mono8, RGB8, BayerRG8; None: camera default")
    exposure_us: float | None = Field(default=None, gt=0)
    trigger: Literal["free_run", "software", "hardware"] = "free_run"
    trigger_source: str = Field(default="Line0", description="hardware trigger input")
    fetch_timeout_ms: int = Field(default=1000, gt=0)
    buffers: int = Field(default=4, ge=1, le=256)
    lost_after_timeouts: int = Field(default=5, ge=1, description="free-run: consecutive timeouts = camera lost")


class ReplayConfig(_Section):
    path: Path | None = Field(default=None, description="folder of images or a video file")
    fps: float = Field(default=10.0, gt=0)
    loop: bool = True


class OpenCVConfig(_Section):
    device: int | str = Field(default=0, description="device index or URL (rtsp://..., file)")
    fps: float | None = Field(default=None, gt=0)


class CameraConfig(_Section):
    source: Literal["genicam", "replay", "opencv"] = "genicam"
    name: str = Field(default="cam0", min_length=1, description="camera name in results and metrics")
    genicam: GenICamConfig = GenICamConfig()
    replay: ReplayConfig = ReplayConfig()
    opencv: OpenCVConfig = OpenCVConfig()
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _source_complete(self) -> CameraConfig:
        if self.source == "replay" and self.replay.path is None:
            raise ValueError("camera.replay.path is required when camera.source is 'replay'")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("camera.reconnect_max_s must not be below camera.reconnect_initial_s")
        return self
