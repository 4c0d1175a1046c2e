"""Evaluate a bundle on a dataset's test split through the edge runtime's own inference path.

Writes ``metrics.json`` (image AUROC, pixel AUROC, PRO up to FPR 0.3, pixel AP, overall and per defect
type; the bundle threshold's false-reject and detection rates with their 95 % bounds, and the detection
rate at the thresholds that reject 0.5 / 1 / 2 % of the good test images, overall and per defect type),
``curves.png`` (ROC / PR / PRO), ``report.html`` (all of it on one self-contained page, with the worst misses
and false alarms: :mod:`edge_runtime.reporting.report_html`) and, on request, heatmap overlays.  Metrics are
computed on the bundle's input-size maps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from edge_runtime.core.bundle import load_bundle, sha256_of
from edge_runtime.core.overlay import heatmap_overlay
from edge_runtime.core.pipeline import Inspector
from edge_runtime.core.preprocess import ImageReadError, read_image
from edge_runtime.core.thresholds import detection_at_false_reject, rate_lower_bound, rate_upper_bound
from edge_runtime.reporting.report_html import Curve, WorstFrames, render_evaluation_report, write_html
from training_host.data.dataset import load_mask, scan_dataset
from training_host.evaluation.metrics import (
    _MAX_PLOT_POINTS,
    _curve_up_to,
    _subsample,
    evaluate_maps,
    pr_curve,
    pro_curve,
    roc_curve,
    save_curve_plot,
)

GALLERY_SIZE = 6  # worst misses and worst false alarms in report.html: enough to see a pattern, a few MB at most


def curve_data(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, metrics: dict,
               max_fpr: float = 0.3) -> list[Curve]:
    """The curves of ``curves.png`` (image ROC, pixel PR, PRO up to ``max_fpr``) as arrays for report.html,
    from the same functions and subsampling; the areas written on them are ``metrics``' own numbers."""
    def safe(func, *args):
        try:
            return func(*args)
        except ValueError:  # undefined on this data (one class only, no defect pixel)
            return np.empty(0), np.empty(0)

    fpr, tpr = safe(roc_curve, labels, scores)
    precision, recall = safe(pr_curve, masks, maps)
    pro_fpr, pro = safe(pro_curve, masks, maps)
    if pro_fpr.size:
        pro_fpr, pro = _curve_up_to(pro_fpr, pro, max_fpr)
        idx = _subsample(pro_fpr.size, _MAX_PLOT_POINTS)
        pro_fpr, pro = pro_fpr[idx], pro[idx]

    def note(name: str, key: str) -> str:
        return f"{name} = {metrics[key]:.4f}" if metrics.get(key) is not None else f"{name} n/a"

    return [Curve("Image ROC", fpr, tpr, "false-positive rate (good images)", "true-positive rate",
                  note=note("AUROC", "image_auroc"), diagonal=True),
            Curve("Pixel PR", recall, precision, "recall (defect pixels)", "precision", note=note("AP", "pixel_ap"),
                  step=True),
            Curve(f"PRO (FPR ≤ {max_fpr:g})", pro_fpr, pro, "false-positive rate (pixels)", "per-region overlap",
                  xlim=(0.0, max_fpr), note=note("PRO-AUC", "pro"))]


def scored_test_split(bundle, data_root: Path, also_exclude: set[str] | frozenset[str] = frozenset()):
    """The dataset with its test split less the defective images the bundle was trained on (listed with their
    sha256 in its manifest) and ``also_exclude``; and the left-out images' relative paths."""
    dataset = scan_dataset(data_root)
    m = bundle.manifest
    left_out = ({d.sha256 for d in m.training.defect_images} if m.training else set()) | set(also_exclude)
    excluded = []
    if left_out:
        kept = []
        for sample in dataset.test:
            if sample.is_defective and sha256_of(sample.path) in left_out:
                excluded.append(str(sample.path.relative_to(dataset.root)))
            else:
                kept.append(sample)
        dataset.test = kept
    return dataset, excluded


def evaluate_bundle(bundle_path: Path, data_root: Path, out: Path, overlays: int = 0, progress: bool = True,
                    anomaly_map: str | None = None, use_foreground: bool = True, logical_verdict: str = "fused",
                    also_exclude: set[str] | frozenset[str] = frozenset(), fusion_rule: str | None = None,
                    image_score: str | None = None, engine: str = "cpu", refine: bool = True,
                    frame_shift: int | None = None, swin_share: float | None = None,
                    swin_excess: float | None = None, distance_excess: float | None = None) -> dict:
    """Run every test image through the bundle; return and write the metrics.

    Defective images the bundle was trained on (listed with their sha256 in its manifest) are left out,
    so a supervised bundle is never scored on its own training defects; ``also_exclude`` (sha256s) leaves
    out more, so that models compared in one table are scored on the same images.
    """
    bundle = load_bundle(bundle_path)
    inspector = Inspector(bundle, anomaly_map=anomaly_map, use_foreground=use_foreground,
                          logical_verdict=logical_verdict,
                          fusion_rule=fusion_rule,
                          image_score=image_score, engine=engine, refine=refine, frame_shift=frame_shift,
                          swin_share=swin_share, swin_excess=swin_excess, distance_excess=distance_excess)
    m = bundle.manifest
    dataset, excluded = scored_test_split(bundle, data_root, also_exclude)
    if not dataset.test:
        raise FileNotFoundError(f"{data_root}: no test images to evaluate on")
    out.mkdir(parents=True, exist_ok=True)
    hw = inspector.input_hw
    maps, masks, scores, labels, types, errors, latencies = [], [], [], [], [], [], []
    n_overlays: dict[str, int] = {}
    worst = WorstFrames(GALLERY_SIZE)
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
        worst.offer(str(sample.path.relative_to(dataset.root)), sample.defect_type, sample.is_defective, result.score,
                    image, result.heatmap, inspector.threshold, inspector.threshold, mask=mask, regions=result.regions)
        if n_overlays.get(sample.defect_type, 0) < overlays:
            n_overlays[sample.defect_type] = n_overlays.get(sample.defect_type, 0) + 1
            pic = heatmap_overlay(image, result.heatmap, inspector.threshold, regions=result.regions)
            (out / "overlays").mkdir(exist_ok=True)
            cv2.imwrite(str(out / "overlays" / f"{sample.defect_type}_{sample.path.stem}.png"), pic)
    maps_a, masks_a = np.stack(maps), np.stack(masks)
    labels_a, scores_a = np.array(labels), np.array(scores)
    metrics = evaluate_maps(labels_a, scores_a, masks_a, maps_a, types)
    # the bundle's threshold belongs to its own anomaly map; with another map there is no verdict to report
    own_rule = inspector.fusion is None or m.scoring.fusion is None or (
        inspector.fusion.rule == m.scoring.fusion.rule and inspector.fusion.swin_weight == m.scoring.fusion.weight
        and inspector.fusion.swin_excess == m.scoring.fusion.swin_excess_weight
        and inspector.fusion.distance_excess == m.scoring.fusion.distance_excess_weight)
    own_map = (inspector.anomaly_map == m.scoring.anomaly_map and (use_foreground or m.foreground is None)
               and (logical_verdict == "fused" or m.logical is None)
               and own_rule and inspector.image_score == m.scoring.image_score
               and inspector.frame_shift == (m.scoring.frame_shift or 0))  # the threshold is on the bundle's scores
    predicted = scores_a >= inspector.threshold
    at_threshold = None
    good, bad = ~labels_a, labels_a
    if own_map:
        k_good, n_good = int(predicted[good].sum()), int(good.sum())
        k_bad, n_bad = int(predicted[bad].sum()), int(bad.sum())
        at_threshold = {
            "false_reject_rate": k_good / n_good if n_good else None,
            "false_reject_upper95": rate_upper_bound(k_good, n_good) if n_good else None,
            "detection_rate": k_bad / n_bad if n_bad else None,
            "detection_lower95": rate_lower_bound(k_bad, n_bad) if n_bad else None,
            "n_good": n_good, "n_defective": n_bad,
        }
    detection_at_frr = (detection_at_false_reject(scores_a[good], scores_a[bad])
                        if good.any() and bad.any() else None)
    types_a = np.array(types)
    for name, row in metrics["per_defect"].items():  # the good images against this type's, as its other metrics
        row["detection_at_frr"] = (detection_at_false_reject(scores_a[good], scores_a[types_a == name])
                                   if good.any() else None)
    supervision = m.training.supervision if m.training else "none: nearest-normal distance from good images"
    if inspector.anomaly_map == "nn_distance" and m.scoring.anomaly_map != "nn_distance":
        supervision = "none: nearest-normal distance from good images (bundle's Swin not used)"
    metrics.update({
        "bundle": str(bundle_path), "data": str(Path(data_root).resolve()), "product": m.product,
        "bundle_version": m.bundle_version,
        "anomaly_map": inspector.anomaly_map,
        "fusion_rule": inspector.fusion.rule if inspector.fusion is not None else None,
        "fusion_swin_share": inspector.fusion.swin_weight if inspector.fusion is not None else None,
        "fusion_swin_excess": inspector.fusion.swin_excess if inspector.fusion is not None else None,
        "fusion_distance_excess": inspector.fusion.distance_excess if inspector.fusion is not None else None,
        "image_score": inspector.image_score,
        "heatmap_refined": inspector.refiner is not None,
        "frame_shift": inspector.frame_shift,
        "defect_bank_blocks": (len(inspector.scorer.defect_bank.features)
                               if inspector.scorer.defect_bank is not None else None),
        "engine": inspector.engines.name if inspector.engines is not None else None,
        "foreground": bool(m.foreground is not None and use_foreground),
        "logical_verdict": inspector.logical_verdict if m.logical is not None else None,
        "supervision": supervision, "training_mode": m.training.mode if m.training else None,
        "excluded_training_defects": excluded,
        "threshold": inspector.threshold if own_map else None,
        "at_threshold": at_threshold,
        "detection_at_frr": detection_at_frr,
        "latency_ms_p50": float(np.median(latencies)), "errors": errors,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    save_curve_plot(labels_a, scores_a, masks_a, maps_a, out / "curves.png", title=f"{m.product} {m.bundle_version}")
    h, w = hw
    facts = [("product", m.product), ("bundle version", m.bundle_version), ("bundle", str(Path(bundle_path).resolve())),
             ("bundle configuration", f"{m.backbone.name} layers {m.backbone.layers}, input {h}×{w}, "
                                      + (f"residual Swin (depth {m.swin.depth})" if m.swin else "distance only")
                                      + (f", trained {m.training.mode}" if m.training else "")),
             ("map evaluated", f"{inspector.anomaly_map}, image score from {inspector.image_score}"
                               + (f", fusion {metrics['fusion_rule']} (the Swin's share "
                                  f"{metrics['fusion_swin_share']:g}"
                                  + (f", its excess over 1 times {metrics['fusion_swin_excess']:g}"
                                     if metrics["fusion_swin_excess"] else "")
                                  + (f", the distance's excess over 1 times {metrics['fusion_distance_excess']:g}"
                                     if metrics["fusion_distance_excess"] else "") + ")"
                                  if metrics["fusion_rule"] else "")
                               + (f", the distance raised near {metrics['defect_bank_blocks']} labelled defect blocks"
                                  if metrics["defect_bank_blocks"] else "")
                               + (", heatmap refined by the frame" if inspector.refiner is not None else "")
                               + (f", heatmap and score averaged over the frame shifted by "
                                  f"{metrics['frame_shift']} px" if metrics["frame_shift"] else "")),
             ("supervision", supervision), ("data", metrics["data"]), ("evaluated at", metrics["evaluated_at"]),
             ("threshold", f"{inspector.threshold:.6g} (bundle, target false-reject rate "
                           f"{m.thresholds.target_false_reject:.2%})" if own_map else "none for this map"),
             ("test images", f"{len(scores)} ({int(bad.sum())} defective)"
                             + (f", {len(excluded)} training defects left out" if excluded else "")
                             + (f", {len(errors)} unreadable" if errors else "")),
             ("latency p50", f"{metrics['latency_ms_p50']:.1f} ms per image")]
    page = render_evaluation_report(metrics, curve_data(labels_a, scores_a, masks_a, maps_a, metrics),
                                    scores_a[good], scores_a[bad], worst.misses, worst.false_alarms, facts)
    write_html(out / "report.html", page)
    return metrics
