"""C-FIND as an SCP: the same matches as QIDO-RS for the same keys (one query module),
PATIENT / STUDY / SERIES / IMAGE levels in Patient Root and Study Root, return keys,
unsupported keys (0xFF01) and invalid identifiers (0xA900); pynetdicom and dcmtk findscu."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from tests.dimse_support import (
    RunningScp,
    output,
    run_dcmtk,
)

from medlake.cli.demo_data import write_demo_studies
from medlake.dicom.attributes import Level
from medlake.dicomweb.search import run_search
from medlake.dimse.contexts import PATIENT_ROOT_FIND, STUDY_ROOT_FIND

LEVELS = {"STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.INSTANCE}
UNIQUE = {"STUDY": "0020000D", "SERIES": "0020000E", "IMAGE": "00080018"}


@pytest.fixture(scope="module")
def demo(scp: RunningScp, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The demo studies (4 studies, 3 patients, 37 instances), stored over C-STORE."""
    files = write_demo_studies(tmp_path_factory.mktemp("demo"))
    ae = AE(ae_title="LOADER")
    pairs = set()
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        pairs.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the files' own bytes
        assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
        try:
            statuses = [assoc.send_c_store(path).Status for path in files]
        finally:
            assoc.release()
    assert statuses == [0] * len(files)
    return files


def c_find(
    scp: RunningScp,
    level: str,
    keys: dict[str, Any],
    *,
    model: str = STUDY_ROOT_FIND,
    calling: str = "FINDSCU",
) -> tuple[list[int], list[Dataset]]:
    """(statuses, matches) of one C-FIND from a pynetdicom SCU."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    assert assoc.is_established
    statuses, matches = [], []
    try:
        for status, found in assoc.send_c_find(identifier, model):
            statuses.append(int(status.Status))
            if found is not None:
                matches.append(found)
    finally:
        assoc.release()
    return statuses, matches


def qido_uids(scp: RunningScp, level: str, params: dict[str, str]) -> set[str]:
    result = run_search(scp.archive, LEVELS[level], "default", list(params.items()))
    return {ds[UNIQUE[level]]["Value"][0] for ds in result.datasets}


def _uid(ds: Dataset, level: str) -> str:
    return str(ds[int(UNIQUE[level], 16)].value)


QUERIES = [
    ("STUDY", {"PatientName": "doe*"}),
    ("STUDY", {"PatientName": "DOE^JANE"}),
    ("STUDY", {"PatientID": "DEMO00?"}),
    ("STUDY", {"StudyDate": "20230101-20241231"}),
    ("STUDY", {"StudyDate": "-20221231"}),
    ("STUDY", {"ModalitiesInStudy": "MR"}),
    ("STUDY", {"AccessionNumber": "ACC0003"}),
    ("STUDY", {"StudyDescription": "*HEAD*", "PatientSex": "F"}),
    ("SERIES", {"Modality": "CT"}),
    ("SERIES", {"Modality": "US\\OT"}),
    ("SERIES", {"PatientID": "DEMO001", "Modality": "MR"}),
    ("IMAGE", {"PatientID": "DEMO002"}),
    ("IMAGE", {"InstanceNumber": "1"}),
]


@pytest.mark.parametrize(("level", "keys"), QUERIES, ids=[str(q) for q in QUERIES])
def test_c_find_matches_what_qido_matches(
    scp: RunningScp, demo: list[Path], level: str, keys: dict[str, str]
) -> None:
    statuses, matches = c_find(scp, level, {**keys, UNIQUE_KEYWORDS[level]: ""})

    expected = qido_uids(scp, level, keys)
    assert expected, "the query should match something in the demo data"
    assert {_uid(ds, level) for ds in matches} == expected
    assert statuses[-1] == 0x0000
    assert set(statuses[:-1]) == {0xFF00}


UNIQUE_KEYWORDS = {
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


def test_hierarchical_series_and_image_queries_within_a_study(
    scp: RunningScp, demo: list[Path]
) -> None:
    header = pydicom.dcmread(demo[0], stop_before_pixels=True)
    study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)

    _, in_study = c_find(scp, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": ""})
    _, images = c_find(
        scp,
        "IMAGE",
        {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": series,
            "SOPInstanceUID": "",
            "InstanceNumber": "",
        },
    )

    assert {str(ds.SeriesInstanceUID) for ds in in_study} == qido_uids(
        scp, "SERIES", {"StudyInstanceUID": study}
    )
    assert len(images) == len(qido_uids(scp, "IMAGE", {"SeriesInstanceUID": series}))
    assert all(ds.StudyInstanceUID == study and ds.SeriesInstanceUID == series for ds in images)
    assert all(ds.QueryRetrieveLevel == "IMAGE" for ds in images)


def test_return_keys_carry_the_index_values(scp: RunningScp, demo: list[Path]) -> None:
    _, matches = c_find(
        scp,
        "STUDY",
        {
            "PatientID": "DEMO002",
            "StudyInstanceUID": "",
            "PatientName": "",
            "StudyDate": "",
            "ModalitiesInStudy": "",
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
            "StudyDescription": "",
            "RetrieveAETitle": "",
            "InstanceAvailability": "",
            "ReferringPhysicianName": "",
        },
    )

    assert len(matches) == 1
    ds = matches[0]
    assert ds.PatientName == "ROE^RICHARD"
    assert ds.StudyDate == "20230611"
    assert ds.ModalitiesInStudy == "MR"
    assert int(ds.NumberOfStudyRelatedSeries) == 1
    assert int(ds.NumberOfStudyRelatedInstances) == 8
    assert ds.StudyDescription == "MR HEAD"
    assert ds.RetrieveAETitle == scp.ae_title
    assert ds.InstanceAvailability == "ONLINE"
    assert "ReferringPhysicianName" in ds  # asked for: returned, empty when there is none
    assert ds.QueryRetrieveLevel == "STUDY"


def test_patient_level_groups_the_studies_of_a_patient(scp: RunningScp, demo: list[Path]) -> None:
    keys = {
        "PatientID": "",
        "PatientName": "",
        "NumberOfPatientRelatedStudies": "",
        "NumberOfPatientRelatedInstances": "",
    }
    statuses, patients = c_find(scp, "PATIENT", keys, model=PATIENT_ROOT_FIND)

    by_id = {str(ds.PatientID): ds for ds in patients}
    assert set(by_id) == {"DEMO001", "DEMO002", "DEMO003"}
    assert int(by_id["DEMO001"].NumberOfPatientRelatedStudies) == 2
    assert int(by_id["DEMO002"].NumberOfPatientRelatedInstances) == 8
    assert statuses[-1] == 0
    _, one = c_find(
        scp, "PATIENT", {"PatientName": "roe*", "PatientID": ""}, model=PATIENT_ROOT_FIND
    )
    assert [str(ds.PatientID) for ds in one] == ["DEMO002"]


def test_patient_root_study_level_query(scp: RunningScp, demo: list[Path]) -> None:
    _, studies = c_find(
        scp, "STUDY", {"PatientID": "DEMO001", "StudyInstanceUID": ""}, model=PATIENT_ROOT_FIND
    )

    assert {str(ds.StudyInstanceUID) for ds in studies} == qido_uids(
        scp, "STUDY", {"PatientID": "DEMO001"}
    )


def test_unsupported_keys_are_left_out_with_status_ff01(scp: RunningScp, demo: list[Path]) -> None:
    statuses, matches = c_find(
        scp,
        "STUDY",
        {
            "PatientID": "DEMO002",
            "StudyInstanceUID": "",
            "ContrastBolusAgent": "",
            "StationName": "",
        },  # not indexed; a series-level attribute
    )

    assert len(matches) == 1
    assert statuses[:-1] == [0xFF01]
    assert "ContrastBolusAgent" not in matches[0]
    assert "StationName" not in matches[0]


@pytest.mark.parametrize(
    ("level", "keys", "model"),
    [
        ("STUDY", {"StudyDate": "2023-01-01"}, STUDY_ROOT_FIND),
        ("STUDY", {"StudyDate": "20241231-20230101"}, STUDY_ROOT_FIND),
        ("STUDY", {"StudyInstanceUID": "1.2.abc"}, STUDY_ROOT_FIND),
        ("PATIENT", {"PatientID": ""}, STUDY_ROOT_FIND),
        ("WARD", {"PatientID": ""}, STUDY_ROOT_FIND),
    ],
    ids=["bad-date", "reversed-range", "bad-uid", "patient-in-study-root", "bad-level"],
)
def test_invalid_identifiers_are_refused_with_a900(
    scp: RunningScp, demo: list[Path], level: str, keys: dict[str, str], model: str
) -> None:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(model)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        responses = list(assoc.send_c_find(identifier, model))
    finally:
        assoc.release()

    status = responses[-1][0]
    assert status.Status == 0xA900
    assert status.ErrorComment


def test_findscu_lists_the_studies(scp: RunningScp, demo: list[Path]) -> None:
    result = run_dcmtk(
        "findscu",
        "-S",
        "-aet",
        "FINDSCU",
        "-aec",
        scp.ae_title,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientName=DOE*",
        "-k",
        "StudyInstanceUID",
        "-k",
        "StudyDescription",
        "127.0.0.1",
        scp.port,
    )

    text = output(result)
    assert result.returncode == 0, text
    assert text.count("Find Response:") == 2
    assert "CT CHEST" in text and "MIXED CODECS" in text


def test_findscu_patient_root_series_level(scp: RunningScp, demo: list[Path]) -> None:
    result = run_dcmtk(
        "findscu",
        "-P",
        "-aet",
        "FINDSCU",
        "-aec",
        scp.ae_title,
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        "PatientID=DEMO001",
        "-k",
        "Modality=CT",
        "-k",
        "SeriesInstanceUID",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        scp.port,
    )

    text = output(result)
    assert result.returncode == 0, text
    expected = qido_uids(scp, "SERIES", {"PatientID": "DEMO001", "Modality": "CT"})
    assert text.count("Find Response:") == len(expected) == 3


def _iter_values(ds: Dataset) -> Iterator[str]:
    for element in ds:
        yield str(element.value)


def test_non_ascii_names_are_answered_in_utf8(
    scp: RunningScp, demo: list[Path], tmp_path: Path
) -> None:
    from tests.dimse_support import fresh_copy

    path = fresh_copy(
        "CT_small.dcm",
        tmp_path,
        PatientName="Müller^Jürgen",
        PatientID="UML01",
        SpecificCharacterSet="ISO_IR 100",
    )
    ae = AE(ae_title="LOADER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    finally:
        assoc.release()

    _, matches = c_find(
        scp,
        "STUDY",
        {"PatientName": "MÜLLER*", "SpecificCharacterSet": "ISO_IR 192", "PatientID": ""},
    )
    assert [str(ds.PatientName) for ds in matches] == ["Müller^Jürgen"]
    assert matches[0].SpecificCharacterSet == "ISO_IR 192"
