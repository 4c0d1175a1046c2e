"""``verify``: how a bundle does on frames a person has sorted into good and (optionally) defective.

The false-reject rate on good frames is the number a line manager asks for; with few frames it is
reported with a one-sided 95 % upper bound (Clopper-Pearson), because "0 of 40 rejected" does not show
a 0.5 % target.  With defective frames too, the detection rate is also given at the thresholds that would
reject 0.5 %, 1 % and 2 % of the good frames (what the line would catch if run at that rate).  The contact
sheet puts the frames that need a look first (see :mod:`calibration.contact_sheet`); ``report.html`` puts
the rates, a histogram of the scores with the threshold and the worst frames on one self-contained page
(the writer ``weakrest-train eval`` uses too: :mod:`edge_runtime.reporting.report_html`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from edge_runtime.core.bundle import BundleError
from edge_runtime.core.pipeline import Inspector, open_inspector
from edge_runtime.core.preprocess import IMAGE_SUFFIXES, ImageReadError, read_image
from edge_runtime.core.thresholds import detection_at_false_reject, rate_lower_bound, rate_upper_bound
from edge_runtime.reporting.report_html import WorstFrames, render_verify_report, write_html

from .contact_sheet import SheetBuilder, write_sheet
from .errors import CalibrationError

REPORT_GALLERY = 6  # worst false alarms and worst misses shown in report.html


@dataclass
class Rate:
    """Frames that got the verdict ``fail``, out of ``n``."""

    n: int
    n_fail: int
    rate: float
    upper95: float  # upper bound of the fail rate
    lower95: float  # lower bound of the fail rate
    listed: list[dict] = field(default_factory=list)  # the frames a person should look at
    scores: list[float] = field(default_factory=list, repr=False)


@dataclass
class VerifyReport:
    bundle: str
    bundle_version: str
    threshold: float
    target_false_reject: float
    good: Rate
    bad: Rate | None
    unreadable: list[str]
    contact_sheet: str | None
    seconds: float
    detection_at_frr: list[dict] | None = None  # with defective frames: detection at FRR 0.5 / 1 / 2 %
    report_html: str | None = None  # the one-page report, with --out

    @property
    def false_reject_rate(self) -> float:
        return self.good.rate

    @property
    def detection_rate(self) -> float | None:
        return self.bad.rate if self.bad else None

    def to_json(self) -> dict:
        out = asdict(self)
        for rate in (out["good"], out["bad"]):
            if rate is not None:
                rate.pop("scores")
        out["false_reject_rate"] = self.false_reject_rate
        out["detection_rate"] = self.detection_rate
        return out


def _images(folder: Path) -> list[Path]:
    """Images under ``folder``, sorted, following symbolic links to folders (a subset made of links)."""
    found = []
    for root, _dirs, files in os.walk(folder, followlinks=True):
        found += [Path(root) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _run(inspector: Inspector, folder: Path, expected: str, sheet: SheetBuilder, unreadable: list[str],
         quiet: bool, worst: WorstFrames | None = None) -> Rate:
    paths = _images(folder)
    scored: list[tuple[str, float]] = []
    for path in tqdm(paths, desc=f"{expected} frames", unit="frame", disable=quiet):
        name = str(path.relative_to(folder))
        try:
            image = read_image(path)
        except ImageReadError as exc:
            unreadable.append(str(exc))
            continue
        result = inspector.inspect(image)
        scored.append((name, result.score))
        sheet.add(name, expected, image, result.heatmap, result.score, result.threshold, result.regions)
        if worst is not None:
            worst.offer(name, expected, expected == "bad", result.score, image, result.heatmap, result.threshold,
                        result.threshold, regions=result.regions)
    if not scored:
        raise CalibrationError(f"{folder}: no readable image to verify on")
    fails = [(n, s) for n, s in scored if s >= inspector.threshold]
    k, n = len(fails), len(scored)
    wrong = fails if expected == "good" else [(nm, s) for nm, s in scored if s < inspector.threshold]
    wrong.sort(key=lambda t: -t[1] if expected == "good" else t[1])
    return Rate(n=n, n_fail=k, rate=k / n, upper95=rate_upper_bound(k, n), lower95=rate_lower_bound(k, n),
                listed=[{"file": nm, "score": round(s, 6)} for nm, s in wrong], scores=[s for _, s in scored])


def verify(bundle: Path, good: Path, bad: Path | None = None, out: Path | None = None, max_tiles: int = 48,
           quiet: bool = False, threads: int | None = None) -> VerifyReport:
    """Inspect every image under ``good`` (and ``bad``) with the bundle; write the sheet and report to ``out``."""
    t0 = time.perf_counter()
    for folder in (good, bad):
        if folder is not None and not folder.is_dir():
            raise CalibrationError(f"{folder}: no such folder")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CalibrationError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        inspector = open_inspector(bundle, threads=threads)
    except BundleError as exc:
        raise CalibrationError(f"bundle {bundle} refused: {exc}") from None
    m = inspector.bundle.manifest
    sheet = SheetBuilder(max_tiles if out is not None else 0)
    unreadable: list[str] = []
    worst = WorstFrames(REPORT_GALLERY) if out is not None else None
    good_rate = _run(inspector, good, "good", sheet, unreadable, quiet, worst)
    bad_rate = _run(inspector, bad, "bad", sheet, unreadable, quiet, worst) if bad is not None else None
    sheet_path = None
    report = VerifyReport(bundle=str(bundle), bundle_version=m.bundle_version, threshold=inspector.threshold,
                          target_false_reject=m.thresholds.target_false_reject, good=good_rate, bad=bad_rate,
                          unreadable=unreadable, contact_sheet=None, seconds=0.0,
                          detection_at_frr=(detection_at_false_reject(good_rate.scores, bad_rate.scores)
                                            if bad_rate is not None else None))
    if out is not None:
        try:
            sheet_path = write_sheet(sheet.ordered(), out / "contact_sheet.png")
            report.contact_sheet = str(sheet_path)
            report.report_html = str(out / "report.html")
            report.seconds = round(time.perf_counter() - t0, 2)
            facts = [("bundle", str(bundle)), ("bundle version", m.bundle_version), ("product", m.product),
                     ("good frames", str(good)), ("defective frames", str(bad) if bad is not None else "none given"),
                     ("verified at", time.strftime("%Y-%m-%dT%H:%M:%S")),
                     ("threshold", f"{inspector.threshold:.6g} (target false-reject rate "
                                   f"{m.thresholds.target_false_reject:.2%})"),
                     ("contact sheet", sheet_path.name)]
            write_html(out / "report.html", render_verify_report(
                report.to_json(), good_rate.scores, bad_rate.scores if bad_rate is not None else None,
                worst.misses if worst else [], worst.false_alarms if worst else [], facts))
            (out / "verify.json").write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CalibrationError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def describe(report: VerifyReport) -> list[str]:
    g = report.good
    verdict = ("within" if g.upper95 <= report.target_false_reject else
               "above" if g.lower95 > report.target_false_reject else "not shown to be within")
    lines = [f"bundle {report.bundle_version}, threshold {report.threshold:.4g}",
             f"false rejects: {g.n_fail}/{g.n} good frames = {g.rate:.2%} (95 % upper bound {g.upper95:.2%}), "
             f"{verdict} the target {report.target_false_reject:.2%}"]
    if g.upper95 > report.target_false_reject and g.n_fail == 0:
        lines.append(f"  ({math.ceil(-math.log(0.05) / report.target_false_reject)} good frames without a reject "
                     "would show the target)")
    lines += [f"  rejected good frame: {x['file']} score {x['score']:.4g}" for x in g.listed[:10]]
    if report.bad is not None:
        b = report.bad
        lines.append(f"detection: {b.n_fail}/{b.n} defective frames = {b.rate:.2%} (95 % lower bound {b.lower95:.2%})")
        lines += [f"  missed defective frame: {x['file']} score {x['score']:.4g}" for x in b.listed[:10]]
        for d in report.detection_at_frr or []:
            shown = "" if d["resolved"] else f" (not resolved by {d['n_good']} good frames)"
            lines.append(f"at a false-reject rate of {d['false_reject_rate']:.1%}{shown}: detection "
                         f"{d['detected']}/{d['n_defective']} = {d['detection_rate']:.2%}, threshold "
                         f"{d['threshold']:.4g}")
    lines += [f"unreadable: {u}" for u in report.unreadable]
    if report.contact_sheet:
        lines.append(f"contact sheet: {report.contact_sheet}")
    if report.report_html:
        lines.append(f"report: {report.report_html}")
    return lines
