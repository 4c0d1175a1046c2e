r"""An engine's own nearest-candidate and defect bank searches against numpy's, in one process, on the same frames.

Why: OpenVINO engines run the search in OpenVINO's pool and keep numpy's BLAS to one thread
(``engines.OpenVinoSearch``), so the two pools stop spinning against each other between the graphs; ``cpu``
engines run numpy's search with its blocks of queries shared by their own threads, numpy's BLAS at one thread
(``matching.SearchThreads``), against numpy's search on BLAS threads for every core before. This
measures that choice where it matters, whole frames, in alternating rounds (the machine's drift hits both
sides alike): back to back (``--pace-ms 0``, a saturated line) or with a pause between frames (a 10 frames/s
line: ``--pace-ms 100``), and checks that both searches pick the same bank rows.  A labelled bundle's defect bank
is searched the same way (``engines.OpenVinoBankSearch``): the numpy side searches it with numpy's BLAS too, and
both sides' distances to the nearest defect block are compared.

    OPENBLAS_THREAD_TIMEOUT=4 python tools/bench_search.py --bundle runs/engines/fast \
        --images ../shared/data/mtd/test/good

(the variable as ``weakrest-edge`` sets it before numpy loads OpenBLAS; without it the numpy side's idle BLAS workers
spin on the cores the backbone needs, and its backbone stage reads slower: 4.6 against 3.2 ms on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.core.defect_bank import NumpyBankSearch  # noqa: E402
from edge_runtime.core.engines import default_threads  # noqa: E402
from edge_runtime.core.matching import NumpySearch  # noqa: E402
from edge_runtime.core.pipeline import open_inspector  # noqa: E402
from edge_runtime.core.preprocess import list_images, read_image  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--engine", default="openvino-bf16", help="an engine that brings its own search")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--frames", type=int, default=100, help="timed frames per round and side")
    parser.add_argument("--pace-ms", type=float, default=0.0, help="pause before each frame (0: back to back)")
    args = parser.parse_args()

    images = [read_image(p) for p in list_images(args.images)[:50]]
    if not images:
        print(f"error: no images in {args.images}", file=sys.stderr)
        return 2
    own = open_inspector(args.bundle, engine=args.engine)
    if own.engines is None or own.engines.search is None:
        print(f"error: engine {args.engine} has no search of its own (numpy's is its search)", file=sys.stderr)
        return 2
    numpy_side = open_inspector(args.bundle, engine=args.engine)
    numpy_side.scorer.bank.search = NumpySearch(numpy_side.scorer.bank.pca)
    bank = numpy_side.scorer.defect_bank
    if bank is not None:
        bank.search = NumpyBankSearch(bank.features)

    agree, bank_gap = [], []
    for image in images:
        extracted = own.extract(image)
        refs = own.scorer.references.nearest(extracted.descriptor, own.scorer.k)
        a = own.scorer.bank.match(extracted.pcf, refs).bank_rows
        b = numpy_side.scorer.bank.match(extracted.pcf, refs).bank_rows
        agree.append(float((a == b).mean()))
        if bank is not None:
            near = (own.scorer.defect_bank.nearest_distance(extracted.pcf), bank.nearest_distance(extracted.pcf))
            bank_gap.append(float(np.max(np.abs(near[0] - near[1]) / np.maximum(near[1], 1.0))))
    print(f"same nearest bank row: {100 * statistics.mean(agree):.3f} % of patches "
          f"(lowest image {100 * min(agree):.3f} %) on {len(images)} images")
    if bank_gap:
        print(f"defect bank ({len(bank.features)} blocks): largest difference of the nearest block's distance "
              f"{max(bank_gap):.2e} (relative, distances under 1 absolute)")

    # the numpy side gets the BLAS threads it had before the engine brought its search
    sides = [("numpy search, BLAS threads = cores", numpy_side, default_threads()),
             (f"{args.engine} search, BLAS 1 thread", own, 1)]
    if bank is not None:  # as before the engine searched the bank too: its search, numpy's bank on one thread
        numpy_bank = open_inspector(args.bundle, engine=args.engine)
        numpy_bank.scorer.defect_bank.search = bank.search
        sides.insert(1, (f"{args.engine} search, numpy's defect bank search, BLAS 1 thread", numpy_bank, 1))
    timings: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    for _ in range(args.rounds):
        for name, inspector, blas in sides:
            with threadpool_limits(blas, user_api="blas"):
                for i in range(10):
                    inspector.inspect(images[i % len(images)])
                for i in range(args.frames):
                    if args.pace_ms > 0:
                        time.sleep(args.pace_ms / 1e3)
                    timings[name].append(inspector.inspect(images[i % len(images)]).timings_ms)
    print(f"{args.rounds} rounds x {args.frames} frames per side, pace {args.pace_ms:g} ms; stage medians (ms):")
    for name, rows in timings.items():
        stages = " ".join(f"{k} {np.median([r[k] for r in rows]):.2f}" for k in rows[0])
        print(f"  {name}: {stages}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
