"""Weak mode end to end on the demo product: labels derived from masks, ResMixMatch fit, evaluation, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.core.bundle import load_bundle
from edge_runtime.core.pipeline import Inspector
from edge_runtime.core.preprocess import read_image
from training_host import cli as train_cli
from training_host.evaluation.evaluate import evaluate_bundle
from training_host.labels.weak_labels import box_blocks, load_labels
from training_host.training.residual_data import BOX_BANK_LEVEL

SMALL = ["--set", "input_size=[128,128]", "--set", "posfar.d_l=16", "--set", "posfar.k_references=8",
         "--set", "threshold.holdout_fraction=0.2", "--set", "swin.steps=40", "--set", "swin.synthetic_per_image=1",
         "--set", "swin.batch_size=8", "--set", "weak.steps=30", "--set", "weak.rampup_steps=10"]


@pytest.fixture(scope="module")
def box_labels(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "boxes.json"
    assert train_cli.main(["labels", "from-masks", "--data", str(demo_data), "--kind", "boxes", "--n-defects", "4",
                           "--seed", "2", "--jitter", "3", "--out", str(out)]) == 0
    return out


def test_labels_stats_and_derivation(demo_data, box_labels, tmp_path, capsys):
    capsys.readouterr()
    assert train_cli.main(["labels", "stats", str(box_labels), "--root", str(demo_data), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"]["boxes"] == 4 and stats["counts"]["total"] == 4
    for kind in ("rotated_boxes", "tag", "blocks"):
        out = tmp_path / f"{kind}.json"
        assert train_cli.main(["labels", "from-masks", "--data", str(demo_data), "--kind", kind,
                               "--n-defects", "4", "--seed", "2", "--grid", "16", "16", "--out", str(out)]) == 0
        assert train_cli.main(["labels", "stats", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["counts"][kind] == 4


def test_weak_fit_learns_from_boxes_and_evaluation_leaves_them_out(demo_data, box_labels, tmp_path, capsys):
    out = tmp_path / "weak"
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(out), "--mode", "weak",
                           "--labels", str(box_labels), "--json", *SMALL,
                           "--set", "scoring.fusion=mean", "--set", "scoring.defect_bank_boost=1.0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [p["phase"] for p in summary["swin"]["phases"]] == ["unsupervised", "weak"]
    m = load_bundle(out).manifest
    assert m.training.mode == "weak" and len(m.training.defect_images) == 4
    assert "4 weakly labelled defective images (4 boxes; ResMixMatch)" in m.training.supervision
    metrics = evaluate_bundle(out, demo_data, tmp_path / "eval", progress=False)
    assert len(metrics["excluded_training_defects"]) == 4 and metrics["supervision"] == m.training.supervision
    # the defect bank: of each box's own blocks, those the trained Swin is surer of than BOX_BANK_LEVEL x its scale on
    # held-out good blocks (at least the box's surest), each row one of those blocks' features
    bundle = load_bundle(out)
    bank = bundle.arrays["defect_bank"].astype(np.float32)
    assert m.scoring.defect_bank.blocks == len(bank) and 1 <= m.scoring.defect_bank.images <= 4
    assert metrics["defect_bank_blocks"] == len(bank)
    inspector = Inspector(bundle)
    level = BOX_BANK_LEVEL * m.scoring.fusion.swin_scale
    labels = load_labels(box_labels, root=demo_data)
    candidates, expected = [], 0
    for key, label in labels.images.items():
        image = read_image(demo_data / key)
        pcf, descriptor = inspector.features(image)
        probability = inspector.scorer.evidence(pcf, descriptor).probability
        chosen = set()
        for inside in box_blocks(label, image.shape[:2], m.backbone.grid):
            own = np.flatnonzero(inside.ravel())
            candidates.append(pcf[own])
            sure = own[probability[own] >= level]
            chosen |= set(sure.tolist()) if len(sure) else {int(own[np.argmax(probability[own])])}
        expected += len(chosen)
    candidates = np.concatenate(candidates)
    assert len(bank) == expected
    nearest = np.linalg.norm(bank[:, None, :] - candidates[None], axis=2).min(1)
    assert np.all(nearest <= 1e-2 * np.linalg.norm(bank, axis=1))


def test_bad_label_file_is_refused_before_any_work(demo_data, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "images": {
        "test/scratch/000.png": {"boxes": [[10, 10, -3, 5]]},
        "test/nowhere/001.png": {"tag": "bad"},
        "test/stain/000.png": {"tag": 123},
    }}))
    capsys.readouterr()
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "b"), "--mode", "weak",
                           "--labels", str(bad), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "test/scratch/000.png" in err and "width" in err
    assert "test/nowhere/001.png" in err and "test/stain/000.png" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.ckpt").exists()
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "b"), "--mode", "weak"]) == 2
    assert "--labels" in capsys.readouterr().err
