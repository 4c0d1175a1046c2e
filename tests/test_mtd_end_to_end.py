"""End to end on real factory images (../shared/data/mtd): fit the fast profile (bank + residual Swin) on a
quarter of the training images with a shorter Swin schedule, evaluate on the whole test split against the
distance baseline, inspect.

The full fit (762 images, 3000 steps) takes about 8 minutes on 2 cores: its figures come from
``make bench-mtd``, not from the test suite, which must stay well under 10 minutes.  Skips with a message
when ../shared/data is absent (a user's fresh clone).  The floors are regression guards
set below the figures measured on this subset (200 images, 1000 steps, the fast profile's fused map with the
verdict on the distance: 0.859 / 0.802 / 0.750 / 0.272 image AUROC / pixel AUROC / PRO / pixel AP; the
distance alone 0.859 / 0.798 / 0.731 / 0.273), not the targets themselves.
"""

from __future__ import annotations

import json

import pytest

from edge_runtime import cli as edge_cli
from training_host.config import load_config
from training_host.data.dataset import subset_dataset
from training_host.evaluation.evaluate import evaluate_bundle
from training_host.training.fit import fit_product

from .conftest import REPO, require_mtd

N_TRAIN, STEPS = 200, 1000
FLOORS = {"image_auroc": 0.80, "pixel_auroc": 0.75, "pro": 0.68, "pixel_ap": 0.22}


@pytest.fixture(scope="module")
def mtd_bundle(tmp_path_factory):
    data = subset_dataset(require_mtd(), tmp_path_factory.mktemp("mtd") / "data", N_TRAIN)
    cfg = load_config(REPO / "configs" / "products" / "fast.yaml").model_copy(update={"product": "mtd"})
    cfg = cfg.model_copy(update={"swin": cfg.swin.model_copy(update={"steps": STEPS, "synthetic_per_image": 1})})
    out = tmp_path_factory.mktemp("mtd") / "bundle"
    summary = fit_product(cfg, data, out, progress=False)
    return data, out, summary


def test_mtd_fit_is_complete_and_small(mtd_bundle):
    _, out, summary = mtd_bundle
    assert summary.n_train + summary.n_holdout == N_TRAIN and not summary.skipped
    assert summary.bundle_bytes < 50e6
    assert summary.anomaly_map == "fused" and summary.swin["onnx_max_abs_diff"] < 1e-4
    est = summary.threshold_estimate
    assert est["n_scores"] == summary.n_holdout + summary.n_train == est["n_holdout_images"] + est["n_leave_one_out"]
    assert 0 < est["frr_upper95"] < 1


def test_mtd_metrics(mtd_bundle, tmp_path):
    data, out, _ = mtd_bundle
    metrics = evaluate_bundle(out, data, tmp_path / "eval", progress=False)
    assert metrics["anomaly_map"] == "fused" and metrics["image_score"] == "reference_standardised"
    assert set(metrics["per_defect"]) == {"blowhole", "break", "crack", "fray", "uneven"}
    assert metrics["pixel_auroc"] > FLOORS["pixel_auroc"] and metrics["pro"] > FLOORS["pro"]
    assert metrics["image_auroc"] > FLOORS["image_auroc"] and metrics["pixel_ap"] > FLOORS["pixel_ap"]
    assert metrics["at_threshold"]["false_reject_rate"] < 0.2
    assert [d["false_reject_rate"] for d in metrics["detection_at_frr"]] == [0.005, 0.01, 0.02]
    # the final map must never localise worse than the distance it starts from, and the verdict is the
    # distance's: same image scores (the floors leave room for run-to-run noise of the Swin)
    baseline = evaluate_bundle(out, data, tmp_path / "nn", progress=False, anomaly_map="nn_distance",
                               image_score="reference_standardised")
    assert metrics["image_auroc"] == pytest.approx(baseline["image_auroc"], abs=1e-9)
    assert metrics["pixel_ap"] > baseline["pixel_ap"] - 0.01 and metrics["pro"] > baseline["pro"] - 0.02


def test_mtd_inspect_cli(mtd_bundle, tmp_path):
    data, out, _ = mtd_bundle
    images = data / "test" / "crack"
    assert edge_cli.main(["inspect", "--bundle", str(out), "--images", str(images), "--out", str(tmp_path),
                          "--heatmaps", "fail", "--quiet"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 25 and all(r["verdict"] in ("pass", "fail") for r in rows)
