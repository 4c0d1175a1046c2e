"""Inference engines behind one small interface, and the one switch that picks them.

``engine: auto | cpu | cpu-int8 | openvino | openvino-bf16 | openvino-int8 | cuda | tensorrt`` names which
runtime runs the bundle's two graphs (backbone and Swin) and at which precision:

- ``cpu``: ONNX Runtime, CPU execution provider, the fp32 graphs: the reference path every other engine is
  compared with.
- ``cpu-int8``: ONNX Runtime on the bundle's int8 graphs (``backbone.int8.onnx`` / ``swin.int8.onnx``, written
  by ``training_host.models.quantize`` only when they pass its accuracy gate; a graph without an int8 twin runs
  in fp32).
- ``openvino``: OpenVINO on the fp32 graphs at f32 inference precision (OpenVINO's own default on CPUs with
  bf16 instructions is bf16: not here, so results equal the ``cpu`` path to float rounding), LATENCY hint,
  threads from the process's CPU affinity; device ``CPU`` (or ``GPU``, an Intel integrated GPU, when asked
  for and present).
- ``openvino-bf16``: the same at bf16 inference precision (CPUs with AVX-512 BF16 / AMX); reduced precision,
  so like int8 it needs the bundle's accuracy gate to have accepted it.
- ``openvino-int8``: OpenVINO on the int8 graphs (its low-precision transformations read the QDQ pairs).
- ``cuda``: ONNX Runtime's CUDA execution provider (onnxruntime-gpu) on the fp32 graphs, bound to device buffers;
- ``tensorrt``: native TensorRT fp16 plans built from the bundle's graphs on the device that runs them and cached
  beside the bundle (``core.tensorrt_plans``, ``weakrest-edge build-engines``).  Asked for by name, a missing or
  stale plan is built at start; ``auto`` takes only plans that are already built and valid.

Both GPU engines keep a frame on the device from the backbone's output to the Swin's input: retrieval, matching
and the residual run there too (``core.device_pipeline``, ``core.device_matching``, on CuPy), on one CUDA stream
per inspector.

``auto`` takes the first engine of :data:`AUTO_ORDER` that this machine has (the package is importable, the
device exists), that the bundle allows (its int8 graphs exist; reduced precision passed its accuracy gate)
and that builds; the order is by measured speed on a 2-core AVX-512 CPU (README: Engines).  The choice and the
reason for every engine passed over are kept in :class:`EngineSet`, for /health and the metrics.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from .bundle import Bundle
    from .defect_bank import BankSearch
    from .device_pipeline import DeviceGraphs
    from .matching import NearestSearch

#: every value of the ``engine`` switch
ENGINE_NAMES: tuple[str, ...] = ("auto", "cpu", "cpu-int8", "openvino", "openvino-bf16", "openvino-int8", "cuda",
                                 "tensorrt")
#: engines that run on a CUDA device, with the matching on it too
GPU_ENGINES: tuple[str, ...] = ("cuda", "tensorrt")
#: engines of reduced precision: ``auto`` takes them only when the bundle's gate accepted them
GATED_ENGINES: tuple[str, ...] = ("cpu-int8", "openvino-bf16", "openvino-int8")
#: what ``auto`` tries, fastest first: whole frames measured on this project's 2-core AVX-512 machine
#: (``make bench-peer``, README: Engines), after the GPU engines.  ``openvino`` at f32 gives ``cpu``'s results and,
#: since it runs the nearest-candidate search in its own pool (:class:`OpenVinoSearch`), whole frames 1.5x faster
#: (6.8 against 10.0 ms p50), ahead of ``cpu-int8`` (8.5 ms); under the shipped unit without the OpenVINO drop-in
#: its JIT cannot run, and ``auto`` passes over it saying so
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "cuda", "openvino-bf16", "openvino-int8", "openvino", "cpu-int8", "cpu")


class Engine(Protocol):
    """Runs one graph: named numpy inputs in, named numpy outputs out."""

    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class EngineError(RuntimeError):
    """An engine could not be built or run; the message names the graph file."""


class EngineUnavailable(EngineError):
    """The engine asked for cannot run here (package, device or bundle graphs missing); the message says why."""


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may use (cgroup/affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def limit_blas_threads(threads: int) -> None:
    """Run numpy's BLAS (matching and retrieval GEMMs) on at most ``threads`` threads, as the engines are.

    Why: stations sharing a box are each given C / N threads, but numpy's OpenBLAS keeps its own pool of one
    thread per core in every process, and its workers spin between calls.  Measured with 4 stations at 10 fps on
    2 cores (``tools/bench_cameras.py``): grab -> delivery p50 94-102 ms with a pool per core, 13.6 ms limited."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


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


_OPENVINO_CORE = None
_OPENVINO_CORE_LOCK = threading.Lock()


def openvino_core():
    """The process's one OpenVINO ``Core``, created on first use and never released (ImportError without the
    package).

    Why one for the life of the process: OpenVINO's CPU plugin gives the thread that creates it an alternate signal
    stack (AMX makes signal frames larger) and unmaps that stack when the plugin is destroyed, restoring the old one
    only on the destroying thread.  With a ``Core`` per engine, a bundle switch released the old engines on another
    thread and left the loading thread's signal stack unmapped: the service's next SIGHUP or SIGTERM then killed it
    with SIGSEGV (tests/test_engines.py reproduces it in a subprocess).  One ``Core`` keeps that stack valid, and
    each later graph compiles without loading the plugin again."""
    global _OPENVINO_CORE
    with _OPENVINO_CORE_LOCK:
        if _OPENVINO_CORE is None:
            import openvino as ov

            _OPENVINO_CORE = ov.Core()
        return _OPENVINO_CORE


def openvino_devices() -> list[str]:
    """OpenVINO's devices on this machine (``[]`` when the package is absent or cannot start)."""
    try:
        return list(openvino_core().available_devices)
    except Exception:  # ImportError, or a runtime that cannot load its plugins
        return []


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 natively here (else bf16 would only be emulated)."""
    try:
        return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False


class OpenVinoEngine:
    """One graph compiled by OpenVINO: reads ONNX directly, LATENCY hint, one infer request reused per call.

    ``precision`` is OpenVINO's inference precision hint: ``f32`` (equal to the fp32 path) or ``bf16``."""

    def __init__(self, graph: Path, device: str = "CPU", threads: int | None = None, precision: str = "f32") -> None:
        try:
            core = openvino_core()
        except ImportError as exc:
            raise EngineUnavailable("openvino is not installed (pip install 'weakrest-edge[openvino]')") from exc
        self.name = f"openvino:{device}:{precision}:{Path(graph).name}"
        if device not in core.available_devices:
            raise EngineUnavailable(f"OpenVINO device {device} is not present (have {core.available_devices})")
        self.compiled = _openvino_compile(core, str(graph), device, _openvino_config(device, precision, threads),
                                          Path(graph).name)
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.request.infer(inputs)
        # copies: the request's output buffers are overwritten by the next call
        return {name: np.array(self.request.get_tensor(name).data) for name in self.output_names}


def _openvino_config(device: str, precision: str, threads: int | None) -> dict[str, object]:
    """Compile settings of every OpenVINO model here: LATENCY hint, the precision hint and, on the CPU, the thread
    count and no pinning (OpenVINO's default with the LATENCY hint on Linux would pin: the same cores run numpy
    between the graphs and, on a several-camera box, other stations' services; a pinned thread cannot move off a
    busy core, measured on the loaded 2-core machine: ~2x slower frames pinned)."""
    config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if device == "CPU":
        config["INFERENCE_NUM_THREADS"] = threads or default_threads()
        config["ENABLE_CPU_PINNING"] = False
    return config


def _openvino_compile(core, model, device: str, config: dict, what: str):
    """``core.compile_model`` with OpenVINO's errors as :class:`EngineError` naming ``what`` and, when its JIT
    could not map code executable (a sandboxed unit), the drop-in that allows it."""
    try:
        return core.compile_model(model, device, config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with its own text
        hint = ""
        if "protect" in str(exc):
            hint = ("; its JIT needs writable+executable memory: under systemd install "
                    "systemd/drop-ins/openvino.conf (MemoryDenyWriteExecute=no)")
        detail = " ".join(str(exc).split())
        raise EngineError(f"{what}: OpenVINO cannot compile it for {device} ({detail}){hint}") from exc


class OpenVinoSearch:
    """The nearest-candidate search (:data:`~edge_runtime.core.matching.NearestSearch`) as a small OpenVINO model:
    PCA projection, the augmented product and its argmax, at f32 (the same nearest candidate as numpy's, to float
    rounding), for one bundle's static shapes.

    Why: between the OpenVINO graphs, numpy's OpenBLAS pool and OpenVINO's pool each spin for cores after their
    work; on 2 cores the backbone and the Swin then ran ~1.5x slower.  Run here, the search shares OpenVINO's pool
    and numpy is left with no multi-threaded work (``Inspector`` limits its BLAS to one thread for OpenVINO
    engines).  The candidates (K images' bank rows, at most ``n_candidates``) are padded to that static count
    with rows that can never win."""

    def __init__(self, pca_components: np.ndarray, pca_mean: np.ndarray, n_queries: int, n_candidates: int,
                 threads: int | None = None) -> None:
        import openvino as ov
        import openvino.opset13 as ops

        components = np.asarray(pca_components, dtype=np.float32)
        d_l, d_f = components.shape
        pcf = ops.parameter([n_queries, d_f], ov.Type.f32, name="pcf")
        candidates = ops.parameter([n_candidates, d_l + 1], ov.Type.f32, name="candidates")
        query = ops.matmul(ops.subtract(pcf, ops.constant(np.asarray(pca_mean, dtype=np.float32))),
                           ops.constant(components), False, True)
        query_aug = ops.concat([query, ops.constant(np.ones((n_queries, 1), np.float32))], axis=1)
        scores = ops.matmul(query_aug, candidates, False, True)
        top = ops.topk(scores, ops.constant(np.int64(1)), axis=1, mode="max", sort="none",
                       index_element_type="i64")
        nearest = ops.squeeze(top.output(1), ops.constant(np.int64(1)))
        model = ov.Model([nearest], [pcf, candidates], "nearest_candidates")
        self.request = _openvino_compile(openvino_core(), model, "CPU", _openvino_config("CPU", "f32", threads),
                                         "the nearest-candidate search").create_infer_request()
        self.n_candidates = n_candidates
        self.padded = np.empty((n_candidates, d_l + 1), np.float32)  # candidates, then padding (each call)

    def __call__(self, pcf: np.ndarray, candidates_aug: np.ndarray) -> np.ndarray:
        n = candidates_aug.shape[0]
        if n > self.n_candidates:
            raise ValueError(f"{n} candidates, more than the {self.n_candidates} the search was compiled for")
        self.padded[:n] = candidates_aug
        self.padded[n:, :-1] = 0.0
        self.padded[n:, -1] = -1e30  # [0, -1e30] . [q, 1]: below every real candidate's q.c - |c|^2 / 2
        self.request.infer({"pcf": np.ascontiguousarray(pcf, dtype=np.float32), "candidates": self.padded})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.int64)


class OpenVinoBankSearch:
    """A defect bank's search (:data:`~edge_runtime.core.defect_bank.BankSearch`) as a small OpenVINO model: the
    augmented product against the bank's blocks (a constant) and its maximum, at f32, for one grid's patch count.

    Why: with an OpenVINO engine numpy keeps one BLAS thread (:class:`OpenVinoSearch`), so the bank's product,
    the stage's whole work, ran on one core: 2.2 ms a frame against 1.5 ms with two (1 067 blocks, MTD's fast
    profile).  Here it shares OpenVINO's pool with the graphs."""

    def __init__(self, features: np.ndarray, n_queries: int, threads: int | None = None) -> None:
        import openvino as ov
        import openvino.opset13 as ops

        from .matching import augmented_projection

        augmented = augmented_projection(np.asarray(features, dtype=np.float32))  # (blocks, d_f + 1)
        d_f = augmented.shape[1] - 1
        pcf = ops.parameter([n_queries, d_f], ov.Type.f32, name="pcf")
        query_aug = ops.concat([pcf, ops.constant(np.ones((n_queries, 1), np.float32))], axis=1)
        scores = ops.matmul(query_aug, ops.constant(augmented), False, True)
        best = ops.reduce_max(scores, ops.constant(np.int64(1)), keep_dims=False)
        model = ov.Model([best], [pcf], "defect_bank_search")
        self.request = _openvino_compile(openvino_core(), model, "CPU", _openvino_config("CPU", "f32", threads),
                                         "the defect bank's search").create_infer_request()
        self.n_queries = n_queries

    def __call__(self, pcf: np.ndarray) -> np.ndarray:
        if len(pcf) != self.n_queries:
            raise ValueError(f"{len(pcf)} patches, the defect bank's search was compiled for {self.n_queries}")
        self.request.infer({"pcf": np.ascontiguousarray(pcf, dtype=np.float32)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)


@dataclass
class EngineSet:
    """The engines that run one bundle's graphs, which switch value chose them and why."""

    name: str  # the resolved engine (never "auto")
    requested: str  # what the config or command line asked for
    backbone: Engine
    swin: Engine | None
    graphs: dict[str, str]  # role -> graph file name ("backbone": "backbone.int8.onnx", ...)
    passed_over: dict[str, str] = field(default_factory=dict)  # auto: engine -> why not
    device: DeviceGraphs | None = None  # GPU engines: the graphs on the device, for the device pipeline
    # the engine's nearest-candidate and defect bank searches on its own threads: OpenVINO's pool, or numpy's
    # search on ``matching.SearchThreads`` (None: the scorer's one-thread numpy search, or no bank; GPU engines
    # match on the device)
    search: NearestSearch | None = None
    bank_search: BankSearch | None = None

    def describe(self) -> dict:
        """For /health and reports: what runs, on which graphs, and (auto) what was passed over."""
        out = {"engine": self.name, "requested": self.requested, "graphs": dict(self.graphs)}
        if self.passed_over:
            out["passed_over"] = dict(self.passed_over)
        return out


def _graph_paths(bundle: Bundle, int8: bool) -> dict[str, Path]:
    """role -> graph path the engine runs; int8 twins where the bundle has them (and ``int8`` is asked)."""
    paths: dict[str, Path] = {"backbone": bundle.backbone_path}
    if bundle.swin_path is not None:
        paths["swin"] = bundle.swin_path
    if int8:
        twins = bundle.int8_paths
        if not twins:
            raise EngineUnavailable(f"bundle {bundle.root.name} has no int8 graphs (add them: weakrest-train "
                                    "quantize BUNDLE --data DIR; the accuracy gate may have refused them)")
        paths.update(twins)
    return paths


def _gate_refusal(bundle: Bundle, engine: str) -> str | None:
    """Why the bundle does not allow a reduced-precision engine (None: its accuracy gate accepted it)."""
    gate = bundle.precision_gate(engine)
    if gate is None:
        return f"the bundle's accuracy gate has not measured {engine} (weakrest-train quantize)"
    if not gate.accepted:
        return f"the bundle's accuracy gate refused {engine}: {gate.reason}"
    return None


def _builder(engine: str, threads: int | None, device: str) -> Callable[[Path], Engine]:
    if engine in ("cpu", "cpu-int8"):
        return lambda p: OnnxRuntimeEngine(p, threads=threads)
    if engine.startswith("openvino"):
        precision = "bf16" if engine == "openvino-bf16" else "f32"
        if precision == "bf16" and not cpu_has_bf16():
            raise EngineUnavailable("openvino-bf16 needs a CPU with bf16 instructions (AVX-512 BF16 or AMX)")
        return lambda p: OpenVinoEngine(p, device=device, threads=threads, precision=precision)
    raise EngineUnavailable(f"unknown engine {engine!r} (one of {', '.join(ENGINE_NAMES)})")


def build_engine_set(bundle: Bundle, engine: str, threads: int | None = None, device: str = "CPU",
                     requested: str | None = None) -> EngineSet:
    """The engines of one named (not ``auto``) engine for ``bundle``; :class:`EngineUnavailable` or
    :class:`EngineError` say why it cannot be.  Reduced-precision engines asked for by name run even when the
    gate refused them (an evaluation may want exactly that); ``auto`` never picks those."""
    if engine not in ENGINE_NAMES or engine == "auto":
        raise EngineUnavailable(f"unknown engine {engine!r} (one of {', '.join(n for n in ENGINE_NAMES)})")
    if engine in GPU_ENGINES:
        return _gpu_engine_set(bundle, engine, requested or engine, build_plans=requested != "auto")
    build = _builder(engine, threads, device)
    paths = _graph_paths(bundle, int8=engine.endswith("int8"))
    built = {role: build(path) for role, path in paths.items()}
    if engine.startswith("openvino") and device == "CPU":
        search, bank_search = _openvino_search(bundle, threads), _openvino_bank_search(bundle, threads)
    else:
        search, bank_search = _host_searches(bundle, threads)
    return EngineSet(name=engine, requested=requested or engine, backbone=built["backbone"], swin=built.get("swin"),
                     graphs={role: path.name for role, path in paths.items()}, search=search,
                     bank_search=bank_search)


def _openvino_search(bundle: Bundle, threads: int | None) -> OpenVinoSearch:
    """The bundle's nearest-candidate search compiled for its shapes: the grid's patches against the most bank
    rows its K reference images hold."""
    from .matching import max_candidates

    m, a = bundle.manifest, bundle.arrays
    return OpenVinoSearch(a["pca_components"], a["pca_mean"], m.backbone.grid[0] * m.backbone.grid[1],
                          max_candidates(a["bank_image"], m.posfar.k_references), threads=threads)


def _host_searches(bundle: Bundle, threads: int | None) -> tuple[NearestSearch, BankSearch | None]:
    """numpy's nearest-candidate and defect bank searches (None: no bank), their blocks of queries shared by
    ``threads`` threads (``matching.SearchThreads``)."""
    from .defect_bank import NumpyBankSearch
    from .matching import NumpySearch, SearchThreads
    from .pca import PCA

    a = bundle.arrays
    shared = SearchThreads(threads or default_threads())
    bank_search = NumpyBankSearch(a["defect_bank"], shared) if "defect_bank" in a else None
    return NumpySearch(PCA.from_arrays(a), shared), bank_search


def _openvino_bank_search(bundle: Bundle, threads: int | None) -> OpenVinoBankSearch | None:
    """The bundle's defect bank search compiled for the grid's patches (None: the bundle has no bank)."""
    if "defect_bank" not in bundle.arrays:
        return None
    grid = bundle.manifest.backbone.grid
    return OpenVinoBankSearch(bundle.arrays["defect_bank"], grid[0] * grid[1], threads=threads)


def _gpu_engine_set(bundle: Bundle, engine: str, requested: str, build_plans: bool) -> EngineSet:
    """``cuda`` or ``tensorrt``: the graphs as :class:`~edge_runtime.core.device_pipeline.DeviceGraph` on one new
    CUDA stream, with host adapters for the callers that want numpy.  ``build_plans``: build missing or stale
    TensorRT plans (asked for by name) rather than refusing (``auto``, which must not spend minutes at start)."""
    from .device_pipeline import DeviceGraphs, HostGraph, OrtCudaGraph, require_cupy

    cupy = require_cupy()
    stream = cupy.cuda.Stream(non_blocking=True)
    if engine == "tensorrt":
        from .tensorrt_plans import TensorRTGraph, ensure_plans

        # backbone, swin and (if in the bundle) matcher; EngineUnavailable says what is missing here
        plans = ensure_plans(bundle, build_missing=build_plans)
        graphs = {role: TensorRTGraph(path) for role, path in plans.items()}
        names = {role: path.name for role, path in plans.items()}
    else:
        m = bundle.manifest
        roles = {"backbone": bundle.backbone_path, **({"swin": bundle.swin_path} if bundle.swin_path else {})}
        grid_m = m.backbone.grid[0] * m.backbone.grid[1]
        cells = m.backbone.descriptor_grid[0] * m.backbone.descriptor_grid[1]
        shapes = {"pcf": (1, grid_m, m.backbone.d_f), "descriptor": (1, cells, m.backbone.descriptor_channels),
                  "probability": (1, grid_m)}
        graphs = {role: OrtCudaGraph(path, stream, shapes) for role, path in roles.items()}
        names = {role: path.name for role, path in roles.items()}
    device_graphs = DeviceGraphs(backbone=graphs["backbone"], swin=graphs.get("swin"), stream=stream,
                                 matcher=graphs.get("matcher"))
    return EngineSet(name=engine, requested=requested, backbone=HostGraph(graphs["backbone"], stream),
                     swin=HostGraph(graphs["swin"], stream) if "swin" in graphs else None, graphs=names,
                     device=device_graphs)


def select_engines(bundle: Bundle, engine: str = "auto", threads: int | None = None,
                   device: str = "CPU") -> EngineSet:
    """The engines for ``bundle`` under the switch value ``engine`` (``auto``: first of :data:`AUTO_ORDER`
    that this machine and the bundle allow and that builds; ``cpu`` always does)."""
    if engine != "auto":
        return build_engine_set(bundle, engine, threads, device)
    passed_over: dict[str, str] = {}
    for candidate in AUTO_ORDER:
        if candidate in GATED_ENGINES:
            refusal = _gate_refusal(bundle, candidate)
            if refusal is not None:
                passed_over[candidate] = refusal
                continue
        try:
            chosen = build_engine_set(bundle, candidate, threads, device, requested="auto")
        except EngineError as exc:
            if candidate == "cpu":
                raise
            passed_over[candidate] = str(exc)
            continue
        chosen.passed_over = passed_over
        return chosen
    raise EngineUnavailable("no engine can run this bundle")  # pragma: no cover - cpu always builds or raises
