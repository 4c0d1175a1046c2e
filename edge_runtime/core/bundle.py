"""The bundle: the versioned, self-describing contract between training host, field tool and edge.

A bundle is a directory (or one ``.tar`` of it) holding ``manifest.json``, ``backbone.onnx`` and
``arrays.safetensors``, and with the residual classifier ``swin.onnx`` (plus engine plans later).  The manifest records
every parameter the edge needs and, for every file, its sha256 and size (and for arrays their dtype and
shape).  :func:`load_bundle` verifies all of it and refuses a bad bundle with a :class:`BundleError`
naming the file and the problem; nothing here ever unpickles anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import mmap
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .components import summary_groups
from .scoring import HeatmapRefiner, check_frame_shift

if TYPE_CHECKING:
    from edge_runtime.core.thresholds import ThresholdEstimate

SCHEMA_VERSION = 2
#: schema 1 is the distance-only slice (no swin, foreground or training sections); still served as it was
SUPPORTED_SCHEMAS = (1, 2, 3, 4, 5, 6, 7, 8)
#: schema 3 adds the logical (component) score; a bundle carries it only when it has that section, so a bundle
#: without one stays readable by schema-2 runtimes, and one with it is refused by them by its version
LOGICAL_SCHEMA_VERSION = 3
#: schema 4 adds the heatmap refinement (scoring.refine) and the fusion's weight (scoring.fusion.swin_weight),
#: likewise only in the bundles that have them
REFINE_SCHEMA_VERSION = 4
#: schema 5 adds the shifted frames (scoring.frame_shift), likewise only in the bundles that have them
SHIFT_SCHEMA_VERSION = 5
#: schema 6 adds the heatmap scaled by the frame's own peak (scoring.refine.peak_power), likewise
PEAK_SCHEMA_VERSION = 6
#: schema 7 adds the weights of each fused map's excess over the normal blocks' extreme (scoring.fusion.swin_excess,
#: distance_excess), likewise
EXCESS_SCHEMA_VERSION = 7
#: schema 8 adds the labelled defects' own patch features raising the map's distance (scoring.defect_bank, the array
#: defect_bank), likewise
DEFECT_BANK_SCHEMA_VERSION = 8
#: the Swin's share of a fused map whose manifest does not say (every bundle before schema 4)
DEFAULT_SWIN_WEIGHT = 0.5
MANIFEST = "manifest.json"
BACKBONE = "backbone.onnx"
SWIN = "swin.onnx"
#: optional int8 twins of the two graphs (``training_host.models.quantize``), kept only when they pass its gate
BACKBONE_INT8 = "backbone.int8.onnx"
SWIN_INT8 = "swin.int8.onnx"
ARRAYS = "arrays.safetensors"
#: optional: retrieval, matching and the residual as one graph (``training_host.models.matcher_graph``), for
#: engines that build plans; its inputs are the bundle's arrays
MATCHER = "matcher.onnx"

#: arrays every schema-1 bundle carries, with their dtype and rank
REQUIRED_ARRAYS: dict[str, tuple[str, int]] = {
    "bank": ("float16", 2),
    "bank_image": ("int32", 1),
    "pca_components": ("float32", 2),
    "pca_mean": ("float32", 1),
    "ref_descriptors": ("float16", 3),
}

#: arrays present only when the manifest has the matching section
OPTIONAL_ARRAYS: dict[str, tuple[str, int]] = {
    "foreground_maps": ("float16", 3),  # (n_reference_images, h_f, w_f), with the ``foreground`` section
    # (n_reference_images, h_f, w_f): each reference image's leave-one-out block distances, for the standardised
    # image scores (written by every fit since, so any such bundle can be evaluated that way)
    "reference_distances": ("float16", 3),
    # with the ``logical`` section: (k, d_f) component centres, the good composition's (D,) mean and (D, D)
    # block-diagonal precision, and (G, 2) each summary group's good-distance mean and spread
    "component_centres": ("float32", 2),
    "logical_mean": ("float32", 1),
    "logical_precision": ("float32", 2),
    "logical_group_stats": ("float32", 2),
    # with scoring.defect_bank: (blocks, d_f) the labelled defect blocks' patch features (``core.defect_bank``)
    "defect_bank": ("float16", 2),
}


class BundleError(Exception):
    """A bundle failed validation; ``file`` names the part of the bundle at fault."""

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(_Strict):
    input_size: tuple[int, int] = Field(description="(height, width) fed to the backbone")
    resize: Literal["stretch"] = "stretch"
    colour: Literal["rgb"] = "rgb"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = Field(1.0 / 255.0, description="multiplies uint8 pixels before the graph")


class BackboneInfo(_Strict):
    name: str
    layers: list[int]
    d_f: int
    grid: tuple[int, int]
    stride: int
    descriptor_grid: tuple[int, int]
    descriptor_channels: int
    lambda_p: float
    inputs: list[str] = ["image"]
    outputs: list[str] = ["pcf", "descriptor"]


class PosFARInfo(_Strict):
    d_l: int
    k_references: int
    retrieval_trim: float
    thetas: list[float]
    coreset_ratio: float
    n_reference_images: int
    n_bank: int


class SwinInfo(_Strict):
    """The residual classifier in ``swin.onnx``: residual tokens (1, M, d_f) -> probabilities (1, M)."""

    embed_dim: int
    depth: int
    heads: int
    window: int
    mlp_ratio: float
    train_window: int
    window_stride: int
    position_embedding: bool = False
    log_input: bool = False
    magnitude_skip: bool = False
    inputs: list[str] = ["residual"]
    outputs: list[str] = ["probability"]
    onnx_max_abs_diff: float = Field(description="ONNX Runtime vs torch on real residual fields at export")


class ForegroundInfo(_Strict):
    """Foreground weighting: block map * [max over the K references of pooled maps] ** power."""

    power: float = Field(ge=0.0)
    pool: int = Field(ge=1)
    n_fit_images: int


class LabelledImage(_Strict):
    """A defective image the classifier was trained on: evaluation must leave it out."""

    name: str
    sha256: str
    defect_type: str


class TrainingInfo(_Strict):
    """How the anomaly map was learned, so evaluation reports can say what supervision was used."""

    mode: Literal["unsupervised", "supervised", "weak"]
    supervision: str
    steps: int
    good_fields: int
    synthetic_fields: int
    defect_images: list[LabelledImage] = []
    seconds: float


class FusionInfo(_Strict):
    """How the Swin's probability and the nearest-normal distance are fused (``pipeline.MapFusion``): each is
    divided by its scale (its ``quantile`` on held-out good blocks, measured at fit or calibration)."""

    rule: Literal["mean", "geometric", "max"]
    distance_scale: float = Field(gt=0)
    swin_scale: float = Field(gt=0)
    quantile: float = Field(gt=0, lt=1)
    swin_weight: float | None = Field(default=None, gt=0, lt=1)  # the Swin's share; absent: an equal one
    # the fused map plus these times max(scaled Swin - 1, 0) and max(scaled distance - 1, 0) (``MapFusion``'s
    # swin_excess, distance_excess); absent: nothing added
    swin_excess: float | None = Field(default=None, gt=0)
    distance_excess: float | None = Field(default=None, gt=0)

    @property
    def weight(self) -> float:
        """The Swin's share of the fused map (``DEFAULT_SWIN_WEIGHT`` where the manifest does not say)."""
        return self.swin_weight if self.swin_weight is not None else DEFAULT_SWIN_WEIGHT

    @property
    def swin_excess_weight(self) -> float:
        """The weight of the Swin's excess over 1.0 (0 where the manifest does not say)."""
        return self.swin_excess if self.swin_excess is not None else 0.0

    @property
    def distance_excess_weight(self) -> float:
        """The weight of the distance's excess over 1.0 (0 where the manifest does not say)."""
        return self.distance_excess if self.distance_excess is not None else 0.0


class RefineInfo(_Strict):
    """The heatmap refined by the frame itself (``scoring.HeatmapRefiner``): a guided filter, local contrast, and
    the frame's own peak."""

    guide_radius: int = Field(ge=0)
    guide_eps: float = Field(gt=0)
    contrast_weight: float = Field(ge=0)
    contrast_sigma: float = Field(gt=0)
    # then the heatmap times (thresholds.pixel / its own peak) ** peak_power; absent: not scaled, as before
    peak_power: float | None = Field(default=None, gt=0, lt=1)

    def refiner(self) -> HeatmapRefiner:
        """The runtime's refiner with these settings (an absent ``peak_power``: the refiner's own, off)."""
        return HeatmapRefiner(**self.model_dump(exclude_none=True))


class DefectBankInfo(_Strict):
    """The map's distance raised where a block is nearer a labelled defect block than any normal patch
    (``core.defect_bank``): by 1 + boost x min(max(ratio - 1, 0), cap - 1); the blocks are the array defect_bank."""

    boost: float = Field(gt=0)
    cap: float = Field(gt=1)
    blocks: int = Field(ge=1)
    images: int = Field(ge=1)


class ScoringInfo(_Strict):
    anomaly_map: Literal["nn_distance", "swin", "fused"] = "nn_distance"
    blur_sigma: float
    score_pool: int
    fusion: FusionInfo | None = None  # present whenever there is a Swin, so each map can be evaluated
    # what the verdict is taken on: the heatmap's pooled max ("map"), the distance map's ("distance"; the
    # heatmap then still comes from the Swin, and thresholds.pixel is on the heatmap's scale), or the distance
    # map's standardised per position against the array reference_distances: all reference images
    # ("standardised") or the K retrieved for the image ("reference_standardised")
    image_score: Literal["map", "distance", "standardised", "reference_standardised"] = "map"
    refine: RefineInfo | None = None  # absent: the heatmap is the blurred block map, as before
    # the frame also scored moved by this many pixels down, right and both (scoring.shift_offsets; half the
    # backbone's stride): heatmap and verdict score are the four's means (pipeline.ShiftedMean), and the thresholds
    # were estimated on such means; absent: the frame's own, as before
    frame_shift: int | None = Field(default=None, ge=1)
    defect_bank: DefectBankInfo | None = None  # absent: the map's distance is the nearest-normal one, as before

    def versioned_sections(self) -> list[tuple[str, int]]:
        """The sections present that only a later schema has, each with the schema that added it: a manifest
        with any of them says at least that schema, so that an older runtime refuses it by its version."""
        present = (("scoring.refine", self.refine is not None, REFINE_SCHEMA_VERSION),
                   ("scoring.fusion.swin_weight", self.fusion is not None and self.fusion.swin_weight is not None,
                    REFINE_SCHEMA_VERSION),
                   ("scoring.frame_shift", self.frame_shift is not None, SHIFT_SCHEMA_VERSION),
                   ("scoring.refine.peak_power", self.refine is not None and self.refine.peak_power is not None,
                    PEAK_SCHEMA_VERSION),
                   ("scoring.fusion.swin_excess", self.fusion is not None and self.fusion.swin_excess is not None,
                    EXCESS_SCHEMA_VERSION),
                   ("scoring.fusion.distance_excess",
                    self.fusion is not None and self.fusion.distance_excess is not None, EXCESS_SCHEMA_VERSION),
                   ("scoring.defect_bank", self.defect_bank is not None, DEFECT_BANK_SCHEMA_VERSION))
        return [(name, version) for name, there, version in present if there]


class Thresholds(_Strict):
    image: float
    pixel: float
    n_holdout_images: int
    target_false_reject: float
    margin: float
    quantile_score: float | None = None  # the (1 - target) quantile of the held-out good scores
    frr_upper95: float | None = None  # 95 % upper bound of the false-reject rate the held-out scores can show
    n_leave_one_out: int | None = None  # of the n_holdout_images scores, leave-one-out scores of bank images

    @classmethod
    def from_estimate(cls, est: ThresholdEstimate, pixel: ThresholdEstimate | None = None) -> Thresholds:
        """``pixel``: the estimate on the heatmap's own scores when the image score is taken elsewhere."""
        return cls(image=est.threshold, pixel=(pixel or est).threshold,
                   n_holdout_images=est.n_scores - est.n_leave_one_out,
                   target_false_reject=est.target_false_reject, margin=est.margin_factor,
                   quantile_score=est.quantile_score, frr_upper95=est.frr_upper95,
                   n_leave_one_out=est.n_leave_one_out)


class LogicalInfo(_Strict):
    """The component-level (logical) score beside the structural one (``core/components.py``): k component
    classes (centres in the array ``component_centres``), the good images' composition (``logical_mean``,
    ``logical_precision``), each score's standardisation on good images, and how the two are fused."""

    k: int = Field(ge=2)
    regions: int = Field(ge=1)
    rule: Literal["max", "sum"] = "max"
    weight: float = Field(default=1.0, ge=0)
    structural_mean: float
    structural_std: float = Field(gt=0)
    logical_mean: float
    logical_std: float = Field(gt=0)
    stability: dict[str, float] | None = None  # k -> NMI across two halves of the good images, when k was chosen


class PrecisionGate(_Strict):
    """One reduced-precision engine measured against the fp32 path on the same images (``quantize.py``)."""

    engine: str  # "cpu-int8" | "openvino-bf16" | "openvino-int8"
    accepted: bool
    reason: str  # why accepted or refused, in words
    fp32: dict[str, float | None]  # image_auroc, pixel_auroc, pro, pixel_ap of the fp32 path
    reduced: dict[str, float | None]  # the same for this engine
    max_pixel_ap_loss: float  # the gate's limits (pixel AP in points, i.e. x100)
    max_image_auroc_loss: float
    images: int  # test images both were measured on (held-out good and defective)


class PrecisionInfo(_Strict):
    """Reduced precision: which int8 graphs the bundle carries, how they were calibrated, and the accuracy gate
    of every reduced-precision engine (the runtime's ``auto`` picks only accepted ones)."""

    int8_graphs: dict[str, str] = {}  # role ("backbone" | "swin") -> file, e.g. {"swin": "swin.int8.onnx"}
    calibration_images: int
    method: str  # e.g. "onnxruntime quantize_static QDQ, per-channel int8 weights, uint8 activations, percentile"
    gates: list[PrecisionGate] = []


class FileEntry(_Strict):
    sha256: str
    size: int
    arrays: dict[str, dict[str, Any]] | None = None


class Manifest(_Strict):
    schema_version: int
    product: str
    bundle_version: str
    created_at: str
    parent: str | None = None
    producer: dict[str, str]
    preprocessing: Preprocessing
    backbone: BackboneInfo
    posfar: PosFARInfo
    scoring: ScoringInfo
    thresholds: Thresholds
    latency_budget_ms: float
    swin: SwinInfo | None = None
    foreground: ForegroundInfo | None = None
    training: TrainingInfo | None = None
    logical: LogicalInfo | None = None
    precision: PrecisionInfo | None = None  # int8 graphs and accuracy gates; absent in older bundles
    files: dict[str, FileEntry] = {}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A verified bundle: its manifest, its folder and its arrays (numpy, as stored)."""

    root: Path
    manifest: Manifest
    arrays: dict[str, np.ndarray]

    @property
    def backbone_path(self) -> Path:
        return self.root / BACKBONE

    @property
    def swin_path(self) -> Path | None:
        return self.root / SWIN if self.manifest.swin is not None else None

    @property
    def matcher_path(self) -> Path | None:
        """``matcher.onnx`` when the bundle carries one (fitted since issue 14, per-image bank layout)."""
        return self.root / MATCHER if MATCHER in self.manifest.files else None

    @property
    def int8_paths(self) -> dict[str, Path]:
        """role -> int8 graph the bundle carries (empty without a precision section)."""
        p = self.manifest.precision
        return {role: self.root / name for role, name in (p.int8_graphs if p else {}).items()}

    def precision_gate(self, engine: str) -> PrecisionGate | None:
        """The accuracy gate's verdict on a reduced-precision engine (None: never measured)."""
        p = self.manifest.precision
        return next((g for g in (p.gates if p else []) if g.engine == engine), None)


def _read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(MANIFEST, f"missing in {root}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(MANIFEST, f"not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(MANIFEST, "must hold a JSON object")
    version = raw.get("schema_version")
    if version not in SUPPORTED_SCHEMAS:
        raise BundleError(
            MANIFEST, f"schema version {version!r} is not supported (this runtime reads {list(SUPPORTED_SCHEMAS)})"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise BundleError(MANIFEST, f"key '{key}': {first['msg']} (got {first.get('input')!r})") from exc
    if manifest.logical is not None and manifest.schema_version < LOGICAL_SCHEMA_VERSION:
        raise BundleError(MANIFEST, f"a logical section needs schema version {LOGICAL_SCHEMA_VERSION}, the manifest "
                                    f"says {manifest.schema_version}")
    for name, needed in manifest.scoring.versioned_sections():
        if manifest.schema_version < needed:
            raise BundleError(MANIFEST, f"{name} needs schema version {needed}, the manifest says "
                                        f"{manifest.schema_version}")
    shift = manifest.scoring.frame_shift
    if shift is not None:
        try:
            check_frame_shift(shift, manifest.backbone.stride)
        except ValueError as exc:
            raise BundleError(MANIFEST, str(exc)) from None
    if shift is not None and manifest.logical is not None:
        raise BundleError(MANIFEST, "scoring.frame_shift with a logical section: the logical score is the frame's "
                                    "own and is not averaged over shifted frames")
    if (manifest.scoring.anomaly_map in ("swin", "fused")) != (manifest.swin is not None):
        raise BundleError(MANIFEST, f"scoring.anomaly_map is '{manifest.scoring.anomaly_map}' but the swin section "
                                    f"is {'present' if manifest.swin else 'absent'}")
    if manifest.scoring.anomaly_map == "fused" and manifest.scoring.fusion is None:
        raise BundleError(MANIFEST, "scoring.anomaly_map is 'fused' but scoring.fusion (rule and scales) is absent")
    return manifest


def _verify_files(root: Path, manifest: Manifest) -> None:
    required_files = (BACKBONE, ARRAYS, SWIN) if manifest.swin is not None else (BACKBONE, ARRAYS)
    if manifest.precision is not None:
        for role, name in manifest.precision.int8_graphs.items():
            if (role, name) not in (("backbone", BACKBONE_INT8), ("swin", SWIN_INT8)) or (
                    role == "swin" and manifest.swin is None):
                raise BundleError(MANIFEST, f"precision.int8_graphs: {role!r} -> {name!r} is not an int8 twin of "
                                            "this bundle's graphs")
        required_files = (*required_files, *manifest.precision.int8_graphs.values())
    for required in required_files:
        if required not in manifest.files:
            raise BundleError(required, "not listed in manifest.json")
    for name, entry in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(name, "listed in manifest.json but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(name, f"size {size} bytes differs from the manifest's {entry.size}")
        if sha256_of(path) != entry.sha256:
            raise BundleError(name, "sha256 differs from the manifest: the file was changed or corrupted")


#: safetensors dtype codes numpy can map (bf16 has no numpy type; no bundle array uses it)
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only numpy views of one memory map of it.

    Why not ``safetensors.numpy.load_file``: it copies every tensor into this process's heap, so N stations
    serving one bundle held N private copies of its bank.  Mapped, they share one copy in the page cache.  A
    bundle version is never rewritten in place (the store adds a new folder), so the mapping stays valid; an
    unlinked file stays mapped until the last view is gone.  The header is checked as strictly as the
    safetensors library checks it (offsets in the file, contiguous, sizes that match dtype x shape), and any
    problem is a ``ValueError`` naming it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    specs = []
    for name, spec in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])
            shape = tuple(int(v) for v in spec["shape"])
            begin, end = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tensor '{name}' has a bad header entry ({exc!r})") from exc
        if any(v < 0 for v in shape) or end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"tensor '{name}': {end - begin} bytes for {spec['dtype']}{list(shape)}")
        specs.append((begin, end, name, dtype, shape))
    specs.sort(key=lambda s: s[:2])
    expected = 0
    for begin, end, name, *_ in specs:
        if begin != expected:
            raise ValueError(f"tensor '{name}' starts at byte {begin}, expected {expected} (gap or overlap)")
        expected = end
    if expected != data_size:
        raise ValueError(f"the tensors cover {expected} bytes, the file holds {data_size}")
    if data_size == 0:
        return {name: np.zeros(shape, dtype) for _, _, name, dtype, shape in specs}
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file is closed
    return {name: np.frombuffer(mapped, dtype, count=int(np.prod(shape, dtype=np.int64)),
                                offset=data_start + begin).reshape(shape)
            for begin, end, name, dtype, shape in specs}


def _load_arrays(root: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    try:
        arrays = map_safetensors(root / ARRAYS)
    except (OSError, ValueError) as exc:
        raise BundleError(ARRAYS, f"not a readable safetensors file ({exc})") from exc
    listed = manifest.files[ARRAYS].arrays or {}
    for name, (dtype, rank) in REQUIRED_ARRAYS.items():
        if name not in arrays:
            raise BundleError(ARRAYS, f"array '{name}' is missing")
        if str(arrays[name].dtype) != dtype or arrays[name].ndim != rank:
            raise BundleError(
                ARRAYS,
                f"array '{name}' is {arrays[name].dtype}{list(arrays[name].shape)}, expected {dtype} of rank {rank}",
            )
    for name, (dtype, rank) in OPTIONAL_ARRAYS.items():
        if name in arrays and (str(arrays[name].dtype) != dtype or arrays[name].ndim != rank):
            raise BundleError(
                ARRAYS,
                f"array '{name}' is {arrays[name].dtype}{list(arrays[name].shape)}, expected {dtype} of rank {rank}",
            )
    if (manifest.foreground is not None) != ("foreground_maps" in arrays):
        raise BundleError(ARRAYS, "array 'foreground_maps' and the manifest's foreground section must come together")
    for name, arr in arrays.items():
        spec = listed.get(name)
        if spec is None:
            raise BundleError(ARRAYS, f"array '{name}' is not described in manifest.json")
        if spec.get("dtype") != str(arr.dtype) or list(spec.get("shape", [])) != list(arr.shape):
            raise BundleError(
                ARRAYS,
                f"array '{name}' is {arr.dtype}{list(arr.shape)}, manifest says {spec.get('dtype')}{spec.get('shape')}",
            )
    _check_consistency(manifest, arrays)
    return arrays


def _check_consistency(m: Manifest, a: dict[str, np.ndarray]) -> None:
    d_f, d_l = m.backbone.d_f, m.posfar.d_l
    checks = [
        (a["bank"].shape[1] == d_f, f"bank has {a['bank'].shape[1]} channels, manifest d_f is {d_f}"),
        (a["bank"].shape[0] == a["bank_image"].shape[0] == m.posfar.n_bank, "bank, bank_image and n_bank disagree"),
        (
            a["pca_components"].shape == (d_l, d_f),
            f"pca_components is {a['pca_components'].shape}, expected {(d_l, d_f)}",
        ),
        (a["pca_mean"].shape == (d_f,), f"pca_mean is {a['pca_mean'].shape}, expected {(d_f,)}"),
        (
            a["ref_descriptors"].shape[0] == m.posfar.n_reference_images,
            "ref_descriptors count differs from n_reference_images",
        ),
        (
            a["ref_descriptors"].shape[1] == m.backbone.descriptor_grid[0] * m.backbone.descriptor_grid[1],
            "ref_descriptors cells differ from descriptor_grid",
        ),
        (a["ref_descriptors"].shape[2] == m.backbone.descriptor_channels, "ref_descriptors channels differ"),
        (
            a["bank_image"].size == 0
            or (a["bank_image"].min() >= 0 and a["bank_image"].max() < m.posfar.n_reference_images),
            "bank_image refers to reference images that do not exist",
        ),
        (
            all(np.isfinite(a[k].astype(np.float32)).all() for k in ("bank", "pca_components", "pca_mean")),
            "non-finite values in bank or PCA",
        ),
    ]
    if "foreground_maps" in a:
        fg = a["foreground_maps"]
        expected = (m.posfar.n_reference_images, *m.backbone.grid)
        checks.append((fg.shape == expected, f"foreground_maps is {list(fg.shape)}, expected {list(expected)}"))
        checks.append((bool(np.isfinite(fg.astype(np.float32)).all()) and fg.min() >= 0 and fg.max() <= 1,
                       "foreground_maps must hold finite values in [0, 1]"))
    if m.scoring.image_score in ("standardised", "reference_standardised") and "reference_distances" not in a:
        checks.append((False, f"array 'reference_distances' is missing (scoring.image_score is "
                              f"'{m.scoring.image_score}')"))
    if "reference_distances" in a:
        rd = a["reference_distances"]
        expected = (m.posfar.n_reference_images, *m.backbone.grid)
        checks.append((rd.shape == expected, f"reference_distances is {list(rd.shape)}, expected {list(expected)}"))
        checks.append((bool(np.isfinite(rd.astype(np.float32)).all()) and rd.min() >= 0,
                       "reference_distances must hold finite distances >= 0"))
    bank_info = m.scoring.defect_bank
    if (bank_info is not None) != ("defect_bank" in a):
        checks.append((False, "array 'defect_bank' and the manifest's scoring.defect_bank must come together"))
    elif bank_info is not None:
        db = a["defect_bank"]
        checks.append((db.shape == (bank_info.blocks, d_f),
                       f"defect_bank is {list(db.shape)}, expected {[bank_info.blocks, d_f]}"))
        checks.append((bool(np.isfinite(db.astype(np.float32)).all()), "non-finite values in defect_bank"))
    names = ("component_centres", "logical_mean", "logical_precision", "logical_group_stats")
    logical_arrays = [k for k in names if k in a]
    if (m.logical is not None) != bool(logical_arrays) or (logical_arrays and len(logical_arrays) != len(names)):
        checks.append((False, f"arrays {', '.join(names)} and the manifest's logical section must come together"))
    elif m.logical is not None:
        groups = summary_groups(m.logical.k, m.logical.regions)
        dim = groups[-1].stop
        checks.append((a["component_centres"].shape == (m.logical.k, d_f),
                       f"component_centres is {list(a['component_centres'].shape)}, expected {[m.logical.k, d_f]}"))
        checks.append((a["logical_mean"].shape == (dim,) and a["logical_precision"].shape == (dim, dim),
                       f"logical_mean / logical_precision do not describe a {dim}-d composition summary"))
        checks.append((a["logical_group_stats"].shape == (len(groups), 2)
                       and bool((a["logical_group_stats"][:, 1] > 0).all()),
                       f"logical_group_stats must be ({len(groups)}, 2) with positive spreads"))
        checks.append((all(bool(np.isfinite(a[k]).all()) for k in logical_arrays),
                       "non-finite values in the logical arrays"))
    for ok, problem in checks:
        if not ok:
            raise BundleError(ARRAYS, problem)


def _extract_tar(tar_path: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="weakrest-bundle-"))
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise BundleError(tar_path.name, f"unsafe member '{member.name}' in the archive")
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise BundleError(tar_path.name, f"not a readable tar archive ({exc})") from exc
    entries = [p for p in target.iterdir()]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Verify and load a bundle folder or ``.tar``; raise :class:`BundleError` on any problem."""
    path = Path(path)
    if not path.exists():
        raise BundleError(str(path), "no such bundle")
    root = _extract_tar(path) if path.is_file() else path
    manifest = _read_manifest(root)
    _verify_files(root, manifest)
    arrays = _load_arrays(root, manifest)
    return Bundle(root=root, manifest=manifest, arrays=arrays)


def describe_arrays(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {name: {"dtype": str(a.dtype), "shape": list(a.shape)} for name, a in arrays.items()}


def write_bundle(
    out_dir: str | os.PathLike, manifest: Manifest, files: dict[str, Path], arrays: dict[str, np.ndarray]
) -> Path:
    """Write a bundle folder: copy ``files`` (name -> source path), save arrays, hash all, write manifest.

    The folder is assembled beside its destination and renamed into place, so a reader never sees a
    half-written bundle; an existing destination is replaced.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, src in files.items():
            shutil.copyfile(src, staging / name)
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        save_file(arrays, str(staging / ARRAYS))
        entries = {}
        for name in [*files, ARRAYS]:
            p = staging / name
            entries[name] = FileEntry(
                sha256=sha256_of(p), size=p.stat().st_size, arrays=describe_arrays(arrays) if name == ARRAYS else None
            )
        final = manifest.model_copy(update={"files": entries})
        text = json.dumps(final.model_dump(mode="json", exclude_none=True), indent=2)
        (staging / MANIFEST).write_text(text + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def pack_bundle(bundle_dir: str | os.PathLike, tar_path: str | os.PathLike | None = None) -> Path:
    """Ship a bundle folder as one uncompressed ``.tar`` (its folder name as the single top entry)."""
    bundle_dir = Path(bundle_dir)
    tar_path = Path(tar_path) if tar_path else bundle_dir.with_suffix(".tar")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
    return tar_path


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
