"""ONNX export of the feature extractor and the residual Swin, each checked against torch before it goes
into a bundle."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from training_host.models.features import PatchFeatureExtractor
from training_host.models.swin import ResidualSwin, SwinEnsemble, SwinForExport

log = logging.getLogger(__name__)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str],
            opset: int) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=output_names,
                          opset_version=opset, dynamo=True, external_data=False, verbose=False)


def export_swin(model: ResidualSwin | SwinEnsemble, grid: tuple[int, int], path: Path, residuals: np.ndarray,
                opset: int = 18) -> float:
    """Write ``swin.onnx`` (residual (1, M, d_f) -> probability (1, M)) and return the max abs difference
    of ONNX Runtime's probabilities from torch's on the given real residual fields (N, M, d_f)."""
    import onnxruntime as ort

    wrapper = SwinForExport(model.eval(), grid).eval()
    residuals = np.asarray(residuals, dtype=np.float32)
    _export(wrapper, torch.from_numpy(residuals[:1]), path, "residual", ["probability"], opset)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    with torch.inference_mode():
        for field in residuals:
            onnx_prob = session.run(["probability"], {"residual": field[None]})[0]
            torch_prob = wrapper(torch.from_numpy(field[None])).numpy()
            diff = max(diff, float(np.abs(onnx_prob - torch_prob).max()))
    if diff > 1e-3:
        raise RuntimeError(f"{path.name}: ONNX probabilities differ from torch by {diff:.3g}")
    return diff


def export_backbone(extractor: PatchFeatureExtractor, path: Path, opset: int = 18) -> float:
    """Write ``backbone.onnx`` (batch 1, fixed input size) and return the max abs difference of its
    outputs from torch's on a random image, as measured with ONNX Runtime."""
    import onnxruntime as ort

    dummy = torch.rand(1, 3, *extractor.input_hw, generator=torch.Generator().manual_seed(0))
    _export(extractor, dummy, path, "image", ["pcf", "descriptor"], opset)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(["pcf", "descriptor"], {"image": dummy.numpy()})
    with torch.inference_mode():
        torch_out = extractor(dummy)
    diff = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(onnx_out, torch_out, strict=True))
    scale = max(float(np.abs(b.numpy()).max()) for b in torch_out)
    if diff > 1e-3 * max(scale, 1.0):
        raise RuntimeError(f"{path.name}: ONNX output differs from torch by {diff:.3g} (scale {scale:.3g})")
    return diff
