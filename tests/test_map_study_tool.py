"""tools/map_study.py's rules on the profile's refined map, on small made-up evidence: the first row is the
runtime's own refined heatmap, and the wide guided filter keeps what a guided filter must keep."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from edge_runtime.core.scoring import HeatmapRefiner, heatmap_from_blocks

REPO = Path(__file__).resolve().parents[1]


def _map_study():
    spec = importlib.util.spec_from_file_location("map_study_tool", REPO / "tools" / "map_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _evidence(module):
    rng = np.random.default_rng(0)
    n, grid, size = 4, (8, 8), (64, 64)
    labels = np.array([False, False, True, True])
    masks = np.zeros((n, *size), bool)
    masks[2, 8:24, 8:24] = masks[3, 40:56, 16:48] = True
    guides = rng.uniform(0.3, 0.6, (n, *size)).astype(np.float32)
    guides[masks] -= 0.2  # the defects are darker than the tile
    distance = rng.uniform(0.0, 0.5, (n, *grid)).astype(np.float32)
    distance[2, 1:3, 1:3] += 1.0
    distance[3, 5:7, 2:6] += 1.0
    return module.Evidence(name="tiny", distance=distance, swin=0.5 * distance, verdict=np.array([0.1, 0.2, 0.9, 0.8]),
                           standardised=distance - 0.25, masks=masks, labels=labels,
                           types=["good", "good", "pit", "scratch"], blur_sigma=2.0, guides=guides,
                           swin_weight=0.3)


def test_profile_variants_start_from_the_runtimes_refined_map():
    module = _map_study()
    ev = _evidence(module)
    variants = module.profile_variants(ev)
    assert ev.profile_rule == "0.3 swin + 0.7 distance"
    blocks = 0.3 * ev.swin + 0.7 * ev.distance
    expected = np.stack([HeatmapRefiner()(heatmap_from_blocks(b, (64, 64), 2.0), g)
                         for b, g in zip(blocks, ev.guides, strict=True)])
    np.testing.assert_allclose(variants["the profile (refined)"], expected, rtol=1e-5, atol=1e-6)
    for name, maps in variants.items():
        assert maps.shape == (4, 64, 64) and np.isfinite(maps).all(), name
    assert (variants["max with that radius-32 filter"] >= variants["the profile (refined)"]).all()
    # every variant still ranks the defects' own pixels above the good images' on this easy evidence
    for name, maps in variants.items():
        result = module.evaluate_maps(ev.labels, ev.verdict, ev.masks, maps, ev.types)
        assert result["pixel_auroc"] > 0.8, name


def test_the_wide_guided_filter_keeps_a_constant_map_and_follows_the_guide():
    module = _map_study()
    flat = np.full((64, 64), 0.7, np.float32)
    guide = np.zeros((64, 64), np.float32)
    guide[:, 32:] = 1.0  # two finishes side by side
    np.testing.assert_allclose(module._guided(flat, guide, 8, 1e-4), flat, atol=1e-4)
    heat = np.zeros((64, 64), np.float32)
    heat[:, 36:44] = 1.0  # heat inside the right-hand finish only
    out = module._guided(heat, guide, 16, 1e-4)
    assert out[:, 33:].mean() > 5 * max(out[:, :31].mean(), 1e-3)  # it spreads within a finish, not across the edge


def test_the_border_table_splits_the_pixels_at_the_frames_edge():
    """border_rows: the share of defect pixels and of area in the border band, and pixel AP over all pixels, the
    inside and the band, for the served map and the distance alone; the whole frame's AP is evaluate_maps' own."""
    module = _map_study()
    ev = _evidence(module)
    rows = module.border_rows(ev, px=12)
    assert [r["map"] for r in rows] == ["0.3 swin + 0.7 distance", "distance"]
    band = np.ones((64, 64), bool)
    band[12:-12, 12:-12] = False
    expected_share = (ev.masks[:, band].sum()) / ev.masks.sum()
    for r in rows:
        assert r["border_px"] == 12 and r["area_in_border"] == band.mean()
        assert r["defect_px_in_border"] == expected_share and 0 < expected_share < 1
        assert 0 < r["ap_border"] <= 1 and 0 < r["ap_inside"] <= 1
    maps = module.heatmaps(ev, ev.profile_blocks(), ev.refiner)
    whole = module.evaluate_maps(ev.labels, ev.verdict, ev.masks, maps, ev.types)["pixel_ap"]
    assert abs(rows[0]["ap_all"] - whole) < 1e-9
    inside = module.average_precision(ev.masks[:, ~band].ravel(), maps[:, ~band].ravel())
    assert abs(rows[0]["ap_inside"] - inside) < 1e-9


def test_the_share_table_scores_the_served_map_at_each_swin_share():
    """share_rows: at the bundle's own share the row is the served map's own metrics; at share 0 it is the distance
    alone, refined the same way; one row per share, in the order given."""
    module = _map_study()
    ev = _evidence(module)
    ev.swin = np.flip(ev.distance, axis=2).copy()  # a Swin that disagrees, so the share changes the map
    rows = module.share_rows(ev, [0.0, 0.3, 1.0])
    assert [r["swin_share"] for r in rows] == [0.0, 0.3, 1.0] and {r["bundle"] for r in rows} == {"tiny"}
    served = module.score(ev, ev.profile_blocks(), ev.refiner)
    assert abs(rows[1]["pixel_ap"] - served["pixel_ap"]) < 1e-9 and abs(rows[1]["pro"] - served["pro"]) < 1e-9
    distance = module.score(ev, ev.distance, ev.refiner)
    assert abs(rows[0]["pixel_ap"] - distance["pixel_ap"]) < 1e-9
    assert rows[2]["pixel_ap"] != rows[0]["pixel_ap"]


def test_the_share_table_also_scores_the_swin_excess_as_the_runtime_fuses_it():
    """share_rows with excesses: one row per share and excess; each row's block map is the runtime's MapFusion
    (mean rule, the Swin's excess over 1.0 added) on the same scaled evidence, and excess 0 is the plain share."""
    from edge_runtime.core.pipeline import MapFusion

    module = _map_study()
    ev = _evidence(module)
    ev.swin = 1.6 * np.flip(ev.distance, axis=2)  # above 1.0 where the flipped defects lie, below elsewhere
    rows = module.share_rows(ev, [0.3], [0.0, 0.8])
    assert [(r["swin_share"], r["swin_excess"], r["distance_excess"]) for r in rows] == [(0.3, 0.0, 0.0),
                                                                                          (0.3, 0.8, 0.0)]
    fused = MapFusion("mean", 1.0, 1.0, swin_weight=0.3, swin_excess=0.8)(ev.swin, ev.distance)
    assert np.allclose(ev.blocks_at(0.3, 0.8), fused, atol=1e-6)
    assert abs(rows[1]["pixel_ap"] - module.score(ev, fused, ev.refiner)["pixel_ap"]) < 1e-6
    both = module.share_rows(ev, [0.3], [0.8], [1.2])[0]
    fused = MapFusion("mean", 1.0, 1.0, swin_weight=0.3, swin_excess=0.8, distance_excess=1.2)(ev.swin, ev.distance)
    assert (ev.distance > 1.0).any() and np.allclose(ev.blocks_at(0.3, 0.8, distance_excess=1.2), fused, atol=1e-6)
    assert abs(both["pixel_ap"] - module.score(ev, fused, ev.refiner)["pixel_ap"]) < 1e-6
    plain = module.share_rows(ev, [0.3])[0]  # the bundle's own excess: none in this evidence
    assert plain["swin_excess"] == 0.0 and abs(plain["pixel_ap"] - rows[0]["pixel_ap"]) < 1e-9
    assert rows[1]["pixel_ap"] != rows[0]["pixel_ap"]


def test_the_share_table_serves_a_shifted_bundle_as_the_runtime_does(fitted, demo_data, tmp_path):
    """gather on a bundle that scores shifted frames (scoring.frame_shift) keeps each moved frame's evidence, and the
    share table's map at the bundle's own share and excess is the heatmap the runtime serves, image by image."""
    import json
    import shutil

    from edge_runtime.core.bundle import MANIFEST, load_bundle
    from edge_runtime.core.pipeline import Inspector
    from edge_runtime.core.preprocess import read_image
    from training_host.evaluation.evaluate import scored_test_split

    module = _map_study()
    path = tmp_path / "shifted"
    shutil.copytree(fitted[0], path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["schema_version"] = 7
    manifest["scoring"].update(anomaly_map="fused", frame_shift=4, refine={
        "guide_radius": 4, "guide_eps": 0.001, "contrast_weight": 0.3, "contrast_sigma": 2.0})
    manifest["scoring"]["fusion"].update(rule="mean", swin_weight=0.3, swin_excess=0.5, distance_excess=0.5)
    (path / MANIFEST).write_text(json.dumps(manifest))
    ev = module.gather(path, demo_data, "cpu")
    assert ev.shift_offsets == ((0, 4), (4, 0), (4, 4))
    assert ev.shifted_swin.shape == ev.shifted_distance.shape == (len(ev.labels), 3, *ev.swin.shape[1:])
    assert ev.swin_excess == ev.distance_excess == 0.5 and ev.profile_rule.endswith("+ 0.5 x distance excess")
    served = ev.served_heatmaps(0.3, 0.5, 0.5)
    inspector = Inspector(load_bundle(path))
    samples = scored_test_split(load_bundle(path), demo_data)[0].test
    for i, sample in enumerate(samples):
        assert np.allclose(served[i], inspector.inspect(read_image(sample.path)).heatmap, rtol=1e-4, atol=1e-5)
    rows = module.share_rows(ev, [0.3], [0.5], [0.5])
    metrics = module.evaluate_maps(ev.labels, ev.verdict, ev.masks, served, ev.types)
    assert abs(rows[0]["pixel_ap"] - metrics["pixel_ap"]) < 1e-12
    frame_only = module.heatmaps(ev, ev.blocks_at(0.3, 0.5, distance_excess=0.5), ev.refiner)
    assert not np.allclose(frame_only, served)  # the moved frames change the map
