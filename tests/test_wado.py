"""WADO-RS: instances as stored, metadata, frames, bulk data, rendered images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids, read_multipart

from medlake.cli.demo_data import demo_uid

DICOM_PARTS = 'multipart/related; type="application/dicom"; transfer-syntax=*'
OCTET_PARTS = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def instance_url(path: Path) -> str:
    study, series, sop = uids(path)
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


@pytest.fixture
def stored(stow: StowCall, samples: dict[str, Path]) -> dict[str, Path]:
    """Every sample file, stored."""
    response = stow(list(samples.values()))
    assert response.status_code == 200, response.text
    return samples


def dicom_parts(response) -> list[bytes]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("multipart/related")
    assert int(response.headers["content-length"]) == len(response.content)
    parts = read_multipart(response.headers["content-type"], response.content)
    for headers, _ in parts:
        assert headers["content-type"].startswith("application/dicom")
    return [payload for _, payload in parts]


# --- instances -----------------------------------------------------------------------------


def test_retrieve_instance_is_byte_identical(client, stored: dict[str, Path]) -> None:
    for name, path in stored.items():
        response = client.get(instance_url(path), headers={"Accept": DICOM_PARTS})
        assert dicom_parts(response) == [path.read_bytes()], name


def test_retrieve_instance_part_names_its_transfer_syntax(client, stored: dict[str, Path]) -> None:
    response = client.get(instance_url(stored["JPEG2000.dcm"]), headers={"Accept": DICOM_PARTS})

    [(headers, _)] = read_multipart(response.headers["content-type"], response.content)
    assert "transfer-syntax=1.2.840.10008.1.2.4.91" in headers["content-type"]


def test_retrieve_instance_as_single_application_dicom(client, stored: dict[str, Path]) -> None:
    ct = stored["CT_small.dcm"]

    response = client.get(instance_url(ct), headers={"Accept": "application/dicom"})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    assert response.content == ct.read_bytes()


@pytest.mark.usefixtures("demo_loaded")
def test_retrieve_series_and_study(client, demo_files: list[Path]) -> None:
    mr_study, mr_series = demo_uid("study", 1), demo_uid("series", 1, 0)
    mr_files = {p.read_bytes() for p in demo_files if uids(p)[1] == mr_series}
    assert len(mr_files) == 8

    series = client.get(
        f"/dicomweb/studies/{mr_study}/series/{mr_series}", headers={"Accept": DICOM_PARTS}
    )
    assert sorted(dicom_parts(series)) == sorted(mr_files)

    mixed = demo_uid("study", 3)
    study = client.get(f"/dicomweb/studies/{mixed}", headers={"Accept": DICOM_PARTS})
    expected = {p.read_bytes() for p in demo_files if uids(p)[0] == mixed}
    parts = dicom_parts(study)
    assert len(parts) == 4
    assert set(parts) == expected
    # Default Accept (none given) also answers with the stored bytes.
    assert set(dicom_parts(client.get(f"/dicomweb/studies/{mixed}"))) == expected


def test_requesting_another_transfer_syntax_is_406(client, stored: dict[str, Path]) -> None:
    j2k = stored["JPEG2000.dcm"]
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}'

    refused = client.get(instance_url(j2k), headers={"Accept": accept})
    as_stored = client.get(instance_url(stored["CT_small.dcm"]), headers={"Accept": accept})

    assert refused.status_code == 406
    assert EXPLICIT_LE in refused.json()["message"]
    assert "1.2.840.10008.1.2.4.91" in refused.json()["message"]
    assert dicom_parts(as_stored) == [stored["CT_small.dcm"].read_bytes()]


def test_missing_study_series_instance_are_404_naming_them(client, stored: dict[str, Path]) -> None:
    study, series, _sop = uids(stored["CT_small.dcm"])

    for url, named in (
        ("/dicomweb/studies/1.2.3.4", "1.2.3.4"),
        (f"/dicomweb/studies/{study}/series/1.2.3.5", "1.2.3.5"),
        (f"/dicomweb/studies/{study}/series/{series}/instances/1.2.3.6", "1.2.3.6"),
        ("/dicomweb/studies/1.2.3.4/metadata", "1.2.3.4"),
        (f"/dicomweb/studies/{study}/series/1.2.3.5/metadata", "1.2.3.5"),
        (f"/dicomweb/studies/{study}/series/{series}/instances/1.2.3.6/metadata", "1.2.3.6"),
        (f"/dicomweb/studies/{study}/series/{series}/instances/1.2.3.6/frames/1", "1.2.3.6"),
        (f"/dicomweb/studies/{study}/series/{series}/instances/1.2.3.6/rendered", "1.2.3.6"),
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert named in response.json()["message"], url


# --- metadata ------------------------------------------------------------------------------


@pytest.mark.usefixtures("demo_loaded")
def test_metadata_at_each_level(client) -> None:
    ct_study, ct_series = demo_uid("study", 0), demo_uid("series", 0, 0)
    study = client.get(f"/dicomweb/studies/{ct_study}/metadata")
    series = client.get(f"/dicomweb/studies/{ct_study}/series/{ct_series}/metadata")
    sop = demo_uid("instance", 0, 0, 5)
    instance = client.get(
        f"/dicomweb/studies/{ct_study}/series/{ct_series}/instances/{sop}/metadata"
    )
    mixed = client.get(f"/dicomweb/studies/{demo_uid('study', 3)}/metadata")

    for response in (study, series, instance, mixed):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/dicom+json")
    assert len(study.json()) == len(series.json()) == 24
    assert {i["00080018"]["Value"][0] for i in series.json()} == {
        demo_uid("instance", 0, 0, i) for i in range(24)
    }
    [item] = instance.json()
    assert item["00080018"]["Value"] == [sop]
    assert item["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]
    assert item["00020010"]["Value"] == [EXPLICIT_LE]
    assert item["00200013"]["Value"] == [6]
    assert "InlineBinary" not in item.get("7FE00010", {})
    assert {i["00020010"]["Value"][0] for i in mixed.json()} == {
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.81",
    }


def test_metadata_matches_the_stored_header(client, stored: dict[str, Path]) -> None:
    mr = stored["MR_small.dcm"]
    study, series, _ = uids(mr)

    [item] = client.get(f"/dicomweb/studies/{study}/series/{series}/metadata").json()

    header = pydicom.dcmread(mr, stop_before_pixels=True)
    from_json = pydicom.Dataset.from_json({k: v for k, v in item.items() if "BulkDataURI" not in v})
    for keyword in (
        "PatientName",
        "PatientID",
        "StudyDate",
        "Rows",
        "Columns",
        "WindowCenter",
        "ImagePositionPatient",
        "PixelSpacing",
        "SOPInstanceUID",
        "Manufacturer",
    ):
        assert from_json.get(keyword) == header.get(keyword), keyword


def test_pixel_data_bulkdata_uri_returns_the_pixels(client, stored: dict[str, Path]) -> None:
    ct = stored["CT_small.dcm"]
    _, series, sop = uids(ct)

    [item] = client.get(f"{instance_url(ct)}/metadata").json()
    uri = item["7FE00010"]["BulkDataURI"]
    assert uri.startswith("http://testserver/dicomweb/studies/")
    assert f"/series/{series}/instances/{sop}/bulkdata/" in uri
    response = client.get(uri, headers={"Accept": OCTET_PARTS})

    assert response.status_code == 200, response.text
    [(headers, payload)] = read_multipart(response.headers["content-type"], response.content)
    assert headers["content-type"].startswith("application/octet-stream")
    assert payload == pydicom.dcmread(ct).PixelData


def test_bulkdata_uris_inside_sequences_resolve(client, stow: StowCall, tmp_path: Path) -> None:
    """An ECG's WaveformData lies in the items of WaveformSequence: each item's BulkDataURI
    must return that item's samples."""
    ecg = copy_with_uids(Path(get_testdata_file("waveform_ecg.dcm")), tmp_path / "ecg.dcm")
    assert stow([ecg]).status_code == 200
    expected = [item.WaveformData for item in pydicom.dcmread(ecg).WaveformSequence]
    assert len(expected) == 2

    [item] = client.get(f"{instance_url(ecg)}/metadata").json()
    uris = [i["54001010"]["BulkDataURI"] for i in item["54000100"]["Value"]]
    assert len(set(uris)) == 2

    for uri, samples in zip(uris, expected, strict=True):
        response = client.get(uri, headers={"Accept": OCTET_PARTS})
        assert response.status_code == 200, (uri, response.text)
        [(_, payload)] = read_multipart(response.headers["content-type"], response.content)
        assert payload == samples


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("54000100/7/54001010", 404),
        ("54000100/x/54001010", 400),
        ("5400", 400),
        ("00100010/0", 400),
    ],
)
def test_bad_bulkdata_paths(client, stow: StowCall, tmp_path: Path, path: str, status: int) -> None:
    ecg = copy_with_uids(Path(get_testdata_file("waveform_ecg.dcm")), tmp_path / "ecg.dcm")
    assert stow([ecg]).status_code == 200

    response = client.get(f"{instance_url(ecg)}/bulkdata/{path}")

    assert response.status_code == status
    assert path.split("/")[-1] in response.json()["message"] or path in response.json()["message"]


def test_series_metadata_follows_new_instances(
    client, stow: StowCall, stored: dict[str, Path], tmp_path: Path
) -> None:
    ct = stored["CT_small.dcm"]
    study, series, _ = uids(ct)
    assert len(client.get(f"/dicomweb/studies/{study}/series/{series}/metadata").json()) == 1
    second = copy_with_uids(ct, tmp_path / "second.dcm", study_uid=study, series_uid=series)
    assert stow([second]).status_code == 200

    items = client.get(f"/dicomweb/studies/{study}/series/{series}/metadata").json()

    assert {i["00080018"]["Value"][0] for i in items} == {uids(ct)[2], uids(second)[2]}


# --- frames and bulk data ------------------------------------------------------------------


def frame_parts(response) -> list[bytes]:
    assert response.status_code == 200, response.text
    parts = read_multipart(response.headers["content-type"], response.content)
    return [payload for _, payload in parts]


def test_native_multiframe_frames(client, stored: dict[str, Path]) -> None:
    rtdose = stored["rtdose.dcm"]
    ds = pydicom.dcmread(rtdose)
    size = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    expected = [ds.PixelData[i * size : (i + 1) * size] for i in range(int(ds.NumberOfFrames))]

    some = client.get(f"{instance_url(rtdose)}/frames/1,5,15", headers={"Accept": OCTET_PARTS})
    every = client.get(f"{instance_url(rtdose)}/frames/{','.join(map(str, range(1, 16)))}")

    assert frame_parts(some) == [expected[0], expected[4], expected[14]]
    assert frame_parts(every) == expected


def test_encapsulated_multiframe_frames(client, stored: dict[str, Path]) -> None:
    ybr = stored["examples_ybr_color.dcm"]
    ds = pydicom.dcmread(ybr)
    expected = list(generate_frames(ds.PixelData, number_of_frames=30))

    response = client.get(f"{instance_url(ybr)}/frames/2,30,1", headers={"Accept": OCTET_PARTS})

    parts = frame_parts(response)
    assert parts == [expected[1], expected[29], expected[0]]
    assert all(p.startswith(b"\xff\xd8") for p in parts)  # each is a whole JPEG
    headers, _ = read_multipart(response.headers["content-type"], response.content)[0]
    assert "transfer-syntax=1.2.840.10008.1.2.4.50" in headers["content-type"]


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "JPEGLSNearLossless_16.dcm"])
def test_single_compressed_frame(client, stored: dict[str, Path], name: str) -> None:
    path = stored[name]
    [expected] = generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1)

    assert frame_parts(client.get(f"{instance_url(path)}/frames/1")) == [expected]


def test_single_frame_as_octet_stream(client, stored: dict[str, Path]) -> None:
    ct = stored["CT_small.dcm"]

    response = client.get(
        f"{instance_url(ct)}/frames/1", headers={"Accept": "application/octet-stream"}
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content == pydicom.dcmread(ct).PixelData


@pytest.mark.parametrize(
    ("frames", "status", "named"),
    [("16", 404, "16"), ("0", 400, "0"), ("1,x", 400, "1,x"), ("3,99", 404, "99")],
)
def test_bad_frame_numbers(
    client, stored: dict[str, Path], frames: str, status: int, named: str
) -> None:
    response = client.get(f"{instance_url(stored['rtdose.dcm'])}/frames/{frames}")

    assert response.status_code == status
    assert named in response.json()["message"]


# --- rendered and thumbnails ---------------------------------------------------------------


def image_of(response, media_type: str = "image/jpeg") -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "JPEGLSNearLossless_16.dcm",
        "examples_ybr_color.dcm",
        "rtdose.dcm",
    ],
)
def test_every_transfer_syntax_renders(client, stored: dict[str, Path], name: str) -> None:
    ds = pydicom.dcmread(stored[name], stop_before_pixels=True)

    jpeg = image_of(client.get(f"{instance_url(stored[name])}/rendered"))
    png = image_of(
        client.get(f"{instance_url(stored[name])}/rendered", headers={"Accept": "image/png"}),
        "image/png",
    )

    assert jpeg.format == "JPEG" and png.format == "PNG"
    assert jpeg.size == png.size == (ds.Columns, ds.Rows)
    assert np.asarray(png).std() > 0  # not a blank image


def test_render_frame_of_multiframe(client, stored: dict[str, Path]) -> None:
    url = instance_url(stored["examples_ybr_color.dcm"])

    first = image_of(
        client.get(f"{url}/frames/1/rendered", headers={"Accept": "image/png"}), "image/png"
    )
    last = image_of(
        client.get(f"{url}/frames/30/rendered", headers={"Accept": "image/png"}), "image/png"
    )
    beyond = client.get(f"{url}/frames/31/rendered")

    assert first.size == last.size == (320, 240)
    assert first.mode == "RGB"
    assert not np.array_equal(np.asarray(first), np.asarray(last))
    assert beyond.status_code == 404
    assert "31" in beyond.json()["message"]


def test_window_changes_the_rendering(client, stored: dict[str, Path]) -> None:
    url = f"{instance_url(stored['CT_small.dcm'])}/rendered"
    png = {"Accept": "image/png"}

    narrow = np.asarray(
        image_of(client.get(url, params={"window": "40,80"}, headers=png), "image/png")
    )
    wide = np.asarray(
        image_of(client.get(url, params={"window": "1000,4000"}, headers=png), "image/png")
    )

    assert narrow.shape == wide.shape == (128, 128)
    assert not np.array_equal(narrow, wide)
    # A narrow window saturates more pixels than a wide one.
    assert np.isin(narrow, (0, 255)).sum() > np.isin(wide, (0, 255)).sum()


def test_viewport_and_thumbnail_sizes(client, stored: dict[str, Path]) -> None:
    ybr = stored["examples_ybr_color.dcm"]
    study, series, _ = uids(ybr)

    viewport = image_of(client.get(f"{instance_url(ybr)}/rendered", params={"viewport": "160,160"}))
    thumbnail = image_of(client.get(f"{instance_url(ybr)}/thumbnail"))
    series_thumb = image_of(client.get(f"/dicomweb/studies/{study}/series/{series}/thumbnail"))
    study_thumb = image_of(
        client.get(f"/dicomweb/studies/{study}/thumbnail", headers={"Accept": "image/png"}),
        "image/png",
    )

    assert viewport.size == (160, 120)  # aspect ratio kept inside the viewport
    assert thumbnail.size == series_thumb.size == study_thumb.size == (128, 96)


@pytest.mark.parametrize(
    ("params", "accept", "status", "named"),
    [
        ({"window": "40"}, "image/jpeg", 400, "40"),
        ({"window": "40,-5"}, "image/jpeg", 400, "-5"),
        ({"viewport": "0,10"}, "image/jpeg", 400, "0,10"),
        ({"quality": "0"}, "image/jpeg", 400, "0"),
        ({}, "image/gif", 406, "image/gif"),
    ],
)
def test_bad_render_parameters(
    client, stored: dict[str, Path], params: dict[str, str], accept: str, status: int, named: str
) -> None:
    response = client.get(
        f"{instance_url(stored['CT_small.dcm'])}/rendered",
        params=params,
        headers={"Accept": accept},
    )

    assert response.status_code == status
    assert named in response.json()["message"]
