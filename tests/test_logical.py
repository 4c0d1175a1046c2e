"""Logical anomalies (issue 13): component classes, the composition summary and its model, the assembly
development product, and the fused verdict through fit, the edge, evaluation and field calibration."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_runtime.core.bundle import MANIFEST, BundleError, load_bundle
from edge_runtime.core.components import Components, LogicalModel, choose_k, kmeans
from edge_runtime.core.pipeline import Inspector, open_inspector
from edge_runtime.core.preprocess import list_images, read_image
from edge_runtime.publishing.messages import ResultMessage
from training_host.data.assembly import DEFECTS, make_assembly_dataset

CENTRES = np.eye(3, 8, dtype=np.float32)  # three component classes, orthogonal feature directions


def _image(layout: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Patch features (M, 8) of an image whose (h, w) class layout is given, with a little noise."""
    return CENTRES[layout.ravel()] * rng.uniform(0.5, 2.0) + rng.normal(0, 0.05, (layout.size, 8)).astype(np.float32)


def _tray(n_parts: int, rng: np.random.Generator) -> np.ndarray:
    """An 8 x 8 layout: background 0, ``n_parts`` separate 2 x 2 parts of class 1, a fixed bar of class 2."""
    layout = np.zeros((8, 8), int)
    layout[7, :] = 2
    spots = rng.choice(9, n_parts, replace=False)
    for s in spots:
        y, x = divmod(int(s), 3)
        layout[y * 2 + y // 2: y * 2 + y // 2 + 2, x * 3: x * 3 + 2] = 1
    return layout


def test_kmeans_and_stability_find_the_component_classes():
    rng = np.random.default_rng(0)
    per_image = [_image(_tray(2, rng), rng) for _ in range(20)]
    k, stability = choose_k(per_image, (2, 3, 4, 5), seed=0)
    assert k == 3 and stability[3] > 0.95
    centres = kmeans(np.concatenate(per_image), 3, seed=0)
    assert np.sort(np.abs(centres @ CENTRES.T).max(axis=0))[0] > 0.99  # each true class has its own centre


def test_composition_summary_and_the_logical_model():
    """A tray with one part too many or one missing is far from the good trays' composition; a good tray
    with its parts elsewhere is not (no position is fixed, only the count)."""
    rng = np.random.default_rng(1)
    components = Components(CENTRES, (8, 8))
    assert components.k == 3 and components.summary_dim == 3 * 9
    assert [g.stop - g.start for g in components.groups()] == [3, 3, 3, 3, 3, 12]
    layout = _tray(2, rng)
    cmap = components(_image(layout, rng))
    assert np.array_equal(cmap.labels, layout)
    assert cmap.summary[:3] == pytest.approx(np.bincount(layout.ravel(), minlength=3) / 64)
    assert cmap.summary[4] == pytest.approx(np.log1p(2))  # two separate parts of class 1
    good = np.stack([components(_image(_tray(2, rng), rng)).summary for _ in range(60)])
    model, crossed = LogicalModel.fit(good, components.groups(), seed=0)
    assert crossed.shape == (60,) and abs(float(crossed.mean())) < 1.5
    new_good = [model(components(_image(_tray(2, rng), rng)).summary) for _ in range(20)]
    extra = [model(components(_image(_tray(3, rng), rng)).summary) for _ in range(20)]
    missing = [model(components(_image(_tray(1, rng), rng)).summary) for _ in range(20)]
    assert min(extra) > max(new_good) and min(missing) > max(new_good)
    with pytest.raises(ValueError, match="at least 4"):
        LogicalModel.fit(good[:3], components.groups())
    with pytest.raises(ValueError, match="at least 2 component centres"):
        Components(CENTRES[:1], (8, 8))


def test_assembly_product_is_deterministic_with_its_defects(tmp_path):
    a = make_assembly_dataset(tmp_path / "a", n_train=3, n_test_good=2, n_test_per_defect=2, size=128)
    b = make_assembly_dataset(tmp_path / "b", n_train=3, n_test_good=2, n_test_per_defect=2, size=128)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 3 + 2 + 2 * len(DEFECTS) * 2  # images and masks
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    masks = {d: [read_image(p) for p in sorted((a / "ground_truth" / d).glob("*.png"))] for d in DEFECTS}
    assert all(m.max() == 0 for m in masks["missing"])  # nothing to point at
    assert all(m.max() > 0 for d in DEFECTS if d != "missing" for m in masks[d])
    with pytest.raises(ValueError, match="unknown defect"):
        from training_host.data.assembly import make_tray
        make_tray("dent", np.random.default_rng(0))


@pytest.fixture(scope="module")
def assembly(tmp_path_factory):
    """A small assembly product and a distance-only bundle with the logical score fused into its verdict."""
    from training_host.config import ProductConfig
    from training_host.training.fit import fit_product

    # 256 px: at 128 a screw is about one patch, and the component classes merge (measured: k = 3, +0.05 AUROC)
    data = make_assembly_dataset(tmp_path_factory.mktemp("asm") / "data", n_train=60, n_test_good=12,
                                 n_test_per_defect=6, size=256)
    cfg = ProductConfig.model_validate({
        "product": "assembly", "input_size": [256, 256], "posfar": {"d_l": 16, "k_references": 8, "lambda_p": 0.15},
        "threshold": {"holdout_fraction": 0.2}, "batch_size": 8, "swin": {"enabled": False},
        "scoring": {"image_score": "reference_standardised"},
        "logical": {"enabled": True, "k_candidates": [3, 4, 5, 6]},
    })
    out = tmp_path_factory.mktemp("asm") / "bundle"
    summary = fit_product(cfg, data, out, progress=False)
    return data, out, summary


def test_logical_bundle_fits_scores_and_explains_its_verdict(assembly, tmp_path):
    from training_host.evaluation.evaluate import evaluate_bundle

    data, out, summary = assembly
    bundle = load_bundle(out)
    lg = bundle.manifest.logical
    assert lg is not None and 3 <= lg.k <= 6 and set(lg.stability) == {"3", "4", "5", "6"}
    assert lg.stability[str(lg.k)] >= max(lg.stability.values()) - 0.01  # the most stable (largest of ties)
    assert bundle.arrays["component_centres"].shape == (lg.k, bundle.manifest.backbone.d_f)
    assert summary.threshold_estimate["n_leave_one_out"] == 48
    inspector = open_inspector(out)
    result = inspector.inspect(read_image(list_images(data / "test" / "missing")[0]))
    assert "logical" in result.timings_ms and result.evidence is not None
    ev = result.evidence
    assert result.score == pytest.approx(max(ev["structural"], ev["logical"]), abs=1e-3)  # rule max
    assert len(ev["components"]) == lg.k and sum(ev["components"]) == pytest.approx(1.0, abs=1e-3)
    message = ResultMessage(seq=0, frame_id=0, camera="c", product="assembly", bundle_version="v", captured_at=0.0,
                            **{k: v for k, v in result.to_json().items() if k != "regions"})
    assert message.evidence is not None and message.evidence.logical == ev["logical"]
    # the component score finds what the structural score cannot: parts missing or one too many
    fused = evaluate_bundle(out, data, tmp_path / "fused", progress=False)
    structural = evaluate_bundle(out, data, tmp_path / "structural", progress=False, logical_verdict="structural")
    logical = evaluate_bundle(out, data, tmp_path / "logical", progress=False, logical_verdict="logical")
    assert (fused["logical_verdict"], structural["logical_verdict"], logical["logical_verdict"]) == (
        "fused", "structural", "logical")
    assert structural["threshold"] is None and logical["threshold"] is None and fused["threshold"] is not None
    assert fused["image_auroc"] > structural["image_auroc"] + 0.05


def test_logical_arrays_belong_with_their_section(assembly, tmp_path):
    _, out, _ = assembly
    path = tmp_path / "b"
    shutil.copytree(out, path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.pop("logical")
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="logical section must come together"):
        load_bundle(path)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["schema_version"] == 3  # a schema-2 runtime refuses it by its version, not by a stray key
    manifest["schema_version"] = 2
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="needs schema version 3"):
        load_bundle(path)
    assert Inspector(load_bundle(out), logical_verdict="structural").scorer.logical is None


def test_bundles_without_a_logical_score_are_served_as_before(fitted_slice, demo_data):
    bundle = load_bundle(fitted_slice[0])
    assert bundle.manifest.logical is None and bundle.manifest.schema_version == 2
    result = open_inspector(fitted_slice[0]).inspect(read_image(list_images(demo_data / "test" / "good")[0]))
    assert result.evidence is None and "evidence" not in result.to_json() and "logical" not in result.timings_ms


def test_field_calibration_refits_the_logical_score(assembly, tmp_path):
    from calibration.fit import calibrate

    data, out, _ = assembly
    calibrate(out, data / "train" / "good", tmp_path / "cal", holdout=0.25, quiet=True)
    base, cal = load_bundle(out), load_bundle(tmp_path / "cal")
    assert cal.manifest.logical.k == base.manifest.logical.k
    assert np.array_equal(cal.arrays["component_centres"], base.arrays["component_centres"])  # same classes
    assert not np.array_equal(cal.arrays["logical_mean"], base.arrays["logical_mean"])  # the frames' composition
    assert cal.manifest.logical.structural_mean != base.manifest.logical.structural_mean
    result = open_inspector(tmp_path / "cal").inspect(read_image(list_images(data / "test" / "extra")[0]))
    assert result.evidence is not None and result.threshold == cal.manifest.thresholds.image


def test_a_bad_logical_section_is_refused_naming_it(tmp_path):
    from training_host.config import ConfigError, load_config

    path = tmp_path / "p.yaml"
    for section, words in [("{enabled: true, k_candidates: [1, 4]}", "logical.k_candidates"),
                           ("{enabled: true, fusion: mean}", "logical.fusion"),
                           ("{enabled: true, k: 1}", "logical.k"), ("{enable: true}", "logical.enable")]:
        path.write_text(f"product: p\nlogical: {section}\n")
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            load_config(path)
