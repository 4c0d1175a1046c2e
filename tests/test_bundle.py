"""The bundle contract: a fitted bundle verifies; any tampering is refused naming the file."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from edge_runtime import cli as edge_cli
from edge_runtime.core.bundle import ARRAYS, BACKBONE, MANIFEST, MATCHER, SWIN, BundleError, load_bundle, pack_bundle


@pytest.fixture()
def bundle_copy(fitted, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(fitted[0], path)
    return path


def test_fitted_bundle_is_valid_and_complete(fitted, capsys):
    path, summary = fitted
    bundle = load_bundle(path)
    m = bundle.manifest
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, BACKBONE, SWIN, MATCHER, ARRAYS])
    assert set(m.files) == {BACKBONE, SWIN, MATCHER, ARRAYS}
    assert m.scoring.anomaly_map == "swin" and m.swin is not None and m.swin.onnx_max_abs_diff < 1e-4
    assert m.training.mode == "unsupervised" and m.training.synthetic_fields > 0 and not m.training.defect_images
    assert bundle.arrays["bank"].dtype.name == "float16"
    assert m.posfar.n_bank == summary.n_bank and m.backbone.grid == (16, 16)
    assert m.producer["weakrest"] and m.created_at
    assert edge_cli.main(["check-bundle", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True


def test_edited_array_file_is_refused_naming_it(bundle_copy, capsys):
    data = bytearray((bundle_copy / ARRAYS).read_bytes())
    data[-10] ^= 0xFF
    (bundle_copy / ARRAYS).write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert err.value.file == ARRAYS and "sha256" in err.value.problem
    assert edge_cli.main(["check-bundle", str(bundle_copy)]) == 1
    assert ARRAYS in capsys.readouterr().out


def test_replaced_array_with_matching_hash_but_wrong_shape_is_refused(bundle_copy):
    from safetensors.numpy import load_file, save_file

    from edge_runtime.core.bundle import sha256_of

    arrays = load_file(str(bundle_copy / ARRAYS))
    arrays["bank"] = arrays["bank"][:, :8].copy()
    save_file(arrays, str(bundle_copy / ARRAYS))
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["files"][ARRAYS].update(sha256=sha256_of(bundle_copy / ARRAYS), size=(bundle_copy / ARRAYS).stat().st_size)
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bank") as err:
        load_bundle(bundle_copy)
    assert err.value.file == ARRAYS


@pytest.mark.parametrize(
    "edit, file, words",
    [
        (lambda m: m.update(schema_version=99), MANIFEST, "schema version 99"),
        (lambda m: m["posfar"].update(k_references="many"), MANIFEST, "posfar.k_references"),
        (lambda m: m["files"].pop(BACKBONE), BACKBONE, "not listed"),
        (lambda m: m["files"][BACKBONE].update(size=1), BACKBONE, "size"),
    ],
)
def test_bad_manifest_is_refused(bundle_copy, edit, file, words):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    edit(manifest)
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=words) as err:
        load_bundle(bundle_copy)
    assert err.value.file == file


def test_missing_and_garbage_files(bundle_copy, tmp_path):
    (bundle_copy / BACKBONE).unlink()
    with pytest.raises(BundleError, match="missing") as err:
        load_bundle(bundle_copy)
    assert err.value.file == BACKBONE
    (bundle_copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nowhere")


def test_corrupt_backbone_graph_with_valid_hash_is_refused(bundle_copy, capsys):
    from edge_runtime.core.bundle import sha256_of

    (bundle_copy / BACKBONE).write_bytes(b"not an onnx graph")
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["files"][BACKBONE].update(sha256=sha256_of(bundle_copy / BACKBONE), size=17)
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    assert edge_cli.main(["check-bundle", str(bundle_copy), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report == {"valid": False, "file": BACKBONE, "problem": report["problem"]}


def test_tar_round_trip_and_unsafe_tar(fitted, tmp_path):
    tar = pack_bundle(fitted[0], tmp_path / "bundle.tar")
    assert load_bundle(tar).manifest.product == "test-product"
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        t.add(fitted[0] / MANIFEST, arcname="../manifest.json")
    with pytest.raises(BundleError, match="unsafe"):
        load_bundle(evil)
