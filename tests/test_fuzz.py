"""Property-based fuzzing (hypothesis) of everything a user or a stranger can hand the product: MQTT command
payloads, the edge config, the product config, label files (JSON, COCO, LabelMe), bundle manifests, the
result queue's files and image bytes.  Every case must end in a result or in the module's own error naming
the input; never another exception, a hang, or a lost or invented result.

``make test`` runs a small sample of each (the default profile); ``make fuzz`` runs the ``fuzz`` profile,
over 10,000 cases in all, and prints hypothesis' statistics.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.core.bundle import BundleError, load_bundle
from edge_runtime.core.preprocess import ImageReadError, decode_image
from edge_runtime.publishing.command_auth import CommandAuth
from edge_runtime.publishing.disk_queue import DiskQueue
from edge_runtime.publishing.messages import COMMAND_NAMES, CommandError, parse_command
from edge_runtime.service.config import EdgeConfigError, load_edge_config, parse_edge_config
from training_host.config import ConfigError, load_config
from training_host.labels.weak_labels import LabelError, LabelSet, import_coco, import_labelme, load_labels

pytestmark = pytest.mark.fuzz

# hypothesis' profiles (default: 40 cases; make fuzz: 1300) are set in tests/conftest.py for every module

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=25)


def _mutate(base: dict, draw_key, draw_value) -> dict:
    """A copy of ``base`` with one nested key set to a drawn value (or deleted)."""
    out = json.loads(json.dumps(base))
    node, path = out, draw_key
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if draw_value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = draw_value
    return out


_DELETE = object()


# ---- MQTT commands ----------------------------------------------------------------------------------------

command_objects = st.fixed_dictionaries(
    {"command": st.sampled_from(["reload", "switch_product", "snapshot", "status", "rebot"]) | json_scalars},
    optional={"id": json_scalars, "product": json_scalars | st.sampled_from(["bracket", "../x", "a/b", ""]),
              "auth": json_values, "extra": json_values})


@given(st.binary(max_size=300) | command_objects.map(lambda o: json.dumps(o).encode())
       | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_command_payloads(payload):
    for auth in (None, CommandAuth(b"0123456789abcdef-fuzz")):
        try:
            cmd = parse_command(payload, auth)
        except CommandError as exc:
            assert str(exc) and "Traceback" not in str(exc)
        else:
            assert auth is None and cmd.command in COMMAND_NAMES


# ---- edge config ------------------------------------------------------------------------------------------

EDGE_BASE = {"bundles": {"store": "/tmp/store", "product": "demo"}, "camera": {"source": "replay",
             "replay": {"path": "/tmp/images"}}, "mqtt": {"topic_prefix": "a/b/c"}}
EDGE_KEYS = [("bundles", "product"), ("bundles", "require_signature"), ("camera", "source"), ("camera", "replay"),
             ("camera", "genicam", "buffers"), ("mqtt", "port"), ("mqtt", "topic_prefix"), ("mqtt", "tls"),
             ("mqtt", "qos"), ("queue", "max_mb"), ("health", "port"), ("sparkplug", "group_id"),
             ("opcua", "port"), ("commands", "require_auth"), ("threads",), ("nonsense",)]


@given(st.sampled_from(EDGE_KEYS), json_values | st.just(_DELETE))
def test_edge_config_values(key, value):
    try:
        parse_edge_config(_mutate(EDGE_BASE, key, value))
    except EdgeConfigError as exc:
        assert str(exc).startswith("config: ")


@given(st.text(max_size=300) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_edge_config_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("edge") / "edge.yaml"
    path.write_bytes(text.encode("utf-8", "replace"))
    try:
        load_edge_config(path)
    except EdgeConfigError as exc:
        assert str(path) in str(exc)


# ---- product config ---------------------------------------------------------------------------------------

PRODUCT_KEYS = [("input_size",), ("posfar", "d_l"), ("posfar", "k_references"), ("swin", "steps"),
                ("swin", "enabled"), ("threshold", "holdout_fraction"), ("backbone", "name"), ("weak", "box_overlap"),
                ("seed",), ("batch_size",), ("nonsense",)]


@given(st.sampled_from(PRODUCT_KEYS), json_values | st.just(_DELETE))
def test_product_config_values(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("product") / "p.yaml"
    path.write_text(yaml.safe_dump(_mutate({"product": "x"}, key, value)))
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc)


# ---- label files ------------------------------------------------------------------------------------------

label_entries = st.dictionaries(
    st.text(max_size=20) | st.sampled_from(["good/000.png", "../etc/passwd", "/abs.png", "a\\b.png"]),
    st.fixed_dictionaries({}, optional={"boxes": json_values, "rotated_boxes": json_values, "tag": json_values,
                                        "blocks": json_values, "other": json_values}) | json_values,
    max_size=4)


@given(label_entries | json_values)
def test_label_files(tmp_path_factory, body):
    d = tmp_path_factory.mktemp("labels")
    for name, content in (("labels.json", {"images": body}), ("raw.json", body)):
        (d / name).write_text(json.dumps(content))
        try:
            labels = load_labels(d / name, image_sizes={"good/000.png": (64, 64)})
        except LabelError as exc:
            assert name in str(exc)
        else:
            assert isinstance(labels, LabelSet)


@given(json_values, json_values)
def test_coco_and_labelme_imports(tmp_path_factory, coco, labelme):
    d = tmp_path_factory.mktemp("imports")
    (d / "coco.json").write_text(json.dumps(coco))
    (d / "shapes.json").write_text(json.dumps(labelme))
    for run in (lambda: import_coco(d / "coco.json"), lambda: import_labelme([d / "shapes.json"], root=d)):
        try:
            run()
        except LabelError as exc:
            assert str(exc)


# ---- bundle manifests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest_base(fitted_slice) -> tuple[Path, dict]:
    root = fitted_slice[0]
    return root, json.loads((root / "manifest.json").read_text())


MANIFEST_KEYS = [("schema_version",), ("product",), ("preprocessing", "input_size"), ("backbone", "d_f"),
                 ("posfar", "d_l"), ("thresholds", "image"), ("files",), ("arrays",), ("scoring",),
                 ("latency_budget_ms",), ("nonsense",)]


@given(st.sampled_from(MANIFEST_KEYS), json_values | st.just(_DELETE))
def test_bundle_manifests(tmp_path_factory, manifest_base, key, value):
    src, base = manifest_base
    d = tmp_path_factory.mktemp("bundle")
    for f in src.iterdir():
        if f.name != "manifest.json":
            os.symlink(f, d / f.name)
    (d / "manifest.json").write_text(json.dumps(_mutate(base, key, value)))
    try:
        load_bundle(d)
    except BundleError as exc:
        assert exc.file and exc.problem


# ---- the result queue's files -----------------------------------------------------------------------------

@given(st.lists(st.binary(min_size=1, max_size=120), min_size=1, max_size=12), st.data())
def test_disk_queue_keeps_a_prefix_of_what_was_written(tmp_path_factory, payloads, data):
    """A torn or corrupted segment never invents or alters a result: what is read back is the written
    records' prefix, and a cut at the end loses only records that were not complete."""
    d = tmp_path_factory.mktemp("queue")
    q = DiskQueue(d, 1 << 20)
    sizes = []
    for p in payloads:
        q.append(p)
        sizes.append(sum(f.stat().st_size for f in d.glob("seg-*.wal")))
    q.close()
    (seg,) = sorted(d.glob("seg-*.wal"))
    raw = bytearray(seg.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "append", "state"]))
    cut = data.draw(st.integers(0, len(raw)))
    if how == "truncate":
        raw = raw[:cut]
    elif how == "flip" and raw:
        raw[min(cut, len(raw) - 1)] ^= data.draw(st.integers(1, 255))
    elif how == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    seg.write_bytes(bytes(raw))
    if how == "state":
        (d / "state.json").write_bytes(data.draw(st.binary(max_size=40) | json_values.map(
            lambda v: json.dumps(v).encode())))
    try:
        q = DiskQueue(d, 1 << 20)
    except (ValueError, OSError) as exc:  # a state file it cannot trust is an error naming the file
        assert str(d) in str(exc) or "state" in str(exc)
        return
    try:
        got = q.peek(len(payloads) + 5)
    finally:
        q.close()
    values = [p for _, p in got]
    start = got[0][0] if got else 0
    assert values == payloads[start:start + len(values)], "a record was invented or altered"
    if how == "truncate":
        complete = sum(size <= cut for size in sizes)
        assert start + len(values) >= complete or start > 0, "a complete record before the cut was lost"


# ---- image bytes ------------------------------------------------------------------------------------------

def _png(width: int, height: int, bit_depth: int = 8, colour: int = 0, body: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


def _encoded(image: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


real_images = st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4]),
                        st.sampled_from([np.uint8, np.uint16]), st.sampled_from([".png", ".tiff", ".jpg", ".bmp"]))


@given(st.one_of(
    st.binary(max_size=400),
    st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 4, 8, 16]),
              st.sampled_from([0, 2, 3, 4, 6]), st.binary(max_size=64)).map(lambda a: _png(*a)),
    st.tuples(real_images, st.integers(0, 10_000)).map(
        lambda a: _encoded(np.full((a[0][1], a[0][0], a[0][2]) if a[0][2] > 1 else (a[0][1], a[0][0]),
                                   7, a[0][3]) if not (a[0][3] == np.uint16 and a[0][4] in (".jpg", ".bmp"))
                           else np.zeros((a[0][1], a[0][0]), np.uint8), a[0][4])[:a[1]]),
))
def test_image_bytes(data):
    try:
        image = decode_image(data, "fuzz.img", max_pixels=4_000_000)
    except ImageReadError as exc:
        assert str(exc).startswith("fuzz.img: ")
    else:
        assert image.size <= 4 * 4_000_000


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = _png(100_000, 100_000, body=b"")  # 10^10 pixels declared in 60 bytes
    with pytest.raises(ImageReadError, match="declares 10,000,000,000 pixels.*refused before decoding"):
        decode_image(bomb, "bomb.png")
    with pytest.raises(ImageReadError, match="declares 5000x5000 pixels, more than the 1,000,000 accepted"):
        decode_image(_png(5000, 5000), "big.png", max_pixels=1_000_000)
    small = io.BytesIO(_encoded(np.zeros((8, 8, 3), np.uint8), ".png")).getvalue()
    assert decode_image(small, "ok.png").shape == (8, 8, 3)
