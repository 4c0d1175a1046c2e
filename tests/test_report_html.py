"""report.html: the one-page evaluation / verification report (issue 15, item 2).

Unit tests of the torch-free writer (escaping, self-contained, curves, histogram, gallery), then the real
``weakrest-train eval`` and ``weakrest-calibrate verify`` on the small demo product, with the page opened in
headless Chromium: the numbers it shows are the numbers of metrics.json / verify.json, and it makes no request.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.reporting.report_html import (
    Curve,
    GalleryItem,
    WorstFrames,
    metrics_table,
    render_evaluation_report,
    render_verify_report,
    svg_curve,
    svg_histogram,
)

NASTY = '<script>alert("x")</script> & \'q\''


def _item(name: str, defective: bool, score: float, mask: bool = True) -> GalleryItem:
    rng = np.random.default_rng(0)
    return GalleryItem(name=name, label="crack" if defective else "good", defective=defective, score=score,
                       threshold=0.5, image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                       overlay=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                       mask=(np.arange(64 * 64).reshape(64, 64) % 7 == 0) if mask else None)


def _metrics(defect: str = "crack") -> dict:
    det = [{"false_reject_rate": r, "threshold": 0.7 + r, "false_rejects": 0, "n_good": 10, "detected": 3,
            "n_defective": 4, "detection_rate": 0.75, "resolved": r >= 0.1} for r in (0.005, 0.01, 0.02)]
    return {"product": NASTY, "bundle_version": "v1", "image_auroc": 0.91234567, "pixel_auroc": 0.8, "pro": None,
            "pixel_ap": 0.3333333333333333, "n_images": 14, "n_defective": 4, "threshold": 0.5,
            "at_threshold": {"false_reject_rate": 0.1, "false_reject_upper95": 0.39, "detection_rate": 0.75,
                             "detection_lower95": 0.25, "n_good": 10, "n_defective": 4},
            "detection_at_frr": det,
            "per_defect": {defect: {"image_auroc": 0.9, "pixel_auroc": 0.7, "pro": 0.6, "pixel_ap": 0.2,
                                    "n_images": 14, "n_defective": 4, "detection_at_frr": det}}}


def _eval_page(**kw) -> str:
    curves = [Curve("Image ROC", np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 0.3, "FPR", "TPR", diagonal=True),
              Curve("Pixel PR", np.linspace(0, 1, 50), np.linspace(1, 0, 50), "recall", "precision", step=True),
              Curve("PRO", np.empty(0), np.empty(0), "FPR", "PRO", xlim=(0, 0.3))]
    args = {"metrics": _metrics(), "curves": curves, "good_scores": np.linspace(0.1, 0.55, 10),
            "bad_scores": [0.3, 0.6, 0.8, 0.9], "misses": [_item("bad/1.png", True, 0.3)],
            "false_alarms": [_item("good/9.png", False, 0.55), _item("good/8.png", False, 0.49, mask=False)],
            "facts": [("data", "/data/x"), ("date", "2026-01-01")]}
    args.update(kw)
    return render_evaluation_report(**args)


def _assert_self_contained(text: str) -> None:
    assert "http://" not in text and "https://" not in text and 'src="/' not in text
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert all(src.startswith("data:image/jpeg;base64,") for src in re.findall(r'src="([^"]*)"', text))


# ---- the writer -------------------------------------------------------------------------------------------

def test_every_outside_string_is_escaped():
    text = _eval_page(metrics=_metrics(defect=NASTY),
                      misses=[_item(NASTY, True, 0.2)], facts=[(NASTY, NASTY)])
    assert "<script>" not in text and 'alert("x")' not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;" in text
    assert re.search(r"<[a-z]+[^>]* on[a-z]+=", text) is None  # no event handler crept in


def test_page_is_self_contained_with_curves_histogram_and_gallery():
    text = _eval_page()
    _assert_self_contained(text)
    assert text.count('<polyline class="curve"') == 2 and "not defined on this data" in text  # PRO: no data
    assert text.count("<figure") == 3 and text.count("data:image/jpeg") == 3 * 3 - 1  # one has no mask
    assert "no ground truth" in text and "(false alarm)" in text and "(missed)" in text
    assert 'class="threshold"' in text and "threshold 0.5" in text
    assert 'data-metric="image_auroc" data-defect="overall" data-value="0.91234567"' in text
    assert 'data-metric="pro" data-defect="overall" data-value=""' in text  # None: n/a, no number
    assert 'data-metric="pixel_ap" data-defect="overall" data-value="0.3333333333333333">0.333<' in text


def test_metrics_table_marks_unresolved_rates():
    table = metrics_table(_metrics())
    assert table.count('data-metric="detection_at_frr"') == 6  # 3 rates x (overall + crack)
    assert table.count('class="unresolved"') == 6 and "not resolved" in table
    assert 'data-frr="0.005"' in table and "75.0 % (3/4) *" in table


def test_charts_scale_and_clip():
    svg = svg_curve(Curve("PRO", np.array([0.0, 0.1, 0.3, 1.0]), np.array([0.0, 0.5, 0.9, 1.0]), "FPR", "PRO",
                          xlim=(0.0, 0.3)))
    points = re.search(r'points="([^"]*)"', svg).group(1).split()
    assert len(points) == 3  # the point at FPR 1 is outside the axis
    hist = svg_histogram([0.1, 0.2, 0.2], None, threshold=0.3, marks=[(0.15, "FRR 1 %"), (9.0, "off the axis")])
    assert hist.count('class="bar-good"') == 2 and "bar-defective" not in hist
    assert hist.count('class="threshold"') == 2 and "threshold 0.3" in hist


def test_worst_frames_keeps_the_worst_few():
    worst = WorstFrames(n=2, thumb_px=32)
    image, heat = np.zeros((80, 60, 3), np.uint8), np.zeros((40, 40), np.float32)
    for i, score in enumerate([0.1, 0.9, 0.5, 0.7]):
        worst.offer(f"good/{i}", "good", False, score, image, heat, 0.5, 0.5)
        worst.offer(f"bad/{i}", "crack", True, score, image, heat, 0.5, 0.5, mask=np.ones((40, 40), bool))
    assert [i.score for i in worst.false_alarms] == [0.9, 0.7]
    assert [i.score for i in worst.misses] == [0.1, 0.5]
    assert worst.misses[0].image.shape == (32, 32, 3) and worst.misses[0].mask.max() == 255
    assert all(i.wrong for i in worst.false_alarms) and [i.wrong for i in worst.misses] == [True, False]


def test_verify_page_without_defective_frames():
    report = {"bundle_version": "v2", "threshold": 0.5, "target_false_reject": 0.005, "unreadable": ["x.png: bad"],
              "good": {"n": 40, "n_fail": 0, "rate": 0.0, "upper95": 0.0721, "lower95": 0.0}, "bad": None,
              "detection_at_frr": None}
    text = render_verify_report(report, np.linspace(0, 0.4, 40), None, [], [_item("a.png", False, 0.4)], [])
    _assert_self_contained(text)
    assert 'data-metric="false_reject_upper95" data-value="0.0721"' in text
    assert "Worst misses" not in text and "x.png: bad" in text


# ---- end to end: the real eval and verify, the page in Chromium ------------------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, fitted_slice, demo_data):
    from training_host import cli as train_cli

    out = tmp_path_factory.mktemp("report") / "eval"
    assert train_cli.main(["eval", "--bundle", str(fitted_slice[0]), "--data", str(demo_data), "--out", str(out),
                           "--json"]) == 0
    return out


def _cells(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#metrics td[data-metric]",
        "tds => tds.map(td => ({metric: td.dataset.metric, defect: td.dataset.defect, frr: td.dataset.frr ?? null,"
        " value: td.dataset.value, text: td.textContent}))")


def _open(page, path: Path) -> list[str]:
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return requests


def _no_network(requests: list[str], path: Path) -> None:
    assert requests and requests[0] == path.as_uri()
    assert all(u == path.as_uri() or u.startswith("data:") for u in requests), requests


def test_eval_writes_a_report_equal_to_metrics_json(evaluated, demo_data):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    text = (evaluated / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(text)
    assert (evaluated / "report.html").stat().st_size < 3_000_000
    assert metrics["data"] == str(demo_data) and str(demo_data) in text and metrics["evaluated_at"] in text
    assert text.count('<polyline class="curve"') == 3
    n_bad = metrics["n_defective"]
    n_good = metrics["n_images"] - n_bad
    assert text.count("<figure") == min(6, n_bad) + min(6, n_good)
    for name, row in metrics["per_defect"].items():  # per defect type, the same helper as overall
        n = row["n_defective"]
        assert [d["n_defective"] for d in row["detection_at_frr"]] == [n, n, n], name


@pytest.mark.pages
def test_eval_report_in_chromium_shows_metrics_json(evaluated, page, screenshot):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    path = evaluated / "report.html"
    requests = _open(page, path)
    cells = _cells(page)
    rows = {"overall": metrics, **metrics["per_defect"]}
    seen = 0
    for cell in cells:
        row = rows[cell["defect"]]
        if cell["metric"] == "detection_at_frr":
            want = next(d for d in row["detection_at_frr"] if repr(d["false_reject_rate"]) == cell["frr"])
            want = want["detection_rate"]
        else:
            want = row[cell["metric"]]
        assert (float(cell["value"]) if cell["value"] else None) == want, cell
        if want is not None and cell["metric"] in ("image_auroc", "pixel_auroc", "pro", "pixel_ap"):
            assert cell["text"] == f"{want:.3f}"
        seen += 1
    assert seen == len(rows) * (2 + 4 + 3)  # images, defective, 4 metrics, 3 FRR rates per row
    assert float(page.get_attribute('[data-metric="threshold"]', "data-value")) == metrics["threshold"]
    at = metrics["at_threshold"]
    for key in ("false_reject_rate", "false_reject_upper95", "detection_rate", "detection_lower95"):
        assert float(page.get_attribute(f'.rates [data-metric="{key}"]', "data-value")) == at[key]
    shown = page.eval_on_selector_all("figure img", "imgs => imgs.map(i => i.naturalWidth > 0 && i.complete)")
    assert shown and all(shown)  # every picture decodes
    assert page.locator("svg polyline.curve").count() == 3
    _no_network(requests, path)
    screenshot(page, "report")


@pytest.mark.pages
def test_verify_report_in_chromium_shows_verify_json(fitted_slice, demo_data, tmp_path, page, screenshot, capsys):
    from calibration.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    for d in (demo_data / "test").iterdir():
        if d.is_dir() and d.name != "good":
            (bad / d.name).symlink_to(d)
    out = tmp_path / "verify"
    assert main(["verify", "--bundle", str(fitted_slice[0]), "--good", str(demo_data / "test" / "good"),
                 "--bad", str(bad), "--out", str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    report = json.loads((out / "verify.json").read_text())
    path = out / "report.html"
    assert report["report_html"] == str(path)
    _assert_self_contained(path.read_text(encoding="utf-8"))
    requests = _open(page, path)

    def value(selector: str) -> float:
        return float(page.get_attribute(selector, "data-value"))

    assert value('#rates [data-metric="false_reject_rate"]') == report["false_reject_rate"]
    assert value('#rates [data-metric="false_reject_upper95"]') == report["good"]["upper95"]
    assert value('#rates [data-metric="detection_rate"]') == report["detection_rate"]
    assert value('#rates [data-metric="detection_lower95"]') == report["bad"]["lower95"]
    assert value('[data-metric="threshold"]') == report["threshold"]
    for d in report["detection_at_frr"]:
        assert value(f'[data-metric="detection_at_frr"][data-frr="{d["false_reject_rate"]!r}"]') == d["detection_rate"]
    n_good, n_bad = report["good"]["n"], report["bad"]["n"]
    assert page.locator("figure").count() == min(6, n_good) + min(6, n_bad)
    assert page.locator("svg rect.bar-good").count() > 0 and page.locator("svg line.threshold").count() >= 1
    _no_network(requests, path)
    screenshot(page, "verify-report")
