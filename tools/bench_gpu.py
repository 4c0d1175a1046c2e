"""The GPU path measured on a machine with PyTorch and CuPy but without TensorRT or onnxruntime-gpu (issue 14).

What runs is the product's own GPU frame path (``edge_runtime.core.device_pipeline``: pinned upload, one CUDA
stream, the backbone's outputs kept on the device, retrieval + matching + residual in CuPy by
``device_matching.DeviceMatcher``, the Swin reading the residual in place, host-side fusion/heatmap/score) with
one part swapped: the two graphs are run by PyTorch (``tools/torch_stand_in.py``: the bundle's own ONNX graphs,
op by op, autocast fp16 or fp32, replayed as CUDA graphs) instead of TensorRT plans.  Every figure this prints
for those graphs is a **stand-in** figure and says so; it never prints a TensorRT figure.

For each bundle and images given:
1. the CPU reference (ONNX Runtime, engine ``cpu``) on every image: score, verdict, nearest bank row per patch;
2. each stand-in variant (fp32 with TF32 off, fp16) on the same images: the share of patches whose nearest
   normal patch is the same, the share of images with the same K references, the largest score difference
   (absolute and relative to the threshold), verdict changes;
3. timing over ``--frames`` frames: stage p50/p99 (device stages by CUDA events), end to end, frames/s, device
   memory, next to the CPU engine with ``--cpu-threads`` threads measured in the same run on this machine;
4. matching alone: the host matcher (numpy) against the CuPy matcher on the same features.

``--paper`` adds the paper profile at 512x512 (Wide-ResNet-50 layers 1-3, d_f 1024, 64x64 grid, K = 64, a
1024-d 4-block 32-head Swin over 9 sliding 32x32 windows): training-host modules with random weights (the
Wide-ResNet weights cannot be fetched here) and a synthetic bank of the profile's shape; timing only.

    python tools/bench_gpu.py --bundle B --images DIR [--bundle B2 --images DIR2] --paper --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from edge_runtime.cli import time_frames  # noqa: E402
from edge_runtime.core.bundle import load_bundle  # noqa: E402
from edge_runtime.core.device_matching import DeviceMatcher  # noqa: E402
from edge_runtime.core.device_pipeline import DeviceGraphs, DevicePipeline, HostGraph, require_cupy  # noqa: E402
from edge_runtime.core.engines import EngineSet  # noqa: E402
from edge_runtime.core.pipeline import Evidence, Inspector, PosFARScorer, open_inspector  # noqa: E402
from edge_runtime.core.preprocess import list_images, read_image, to_input_tensor  # noqa: E402


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(np.mean(values))}


def _device_memory_mb(cupy) -> float:
    free, total = cupy.cuda.runtime.memGetInfo()
    return (total - free) / 2**20


def _release(cupy) -> None:
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def cpu_reference(bundle_dir: Path, images: list[np.ndarray], threads: int) -> tuple[Inspector, list[dict]]:
    inspector = open_inspector(bundle_dir, threads=threads, engine="cpu")
    s = inspector.scorer
    out = []
    for image in images:
        pcf, descriptor = inspector.features(image)
        refs = s.references.nearest(descriptor, s.k)
        rows = s.bank.match(pcf, refs).bank_rows
        result = inspector.inspect(image)
        out.append({"score": result.score, "verdict": result.verdict, "refs": refs, "rows": rows,
                    "pcf": pcf, "descriptor": descriptor})
    return inspector, out


def stand_in_inspector(bundle_dir: Path, fp16: bool, threads: int) -> Inspector:
    """The bundle's graphs on the torch stand-in behind the product's device pipeline and inspector."""
    import torch
    from torch_stand_in import TorchDeviceGraph, TorchOnnxGraph

    cupy = require_cupy()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would keep 10 mantissa bits)
    torch.backends.cudnn.allow_tf32 = False
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    grid_m = m.backbone.grid[0] * m.backbone.grid[1]
    stream = cupy.cuda.Stream(non_blocking=True)
    backbone = TorchDeviceGraph(TorchOnnxGraph(bundle.backbone_path, "cuda", fp16),
                                {"image": np.zeros((1, 3, *m.preprocessing.input_size), np.float32)})
    swin = None
    if bundle.swin_path is not None:
        swin = TorchDeviceGraph(TorchOnnxGraph(bundle.swin_path, "cuda", fp16),
                                {"residual": np.zeros((1, grid_m, m.backbone.d_f), np.float32)})
    name = f"torch-{'fp16' if fp16 else 'fp32'} (stand-in)"
    engines = EngineSet(name=name, requested=name, backbone=HostGraph(backbone, stream),
                        swin=HostGraph(swin, stream) if swin else None,
                        graphs={"backbone": bundle.backbone_path.name, **({"swin": bundle.swin_path.name}
                                                                         if swin else {})},
                        device=DeviceGraphs(backbone=backbone, swin=swin, stream=stream))
    return Inspector(bundle, threads=threads, engines=engines)


def equality(inspector: Inspector, images: list[np.ndarray], reference: list[dict]) -> dict:
    """The stand-in against the CPU reference on every image."""
    same_rows = total_rows = same_refs = flips = 0
    score_abs = []
    for image, ref in zip(images, reference, strict=True):
        tensor = to_input_tensor(image, inspector.input_hw, inspector.scale)
        out = inspector.device_pipeline.run(tensor)
        same_rows += int((out["bank_rows"] == ref["rows"]).sum())
        total_rows += len(ref["rows"])
        same_refs += int(np.array_equal(out["references"], ref["refs"]))
        result = inspector.inspect(image)
        score_abs.append(abs(result.score - ref["score"]))
        flips += int(result.verdict != ref["verdict"])
    threshold = abs(inspector.threshold) if np.isfinite(inspector.threshold) else 1.0
    return {"images": len(images), "nearest_patch_same": same_rows / total_rows,
            "references_same": same_refs / len(images), "score_abs_max": float(max(score_abs)),
            "score_abs_p99": float(np.percentile(score_abs, 99)),
            "score_rel_threshold_max": float(max(score_abs) / threshold), "verdict_changes": flips,
            "threshold": float(inspector.threshold)}


def timing(inspector: Inspector, images: list[np.ndarray], frames: int, warmup: int) -> dict:
    """``weakrest-edge bench``'s own loop: stage p50/p99/mean and frames/s."""
    table, fps = time_frames(inspector, images, frames, warmup)
    return {"stages_ms": table, "fps": fps, "frames": frames}


def matching_alone(bundle_dir: Path, reference: list[dict], threads: int, repeats: int) -> dict:
    """Retrieval + matching + residual per frame: the host matcher against the CuPy matcher (device events)."""
    from threadpoolctl import threadpool_limits

    from edge_runtime.core.matching import posfar_residual

    cupy = require_cupy()
    scorer = PosFARScorer.from_bundle(load_bundle(bundle_dir))
    host = []
    with threadpool_limits(limits=threads, user_api="blas"):
        for i in range(repeats):
            r = reference[i % len(reference)]
            t0 = time.perf_counter()
            refs = scorer.references.nearest(r["descriptor"], scorer.k)
            match = scorer.bank.match(r["pcf"], refs)
            posfar_residual(r["pcf"], match.matched, scorer.thetas)
            host.append((time.perf_counter() - t0) * 1e3)
    matcher = DeviceMatcher(scorer.bank, scorer.references, scorer.k, scorer.thetas, xp=cupy)
    inputs = [(cupy.asarray(r["pcf"]), cupy.asarray(r["descriptor"])) for r in reference]
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    device = []
    for i in range(repeats + 5):
        pcf, descriptor = inputs[i % len(inputs)]
        start.record()
        matcher.match(pcf, descriptor)
        end.record()
        end.synchronize()
        if i >= 5:
            device.append(cupy.cuda.get_elapsed_time(start, end))
    return {"host_numpy_ms": _stats(host), "host_threads": threads, "cupy_ms": _stats(device)}


def bench_bundle(bundle_dir: Path, image_dir: Path, args: argparse.Namespace) -> dict:
    cupy = require_cupy()
    images = [read_image(p) for p in list_images(image_dir, recursive=True)][: args.limit]
    print(f"== {bundle_dir} on {len(images)} images from {image_dir}", flush=True)
    cpu, reference = cpu_reference(bundle_dir, images, args.cpu_threads)
    m = cpu.bundle.manifest
    report = {"bundle": str(bundle_dir), "product": m.product, "input_size": list(m.preprocessing.input_size),
              "n_bank": m.posfar.n_bank, "k_references": m.posfar.k_references, "images": len(images),
              "variants": {}}
    report["variants"]["cpu"] = {"engine": f"cpu (ONNX Runtime, {args.cpu_threads} threads, this machine's CPU)",
                                 "timing": timing(cpu, images, min(args.frames, args.cpu_frames), args.warmup)}
    for fp16 in (False, True):
        _release(cupy)
        before = _device_memory_mb(cupy)
        inspector = stand_in_inspector(bundle_dir, fp16, args.cpu_threads)
        name = inspector.engines.name
        eq = equality(inspector, images, reference)
        tm = timing(inspector, images, args.frames, args.warmup)
        report["variants"][name] = {"engine": name, "equality": eq, "timing": tm,
                                    "device_memory_mb": _device_memory_mb(cupy) - before}
        print(f"{name}: {json.dumps(eq)}", flush=True)
        del inspector
    report["matching_alone"] = matching_alone(bundle_dir, reference, args.cpu_threads, 100)
    return report


def bench_paper(args: argparse.Namespace) -> dict:
    """The paper profile at 512x512 with random weights: the device pipeline's time and memory only."""
    import torch
    from torch_stand_in import TorchDeviceGraph, TorchModuleGraph

    from edge_runtime.core.matching import MemoryBank
    from edge_runtime.core.pca import PCA
    from edge_runtime.core.retrieval import ReferenceIndex
    from training_host.models.features import PatchFeatureExtractor
    from training_host.models.swin import ResidualSwin, SwinForExport, SwinShape
    from training_host.models.wide_resnet import WideResNet50Trunk

    cupy = require_cupy()
    hw, grid, d_f, k, d_l, n_images = (512, 512), (64, 64), 1024, 64, 256, args.paper_images
    rows_per_image = int(grid[0] * grid[1] * 0.1)
    rng = np.random.default_rng(0)
    bank = MemoryBank(rng.normal(size=(n_images * rows_per_image, d_f)).astype(np.float16),
                      np.repeat(np.arange(n_images), rows_per_image),
                      PCA(components=np.linalg.qr(rng.normal(size=(d_f, d_l)))[0].T.astype(np.float32),
                          mean=np.zeros(d_f, np.float32)))
    references = ReferenceIndex(rng.random((n_images, 64, 256), dtype=np.float32), trim=0.25)
    scorer = PosFARScorer(bank, references, k, grid, hw, 4.0, 16, classifier=lambda r: r, image_score="map")
    report = {"profile": "paper (random weights: timing only)", "input_size": list(hw), "grid": list(grid),
              "d_f": d_f, "d_l": d_l, "k_references": k, "bank_rows": len(bank.features),
              "swin": "1024-d, 4 blocks, 32 heads, 9 sliding 32x32 windows", "variants": {}}
    for fp16 in (False, True):
        _release(cupy)
        before = _device_memory_mb(cupy)
        torch.manual_seed(0)
        trunk = WideResNet50Trunk()
        extractor = PatchFeatureExtractor(trunk, hw, d_f, 0.03, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        swin = SwinForExport(ResidualSwin(SwinShape(in_dim=d_f, embed_dim=1024, depth=4, heads=32, window=8,
                                                    mlp_ratio=4.0, train_window=32, window_stride=16,
                                                    grid=grid)).eval(), grid).eval()
        tag = "fp16" if fp16 else "fp32"
        backbone_g = TorchDeviceGraph(TorchModuleGraph(extractor, ["image"], ["pcf", "descriptor"], "cuda", fp16,
                                                       f"wide_resnet50_2:{tag}"),
                                      {"image": np.zeros((1, 3, *hw), np.float32)})
        swin_g = TorchDeviceGraph(TorchModuleGraph(swin, ["residual"], ["probability"], "cuda", fp16,
                                                   f"swin-1024:{tag}"),
                                  {"residual": np.zeros((1, grid[0] * grid[1], d_f), np.float32)})
        matcher = DeviceMatcher(bank, references, k, (1.0, 2.0), xp=cupy)
        pipeline = DevicePipeline(matcher, backbone_g, swin_g, (1, 3, *hw))
        frames = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(4)]
        stages: dict[str, list[float]] = {}
        t_start = None
        for i in range(args.warmup + args.paper_frames):
            if i == args.warmup:
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            tensor = to_input_tensor(frames[i % len(frames)], hw)
            t1 = time.perf_counter()
            out = pipeline.run(tensor)
            t2 = time.perf_counter()
            scorer.finish(Evidence(distance=out["distance"], probability=out["probability"],
                                   references=out["references"]))
            t3 = time.perf_counter()
            if i >= args.warmup:
                timings = {"preprocess": (t1 - t0) * 1e3, **out["timings_ms"], "postprocess": (t3 - t2) * 1e3,
                           "total": (t3 - t0) * 1e3}
                for name, ms in timings.items():
                    stages.setdefault(name, []).append(ms)
        wall = time.perf_counter() - t_start
        report["variants"][f"torch-{tag} (stand-in)"] = {
            "stages_ms": {k_: _stats(v) for k_, v in stages.items()}, "fps": args.paper_frames / wall,
            "device_memory_mb": _device_memory_mb(cupy) - before}
        print(f"paper torch-{tag}: total p50 {np.percentile(stages['total'], 50):.2f} ms", flush=True)
        del pipeline, backbone_g, swin_g, extractor, swin, trunk, matcher
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['device']}\n")
    for b in report["bundles"]:
        print(f"{b['product']} ({b['input_size'][0]}x{b['input_size'][1]}, {b['n_bank']} bank rows, "
              f"K={b['k_references']}, {b['images']} images)")
        for name, v in b["variants"].items():
            st = v["timing"]["stages_ms"]
            line = " ".join(f"{k}={s['p50']:.2f}" for k, s in st.items() if k != "total")
            mem = f", device memory {v['device_memory_mb']:.0f} MB" if "device_memory_mb" in v else ""
            print(f"  {name:<26} total p50 {st['total']['p50']:7.2f} p99 {st['total']['p99']:7.2f} ms, "
                  f"{v['timing']['fps']:7.1f} frames/s{mem}\n      stages p50 ms: {line}")
            if "equality" in v:
                e = v["equality"]
                print(f"      vs cpu: nearest patch same {100 * e['nearest_patch_same']:.3f} %, references same "
                      f"{100 * e['references_same']:.1f} %, |score diff| max {e['score_abs_max']:.2e} "
                      f"({e['score_rel_threshold_max']:.2e} of the threshold), verdict changes "
                      f"{e['verdict_changes']}")
        ma = b["matching_alone"]
        print(f"  matching alone p50: numpy ({ma['host_threads']} threads) {ma['host_numpy_ms']['p50']:.2f} ms, "
              f"CuPy {ma['cupy_ms']['p50']:.3f} ms")
    if report.get("paper"):
        p = report["paper"]
        print(f"\npaper profile {p['input_size']}, {p['bank_rows']} bank rows, K={p['k_references']}, {p['swin']} "
              "(random weights, timing only)")
        for name, v in p["variants"].items():
            st = v["stages_ms"]
            line = " ".join(f"{k}={s['p50']:.2f}" for k, s in st.items() if k != "total")
            print(f"  {name:<26} total p50 {st['total']['p50']:7.2f} p99 {st['total']['p99']:7.2f} ms, "
                  f"{v['fps']:7.1f} frames/s, device memory {v['device_memory_mb']:.0f} MB\n"
                  f"      stages p50 ms: {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", type=Path, default=[], help="a bundle (repeatable)")
    p.add_argument("--images", action="append", type=Path, default=[], help="its images (one per --bundle)")
    p.add_argument("--limit", type=int, default=400, help="images per bundle at most")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--cpu-frames", type=int, default=100, help="frames timed on the CPU engine")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--cpu-threads", type=int, default=2, help="threads of the CPU engine and the host numpy stages")
    p.add_argument("--paper", action="store_true", help="also time the paper profile at 512x512")
    p.add_argument("--paper-frames", type=int, default=100)
    p.add_argument("--paper-images", type=int, default=300, help="training images of the synthetic paper bank")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if len(args.bundle) != len(args.images):
        p.error("give one --images per --bundle")
    cupy = require_cupy()
    import torch

    props = cupy.cuda.runtime.getDeviceProperties(0)
    report = {"device": f"{props['name'].decode()} (compute capability {props['major']}.{props['minor']}), "
                        f"torch {torch.__version__}, CuPy {cupy.__version__}; graphs run by the torch stand-in, "
                        "not TensorRT", "bundles": [], "paper": None}
    for bundle_dir, image_dir in zip(args.bundle, args.images, strict=True):
        report["bundles"].append(bench_bundle(bundle_dir, image_dir, args))
    if args.paper:
        report["paper"] = bench_paper(args)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
