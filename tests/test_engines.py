"""The engine switch (edge_runtime/core/engines.py), int8 graphs and their accuracy gate (training_host/models/
quantize.py): every engine available here gives the fp32 CPU path's results within stated tolerances, ``auto``
picks only what the machine and the bundle allow, a bundle's int8 graphs are hashed like every file, and the
systemd drop-in lets OpenVINO's JIT run under the unit's sandbox."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.core.bundle import BACKBONE_INT8, SWIN_INT8, BundleError, PrecisionGate, PrecisionInfo, load_bundle
from edge_runtime.core.engines import (
    ENGINE_NAMES,
    EngineUnavailable,
    cpu_has_bf16,
    openvino_devices,
    select_engines,
)
from edge_runtime.core.pipeline import open_inspector
from edge_runtime.core.preprocess import list_images, read_image

REPO = Path(__file__).resolve().parents[1]
HAS_OPENVINO = "CPU" in openvino_devices()

#: tolerances against the fp32 CPU path on the demo product's test images, relative to the fp32 score and to the
#: fp32 heatmap's maximum: exact engines compute in fp32 (only the order of float operations differs; measured
#: 2e-7 and 6e-7); bf16 keeps 8 mantissa bits inside the graphs (measured 0.3 % and 2.3 %), and every verdict not
#: within ``score_rel`` of the threshold must stay the same
EXACT = {"score_rel": 1e-4, "heatmap_rel": 1e-4}
BF16 = {"score_rel": 0.02, "heatmap_rel": 0.05}
INT8 = {"score_rel": 0.05, "heatmap_rel": 0.1}  # about 3x what an AVX2-only CPU measures (1.7e-2, 3.7e-2)


@pytest.fixture(scope="module")
def images(demo_data):
    return [read_image(p) for p in list_images(demo_data / "test", recursive=True)]


@pytest.fixture(scope="module")
def reference(fitted, images):
    inspector = open_inspector(fitted[0], engine="cpu", threads=1)
    return [inspector.inspect(img) for img in images]


def _compare(results, reference, engine: str) -> dict:
    scores = np.array([r.score for r in results])
    ref = np.array([r.score for r in reference])
    rel = np.abs(scores - ref) / np.maximum(np.abs(ref), 1e-6)
    heat_rel = max(float(np.abs(a.heatmap - b.heatmap).max() / max(float(b.heatmap.max()), 1e-12))
                   for a, b in zip(results, reference, strict=True))
    corr = min(float(np.corrcoef(a.heatmap.ravel(), b.heatmap.ravel())[0, 1])
               for a, b in zip(results, reference, strict=True))
    print(f"{engine}: score rel diff max {rel.max():.2e}, heatmap diff / max {heat_rel:.2e}, corr min {corr:.5f}")
    return {"score_rel": float(rel.max()), "heatmap_rel": heat_rel, "heatmap_corr": corr}


def test_the_switch_is_the_same_everywhere():
    from edge_runtime.service.config import EngineName

    assert tuple(typing.get_args(EngineName)) == ENGINE_NAMES


@pytest.mark.parametrize("engine", ["openvino", "openvino-bf16"])
def test_each_available_engine_equals_the_fp32_cpu_path(fitted, images, reference, engine):
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed (pip install '.[openvino]')")
    if engine == "openvino-bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    inspector = open_inspector(fitted[0], engine=engine, threads=1)
    assert inspector.engines is not None and inspector.engines.name == engine
    assert inspector.backbone.name.startswith("openvino:CPU:" + ("bf16" if engine.endswith("bf16") else "f32"))
    results = [inspector.inspect(img) for img in images]
    diff = _compare(results, reference, engine)
    tolerance = EXACT if engine == "openvino" else BF16
    assert diff["score_rel"] <= tolerance["score_rel"] and diff["heatmap_rel"] <= tolerance["heatmap_rel"]
    threshold = reference[0].threshold
    for got, want in zip(results, reference, strict=True):
        if abs(want.score - threshold) > tolerance["score_rel"] * abs(threshold):
            assert got.verdict == want.verdict


def test_the_openvino_search_finds_numpys_nearest_candidates():
    """The search OpenVINO engines bring (engines.OpenVinoSearch) against numpy's, on a bank with uneven images
    (fewer candidates than compiled for: the padding must never win) and with as many as compiled for."""
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed (pip install '.[openvino]')")
    from edge_runtime.core.engines import OpenVinoSearch
    from edge_runtime.core.matching import MemoryBank, NumpySearch, max_candidates
    from edge_runtime.core.pca import fit_pca

    rng = np.random.default_rng(3)
    image_index = np.repeat(np.arange(6), [40, 25, 33, 40, 12, 30])
    features = rng.normal(size=(len(image_index), 24)).astype(np.float32)
    pca = fit_pca(features, n_components=8)
    k = 3
    assert max_candidates(image_index, k) == 40 + 40 + 33
    search = OpenVinoSearch(pca.components, pca.mean, n_queries=50, n_candidates=max_candidates(image_index, k),
                            threads=1)
    ov_bank = MemoryBank(features, image_index, pca, search=search)
    np_bank = MemoryBank(features, image_index, pca)
    assert isinstance(np_bank.search, NumpySearch)
    for refs in ([0, 3, 2], [4, 1, 5], [0, 3, 2][:2], [4]):
        pcf = rng.normal(size=(50, 24)).astype(np.float32)
        got, want = ov_bank.match(pcf, np.array(refs)), np_bank.match(pcf, np.array(refs))
        np.testing.assert_array_equal(got.bank_rows, want.bank_rows)
        np.testing.assert_array_equal(got.distance, want.distance)
    with pytest.raises(ValueError, match="more than the 113"):
        search(rng.normal(size=(50, 24)).astype(np.float32), np.zeros((114, 9), np.float32))


def test_the_openvino_bank_search_finds_numpys_nearest_defect_blocks():
    """The defect bank's search OpenVINO engines bring (engines.OpenVinoBankSearch) against numpy's: the same
    distances to float rounding, near a block and far from all of them; a patch count it was not compiled for is
    refused by name."""
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed (pip install '.[openvino]')")
    from edge_runtime.core.defect_bank import DefectBank
    from edge_runtime.core.engines import OpenVinoBankSearch

    rng = np.random.default_rng(5)
    blocks = rng.normal(size=(300, 24)).astype(np.float32) * 3.0
    pcf = np.concatenate([blocks[:20] + 0.01, rng.normal(size=(44, 24)).astype(np.float32) * 3.0])
    engine_bank = DefectBank(blocks, 1.0, 2.0, search=OpenVinoBankSearch(blocks, n_queries=64, threads=1))
    numpy_bank = DefectBank(blocks, 1.0, 2.0)
    got, want = engine_bank.nearest_distance(pcf), numpy_bank.nearest_distance(pcf)
    brute = np.sqrt(((pcf[:, None] - blocks[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(got, brute, rtol=1e-4, atol=1e-2)
    assert got[20:].min() > 1.0  # the far ones are far
    with pytest.raises(ValueError, match="63 patches, the defect bank's search was compiled for 64"):
        engine_bank.nearest_distance(pcf[:63])


def test_host_engines_bring_numpys_search_on_their_threads_and_openvino_its_own(fitted):
    from edge_runtime.core.matching import NumpySearch

    inspector = open_inspector(fitted[0], engine="cpu", threads=2)
    search = inspector.engines.search
    assert isinstance(search, NumpySearch) and search.threads.n == 2
    assert inspector.scorer.bank.search is search
    assert select_engines(load_bundle(fitted[0]), "cpu", threads=1).search.threads.n == 1
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed (pip install '.[openvino]')")
    inspector = open_inspector(fitted[0], engine="openvino", threads=1)
    assert inspector.engines.search is not None and inspector.scorer.bank.search is inspector.engines.search


SIGNAL_AFTER_SWITCH = """
import gc, os, signal, sys, threading
got = []
signal.signal(signal.SIGHUP, lambda *_: got.append(1))
from edge_runtime.core.pipeline import open_inspector
held = {"inspector": open_inspector(sys.argv[1], engine="openvino")}  # loaded on the main thread, as at start


def switch():  # a bundle switch off the main thread: the new engines in, the old ones released there
    held["inspector"] = open_inspector(sys.argv[1], engine="openvino")
    gc.collect()


thread = threading.Thread(target=switch)
thread.start()
thread.join()
os.kill(os.getpid(), signal.SIGHUP)
print("handled", len(got), flush=True)
"""


def test_a_signal_after_a_bundle_switch_off_the_main_thread_does_not_kill_the_process(fitted):
    """OpenVINO's CPU plugin gives its creating thread an alternate signal stack and unmaps it with the plugin: the
    service (SIGHUP reloads, SIGTERM stops) must survive a signal after engines were released on another thread
    (engines.openvino_core)."""
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed (pip install '.[openvino]')")
    run = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_SWITCH, str(fitted[0])], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0 and "handled 1" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_engines_that_cannot_run_say_why(fitted):
    bundle = load_bundle(fitted[0])
    from edge_runtime.core.device_pipeline import cupy_or_reason

    if cupy_or_reason()[0] is None:  # no GPU here: both GPU engines say what they need
        for engine in ("tensorrt", "cuda"):
            with pytest.raises(EngineUnavailable, match="CuPy and a CUDA device"):
                select_engines(bundle, engine)
    with pytest.raises(EngineUnavailable, match="no int8 graphs"):
        select_engines(bundle, "cpu-int8")
    with pytest.raises(EngineUnavailable, match="unknown engine"):
        select_engines(bundle, "gpu-magic")
    # through open_inspector (the service, the CLI) it is a refusal naming the engine, never a crash
    with pytest.raises(BundleError, match="engine: tensorrt"):
        open_inspector(fitted[0], engine="tensorrt")


def test_auto_picks_the_fastest_allowed_engine_and_says_what_it_passed_over(fitted, tmp_path):
    from training_host.models.quantize import _write

    bundle = load_bundle(fitted[0])
    chosen = select_engines(bundle, "auto", threads=1)
    # an older bundle (no precision section): no reduced precision, so the fastest exact engine (openvino at f32,
    # where it is installed: see AUTO_ORDER)
    assert chosen.name == ("openvino" if HAS_OPENVINO else "cpu") and chosen.requested == "auto"
    assert "not measured" in chosen.passed_over["openvino-bf16"]
    figures = {"image_auroc": 0.9, "pixel_auroc": 0.9, "pro": 0.8, "pixel_ap": 0.4}

    def with_gate(accepted: bool) -> Path:
        gate = PrecisionGate(engine="openvino-bf16", accepted=accepted, reason="test", fp32=figures,
                             reduced=figures, max_pixel_ap_loss=0.5, max_image_auroc_loss=0.005, images=10)
        info = PrecisionInfo(calibration_images=0, method="none", gates=[gate])
        return _write(bundle, tmp_path / f"gate-{accepted}", {}, info)

    refused = select_engines(load_bundle(with_gate(False)), "auto", threads=1)
    assert refused.name != "openvino-bf16" and "refused" in refused.passed_over["openvino-bf16"]
    accepted = select_engines(load_bundle(with_gate(True)), "auto", threads=1)
    assert accepted.name == ("openvino-bf16" if HAS_OPENVINO and cpu_has_bf16() else "openvino" if HAS_OPENVINO
                             else "cpu")


def test_the_gate_refuses_losses_beyond_its_limits():
    from training_host.models.quantize import judge

    fp32 = {"image_auroc": 0.950, "pixel_auroc": 0.9, "pro": 0.8, "pixel_ap": 0.400}
    assert judge("cpu-int8", fp32, {**fp32, "pixel_ap": 0.396, "image_auroc": 0.946}, 10).accepted
    assert judge("cpu-int8", fp32, {**fp32, "pixel_ap": 0.420, "image_auroc": 0.990}, 10).accepted  # gains pass
    ap = judge("cpu-int8", fp32, {**fp32, "pixel_ap": 0.394}, 10)
    assert not ap.accepted and "0.60 pixel-AP points" in ap.reason and "kept fp32" in ap.reason
    auroc = judge("cpu-int8", fp32, {**fp32, "image_auroc": 0.944}, 10)
    assert not auroc.accepted and "image AUROC" in auroc.reason
    blind = judge("cpu-int8", {**fp32, "pixel_ap": None}, fp32, 10)
    assert not blind.accepted and "cannot measure pixel_ap" in blind.reason


@pytest.fixture(scope="module")
def quantized(fitted, demo_data, tmp_path_factory):
    """The demo bundle with gated int8 graphs, forced in by a generous gate so the int8 path is exercised."""
    from training_host.models import quantize

    out = tmp_path_factory.mktemp("int8") / "bundle"
    limits = (quantize.MAX_PIXEL_AP_LOSS, quantize.MAX_IMAGE_AUROC_LOSS)
    quantize.MAX_PIXEL_AP_LOSS, quantize.MAX_IMAGE_AUROC_LOSS = 100.0, 1.0  # the demo data is tiny: accept any
    try:
        report = quantize.quantize_bundle(fitted[0], demo_data, out, n_calibration=8, gate_openvino=HAS_OPENVINO)
    finally:
        quantize.MAX_PIXEL_AP_LOSS, quantize.MAX_IMAGE_AUROC_LOSS = limits
    return out, report


def test_int8_graphs_are_listed_hashed_and_gated_in_the_manifest(quantized, demo_data, tmp_path):
    out, report = quantized
    bundle = load_bundle(out)
    p = bundle.manifest.precision
    assert p is not None and p.int8_graphs == {"swin": SWIN_INT8, "backbone": BACKBONE_INT8} == report.int8_graphs
    for name in (SWIN_INT8, BACKBONE_INT8, "backbone.onnx", "swin.onnx"):
        assert name in bundle.manifest.files and (out / name).is_file()
    cpu_int8 = bundle.precision_gate("cpu-int8")
    assert cpu_int8 is not None and cpu_int8.accepted and cpu_int8.images == len(
        list_images(demo_data / "test", recursive=True))
    # the gate's figures are what the edge's own path measures with that engine, not numbers made up elsewhere
    from training_host.evaluation.evaluate import evaluate_bundle

    again = evaluate_bundle(out, demo_data, tmp_path / "eval", progress=False, engine="cpu-int8")
    for k, v in cpu_int8.reduced.items():
        assert again[k] == pytest.approx(v, abs=1e-9), k
    fp32 = evaluate_bundle(out, demo_data, tmp_path / "eval32", progress=False, engine="cpu")
    for k, v in cpu_int8.fp32.items():
        assert fp32[k] == pytest.approx(v, abs=1e-9), k
    # a changed int8 graph is refused by its hash, naming it
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / SWIN_INT8, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"swin\.int8\.onnx: size"):
        load_bundle(broken)


def test_cpu_int8_runs_the_int8_graphs_close_to_fp32(quantized, images, reference):
    out, _ = quantized
    inspector = open_inspector(out, engine="cpu-int8", threads=1)
    assert inspector.engines.graphs == {"backbone": BACKBONE_INT8, "swin": SWIN_INT8}
    results = [inspector.inspect(img) for img in images]
    diff = _compare(results, reference, "cpu-int8")
    # int8 moves the features: no equality, but scores and heat stay close (the gate judges the accuracy on labelled
    # defects).  Not correlations: the demo bundle's maps are flat (their std is about 1 % of their maximum) and its
    # scores lie within 4 % of each other, so correlations measure rounding noise, and ONNX Runtime's int8 kernels
    # round differently with and without VNNI (an AVX2-only CPU: heatmap correlation 0.36, score correlation 0.62,
    # while every score is within 1.7 % and the heat within 4 % of the reference's maximum)
    assert diff["score_rel"] <= INT8["score_rel"] and diff["heatmap_rel"] <= INT8["heatmap_rel"], diff


def test_field_calibration_of_a_quantized_bundle_drops_its_int8_graphs(quantized, demo_data, tmp_path):
    """The gates were measured against the old bank on labelled defects; the field has neither: the calibrated
    bundle verifies, carries no int8 graph or gate, and ``auto`` then runs an exact engine."""
    from calibration.fit import calibrate

    out = tmp_path / "cal"
    calibrate(quantized[0], demo_data / "train" / "good", out, quiet=True)
    bundle = load_bundle(out)
    assert bundle.manifest.precision is None and not bundle.int8_paths
    assert not (out / SWIN_INT8).exists() and not (out / BACKBONE_INT8).exists()
    assert select_engines(bundle, "auto", threads=1).name == ("openvino" if HAS_OPENVINO else "cpu")


def test_bench_and_eval_take_the_engine(fitted, demo_data, tmp_path, capsys):
    from edge_runtime import cli as edge_cli
    from training_host import cli as train_cli

    assert edge_cli.main(["bench", "--bundle", str(fitted[0]), "--images", str(demo_data / "test"), "--frames", "4",
                          "--warmup", "1", "--json", "--engine", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"] == "cpu" and report["engine_detail"]["graphs"]["backbone"] == "backbone.onnx"
    assert edge_cli.main(["bench", "--bundle", str(fitted[0]), "--frames", "2", "--warmup", "0",
                          "--engine", "tensorrt"]) == 2
    assert "engine: tensorrt: " in capsys.readouterr().err  # what it lacks here: CuPy, a GPU, TensorRT, a plan
    # several engines in one table; one that cannot run here is reported with its reason, not measured
    assert edge_cli.main(["bench", "--bundle", str(fitted[0]), "--frames", "2", "--warmup", "0", "--json",
                          "--engine", "cpu,tensorrt"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [r["engine"] for r in both["engines"]] == ["cpu"] and "tensorrt" in both["not_measured"]
    assert both["engines"][0]["gpu_memory"] is None
    with pytest.raises(SystemExit):
        edge_cli.main(["bench", "--bundle", str(fitted[0]), "--engine", "cpu,warp-drive"])
    assert "unknown engine warp-drive" in capsys.readouterr().err
    assert train_cli.main(["eval", "--bundle", str(fitted[0]), "--data", str(demo_data), "--out",
                           str(tmp_path / "ev"), "--overlays", "0", "--json", "--engine", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["engine"] == "cpu"


def test_health_and_metrics_report_the_engine(fitted, tmp_path):
    from edge_runtime.publishing.broker import free_port
    from edge_runtime.service.config import parse_edge_config
    from edge_runtime.service.runner import EdgeService
    from edge_runtime.store import BundleStore

    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", fitted[0], version="v1"))
    cfg = parse_edge_config({"bundles": {"store": str(store.root), "product": "demo"}, "engine": "auto",
                             "queue": {"dir": str(tmp_path / "q")}, "health": {"port": free_port()}, "threads": 1,
                             "mqtt": {"port": free_port()}})
    service = EdgeService(cfg)
    try:
        engine = service.health_report()["engine"]
        assert engine["requested"] == "auto" and engine["engine"] in ENGINE_NAMES and engine["engine"] != "auto"
        assert f'weakrest_engine_info{{engine="{engine["engine"]}",requested="auto"}} 1' in service.render_metrics()
    finally:
        service.queue.close()
        if service.health is not None:
            service.health.stop()


# ---- OpenVINO under the unit's sandbox -------------------------------------------------------------------

UNIT = REPO / "systemd" / "weakrest-edge.service"
DROP_IN = REPO / "systemd" / "drop-ins" / "openvino.conf"
PROBE = ("import json, sys\nfrom edge_runtime.core.pipeline import open_inspector\n"
         "from edge_runtime.core.bundle import BundleError\n"
         "try:\n    i = open_inspector(sys.argv[1], engine=sys.argv[2], threads=1)\n"
         "    print(json.dumps(i.engines.describe()))\n"
         "except BundleError as e:\n    print(json.dumps({'error': str(e)}))\n")


def _sandboxed(unit_text: str, tmp_path: Path, bundle: Path, engine: str) -> dict:
    from tests.test_systemd_unit import _sandbox_or_skip

    wrapper = _sandbox_or_skip()
    unit = tmp_path / f"unit-{engine}-{len(list(tmp_path.iterdir()))}.service"
    unit.write_text(unit_text, encoding="utf-8")
    wrapper[2] = str(unit)
    run = subprocess.run([*wrapper, sys.executable, "-c", PROBE, str(bundle), engine], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_openvino_needs_the_drop_in_under_the_unit_and_auto_falls_back_without_it(fitted, tmp_path):
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed (pip install '.[openvino]')")
    shipped = UNIT.read_text(encoding="utf-8")
    refused = _sandboxed(shipped, tmp_path, fitted[0], "openvino")
    assert "openvino.conf" in refused["error"] and "MemoryDenyWriteExecute=no" in refused["error"]
    if cpu_has_bf16():  # auto would take openvino-bf16 for a bundle whose gate accepted it: not under the unit
        from training_host.models.quantize import _write

        figures = {"image_auroc": 0.9, "pixel_auroc": 0.9, "pro": 0.8, "pixel_ap": 0.4}
        gate = PrecisionGate(engine="openvino-bf16", accepted=True, reason="test", fp32=figures, reduced=figures,
                             max_pixel_ap_loss=0.5, max_image_auroc_loss=0.005, images=10)
        gated = _write(load_bundle(fitted[0]), tmp_path / "gated", {},
                       PrecisionInfo(calibration_images=0, method="none", gates=[gate]))
        fallback = _sandboxed(shipped, tmp_path, gated, "auto")
        assert fallback["engine"] == "cpu" and "openvino.conf" in fallback["passed_over"]["openvino-bf16"]
    with_drop_in = shipped + "\n" + DROP_IN.read_text(encoding="utf-8")
    assert _sandboxed(with_drop_in, tmp_path, fitted[0], "openvino")["engine"] == "openvino"


def test_the_drop_in_keeps_the_unit_rated_ok(tmp_path):
    from tests.test_systemd_unit import _exposure, _systemd_analyze

    exe = _systemd_analyze()
    network = (REPO / "systemd" / "drop-ins" / "network.conf").read_text(encoding="utf-8")
    text = UNIT.read_text(encoding="utf-8") + "\n" + network + "\n" + DROP_IN.read_text(encoding="utf-8")
    score, report = _exposure(exe, text, tmp_path)
    assert score <= 2.0, report
    assert "✗ MemoryDenyWriteExecute=" in report  # the drop-in does what it says
    readme = (REPO / "systemd" / "README.md").read_text(encoding="utf-8")
    assert "drop-ins/openvino.conf" in readme
