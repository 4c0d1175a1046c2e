"""Evaluate a bundle on a dataset's test split through the edge runtime's own inference path.

Writes ``metrics.json`` (image AUROC, pixel AUROC, PRO up to FPR 0.3, pixel AP, overall and per defect
type), ``curves.png`` (ROC / PR / PRO) and, on request, heatmap overlays.  Metrics are computed on the
bundle's input-size maps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from edge_runtime.core.bundle import load_bundle
from edge_runtime.core.overlay import heatmap_overlay
from edge_runtime.core.pipeline import Inspector
from edge_runtime.core.preprocess import ImageReadError, read_image

from .data import load_mask, scan_dataset
from .metrics import evaluate_maps, save_curve_plot


def evaluate_bundle(bundle_path: Path, data_root: Path, out: Path, overlays: int = 0,
                    progress: bool = True) -> dict:
    """Run every test image through the bundle; return and write the metrics."""
    bundle = load_bundle(bundle_path)
    inspector = Inspector(bundle)
    dataset = scan_dataset(data_root)
    if not dataset.test:
        raise FileNotFoundError(f"{data_root}: no test images to evaluate on")
    out.mkdir(parents=True, exist_ok=True)
    hw = inspector.input_hw
    maps, masks, scores, labels, types, errors, latencies = [], [], [], [], [], [], []
    n_overlays: dict[str, int] = {}
    for sample in tqdm(dataset.test, desc="evaluating", unit="img", disable=not progress):
        try:
            image = read_image(sample.path)
            mask = load_mask(sample, hw)
        except ImageReadError as exc:
            errors.append(str(exc))
            continue
        result = inspector.inspect(image)
        maps.append(result.heatmap.astype(np.float32))
        masks.append(mask)
        scores.append(result.score)
        labels.append(sample.is_defective)
        types.append(sample.defect_type)
        latencies.append(result.timings_ms["total"])
        if n_overlays.get(sample.defect_type, 0) < overlays:
            n_overlays[sample.defect_type] = n_overlays.get(sample.defect_type, 0) + 1
            pic = heatmap_overlay(image, result.heatmap, inspector.threshold, regions=result.regions)
            (out / "overlays").mkdir(exist_ok=True)
            cv2.imwrite(str(out / "overlays" / f"{sample.defect_type}_{sample.path.stem}.png"), pic)
    maps_a, masks_a = np.stack(maps), np.stack(masks)
    labels_a, scores_a = np.array(labels), np.array(scores)
    metrics = evaluate_maps(labels_a, scores_a, masks_a, maps_a, types)
    predicted = scores_a >= inspector.threshold
    m = bundle.manifest
    metrics.update({
        "bundle": str(bundle_path), "product": m.product, "bundle_version": m.bundle_version,
        "anomaly_map": m.scoring.anomaly_map, "supervision": "unsupervised (good images only)",
        "threshold": inspector.threshold,
        "at_threshold": {"false_reject_rate": float(predicted[~labels_a].mean()) if (~labels_a).any() else None,
                         "detection_rate": float(predicted[labels_a].mean()) if labels_a.any() else None},
        "latency_ms_p50": float(np.median(latencies)), "errors": errors,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    save_curve_plot(labels_a, scores_a, masks_a, maps_a, out / "curves.png", title=f"{m.product} {m.bundle_version}")
    return metrics
