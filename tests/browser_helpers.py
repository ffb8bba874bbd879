"""Headless Debian Chromium for the browser tests (the served page, the course website), driven by Playwright.

`.ci/run` installs the browser and sets PTM_REQUIRE_BROWSER=1: there a missing browser (or Playwright) fails the test
instead of skipping it."""
import contextlib
import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def browser_required() -> bool:
    return os.environ.get("PTM_REQUIRE_BROWSER") == "1"


@contextlib.contextmanager
def chromium():
    "A headless Chromium browser, or a skip (a failure under PTM_REQUIRE_BROWSER=1) that says what to install."
    try: from playwright.sync_api import sync_playwright
    except ImportError:
        if browser_required(): raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        if browser_required(): pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try: yield browser
        finally: browser.close()
