"""Training host: config validation, datasets, backbones, fit, eval and the calibration refit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edge_runtime.core.bundle import load_bundle
from training_host import cli as train_cli
from training_host.config import ConfigError, load_config
from training_host.data.dataset import load_batch, scan_dataset
from training_host.models.efficientnet_lite import load_efficientnet_lite
from training_host.models.features import PatchFeatureExtractor

from .conftest import REPO


def test_shipped_configs_validate():
    fast = load_config(REPO / "configs" / "products" / "fast.yaml")
    paper = load_config(REPO / "configs" / "products" / "paper.yaml")
    assert fast.backbone.name == "efficientnet_lite0" and fast.input_size == (256, 256)
    assert paper.backbone.name == "wide_resnet50_2" and paper.input_size == (512, 512)
    assert paper.posfar.k_references == 64


def test_the_fine_profile_is_the_fast_profile_with_its_documented_additions():
    """fine.yaml says it is the fast profile setting for setting, plus the Swin ensemble, the shifted heatmap and
    the larger weight of the ensemble's excess over its normal extreme:
    a change to one profile that is not carried to the other fails here."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fast = flat(load_config(REPO / "configs" / "products" / "fast.yaml").model_dump())
    fine = flat(load_config(REPO / "configs" / "products" / "fine.yaml").model_dump())
    differ = {k: (fast.get(k), fine.get(k)) for k in fast.keys() | fine.keys() if fast.get(k) != fine.get(k)}
    assert differ == {"profile": ("fast", "fine"), "swin.members": (1, 3), "scoring.frame_shift": (0, 4),
                      "scoring.fusion_swin_excess": (0.4, 0.8)}


@pytest.mark.parametrize(
    "text, words",
    [
        ("posfar:\n  coreset_ratio: 2\n", "posfar.coreset_ratio"),
        ("input_size: [250, 256]\n", "input_size"),
        ("backbone:\n  name: resnet9000\n", "backbone.name"),
        ("unknown_key: 1\n", "unknown_key"),
        ("- a list\n", "mapping"),
        ("posfar: {d_l: [\n", "YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_fit_cli_refuses_bad_config_before_work(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("posfar:\n  k_references: 0\n")
    assert train_cli.main(["fit", "--config", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "posfar.k_references" in err and "0" in err
    assert not (tmp_path / "b").exists()


def test_dataset_scan_and_unreadable_images(demo_data, tmp_path):
    ds = scan_dataset(demo_data)
    assert len(ds.train) == 30 and {s.defect_type for s in ds.test} >= {"good", "scratch"}
    assert all(s.mask_path and s.mask_path.is_file() for s in ds.test if s.is_defective)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    batch, ok, errors = load_batch([ds.train[0], broken, ds.train[1]], (64, 64))
    assert batch.shape == (2, 3, 64, 64) and ok == [0, 2] and "broken.png" in errors[0]
    with pytest.raises(FileNotFoundError):
        scan_dataset(tmp_path / "none")


def test_test_only_dataset_is_accepted(demo_data, tmp_path):
    shutil.copytree(demo_data / "test", tmp_path / "test")
    shutil.copytree(demo_data / "ground_truth", tmp_path / "ground_truth")
    ds = scan_dataset(tmp_path)
    assert ds.train == [] and ds.test


def test_efficientnet_weights_are_the_imagenet_ones():
    trunk = load_efficientnet_lite("efficientnet_lite0", (2, 4, 10))
    assert trunk.out_channels == (24, 40, 112) and trunk.out_strides == (4, 8, 16)
    # trained batch-norm statistics, not the initial zeros / ones
    assert float(trunk._bn0.running_var.std()) > 0.01
    with pytest.raises(ValueError, match="safetensors"):
        load_efficientnet_lite(weights=REPO / "weights.pth")
    # the larger Lite variants' packages ship their own ImageNet weights; the same stride-8 / stride-16 blocks
    for variant, channels in (("efficientnet_lite1", (40, 112)), ("efficientnet_lite2", (48, 120))):
        trunk = load_efficientnet_lite(variant, (6, 14))
        assert trunk.out_channels == channels and trunk.out_strides == (8, 16) and len(trunk._blocks) == 21
        assert float(trunk._bn0.running_var.std()) > 0.01
    with pytest.raises(ValueError, match="variant"):
        load_efficientnet_lite("efficientnet_lite9")


def test_efficientnet_matches_the_reference_implementation():
    lib = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    from training_host.models.efficientnet_lite import lite_weights_path

    # at each variant's native size: the reference pads for that size once (static "same" padding), ours pads
    # for the size it gets (TensorFlow's rule), and the two agree where the sizes match
    for variant, blocks, size in (("efficientnet_lite0", (4, 10), 224), ("efficientnet_lite1", (6, 14), 240),
                                  ("efficientnet_lite2", (6, 14), 260)):
        ref = lib.EfficientNet.from_pretrained(variant.replace("_", "-"),
                                               weights_path=str(lite_weights_path(variant))).eval()
        ours = load_efficientnet_lite(variant, blocks)
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            y = ref._swish(ref._bn0(ref._conv_stem(x)))
            outs = []
            for i, block in enumerate(ref._blocks[: blocks[-1] + 1]):
                y = block(y)
                if i in blocks:
                    outs.append(y)
            for a, b in zip(ours(x), outs, strict=True):
                assert torch.allclose(a, b, atol=1e-5), variant


def test_extractor_shapes_and_position_code():
    trunk = load_efficientnet_lite("efficientnet_lite0", (2, 4, 10))
    ext = PatchFeatureExtractor(trunk, (128, 96), 176, 0.5, trunk.mean, trunk.std)
    image = torch.rand(2, 3, 128, 96)
    pcf, desc = ext(image)
    assert pcf.shape == (2, 16 * 12, 176) and desc.shape == (2, 64, 24)
    plain, _ = ext.patch_features(image)
    diff = pcf - plain.flatten(2).transpose(1, 2)
    assert torch.allclose(diff[0], diff[1], atol=1e-5) and float(diff.abs().max()) <= 0.5 + 1e-5
    ext.train()
    assert not ext.trunk.training  # stays frozen whatever the caller does
    with pytest.raises(ValueError, match="multiple of 32"):
        PatchFeatureExtractor(trunk, (100, 96), 176, 0.0, trunk.mean, trunk.std)


def test_fit_summary(fitted):
    _, s = fitted
    assert s.n_train == 24 and s.n_holdout == 6
    assert s.n_bank == 24 * round(0.1 * 256)
    assert s.onnx_max_abs_diff < 1e-3 and s.threshold > 0 and s.d_l == 16
    # the verdict rests on the Swin, which was trained on the bank images' fields: by default (auto) their
    # leave-one-out scores are not used, the threshold rests on the 6 held-out images
    t = s.threshold_estimate
    assert t["n_scores"] == 6 and t["n_leave_one_out"] == 0 and t["source"] == "holdout"
    m = load_bundle(fitted[0]).manifest.thresholds
    assert m.n_holdout_images == 6 and m.n_leave_one_out == 0 and m.image == s.threshold


def test_leave_one_out_scores_are_scored_without_their_own_patches(fitted):
    """Scoring a bank image with itself excluded from retrieval never matches its own patches: its distance
    map is far from zero, whereas with itself included it matches itself almost exactly."""
    from edge_runtime.core.pipeline import PosFARScorer

    bundle = load_bundle(fitted[0])
    scorer = PosFARScorer.from_bundle(bundle)
    image = int(bundle.arrays["bank_image"][0])
    rows = bundle.arrays["bank_image"] == image
    pcf = bundle.arrays["bank"][rows].astype(np.float32)  # this image's own coreset patches
    desc = bundle.arrays["ref_descriptors"][image].astype(np.float32)
    own = scorer.residual(np.pad(pcf, ((0, scorer.grid[0] * scorer.grid[1] - len(pcf)), (0, 0)), mode="edge"),
                          desc)
    left_out = scorer.residual(np.pad(pcf, ((0, scorer.grid[0] * scorer.grid[1] - len(pcf)), (0, 0)), mode="edge"),
                               desc, exclude=image)
    assert image in own.references and image not in left_out.references
    assert own.distance[: len(pcf)].max() < 1e-2 < left_out.distance[: len(pcf)].mean()


def test_eval_writes_metrics_and_curves(fitted, demo_data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert train_cli.main(["eval", "--bundle", str(fitted[0]), "--data", str(demo_data), "--out", str(out),
                           "--overlays", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro", "pixel_ap"):
        assert 0.0 <= metrics[key] <= 1.0
        for row in metrics["per_defect"].values():
            assert row[key] is None or 0.0 <= row[key] <= 1.0
    assert set(metrics["per_defect"]) == {"crack", "foreign", "scratch", "stain"}
    assert metrics["pixel_auroc"] > 0.7  # the demo defects are found, not guessed
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "overlays").glob("*.png"))) == 5
    assert "pixel_ap" in capsys.readouterr().out


def test_calibration_refit_from_good_frames(fitted, demo_data, tmp_path):
    from calibration.cli import main as calibrate_main
    from edge_runtime.core.bundle import load_bundle

    out = tmp_path / "cal"
    assert calibrate_main(["fit", "--base", str(fitted[0]), "--images", str(demo_data / "train" / "good"),
                           "--out", str(out), "--json"]) == 0
    base, new = load_bundle(fitted[0]), load_bundle(out)
    assert new.manifest.parent == f"{base.manifest.product}@{base.manifest.bundle_version}"
    assert new.manifest.posfar.n_reference_images == 24  # 30 frames, 20 % held out
    assert new.manifest.files["backbone.onnx"].sha256 == base.manifest.files["backbone.onnx"].sha256
    # the residual Swin carries over unchanged, and the threshold is on its probability scale
    assert new.manifest.files["swin.onnx"].sha256 == base.manifest.files["swin.onnx"].sha256
    assert new.manifest.scoring.anomaly_map == "swin" and new.manifest.swin == base.manifest.swin
    assert 0.0 < new.manifest.thresholds.image < 1.5
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted((demo_data / "train" / "good").glob("*.png"))[:3]:
        shutil.copy(p, few)
    assert calibrate_main(["fit", "--base", str(fitted[0]), "--images", str(few), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert np.isfinite(new.manifest.thresholds.image)


def test_wide_resnet_backbone_through_the_config(tmp_path):
    """The paper's backbone path: user-supplied safetensors weights (random here), ImageNet mean/std."""
    from safetensors.torch import save_file

    from training_host.config import BackboneConfig
    from training_host.models.features import build_extractor
    from training_host.models.wide_resnet import WideResNet50Trunk

    weights = tmp_path / "wrn.safetensors"
    save_file({k: v.contiguous() for k, v in WideResNet50Trunk().state_dict().items()}, str(weights))
    cfg = BackboneConfig(name="wide_resnet50_2", layers=[1, 2, 3], weights=str(weights), d_f=256)
    ext = build_extractor(cfg, (64, 64), lambda_p=0.03)
    pcf, desc = ext(torch.rand(1, 3, 64, 64))
    assert pcf.shape == (1, 64, 256) and desc.shape == (1, 64, 256)
    assert torch.allclose(ext.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    with pytest.raises(ValueError, match="safetensors"):
        build_extractor(BackboneConfig(name="wide_resnet50_2", layers=[1, 2, 3]), (64, 64), 0.03)


def test_the_command_line_starts_without_torch():
    """``weakrest-train push``, ``keys`` and ``--help`` run on a release machine without loading torch (seconds
    of start-up, and a push host need not have it); the commands that train import it when they run."""
    import subprocess
    import sys

    code = "import sys, training_host.cli; sys.exit('torch imported' if 'torch' in sys.modules else 0)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
