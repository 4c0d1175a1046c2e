"""Would a bank of the labelled defects' own patch features lift the distance branch? A study, no refit.

Why: the labels reach only the Swin today, and the fast profile's final map is 0.3 x the Swin + 0.7 x the
distance (plus both excesses), so ten masked defects move pixel AP by 2 to 3 points at most.  The distance is
each block's distance to the nearest *normal* patch; this adds the distance to the nearest *labelled defect*
patch, d_def, and boosts blocks that sit closer to a known defect than to anything normal:

    distance' = distance x (1 + beta x max(0, d_nom / d_def - 1))

which leaves every block that looks less like a labelled defect than like a normal patch as it was (a new kind
of defect keeps its distance).  The labelled blocks are the study's ``--bank`` rule: masks (the blocks at least
``--eps`` defective), boxes (the blocks inside each box whose distance, or with ``--pick swin`` the Swin's
probability, is in the box's top ``--box-share``; with ``--pick level`` those whose probability is at least
``--level`` x the fusion's Swin scale; with ``--pick fit`` the same from each box's own blocks, exactly as a weak fit
takes them), or tags (the image's ``--tag-top`` most distant
blocks).  ``--pick fit`` with masks takes them as a supervised fit does (each defect region's blocks, thin and small
ones included), at every ``--views`` offset.  ``--max-blocks`` thins the bank by greedy k-center, ``--search-dims``
searches it in its own principal directions.  The served map (the bundle's own
fusion, refinement and shifted frames) is scored with the project's evaluator on the bundle's test split, which
leaves the labelled images out, so no labelled block is scored against itself.

    .venv/bin/python tools/defect_bank_study.py --bundle runs/weak_excess/masks_resmixmatch_seed0 \\
        --labels runs/weak_excess/boxes_seed0.labels.json --bank masks --beta 0.5 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from map_study import gather, markdown  # noqa: E402

from edge_runtime.core.bundle import load_bundle  # noqa: E402
from edge_runtime.core.coreset import greedy_kcenter  # noqa: E402
from edge_runtime.core.defect_bank import DefectBank, raised  # noqa: E402
from edge_runtime.core.matching import augmented_projection, augmented_query, nearest_candidates  # noqa: E402
from edge_runtime.core.pipeline import Inspector  # noqa: E402
from edge_runtime.core.preprocess import read_image  # noqa: E402
from edge_runtime.core.scoring import shifted_frame  # noqa: E402
from training_host.data.dataset import load_mask, scan_dataset  # noqa: E402
from training_host.evaluation.evaluate import scored_test_split  # noqa: E402
from training_host.evaluation.metrics import evaluate_maps  # noqa: E402
from training_host.labels.weak_labels import WeakLabel, load_labels  # noqa: E402
from training_host.training.residual_data import labelled_bank_blocks, mask_bank_blocks, sure_blocks  # noqa: E402

EPS_POS = 0.5  # labels.eps_pos: a block at least this defective is a defect block
EPS_NEG = 0.1  # labels.eps_neg (the fit's block labels need it; a bank takes only their positives)


def block_fraction(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The defective share of each block of a boolean pixel mask (the grid's cells cover the frame evenly)."""
    return cv2.resize(mask.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)


def box_mask(boxes: list[list[float]], image_hw: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """Boxes (x, y, w, h in the original image's pixels) as a mask at the inspector's input size."""
    mask = np.zeros(hw, bool)
    sy, sx = hw[0] / image_hw[0], hw[1] / image_hw[1]
    for x, y, w, h in boxes:
        mask[int(y * sy): int(np.ceil((y + h) * sy)), int(x * sx): int(np.ceil((x + w) * sx))] = True
    return mask


def covering_blocks(features: np.ndarray, max_blocks: int) -> np.ndarray:
    """At most ``max_blocks`` rows, chosen by greedy k-center so every labelled block keeps a near one (a smaller
    bank is a faster search; docs/sweeps/defect_bank.md measures what it loses)."""
    if len(features) <= max_blocks:
        return features
    return features[np.sort(greedy_kcenter(features, max_blocks))]


class ProjectedBankSearch:
    """A cheaper, approximate search (``--search-dims``): each patch's nearest block by the bank's own top ``dims``
    principal directions, then that block's score q.b - |b|^2 / 2 in the full space (``defect_bank.BankSearch``'s
    contract), so the distance is exact to the block found, which may not be the nearest one."""

    def __init__(self, features: np.ndarray, dims: int) -> None:
        self.features = features
        self.mean = features.mean(0)
        self.directions = np.linalg.svd(features - self.mean, full_matrices=False)[2][:dims].T.astype(np.float32)
        self.projected = augmented_projection((features - self.mean) @ self.directions)
        self.half_norms = 0.5 * np.einsum("nd,nd->n", features, features)

    def __call__(self, pcf: np.ndarray) -> np.ndarray:
        query = augmented_query(np, (pcf - self.mean) @ self.directions)
        nearest = nearest_candidates(np, query, self.projected)
        return np.einsum("md,md->m", pcf, self.features[nearest]) - self.half_norms[nearest]


def defect_bank(inspector: Inspector, data_root: Path, labels: dict, kind: str, box_share: float,
                tag_top: int, pick: str = "distance", level: float = 1.0, eps: float = EPS_POS,
                weak: dict[str, WeakLabel] | None = None,
                views: tuple[tuple[int, int], ...] = ((0, 0),)) -> tuple[np.ndarray, int]:
    """The labelled blocks' patch features (n, d_f) by the ``kind`` rule, and how many images gave some.  ``weak``:
    the same labels read as a fit reads them (``load_labels``), which ``--pick fit`` with boxes needs."""
    scorer, hw = inspector.scorer, inspector.input_hw
    samples = {str(s.path.relative_to(data_root)): s for s in scan_dataset(data_root).test}
    rows, used = [], 0
    for rel, label in labels.items():
        sample = samples[rel]
        image = read_image(sample.path)
        pcf, descriptor = inspector.features(image)
        if kind == "masks" and pick == "fit":  # the fit's own rule: thin and small regions keep their blocks
            mask = load_mask(sample, hw)
            chosen = mask_bank_blocks(mask, scorer.grid, eps, EPS_NEG).ravel()
            for dy, dx in views:
                if (dy, dx) == (0, 0):
                    continue
                moved = shifted_frame(mask[None, None].astype(np.float32), dy, dx)[0, 0] > 0.5
                more = mask_bank_blocks(moved, scorer.grid, eps, EPS_NEG).ravel()
                rows.append(inspector.features(image, shift=(dy, dx))[0][more])
        elif kind == "masks":
            chosen = block_fraction(load_mask(sample, hw), scorer.grid).ravel() >= eps
        else:
            ev = scorer.evidence(pcf, descriptor)
            distance = ev.distance if pick == "distance" else ev.probability
            if kind == "boxes" and pick == "fit":  # the fit's own rule (each box's blocks, then the level rule)
                chosen = labelled_bank_blocks(weak[rel], image.shape[:2], scorer.grid, ev.probability,
                                              level * inspector.fusion.swin_scale)
            elif kind == "boxes":
                inside = block_fraction(box_mask(label["boxes"], image.shape[:2], hw), scorer.grid).ravel() >= 0.5
                if pick == "level":  # the fit's rule: surer than level x the Swin's scale, at least one
                    chosen = sure_blocks(ev.probability, inside, level * inspector.fusion.swin_scale)
                else:
                    cut = np.quantile(distance[inside], 1.0 - box_share) if inside.any() else np.inf
                    chosen = inside & (distance >= cut)
            else:
                chosen = np.zeros(distance.shape, bool)
                chosen[np.argsort(distance)[-tag_top:]] = True
        used += bool(chosen.any())
        rows.append(pcf[chosen])
    return np.concatenate(rows).astype(np.float32), used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a fitted bundle with a Swin")
    parser.add_argument("--split-of", type=Path, help="score on this bundle's test split (its defects left out)")
    parser.add_argument("--labels", type=Path, required=True,
                        help="a labels file of bench_weak (its images are the labelled defects)")
    parser.add_argument("--bank", choices=("masks", "boxes", "tags"), default="masks")
    parser.add_argument("--box-share", type=float, default=0.5)
    parser.add_argument("--tag-top", type=int, default=4)
    parser.add_argument("--pick", choices=("distance", "swin", "level", "fit"), default="distance",
                        help="boxes and tags: rank the blocks by the distance or by the bundle's Swin probability; "
                             "boxes: or take those whose Swin probability is over --level x the fusion's Swin scale "
                             "(level: among the blocks the union of the boxes covers half; fit: each box's own "
                             "blocks as a weak fit finds them, thin and small boxes included); masks with fit: "
                             "the blocks a supervised fit takes")
    parser.add_argument("--level", type=float, default=1.0)
    parser.add_argument("--eps", type=float, default=EPS_POS, help="masks: a block at least this defective is taken")
    parser.add_argument("--beta", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--cap", type=float, default=float("inf"),
                        help="the ratio d_nom / d_def counted up to this much (a few near-copies stay bounded)")
    parser.add_argument("--max-blocks", type=int, help="keep at most this many rows (greedy k-center)")
    parser.add_argument("--search-dims", type=int,
                        help="search the bank in its own top principal directions (the distance in full space)")
    parser.add_argument("--gate", type=float, default=0.0,
                        help="raise only blocks whose distance is at least this x the fusion's distance scale")
    parser.add_argument("--views", nargs="+", default=["0,0"],
                        help="masks with --pick fit: also take each labelled image's blocks moved dy,dx px")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mtd"))
    parser.add_argument("--out", type=Path, help="append the table as Markdown here")
    args = parser.parse_args()
    labels = json.loads(args.labels.read_text(encoding="utf-8"))["images"]
    bundle = load_bundle(args.bundle)
    if bundle.manifest.scoring.defect_bank is not None:
        raise SystemExit(f"{args.bundle}: already has a defect bank (scoring.defect_bank); give one fitted without")
    inspector = Inspector(bundle, refine=False)
    samples = scored_test_split(load_bundle(args.split_of) if args.split_of else bundle, args.data)[0].test
    if set(labels) & {str(s.path.relative_to(args.data)) for s in samples}:
        raise SystemExit("the labelled images are in the scored split: give the labelled bundle or --split-of")
    weak = load_labels(args.labels, root=args.data).images if args.pick == "fit" and args.bank == "boxes" else None
    bank, used = defect_bank(inspector, args.data, labels, args.bank, args.box_share, args.tag_top, args.pick,
                             args.level, args.eps, weak,
                             tuple(tuple(int(v) for v in view.split(",")) for view in args.views))
    if args.max_blocks:
        bank = covering_blocks(bank, args.max_blocks)
    # its nearest-block search; the factor is taken at each beta below
    search = DefectBank(bank, 1.0, args.cap,
                        search=ProjectedBankSearch(bank, args.search_dims) if args.search_dims else None)
    ev = gather(args.bundle, args.data, "cpu", args.split_of)
    scorer, scale = inspector.scorer, inspector.fusion.distance_scale
    ratio, moved_ratio, searched = [], [], []
    for sample in samples:  # the same images in the same order as gather's
        image = read_image(sample.path)
        frames = [(0, 0), *inspector.shift_offsets]
        per_frame = []
        for offset in frames:
            pcf, descriptor = inspector.features(image, shift=offset)
            d_nom = scorer.evidence(pcf, descriptor).distance
            ratio_nom = d_nom / np.maximum(search.nearest_distance(pcf), 1e-6)
            if args.gate:  # blocks this far below the map's scale are not searched: factor 1
                searched.append(float((d_nom >= args.gate * scale).mean()))
                ratio_nom = np.where(d_nom >= args.gate * scale, ratio_nom, 0.0)
            per_frame.append(ratio_nom.reshape(scorer.grid))
        ratio.append(per_frame[0])
        moved_ratio.append(per_frame[1:])
    ratio = np.stack(ratio)
    if searched:
        print(f"gate {args.gate:g} x scale {scale:.3g}: {np.mean(searched):.1%} of the blocks searched", flush=True)
    moved = np.array(moved_ratio) if inspector.shift_offsets else None
    rows = []
    for beta in [0.0, *args.beta]:
        boost = raised(ratio, beta, args.cap)
        variant = replace(ev, distance=ev.distance * boost)
        if moved is not None:
            variant = replace(variant, shifted_distance=ev.shifted_distance * raised(moved, beta, args.cap))
        r = evaluate_maps(ev.labels, ev.verdict, ev.masks, variant.served_heatmaps(ev.swin_weight), ev.types)
        rule = args.bank if args.bank == "masks" and args.pick != "fit" else f"{args.bank} by {args.pick}"
        rows.append({"bundle": ev.name, "bank": f"{rule} ({len(bank)} blocks of {used} images)", "beta": beta,
                     "cap": args.cap,
                     "pixel_ap": r["pixel_ap"], "pro": r["pro"], "pixel_auroc": r["pixel_auroc"],
                     "boosted_share": float((boost > 1.0).mean()),
                     **{f"{t}_{k}": v[key] for t, v in r["per_defect"].items()
                        for k, key in (("ap", "pixel_ap"), ("pro", "pro"))}})
        print(f"beta {beta:g}: AP {r['pixel_ap']:.4f} PRO {r['pro']:.4f} (scale {scale:.3g})", flush=True)
    text = markdown(rows, list(rows[0]))
    print(text)
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(f"\n`{' '.join(sys.argv)}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
