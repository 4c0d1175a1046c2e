"""TensorRT plans (edge_runtime/core/tensorrt_plans.py): keyed so a stale plan is never used, cached beside the
bundle and never inside it, and ``build-engines`` says clearly what it lacks.  TensorRT cannot run on the machines
the suite runs on: building and running a real plan is tested where ``tensorrt_or_reason`` finds TensorRT and a
GPU, and skips with the reason elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_runtime.core.bundle import load_bundle
from edge_runtime.core.engines import EngineUnavailable
from edge_runtime.core.tensorrt_plans import (
    PlanSettings,
    StalePlan,
    check_plan,
    default_cache_root,
    ensure_plans,
    input_shapes,
    plan_dir,
    plan_key,
    store_plan,
    tensorrt_or_reason,
)

TRT, NO_TRT = tensorrt_or_reason()
RECORD = {"graph": "backbone.onnx", "graph_sha256": "ab" * 32, "settings": "{}", "tensorrt": "10.9.0",
          "compute_capability": "8.7", "built_at": "2026-12-04T12:00:00+0000", "build_seconds": 1.0}


def test_the_key_changes_with_the_graph_the_settings_tensorrt_and_the_gpu_and_only_then():
    settings = PlanSettings(shapes={"image": (1, 3, 256, 256)})
    base = plan_key("ab" * 32, settings, "10.9.0", "8.7")
    assert base == plan_key("ab" * 32, PlanSettings(shapes={"image": (1, 3, 256, 256)}), "10.9.0", "8.7")
    others = [plan_key("cd" * 32, settings, "10.9.0", "8.7"),
              plan_key("ab" * 32, PlanSettings(shapes={"image": (1, 3, 384, 384)}), "10.9.0", "8.7"),
              plan_key("ab" * 32, PlanSettings(precision="fp32", shapes=settings.shapes), "10.9.0", "8.7"),
              plan_key("ab" * 32, PlanSettings(workspace_mb=512, shapes=settings.shapes), "10.9.0", "8.7"),
              plan_key("ab" * 32, settings, "10.10.0", "8.7"),
              plan_key("ab" * 32, settings, "10.9.0", "8.9")]
    assert len({base, *others}) == 1 + len(others)


def test_input_shapes_come_from_the_bundle(fitted):
    bundle = load_bundle(fitted[0])
    m, a = bundle.manifest, bundle.arrays
    shapes = input_shapes(bundle)
    grid_m = m.backbone.grid[0] * m.backbone.grid[1]
    assert shapes["backbone"] == {"image": (1, 3, *m.preprocessing.input_size)}
    assert shapes["swin"] == {"residual": (1, grid_m, m.backbone.d_f)}
    n_images = a["ref_descriptors"].shape[0]
    matcher = shapes["matcher"]
    assert matcher["bank_features"] == a["bank"].shape
    assert matcher["bank_projected_aug"] == (n_images, a["bank"].shape[0] // n_images, m.posfar.d_l + 1)
    # the shapes are what matcher.onnx declares (the symbolic bank dimensions filled in with this bundle's)
    onnx = pytest.importorskip("onnx")
    declared = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
                for i in onnx.load(str(bundle.matcher_path)).graph.input}
    for name, shape in matcher.items():
        assert len(declared[name]) == len(shape)
        assert all(isinstance(d, str) or d == s for d, s in zip(declared[name], shape, strict=True)), name


def test_plans_live_beside_the_bundle_and_a_stale_one_is_named(fitted, tmp_path):
    import shutil

    bundle_dir = tmp_path / "store" / "demo" / "v1"
    shutil.copytree(fitted[0], bundle_dir)
    root = default_cache_root(bundle_dir)
    assert root == (tmp_path / "store" / "demo" / "engines").resolve() and not root.is_relative_to(bundle_dir)
    directory = plan_dir(root, "8.7", "10.9.0")
    key = plan_key(RECORD["graph_sha256"], PlanSettings(), "10.9.0", "8.7")
    plan = store_plan(directory, "backbone", key, b"serialized plan bytes", RECORD)
    assert plan.parent == directory and plan.name.startswith("backbone-") and plan.suffix == ".plan"
    assert load_bundle(bundle_dir).manifest.product  # the bundle still verifies: nothing was written into it
    assert check_plan(directory, "backbone", key) == (plan, "valid")
    # another key (new graph, settings, TensorRT or GPU): that plan does not exist
    path, why = check_plan(directory, "backbone", plan_key("cd" * 32, PlanSettings(), "10.9.0", "8.7"))
    assert path is None and "no plan backbone-" in why
    # a sidecar that records another key under this key's name
    side = plan.with_suffix(".json")
    record = json.loads(side.read_text())
    side.write_text(json.dumps({**record, "key": "0" * 64}))
    path, why = check_plan(directory, "backbone", key)
    assert path is None and "key differs" in why and side.name in why
    side.write_text(json.dumps(record))
    # a plan whose bytes changed after the build (a truncated copy, a disk error)
    plan.write_bytes(b"serialized plan byte")
    path, why = check_plan(directory, "backbone", key)
    assert path is None and "truncated or altered" in why and plan.name in why
    side.write_text("{not json")
    assert "unreadable" in check_plan(directory, "backbone", key)[1]


def test_without_tensorrt_plans_and_build_engines_say_what_is_missing(fitted, tmp_path):
    if TRT is not None:
        pytest.skip("TensorRT and a GPU are present here")
    with pytest.raises(EngineUnavailable, match="tensorrt: "):
        ensure_plans(load_bundle(fitted[0]), tmp_path / "engines")
    run = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "build-engines", str(fitted[0]), "--cache",
                          str(tmp_path / "engines")], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert "build-engines needs TensorRT and a CUDA device" in run.stderr
    assert not (tmp_path / "engines").exists()
    broken = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "build-engines", str(tmp_path / "nothing")],
                            capture_output=True, text=True)
    assert broken.returncode == 2 and "bundle refused" in broken.stderr


@pytest.mark.skipif(TRT is None, reason=f"TensorRT plans: {NO_TRT}")
def test_plans_build_run_and_match_the_cpu_path(fitted, demo_data, tmp_path):  # pragma: no cover - GPU only
    from edge_runtime.core.pipeline import open_inspector
    from edge_runtime.core.preprocess import list_images, read_image

    bundle = load_bundle(fitted[0])
    cache = tmp_path / "engines"
    plans = ensure_plans(bundle, cache)
    assert {"backbone", "swin"} <= set(plans) and all(p.is_file() for p in plans.values())
    assert ensure_plans(bundle, cache, build_missing=False) == plans  # valid plans are reused, not rebuilt
    cpu = open_inspector(fitted[0], engine="cpu", threads=1)
    gpu = open_inspector(fitted[0], engine="tensorrt")
    for path in list_images(demo_data / "test", recursive=True):
        image = read_image(path)
        want, got = cpu.inspect(image), gpu.inspect(image)
        assert abs(got.score - want.score) <= 1e-3 * max(abs(want.score), 1.0)
        assert np.corrcoef(got.heatmap.ravel(), want.heatmap.ravel())[0, 1] > 0.99
    plans["backbone"].write_bytes(plans["backbone"].read_bytes()[:-16])
    with pytest.raises(StalePlan, match="truncated or altered"):
        ensure_plans(bundle, cache, build_missing=False)


@pytest.mark.skipif(TRT is None, reason=f"TensorRT plans: {NO_TRT}")
def test_a_plan_on_device_arrays_matches_onnx_runtime_on_the_cpu(fitted, tmp_path):  # pragma: no cover - GPU only
    from edge_runtime.core.device_pipeline import require_cupy
    from edge_runtime.core.engines import OnnxRuntimeEngine
    from edge_runtime.core.tensorrt_plans import ROLE_FILES, TensorRTGraph

    cupy = require_cupy()
    bundle = load_bundle(fitted[0])
    plans = ensure_plans(bundle, tmp_path / "engines")
    shapes = input_shapes(bundle)
    rng = np.random.default_rng(0)
    stream = cupy.cuda.Stream(non_blocking=True)
    for role in ("backbone", "swin"):
        graph = TensorRTGraph(plans[role])
        cpu = OnnxRuntimeEngine(bundle.root / ROLE_FILES[role], threads=1)
        first = None
        for _ in range(2):  # twice: the output buffers are allocated once and reused
            inputs = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes[role].items()}
            want = cpu.run(inputs)
            with stream:
                got = graph.run_device({k: cupy.asarray(v) for k, v in inputs.items()}, stream)
            stream.synchronize()
            assert set(got) == set(want)
            if first is not None:
                assert all(got[k].data.ptr == first[k] for k in got)
            first = {k: v.data.ptr for k, v in got.items()}
            for name, ref in want.items():
                out = cupy.asnumpy(got[name]).astype(np.float32)
                assert out.shape == ref.shape, name
                # fp16 plan against the fp32 graph: within fp16 rounding of the output's scale
                assert np.abs(out - ref).max() <= 1e-2 * max(float(np.abs(ref).max()), 1.0), (role, name)
