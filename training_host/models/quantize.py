"""int8 twins of a bundle's graphs, and the accuracy gate every reduced-precision engine must pass.

Why static int8 with a gate, not blindly: on this CPU (AVX-512 VNNI) int8 convolutions are faster, but the
backbone's patch features are what the bank was fitted on, and a fully int8 EfficientNet moves them by ~20-35 %
of their spread from the fp32 features (depthwise convolutions quantise badly); the Swin's probabilities move
by ~0.01.  Whether the verdicts and maps survive that is an empirical question per product (on MTD they did:
README, Engines), so every candidate is measured through the edge's own pipeline (``evaluate_bundle`` with the
engine the edge would run) against fp32 on the same test images (held-out good and, on MTD, the development
split's defects), and a candidate that loses more than ``MAX_PIXEL_AP_LOSS`` pixel-AP points or
``MAX_IMAGE_AUROC_LOSS`` image AUROC is refused: the bundle keeps fp32 for it, and the manifest records the
figures either way.  The bank stays fitted on fp32 features (an int8-feature bank would double the bank in the
bundle for one engine); the gate judges the mismatch.

Quantisation: ONNX Runtime ``quantize_static``, QDQ format, per-channel int8 weights, uint8 activations,
calibrated through a :class:`CalibrationDataReader` on the product's own good images (``DATA/train/good``; the
Swin on their PosFAR residual fields, each image left out of its own reference retrieval so its residual is a
real one, not zero).  Activations: percentile calibration (99.99 %), which measured closer to fp32 than min/max.
Each graph is gated on its own (Swin first, then the backbone on top of an accepted Swin), so a backbone that
fails still leaves an accepted int8 Swin.  The gate also measures the OpenVINO engines when the package is
installed (``openvino-int8`` on the accepted int8 graphs, ``openvino-bf16`` on CPUs with bf16 instructions).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.core.bundle import (
    ARRAYS,
    BACKBONE_INT8,
    SWIN_INT8,
    Bundle,
    BundleError,
    PrecisionGate,
    PrecisionInfo,
    load_bundle,
    write_bundle,
)
from edge_runtime.core.engines import OnnxRuntimeEngine, cpu_has_bf16, openvino_devices
from edge_runtime.core.pipeline import PosFARScorer
from edge_runtime.core.preprocess import ImageReadError, list_images, read_image, to_input_tensor

log = logging.getLogger(__name__)

MAX_PIXEL_AP_LOSS = 0.5  # pixel-AP points (AP x 100) an engine may lose against fp32
MAX_IMAGE_AUROC_LOSS = 0.005
GATE_METRICS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")
METHOD = ("onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, percentile 99.99 % "
          "calibration on the product's good images")


class QuantizeError(RuntimeError):
    """Quantisation or its gate could not run (no calibration images, no test split); the message says why."""


@dataclass
class QuantizeReport:
    """What ``quantize_bundle`` did: the int8 graphs kept and every gate's verdict."""

    bundle: Path
    int8_graphs: dict[str, str]
    gates: list[PrecisionGate]
    calibration_images: int

    def lines(self) -> list[str]:
        out = [f"{self.bundle}: int8 graphs kept: {', '.join(self.int8_graphs.values()) or 'none (fp32 only)'}"]
        for g in self.gates:
            fig = ", ".join(f"{k} {g.fp32.get(k) or 0:.4f} -> {g.reduced.get(k) or 0:.4f}" for k in GATE_METRICS)
            out.append(f"  {g.engine}: {'ACCEPTED' if g.accepted else 'REFUSED'} ({g.reason}); {fig}")
        return out


class _Reader:
    """ONNX Runtime's calibration protocol (``get_next`` until None) over a list of input arrays."""

    def __init__(self, name: str, arrays: list[np.ndarray]) -> None:
        self.name = name
        self.arrays = arrays
        self._it: Iterator[np.ndarray] = iter(arrays)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.name: x}

    def rewind(self) -> None:
        self._it = iter(self.arrays)


def calibration_images(data_root: Path, n: int) -> list[np.ndarray]:
    """Up to ``n`` good images spread evenly over ``DATA/train/good`` (decoded RGB)."""
    paths = list_images(Path(data_root) / "train" / "good")
    if not paths:
        raise QuantizeError(f"{data_root}/train/good: no good images to calibrate the int8 graphs on")
    picks = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, min(n, len(paths))).round())]
    images = []
    for p in picks:
        try:
            images.append(read_image(p))
        except ImageReadError as exc:
            log.warning("calibration: skipped %s", exc)
    if not images:
        raise QuantizeError(f"{data_root}/train/good: none of the calibration images could be read")
    return images


def _leave_self_out(scorer: PosFARScorer, descriptor: np.ndarray) -> int | None:
    """The reference image that is this very image (robust distance ~0), to leave out of its own retrieval."""
    dist = scorer.references.distances(descriptor)
    nearest = int(np.argmin(dist))
    return nearest if dist[nearest] <= 1e-3 * max(float(np.median(dist)), 1e-12) else None


def calibration_inputs(bundle: Bundle, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Backbone inputs and the Swin's residual fields (through the fp32 backbone) of the calibration images."""
    m = bundle.manifest
    hw = tuple(m.preprocessing.input_size)
    tensors = [to_input_tensor(img, hw, m.preprocessing.scale) for img in images]
    fields: list[np.ndarray] = []
    if bundle.swin_path is not None:
        backbone = OnnxRuntimeEngine(bundle.backbone_path)
        scorer = PosFARScorer.from_bundle(bundle)
        for t in tensors:
            out = backbone.run({"image": t})
            pcf, descriptor = out["pcf"][0], out["descriptor"][0]
            res = scorer.residual(pcf, descriptor, exclude=_leave_self_out(scorer, descriptor))
            fields.append(np.ascontiguousarray(res.residual[None], dtype=np.float32))
    return tensors, fields


def quantize_graph(src: Path, dst: Path, input_name: str, inputs: list[np.ndarray],
                   op_types: list[str] | None = None) -> Path:
    """QDQ int8 copy of one ONNX graph, calibrated on ``inputs`` (each a full batch-1 input array)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's calibrators print progress to stdout, which belongs to our --json output
    with tempfile.TemporaryDirectory(prefix="weakrest-quant-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), _Reader(input_name, inputs), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=op_types, calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": 99.99})
    return dst


def _metrics(bundle_dir: Path, data_root: Path, engine: str, work: Path) -> tuple[dict[str, float | None], int]:
    from training_host.evaluation.evaluate import evaluate_bundle

    out = work / f"eval-{engine}-{len(list(work.iterdir()))}"
    m = evaluate_bundle(bundle_dir, data_root, out, overlays=0, progress=False, engine=engine)
    return {k: (None if m.get(k) is None else float(m[k])) for k in GATE_METRICS}, int(m["n_images"])


def judge(engine: str, fp32: dict[str, float | None], reduced: dict[str, float | None], images: int) -> PrecisionGate:
    """The gate: refuse a loss of more than ``MAX_PIXEL_AP_LOSS`` pixel-AP points or ``MAX_IMAGE_AUROC_LOSS``
    image AUROC (gains pass); refuse when the data cannot measure them (no defective images / masks)."""
    limits = {"max_pixel_ap_loss": MAX_PIXEL_AP_LOSS, "max_image_auroc_loss": MAX_IMAGE_AUROC_LOSS}
    missing = [k for k in ("image_auroc", "pixel_ap") if fp32.get(k) is None or reduced.get(k) is None]
    if missing:
        return PrecisionGate(engine=engine, accepted=False, fp32=fp32, reduced=reduced, images=images, **limits,
                             reason=f"cannot measure {' and '.join(missing)} (the test split needs defective images "
                                    "with masks); kept fp32")
    ap_loss = 100.0 * (fp32["pixel_ap"] - reduced["pixel_ap"])  # type: ignore[operator]
    auroc_loss = fp32["image_auroc"] - reduced["image_auroc"]  # type: ignore[operator]
    problems = []
    if ap_loss > MAX_PIXEL_AP_LOSS:
        problems.append(f"loses {ap_loss:.2f} pixel-AP points (limit {MAX_PIXEL_AP_LOSS})")
    if auroc_loss > MAX_IMAGE_AUROC_LOSS:
        problems.append(f"loses {auroc_loss:.4f} image AUROC (limit {MAX_IMAGE_AUROC_LOSS})")
    reason = ("; ".join(problems) + "; kept fp32") if problems else (
        f"pixel AP {-ap_loss:+.2f} points, image AUROC {-auroc_loss:+.4f} against fp32")
    return PrecisionGate(engine=engine, accepted=not problems, reason=reason, fp32=fp32, reduced=reduced,
                         images=images, **limits)


def _write(bundle: Bundle, dest: Path, int8_files: dict[str, Path], precision: PrecisionInfo | None) -> Path:
    """``bundle`` rewritten at ``dest`` with these int8 graphs and precision section (every file re-hashed)."""
    files = {name: bundle.root / name for name in bundle.manifest.files
             if name != ARRAYS and name not in (BACKBONE_INT8, SWIN_INT8)}
    names = {"backbone": BACKBONE_INT8, "swin": SWIN_INT8}
    files.update({names[role]: path for role, path in int8_files.items()})
    manifest = bundle.manifest.model_copy(update={"precision": precision})
    arrays = {k: np.array(v) for k, v in bundle.arrays.items()}
    return write_bundle(dest, manifest, files, arrays)


def quantize_bundle(bundle_dir: Path, data_root: Path, out: Path | None = None, n_calibration: int = 64,
                    graphs: tuple[str, ...] = ("swin", "backbone"), gate_openvino: bool = True) -> QuantizeReport:
    """Add gated int8 graphs (and the gates of the reduced-precision engines) to a bundle.

    ``out``: where to write the result (default: in place, atomically).  Needs ``DATA/train/good`` (calibration)
    and ``DATA/test`` with defective images and masks (the gate); without the latter every candidate is refused.
    """
    bundle_dir, data_root = Path(bundle_dir), Path(data_root)
    dest = Path(out) if out is not None else bundle_dir
    bundle = load_bundle(bundle_dir)
    if bundle.manifest.files.get("bundle.sig") is None and (bundle_dir / "bundle.sig").exists():
        log.warning("%s: its signature covers the old files; sign the quantised bundle again", bundle_dir)
    images = calibration_images(data_root, n_calibration)
    tensors, fields = calibration_inputs(bundle, images)
    work = Path(tempfile.mkdtemp(prefix="weakrest-quantize-"))
    try:
        base = work / "fp32"
        _write(bundle, base, {}, None)  # the fp32 bundle without any earlier int8 graphs or gates
        fp32, n_images = _metrics(base, data_root, "cpu", work)
        kept: dict[str, Path] = {}
        gates: list[PrecisionGate] = []
        last_gate: PrecisionGate | None = None
        for role in graphs:
            if role == "swin" and not fields:
                continue
            src = bundle.root / ("swin.onnx" if role == "swin" else "backbone.onnx")
            dst = work / (SWIN_INT8 if role == "swin" else BACKBONE_INT8)
            if role == "swin":
                quantize_graph(src, dst, "residual", fields, op_types=["MatMul"])
            else:
                quantize_graph(src, dst, "image", tensors)
            trial = {**kept, role: dst}
            staging = work / f"trial-{role}"
            info = PrecisionInfo(int8_graphs={r: (SWIN_INT8 if r == "swin" else BACKBONE_INT8) for r in trial},
                                 calibration_images=len(images), method=METHOD)
            _write(bundle, staging, trial, info)
            reduced, _ = _metrics(staging, data_root, "cpu-int8", work)
            gate = judge("cpu-int8", fp32, reduced, n_images)
            log.info("int8 %s: %s", role, gate.reason)
            if gate.accepted:
                kept = trial
                last_gate = gate
            else:
                gates.append(gate.model_copy(update={"engine": f"cpu-int8:{role}"}))
        if kept:
            assert last_gate is not None
            gates.insert(0, last_gate)
        else:
            gates.insert(0, PrecisionGate(engine="cpu-int8", accepted=False, fp32=fp32, reduced={}, images=n_images,
                                          max_pixel_ap_loss=MAX_PIXEL_AP_LOSS,
                                          max_image_auroc_loss=MAX_IMAGE_AUROC_LOSS,
                                          reason="no int8 graph passed the gate; kept fp32"))
        info = PrecisionInfo(int8_graphs={r: (SWIN_INT8 if r == "swin" else BACKBONE_INT8) for r in kept},
                             calibration_images=len(images), method=METHOD, gates=gates)
        staging = work / "final"
        _write(bundle, staging, kept, info)
        if gate_openvino and "CPU" in openvino_devices():
            extra = []
            if kept:
                reduced, _ = _metrics(staging, data_root, "openvino-int8", work)
                extra.append(judge("openvino-int8", fp32, reduced, n_images))
            if cpu_has_bf16():
                reduced, _ = _metrics(staging, data_root, "openvino-bf16", work)
                extra.append(judge("openvino-bf16", fp32, reduced, n_images))
            info = info.model_copy(update={"gates": [*gates, *extra]})
        final = _write(load_bundle(staging), dest, {r: staging / (SWIN_INT8 if r == "swin" else BACKBONE_INT8)
                                                    for r in kept}, info)
        load_bundle(final)  # verify what was written
        return QuantizeReport(bundle=final, int8_graphs=dict(info.int8_graphs), gates=list(info.gates),
                              calibration_images=len(images))
    except BundleError:
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
