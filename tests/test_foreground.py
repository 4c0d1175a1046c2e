"""Label-free foreground estimation: coreset frequency -> LDA -> per-image maps -> test-time factor."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.core.coreset import select_per_image
from edge_runtime.core.foreground import (
    ForegroundBuilder,
    ForegroundLDA,
    fit_lda,
    reference_foreground,
    sample_training_patches,
    selection_frequency,
)

GRID = (16, 16)


def _object_product(n_images: int = 40, dim: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, M, d) features and (n, h, w) object masks: a disc of random radius and offset on a plain background.

    The background is one vector plus small noise (k-center covers it with one centre); the object varies
    with position and random content, so k-center spends its budget there.
    """
    rng = np.random.default_rng(seed)
    height, width = GRID
    background = rng.normal(size=dim)
    direction = rng.normal(size=dim)
    object_mean = background + 5.0 * direction / np.linalg.norm(direction)
    basis = rng.normal(size=(4, dim))
    rows, cols = np.mgrid[0:height, 0:width]
    code = np.stack([np.sin(rows / 2), np.cos(cols / 2), np.sin((rows + cols) / 3), np.cos((rows - cols) / 3)], -1)
    features = np.empty((n_images, height * width, dim), dtype=np.float32)
    inside = np.empty((n_images, height, width), dtype=bool)
    for i in range(n_images):
        cy, cx = (height - 1) / 2 + rng.uniform(-1.5, 1.5), (width - 1) / 2 + rng.uniform(-1.5, 1.5)
        radius = rng.uniform(4.5, 6.0)
        inside[i] = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2
        obj = object_mean + 0.8 * code @ basis + 0.8 * rng.normal(size=(height, width, dim))
        plain = background + 0.05 * rng.normal(size=(height, width, dim))
        features[i] = np.where(inside[i][..., None], obj, plain).reshape(-1, dim)
    return features, inside


@pytest.fixture(scope="module")
def product() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features, inside = _object_product()
    return features, inside, select_per_image(features, 0.1)


def _feed(features: np.ndarray, chosen: np.ndarray, batch: int, fit_images: int = 16) -> ForegroundBuilder:
    builder = ForegroundBuilder(GRID, fit_images=fit_images, seed=0)
    for lo in range(0, features.shape[0], batch):
        builder.add(features[lo : lo + batch], chosen[lo : lo + batch])
    return builder


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def test_coreset_selects_object_positions_more_often(product):
    features, inside, chosen = product
    freq = selection_frequency(chosen, features.shape[1])
    always_object = inside.all(axis=0).reshape(-1)
    never_object = ~inside.any(axis=0).reshape(-1)
    assert freq[always_object].mean() > 5 * freq[never_object].mean()


def test_builder_maps_separate_object_from_background(product):
    features, inside, chosen = product
    builder = ForegroundBuilder(GRID, fit_images=16, seed=0)
    builder.add(features[:8], chosen[:8])
    assert builder.lda is None  # still buffering: maps come retroactively
    for lo in range(8, 40, 8):
        builder.add(features[lo : lo + 8], chosen[lo : lo + 8])
        assert builder.lda is not None  # fitted at image 16, later batches mapped on arrival
    lda, maps = builder.finish()
    assert maps.shape == (40, *GRID) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    mean_in = np.array([m[i].mean() for m, i in zip(maps, inside, strict=True)])
    mean_out = np.array([m[~i].mean() for m, i in zip(maps, inside, strict=True)])
    assert mean_in.min() > 0.8, mean_in.min()
    assert mean_out.max() < 0.2, mean_out.max()
    assert min(_auroc(m[i], m[~i]) for m, i in zip(maps, inside, strict=True)) > 0.95
    # the maps are exactly the LDA applied to each image's own features, in arrival order
    np.testing.assert_allclose(maps, lda.probability(features).reshape(40, *GRID), atol=1e-6)


def test_builder_result_does_not_depend_on_batching(product):
    features, _, chosen = product
    lda8, maps8 = _feed(features, chosen, batch=8).finish()
    lda5, maps5 = _feed(features, chosen, batch=5).finish()  # batch 5..10..15..20 straddles the fit at 16
    np.testing.assert_array_equal(lda8.weights, lda5.weights)
    assert (lda8.bias, lda8.scale) == (lda5.bias, lda5.scale)
    np.testing.assert_allclose(maps8, maps5, atol=1e-6)


def test_builder_fits_at_finish_when_short_and_rejects_one_image(product):
    features, inside, chosen = product
    lda, maps = _feed(features[:10], chosen[:10], batch=3, fit_images=64).finish()
    assert maps.shape == (10, *GRID)
    assert np.mean([m[i].mean() - m[~i].mean() for m, i in zip(maps, inside[:10], strict=True)]) > 0.6
    single = ForegroundBuilder(GRID)
    single.add(features[:1], chosen[:1])
    with pytest.raises(ValueError, match="at least 2 images"):
        single.finish()
    with pytest.raises(ValueError, match="grid"):
        single.add(features[:1, :100], chosen[:1])


def test_fit_lda_separates_two_gaussian_clouds():
    rng = np.random.default_rng(3)
    cov = np.array([[1.0, 0.9], [0.9, 1.0]])  # correlated: the Fisher direction is not the mean difference
    fg = rng.multivariate_normal([1.0, 0.0], cov, size=500)
    bg = rng.multivariate_normal([-1.0, 0.0], cov, size=500)
    x = np.concatenate([fg, bg])
    y = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    lda = fit_lda(x, y, shrinkage=0.0)
    prob = lda.probability(x)
    assert prob.dtype == np.float32
    # the Bayes error here is Phi(-2.29) ~ 1.1 %; thresholding x0 alone (no covariance) would err ~16 %
    assert ((prob > 0.5) == y).mean() > 0.97
    # projected class means land at about 0.95 / 0.05, the boundary midway between them
    np.testing.assert_allclose(lda.probability(fg.mean(axis=0)), 0.95, atol=1e-4)
    np.testing.assert_allclose(lda.probability(bg.mean(axis=0)), 0.05, atol=1e-4)
    np.testing.assert_allclose(lda.probability(x.mean(axis=0)), 0.5, atol=1e-4)
    # Fisher LDA uses the covariance: w is close to Sigma^-1 (1, 0) ~ (1, -0.9), not to (1, 0)
    assert lda.weights[1] < -0.5 * lda.weights[0]


def test_fit_lda_rejects_a_missing_class():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="at least 2 foreground and 2 background"):
        fit_lda(x, np.ones(10, bool))
    with pytest.raises(ValueError, match="at least 2 foreground and 2 background"):
        fit_lda(x, np.r_[True, np.zeros(9, bool)])


def test_probability_handles_any_leading_shape():
    lda = ForegroundLDA(weights=np.array([1.0, 0.0, 0.0], np.float32), bias=-1.0, scale=2.0)
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    prob = lda.probability(x)
    assert prob.shape == (2, 5, 7) and prob.dtype == np.float32
    np.testing.assert_allclose(prob, 1.0 / (1.0 + np.exp(-2.0 * (x[..., 0] - 1.0))), rtol=1e-5)
    assert lda.probability(np.array([1.0, 5.0, 5.0])).shape == ()
    assert lda.probability(np.array([[1e6, 0, 0], [-1e6, 0, 0]])).tolist() == [1.0, 0.0]  # no overflow
    with pytest.raises(ValueError, match="d=3"):
        lda.probability(np.zeros((4, 2)))


def test_selection_frequency_by_hand():
    chosen = np.array([[0, 2], [2, 3], [2, 2]])  # the repeated 2 in the last image counts once
    np.testing.assert_allclose(selection_frequency(chosen, 5), [1 / 3, 0, 1, 1 / 3, 0])
    assert selection_frequency(chosen, 5).dtype == np.float32
    with pytest.raises(ValueError):
        selection_frequency(chosen, 3)


def test_sample_training_patches_excludes_border_positives():
    height, width = 6, 6
    rows, cols = np.divmod(np.arange(36), width)
    border = (rows == 0) | (rows == height - 1) | (cols == 0) | (cols == width - 1)
    ranked = np.r_[np.flatnonzero(border)[:8], np.flatnonzero(~border)[:6]]  # the 8 most chosen are on the border
    chosen = np.tile(ranked, (10, 1))
    chosen[::2, 8:] = chosen[::2, :6]  # interior positions chosen in half the images only
    features = np.arange(10 * 36, dtype=np.float32).reshape(10, 36, 1)  # feature = (image, position) id
    x, y = sample_training_patches(features, chosen, (height, width), np.random.default_rng(0), per_image=4,
                                   quantile=0.4)
    assert x.shape == (80, 1) and x.dtype == np.float32 and y.sum() == 40
    pos = x[y, 0].astype(int) % 36
    neg = x[~y, 0].astype(int) % 36
    assert not border[pos].any()  # the top-ranked border positions were dropped
    assert set(pos) <= set(np.flatnonzero(~border)[:6].tolist())
    freq = selection_frequency(chosen, 36)
    assert freq[neg].max() == 0.0  # negatives come from the never-chosen positions
    # with only border candidates, the border is kept rather than leaving no positive
    x, y = sample_training_patches(features, np.tile(np.flatnonzero(border)[:14], (10, 1)), (height, width),
                                   np.random.default_rng(0), per_image=4, quantile=0.3)
    assert y.sum() == 40 and border[x[y, 0].astype(int) % 36].all()


def test_reference_foreground_max_dilate_power():
    maps = np.zeros((3, 5, 5), dtype=np.float16)
    maps[0, 1, 1] = 0.5
    maps[1, 3, 3] = 0.8
    maps[2] = 1.0  # not among the references
    refs = np.array([0, 1])
    np.testing.assert_array_equal(reference_foreground(maps, refs, power=0.0), np.ones((5, 5), np.float32))
    plain = reference_foreground(maps, refs, power=1.0, pool=1)
    np.testing.assert_allclose(plain, maps[:2].astype(np.float32).max(axis=0))
    pooled = reference_foreground(maps, refs, power=1.0, pool=3)
    expected = np.zeros((5, 5), np.float32)
    expected[0:3, 0:3] = 0.5
    expected[2:5, 2:5] = 0.8  # the max wins where the two 3x3 neighbourhoods overlap at (2, 2)
    np.testing.assert_allclose(pooled, expected, atol=1e-3)
    squared = reference_foreground(maps, refs, power=2.0)
    assert squared.dtype == np.float32 and squared.shape == (5, 5)
    np.testing.assert_allclose(squared, expected**2, atol=1e-3)
    assert 0.0 <= squared.min() and squared.max() <= 1.0
    np.testing.assert_array_equal(reference_foreground(maps, np.array([2]), power=3.0), np.ones((5, 5)))
    with pytest.raises(ValueError):
        reference_foreground(maps, refs, power=1.0, pool=2)
