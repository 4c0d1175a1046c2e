"""GenICam (PFNC) pixel formats to the one layout the pipeline takes: H x W x 3 uint8 RGB.

Cameras deliver mono, colour, Bayer mosaics, YUV and 10..16-bit data; converting here, once, keeps every
downstream stage format-agnostic.  Input is what harvesters' ``component.data`` gives (a flat 1-D array,
packed formats already expanded to uint16) or an already shaped array.  The result never shares memory
with the input, so a driver buffer can be re-queued as soon as this returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .frames import IncompleteBuffer, SourceError


@dataclass(frozen=True)
class _Spec:
    layout: str  # mono | rgb | bgr | rgba | bgra | bayer | yuyv | uyvy
    channels: int  # values per pixel in the (expanded) data
    bits: int  # significant bits per value; > 8 arrives as uint16
    code: int | None = None  # cv2 conversion code where one is used


def _build_formats() -> dict[str, _Spec]:
    formats: dict[str, _Spec] = {}
    for bits in (8, 10, 12, 14, 16):
        formats[f"Mono{bits}"] = _Spec("mono", 1, bits)
    for name, bits in (("Mono10p", 10), ("Mono12p", 12), ("Mono14p", 14), ("Mono10Packed", 10), ("Mono12Packed", 12)):
        formats[name] = _Spec("mono", 1, bits)  # harvesters expands packed data to uint16
    for bits in (8, 10, 12, 16):
        formats[f"RGB{bits}"] = _Spec("rgb", 3, bits)
        formats[f"BGR{bits}"] = _Spec("bgr", 3, bits)
    formats["RGBa8"] = _Spec("rgba", 4, 8, cv2.COLOR_RGBA2RGB)
    formats["BGRa8"] = _Spec("bgra", 4, 8, cv2.COLOR_BGRA2RGB)
    # OpenCV names a Bayer pattern after the 2x2 block starting at (1, 1), PFNC after the one at (0, 0):
    # PFNC BayerRG (R at the top-left) is OpenCV's BayerBG, and so on.
    bayer_codes = {
        "RG": cv2.COLOR_BayerBG2RGB,
        "GR": cv2.COLOR_BayerGB2RGB,
        "GB": cv2.COLOR_BayerGR2RGB,
        "BG": cv2.COLOR_BayerRG2RGB,
    }
    for pattern, code in bayer_codes.items():
        for suffix, bits in (("8", 8), ("10", 10), ("12", 12), ("16", 16), ("10p", 10), ("12p", 12),
                             ("10Packed", 10), ("12Packed", 12)):
            formats[f"Bayer{pattern}{suffix}"] = _Spec("bayer", 1, bits, code)
    formats["YUV422_8"] = _Spec("yuyv", 2, 8, cv2.COLOR_YUV2RGB_YUY2)
    formats["YCbCr422_8"] = _Spec("yuyv", 2, 8, cv2.COLOR_YUV2RGB_YUY2)
    formats["YUV422_8_UYVY"] = _Spec("uyvy", 2, 8, cv2.COLOR_YUV2RGB_UYVY)
    formats["YCbCr422_8_CbYCrY"] = _Spec("uyvy", 2, 8, cv2.COLOR_YUV2RGB_UYVY)
    return formats


_FORMATS = _build_formats()
SUPPORTED_FORMATS: tuple[str, ...] = tuple(_FORMATS)


def is_supported(pixel_format: str) -> bool:
    return pixel_format in _FORMATS


def to_rgb8(data: np.ndarray, pixel_format: str, width: int, height: int) -> np.ndarray:
    """Convert one image in ``pixel_format`` to a new H x W x 3 uint8 RGB C-contiguous array.

    Raises :class:`SourceError` for an unsupported format or a buffer whose size does not match
    ``width`` x ``height`` (line padding at the end of each row is tolerated and dropped), and its subclass
    :class:`IncompleteBuffer` for a buffer shorter than the image (a transfer that lost data).
    """
    spec = _FORMATS.get(pixel_format)
    if spec is None:
        raise SourceError(f"unsupported pixel format {pixel_format!r}; supported: {', '.join(SUPPORTED_FORMATS)}")
    if width <= 0 or height <= 0:
        raise SourceError(f"{pixel_format}: invalid image size {width}x{height}")
    arr = np.asarray(data)
    if spec.bits > 8:
        arr = _as_uint16(arr, pixel_format)
        plane = _shape(arr, pixel_format, width, height, spec.channels)
        plane = np.minimum(plane >> (spec.bits - 8), 255).astype(np.uint8)
    else:
        if arr.dtype != np.uint8:
            raise SourceError(f"{pixel_format}: expected uint8 data, got {arr.dtype}")
        plane = _shape(arr, pixel_format, width, height, spec.channels)
    return _convert(np.ascontiguousarray(plane), spec, pixel_format, width)


def _as_uint16(arr: np.ndarray, pixel_format: str) -> np.ndarray:
    if arr.dtype == np.uint16:
        return arr
    if arr.dtype == np.uint8:  # raw bytes of an unpacked 16-bit format (little endian per GenICam)
        flat = np.ascontiguousarray(arr).reshape(-1)
        if flat.size % 2:
            raise SourceError(f"{pixel_format}: odd byte count {flat.size} for 16-bit data")
        return flat.view("<u2")
    raise SourceError(f"{pixel_format}: expected uint16 (or raw uint8) data, got {arr.dtype}")


def _shape(arr: np.ndarray, pixel_format: str, width: int, height: int, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) view of the data; a flat buffer with per-line padding is cropped."""
    need = width * height * channels
    flat = arr.reshape(-1)
    if flat.size != need:
        row = width * channels
        if flat.size > need and flat.size % height == 0:
            flat = flat.reshape(height, -1)[:, :row]
        elif flat.size < need:
            raise IncompleteBuffer(f"{pixel_format} {width}x{height} needs {need} values, the buffer holds only "
                                   f"{flat.size}")
        else:
            raise SourceError(f"{pixel_format} {width}x{height} needs {need} values, the buffer holds {flat.size}")
    shape = (height, width) if channels == 1 else (height, width, channels)
    return flat.reshape(shape)


def _convert(plane: np.ndarray, spec: _Spec, pixel_format: str, width: int) -> np.ndarray:
    if spec.layout == "mono":
        return cv2.cvtColor(plane, cv2.COLOR_GRAY2RGB)
    if spec.layout == "rgb":
        return plane.copy()
    if spec.layout == "bgr":
        return cv2.cvtColor(plane, cv2.COLOR_BGR2RGB)
    if spec.layout in ("yuyv", "uyvy") and width % 2:
        raise SourceError(f"{pixel_format}: width {width} must be even")
    assert spec.code is not None
    out = cv2.cvtColor(plane, spec.code)
    return np.ascontiguousarray(out)
