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
    name: Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "wide_resnet50_2"] = \
        "efficientnet_lite0"
    layers: list[int] = Field(default=[4, 10], description="trunk blocks/stages whose outputs are used "
                                                           "(Lite0 [4, 10] = Lite1/Lite2 [6, 14])")
    weights: str | None = Field(default=None, description=".safetensors file; None = offline default")
    d_f: int = Field(default=152, gt=0)
    descriptor_grid: tuple[int, int] = (8, 8)
    pool_padding: Literal["zeros", "excluded"] = Field(
        default="zeros", description="3x3 local average at the map border: 'zeros' counts the zero padding "
                                     "(as PatchCore does), so border patches do not dominate the distances; "
                                     "'excluded' averages only the pixels inside the map")

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


class RefineConfig(_Section):
    """The heatmap shaped back onto the frame's pixels (``edge_runtime.core.scoring.HeatmapRefiner``)."""

    guide_radius: int = Field(default=8, ge=0, description="guided filter radius in input pixels (0: none)")
    guide_eps: float = Field(default=1e-3, gt=0.0, description="guided filter regularisation (grey in [0, 1])")
    contrast_weight: float = Field(default=0.15, ge=0.0, description="heat times 1 + this x local contrast")
    contrast_sigma: float = Field(default=4.0, gt=0.0, description="local contrast against a Gaussian mean of "
                                                                   "twice this sigma")
    peak_power: float = Field(default=0.0, ge=0.0, lt=1.0, description="the heatmap times (the pixel threshold / "
                              "the frame's own peak heat) to this power, after its regions are taken: frames with "
                              "strong defects compressed towards the threshold (0: off)")


class ScoringConfig(_Section):
    blur_sigma: float = Field(default=4.0, ge=0.0)
    score_pool: int = Field(default=24, ge=1)
    fusion: Literal["none", "mean", "geometric", "max"] = Field(
        default="none", description="with a Swin: 'none' scores by its probability alone; otherwise the final "
                                    "map fuses it with the nearest-normal distance by this rule")
    fusion_swin_weight: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="the Swin's share of the fused map (mean: weighted mean; geometric: "
                                                 "weighted geometric mean), the distance's the rest")
    fusion_swin_excess: float = Field(
        default=0.0, ge=0.0, description="the fused map plus this times the Swin's excess over 1.0, its held-out "
                                         "good blocks' extreme: where the Swin is surer than on any normal block it "
                                         "counts more, below that its share stays fusion_swin_weight (0: off)")
    fusion_distance_excess: float = Field(
        default=0.0, ge=0.0, description="likewise the distance's excess over its held-out good blocks' extreme: "
                                         "the pits and cracks only the distance sees count more (0: off)")
    defect_bank_boost: float = Field(
        default=0.0, ge=0.0, description="masks, or weak boxes (their blocks the trained Swin is surer of than "
                                         "of held-out good blocks): the labelled defect blocks' own features kept "
                                         "in the bundle, and the map's distance of a block nearer one of them than any "
                                         "normal patch times 1 + this x (that ratio - 1, up to defect_bank_cap - 1), "
                                         "in a fused map (fusion not 'none'); a verdict on the distance (image_score "
                                         "not 'map') keeps the plain one (0: off)")
    defect_bank_cap: float = Field(default=2.0, gt=1.0, description="the ratio counted up to this much")
    image_score: Literal["map", "distance", "standardised", "reference_standardised"] = Field(
        default="map", description="the verdict on the heatmap's pooled max ('map'), on the distance map's "
                                   "('distance', with a Swin; the heatmap still comes from it), or on the distance "
                                   "map's with each block standardised against the good images' distances at its "
                                   "position: all reference images' ('standardised') or the K retrieved ones' "
                                   "('reference_standardised'); with or without a Swin")
    refine: RefineConfig | None = Field(
        default=None, description="the heatmap refined by the frame's own pixels (a guided filter, then local "
                                  "contrast); null: the blurred block map")
    frame_shift: int = Field(
        default=0, ge=0, description="> 0: the frame also scored moved by this many pixels down, right and both, "
                                     "the heatmap and the verdict's score the four's means (half the backbone's "
                                     "stride interleaves the block grids into one of twice the resolution; 4 "
                                     "frames' work at the edge, 3 more feature passes at fit); 0: off")


class SwinConfig(_Section):
    """Residual Swin classifier: architecture (goes into the bundle) and training schedule (host only)."""

    enabled: bool = Field(default=True, description="false: distance-only bundle, as the slice made")
    embed_dim: int = Field(default=32, gt=0)
    depth: int = Field(default=2, gt=0, description="blocks, alternating regular and shifted windows")
    heads: int = Field(default=2, gt=0)
    window: int = Field(default=8, gt=0)
    mlp_ratio: float = Field(default=2.0, gt=0.0)
    train_window: int = Field(default=32, gt=0, description="tokens per side of training crops / sliding windows")
    window_stride: int = Field(default=16, gt=0)
    position_embedding: bool = Field(default=True, description="learned absolute position embedding of the grid")
    log_input: bool = Field(default=True, description="embed log(1 + residual / scale)")
    magnitude_skip: bool = Field(default=False, description="the block's residual magnitude as an input and a "
                                                            "direct term of the anomalous logit")
    steps: int = Field(default=3000, ge=0, description="unsupervised training steps")
    finetune_steps: int = Field(default=600, ge=0, description="supervised fine-tuning steps on real defects")
    batch_size: int = Field(default=16, gt=0)
    lr: float = Field(default=5e-4, gt=0.0)
    finetune_lr: float = Field(default=2e-4, gt=0.0)
    weight_decay: float = Field(default=0.05, ge=0.0)
    warmup_steps: int = Field(default=100, ge=0)
    ema: float = Field(default=0.999, ge=0.0, lt=1.0)
    focal_alpha: float = Field(default=0.5, gt=0.0, lt=1.0, description="weight of the anomalous class")
    focal_gamma: float = Field(default=2.0, ge=0.0)
    region_balance: float = Field(default=0.0, ge=0.0, le=1.0,
                                  description="an anomalous block of a region of s blocks weighs s^-region_balance "
                                  "in the loss (the batch's anomalous total kept): 1 every region equal, 0 off")
    boundary_ignore: int = Field(default=0, ge=0, le=4, description="synthetic anomalies: normal blocks within this "
                                 "many blocks of an anomalous or ignored one are left out of the unsupervised "
                                 "phase's loss (the receptive fields carry the anomaly into them); fine-tuning on "
                                 "labels keeps them normal; 0: labelled normal throughout")
    mask_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="residual tokens zeroed (Eq. 18)")
    jitter: float = Field(default=0.1, ge=0.0, description="log-scale jitter of residual tokens (Eq. 18)")
    synthetic_per_image: int = Field(default=2, ge=0, description="synthetic anomalies made from each good image")
    members: int = Field(default=1, ge=1, le=8, description="Swins trained, each on its own synthetic anomalies "
                         "and from its own start; swin.onnx averages their probabilities (fit and Swin time x N)")
    defect_fraction: float = Field(default=0.25, ge=0.0, le=1.0,
                                   description="share of each fine-tuning batch drawn from real defects")
    defect_transplants: int = Field(default=0, ge=0, description="supervised mode: each real defect is also pasted "
                                    "into this many good images at other places (its mask moved with it)")
    finetune_objective: Literal["focal", "resmixmatch"] = Field(
        default="focal", description="supervised mode: how the real defects' block labels are learned: the focal "
        "loss (blocks between labels.eps_neg and eps_pos ignored), or ResMixMatch with the weak section's settings "
        "(those blocks guessed, each connected group of them holding at least one defect block: a crack thinner "
        "than a block still teaches something)")
    checkpoint_every: int = Field(default=250, gt=0)

    @field_validator("heads")
    @classmethod
    def _divides(cls, v: int, info) -> int:
        embed = info.data.get("embed_dim")
        if embed is not None and embed % v:
            raise ValueError(f"heads must divide embed_dim ({embed})")
        return v


class WeakConfig(_Section):
    """ResMixMatch on weak labels (paper Algorithm 1), fine-tuning the unsupervised model."""

    steps: int = Field(default=600, ge=0)
    lr: float = Field(default=2e-4, gt=0.0)
    augmentations: int = Field(default=2, ge=1, description="A: augmented copies for label guessing")
    temperature: float = Field(default=0.5, gt=0.0, description="T: sharpening")
    mixup_alpha: float = Field(default=0.75, ge=0.0, description="Beta(a, a) of MixUp; 0 turns MixUp off")
    alpha_x: float = Field(default=0.5, gt=0.0, lt=1.0, description="known blocks: the Swin's own focal alpha "
                           "(the paper's 0.25 lost 2.3 AP points on MTD)")
    alpha_u: float = Field(default=0.75, gt=0.0, lt=1.0)
    gamma_x: float = Field(default=2.0, ge=0.0, description="known blocks: the Swin's own focal gamma (paper: 4)")
    gamma_u: float = Field(default=4.0, ge=0.0)
    lambda_u: float = Field(default=5.0, ge=0.0)
    rampup_steps: int = Field(default=400, ge=0)
    region_prior: bool = Field(default=True, description="multiple-instance prior: the most anomalous-looking "
                               "block of every bag (see box_lines, tag_top_k) is guessed anomalous")
    box_lines: bool = Field(default=True, description="box-tightness prior: every line across a box parallel to its "
                            "sides is a bag (else the whole box is one bag)")
    tag_top_k: int = Field(default=1, ge=1, description="a tagged image's top-k blocks are guessed anomalous")
    peak_from: Literal["model", "model+residual"] = Field(
        default="model", description="what picks a bag's peak: the model's probability, or that plus the block's "
                                     "residual magnitude (each relative to its maximum in the bag)")
    guess_rest: bool = Field(default=True, description="unknown blocks that are no bag's peak learn their sharpened "
                             "guess (paper); false: only the peaks are learned, the rest is left out")
    box_overlap: float = Field(default=0.0, ge=0.0, lt=1.0,
                               description="a block overlapping boxes by more than this is unknown, else normal "
                                           "(0: every block a box touches is unknown)")


class LabelConfig(_Section):
    """Block labels from pixel masks (paper Eq. 15)."""

    eps_pos: float = Field(default=0.5, gt=0.0, le=1.0, description="anomalous above this defective fraction")
    eps_neg: float = Field(default=0.1, ge=0.0, le=1.0, description="normal below it; ignored in between")
    min_positive_px: int = Field(default=0, ge=0, description="also anomalous when a block holds this many "
                                                             "defective pixels (thin cracks, small pits); 0: off")

    @field_validator("eps_neg")
    @classmethod
    def _ordered(cls, v: float, info) -> float:
        pos = info.data.get("eps_pos")
        if pos is not None and v > pos:
            raise ValueError(f"eps_neg must not exceed eps_pos ({pos})")
        return v


class SyntheticSection(_Section):
    """Synthetic anomalies (Perlin masks filled with foreign texture) for training from good images."""

    opacity: tuple[float, float] = (0.5, 1.0)
    source_weights: tuple[float, float, float] = Field(
        default=(0.4, 0.3, 0.3), description="other good image / shuffled tiles of itself / packaged texture")
    max_area: float = Field(default=0.25, gt=0.0, le=1.0, description="largest Perlin mask, fraction of the image "
                                                                      "(finish bands cover 5 to 50 %)")
    small_fraction: float = Field(default=0.5, ge=0.0, le=1.0,
                                  description="share of masks cut down to one to three small pieces")
    min_feature_px: int = Field(default=12, ge=1, description="finest Perlin cell in pixels")
    min_area_px: int = Field(default=48, ge=1, description="smallest mask in pixels")
    min_contrast: float = Field(default=12.0, ge=0.0, description="mean grey-level change a paste must reach")
    shape_weights: tuple[float, float, float] = Field(
        default=(1.0, 0.0, 0.0), description="blob (Perlin, foreign texture) / small pits / thin cracks (darker or "
                                             "brighter than the image itself)")
    match_colour: bool = Field(default=False, description="on a grey product, paste foreign textures in grey too "
                                                          "(a colour shift it can never show teaches the Swin nothing)")
    band_fraction: float = Field(default=0.0, ge=0.0, le=1.0,
                                 description="share of anomalies that are finish bands: a large straight-sided region "
                                             "with another finish of the surface (an uneven surface)")


class ForegroundConfig(_Section):
    """Foreground maps (paper §III-E): on for object products, off for textures."""

    enabled: bool = False
    power: float = Field(default=0.15, gt=0.0, description="r in [maxpool(E_ref)]^r")
    pool: int = Field(default=3, ge=1)
    fit_images: int = Field(default=64, ge=2)
    per_image: int = Field(default=32, ge=1)
    quantile: float = Field(default=0.3, gt=0.0, le=0.5)

    @field_validator("pool")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("expected an odd pooling size")
        return v


class ThresholdConfig(_Section):
    holdout_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    target_false_reject: float = Field(default=0.005, gt=0.0, lt=0.5)
    margin: float = Field(default=0.05, ge=0.0)
    leave_one_out: bool | Literal["auto"] = Field(
        default="auto", description="also score every bank image with itself left out of its retrieval: about 10x "
                                    "more good scores than the hold-out alone, enough to resolve a 0.5 % target. "
                                    "auto: only when the verdict does not rest on the Swin, which was trained on "
                                    "these images' residual fields (measured on MTD: its leave-one-out scores "
                                    "run low, 0.41 vs 0.53 held out)")


class LogicalConfig(_Section):
    """Component-level (logical) score beside the structural one: wrong assemblies, where every patch is normal."""

    enabled: bool = Field(default=False, description="products whose defects can be a missing, extra or "
                                                      "misplaced part; off for plain surfaces")
    k: int | None = Field(default=None, ge=2, le=32, description="component classes; None: the most stable of "
                                                               "k_candidates across two halves of the good images")
    k_candidates: list[int] = Field(default_factory=lambda: [3, 4, 5, 6, 7, 8], min_length=1)
    regions: int = Field(default=2, ge=1, le=4, description="CSAD patch histograms over regions x regions cells")
    shrinkage: float = Field(default=0.5, ge=0.0, le=1.0, description="covariance shrinkage towards its diagonal")
    fusion: Literal["max", "sum"] = Field(default="max", description="verdict score from the two standardised "
                                          "scores: their max, or structural + weight * logical")
    weight: float = Field(default=1.0, ge=0.0)
    patches_per_image: int = Field(default=128, ge=8, description="patches per good image for the clustering")

    @field_validator("k_candidates")
    @classmethod
    def _at_least_two(cls, v: list[int]) -> list[int]:
        if any(k < 2 for k in v):
            raise ValueError("every candidate k must be at least 2")
        return sorted(set(v))


class ExportConfig(_Section):
    """What goes into the bundle beside the fp32 graphs."""

    int8: bool = Field(default=False, description="also quantise the graphs to int8 and gate the reduced-precision "
                       "engines (training_host/models/quantize.py: each kept only if it passes the accuracy gate on "
                       "DATA/test); off by default: the gate evaluates DATA/test four to five times (minutes on MTD, "
                       "beyond the fit's time budget) and needs defects with masks; weakrest-train quantize adds it "
                       "to a finished bundle")
    calibration_images: int = Field(default=64, ge=1, description="good images the int8 graphs are calibrated on")


class ProductConfig(_Section):
    product: str = "product"
    profile: str = "fast"
    input_size: tuple[int, int] = (256, 256)
    backbone: BackboneConfig = BackboneConfig()
    posfar: PosFARConfig = PosFARConfig()
    scoring: ScoringConfig = ScoringConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    swin: SwinConfig = SwinConfig()
    labels: LabelConfig = LabelConfig()
    weak: WeakConfig = WeakConfig()
    synthetic: SyntheticSection = SyntheticSection()
    foreground: ForegroundConfig = ForegroundConfig()
    logical: LogicalConfig = LogicalConfig()
    export: ExportConfig = ExportConfig()
    latency_budget_ms: float = Field(default=50.0, gt=0.0)
    batch_size: int = Field(default=16, gt=0)
    seed: int = 0

    @field_validator("input_size")
    @classmethod
    def _multiple_of_32(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] % 32 or v[1] % 32 or min(v) < 64:
            raise ValueError("expected [height, width], each a multiple of 32 and at least 64")
        return v


def _apply_override(raw: dict, assignment: str) -> None:
    """``swin.steps=300`` -> raw["swin"]["steps"] = 300 (the value parsed as YAML)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{assignment}': expected KEY=VALUE, e.g. swin.steps=300")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{assignment}': '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{assignment}': value is not valid YAML ({exc})") from exc


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ProductConfig:
    """Read and validate a YAML product config (None -> built-in fast defaults), then ``KEY=VALUE`` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        return ProductConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"key '{key}' = {err.get('input')!r}: {err['msg']}")
        raise ConfigError(f"{path or 'built-in defaults'}: " + "; ".join(problems)) from exc
