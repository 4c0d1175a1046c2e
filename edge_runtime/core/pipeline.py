"""The per-frame inspection pipeline: image -> backbone -> retrieval -> matching -> heatmap -> verdict.

:class:`PosFARScorer` is the torch-free math from patch features to an anomaly map and score; the
training host and the calibration tool use it to score held-out images exactly as the edge will.
:class:`Inspector` wraps it with the backbone engine and stage timings for the runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .bundle import Bundle
from .engines import Engine, OnnxRuntimeEngine
from .matching import MemoryBank
from .pca import PCA
from .preprocess import to_input_tensor
from .retrieval import ReferenceIndex
from .scoring import Region, defect_regions, heatmap_from_blocks, image_score


@dataclass
class Scored:
    """Anomaly evidence for one image at the backbone's input size."""

    block_map: np.ndarray  # (h_f, w_f) float32
    heatmap: np.ndarray  # (H, W) float32
    score: float
    references: np.ndarray  # indices of the K retrieved training images
    timings_ms: dict[str, float] = field(default_factory=dict)


class PosFARScorer:
    """Nearest-normal-patch scoring restricted to the K retrieved reference images."""

    def __init__(self, bank: MemoryBank, references: ReferenceIndex, k: int, grid: tuple[int, int],
                 input_hw: tuple[int, int], blur_sigma: float = 4.0, score_pool: int = 8) -> None:
        self.bank = bank
        self.references = references
        self.k = k
        self.grid = grid
        self.input_hw = input_hw
        self.blur_sigma = blur_sigma
        self.score_pool = score_pool

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> PosFARScorer:
        m, a = bundle.manifest, bundle.arrays
        pca = PCA(components=a["pca_components"], mean=a["pca_mean"])
        bank = MemoryBank(a["bank"].astype(np.float32), a["bank_image"], pca)
        refs = ReferenceIndex(a["ref_descriptors"].astype(np.float32), trim=m.posfar.retrieval_trim)
        return cls(bank, refs, m.posfar.k_references, tuple(m.backbone.grid), tuple(m.preprocessing.input_size),
                   m.scoring.blur_sigma, m.scoring.score_pool)

    def score(self, pcf: np.ndarray, descriptor: np.ndarray, exclude: int | None = None) -> Scored:
        """pcf: (M, d_f) patch features; descriptor: (cells, C).  ``exclude`` leaves one image out."""
        t0 = time.perf_counter()
        refs = self.references.nearest(descriptor, self.k, exclude=exclude)
        t1 = time.perf_counter()
        match = self.bank.match(pcf, refs)
        t2 = time.perf_counter()
        block_map = match.distance.reshape(self.grid)
        heatmap = heatmap_from_blocks(block_map, self.input_hw, self.blur_sigma)
        score = image_score(heatmap, self.score_pool)
        t3 = time.perf_counter()
        timings = {"retrieval": (t1 - t0) * 1e3, "matching": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        return Scored(block_map=block_map, heatmap=heatmap, score=score, references=refs, timings_ms=timings)


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

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "score": round(self.score, 6),
            "threshold": round(self.threshold, 6),
            "regions": [r.to_json() for r in self.regions],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "over_budget": self.over_budget,
        }


class Inspector:
    """Loads the engines of a verified bundle and inspects decoded RGB images."""

    def __init__(self, bundle: Bundle, backbone: Engine | None = None, threads: int | None = None) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.input_hw = tuple(m.preprocessing.input_size)
        self.scale = m.preprocessing.scale
        self.backbone = backbone or OnnxRuntimeEngine(bundle.backbone_path, threads=threads)
        self.scorer = PosFARScorer.from_bundle(bundle)
        self.threshold = m.thresholds.image
        self.pixel_threshold = m.thresholds.pixel
        self.budget_ms = m.latency_budget_ms

    def features(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backbone outputs for one image: PCFs (M, d_f) and the retrieval descriptor (cells, C)."""
        out = self.backbone.run({"image": to_input_tensor(image_rgb, self.input_hw, self.scale)})
        return out["pcf"][0], out["descriptor"][0]

    def inspect(self, image_rgb: np.ndarray) -> InspectionResult:
        t0 = time.perf_counter()
        tensor = to_input_tensor(image_rgb, self.input_hw, self.scale)
        t1 = time.perf_counter()
        out = self.backbone.run({"image": tensor})
        t2 = time.perf_counter()
        scored = self.scorer.score(out["pcf"][0], out["descriptor"][0])
        fail = scored.score >= self.threshold
        regions = defect_regions(scored.heatmap, self.pixel_threshold) if fail else []
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "backbone": (t2 - t1) * 1e3, **scored.timings_ms}
        timings["postprocess"] += (t3 - t2) * 1e3 - sum(scored.timings_ms.values())
        timings["total"] = (t3 - t0) * 1e3
        return InspectionResult(
            score=scored.score, verdict="fail" if fail else "pass", threshold=self.threshold,
            heatmap=scored.heatmap, regions=regions, timings_ms=timings,
            over_budget=timings["total"] > self.budget_ms,
        )
