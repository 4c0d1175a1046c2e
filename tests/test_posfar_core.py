"""The torch-free PosFAR math: coreset, PCA, retrieval, matching, residuals, scoring, position code."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_runtime.core.coreset import greedy_kcenter, greedy_kcenter_batched, select_per_image
from edge_runtime.core.defect_bank import NumpyBankSearch
from edge_runtime.core.matching import MemoryBank, NumpySearch, SearchThreads, posfar_residual, widened
from edge_runtime.core.pca import PCA, fit_pca
from edge_runtime.core.position import position_code
from edge_runtime.core.retrieval import ReferenceIndex
from edge_runtime.core.scoring import (
    DistanceStandardiser,
    HeatmapRefiner,
    defect_regions,
    heatmap_from_blocks,
    image_score,
    shift_offsets,
    shifted_frame,
    unshifted_heatmap,
)


def _slow_kcenter(x: np.ndarray, n: int, start: int) -> list[int]:
    chosen = [start]
    for _ in range(n - 1):
        d = np.min(((x[:, None, :] - x[None, chosen, :]) ** 2).sum(-1), axis=1)
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    return chosen


def test_kcenter_matches_reference_implementation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    assert greedy_kcenter(x, 20, start=7).tolist() == _slow_kcenter(x, 20, 7)


def test_kcenter_batched_equals_independent_runs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 100, 6)).astype(np.float32)
    starts = np.array([0, 5, 9, 99])
    batched = greedy_kcenter_batched(x, 10, starts)
    for b in range(4):
        assert batched[b].tolist() == greedy_kcenter(x[b], 10, start=int(starts[b])).tolist()


def test_kcenter_covers_clusters_better_than_random():
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=10, size=(8, 3))
    x = (centres[rng.integers(0, 8, 400)] + rng.normal(scale=0.1, size=(400, 3))).astype(np.float32)
    chosen = greedy_kcenter(x, 8)
    # each of the 8 well-separated clusters gets exactly one centre
    labels = np.argmin(((x[chosen][:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert sorted(labels.tolist()) == list(range(8))


def test_select_per_image_shape_and_uniqueness():
    feats = np.random.default_rng(3).normal(size=(5, 64, 32)).astype(np.float32)
    idx = select_per_image(feats, 0.25, projection_dim=8, chunk=2)
    assert idx.shape == (5, 16)
    assert all(len(set(row.tolist())) == 16 for row in idx)
    with pytest.raises(ValueError, match="ratio"):
        select_per_image(feats, 0.0)


def test_pca_matches_svd_and_variance_rule():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 6)) * np.array([10, 5, 1, 0.1, 0.1, 0.1])
    pca = fit_pca(x, variance=0.95)
    assert pca.dim == 2
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    assert np.allclose(np.abs(pca.components @ vt[:2].T), np.eye(2), atol=1e-4)
    assert fit_pca(x, n_components=4).dim == 4
    with pytest.raises(ValueError):
        fit_pca(x[:1])


def test_retrieval_is_robust_to_a_local_change():
    rng = np.random.default_rng(5)
    refs = rng.normal(size=(30, 16, 4)).astype(np.float32)
    query = refs[12].copy()
    query[3] += 100.0  # a "defect" in one cell
    index = ReferenceIndex(refs, trim=0.25)
    assert index.nearest(query, 1)[0] == 12
    assert ReferenceIndex(refs, trim=0.0).distances(query)[12] > 99
    near = index.nearest(refs[4], 5, exclude=4)
    assert 4 not in near and len(near) == 5
    assert np.all(np.diff(index.distances(refs[4])[near]) >= 0)


def test_matching_equals_brute_force_restricted_search():
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(300, 12)).astype(np.float32)
    image = rng.integers(0, 10, 300)
    pca = fit_pca(bank, n_components=12)  # full rank: PCA search = exact search
    mb = MemoryBank(bank, image, pca)
    query = rng.normal(size=(50, 12)).astype(np.float32)
    refs = np.array([2, 7])
    match = mb.match(query, refs)
    allowed = np.flatnonzero(np.isin(image, refs))
    d = np.sqrt(((query[:, None] - bank[None, allowed]) ** 2).sum(-1))
    assert np.allclose(match.distance, d.min(1), atol=1e-4)
    assert np.isin(mb.image_index[match.bank_rows], refs).all()
    with pytest.raises(ValueError):
        MemoryBank(bank, image[:10], pca)


def test_search_threads_share_the_blocks_and_find_what_one_thread_finds():
    threads = SearchThreads(2)
    seen: list[tuple[int, int, str]] = []
    threads.run(lambda lo, hi: seen.append((lo, hi, threading.current_thread().name)), 1000, 256)
    assert sorted((lo, hi) for lo, hi, _ in seen) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert len({name for *_, name in seen}) == 2  # the caller and its worker
    one = SearchThreads(1)
    seen.clear()
    one.run(lambda lo, hi: seen.append((lo, hi, threading.current_thread().name)), 300, 256)
    assert [(lo, hi) for lo, hi, _ in seen] == [(0, 256), (256, 300)]
    assert {name for *_, name in seen} == {threading.current_thread().name}

    caller = threading.current_thread()

    def fails_on_the_worker(lo: int, hi: int) -> None:
        if threading.current_thread() is not caller:
            raise RuntimeError(f"block {lo}-{hi}")

    with pytest.raises(RuntimeError, match="block 256-512"):
        threads.run(fails_on_the_worker, 1000, 256)
    with pytest.raises(ValueError, match="at least one thread"):
        SearchThreads(0)

    rng = np.random.default_rng(8)
    bank = rng.normal(size=(2000, 16)).astype(np.float32)
    pca = fit_pca(bank, n_components=8)
    query = rng.normal(size=(1024, 16)).astype(np.float32)
    serial, shared = MemoryBank(bank, np.arange(2000) // 100, pca), MemoryBank(bank, np.arange(2000) // 100, pca,
                                                                            search=NumpySearch(pca, threads))
    refs = np.array([1, 4, 7, 12])
    assert np.array_equal(shared.match(query, refs).bank_rows, serial.match(query, refs).bank_rows)
    assert np.array_equal(NumpyBankSearch(bank[:300], threads)(query), NumpyBankSearch(bank[:300])(query))


def test_a_float16_bank_is_widened_exactly():
    """The bank is stored as float16; the matched rows come back as the float32 numpy would give, bit for bit."""
    rng = np.random.default_rng(7)
    half = (rng.normal(size=(1024, 152)) * 30).astype(np.float16)
    half[0, :6] = [-0.0, 6e-8, 65504, np.inf, -np.inf, np.nan]  # -0, a subnormal, the largest, infinities, NaN
    for x in (half, half[:, :3], half[:1], half[::3, ::2], np.zeros((0, 152), np.float16)):
        out = widened(x)
        assert out.dtype == np.float32 and out.shape == x.shape
        assert out.tobytes() == x.astype(np.float32).tobytes()
    bank = MemoryBank(half[1:300].astype(np.float32).astype(np.float16), rng.integers(0, 10, 299),
                      fit_pca(half[1:300].astype(np.float32), n_components=8))
    rows = rng.integers(0, 299, 64)
    assert bank.rows(rows).tobytes() == bank.features[rows].astype(np.float32).tobytes()


def test_posfar_residual_averages_theta_powers():
    p = np.array([[1.0, -2.0]], np.float32)
    q = np.array([[0.0, 1.0]], np.float32)
    assert np.allclose(posfar_residual(p, q), [[(1 + 1) / 2, (3 + 9) / 2]])
    assert np.allclose(posfar_residual(p, q, thetas=(1.0,)), [[1, 3]])


def test_position_code_shape_range_and_uniqueness():
    code = position_code(8, 6, 16)
    assert code.shape == (16, 8, 6) and np.abs(code).max() <= 1.0
    flat = code.reshape(16, -1).T
    assert len({tuple(np.round(v, 5)) for v in flat}) == 48  # every position gets its own code
    with pytest.raises(ValueError):
        position_code(4, 4, 6)


def test_heatmap_score_and_regions():
    block = np.zeros((8, 8), np.float32)
    block[2, 5] = 10.0
    heat = heatmap_from_blocks(block, (64, 64), sigma=2.0)
    assert heat.shape == (64, 64)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 16 <= y < 24 and 40 <= x < 48  # the peak stays where the block was
    assert image_score(heat, 4) <= heat.max()
    regions = defect_regions(heat, heat.max() / 2)
    assert len(regions) == 1 and regions[0].peak == pytest.approx(float(heat.max()))


@pytest.mark.parametrize("grid, size_hw, sigma, pool", [
    ((32, 32), (256, 256), 4.0, 8), ((24, 40), (192, 320), 2.0, 4), ((20, 30), (256, 250), 4.0, 8),
    ((48, 48), (384, 384), 6.0, 8), ((16, 16), (16, 16), 1.5, 3), ((32, 32), (256, 256), 0.0, 1)])
def test_heatmaps_by_matrix_products_are_opencvs_resize_blur_and_pool(grid, size_hw, sigma, pool):
    """scoring builds each axis's resize, blur and pooling as one matrix: the heatmap and the image score must be
    what filtering the full-size image with OpenCV gives (non-square grids, upsampling by non-integer factors,
    no blur, no pooling)."""
    import cv2

    from edge_runtime.core.scoring import block_map_score

    block = np.random.default_rng(len(grid) + size_hw[1]).normal(size=grid).astype(np.float32) * 3.0
    want = cv2.resize(block, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        k = 2 * int(round(4.0 * sigma)) + 1
        want = cv2.GaussianBlur(want, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    got = heatmap_from_blocks(block, size_hw, sigma)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    pooled = cv2.blur(want, (pool, pool), borderType=cv2.BORDER_REFLECT) if pool > 1 else want
    assert block_map_score(block, size_hw, sigma, pool) == pytest.approx(float(pooled.max()), rel=1e-5)
    assert image_score(got, pool) == pytest.approx(float(pooled.max()), rel=1e-5)


def test_distance_standardiser_scores_each_position_against_its_own_good_spread():
    """A border that is always far from the bank must not outscore a smaller excess in a quiet middle."""
    rng = np.random.default_rng(0)
    good = rng.normal(1.0, 0.05, size=(200, 8, 8)).astype(np.float32)
    good[:, 0, :] += rng.normal(3.0, 1.0, size=(200, 8))  # a noisy border row: high and variable distances
    std = DistanceStandardiser(good)
    assert std.mean.shape == std.std.shape == (8, 8) and std.mean.dtype == np.float32
    test = np.full((8, 8), 1.0, np.float32)
    test[0, 3] = 5.0  # within the border's normal spread
    test[5, 5] = 1.5  # ten good standard deviations above a quiet position
    z = std(test)
    assert np.unravel_index(np.argmax(test), test.shape) == (0, 3)
    assert np.unravel_index(np.argmax(z), z.shape) == (5, 5)
    assert np.allclose(std(good).mean(axis=0), 0.0, atol=1e-4)
    # a position that never varies gets a floor, not a division by zero
    flat = np.ones((5, 4, 4), np.float32)
    assert np.isfinite(DistanceStandardiser(flat)(flat[0] + 1.0)).all()
    with pytest.raises(ValueError, match="at least 2"):
        DistanceStandardiser(good[:1])
    with pytest.raises(ValueError, match="finite"):
        DistanceStandardiser(np.full((3, 2, 2), np.nan, np.float32))


def test_distance_standardiser_against_the_retrieved_references_only():
    """Two kinds of part with different normal distances at the same position: against its own kind's
    references, a defect on the quiet kind stands out; against all good images it drowns in the other's spread."""
    rng = np.random.default_rng(1)
    quiet = rng.normal(1.0, 0.05, size=(50, 4, 4))
    loud = rng.normal(4.0, 1.0, size=(50, 4, 4))
    std = DistanceStandardiser(np.concatenate([quiet, loud]).astype(np.float32))
    test = np.full((4, 4), 1.0, np.float32)
    test[2, 2] = 2.0  # 20 sd above the quiet kind, well inside the pooled spread
    own = std(test, references=np.arange(16))
    pooled = std(test)
    assert own[2, 2] > 10 and pooled[2, 2] < 1
    assert abs(float(np.delete(own.ravel(), 10).mean())) < 1.5


def _pit_scene() -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A textured grey frame with one small dark pit, and a heatmap blob centred 10 px away from it, as the
    8-px blocks, upsampled and blurred, place the heat of a small defect."""
    rng = np.random.default_rng(0)
    guide = (0.5 + 0.02 * rng.standard_normal((128, 128))).astype(np.float32)
    pit = (70, 62)
    yy, xx = np.mgrid[:128, :128]
    guide[(yy - pit[0]) ** 2 + (xx - pit[1]) ** 2 <= 9] = 0.15
    heat = np.exp(-((yy - 62) ** 2 + (xx - 56) ** 2) / (2 * 12.0**2)).astype(np.float32)
    return heat, guide, pit


def test_heatmap_refinement_moves_a_blobs_peak_onto_the_small_defect_it_covers():
    heat, guide, pit = _pit_scene()
    refined = HeatmapRefiner()(heat, guide)
    assert refined.shape == heat.shape and refined.dtype == np.float32
    before = np.unravel_index(np.argmax(heat), heat.shape)
    after = np.unravel_index(np.argmax(refined), heat.shape)
    assert np.hypot(before[0] - pit[0], before[1] - pit[1]) > 9
    assert np.hypot(after[0] - pit[0], after[1] - pit[1]) <= 4
    # each step alone moves it too: the guided filter lets heat follow the pit's edges, contrast ranks the pit first
    for step in (HeatmapRefiner(contrast_weight=0.0), HeatmapRefiner(guide_radius=0)):
        out = step(heat, guide)
        assert out[pit] / out.max() > heat[pit] / heat.max()
    # the heat far from any defect is not invented: a cold region stays cold
    assert refined[:20, 100:].max() < 0.01


def test_heatmap_refinement_keeps_flat_frames_and_flat_maps_as_they_are():
    heat, guide, _ = _pit_scene()
    flat_guide = np.full_like(guide, 0.4)
    # a flat frame: no edges to follow and no contrast, so the guided filter is a local mean of the heat
    out = HeatmapRefiner(contrast_weight=0.0)(heat, flat_guide)
    assert np.allclose(out.mean(), heat.mean(), rtol=0.01) and out.max() <= heat.max() + 1e-6
    assert np.allclose(HeatmapRefiner()(heat, flat_guide), out, atol=1e-6)
    # a flat map stays flat under the guided filter whatever the frame
    const = np.full_like(heat, 0.7)
    assert np.allclose(HeatmapRefiner(contrast_weight=0.0)(const, guide), 0.7, atol=1e-4)
    # and contrast scales heat by at most 1 + weight * CONTRAST_CLIP
    r = HeatmapRefiner(guide_radius=0, contrast_weight=0.2)
    scaled = r(const, guide) / 0.7
    assert scaled.min() >= 1.0 - 1e-6 and scaled.max() <= 1.0 + 0.2 * r.CONTRAST_CLIP + 1e-5


def test_a_heatmap_scaled_by_its_own_peak_keeps_its_ranking_and_the_reference_frame():
    heat, guide, _ = _pit_scene()
    r = HeatmapRefiner(peak_power=0.25)
    assert HeatmapRefiner().relative(heat, 0.1) is heat  # off by default
    strong = 16.0 * 0.1 * heat / heat.max()  # a frame whose peak is 16 times the reference
    assert np.allclose(r.relative(strong, 0.1), strong / 2.0, rtol=1e-6)  # 16 ** 0.25 = 2
    at_reference = 0.1 * heat / heat.max()
    assert np.allclose(r.relative(at_reference, 0.1), at_reference, rtol=1e-6)
    faint = 0.0625 * at_reference  # a sixteenth of it: raised by 2
    assert np.allclose(r.relative(faint, 0.1), 2.0 * faint, rtol=1e-6)
    # between frames the strong one stays above the faint one, but by less
    assert r.relative(strong, 0.1).max() / r.relative(faint, 0.1).max() == pytest.approx(256 ** 0.75, rel=1e-5)
    refined = r(heat, guide)
    assert (np.diff(r.relative(refined, 0.1).ravel()[np.argsort(refined, axis=None)]) >= 0).all()  # same order
    blank = np.zeros_like(heat)
    assert np.isfinite(r.relative(blank, 0.1)).all() and not r.relative(blank, 0.1).any()


@pytest.mark.parametrize("kwargs", [{"guide_radius": -1}, {"guide_eps": 0.0}, {"contrast_weight": -0.1},
                                    {"contrast_sigma": 0.0}, {"peak_power": -0.1}, {"peak_power": 1.0}])
def test_heatmap_refiner_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        HeatmapRefiner(**kwargs)


def test_heatmap_refiner_needs_a_guide_of_the_heatmaps_size():
    with pytest.raises(ValueError, match="guide"):
        HeatmapRefiner()(np.zeros((64, 64), np.float32), np.zeros((32, 32), np.float32))


def test_pca_transform_dtype():
    pca = PCA(components=np.eye(3, dtype=np.float32)[:2], mean=np.zeros(3, np.float32))
    assert pca.transform(np.ones((4, 3))).dtype == np.float32


def test_shifted_frames_and_their_heatmaps_move_back_onto_the_frame():
    """The shift-averaged heatmap's geometry: a frame moved down and right, its heatmap moved back, lands where
    the frame's own heatmap is; the strips the move uncovers are filled, never wrapped around."""
    assert shift_offsets(0) == ((0, 0),)
    assert shift_offsets(4) == ((0, 0), (0, 4), (4, 0), (4, 4))
    with pytest.raises(ValueError, match="shift_px"):
        shift_offsets(-1)
    rng = np.random.default_rng(3)
    frame = rng.random((1, 3, 32, 40)).astype(np.float32)
    for dy, dx in shift_offsets(4):
        moved = shifted_frame(frame, dy, dx)
        assert moved.shape == frame.shape and moved.flags["C_CONTIGUOUS"]
        assert np.array_equal(moved[..., dy:, dx:], frame[..., : 32 - dy, : 40 - dx])  # content moved, not wrapped
        assert np.array_equal(moved[..., :dy, dx:], frame[..., dy:0:-1, : 40 - dx])  # the top strip mirrors the edge
        # a per-pixel "heatmap" of the moved frame, moved back, is the frame's own wherever the moved frame showed it
        back = unshifted_heatmap(moved[0, 0], dy, dx)
        assert back.shape == (32, 40)
        assert np.array_equal(back[: 32 - dy, : 40 - dx], frame[0, 0, : 32 - dy, : 40 - dx])
        if dy:
            assert np.array_equal(back[32 - dy:], np.repeat(back[31 - dy: 32 - dy], dy, axis=0))
