"""A procedurally generated assembly product with logical defects (issue 13's development product).

A tray holds a fixed kit of parts: two red screws, a blue label, a green block and two yellow washers, each
placed anywhere on the tray (a kit, not a fixture: positions vary from tray to tray), with a little jitter in
size and lighting as on a real line.  Most defective trays are wrong in composition, not in surface: a part
**missing**, one part **extra**, a washer **swapped** for a screw (the same number of parts, the wrong ones), a
part **oversized**, or a part **misplaced** (on the tray's rim, outside the area parts belong in).  Since parts
move from tray to tray no position holds a fixed part, so a missing or extra part changes no patch: only the
count, kinds, sizes or places are wrong, which is what the component score must catch and the structural score
alone cannot.  One structural kind, a **scratch** across the tray, is there for the other side: the fused
verdict must keep what the structural score finds.  MVTec layout
(train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png; the mask of a missing part is
empty, as MVTec LOCO leaves what cannot be pointed at); deterministic for a seed.

    .venv/bin/python -m training_host.data.assembly OUT [--n-train 120]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .demo_data import _MARKER, _prepare_out, _write_png

DEFECTS = ("missing", "extra", "swapped", "oversized", "misplaced", "scratch")

RED, BLUE, GREEN, YELLOW = (200, 40, 40), (40, 70, 200), (40, 160, 60), (220, 200, 40)


@dataclass(frozen=True)
class Part:
    kind: str  # "screw" | "label" | "block" | "washer"
    colour: tuple[int, int, int]
    size: float  # fraction of the image side
    centre: tuple[float, float] = (0.5, 0.5)  # (x, y) as fractions of the image side

    def at(self, centre: tuple[float, float]) -> Part:
        return Part(self.kind, self.colour, self.size, centre)


SCREW, LABEL = Part("screw", RED, 0.07), Part("label", BLUE, 0.14)
BLOCK, WASHER = Part("block", GREEN, 0.12), Part("washer", YELLOW, 0.08)
#: the good kit
KIT = (SCREW, SCREW, LABEL, BLOCK, WASHER, WASHER)


def _draw(img: np.ndarray, part: Part, rng: np.random.Generator, jitter: float = 0.012) -> np.ndarray:
    """Draw ``part`` on ``img`` (in place) with line-like jitter; returns the part's footprint mask."""
    side = img.shape[0]
    cx = (part.centre[0] + rng.normal(0, jitter)) * side
    cy = (part.centre[1] + rng.normal(0, jitter)) * side
    r = part.size * side * rng.uniform(0.94, 1.06)
    shade = rng.uniform(0.9, 1.1)
    colour = tuple(int(np.clip(c * shade, 0, 255)) for c in part.colour)
    mask = np.zeros(img.shape[:2], np.uint8)
    centre = (int(round(cx)), int(round(cy)))
    if part.kind in ("screw", "washer"):
        cv2.circle(mask, centre, int(round(r)), 255, -1)
        cv2.circle(img, centre, int(round(r)), colour, -1, lineType=cv2.LINE_AA)
        inner = int(round(r * (0.3 if part.kind == "screw" else 0.45)))
        cv2.circle(img, centre, inner, tuple(int(c * 0.55) for c in colour), -1, lineType=cv2.LINE_AA)
    else:
        w, h = (r * 1.6, r * 0.9) if part.kind == "label" else (r, r)
        box = cv2.boxPoints(((cx, cy), (w, h), rng.normal(0, 2.0))).astype(np.int32)
        cv2.fillConvexPoly(mask, box, 255)
        cv2.fillConvexPoly(img, box, colour, lineType=cv2.LINE_AA)
        if part.kind == "label":
            cv2.line(img, (int(cx - w * 0.3), int(cy)), (int(cx + w * 0.3), int(cy)), (235, 235, 235), 2)
    return mask


def _tray(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(110, 130)
    img = np.full((size, size, 3), base, np.float32)
    img += rng.normal(0, 3.0, (size, size, 1))  # sensor noise, grey
    yy = np.linspace(-1, 1, size)[:, None]
    img += (rng.uniform(-8, 8) * yy)[..., None]  # uneven lighting
    frame = int(size * 0.06)
    cv2.rectangle(img, (frame, frame), (size - frame, size - frame), (90, 90, 90), 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _places(rng: np.random.Generator, parts: list[Part], size: int) -> list[Part]:
    """Random non-overlapping places on the tray (inside its frame) for ``parts``."""
    placed: list[Part] = []
    for part in parts:
        for _ in range(500):
            c = (float(rng.uniform(0.16, 0.84)), float(rng.uniform(0.16, 0.84)))
            if all(np.hypot(c[0] - q.centre[0], c[1] - q.centre[1]) > (part.size + q.size) * 1.15 for q in placed):
                break
        placed.append(part.at(c))
    return placed


def make_tray(defect: str | None, rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One tray image (H, W, 3) uint8 and its defect mask (H, W) uint8 (0/255; all 0 for a good tray)."""
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECTS}")
    img = _tray(rng, size)
    mask = np.zeros((size, size), np.uint8)
    kit = list(KIT)
    wrong: int | None = None  # index of the part the mask marks
    if defect == "missing":
        kit.pop(int(rng.integers(len(kit))))
    elif defect == "extra":
        kit.append(KIT[int(rng.integers(len(KIT)))])
        wrong = len(kit) - 1
    elif defect == "swapped":
        wrong = kit.index(WASHER)
        kit[wrong] = SCREW
    elif defect == "oversized":
        wrong = int(rng.integers(len(kit)))
        kit[wrong] = Part(kit[wrong].kind, kit[wrong].colour, kit[wrong].size * 1.7)
    elif defect == "misplaced":
        wrong = int(rng.integers(len(kit)))
    order = rng.permutation(len(kit))  # the wrong part is placed in random order, like any other
    placed = _places(rng, [kit[i] for i in order], size)
    for part, i in zip(placed, order, strict=True):
        if defect == "misplaced" and i == wrong:  # on the rim, between the tray's frame and the image edge
            edge = float(rng.uniform(0.2, 0.8))
            part = part.at((edge, 0.07) if rng.random() < 0.5 else (0.07, edge))
        footprint = _draw(img, part, rng)
        if i == wrong:
            mask |= footprint
    if defect == "scratch":
        start = rng.uniform(0.2, 0.8, 2) * size
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.15, 0.3) * size
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        a, b = tuple(int(v) for v in start), tuple(int(v) for v in end)
        cv2.line(img, a, b, (35, 35, 35), 2, lineType=cv2.LINE_AA)
        cv2.line(mask, a, b, 255, 4)
    return img, mask


def make_assembly_dataset(out: str | Path, *, n_train: int = 120, n_test_good: int = 30,
                          n_test_per_defect: int = 15, size: int = 256, seed: int = 0) -> Path:
    """Write the assembly product under ``out`` (MVTec layout) and return ``out``."""
    root = Path(out)
    _prepare_out(root)
    plan = [("train", "good", n_train), ("test", "good", n_test_good)]
    plan += [("test", d, n_test_per_defect) for d in DEFECTS]
    for split, kind, count in plan:
        (root / split / kind).mkdir(parents=True, exist_ok=True)
        if kind != "good":
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, DEFECTS.index(kind) + 1 if kind != "good" else 0,
                                         0 if split == "train" else 1, i])
            img, mask = make_tray(None if kind == "good" else kind, rng, size)
            _write_png(root / split / kind / f"{i:03d}.png", img)
            if kind != "good":
                _write_png(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    (root / _MARKER).write_text(json.dumps({"product": "assembly", "seed": seed}) + "\n", encoding="utf-8")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--n-train", type=int, default=120)
    parser.add_argument("--n-test-good", type=int, default=30)
    parser.add_argument("--n-test-per-defect", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_assembly_dataset(args.out, n_train=args.n_train, n_test_good=args.n_test_good,
                          n_test_per_defect=args.n_test_per_defect, seed=args.seed)
    print(f"assembly product written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
