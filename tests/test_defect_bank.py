"""The defect bank's factor on the map's distance (``edge_runtime.core.defect_bank``)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.core.defect_bank import DefectBank


def _bank(boost: float = 1.0, cap: float = 2.0) -> DefectBank:
    return DefectBank(np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]], np.float32), boost, cap)


def test_nearest_distance_is_the_euclidean_distance_to_the_closest_defect_block():
    pcf = np.array([[10.0, 0.0, 0.0], [0.0, 7.0, 4.0], [0.0, 0.0, 0.0]], np.float32)
    assert np.allclose(_bank().nearest_distance(pcf), [0.0, 5.0, 10.0], atol=1e-3)
    many = np.random.default_rng(0).normal(size=(700, 3)).astype(np.float32)  # more than one chunk of queries
    brute = np.linalg.norm(many[:, None, :] - _bank().features[None], axis=2).min(1)
    assert np.allclose(_bank().nearest_distance(many), brute, atol=1e-3)


def test_only_blocks_nearer_a_defect_than_a_normal_patch_are_raised_and_only_up_to_the_cap():
    pcf = np.array([[0.0, 7.0, 4.0]] * 4, np.float32)  # 5 from the nearest defect block
    distance = np.array([2.0, 5.0, 7.5, 50.0], np.float32)  # to the nearest normal patch
    assert np.allclose(_bank().factor(pcf, distance), [1.0, 1.0, 1.5, 2.0])
    assert np.allclose(_bank(boost=0.5, cap=3.0).factor(pcf, distance), [1.0, 1.0, 1.25, 2.0])
    # a patch that is a defect block itself (distance 0 to it) is raised to the cap, not divided by zero
    assert _bank().factor(np.array([[10.0, 0.0, 0.0]], np.float32), np.array([1.0], np.float32))[0] == 2.0


@pytest.mark.parametrize(("features", "boost", "cap", "message"), [
    (np.zeros((0, 3)), 1.0, 2.0, "needs \\(n >= 1, d_f\\) features"),
    (np.array([[np.nan, 0.0]]), 1.0, 2.0, "must be finite"),
    (np.ones((2, 3)), 0.0, 2.0, "boost > 0 and cap > 1"),
    (np.ones((2, 3)), 1.0, 1.0, "boost > 0 and cap > 1"),
])
def test_a_bad_bank_is_refused_naming_what_is_wrong(features, boost, cap, message):
    with pytest.raises(ValueError, match=message):
        DefectBank(features, boost, cap)


def test_features_of_another_width_are_refused():
    with pytest.raises(ValueError, match="patch features are \\[4, 5\\], the defect bank has 3 channels"):
        _bank().factor(np.zeros((4, 5), np.float32), np.ones(4, np.float32))
