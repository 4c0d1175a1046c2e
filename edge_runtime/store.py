"""The edge bundle store: versioned bundles per product and an atomically switched ``current`` link.

Layout::

    <store>/<product>/<version>/     one verified bundle directory per version (never modified)
    <store>/<product>/current        symlink -> <version>  (what the service serves)
    <store>/<product>/previous       symlink -> <version>  (what ``rollback`` goes back to)

Why links: replacing a symlink with ``os.replace`` is atomic, so a service reading ``current`` at any
moment sees either the old or the new version, never a half-written one.  Versions are only added
whole (copied to a temporary name, then renamed).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .core.bundle import BundleError, load_bundle

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")
CURRENT, PREVIOUS = "current", "previous"


class StoreError(Exception):
    """A store operation was refused; the active bundle is untouched."""


def _check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value) or value in (CURRENT, PREVIOUS):
        raise StoreError(f"{kind} {value!r} is not a plain name (letters, digits, '.', '_', '-', '@')")
    return value


def _validate_by_loading(path: Path) -> None:
    load_bundle(path)


class BundleStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

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

    def add(self, product: str, bundle_dir: str | os.PathLike, version: str | None = None,
            validate: Callable[[Path], None] = _validate_by_loading) -> str:
        """Copy a bundle into the store under its manifest version (or ``version``); it is validated first."""
        src = Path(bundle_dir)
        try:
            validate(src)
            bundle = load_bundle(src)
        except BundleError as exc:
            raise StoreError(f"refused {src}: {exc}") from None
        version = _check_name("version", version or bundle.manifest.bundle_version)
        pdir = self.product_dir(product)
        dest = pdir / version
        if dest.exists():
            raise StoreError(f"{dest}: version {version!r} is already in the store")
        pdir.mkdir(parents=True, exist_ok=True)
        staging = pdir / f".{version}.incoming"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(bundle.root, staging)
            os.replace(staging, dest)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"cannot add {src} to {pdir}: {exc.strerror or exc}") from None
        return version

    def activate(self, product: str, version: str,
                 validate: Callable[[Path], None] = _validate_by_loading) -> str | None:
        """Make ``version`` current (after validating it); returns the version it replaced."""
        _check_name("version", version)
        pdir = self.product_dir(product)
        target = pdir / version
        if not target.is_dir():
            raise StoreError(f"{target}: no such version (known: {', '.join(self.versions(product)) or 'none'})")
        try:
            validate(target)
        except BundleError as exc:
            raise StoreError(f"refused to activate {product}@{version}: {exc}") from None
        old = self.current(product)
        if old == version:
            return old
        if old is not None:
            self._point(pdir, PREVIOUS, old)
        self._point(pdir, CURRENT, version)
        return old

    def rollback(self, product: str, validate: Callable[[Path], None] = _validate_by_loading) -> str:
        """Swap back to the previous version; returns the version now current."""
        prev = self.previous(product)
        if prev is None:
            raise StoreError(f"{self.product_dir(product)}: no previous version to roll back to")
        self.activate(product, prev, validate)
        return prev

    @staticmethod
    def _point(pdir: Path, name: str, version: str) -> None:
        tmp = pdir / f".{name}.{os.getpid()}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(version, tmp)
        os.replace(tmp, pdir / name)
        fd = os.open(pdir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
