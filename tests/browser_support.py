"""Helpers of the browser tests: Debian's Chromium for Playwright, and the OHIF dist.

Playwright's own browser download does not work here, so the tests drive
``/usr/bin/chromium`` (``MEDLAKE_TEST_CHROMIUM`` names another) and skip, with the
reason, when it, Python playwright or the OHIF dist is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from medlake.config import Settings
from medlake.web import find_ohif_dist

REPO = Path(__file__).resolve().parents[1]
INSTALL_OHIF = REPO / "scripts" / "install-ohif.sh"
CHROMIUM = os.environ.get("MEDLAKE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def require_browser() -> None:
    """Skip the test when Chromium or Python playwright is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/install-system-deps.sh installs it)")
    pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed")


def ohif_dist() -> Path:
    """The installed OHIF dist; installed now when npm is present, else the test skips."""
    dist = find_ohif_dist(Settings())
    if dist is not None:
        return dist
    if shutil.which("npm") is None:
        pytest.skip("the OHIF dist is not installed and npm is absent: run scripts/install-ohif.sh")
    run = subprocess.run([str(INSTALL_OHIF)], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.fail(f"scripts/install-ohif.sh failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return Path(run.stdout.strip().splitlines()[-1])
