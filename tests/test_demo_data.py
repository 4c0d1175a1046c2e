"""Tests for the offline demo dataset generator (training_host.data.demo_data)."""

from __future__ import annotations

import socket
from pathlib import Path

import cv2
import numpy as np
import pytest

from training_host.data import demo_data
from training_host.data.demo_data import DEFECTS, PRODUCTS, main, make_demo_dataset, make_sample

SIZE = 128
COUNTS = {"n_train": 4, "n_test_good": 2, "n_test_per_defect": 3}


def _build(root: Path, product: str, seed: int = 0, **kw) -> Path:
    args = {**COUNTS, "size": SIZE, **kw}
    return make_demo_dataset(root, product=product, seed=seed, **args)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    return {p: _build(tmp_path_factory.mktemp(p) / "ds", p) for p in PRODUCTS}


@pytest.fixture(params=PRODUCTS)
def dataset(request, datasets) -> tuple[str, Path]:
    return request.param, datasets[request.param]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _read_mask(path: Path) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert m is not None, path
    return m


def test_layout(dataset):
    _, root = dataset
    assert sorted(p.name for p in (root / "train").iterdir()) == ["good"]
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *DEFECTS])
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(DEFECTS)
    assert len(list((root / "train" / "good").glob("*.png"))) == COUNTS["n_train"]
    assert len(list((root / "test" / "good").glob("*.png"))) == COUNTS["n_test_good"]
    for d in DEFECTS:
        imgs = sorted((root / "test" / d).glob("*.png"))
        masks = sorted((root / "ground_truth" / d).glob("*.png"))
        assert len(imgs) == COUNTS["n_test_per_defect"]
        assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in imgs]


def test_images_and_masks(dataset):
    _, root = dataset
    for p in (root / "train" / "good").glob("*.png"):
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert not (root / "ground_truth" / "good").exists()  # good images have no mask
    for d in DEFECTS:
        for p in (root / "test" / d).glob("*.png"):
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            mask = _read_mask(root / "ground_truth" / d / f"{p.stem}_mask.png")
            assert mask.ndim == 2 and mask.dtype == np.uint8
            assert mask.shape == img.shape[:2]
            assert set(np.unique(mask).tolist()) == {0, 255}


def test_mask_area_is_sane(dataset):
    _, root = dataset
    areas = [np.count_nonzero(_read_mask(m)) / SIZE**2 for m in (root / "ground_truth").rglob("*_mask.png")]
    assert len(areas) == len(DEFECTS) * COUNTS["n_test_per_defect"]
    assert min(areas) >= 0.0005 and max(areas) <= 0.05, (min(areas), max(areas))
    assert 0.002 <= float(np.median(areas)) <= 0.025, np.median(areas)


def test_deterministic_for_seed(tmp_path):
    a = _files(_build(tmp_path / "a", "texture", seed=3))
    b = _files(_build(tmp_path / "b", "texture", seed=3))
    c = _files(_build(tmp_path / "c", "texture", seed=4))
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) == len(a)  # every image differs for another seed


def test_object_deterministic(tmp_path):
    kw = {"n_train": 1, "n_test_good": 1, "n_test_per_defect": 1}
    assert _files(_build(tmp_path / "a", "object", **kw)) == _files(_build(tmp_path / "b", "object", **kw))


def test_good_images_vary(dataset):
    _, root = dataset
    imgs = [cv2.imread(str(p)).astype(np.int16) for p in sorted((root / "train" / "good").glob("*.png"))]
    assert all(np.abs(imgs[0] - im).mean() > 1.0 for im in imgs[1:])


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_mask_marks_exactly_the_altered_pixels(product, defect):
    for i in range(3):
        s = make_sample(product, defect, np.random.default_rng([7, i]), SIZE)
        m = s.mask > 0
        assert m.any()
        assert np.array_equal(s.image[~m], s.clean[~m])  # nothing outside the mask changed
        changed = np.any(s.image != s.clean, axis=2)
        assert changed[m].mean() > 0.5  # most masked pixels visibly differ
        assert not np.any(m & ~s.foreground)  # defects only on the product


def test_good_sample_has_empty_mask():
    s = make_sample("object", "good", np.random.default_rng(0), SIZE)
    assert not s.mask.any() and np.array_equal(s.image, s.clean)
    frac = s.foreground.mean()
    assert 0.2 < frac < 0.5  # a clear object on a background


def test_object_defects_on_foreground_from_files(datasets):
    root = datasets["object"]
    k = np.ones((5, 5), np.uint8)
    for mpath in (root / "ground_truth").rglob("*_mask.png"):
        mask = _read_mask(mpath) > 0
        img = cv2.imread(str(root / "test" / mpath.parent.name / mpath.name.replace("_mask", "")), 0)
        # background is a plain dark grey; the part is bright.  Median + closing removes thin dark defects.
        fg = (cv2.medianBlur(img, 5) > 90).astype(np.uint8)
        fg = cv2.dilate(cv2.morphologyEx(fg, cv2.MORPH_CLOSE, k), np.ones((3, 3), np.uint8))
        assert 0.2 < fg.mean() < 0.5
        assert fg[mask].mean() >= 0.99, mpath


def test_sources_load_without_network(monkeypatch):
    def _no_net(*args, **kwargs):
        raise OSError("network disabled in test")

    monkeypatch.setattr(socket.socket, "connect", _no_net)
    monkeypatch.setattr(socket, "create_connection", _no_net)
    monkeypatch.setattr(socket, "getaddrinfo", _no_net)
    demo_data._bundled.cache_clear()
    names = {*demo_data._HOST.values(), *(n for v in demo_data._FOREIGN.values() for n in v)}
    for name in sorted(names):
        img = demo_data._bundled(name)
        assert img.ndim == 2 and img.shape[0] >= 128 and img.std() > 5, name


def test_rerun_replaces_and_refuses_foreign_dirs(tmp_path):
    root = _build(tmp_path / "ds", "texture", n_train=5)
    root = _build(root, "texture", n_train=2)
    assert len(list((root / "train" / "good").glob("*.png"))) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        _build(other, "texture")
    assert (other / "keep.txt").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path / "x", product="nope")
    with pytest.raises(ValueError):
        make_sample("texture", "dent", np.random.default_rng(0), SIZE)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["--out", str(out), "--product", "object", "--n-train", "2", "--n-test-good", "1",
               "--n-test-per-defect", "1", "--size", str(SIZE), "--seed", "5"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert "train/good=2" in line and "test/good=1" in line and "test/scratch=1" in line
    assert len(list(out.rglob("*.png"))) == 2 + 1 + 2 * len(DEFECTS)
