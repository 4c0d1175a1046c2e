"""tools/sweep.py on the small demo product: variants share cached stages, one table comes out, a rerun keeps
what was done."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_tool", REPO / "tools" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_runs_variants_writes_the_table_and_resumes(tmp_path, demo_data, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "product": "tiny", "input_size": [64, 64], "posfar": {"d_l": 8, "k_references": 4},
        "threshold": {"holdout_fraction": 0.2}, "batch_size": 8,
        "swin": {"steps": 4, "synthetic_per_image": 1, "batch_size": 4, "checkpoint_every": 100, "warmup_steps": 2,
                 "train_window": 8, "window_stride": 8}}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"config": str(config), "data": str(demo_data),
                                    "variants": {"base": []}, "axes": {"swin.steps": [6]}}))
    sweep = _sweep_module()
    out = tmp_path / "sweep"
    assert sweep.main(["--grid", str(grid), "--out", str(out), "--frames", "3"]) == 0
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["variant"] for r in rows] == ["base", "base: nn_distance", "swin.steps=6"]
    for r in rows:
        assert 0.0 <= float(r["image_auroc"]) <= 1.0 and 0.0 <= float(r["pixel_ap"]) <= 1.0
        assert {"det@frr0.005", "det@frr0.02"} <= set(r)
    assert float(rows[0]["frame_ms_p50"]) > 0 and float(rows[0]["frame_over_backbone"]) > 1.0
    assert any(k.endswith("_ap") and k != "pixel_ap" for k in rows[0])  # per defect type
    assert "| variant |" in (out / "table.md").read_text()
    # the second variant changed only the Swin's training: the residual fields came from the cache
    assert len(list((out / "cache" / "residuals").iterdir())) == 1
    capsys.readouterr()
    assert sweep.main(["--grid", str(grid), "--out", str(out), "--frames", "3"]) == 0
    assert capsys.readouterr().out.count("kept from") == 2
    # a map the kept variants lack is evaluated from their bundles, without fitting them again
    assert sweep.main(["--grid", str(grid), "--out", str(out), "--frames", "3", "--maps", "fused:mean@distance"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("evaluating fused:mean@distance") == 2 and "swin.steps=6: swin.steps=6" not in printed
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert "base: fused:mean@distance" in [r["variant"] for r in rows]
    nn = next(r for r in rows if r["variant"] == "base: nn_distance")
    mixed = next(r for r in rows if r["variant"] == "base: fused:mean@distance")
    assert mixed["image_auroc"] == nn["image_auroc"]  # the verdict's score is the distance map's
    # a distance-only variant is scored only by the maps it has: the distance, with each verdict
    maps = "fused:mean@distance,nn_distance@reference_standardised,/shift4"
    assert sweep.main(["--grid", str(grid), "--out", str(out), "--frames", "0", "--variant",
                       "dist=swin.enabled=false", "--maps", maps]) == 0
    rows = {r["variant"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert "dist: nn_distance@reference_standardised" in rows and "dist: fused:mean@distance" not in rows
    assert rows["dist"]["pixel_ap"] == rows["dist: nn_distance@reference_standardised"]["pixel_ap"]  # same heatmap
    # "/shift4": the bundle's own map and verdict, each frame also scored shifted by 4 px and averaged
    assert json.loads((out / "dist" / "eval__shift4" / "metrics.json").read_text())["frame_shift"] == 4
    assert rows["dist: /shift4"]["pixel_ap"] != rows["dist"]["pixel_ap"]
    for bad in ("fused/shift", "median", "/"):
        with pytest.raises(SystemExit, match="unknown map"):
            sweep.main(["--grid", str(grid), "--out", str(out), "--frames", "0", "--maps", bad])
