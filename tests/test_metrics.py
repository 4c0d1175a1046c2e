"""Tests for training_host.evaluation.metrics (AUROC, AP, PRO, evaluation summary and plots)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from training_host.evaluation.metrics import (
    average_precision,
    evaluate_maps,
    pr_curve,
    pro_auc,
    pro_curve,
    roc_auc,
    roc_curve,
    save_curve_plot,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _random_binary(seed: int, n: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Random labels and scores quantised to ``levels`` values (many ties)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = np.round(rng.random(n) * (levels - 1)) / (levels - 1) + 0.2 * labels
    labels[:2] = [True, False]
    return labels, scores


# --------------------------------------------------------------------------- AUROC / AP


@pytest.mark.parametrize("seed,n,levels", [(0, 50, 5), (1, 500, 11), (2, 3000, 101), (3, 2000, 2000)])
def test_roc_auc_and_ap_match_sklearn(seed: int, n: int, levels: int) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    labels, scores = _random_binary(seed, n, levels)
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12
    )
    # float32 scores and 0/1 integer labels give the same values
    s32 = scores.astype(np.float32)
    assert roc_auc(labels.astype(np.uint8), s32) == pytest.approx(skm.roc_auc_score(labels, s32), abs=1e-12)
    assert average_precision(labels.astype(int), s32) == pytest.approx(
        skm.average_precision_score(labels, s32), abs=1e-12
    )


def test_roc_curve_matches_sklearn() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    labels, scores = _random_binary(4, 400, 21)
    fpr, tpr = roc_curve(labels, scores, max_points=None)
    ref_fpr, ref_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)


def test_pixel_sized_input_matches_sklearn() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 64, 64), dtype=bool)
    masks[:2, 10:30, 20:40] = True
    maps = (rng.random(masks.shape) * 50).round().astype(np.float32) / 50 + 0.3 * masks
    assert roc_auc(masks, maps) == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert average_precision(masks, maps) == pytest.approx(
        skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12
    )


def test_perfect_and_reversed() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert roc_auc(labels, scores) == 1.0
    assert average_precision(labels, scores) == 1.0
    assert roc_auc(labels, -scores) == 0.0
    # all scores tied: AUROC 0.5, AP = prevalence
    assert roc_auc(labels, np.zeros(6)) == 0.5
    assert average_precision(labels, np.zeros(6)) == pytest.approx(0.5)


def test_hand_computed_auc_and_ap() -> None:
    # labels [1, 0, 1, 0], scores [.9, .8, .7, .1]; thresholds (P, R):
    # .9 -> (1, 1/2), .8 -> (1/2, 1/2), .7 -> (2/3, 1), .1 -> (1/2, 1)
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6; AUROC: 3 of 4 (pos, neg) pairs ordered -> 3/4
    labels = np.array([1, 0, 1, 0])
    assert average_precision(labels, np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)
    assert roc_auc(labels, np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(3 / 4)
    # with a tie at .8 between a positive and a negative: thresholds .8 -> (1/2, 1/2), .5 -> (2/3, 1)
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12; AUROC = (0.5 + 1 + 0 + 1) / 4 = 0.625
    tied = np.array([0.8, 0.8, 0.5, 0.1])
    assert average_precision(labels, tied) == pytest.approx(7 / 12)
    assert roc_auc(labels, tied) == pytest.approx(0.625)


def test_curves_shape_and_subsampling() -> None:
    labels, scores = _random_binary(6, 20000, 100000)
    fpr, tpr = roc_curve(labels, scores)
    assert 2 <= fpr.size <= 2000 and fpr.shape == tpr.shape
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    precision, recall = pr_curve(labels, scores)
    assert precision.size <= 2000 and precision.shape == recall.shape
    assert (precision[0], recall[0], recall[-1]) == (1.0, 0.0, 1.0)
    assert precision[-1] == pytest.approx(labels.mean())
    assert np.all(np.diff(recall) >= 0)


def test_pr_curve_hand_example() -> None:
    precision, recall = pr_curve(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    np.testing.assert_allclose(precision, [1, 1, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(recall, [0, 0.5, 0.5, 1, 1])


def test_binary_metric_errors() -> None:
    with pytest.raises(ValueError, match="one class"):
        roc_auc(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="one class"):
        roc_auc(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match="positive"):
        average_precision(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match="0/1"):
        roc_auc(np.array([0, 1, 2]), np.arange(3.0))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([0, 1, 1]), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="differ in size"):
        roc_auc(np.array([0, 1, 1]), np.arange(4.0))
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.zeros(3), np.arange(3.0))


# --------------------------------------------------------------------------- PRO


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """One 3x5 image: region A (1 px) and region B (2x2 px), 10 negative pixels.

    A scores 1.0; B's top row .9, bottom row .3; negatives: one at .9, one at .5, eight at 0.
    Thresholds -> (FPR, PRO): 1.0 -> (0, 1/2), .9 -> (.1, 3/4), .5 -> (.2, 3/4), .3 -> (.2, 1), 0 -> (1, 1).
    """
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, 0] = True
    mask[0:2, 3:5] = True
    amap = np.zeros((3, 5), dtype=np.float32)
    amap[0, 0] = 1.0
    amap[0, 3:5] = 0.9
    amap[1, 3:5] = 0.3
    amap[0, 1] = 0.9
    amap[0, 2] = 0.5
    return mask[None], amap[None]


def test_pro_curve_hand_computed() -> None:
    masks, maps = _two_region_case()
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.2, 0.2, 1.0])
    # region A fully detected at the top threshold, B not at all -> PRO = 1/2
    np.testing.assert_allclose(pro, [0, 0.5, 0.75, 0.75, 1.0, 1.0])


def test_pro_auc_hand_computed() -> None:
    masks, maps = _two_region_case()
    # up to FPR .3: (0.5 + 0.75) / 2 * 0.1 + 0.75 * 0.1 + 1.0 * 0.1 = 0.2375 -> / 0.3 = 19 / 24
    assert pro_auc(masks, maps) == pytest.approx(19 / 24)
    # whole curve: 0.0625 + 0.075 + 0.8 = 0.9375
    assert pro_auc(masks, maps, max_fpr=1.0) == pytest.approx(0.9375)
    # up to FPR .15: 0.0625 + 0.75 * 0.05 = 0.1 -> / 0.15 = 2 / 3
    assert pro_auc(masks, maps, max_fpr=0.15) == pytest.approx(2 / 3)


def test_pro_auc_interpolates_at_max_fpr() -> None:
    # Everything tied: curve (0, 0) -> (1, 1); area under y = x up to .3 is .045 -> .15.
    mask = np.zeros((1, 1, 11), dtype=bool)
    mask[0, 0, 0] = True
    assert pro_auc(mask, np.zeros(mask.shape)) == pytest.approx(0.15)
    assert pro_auc(mask, np.zeros(mask.shape), max_fpr=1.0) == pytest.approx(0.5)
    # Region of 2 px scored (1, .5); 10 negatives: 4 at .5, 6 at 0.
    # Curve (0, 0), (0, .5), (.4, 1), (1, 1); PRO(.3) = .5 + .5 * .3 / .4 = .875 (interpolated)
    # area = (.5 + .875) / 2 * .3 = .20625 -> / .3 = .6875
    mask = np.zeros((1, 2, 6), dtype=bool)
    mask[0, 0, :2] = True
    amap = np.zeros(mask.shape)
    amap[0, 0, :2] = [1.0, 0.5]
    amap[0, 1, :4] = 0.5
    assert pro_auc(mask, amap) == pytest.approx(0.6875)


def test_pro_perfect_map_and_connectivity() -> None:
    rng = np.random.default_rng(7)
    masks = rng.random((3, 16, 16)) > 0.85
    masks[2] = False  # a defect-free image only adds negatives
    assert pro_auc(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert pro_auc(masks, masks.astype(np.float32), max_fpr=0.01) == pytest.approx(1.0)
    # Diagonal neighbours form one 8-connected region: {(0,0), (1,1)} and {(3,3)}.
    # Detecting only (3,3) at the top threshold gives PRO 1/2 (it would be 1/3 with 4-connectivity).
    mask = np.zeros((1, 5, 5), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 3, 3] = True
    amap = np.zeros((1, 5, 5))
    amap[0, 3, 3] = 1.0
    _, pro = pro_curve(mask, amap)
    assert pro[1] == pytest.approx(0.5)


def _reference_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slow reference: every distinct score as threshold, regions from scipy.ndimage.label per image."""
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == k] for k in range(1, n + 1)]
    negatives = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(negatives >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return np.array(fprs), np.array(pros)


def _reference_auc(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    area = 0.0
    for i in range(1, fpr.size):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(rng.random((4, 12, 12)) > 0.93, iterations=1)
    masks[0] = False  # defect-free image
    levels = [8, 40, 0][seed]
    maps = rng.random(masks.shape) + 0.4 * masks
    if levels:
        maps = np.round(maps * levels) / levels  # many ties
    maps = maps.astype(np.float32)
    fpr, pro = pro_curve(masks, maps)
    ref_fpr, ref_pro = _reference_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    for max_fpr in (0.05, 0.3, 1.0):
        assert pro_auc(masks, maps, max_fpr) == pytest.approx(
            _reference_auc(ref_fpr, ref_pro, max_fpr), abs=1e-12
        )


def test_pro_errors() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="no defect region"):
        pro_auc(np.zeros((2, 4, 4), dtype=bool), maps)
    with pytest.raises(ValueError, match="no negative"):
        pro_auc(np.ones((2, 4, 4), dtype=bool), maps)
    with pytest.raises(ValueError, match="N, H, W"):
        pro_auc(np.ones((2, 4, 4), dtype=bool), maps[:, :3])
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1, 1] = True
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_fpr"):
            pro_auc(masks, maps, max_fpr=bad)


# --------------------------------------------------------------------------- evaluate_maps / plot


def _evaluation_set() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(11)
    types = ["good", "good", "scratch", "scratch", "stain", "good", "hole"]
    masks = np.zeros((7, 16, 16), dtype=bool)
    masks[2, 2:6, 3:9] = True
    masks[3, 10:14, 10:12] = True
    masks[3, 1, 1] = True
    masks[6, 5:9, 5:9] = True  # index 4 ("stain") is defective with an empty mask
    maps = (rng.random(masks.shape) + 0.7 * masks).astype(np.float32)
    labels = np.array([t != "good" for t in types])
    scores = maps.reshape(7, -1).max(axis=1)
    return labels, scores, masks, maps, types


def test_evaluate_maps_structure_and_per_defect() -> None:
    labels, scores, masks, maps, types = _evaluation_set()
    result = evaluate_maps(labels, scores, masks, maps, types)
    metric_keys = {"image_auroc", "pixel_auroc", "pro", "pixel_ap"}
    assert set(result) == metric_keys | {"n_images", "n_defective", "per_defect"}
    assert (result["n_images"], result["n_defective"]) == (7, 4)
    assert result["image_auroc"] == pytest.approx(roc_auc(labels, scores))
    assert result["pixel_auroc"] == pytest.approx(roc_auc(masks, maps))
    assert result["pixel_ap"] == pytest.approx(average_precision(masks, maps))
    assert result["pro"] == pytest.approx(pro_auc(masks, maps))

    per = result["per_defect"]
    assert list(per) == ["scratch", "stain", "hole"]
    for entry in per.values():
        assert set(entry) == metric_keys | {"n_images", "n_defective"}
    sel = [0, 1, 2, 3, 5]
    scratch = per["scratch"]
    assert (scratch["n_images"], scratch["n_defective"]) == (5, 2)
    assert scratch["image_auroc"] == pytest.approx(roc_auc(labels[sel], scores[sel]))
    assert scratch["pixel_auroc"] == pytest.approx(roc_auc(masks[sel], maps[sel]))
    assert scratch["pixel_ap"] == pytest.approx(average_precision(masks[sel], maps[sel]))
    assert scratch["pro"] == pytest.approx(pro_auc(masks[sel], maps[sel]))

    stain = per["stain"]  # empty mask: pixel metrics undefined, image AUROC defined
    assert (stain["n_images"], stain["n_defective"]) == (4, 1)
    assert stain["pixel_auroc"] is None and stain["pixel_ap"] is None and stain["pro"] is None
    assert isinstance(stain["image_auroc"], float)
    assert per["hole"]["pro"] is not None

    assert evaluate_maps(labels, scores, masks, maps)["per_defect"] == {}
    # only good images: everything undefined, nothing raised
    good = evaluate_maps(labels[:2], scores[:2], masks[:2], maps[:2], types[:2])
    assert good["image_auroc"] is None and good["pro"] is None and good["per_defect"] == {}
    with pytest.raises(ValueError, match="number of images"):
        evaluate_maps(labels[:3], scores, masks, maps)
    with pytest.raises(ValueError, match="defect_types"):
        evaluate_maps(labels, scores, masks, maps, types[:3])


def test_save_curve_plot_writes_png(tmp_path) -> None:
    labels, scores, masks, maps = _evaluation_set()[:4]
    path = tmp_path / "plots" / "curves.png"
    save_curve_plot(labels, scores, masks, maps, path, title="unit test")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    # degenerate input (no defects at all) still produces a plot
    empty = tmp_path / "empty.png"
    save_curve_plot(labels[:2], scores[:2], masks[:2], maps[:2], str(empty))
    assert empty.read_bytes()[:8] == PNG_SIGNATURE
