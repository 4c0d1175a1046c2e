"""The per-frame inspection pipeline: image -> backbone -> retrieval -> matching -> Swin -> heatmap -> verdict.

:class:`PosFARScorer` is the torch-free math from patch features to an anomaly map and score; the
training host and the calibration tool use it to score held-out images exactly as the edge will.  The
block map is the nearest-normal distance, the residual Swin's anomaly probability, or both fused (each divided
by its high quantile on held-out good blocks, then combined), optionally weighted by the retrieved references'
foreground maps (object products).
:class:`Inspector` wraps it with the engines and stage timings for the runtime.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from .bundle import BACKBONE, DEFAULT_SWIN_WEIGHT, SWIN, Bundle, BundleError, load_bundle
from .components import Components, LogicalModel, LogicalScoring, Standardisation
from .defect_bank import BankSearch, DefectBank
from .engines import (
    Engine,
    EngineError,
    EngineSet,
    EngineUnavailable,
    OnnxRuntimeEngine,
    limit_blas_threads,
    select_engines,
)
from .foreground import reference_foreground
from .matching import MemoryBank, NearestSearch, posfar_residual
from .pca import PCA
from .preprocess import to_input_tensor
from .retrieval import ReferenceIndex
from .scoring import (
    DistanceStandardiser,
    HeatmapRefiner,
    Region,
    block_map_score,
    check_frame_shift,
    defect_regions,
    heatmap_from_blocks,
    shift_offsets,
    shifted_frame,
    unshifted_heatmap,
)
from .scoring import image_score as pooled_max  # the name image_score is the verdict's kind in this module

if TYPE_CHECKING:
    from .device_pipeline import DeviceGraphs, DevicePipeline


@dataclass
class Scored:
    """Anomaly evidence for one image at the backbone's input size."""

    block_map: np.ndarray  # (h_f, w_f) float32
    heatmap: np.ndarray  # (H, W) float32
    score: float  # the image score the verdict is taken on
    references: np.ndarray  # indices of the K retrieved training images
    timings_ms: dict[str, float] = field(default_factory=dict)
    map_score: float | None = None  # the heatmap's own score (pooled max): the scale of the pixel threshold
    # with a logical score: both standardised scores (the verdict's score is their fusion) and the composition
    structural: float | None = None
    logical: float | None = None
    component_areas: list[float] | None = None


class ShiftedMean:
    """One frame scored at the offsets of ``scoring.frame_shift`` (``scoring.shift_offsets``), averaged: the
    heatmaps moved back onto the frame's pixels, and the verdict's score.  Averaging the four stride-8 grids
    gives a stride-4 map and a steadier score; the runtime, the fit and field calibration all average the same
    way here, so the thresholds are estimated on the scores the edge computes."""

    def __init__(self, frame: Scored) -> None:
        self.frame = frame
        self.heatmap = frame.heatmap.astype(np.float32, copy=True)
        self.score = float(frame.score)
        self.n = 1

    def add(self, moved: Scored, dy: int, dx: int) -> None:
        """The Scored of the frame moved ``dy`` px down and ``dx`` px right."""
        self.heatmap += unshifted_heatmap(moved.heatmap, dy, dx)
        self.score += float(moved.score)
        self.n += 1

    def result(self, score_pool: int) -> Scored:
        """The frame's Scored with the means (its block map, references and timings stay the frame's own)."""
        heatmap = self.heatmap / np.float32(self.n)
        return replace(self.frame, heatmap=heatmap, score=self.score / self.n,
                       map_score=pooled_max(heatmap, score_pool))


def shift_averaged(scored: list[Scored], moved: Callable[[int, int], Iterable[Scored]], shift_px: int,
                   score_pool: int) -> list[Scored]:
    """Many frames' ``ShiftedMean``: ``moved(dy, dx)`` yields the same frames' Scored, in order, moved by that
    offset.  How the fit and field calibration score their good images as the edge scores a frame."""
    means = [ShiftedMean(s) for s in scored]
    for dy, dx in shift_offsets(shift_px)[1:]:
        for mean, frame in zip(means, moved(dy, dx), strict=True):
            mean.add(frame, dy, dx)
    return [m.result(score_pool) for m in means]


#: residual tokens (M, d_f) float32 -> anomaly probability per block (M,)
Classifier = Callable[[np.ndarray], np.ndarray]


class SwinClassifier:
    """The bundle's ``swin.onnx`` (or any engine with the same contract) as a :data:`Classifier`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, residual: np.ndarray) -> np.ndarray:
        out = self.engine.run({"residual": np.ascontiguousarray(residual[None], dtype=np.float32)})
        return out["probability"][0]


@dataclass(frozen=True)
class ForegroundWeighting:
    """Paper step 9: multiply the block map by the K references' pooled foreground maps raised to ``power``."""

    maps: np.ndarray  # (n_reference_images, h_f, w_f)
    power: float
    pool: int = 3

    def factor(self, references: np.ndarray) -> np.ndarray:
        return reference_foreground(self.maps, references, self.power, self.pool)


#: what the verdict is taken on: the heatmap's pooled max, the distance map's, or the distance map's with each
#: block standardised against the good images' distances at its position, all of them or only the K retrieved
#: references' (:class:`DistanceStandardiser`)
ImageScore = Literal["map", "distance", "standardised", "reference_standardised"]
IMAGE_SCORES: tuple[str, ...] = ("map", "distance", "standardised", "reference_standardised")
STANDARDISED: tuple[str, ...] = ("standardised", "reference_standardised")

FUSION_QUANTILE = 0.999  # each map is divided by this quantile of its values on held-out good blocks


def fuse_scaled(rule: Literal["mean", "geometric", "max"], p: np.ndarray, d: np.ndarray, swin_weight: float,
                swin_excess: float = 0.0, distance_excess: float = 0.0) -> np.ndarray:
    """``MapFusion``'s map from the Swin's and the distance's maps already divided by their scales (1.0: the most
    extreme held-out normal block): ``rule`` with the Swin's share ``swin_weight``, plus each excess weight times
    that map's excess over 1.0.  No checks: ``MapFusion`` validates its settings, studies may go past them."""
    w = swin_weight
    if rule == "mean":
        fused = 0.5 * (p + d) if w == DEFAULT_SWIN_WEIGHT else np.float32(w) * p + np.float32(1.0 - w) * d
    elif rule == "max":
        fused = np.maximum(p, d)
    else:
        pc, dc = np.maximum(p, 0.0), np.maximum(d, 0.0)
        fused = np.sqrt(pc * dc) if w == DEFAULT_SWIN_WEIGHT else pc ** np.float32(w) * dc ** np.float32(1.0 - w)
    for weight, scaled in ((swin_excess, p), (distance_excess, d)):
        if weight > 0.0:
            fused = fused + np.float32(weight) * np.maximum(scaled - np.float32(1.0), np.float32(0.0))
    return fused


def fusion_scale(values: np.ndarray) -> float:
    """A map's scale: its ``FUSION_QUANTILE`` over held-out good blocks (any shape, pooled), at least 1e-6."""
    return max(float(np.quantile(np.asarray(values, dtype=np.float64).ravel(), FUSION_QUANTILE)), 1e-6)


@dataclass(frozen=True)
class MapFusion:
    """The final map from both pieces of evidence: the Swin's probability and the nearest-normal distance.

    Measured on MTD, the Swin trained on synthetic anomalies removes false alarms of the distance but also
    erases small defects that only the distance sees (blowholes); fused, each keeps what the other misses.
    Both maps are first divided by their ``FUSION_QUANTILE`` on held-out good blocks, so 1.0 means "as high
    as the most extreme normal blocks" in either, then combined by ``rule``, the Swin weighted by
    ``swin_weight`` and the distance by the rest (a weighted mean, or a weighted geometric mean; ``max`` takes
    no weight).  ``swin_excess`` and ``distance_excess`` > 0 then add that many times each map's excess over 1.0
    (``max(p - 1, 0)``, ``max(d - 1, 0)``): where either is surer than on any normal block it counts more, while
    below (where most normal blocks lie, and where PRO is decided) the shares stay.  On MTD the Swin's excess lifts
    the large finish regions it finds, the distance's the pits and cracks only it sees.
    """

    rule: Literal["mean", "geometric", "max"]
    distance_scale: float
    swin_scale: float
    swin_weight: float = DEFAULT_SWIN_WEIGHT
    swin_excess: float = 0.0
    distance_excess: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in ("mean", "geometric", "max"):
            raise ValueError(f"fusion rule must be mean, geometric or max, got {self.rule!r}")
        if not (self.distance_scale > 0 and self.swin_scale > 0):
            raise ValueError(f"fusion scales must be positive, got {self.distance_scale}, {self.swin_scale}")
        if not 0.0 < self.swin_weight < 1.0:
            raise ValueError(f"fusion swin_weight must be in (0, 1), got {self.swin_weight}")
        for name in ("swin_excess", "distance_excess"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0.0):
                raise ValueError(f"fusion {name} must be a finite number >= 0, got {value}")

    @classmethod
    def calibrate(cls, rule: Literal["mean", "geometric", "max"], distances: np.ndarray,
                  probabilities: np.ndarray, swin_weight: float = DEFAULT_SWIN_WEIGHT,
                  swin_excess: float = 0.0, distance_excess: float = 0.0) -> MapFusion:
        """Scales from the block values of held-out good images (any shape, pooled)."""
        return cls(rule=rule, distance_scale=fusion_scale(distances), swin_scale=fusion_scale(probabilities),
                   swin_weight=swin_weight, swin_excess=swin_excess, distance_excess=distance_excess)

    @classmethod
    def from_scorer(cls, rule: Literal["mean", "geometric", "max"], scorer: PosFARScorer,
                    good_features: list[tuple[np.ndarray, np.ndarray]],
                    swin_weight: float = DEFAULT_SWIN_WEIGHT, swin_excess: float = 0.0,
                    distance_excess: float = 0.0) -> MapFusion:
        """Scales from a Swin scorer's raw block evidence on held-out good images ((pcf, descriptor) pairs)."""
        evidence = [scorer.block_evidence(pcf, descriptor) for pcf, descriptor in good_features]
        return cls.calibrate(rule, np.stack([e[0] for e in evidence]), np.stack([e[1] for e in evidence]),
                             swin_weight, swin_excess, distance_excess)

    def __call__(self, probability: np.ndarray, distance: np.ndarray) -> np.ndarray:
        p = np.asarray(probability, dtype=np.float32) / np.float32(self.swin_scale)
        d = np.asarray(distance, dtype=np.float32) / np.float32(self.distance_scale)
        return fuse_scaled(self.rule, p, d, self.swin_weight, self.swin_excess, self.distance_excess)


@dataclass(frozen=True)
class Evidence:
    """One image's raw block evidence, before fusion, foreground weighting and scoring."""

    distance: np.ndarray  # (M,) float32, full-space distance to the matched normal patch
    probability: np.ndarray | None  # (M,) float32, the Swin's anomaly probability (None without a Swin)
    references: np.ndarray  # the K retrieved training images
    timings_ms: dict[str, float] = field(default_factory=dict)
    logical_score: float | None = None  # Mahalanobis distance of the composition (with a logical model)
    component_areas: np.ndarray | None = None  # (k,) area fraction of each component class
    defect_factor: np.ndarray | None = None  # (M,) the defect bank's factor on the map's distance (with a bank)

    @property
    def map_distance(self) -> np.ndarray:
        """The distance the map is made of: raised by the defect bank where it has one (the verdict keeps
        ``distance``)."""
        return self.distance if self.defect_factor is None else self.distance * self.defect_factor


@dataclass(frozen=True)
class Residual:
    """What matching produced for one image: the PosFAR residual field and where it came from."""

    residual: np.ndarray  # (M, d_f) float32
    distance: np.ndarray  # (M,) float32, full-space distance to the matched normal patch
    references: np.ndarray  # the K retrieved training images


class PosFARScorer:
    """Scoring restricted to the K retrieved reference images: distance, or Swin over the residuals."""

    def __init__(self, bank: MemoryBank, references: ReferenceIndex, k: int, grid: tuple[int, int],
                 input_hw: tuple[int, int], blur_sigma: float = 4.0, score_pool: int = 8,
                 thetas: tuple[float, ...] = (1.0, 2.0), classifier: Classifier | None = None,
                 foreground: ForegroundWeighting | None = None, fusion: MapFusion | None = None,
                 image_score: ImageScore = "map", standardiser: DistanceStandardiser | None = None,
                 logical: LogicalScoring | None = None, defect_bank: DefectBank | None = None) -> None:
        if fusion is not None and classifier is None:
            raise ValueError("a fused map needs the Swin classifier")
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {image_score!r}")
        if image_score in STANDARDISED and standardiser is None:
            raise ValueError("a standardised image score needs the reference images' distance maps")
        self.image_score = image_score
        self.standardiser = standardiser
        self.logical = logical
        self.bank = bank
        self.references = references
        self.k = k
        self.grid = grid
        self.input_hw = input_hw
        self.blur_sigma = blur_sigma
        self.score_pool = score_pool
        self.thetas = tuple(thetas)
        self.classifier = classifier
        self.foreground = foreground
        self.fusion = fusion
        self.defect_bank = defect_bank

    @classmethod
    def from_bundle(cls, bundle: Bundle, classifier: Classifier | None = None,
                    use_foreground: bool = True, fusion: MapFusion | None = None,
                    image_score: ImageScore | None = None,
                    logical_verdict: Literal["fused", "structural", "logical"] = "fused",
                    search: NearestSearch | None = None, bank_search: BankSearch | None = None) -> PosFARScorer:
        """The bundle's scorer; pass ``classifier`` (its Swin engine) to score with the residual Swin, and
        ``fusion`` as well to fuse it with the distance; ``search``: an engine's nearest-candidate search;
        ``bank_search``: an engine's search over the defect bank's blocks (with ``scoring.defect_bank``)."""
        m, a = bundle.manifest, bundle.arrays
        pca = PCA.from_arrays(a)
        bank = MemoryBank(a["bank"], a["bank_image"], pca, search=search)
        refs = ReferenceIndex(a["ref_descriptors"].astype(np.float32), trim=m.posfar.retrieval_trim)
        foreground = None
        if use_foreground and m.foreground is not None and m.foreground.power > 0:
            foreground = ForegroundWeighting(a["foreground_maps"], m.foreground.power, m.foreground.pool)
        standardiser = None
        if "reference_distances" in a:
            standardiser = DistanceStandardiser(a["reference_distances"].astype(np.float32))
        logical = None
        if logical_verdict != "structural" and m.logical is not None:
            lg = m.logical
            components = Components(a["component_centres"], tuple(m.backbone.grid), lg.regions)
            logical = LogicalScoring(components, LogicalModel(a["logical_mean"], a["logical_precision"],
                                                              components.groups(), a["logical_group_stats"]),
                                     Standardisation(lg.structural_mean, lg.structural_std),
                                     Standardisation(lg.logical_mean, lg.logical_std),
                                     "logical" if logical_verdict == "logical" else lg.rule, lg.weight)
        defect_bank = None
        if m.scoring.defect_bank is not None:
            info = m.scoring.defect_bank
            defect_bank = DefectBank(a["defect_bank"], info.boost, info.cap, search=bank_search)
        return cls(bank, refs, m.posfar.k_references, tuple(m.backbone.grid), tuple(m.preprocessing.input_size),
                   m.scoring.blur_sigma, m.scoring.score_pool, thetas=tuple(m.posfar.thetas), classifier=classifier,
                   foreground=foreground, fusion=fusion, image_score=image_score or m.scoring.image_score,
                   standardiser=standardiser, logical=logical, defect_bank=defect_bank)

    def residual(self, pcf: np.ndarray, descriptor: np.ndarray, exclude: int | None = None) -> Residual:
        """Retrieval, matching and the PosFAR residual field of one image (no classifier)."""
        refs = self.references.nearest(descriptor, self.k, exclude=exclude)
        match = self.bank.match(pcf, refs)
        residual = posfar_residual(pcf, match.matched, self.thetas)
        return Residual(residual=residual, distance=match.distance, references=refs)

    def with_standardiser(self, standardiser: DistanceStandardiser | None,
                          image_score: ImageScore | None = None) -> PosFARScorer:
        """The same scorer with the reference images' distance maps (and, if given, another image score)."""
        other = copy.copy(self)
        other.standardiser = standardiser
        other.image_score = image_score or self.image_score
        if other.image_score in STANDARDISED and standardiser is None:
            raise ValueError("a standardised image score needs the reference images' distance maps")
        return other

    def with_logical(self, logical: LogicalScoring | None) -> PosFARScorer:
        """The same scorer with (or without) a logical score fused into the verdict."""
        other = copy.copy(self)
        other.logical = logical
        return other

    def with_defect_bank(self, bank: DefectBank | None) -> PosFARScorer:
        """The same scorer with (or without) a bank of labelled defect blocks raising the map's distance."""
        other = copy.copy(self)
        other.defect_bank = bank
        return other

    def defect_factor(self, pcf: np.ndarray, distance: np.ndarray) -> np.ndarray | None:
        """The defect bank's factor on each block's distance (None without a bank): one place for every engine."""
        return self.defect_bank.factor(pcf, distance) if self.defect_bank is not None else None

    def with_fusion(self, fusion: MapFusion | None) -> PosFARScorer:
        """The same scorer (sharing its bank and references) with another fused map, or none."""
        if fusion is not None and self.classifier is None:
            raise ValueError("a fused map needs the Swin classifier")
        other = copy.copy(self)
        other.fusion = fusion
        return other

    def block_evidence(self, pcf: np.ndarray, descriptor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The block distances the map is made of (M,) and the Swin's probabilities (M,) (None without a
        classifier), before fusion and foreground weighting: what :meth:`MapFusion.calibrate` needs."""
        ev = self.evidence(pcf, descriptor)
        return ev.map_distance, ev.probability

    def evidence(self, pcf: np.ndarray, descriptor: np.ndarray, exclude: int | None = None) -> Evidence:
        """Retrieval, matching and the Swin for one image: pcf (M, d_f), descriptor (cells, C); ``exclude``
        leaves one reference image out.  Everything after this (fusion, foreground, heatmap, image score) is
        :meth:`finish`, so a fit can gather the evidence once and score it under statistics it derives from it."""
        t0 = time.perf_counter()
        refs = self.references.nearest(descriptor, self.k, exclude=exclude)
        t1 = time.perf_counter()
        match = self.bank.match(pcf, refs)
        t2 = time.perf_counter()
        timings = {"retrieval": (t1 - t0) * 1e3, "matching": (t2 - t1) * 1e3}
        factor = self.defect_factor(pcf, match.distance)
        if factor is not None:
            timings["defect_bank"] = (time.perf_counter() - t2) * 1e3
            t2 = time.perf_counter()
        probability = None
        if self.classifier is not None:
            residual = posfar_residual(pcf, match.matched, self.thetas)
            probability = np.asarray(self.classifier(residual), dtype=np.float32)
            timings["swin"] = (time.perf_counter() - t2) * 1e3
        logical_score = areas = None
        if self.logical is not None:
            t3 = time.perf_counter()
            logical_score, cmap = self.logical.logical_score(pcf)
            areas = cmap.summary[: self.logical.components.k]
            timings["logical"] = (time.perf_counter() - t3) * 1e3
        return Evidence(distance=np.asarray(match.distance, dtype=np.float32), probability=probability,
                        references=refs, timings_ms=timings, logical_score=logical_score, component_areas=areas,
                        defect_factor=factor)

    def finish(self, ev: Evidence) -> Scored:
        """The block map, heatmap and image score of one image's evidence."""
        t0 = time.perf_counter()
        distance_map = ev.distance.reshape(self.grid)
        if ev.probability is not None and self.classifier is not None:
            block_map = ev.probability if self.fusion is None else self.fusion(ev.probability, ev.map_distance)
            block_map = block_map.reshape(self.grid)
        else:
            block_map = ev.map_distance.reshape(self.grid)
        factor = self.foreground.factor(ev.references) if self.foreground is not None else None
        if factor is not None:
            block_map = block_map * factor
        heatmap = heatmap_from_blocks(block_map, self.input_hw, self.blur_sigma)
        map_score = block_map_score(block_map, self.input_hw, self.blur_sigma, self.score_pool)
        score = map_score
        if self.image_score in STANDARDISED or (self.image_score == "distance" and self.classifier is not None):
            # the verdict on the distance, the heatmap from the Swin (or both fused): measured on MTD, the
            # distance separates good from defective images best at a line's false-reject rates, the
            # Swin's maps localise better; standardised per position, better still
            verdict_map = distance_map
            if self.image_score in STANDARDISED:
                assert self.standardiser is not None  # checked in __init__
                verdict_map = self.standardiser(
                    distance_map, ev.references if self.image_score == "reference_standardised" else None)
            if factor is not None:
                verdict_map = verdict_map * factor
            score = block_map_score(verdict_map, self.input_hw, self.blur_sigma, self.score_pool)
        structural = logical = areas = None
        if self.logical is not None and ev.logical_score is not None:
            score, structural, logical = self.logical.fuse(score, ev.logical_score)
            areas = [round(float(v), 4) for v in ev.component_areas] if ev.component_areas is not None else None
        timings = {**ev.timings_ms, "postprocess": (time.perf_counter() - t0) * 1e3}
        return Scored(block_map=block_map, heatmap=heatmap, score=score, references=ev.references,
                      timings_ms=timings, map_score=map_score, structural=structural, logical=logical,
                      component_areas=areas)

    def score(self, pcf: np.ndarray, descriptor: np.ndarray, exclude: int | None = None) -> Scored:
        """pcf: (M, d_f) patch features; descriptor: (cells, C).  ``exclude`` leaves one image out."""
        return self.finish(self.evidence(pcf, descriptor, exclude))


@dataclass(frozen=True)
class Extracted:
    """A frame after :meth:`Inspector.extract`: the backbone's outputs (or, for a GPU engine, the input tensor)."""

    tensor: np.ndarray | None
    pcf: np.ndarray | None
    descriptor: np.ndarray | None
    timings_ms: dict[str, float]
    guide: np.ndarray | None = None  # the frame's grey input (H, W), when the bundle refines its heatmap


@dataclass
class InspectionResult:
    """Verdict for one frame with its evidence and where the time went."""

    score: float
    verdict: str  # "pass" | "fail"
    threshold: float
    heatmap: np.ndarray
    regions: list[Region]
    timings_ms: dict[str, float]
    over_budget: bool
    evidence: dict | None = None  # with a logical score: {structural, logical, components}, why a part failed

    def to_json(self) -> dict:
        out = {
            "verdict": self.verdict,
            "score": round(self.score, 6),
            "threshold": round(self.threshold, 6),
            "regions": [r.to_json() for r in self.regions],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "over_budget": self.over_budget,
        }
        if self.evidence is not None:
            out["evidence"] = self.evidence
        return out


class Inspector:
    """Loads the engines of a verified bundle and inspects decoded RGB images.

    ``anomaly_map`` other than the bundle's own (``nn_distance``: distance alone, the baseline; ``swin``; or
    ``fused`` with ``fusion_rule``), or ``image_score`` other than its own (``map``: the heatmap's pooled max;
    ``distance``: the distance map's, with the heatmap still from the Swin; ``standardised`` and
    ``reference_standardised``: the distance map's standardised per position), is for evaluation: the bundle's
    thresholds belong to its own scores and must then be read as unset.  ``refine=False`` leaves out the
    bundle's heatmap refinement (``scoring.refine``), to measure what it does; ``frame_shift`` overrides the
    bundle's shifted frames (``scoring.frame_shift``; 0: off), likewise (the thresholds then belong to other scores);
    ``swin_share`` the Swin's share of a fused map (``scoring.fusion_swin_weight``), and ``swin_excess`` /
    ``distance_excess`` the weights of each map's excess over the normal blocks' extreme
    (``scoring.fusion_swin_excess`` / ``fusion_distance_excess``), likewise.  A bundle's defect bank
    (``scoring.defect_bank``) raises the fused map only: ``nn_distance`` stays the plain distance.

    ``engine`` is the engine switch (``engines.ENGINE_NAMES``; ``auto`` picks by ``engines.AUTO_ORDER``); the
    choice is in ``engines`` (None when the caller hands in its own ``backbone``).
    """

    def __init__(self, bundle: Bundle, backbone: Engine | None = None, threads: int | None = None,
                 swin: Engine | None = None, anomaly_map: Literal["swin", "nn_distance", "fused"] | None = None,
                 use_foreground: bool = True, fusion_rule: Literal["mean", "geometric", "max"] | None = None,
                 image_score: ImageScore | None = None,
                 logical_verdict: Literal["fused", "structural", "logical"] = "fused", engine: str = "cpu",
                 device: str = "CPU", engines: EngineSet | None = None, refine: bool = True,
                 frame_shift: int | None = None, swin_share: float | None = None,
                 swin_excess: float | None = None, distance_excess: float | None = None) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.input_hw = tuple(m.preprocessing.input_size)
        self.scale = m.preprocessing.scale
        self.engines: EngineSet | None = engines
        if threads is not None:  # the numpy stages get the same share of the cores as the engines
            limit_blas_threads(threads)
        if backbone is None:
            self.engines = engines or select_engines(bundle, engine, threads=threads, device=device)
            backbone, swin = self.engines.backbone, swin or self.engines.swin
            if self.engines.search is not None:
                # the engine's searches run on their own threads: numpy's BLAS keeps one, or its pool would fight
                # them for the cores, and spin between frames on those the graphs need (engines.OpenVinoSearch,
                # matching.SearchThreads)
                limit_blas_threads(1)
        self.backbone = backbone
        self.anomaly_map = anomaly_map or m.scoring.anomaly_map
        if self.anomaly_map in ("swin", "fused") and bundle.swin_path is None:
            raise ValueError(f"bundle {bundle.root} has no swin.onnx: it can only score by nn_distance")
        fusion = None
        if self.anomaly_map == "fused":
            f = m.scoring.fusion
            if f is None:
                raise ValueError(f"bundle {bundle.root} has no fusion scales (fitted before fused maps existed)")
            fusion = MapFusion(rule=fusion_rule or f.rule, distance_scale=f.distance_scale, swin_scale=f.swin_scale,
                               swin_weight=f.weight if swin_share is None else swin_share,
                               swin_excess=f.swin_excess_weight if swin_excess is None else swin_excess,
                               distance_excess=f.distance_excess_weight if distance_excess is None
                               else distance_excess)
        self.fusion = fusion
        self.swin = None
        if self.anomaly_map in ("swin", "fused"):
            self.swin = swin or OnnxRuntimeEngine(bundle.swin_path, threads=threads)
        classifier = SwinClassifier(self.swin) if self.swin is not None else None
        self.image_score = image_score or m.scoring.image_score
        if self.image_score in STANDARDISED and "reference_distances" not in bundle.arrays:
            raise ValueError(f"bundle {bundle.root} has no reference distance maps (fitted before standardised "
                             "image scores existed): it cannot score that way")
        self.scorer = PosFARScorer.from_bundle(bundle, classifier=classifier, use_foreground=use_foreground,
                                               fusion=fusion, image_score=self.image_score,
                                               logical_verdict=logical_verdict,
                                               search=self.engines.search if self.engines else None,
                                               bank_search=self.engines.bank_search if self.engines else None)
        if self.anomaly_map != "fused":  # the distance baseline is the plain distance; the Swin alone has none
            self.scorer = self.scorer.with_defect_bank(None)
        self.logical_verdict = logical_verdict if m.logical is not None else "structural"
        self.threshold = m.thresholds.image
        self.pixel_threshold = m.thresholds.pixel
        r = m.scoring.refine
        self.refiner = r.refiner() if (refine and r is not None) else None
        shift = (m.scoring.frame_shift or 0) if frame_shift is None else frame_shift
        check_frame_shift(shift, m.backbone.stride)
        self.frame_shift = shift
        self.shift_offsets = shift_offsets(shift)[1:]  # the frame's own offset is the frame itself
        self.budget_ms = m.latency_budget_ms
        self.device_pipeline = None
        if self.engines is not None and self.engines.device is not None:
            self.device_pipeline = self._device_pipeline(self.engines.device)

    def _device_pipeline(self, graphs: DeviceGraphs) -> DevicePipeline:
        """A GPU engine's frame path: the bank and references go to the device once, here."""
        from .device_matching import DeviceMatcher
        from .device_pipeline import DevicePipeline, require_cupy

        s = self.scorer
        matcher = DeviceMatcher(s.bank, s.references, s.k, s.thetas, xp=require_cupy())
        return DevicePipeline(matcher, graphs.backbone, graphs.swin if self.swin is not None else None,
                              (1, 3, *self.input_hw), stream=graphs.stream,
                              keep_features=s.logical is not None or s.defect_bank is not None,
                              matcher_graph=graphs.matcher)

    def _device_scored(self, tensor: np.ndarray) -> Scored:
        """Backbone, retrieval, matching and Swin on the device; fusion, heatmap and score on the host."""
        out = self.device_pipeline.run(tensor)
        timings = dict(out["timings_ms"])
        logical_score = areas = None
        if self.scorer.logical is not None:
            t0 = time.perf_counter()
            logical_score, cmap = self.scorer.logical.logical_score(out["pcf"])
            areas = cmap.summary[: self.scorer.logical.components.k]
            timings["logical"] = (time.perf_counter() - t0) * 1e3
        factor = None
        if self.scorer.defect_bank is not None:  # on the host, from the features the device sends back
            t0 = time.perf_counter()
            factor = self.scorer.defect_factor(out["pcf"], out["distance"])
            timings["defect_bank"] = (time.perf_counter() - t0) * 1e3
        ev = Evidence(distance=out["distance"], probability=out["probability"], references=out["references"],
                      timings_ms=timings, logical_score=logical_score, component_areas=areas, defect_factor=factor)
        return self.scorer.finish(ev)

    def _shift_averaged(self, tensor: np.ndarray | None, frame: Scored) -> Scored:
        """The frame's Scored averaged with those of the frame moved by ``scoring.frame_shift`` (``ShiftedMean``):
        the heatmap and the verdict's score, as the bundle's thresholds were estimated."""
        if tensor is None:
            raise ValueError("this bundle inspects shifted frames: extract the frame with this inspector")
        mean = ShiftedMean(frame)
        for dy, dx in self.shift_offsets:
            moved = shifted_frame(tensor, dy, dx)
            if self.device_pipeline is not None:
                mean.add(self._device_scored(moved), dy, dx)
            else:
                out = self.backbone.run({"image": moved})
                mean.add(self.scorer.score(out["pcf"][0], out["descriptor"][0]), dy, dx)
        return mean.result(self.scorer.score_pool)

    def features(self, image_rgb: np.ndarray, shift: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
        """Backbone outputs for one image: PCFs (M, d_f) and the retrieval descriptor (cells, C); ``shift``:
        of the image moved that many pixels down and right (``scoring.shifted_frame``)."""
        tensor = to_input_tensor(image_rgb, self.input_hw, self.scale)
        out = self.backbone.run({"image": shifted_frame(tensor, *shift) if shift != (0, 0) else tensor})
        return out["pcf"][0], out["descriptor"][0]

    def extract(self, image_rgb: np.ndarray) -> Extracted:
        """A frame's first half: preprocessing and the backbone (on a GPU engine, preprocessing only: the
        backbone runs on the device with the rest).  The service overlaps it with the previous frame's
        :meth:`conclude` when ``overlap_frames`` is on."""
        t0 = time.perf_counter()
        tensor = to_input_tensor(image_rgb, self.input_hw, self.scale)
        guide = HeatmapRefiner.guide_of(tensor) if self.refiner is not None else None
        t1 = time.perf_counter()
        if self.device_pipeline is not None:
            return Extracted(tensor=tensor, pcf=None, descriptor=None, timings_ms={"preprocess": (t1 - t0) * 1e3},
                             guide=guide)
        out = self.backbone.run({"image": tensor})
        t2 = time.perf_counter()
        return Extracted(tensor=tensor if self.shift_offsets else None, pcf=out["pcf"][0],
                         descriptor=out["descriptor"][0],
                         timings_ms={"preprocess": (t1 - t0) * 1e3, "backbone": (t2 - t1) * 1e3}, guide=guide)

    def conclude(self, extracted: Extracted) -> InspectionResult:
        """A frame's second half: retrieval, matching, Swin, heatmap, score, verdict and regions."""
        t2 = time.perf_counter()
        if self.device_pipeline is not None:
            scored = self._device_scored(extracted.tensor)
        else:
            scored = self.scorer.score(extracted.pcf, extracted.descriptor)
        timings = {**extracted.timings_ms, **scored.timings_ms}
        if self.shift_offsets:
            t_shift = time.perf_counter()
            scored = self._shift_averaged(extracted.tensor, scored)
            timings["shifts"] = (time.perf_counter() - t_shift) * 1e3
        heatmap = scored.heatmap
        if self.refiner is not None:
            if extracted.guide is None:
                raise ValueError("this bundle refines its heatmap by the frame: extract the frame with this inspector")
            heatmap = self.refiner(heatmap, extracted.guide)
        fail = scored.score >= self.threshold
        regions = defect_regions(heatmap, self.pixel_threshold) if fail else []
        if self.refiner is not None:
            heatmap = self.refiner.relative(heatmap, self.pixel_threshold)
        t3 = time.perf_counter()
        timings["postprocess"] += (t3 - t2) * 1e3 - sum(scored.timings_ms.values()) - timings.get("shifts", 0.0)
        # the time this frame was worked on (a wait between the two halves, when overlapped, is not in it)
        timings["total"] = sum(extracted.timings_ms.values()) + (t3 - t2) * 1e3
        evidence = None
        if scored.logical is not None:
            evidence = {"structural": round(scored.structural, 4), "logical": round(scored.logical, 4),
                        "components": scored.component_areas}
        return InspectionResult(
            score=scored.score, verdict="fail" if fail else "pass", threshold=self.threshold,
            heatmap=heatmap, regions=regions, timings_ms=timings,
            over_budget=timings["total"] > self.budget_ms, evidence=evidence,
        )

    def inspect(self, image_rgb: np.ndarray) -> InspectionResult:
        return self.conclude(self.extract(image_rgb))


def open_inspector(bundle_path, threads: int | None = None, engine: str = "cpu", device: str = "CPU") -> Inspector:
    """Load, verify and smoke-run a bundle before trusting it with frames.

    Hashes and arrays are checked by :func:`load_bundle`; here each graph is loaded by the ``engine`` asked for
    (``auto``: see :func:`~edge_runtime.core.engines.select_engines`) and run once on a blank input and its
    outputs are checked against the manifest.  Any failure is a :class:`BundleError` naming the graph (or
    ``engine`` when the engine cannot run here), so a caller (the CLI, a service reload) can refuse the bundle
    and keep its old one.
    """
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    try:
        engines = select_engines(bundle, engine, threads=threads, device=device)
    except EngineUnavailable as exc:
        raise BundleError("engine", f"{engine}: {exc}") from exc
    except EngineError as exc:  # the message starts with the graph's file name
        graph, _, problem = str(exc).partition(": ")
        raise BundleError(graph if graph.endswith(".onnx") else BACKBONE, problem or str(exc)) from exc
    inspector = Inspector(bundle, threads=threads, engines=engines)
    probe = np.zeros((*m.preprocessing.input_size, 3), dtype=np.uint8)
    try:
        pcf, descriptor = inspector.features(probe)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(engines.graphs["backbone"], f"does not run on a {probe.shape} input ({exc})") from exc
    n_tokens = m.backbone.grid[0] * m.backbone.grid[1]
    if pcf.shape != (n_tokens, m.backbone.d_f):
        raise BundleError(BACKBONE, f"outputs pcf {pcf.shape}, manifest implies {(n_tokens, m.backbone.d_f)}")
    cells = m.backbone.descriptor_grid[0] * m.backbone.descriptor_grid[1]
    if descriptor.shape != (cells, m.backbone.descriptor_channels):
        raise BundleError(BACKBONE, f"outputs descriptor {descriptor.shape}, manifest implies "
                                    f"{(cells, m.backbone.descriptor_channels)}")
    if engines.swin is not None:
        swin_file = engines.graphs.get("swin", SWIN)
        try:
            prob = SwinClassifier(engines.swin)(np.zeros((n_tokens, m.backbone.d_f), dtype=np.float32))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(swin_file, f"does not run on residual tokens ({n_tokens}, {m.backbone.d_f}) "
                                         f"({exc})") from exc
        if prob.shape != (n_tokens,) or not np.all((prob >= 0) & (prob <= 1)):
            raise BundleError(swin_file, f"outputs {prob.shape} probabilities, expected {n_tokens} values in [0, 1]")
    return inspector
