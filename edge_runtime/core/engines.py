"""Inference engines behind one small interface (ONNX Runtime now; native TensorRT plugs in here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np


class Engine(Protocol):
    """Runs one graph: named numpy inputs in, named numpy outputs out."""

    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class EngineError(RuntimeError):
    """An engine could not be built or run; the message names the graph file."""


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may use (cgroup/affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeEngine:
    """ONNX Runtime session; picks TensorRT / CUDA execution providers when present and asked for."""

    def __init__(self, graph: Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.name = f"onnxruntime:{Path(graph).name}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between runs: the pipeline alternates ONNX Runtime graphs with numpy (BLAS) matching
        # on the same cores, and spinning ORT workers were measured to triple the matching time on 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(graph), sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises several private exception types
            raise EngineError(f"{Path(graph).name}: ONNX Runtime cannot load it ({exc})") from exc
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs, strict=True))
