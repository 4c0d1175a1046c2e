"""Issue 15 item 3, the weak-label annotation page: the real server (``training_host/labels/annotate.py``) on demo
images, driven by headless Chromium with the mouse and the keyboard; the file it writes is read with the loader
``fit --labels`` uses and a real (tiny) weak fit is run on it.

Also: an existing file is shown and the labels of images not on the page are kept; refused saves (a box outside the
image sent to the API, an unreadable file on disk) write nothing and the page says so; nothing outside IMAGES is
served; with ``--bundle`` the heatmap hint is drawn over the image.
"""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.core.bundle import load_bundle
from training_host import cli as train_cli
from training_host.labels.annotate import make_server
from training_host.labels.weak_labels import load_labels

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "input_size=[128,128]", "--set", "posfar.d_l=16", "--set", "posfar.k_references=8",
        "--set", "threshold.holdout_fraction=0.2", "--set", "swin.steps=8", "--set", "swin.warmup_steps=2",
        "--set", "swin.synthetic_per_image=1", "--set", "swin.batch_size=8", "--set", "weak.steps=4",
        "--set", "weak.rampup_steps=2"]
IMAGES = ("crack", "scratch")  # two folders of demo/test: keys relative to the dataset root found above them
KEYS = [f"test/{d}/{i:03d}.png" for d in IMAGES for i in range(3)]


@pytest.fixture
def annotate(demo_data):
    """``annotate(out, images=..., **kw)`` -> base URL of a running annotate server (stopped at teardown)."""
    servers = []

    def start(out: Path, images=None, **kw) -> str:
        srcs = images if images is not None else [demo_data / "test" / d for d in IMAGES]
        srv = make_server(srcs, out, **kw)
        srv.start()
        servers.append(srv)
        return srv.url

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _post_save(base: str, images: dict, headers: dict | None = None) -> tuple[int, dict]:
    code, body = _request(base + "api/save", json.dumps({"images": images}).encode(),
                          {"Content-Type": "application/json", **(headers or {})})
    return code, json.loads(body)


class _View:
    """Image pixel -> page position, from what the page says about its canvas (scale and offset in css px)."""

    def __init__(self, page) -> None:
        box = page.locator("#canvas").bounding_box()
        d = page.eval_on_selector("#canvas", "c => ({...c.dataset})")
        self.x0, self.y0 = box["x"] + float(d["ox"]), box["y"] + float(d["oy"])
        self.scale = float(d["scale"])
        self.size = (int(d["width"]), int(d["height"]))

    def at(self, x: float, y: float) -> tuple[float, float]:
        return self.x0 + x * self.scale, self.y0 + y * self.scale


def _open(page, base: str, key: str) -> _View:
    page.goto(base)
    return _wait_image(page, key)


def _wait_image(page, key: str) -> _View:
    page.wait_for_selector(f'#canvas[data-ready="{key}"]')
    return _View(page)


def _wait_saved(page) -> None:
    page.wait_for_function("document.getElementById('save-state').dataset.state === 'saved'"
                           " && !document.querySelector('.badge.dirty')")


def _expected_rotated(p1, p2, p3) -> tuple[float, float, float, float, float]:
    """The rotated box of three clicks, written out independently of the page: side p1-p2, depth to p3."""
    (x1, y1), (x2, y2), (x3, y3) = p1, p2, p3
    w = math.hypot(x2 - x1, y2 - y1)
    ux, uy = (x2 - x1) / w, (y2 - y1) / w
    d = ux * (y3 - y1) - uy * (x3 - x1)
    return (x1 + x2) / 2 - uy * d / 2, (y1 + y2) / 2 + ux * d / 2, w, abs(d), math.degrees(math.atan2(uy, ux))


def _around_defect(mask_path: Path) -> tuple[tuple[float, ...], list[tuple[float, float]]]:
    """(box, three clicks of a rotated box) around a defect mask, a few pixels loose, inside the image."""
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127
    hgt, wid = mask.shape
    ys, xs = np.nonzero(mask)
    x0, y0 = max(int(xs.min()) - 3, 1), max(int(ys.min()) - 3, 1)
    x1, y1 = min(int(xs.max()) + 4, wid - 1), min(int(ys.max()) + 4, hgt - 1)
    (cx, cy), (w, h), a = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
    corners = cv2.boxPoints(((cx, cy), (w + 6, h + 6), a))
    clicks = [(float(np.clip(px, 1, wid - 1)), float(np.clip(py, 1, hgt - 1))) for px, py in corners[:3]]
    return (x0, y0, x1 - x0, y1 - y0), clicks


@pytest.mark.pages
def test_draw_rotate_tag_navigate_save_and_fit_accepts(page, screenshot, annotate, demo_data, tmp_path):
    out = tmp_path / "labels.json"
    base = annotate(out)
    view = _open(page, base, KEYS[0])
    assert view.size == (256, 256) and view.scale > 1  # the demo images, shown enlarged
    assert page.locator("#image-list li").count() == len(KEYS)

    # a box around the defect (its mask tells where): drag on the first image
    box, clicks = _around_defect(demo_data / "ground_truth" / "crack" / "000_mask.png")
    x, y, w, h = box
    page.mouse.move(*view.at(x, y))
    page.mouse.down()
    page.mouse.move(*view.at(x + w / 2, y + h / 3), steps=4)
    page.mouse.move(*view.at(x + w, y + h), steps=4)
    page.mouse.up()
    page.wait_for_selector('#canvas[data-shapes="1"]')
    _wait_saved(page)
    # a rotated box: r, then two corners along one side and its depth
    page.keyboard.press("r")
    for cx, cy in clicks:
        page.mouse.click(*view.at(cx, cy))
    page.wait_for_selector('#canvas[data-shapes="2"]')
    _wait_saved(page)
    screenshot(page, "annotate")

    # keyboard: next, next, next, tag bad, back one; Ctrl+S
    page.keyboard.press("a")
    page.keyboard.press("j")
    _wait_image(page, KEYS[1])
    page.keyboard.press("ArrowRight")
    _wait_image(page, KEYS[2])
    page.keyboard.press("ArrowRight")
    _wait_image(page, KEYS[3])
    page.keyboard.press("b")
    page.wait_for_selector(f'#image-list li[data-key="{KEYS[3]}"][data-label="bad"]')
    page.keyboard.press("ArrowLeft")
    _wait_image(page, KEYS[2])
    page.keyboard.press("Control+s")
    _wait_saved(page)
    assert page.locator("#progress").inner_text() == f"2 of {len(KEYS)} images labelled"
    assert page.locator(f'#image-list li[data-key="{KEYS[0]}"] .badge').inner_text() == "1 box, 1 rot"

    # the file: what fit --labels reads, with the dataset root fit uses (--data)
    labels = load_labels(out, root=demo_data)
    assert sorted(labels.images) == [KEYS[0], KEYS[3]] and labels.warnings == []
    first = labels.images[KEYS[0]]
    tol = 1.0 + 1.0 / view.scale  # the mouse lands on whole css pixels
    assert len(first.boxes) == 1 and first.tag is None
    for got, want in zip(first.boxes[0], box, strict=True):
        assert abs(got - want) <= tol, first.boxes
    (rot,) = first.rotated_boxes
    want = _expected_rotated(*clicks)
    for got, w in zip(rot[:4], want[:4], strict=True):
        assert abs(got - w) <= 2 * tol, (rot, want)
    assert abs((rot[4] - want[4] + 90) % 180 - 90) <= 1.0, (rot, want)  # half a turn is the same rectangle
    assert -90 < rot[4] <= 90
    assert labels.images[KEYS[3]].kind == "tag" and labels.images[KEYS[3]].tag == "bad"

    # and a real weak fit accepts it (tiny settings: about 20 s)
    bundle = tmp_path / "weak"
    assert train_cli.main(["fit", "--data", str(demo_data), "--out", str(bundle), "--mode", "weak",
                           "--labels", str(out), "--json", *TINY]) == 0
    manifest = load_bundle(bundle).manifest
    assert manifest.training.mode == "weak"
    assert sorted(d.name for d in manifest.training.defect_images) == [KEYS[0], KEYS[3]]


@pytest.mark.pages
def test_existing_file_is_shown_edited_and_other_images_kept(page, annotate, demo_data, tmp_path):
    out = tmp_path / "labels.json"
    elsewhere = {  # images not on the page: must survive every save exactly
        "test/stain/001.png": {"rotated_boxes": [[100.5, 80, 30, 12, 33.25]], "tag": "bad"},
        "test/foreign/000.png": {"blocks": {"grid": [2, 2], "labels": [[0, -1], [0, 0]]}},
    }
    out.write_text(json.dumps({"version": 1, "images": {
        **elsewhere,
        KEYS[1]: {"boxes": [[10, 20, 30, 40]]},
        KEYS[4]: {"boxes": [[100, 100, 20, 20]], "rotated_boxes": [[50, 60, 20, 10, -30]]},
    }}))
    base = annotate(out)
    _open(page, base, KEYS[0])
    assert page.locator(f'#image-list li[data-key="{KEYS[1]}"] .badge').inner_text() == "1 box"
    assert page.locator(f'#image-list li[data-key="{KEYS[4]}"] .badge').inner_text() == "1 box, 1 rot"
    page.locator(f'#image-list li[data-key="{KEYS[4]}"]').click()
    view = _wait_image(page, KEYS[4])
    page.wait_for_selector('#canvas[data-shapes="2"]')
    # select the box by clicking it, delete it; drag the rotated box 10 px to the right
    page.mouse.click(*view.at(110, 110))
    page.wait_for_selector("#shapes li.selected")
    page.keyboard.press("Delete")
    page.wait_for_selector('#canvas[data-shapes="1"]')
    _wait_saved(page)
    page.mouse.move(*view.at(50, 60))
    page.mouse.down()
    page.mouse.move(*view.at(55, 60), steps=3)
    page.mouse.move(*view.at(60, 60), steps=3)
    page.mouse.up()
    _wait_saved(page)
    page.wait_for_function("() => !document.querySelector('#shapes li').textContent.startsWith("
                           "'rotated centre 50,')")
    # rotate it with its handle (beyond its top side): pulled straight to the right of the centre it stands at 90°
    page.wait_for_selector("#shapes li.selected")
    view = _View(page)
    a = math.radians(-30)
    reach = 5 + 22 / view.scale  # half the height + the handle's gap in css px
    page.mouse.move(*view.at(60 + math.sin(a) * reach, 60 - math.cos(a) * reach))
    page.mouse.down()
    page.mouse.move(*view.at(80, 45), steps=3)
    page.mouse.move(*view.at(100, 60), steps=3)
    page.mouse.up()
    page.wait_for_function("() => document.querySelector('#shapes li').textContent.endsWith('at 90°')")
    _wait_saved(page)
    # the first labelled image is marked good: its label goes
    page.keyboard.press("Home")
    _wait_image(page, KEYS[0])
    page.keyboard.press("j")
    _wait_image(page, KEYS[1])
    page.keyboard.press("g")
    page.wait_for_selector(f'#image-list li[data-key="{KEYS[1]}"][data-label="none"]')
    _wait_saved(page)
    assert KEYS[1] not in json.loads(out.read_text())["images"]
    page.keyboard.press("Control+z")  # undo brings the label back, and saves it
    page.wait_for_selector(f'#image-list li[data-key="{KEYS[1]}"][data-label="boxes"]')
    _wait_saved(page)
    assert json.loads(out.read_text())["images"][KEYS[1]] == {"boxes": [[10, 20, 30, 40]]}
    page.keyboard.press("g")
    page.wait_for_selector(f'#image-list li[data-key="{KEYS[1]}"][data-label="none"]')
    _wait_saved(page)

    doc = json.loads(out.read_text())
    for key, entry in elsewhere.items():
        assert doc["images"][key] == entry
    assert KEYS[1] not in doc["images"]
    (rot,) = doc["images"][KEYS[4]]["rotated_boxes"]
    assert "boxes" not in doc["images"][KEYS[4]]
    assert abs(rot[0] - 60) <= 1.5 and abs(rot[1] - 60) <= 1.5 and rot[2:] == [20, 10, 90]
    labels = load_labels(out, root=demo_data)
    assert set(labels.images) == {*elsewhere, KEYS[4]}


@pytest.mark.pages
def test_refused_saves_write_nothing_and_the_page_keeps_the_work(page, annotate, demo_data, tmp_path):
    out = tmp_path / "labels.json"
    out.write_text(json.dumps({"version": 1, "images": {KEYS[0]: {"tag": "bad"}}}, indent=1))
    before = out.read_bytes()
    base = annotate(out)

    # straight to the API: a box entirely outside the 256 x 256 image, a rotated box centred outside it
    code, res = _post_save(base, {KEYS[1]: {"boxes": [[300, 10, 20, 20]]}})
    assert code == 422 and not res["saved"]
    assert "fit --labels would refuse" in res["message"] and "outside" in res["message"] and KEYS[1] in res["message"]
    code, res = _post_save(base, {KEYS[1]: {"rotated_boxes": [[-5, 10, 20, 20, 0]]}, KEYS[2]: {"tag": "good"}})
    assert code == 422 and "centre" in res["message"] and "tag" in res["message"]
    code, res = _post_save(base, {"test/good/000.png": {"tag": "bad"}})  # under the root, not on the page
    assert code == 422 and "not on this page" in res["message"]
    code, res = _post_save(base, {KEYS[1]: {}})
    assert code == 422 and "no label" in res["message"]
    assert _request(base + "api/save", b'{"images": {}}', {"Content-Type": "text/plain"})[0] == 415
    code, _ = _post_save(base, {KEYS[1]: {"tag": "bad"}}, {"Origin": "http://evil.example"})
    assert code == 403
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json"]  # no temporary file left behind

    # the page: the file on disk turns unreadable, a box is drawn: refused, said so, the drawing stays
    view = _open(page, base, KEYS[0])
    out.write_text("{ not json")
    page.mouse.move(*view.at(20, 20))
    page.mouse.down()
    page.mouse.move(*view.at(60, 70), steps=5)
    page.mouse.up()
    page.wait_for_selector('#save-state[data-state="failed"]')
    banner = page.locator("#banner").inner_text()
    assert "not saved" in banner and "cannot read the current labels.json" in banner and "kept" in banner
    assert out.read_text() == "{ not json"
    assert page.locator(f'#image-list li[data-key="{KEYS[0]}"] .badge.dirty').count() == 1
    # once the file is readable again, Ctrl+S saves what the page kept
    out.write_bytes(before)
    page.keyboard.press("Control+s")
    _wait_saved(page)
    assert page.locator("#banner").is_hidden()
    label = load_labels(out, root=demo_data).images[KEYS[0]]
    assert label.tag == "bad" and len(label.boxes) == 1 and abs(label.boxes[0][2] - 40) <= 1.5


def test_cli_serves_only_the_listed_images(demo_data, tmp_path):
    """The real command (``--no-browser``): it prints the URL; nothing outside IMAGES is served."""
    out = tmp_path / "labels.json"
    proc = subprocess.Popen([sys.executable, "-m", "training_host.cli", "labels", "annotate",
                             str(demo_data / "test" / "crack"), "--out", str(out), "--no-browser"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # blocks until the server says where it is (or exits)
            lines.append(line)
            if line.startswith("open http"):
                break
        assert lines and lines[-1].startswith("open http"), (lines, proc.poll(), proc.stderr.read())
        assert f"keys relative to {demo_data}" in lines[0]
        base = lines[-1].split()[1]
        assert base.startswith("http://127.0.0.1:")
        code, body = _request(base + "api/state")
        assert code == 200 and [x["key"] for x in json.loads(body)["images"]] == KEYS[:3]
        code, body = _request(base + "api/image?key=test/crack/000.png")
        assert code == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
        assert body == (demo_data / "test" / "crack" / "000.png").read_bytes()
        secret = tmp_path / "secret.txt"
        secret.write_text("not for the page")
        for key in ("../../../etc/passwd", "/etc/passwd", "test/crack/../../train/good/000.png",
                    "train/good/000.png", "test/scratch/000.png", str(secret), "../" * 12 + str(secret)[1:],
                    "test/crack/000.png/..", "test%2Fcrack%2F000.png%00"):
            for endpoint in ("api/image", "api/heatmap"):
                code, body = _request(base + f"{endpoint}?key={urllib.request.quote(key)}")
                assert code == 404 and b"not for the page" not in body and b"root:" not in body, (key, code)
        host, port = base[len("http://"):].rstrip("/").split(":")
        for raw in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/annotate_page/annotate.js",
                    "/../annotate.py", "//etc/passwd"):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", raw)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 404 and b"root:" not in body, raw
        assert _request(base + "annotate.js")[0] == 200
        conn = http.client.HTTPConnection(host, int(port), timeout=10)  # a rebound DNS name: another site's page
        conn.request("GET", "/api/state", headers={"Host": f"evil.example:{port}"})
        assert conn.getresponse().status == 403
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not out.exists()  # nothing saved, nothing written


def test_cli_refuses_images_outside_the_root_and_an_invalid_existing_file(demo_data, tmp_path, capsys):
    out = tmp_path / "labels.json"
    code = train_cli.main(["labels", "annotate", str(demo_data / "test" / "crack"), "--out", str(out),
                           "--root", str(demo_data / "train"), "--no-browser"])
    assert code == 2 and "not under the root" in capsys.readouterr().err
    out.write_text(json.dumps({"version": 1, "images": {"test/nowhere/000.png": {"tag": "bad"}}}))
    code = train_cli.main(["labels", "annotate", str(demo_data / "test" / "crack"), "--out", str(out),
                           "--no-browser"])
    err = capsys.readouterr().err
    assert code == 2 and "not valid" in err and "test/nowhere/000.png" in err


@pytest.mark.pages
def test_heatmap_hint_from_the_bundle(page, screenshot, annotate, demo_data, fitted_slice, tmp_path):
    bundle, _ = fitted_slice
    base = annotate(tmp_path / "labels.json", bundle=bundle)
    _open(page, base, KEYS[0])
    pixels = "() => { const c = document.getElementById('canvas'); " \
             "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data" \
             ".filter((_, i) => i % 97 === 0)); }"
    plain = page.evaluate(pixels)
    page.keyboard.press("h")
    page.wait_for_selector('#canvas[data-heat="shown"]')
    assert "score" in page.locator("#heat-info").inner_text()
    hinted = page.evaluate(pixels)
    changed = sum(a != b for a, b in zip(plain, hinted, strict=True))
    assert changed > len(plain) // 10, changed  # the overlay covers the image
    screenshot(page, "annotate_heatmap")
    page.keyboard.press("h")
    page.wait_for_selector('#canvas[data-heat="off"]')
    assert page.evaluate(pixels) == plain
    code, body = _request(base + f"api/heatmap?key={KEYS[0]}")
    assert code == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
