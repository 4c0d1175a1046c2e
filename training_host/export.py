"""ONNX export of the feature extractor, checked against torch before it goes into a bundle."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from .features import PatchFeatureExtractor

log = logging.getLogger(__name__)


def export_backbone(extractor: PatchFeatureExtractor, path: Path, opset: int = 18) -> float:
    """Write ``backbone.onnx`` (batch 1, fixed input size) and return the max abs difference of its
    outputs from torch's on a random image, as measured with ONNX Runtime."""
    import onnxruntime as ort

    dummy = torch.rand(1, 3, *extractor.input_hw, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(extractor, (dummy,), str(path), input_names=["image"],
                          output_names=["pcf", "descriptor"], opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(["pcf", "descriptor"], {"image": dummy.numpy()})
    with torch.inference_mode():
        torch_out = extractor(dummy)
    diff = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(onnx_out, torch_out, strict=True))
    scale = max(float(np.abs(b.numpy()).max()) for b in torch_out)
    if diff > 1e-3 * max(scale, 1.0):
        raise RuntimeError(f"{path.name}: ONNX output differs from torch by {diff:.3g} (scale {scale:.3g})")
    return diff
