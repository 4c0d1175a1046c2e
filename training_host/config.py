"""Product training configuration: YAML validated into typed objects.

A bad value is refused with the key, the value and what was expected (:class:`ConfigError`), before
any work starts.  Every field has a default, so an empty file means the fast profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration file could not be read or did not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneConfig(_Section):
    name: Literal["efficientnet_lite0", "wide_resnet50_2"] = "efficientnet_lite0"
    layers: list[int] = Field(default=[4, 10], description="trunk blocks/stages whose outputs are used")
    weights: str | None = Field(default=None, description=".safetensors file; None = offline default")
    d_f: int = Field(default=152, gt=0)
    descriptor_grid: tuple[int, int] = (8, 8)

    @field_validator("layers")
    @classmethod
    def _three_layers(cls, v: list[int]) -> list[int]:
        if not 1 <= len(v) <= 4 or sorted(v) != v:
            raise ValueError("expected 1 to 4 increasing block indices, e.g. [2, 4, 10]")
        return v


class PosFARConfig(_Section):
    lambda_p: float = Field(default=0.03, ge=0.0, description="position code weight (0.03 textures, 0.15 objects)")
    coreset_ratio: float = Field(default=0.1, gt=0.0, le=1.0)
    projection_dim: int = Field(default=128, gt=0)
    d_l: int | None = Field(default=32, gt=0, description="PCA dims; None = keep pca_variance")
    pca_variance: float = Field(default=0.95, gt=0.0, le=1.0)
    k_references: int = Field(default=16, gt=0)
    retrieval_trim: float = Field(default=0.25, ge=0.0, lt=1.0)
    thetas: list[float] = [1.0, 2.0]


class ScoringConfig(_Section):
    blur_sigma: float = Field(default=4.0, ge=0.0)
    score_pool: int = Field(default=24, ge=1)


class ThresholdConfig(_Section):
    holdout_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    target_false_reject: float = Field(default=0.005, gt=0.0, lt=0.5)
    margin: float = Field(default=0.05, ge=0.0)


class ProductConfig(_Section):
    product: str = "product"
    profile: str = "fast"
    input_size: tuple[int, int] = (256, 256)
    backbone: BackboneConfig = BackboneConfig()
    posfar: PosFARConfig = PosFARConfig()
    scoring: ScoringConfig = ScoringConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    latency_budget_ms: float = Field(default=50.0, gt=0.0)
    batch_size: int = Field(default=16, gt=0)
    seed: int = 0

    @field_validator("input_size")
    @classmethod
    def _multiple_of_32(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] % 32 or v[1] % 32 or min(v) < 64:
            raise ValueError("expected [height, width], each a multiple of 32 and at least 64")
        return v


def load_config(path: str | Path | None) -> ProductConfig:
    """Read and validate a YAML product config (None -> built-in fast defaults)."""
    if path is None:
        return ProductConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return ProductConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"key '{key}' = {err.get('input')!r}: {err['msg']}")
        raise ConfigError(f"{path}: " + "; ".join(problems)) from exc
