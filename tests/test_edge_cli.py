"""``weakrest-edge inspect`` and ``bench`` on a real bundle; the edge package never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np

from edge_runtime import cli as edge_cli


def test_inspect_reports_a_corrupt_image_and_inspects_the_rest(fitted, demo_data, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    good = sorted((demo_data / "test" / "good").glob("*.png"))[:2]
    bad = sorted((demo_data / "test" / "scratch").glob("*.png"))[:2]
    for p in good + bad:
        (images / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (images / "notes.txt").write_text("not an image, not inspected")
    grey = cv2.cvtColor(cv2.imread(str(good[0])), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(images / "grey_small.jpg"), cv2.resize(grey, (97, 61)))  # other size and colour
    out = tmp_path / "out"
    code = edge_cli.main(["inspect", "--bundle", str(fitted[0]), "--images", str(images), "--out", str(out),
                          "--quiet"])
    assert code == 1  # one image failed
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    by_file = {x["file"]: x for x in lines}
    assert by_file["corrupt.png"]["verdict"] == "error" and "corrupt.png" in by_file["corrupt.png"]["error"]
    for name, row in by_file.items():
        if name == "corrupt.png":
            continue
        assert row["verdict"] in ("pass", "fail")
        assert set(row["timings_ms"]) >= {"preprocess", "backbone", "retrieval", "matching", "postprocess", "total"}
        assert row["threshold"] > 0 and np.isfinite(row["score"])
    assert len(list((out / "heatmaps").glob("*.png"))) == 5
    assert "1 error" in capsys.readouterr().out


def test_inspect_flags_defects_above_good_images(fitted, demo_data, tmp_path):
    """Sanity of the whole path on the demo product: defective images score higher on average."""
    out = tmp_path / "out"
    edge_cli.main(["inspect", "--bundle", str(fitted[0]), "--images", str(demo_data / "test"), "--out", str(out),
                   "--heatmaps", "none", "--quiet"])
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    good = [r["score"] for r in rows if r["file"].startswith("good/")]
    bad = [r["score"] for r in rows if not r["file"].startswith("good/")]
    assert np.mean(bad) > np.mean(good)


def test_bench_json(fitted, demo_data, capsys):
    assert edge_cli.main(["bench", "--bundle", str(fitted[0]), "--images", str(demo_data / "test"),
                          "--frames", "12", "--warmup", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 12 and report["fps"] > 0 and report["peak_rss_mb"] > 0
    for stage in ("preprocess", "backbone", "retrieval", "matching", "postprocess", "total"):
        assert report["stages_ms"][stage]["p99"] >= report["stages_ms"][stage]["p50"] >= 0


def test_refused_bundle_gives_exit_2(tmp_path, capsys):
    assert edge_cli.main(["bench", "--bundle", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_edge_runtime_never_imports_torch():
    code = ("import sys, edge_runtime.cli, edge_runtime.core.pipeline, edge_runtime.core.fitting, calibration.cli,"
            " edge_runtime.service.runner, edge_runtime.publishing.mqtt, edge_runtime.acquisition.genicam;"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_edge_command_lets_openblas_idle_workers_sleep_before_numpy_loads_it():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when numpy loads it: ``weakrest-edge`` sets it first (its idle
    workers spun on the cores the next frame's backbone needed), and a value already in the environment wins."""
    probe = (
        "import importlib.abc, os, sys\n"
        "seen = []\n"
        "class Watch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'numpy' and not seen:\n"
        "            seen.append(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import edge_runtime.cli\n"
        "print(seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    for given, expected in ((None, "['4']"), ("12", "['12']")):
        run_env = env if given is None else {**env, "OPENBLAS_THREAD_TIMEOUT": given}
        out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
