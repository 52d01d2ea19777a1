"""WADO-URI (PS3.18 chapter 9): the stored file, or a rendered frame."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from starlette.testclient import TestClient
from tests.conftest import StowCall


def _uids(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        "studyUID": ds.StudyInstanceUID,
        "seriesUID": ds.SeriesInstanceUID,
        "objectUID": ds.SOPInstanceUID,
    }


@pytest.fixture
def ct(stow: StowCall, samples: dict[str, Path]) -> Path:
    path = samples["CT_small.dcm"]
    assert stow([path]).status_code == 200
    return path


def test_application_dicom_returns_the_stored_bytes(client: TestClient, ct: Path) -> None:
    params = {"requestType": "WADO", "contentType": "application/dicom", **_uids(ct)}
    response = client.get("/dicomweb/wado", params=params)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    assert response.content == ct.read_bytes()


def test_default_is_a_jpeg_rendering_scaled_to_rows_and_columns(
    client: TestClient, ct: Path
) -> None:
    params = {"requestType": "WADO", "rows": "64", "columns": "64", **_uids(ct)}
    response = client.get("/dicomweb/wado", params=params)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and max(image.size) == 64


def test_window_changes_the_rendering(client: TestClient, ct: Path) -> None:
    base = {"requestType": "WADO", "contentType": "image/png", **_uids(ct)}
    narrow = client.get(
        "/dicomweb/wado", params={**base, "windowCenter": "40", "windowWidth": "80"}
    )
    wide = client.get(
        "/dicomweb/wado", params={**base, "windowCenter": "40", "windowWidth": "4000"}
    )
    assert narrow.status_code == wide.status_code == 200
    assert Image.open(io.BytesIO(narrow.content)).format == "PNG"
    assert narrow.content != wide.content


@pytest.mark.parametrize(
    ("change", "status", "named"),
    [
        ({"requestType": "WADOX"}, 400, "requestType"),
        ({"objectUID": None}, 400, "objectUID"),
        ({"contentType": "video/mpeg"}, 406, "video/mpeg"),
        ({"frameNumber": "x"}, 400, "frameNumber"),
        ({"objectUID": "1.2.3.4"}, 404, "1.2.3.4"),
        (
            {"transferSyntax": "1.2.840.10008.1.2.4.50", "contentType": "application/dicom"},
            406,
            "1.2.840.10008.1.2.4.50",
        ),
    ],
)
def test_bad_requests_are_named(
    client: TestClient, ct: Path, change: dict[str, str | None], status: int, named: str
) -> None:
    params: dict[str, str] = {"requestType": "WADO", **_uids(ct)}
    for key, value in change.items():
        if value is None:
            params.pop(key)
        else:
            params[key] = value
    response = client.get("/dicomweb/wado", params=params)
    assert response.status_code == status
    assert named in response.json()["message"]
