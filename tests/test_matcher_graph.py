"""``matcher.onnx`` (training_host/models/matcher_graph.py) is the numpy matcher as a graph: run by ONNX Runtime on
the CPU with the bundle's arrays as its inputs, it retrieves the same K images, chooses the same nearest normal
patch for every patch and gives the same distances and residuals; bundles carry it hashed, and a bank without
the per-image layout gets none rather than a wrong one."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.core.bundle import MATCHER, load_bundle
from edge_runtime.core.device_matching import DeviceMatcher
from edge_runtime.core.matching import MemoryBank, posfar_residual, rows_per_image
from edge_runtime.core.pca import PCA
from edge_runtime.core.pipeline import PosFARScorer, open_inspector
from edge_runtime.core.preprocess import list_images, read_image
from edge_runtime.core.retrieval import ReferenceIndex

pytest.importorskip("onnx")


def test_fitted_bundles_carry_the_matcher_graph_and_it_equals_the_numpy_matcher(fitted, demo_data):
    bundle = load_bundle(fitted[0])
    assert bundle.matcher_path is not None and MATCHER in bundle.manifest.files  # hashed like every file
    scorer = PosFARScorer.from_bundle(bundle)
    inputs = DeviceMatcher(scorer.bank, scorer.references, scorer.k, scorer.thetas, xp=np).graph_inputs()
    assert inputs["bank_features"].dtype == np.float16  # the bundle's own fp16 bank, not a widened copy
    session = ort.InferenceSession(str(bundle.matcher_path), providers=["CPUExecutionProvider"])
    inspector = open_inspector(fitted[0], threads=1)
    for path in list_images(demo_data / "test", recursive=True):
        pcf, descriptor = inspector.features(read_image(path))
        residual, distance, references, rows = session.run(
            ["residual", "distance", "references", "bank_rows"],
            {"pcf": pcf[None], "descriptor": descriptor[None], **inputs})
        want_refs = scorer.references.nearest(descriptor, scorer.k)
        match = scorer.bank.match(pcf, want_refs)
        np.testing.assert_array_equal(references, want_refs)
        np.testing.assert_array_equal(rows, match.bank_rows)
        np.testing.assert_allclose(distance[0], match.distance, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(residual[0], posfar_residual(pcf, match.matched, scorer.thetas), rtol=1e-5,
                                   atol=1e-5)


def test_no_matcher_graph_for_a_bank_without_the_per_image_layout(tmp_path):
    from training_host.models.matcher_graph import write_matcher_graph

    rng = np.random.default_rng(1)
    pca = PCA(components=np.eye(8, dtype=np.float32)[:4], mean=np.zeros(8, np.float32))
    refs = ReferenceIndex(rng.random((3, 4, 2), dtype=np.float32))
    uneven = MemoryBank(rng.random((7, 8), dtype=np.float32), np.array([0, 0, 0, 1, 1, 2, 2]), pca)
    assert rows_per_image(uneven.image_index) is None
    assert write_matcher_graph(tmp_path / MATCHER, uneven, refs, k=2, thetas=(1.0, 2.0), n_patches=4) is None
    even = MemoryBank(rng.random((6, 8), dtype=np.float32), np.array([0, 0, 1, 1, 2, 2]), pca)
    assert rows_per_image(even.image_index) == 2
    # fewer training images than K: the graph's TopK could not run, so there is none
    assert write_matcher_graph(tmp_path / MATCHER, even, refs, k=4, thetas=(1.0, 2.0), n_patches=4) is None
    assert write_matcher_graph(tmp_path / MATCHER, even, refs, k=2, thetas=(1.0, 2.0), n_patches=4) is not None
