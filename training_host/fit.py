"""Fit a product: good images -> features -> coreset bank, PCA, references, threshold -> bundle."""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import edge_runtime
from edge_runtime.core import bundle as B
from edge_runtime.core.fitting import BankBuilder, FittedPosFAR, split_holdout
from edge_runtime.core.scoring import choose_threshold

from .config import ProductConfig
from .data import load_batch, scan_dataset
from .export import export_backbone
from .features import PatchFeatureExtractor, build_extractor, extract


@dataclass
class FitSummary:
    bundle: Path
    n_train: int
    n_holdout: int
    n_bank: int
    d_f: int
    d_l: int
    threshold: float
    onnx_max_abs_diff: float
    bundle_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "bundle"}
        out["bundle"] = str(self.bundle)
        return out


def _batches(paths: list[Path], size: int):
    for lo in range(0, len(paths), size):
        yield paths[lo : lo + size]


def _features(extractor: PatchFeatureExtractor, paths: list[Path], cfg: ProductConfig, desc: str,
              skipped: list[str], progress: bool):
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    for chunk in _batches(paths, cfg.batch_size):
        batch, ok, errors = load_batch(chunk, cfg.input_size)
        skipped.extend(errors)
        if len(ok):
            pcf, descriptor = extract(extractor, batch)
            yield pcf, descriptor
        bar.update(len(chunk))
    bar.close()


def producer_versions() -> dict[str, str]:
    import onnx

    return {"weakrest": edge_runtime.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def fit_product(cfg: ProductConfig, data_root: Path, out: Path, progress: bool = True) -> FitSummary:
    """Train the PosFAR bundle of one product from ``data_root/train/good``."""
    torch.manual_seed(cfg.seed)
    dataset = scan_dataset(data_root)
    bank_paths, holdout_paths = split_holdout(dataset.train, cfg.threshold.holdout_fraction, cfg.seed)
    seconds: dict[str, float] = {}
    skipped: list[str] = []

    t0 = time.perf_counter()
    extractor = build_extractor(cfg.backbone, cfg.input_size, cfg.posfar.lambda_p)
    builder = BankBuilder(cfg.posfar.coreset_ratio, cfg.posfar.projection_dim, cfg.seed)
    for pcf, descriptor in _features(extractor, bank_paths, cfg, "bank images", skipped, progress):
        builder.add(pcf, descriptor)
    fitted: FittedPosFAR = builder.build(cfg.posfar.d_l, cfg.posfar.pca_variance)
    seconds["bank"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    scorer = fitted.scorer(cfg.posfar.k_references, extractor.grid, cfg.input_size, cfg.posfar.retrieval_trim,
                           cfg.scoring.blur_sigma, cfg.scoring.score_pool)
    holdout_scores = []
    for pcf, descriptor in _features(extractor, holdout_paths, cfg, "hold-out images", skipped, progress):
        holdout_scores.extend(scorer.score(p, d).score for p, d in zip(pcf, descriptor, strict=True))
    choice = choose_threshold(np.array(holdout_scores), cfg.threshold.target_false_reject, cfg.threshold.margin)
    seconds["threshold"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / B.BACKBONE
        diff = export_backbone(extractor, onnx_path)
        manifest = B.Manifest(
            schema_version=B.SCHEMA_VERSION,
            product=cfg.product,
            bundle_version=time.strftime("%Y%m%d-%H%M%S"),
            created_at=B.now_iso(),
            producer=producer_versions(),
            preprocessing=B.Preprocessing(input_size=cfg.input_size, mean=tuple(extractor.mean.flatten().tolist()),
                                          std=tuple(extractor.std.flatten().tolist())),
            backbone=B.BackboneInfo(name=cfg.backbone.name, layers=cfg.backbone.layers, d_f=extractor.d_f,
                                    grid=extractor.grid, stride=extractor.stride,
                                    descriptor_grid=extractor.descriptor_grid,
                                    descriptor_channels=extractor.descriptor_channels,
                                    lambda_p=cfg.posfar.lambda_p),
            posfar=B.PosFARInfo(d_l=fitted.pca.dim, k_references=cfg.posfar.k_references,
                                retrieval_trim=cfg.posfar.retrieval_trim, thetas=cfg.posfar.thetas,
                                coreset_ratio=cfg.posfar.coreset_ratio,
                                n_reference_images=int(fitted.descriptors.shape[0]),
                                n_bank=int(fitted.bank.shape[0])),
            scoring=B.ScoringInfo(blur_sigma=cfg.scoring.blur_sigma, score_pool=cfg.scoring.score_pool),
            thresholds=B.Thresholds(image=choice.threshold, pixel=choice.threshold, n_holdout_images=choice.n_images,
                                    target_false_reject=choice.target_false_reject, margin=choice.margin),
            latency_budget_ms=cfg.latency_budget_ms,
        )
        B.write_bundle(out, manifest, {B.BACKBONE: onnx_path}, fitted.arrays())
    seconds["export"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    return FitSummary(bundle=Path(out), n_train=builder.n_images, n_holdout=choice.n_images,
                      n_bank=int(fitted.bank.shape[0]), d_f=extractor.d_f, d_l=fitted.pca.dim,
                      threshold=choice.threshold, onnx_max_abs_diff=diff, bundle_bytes=size,
                      seconds={k: round(v, 2) for k, v in seconds.items()}, skipped=skipped)
