"""Frame sources on real parts: pixel conversion, the simulated GenTL camera (viky.cti) through harvesters,
replayed folders/videos, and the reconnecting worker.  Nothing of harvesters is mocked."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.acquisition import (
    SUPPORTED_FORMATS,
    AcquisitionWorker,
    CameraLost,
    Frame,
    FrameSource,
    GenICamSource,
    IncompleteBuffer,
    OpenCVSource,
    ReplaySource,
    SourceError,
    SourceExhausted,
    fetch_timeout_s,
    open_source,
    to_rgb8,
)
from edge_runtime.service.config import CameraConfig

# -- helpers -----------------------------------------------------------------------------------------------


def _wait_for(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB image through a PFNC Bayer pattern named by its top-left 2x2 block (e.g. 'RG' = RGGB)."""
    layout = {"RG": "RGGB", "GR": "GRBG", "GB": "GBRG", "BG": "BGGR"}[pattern]
    chan = {"R": 0, "G": 1, "B": 2}
    out = np.empty(rgb.shape[:2], np.uint8)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, chan[layout[k]]]
    return out


def _rgb_image(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- pixels ------------------------------------------------------------------------------------------------


def test_mono_formats_scale_to_8_bit():
    mono8 = np.arange(12, dtype=np.uint8)
    out = to_rgb8(mono8, "Mono8", 4, 3)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert (out[..., 0] == mono8.reshape(3, 4)).all() and (out[..., 0] == out[..., 2]).all()

    mono12 = np.array([0, 16, 2048, 4095, 4095, 100], dtype=np.uint16)
    assert to_rgb8(mono12, "Mono12", 3, 2)[..., 1].ravel().tolist() == [0, 1, 128, 255, 255, 6]
    mono10 = np.array([0, 4, 512, 1023], dtype=np.uint16)
    assert to_rgb8(mono10, "Mono10", 2, 2)[..., 0].ravel().tolist() == [0, 1, 128, 255]
    mono16 = np.array([0, 256, 32768, 65535], dtype=np.uint16)
    assert to_rgb8(mono16, "Mono16", 2, 2)[..., 0].ravel().tolist() == [0, 1, 128, 255]
    # raw little-endian bytes of a 16-bit format are accepted too
    assert to_rgb8(mono16.astype("<u2").view(np.uint8), "Mono16", 2, 2)[..., 0].ravel().tolist() == [0, 1, 128, 255]
    # harvesters expands packed formats to uint16: same scaling
    assert to_rgb8(mono12, "Mono12p", 3, 2)[..., 1].ravel().tolist() == [0, 1, 128, 255, 255, 6]


def test_colour_formats_from_flat_buffers():
    rgb = _rgb_image()
    h, w = rgb.shape[:2]
    assert (to_rgb8(rgb.ravel(), "RGB8", w, h) == rgb).all()
    assert (to_rgb8(rgb[..., ::-1].copy().ravel(), "BGR8", w, h) == rgb).all()
    alpha = np.full((h, w, 1), 7, np.uint8)
    assert (to_rgb8(np.concatenate([rgb, alpha], 2).ravel(), "RGBa8", w, h) == rgb).all()
    assert (to_rgb8(np.concatenate([rgb[..., ::-1], alpha], 2).ravel(), "BGRa8", w, h) == rgb).all()
    rgb12 = rgb.astype(np.uint16) << 4
    assert (to_rgb8(rgb12.ravel(), "RGB12", w, h) == rgb).all()


def test_result_never_shares_memory_with_the_driver_buffer():
    rgb = _rgb_image()
    flat = rgb.ravel()
    for fmt, data in (("RGB8", flat), ("Mono8", flat[: 6 * 8])):
        out = to_rgb8(data, fmt, 8, 6)
        assert not np.shares_memory(out, data)


@pytest.mark.parametrize("pattern", ["RG", "GR", "GB", "BG"])
def test_bayer_demosaic_keeps_colours(pattern):
    for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 120, 40)):
        rgb = np.empty((16, 16, 3), np.uint8)
        rgb[:] = colour
        out = to_rgb8(_mosaic(rgb, pattern).ravel(), f"Bayer{pattern}8", 16, 16)
        inner = out[4:12, 4:12].reshape(-1, 3)
        assert np.abs(inner.astype(int) - colour).max() <= 2, (pattern, colour, inner[0])
    # 12-bit Bayer is scaled then demosaiced the same way
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    out = to_rgb8(_mosaic(red, pattern).astype(np.uint16) << 4, f"Bayer{pattern}12", 8, 8)
    assert out[2:6, 2:6, 0].min() >= 250 and out[2:6, 2:6, 1:].max() <= 5


def test_yuv422_round_trip():
    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, :8] = (220, 30, 30)
    rgb[:, 8:] = (30, 30, 220)
    yuyv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_YUY2)
    for fmt in ("YUV422_8", "YCbCr422_8"):
        out = to_rgb8(yuyv.ravel(), fmt, 16, 8)
        assert np.abs(out.astype(int) - rgb).max() <= 12


def test_line_padding_is_dropped_and_bad_sizes_refused():
    rgb = _rgb_image(4, 5)
    padded = np.concatenate([rgb.reshape(4, 15), np.zeros((4, 3), np.uint8)], axis=1)
    assert (to_rgb8(padded.ravel(), "RGB8", 5, 4) == rgb).all()
    with pytest.raises(IncompleteBuffer, match="needs 60 values, the buffer holds only 59"):
        to_rgb8(rgb.ravel()[:-1], "RGB8", 5, 4)  # a short buffer is an incomplete transfer (a SourceError too)
    with pytest.raises(SourceError, match="needs 60 values") as other:
        to_rgb8(np.zeros(67, np.uint8), "RGB8", 5, 4)  # too long and not a whole number of padded lines
    assert not isinstance(other.value, IncompleteBuffer)


def test_unsupported_format_is_named_with_the_supported_ones():
    with pytest.raises(SourceError) as info:
        to_rgb8(np.zeros(16, np.uint8), "Coord3D_ABC32f", 4, 4)
    msg = str(info.value)
    assert "Coord3D_ABC32f" in msg and "Mono8" in msg and "BayerRG8" in msg and "RGBa8" in msg
    assert {"Mono8", "Mono12", "RGB8", "BGR8", "RGBa8", "BGRa8", "BayerRG8", "YUV422_8"} <= set(SUPPORTED_FORMATS)


# -- GenICam (simulated producer viky.cti, real harvesters) -------------------------------------------------


@pytest.fixture(scope="module")
def viky() -> Path:
    genicam = pytest.importorskip("genicam")
    pytest.importorskip("harvesters")
    cti = Path(genicam.__file__).parent / "viky.cti"
    if not cti.is_file():
        pytest.skip(f"viky.cti not shipped with this genicam wheel ({cti})")
    return cti


def test_genicam_streams_rgb_frames(viky):
    before = signal.getsignal(signal.SIGINT)
    src = GenICamSource(viky, index=0, buffers=4)
    assert isinstance(src, FrameSource)
    src.open()
    try:
        src.open()  # idempotent
        assert signal.getsignal(signal.SIGINT) is before  # harvesters' SIGINT hijack undone
        assert src.name == "genicam:VikyTL_DEV_red" and not src.triggered
        frames = [src.grab(2.0) for _ in range(4)]
    finally:
        src.close()
    src.close()  # idempotent
    assert all(isinstance(f, Frame) for f in frames)
    for f in frames:
        assert f.image.shape == (400, 400, 3) and f.image.dtype == np.uint8 and f.image.flags.c_contiguous
        assert f.source == "genicam:VikyTL_DEV_red" and abs(f.captured_at - time.time()) < 60
    ids = [f.frame_id for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 4
    mean = frames[-1].image.reshape(-1, 3).astype(float).mean(0)
    assert mean[0] > mean[2]  # the "red" device draws red: RGBa8 -> RGB kept the channel order
    assert src.stats.frames == 4 and src.stats.timeouts == 0
    with pytest.raises(CameraLost):
        src.grab(0.1)


def test_genicam_mono8_by_serial_gives_grey_frames(viky):
    src = GenICamSource(viky, serial="2", pixel_format="Mono8", exposure_us=500.0)  # no exposure node: warning only
    src.open()
    try:
        frame = src.grab(2.0)
        assert src.node_map.PixelFormat.value == "Mono8"
    finally:
        src.close()
    assert src.name == "genicam:VikyTL_DEV_blue"
    img = frame.image
    assert img.shape == (400, 400, 3)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


def test_genicam_configuration_errors_list_what_exists(viky):
    with pytest.raises(SourceError) as info:
        GenICamSource(viky, pixel_format="BayerRG8").open()
    assert "BayerRG8" in str(info.value) and "RGBa8" in str(info.value) and "Mono8" in str(info.value)
    assert not isinstance(info.value, CameraLost)

    with pytest.raises(SourceError) as info:
        GenICamSource(viky, serial="XYZ-123").open()
    msg = str(info.value)
    assert "XYZ-123" in msg and all(s in msg for s in ("0", "1", "2", "VikyTL_DEV_green"))

    with pytest.raises(SourceError, match="index 7"):
        GenICamSource(viky, index=7).open()

    # every failed open released the producer: the camera opens again
    src = GenICamSource(viky)
    src.open()
    try:
        assert src.grab(2.0) is not None
    finally:
        src.close()


def test_genicam_producer_from_environment(viky, monkeypatch, tmp_path):
    monkeypatch.setenv("GENICAM_GENTL64_PATH", f"{tmp_path / 'nothing'}:{viky.parent}")
    src = GenICamSource(None, index=1)
    src.open()
    try:
        assert src.name == "genicam:VikyTL_DEV_green" and src.grab(2.0) is not None
    finally:
        src.close()

    monkeypatch.setenv("GENICAM_GENTL64_PATH", str(tmp_path))
    with pytest.raises(SourceError, match="GENICAM_GENTL64_PATH"):
        GenICamSource(None).open()
    monkeypatch.delenv("GENICAM_GENTL64_PATH")
    with pytest.raises(SourceError, match="no GenTL producer"):
        GenICamSource(None).open()
    with pytest.raises(SourceError, match="not found"):
        GenICamSource(tmp_path / "vendor.cti").open()


def test_genicam_consecutive_timeouts_mean_camera_lost(viky):
    src = GenICamSource(viky, lost_after_timeouts=2)
    src.open()
    try:
        src.node_map.AcquisitionFrameRate.value = 1.0  # starve the stream
        with pytest.raises(CameraLost, match="consecutive"):
            for _ in range(60):
                src.grab(0.05)
        assert src.stats.timeouts >= 2
    finally:
        src.close()


def test_genicam_triggered_source_idles_without_loss(viky):
    # viky has no trigger nodes: configuration warns and continues, the source is still "triggered"
    src = GenICamSource(viky, trigger="software", lost_after_timeouts=1)
    src.open()
    try:
        assert src.triggered
        assert src.software_trigger() is False  # no TriggerSoftware node
        src.node_map.AcquisitionFrameRate.value = 1.0
        nones = sum(src.grab(0.05) is None for _ in range(6))
        assert nones >= 3 and src.stats.timeouts >= 3
    finally:
        src.close()
    with pytest.raises(SourceError, match="software"):
        GenICamSource(viky).software_trigger()


def test_genicam_destroyed_acquirer_is_camera_lost(viky):
    src = GenICamSource(viky)
    src.open()
    try:
        assert src.grab(2.0) is not None
        src._ia.destroy()  # what harvesters does when the device is torn down under us
        with pytest.raises(CameraLost):
            src.grab(0.2)
    finally:
        src.close()


def test_genicam_producer_is_held_by_one_source_per_process(viky):
    first = GenICamSource(viky, index=0)
    first.open()
    try:
        with pytest.raises(SourceError, match="already holds"):
            GenICamSource(viky, index=1).open()
    finally:
        first.close()


# -- replay ------------------------------------------------------------------------------------------------


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _image_folder(root: Path, n: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = np.zeros((24, 32, 3), np.uint8)
        rgb[:] = COLOURS[i % len(COLOURS)]
        sub = root / ("b" if i % 2 else "a")  # recursive and sorted by path
        sub.mkdir(exist_ok=True)
        assert cv2.imwrite(str(sub / f"{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return root


def test_replay_folder_is_paced_ordered_and_rgb(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    src = ReplaySource(folder, fps=20.0, loop=False)
    src.open()
    t0 = time.monotonic()
    frames = [src.grab(1.0) for _ in range(5)]
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.18  # 4 periods of 50 ms after the first frame
    assert [f.frame_id for f in frames] == [1, 2, 3, 4, 5]
    # sorted by relative path: a/000, a/002, a/004, b/001, b/003
    expected = [COLOURS[i] for i in (0, 2, 4, 1, 3)]
    for f, colour in zip(frames, expected, strict=True):
        assert f.image.shape == (24, 32, 3) and tuple(int(v) for v in f.image[0, 0]) == colour
        assert f.source == f"replay:{folder}"
    with pytest.raises(SourceExhausted):
        src.grab(1.0)
    src.close()
    src.close()


def test_replay_loops_and_waits_at_most_the_timeout(tmp_path):
    folder = _image_folder(tmp_path / "imgs", 3)
    src = ReplaySource(folder, fps=1000.0, loop=True)
    src.open()
    frames = [src.grab(1.0) for _ in range(7)]
    assert [f.frame_id for f in frames] == list(range(1, 8))
    assert (frames[0].image == frames[3].image).all() and (frames[1].image == frames[4].image).all()
    src.close()

    slow = ReplaySource(folder, fps=0.5)
    slow.open()
    assert slow.grab(0.5) is not None  # the first frame is due at once
    t0 = time.monotonic()
    assert slow.grab(0.05) is None
    assert time.monotonic() - t0 < 1.0 and slow.stats.timeouts == 0
    slow.close()


def test_replay_skips_unreadable_files_once(tmp_path):
    folder = _image_folder(tmp_path / "imgs", 3)
    (folder / "a" / "001_broken.png").write_bytes(b"not a png at all")
    src = ReplaySource(folder, fps=1000.0, loop=True)
    src.open()
    frames = [src.grab(1.0) for _ in range(9)]  # three passes
    assert all(f is not None for f in frames)
    assert src.stats.converted_errors == 1 and src.stats.frames == 9
    src.close()


def test_replay_refuses_missing_or_empty_folders(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        ReplaySource(tmp_path / "missing").open()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no image"):
        ReplaySource(tmp_path / "empty").open()
    with pytest.raises(SourceError, match="video"):
        ReplaySource(tmp_path / "empty" / "notes.txt").open()


def _video(path: Path, n: int = 6) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        rgb = np.zeros((48, 64, 3), np.uint8)
        rgb[:] = (230, 20, 20) if i % 2 == 0 else (20, 20, 230)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_replay_video_file(tmp_path):
    video = _video(tmp_path / "clip.avi")
    src = ReplaySource(video, fps=500.0, loop=False)
    src.open()
    frames = [src.grab(1.0) for _ in range(6)]
    with pytest.raises(SourceExhausted):
        src.grab(1.0)
    src.close()
    assert all(f.image.shape == (48, 64, 3) for f in frames)
    first, second = (f.image.reshape(-1, 3).astype(float).mean(0) for f in frames[:2])
    assert first[0] > 150 > first[2] and second[2] > 150 > second[0]

    looping = ReplaySource(video, fps=500.0, loop=True)
    looping.open()
    assert all(looping.grab(1.0) is not None for _ in range(14))
    looping.close()


def test_opencv_source_reads_then_reports_loss(tmp_path):
    video = _video(tmp_path / "clip.avi", 3)
    src = OpenCVSource(str(video))
    src.open()
    frames = [src.grab(1.0) for _ in range(3)]
    assert [f.frame_id for f in frames] == [1, 2, 3] and frames[0].image.shape == (48, 64, 3)
    with pytest.raises(CameraLost):
        src.grab(1.0)
    src.close()
    src.close()
    with pytest.raises(SourceError):
        OpenCVSource(str(tmp_path / "no-such-file.avi")).open()
    assert OpenCVSource("rtsp://admin:secret@10.0.0.5/stream").name == "opencv:rtsp://admin:***@10.0.0.5/stream"


def test_open_source_builds_each_kind(tmp_path, viky):
    folder = _image_folder(tmp_path / "imgs", 2)
    src = open_source(CameraConfig.model_validate({"source": "replay", "replay": {"path": folder, "fps": 50}}))
    assert isinstance(src, ReplaySource) and src.period == pytest.approx(0.02)
    src.open()
    assert src.grab(1.0) is not None
    src.close()

    cfg = CameraConfig.model_validate({"genicam": {"cti": viky, "serial": "1", "pixel_format": "Mono8",
                                                   "fetch_timeout_ms": 300, "lost_after_timeouts": 3}})
    cam = open_source(cfg)
    assert isinstance(cam, GenICamSource) and cam.serial == "1" and cam.lost_after_timeouts == 3
    assert fetch_timeout_s(cfg) == pytest.approx(0.3)
    assert isinstance(open_source(CameraConfig.model_validate({"source": "opencv", "opencv": {"device": "0"}})),
                      OpenCVSource)


# -- worker ------------------------------------------------------------------------------------------------


class UnpluggedAfter(ReplaySource):
    """A real replay source whose camera is "unplugged" after ``n`` frames (the only thing simulated)."""

    def __init__(self, path: Path, n: int) -> None:
        super().__init__(path, fps=200.0)
        self.n = n

    def grab(self, timeout_s: float) -> Frame | None:
        if self.stats.frames >= self.n:
            raise CameraLost("cable unplugged")
        return super().grab(timeout_s)


class Recorder:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.states: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def on_frame(self, frame: Frame) -> None:
        with self.lock:
            self.frames.append(frame)

    def on_state(self, state: str, detail: str) -> None:
        with self.lock:
            self.states.append((state, detail))

    def names(self) -> list[str]:
        with self.lock:
            return [s for s, _ in self.states]


def test_worker_reconnects_and_keeps_delivering(tmp_path):
    folder = _image_folder(tmp_path / "imgs", 3)
    rec = Recorder()
    built: list[UnpluggedAfter] = []

    def factory() -> UnpluggedAfter:
        built.append(UnpluggedAfter(folder, 4))
        return built[-1]

    worker = AcquisitionWorker(factory, rec.on_frame, rec.on_state, fetch_timeout_s=0.5,
                               reconnect_initial_s=0.05, reconnect_max_s=0.1)
    worker.start()
    try:
        assert _wait_for(lambda: worker.stats.reconnects >= 2 and len(rec.frames) >= 10)
    finally:
        assert worker.stop(5.0)
    names = rec.names()
    assert names[:5] == ["connecting", "streaming", "lost", "connecting", "streaming"]
    assert ("lost", "cable unplugged") in rec.states and names[-1] == "stopped"
    assert len(built) >= 3 and all(s._files is None for s in built)  # every source was closed
    assert worker.stats.frames == len(rec.frames) == sum(s.stats.frames for s in built)
    assert worker.stats.reconnects == len(built) - 1
    assert worker.last_frame_mono is not None and not worker.is_alive()


def test_worker_stop_is_prompt_during_back_off(tmp_path):
    folder = _image_folder(tmp_path / "imgs", 2)
    rec = Recorder()
    worker = AcquisitionWorker(lambda: UnpluggedAfter(folder, 1), rec.on_frame, rec.on_state,
                               fetch_timeout_s=0.5, reconnect_initial_s=20.0, reconnect_max_s=60.0)
    worker.start()
    assert _wait_for(lambda: worker.state == "lost")
    t0 = time.monotonic()
    assert worker.stop(5.0)
    assert time.monotonic() - t0 < 1.0
    assert worker.state == "stopped" and len(rec.frames) == 1


def test_worker_survives_bad_configuration_and_consumer_errors(tmp_path):
    rec = Recorder()
    worker = AcquisitionWorker(lambda: ReplaySource(tmp_path / "missing"), rec.on_frame, rec.on_state,
                               fetch_timeout_s=0.2, reconnect_initial_s=0.02, reconnect_max_s=0.05)
    worker.start()
    assert _wait_for(lambda: rec.names().count("lost") >= 2)
    assert worker.stop(5.0) and worker.stats.reconnects == 0
    assert "not found" in rec.states[1][1]

    folder = _image_folder(tmp_path / "imgs", 3)

    def broken_consumer(frame: Frame) -> None:
        raise RuntimeError("consumer bug")

    worker = AcquisitionWorker(lambda: ReplaySource(folder, fps=200.0), broken_consumer, None, fetch_timeout_s=0.2)
    worker.start()
    try:
        assert _wait_for(lambda: worker.stats.frames >= 5)
        assert worker.is_alive() and worker.state == "streaming"
    finally:
        assert worker.stop(5.0)


def test_worker_finishes_a_non_looping_replay(tmp_path):
    folder = _image_folder(tmp_path / "imgs", 4)
    rec = Recorder()
    worker = AcquisitionWorker(lambda: ReplaySource(folder, fps=200.0, loop=False), rec.on_frame, rec.on_state,
                               fetch_timeout_s=0.2)
    worker.start()
    assert _wait_for(lambda: not worker.is_alive())
    assert worker.state == "finished" and len(rec.frames) == 4
    assert rec.names() == ["connecting", "streaming", "finished"]
    assert worker.stop(1.0)


def test_worker_on_the_simulated_camera(viky):
    rec = Recorder()
    worker = AcquisitionWorker(lambda: GenICamSource(viky, index=0), rec.on_frame, rec.on_state,
                               fetch_timeout_s=1.0, reconnect_initial_s=0.1)
    worker.start()
    try:
        assert _wait_for(lambda: len(rec.frames) >= 1)
        time.sleep(1.0)
        assert isinstance(worker.source, GenICamSource)
    finally:
        assert worker.stop(5.0)
    assert len(rec.frames) >= 10  # viky free-runs at 20 fps
    assert rec.names() == ["connecting", "streaming", "stopped"]
    ids = [f.frame_id for f in rec.frames]
    assert ids == sorted(ids) and worker.stats.frames == len(rec.frames)
    assert worker.last_frame_mono is not None and time.monotonic() - worker.last_frame_mono < 5.0
    # the worker closed the camera: the producer can be opened again
    src = GenICamSource(viky, index=0)
    src.open()
    try:
        assert src.grab(2.0) is not None
    finally:
        src.close()


def test_worker_reports_trigger_idleness(viky):
    rec = Recorder()
    # viky free-runs at 20 fps whatever the trigger setting; a 10 ms grab timeout makes it look idle in between
    worker = AcquisitionWorker(lambda: GenICamSource(viky, trigger="software"), rec.on_frame, rec.on_state,
                               fetch_timeout_s=0.01)
    worker.start()
    try:
        assert _wait_for(lambda: {"streaming", "waiting_trigger"} <= set(rec.names()) and len(rec.frames) >= 3)
    finally:
        assert worker.stop(5.0)
    names = rec.names()
    assert names[:2] == ["connecting", "waiting_trigger"] and "lost" not in names
    assert worker.stats.timeouts >= 1
