"""Weak labels for defective images (paper WeakREST, Sec. III-D1).

A quality engineer marks a defective image with axis-aligned boxes, rotated boxes, an image-level tag ``"bad"`` or
explicit block labels instead of painting pixel masks.  This module reads and validates such label files (one JSON
file per dataset), imports COCO and LabelMe annotations, turns a weak label into block labels for the residual
classifier (blocks outside every box are clean negatives, the rest unknown) and derives weak labels from pixel masks
so that benchmarks can measure what weak supervision costs.

File format (coordinates in pixels of the original image, keys relative posix paths under the dataset root)::

    {"version": 1, "images": {"test/crack/000.png": {"boxes": [[x, y, w, h]], "rotated_boxes": [[cx, cy, w, h, a]],
                                                     "tag": "bad", "blocks": {"grid": [h, w], "labels": [[...]]}}}}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np

from training_host.data.synthetic import covered_blocks

FORMAT_VERSION = 1
KINDS: tuple[str, ...] = ("blocks", "rotated_boxes", "boxes", "tag")  # most precise first
_ENTRY_KEYS = frozenset(KINDS)
_MAX_REPORTED = 20  # problems listed in one LabelError

Box = tuple[float, float, float, float]
RotatedBox = tuple[float, float, float, float, float]


class LabelError(ValueError):
    """A label file (or an import) is invalid; the message names the file, the image and the field.

    ``problems`` holds every problem found (the message lists at most the first 20)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems is not None else [message]


def _raise_problems(source: str, problems: list[str]) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:_MAX_REPORTED])
    more = f"; ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
    raise LabelError(f"{source}: {shown}{more}", [f"{source}: {p}" for p in problems])


# ----------------------------------------------------------------------------------------------- label types
@dataclass(frozen=True)
class WeakLabel:
    """The weak label of one defective image.  Boxes are ``(x, y, w, h)``, rotated boxes ``(cx, cy, w, h, angle_deg)``
    in the OpenCV ``minAreaRect`` / ``boxPoints`` convention, ``blocks`` int8 (h, w) with 1 / 0 / -1 (unknown)."""

    boxes: tuple[Box, ...] = ()
    rotated_boxes: tuple[RotatedBox, ...] = ()
    tag: str | None = None
    blocks: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Normalise lists to tuples of floats and freeze the block array, so a label cannot change under a trainer.
        object.__setattr__(self, "boxes", tuple(tuple(float(v) for v in b) for b in self.boxes))
        object.__setattr__(self, "rotated_boxes", tuple(tuple(float(v) for v in b) for b in self.rotated_boxes))
        if any(len(b) != 4 for b in self.boxes) or any(len(b) != 5 for b in self.rotated_boxes):
            raise ValueError("boxes need 4 numbers (x, y, w, h), rotated boxes 5 (cx, cy, w, h, angle)")
        if self.tag is not None and self.tag != "bad":
            raise ValueError(f"tag must be 'bad' or None, got {self.tag!r}")
        if self.blocks is not None:
            b = np.array(self.blocks, dtype=np.int8)
            if b.ndim != 2 or b.size == 0 or not np.isin(b, (-1, 0, 1)).all():
                raise ValueError("blocks must be a non-empty 2-D array of -1 / 0 / 1")
            b.flags.writeable = False
            object.__setattr__(self, "blocks", b)
        if not (self.boxes or self.rotated_boxes or self.tag or self.blocks is not None):
            raise ValueError("a weak label needs at least one of boxes, rotated_boxes, tag, blocks")

    @property
    def kind(self) -> str:
        """'blocks' | 'rotated_boxes' | 'boxes' | 'tag': the most precise label present, in that order."""
        if self.blocks is not None:
            return "blocks"
        if self.rotated_boxes:
            return "rotated_boxes"
        if self.boxes:
            return "boxes"
        return "tag"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeakLabel):
            return NotImplemented
        same_blocks = (self.blocks is None and other.blocks is None) or (
            self.blocks is not None and other.blocks is not None and np.array_equal(self.blocks, other.blocks))
        same_rest = (self.boxes, self.rotated_boxes, self.tag) == (other.boxes, other.rotated_boxes, other.tag)
        return same_rest and same_blocks

    def __hash__(self) -> int:
        blocks = None if self.blocks is None else (self.blocks.shape, self.blocks.tobytes())
        return hash((self.boxes, self.rotated_boxes, self.tag, blocks))

    def to_json(self) -> dict[str, Any]:
        """The entry of this image in the label file (only the fields present)."""
        out: dict[str, Any] = {}
        if self.boxes:
            out["boxes"] = [list(b) for b in self.boxes]
        if self.rotated_boxes:
            out["rotated_boxes"] = [list(b) for b in self.rotated_boxes]
        if self.tag is not None:
            out["tag"] = self.tag
        if self.blocks is not None:
            out["blocks"] = {"grid": list(self.blocks.shape), "labels": self.blocks.tolist()}
        return out


@dataclass
class LabelSet:
    """Weak labels keyed by image path relative to the dataset root, plus the warnings raised while reading them."""

    images: dict[str, WeakLabel] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per kind of label (by :attr:`WeakLabel.kind`) plus 'total'."""
        out = dict.fromkeys(KINDS, 0)
        for label in self.images.values():
            out[label.kind] += 1
        out["total"] = len(self.images)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "images": {k: v.to_json() for k, v in self.images.items()}}

    def save(self, path: Path) -> None:
        """Write the label file atomically (temporary file + rename), so a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, indent=1, allow_nan=False)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ----------------------------------------------------------------------------------------------- validation
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any, limit: int = 60) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numbers(value: Any, names: tuple[str, ...], where: str, problems: list[str]) -> list[float] | None:
    """A list of len(names) finite numbers, or None with the problems recorded."""
    if not isinstance(value, list) or len(value) != len(names) or not all(_is_num(v) for v in value):
        problems.append(f"{where}: expected {len(names)} numbers [{', '.join(names)}], got {_short(value)}")
        return None
    bad = [f"{n} must be finite, got {v!r}" for n, v in zip(names, value, strict=True) if not math.isfinite(v)]
    if bad:
        problems.append(f"{where}: " + ", ".join(bad))
        return None
    out = [float(v) for v in value]
    ok = True
    for n in ("w", "h"):
        i = names.index(n)
        if out[i] <= 0:
            problems.append(f"{where}: {'width' if n == 'w' else 'height'} must be > 0, got {_short(value[i])}")
            ok = False
    return out if ok else None


def _box_list(value: Any, name: str, names: tuple[str, ...], where: str, problems: list[str]) -> list[list[float]]:
    if not isinstance(value, list):
        problems.append(f"{where}, {name}: expected a list of [{', '.join(names)}], got {_short(value)}")
        return []
    out = []
    for i, item in enumerate(value):
        nums = _numbers(item, names, f"{where}, {name}[{i}]", problems)
        if nums is not None:
            out.append(nums)
    return out


def _blocks(value: Any, where: str, problems: list[str]) -> np.ndarray | None:
    where = f"{where}, blocks"
    if not isinstance(value, dict) or set(value) != {"grid", "labels"}:
        got = sorted(value) if isinstance(value, dict) else _short(value)
        problems.append(f"{where}: expected an object with exactly 'grid' and 'labels', got {got}")
        return None
    grid, labels = value["grid"], value["labels"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(_is_int(g) and g > 0 for g in grid)):
        problems.append(f"{where}.grid: expected [h, w] positive integers, got {_short(grid)}")
        return None
    gh, gw = grid
    if not isinstance(labels, list) or len(labels) != gh:
        n = len(labels) if isinstance(labels, list) else type(labels).__name__
        problems.append(f"{where}.labels: expected {gh} rows (grid {grid}), got {n}")
        return None
    for r, row in enumerate(labels):
        if not isinstance(row, list) or len(row) != gw:
            n = len(row) if isinstance(row, list) else type(row).__name__
            problems.append(f"{where}.labels[{r}]: expected {gw} values (grid {grid}), got {n}")
            return None
        bad = [v for v in row if not (_is_int(v) and v in (-1, 0, 1))]
        if bad:
            problems.append(f"{where}.labels[{r}]: values must be -1, 0 or 1, got {_short(bad[0])}")
            return None
    return np.array(labels, dtype=np.int8)


def _key_problem(key: str) -> str | None:
    if not key or "\\" in key:
        return "must be a non-empty posix path (forward slashes)"
    p = PurePosixPath(key)
    if p.is_absolute() or ".." in p.parts:
        return "must be relative to the dataset root (no leading '/', no '..')"
    return None


def _image_hw(path: Path) -> tuple[int, int] | None:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if img is None else (int(img.shape[0]), int(img.shape[1]))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_labels(path: Path, root: Path | None = None,
                image_sizes: dict[str, tuple[int, int]] | None = None) -> LabelSet:
    """Read and validate a label file; the whole file is checked before anything is returned, so training never
    starts on half-read labels.  Every problem found is reported in one :class:`LabelError` (the first 20 listed).

    With ``root``, each image key must name an existing file under it.  When an image's size is known
    (``image_sizes[key] = (height, width)``, or read from ``root`` when ``image_sizes`` is None), boxes partly outside
    the image are clipped with a warning, a box entirely outside is an error, and a rotated box's centre must lie
    inside the image."""
    path = Path(path)
    src = path.name
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LabelError(f"{src}: cannot read label file as JSON ({e})") from e
    if not isinstance(doc, dict):
        raise LabelError(f"{src}: expected a JSON object with 'version' and 'images', got {type(doc).__name__}")
    problems: list[str] = []
    unknown = sorted(set(doc) - {"version", "images"})
    if unknown:
        problems.append(f"unknown top-level keys {unknown} (allowed: 'version', 'images')")
    version = doc.get("version")
    if not (_is_int(version) and version == FORMAT_VERSION):
        problems.append(f"version: expected {FORMAT_VERSION}, got {_short(version)}")
    images = doc.get("images")
    if not isinstance(images, dict):
        problems.append(f"images: expected an object of image path -> label, got {_short(images)}")
        _raise_problems(src, problems)
    assert isinstance(images, dict)

    result = LabelSet()
    for key, entry in images.items():
        where = f"image '{key}'"
        n_before = len(problems)
        kp = _key_problem(key)
        if kp:
            problems.append(f"{where}: key {kp}")
        elif root is not None and not (Path(root) / key).is_file():
            problems.append(f"{where}: unknown image (no file {Path(root) / key})")
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object with boxes / rotated_boxes / tag / blocks, "
                            f"got {_short(entry)}")
            continue
        extra = sorted(set(entry) - _ENTRY_KEYS)
        if extra:
            problems.append(f"{where}: unknown keys {extra} (allowed: {', '.join(KINDS)})")
        boxes = _box_list(entry["boxes"], "boxes", ("x", "y", "w", "h"), where, problems) if "boxes" in entry else []
        rboxes = (_box_list(entry["rotated_boxes"], "rotated_boxes", ("cx", "cy", "w", "h", "angle"), where, problems)
                  if "rotated_boxes" in entry else [])
        tag = entry.get("tag")
        if "tag" in entry and tag != "bad":
            problems.append(f"{where}, tag: must be \"bad\", got {_short(tag)}")
        blocks = _blocks(entry["blocks"], where, problems) if "blocks" in entry else None
        has_label = (bool(entry.get("boxes")) or bool(entry.get("rotated_boxes")) or "tag" in entry
                     or "blocks" in entry)
        if not has_label:
            problems.append(f"{where}: no label (give at least one of boxes, rotated_boxes, tag, blocks)")
        if len(problems) > n_before:
            continue

        hw = None
        if boxes or rboxes:
            if image_sizes is not None:
                hw = image_sizes.get(key)
            elif root is not None:
                hw = _image_hw(Path(root) / key)
                if hw is None:
                    problems.append(f"{where}: cannot read the image to check its boxes ({Path(root) / key})")
                    continue
        if hw is not None:
            H, W = float(hw[0]), float(hw[1])
            for i, (x, y, w, h) in enumerate(boxes):
                x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
                if x1 <= x0 or y1 <= y0:
                    problems.append(f"{where}, boxes[{i}]: box {_short([x, y, w, h])} lies entirely outside the "
                                    f"image (height {hw[0]}, width {hw[1]})")
                elif (x0, y0, x1, y1) != (x, y, x + w, y + h):
                    boxes[i] = [x0, y0, x1 - x0, y1 - y0]
                    result.warnings.append(f"{src}: {where}, boxes[{i}]: box {_short([x, y, w, h])} clipped to the "
                                           f"image (height {hw[0]}, width {hw[1]}) -> {_short(boxes[i])}")
            for i, (cx, cy, *_rest) in enumerate(rboxes):
                if not (0.0 <= cx <= W and 0.0 <= cy <= H):
                    problems.append(f"{where}, rotated_boxes[{i}]: centre ({cx:g}, {cy:g}) lies outside the image "
                                    f"(height {hw[0]}, width {hw[1]})")
        if len(problems) > n_before:
            continue
        result.images[key] = WeakLabel(boxes=tuple(tuple(b) for b in boxes),  # type: ignore[misc]
                                       rotated_boxes=tuple(tuple(b) for b in rboxes),  # type: ignore[misc]
                                       tag="bad" if "tag" in entry else None, blocks=blocks)
    _raise_problems(src, problems)
    return result


# ----------------------------------------------------------------------------------------------- importers
def _polygon_boxes(points: np.ndarray) -> tuple[Box, RotatedBox] | None:
    """(axis-aligned bounds, minimum-area rotated rectangle) of polygon points (N, 2); None when degenerate."""
    pts = np.asarray(points, np.float32).reshape(-1, 2)
    if len(pts) < 3 or not np.isfinite(pts).all():
        return None
    (cx, cy), (w, h), angle = cv2.minAreaRect(pts)
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
        return None
    return ((float(x0), float(y0), float(x1 - x0), float(y1 - y0)),
            (float(cx), float(cy), float(w), float(h), float(angle)))


def _add(acc: dict[str, tuple[list[Box], list[RotatedBox]]], key: str, box: Box | None,
         rbox: RotatedBox | None) -> None:
    boxes, rboxes = acc.setdefault(key, ([], []))
    if box is not None:
        boxes.append(box)
    if rbox is not None:
        rboxes.append(rbox)


def _to_set(acc: dict[str, tuple[list[Box], list[RotatedBox]]], warnings: list[str]) -> LabelSet:
    images = {k: WeakLabel(boxes=tuple(b), rotated_boxes=tuple(r)) for k, (b, r) in acc.items() if b or r}
    return LabelSet(images=images, warnings=warnings)


def import_coco(path: Path, use_segmentation: bool = True) -> LabelSet:
    """COCO detection JSON -> weak labels.  With ``use_segmentation`` and a polygon present, the annotation becomes
    the polygon's minimum-area rotated rectangle (in ``rotated_boxes``) and its axis-aligned bounds (in ``boxes``);
    otherwise its ``bbox`` goes to ``boxes``.  Images without annotations are good images and are skipped; keys are
    ``file_name`` as given."""
    path = Path(path)
    src = path.name
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LabelError(f"{src}: cannot read COCO file as JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
            doc.get("annotations"), list):
        raise LabelError(f"{src}: expected a COCO object with 'images' and 'annotations' lists")
    problems: list[str] = []
    names: dict[Any, str] = {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            problems.append(f"images[{i}]: expected an object with 'id' and 'file_name', got {_short(im)}")
        else:
            names[im["id"]] = im["file_name"]
    acc: dict[str, tuple[list[Box], list[RotatedBox]]] = {}
    warnings: list[str] = []
    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or ann.get("image_id") not in names:
            got = ann.get("image_id") if isinstance(ann, dict) else _short(ann)
            problems.append(f"annotations[{i}]: image_id {got!r} names no image")
            continue
        key = names[ann["image_id"]]
        seg = ann.get("segmentation")
        if use_segmentation and isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
            try:
                pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in seg if p])
            except (ValueError, TypeError):
                pts = None
            boxes = _polygon_boxes(pts) if pts is not None else None
            if boxes is not None:
                _add(acc, key, *boxes)
                continue
            warnings.append(f"{src}: image '{key}', annotations[{i}].segmentation: degenerate polygon, bbox used")
        bbox = _numbers(ann.get("bbox"), ("x", "y", "w", "h"), f"image '{key}', annotations[{i}].bbox", problems)
        if bbox is not None:
            _add(acc, key, tuple(bbox), None)  # type: ignore[arg-type]
    _raise_problems(src, problems)
    return _to_set(acc, warnings)


def import_labelme(paths: list[Path], root: Path | None = None) -> LabelSet:
    """LabelMe JSON files (one per image) -> weak labels.  'rectangle' shapes become boxes; 'polygon' shapes their
    minimum-area rotated rectangle plus axis-aligned bounds; other shape types are skipped with a warning.  The key
    is ``imagePath`` (relative to the JSON file, LabelMe's convention) made relative to ``root`` when given, else
    ``imagePath`` as written."""
    problems: list[str] = []
    warnings: list[str] = []
    acc: dict[str, tuple[list[Box], list[RotatedBox]]] = {}
    for p in map(Path, paths):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(f"{p.name}: cannot read as JSON ({e})")
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("imagePath"), str) or not isinstance(
                doc.get("shapes"), list):
            problems.append(f"{p.name}: expected a LabelMe object with 'imagePath' and 'shapes'")
            continue
        key = doc["imagePath"].replace("\\", "/")
        if root is not None:
            try:
                key = (p.parent / key).resolve().relative_to(Path(root).resolve()).as_posix()
            except ValueError:
                problems.append(f"{p.name}: imagePath {doc['imagePath']!r} is not under root {root}")
                continue
        n_shapes = 0
        for j, shape in enumerate(doc["shapes"]):
            where = f"{p.name}: image '{key}', shapes[{j}]"
            stype = shape.get("shape_type", "polygon") if isinstance(shape, dict) else None
            pts = shape.get("points") if isinstance(shape, dict) else None
            try:
                arr = np.asarray(pts, np.float64).reshape(-1, 2)
            except (ValueError, TypeError):
                problems.append(f"{where}.points: expected [[x, y], ...], got {_short(pts)}")
                continue
            if stype == "rectangle":
                if len(arr) != 2 or not np.isfinite(arr).all():
                    problems.append(f"{where}.points: a rectangle needs two finite points, got {_short(pts)}")
                    continue
                (x0, y0), (x1, y1) = arr.min(axis=0), arr.max(axis=0)
                if x1 <= x0 or y1 <= y0:
                    warnings.append(f"{where}: empty rectangle skipped")
                    continue
                _add(acc, key, (float(x0), float(y0), float(x1 - x0), float(y1 - y0)), None)
                n_shapes += 1
            elif stype == "polygon":
                boxes = _polygon_boxes(arr)
                if boxes is None:
                    warnings.append(f"{where}: degenerate polygon skipped")
                    continue
                _add(acc, key, *boxes)
                n_shapes += 1
            else:
                warnings.append(f"{where}: shape_type {stype!r} not supported (rectangle, polygon), skipped")
        if n_shapes == 0:
            warnings.append(f"{p.name}: image '{key}' has no usable shape, skipped")
    _raise_problems("labelme", problems)
    return _to_set(acc, warnings)


# ----------------------------------------------------------------------------------------------- conversions
def _box_mask(label: WeakLabel, image_hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) union of the label's boxes rasterised at image resolution; pixel (i, j) spans [j, j+1) x
    [i, i+1), so an axis box with integer edges covers exactly its pixels."""
    H, W = image_hw
    mask = np.zeros((H, W), np.uint8)
    for x, y, w, h in label.boxes:
        c0, r0 = min(max(round(x), 0), W), min(max(round(y), 0), H)
        c1, r1 = min(max(round(x + w), 0), W), min(max(round(y + h), 0), H)
        mask[r0:r1, c0:c1] = 1
    shift = 4  # sub-pixel corners; boxPoints are continuous, fillPoly indexes pixel centres, hence the -0.5
    for cx, cy, w, h, a in label.rotated_boxes:
        corners = cv2.boxPoints(((cx, cy), (w, h), a)) - 0.5
        pts = np.round(corners * (1 << shift)).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=shift)
    return mask


def _checked_grid(grid: tuple[int, int], image_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(gh, gw), (H, W) as ints, or a ValueError when the grid is not positive or finer than the image."""
    gh, gw = int(grid[0]), int(grid[1])
    H, W = int(image_hw[0]), int(image_hw[1])
    if gh < 1 or gw < 1 or H < gh or W < gw:
        raise ValueError(f"grid {tuple(grid)} must be positive and no finer than the image (height {H}, width {W})")
    return (gh, gw), (H, W)


def _single_boxes(label: WeakLabel) -> list[WeakLabel]:
    """One label per box and rotated box of ``label``."""
    return [WeakLabel(boxes=(b,)) for b in label.boxes] + [WeakLabel(rotated_boxes=(b,)) for b in label.rotated_boxes]


def block_labels_from_weak(label: WeakLabel, image_hw: tuple[int, int], grid: tuple[int, int],
                           overlap: float = 0.0) -> np.ndarray:
    """Block labels of paper Sec. III-D1, int8 (h, w): a block covered by the union of the boxes over more than
    ``overlap`` of its area is -1 (unknown: the defect is somewhere in the box, not necessarily in this block), every
    other block is 0 (normal).  A tag alone gives all -1; explicit blocks pass through (they must match ``grid``).
    The default 0 leaves every block a box touches unknown: a block a box covers only partly may hold the defect
    (a small one may lie entirely in such blocks), and labelling it normal taught the classifier to miss it.

    Boxes are in pixels of the original image of size ``image_hw`` = (H, W); the grid cuts it into h x w blocks
    with float edges, so H and W need not be divisible by the grid."""
    (gh, gw), (H, W) = _checked_grid(grid, image_hw)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if label.blocks is not None:
        if label.blocks.shape != (gh, gw):
            raise LabelError(f"blocks: grid {list(label.blocks.shape)} does not match the classifier grid {[gh, gw]}")
        return label.blocks.copy()
    if not label.boxes and not label.rotated_boxes:
        return np.full((gh, gw), -1, np.int8)
    frac = _block_coverage(_box_mask(label, (H, W)), (gh, gw))
    return np.where(frac > overlap, -1, 0).astype(np.int8)


def _block_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """float64 (h, w) the share of each block a uint8 (H, W) mask covers; the grid cuts the image with float edges."""
    H, W = mask.shape
    integral = cv2.integral(mask)  # (H+1, W+1) float64 sums
    rows = np.round(np.linspace(0, H, grid[0] + 1)).astype(int)
    cols = np.round(np.linspace(0, W, grid[1] + 1)).astype(int)
    r0, r1 = rows[:-1, None], rows[1:, None]
    c0, c1 = cols[None, :-1], cols[None, 1:]
    covered = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return covered / ((r1 - r0) * (c1 - c0))


def box_blocks(label: WeakLabel, image_hw: tuple[int, int], grid: tuple[int, int],
               overlap: float = 0.5) -> list[np.ndarray]:
    """Each box's (and rotated box's) own blocks, boolean (h, w) each: those it covers more than ``overlap`` of, or for
    a box too thin or too small for that, those it covers at least half as much as its best-covered one
    (:func:`~training_host.data.synthetic.covered_blocks`).  A box entirely outside the image gives none."""
    (gh, gw), (H, W) = _checked_grid(grid, image_hw)
    own = (covered_blocks(_block_coverage(_box_mask(one, (H, W)), (gh, gw)), overlap) for one in _single_boxes(label))
    return [b for b in own if b.any()]


def _to_block(points: np.ndarray, image_hw: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Flat block indices of (n, 2) pixel points (x, y), clipped to the grid."""
    H, W = image_hw
    gh, gw = grid
    r = np.clip(np.floor(points[:, 1] * gh / H), 0, gh - 1).astype(int)
    c = np.clip(np.floor(points[:, 0] * gw / W), 0, gw - 1).astype(int)
    return r * gw + c


def _box_lines(box: RotatedBox, image_hw: tuple[int, int], grid: tuple[int, int]) -> list[np.ndarray]:
    """Flat block indices of each line across a rotated box, parallel to its sides, about one block apart.

    A tight box's defect touches all four sides and is connected, so every such line crosses it (the box-tightness
    prior of Hsu et al., NeurIPS 2019, at block resolution): each line is a bag with at least one defect block."""
    cx, cy, w, h, angle = box
    H, W = image_hw
    step = min(H / grid[0], W / grid[1])
    a = math.radians(angle)
    u, v = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    centre = np.array([cx, cy])
    lines = []
    for along, across, length, width in ((u, v, w, h), (v, u, h, w)):
        n_lines = max(1, math.ceil(length / step))
        offsets = -length / 2 + (np.arange(n_lines) + 0.5) * length / n_lines
        reach = max(width / 2 - 0.5, 0.0)  # pixel centres inside the box
        ts = np.linspace(-reach, reach, max(2, math.ceil(2 * reach / (step / 4)) + 1))
        for o in offsets:
            pts = centre + o * along + ts[:, None] * across
            lines.append(np.unique(_to_block(pts, image_hw, grid)))
    return lines


def weak_bags(label: WeakLabel, image_hw: tuple[int, int], grid: tuple[int, int], box_lines: bool = True,
              tag_top_k: int = 1) -> np.ndarray:
    """The multiple-instance view of a weak label: uint8 (n, h, w), bag b holding k on its blocks and 0 elsewhere,
    meaning "at least k of these blocks are anomalous".

    - boxes and rotated boxes: with ``box_lines`` every line across the box parallel to its sides (k = 1, see
      :func:`_box_lines`), else the box's blocks as one bag;
    - a tag alone: the whole image, k = ``tag_top_k``;
    - explicit blocks: each 8-connected unknown (-1) region, k = 1; known blocks need no bag.
    Identical bags are kept once; an empty array (0, h, w) when there is none."""
    gh, gw = int(grid[0]), int(grid[1])
    if tag_top_k < 1:
        raise ValueError(f"tag_top_k must be >= 1, got {tag_top_k}")
    bags: list[np.ndarray] = []
    if label.blocks is not None:
        from scipy import ndimage

        regions, n = ndimage.label(label.blocks == -1, structure=np.ones((3, 3), bool))
        bags = [np.flatnonzero(regions == r) for r in range(1, n + 1)]
        ks = [1] * len(bags)
    elif label.boxes or label.rotated_boxes:
        if box_lines:
            rotated = [(x + w / 2, y + h / 2, w, h, 0.0) for x, y, w, h in label.boxes] + list(label.rotated_boxes)
            for box in rotated:
                bags.extend(_box_lines(box, image_hw, grid))
        else:
            for one in _single_boxes(label):
                bags.append(np.flatnonzero(block_labels_from_weak(one, image_hw, grid, overlap=0.0) == -1))
        ks = [1] * len(bags)
    else:
        bags, ks = [np.arange(gh * gw)], [min(tag_top_k, gh * gw)]
    out, seen = [], set()
    for members, k in zip(bags, ks, strict=True):
        key = (k, members.tobytes())
        if len(members) and key not in seen:
            seen.add(key)
            bag = np.zeros(gh * gw, np.uint8)
            bag[members] = k
            out.append(bag.reshape(gh, gw))
    return np.stack(out) if out else np.zeros((0, gh, gw), np.uint8)


def weak_from_mask(mask: np.ndarray, kind: str, rng: np.random.Generator | None = None,
                   jitter_px: float = 0.0) -> WeakLabel:
    """Weak label derived from a binary pixel mask (original image size), to benchmark weak supervision the way the
    paper does: 'boxes' -> one axis-aligned box per 8-connected component, 'rotated_boxes' -> its minimum-area
    rectangle, 'tag' -> tag 'bad'.  ``jitter_px`` > 0 moves each box edge (rotated: centre and size) by a uniform
    amount in [-jitter_px, jitter_px], imitating a hurried annotator; sizes stay >= 1.  An empty mask gives tag 'bad'
    (the image is known defective but nothing is marked).  Boxes use continuous coordinates: pixel (i, j) spans
    [j, j+1) x [i, i+1)."""
    if kind == "blocks":
        raise ValueError("kind 'blocks' is not derived here: use synthetic.block_labels on the mask")
    if kind not in ("boxes", "rotated_boxes", "tag"):
        raise ValueError(f"kind must be 'boxes', 'rotated_boxes' or 'tag', got {kind!r}")
    if jitter_px < 0 or not math.isfinite(jitter_px):
        raise ValueError(f"jitter_px must be a finite number >= 0, got {jitter_px}")
    if jitter_px > 0 and rng is None:
        raise ValueError("jitter_px > 0 needs an rng (np.random.Generator) so the jitter is reproducible")
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    m = (m != 0).astype(np.uint8)
    if kind == "tag" or not m.any():
        return WeakLabel(tag="bad")
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)

    def jit(k: int) -> np.ndarray:
        return rng.uniform(-jitter_px, jitter_px, k) if jitter_px > 0 else np.zeros(k)  # type: ignore[union-attr]

    boxes: list[Box] = []
    rboxes: list[RotatedBox] = []
    for i in range(1, n):
        x, y, w, h = (int(v) for v in stats[i, :4])
        if kind == "boxes":
            x0, x1, y0, y1 = np.array([x, x + w, y, y + h], np.float64) + jit(4)
            boxes.append((float(x0), float(y0), float(max(x1 - x0, 1.0)), float(max(y1 - y0, 1.0))))
            continue
        comp = (labels[y:y + h, x:x + w] == i).astype(np.uint8)
        contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x, y))
        (cx, cy), (rw, rh), angle = cv2.minAreaRect(np.concatenate(contours))
        # minAreaRect fits pixel centres; +0.5 / +1 turn that into the pixels' continuous extent
        dcx, dcy, dw, dh = jit(4)
        rboxes.append((float(cx + 0.5 + dcx), float(cy + 0.5 + dcy), float(max(rw + 1.0 + dw, 1.0)),
                       float(max(rh + 1.0 + dh, 1.0)), float(angle)))
    return WeakLabel(boxes=tuple(boxes), rotated_boxes=tuple(rboxes))
