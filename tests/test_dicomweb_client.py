"""dicomweb-client (the reference Python DICOMweb client) against a real uvicorn server."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from tests.conftest import LiveServer

# rtdose.dcm as shipped holds a UID with a leading-zero component; pydicom warns when comparing.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")

CODECS = [
    "CT_small.dcm",
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEGLSNearLossless_16.dcm",
    "examples_ybr_color.dcm",
    "rtdose.dcm",
]


@pytest.fixture
def dicomweb(live_server: LiveServer) -> DICOMwebClient:
    return DICOMwebClient(url=live_server.dicomweb)


@pytest.fixture
def datasets(samples: dict[str, Path]) -> dict[str, Dataset]:
    return {name: pydicom.dcmread(samples[name]) for name in CODECS}


@pytest.fixture
def stored(dicomweb: DICOMwebClient, datasets: dict[str, Dataset]) -> dict[str, Dataset]:
    response = dicomweb.store_instances(list(datasets.values()))
    assert "FailedSOPSequence" not in response
    assert len(response.ReferencedSOPSequence) == len(datasets)
    return datasets


def assert_same_dataset(got: Dataset, expected: Dataset) -> None:
    assert got.file_meta.TransferSyntaxUID == expected.file_meta.TransferSyntaxUID
    assert got == expected  # every element, pixel data included


def test_store_instances_response(dicomweb: DICOMwebClient, datasets: dict[str, Dataset]) -> None:
    ct = datasets["CT_small.dcm"]

    response = dicomweb.store_instances([ct], study_instance_uid=ct.StudyInstanceUID)

    [item] = response.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == ct.SOPInstanceUID
    assert item.ReferencedSOPClassUID == ct.SOPClassUID
    assert item.RetrieveURL.endswith(f"/instances/{ct.SOPInstanceUID}")


def test_search_at_every_level(dicomweb: DICOMwebClient, stored: dict[str, Dataset]) -> None:
    ybr = stored["examples_ybr_color.dcm"]

    studies = dicomweb.search_for_studies()
    by_name = dicomweb.search_for_studies(search_filters={"PatientName": str(ybr.PatientName)})
    fuzzy = dicomweb.search_for_studies(
        search_filters={
            "PatientName": str(stored["CT_small.dcm"].PatientName).split("^")[0].lower()
        },
        fuzzymatching=True,
    )
    paged = dicomweb.search_for_studies(limit=3, offset=3)
    series = dicomweb.search_for_series(study_instance_uid=ybr.StudyInstanceUID)
    instances = dicomweb.search_for_instances(
        study_instance_uid=ybr.StudyInstanceUID,
        series_instance_uid=ybr.SeriesInstanceUID,
        fields=["NumberOfFrames"],
    )

    assert {Dataset.from_json(s).StudyInstanceUID for s in studies} == {
        d.StudyInstanceUID for d in stored.values()
    }
    assert [Dataset.from_json(s).StudyInstanceUID for s in by_name] == [ybr.StudyInstanceUID]
    assert stored["CT_small.dcm"].StudyInstanceUID in {
        Dataset.from_json(s).StudyInstanceUID for s in fuzzy
    }
    assert len(paged) == 3
    assert [Dataset.from_json(s).Modality for s in series] == ["US"]
    [instance] = [Dataset.from_json(i) for i in instances]
    assert instance.SOPInstanceUID == ybr.SOPInstanceUID
    assert instance.NumberOfFrames == 30


def test_retrieve_study_returns_what_was_stored(
    dicomweb: DICOMwebClient, stored: dict[str, Dataset]
) -> None:
    for expected in stored.values():
        [got] = dicomweb.retrieve_study(expected.StudyInstanceUID)
        assert_same_dataset(got, expected)


def test_retrieve_instance(dicomweb: DICOMwebClient, stored: dict[str, Dataset]) -> None:
    rtdose = stored["rtdose.dcm"]

    got = dicomweb.retrieve_instance(
        rtdose.StudyInstanceUID, rtdose.SeriesInstanceUID, rtdose.SOPInstanceUID
    )

    assert_same_dataset(got, rtdose)


def test_retrieve_series_metadata(dicomweb: DICOMwebClient, stored: dict[str, Dataset]) -> None:
    mr = stored["MR_small_RLE.dcm"]

    [metadata] = dicomweb.retrieve_series_metadata(mr.StudyInstanceUID, mr.SeriesInstanceUID)

    header = Dataset.from_json(metadata, bulk_data_uri_handler=lambda *_: b"")
    for keyword in (
        "SOPInstanceUID",
        "PatientName",
        "PatientID",
        "Rows",
        "Columns",
        "ImagePositionPatient",
        "WindowCenter",
        "Modality",
    ):
        assert header.get(keyword) == mr.get(keyword), keyword
    # dicomweb-client sends "Host: 127.0.0.1" without the port, so only the path is ours to check.
    uri = urlsplit(metadata["7FE00010"]["BulkDataURI"])
    assert uri.path == (
        f"/dicomweb/studies/{mr.StudyInstanceUID}/series/{mr.SeriesInstanceUID}"
        f"/instances/{mr.SOPInstanceUID}/bulkdata/7fe00010"
    )


def test_retrieve_instance_frames_native(
    dicomweb: DICOMwebClient, stored: dict[str, Dataset]
) -> None:
    rtdose = stored["rtdose.dcm"]
    size = rtdose.Rows * rtdose.Columns * rtdose.BitsAllocated // 8

    frames = dicomweb.retrieve_instance_frames(
        rtdose.StudyInstanceUID,
        rtdose.SeriesInstanceUID,
        rtdose.SOPInstanceUID,
        frame_numbers=[2, 15],
    )

    assert frames == [rtdose.PixelData[size : 2 * size], rtdose.PixelData[14 * size : 15 * size]]


def test_retrieve_instance_frames_encapsulated(
    dicomweb: DICOMwebClient, stored: dict[str, Dataset]
) -> None:
    ybr = stored["examples_ybr_color.dcm"]
    expected = list(generate_frames(ybr.PixelData, number_of_frames=30))

    frames = dicomweb.retrieve_instance_frames(
        ybr.StudyInstanceUID,
        ybr.SeriesInstanceUID,
        ybr.SOPInstanceUID,
        frame_numbers=[1, 17, 30],
        media_types=(("application/octet-stream", "*"),),
    )

    assert frames == [expected[0], expected[16], expected[29]]


def test_retrieve_rendered_and_delete(dicomweb: DICOMwebClient, stored: dict[str, Dataset]) -> None:
    ct = stored["CT_small.dcm"]

    image = dicomweb.retrieve_instance_rendered(
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID, media_types=("image/png",)
    )
    dicomweb.delete_study(ct.StudyInstanceUID)

    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    remaining = {Dataset.from_json(s).StudyInstanceUID for s in dicomweb.search_for_studies()}
    assert ct.StudyInstanceUID not in remaining
    assert len(remaining) == len(stored) - 1
