"""How medlake.web serves an OHIF dist, without a browser: a small fake dist stands in
for npm @ohif/app (tests/test_ohif_browser.py drives the real one in Chromium)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from medlake.config import Settings
from medlake.ingest.archive import Archive
from medlake.web import create_web_app, find_ohif_dist, viewer_path
from medlake.web.viewer import IMMUTABLE, mount_viewer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<script src="/app-config.js"></script><script defer src="/app.bundle.0123456789abcdef.js">'
    '</script><link href="/app.bundle.css" rel="stylesheet"></head><body></body></html>'
)
BUNDLE = 'var x = 1;\n(() => {\n__webpack_require__.p = "/";\n})();\n'


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    folder = tmp_path / "dist"
    folder.mkdir()
    (folder / "index.html").write_text(INDEX)
    (folder / "app-config.js").write_text("window.config = {shipped: true};")
    (folder / "app.bundle.0123456789abcdef.js").write_text(BUNDLE)
    (folder / "app.bundle.css").write_text("@font-face{src:url(/fedcba9876543210.woff2)}")
    (folder / "fedcba9876543210.wasm").write_bytes(b"\0asm\1\0\0\0")
    (folder / "other.bundle.0011223344556677.js").write_text("console.log('plain');")
    (folder / ".ohif-version").write_text("3.99.0\n")
    (tmp_path / "secret.txt").write_text("outside the dist")
    return folder


@pytest.fixture
def client(dist: Path) -> Iterator[TestClient]:
    app = FastAPI()
    mount_viewer(app, dist)
    with TestClient(app) as test_client:
        yield test_client


def test_index_and_spa_fallback_are_rewritten_to_the_sub_path(client: TestClient) -> None:
    for path in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/local/x"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        assert 'window.PUBLIC_URL="/ohif/"' in response.text
        assert 'src="/ohif/app.bundle.0123456789abcdef.js"' in response.text
        assert 'href="/ohif/app.bundle.css"' in response.text
        assert response.headers["cache-control"] == "no-cache"
    redirect = client.get("/ohif?a=b", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "/ohif/?a=b"


def test_app_config_is_generated_for_this_origin(client: TestClient) -> None:
    response = client.get("/ohif/app-config.js", headers={"host": "viewer.example:8042"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["cache-control"] == "no-store"
    body = response.text
    assert "shipped" not in body
    assert '"routerBasename": "/ohif"' in body
    for root in ("qidoRoot", "wadoRoot"):
        assert f'"{root}": "http://viewer.example:8042/dicomweb"' in body
    assert '"wadoUriRoot": "http://viewer.example:8042/dicomweb/wado"' in body
    assert '"staticWado": false' in body and '"qidoSupportsIncludeField": true' in body
    assert "3.99.0" in body


def test_bundles_get_the_sub_path_mime_types_and_long_caching(client: TestClient) -> None:
    bundle = client.get("/ohif/app.bundle.0123456789abcdef.js")
    assert bundle.status_code == 200
    assert '__webpack_require__.p = "/ohif/"' in bundle.text
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert bundle.headers["cache-control"] == IMMUTABLE
    again = client.get(
        "/ohif/app.bundle.0123456789abcdef.js", headers={"if-none-match": bundle.headers["etag"]}
    )
    assert again.status_code == 304
    plain = client.get("/ohif/other.bundle.0011223344556677.js")
    assert plain.text == "console.log('plain');" and plain.headers["cache-control"] == IMMUTABLE
    wasm = client.get("/ohif/fedcba9876543210.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    assert wasm.headers["cache-control"] == IMMUTABLE
    css = client.get("/ohif/app.bundle.css")
    assert "url(/ohif/fedcba9876543210.woff2)" in css.text
    assert css.headers["cache-control"] == "no-cache"


def test_missing_assets_are_404_and_nothing_outside_the_dist_is_served(client: TestClient) -> None:
    assert client.get("/ohif/9999.bundle.ffffffffffffffff.js").status_code == 404
    assert client.get("/ohif/missing.wasm").status_code == 404
    for path in ("/ohif/../secret.txt", "/ohif/%2e%2e/secret.txt", "/ohif/..%2fsecret.txt"):
        response = client.get(path)
        assert "outside the dist" not in response.text, path
    assert client.get("/").status_code == 404  # "/" stays free for a console


def test_create_web_app_mounts_the_viewer_only_when_a_dist_exists(
    tmp_path: Path, dist: Path
) -> None:
    archive = Archive.open(Settings(data=tmp_path / "data"))
    try:
        with_viewer = create_web_app(archive, dist, background=False)
        assert viewer_path(with_viewer) == "/ohif/"
        with TestClient(with_viewer) as client:
            assert client.get("/ohif/").status_code == 200
            assert client.get("/healthz").status_code == 200
        without = create_web_app(archive, tmp_path / "no-such-dist", background=False)
        assert viewer_path(without) is None
        assert find_ohif_dist(Settings(ohif_dist=dist)) == dist.resolve()
        assert find_ohif_dist(Settings(ohif_dist=tmp_path / "no-such-dist")) is None
    finally:
        archive.close()
