"""Debian's Chromium under Playwright, for the console's browser tests.

Playwright's own browser download does not work on these machines; the suite drives
``/usr/bin/chromium`` (``apt-get install chromium``, which ``scripts/dev test`` runs when it
is missing and it may). A missing browser fails the tests that need it, never skips them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM = os.environ.get("CTWA_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Launch Chromium headless (Playwright gives each launch a fresh profile); close it."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.fail(
            f"{CHROMIUM} is missing: install it (apt-get install -y chromium; scripts/dev test"
            " does so when run as root) or point CTWA_CHROMIUM at a Chromium binary"
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=FLAGS,
            headless=True,
        )
        try:
            yield browser
        finally:
            await browser.close()
