"""The fit cache (experiment sweeps): a hit gives the same bundle as a fresh fit, and a changed setting that
the cached stage depends on is a miss, never a stale hit."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.core.bundle import load_bundle
from training_host.config import ProductConfig
from training_host.training.cache import FitCache, features_key, residuals_key
from training_host.training.fit import TrainingOptions, fit_product


@pytest.fixture(scope="module")
def tiny_config() -> ProductConfig:
    return ProductConfig.model_validate({
        "product": "tiny", "input_size": [64, 64], "posfar": {"d_l": 8, "k_references": 4},
        "threshold": {"holdout_fraction": 0.2}, "batch_size": 8,
        "swin": {"steps": 6, "synthetic_per_image": 1, "batch_size": 4, "checkpoint_every": 100, "warmup_steps": 2,
                 "train_window": 8, "window_stride": 8},
    })


def _fit(cfg: ProductConfig, data, out, cache):
    return fit_product(cfg, data, out, progress=False, options=TrainingOptions(cache_dir=cache))


def test_cache_hit_gives_the_same_bundle(tmp_path, demo_data, tiny_config):
    cache = tmp_path / "cache"
    first = _fit(tiny_config, demo_data, tmp_path / "a", cache)
    stored = sorted(p.relative_to(cache).parts[0] for p in cache.rglob("*.safetensors"))
    assert stored == ["features", "features", "residuals"]  # bank images, hold-out images, residual fields
    second = _fit(tiny_config, demo_data, tmp_path / "b", cache)
    a, b = load_bundle(tmp_path / "a"), load_bundle(tmp_path / "b")
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)
    assert first.threshold == second.threshold and first.n_holdout == second.n_holdout
    assert a.manifest.training.good_fields == b.manifest.training.good_fields
    assert len(list(cache.rglob("*.safetensors"))) == 3  # nothing new was computed


def test_keys_follow_the_settings_that_produced_the_stage(demo_data, tiny_config):
    images = sorted((demo_data / "train" / "good").iterdir())[:5]
    base = features_key(tiny_config, images)
    swin_only = tiny_config.model_copy(update={"swin": tiny_config.swin.model_copy(update={
        "steps": 99, "embed_dim": 64, "region_balance": 0.5, "members": 3, "defect_transplants": 5,
        "boundary_ignore": 1})})
    assert features_key(swin_only, images) == base
    assert residuals_key(swin_only, base) == residuals_key(tiny_config, base)  # Swin training only: same fields
    more_synthetic = tiny_config.model_copy(update={"swin": tiny_config.swin.model_copy(
        update={"synthetic_per_image": 2})})
    assert residuals_key(more_synthetic, base) != residuals_key(tiny_config, base)
    other_k = tiny_config.model_copy(update={"posfar": tiny_config.posfar.model_copy(update={"k_references": 6})})
    assert features_key(other_k, images) == base and residuals_key(other_k, base) != residuals_key(tiny_config, base)
    other_lambda = tiny_config.model_copy(update={"posfar": tiny_config.posfar.model_copy(update={"lambda_p": 0.5})})
    assert features_key(other_lambda, images) != base
    assert features_key(tiny_config.model_copy(update={"input_size": (96, 96)}), images) != base
    assert features_key(tiny_config, images[:4]) != base  # other images


def test_unreadable_entry_is_recomputed(tmp_path):
    cache = FitCache(tmp_path)
    cache.save("features", "k1", {"x": np.arange(4, dtype=np.float32)}, {"ok": [0]})
    arrays, meta = cache.load("features", "k1")
    np.testing.assert_array_equal(arrays["x"], np.arange(4))
    assert meta == {"ok": [0]}
    (tmp_path / "features" / "k1.safetensors").write_bytes(b"not a safetensors file")
    assert cache.load("features", "k1") is None and cache.load("features", "k2") is None
    assert cache.hits == 1 and cache.misses == 2
