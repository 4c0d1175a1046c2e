"""Tests for the synthetic anomaly generator (training_host.data.synthetic)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from training_host.data.synthetic import (
    AnomalySynthesizer,
    SyntheticConfig,
    band_mask,
    block_labels,
    boundary_ignored,
    covered_blocks,
    crack_mask,
    packaged_textures,
    perlin_mask,
    perlin_noise,
    pit_mask,
    region_blocks,
    save_sample_grid,
    transplant_defect,
)
from training_host.training.residual_data import mask_bank_blocks

SIZE = 128


def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    """Smoothed random noise, RGB uint8: a textured good image."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth = (smooth - smooth.mean()) / (smooth.std() + 1e-6) * 40 + 128
    return np.clip(smooth, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _texture(0)


@pytest.fixture(scope="module")
def donors() -> list[np.ndarray]:
    return [_texture(1, 96), _texture(2, 200)]


def test_packaged_textures_load_offline():
    tex = packaged_textures()
    assert len(tex) >= 3
    for name, img in tex:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert not img.flags.writeable


def test_perlin_noise_shape_range_and_determinism():
    n = perlin_noise((100, 70), (3, 7), np.random.default_rng(0))
    assert n.shape == (100, 70) and n.dtype == np.float32
    assert -1.01 <= n.min() < 0 < n.max() <= 1.01
    assert np.array_equal(n, perlin_noise((100, 70), (3, 7), np.random.default_rng(0)))
    assert not np.array_equal(n, perlin_noise((100, 70), (3, 7), np.random.default_rng(1)))


def test_make_is_deterministic(image, donors):
    a = AnomalySynthesizer(donors, seed=5)
    b = AnomalySynthesizer(donors, seed=5)
    c = AnomalySynthesizer(donors, seed=6)
    outs_a = [a.make(image) for _ in range(4)]
    outs_b = [b.make(image) for _ in range(4)]
    outs_c = [c.make(image) for _ in range(4)]
    for (ia, ma), (ib, mb) in zip(outs_a, outs_b, strict=True):
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    assert any(not np.array_equal(ma, mc) for (_, ma), (_, mc) in zip(outs_a, outs_c, strict=True))
    # An explicit generator overrides the instance's own one.
    x = a.make(image, rng=np.random.default_rng(9))
    y = c.make(image, rng=np.random.default_rng(9))
    assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


@pytest.mark.parametrize("weights", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.4, 0.3, 0.3)])
def test_mask_is_exact_and_binary(image, donors, weights):
    syn = AnomalySynthesizer(donors, SyntheticConfig(source_weights=weights), seed=1)
    changed_any = False
    for _ in range(8):
        out, mask = syn.make(image)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() >= 1
        assert mask.mean() <= syn.config.max_area
        outside = mask == 0
        assert np.array_equal(out[outside], image[outside])
        changed_any |= bool((out != image).any())
    assert changed_any


def test_input_is_not_modified(image, donors):
    before = image.copy()
    AnomalySynthesizer(donors, seed=0).make(image)
    assert np.array_equal(image, before)


def test_foreground_confinement(image, donors):
    syn = AnomalySynthesizer(donors, seed=2)
    fg = np.ones((32, 32), np.float32)
    fg[:, :16] = 0.0  # left half is background
    for _ in range(10):
        out, mask = syn.make(image, fg)
        assert mask.sum() > 0
        assert mask[:, : SIZE // 2 - 2].sum() == 0  # allow the interpolated boundary column(s)
        assert np.array_equal(out[mask == 0], image[mask == 0])


def test_small_foreground_is_still_hit(image, donors):
    syn = AnomalySynthesizer(donors, seed=3)
    fg = np.zeros((32, 32), np.float32)
    fg[20:22, 5:7] = 1.0
    big = cv2.resize(fg, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) > 0.5
    for _ in range(5):
        _, mask = syn.make(image, fg)
        assert mask.sum() > 0 and not mask[~big].any()


def test_empty_foreground_returns_unchanged(image, donors):
    out, mask = AnomalySynthesizer(donors, seed=0).make(image, np.zeros((32, 32), np.float32))
    assert np.array_equal(out, image)
    assert mask.shape == (SIZE, SIZE) and not mask.any()


def test_grey_input_and_no_donors():
    grey = cv2.cvtColor(_texture(4), cv2.COLOR_RGB2GRAY)
    out, mask = AnomalySynthesizer([], seed=0).make(grey)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    assert mask.any() and np.array_equal(out[mask == 0], rgb[mask == 0])


def test_match_colour_keeps_a_grey_product_grey(donors):
    """Packaged textures (some in colour) and colour donors are pasted in grey into a grey image when asked, and a
    colour image keeps its colour textures."""
    grey = cv2.cvtColor(cv2.cvtColor(_texture(5), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    colour_pasted = 0
    for seed in range(12):
        for match, want_grey in ((True, True), (False, None)):
            cfg = SyntheticConfig(source_weights=(0.5, 0.0, 0.5), match_colour=match)
            out, mask = AnomalySynthesizer(donors, cfg, seed=seed).make(grey)
            spread = np.ptp(out.astype(np.int16), axis=2)
            if want_grey:
                assert mask.any() and spread.max() == 0
            else:
                colour_pasted += int(spread.max() > 0)
    assert colour_pasted > 0  # without it, colour textures do reach a grey image (the case it exists for)
    colour = _texture(6)
    out, mask = AnomalySynthesizer(donors, SyntheticConfig(source_weights=(1.0, 0.0, 0.0), match_colour=True),
                                   seed=0).make(colour)
    assert np.ptp(out[mask > 0].astype(np.int16), axis=1).max() > 0


def test_non_square_image(donors):
    img = _texture(5, 160)[:96]
    out, mask = AnomalySynthesizer(donors, seed=0).make(img)
    assert out.shape == img.shape and mask.shape == img.shape[:2] and mask.any()


def test_bad_inputs(donors):
    with pytest.raises(ValueError):
        AnomalySynthesizer(donors, SyntheticConfig(opacity=(0.8, 0.2)))
    with pytest.raises(ValueError):
        AnomalySynthesizer(donors, SyntheticConfig(source_weights=(0, 0, 0)))
    with pytest.raises(ValueError):
        AnomalySynthesizer(donors).make(np.zeros((8, 8, 3), np.float32))


def test_perlin_mask_areas():
    rng = np.random.default_rng(0)
    h = w = SIZE
    fracs = []
    for _ in range(50):
        m = perlin_mask((h, w), rng, max_area=0.3, min_area_px=16)
        assert m.shape == (h, w) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert 16 <= m.sum() <= 0.3 * h * w
        fracs.append(m.mean())
    fracs = np.asarray(fracs)
    assert (fracs < 0.02).mean() >= 0.2  # many masks are small, like the real defects
    assert (fracs > 0.02).mean() >= 0.2  # ...but not all
    with pytest.raises(ValueError):
        perlin_mask((8, 8), rng, max_area=0.1, min_area_px=16)


def test_perlin_mask_non_divisible_shape():
    m = perlin_mask((100, 37), np.random.default_rng(1))
    assert m.shape == (100, 37) and 16 <= m.sum() <= 0.3 * 100 * 37


def test_every_defect_region_names_its_blocks_even_when_thin_or_small():
    mask = np.zeros((64, 64), np.uint8)
    mask[16:32, 16:32] = 1  # a region filling block (1, 1)
    mask[0:16, 46:50] = 1  # a hairline across the column edge at x = 48: 2 / 16 of blocks (0, 2) and (0, 3)
    mask[16:20, 46:50] = 1  # ... and 2 / 16 x 4 / 16 of (1, 2) and (1, 3): less than half its best
    mask[52:55, 4:7] = 1  # a pit: 9 / 256 of block (3, 0)
    expected = np.zeros((4, 4), bool)
    expected[1, 1] = expected[0, 2] = expected[0, 3] = expected[3, 0] = True
    assert np.array_equal(region_blocks(mask, (4, 4), 0.5), expected)
    assert not (block_labels(mask, (4, 4)) == 1)[0, 2:].any()  # Eq. 15 alone names none of the hairline's
    # a defect bank takes both: the block labels' positives (min_positive_px ones too) and every region's own blocks
    bank = mask_bank_blocks(mask, (4, 4), 0.5, 0.1, min_positive_px=8)  # the hairline's 8 px in (1, 2) and (1, 3)
    assert np.array_equal(bank, expected | (block_labels(mask, (4, 4), 0.5, 0.1, 8) == 1)) and bank[1, 2:].all()
    # a region covering a block by more than the share keeps only those blocks: its rim stays out
    assert np.array_equal(covered_blocks(np.array([[0.9, 0.2], [0.6, 0.0]]), 0.5), [[True, False], [True, False]])
    assert not covered_blocks(np.zeros((2, 2)), 0.5).any()
    assert not region_blocks(np.zeros((64, 64)), (4, 4), 0.5).any()
    with pytest.raises(ValueError, match="not divisible"):
        region_blocks(mask, (5, 5), 0.5)


def test_block_labels():
    mask = np.zeros((64, 64), np.uint8)
    mask[0:16, 0:8] = 1  # block (0, 0): exactly half covered -> ignored
    mask[16:32, 16:32] = 255  # block (1, 1): fully covered -> positive
    mask[48:50, 48:54] = 1  # block (3, 3): 12 / 256 = 4.7 % -> negative
    mask[0:16, 32:41] = 1  # block (0, 2): 56 % -> positive
    mask[32:48, 0:4] = 1  # block (2, 0): 25 % -> ignored
    labels = block_labels(mask, (4, 4), eps_pos=0.5, eps_neg=0.1)
    assert labels.dtype == np.int8 and labels.shape == (4, 4)
    expected = np.zeros((4, 4), np.int8)
    expected[0, 0], expected[1, 1], expected[0, 2], expected[2, 0] = -1, 1, 1, -1
    assert np.array_equal(labels, expected)
    assert np.array_equal(block_labels(mask.astype(bool), (4, 4)), labels)
    assert np.array_equal(block_labels(mask.astype(np.float32), (4, 4)), labels)
    assert block_labels(mask, (64, 64)).tolist() == np.where(mask > 0, 1, 0).tolist()
    # min_positive_px: a block holding that many defective pixels is positive even when barely covered
    thin = block_labels(mask, (4, 4), eps_pos=0.5, eps_neg=0.1, min_positive_px=64)
    assert thin[2, 0] == 1 and thin[0, 0] == 1 and thin[3, 3] == 0  # 64 and 128 px; 12 px stays negative
    assert np.array_equal(block_labels(mask, (4, 4), min_positive_px=0), labels)
    with pytest.raises(ValueError, match="min_positive_px"):
        block_labels(mask, (4, 4), min_positive_px=-1)


def test_boundary_ignored_leaves_only_the_normal_blocks_next_to_an_anomaly_out():
    labels = np.zeros((2, 6, 7), np.int8)
    labels[0, 2, 3] = 1  # an anomaly inside the grid
    labels[1, 0, 6] = -1  # an ignored block in a corner counts as well
    before = labels.copy()
    one = boundary_ignored(labels, 1)
    assert one.dtype == np.int8 and one.shape == labels.shape
    expected = labels.copy()
    expected[0, 1:4, 2:5] = -1
    expected[0, 2, 3] = 1  # the anomaly keeps its label
    expected[1, 0:2, 5:7] = -1  # clipped at the grid's edge, never wrapped round to the other side
    assert np.array_equal(one, expected)
    two = boundary_ignored(labels, 2)
    assert (two[0, 0:5, 1:6] != 0).all() and (two[0][two[0] != 0].size == 25) and two[0, 2, 3] == 1
    assert (two[1] != 0).sum() == 9 and (two[1, 3:, :] == 0).all()
    assert np.array_equal(labels, before)  # the input is not modified
    assert np.array_equal(boundary_ignored(labels, 0), labels)
    assert np.array_equal(boundary_ignored(np.zeros((3, 4), np.int8), 1), np.zeros((3, 4), np.int8))  # no anomaly
    assert boundary_ignored(np.zeros((0, 4, 4), np.int8), 1).shape == (0, 4, 4)
    with pytest.raises(ValueError, match="width"):
        boundary_ignored(labels, -1)


def test_a_residual_sets_boundary_ignored_relabels_only_the_asked_kind_and_shares_its_fields():
    import torch

    from training_host.training.residual_data import ResidualSet

    labels = torch.zeros((3, 5, 5), dtype=torch.int8)
    labels[:, 2, 2] = 1  # the same anomaly in a good-kind field would be left as it is
    fields = torch.rand(3, 5, 5, 2).half()
    data = ResidualSet(fields, labels, ["good", "synthetic", "synthetic"])
    ringed = data.boundary_ignored(1, kind="synthetic")
    assert ringed.fields is data.fields  # no copy of the fields, only of the labels
    assert torch.equal(ringed.labels[0], labels[0])
    for i in (1, 2):
        assert torch.equal(ringed.labels[i], torch.from_numpy(boundary_ignored(labels[i].numpy(), 1)))
    assert torch.equal(data.labels, labels)  # the set itself keeps its labels
    assert torch.equal(data.boundary_ignored(1).labels, torch.from_numpy(boundary_ignored(labels.numpy(), 1)))
    assert data.boundary_ignored(0, kind="synthetic") is data
    assert torch.equal(data.boundary_ignored(1, kind="weak").labels, labels)  # no field of that kind


def test_boundary_ignore_steers_the_unsupervised_phase_only_and_the_fine_tuning_sees_the_neighbours_as_normal():
    """Fine-tuned with the neighbours left out as well, the weak labels gained less (docs/sweeps/boundary.md)."""
    import torch

    from training_host.config import ProductConfig
    from training_host.models.swin import ResidualSwin, SwinShape
    from training_host.training.fit import _train_member
    from training_host.training.residual_data import ResidualSet
    from training_host.training.train_swin import SwinTrainer

    class Recording(SwinTrainer):  # the real trainer; it notes the labels each phase trained on
        seen: dict = {}

        def run_phase(self, phase, data, *args, **kwargs):
            self.seen[phase] = data.labels.clone()
            return super().run_phase(phase, data, *args, **kwargs)

    g = torch.Generator().manual_seed(0)
    labels = torch.zeros((8, 8, 8), dtype=torch.int8)
    labels[4:, 3:5, 3:5] = 1  # four synthetic fields with an anomaly, four good ones
    data = ResidualSet(torch.rand(8, 8, 8, 4, generator=g).half(), labels, ["good"] * 4 + ["synthetic"] * 4)
    real = ResidualSet(torch.rand(2, 8, 8, 4, generator=g).half(), labels[4:6].clone(), ["defect"] * 2)
    cfg = ProductConfig.model_validate({"swin": {
        "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 1000, "steps": 2, "finetune_steps": 2, "window": 4,
        "train_window": 8, "finetune_objective": "focal", "boundary_ignore": 1}})
    model = ResidualSwin(SwinShape(in_dim=4, embed_dim=8, depth=2, heads=2, window=4, train_window=8))
    model.set_input_scale(data.fields.float())
    trainer = Recording(model, cfg.swin, seed=0)
    phases, steps = _train_member(cfg, None, trainer, data, real, None, False)
    assert [p["phase"] for p in phases] == ["unsupervised", "supervised"] and steps == 4
    ring = torch.from_numpy(boundary_ignored(labels.numpy(), 1)) != labels
    assert ring[4:].sum() == 4 * 12 and not ring[:4].any()
    assert (trainer.seen["unsupervised"][ring] == -1).all()  # left out while learning from synthetic anomalies
    assert torch.equal(trainer.seen["supervised"], labels)  # normal again when the labels fine-tune
    assert torch.equal(data.labels, labels)


def test_pit_and_crack_masks_are_small_or_thin():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pits = pit_mask((256, 256), rng)
        n, _, stats, _ = cv2.connectedComponentsWithStats(pits.astype(np.uint8))
        assert 1 <= n - 1 <= 3 and stats[1:, cv2.CC_STAT_AREA].max() <= np.pi * 10.5 * 10.5 * 1.2
        crack = crack_mask((256, 256), rng, width_px=(1, 2))
        area = int(crack.sum())
        assert area > 0 and set(np.unique(crack)) <= {0.0, 1.0}
        # thin: one 3x3 erosion removes most of a line drawn at most 2 px wide (a blob would keep most)
        eroded = cv2.erode(crack.astype(np.uint8), np.ones((3, 3), np.uint8))
        assert eroded.sum() <= 0.35 * area


@pytest.mark.parametrize("shapes", [(0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_pits_and_cracks_change_exactly_the_mask(shapes):
    syn = AnomalySynthesizer([_texture(1)], SyntheticConfig(shape_weights=shapes), seed=2)
    image = _texture(0)
    for _ in range(5):
        out, mask = syn.make(image)
        changed = np.any(out != image, axis=2)
        assert mask.any() and not changed[mask == 0].any()
        assert changed[mask > 0].mean() > 0.9  # darkened or brightened, almost nowhere left equal
    with pytest.raises(ValueError, match="shape_weights"):
        AnomalySynthesizer([], SyntheticConfig(shape_weights=(0, 0, 0)))


def test_band_masks_are_large_straight_sided_and_one_piece():
    rng = np.random.default_rng(0)
    from_edge = 0
    for _ in range(40):
        band = band_mask((256, 192), rng)
        area = band.mean()
        assert set(np.unique(band)) <= {0.0, 1.0} and 0.02 <= area <= 0.6
        n, _ = cv2.connectedComponents(band.astype(np.uint8))
        assert n - 1 == 1
        # straight-sided: the mask is its own convex hull, to within the rasterised border
        contours, _ = cv2.findContours(band.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.contourArea(cv2.convexHull(contours[0]))
        assert band.sum() >= 0.97 * hull
        from_edge += bool(band[0].any() or band[-1].any() or band[:, 0].any() or band[:, -1].any())
    assert from_edge >= 20  # two in three run in from a side (a quadrilateral may touch one too)


def test_finish_bands_change_exactly_the_mask(image, donors):
    syn = AnomalySynthesizer(donors, SyntheticConfig(band_fraction=1.0), seed=3)
    for _ in range(6):
        out, mask = syn.make(image)
        changed = np.any(out != image, axis=2)
        assert mask.mean() >= 0.02 and not changed[mask == 0].any()
        assert np.abs(out[mask > 0].astype(int) - image[mask > 0]).mean() >= 6  # another finish, not a copy
    with pytest.raises(ValueError, match="band_fraction"):
        AnomalySynthesizer(donors, SyntheticConfig(band_fraction=1.5))


def test_a_transplanted_defect_keeps_its_shape_and_look_at_a_new_place(image):
    source = _texture(5)
    mask = np.zeros((SIZE, SIZE), np.float32)
    cv2.ellipse(mask, (30, 40), (12, 5), 30, 0, 360, 1.0, -1)  # a dark elongated pit
    source[mask > 0] = (source[mask > 0] * 0.3).astype(np.uint8)
    rng = np.random.default_rng(0)
    places = set()
    for _ in range(12):
        out, moved = transplant_defect(source, mask, image, rng)
        assert moved.dtype == np.float32 and set(np.unique(moved)) == {0.0, 1.0}
        assert moved.sum() == mask.sum()  # the whole defect, nothing cut off at the border
        ys, xs = np.nonzero(moved)
        places.add((int(ys.min()), int(xs.min())))
        near = cv2.dilate(moved, np.ones((5, 5), np.uint8)) > 0  # a feathered edge of about a pixel
        assert np.array_equal(out[~near], image[~near])  # the rest of the target is untouched
        inside = out[moved > 0].astype(float).mean()
        assert inside < image.astype(float).mean() - 40  # still a dark pit in its new image
    assert len(places) >= 8  # it moves
    empty, none = transplant_defect(source, np.zeros_like(mask), image, rng)
    assert np.array_equal(empty, image) and not none.any()
    with pytest.raises(ValueError, match="same size"):
        transplant_defect(source[:64], mask[:64], image, rng)


@pytest.mark.parametrize(
    ("shape", "grid", "eps_pos", "eps_neg"),
    [((64, 62), (4, 4), 0.5, 0.1), ((64, 64), (0, 4), 0.5, 0.1), ((64, 64), (4, 4), 0.1, 0.5),
     ((64, 64), (4, 4), 1.5, 0.1), ((64, 64), (4, 4), 0.5, -0.1), ((4, 4, 4), (2, 2), 0.5, 0.1)],
)
def test_block_labels_errors(shape, grid, eps_pos, eps_neg):
    with pytest.raises(ValueError):
        block_labels(np.zeros(shape), grid, eps_pos=eps_pos, eps_neg=eps_neg)


def test_block_labels_error_names_shapes():
    with pytest.raises(ValueError, match=r"\(64, 60\).*\(4, 7\)"):
        block_labels(np.zeros((64, 60)), (4, 7))


def test_save_sample_grid(tmp_path, image, donors):
    syn = AnomalySynthesizer(donors, seed=0)
    samples = [syn.make(image) for _ in range(5)]
    path = save_sample_grid(samples, tmp_path / "sub" / "grid.png", columns=3, tile=64)
    assert path.is_file()
    pic = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert pic is not None and pic.shape == (2 * 64, 3 * 64, 3)
    red = (pic[..., 2] == 255) & (pic[..., 1] == 0) & (pic[..., 0] == 0)  # BGR on disk
    assert red.any()
    with pytest.raises(ValueError):
        save_sample_grid([], tmp_path / "empty.png")
