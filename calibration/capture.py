"""``capture``: grab good frames from the configured camera into a folder, with a log of where they came from.

The frames go through the same source the service uses (:func:`edge_runtime.acquisition.open_source`),
so they are converted exactly as the service will see them; incomplete buffers are already skipped by the
source.  A frame identical to the one before (same pixels: a frozen stream or a replay looping on one
image) is skipped, since a duplicate in the bank and in the hold-out would fake a low threshold.  Frames
are written as lossless PNG (to a temporary name, then renamed) and ``capture.json`` records, per frame,
file, frame id, timestamp and file sha256, and once, what the camera was (name, source, serial, device
id, pixel format, exposure where readable).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
from tqdm import tqdm

from edge_runtime.acquisition import CameraLost, FrameSource, SourceError, SourceExhausted, fetch_timeout_s, open_source
from edge_runtime.acquisition.config import CameraConfig

from .errors import CalibrationError

LOG = "capture.json"
LOG_SCHEMA = "weakrest.capture/1"
_FRAME = re.compile(r"frame_(\d+)\.png")
#: GenApi nodes recorded in the log when the camera has them
_NODES = ("DeviceVendorName", "DeviceModelName", "DeviceSerialNumber", "PixelFormat", "ExposureTime",
          "ExposureTimeAbs", "Gain", "Width", "Height")


@dataclass
class CaptureReport:
    out: str
    requested: int
    written: int
    duplicates: int
    incomplete: int
    seconds: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="milliseconds")


def camera_info(cfg: CameraConfig, source: FrameSource) -> dict[str, Any]:
    """What the log records about the camera; GenApi nodes the camera lacks are simply left out."""
    info: dict[str, Any] = {"name": cfg.name, "source": cfg.source, "source_name": source.name}
    if cfg.source == "genicam":
        info.update({"serial": cfg.genicam.serial, "device_id": getattr(source, "device_id", None),
                     "cti": str(cfg.genicam.cti) if cfg.genicam.cti else None, "trigger": cfg.genicam.trigger})
        node_map = getattr(source, "node_map", None)
        for node in _NODES if node_map is not None else ():
            try:
                value = getattr(node_map, node).value
            except Exception:  # noqa: BLE001 - absent or unreadable nodes raise GenApi exceptions
                continue
            info[node] = value if isinstance(value, int | float | bool) else str(value)
    elif cfg.source == "replay":
        info.update({"path": str(cfg.replay.path), "fps": cfg.replay.fps})
    else:
        info.update({"device": str(cfg.opencv.device)})
    return info


def _prepare(out: Path, append: bool) -> tuple[dict[str, Any], int]:
    """The log to extend and the next frame number; refuses a non-empty folder unless ``append``."""
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"{out}: exists and is not a folder")
    existing = sorted(out.iterdir()) if out.is_dir() else []
    if existing and not append:
        raise CalibrationError(f"{out}: not empty ({len(existing)} entries); pass --append to add frames to it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibrationError(f"{out}: cannot create the folder ({exc.strerror or exc})") from None
    log: dict[str, Any] = {"schema": LOG_SCHEMA, "camera": None, "sessions": [], "frames": []}
    if (out / LOG).is_file():
        try:
            log = json.loads((out / LOG).read_text(encoding="utf-8"))
            if not isinstance(log, dict) or not isinstance(log.get("frames"), list):
                raise ValueError("expected an object with a 'frames' list")
        except ValueError as exc:
            raise CalibrationError(f"{out / LOG}: not a capture log ({exc}); move it away to append") from None
    numbers = [int(m.group(1)) for p in existing if (m := _FRAME.fullmatch(p.name))]
    return log, max(numbers, default=0) + 1


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def capture(cfg: CameraConfig, count: int, out: Path, *, append: bool = False, timeout_s: float = 10.0,
            quiet: bool = False) -> CaptureReport:
    """Grab ``count`` new frames into ``out``; :class:`CalibrationError` on a timeout, a lost camera or a
    failed write (the frames written so far stay, with their log)."""
    if count < 1:
        raise CalibrationError(f"--count must be at least 1, got {count}")
    log, number = _prepare(out, append)
    t0 = time.time()
    session: dict[str, Any] = {"started_at": _iso(t0), "requested": count, "written": 0, "duplicates_skipped": 0}
    log["sessions"].append(session)
    try:
        source = open_source(cfg)
        source.open()
    except SourceError as exc:
        raise CalibrationError(f"camera {cfg.name!r} ({cfg.source}): {exc}") from None
    previous: bytes | None = None
    completed = False
    grab_timeout = fetch_timeout_s(cfg)
    software_trigger = cfg.source == "genicam" and cfg.genicam.trigger == "software"
    try:
        info = camera_info(cfg, source)
        if log.get("camera") not in (None, info):
            session["camera"] = info  # appended from another camera setting: keep both
        log["camera"] = log.get("camera") or info
        last_progress = time.monotonic()
        with tqdm(total=count, desc="capturing", unit="frame", disable=quiet) as bar:
            while session["written"] < count:
                if software_trigger:
                    source.software_trigger()  # type: ignore[attr-defined]
                frame = source.grab(grab_timeout)
                if frame is not None:
                    digest = hashlib.sha256(frame.image.tobytes()).digest()
                    if digest == previous:
                        session["duplicates_skipped"] += 1
                        frame = None
                    previous = digest
                if frame is None:
                    if time.monotonic() - last_progress > timeout_s:
                        raise CalibrationError(_timeout_message(cfg, source, session, timeout_s))
                    continue
                last_progress = time.monotonic()
                name = f"frame_{number:06d}.png"
                ok, png = cv2.imencode(".png", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
                if not ok:
                    raise CalibrationError(f"{out / name}: could not encode the frame as PNG")
                try:
                    _write_atomic(out / name, png.tobytes())
                except OSError as exc:
                    raise CalibrationError(f"{out / name}: cannot write ({exc.strerror or exc}); "
                                           f"{session['written']} frames written before it") from None
                log["frames"].append({"file": name, "frame_id": frame.frame_id, "timestamp": _iso(frame.captured_at),
                                      "captured_at": round(frame.captured_at, 6),
                                      "sha256": hashlib.sha256(png.tobytes()).hexdigest(),
                                      "width": int(frame.image.shape[1]), "height": int(frame.image.shape[0])})
                session["written"] += 1
                number += 1
                bar.update(1)
        completed = True
    except SourceExhausted as exc:
        raise CalibrationError(f"camera {cfg.name!r}: the source ended after {session['written']} of {count} "
                               f"frames ({exc})") from None
    except CameraLost as exc:
        raise CalibrationError(f"camera {cfg.name!r}: lost after {session['written']} of {count} frames ({exc}); "
                               "is it connected and streaming?") from None
    finally:
        session["incomplete_skipped"] = source.stats.incomplete
        session["finished_at"] = _iso(time.time())
        source.close()  # before anything else may open the camera: one GenTL producer per process
        try:
            _write_atomic(out / LOG, (json.dumps(log, indent=2) + "\n").encode("utf-8"))
        except OSError as exc:
            if completed:  # otherwise the error already on its way says more than this one
                raise CalibrationError(f"{out / LOG}: cannot write the capture log ({exc.strerror or exc})") from None
    return CaptureReport(out=str(out), requested=count, written=session["written"],
                         duplicates=session["duplicates_skipped"], incomplete=session["incomplete_skipped"],
                         seconds=round(time.time() - t0, 2))


def _timeout_message(cfg: CameraConfig, source: FrameSource, session: dict, timeout_s: float) -> str:
    s = source.stats
    what = (f"only duplicate frames ({session['duplicates_skipped']}) for {timeout_s:g} s: the stream looks frozen"
            if session["duplicates_skipped"] else f"no frame for {timeout_s:g} s")
    hint = "is it connected, streaming" + (" and triggered" if source.triggered else "") + "?"
    return (f"camera {cfg.name!r} ({source.name}): {what} after {session['written']} frames "
            f"(timeouts {s.timeouts}, incomplete {s.incomplete}); {hint}")
