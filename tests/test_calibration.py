"""weakrest-calibrate: fit (hashes, parent, store), refusal of bad input, capture, verify, list/activate/rollback.

Real parts throughout: the ``fitted`` bundle's ONNX graphs, replayed folders as the camera, a real Mosquitto
for the "service not running" case, a real child process for SIGHUP.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from calibration.cli import main
from edge_runtime.core.bundle import load_bundle, sha256_of
from edge_runtime.publishing.broker import free_port
from edge_runtime.store import BundleStore


def _frames(folder: Path, n: int, size: tuple[int, int] = (96, 96), seed: int = 0) -> Path:
    """n distinct textured colour frames (different noise each), as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(60, 200, (12, 12, 3), dtype=np.uint8), size[::-1], interpolation=cv2.INTER_CUBIC)
    for i in range(n):
        noise = rng.integers(-12, 12, (*size, 3))
        cv2.imwrite(str(folder / f"f{i:03d}.png"), np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- fit --------------------------------------------------------------------------------------------------

def test_fit_records_parent_and_calibration_hashes_and_adds_to_store(fitted, demo_data, tmp_path, capsys):
    base = load_bundle(fitted[0]).manifest
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", fitted[0], version="v1"))
    images = demo_data / "train" / "good"
    out = tmp_path / "cal"
    assert main(["fit", "--base", str(fitted[0]), "--images", str(images), "--out", str(out), "--store",
                 str(store.root), "--product", "demo", "--version", "cal1"]) == 0
    printed = capsys.readouterr()
    assert "threshold" in printed.out and "6 held-out good frames" in printed.out and "margin" in printed.out
    assert "warning: the threshold rests on 6 held-out good frames" in printed.err and "at least 200" in printed.err

    new = load_bundle(out)
    m = new.manifest
    assert m.parent == f"{base.product}@{base.bundle_version}" and m.bundle_version == "cal1" and m.product == "demo"
    assert m.files["swin.onnx"].sha256 == base.files["swin.onnx"].sha256  # the Swin carries over
    assert m.files["matcher.onnx"].sha256 == base.files["matcher.onnx"].sha256  # so does the matcher graph
    assert m.thresholds.n_holdout_images == 6
    assert m.thresholds.target_false_reject == base.thresholds.target_false_reject
    side = json.loads((out / "calibration.json").read_text())
    assert m.files["calibration.json"].sha256 == sha256_of(out / "calibration.json")  # hash-checked on load
    files = sorted(images.glob("*.png"))
    listed = {e["file"]: e["sha256"] for e in side["frames"]["bank"] + side["frames"]["holdout"]}
    assert listed == {p.name: _sha(p) for p in files}
    digest = hashlib.sha256("\n".join(sorted(listed.values())).encode()).hexdigest()
    assert side["frames"]["digest"] == digest and digest in m.producer["calibration_data"]
    assert side["threshold"]["enough_frames"] is False and side["parent"] == m.parent
    # added to the store, not activated
    assert store.versions("demo") == ["cal1", "v1"] and store.current("demo") == "v1"
    assert main(["fit", "--base", str(fitted[0]), "--images", str(images), "--store", str(store.root),
                 "--product", "demo", "--version", "cal1"]) == 2
    assert "already in the store" in capsys.readouterr().err


def _refused(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ")  # after any progress bar
    return err


def test_fit_refuses_bad_frames_naming_them(fitted, tmp_path, capsys):
    base = str(fitted[0])
    out = tmp_path / "never"

    few = _frames(tmp_path / "few", 5)
    assert "5 images, calibration needs at least 10" in _refused(capsys, "fit", "--base", base, "--images", str(few),
                                                                 "--out", str(out))
    sizes = _frames(tmp_path / "sizes", 11)
    _frames(tmp_path / "odd", 1, size=(80, 100), seed=1)
    shutil.copy(tmp_path / "odd" / "f000.png", sizes / "zz_odd.png")
    err = _refused(capsys, "fit", "--base", base, "--images", str(sizes), "--out", str(out))
    assert "zz_odd.png (100x80)" in err and "differ in size" in err and "--mixed-sizes" in err and "f001" not in err

    grey = _frames(tmp_path / "grey", 11)
    cv2.imwrite(str(grey / "f004.png"), cv2.cvtColor(cv2.imread(str(grey / "f004.png")), cv2.COLOR_BGR2GRAY))
    err = _refused(capsys, "fit", "--base", base, "--images", str(grey), "--out", str(out))
    assert "f004.png (grey8)" in err and "pixel format" in err

    broken = _frames(tmp_path / "broken", 11)
    (broken / "f007.png").write_bytes(b"not a png")
    err = _refused(capsys, "fit", "--base", base, "--images", str(broken), "--out", str(out))
    assert "f007.png: not a readable image" in err

    dups = _frames(tmp_path / "dups", 9)
    shutil.copy(dups / "f000.png", dups / "f000_copy.png")
    err = _refused(capsys, "fit", "--base", base, "--images", str(dups), "--out", str(out))
    assert "9 distinct images after dropping 1 duplicate" in err
    assert not out.exists()


def test_fit_refuses_other_schema_and_unwritable_output(fitted, tmp_path, capsys):
    frames = _frames(tmp_path / "frames", 10)
    other = tmp_path / "other_schema"
    shutil.copytree(fitted[0], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (other / "manifest.json").write_text(json.dumps(manifest))
    err = _refused(capsys, "fit", "--base", str(other), "--images", str(frames), "--out", str(tmp_path / "x"))
    assert "base bundle" in err and "schema version 99 is not supported" in err

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = _refused(capsys, "fit", "--base", str(fitted[0]), "--images", str(frames), "--out",
                   str(blocker / "sub" / "bundle"))
    assert "cannot create the output folder" in err and str(blocker) in err

    # never into the store's live version, even with --overwrite; the active bundle stays as it was
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", fitted[0], version="v1"))
    live = store.product_dir("demo") / "v1"
    before = {p.name: _sha(p) for p in live.iterdir()}
    err = _refused(capsys, "fit", "--base", str(fitted[0]), "--images", str(frames), "--out", str(live),
                   "--overwrite")
    assert "is the store's 'current' version" in err
    assert {p.name: _sha(p) for p in live.iterdir()} == before and store.current("demo") == "v1"


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: a real ENOSPC (needs mount rights: root in a container; skipped elsewhere)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                                         capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_a_clear_error_and_leaves_nothing_half_written(fitted, tmp_path, full_disk, capsys):
    frames = _frames(tmp_path / "frames", 10)
    err = _refused(capsys, "fit", "--base", str(fitted[0]), "--images", str(frames), "--out", str(full_disk / "b"))
    assert "No space left on device" in err and "nothing was written there" in err
    assert list(full_disk.iterdir()) == []  # the staging folder is gone too
    cfg = _camera_config(tmp_path, _frames(tmp_path / "big", 40, size=(160, 160)))
    err = _refused(capsys, "capture", "--config", str(cfg), "--count", "40", "--out", str(full_disk / "cap"))
    assert "No space left on device" in err and "frames written before it" in err


# ---- capture ----------------------------------------------------------------------------------------------

def _camera_config(tmp_path: Path, replay: Path, loop: bool = False, fps: float = 200.0) -> Path:
    cfg = {"bundles": {"store": str(tmp_path / "store"), "product": "demo"},
           "camera": {"source": "replay", "name": "bench-cam", "replay": {"path": str(replay), "fps": fps,
                                                                         "loop": loop}}}
    path = tmp_path / f"edge-{replay.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_capture_skips_duplicates_writes_pngs_and_log(tmp_path, capsys):
    src = _frames(tmp_path / "src", 6)
    shutil.copy(src / "f002.png", src / "f002b.png")  # replayed right after f002: a duplicate frame
    out = tmp_path / "captured"
    assert main(["capture", "--config", str(_camera_config(tmp_path, src)), "--count", "6", "--out", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == 6 and report["duplicates"] == 1
    log = json.loads((out / "capture.json").read_text())
    assert log["camera"]["name"] == "bench-cam" and log["camera"]["source"] == "replay"
    assert [f["file"] for f in log["frames"]] == [f"frame_{i:06d}.png" for i in range(1, 7)]
    for entry, original in zip(log["frames"], sorted(p for p in src.glob("*.png") if p.name != "f002b.png"),
                               strict=True):
        png = out / entry["file"]
        assert entry["sha256"] == _sha(png) and entry["frame_id"] >= 1 and entry["timestamp"].endswith("+00:00")
        assert np.array_equal(cv2.imread(str(png)), cv2.imread(str(original)))  # lossless
    assert log["sessions"][0]["duplicates_skipped"] == 1

    err = _refused(capsys, "capture", "--config", str(_camera_config(tmp_path, src)), "--count", "2", "--out",
                   str(out))
    assert "not empty" in err and "--append" in err
    assert main(["capture", "--config", str(_camera_config(tmp_path, src)), "--count", "2", "--out", str(out),
                 "--append"]) == 0
    log = json.loads((out / "capture.json").read_text())
    assert len(log["frames"]) == 8 and log["frames"][-1]["file"] == "frame_000008.png" and len(log["sessions"]) == 2


def test_capture_times_out_on_a_frozen_or_silent_camera(tmp_path, capsys):
    one = _frames(tmp_path / "one", 1)
    err = _refused(capsys, "capture", "--config", str(_camera_config(tmp_path, one, loop=True)), "--count", "3",
                   "--out", str(tmp_path / "frozen"), "--timeout", "0.5")
    assert "bench-cam" in err and "stream looks frozen" in err and "after 1 frames" in err
    assert json.loads((tmp_path / "frozen" / "capture.json").read_text())["frames"][0]["file"] == "frame_000001.png"
    slow = _frames(tmp_path / "slow", 3)
    err = _refused(capsys, "capture", "--config", str(_camera_config(tmp_path, slow, fps=0.1)), "--count", "3",
                   "--out", str(tmp_path / "silent"), "--timeout", "0.5")
    assert "no frame for 0.5 s after 1 frames" in err
    err = _refused(capsys, "capture", "--config", str(_camera_config(tmp_path, slow)), "--count", "5",
                   "--out", str(tmp_path / "short"))
    assert "ended after 3 of 5 frames" in err


# ---- verify -----------------------------------------------------------------------------------------------

def test_verify_rates_and_contact_sheet(fitted, demo_data, tmp_path, capsys):
    from edge_runtime.core.pipeline import open_inspector
    from edge_runtime.core.preprocess import list_images, read_image

    bad = tmp_path / "bad"
    bad.mkdir()
    for d in (demo_data / "test").iterdir():
        if d.is_dir() and d.name != "good":
            (bad / d.name).symlink_to(d)  # verify follows links to folders
    out = tmp_path / "verify"
    assert main(["verify", "--bundle", str(fitted[0]), "--good", str(demo_data / "test" / "good"), "--bad", str(bad),
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    inspector = open_inspector(fitted[0])
    good_scores = [inspector.inspect(read_image(p)).score for p in list_images(demo_data / "test" / "good")]
    bad_paths = [p for d in sorted(bad.iterdir()) for p in list_images(d)]
    bad_scores = [inspector.inspect(read_image(p)).score for p in bad_paths]
    n_rejected = sum(s >= inspector.threshold for s in good_scores)
    n_found = sum(s >= inspector.threshold for s in bad_scores)
    assert report["good"]["n"] == len(good_scores) == 6 and report["good"]["n_fail"] == n_rejected
    assert report["false_reject_rate"] == pytest.approx(n_rejected / 6)
    assert report["bad"]["n"] == len(bad_scores)
    assert report["detection_rate"] == pytest.approx(n_found / len(bad_scores))
    assert len(report["bad"]["listed"]) == len(bad_scores) - n_found  # the misses, for a person to look at
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    n_tiles = len(good_scores) + len(bad_scores)
    rows = -(-n_tiles // 6)
    assert sheet.shape[:2] == (rows * (192 + 34), 6 * 192)
    assert json.loads((out / "verify.json").read_text())["good"]["n"] == 6
    # with defective frames, detection at the line's false-reject rates; 6 good frames resolve none of them
    det = report["detection_at_frr"]
    assert [d["false_reject_rate"] for d in det] == [0.005, 0.01, 0.02]
    strictest = max(good_scores)
    assert all(d["false_rejects"] == 0 and not d["resolved"] and d["threshold"] > strictest for d in det)
    assert det[0]["detected"] == sum(s > strictest for s in bad_scores)
    assert main(["verify", "--bundle", str(tmp_path / "nope"), "--good", str(demo_data / "test" / "good")]) == 2
    assert "nope" in capsys.readouterr().err


# ---- list / activate / rollback ---------------------------------------------------------------------------

def _broken_graph(src: Path, dst: Path) -> Path:
    """A bundle whose hashes verify but whose backbone graph does not run: only the smoke run catches it."""
    shutil.copytree(src, dst)
    (dst / "backbone.onnx").write_bytes(b"\x08\x07garbage, not an onnx graph")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["backbone.onnx"].update(sha256=sha256_of(dst / "backbone.onnx"),
                                              size=(dst / "backbone.onnx").stat().st_size)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_list_activate_rollback_refuse_an_invalid_version(fitted, tmp_path, capsys):
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", fitted[0], version="v1"))
    store.add("demo", fitted[0], version="v2")
    store.add("demo", _broken_graph(fitted[0], tmp_path / "broken"), version="v3-broken")
    s = ["--store", str(store.root), "--product", "demo"]

    err = _refused(capsys, "activate", "v3-broken", *s)
    assert "backbone.onnx" in err and "current is still v1" in err and store.current("demo") == "v1"
    err = _refused(capsys, "activate", "v9", *s)
    assert "no such version" in err and store.current("demo") == "v1"
    err = _refused(capsys, "rollback", *s)
    assert "no previous version" in err

    assert main(["activate", "v2", *s]) == 0
    assert "current v1 -> v2" in capsys.readouterr().out and store.current("demo") == "v2"
    assert main(["list", "--store", str(store.root), "--json"]) == 0
    listing = {v["version"]: v for v in json.loads(capsys.readouterr().out)["demo"]}
    assert listing["v2"]["current"] and listing["v1"]["previous"] and not listing["v3-broken"]["current"]
    assert listing["v1"]["threshold"] == pytest.approx(load_bundle(fitted[0]).manifest.thresholds.image)
    assert listing["v1"]["created_at"] == load_bundle(fitted[0]).manifest.created_at
    assert main(["list", *s]) == 0
    table = capsys.readouterr().out
    assert "* current  v2" in table and "previous v1" in table

    assert main(["rollback", *s]) == 0
    assert store.current("demo") == "v1" and store.previous("demo") == "v2"


def test_switch_with_no_service_listening_is_done_with_a_warning(fitted, tmp_path, broker, capsys):
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", fitted[0], version="v1"))
    store.add("demo", fitted[0], version="v2")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({"bundles": {"store": str(store.root), "product": "demo"},
                                   "mqtt": {"port": broker.port, "topic_prefix": "p/l/s"}}))
    assert main(["activate", "v2", "--config", str(cfg), "--timeout", "1", "--json"]) == 0  # store from the config
    report = json.loads(capsys.readouterr().out)
    assert report["current"] == "v2" and report["service"]["confirmed"] is False
    assert "no reply to the reload command" in report["service"]["detail"]
    assert store.current("demo") == "v2"

    cfg.write_text(yaml.safe_dump({"bundles": {"store": str(store.root), "product": "demo"},
                                   "mqtt": {"port": free_port(), "topic_prefix": "p/l/s"}}))
    assert main(["rollback", "--config", str(cfg), "--timeout", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: not confirmed" in err and "not reachable" in err and "the switch stays done" in err
    assert store.current("demo") == "v1"


def test_sighup_reaches_the_given_pid(fitted, tmp_path, capsys):
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", fitted[0], version="v1"))
    store.add("demo", fitted[0], version="v2")
    marker = tmp_path / "hup"
    code = (f"import signal, time, pathlib\nsignal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(marker)!r})"
            ".write_text('hup'))\nprint('ready', flush=True)\ntime.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert main(["activate", "v2", "--store", str(store.root), "--product", "demo", "--pid", str(child.pid)]) == 0
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "hup"
        assert "SIGHUP sent" in capsys.readouterr().err
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(10)


def test_calibration_never_imports_torch_or_the_training_host():
    code = ("import sys, calibration.cli, calibration.capture, calibration.fit, calibration.verify, "
            "calibration.deploy, calibration.notify, calibration.contact_sheet; "
            "bad = [m for m in ('torch', 'training_host') if m in sys.modules]; sys.exit(str(bad) if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
