"""Pytest fixtures for the pages: headless Chromium (the system's, Debian's ``chromium`` package installed by
``tools/system_deps.sh``) driven by Playwright for Python.  Playwright never downloads a browser here.

``browser``: a Playwright Browser for one test.  ``page``: a fresh page (closed at teardown) that fails the
test on any JavaScript error or failed request to the page's own server.  ``screenshot(page, name)``: a PNG of
the page, kept in ``$WEAKREST_SCREENSHOTS`` (``make screenshots`` sets it to ``docs/pages``) or in tmp.
Tests skip, naming what to install, only where no browser or no Playwright can be found.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_CHROMIUM_PLACES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium",
                    "/snap/bin/chromium")


def find_chromium() -> str | None:
    """``$CHROMIUM``, then ``chromium`` / ``chromium-browser`` on PATH, then the usual places."""
    env = os.environ.get("CHROMIUM")
    if env and os.access(env, os.X_OK):
        return env
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in _CHROMIUM_PLACES if os.access(p, os.X_OK)), None)


@pytest.fixture
def browser() -> Iterator[object]:
    """Per test: Playwright's sync API keeps an asyncio loop running in the main thread while it is open, and
    a later test's ``asyncio.run`` (the OPC UA tests) would fail inside it.  A launch takes about a second."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright; it is in the dev extra)")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium: apt-get install chromium (make test installs it as root)")
    with sync_playwright() as pw:
        # --no-sandbox: the tests run as root in CI, where Chromium refuses its sandbox
        b = pw.chromium.launch(executable_path=executable, headless=True,
                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    """A fresh page; JavaScript errors on it fail the test (collected in ``page.js_errors``)."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"JavaScript error: {exc}"))
    pg.js_errors = errors  # type: ignore[attr-defined]
    pg.set_default_timeout(20_000)
    yield pg
    context.close()
    assert not errors, errors


@pytest.fixture
def screenshot(tmp_path) -> Callable[[object, str], Path]:
    """``screenshot(page, "live")`` -> the PNG written (``$WEAKREST_SCREENSHOTS/live.png`` when set)."""
    folder = Path(os.environ.get("WEAKREST_SCREENSHOTS") or tmp_path / "screenshots")

    def take(pg, name: str, full_page: bool = True) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        pg.screenshot(path=str(path), full_page=full_page)
        return path

    return take
