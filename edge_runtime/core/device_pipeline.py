"""One frame on a GPU with its buffers on the device from the backbone's output to the Swin's input.

The frame's input tensor is copied through a pinned host buffer on the pipeline's own CUDA stream (one stream per
pipeline, so one per camera: each station process opens its own); the backbone graph writes the patch features
and the retrieval descriptor into device buffers, :class:`~edge_runtime.core.device_matching.DeviceMatcher` finds
the K references and the nearest normal patches and forms the residual there, and the Swin graph reads it in
place.  Only what the host-side finish needs comes back: M distances, M probabilities, K reference indices (and
the features when the bundle has a logical model).  Stage times are CUDA events on the stream, so they are the
device's own times rather than the host's launch times.

The graphs are run by a :class:`DeviceGraph`: TensorRT plans (``core.tensorrt_plans``), ONNX Runtime's CUDA
execution provider (:class:`OrtCudaGraph`) or, in the benchmarks, a stand-in runner.  CuPy provides the device
arrays, the pinned buffers and the stream; it is part of ``pip install 'weakrest-edge[gpu]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .device_matching import DeviceMatcher
from .engines import EngineError, EngineUnavailable

DeviceArray = Any  # cupy.ndarray


class DeviceGraph(Protocol):
    """Runs one graph on device arrays: named CuPy inputs in, named CuPy outputs out, queued on ``stream``
    (a ``cupy.cuda.Stream``); it does not wait for the results (the caller synchronises the stream)."""

    name: str

    def run_device(self, inputs: dict[str, DeviceArray], stream: Any) -> dict[str, DeviceArray]: ...


def cupy_or_reason() -> tuple[Any, str | None]:
    """(cupy, None) when CuPy imports and sees a CUDA device; (None, why not) otherwise."""
    try:
        import cupy
    except ImportError:
        return None, "cupy is not installed (pip install 'weakrest-edge[gpu]')"
    except Exception as exc:  # a CuPy built for another CUDA raises at import
        return None, f"cupy cannot load ({' '.join(str(exc).split())})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cudaErrorNoDevice, cudaErrorInsufficientDriver, ...
        return None, f"no CUDA device ({' '.join(str(exc).split())})"
    if count < 1:
        return None, "no CUDA device"
    return cupy, None


def require_cupy() -> Any:
    """CuPy with a device, or :class:`EngineUnavailable` saying why not."""
    cupy, reason = cupy_or_reason()
    if cupy is None:
        raise EngineUnavailable(f"the GPU path needs CuPy and a CUDA device: {reason}")
    return cupy


def compute_capability(cupy: Any, device: int = 0) -> str:
    """``"8.7"`` (Jetson Orin), ``"8.9"`` (RTX 40xx), ``"9.0"`` (H100/H200): a TensorRT plan's device key."""
    props = cupy.cuda.runtime.getDeviceProperties(device)
    return f"{props['major']}.{props['minor']}"


def _dtype_of(ort_type: str) -> np.dtype:
    return {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
            "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32)}[ort_type]


class OrtCudaGraph:
    """A graph on ONNX Runtime's CUDA execution provider, bound to device buffers (I/O binding): the inputs are
    read where they lie and the outputs are written into CuPy buffers that stay on the device.  The provider runs
    on the pipeline's stream (``user_compute_stream``), so no other synchronisation is needed."""

    def __init__(self, graph: Path, stream: Any, output_shapes: dict[str, tuple[int, ...]], device: int = 0) -> None:
        import onnxruntime as ort

        cupy = require_cupy()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineUnavailable("cuda needs onnxruntime-gpu (ONNX Runtime here offers "
                                    f"{', '.join(ort.get_available_providers())})")
        self.name = f"onnxruntime-cuda:{Path(graph).name}"
        self.cupy, self.device = cupy, device
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # fp32 as on the CPU: TF32 (ten mantissa bits in the matrix products) off, so cuda stays an exact engine
        provider = ("CUDAExecutionProvider", {"device_id": str(device), "user_compute_stream": str(stream.ptr),
                                              "do_copy_in_default_stream": "0", "use_tf32": "0"})
        try:
            self.session = ort.InferenceSession(str(graph), sess_options=options, providers=[provider])
        except Exception as exc:  # onnxruntime raises several private exception types
            raise EngineError(f"{Path(graph).name}: ONNX Runtime (CUDA) cannot load it ({exc})") from exc
        # static shapes (batch 1, the bundle's grid): each output's buffer is allocated once and reused
        self._buffers: dict[str, DeviceArray] = {}
        for o in self.session.get_outputs():
            if o.name not in output_shapes:
                raise EngineError(f"{Path(graph).name}: no shape known for its output {o.name!r}")
            self._buffers[o.name] = cupy.empty(output_shapes[o.name], dtype=_dtype_of(o.type))

    def run_device(self, inputs: dict[str, DeviceArray], stream: Any) -> dict[str, DeviceArray]:
        binding = self.session.io_binding()
        for name, array in inputs.items():
            array = self.cupy.ascontiguousarray(array)
            binding.bind_input(name, "cuda", self.device, array.dtype, list(array.shape), array.data.ptr)
        for name, buf in self._buffers.items():
            binding.bind_output(name, "cuda", self.device, buf.dtype, list(buf.shape), buf.data.ptr)
        self.session.run_with_iobinding(binding)
        return dict(self._buffers)


class DevicePipeline:
    """Frame tensor in (host), :class:`~edge_runtime.core.pipeline.Evidence`-ready arrays out, all on the GPU."""

    STAGES = ("upload", "backbone", "retrieval_matching", "swin", "download")

    def __init__(self, matcher: DeviceMatcher, backbone: DeviceGraph, swin: DeviceGraph | None,
                 input_shape: tuple[int, ...], stream: Any = None, keep_features: bool = False,
                 matcher_graph: DeviceGraph | None = None) -> None:
        cupy = matcher.xp
        self.cupy = cupy
        self.matcher = matcher
        # matcher.onnx on the engine (a TensorRT plan) instead of CuPy, reading the same device arrays
        self.matcher_graph = matcher_graph
        self.matcher_inputs = matcher.graph_inputs() if matcher_graph is not None else None
        self.backbone = backbone
        self.swin = swin
        self.stream = stream if stream is not None else cupy.cuda.Stream(non_blocking=True)
        self.keep_features = keep_features
        # the frame goes host -> pinned buffer -> device; a pinned source makes the copy a real async DMA
        self.pinned = cupy.cuda.alloc_pinned_memory(int(np.prod(input_shape)) * 4)
        self.host_in = np.frombuffer(self.pinned, np.float32, int(np.prod(input_shape))).reshape(input_shape)
        self.device_in = cupy.empty(input_shape, dtype=cupy.float32)
        self.events = [cupy.cuda.Event() for _ in range(len(self.STAGES) + 1)]

    def run(self, tensor: np.ndarray) -> dict[str, Any]:
        """One frame: returns host arrays ``distance`` (M,), ``probability`` (M,) or None, ``references`` (K,),
        ``bank_rows`` (M,), ``pcf`` (M, d_f) when asked to keep features, and ``timings_ms`` per stage."""
        cupy, ev, stream = self.cupy, self.events, self.stream
        np.copyto(self.host_in, tensor, casting="same_kind")
        with stream:
            ev[0].record(stream)
            self.device_in.set(self.host_in, stream=stream)
            ev[1].record(stream)
            feats = self.backbone.run_device({"image": self.device_in}, stream)
            pcf, descriptor = feats["pcf"][0], feats["descriptor"][0]
            ev[2].record(stream)
            if self.matcher_graph is not None:
                m = self.matcher_graph.run_device({"pcf": feats["pcf"], "descriptor": feats["descriptor"],
                                                   **self.matcher_inputs}, stream)
                residual, distance = m["residual"], m["distance"][0]
                references, bank_rows = m["references"], m["bank_rows"]
            else:
                match = self.matcher.match(pcf, descriptor)
                residual, distance = match.residual[None], match.distance
                references, bank_rows = match.references, match.bank_rows
            ev[3].record(stream)
            probability = None
            if self.swin is not None:
                probability = self.swin.run_device({"residual": residual}, stream)["probability"][0]
            ev[4].record(stream)
            host = {"distance": cupy.asnumpy(distance, stream=stream),
                    "references": cupy.asnumpy(references, stream=stream),
                    "bank_rows": cupy.asnumpy(bank_rows, stream=stream),
                    "probability": None if probability is None else cupy.asnumpy(probability, stream=stream),
                    "pcf": cupy.asnumpy(pcf, stream=stream).astype(np.float32) if self.keep_features else None}
            ev[5].record(stream)
        ev[5].synchronize()
        host["timings_ms"] = {name: cupy.cuda.get_elapsed_time(ev[i], ev[i + 1]) for i, name in enumerate(self.STAGES)}
        return host


class HostGraph:
    """A :class:`DeviceGraph` seen as a host :class:`~edge_runtime.core.engines.Engine` (numpy in, numpy out):
    for the callers that want features on the host (the bundle's smoke test, calibration, quantisation)."""

    def __init__(self, graph: DeviceGraph, stream: Any) -> None:
        self.graph = graph
        self.stream = stream
        self.name = graph.name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cupy = require_cupy()
        with self.stream:
            device_inputs = {k: cupy.asarray(np.ascontiguousarray(v)) for k, v in inputs.items()}
            out = self.graph.run_device(device_inputs, self.stream)
            host = {k: cupy.asnumpy(v, stream=self.stream) for k, v in out.items()}
        self.stream.synchronize()
        return host


@dataclass
class DeviceGraphs:
    """What a GPU engine hands the inspector: its graphs on the device and the stream they run on."""

    backbone: DeviceGraph
    swin: DeviceGraph | None
    stream: Any
    matcher: DeviceGraph | None = None  # matcher.onnx's plan; None: CuPy matches
