"""The GPU path's math on the CPU: :class:`DeviceMatcher` is the code CuPy runs on the device, and with numpy as
its array module it must choose the same references and the same nearest normal patches and give the same
distances and residuals as the host matcher; the torch stand-in that the GPU benchmark runs the bundle's graphs
with must equal ONNX Runtime.  GPU-only checks skip with the reason when no CUDA device (or CuPy) is here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.core.bundle import load_bundle
from edge_runtime.core.device_matching import DeviceMatcher
from edge_runtime.core.device_pipeline import cupy_or_reason
from edge_runtime.core.matching import MemoryBank, posfar_residual
from edge_runtime.core.pca import PCA
from edge_runtime.core.pipeline import PosFARScorer, open_inspector
from edge_runtime.core.preprocess import list_images, read_image
from edge_runtime.core.retrieval import ReferenceIndex

REPO = Path(__file__).resolve().parents[1]
CUPY, NO_GPU = cupy_or_reason()


def _host_match(scorer: PosFARScorer, pcf: np.ndarray, descriptor: np.ndarray):
    refs = scorer.references.nearest(descriptor, scorer.k)
    match = scorer.bank.match(pcf, refs)
    return refs, match, posfar_residual(pcf, match.matched, scorer.thetas)


def _assert_same(scorer: PosFARScorer, matcher: DeviceMatcher, pcf: np.ndarray, descriptor: np.ndarray) -> None:
    refs, match, residual = _host_match(scorer, pcf, descriptor)
    got = matcher.match(pcf, descriptor)
    np.testing.assert_array_equal(got.references, refs)
    np.testing.assert_array_equal(got.bank_rows, match.bank_rows)
    np.testing.assert_allclose(got.distance, match.distance, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.residual, residual, rtol=1e-6, atol=1e-6)


def test_device_matcher_equals_the_host_matcher_on_a_fitted_bundle(fitted, demo_data):
    bundle = load_bundle(fitted[0])
    scorer = PosFARScorer.from_bundle(bundle)
    matcher = DeviceMatcher(scorer.bank, scorer.references, scorer.k, scorer.thetas, xp=np)
    assert not matcher.padded  # the per-image coreset gives every image the same number of rows
    inspector = open_inspector(fitted[0], threads=1)
    for path in list_images(demo_data / "test", recursive=True):
        pcf, descriptor = inspector.features(read_image(path))
        _assert_same(scorer, matcher, pcf, descriptor)


def test_device_matcher_masks_the_padding_of_images_with_fewer_rows():
    """A bank whose images hold different numbers of rows (a hand-made or older bundle) is padded to static
    shapes; a padded slot must never be chosen even when its stand-in row 0 would be the nearest."""
    rng = np.random.default_rng(4)
    d_f, counts = 12, [5, 1, 7, 3, 6]
    image_index = np.repeat(np.arange(len(counts)), counts)
    features = rng.normal(size=(len(image_index), d_f)).astype(np.float16)
    pca = PCA(components=np.linalg.qr(rng.normal(size=(d_f, 6)))[0].T.astype(np.float32),
              mean=rng.normal(size=d_f).astype(np.float32))
    bank = MemoryBank(features, image_index, pca)
    refs = ReferenceIndex(rng.normal(size=(len(counts), 4, 3)).astype(np.float32), trim=0.25)
    scorer = PosFARScorer(bank, refs, k=2, grid=(3, 3), input_hw=(24, 24))
    matcher = DeviceMatcher(bank, refs, k=2, thetas=scorer.thetas, xp=np)
    assert matcher.padded and matcher.rows_per_image == 7
    for _ in range(40):
        # test patches placed on bank row 0 (image 0): the padding's stand-in row, the trap when image 0 is
        # not among the retrieved references
        pcf = np.repeat(features[:1].astype(np.float32), 9, axis=0) + rng.normal(scale=0.01, size=(9, d_f))
        _assert_same(scorer, matcher, pcf.astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32))


def test_torch_stand_in_runs_the_bundle_graphs_as_onnx_runtime_does(fitted):
    """tools/bench_gpu.py times the GPU path with the bundle's own graphs run by torch; on the CPU in fp32 they
    must give ONNX Runtime's outputs, or the stand-in's figures would be of another model."""
    pytest.importorskip("onnx")
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    sys.path.insert(0, str(REPO / "tools"))
    from torch_stand_in import TorchOnnxGraph

    bundle = load_bundle(fitted[0])
    m = bundle.manifest
    rng = np.random.default_rng(0)
    grid_m = m.backbone.grid[0] * m.backbone.grid[1]
    cases = {bundle.backbone_path: {"image": rng.random((1, 3, *m.preprocessing.input_size), dtype=np.float32)},
             bundle.swin_path: {"residual": rng.random((1, grid_m, m.backbone.d_f), dtype=np.float32)}}
    for path, inputs in cases.items():
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)
        got = TorchOnnxGraph(path).run(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        for w, g in zip(want, got.values(), strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))


@pytest.mark.skipif(CUPY is None, reason=f"GPU path: {NO_GPU}")
def test_device_matcher_on_the_gpu_equals_the_host_matcher(fitted, demo_data):
    bundle = load_bundle(fitted[0])
    scorer = PosFARScorer.from_bundle(bundle)
    matcher = DeviceMatcher(scorer.bank, scorer.references, scorer.k, scorer.thetas, xp=CUPY)
    inspector = open_inspector(fitted[0], threads=1)
    same = total = 0
    for path in list_images(demo_data / "test", recursive=True):
        pcf, descriptor = inspector.features(read_image(path))
        refs, match, _ = _host_match(scorer, pcf, descriptor)
        got = matcher.match(CUPY.asarray(pcf), CUPY.asarray(descriptor))
        np.testing.assert_array_equal(CUPY.asnumpy(got.references), refs)
        same += int((CUPY.asnumpy(got.bank_rows) == match.bank_rows).sum())
        total += len(match.bank_rows)
        np.testing.assert_allclose(CUPY.asnumpy(got.distance), match.distance, rtol=1e-4, atol=1e-4)
    assert same / total >= 0.999
