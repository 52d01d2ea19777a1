"""The OHIF viewer with authentication ON, in headless Chromium: the browser signs in
with the one-time login link `medlake serve` prints (or with an API token in the form
at /login), then the viewer's study list loads from /dicomweb with the session cookie
alone; signing out ends it.

The server is `medlake serve`'s uvicorn configuration with the demo studies; the
browser is Debian's Chromium driven by Playwright (see tests/browser_support.py).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, ohif_dist, require_browser
from tests.monitoring_support import served
from tests.security_support import issue

from medlake.cli.demo_data import DEMO_STUDIES, write_demo_studies
from medlake.cli.token_cmd import announce_access
from medlake.config import Settings
from medlake.ingest.archive import Archive
from medlake.ingest.pipeline import ingest
from medlake.types import DEFAULT_PARTITION
from medlake.web import create_web_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@dataclass(frozen=True)
class SecureMedlake:
    url: str
    archive: Archive
    shots: Path


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMedlake]:
    """medlake + OHIF with authentication on, the demo studies ingested (SQLite)."""
    require_browser()
    dist = ohif_dist()
    root = tmp_path_factory.mktemp("ohif-login")
    settings = Settings(data=root / "data", fsync=False, insecure_no_auth=False)
    archive = Archive.open(settings)
    try:
        files = write_demo_studies(root / "demo-source")
        batch = ingest(archive, str(root / "demo-source"), DEFAULT_PARTITION, workers=0)
        assert batch.stored == len(files), batch.to_json()
        app = create_web_app(archive, dist, background=False)
        (root / "screenshots").mkdir()
        with served(app, settings) as url:
            yield SecureMedlake(url, archive, root / "screenshots")
    finally:
        archive.close()


@pytest.fixture(scope="module")
def browser(secure_server: SecureMedlake) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Page:
    page: Any
    context: Any
    responses: list[tuple[int, str]]
    shots: Path

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def dicomweb_statuses(self) -> list[tuple[int, str]]:
        return [(s, u) for s, u in self.responses if "/dicomweb/" in u]


@pytest.fixture
def page(browser: Any, secure_server: SecureMedlake) -> Iterator[Page]:
    """A fresh browser context (no cookie) and page."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    seen = Page(tab, context, [], secure_server.shots)
    tab.on("response", lambda r: seen.responses.append((r.status, r.url)))
    try:
        yield seen
    finally:
        context.close()


def printed_login_link(archive: Archive) -> str:
    """The path of the login link `medlake serve` prints at start-up."""
    out = io.StringIO()
    announce_access(archive, Console(file=out, width=400))
    match = re.search(r"https?://\S+(/login\?token=mll_\S+)", out.getvalue())
    assert match, out.getvalue()
    return match.group(1)


def wait_for_study_list(seen: Page, what: str) -> None:
    """Every demo study's description shows in the viewer's study list."""
    for _pid, _name, description, _date, _series in DEMO_STUDIES:
        try:
            seen.page.get_by_role("cell", name=description, exact=True).wait_for()
        except Exception as exc:
            shot = seen.shot(f"{what}-no-study-list")
            raise AssertionError(
                f"{description} not listed: {exc}; screenshot {shot}; "
                f"DICOMweb answers {seen.dicomweb_statuses()[-10:]}"
            ) from exc


def session_cookie(seen: Page) -> dict[str, Any]:
    cookies = [c for c in seen.context.cookies() if c["name"] == "medlake_session"]
    assert len(cookies) == 1, seen.context.cookies()
    return dict(cookies[0])


def test_the_login_link_opens_the_study_list(page: Page, secure_server: SecureMedlake) -> None:
    url = secure_server.url
    assert page.context.request.get(f"{url}/dicomweb/studies").status == 401  # no cookie yet
    page.page.goto(url + printed_login_link(secure_server.archive))
    assert page.page.url == f"{url}/ohif/", page.page.url  # 303 to the viewer
    wait_for_study_list(page, "link")
    cookie = session_cookie(page)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert "medlake_session" not in page.page.evaluate("document.cookie")  # HttpOnly
    searches = [(s, u) for s, u in page.dicomweb_statuses() if "/dicomweb/studies?" in u]
    assert searches and all(s == 200 for s, _u in searches), searches
    assert not [e for e in page.dicomweb_statuses() if e[0] >= 400], page.dicomweb_statuses()


def test_a_used_link_is_refused_in_the_browser(page: Page, secure_server: SecureMedlake) -> None:
    link = secure_server.url + printed_login_link(secure_server.archive)
    page.page.goto(link)
    wait_for_study_list(page, "first-use")
    fresh = page.context.browser.new_context()
    try:
        replay = fresh.new_page()
        response = replay.goto(link)
        assert response is not None and response.status == 401
        assert "was already used" in replay.locator("[role=alert]").inner_text()
        assert not [c for c in fresh.cookies() if c["name"] == "medlake_session"]
    finally:
        fresh.close()


def test_the_form_signs_in_with_a_token_and_sign_out_ends_it(
    page: Page, secure_server: SecureMedlake
) -> None:
    url = secure_server.url
    reader = issue(secure_server.archive, "dr-browser", "reader@default")
    page.page.goto(f"{url}/login")
    page.page.fill("#token", reader)
    page.page.get_by_role("button", name="Sign in").click()  # a same-origin form POST
    page.page.wait_for_url(f"{url}/ohif/")
    wait_for_study_list(page, "form")
    assert page.context.request.get(f"{url}/dicomweb/studies").status == 200
    page.page.goto(f"{url}/login")
    assert "Signed in as" in page.page.content() and "dr-browser" in page.page.content()
    page.page.get_by_role("button", name="Sign out").click()
    page.page.wait_for_url(f"{url}/login")
    assert not [c for c in page.context.cookies() if c["name"] == "medlake_session"]
    assert page.context.request.get(f"{url}/dicomweb/studies").status == 401
