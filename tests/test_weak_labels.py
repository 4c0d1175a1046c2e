"""Weak labels: file validation, COCO / LabelMe import, block labels and labels derived from masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from training_host.labels.weak_labels import (
    LabelError,
    LabelSet,
    WeakLabel,
    block_labels_from_weak,
    box_blocks,
    import_coco,
    import_labelme,
    load_labels,
    weak_bags,
    weak_from_mask,
)

KEY = "test/crack/000.png"


def _write(path: Path, doc: object) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _image(root: Path, key: str = KEY, hw: tuple[int, int] = (60, 80)) -> Path:
    p = root / key
    p.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(p), np.zeros(hw, np.uint8))
    return p


def _refused(tmp_path: Path, images: object, **kw) -> str:
    path = _write(tmp_path / "labels.json", {"version": 1, "images": images})
    with pytest.raises(LabelError) as e:
        load_labels(path, **kw)
    return str(e.value)


# ----------------------------------------------------------------------------------------------- file format
def test_round_trip_and_counts(tmp_path):
    blocks = np.array([[0, 1], [-1, 0]], np.int8)
    ls = LabelSet(images={
        "a.png": WeakLabel(boxes=((1, 2, 3, 4),)),
        "b.png": WeakLabel(rotated_boxes=((10, 10, 4, 2, 30),), boxes=((8, 8, 5, 5),)),
        "c.png": WeakLabel(tag="bad"),
        "d.png": WeakLabel(blocks=blocks),
        "e.png": WeakLabel(boxes=((0, 0, 1, 1),), tag="bad"),
    }, warnings=[])
    path = tmp_path / "sub" / "labels.json"
    ls.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["labels.json"]  # no temporary file left behind
    back = load_labels(path)
    assert back.images == ls.images
    assert back.warnings == []
    assert back.counts() == {"blocks": 1, "rotated_boxes": 1, "boxes": 2, "tag": 1, "total": 5}
    assert back.images["d.png"].blocks.dtype == np.int8
    assert back.images["b.png"].kind == "rotated_boxes"


@pytest.mark.parametrize(("images", "needles"), [
    ({KEY: {"boxes": [[1, 2, -3, 4]]}}, ["boxes[0]", "width must be > 0, got -3"]),
    ({KEY: {"boxes": [[1, 2, 3, 4], [1, 2, 3]]}}, ["boxes[1]", "expected 4 numbers"]),
    ({KEY: {"tag": 123}}, ["tag", '"bad"', "123"]),
    ({KEY: {"boxes": [[1, "2", 3, 4]]}}, ["boxes[0]", "expected 4 numbers"]),
    ({KEY: {"boxes": [[1, 2, float("nan"), 4]]}}, ["boxes[0]", "w must be finite"]),
    ({KEY: {"rotated_boxes": [[1, 2, 3, 0, 10]]}}, ["rotated_boxes[0]", "height must be > 0"]),
    ({KEY: {}}, ["no label"]),
    ({KEY: {"boxes": []}}, ["no label"]),
    ({KEY: {"tag": "bad", "mask": "x.png"}}, ["unknown keys", "mask"]),
    ({KEY: {"blocks": {"grid": [2, 2], "labels": [[0, 1], [1]]}}}, ["blocks.labels[1]", "expected 2 values"]),
    ({KEY: {"blocks": {"grid": [2, 2], "labels": [[0, 1]]}}}, ["blocks.labels", "expected 2 rows"]),
    ({KEY: {"blocks": {"grid": [1, 2], "labels": [[0, 2]]}}}, ["blocks.labels[0]", "-1, 0 or 1"]),
    ({KEY: "bad"}, ["expected an object"]),
])
def test_bad_entries_are_refused_naming_image_and_field(tmp_path, images, needles):
    msg = _refused(tmp_path, images)
    assert msg.startswith("labels.json: ")
    assert f"image '{KEY}'" in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_exact_message(tmp_path):
    msg = _refused(tmp_path, {KEY: {"boxes": [[1, 2, 3, 4], [5, 5, -3, 2]]}})
    assert msg == "labels.json: image 'test/crack/000.png', boxes[1]: width must be > 0, got -3"


def test_bad_files_are_refused(tmp_path):
    p = _write(tmp_path / "labels.json", "{not json")
    with pytest.raises(LabelError, match="labels.json: cannot read"):
        load_labels(p)
    _write(p, [1, 2])
    with pytest.raises(LabelError, match="expected a JSON object"):
        load_labels(p)
    _write(p, {"version": 2, "images": {KEY: {"tag": "bad"}}})
    with pytest.raises(LabelError, match="version: expected 1, got 2"):
        load_labels(p)
    _write(p, {"version": 1, "images": {}, "extra": 1})
    with pytest.raises(LabelError, match="unknown top-level keys"):
        load_labels(p)
    _write(p, '{"version": 1, "images": {"a.png": {"tag": "bad"}, "a.png": {"tag": "bad"}}}')
    with pytest.raises(LabelError, match="duplicate key"):
        load_labels(p)


def test_unknown_image_under_root(tmp_path):
    root = tmp_path / "data"
    _image(root)
    msg = _refused(tmp_path, {KEY: {"tag": "bad"}, "test/crack/001.png": {"tag": "bad"}}, root=root)
    assert "image 'test/crack/001.png': unknown image" in msg
    assert f"image '{KEY}'" not in msg


def test_all_problems_reported_together(tmp_path):
    images = {f"img{i:02d}.png": {"boxes": [[0, 0, -1, 1]]} for i in range(25)}
    images["tag.png"] = {"tag": 1}
    path = _write(tmp_path / "labels.json", {"version": 3, "images": images})
    with pytest.raises(LabelError) as e:
        load_labels(path)
    assert len(e.value.problems) == 27
    msg = str(e.value)
    assert msg.count("; ") == 20  # 20 shown + the "and 7 more" tail
    assert "version: expected 1" in msg and "and 7 more" in msg


# ----------------------------------------------------------------------------------------------- image bounds
def test_clipping_warns_and_outside_is_an_error(tmp_path):
    root = tmp_path / "data"
    _image(root, hw=(60, 80))
    doc = {"version": 1, "images": {KEY: {"boxes": [[-5, 50, 20, 20], [1, 1, 2, 2]]}}}
    path = _write(tmp_path / "labels.json", doc)
    ls = load_labels(path, root=root)
    assert ls.images[KEY].boxes == ((0.0, 50.0, 15.0, 10.0), (1.0, 1.0, 2.0, 2.0))
    assert len(ls.warnings) == 1 and f"image '{KEY}'" in ls.warnings[0] and "boxes[0]" in ls.warnings[0]
    # same via explicit sizes, no files needed
    ls2 = load_labels(path, image_sizes={KEY: (60, 80)})
    assert ls2.images == ls.images
    msg = _refused(tmp_path, {KEY: {"boxes": [[100, 10, 5, 5]]}}, image_sizes={KEY: (60, 80)})
    assert "boxes[0]" in msg and "entirely outside" in msg
    msg = _refused(tmp_path, {KEY: {"rotated_boxes": [[40, 70, 10, 5, 30]]}}, root=root)
    assert "rotated_boxes[0]" in msg and "centre" in msg
    ok = _write(tmp_path / "ok.json", {"version": 1, "images": {KEY: {"rotated_boxes": [[78, 58, 30, 30, 45]]}}})
    assert load_labels(ok, root=root).warnings == []  # rotated boxes are not clipped


# ----------------------------------------------------------------------------------------------- importers
def test_import_coco(tmp_path):
    poly = [10, 10, 40, 30, 30, 45, 0, 25]
    doc = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "c.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4]},
            {"id": 2, "image_id": 2, "bbox": [0, 10, 40, 35], "segmentation": [poly]},
        ],
    }
    path = _write(tmp_path / "coco.json", doc)
    ls = import_coco(path)
    assert set(ls.images) == {"a.png", "b.png"}  # c.png has no annotation: a good image
    assert ls.images["a.png"] == WeakLabel(boxes=((1, 2, 3, 4),))
    b = ls.images["b.png"]
    (cx, cy), (w, h), a = cv2.minAreaRect(np.array(poly, np.float32).reshape(-1, 2))
    np.testing.assert_allclose(b.rotated_boxes[0], (cx, cy, w, h, a), rtol=1e-6)
    assert b.boxes == ((0.0, 10.0, 40.0, 35.0),)
    only_bbox = import_coco(path, use_segmentation=False)
    assert only_bbox.images["b.png"] == WeakLabel(boxes=((0, 10, 40, 35),))
    doc["annotations"].append({"image_id": 9, "bbox": [0, 0, 1, 1]})
    with pytest.raises(LabelError, match="image_id 9"):
        import_coco(_write(path, doc))


def test_import_labelme(tmp_path):
    root = tmp_path / "data"
    (root / "test" / "crack").mkdir(parents=True)
    poly = [[10, 10], [40, 30], [30, 45], [0, 25]]
    doc = {"imagePath": "000.png", "shapes": [
        {"shape_type": "rectangle", "points": [[30, 20], [10, 5]]},
        {"shape_type": "polygon", "points": poly},
        {"shape_type": "circle", "points": [[5, 5], [8, 8]]},
    ]}
    p = _write(root / "test" / "crack" / "000.json", doc)
    ls = import_labelme([p], root=root)
    lab = ls.images[KEY]
    assert lab.boxes == ((10.0, 5.0, 20.0, 15.0), (0.0, 10.0, 40.0, 35.0))
    (cx, cy), (w, h), a = cv2.minAreaRect(np.array(poly, np.float32))
    np.testing.assert_allclose(lab.rotated_boxes[0], (cx, cy, w, h, a), rtol=1e-6)
    assert len(ls.warnings) == 1 and "circle" in ls.warnings[0] and "shapes[2]" in ls.warnings[0]
    assert set(import_labelme([p]).images) == {"000.png"}


# ----------------------------------------------------------------------------------------------- block labels
def test_blocks_box_covering_exact_blocks():
    lab = WeakLabel(boxes=((32, 16, 32, 32),))
    out = block_labels_from_weak(lab, (64, 128), (4, 8))  # 16 x 16 px blocks
    expect = np.zeros((4, 8), np.int8)
    expect[1:3, 2:4] = -1
    np.testing.assert_array_equal(out, expect)
    assert out.dtype == np.int8


def test_blocks_overlap_threshold():
    lab = WeakLabel(boxes=((0, 0, 4, 10),))  # 40 % of the 10 x 10 block (0, 0)
    assert block_labels_from_weak(lab, (20, 20), (2, 2), overlap=0.5)[0, 0] == 0
    out = block_labels_from_weak(lab, (20, 20), (2, 2), overlap=0.3)
    np.testing.assert_array_equal(out, [[-1, 0], [0, 0]])


def test_blocks_rotated_45_degrees():
    # a diamond centred at (32, 32) with half-diagonal ~22.6 px covers the 4 central 16 px blocks well,
    # touches only the corners of the 12 outer ones
    lab = WeakLabel(rotated_boxes=((32, 32, 32, 32, 45),))
    out = block_labels_from_weak(lab, (64, 64), (4, 4), overlap=0.5)
    expect = np.zeros((4, 4), np.int8)
    expect[1:3, 1:3] = -1
    np.testing.assert_array_equal(out, expect)
    # the same square unrotated covers exactly those blocks too; the diamond differs at lower overlap
    low = block_labels_from_weak(lab, (64, 64), (4, 4), overlap=0.05)
    assert low[0, 1] == -1 and low[0, 0] == 0
    # by default every block the box touches is unknown, never normal: the defect may lie in a corner
    touched = block_labels_from_weak(lab, (64, 64), (4, 4))
    assert (touched[[0, 1, 2, 3], [1, 0, 3, 2]] == -1).all() and touched[0, 0] == 0 and touched[3, 3] == 0


def test_blocks_tag_and_explicit():
    assert (block_labels_from_weak(WeakLabel(tag="bad"), (30, 30), (3, 3)) == -1).all()
    blocks = np.array([[1, 0, -1], [0, 0, 1]], np.int8)
    out = block_labels_from_weak(WeakLabel(blocks=blocks, tag="bad"), (20, 30), (2, 3))
    np.testing.assert_array_equal(out, blocks)
    with pytest.raises(LabelError, match="does not match"):
        block_labels_from_weak(WeakLabel(blocks=blocks), (20, 30), (3, 2))


def test_blocks_non_divisible_image():
    # 50 x 70 px into 3 x 4 blocks: edges at 0, 16.7, 33.3, 50 (rows) and 0, 17.5, 35, 52.5, 70 (cols)
    lab = WeakLabel(boxes=((52.5, 33.3, 17.5, 16.7),))
    out = block_labels_from_weak(lab, (50, 70), (3, 4))
    expect = np.zeros((3, 4), np.int8)
    expect[2, 3] = -1
    np.testing.assert_array_equal(out, expect)
    full = block_labels_from_weak(WeakLabel(boxes=((-10, -10, 100, 100),)), (50, 70), (3, 4))
    assert (full == -1).all()


def test_box_blocks_each_box_keeps_its_defect_even_when_thin_or_small():
    # 64 x 128 px into 4 x 8 blocks of 16 x 16 px
    big = (32, 16, 32, 32)  # exactly blocks (1..2, 2..3)
    hairline = (94, 0, 4, 36)  # 4 px wide across the column edge at x = 96: 2 px of each of two columns
    pit = (5, 53, 6, 6)  # 36 px inside block (3, 0): 14 % of it
    out = box_blocks(WeakLabel(boxes=(big, hairline, pit)), (64, 128), (4, 8))
    assert len(out) == 3 and all(b.shape == (4, 8) and b.dtype == bool for b in out)
    expect = np.zeros((4, 8), bool)
    expect[1:3, 2:4] = True
    np.testing.assert_array_equal(out[0], expect)
    # the hairline covers no block by more than half: it keeps the blocks it covers at least half as much as its best
    # (2 / 16 of each block of rows 0 and 1, in both columns), not row 2's (2 / 16 x 4 / 16)
    expect = np.zeros((4, 8), bool)
    expect[0:2, 5:7] = True
    np.testing.assert_array_equal(out[1], expect)
    assert out[2].sum() == 1 and out[2][3, 0]
    # a rotated box is its own box too; one outside the image gives nothing
    rotated = box_blocks(WeakLabel(rotated_boxes=((48, 32, 32, 32, 0),), boxes=((200, 200, 5, 5),)), (64, 128), (4, 8))
    assert len(rotated) == 1 and rotated[0].sum() == 4 and rotated[0][1:3, 2:4].all()
    with pytest.raises(ValueError, match="grid"):
        box_blocks(WeakLabel(boxes=(big,)), (64, 128), (0, 8))


# ----------------------------------------------------------------------------------------------- bags
def _bag_sets(bags: np.ndarray) -> set[tuple[int, frozenset]]:
    return {(int(b.max()), frozenset(map(tuple, np.argwhere(b > 0).tolist()))) for b in bags}


def test_bags_of_an_axis_box_are_its_block_rows_and_columns():
    """A box over blocks rows 1-2, columns 2-4 of a 16 px grid: one bag per row and per column it crosses."""
    lab = WeakLabel(boxes=((32, 16, 48, 32),))
    bags = weak_bags(lab, (64, 128), (4, 8))
    assert bags.dtype == np.uint8 and bags.shape[1:] == (4, 8)
    rows = {(1, frozenset((r, c) for c in range(2, 5))) for r in (1, 2)}
    cols = {(1, frozenset((r, c) for r in (1, 2))) for c in range(2, 5)}
    assert _bag_sets(bags) == rows | cols
    whole = weak_bags(lab, (64, 128), (4, 8), box_lines=False)
    assert _bag_sets(whole) == {(1, frozenset((r, c) for r in (1, 2) for c in range(2, 5)))}


def test_every_bag_of_a_tight_box_holds_a_block_of_its_defect():
    """The box-tightness prior: for tight boxes (axis and rotated) around random thin curved defects, every line
    bag crosses at least one block the defect touches."""
    rng = np.random.default_rng(0)
    H, W, grid = 96, 128, (12, 16)
    for _ in range(20):
        mask = np.zeros((H, W), np.uint8)
        pts = np.cumsum(rng.normal(0, 4, (8, 2)), 0) + rng.uniform([30, 30], [W - 30, H - 30])
        cv2.polylines(mask, [pts.astype(np.int32)], False, 1, thickness=2)
        touched = cv2.resize(mask.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA) > 0
        for kind in ("boxes", "rotated_boxes"):
            label = weak_from_mask(mask, kind)
            bags = weak_bags(label, (H, W), grid)
            assert len(bags) >= 2
            for bag in bags:
                assert (touched & (bag > 0)).any(), kind


def test_bags_of_a_tag_and_of_explicit_blocks():
    tag = weak_bags(WeakLabel(tag="bad"), (30, 30), (3, 3), tag_top_k=2)
    assert tag.shape == (1, 3, 3) and (tag == 2).all()
    blocks = np.array([[-1, 0, 0], [0, 0, -1], [1, 0, -1]], np.int8)
    out = weak_bags(WeakLabel(blocks=blocks), (30, 30), (3, 3))
    assert _bag_sets(out) == {(1, frozenset({(0, 0)})), (1, frozenset({(1, 2), (2, 2)}))}
    assert weak_bags(WeakLabel(blocks=np.zeros((3, 3), np.int8) + 1), (30, 30), (3, 3)).shape == (0, 3, 3)
    with pytest.raises(ValueError, match="tag_top_k"):
        weak_bags(WeakLabel(tag="bad"), (30, 30), (3, 3), tag_top_k=0)


# ----------------------------------------------------------------------------------------------- from masks
def test_weak_from_mask_boxes():
    m = np.zeros((40, 60), np.uint8)
    m[5:10, 3:13] = 1
    m[20:35, 40:45] = 255
    lab = weak_from_mask(m, "boxes")
    assert sorted(lab.boxes) == [(3.0, 5.0, 10.0, 5.0), (40.0, 20.0, 5.0, 15.0)]
    assert lab.kind == "boxes"
    assert weak_from_mask(m, "tag") == WeakLabel(tag="bad")
    with pytest.raises(ValueError, match="blocks"):
        weak_from_mask(m, "blocks")


def test_weak_from_mask_rotated_diagonal_bar():
    m = np.zeros((100, 100), np.uint8)
    cv2.line(m, (20, 20), (80, 80), 1, thickness=5)
    (cx, cy, w, h, a), = weak_from_mask(m, "rotated_boxes").rotated_boxes
    length = 60 * np.sqrt(2) + 5  # centre line plus the round caps of a 5 px thick line
    assert abs(cx - 50.5) < 1.5 and abs(cy - 50.5) < 1.5
    assert min(abs(a % 90 - 45), 90 - abs(a % 90 - 45)) < 3
    assert abs(max(w, h) - length) < 3 and 4 < min(w, h) < 9


def test_weak_from_mask_jitter_and_empty():
    m = np.zeros((50, 50), np.uint8)
    m[10:20, 10:30] = 1
    base = weak_from_mask(m, "boxes").boxes[0]
    a = weak_from_mask(m, "boxes", np.random.default_rng(0), jitter_px=3.0).boxes[0]
    b = weak_from_mask(m, "boxes", np.random.default_rng(0), jitter_px=3.0).boxes[0]
    assert a == b and a != base
    x0, y0, x1, y1 = base[0], base[1], base[0] + base[2], base[1] + base[3]
    jx0, jy0, jx1, jy1 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    assert all(abs(u - v) <= 3.0 + 1e-9 for u, v in zip((x0, y0, x1, y1), (jx0, jy0, jx1, jy1), strict=True))
    rb = weak_from_mask(m, "rotated_boxes").rotated_boxes[0]
    jr = weak_from_mask(m, "rotated_boxes", np.random.default_rng(1), jitter_px=2.0).rotated_boxes[0]
    assert all(abs(u - v) <= 2.0 + 1e-9 for u, v in zip(rb[:4], jr[:4], strict=True)) and jr[4] == rb[4]
    tiny = np.zeros((10, 10), np.uint8)
    tiny[5, 5] = 1
    for seed in range(20):
        w = weak_from_mask(tiny, "boxes", np.random.default_rng(seed), jitter_px=5.0).boxes[0]
        assert w[2] >= 1 and w[3] >= 1
    with pytest.raises(ValueError, match="rng"):
        weak_from_mask(m, "boxes", jitter_px=1.0)
    assert weak_from_mask(np.zeros((8, 8)), "boxes") == WeakLabel(tag="bad")
    assert weak_from_mask(np.zeros((8, 8)), "rotated_boxes").kind == "tag"
