"""A contact sheet: heatmap overlays of many frames in one PNG, for a person to look at.

Ordered so the frames that need a look come first: good frames the bundle rejects, then defective
frames it misses, then the rest closest to the threshold.  Each tile is captioned with its verdict,
score/threshold and file name; a red caption marks a wrong verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.core.overlay import heatmap_overlay

CAPTION_H = 34
WRONG, RIGHT = (40, 40, 210), (60, 140, 60)  # BGR caption colours


@dataclass
class Tile:
    """One frame's evidence for the sheet."""

    name: str
    expected: str  # "good" | "bad"
    verdict: str  # "pass" | "fail"
    score: float
    threshold: float
    overlay: np.ndarray  # uint8 BGR, tile-sized

    @property
    def wrong(self) -> bool:
        return (self.expected == "good") == (self.verdict == "fail")


def _key(t: Tile) -> tuple[int, float]:
    """Failing good frames (highest score first), missed bad frames (lowest first), then the rest by how
    close they came to the threshold."""
    if t.wrong:
        return (0 if t.expected == "good" else 1, -t.score if t.expected == "good" else t.score)
    return (2, abs(t.score - t.threshold) / max(abs(t.threshold), 1e-12))


class SheetBuilder:
    """Collects tiles (already shrunk) and keeps only the ``max_tiles`` that come first, so memory stays
    bounded however many frames are verified."""

    def __init__(self, max_tiles: int = 48, tile_px: int = 192) -> None:
        self.max_tiles = max_tiles
        self.tile_px = tile_px
        self.tiles: list[Tile] = []

    def add(self, name: str, expected: str, image_rgb: np.ndarray, heatmap: np.ndarray, score: float,
            threshold: float, regions: list | None = None) -> None:
        if self.max_tiles <= 0:
            return
        overlay = heatmap_overlay(image_rgb, heatmap, threshold, regions=regions)
        small = cv2.resize(overlay, (self.tile_px, self.tile_px), interpolation=cv2.INTER_AREA)
        verdict = "fail" if score >= threshold else "pass"
        self.tiles.append(Tile(name, expected, verdict, score, threshold, small))
        if len(self.tiles) > 2 * self.max_tiles:
            self.tiles = self.ordered()

    def ordered(self) -> list[Tile]:
        return sorted(self.tiles, key=_key)[: self.max_tiles]


def _caption(tile: Tile, width: int) -> np.ndarray:
    strip = np.full((CAPTION_H, width, 3), 255, np.uint8)
    colour = WRONG if tile.wrong else RIGHT
    label = f"{tile.expected} {tile.verdict.upper()} {tile.score:.3f}/{tile.threshold:.3f}"
    cv2.putText(strip, label, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, colour, 1, cv2.LINE_AA)
    name = tile.name if len(tile.name) <= width // 7 else "..." + tile.name[-(width // 7 - 3):]
    cv2.putText(strip, name, (3, 29), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (60, 60, 60), 1, cv2.LINE_AA)
    return strip


def write_sheet(tiles: list[Tile], path: Path, columns: int = 6) -> Path:
    """Write the (already ordered) tiles as one PNG grid; raises OSError when it cannot be written."""
    if not tiles:
        raise ValueError("no frames for a contact sheet")
    tile_px = tiles[0].overlay.shape[1]
    cells = []
    for tile in tiles:
        pic = tile.overlay.copy()
        if tile.wrong:
            cv2.rectangle(pic, (0, 0), (tile_px - 1, tile_px - 1), WRONG, 3)
        cells.append(np.vstack([pic, _caption(tile, tile_px)]))
    blank = np.full_like(cells[0], 255)
    columns = min(columns, len(cells))
    rows = [cells[i:i + columns] for i in range(0, len(cells), columns)]
    rows[-1] = rows[-1] + [blank] * (columns - len(rows[-1]))
    sheet = np.vstack([np.hstack(r) for r in rows])
    ok, buf = cv2.imencode(".png", sheet)
    if not ok:
        raise OSError(f"{path}: could not encode the contact sheet")
    path.write_bytes(buf.tobytes())
    return path
