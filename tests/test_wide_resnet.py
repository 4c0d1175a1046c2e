"""Tests for the self-contained torchvision wide_resnet50_2 trunk and the .pth -> safetensors converter."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training_host.models.wide_resnet import WideResNet50Trunk, load_wide_resnet50_2

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / "tools" / "convert_torch_weights.py"

LAYERS = (3, 4, 6, 3)
# Hand count of torchvision wide_resnet50_2 state_dict entries:
#   stem: conv1.weight (1) + bn1 (weight, bias, running_mean, running_var, num_batches_tracked = 5)
#   each Bottleneck: 3 convs + 3 BNs * 5 = 18, 16 blocks
#   first block of each of the 4 layers: downsample conv (1) + BN (5) = 6
#   fc.weight + fc.bias = 2
BN_KEYS = 5
EXPECTED_KEYS = (1 + BN_KEYS) + sum(LAYERS) * (3 + 3 * BN_KEYS) + len(LAYERS) * (1 + BN_KEYS) + 2
assert EXPECTED_KEYS == 6 + 16 * 18 + 4 * 6 + 2 == 320


def _randomized_trunk(seed: int) -> WideResNet50Trunk:
    """Trunk with random weights AND random BN statistics (so eval outputs depend on every buffer)."""
    torch.manual_seed(seed)
    model = WideResNet50Trunk()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
        model.fc.weight.normal_()
        model.fc.bias.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def trunk() -> WideResNet50Trunk:
    return _randomized_trunk(0)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trunk) -> Path:
    path = tmp_path_factory.mktemp("w") / "wrn50_2.safetensors"
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
    return path


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- structure


def test_state_dict_key_facts():
    sd = WideResNet50Trunk().state_dict()
    assert len(sd) == EXPECTED_KEYS == 320
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 1 + 3 * sum(LAYERS) + len(LAYERS) == 53
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert tuple(sd[f"bn1.{name}"].shape) == (64,)
    assert sd["bn1.num_batches_tracked"].dtype == torch.long
    # bottleneck widths are doubled relative to resnet50 (64 -> 128 in layer1)
    assert tuple(sd["layer1.0.conv1.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd["layer1.0.conv2.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["layer1.0.conv3.weight"].shape) == (256, 128, 1, 1)
    assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["layer1.0.downsample.1.running_mean"].shape) == (256,)
    assert tuple(sd["layer2.0.conv2.weight"].shape) == (256, 256, 3, 3)
    assert tuple(sd["layer3.0.conv3.weight"].shape) == (1024, 512, 1, 1)
    assert tuple(sd["layer3.5.bn3.running_var"].shape) == (1024,)
    assert tuple(sd["layer4.2.conv2.weight"].shape) == (1024, 1024, 3, 3)
    assert tuple(sd["layer4.0.downsample.0.weight"].shape) == (2048, 1024, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
    assert tuple(sd["fc.bias"].shape) == (1000,)
    # block counts per layer, downsample only in block 0
    for i, n in enumerate(LAYERS, start=1):
        blocks = {k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}
        assert blocks == {str(b) for b in range(n)}
        assert {k.split(".")[1] for k in sd if k.startswith(f"layer{i}.") and ".downsample." in k} == {"0"}
    # v1.5: stride 2 lives on the 3x3 conv, not on conv1
    model = WideResNet50Trunk()
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert model.layer1[0].conv2.stride == (1, 1)


def test_output_shapes(trunk, image):
    with torch.no_grad():
        feats = trunk(image)
    assert isinstance(feats, list)
    assert [tuple(f.shape) for f in feats] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]
    assert WideResNet50Trunk.out_channels == (256, 512, 1024)
    assert WideResNet50Trunk.out_strides == (4, 8, 16)
    for f, c, s in zip(feats, trunk.out_channels, trunk.out_strides, strict=True):
        assert f.shape[1] == c and f.shape[-1] == 64 // s


# ----------------------------------------------------------------------------- loading


def test_roundtrip_identical_outputs(trunk, image, saved):
    loaded = load_wide_resnet50_2(saved)
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    for k, v in trunk.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        _assert_same(trunk(image), loaded(image))
    # str path works too
    assert isinstance(load_wide_resnet50_2(str(saved)), WideResNet50Trunk)


@pytest.mark.parametrize("prefix", ["module.", "model.", "model.module."])
def test_common_prefix_tolerated(tmp_path, trunk, image, prefix):
    path = tmp_path / "prefixed.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
    loaded = load_wide_resnet50_2(path)
    with torch.no_grad():
        _assert_same(trunk(image), loaded(image))


def test_missing_key_refused(tmp_path, trunk):
    sd = {k: v.contiguous() for k, v in trunk.state_dict().items() if k != "layer2.1.conv2.weight"}
    path = tmp_path / "missing.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="missing") as exc:
        load_wide_resnet50_2(path)
    assert "layer2.1.conv2.weight" in str(exc.value)
    assert str(path) in str(exc.value)


def test_unexpected_key_refused(tmp_path, trunk):
    sd = {k: v.contiguous() for k, v in trunk.state_dict().items()}
    sd["head.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="unexpected") as exc:
        load_wide_resnet50_2(path)
    assert "head.extra.weight" in str(exc.value)


def test_wrong_shape_refused(tmp_path, trunk):
    sd = {k: v.contiguous() for k, v in trunk.state_dict().items()}
    sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 3, 3)  # resnet50 width, not wide
    path = tmp_path / "shape.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="shape") as exc:
        load_wide_resnet50_2(path)
    msg = str(exc.value)
    assert "layer1.0.conv2.weight" in msg and "(64, 64, 3, 3)" in msg and "(128, 128, 3, 3)" in msg


def test_missing_num_batches_tracked_tolerated(tmp_path, trunk, image):
    """Old torchvision checkpoints have no num_batches_tracked; it does not affect eval outputs."""
    sd = {k: v.contiguous() for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == 320 - 53
    path = tmp_path / "old.safetensors"
    save_file(sd, str(path))
    loaded = load_wide_resnet50_2(path)
    with torch.no_grad():
        _assert_same(trunk(image), loaded(image))


def test_half_precision_file_loads_as_float32(tmp_path, trunk, image):
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in trunk.state_dict().items()}
    path = tmp_path / "fp16.safetensors"
    save_file(sd, str(path))
    loaded = load_wide_resnet50_2(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.bn1.num_batches_tracked.dtype == torch.long
    with torch.no_grad():
        for a, b in zip(trunk(image), loaded(image), strict=True):
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(a.abs().max()))


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_pickle_refused(tmp_path, trunk, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save(trunk.state_dict(), path)
    with pytest.raises(ValueError, match="pickle") as exc:
        load_wide_resnet50_2(path)
    assert "convert_torch_weights.py" in str(exc.value)
    assert str(path) in str(exc.value)


def test_other_suffix_and_garbage_refused(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        load_wide_resnet50_2(tmp_path / "weights.npz")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_wide_resnet50_2(bad)
    with pytest.raises(FileNotFoundError):
        load_wide_resnet50_2(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------- converter


def _converter_module():
    spec = importlib.util.spec_from_file_location("convert_torch_weights", CONVERTER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_converter_cli_roundtrip(tmp_path, trunk, image):
    src = tmp_path / "wide_resnet50_2.pth"
    dst = tmp_path / "out" / "wide_resnet50_2.safetensors"
    torch.save(trunk.state_dict(), src)
    proc = subprocess.run(
        [sys.executable, str(CONVERTER), str(src), str(dst)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "320" in proc.stdout
    loaded = load_wide_resnet50_2(dst)
    with torch.no_grad():
        _assert_same(trunk(image), loaded(image))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_converter_unwraps_nested(tmp_path, trunk, image, wrapper, capsys):
    conv = _converter_module()
    src = tmp_path / "ckpt.pt"
    dst = tmp_path / "ckpt.safetensors"
    torch.save({"epoch": 3, wrapper: trunk.state_dict()}, src)
    assert conv.main([str(src), str(dst)]) == 0
    assert "wrote 320 tensors" in capsys.readouterr().out
    loaded = load_wide_resnet50_2(dst)
    with torch.no_grad():
        _assert_same(trunk(image), loaded(image))


def test_converter_rejects_bad_input(tmp_path, capsys):
    conv = _converter_module()
    src = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, src)
    assert conv.main([str(src), str(tmp_path / "x.safetensors")]) == 1
    assert "no tensors" in capsys.readouterr().err
    assert conv.main([str(src), str(tmp_path / "x.bin")]) == 1


# ----------------------------------------------------------------------------- torchvision parity


def _torchvision_wrn():
    try:
        import torchvision.models as tvm

        return tvm.wide_resnet50_2(weights=None)
    except Exception as exc:  # ImportError, or a torchvision built against another torch
        pytest.skip(f"torchvision wide_resnet50_2 unavailable: {type(exc).__name__}: {exc}")


def test_matches_torchvision(trunk, image):
    tv = _torchvision_wrn().eval()
    tv_sd = tv.state_dict()
    ours = trunk.state_dict()
    assert set(tv_sd) == set(ours)
    assert list(tv_sd) == list(ours)
    for k, v in ours.items():
        assert tuple(tv_sd[k].shape) == tuple(v.shape), k
    tv.load_state_dict(ours, strict=True)
    with torch.no_grad():
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(image))))
        f1 = tv.layer1(x)
        f2 = tv.layer2(f1)
        f3 = tv.layer3(f2)
        for a, b in zip(trunk(image), (f1, f2, f3), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
