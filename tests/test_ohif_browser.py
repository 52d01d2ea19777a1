"""OHIF (npm ``@ohif/app``) against medlake, in headless Chromium.

medlake serves the prebuilt viewer same-origin at ``/ohif/`` (``medlake.web``) next to
``/dicomweb``; the demo studies are ingested; Playwright drives Debian's
``/usr/bin/chromium`` (Playwright's own browser download does not work here) through
the study list, the CT series and the 30-frame US multi-frame instance. Pixels are read
back from cornerstone's canvas, so "displayed" means drawn, not merely requested.

Needs: the OHIF dist (``scripts/install-ohif.sh``, run here when npm is present),
Chromium and Python playwright; the test is skipped, with the reason, when one is missing.
Screenshots go to a tmp folder, named in every failure message.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, ohif_dist, require_browser

from medlake.cli.demo_data import DEMO_STUDIES, demo_uid, write_demo_studies
from medlake.config import Settings
from medlake.ingest.archive import Archive
from medlake.ingest.pipeline import ingest
from medlake.types import DEFAULT_PARTITION
from medlake.web import create_web_app, viewer_path

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

#: The demo studies, by index in DEMO_STUDIES.
CT_STUDY, US_STUDY = 0, 2
CT_INSTANCES = DEMO_STUDIES[CT_STUDY][4][0][2]  # 24 single-frame CT images
US_FRAMES = 30  # examples_ybr_color.dcm: one JPEG-baseline instance of 30 frames

#: JS: cornerstone's first viewport — its images and statistics of its canvas pixels.
VIEWPORT_STATE = """() => {
  const engine = window.cornerstone && window.cornerstone.getRenderingEngines()[0];
  const vp = engine && engine.getViewports()[0];
  if (!vp || !vp.getImageIds || !vp.getImageIds().length) return null;
  const c = vp.canvas, ctx = c.getContext('2d');
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let s = 0, s2 = 0, n = 0, lit = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
    s += v; s2 += v * v; n++; if (v > 16) lit++;
    hash = (hash * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) % 1000000007;
  }
  const mean = s / n;
  return {imageIds: vp.getImageIds().length, index: vp.getCurrentImageIdIndex(),
          width: c.width, height: c.height, mean: mean,
          std: Math.sqrt(Math.max(0, s2 / n - mean * mean)), lit: lit / n, hash: hash,
          imageId: vp.getCurrentImageId()};
}"""


# --- medlake with the demo studies, and a request log ------------------------------------


@dataclass
class RequestLog:
    """(method, path?query, status) of every request the server answered."""

    entries: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def matching(self, needle: str) -> list[tuple[str, str, int]]:
        with self.lock:
            return [e for e in self.entries if needle in e[1]]

    def failures(self, needle: str = "/dicomweb") -> list[tuple[str, str, int]]:
        return [e for e in self.matching(needle) if e[2] >= 400]


class Logged:
    """ASGI wrapper recording each HTTP response status (the server's access log)."""

    def __init__(self, app: Any, log: RequestLog) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode()
        path = scope["path"] + (f"?{query}" if query else "")

        async def send_logged(message: Any) -> None:
            if message["type"] == "http.response.start":
                with self.log.lock:
                    self.log.entries.append((scope["method"], path, message["status"]))
            await send(message)

        await self.app(scope, receive, send_logged)


@dataclass(frozen=True)
class Medlake:
    url: str
    viewer: str  # e.g. http://127.0.0.1:41234/ohif/
    log: RequestLog
    shots: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def medlake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Medlake]:
    """medlake + OHIF on a free port, the demo studies ingested (SQLite index)."""
    require_browser()
    dist = ohif_dist()
    root = tmp_path_factory.mktemp("ohif")
    shots = root / "screenshots"
    shots.mkdir()
    # Served as `medlake demo` serves it, authentication off (test_ohif_login signs in).
    archive = Archive.open(Settings(data=root / "data", fsync=False, insecure_no_auth=True))
    files = write_demo_studies(root / "demo-source")
    batch = ingest(archive, str(root / "demo-source"), DEFAULT_PARTITION, workers=0)
    assert batch.stored == len(files) and batch.verdict == "balanced", batch.to_json()
    app = create_web_app(archive, dist, background=False)
    assert viewer_path(app) == "/ohif/"
    log = RequestLog()
    config = uvicorn.Config(
        Logged(app, log), host="127.0.0.1", port=_free_port(), log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-ohif", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while thread.is_alive() and not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        pytest.fail("uvicorn did not start")
    url = f"http://127.0.0.1:{config.port}"
    try:
        yield Medlake(url, url + "/ohif/", log, shots)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        archive.close()
        with log.lock:  # the server's access log, for whoever looks at the screenshots
            lines = [f"{status} {method} {path}" for method, path, status in log.entries]
        (root / "requests.log").write_text("\n".join(lines) + "\n")


# --- the browser --------------------------------------------------------------------------


@dataclass
class Browsing:
    """One page, with what the browser saw: responses, console errors."""

    page: Any
    responses: list[tuple[int, str]]
    errors: list[str]
    shots: Path

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def dismiss_overlays(self) -> None:
        """The first-visit tour and the "investigational use" banner cover the viewport."""
        for label in ("Skip all", "Confirm and hide"):
            button = self.page.get_by_role("button", name=label)
            if button.count() and button.first.is_visible():
                button.first.click()


@pytest.fixture(scope="module")
def browser(medlake_server: Medlake) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def browsing(browser: Any, medlake_server: Medlake) -> Iterator[Browsing]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    seen = Browsing(page, [], [], medlake_server.shots)
    page.on("response", lambda r: seen.responses.append((r.status, r.url)))
    page.on("requestfailed", lambda r: seen.errors.append(f"request failed: {r.url} {r.failure}"))
    page.on("pageerror", lambda e: seen.errors.append(f"page error: {e}"))
    page.on(
        "console", lambda m: seen.errors.append(f"console: {m.text}") if m.type == "error" else None
    )
    try:
        yield seen
    finally:
        context.close()


def _state(page: Any) -> dict[str, Any] | None:
    state: dict[str, Any] | None = page.evaluate(VIEWPORT_STATE)
    return state


def _wait_for_drawn_image(
    seen: Browsing, images: int, what: str, timeout: float = 45
) -> dict[str, Any]:
    """Wait until the first viewport holds ``images`` images and its canvas shows a
    non-uniform picture; returns the viewport state."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _state(seen.page)
        if state and state["imageIds"] == images and state["std"] > 5 and state["lit"] > 0.01:
            return state
        seen.page.wait_for_timeout(250)
    shot = seen.shot(f"{what}-timeout")
    pytest.fail(
        f"{what}: no drawn image after {timeout}s; viewport {state}; screenshot {shot}; "
        f"browser errors {seen.errors[-10:]}"
    )


def _dicomweb_failures(seen: Browsing) -> list[tuple[int, str]]:
    return [(s, u) for s, u in seen.responses if "/dicomweb" in u and s >= 400]


# --- the checks ---------------------------------------------------------------------------


def test_study_list_shows_every_demo_study(browsing: Browsing, medlake_server: Medlake) -> None:
    page = browsing.page
    page.goto(medlake_server.viewer)
    descriptions = [study[2] for study in DEMO_STUDIES]
    for description in descriptions:
        page.get_by_role("cell", name=description, exact=True).wait_for()
    browsing.dismiss_overlays()
    shot = browsing.shot("study-list")
    rows = page.locator("tbody tr").filter(has=page.get_by_role("cell", name="ACC", exact=False))
    assert rows.count() == len(DEMO_STUDIES), f"{rows.count()} study rows; screenshot {shot}"
    table = "\n".join(rows.all_inner_texts())
    for _pid, name, description, _date, _series in DEMO_STUDIES:
        family, given = name.split("^")
        assert f"{family}, {given}" in table, (
            f"{name} missing from the study list; screenshot {shot}"
        )
        assert description in table, f"{description} missing from the study list; screenshot {shot}"
    # the list is one QIDO-RS study search with includefield, answered by medlake
    searches = medlake_server.log.matching("/dicomweb/studies?")
    assert any(status == 200 and "includefield" in path for _m, path, status in searches), searches
    assert not _dicomweb_failures(browsing), f"{_dicomweb_failures(browsing)}; screenshot {shot}"


def test_ct_series_is_displayed(browsing: Browsing, medlake_server: Medlake) -> None:
    study = demo_uid("study", CT_STUDY)
    browsing.page.goto(f"{medlake_server.viewer}viewer?StudyInstanceUIDs={study}")
    state = _wait_for_drawn_image(browsing, CT_INSTANCES, "ct")
    browsing.dismiss_overlays()
    shot = browsing.shot("ct-viewer")
    assert state["width"] > 200 and state["height"] > 200, f"{state}; screenshot {shot}"
    assert f"/studies/{study}/" in state["imageId"] and "/frames/1" in state["imageId"], state
    # pixels came through WADO-RS frames, answered 200 by medlake
    frames = medlake_server.log.matching(f"/dicomweb/studies/{study}/series/")
    frame_requests = [e for e in frames if "/frames/" in e[1]]
    assert frame_requests, f"no /frames requests reached medlake; screenshot {shot}"
    assert all(status == 200 for _m, _p, status in frame_requests), frame_requests
    assert any(p.endswith("/metadata") and s == 200 for _m, p, s in frames), frames
    assert not _dicomweb_failures(browsing), f"{_dicomweb_failures(browsing)}; screenshot {shot}"


def test_multiframe_us_is_displayed_and_scrolls(
    browsing: Browsing, medlake_server: Medlake
) -> None:
    study = demo_uid("study", US_STUDY)
    page = browsing.page
    page.goto(f"{medlake_server.viewer}viewer?StudyInstanceUIDs={study}")
    first = _wait_for_drawn_image(browsing, US_FRAMES, "us")
    browsing.dismiss_overlays()
    shot = browsing.shot("us-frame-1")
    assert first["index"] == 0, first
    instance = demo_uid("instance", US_STUDY, 0, 0)
    assert f"/instances/{instance}/frames/1" in first["imageId"], f"{first}; screenshot {shot}"

    # scroll the stack with the mouse wheel (OHIF binds it to StackScroll)
    canvas = page.locator("canvas.cornerstone-canvas").first
    box = canvas.bounding_box()
    assert box is not None, f"no cornerstone canvas; screenshot {shot}"
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    later = first
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        page.mouse.wheel(0, 120)
        page.wait_for_timeout(300)
        later = _state(page) or later
        if later["index"] >= 10:
            break
    shot = browsing.shot("us-scrolled")
    assert later["index"] > 0, (
        f"the wheel did not move to another frame: {later}; screenshot {shot}"
    )
    frame = later["index"] + 1
    assert later["imageId"].endswith(f"/frames/{frame}"), later
    assert later["std"] > 5 and later["hash"] != first["hash"], (
        f"frame {frame} not drawn differently from frame 1: {later} vs {first}; screenshot {shot}"
    )
    answered = {
        int(path.rsplit("/", 1)[1])
        for _m, path, status in medlake_server.log.matching(f"/instances/{instance}/frames/")
        if status == 200
    }
    assert {1, frame} <= answered, f"frames answered 200: {sorted(answered)}"
    assert not _dicomweb_failures(browsing), f"{_dicomweb_failures(browsing)}; screenshot {shot}"
