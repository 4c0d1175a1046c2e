"""The one threshold estimate (fit, calibration) and the rates a line is judged by (eval, verify)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_runtime.core.thresholds import (
    detection_at_false_reject,
    estimate_threshold,
    rate_lower_bound,
    rate_upper_bound,
)


def test_clopper_pearson_bounds():
    # none of n seen: the upper bound has the closed form 1 - 0.05^(1/n)
    for n in (6, 76, 600):
        assert rate_upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-6)
    assert rate_upper_bound(0, 600) < 0.005 < rate_upper_bound(0, 76)  # why 76 held-out images show no 0.5 %
    assert rate_upper_bound(5, 5) == 1.0 and rate_upper_bound(0, 0) == 1.0
    assert rate_lower_bound(0, 10) == 0.0
    assert rate_lower_bound(3, 10) < 0.3 < rate_upper_bound(3, 10)
    # all of n seen: the lower bound is 0.05^(1/n)
    assert rate_lower_bound(10, 10) == pytest.approx(0.05 ** (1 / 10), rel=1e-6)


def test_estimate_threshold_quantile_margin_and_uncertainty():
    est = estimate_threshold(np.arange(100.0), target_false_reject=0.01, margin_factor=0.0)
    assert est.threshold == est.quantile_score == 99.0 and est.n_scores == 100 and est.max_score == 99.0
    assert est.n_above == 1 and est.frr_upper95 == pytest.approx(rate_upper_bound(1, 100))
    assert est.min_frames_for_target == 100 and est.enough_frames
    # the margin is a fraction of the spread (q99 - median), added on top of the quantile
    scores = np.linspace(0.0, 1.0, 201)
    est = estimate_threshold(scores, target_false_reject=0.005, margin_factor=0.1)
    spread = np.quantile(scores, 0.99) - np.median(scores)
    assert est.margin == pytest.approx(0.1 * spread) and est.threshold == pytest.approx(est.quantile_score + est.margin)
    assert est.n_above == 0 and est.frr_upper95 == pytest.approx(1 - 0.05 ** (1 / 201), rel=1e-6)
    # too few images to resolve the target: the highest score plus the margin, and it says so
    few = estimate_threshold([0.1, 0.2, 0.3], target_false_reject=0.005, margin_factor=0.0)
    assert few.threshold == 0.3 and not few.enough_frames and few.to_json()["enough_frames"] is False
    assert estimate_threshold([0.1, np.nan, 0.2], 0.5, 0.0).n_scores == 2  # NaN scores do not count
    with pytest.raises(ValueError, match="without held-out good scores"):
        estimate_threshold([])
    with pytest.raises(ValueError, match="target_false_reject"):
        estimate_threshold([1.0], target_false_reject=0.0)


def test_detection_at_false_reject_rates():
    good = np.arange(200.0)  # 0 .. 199
    bad = np.array([150.5, 197.5, 198.5, 199.0, 250.0])
    rows = {r["false_reject_rate"]: r for r in detection_at_false_reject(good, bad)}
    # 0.5 % of 200 = 1 good image may be rejected: the threshold sits just above the 2nd highest (198)
    r = rows[0.005]
    assert r["false_rejects"] == 1 and 198.0 < r["threshold"] <= 198.0 + 1e-9 and r["resolved"]
    assert r["detected"] == 3 and r["detection_rate"] == pytest.approx(3 / 5)  # 198.5, 199, 250
    assert rows[0.01]["false_rejects"] == 2 and rows[0.01]["detected"] == 4  # above 197: + 197.5
    assert rows[0.02]["false_rejects"] == 4 and rows[0.02]["detected"] == 4  # above 195
    # 50 good images cannot show 0.5 % or 1 %: no good image may be rejected, and it says so
    small = detection_at_false_reject(np.arange(50.0), np.array([49.0, 60.0]))
    assert [r["resolved"] for r in small] == [False, False, True]
    assert small[0]["false_rejects"] == 0 and small[0]["detected"] == 1
    assert all(math.isclose(r["false_rejects"] / r["n_good"], math.floor(r["false_reject_rate"] * 50) / 50)
               for r in small)
    assert detection_at_false_reject(good, np.array([]))[0]["detection_rate"] is None
    with pytest.raises(ValueError, match="good images"):
        detection_at_false_reject([], bad)
