"""``weakrest-train labels annotate``: a local page to draw weak labels (boxes, rotated boxes, a "bad" tag).

Weak labels are the method's selling point, so drawing them must not mean typing JSON.  The server is the standard
library's ``ThreadingHTTPServer`` on loopback; it serves a fixed set of page files, the images listed at start (looked
up by key, never by a path taken from a request, so nothing outside IMAGES can be read) and, with a bundle, the
bundle's heatmap of an image as a labelling hint (computed by the torch-free edge runtime on first request, cached).

Saving merges the page's changed images into the label file as it is on disk (images outside IMAGES keep their labels
untouched), validates the exact bytes about to be written with :func:`~training_host.labels.weak_labels.load_labels`
(the loader ``fit --labels`` uses, with the same root) and only then renames them into place (temp file + fsync +
rename), so a file that fit would refuse is never written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import threading
import webbrowser
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from edge_runtime.core.preprocess import IMAGE_SUFFIXES, list_images, read_image
from training_host.labels.weak_labels import LabelError, _image_hw, _key_problem, load_labels

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).with_name("annotate_page")
_STATIC: dict[str, tuple[str, str]] = {
    "/": ("annotate.html", "text/html; charset=utf-8"),
    "/annotate.html": ("annotate.html", "text/html; charset=utf-8"),
    "/annotate.js": ("annotate.js", "text/javascript; charset=utf-8"),
    "/annotate.css": ("annotate.css", "text/css; charset=utf-8"),
}
_RAW_TYPES = {".png": "image/png", ".bmp": "image/bmp"}  # served as they are; others are decoded and sent as PNG
_MAX_BODY = 32 * 1024 * 1024
_HEATMAP_CACHE = 256  # heatmap PNGs kept (small: the heatmap has the bundle's input size)


class AnnotateError(ValueError):
    """IMAGES, the root or the existing label file cannot be used; the message says what to change."""


# ----------------------------------------------------------------------------------------------- images and keys
def collect_images(sources: Sequence[str | Path]) -> list[Path]:
    """Image files of IMAGES: folders recursively (common image suffixes), files as given; duplicates once."""
    found: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found.extend(list_images(src, recursive=True))
        elif src.is_file():
            if src.suffix.lower() not in IMAGE_SUFFIXES:
                raise AnnotateError(f"{src}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found.append(src)
        else:
            raise AnnotateError(f"{src}: no such file or folder")
    seen: set[str] = set()
    out = []
    for p in found:
        a = os.path.abspath(p)
        if a not in seen:
            seen.add(a)
            out.append(Path(a))
    if not out:
        raise AnnotateError(f"no images in {', '.join(map(str, sources))}")
    return out


def default_root(sources: Sequence[str | Path]) -> Path:
    """The folder label keys are relative to: the nearest dataset root (a folder with ``train/good`` or ``test``)
    at or above the common folder of IMAGES, since ``fit --data ROOT`` resolves keys there; else that folder."""
    folders = [os.path.abspath(s) if Path(s).is_dir() else os.path.dirname(os.path.abspath(s)) for s in sources]
    common = Path(os.path.commonpath(folders))
    for candidate in (common, *common.parents):
        if (candidate / "train" / "good").is_dir() or (candidate / "test").is_dir():
            return candidate
    return common


def image_keys(images: Sequence[Path], root: Path) -> dict[str, Path]:
    """Label key (posix path relative to ``root``, the label file's convention) -> image file."""
    root_abs = os.path.abspath(root)
    keys: dict[str, Path] = {}
    for p in images:
        rel = os.path.relpath(p, root_abs)
        if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
            raise AnnotateError(f"{p} is not under the root {root_abs} (label keys are relative to it; see --root)")
        keys.setdefault(Path(rel).as_posix(), p)
    return keys


# ----------------------------------------------------------------------------------------------- label file
def _read_doc(path: Path) -> dict[str, Any]:
    """The label file as raw JSON (entries kept exactly, blocks included); an empty document when absent."""
    if not path.exists():
        return {"version": 1, "images": {}}
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), dict):
        raise LabelError(f"{path.name}: expected a JSON object with 'version' and 'images'")
    return doc


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class SaveResult:
    saved: bool
    message: str
    problems: list[str]
    warnings: list[str]
    labelled: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"saved": self.saved, "message": self.message, "problems": self.problems, "warnings": self.warnings,
                "labelled": self.labelled}


class LabelStore:
    """The label file behind the page: reads entries, merges updates, validates and writes atomically."""

    def __init__(self, out: Path, root: Path, keys: dict[str, Path]) -> None:
        self.out = Path(out)
        self.root = Path(root)
        self.keys = keys
        self._sizes: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        if self.out.exists():  # refuse at start what every save would refuse
            try:
                load_labels(self.out, root=self.root)
            except LabelError as exc:
                raise AnnotateError(f"existing label file {self.out} is not valid for root {self.root}: {exc} "
                                    "(fix it, pass --root, or choose another --out)") from exc

    def entries(self) -> dict[str, Any]:
        """Entries of the images on the page, as on disk (None: no label)."""
        images = _read_doc(self.out)["images"]
        return {k: images.get(k) for k in self.keys}

    def _image_sizes(self, keys: list[str]) -> dict[str, tuple[int, int]] | None:
        """(height, width) of each key, read as the loader reads them and cached; None when a key is malformed or
        its image unreadable, so the loader reads them itself and reports it."""
        if any(_key_problem(k) for k in keys):
            return None
        for k in keys:
            if k not in self._sizes:
                hw = _image_hw(self.root / k)
                if hw is None:
                    return None
                self._sizes[k] = hw
        return {k: self._sizes[k] for k in keys}

    def save(self, updates: dict[str, Any]) -> SaveResult:
        """Apply ``updates`` (key -> entry, or None to remove the label) to the file on disk; all or nothing."""
        unknown = sorted(k for k in updates if k not in self.keys)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            return SaveResult(False, f"not saved: {len(unknown)} image(s) not on this page: {shown}", [], [])
        with self._lock:
            try:
                doc = _read_doc(self.out)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                return SaveResult(False, f"not saved: cannot read the current {self.out.name} ({exc}); "
                                         "nothing was written", [], [])
            images = dict(doc["images"])
            for key, entry in updates.items():
                if entry is None:
                    images.pop(key, None)
                else:
                    images[key] = entry
            doc = {**doc, "images": dict(sorted(images.items()))}
            try:
                text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
            except (TypeError, ValueError) as exc:
                return SaveResult(False, f"not saved: the labels are not valid JSON ({exc})", [], [])
            return self._write_validated(text, doc["images"])

    def _write_validated(self, text: str, images: dict[str, Any]) -> SaveResult:
        folder = self.out.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            boxed = [k for k, e in images.items() if isinstance(e, dict) and (e.get("boxes") or
                                                                              e.get("rotated_boxes"))]
            sizes = self._image_sizes(boxed)
            try:
                labels = load_labels(tmp, root=self.root, image_sizes=sizes)
            except LabelError as exc:
                problems = [p.replace(tmp.name, self.out.name) for p in exc.problems]
                return SaveResult(False, "not saved (fit --labels would refuse the file): "
                                  + str(exc).replace(tmp.name, self.out.name), problems, [])
            mode = (self.out.stat().st_mode & 0o777) if self.out.exists() else 0o644
            os.chmod(tmp, mode)
            os.replace(tmp, self.out)
            _fsync_dir(folder)
            warnings = [w.replace(tmp.name, self.out.name) for w in labels.warnings]
            on_page = sum(1 for k in self.keys if k in labels.images)
            return SaveResult(True, f"saved {self.out} ({len(labels.images)} labelled images, {on_page} on this "
                                    "page)", [], warnings, len(labels.images))
        except OSError as exc:
            return SaveResult(False, f"not saved: cannot write {self.out} ({exc})", [], [])
        finally:
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- heatmap hints
class HeatmapHints:
    """The bundle's anomaly heatmap of an image as a translucent PNG, computed on first request and cached."""

    def __init__(self, bundle: Path) -> None:
        from edge_runtime.core.pipeline import open_inspector

        self.bundle = Path(bundle)
        self.inspector = open_inspector(self.bundle)  # BundleError here, at start, not on the first request
        self.threshold = float(self.inspector.threshold)
        self._cache: OrderedDict[str, tuple[bytes, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, path: Path) -> tuple[bytes, dict[str, Any]]:
        with self._lock:  # one inference at a time; a second request for the same image waits for the cache
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            result = self.inspector.inspect(read_image(path))
            png = self.render(result.heatmap, self.threshold)
            info = {"score": float(result.score), "threshold": self.threshold, "verdict": result.verdict}
            self._cache[key] = (png, info)
            while len(self._cache) > _HEATMAP_CACHE:
                self._cache.popitem(last=False)
            return png, info

    @staticmethod
    def render(heatmap: np.ndarray, threshold: float) -> bytes:
        """RGBA PNG at the heatmap's size with overlay.py's colour scale (JET, the threshold in the middle, twice
        the threshold red); opacity grows with the level so normal areas stay readable under it."""
        level = np.clip(np.asarray(heatmap, np.float64) / max(2.0 * threshold, 1e-12), 0.0, 1.0)
        bgr = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
        alpha = (255 * (0.1 + 0.6 * level)).astype(np.uint8)
        ok, data = cv2.imencode(".png", np.dstack([bgr, alpha]))
        if not ok:
            raise ValueError("cannot encode the heatmap as PNG")
        return data.tobytes()


# ----------------------------------------------------------------------------------------------- HTTP
class _Handler(BaseHTTPRequestHandler):
    server: AnnotateServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _key(self, query: dict[str, list[str]]) -> str | None:
        """The key of a listed image; anything else (other files, '..', absolute paths) is simply not found."""
        key = (query.get("key") or [""])[0]
        return key if key in self.server.store.keys else None

    def _host_ok(self) -> bool:
        """A page of another site that rebinds its DNS name to 127.0.0.1 sends its own name as Host: refuse it, so
        only this machine's browser, by address or as localhost, reads images and saves labels."""
        if not self.server.check_host:
            return True
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        if host in self.server.allowed_hosts:
            return True
        self._error(HTTPStatus.FORBIDDEN, f"unexpected Host header {host!r}: open {self.server.url}")
        return False

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        srv = self.server
        if url.path in _STATIC:
            name, ctype = _STATIC[url.path]
            self._send(HTTPStatus.OK, (PAGE_DIR / name).read_bytes(), ctype)
        elif url.path == "/api/state":
            try:
                entries = srv.store.entries()
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot read {srv.store.out}: {exc}")
                return
            self._json(HTTPStatus.OK, {
                "out": str(srv.store.out), "root": str(srv.store.root),
                "images": [{"key": k, "label": entries[k]} for k in srv.store.keys],
                "heatmap": srv.hints is not None,
                "bundle": str(srv.hints.bundle) if srv.hints is not None else None,
            })
        elif url.path == "/api/image":
            key = self._key(query)
            if key is None:
                self._error(HTTPStatus.NOT_FOUND, "no such image on this page")
                return
            path = srv.store.keys[key]
            try:
                ctype = _RAW_TYPES.get(path.suffix.lower())
                if ctype is not None:
                    body = path.read_bytes()
                else:  # JPEG, TIFF, ...: decoded as the trainer decodes them (no EXIF rotation) and sent as PNG
                    ok, data = cv2.imencode(".png", cv2.cvtColor(read_image(path), cv2.COLOR_RGB2BGR))
                    if not ok:
                        raise ValueError(f"{path}: cannot encode as PNG")
                    body, ctype = data.tobytes(), "image/png"
            except (OSError, ValueError) as exc:
                self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
                return
            self._send(HTTPStatus.OK, body, ctype)
        elif url.path == "/api/heatmap":
            key = self._key(query)
            if srv.hints is None:
                self._error(HTTPStatus.NOT_FOUND, "no bundle: start with --bundle BUNDLE for heatmap hints")
            elif key is None:
                self._error(HTTPStatus.NOT_FOUND, "no such image on this page")
            else:
                try:
                    png, info = srv.hints.get(key, srv.store.keys[key])
                except Exception as exc:  # onnxruntime raises its own types; a hint must not take the page down
                    log.warning("heatmap of %s: %s", key, exc)
                    self._error(HTTPStatus.UNPROCESSABLE_ENTITY, f"no heatmap for {key}: {exc}")
                    return
                self._send(HTTPStatus.OK, png, "image/png", {"X-Score": f"{info['score']:.6g}",
                                                             "X-Threshold": f"{info['threshold']:.6g}",
                                                             "X-Verdict": info["verdict"]})
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    def _same_origin(self) -> bool:
        """Another web site open in the browser must not be able to post labels: a cross-site request carries an
        Origin that is not this server (a JSON post also needs a CORS preflight this server never grants)."""
        origin = self.headers.get("Origin")
        if origin is None:
            return True
        return urlsplit(origin).netloc == self.headers.get("Host", "")

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        if url.path != "/api/save":
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        if not self._same_origin():
            self._error(HTTPStatus.FORBIDDEN, "cross-origin request refused")
            return
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= _MAX_BODY:
            self._error(HTTPStatus.BAD_REQUEST, "a JSON body of at most 32 MB is needed")
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, ValueError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, SaveResult(False, f"not saved: request is not JSON ({exc})", [],
                                                          []).to_json())
            return
        updates = body.get("images") if isinstance(body, dict) else None
        if not isinstance(updates, dict):
            self._json(HTTPStatus.BAD_REQUEST, SaveResult(False, "not saved: expected {\"images\": {key: entry or "
                                                                 "null}}", [], []).to_json())
            return
        result = self.server.store.save(updates)
        self._json(HTTPStatus.OK if result.saved else HTTPStatus.UNPROCESSABLE_ENTITY, result.to_json())


class AnnotateServer(ThreadingHTTPServer):
    """The page's server; ``url`` once bound (port 0 picks a free port)."""

    daemon_threads = True

    def __init__(self, store: LabelStore, hints: HeatmapHints | None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.store = store
        self.hints = hints
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        # bound to every interface on purpose (--host 0.0.0.0): any name may reach it; else only its own address
        self.check_host = host not in ("", "0.0.0.0", "::")
        self.allowed_hosts = {host.strip("[]").lower(), "localhost", "127.0.0.1", "::1"}

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser closing a kept-alive connection is routine, not a traceback on the console."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"

    def start(self) -> threading.Thread:
        """Serve from a daemon thread (tests, embedding); ``shutdown()`` + ``server_close()`` stop it."""
        thread = threading.Thread(target=self.serve_forever, name="annotate-http", daemon=True)
        thread.start()
        return thread


def make_server(images: Sequence[str | Path], out: str | Path, root: str | Path | None = None,
                bundle: str | Path | None = None, host: str = "127.0.0.1", port: int = 0) -> AnnotateServer:
    """Everything checked before the page opens: images found, keys under the root, the existing file valid, the
    bundle loadable."""
    files = collect_images(images)
    root_path = Path(os.path.abspath(root)) if root is not None else default_root(images)
    keys = image_keys(files, root_path)
    store = LabelStore(Path(out), root_path, keys)
    hints = HeatmapHints(Path(bundle)) if bundle is not None else None
    return AnnotateServer(store, hints, host, port)


def serve(images: Sequence[str | Path], out: str | Path, root: str | Path | None = None,
          bundle: str | Path | None = None, host: str = "127.0.0.1", port: int = 0, open_browser: bool = True,
          announce: Any = None) -> None:
    """Run the page until Ctrl+C."""
    announce = announce or (lambda line: print(line, flush=True))
    server = make_server(images, out, root, bundle, host, port)
    store = server.store
    announce(f"annotating {len(store.keys)} images; labels in {store.out} (keys relative to {store.root}: train with "
             f"fit --data {store.root} or --labels-root {store.root})")
    announce(f"open {server.url}  (Ctrl+C stops; every change is saved at once)")
    if open_browser:
        threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
