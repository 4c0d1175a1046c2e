"""``weakrest-edge``: run the edge service, inspect images with a bundle, check a bundle, benchmark inference."""

from __future__ import annotations

import os

# Set before numpy loads OpenBLAS, which reads it once: after each call OpenBLAS's idle workers then sleep at once
# instead of spinning for a while (OpenBLAS's default), on the cores the next frame's backbone needs.  On 2 cores
# with the `cpu` engine the backbone stage was bimodal, 3.35-5.36 ms (p25-p75) with the spin, and 3.19-3.31 ms
# without (README, "Engines: accuracy and speed").  A value already in the environment wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from .core.bundle import BundleError, load_bundle  # noqa: E402
from .core.engines import ENGINE_NAMES  # noqa: E402
from .core.pipeline import open_inspector  # noqa: E402
from .core.preprocess import ImageReadError, list_images, read_image  # noqa: E402


def cmd_check_bundle(args: argparse.Namespace) -> int:
    try:
        inspector = open_inspector(Path(args.bundle), threads=args.threads, engine=args.engine)
    except BundleError as exc:
        report = {"valid": False, "file": exc.file, "problem": exc.problem}
        print(json.dumps(report) if args.json else f"INVALID bundle {args.bundle}: {exc}", file=sys.stdout)
        return 1
    m = inspector.bundle.manifest
    report = {"valid": True, "product": m.product, "bundle_version": m.bundle_version,
              "schema_version": m.schema_version, "backbone": m.backbone.name, "input_size": m.preprocessing.input_size,
              "n_reference_images": m.posfar.n_reference_images, "n_bank": m.posfar.n_bank,
              "threshold": m.thresholds.image, "anomaly_map": m.scoring.anomaly_map,
              "foreground": m.foreground is not None, "training": m.training.supervision if m.training else None,
              "files": sorted(m.files), "engine": inspector.engines.describe() if inspector.engines else None}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"OK bundle {args.bundle}: product {m.product} version {m.bundle_version}, "
              f"{m.posfar.n_reference_images} reference images, {m.posfar.n_bank} bank entries, "
              f"anomaly map {m.scoring.anomaly_map}{' with foreground' if m.foreground else ''}, "
              f"threshold {m.thresholds.image:.4g}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    from .core.overlay import heatmap_overlay

    try:
        inspector = open_inspector(Path(args.bundle), threads=args.threads, engine=args.engine)
    except BundleError as exc:
        print(f"error: bundle refused: {exc}", file=sys.stderr)
        return 2
    images = list_images(args.images, recursive=True)
    if not images:
        print(f"error: no image files in {args.images}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    counts = {"pass": 0, "fail": 0, "error": 0}
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for path in tqdm(images, desc="inspecting", unit="img", disable=args.quiet):
            rel = str(path.relative_to(args.images))
            try:
                image = read_image(path)
            except ImageReadError as exc:
                fh.write(json.dumps({"file": rel, "verdict": "error", "error": str(exc)}) + "\n")
                counts["error"] += 1
                continue
            result = inspector.inspect(image)
            counts[result.verdict] += 1
            fh.write(json.dumps({"file": rel, **result.to_json()}) + "\n")
            if args.heatmaps == "all" or (args.heatmaps == "fail" and result.verdict == "fail"):
                pic = heatmap_overlay(image, result.heatmap, result.threshold, regions=result.regions)
                name = rel.replace("/", "__").rsplit(".", 1)[0] + ".png"
                cv2.imwrite(str(out / "heatmaps" / name), pic)
    print(f"inspected {len(images)} files: {counts['pass']} pass, {counts['fail']} fail, {counts['error']} error; "
          f"results in {out / 'results.jsonl'}, heatmaps in {out / 'heatmaps'}")
    return 1 if counts["error"] else 0


def _bench_images(folder: str | None, size_hw: tuple[int, int], limit: int) -> list[np.ndarray]:
    if folder is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (*size_hw, 3), dtype=np.uint8) for _ in range(8)]
    images = []
    for path in list_images(folder, recursive=True):
        try:
            images.append(read_image(path))
        except ImageReadError:
            continue
        if len(images) >= limit:
            break
    if not images:
        raise SystemExit(f"error: no readable images in {folder}")
    return images


def _bench_engines(value: str) -> list[str]:
    """``--engine`` of bench: one engine, a comma-separated list, or ``all`` (every engine but auto)."""
    names = [n for n in ENGINE_NAMES if n != "auto"] if value == "all" else [v.strip() for v in value.split(",")]
    unknown = [n for n in names if n not in ENGINE_NAMES]
    if unknown or not names:
        bad = ", ".join(unknown) if unknown else repr(value)
        raise argparse.ArgumentTypeError(f"unknown engine {bad} (one of "
                                         f"{', '.join(ENGINE_NAMES)}, a comma-separated list, or all)")
    return names


def _device_memory(inspector) -> dict[str, float] | None:
    """GPU engines: the device's memory in use (all processes) and this process's CuPy pool, in MB."""
    if getattr(inspector, "device_pipeline", None) is None:
        return None
    cupy = inspector.device_pipeline.cupy
    free, total = cupy.cuda.runtime.memGetInfo()
    return {"device_used_mb": (total - free) / 2**20, "cupy_pool_mb": cupy.get_default_memory_pool().total_bytes()
            / 2**20}


def time_frames(inspector, images: list[np.ndarray], frames: int, warmup: int) -> tuple[dict, float]:
    """Inspect ``frames`` frames (after ``warmup``) cycling through ``images``: each stage's p50/p99/mean (ms)
    and frames/s.  Shared with tools/bench_gpu.py."""
    for i in range(warmup):
        inspector.inspect(images[i % len(images)])
    stages: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i in range(frames):
        for name, ms in inspector.inspect(images[i % len(images)]).timings_ms.items():
            stages.setdefault(name, []).append(ms)
    wall = time.perf_counter() - t0
    table = {name: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
                    "mean": float(np.mean(v))} for name, v in stages.items()}
    return table, frames / wall


def _bench_one(inspector, images: list[np.ndarray], args: argparse.Namespace) -> dict:
    table, fps = time_frames(inspector, images, args.frames, args.warmup)
    m = inspector.bundle.manifest
    backbone = table.get("backbone")  # GPU engines time the device stages by CUDA events instead
    return {
        "bundle": args.bundle, "product": m.product, "frames": args.frames, "images": len(images),
        "n_reference_images": m.posfar.n_reference_images, "k_references": m.posfar.k_references,
        "n_bank": m.posfar.n_bank, "engine": inspector.engines.name if inspector.engines else inspector.backbone.name,
        "engine_detail": inspector.engines.describe() if inspector.engines else None,
        "stages_ms": table, "fps": fps,
        "total_over_backbone_p50": table["total"]["p50"] / backbone["p50"] if backbone else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "gpu_memory": _device_memory(inspector),
    }


def cmd_bench(args: argparse.Namespace) -> int:
    """One engine, or several measured one after the other on the same frames (exit 2 when none can run)."""
    engines = args.engine
    reports, refused = [], {}
    images: list[np.ndarray] | None = None  # decoded once: every engine runs the same bundle's input size
    for engine in engines:
        try:
            inspector = open_inspector(Path(args.bundle), threads=args.threads, engine=engine)
        except BundleError as exc:
            if len(engines) == 1:
                print(f"error: bundle refused: {exc}", file=sys.stderr)
                return 2
            refused[engine] = str(exc)
            print(f"engine {engine}: not measured: {exc}", file=sys.stderr)
            continue
        images = images or _bench_images(args.images, inspector.input_hw, 64)
        reports.append(_bench_one(inspector, images, args))
        del inspector
    if not reports:
        print("error: no engine asked for can run here", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reports[0] if len(engines) == 1 else {"engines": reports, "not_measured": refused}))
        return 0
    r = reports[0]
    print(f"bundle {args.bundle} ({r['product']}, {r['n_reference_images']} reference images, "
          f"K={r['k_references']}, {r['n_bank']} bank entries), {args.frames} frames, batch 1")
    for report in reports:
        table = report["stages_ms"]
        print(f"\nengine {report['engine']}")
        print(f"{'stage':<20}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
        for name, row in table.items():
            print(f"{name:<20}{row['p50']:>10.3f}{row['p99']:>10.3f}{row['mean']:>10.3f}")
        ratio = report["total_over_backbone_p50"]
        gpu = report["gpu_memory"]
        print(f"throughput {report['fps']:.1f} frames/s"
              + (f"; total/backbone p50 = {ratio:.2f}" if ratio else "")
              + f"; peak RSS {report['peak_rss_mb']:.0f} MB"
              + (f"; GPU memory in use {gpu['device_used_mb']:.0f} MB (CuPy pool {gpu['cupy_pool_mb']:.0f} MB)"
                 if gpu else ""))
    if len(reports) > 1:
        print(f"\n{'engine':<16}{'total p50':>11}{'total p99':>11}{'frames/s':>10}")
        for report in reports:
            t = report["stages_ms"]["total"]
            print(f"{report['engine']:<16}{t['p50']:>11.3f}{t['p99']:>11.3f}{report['fps']:>10.1f}")
    for engine, why in refused.items():
        print(f"{engine:<16} not measured: {why}")
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    """TensorRT plans for a bundle on this GPU: exit 0 built or reused, 2 bundle refused, 3 no TensorRT / GPU."""
    import logging

    from .core.engines import EngineError, EngineUnavailable
    from .core.tensorrt_plans import default_cache_root, ensure_plans, tensorrt_or_reason

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"error: bundle refused: {exc}", file=sys.stderr)
        return 2
    trt, reason = tensorrt_or_reason()
    if trt is None:
        print(f"error: build-engines needs TensorRT and a CUDA device: {reason}", file=sys.stderr)
        return 3
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    outcomes: dict[str, str] = {}
    try:
        plans = ensure_plans(bundle, Path(args.cache) if args.cache else None, rebuild=args.force,
                             workspace_mb=args.workspace_mb, outcomes=outcomes)
    except EngineUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for role, outcome in outcomes.items():
        print(f"{role:<9}{outcome:<16}{plans.get(role, '-')}")
    print(f"{len(plans)} plan(s) ready under {Path(args.cache) if args.cache else default_cache_root(bundle.root)} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The edge service (systemd ``Type=notify``): exit 2 on a bad config or no bundle to serve."""
    import logging

    from .service.config import EdgeConfigError, load_edge_config
    from .service.runner import EdgeService, ServiceError

    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(levelname)s %(name)s: %(message)s" if args.journal else
                        "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_edge_config(args.config)
    except EdgeConfigError as exc:
        print(f"error: bad config: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"OK config {args.config}: product {cfg.bundles.product} from {cfg.bundles.store}, camera "
              f"{cfg.camera.name} ({cfg.camera.source}), broker {cfg.mqtt.host}:{cfg.mqtt.port}, "
              f"topics {cfg.mqtt.topic_prefix}/...")
        return 0
    try:
        service = EdgeService(cfg)
    except ServiceError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 2
    return service.run_forever()


def cmd_opcua_cert(args: argparse.Namespace) -> int:
    """Self-signed OPC UA application certificate + key for the server (``opcua.certificate``/``private_key``)."""
    from .publishing.opcua import make_certificate

    try:
        cert, key = make_certificate(args.out, args.hostname, application_uri=args.uri, client=args.client)
    except (OSError, ValueError) as exc:
        print(f"error: cannot write the certificate into {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {cert} and {key} (mode 0600); set opcua.certificate and opcua.private_key to them"
          if not args.client else f"wrote {cert} and {key} (mode 0600); copy {cert} into the server's "
          "opcua.trusted_clients folder to trust this client")
    return 0


def _engine_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINE_NAMES, default="auto",
                   help="inference engine (auto: fastest the machine and bundle allow; cpu: ONNX Runtime fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weakrest-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the edge service: camera -> inspection -> MQTT (systemd Type=notify)")
    p.add_argument("--config", required=True, help="edge runtime config (configs/edge.yaml)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--journal", action="store_true", default=bool(os.environ.get("JOURNAL_STREAM")),
                   help="log without timestamps (the journal adds them); the default under systemd")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="inspect a folder of images, write results.jsonl and heatmap overlays")
    p.add_argument("--bundle", required=True, help="bundle folder or .tar")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--heatmaps", choices=["all", "fail", "none"], default="all", help="which overlays to write")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all usable CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _engine_option(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("check-bundle", help="verify a bundle (hashes, arrays, schema, graph); exit 0 only if valid")
    p.add_argument("bundle")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    _engine_option(p)
    p.set_defaults(func=cmd_check_bundle)

    p = sub.add_parser("bench", help="per-stage p50/p99 latency and frames/s of batch-1 inference")
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", default=None, help="images to cycle through (default: random frames)")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--engine", type=_bench_engines, default=["auto"], metavar="E[,E...]|all",
                   help="engine(s) to measure one after the other on the same frames (all: every engine; one "
                        "that cannot run here is reported, not measured); default auto")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("build-engines", help="build (or reuse) the bundle's TensorRT fp16 plans on this GPU",
                       description="Builds the TensorRT fp16 plans of the bundle's backbone, Swin and matcher "
                                   "graphs for this GPU and TensorRT, beside the bundle (never inside it), keyed by "
                                   "each graph's sha256, the settings and the TensorRT version; valid plans are "
                                   "reused. Exit 0: plans ready; 2: the bundle is refused or a graph cannot be "
                                   "built; 3: no TensorRT or no CUDA device here.")
    p.add_argument("bundle", help="bundle folder (a store's <product>/current works)")
    p.add_argument("--cache", default=None, help="plan folder (default: <bundle's parent>/engines, where the "
                                                  "service looks)")
    p.add_argument("--force", action="store_true", help="rebuild even valid plans")
    p.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT builder workspace (MB)")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("opcua-cert", help="write a self-signed OPC UA application certificate and key (mode 0600)")
    p.add_argument("--out", required=True, help="folder for server-cert.der and server-key.pem")
    p.add_argument("--hostname", default=None, help="host name (or IP) clients connect to (default: this host's)")
    p.add_argument("--uri", default=None, help="application URI (default: urn:<hostname>:weakrest:edge)")
    p.add_argument("--client", action="store_true", help="a client certificate (client-cert.der) for a test client")
    p.set_defaults(func=cmd_opcua_cert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
