"""The edge bundle store: versioned bundles per product and an atomically switched ``current`` link.

Layout::

    <store>/<product>/<version>/     one verified bundle directory per version (never modified)
    <store>/<product>/current        symlink -> <version>  (what the service serves)
    <store>/<product>/previous       symlink -> <version>  (what ``rollback`` goes back to)

Why links: replacing a symlink with ``os.replace`` is atomic, so a service reading ``current`` at any
moment sees either the old or the new version, never a half-written one.  Versions are only added
whole (copied to a temporary name, then renamed).  Writers (add, activate, rollback) take an exclusive
``flock`` on ``<store>/<product>/.lock``, so two engineers switching at once cannot leave ``previous``
equal to ``current``; readers (the service) never lock.

Power loss: a rename is durable only once its directory is fsync'd, and a renamed file's *contents* only
once the file itself is (a new version's files would otherwise be empty after a power cut, and ``current``
would point at a bundle that fails its hashes).  So ``add`` fsyncs every file and folder of the copy before
renaming it into place and fsyncs the product folder after; ``activate`` fsyncs the version it switches
to (it may have come by other means), then replaces each link (a new symlink, renamed over the old one)
and fsyncs the product folder.  A crash at any point leaves ``current`` at the old or the new version,
both whole; between the two links it leaves ``previous`` equal to ``current``, which only makes the next
``rollback`` a no-op.  Temporary links a killed writer left behind are removed by the next writer.
A store on a read-only file system refuses ``add``/``activate``/``rollback`` with a :class:`StoreError`
naming the folder; reading it (the service) works as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .core.bundle import MANIFEST, BundleError, load_bundle
from .core.signing import BundleTrust

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")
_PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CURRENT, PREVIOUS = "current", "previous"


def plain_product_name(value: str) -> str:
    """The one rule for product names (config, MQTT commands, store): they become directory names."""
    if not _PRODUCT.fullmatch(value):
        raise ValueError("expected a plain name (letters, digits, '.', '_', '-')")
    return value


class StoreError(Exception):
    """A store operation was refused; the active bundle is untouched."""


def _check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value) or value in (CURRENT, PREVIOUS):
        raise StoreError(f"{kind} {value!r} is not a plain name (letters, digits, '.', '_', '-', '@')")
    return value


def check_version_name(version: str) -> str:
    """A version name the store accepts (raises :class:`StoreError`), for tools that name one before adding."""
    return _check_name("version", version)


def _validate_by_loading(path: Path) -> None:
    load_bundle(path)


@dataclass(frozen=True)
class VersionInfo:
    """One stored version as ``list`` shows it: read from its manifest only (no hashing, so it is fast)."""

    version: str
    current: bool
    previous: bool
    bundle_version: str | None = None
    product: str | None = None
    created_at: str | None = None
    parent: str | None = None
    threshold: float | None = None
    n_reference_images: int | None = None
    problem: str | None = None  # the manifest could not be read

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class BundleStore:
    """``trust``: the signature policy every ``add``, ``activate`` and ``rollback`` checks (see
    :mod:`edge_runtime.core.signing`); the service checks it again at start and at every reload."""

    def __init__(self, root: str | os.PathLike, trust: BundleTrust | None = None) -> None:
        self.root = Path(root)
        self.trust = trust or BundleTrust()

    def product_dir(self, product: str) -> Path:
        return self.root / _check_name("product", product)

    def products(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def versions(self, product: str) -> list[str]:
        pdir = self.product_dir(product)
        if not pdir.is_dir():
            return []
        return sorted(p.name for p in pdir.iterdir() if p.is_dir() and not p.is_symlink()
                      and not p.name.startswith(".") and (p / "manifest.json").is_file())

    def _link(self, product: str, name: str) -> str | None:
        link = self.product_dir(product) / name
        return os.readlink(link) if link.is_symlink() else None

    def current(self, product: str) -> str | None:
        return self._link(product, CURRENT)

    def previous(self, product: str) -> str | None:
        return self._link(product, PREVIOUS)

    def current_path(self, product: str) -> Path:
        """The active bundle's directory (resolved, so a later switch does not move it under a reader)."""
        version = self.current(product)
        if version is None:
            known = ", ".join(self.products()) or "none"
            raise StoreError(f"{self.product_dir(product)}: no current bundle for product {product!r} "
                             f"(products in the store: {known})")
        path = self.product_dir(product) / version
        if not path.is_dir():
            raise StoreError(f"{self.product_dir(product) / CURRENT}: points at missing version {version!r}")
        return path

    def describe(self, product: str) -> list[VersionInfo]:
        """Every version of ``product`` with its current/previous marks and manifest facts, oldest name first."""
        cur, prev = self.current(product), self.previous(product)
        out = []
        for version in self.versions(product):
            path = self.product_dir(product) / version / MANIFEST
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                out.append(VersionInfo(
                    version=version, current=version == cur, previous=version == prev,
                    bundle_version=raw.get("bundle_version"), product=raw.get("product"),
                    created_at=raw.get("created_at"), parent=raw.get("parent"),
                    threshold=(raw.get("thresholds") or {}).get("image"),
                    n_reference_images=(raw.get("posfar") or {}).get("n_reference_images")))
            except (OSError, ValueError, AttributeError) as exc:
                out.append(VersionInfo(version=version, current=version == cur, previous=version == prev,
                                       problem=f"{MANIFEST}: not readable ({exc})"))
        return out

    @contextlib.contextmanager
    def locked(self, product: str) -> Iterator[Path]:
        """Exclusive writer lock on the product folder (created if missing); yields the folder."""
        pdir = self.product_dir(product)
        try:
            pdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(pdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"{pdir}: cannot write to the store ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield pdir
        finally:
            os.close(fd)  # closing releases the lock

    def add(self, product: str, bundle_dir: str | os.PathLike, version: str | None = None,
            validate: Callable[[Path], None] = _validate_by_loading) -> str:
        """Copy a bundle into the store under its manifest version (or ``version``); it is validated first."""
        src = Path(bundle_dir)
        try:
            validate(src)
            bundle = load_bundle(src)
            self.trust.check(src)
        except BundleError as exc:
            raise StoreError(f"refused {src}: {exc}") from None
        version = _check_name("version", version or bundle.manifest.bundle_version)
        with self.locked(product) as pdir:
            dest = pdir / version
            if dest.exists():
                raise StoreError(f"{dest}: version {version!r} is already in the store")
            staging = pdir / f".{version}.incoming"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                shutil.copytree(bundle.root, staging)
                _sync_tree(staging)  # the contents are on disk before the name says the version exists
                os.replace(staging, dest)
                _fsync_dir(pdir)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise StoreError(f"cannot add {src} to {pdir}: {exc.strerror or exc}") from None
        return version

    def activate(self, product: str, version: str,
                 validate: Callable[[Path], None] = _validate_by_loading) -> str | None:
        """Make ``version`` current (after validating it); returns the version it replaced."""
        _check_name("version", version)
        if not (self.product_dir(product) / version).is_dir():
            raise StoreError(f"{self.product_dir(product) / version}: no such version "
                             f"(known: {', '.join(self.versions(product)) or 'none'})")
        with self.locked(product):
            return self._activate(product, version, validate)

    def _activate(self, product: str, version: str, validate: Callable[[Path], None]) -> str | None:
        pdir = self.product_dir(product)
        target = pdir / version
        if not target.is_dir():
            raise StoreError(f"{target}: no such version (known: {', '.join(self.versions(product)) or 'none'})")
        try:
            validate(target)
            self.trust.check(target)
        except BundleError as exc:
            raise StoreError(f"refused to activate {product}@{version}: {exc}") from None
        old = self.current(product)
        if old == version:
            return old
        try:
            _sync_tree(target)  # what current will point at is on disk, whoever put it there
            if old is not None:
                self._point(pdir, PREVIOUS, old)
            self._point(pdir, CURRENT, version)
        except OSError as exc:
            raise StoreError(f"cannot activate {product}@{version} in {pdir}: {exc.strerror or exc} "
                             f"(current is still {self.current(product)!r})") from None
        return old

    def rollback(self, product: str, validate: Callable[[Path], None] = _validate_by_loading) -> str:
        """Swap back to the previous version; returns the version now current."""
        if self.previous(product) is None:
            raise StoreError(f"{self.product_dir(product)}: no previous version to roll back to")
        with self.locked(product):
            prev = self.previous(product)  # read again under the lock
            if prev is None:
                raise StoreError(f"{self.product_dir(product)}: no previous version to roll back to")
            self._activate(product, prev, validate)
        return prev

    @staticmethod
    def _point(pdir: Path, name: str, version: str) -> None:
        """Replace the link ``name`` atomically and durably (the caller holds the writer lock)."""
        for stale in pdir.glob(f".{name}.*.tmp"):  # left by a writer killed mid-switch; no writer is active now
            stale.unlink(missing_ok=True)
        tmp = pdir / f".{name}.{os.getpid()}.tmp"
        os.symlink(version, tmp)
        os.replace(tmp, pdir / name)
        _fsync_dir(pdir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (itself included), children before their folder."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))
