"""TensorRT plans of a bundle's graphs: built on the device that runs them, cached beside the bundle, never trusted
blindly.

A plan is specific to a GPU (compute capability), a TensorRT version and the exact ONNX file and build settings,
so it is built where it runs (``weakrest-edge build-engines BUNDLE``, or at start with ``engine: tensorrt``) and
never shipped in the bundle: the bundle folder is hashed and may be signed, and it is the same for every device.
Plans live under ``<cache>/<compute capability>-trt<version>/<graph>-<key>.plan`` with a JSON sidecar; the key is
the sha256 of the graph's sha256 (from the verified manifest), the build settings, the TensorRT version and the
compute capability.  A plan is used only when its sidecar holds the key computed now *and* the plan file's own
sha256 (a truncated or altered plan is stale); anything else is rebuilt, or refused with the command that builds
it.  One TensorRT timing cache per directory makes rebuilds (a new bundle version of the same product) fast.

Written against the TensorRT 10 Python API (8.6 works too: the explicit-batch flag is set there).  TensorRT
cannot run on the machines this project is developed and tested on; tests/test_tensorrt_plans.py checks the keys,
the cache and the refusals, and its plan-building tests skip where TensorRT or a GPU is absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bundle import BACKBONE, MATCHER, SWIN, sha256_of
from .device_pipeline import compute_capability, cupy_or_reason, require_cupy
from .engines import EngineError, EngineUnavailable

if TYPE_CHECKING:
    from .bundle import Bundle

log = logging.getLogger(__name__)

#: graph role -> file in the bundle
ROLE_FILES = {"backbone": BACKBONE, "swin": SWIN, "matcher": MATCHER}
TIMING_CACHE = "timing.cache"


class StalePlan(EngineUnavailable):
    """A plan is missing, stale or altered and was not to be built here (``auto``): the message says which and
    how to build it."""


def tensorrt_or_reason() -> tuple[Any, str | None]:
    """(tensorrt, None) where the TensorRT Python bindings import and a CUDA device is present; else why not."""
    try:
        import tensorrt
    except ImportError:
        return None, ("TensorRT's Python bindings are not installed (pip install 'weakrest-edge[gpu]' on x86-64; "
                      "JetPack's python3-libnvinfer on a Jetson)")
    except Exception as exc:  # a wheel for another CUDA fails at import with its own error
        return None, f"TensorRT cannot load ({' '.join(str(exc).split())})"
    cupy, reason = cupy_or_reason()
    if cupy is None:
        return None, reason
    return tensorrt, None


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is built with besides the graph: precision, workspace and the (static) input shapes."""

    precision: str = "fp16"
    workspace_mb: int = 1024
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # input name -> shape (min = opt = max)

    def canonical(self) -> str:
        return json.dumps({"precision": self.precision, "workspace_mb": self.workspace_mb,
                           "shapes": {k: list(v) for k, v in sorted(self.shapes.items())}}, sort_keys=True)


def input_shapes(bundle: Bundle) -> dict[str, dict[str, tuple[int, ...]]]:
    """role -> input name -> shape, from the manifest and the arrays: every graph is batch 1 with static shapes
    (the matcher's bank dimensions are this bundle's)."""
    m, a = bundle.manifest, bundle.arrays
    grid_m = m.backbone.grid[0] * m.backbone.grid[1]
    cells = m.backbone.descriptor_grid[0] * m.backbone.descriptor_grid[1]
    shapes = {"backbone": {"image": (1, 3, *m.preprocessing.input_size)},
              "swin": {"residual": (1, grid_m, m.backbone.d_f)}}
    if bundle.matcher_path is not None:
        n_images, n_bank, d_l = int(a["ref_descriptors"].shape[0]), int(a["bank"].shape[0]), m.posfar.d_l
        shapes["matcher"] = {
            "pcf": (1, grid_m, m.backbone.d_f), "descriptor": (1, cells, m.backbone.descriptor_channels),
            "bank_features": (n_bank, m.backbone.d_f), "bank_projected_aug": (n_images, n_bank // n_images, d_l + 1),
            "ref_by_cell": (cells, n_images, m.backbone.descriptor_channels), "ref_sq_norms": (n_images, cells),
            "pca_mean": (m.backbone.d_f,), "pca_components_t": (m.backbone.d_f, d_l)}
    return shapes


def plan_key(graph_sha256: str, settings: PlanSettings, trt_version: str, capability: str) -> str:
    """The plan's identity: a change of graph, settings, TensorRT or GPU generation gives another key."""
    text = json.dumps({"graph_sha256": graph_sha256, "settings": settings.canonical(), "tensorrt": trt_version,
                       "compute_capability": capability}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def default_cache_root(bundle_root: Path) -> Path:
    """Beside the bundle, never inside it: ``<bundle folder's parent>/engines`` (in a bundle store, one folder
    per product shared by its versions; the keys keep them apart)."""
    return Path(bundle_root).resolve().parent / "engines"


def plan_dir(cache_root: Path, capability: str, trt_version: str) -> Path:
    return Path(cache_root) / f"{capability}-trt{trt_version}"


@dataclass(frozen=True)
class PlanRecord:
    """The JSON sidecar of one plan."""

    role: str
    graph: str
    graph_sha256: str
    key: str
    plan_sha256: str
    settings: str
    tensorrt: str
    compute_capability: str
    built_at: str
    build_seconds: float


def plan_paths(directory: Path, role: str, key: str) -> tuple[Path, Path]:
    stem = Path(ROLE_FILES[role]).stem
    return directory / f"{stem}-{key[:16]}.plan", directory / f"{stem}-{key[:16]}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def store_plan(directory: Path, role: str, key: str, plan: bytes, record: dict[str, Any]) -> Path:
    """Write a plan, then its sidecar (so a sidecar never describes a plan not yet complete)."""
    plan_path, side_path = plan_paths(directory, role, key)
    _write_atomic(plan_path, plan)
    full = PlanRecord(role=role, key=key, plan_sha256=hashlib.sha256(plan).hexdigest(), **record)
    _write_atomic(side_path, (json.dumps(asdict(full), indent=2) + "\n").encode())
    return plan_path


def check_plan(directory: Path, role: str, key: str) -> tuple[Path | None, str]:
    """(the plan's path, "valid") when its sidecar holds ``key`` and the plan's bytes hash as recorded; else
    (None, why it is stale)."""
    plan_path, side_path = plan_paths(directory, role, key)
    if not side_path.is_file() or not plan_path.is_file():
        return None, f"no plan {plan_path.name} in {directory}"
    try:
        record = json.loads(side_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{side_path.name}: unreadable ({exc})"
    if record.get("key") != key:
        return None, f"{side_path.name}: built for another graph, settings or TensorRT (key differs)"
    if sha256_of(plan_path) != record.get("plan_sha256"):
        return None, f"{plan_path.name}: its bytes differ from those recorded at build (truncated or altered)"
    return plan_path, "valid"


def build_plan(trt: Any, onnx_path: Path, settings: PlanSettings, timing_cache: Path) -> bytes:
    """One serialized fp16 plan for ``onnx_path`` with one optimisation profile at ``settings.shapes``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise EngineError(f"{onnx_path.name}: TensorRT's ONNX parser refused it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        shape = settings.shapes.get(name)
        if shape is None:
            raise EngineError(f"{onnx_path.name}: no shape for input {name!r} (settings name "
                              f"{', '.join(settings.shapes)})")
        profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)  # ignore_mismatch off: the folder is per GPU and TensorRT version
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path.name}: TensorRT could not build a plan (see its log above)")
    _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def ensure_plans(bundle: Bundle, cache_root: Path | None = None, rebuild: bool = False, build_missing: bool = True,
                 workspace_mb: int = 1024, outcomes: dict[str, str] | None = None) -> dict[str, Path]:
    """role -> valid plan for the bundle's backbone, Swin (if any) and matcher (if any), on this GPU.

    Missing or stale plans are built when ``build_missing`` (``rebuild``: all of them), else :class:`StalePlan`
    names the plan and the command.  ``outcomes`` (if given) gets role -> "reused" / "built in N s" / why a
    matcher was left out, for ``build-engines`` to print.  A matcher that TensorRT cannot build is left out (the
    device pipeline then matches with CuPy) with a log line; the backbone and the Swin must build."""
    trt, reason = tensorrt_or_reason()
    if trt is None:
        raise EngineUnavailable(f"tensorrt: {reason}")
    cupy = require_cupy()
    capability, version = compute_capability(cupy), trt.__version__
    root = Path(cache_root) if cache_root is not None else default_cache_root(bundle.root)
    directory = plan_dir(root, capability, version)
    shapes = input_shapes(bundle)
    roles = ["backbone"] + (["swin"] if bundle.swin_path is not None else []) + \
        (["matcher"] if "matcher" in shapes else [])
    plans: dict[str, Path] = {}
    for role in roles:
        graph = ROLE_FILES[role]
        entry = bundle.manifest.files[graph]
        settings = PlanSettings(workspace_mb=workspace_mb, shapes=shapes[role])
        key = plan_key(entry.sha256, settings, version, capability)
        path, why = (None, "rebuild asked for") if rebuild else check_plan(directory, role, key)
        if path is not None:
            log.info("tensorrt: %s plan %s reused", role, path)
            plans[role] = path
            if outcomes is not None:
                outcomes[role] = "reused"
            continue
        if not build_missing:
            raise StalePlan(f"tensorrt: {why}; build it with: weakrest-edge build-engines {bundle.root}"
                            + (f" --cache {root}" if cache_root is not None else ""))
        log.info("tensorrt: building the %s plan (%s)", role, why)
        t0 = time.perf_counter()
        try:
            plan = build_plan(trt, bundle.root / graph, settings, directory / TIMING_CACHE)
        except EngineError as exc:
            if role == "matcher":
                log.warning("tensorrt: no matcher plan, matching runs on CuPy (%s)", exc)
                if outcomes is not None:
                    outcomes[role] = f"not built, matching runs on CuPy ({exc})"
                continue
            raise
        seconds = time.perf_counter() - t0
        plans[role] = store_plan(directory, role, key, plan, {
            "graph": graph, "graph_sha256": entry.sha256, "settings": settings.canonical(), "tensorrt": version,
            "compute_capability": capability, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(seconds, 1)})
        log.info("tensorrt: %s plan built in %.1f s: %s", role, seconds, plans[role])
        if outcomes is not None:
            outcomes[role] = f"built in {seconds:.1f} s"
    return plans


class TensorRTGraph:
    """One plan on the device: a :class:`~edge_runtime.core.device_pipeline.DeviceGraph` (CuPy arrays in and out,
    enqueued on the caller's stream with ``execute_async_v3``; output buffers allocated once and reused)."""

    def __init__(self, plan_path: Path) -> None:
        trt, reason = tensorrt_or_reason()
        if trt is None:
            raise EngineUnavailable(f"tensorrt: {reason}")
        self.cupy = require_cupy()
        self.name = f"tensorrt:{Path(plan_path).name}"
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{Path(plan_path).name}: TensorRT cannot deserialize it (another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append((name, dtype))
        self._buffers: dict[str, Any] = {}
        self._held: list[Any] = []  # converted inputs stay referenced until the next call (the enqueue reads them)

    def run_device(self, inputs: dict[str, Any], stream: Any) -> dict[str, Any]:
        cupy = self.cupy
        self._held = []
        for name, dtype in self.inputs:
            array = cupy.ascontiguousarray(inputs[name], dtype=dtype)
            self._held.append(array)
            self.context.set_input_shape(name, tuple(array.shape))
            self.context.set_tensor_address(name, array.data.ptr)
        out = {}
        for name, dtype in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = self._buffers.get(name)
            if buf is None or buf.shape != shape:
                buf = self._buffers[name] = cupy.empty(shape, dtype=dtype)
            self.context.set_tensor_address(name, buf.data.ptr)
            out[name] = buf
        if not self.context.execute_async_v3(stream.ptr):
            raise EngineError(f"{self.name}: enqueue failed")
        return out
