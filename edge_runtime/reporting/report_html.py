"""One self-contained HTML page per evaluation (``weakrest-train eval``) or field verification
(``weakrest-calibrate verify``), for a quality engineer to read, print or mail.

Self-contained because it is read on machines without network access and archived with the bundle: inline
CSS, charts as inline SVG, pictures as small JPEG data URLs, no script.  Pure functions of plain data
(metrics dicts, curve and score arrays, gallery items holding numpy images) so that the training host and
the torch-free field tools share one writer.  Every number is shown rounded, and kept exact in a
``data-value`` attribute (``repr`` of the float, as ``json.dumps`` writes it), so a test can check the page
against ``metrics.json`` / ``verify.json`` cell by cell.  Every string from outside is escaped.
"""

from __future__ import annotations

import base64
import heapq
import html
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.core.overlay import heatmap_overlay
from edge_runtime.core.preprocess import resize_rgb

__all__ = ["Curve", "GalleryItem", "WorstFrames", "METRICS", "render_evaluation_report", "render_verify_report",
           "write_html", "svg_curve", "svg_histogram", "metrics_table"]

METRICS = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pro", "PRO (FPR ≤ 0.3)"),
           ("pixel_ap", "pixel AP"))
THUMB_PX = 192  # gallery pictures: 3 per row at this size stay readable and keep the file small
JPEG_QUALITY = 82
GOOD_COLOUR, BAD_COLOUR, LINE_COLOUR = "#2f6fb3", "#c8423b", "#1b1b1b"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;margin:24px auto;
max-width:1180px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccc;padding-bottom:3px}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 9px;border-bottom:1px solid #e2e2e2;text-align:right}
th{background:#f3f3f3;font-weight:600}td.name,th.name{text-align:left}
table.facts td{text-align:left}table.facts td:first-child{color:#555;padding-left:0}
tr.overall td{font-weight:600;background:#fafafa}
.note{color:#555;font-size:12.5px}.unresolved{color:#8a6d00}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts svg{border:1px solid #ddd;background:#fff}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .title{font-size:13px;font-weight:600}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;padding:6px;border:1px solid #ddd;background:#fcfcfc;max-width:552px}
figure.wrong{border-color:#c8423b}
figure .pics{display:flex;gap:6px}figure img,figure .nomask{width:180px;height:auto;display:block}
figure .nomask{height:180px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
figure .pics span{display:block;font-size:11px;color:#666;text-align:center}
figcaption{font-size:12.5px;margin-top:4px;word-break:break-all}
@media print{body{margin:0}figure{break-inside:avoid}}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _exact(value: float | int | None) -> str:
    """The exact number for ``data-value``: ``repr(float)`` is what ``json.dumps`` writes, so it round-trips."""
    return "" if value is None else repr(float(value))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f} %"


def _cell(value: float | None, text: str, **attrs: object) -> str:
    extra = "".join(f' data-{_e(k.replace("_", "-"))}="{_e(v)}"' for k, v in attrs.items())
    return f'<td{extra} data-value="{_exact(value)}">{_e(text)}</td>'


# --------------------------------------------------------------------------- pictures


def _thumb(image: np.ndarray, px: int = THUMB_PX) -> np.ndarray:
    h, w = image.shape[:2]
    scale = px / max(h, w)
    if scale >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _data_url(image_bgr_or_grey: np.ndarray) -> str:
    ok, buf = cv2.imencode(".jpg", image_bgr_or_grey, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("could not encode a gallery picture as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


@dataclass
class GalleryItem:
    """One frame for the gallery: the picture, its heatmap overlay and (where known) its ground truth."""

    name: str
    label: str  # "good", or the defect type
    defective: bool
    score: float
    threshold: float | None  # None: no verdict to show (the map scored is not the one the threshold belongs to)
    image: np.ndarray  # uint8 RGB
    overlay: np.ndarray  # uint8 BGR, from edge_runtime.core.overlay.heatmap_overlay
    mask: np.ndarray | None = None  # ground truth (bool / 0-255, H x W); None where nobody drew one

    @property
    def verdict(self) -> str | None:
        return None if self.threshold is None else ("fail" if self.score >= self.threshold else "pass")

    @property
    def wrong(self) -> bool:
        return self.verdict is not None and (self.verdict == "fail") != self.defective


class WorstFrames:
    """Keeps, while frames are scored one by one, the ``n`` good frames with the highest scores (the worst
    false alarms) and the ``n`` defective frames with the lowest (the worst misses), as thumbnails, so that
    memory stays bounded however many frames go through; overlays are drawn only for frames that enter."""

    def __init__(self, n: int = 6, thumb_px: int = THUMB_PX) -> None:
        self.n = n
        self.thumb_px = thumb_px
        self._alarms: list[tuple[float, int, GalleryItem]] = []  # min-heap on score
        self._misses: list[tuple[float, int, GalleryItem]] = []  # min-heap on -score
        self._seq = itertools.count()

    def offer(self, name: str, label: str, defective: bool, score: float, image_rgb: np.ndarray,
              heatmap: np.ndarray, colour_threshold: float, threshold: float | None, mask: np.ndarray | None = None,
              regions: list | None = None) -> None:
        """``colour_threshold`` anchors the overlay's colours; ``threshold`` gives the verdict (None: none)."""
        if self.n <= 0:
            return
        heap = self._misses if defective else self._alarms
        key = -float(score) if defective else float(score)
        if len(heap) >= self.n and key <= heap[0][0]:
            return
        overlay = heatmap_overlay(image_rgb, heatmap, colour_threshold, regions=regions)
        picture = resize_rgb(image_rgb, heatmap.shape[:2])
        small_mask = None
        if mask is not None:
            small_mask = _thumb(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), self.thumb_px)
        item = GalleryItem(name=name, label=label, defective=defective, score=float(score), threshold=threshold,
                           image=_thumb(picture, self.thumb_px), overlay=_thumb(overlay, self.thumb_px),
                           mask=small_mask)
        entry = (key, next(self._seq), item)
        if len(heap) < self.n:
            heapq.heappush(heap, entry)
        else:
            heapq.heapreplace(heap, entry)

    @property
    def false_alarms(self) -> list[GalleryItem]:
        """Good frames, highest score first."""
        return [e[2] for e in sorted(self._alarms, key=lambda e: (-e[0], e[1]))]

    @property
    def misses(self) -> list[GalleryItem]:
        """Defective frames, lowest score first."""
        return [e[2] for e in sorted(self._misses, key=lambda e: (-e[0], e[1]))]


# --------------------------------------------------------------------------- charts

_W, _H = 340, 270
_ML, _MR, _MT, _MB = 50, 14, 28, 42


@dataclass
class Curve:
    """One chart's data: a polyline from (x, y) arrays (already subsampled by whoever computed them)."""

    title: str
    x: np.ndarray
    y: np.ndarray
    xlabel: str
    ylabel: str
    xlim: tuple[float, float] = (0.0, 1.0)
    ylim: tuple[float, float] = (0.0, 1.0)
    note: str = ""  # e.g. "AUROC = 0.912", written in the plot
    step: bool = False  # drawn as steps ("post"), as a PR curve is
    diagonal: bool = False  # the chance line of a ROC


class _Frame:
    """Data -> pixel mapping of one chart, with its axes, ticks and labels."""

    def __init__(self, xlim: tuple[float, float], ylim: tuple[float, float], width: int = _W, height: int = _H) -> None:
        self.w, self.h = width, height
        self.x0, self.x1 = xlim
        self.y0, self.y1 = ylim
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1.0
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1.0

    def sx(self, x: np.ndarray | float) -> np.ndarray | float:
        return _ML + (np.asarray(x, dtype=np.float64) - self.x0) / (self.x1 - self.x0) * (self.w - _ML - _MR)

    def sy(self, y: np.ndarray | float) -> np.ndarray | float:
        return self.h - _MB - (np.asarray(y, dtype=np.float64) - self.y0) / (self.y1 - self.y0) * (self.h - _MT - _MB)

    def axes(self, title: str, xlabel: str, ylabel: str, xticks: Sequence[float] | None = None,
             yticks: Sequence[float] | None = None) -> list[str]:
        left, right, top, bottom = _ML, self.w - _MR, _MT, self.h - _MB
        parts = [f'<text class="title" x="{self.w / 2:.0f}" y="17" text-anchor="middle">{_e(title)}</text>',
                 f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
                 'stroke="#999"/>']
        for v in xticks if xticks is not None else np.linspace(self.x0, self.x1, 6):
            px = float(self.sx(v))
            parts.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" stroke="#999"/>'
                         f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#eee"/>'
                         f'<text x="{px:.1f}" y="{bottom + 15}" text-anchor="middle">{_e(_tick(v))}</text>')
        for v in yticks if yticks is not None else np.linspace(self.y0, self.y1, 6):
            py = float(self.sy(v))
            parts.append(f'<line x1="{left - 4}" y1="{py:.1f}" x2="{left}" y2="{py:.1f}" stroke="#999"/>'
                         f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#eee"/>'
                         f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{_e(_tick(v))}</text>')
        parts.append(f'<text x="{(left + right) / 2:.0f}" y="{self.h - 8}" text-anchor="middle">{_e(xlabel)}</text>')
        parts.append(f'<text x="13" y="{(top + bottom) / 2:.0f}" text-anchor="middle" '
                     f'transform="rotate(-90 13 {(top + bottom) / 2:.0f})">{_e(ylabel)}</text>')
        return parts


def _tick(v: float) -> str:
    v = float(v)
    if v == 0.0:
        return "0"
    return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.1e}"


def _points(xs: np.ndarray, ys: np.ndarray) -> str:
    """SVG polyline points, rounded to 0.1 px, consecutive duplicates dropped (most points of a long curve)."""
    out, last = [], None
    for x, y in zip(np.round(xs, 1).tolist(), np.round(ys, 1).tolist(), strict=True):
        if (x, y) != last:
            out.append(f"{x:g},{y:g}")
            last = (x, y)
    return " ".join(out)


def _svg(parts: list[str], label: str, width: int = _W, height: int = _H) -> str:
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_e(label)}">' + "".join(parts) + "</svg>")


def svg_curve(curve: Curve) -> str:
    """A line chart with axes, ticks and labels, clipped to its limits."""
    frame = _Frame(curve.xlim, curve.ylim)
    parts = frame.axes(curve.title, curve.xlabel, curve.ylabel)
    x = np.asarray(curve.x, dtype=np.float64)
    y = np.asarray(curve.y, dtype=np.float64)
    if curve.diagonal:
        parts.append(f'<line x1="{float(frame.sx(0)):.1f}" y1="{float(frame.sy(0)):.1f}" x2="{float(frame.sx(1)):.1f}"'
                     f' y2="{float(frame.sy(1)):.1f}" stroke="#aaa" stroke-dasharray="4 3"/>')
    if x.size:
        if curve.step and x.size > 1:  # "post" steps: hold y until the next x
            x = np.repeat(x, 2)[1:]
            y = np.repeat(y, 2)[:-1]
        keep = (x >= curve.xlim[0]) & (x <= curve.xlim[1])
        parts.append(f'<polyline class="curve" fill="none" stroke="{GOOD_COLOUR}" stroke-width="1.6" '
                     f'points="{_points(frame.sx(x[keep]), frame.sy(np.clip(y[keep], *curve.ylim)))}"/>')
    else:
        parts.append(f'<text x="{_W / 2:.0f}" y="{_H / 2:.0f}" text-anchor="middle">not defined on this data</text>')
    if curve.note:
        parts.append(f'<text x="{_W - _MR - 8}" y="{_H - _MB - 10}" text-anchor="end">{_e(curve.note)}</text>')
    return _svg(parts, curve.title)


def svg_histogram(good: Sequence[float] | np.ndarray, bad: Sequence[float] | np.ndarray | None,
                  threshold: float | None, marks: Sequence[tuple[float, str]] = (), bins: int = 40,
                  title: str = "Image scores", width: int = 2 * _W + 12) -> str:
    """Overlaid histograms of good and defective scores, the threshold as a solid line and ``marks`` (other
    thresholds, e.g. at a false-reject rate) dashed."""
    good = np.asarray(good, dtype=np.float64)
    bad = np.asarray(bad if bad is not None else [], dtype=np.float64)
    values = np.concatenate([good, bad] + [np.array([threshold])] * (threshold is not None))
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    counts = [np.histogram(s, edges)[0] for s in (good, bad)]
    top = max(1, int(max(c.max(initial=0) for c in counts)))
    frame = _Frame((float(edges[0]), float(edges[-1])), (0.0, top * 1.08), width, _H)
    yticks = np.unique(np.linspace(0, top, min(top, 5) + 1).round())
    parts = frame.axes(title, "image score", "images", yticks=yticks)
    for c, colour, name in ((counts[0], GOOD_COLOUR, "good"), (counts[1], BAD_COLOUR, "defective")):
        for i in np.flatnonzero(c):
            x0, x1 = float(frame.sx(edges[i])), float(frame.sx(edges[i + 1]))
            y = float(frame.sy(c[i]))
            parts.append(f'<rect class="bar-{name}" x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                         f'height="{float(frame.sy(0)) - y:.1f}" fill="{colour}" fill-opacity="0.55"/>')
    for value, text, dash in ([(threshold, f"threshold {threshold:.4g}", "")] if threshold is not None else []) + \
            [(v, t, "4 3") for v, t in marks]:
        if not lo - pad <= value <= hi + pad:
            continue
        px = float(frame.sx(value))
        parts.append(f'<line class="threshold" x1="{px:.1f}" y1="{_MT}" x2="{px:.1f}" y2="{_H - _MB}" '
                     f'stroke="{LINE_COLOUR}" stroke-width="{1.2 if not dash else 0.8}"'
                     + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        if not dash:
            right = px > 0.7 * width  # label on the side with room
            anchor = "end" if right else "start"
            parts.append(f'<text x="{px - 3 if right else px + 3:.1f}" y="{_MT + 12}" text-anchor="{anchor}">'
                         f"{_e(text)}</text>")
    legend = [("good", GOOD_COLOUR, good.size)] + ([("defective", BAD_COLOUR, bad.size)] if bad.size else [])
    for i, (name, colour, n) in enumerate(legend):  # in the top margin, right: never over a bar
        x = width - _MR - 110 * (len(legend) - i)
        parts.append(f'<rect x="{x}" y="9" width="9" height="9" fill="{colour}" fill-opacity="0.6"/>'
                     f'<text x="{x + 13}" y="17">{_e(name)} ({n})</text>')
    return _svg(parts, title, width, _H)


# --------------------------------------------------------------------------- tables


def _facts(rows: Sequence[tuple[str, object]]) -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows if v is not None)
    return f'<table class="facts">{body}</table>'


def _detection_cell(d: dict | None, defect: str) -> str:
    if d is None:
        return _cell(None, "n/a", metric="detection_at_frr", defect=defect)
    text = f"{_pct(d['detection_rate'])} ({d['detected']}/{d['n_defective']})" + ("" if d["resolved"] else " *")
    cell = _cell(d["detection_rate"], text, metric="detection_at_frr", frr=_exact(d["false_reject_rate"]),
                 defect=defect)
    return cell if d["resolved"] else cell.replace("<td ", '<td class="unresolved" ', 1)


def metrics_table(metrics: dict) -> str:
    """Overall and per defect type: the four localisation / detection metrics and detection at the line's
    false-reject rates (``detection_at_frr``, overall and in each ``per_defect`` row where present)."""
    overall_det = metrics.get("detection_at_frr") or []
    rates = [d["false_reject_rate"] for d in overall_det]
    for row in metrics.get("per_defect", {}).values():
        if not rates and row.get("detection_at_frr"):
            rates = [d["false_reject_rate"] for d in row["detection_at_frr"]]
    head = ('<tr><th class="name">defect type</th><th>images</th><th>defective</th>'
            + "".join(f"<th>{_e(label)}</th>" for _, label in METRICS)
            + "".join(f"<th>detection at FRR {_e(f'{100 * r:g}')} %</th>" for r in rates) + "</tr>")

    def row_html(name: str, row: dict, det: list[dict] | None, css: str = "") -> str:
        by_rate = {d["false_reject_rate"]: d for d in det or []}
        cells = [f'<td class="name">{_e(name)}</td>',
                 _cell(row.get("n_images"), str(row.get("n_images", "")), metric="n_images", defect=name),
                 _cell(row.get("n_defective"), str(row.get("n_defective", "")), metric="n_defective", defect=name)]
        cells += [_cell(row.get(key), _fmt(row.get(key)), metric=key, defect=name) for key, _ in METRICS]
        cells += [_detection_cell(by_rate.get(r), name) for r in rates]
        return f'<tr class="{css}" data-defect="{_e(name)}">' + "".join(cells) + "</tr>"

    rows = [row_html("overall", metrics, overall_det, "overall")]
    rows += [row_html(name, row, row.get("detection_at_frr")) for name, row in metrics.get("per_defect", {}).items()]
    unresolved = any(not d["resolved"] for d in overall_det)
    note = ('<p class="note">Detection at FRR x %: the share of defective images scored at or above the strictest '
            'threshold that rejects at most x % of the good images. Per defect type, the good images plus that '
            'type\'s images.' + (" * fewer good images than 1 / x: the rate is not resolved, the threshold is "
                                 "above every good score." if unresolved else "") + "</p>")
    return f'<table class="metrics" id="metrics">{head}{"".join(rows)}</table>{note}'


def _at_threshold_table(at: dict, threshold: float) -> str:
    rows = [("false-reject rate (good images)", "false_reject_rate", at.get("false_reject_rate"),
             f"{_pct(at.get('false_reject_rate'))} of {at.get('n_good')}", "false_reject_upper95",
             at.get("false_reject_upper95"), "95 % upper bound"),
            ("detection rate (defective images)", "detection_rate", at.get("detection_rate"),
             f"{_pct(at.get('detection_rate'))} of {at.get('n_defective')}", "detection_lower95",
             at.get("detection_lower95"), "95 % lower bound")]
    body = "".join(f'<tr><td class="name">{_e(name)}</td>{_cell(v, text, metric=key, defect="overall")}'
                   f'{_cell(b, _pct(b), metric=bkey, defect="overall")}<td class="name">{_e(blabel)}</td></tr>'
                   for name, key, v, text, bkey, b, blabel in rows)
    return (f'<p>At the bundle threshold <b data-metric="threshold" data-value="{_exact(threshold)}">'
            f'{_e(f"{threshold:.4g}")}</b>:</p><table class="rates">{body}</table>')


# --------------------------------------------------------------------------- gallery


def _figure(item: GalleryItem) -> str:
    verdict = item.verdict
    caption = f"{item.label} · score {item.score:.4g}"
    if verdict is not None and item.threshold is not None:
        caption += f" {'≥' if verdict == 'fail' else '<'} threshold {item.threshold:.4g}: {verdict.upper()}"
        if item.wrong:
            caption += " (false alarm)" if not item.defective else " (missed)"
    mask = (f'<img alt="ground truth of {_e(item.name)}" src="{_data_url(item.mask)}">' if item.mask is not None
            else '<div class="nomask">no ground truth</div>')
    pics = (f'<div><img alt="{_e(item.name)}" src="{_data_url(cv2.cvtColor(item.image, cv2.COLOR_RGB2BGR))}">'
            '<span>image</span></div>'
            f'<div><img alt="heatmap of {_e(item.name)}" src="{_data_url(item.overlay)}"><span>heatmap</span></div>'
            f"<div>{mask}<span>ground truth</span></div>")
    return (f'<figure class="{"wrong" if item.wrong else ""}" data-name="{_e(item.name)}" '
            f'data-score="{_exact(item.score)}"><div class="pics">{pics}</div>'
            f"<figcaption>{_e(caption)}<br>{_e(item.name)}</figcaption></figure>")


def _gallery(title: str, intro: str, items: Sequence[GalleryItem], css_id: str) -> str:
    body = "".join(_figure(i) for i in items) or '<p class="note">none</p>'
    return f'<h2 id="{_e(css_id)}">{_e(title)}</h2><p class="note">{_e(intro)}</p><div class="gallery">{body}</div>'


# --------------------------------------------------------------------------- pages


def _page(title: str, subtitle: str, body: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"note\">{_e(subtitle)}</p>" + "".join(body) + "</body></html>\n")


def _frr_marks(det: Sequence[dict] | None) -> list[tuple[float, str]]:
    return [(d["threshold"], f"FRR {100 * d['false_reject_rate']:g} %") for d in det or [] if d["resolved"]]


def render_evaluation_report(metrics: dict, curves: Sequence[Curve], good_scores: Sequence[float] | np.ndarray,
                             bad_scores: Sequence[float] | np.ndarray, misses: Sequence[GalleryItem],
                             false_alarms: Sequence[GalleryItem], facts: Sequence[tuple[str, object]]) -> str:
    """The page for ``weakrest-train eval``: ``metrics`` is what metrics.json holds; ``facts`` the bundle,
    data folder, date... shown at the top."""
    threshold = metrics.get("threshold")
    body = [_facts(facts), "<h2>Metrics</h2>", metrics_table(metrics)]
    if metrics.get("at_threshold") and threshold is not None:
        body.append(_at_threshold_table(metrics["at_threshold"], threshold))
    elif threshold is None:
        body.append('<p class="note">No verdict: the map evaluated is not the one the bundle threshold was set '
                    "on.</p>")
    body += ["<h2>Curves</h2>", '<div class="charts">' + "".join(svg_curve(c) for c in curves) + "</div>",
             "<h2>Image scores</h2>",
             '<div class="charts">' + svg_histogram(good_scores, bad_scores, threshold,
                                                    _frr_marks(metrics.get("detection_at_frr"))) + "</div>",
             '<p class="note">Solid line: the bundle threshold; dashed: the thresholds at FRR 0.5 / 1 / 2 % '
             "(where the good images resolve them).</p>",
             _gallery("Worst misses", "Defective images with the lowest scores, lowest first.", misses, "misses"),
             _gallery("Worst false alarms", "Good images with the highest scores, highest first.", false_alarms,
                      "false-alarms")]
    return _page(f"Evaluation: {metrics.get('product', '')} {metrics.get('bundle_version', '')}",
                 "weakrest-train eval · metrics on the bundle's input-size maps", body)


def render_verify_report(report: dict, good_scores: Sequence[float] | np.ndarray,
                         bad_scores: Sequence[float] | np.ndarray | None, misses: Sequence[GalleryItem],
                         false_alarms: Sequence[GalleryItem], facts: Sequence[tuple[str, object]]) -> str:
    """The page for ``weakrest-calibrate verify``: ``report`` is what verify.json holds."""
    threshold = report["threshold"]
    good, bad = report["good"], report.get("bad")
    target = report.get("target_false_reject")
    rows = ['<tr><td class="name">false-reject rate (good frames)</td>'
            + _cell(good["rate"], f"{_pct(good['rate'])} ({good['n_fail']}/{good['n']})", metric="false_reject_rate")
            + _cell(good["upper95"], _pct(good["upper95"]), metric="false_reject_upper95")
            + f'<td class="name">95 % upper bound; target {_e(_pct(target))}</td></tr>']
    if bad is not None:
        rows.append('<tr><td class="name">detection rate (defective frames)</td>'
                    + _cell(bad["rate"], f"{_pct(bad['rate'])} ({bad['n_fail']}/{bad['n']})", metric="detection_rate")
                    + _cell(bad["lower95"], _pct(bad["lower95"]), metric="detection_lower95")
                    + '<td class="name">95 % lower bound</td></tr>')
    body = [_facts(facts), "<h2>Rates at the bundle threshold</h2>",
            f'<p>Threshold <b data-metric="threshold" data-value="{_exact(threshold)}">{_e(f"{threshold:.4g}")}</b>'
            '</p>', f'<table class="rates" id="rates">{"".join(rows)}</table>']
    det = report.get("detection_at_frr")
    if det:
        head = "<tr><th class=\"name\">false-reject rate</th><th>detection</th><th>threshold</th></tr>"
        trs = "".join('<tr><td class="name">' + _e(f"{100 * d['false_reject_rate']:g} %") + "</td>"
                      + _detection_cell(d, "overall")
                      + _cell(d["threshold"], f"{d['threshold']:.4g}", metric="frr_threshold",
                              frr=_exact(d["false_reject_rate"])) + "</tr>" for d in det)
        body += ["<h2>Detection at the line's false-reject rates</h2>", f"<table>{head}{trs}</table>"]
        if any(not d["resolved"] for d in det):
            body.append(f'<p class="note">* {good["n"]} good frames do not resolve this rate: the threshold is above '
                        "every good score.</p>")
    body += ["<h2>Frame scores</h2>",
             '<div class="charts">' + svg_histogram(good_scores, bad_scores, threshold, _frr_marks(det),
                                                    title="Frame scores") + "</div>",
             _gallery("Worst false alarms", "Good frames with the highest scores, highest first.", false_alarms,
                      "false-alarms")]
    if bad is not None:
        body.append(_gallery("Worst misses", "Defective frames with the lowest scores, lowest first.", misses,
                             "misses"))
    if report.get("unreadable"):
        body.append("<h2>Unreadable</h2><ul>" + "".join(f"<li>{_e(u)}</li>" for u in report["unreadable"]) + "</ul>")
    return _page(f"Verification: bundle {report.get('bundle_version', '')}",
                 "weakrest-calibrate verify · frames sorted by a person into good and defective", body)


def write_html(path: Path, text: str) -> Path:
    """Write atomically (temporary file, then rename): a half-written page is never left for a reader."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
