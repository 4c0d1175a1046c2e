"""Stand-ins for TensorRT plans on a GPU machine without TensorRT: graphs run by PyTorch in fp16, captured.

:class:`TorchOnnxGraph` executes a bundle's ONNX graph op by op; :class:`TorchModuleGraph` runs a training-host
module (for the paper profile, whose Wide-ResNet weights cannot be had here: random weights, timing only).

Why it exists: the project's GPU machine has PyTorch with CUDA but neither TensorRT nor onnxruntime-gpu, and
issue 14 asks for the GPU path to be measured there with the backbone and the Swin run by torch in fp16 as a
stand-in for the plans.  Running the bundle's *own* graphs (its weights, its folded batch norms, its exported
attention) rather than re-building the training modules keeps the equality check honest: the CPU reference
(ONNX Runtime) and the stand-in read the same file.  fp16 is PyTorch's autocast (convolutions and matrix
products in fp16, normalisations, softmax and logs in fp32), the closest thing torch has to a TensorRT fp16
build; a CUDA graph replays the whole op sequence as one launch, as a plan runs as one enqueue.

Only the operators the project's exported graphs use are implemented (tests/test_onnx_torch.py runs every one
of them against ONNX Runtime on the CPU); an unknown operator is refused when the graph is loaded.  Everything
whose inputs are constants (shapes, indices, masks) is folded once on the CPU at load, so a run never reads a
device value back to the host and the whole graph can be captured.

Not part of the product: nothing under edge_runtime imports this (tools/bench_gpu.py does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

_ONNX_DTYPES = {1: torch.float32, 10: torch.float16, 11: torch.float64, 6: torch.int32, 7: torch.int64,
                9: torch.bool, 2: torch.uint8, 3: torch.int8}
_INT64_MAX = 2**62


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _conv(x, w, b=None, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, auto_pad="NOTSET",
          kernel_shape=None):
    if auto_pad not in ("NOTSET", ""):
        raise NotImplementedError(f"Conv auto_pad={auto_pad}")
    half = len(pads) // 2
    if list(pads[:half]) != list(pads[half:]):
        x = F.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
        pads = (0,) * len(pads)
    conv = F.conv2d if x.dim() == 4 else F.conv1d
    return conv(x, w, b, stride=tuple(strides), padding=tuple(pads[:half]), dilation=tuple(dilations), groups=group)


def _average_pool(x, *, kernel_shape, strides=None, pads=None, count_include_pad=0, ceil_mode=0, auto_pad="NOTSET",
                  dilations=None):
    if auto_pad not in ("NOTSET", ""):
        raise NotImplementedError(f"AveragePool auto_pad={auto_pad}")
    pads = pads or [0] * (2 * len(kernel_shape))
    half = len(pads) // 2
    if list(pads[:half]) != list(pads[half:]):
        raise NotImplementedError("AveragePool with asymmetric pads")
    return F.avg_pool2d(x, tuple(kernel_shape), tuple(strides or [1] * half), tuple(pads[:half]), bool(ceil_mode),
                        bool(count_include_pad))


def _resize(x, roi=None, scales=None, sizes=None, *, mode="nearest", coordinate_transformation_mode="half_pixel",
            antialias=0, nearest_mode="round_prefer_floor", **_):
    if antialias:
        raise NotImplementedError("Resize antialias=1")
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
        kw: dict[str, Any] = {"size": size}
    else:
        kw = {"scale_factor": [float(s) for s in scales.reshape(-1).tolist()[2:]]}
    if mode == "linear":
        if coordinate_transformation_mode not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise NotImplementedError(f"Resize linear {coordinate_transformation_mode}")
        return F.interpolate(x, mode="bilinear", align_corners=coordinate_transformation_mode == "align_corners",
                             **kw)
    if mode == "nearest" and coordinate_transformation_mode == "asymmetric" and nearest_mode == "floor":
        return F.interpolate(x, mode="nearest", **kw)
    raise NotImplementedError(f"Resize mode={mode} {coordinate_transformation_mode} {nearest_mode}")


def _reshape(x, shape, *, allowzero=0):
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        if st < 0:
            raise NotImplementedError("Slice with a negative step")
        index[a] = slice(s, min(e, _INT64_MAX))
        if st != 1:
            index[a] = slice(s, min(e, _INT64_MAX), st)
    return x[tuple(index)]


def _gather(x, indices, *, axis=0):
    axis = axis % x.dim()
    idx = indices.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    flat = torch.index_select(x, axis, idx.reshape(-1))
    return flat.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])


def _layer_norm(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    axis = axis % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, epsilon)


def _binary(fn: Callable) -> Callable:
    return lambda a, b: fn(a, b)


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _clip(x, lo=None, hi=None):
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


def _cast(x, *, to):
    return x.to(_ONNX_DTYPES[to])


def _unsqueeze(x, axes):
    out = x
    for a in sorted(a % (x.dim() + len(_ints(axes))) for a in _ints(axes)):
        out = out.unsqueeze(a)
    return out


def _squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in _ints(axes)), reverse=True):
        x = x.squeeze(a)
    return x


def _concat(*xs, axis):
    return torch.cat(xs, dim=axis)


def _transpose(x, *, perm=None):
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _softmax(x, *, axis=-1):
    return torch.softmax(x, dim=axis)


def _reduce(fn: Callable) -> Callable:
    def run(x, axes=None, *, keepdims=1, noop_with_empty_axes=0, **attr):
        dims = _ints(axes) if axes is not None else list(attr.get("axes", []))
        if not dims:
            return x if noop_with_empty_axes else fn(x, dim=list(range(x.dim())), keepdim=bool(keepdims))
        return fn(x, dim=dims, keepdim=bool(keepdims))
    return run


#: operator -> torch implementation (inputs positional, attributes as keywords)
OPS: dict[str, Callable] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul), "Equal": _binary(torch.eq),
    "Where": lambda c, a, b: torch.where(c, a, b), "Not": torch.logical_not, "Erf": torch.erf, "Log": torch.log,
    "Exp": torch.exp, "Sqrt": torch.sqrt, "Neg": torch.neg, "Relu": torch.relu, "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh, "Abs": torch.abs, "Identity": lambda x: x, "Clip": _clip, "Cast": _cast, "Conv": _conv,
    "AveragePool": _average_pool, "Resize": _resize, "Reshape": _reshape, "Slice": _slice, "Gather": _gather,
    "LayerNormalization": _layer_norm, "Softmax": _softmax, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Concat": _concat, "Transpose": _transpose, "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
}


class CapturedGraph:
    """Runs ``_forward`` eagerly, or records it once as a CUDA graph and replays it (one launch per frame)."""

    name: str
    device: torch.device
    fp16: bool
    output_names: list[str]

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _run_ops(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.fp16):
            out = self._forward(inputs)
        return {name: out[name].float() if out[name].is_floating_point() else out[name] for name in self.output_names}

    @torch.no_grad()
    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eager run (any device)."""
        return self._run_ops({k: v.to(self.device) for k, v in inputs.items()})

    @torch.no_grad()
    def capture(self, **example: torch.Tensor) -> None:
        """Record the op sequence once as a CUDA graph for inputs of these shapes (CUDA only)."""
        self._static_in = {k: v.to(self.device).clone() for k, v in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN / cuBLAS pick their algorithms before the capture
                self._run_ops(self._static_in)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._run_ops(self._static_in)

    @torch.no_grad()
    def replay(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copy the inputs into the captured graph's buffers and replay it on the current stream."""
        for k, v in inputs.items():
            self._static_in[k].copy_(v, non_blocking=True)
        self._graph.replay()
        return self._static_out


class TorchModuleGraph(CapturedGraph):
    """A torch module with named inputs and outputs (a tuple of outputs is named in order)."""

    def __init__(self, module: torch.nn.Module, input_names: list[str], output_names: list[str], device: str,
                 fp16: bool, name: str) -> None:
        self.module = module.to(device).eval()
        self.input_names, self.output_names = input_names, output_names
        self.device, self.fp16, self.name = torch.device(device), fp16, name

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.module(*[inputs[n] for n in self.input_names])
        return dict(zip(self.output_names, out if isinstance(out, tuple) else (out,), strict=True))


#: ops whose inputs after the first are parameters read on the host
_PARAMETER_OPS = (_reshape, _slice, _unsqueeze, _squeeze, _resize, _clip)


class TorchOnnxGraph(CapturedGraph):
    """One ONNX graph on a torch device: ``run(**inputs) -> dict`` of outputs (torch tensors)."""

    def __init__(self, path: str | Path, device: str = "cpu", fp16: bool = False) -> None:
        model = onnx.load(str(path))
        self.name = f"torch-stand-in:{Path(path).name}"
        self.device = torch.device(device)
        self.fp16 = fp16
        graph = model.graph
        for node in graph.node:
            if node.op_type not in OPS and node.op_type != "Constant":
                raise NotImplementedError(f"{Path(path).name}: operator {node.op_type} is not supported by the "
                                          "torch stand-in")
        consts: dict[str, torch.Tensor] = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                                           for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in consts]
        self.output_names = [o.name for o in graph.output]
        # fold every node whose inputs are all constants, once, on the CPU (shapes, indices, masks)
        self.nodes: list[tuple[Callable, list[str], list[str], dict[str, Any]]] = []
        for node in graph.node:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                consts[node.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
                continue
            fn = OPS[node.op_type]
            if all(i == "" or i in consts for i in node.input):
                outs = fn(*[consts[i] if i else None for i in node.input], **attrs)
                for name, value in zip(node.output, outs if isinstance(outs, tuple) else (outs,), strict=False):
                    consts[name] = value
                continue
            self.nodes.append((fn, list(node.input), list(node.output), attrs))
        # the constants the remaining nodes read go to the device once; shape-like integer inputs stay CPU-side
        # too, since the ops read them as Python ints
        self.consts = {k: v.to(self.device) for k, v in consts.items()}
        self.host_consts = consts

    def _value(self, env: dict[str, torch.Tensor], name: str, op: Callable, position: int) -> torch.Tensor | None:
        if name == "":
            return None
        if name in env:
            return env[name]
        # an op's parameters (shapes, slice bounds, axes, sizes, clip bounds) are read as Python numbers: those
        # stay on the CPU, so reading them never synchronises with (or breaks the capture of) the device
        if position > 0 and op in _PARAMETER_OPS:
            return self.host_consts[name]
        return self.consts[name]

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env = dict(inputs)
        for fn, ins, outs, attrs in self.nodes:
            result = fn(*[self._value(env, i, fn, n) for n, i in enumerate(ins)], **attrs)
            for name, value in zip(outs, result if isinstance(result, tuple) else (result,), strict=False):
                env[name] = value
        return env


class TorchDeviceGraph:
    """:class:`~edge_runtime.core.device_pipeline.DeviceGraph` over a captured :class:`CapturedGraph`: CuPy
    arrays in and out without copies (DLPack), on the pipeline's CUDA stream."""

    def __init__(self, graph: CapturedGraph, example: dict[str, np.ndarray]) -> None:
        self.graph = graph
        self.name = graph.name + (":fp16" if graph.fp16 else ":fp32")
        graph.capture(**{k: torch.from_numpy(v) for k, v in example.items()})

    def run_device(self, inputs: dict[str, Any], stream: Any) -> dict[str, Any]:
        import cupy

        with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)):
            out = self.graph.replay(**{k: torch.from_dlpack(v) for k, v in inputs.items()})
        return {k: cupy.from_dlpack(v) for k, v in out.items()}
