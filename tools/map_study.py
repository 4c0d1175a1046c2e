"""Where a bundle's final map loses pixel AP and PRO, and what other final-map rules give, without refitting.

Why: rules that combine evidence a fitted bundle already produces (the Swin's block probabilities, the block
distances, the distances standardised against the K references) are cheap to compare on that evidence, while
each refit costs minutes. This runs every test image once per bundle, keeps its block evidence, and scores
each rule with the project's own evaluator (heatmaps as the runtime makes them, ``evaluate_maps``). It also
says where the profile's map puts its highest pixels (inside the masks, next to them, elsewhere) and how
the defect pixels are shared between defect types, since pixel AP weighs every defect pixel alike, and how
pixel AP inside the frame compares with that in its border band.

    .venv/bin/python tools/map_study.py --data ../shared/data/mtd --out docs/sweeps/map_study.md \\
        --bundle runs/verdict/grey_textures/bundle --bundle runs/verdict/grey_textures_seed1/bundle \\
        --bundle runs/verdict/grey_textures_seed2/bundle

With several bundles (the same profile fitted at other seeds) it also scores their Swins averaged. With
``--shares W ...`` it prints only the served map at each Swin share of the fusion, e.g. for bundles fine-tuned on
labels beside the unsupervised one scored on the same images (``--split-of``, once per ``--bundle``), and with
``--excess A ...`` / ``--distance-excess B ...`` at each weight of the Swin's / the distance's excess over 1.0
too (``scoring.fusion_swin_excess`` / ``fusion_distance_excess``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.core.bundle import DEFAULT_SWIN_WEIGHT, load_bundle  # noqa: E402
from edge_runtime.core.pipeline import Inspector, fuse_scaled  # noqa: E402
from edge_runtime.core.preprocess import read_image, to_input_tensor  # noqa: E402
from edge_runtime.core.scoring import (  # noqa: E402
    HeatmapRefiner,
    block_map_score,
    heatmap_from_blocks,
    unshifted_heatmap,
)
from training_host.data.dataset import load_mask  # noqa: E402
from training_host.evaluation.evaluate import scored_test_split  # noqa: E402
from training_host.evaluation.metrics import average_precision, evaluate_maps  # noqa: E402

NEAR_PX = 7  # "next to a defect": within this many pixels of its mask
BORDER_PX = 16  # "the border": within this many pixels of the frame's edge


@dataclass
class Evidence:
    """One bundle's block evidence on the test images, each map scaled as the bundle's fusion scales it."""

    name: str
    distance: np.ndarray  # (n, h_f, w_f), divided by the fusion's distance scale
    swin: np.ndarray  # (n, h_f, w_f), divided by the fusion's Swin scale
    verdict: np.ndarray  # (n,) the bundle's image score (the distance standardised against the K references)
    standardised: np.ndarray  # (n, h_f, w_f) that standardised distance, over its good images' 99.9 % quantile
    masks: np.ndarray  # (n, H, W) bool
    labels: np.ndarray  # (n,) bool
    types: list[str]
    blur_sigma: float
    guides: np.ndarray  # (n, H, W) the frames' grey inputs, for the heatmap refinement
    swin_weight: float = DEFAULT_SWIN_WEIGHT  # the Swin's share of the bundle's fused map (scoring.fusion)
    swin_excess: float = 0.0  # the weight of the Swin's excess over 1.0 in that map (scoring.fusion.swin_excess)
    distance_excess: float = 0.0  # the distance's likewise (scoring.fusion.distance_excess)
    refiner: HeatmapRefiner = HeatmapRefiner()  # the bundle's own heatmap refinement (scoring.refine)
    # with scoring.frame_shift: the frame moved by each offset (down, right) after the frame's own, and each moved
    # frame's scaled distance and Swin maps (n, offsets, h_f, w_f); the share table's served map averages their
    # heatmaps as the runtime does (the other tables, and the verdict, use the frame's own evidence)
    shift_offsets: tuple[tuple[int, int], ...] = ()
    shifted_distance: np.ndarray | None = None
    shifted_swin: np.ndarray | None = None

    @property
    def profile_rule(self) -> str:
        """The bundle's own fusion, named as the weighted rules are."""
        excess = (f" + {self.swin_excess:g} x swin excess" if self.swin_excess else "") + (
            f" + {self.distance_excess:g} x distance excess" if self.distance_excess else "")
        return f"{self.swin_weight:g} swin + {1.0 - self.swin_weight:g} distance{excess}"

    def blocks_at(self, share: float, excess: float | None = None, swin: np.ndarray | None = None,
                  distance: np.ndarray | None = None, distance_excess: float | None = None) -> np.ndarray:
        """The fused block map with the Swin's share ``share`` and the weights ``excess`` / ``distance_excess`` of
        the Swin's and the distance's excess over 1.0 (the bundle's own where not given), as ``MapFusion`` makes it
        with the mean rule; ``swin`` / ``distance``: other maps than the frame's own (e.g. several seeds' Swin
        mean, or a shifted frame's)."""
        swin = self.swin if swin is None else swin
        distance = self.distance if distance is None else distance
        excess = self.swin_excess if excess is None else excess
        distance_excess = self.distance_excess if distance_excess is None else distance_excess
        return fuse_scaled("mean", swin, distance, share, excess, distance_excess)

    def profile_blocks(self) -> np.ndarray:
        return self.blocks_at(self.swin_weight)

    def served_heatmaps(self, share: float, excess: float | None = None,
                        distance_excess: float | None = None) -> np.ndarray:
        """The heatmaps the runtime serves with that share and excess: the fused block maps of the frame and of
        its shifted frames, each a heatmap moved back onto the frame's pixels, averaged (``ShiftedMean``), then
        refined by the bundle's own refinement."""
        total = heatmaps(self, self.blocks_at(share, excess, distance_excess=distance_excess))
        for k, (dy, dx) in enumerate(self.shift_offsets):
            blocks = self.blocks_at(share, excess, swin=self.shifted_swin[:, k], distance=self.shifted_distance[:, k],
                                    distance_excess=distance_excess)
            moved = heatmaps(self, blocks)
            total += np.stack([unshifted_heatmap(h, dy, dx) for h in moved])
        mean = total / np.float32(1 + len(self.shift_offsets))
        return np.stack([_refined(self.refiner, h, g) for h, g in zip(mean, self.guides, strict=True)])


def gather(bundle_path: Path, data_root: Path, engine: str, split_of: Path | None = None) -> Evidence:
    """Each test image once through the bundle; the bundle's own training defects are left out, as eval does
    (those of ``split_of`` instead where given: an unsupervised bundle scored on a labelled one's images)."""
    bundle = load_bundle(bundle_path)
    inspector = Inspector(bundle, engine=engine, refine=False)
    scorer, fusion = inspector.scorer, inspector.fusion
    if fusion is None or scorer.standardiser is None:
        raise SystemExit(f"{bundle_path}: needs a bundle with a Swin, fusion scales and reference distances")
    samples = scored_test_split(load_bundle(split_of) if split_of else bundle, data_root)[0].test
    hw = inspector.input_hw
    dist, swin, verdict, masks, guides, zs, moved_dist, moved_swin = [], [], [], [], [], [], [], []
    for sample in samples:
        image = read_image(sample.path)
        guides.append(HeatmapRefiner.guide_of(to_input_tensor(image, hw, inspector.scale)))
        extracted = inspector.extract(image)
        ev = scorer.evidence(extracted.pcf, extracted.descriptor)
        d = ev.distance.reshape(scorer.grid)  # the verdict's; the map's is raised by a defect bank, if any
        dist.append(ev.map_distance.reshape(scorer.grid) / fusion.distance_scale)
        swin.append(ev.probability.reshape(scorer.grid) / fusion.swin_scale)
        moved = [scorer.evidence(*inspector.features(image, shift=offset)) for offset in inspector.shift_offsets]
        moved_dist.append([m.map_distance.reshape(scorer.grid) / fusion.distance_scale for m in moved])
        moved_swin.append([m.probability.reshape(scorer.grid) / fusion.swin_scale for m in moved])
        z = scorer.standardiser(d, ev.references)
        verdict.append(block_map_score(z, hw, scorer.blur_sigma, scorer.score_pool))
        zs.append(z)
        masks.append(load_mask(sample, hw) > 0)
    labels = np.array([s.is_defective for s in samples])
    z = np.stack(zs)
    z /= max(float(np.quantile(z[~labels], 0.999)), 1e-6)
    name = bundle_path.parent.name if bundle_path.name == "bundle" else bundle_path.name
    return Evidence(name=f"{name} on {split_of.name}'s images" if split_of else name,
                    distance=np.stack(dist), swin=np.stack(swin), verdict=np.array(verdict), standardised=z,
                    masks=np.stack(masks), labels=labels,
                    types=[s.defect_type for s in samples], blur_sigma=scorer.blur_sigma, guides=np.stack(guides),
                    swin_weight=fusion.swin_weight, swin_excess=fusion.swin_excess,
                    distance_excess=fusion.distance_excess, refiner=_refiner_of(bundle),
                    shift_offsets=tuple(inspector.shift_offsets),
                    shifted_distance=np.array(moved_dist) if inspector.shift_offsets else None,
                    shifted_swin=np.array(moved_swin) if inspector.shift_offsets else None)


def _refiner_of(bundle) -> HeatmapRefiner:
    """The bundle's own refinement settings, so that "the profile" rows score the map the bundle serves (a bundle
    without them is scored with the runtime's defaults)."""
    info = bundle.manifest.scoring.refine
    return info.refiner() if info is not None else HeatmapRefiner()


def heatmaps(ev: Evidence, blocks: np.ndarray, refiner: HeatmapRefiner | None = None) -> np.ndarray:
    hw = ev.masks.shape[1:]
    maps = [heatmap_from_blocks(b.astype(np.float32), hw, ev.blur_sigma) for b in blocks]
    if refiner is not None:
        maps = [_refined(refiner, h, g) for h, g in zip(maps, ev.guides, strict=True)]
    return np.stack(maps)


def _refined(refiner: HeatmapRefiner, heatmap: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """The refined heatmap as the runtime serves it, scaled by its own peak where the refiner says so (against a
    reference of 1: a constant factor over every frame changes no metric)."""
    return refiner.relative(refiner(heatmap, guide), 1.0)


def score(ev: Evidence, blocks: np.ndarray, refiner: HeatmapRefiner | None = None) -> dict:
    """Pixel metrics of a block map, overall and per defect type (image scores are the bundle's verdict)."""
    return evaluate_maps(ev.labels, ev.verdict, ev.masks, heatmaps(ev, blocks, refiner), ev.types)


def _gate(ev: Evidence) -> np.ndarray:
    """A soft image gate from the verdict: 1/2 at the good images' 90 % quantile, one good std per unit."""
    good = ev.verdict[~ev.labels]
    return 1.0 / (1.0 + np.exp(-(ev.verdict - np.quantile(good, 0.9)) / good.std()))


#: the refinements scored on the equal-share map: each step alone, and both (the defaults, as the fast profile has them)
REFINERS: dict[str, HeatmapRefiner] = {
    "guided filter": HeatmapRefiner(contrast_weight=0.0),
    "local contrast": HeatmapRefiner(guide_radius=0),
    "guided filter + local contrast (scoring.refine)": HeatmapRefiner(),
    "guided filter + local contrast 0.3": HeatmapRefiner(contrast_weight=0.3),
    "guided filter radius 16 + local contrast": HeatmapRefiner(guide_radius=16),
}

RULES: dict[str, Callable[[Evidence], np.ndarray]] = {
    "distance": lambda e: e.distance,
    "swin": lambda e: e.swin,
    "mean": lambda e: 0.5 * (e.swin + e.distance),
    "0.4 swin + 0.6 distance": lambda e: 0.4 * e.swin + 0.6 * e.distance,
    "0.3 swin + 0.7 distance": lambda e: 0.3 * e.swin + 0.7 * e.distance,
    "max": lambda e: np.maximum(e.swin, e.distance),
    "mean, gated by the verdict": lambda e: 0.5 * (e.swin + e.distance) * _gate(e)[:, None, None],
    "mean, good images zeroed (oracle bound)": lambda e: 0.5 * (e.swin + e.distance) * e.labels[:, None, None],
}


def _guided(p: np.ndarray, g: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """A plain full-size guided filter (He et al.), for a second, wider scale than the runtime's."""
    k = (2 * radius + 1,) * 2

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, k, borderType=cv2.BORDER_REFLECT)

    mean_g, mean_p = box(g), box(p)
    a = (box(g * p) - mean_g * mean_p) / (box(g * g) - mean_g * mean_g + np.float32(eps))
    return box(a) * g + box(mean_p - a * mean_g)


def profile_variants(ev: Evidence) -> dict[str, np.ndarray]:
    """The bundle's own refined heatmaps, and changes to them that use more of the evidence or a wider scale:
    large uneven regions want a wide smoothing, pits and cracks a narrow one."""
    blocks = ev.profile_blocks()
    unrefined = heatmaps(ev, blocks)
    refiner = ev.refiner
    refined = np.stack([_refined(refiner, h, g) for h, g in zip(unrefined, ev.guides, strict=True)])
    wide = np.stack([_guided(h, cv2.GaussianBlur(g, (0, 0), 3.0), 32, 1e-4)
                     for h, g in zip(unrefined, ev.guides, strict=True)])
    return {
        "the profile (refined)": refined,
        "+ 0.2 x the standardised distance": heatmaps(ev, blocks + 0.2 * np.maximum(ev.standardised, 0.0),
                                                      refiner),
        "x a soft verdict gate (3/4 + 1/4 gate)": refined * (0.75 + 0.25 * _gate(ev))[:, None, None],
        "+ 0.5 x a radius-32 guided filter on the frame blurred by 3 px": refined + 0.5 * wide,
        "max with that radius-32 filter": np.maximum(refined, wide),
        "that radius-32 filter alone": wide,
        # the two knobs that trade AP for PRO, for a Swin that finds large regions better than small ones
        "the Swin's share 0.2": heatmaps(ev, 0.2 * ev.swin + 0.8 * ev.distance, refiner),
        "local contrast 0.3": heatmaps(ev, blocks, replace(refiner, contrast_weight=0.3)),
        # each frame's heatmap scaled by its own peak (scoring.refine.peak_power), with the guided filter's two
        # radii, local contrast 0.3 (the profiles' since the finish bands) whatever the bundle's own
        **{f"contrast 0.3, radius {radius}, peak power {power:g}": heatmaps(
            ev, blocks, replace(refiner, contrast_weight=0.3, guide_radius=radius, peak_power=power))
           for radius in (8, 16) for power in (0.0, 0.25, 0.35)},
        "contrast 0.3, radius 16, peak power 0.35, the Swin's share 0.4": heatmaps(
            ev, 0.4 * ev.swin + 0.6 * ev.distance,
            replace(refiner, contrast_weight=0.3, guide_radius=16, peak_power=0.35)),
    }


def row(name: str, result: dict) -> dict:
    out = {"rule": name, "pixel_ap": result["pixel_ap"], "pro": result["pro"], "pixel_auroc": result["pixel_auroc"]}
    for t, r in result["per_defect"].items():
        out[f"{t}_ap"], out[f"{t}_pro"] = r["pixel_ap"], r["pro"]
    return out


def where_top_pixels(ev: Evidence, blocks: np.ndarray, refiner: HeatmapRefiner | None = None) -> list[dict]:
    """The map's highest pixels, as many as there are defect pixels in all: inside a mask, within NEAR_PX of
    one, or elsewhere (and how many of those lie in the 16-px border band), per image type."""
    maps = heatmaps(ev, blocks, refiner)
    top = maps >= np.quantile(maps, 1.0 - ev.masks.mean())
    kernel = np.ones((2 * NEAR_PX + 1,) * 2, np.uint8)
    near = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in ev.masks]) & ~ev.masks
    band = np.ones(ev.masks.shape[1:], bool)
    band[16:-16, 16:-16] = False
    types = np.array(ev.types)
    rows = []
    for t in dict.fromkeys(ev.types):
        s = types == t
        far = top[s] & ~ev.masks[s] & ~near[s]
        rows.append({"type": t, "images": int(s.sum()), "defect_px_share": float(ev.masks[s].sum() / ev.masks.sum()),
                     "top_px": int(top[s].sum()), "in_mask": int((top[s] & ev.masks[s]).sum()),
                     "near_mask": int((top[s] & near[s]).sum()), "elsewhere": int(far.sum()),
                     "elsewhere_in_border": int((far & band).sum())})
    return rows


def border_rows(ev: Evidence, px: int = BORDER_PX) -> list[dict]:
    """Pixel AP of the bundle's served map and of its distance map alone (refined the same way), over all pixels,
    over the frame's inside and over its ``px``-wide border apart: how much of the loss sits at the frame's edge
    (``--border-only`` prints this table alone)."""
    inside = np.zeros(ev.masks.shape[1:], bool)
    inside[px:-px, px:-px] = True
    border = np.broadcast_to(~inside, ev.masks.shape)
    rows = []
    for name, blocks in ((ev.profile_rule, ev.profile_blocks()), ("distance", ev.distance)):
        maps = heatmaps(ev, blocks, ev.refiner)
        rows.append({"bundle": ev.name, "map": name, "border_px": px,
                     "defect_px_in_border": float(ev.masks[border].sum() / ev.masks.sum()),
                     "area_in_border": float(border.mean()),
                     "ap_all": average_precision(ev.masks.ravel(), maps.ravel()),
                     "ap_inside": average_precision(ev.masks[~border], maps[~border]),
                     "ap_border": average_precision(ev.masks[border], maps[border])})
    return rows


def share_rows(ev: Evidence, shares: list[float], excesses: list[float] | None = None,
               distance_excesses: list[float] | None = None) -> list[dict]:
    """The bundle's served map (its own refinement and shifted frames) with the Swin's share of the fusion at each
    of ``shares``, and the weights of the Swin's and the distance's excess over 1.0 at each of ``excesses`` and
    ``distance_excesses`` (the bundle's own where not given): what a larger share or excess buys in AP and costs
    in PRO, e.g. once the Swin was fine-tuned on labels."""
    rows = []
    for w, a, b in itertools.product(shares, excesses or [ev.swin_excess], distance_excesses or [ev.distance_excess]):
        r = evaluate_maps(ev.labels, ev.verdict, ev.masks, ev.served_heatmaps(w, a, b), ev.types)
        rows.append({"bundle": ev.name, "swin_share": w, "swin_excess": a, "distance_excess": b,
                     "pixel_ap": r["pixel_ap"], "pro": r["pro"], "pixel_auroc": r["pixel_auroc"],
                     **{f"{t}_{k}": v[key] for t, v in r["per_defect"].items()
                        for k, key in (("ap", "pixel_ap"), ("pro", "pro"))}})
    return rows


def markdown(rows: list[dict], keys: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", required=True,
                        help="a fitted bundle with a Swin; repeat for the same profile at other seeds")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mtd"))
    parser.add_argument("--engine", default="cpu")
    parser.add_argument("--out", type=Path, help="write the tables as Markdown here too")
    parser.add_argument("--border-only", action="store_true",
                        help="only the table of pixel AP inside the frame and at its border (seconds per bundle)")
    parser.add_argument("--shares", type=float, nargs="+", metavar="W",
                        help="only the table of the served map with the Swin's share of the fusion at each W")
    parser.add_argument("--excess", type=float, nargs="+", metavar="A",
                        help="with --shares: also at each weight A of the Swin's excess over 1.0 (default: each "
                             "bundle's own scoring.fusion.swin_excess)")
    parser.add_argument("--distance-excess", type=float, nargs="+", metavar="B",
                        help="with --shares: also at each weight B of the distance's excess over 1.0 (default: each "
                             "bundle's own scoring.fusion.distance_excess)")
    parser.add_argument("--split-of", type=Path, action="append",
                        help="score the bundle of the same position on this bundle's test images (its training "
                             "defects left out); repeat once per --bundle")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no dataset there")
    if args.split_of and len(args.split_of) != len(args.bundle):
        raise SystemExit("--split-of: give one per --bundle, in the same order")
    if (args.excess or args.distance_excess) and not args.shares:
        raise SystemExit("--excess / --distance-excess: give --shares too")
    splits = args.split_of or [None] * len(args.bundle)
    evidence = [gather(b, args.data, args.engine, s) for b, s in zip(args.bundle, splits, strict=True)]
    if args.shares:
        rows = [r for ev in evidence for r in share_rows(ev, args.shares, args.excess, args.distance_excess)]
        return _report(["## The served map with the Swin's share of the fusion at each value\n\n"
                        + markdown(rows, list(rows[0]))], args.out)
    border = [r for ev in evidence for r in border_rows(ev)]
    border_section = (f"## Pixel AP inside the frame and in its {BORDER_PX}-px border (each bundle's refinement)\n\n"
                      + markdown(border, list(border[0])))
    if args.border_only:
        return _report([border_section], args.out)
    sections = []
    all_rows = []

    def add(name: str, result: dict) -> None:
        all_rows.append(row(name, result))
        print(f"{name:66s} AP {result['pixel_ap']:.3f}  PRO {result['pro']:.3f}  "
              f"pixel AUROC {result['pixel_auroc']:.3f}", flush=True)

    for ev in evidence:
        for name, rule in RULES.items():
            add(f"{ev.name}: {name}", score(ev, rule(ev)))
        for name, refiner in REFINERS.items():
            add(f"{ev.name}: mean, refined: {name}", score(ev, RULES["mean"](ev), refiner))
        for name in ("0.4 swin + 0.6 distance", "0.3 swin + 0.7 distance"):
            add(f"{ev.name}: {name}, refined (scoring.refine)", score(ev, RULES[name](ev), ev.refiner))
        for name, maps in profile_variants(ev).items():
            add(f"{ev.name}: {ev.profile_rule}, refined: {name}",
                evaluate_maps(ev.labels, ev.verdict, ev.masks, maps, ev.types))
    if len(evidence) > 1:
        first = evidence[0]
        if any(e.masks.shape != first.masks.shape or e.types != first.types for e in evidence[1:]):
            raise SystemExit("the bundles were evaluated on different images: cannot average their Swins")
        swin = np.mean([e.swin for e in evidence], axis=0)
        for ev in evidence:
            for name, blocks in ((f"swin of {len(evidence)} seeds", swin),
                                 (f"mean of distance and swin of {len(evidence)} seeds", 0.5 * (swin + ev.distance))):
                add(f"{ev.name}: {name}", score(ev, blocks))
            # the ensemble in the bundle's own final map: what a profile with N Swins would serve
            fused = ev.blocks_at(ev.swin_weight, swin=swin)
            n = len(evidence)
            add(f"{ev.name}: {ev.profile_rule} with the swin of {n} seeds, refined (scoring.refine)",
                score(ev, fused, ev.refiner))
            add(f"{ev.name}: {ev.profile_rule} with the swin of {n} seeds, refined: local contrast 0.3",
                score(ev, fused, replace(ev.refiner, contrast_weight=0.3)))
    types = list(dict.fromkeys(t for t in evidence[0].types if t != "good"))
    keys = ["rule", "pixel_ap", "pro", "pixel_auroc"] + [f"{t}_{k}" for t in types for k in ("ap", "pro")]
    sections.append("## Final-map rules (pixel metrics; the fusion scales are each bundle's own)\n\n"
                    + markdown(all_rows, keys))
    first = evidence[0]
    for label, refiner in (("unrefined", None), ("refined (scoring.refine)", first.refiner)):
        top = where_top_pixels(first, first.profile_blocks(), refiner)
        sections.append(f"## Where {first.name}'s map, {label}, puts its highest pixels (as many as all defect "
                        f"pixels)\n\n" + markdown(top, list(top[0])))
    return _report([*sections, border_section], args.out)


def _report(sections: list[str], out: Path | None) -> int:
    text = "\n\n".join(sections) + "\n"
    print(text)
    if out:
        out.write_text(f"`{' '.join(sys.argv)}`\n\n" + text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
