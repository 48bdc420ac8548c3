"""Headless Chromium for the dashboard tests, driven by Playwright for Python.

The browser is Debian's ``chromium`` package (``scripts/chromium.sh`` installs it when
``/usr/bin/chromium`` is missing); Playwright only drives it (``executable_path``), it never
downloads a browser of its own. Each test gets a fresh profile directory.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.requirements import unavailable

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "out" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "chromium.sh")], capture_output=True, text=True
        )
        if done.returncode != 0 or not CHROMIUM.exists():
            unavailable(f"chromium is not installed and scripts/chromium.sh failed: {done.stderr}")
    return CHROMIUM


# Module scope: Playwright's sync API keeps an event loop running in this thread while it is
# open, and tests of later modules call asyncio.run().
@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Any]:
    try:
        from playwright import sync_api
    except ImportError as e:
        unavailable(f"playwright is not installed: {e}")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture
def browser_page(chromium: Path, playwright_driver: Any) -> Iterator[Any]:
    """A page in a fresh headless Chromium profile (1400x1000)."""
    profile = tempfile.mkdtemp(prefix="fedge-chromium-")
    context = playwright_driver.chromium.launch_persistent_context(
        profile,
        executable_path=str(chromium),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 1000},
    )
    try:
        yield context.pages[0] if context.pages else context.new_page()
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
