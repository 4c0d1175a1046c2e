"""Swin bundles end to end on the demo product: fit modes, the bundle contract, the edge runtime, evaluation."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import cv2
import numpy as np
import pytest

from edge_runtime import cli as edge_cli
from edge_runtime.core.bundle import ARRAYS, MANIFEST, SWIN, BundleError, load_bundle, sha256_of
from edge_runtime.core.defect_bank import DefectBank, NumpyBankSearch
from edge_runtime.core.engines import openvino_devices, select_engines
from edge_runtime.core.fitting import split_holdout
from edge_runtime.core.pipeline import Inspector, open_inspector
from edge_runtime.core.preprocess import list_images, read_image
from training_host import cli as train_cli
from training_host.evaluation.evaluate import evaluate_bundle


def _rewrite_manifest(path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _with_later_section(source, path, edit, name: str, version: int):
    """A copy of the bundle ``source`` at ``path`` with a section that schema ``version`` added: refused while the
    manifest says an older version (by its version, as a runtime before it would, not by an unknown field), read
    once it says that one."""
    shutil.copytree(source, path)
    _rewrite_manifest(path, edit)
    with pytest.raises(BundleError, match=f"{name} needs schema version {version}"):
        load_bundle(path)
    _rewrite_manifest(path, lambda m: m.update(schema_version=version))
    return load_bundle(path)


def test_swin_bundle_inspects_with_a_swin_stage(fitted, demo_data):
    inspector = open_inspector(fitted[0])
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    result = inspector.inspect(image)
    assert {"backbone", "retrieval", "matching", "swin", "postprocess", "total"} <= set(result.timings_ms)
    assert abs(sum(v for k, v in result.timings_ms.items() if k != "total") - result.timings_ms["total"]) < 0.5
    assert result.heatmap.shape == (128, 128) and 0.0 <= result.score <= 1.0
    baseline = Inspector(inspector.bundle, anomaly_map="nn_distance").inspect(image)
    assert "swin" not in baseline.timings_ms and baseline.score > 1.0  # a distance, not a probability


def test_slice_bundles_of_schema_1_keep_working(fitted_slice, demo_data, tmp_path):
    path = tmp_path / "slice"
    shutil.copytree(fitted_slice[0], path)
    _rewrite_manifest(path, lambda m: m.update(schema_version=1))
    bundle = load_bundle(path)
    assert bundle.manifest.schema_version == 1 and bundle.swin_path is None
    assert bundle.manifest.scoring.anomaly_map == "nn_distance"
    result = open_inspector(path).inspect(read_image(list_images(demo_data / "test" / "good")[0]))
    assert "swin" not in result.timings_ms and result.verdict in ("pass", "fail")
    with pytest.raises(ValueError, match="no swin.onnx"):
        Inspector(bundle, anomaly_map="swin")


def test_swin_graph_tampering_is_refused_naming_it(fitted, tmp_path, capsys):
    path = tmp_path / "b"
    shutil.copytree(fitted[0], path)
    data = bytearray((path / SWIN).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / SWIN).write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        load_bundle(path)
    assert err.value.file == SWIN and "sha256" in err.value.problem
    # a graph that hashes right but is not ONNX is caught by the smoke run
    (path / SWIN).write_bytes(b"not a graph")
    _rewrite_manifest(path, lambda m: m["files"][SWIN].update(sha256=sha256_of(path / SWIN), size=11))
    assert edge_cli.main(["check-bundle", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["file"] == SWIN


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m.pop("swin"), "swin section is absent"),
        (lambda m: m["scoring"].update(anomaly_map="nn_distance"), "swin section is present"),
        (lambda m: m["files"].pop(SWIN), "not listed"),
        (lambda m: m.update(foreground={"power": 0.15, "pool": 3, "n_fit_images": 8}), "foreground_maps"),
    ],
)
def test_inconsistent_swin_manifest_is_refused(fitted, tmp_path, edit, words):
    path = tmp_path / "b"
    shutil.copytree(fitted[0], path)
    _rewrite_manifest(path, edit)
    with pytest.raises(BundleError, match=words):
        load_bundle(path)


def test_foreground_maps_out_of_range_are_refused(object_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "b"
    shutil.copytree(object_bundle, path)
    arrays = load_file(str(path / ARRAYS))
    arrays["foreground_maps"] = (arrays["foreground_maps"].astype(np.float32) * 3).astype(np.float16)
    save_file(arrays, str(path / ARRAYS))
    _rewrite_manifest(path, lambda m: m["files"][ARRAYS].update(sha256=sha256_of(path / ARRAYS),
                                                                  size=(path / ARRAYS).stat().st_size))
    with pytest.raises(BundleError, match=r"foreground_maps must hold finite values in \[0, 1\]"):
        load_bundle(path)


#: small object product; 4x4 windows and 8x8 training crops on the 16x16 grid, so that training crops, shifted
#: windows and sliding-window inference (also inside swin.onnx) are all exercised
OBJECT_SETTINGS = [
    "--set", "input_size=[128,128]", "--set", "posfar.d_l=16", "--set", "posfar.k_references=8",
    "--set", "posfar.lambda_p=0.15", "--set", "threshold.holdout_fraction=0.2", "--set", "foreground.enabled=true",
    "--set", "swin.steps=60", "--set", "swin.finetune_steps=30", "--set", "swin.synthetic_per_image=1",
    "--set", "swin.batch_size=8", "--set", "swin.checkpoint_every=25", "--set", "swin.window=4",
    "--set", "swin.train_window=8", "--set", "swin.window_stride=4",
]


@pytest.fixture(scope="module")
def object_data(tmp_path_factory):
    from training_host.data.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("object") / "data"
    return make_demo_dataset(root, product="object", n_train=30, n_test_good=4, n_test_per_defect=3, seed=5)


@pytest.fixture(scope="module")
def object_bundle(tmp_path_factory, object_data):
    """A supervised bundle with foreground maps, fitted through the CLI with checkpoints, its masks learned with
    ResMixMatch as the profiles do."""
    out = tmp_path_factory.mktemp("object_bundle") / "bundle"
    code = train_cli.main([
        "fit", "--data", str(object_data), "--out", str(out), "--mode", "supervised",
        "--supervised-from", str(object_data), "--n-defects", "3", "--defect-seed", "1",
        "--synthetic-preview", str(out.parent / "synthetic.png"), "--json",
        *OBJECT_SETTINGS, "--set", "swin.defect_transplants=2", "--set", "swin.finetune_objective=resmixmatch",
        "--set", "scoring.fusion=mean", "--set", "scoring.defect_bank_boost=1.0",
    ])
    assert code == 0
    return out


def test_supervised_object_bundle_records_its_training_and_foreground(object_bundle):
    m = load_bundle(object_bundle).manifest
    assert m.training.mode == "supervised" and len(m.training.defect_images) == 3
    assert m.training.steps == 90 and "3 defective images" in m.training.supervision
    assert "each also pasted into 2 good images" in m.training.supervision
    assert "with pixel masks (learned with ResMixMatch)" in m.training.supervision
    assert m.foreground is not None and m.foreground.power == 0.15
    assert m.swin.train_window == 8 and m.swin.window == 4 and m.swin.onnx_max_abs_diff < 1e-4  # sliding windows
    maps = load_bundle(object_bundle).arrays["foreground_maps"].astype(np.float32)
    assert maps.shape == (m.posfar.n_reference_images, 16, 16)
    # the demo object is a centred ring (a washer) on a plain background: the ring is foreground, the corners
    # are background
    yy, xx = np.mgrid[:16, :16]
    radius = np.hypot(yy - 7.5, xx - 7.5)
    ring, corners = (radius > 3.5) & (radius < 5.5), radius > 9
    assert maps[:, ring].mean() > 0.7 and maps[:, corners].mean() < 0.3
    assert (object_bundle.parent / "synthetic.png").is_file()
    ckpt = object_bundle.parent / "bundle.ckpt"
    assert {p.name for p in ckpt.iterdir()} >= {"unsupervised.safetensors", "unsupervised.json",
                                                "supervised.safetensors", "supervised.json"}
    assert json.loads((ckpt / "supervised.json").read_text())["step"] == 30


def test_a_supervised_bundle_keeps_its_defect_blocks_and_raises_the_map_there(object_bundle, object_data, tmp_path):
    bundle = load_bundle(object_bundle)
    m = bundle.manifest
    info = m.scoring.defect_bank
    assert info is not None and info.boost == 1.0 and info.cap == 2.0 and 1 <= info.images <= 3
    assert bundle.arrays["defect_bank"].shape == (info.blocks, m.backbone.d_f) and m.schema_version == 8
    assert f"{info.blocks} labelled defect blocks raise the map's distance" in m.training.supervision
    inspector = open_inspector(object_bundle)
    scorer = inspector.scorer

    def evidence(path):
        extracted = inspector.extract(read_image(path))
        return scorer.evidence(extracted.pcf, extracted.descriptor)

    # a labelled image's own defect blocks are in the bank: nearer it than any normal patch, raised to the cap
    labelled = evidence(object_data / m.training.defect_images[0].name)
    assert labelled.defect_factor.min() >= 1.0 and labelled.defect_factor.max() == pytest.approx(2.0)
    assert "defect_bank" in labelled.timings_ms
    good = evidence(list_images(object_data / "test" / "good")[0])
    assert np.mean(good.defect_factor == 1.0) > 0.9  # a good frame looks like no defect almost everywhere
    # only the map is raised: a verdict on the distance (the profiles' reference_standardised) is the plain one's
    raised = labelled.defect_factor > 1.0
    on_distance = scorer.with_standardiser(scorer.standardiser, "reference_standardised")
    assert on_distance.finish(labelled).score == on_distance.finish(replace(labelled, defect_factor=None)).score
    plain = scorer.finish(replace(labelled, defect_factor=None))
    served = scorer.finish(labelled)
    assert np.all(served.block_map.ravel()[raised] > plain.block_map.ravel()[raised])
    assert np.array_equal(served.block_map.ravel()[~raised], plain.block_map.ravel()[~raised])
    assert Inspector(bundle, anomaly_map="nn_distance").scorer.defect_bank is None  # the baseline stays plain
    # the contract: refused by a runtime of schema 7, and the array and the section only together
    older = tmp_path / "older"
    shutil.copytree(object_bundle, older)
    _rewrite_manifest(older, lambda mf: mf.update(schema_version=7))
    with pytest.raises(BundleError, match="scoring.defect_bank needs schema version 8"):
        load_bundle(older)
    alone = tmp_path / "alone"
    shutil.copytree(object_bundle, alone)
    _rewrite_manifest(alone, lambda mf: mf["scoring"].pop("defect_bank"))
    with pytest.raises(BundleError, match="'defect_bank' and the manifest's scoring.defect_bank must come together"):
        load_bundle(alone)
    wrong = tmp_path / "wrong"
    shutil.copytree(object_bundle, wrong)
    _rewrite_manifest(wrong, lambda mf: mf["scoring"]["defect_bank"].update(blocks=info.blocks + 1))
    with pytest.raises(BundleError, match=f"defect_bank is \\[{info.blocks}, {m.backbone.d_f}\\], expected"):
        load_bundle(wrong)


def test_openvino_engines_search_the_defect_bank_in_their_own_pool(object_bundle, object_data):
    """With an OpenVINO engine numpy keeps one BLAS thread, so the bank's product runs in OpenVINO's pool
    (engines.OpenVinoBankSearch): the same factors as numpy's search on the same features."""
    if "CPU" not in openvino_devices():
        pytest.skip("openvino is not installed (pip install '.[openvino]')")
    bundle = load_bundle(object_bundle)
    assert isinstance(select_engines(bundle, "cpu", threads=1).bank_search, NumpyBankSearch)
    inspector = open_inspector(object_bundle, engine="openvino", threads=1)
    bank = inspector.scorer.defect_bank
    assert bank is not None and bank.search is inspector.engines.bank_search
    numpy_bank = DefectBank(bundle.arrays["defect_bank"], bank.boost, bank.cap)
    assert isinstance(numpy_bank.search, NumpyBankSearch)
    labelled = object_data / bundle.manifest.training.defect_images[0].name
    factors = []
    for path in (labelled, list_images(object_data / "test" / "good")[0]):
        extracted = inspector.extract(read_image(path))
        ev = inspector.scorer.evidence(extracted.pcf, extracted.descriptor)
        np.testing.assert_allclose(ev.defect_factor, numpy_bank.factor(extracted.pcf, ev.distance), atol=1e-3)
        assert "defect_bank" in ev.timings_ms
        factors.append(ev.defect_factor)
    # a labelled image's own defect blocks are raised to the cap; a good frame is left as it was almost everywhere
    assert factors[0].max() == pytest.approx(2.0) and np.mean(factors[1] == 1.0) > 0.9
    with pytest.raises(ValueError, match="compiled for"):
        bank.search(extracted.pcf[:-1])


def test_evaluation_leaves_out_the_training_defects(object_bundle, object_data, tmp_path):
    m = load_bundle(object_bundle).manifest
    metrics = evaluate_bundle(object_bundle, object_data, tmp_path / "eval", progress=False)
    trained = sorted(d.name for d in m.training.defect_images)
    assert sorted(metrics["excluded_training_defects"]) == trained
    assert metrics["n_defective"] == 4 * 3 - 3
    assert metrics["supervision"] == m.training.supervision and metrics["foreground"] is True
    assert metrics["defect_bank_blocks"] == m.scoring.defect_bank.blocks
    assert f"the distance raised near {m.scoring.defect_bank.blocks} labelled defect blocks" in (
        tmp_path / "eval" / "report.html").read_text()
    no_fg = evaluate_bundle(object_bundle, object_data, tmp_path / "nofg", progress=False, use_foreground=False)
    assert no_fg["foreground"] is False and no_fg["at_threshold"] is None


def test_resume_continues_from_checkpoints_without_training_again(object_bundle, object_data, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(object_bundle.parent / "bundle.ckpt", tmp_path / "again.ckpt")
    code = train_cli.main([
        "fit", "--data", str(object_data), "--out", str(out), "--mode", "supervised", "--resume",
        "--supervised-from", str(object_data), "--n-defects", "3", "--defect-seed", "1", "--json",
        *OBJECT_SETTINGS,
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [p["resumed_at"] for p in summary["swin"]["phases"]] == [60, 30]
    # the same finished weights, so the same graph output on the same residuals
    a = open_inspector(object_bundle)
    b = open_inspector(out)
    probe = np.random.default_rng(0).random((256, 152), dtype=np.float32)
    assert np.allclose(a.scorer.classifier(probe), b.scorer.classifier(probe), atol=1e-6)


def test_fit_cli_refuses_bad_requests_with_clear_messages(demo_data, tmp_path, capsys):
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "b"), "--mode", "supervised"]) == 2
    assert "--supervised-from" in capsys.readouterr().err
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "b"),
                           "--set", "swin.heads=5"]) == 2
    err = capsys.readouterr().err
    assert "swin.heads" in err and "divide embed_dim" in err
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "b"), "--set", "swin.steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "b"), "--mode", "supervised",
                           "--supervised-from", str(demo_data), "--n-defects", "500"]) == 2
    assert "asked for 500 defective images" in capsys.readouterr().err
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "b"),
                           "--set", "scoring.frame_shift=8"]) == 2
    assert "frame_shift is 8 px, not less than the backbone's stride 8" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_calibration_refits_foreground_maps_and_keeps_the_swin(object_bundle, object_data, tmp_path):
    from calibration.cli import main as calibrate_main

    out = tmp_path / "cal"
    assert calibrate_main(["fit", "--base", str(object_bundle), "--images", str(object_data / "train" / "good"),
                           "--out", str(out), "--json"]) == 0
    base, new = load_bundle(object_bundle), load_bundle(out)
    assert new.manifest.foreground is not None and new.manifest.swin == base.manifest.swin
    maps = new.arrays["foreground_maps"].astype(np.float32)
    assert maps.shape == (new.manifest.posfar.n_reference_images, 16, 16)
    yy, xx = np.mgrid[:16, :16]
    radius = np.hypot(yy - 7.5, xx - 7.5)
    assert maps[:, (radius > 3.5) & (radius < 5.5)].mean() > 0.7 and maps[:, radius > 9].mean() < 0.3
    result = open_inspector(out).inspect(read_image(list_images(object_data / "test" / "good")[0]))
    assert {"swin", "defect_bank", "total"} <= set(result.timings_ms)
    # the labelled defects' features do not depend on the bank of normal patches: kept as they were
    assert new.manifest.scoring.defect_bank == base.manifest.scoring.defect_bank
    assert np.array_equal(new.arrays["defect_bank"], base.arrays["defect_bank"])


def test_fused_map_uses_the_scales_stored_at_fit(fitted, demo_data):
    """Every Swin bundle stores the fusion scales; the fused map is the rule applied to both block maps."""
    from edge_runtime.core.pipeline import MapFusion

    bundle = load_bundle(fitted[0])
    f = bundle.manifest.scoring.fusion
    assert f is not None and f.distance_scale > 0 and 0 < f.swin_scale <= 1 and f.quantile == 0.999
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    swin = Inspector(bundle, anomaly_map="swin")
    pcf, desc = swin.features(image)
    distance, probability = swin.scorer.block_evidence(pcf, desc)
    for rule in ("mean", "geometric", "max"):
        fused = Inspector(bundle, anomaly_map="fused", fusion_rule=rule)
        expected = MapFusion(rule, f.distance_scale, f.swin_scale)(probability, distance)
        got = fused.scorer.score(pcf, desc).block_map.ravel()
        assert np.allclose(got, expected, atol=1e-5)
    d, p = distance / f.distance_scale, probability / f.swin_scale
    assert np.allclose(MapFusion("mean", f.distance_scale, f.swin_scale)(probability, distance), (d + p) / 2,
                       atol=1e-5)
    with pytest.raises(ValueError, match="fusion rule"):
        MapFusion("median", 1.0, 1.0)


def test_a_weighted_fusion_is_stored_used_and_kept_by_calibration(fitted, demo_data, tmp_path):
    """scoring.fusion.swin_weight: the Swin's share of the fused map (schema 4); absent, an equal share."""
    from calibration.fit import calibrate
    from edge_runtime.core.pipeline import MapFusion

    p, d = np.array([0.2, 0.8, 0.0], np.float32), np.array([0.5, 0.1, 0.4], np.float32)
    assert np.allclose(MapFusion("mean", 1.0, 1.0, swin_weight=0.3)(p, d), 0.3 * p + 0.7 * d)
    assert np.allclose(MapFusion("geometric", 1.0, 1.0, swin_weight=0.3)(p, d), p ** 0.3 * d ** 0.7)
    assert np.array_equal(MapFusion("mean", 1.0, 1.0)(p, d), (p + d) / 2)  # the bundles before: bit for bit
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="swin_weight"):
            MapFusion("mean", 1.0, 1.0, swin_weight=bad)
    path = tmp_path / "b"
    bundle = _with_later_section(fitted[0], path, lambda m: m["scoring"]["fusion"].update(swin_weight=0.3),
                                 "swin_weight", 4)
    f = bundle.manifest.scoring.fusion
    inspector = Inspector(bundle, anomaly_map="fused", fusion_rule="mean")  # the demo bundle's own rule: geometric
    assert inspector.fusion.swin_weight == 0.3
    assert Inspector(load_bundle(fitted[0]), anomaly_map="fused").fusion.swin_weight == 0.5
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    pcf, desc = inspector.features(image)
    distance, probability = inspector.scorer.block_evidence(pcf, desc)
    expected = 0.3 * probability / f.swin_scale + 0.7 * distance / f.distance_scale
    assert np.allclose(inspector.scorer.score(pcf, desc).block_map.ravel(), expected, atol=1e-5)
    calibrate(path, demo_data / "train" / "good", tmp_path / "cal", holdout=0.25, quiet=True)
    cal = load_bundle(tmp_path / "cal")
    assert cal.manifest.scoring.fusion.swin_weight == 0.3 and cal.manifest.schema_version == 4
    assert Inspector(cal, anomaly_map="fused").fusion.swin_weight == 0.3


def test_eval_can_score_another_swin_share_and_then_reports_no_threshold(fitted, demo_data, tmp_path):
    """swin_share (``weakrest-train eval --swin-share``): the fused map with the Swin's share replaced, for
    studies; the bundle's threshold belongs to its own map, so none is reported then."""
    from training_host.evaluation.evaluate import evaluate_bundle

    bundle = load_bundle(fitted[0])
    f = bundle.manifest.scoring.fusion
    inspector = Inspector(bundle, anomaly_map="fused", fusion_rule="mean", swin_share=0.8)
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    pcf, desc = inspector.features(image)
    distance, probability = inspector.scorer.block_evidence(pcf, desc)
    expected = 0.8 * probability / f.swin_scale + 0.2 * distance / f.distance_scale
    assert np.allclose(inspector.scorer.score(pcf, desc).block_map.ravel(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="swin_weight"):
        Inspector(bundle, anomaly_map="fused", swin_share=1.0)
    path = tmp_path / "fused"  # a bundle that serves its fused map, so that its threshold is its own map's
    shutil.copytree(fitted[0], path)
    _rewrite_manifest(path, lambda m: m["scoring"].update(anomaly_map="fused"))
    own = evaluate_bundle(path, demo_data, tmp_path / "own", overlays=0, progress=False)
    other = evaluate_bundle(path, demo_data, tmp_path / "other", overlays=0, progress=False, swin_share=0.8)
    assert own["fusion_swin_share"] == f.weight and own["threshold"] is not None
    assert other["fusion_swin_share"] == 0.8 and other["threshold"] is None and other["at_threshold"] is None


def test_each_maps_excess_over_its_normal_extreme_counts_more_and_is_kept(fitted, demo_data, tmp_path):
    """scoring.fusion.swin_excess / distance_excess (schema 7): the fused map plus those weights times the scaled
    Swin's and distance's excess over 1.0 (their held-out good blocks' extremes), nothing added below; used by the
    inspector, kept by field calibration, and replaceable in eval (``--swin-excess``, ``--distance-excess``), which
    then reports no threshold."""
    from calibration.fit import calibrate
    from edge_runtime.core.pipeline import MapFusion
    from training_host.evaluation.evaluate import evaluate_bundle

    p, d = np.array([0.2, 0.9, 1.0, 1.5, 2.0], np.float32), np.array([0.5, 0.1, 0.4, 0.3, 0.0], np.float32)
    plain = MapFusion("mean", 1.0, 1.0, swin_weight=0.3)
    assert np.allclose(MapFusion("mean", 1.0, 1.0, swin_weight=0.3, swin_excess=0.8)(p, d),
                       0.3 * p + 0.7 * d + 0.8 * np.array([0, 0, 0, 0.5, 1.0]))
    assert np.array_equal(MapFusion("mean", 1.0, 1.0, swin_weight=0.3, swin_excess=0.0)(p, d), plain(p, d))
    assert np.allclose(MapFusion("max", 1.0, 1.0, swin_excess=2.0)(p, d), np.maximum(p, d) + 2 * np.maximum(p - 1, 0))
    d2 = np.array([0.5, 1.4, 0.4, 3.0, 1.0], np.float32)
    assert np.allclose(MapFusion("mean", 1.0, 1.0, swin_weight=0.3, swin_excess=0.8, distance_excess=1.2)(p, d2),
                       0.3 * p + 0.7 * d2 + 0.8 * np.maximum(p - 1, 0) + 1.2 * np.array([0, 0.4, 0, 2.0, 0]))
    for bad in (-0.1, float("nan"), float("inf")):
        for name in ("swin_excess", "distance_excess"):
            with pytest.raises(ValueError, match=name):
                MapFusion("mean", 1.0, 1.0, **{name: bad})
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    swin = Inspector(load_bundle(fitted[0]), anomaly_map="swin")
    median = float(np.median(swin.scorer.block_evidence(*swin.features(image))[1]))

    def served_with_excess(m: dict) -> None:  # a schema-6 bundle serving its fused map, the excess added, its
        m.update(schema_version=6)            # Swin scale at this image's median block (the demo's Swin is weak)
        m["scoring"].update(anomaly_map="fused")
        m["scoring"]["fusion"].update(rule="mean", swin_weight=0.3, swin_excess=0.8, swin_scale=median)
        m["scoring"]["fusion"]["distance_scale"] *= 0.5  # the distance above its normal extreme in places too

    path = tmp_path / "b"
    bundle = _with_later_section(fitted[0], path, served_with_excess, "scoring.fusion.swin_excess", 7)
    f = bundle.manifest.scoring.fusion
    assert f.swin_excess_weight == 0.8 and f.distance_excess is None and f.distance_excess_weight == 0.0
    assert load_bundle(fitted[0]).manifest.scoring.fusion.swin_excess_weight == 0.0  # absent: nothing added
    _rewrite_manifest(path, lambda m: m["scoring"]["fusion"].update(distance_excess=1.2))
    bundle = load_bundle(path)
    inspector = Inspector(bundle)
    assert inspector.fusion.swin_excess == 0.8 and inspector.fusion.distance_excess == 1.2
    pcf, desc = inspector.features(image)
    distance, probability = inspector.scorer.block_evidence(pcf, desc)
    scaled, scaled_d = probability / f.swin_scale, distance / f.distance_scale
    assert (scaled > 1.0).any() and (scaled < 1.0).any() and (scaled_d > 1.0).any()
    expected = (0.3 * scaled + 0.7 * scaled_d + 0.8 * np.maximum(scaled - 1.0, 0.0)
                + 1.2 * np.maximum(scaled_d - 1.0, 0.0))
    assert np.allclose(inspector.scorer.score(pcf, desc).block_map.ravel(), expected, atol=1e-5)
    own = evaluate_bundle(path, demo_data, tmp_path / "own", overlays=0, progress=False)
    other = evaluate_bundle(path, demo_data, tmp_path / "other", overlays=0, progress=False, swin_excess=0.0)
    plain = evaluate_bundle(path, demo_data, tmp_path / "plain", overlays=0, progress=False, distance_excess=0.0)
    assert own["fusion_swin_excess"] == 0.8 and own["fusion_distance_excess"] == 1.2 and own["threshold"] is not None
    assert other["fusion_swin_excess"] == 0.0 and other["threshold"] is None and other["pixel_ap"] != own["pixel_ap"]
    assert plain["fusion_distance_excess"] == 0.0 and plain["threshold"] is None
    with pytest.raises(ValueError, match="swin_excess"):
        Inspector(bundle, swin_excess=-1.0)
    calibrate(path, demo_data / "train" / "good", tmp_path / "cal", holdout=0.25, quiet=True)
    cal = load_bundle(tmp_path / "cal")
    c = cal.manifest.scoring.fusion
    assert c.swin_excess == 0.8 and c.distance_excess == 1.2 and cal.manifest.schema_version == 7
    assert Inspector(cal).fusion.distance_excess == 1.2
    _rewrite_manifest(path, lambda m: m["scoring"]["fusion"].update(swin_excess=0))
    with pytest.raises(BundleError, match="swin_excess"):
        load_bundle(path)
    _rewrite_manifest(path, lambda m: m["scoring"]["fusion"].update(swin_excess=0.8, distance_excess=-1))
    with pytest.raises(BundleError, match="distance_excess"):
        load_bundle(path)


def test_fused_manifest_without_scales_is_refused(fitted, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(fitted[0], path)
    _rewrite_manifest(path, lambda m: m["scoring"].update(anomaly_map="fused", fusion=None))
    with pytest.raises(BundleError, match="fusion"):
        load_bundle(path)
    _rewrite_manifest(path, lambda m: m["scoring"].pop("fusion"))
    with pytest.raises(BundleError, match="fusion"):
        load_bundle(path)


def test_a_bundle_that_refines_its_heatmap_refines_it_by_the_frame(fitted, demo_data, tmp_path):
    from edge_runtime.core.preprocess import to_input_tensor
    from edge_runtime.core.scoring import HeatmapRefiner

    path = tmp_path / "b"
    settings = {"guide_radius": 4, "guide_eps": 0.001, "contrast_weight": 0.15, "contrast_sigma": 2.0}
    bundle = _with_later_section(fitted[0], path, lambda m: m["scoring"].update(refine=settings), "scoring.refine", 4)
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    refined = Inspector(bundle).inspect(image)
    plain = Inspector(bundle, refine=False).inspect(image)
    assert Inspector(load_bundle(fitted[0])).refiner is None  # a bundle without the section: as before
    guide = to_input_tensor(image, tuple(bundle.manifest.preprocessing.input_size))[0].mean(axis=0)  # numpy's own
    assert np.allclose(refined.heatmap, HeatmapRefiner(**settings)(plain.heatmap, guide), atol=1e-6)
    assert not np.allclose(refined.heatmap, plain.heatmap)
    assert refined.score == plain.score and refined.verdict == plain.verdict  # the verdict is not the heatmap's
    metrics = evaluate_bundle(path, demo_data, tmp_path / "eval", overlays=0, progress=False)
    ablation = evaluate_bundle(path, demo_data, tmp_path / "eval_plain", overlays=0, progress=False, refine=False)
    assert metrics["heatmap_refined"] and not ablation["heatmap_refined"]
    assert metrics["image_auroc"] == ablation["image_auroc"] and metrics["pixel_ap"] != ablation["pixel_ap"]
    _rewrite_manifest(path, lambda m: m["scoring"]["refine"].update(guide_eps=0))
    with pytest.raises(BundleError, match="guide_eps"):
        load_bundle(path)


def test_a_bundle_that_scales_its_heatmap_by_its_peak_keeps_its_regions(fitted, demo_data, tmp_path):
    """scoring.refine.peak_power (schema 6): the refined heatmap times (thresholds.pixel / its own peak) ** power,
    served after the regions are taken on the refined map, so the regions and the verdict are those without it."""
    settings = {"guide_radius": 4, "guide_eps": 0.001, "contrast_weight": 0.15, "contrast_sigma": 2.0}
    refined = _with_later_section(fitted[0], tmp_path / "refined", lambda m: m["scoring"].update(refine=settings),
                                  "scoring.refine", 4)
    path = tmp_path / "peak"
    bundle = _with_later_section(tmp_path / "refined", path,
                                 lambda m: m["scoring"]["refine"].update(peak_power=0.25),
                                 "scoring.refine.peak_power", 6)
    assert refined.manifest.scoring.refine.peak_power is None  # absent: not scaled, as before
    pixel = bundle.manifest.thresholds.pixel
    failing = 0
    defective = [p for d in sorted((demo_data / "test").iterdir()) if d.name != "good" for p in list_images(d)]
    for path_image in defective[::2]:
        image = read_image(path_image)
        scaled, plain = Inspector(bundle).inspect(image), Inspector(refined).inspect(image)
        factor = (pixel / plain.heatmap.max()) ** 0.25
        assert np.allclose(scaled.heatmap, plain.heatmap * factor, rtol=1e-5, atol=1e-7) and factor != 1
        assert (np.diff(scaled.heatmap.ravel()[np.argsort(plain.heatmap, axis=None)]) >= 0).all()  # same order
        assert scaled.score == plain.score and scaled.verdict == plain.verdict
        assert [r.to_json() for r in scaled.regions] == [r.to_json() for r in plain.regions]
        failing += plain.verdict == "fail" and bool(plain.regions)
    assert failing  # the regions compared include some
    metrics = evaluate_bundle(path, demo_data, tmp_path / "eval", overlays=0, progress=False)
    before = evaluate_bundle(tmp_path / "refined", demo_data, tmp_path / "eval_before", overlays=0, progress=False)
    assert metrics["image_auroc"] == before["image_auroc"] and metrics["pixel_ap"] != before["pixel_ap"]
    for power in (0, 1):
        _rewrite_manifest(path, lambda m, p=power: m["scoring"]["refine"].update(peak_power=p))
        with pytest.raises(BundleError, match="peak_power"):
            load_bundle(path)


def test_a_bundle_that_inspects_shifted_frames_serves_their_average(fitted, demo_data, tmp_path):
    """scoring.frame_shift (schema 5): the heatmap is the mean of the frame's and of the frame moved by half a
    block down, right and both, each moved back, and the verdict's score the mean of the four scores."""
    from edge_runtime.core.preprocess import to_input_tensor
    from edge_runtime.core.scoring import shifted_frame, unshifted_heatmap

    path = tmp_path / "b"
    bundle = _with_later_section(fitted[0], path, lambda m: m["scoring"].update(frame_shift=4),
                                 "scoring.frame_shift", 5)
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    shifted = Inspector(bundle).inspect(image)
    plain = Inspector(bundle, frame_shift=0).inspect(image)
    assert Inspector(load_bundle(fitted[0])).shift_offsets == ()  # a bundle without the section: as before
    assert "shifts" in shifted.timings_ms and "shifts" not in plain.timings_ms
    # the same averages, made by hand from the scorer's heatmaps and scores of the moved frames
    reference = Inspector(bundle, frame_shift=0)
    tensor = to_input_tensor(image, tuple(bundle.manifest.preprocessing.input_size))
    heatmap, scores = plain.heatmap.copy(), [plain.score]
    for dy, dx in ((0, 4), (4, 0), (4, 4)):
        out = reference.backbone.run({"image": shifted_frame(tensor, dy, dx)})
        moved = reference.scorer.score(out["pcf"][0], out["descriptor"][0])
        heatmap += unshifted_heatmap(moved.heatmap, dy, dx)
        scores.append(moved.score)
    assert np.allclose(shifted.heatmap, heatmap / 4, atol=1e-5) and not np.allclose(shifted.heatmap, plain.heatmap)
    assert shifted.score == pytest.approx(np.mean(scores), rel=1e-6) and shifted.score != plain.score
    assert shifted.verdict == ("fail" if shifted.score >= bundle.manifest.thresholds.image else "pass")
    metrics = evaluate_bundle(path, demo_data, tmp_path / "eval", overlays=0, progress=False)
    ablation = evaluate_bundle(path, demo_data, tmp_path / "eval_plain", overlays=0, progress=False, frame_shift=0)
    assert metrics["frame_shift"] == 4 and ablation["frame_shift"] == 0 and metrics["pixel_ap"] != ablation["pixel_ap"]
    # the bundle's threshold belongs to the scores it was estimated on: none is reported for the frames alone
    assert metrics["threshold"] == bundle.manifest.thresholds.image and ablation["threshold"] is None
    with pytest.raises(ValueError, match="frame_shift"):
        Inspector(bundle, frame_shift=8)  # a whole block (the stride): no finer grid
    _rewrite_manifest(path, lambda m: m["scoring"].update(frame_shift=8))
    with pytest.raises(BundleError, match="frame_shift is 8 px, not less than the backbone's stride 8"):
        load_bundle(path)


def test_verdict_on_the_distance_with_the_swin_heatmap(fitted, demo_data):
    """image_score: distance takes the verdict's score from the distance map and keeps the Swin's heatmap."""
    bundle = load_bundle(fitted[0])
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    swin = Inspector(bundle, anomaly_map="swin").inspect(image)
    nn = Inspector(bundle, anomaly_map="nn_distance").inspect(image)
    mixed = Inspector(bundle, anomaly_map="swin", image_score="distance").inspect(image)
    assert mixed.score == pytest.approx(nn.score, rel=1e-6) and np.array_equal(mixed.heatmap, swin.heatmap)
    with pytest.raises(ValueError, match="image_score"):
        Inspector(bundle, image_score="median")


def test_fused_bundle_with_the_verdict_on_the_distance(tmp_path, demo_data, small_config):
    """The recommended way to fit: fused map, verdict on the distance; two thresholds, each on its own scale,
    and field calibration keeps both."""
    from calibration.fit import calibrate
    from training_host.config import RefineConfig
    from training_host.training.fit import fit_product

    cfg = small_config.model_copy(update={"scoring": small_config.scoring.model_copy(
        update={"fusion": "mean", "image_score": "distance", "frame_shift": 4, "fusion_swin_excess": 0.4,
                "fusion_distance_excess": 1.2,
                "refine": RefineConfig(guide_radius=4, peak_power=0.25)})})
    out = tmp_path / "fused"
    summary = fit_product(cfg, demo_data, out, progress=False)
    m = load_bundle(out).manifest
    assert summary.anomaly_map == "fused" and m.scoring.image_score == "distance" and m.scoring.fusion.rule == "mean"
    assert m.scoring.frame_shift == 4 and m.scoring.refine.peak_power == 0.25
    assert m.scoring.fusion.swin_excess == 0.4 and m.scoring.fusion.distance_excess == 1.2
    assert m.schema_version == 7  # the Swin's excess needs schema 7 (the peak scaling 6, the shift 5, the refinement 4)
    assert 0 < m.thresholds.pixel < 5 < m.thresholds.image  # fused units (1 = most extreme normal); a distance
    inspector = open_inspector(out)
    result = inspector.inspect(read_image(list_images(demo_data / "test" / "scratch")[0]))
    assert result.threshold == m.thresholds.image and "swin" in result.timings_ms and "shifts" in result.timings_ms
    if result.verdict == "fail":
        assert all(r.peak >= m.thresholds.pixel for r in result.regions)
    # the verdict does not rest on the Swin: the threshold also uses the 24 bank images' leave-one-out scores
    t = summary.threshold_estimate
    assert t["n_scores"] == 30 and t["n_leave_one_out"] == 24 and t["n_holdout_images"] == 6
    assert t["source"] == "holdout+loo" and 0 <= t["holdout_above_threshold"] <= 6
    # the threshold rests on the scores the edge computes, each the mean of four shifted frames: the highest
    # held-out score the fit used is the edge's own for those images
    _, holdout = split_holdout(list_images(demo_data / "train" / "good"), cfg.threshold.holdout_fraction, cfg.seed)
    edge = [inspector.inspect(read_image(p)).score for p in holdout]
    assert max(edge) == pytest.approx(t["holdout_quantile"], rel=2e-3)
    frames_alone = [Inspector(load_bundle(out), frame_shift=0).inspect(read_image(p)).score for p in holdout]
    assert max(frames_alone) != pytest.approx(t["holdout_quantile"], rel=2e-3)
    assert m.thresholds.n_holdout_images == 6 and m.thresholds.n_leave_one_out == 24
    report = calibrate(out, demo_data / "train" / "good", tmp_path / "cal", holdout=0.25, quiet=True)
    assert report.threshold.n_leave_one_out == 22 and report.threshold.n_scores == 30  # 8 held out + 22 bank frames
    cal = load_bundle(tmp_path / "cal").manifest
    assert report.threshold.threshold == cal.thresholds.image and cal.thresholds.pixel != cal.thresholds.image
    assert cal.scoring.image_score == "distance" and cal.scoring.frame_shift == 4 and cal.schema_version == 7
    assert cal.scoring.refine == m.scoring.refine
    assert cal.scoring.fusion.distance_scale != m.scoring.fusion.distance_scale  # rescaled on the new bank


def test_standardised_verdict_fits_scores_and_recalibrates(tmp_path, demo_data, small_config, fitted_slice):
    """image_score: reference_standardised: every reference image's leave-one-out distances in the bundle, the
    verdict on the distance map standardised against the K retrieved references', the heatmap unchanged; field
    calibration refits the maps with its new references."""
    from calibration.fit import calibrate
    from edge_runtime.core.scoring import heatmap_from_blocks, image_score
    from training_host.config import RefineConfig
    from training_host.training.fit import fit_product

    cfg = small_config.model_copy(update={
        "swin": small_config.swin.model_copy(update={"enabled": False}),
        "scoring": small_config.scoring.model_copy(update={"image_score": "reference_standardised",
                                                           "refine": RefineConfig(guide_radius=4)})})
    out = tmp_path / "std"
    summary = fit_product(cfg, demo_data, out, progress=False)
    bundle = load_bundle(out)
    m, a = bundle.manifest, bundle.arrays
    rd = a["reference_distances"]
    assert m.scoring.image_score == "reference_standardised" and m.schema_version == 4
    assert m.scoring.refine.guide_radius == 4 and m.scoring.refine.contrast_weight == RefineConfig().contrast_weight
    assert m.scoring.refine.peak_power is None  # off in the config: absent, so schema 4 is enough
    assert rd.shape == (m.posfar.n_reference_images, *m.backbone.grid) and rd.dtype == np.float16
    assert summary.threshold_estimate["n_leave_one_out"] == 24
    assert m.thresholds.pixel != m.thresholds.image  # the heatmap (raw distance) has a threshold of its own
    image = read_image(list_images(demo_data / "test" / "scratch")[0])
    inspector = open_inspector(out)
    result = inspector.inspect(image)
    raw = Inspector(bundle, image_score="map").inspect(image)
    assert np.array_equal(result.heatmap, raw.heatmap) and result.score != raw.score
    pcf, desc = inspector.features(image)
    ev = inspector.scorer.evidence(pcf, desc)
    refs = rd[ev.references].astype(np.float32)
    z = (ev.distance.reshape(m.backbone.grid) - refs.mean(0)) / np.maximum(refs.std(0), 1e-6)
    expected = image_score(heatmap_from_blocks(z, inspector.input_hw, m.scoring.blur_sigma), m.scoring.score_pool)
    assert result.score == pytest.approx(expected, rel=1e-4)
    against_all = Inspector(bundle, image_score="standardised").inspect(image)
    assert against_all.score != result.score and np.array_equal(against_all.heatmap, raw.heatmap)
    # every fit stores the maps, so an older profile's bundle can be evaluated this way too
    assert "reference_distances" in load_bundle(fitted_slice[0]).arrays
    Inspector(load_bundle(fitted_slice[0]), image_score="reference_standardised").inspect(image)
    # field calibration: new references and a new bank, so new leave-one-out maps
    calibrate(out, demo_data / "train" / "good", tmp_path / "cal", holdout=0.25, quiet=True)
    cal = load_bundle(tmp_path / "cal")
    assert cal.manifest.scoring.image_score == "reference_standardised"
    assert cal.manifest.scoring.refine == m.scoring.refine
    assert cal.arrays["reference_distances"].shape == (cal.manifest.posfar.n_reference_images, *m.backbone.grid)
    assert open_inspector(tmp_path / "cal").inspect(image).threshold == cal.manifest.thresholds.image


def test_standardised_verdict_without_its_maps_is_refused(fitted_slice, tmp_path):
    """A bundle that asks for a standardised verdict must carry the reference distance maps; an older bundle
    without them still serves its own way, and cannot be scored standardised, saying why."""
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "b"
    shutil.copytree(fitted_slice[0], path)
    arrays = load_file(str(path / ARRAYS))
    arrays.pop("reference_distances")
    save_file(arrays, str(path / ARRAYS))

    def without_maps(image_score):
        def edit(m):
            m["scoring"]["image_score"] = image_score
            m["files"][ARRAYS].update(sha256=sha256_of(path / ARRAYS), size=(path / ARRAYS).stat().st_size)
            m["files"][ARRAYS]["arrays"].pop("reference_distances", None)
        return edit

    _rewrite_manifest(path, without_maps("reference_standardised"))
    with pytest.raises(BundleError, match="reference_distances"):
        load_bundle(path)
    _rewrite_manifest(path, without_maps("map"))
    bundle = load_bundle(path)  # a bundle fitted before the maps existed still loads and serves
    with pytest.raises(ValueError, match="reference distance maps"):
        Inspector(bundle, image_score="standardised")


class _RecordingMaker:
    """Stands in for the residual-field maker (a fitted bank is beside the point here): keeps what it was given
    and returns one field per image whose labels are the masks' block labels."""

    input_hw = (128, 128)
    grid = (16, 16)

    def __init__(self) -> None:
        self.calls: list[tuple[list, list, list, str]] = []

    def make(self, images, masks, exclude, kind):
        import torch

        from training_host.data.synthetic import block_labels
        from training_host.training.residual_data import ResidualSet

        self.calls.append((images, masks, exclude, kind))
        labels = np.stack([block_labels(m, self.grid) for m in masks]) if images else np.zeros((0, *self.grid))
        return ResidualSet(torch.zeros((len(images), *self.grid, 2), dtype=torch.float16),
                           torch.from_numpy(labels.astype(np.int8)), [kind] * len(images))


def test_real_defects_are_also_transplanted_into_good_bank_images(object_data):
    from training_host.training.residual_data import defect_fields, pick_defects, read_resized

    defects = pick_defects(object_data, 3, seed=1)
    bank = sorted((object_data / "train" / "good").iterdir())
    maker = _RecordingMaker()
    plain, errors = defect_fields(maker, defects)
    assert len(plain) == 3 and not errors and len(maker.calls) == 1  # no transplants unless asked
    maker = _RecordingMaker()
    data, errors = defect_fields(maker, defects, bank, transplants=4, seed=0)
    assert not errors and len(data) == 3 + 12 and data.count("defect") == 15
    (real, real_masks, real_exclude, _), (pasted, pasted_masks, exclude, kind) = maker.calls
    assert real_exclude == [None] * 3 and kind == "defect" and len(pasted) == 12
    targets = read_resized([bank[j] for j in exclude], maker.input_hw)[0]
    for k, (image, mask, target) in enumerate(zip(pasted, pasted_masks, targets, strict=True)):
        source_mask = real_masks[k // 4]
        assert mask.sum() == pytest.approx((source_mask > 0.5).sum())  # defect k // 4, whole
        near = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0
        assert np.array_equal(image[~near], target[~near])  # the bank image it names, changed only there
        assert not np.array_equal(image, target)
    again = _RecordingMaker()
    defect_fields(again, defects, bank, transplants=4, seed=0)
    assert again.calls[1][2] == exclude  # seeded: the same bank images ...
    assert all(np.array_equal(a, b) for a, b in zip(again.calls[1][1], pasted_masks, strict=True))  # ... and places


def test_an_ensemble_bundle_serves_the_mean_of_its_swins_and_refits_from_their_checkpoints(tmp_path, demo_data,
                                                                                            small_config):
    import torch
    from safetensors.torch import load_file

    from edge_runtime.core.engines import OnnxRuntimeEngine
    from training_host.models.swin import ResidualSwin, SwinShape
    from training_host.training.fit import TrainingOptions, fit_product

    swin = small_config.swin.model_copy(update={"members": 2, "steps": 30})
    cfg = small_config.model_copy(update={"swin": swin})
    out = tmp_path / "bundle"
    summary = fit_product(cfg, demo_data, out, progress=False, options=TrainingOptions(cache_dir=tmp_path / "cache"))
    m = load_bundle(out).manifest
    assert "2 Swins averaged" in m.training.supervision
    assert [p["member"] for p in summary.swin["phases"]] == [0, 1]
    ckpt = tmp_path / "bundle.ckpt"
    members = []
    for path in (ckpt / "unsupervised.safetensors", ckpt / "member1" / "unsupervised.safetensors"):
        tensors = load_file(str(path))
        grid = tensors["ema.pos_embed"].shape[1:3]
        model = ResidualSwin(SwinShape(in_dim=summary.d_f, embed_dim=swin.embed_dim,
                                       depth=swin.depth, heads=swin.heads, window=swin.window,
                                       mlp_ratio=swin.mlp_ratio, train_window=swin.train_window,
                                       window_stride=swin.window_stride, grid=tuple(grid)))
        model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        members.append(model.eval())
    field = torch.rand(1, *grid, summary.d_f) * 3
    with torch.no_grad():
        probs = [mm(field).reshape(1, -1).numpy() for mm in members]
    engine = OnnxRuntimeEngine(out / SWIN)
    served = engine.run({"residual": field.reshape(1, -1, summary.d_f).numpy()})["probability"]
    assert not np.allclose(probs[0], probs[1], atol=1e-3)  # two different Swins ...
    assert np.allclose(served, (probs[0] + probs[1]) / 2, atol=1e-4)  # ... and the bundle serves their mean
    with pytest.raises(ValueError, match="members is 2: give the earlier fit's checkpoint folder"):
        fit_product(cfg, demo_data, tmp_path / "again", progress=False,
                    options=TrainingOptions(init=ckpt / "unsupervised.safetensors"))
    # the checkpoint folder starts each member from its own weights: nothing trained, the same two Swins served
    summary = fit_product(cfg, demo_data, tmp_path / "again", progress=False,
                          options=TrainingOptions(init=ckpt, cache_dir=tmp_path / "cache"))
    assert summary.swin["phases"] == []
    again = OnnxRuntimeEngine(tmp_path / "again" / SWIN).run({"residual": field.reshape(1, -1, summary.d_f).numpy()})
    assert np.allclose(again["probability"], served, atol=1e-5)
    shutil.copytree(ckpt, tmp_path / "one.ckpt", ignore=shutil.ignore_patterns("member1"))
    with pytest.raises(ValueError, match="no member1/unsupervised.safetensors for member 1 of 2"):
        fit_product(cfg, demo_data, tmp_path / "third", progress=False,
                    options=TrainingOptions(init=tmp_path / "one.ckpt"))
