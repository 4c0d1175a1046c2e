"""Shared fixtures: a small demo product and a bundle fitted on it with the real backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.mqtt_fixtures",  # broker, make_broker, subscriber: a real Mosquitto per test
                  "tests.browser_fixtures",  # browser, screenshot: headless Chromium through Playwright
                  "tests.registry_fixtures"]  # registry, make_relay: a real docker-registry (OCI) per test

# Property-based tests everywhere: no deadline and no "too slow" health checks, which a busy 2-core CI machine
# trips at random; make fuzz (HYPOTHESIS_PROFILE=fuzz) runs 1300 cases per target, and a case over 5 s is a hang.
_HYPOTHESIS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                           HealthCheck.data_too_large]}
settings.register_profile("default", max_examples=40, **_HYPOTHESIS)
settings.register_profile("fuzz", max_examples=1300, **{**_HYPOTHESIS, "deadline": 5000})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MTD = SHARED_DATA / "mtd"


def require_mtd() -> Path:
    if not (MTD / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {MTD} (../shared/data is absent in a fresh clone)")
    return MTD


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from training_host.data.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    return make_demo_dataset(root, product="texture", n_train=30, n_test_good=6, n_test_per_defect=3, seed=3)


@pytest.fixture(scope="session")
def small_config():
    from training_host.config import ProductConfig

    return ProductConfig.model_validate({
        "product": "test-product", "input_size": [128, 128], "posfar": {"d_l": 16, "k_references": 8},
        "threshold": {"holdout_fraction": 0.2}, "batch_size": 8,
        "swin": {"steps": 120, "finetune_steps": 40, "synthetic_per_image": 1, "batch_size": 8,
                 "checkpoint_every": 50, "warmup_steps": 10},
    })


@pytest.fixture(scope="session")
def fitted(tmp_path_factory, demo_data, small_config):
    """(bundle path, fit summary) for the small demo product, with the residual Swin (unsupervised)."""
    from training_host.training.fit import fit_product

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    summary = fit_product(small_config, demo_data, out, progress=False)
    return out, summary


@pytest.fixture(scope="session")
def fitted_slice(tmp_path_factory, demo_data, small_config):
    """(bundle path, fit summary) of a distance-only bundle (swin.enabled: false), as the slice made them."""
    from training_host.training.fit import fit_product

    cfg = small_config.model_copy(update={"swin": small_config.swin.model_copy(update={"enabled": False})})
    out = tmp_path_factory.mktemp("slice") / "bundle"
    summary = fit_product(cfg, demo_data, out, progress=False)
    return out, summary
