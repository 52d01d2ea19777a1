"""QIDO-RS at every level: matching rules, includefield, paging, errors.

The demo set (tests/conftest.py ``demo_loaded``) holds four studies::

    0  DEMO001  DOE^JANE     CT CHEST      20240105 072730  CT x24
    1  DEMO002  ROE^RICHARD  MR HEAD       20230611 185059  MR x8
    2  DEMO003  POE^EDGAR    US CARDIAC    20250302 120850  US x1 (30 frames)
    3  DEMO001  DOE^JANE     MIXED CODECS  20221230 185059  CT, MR, OT, CT (one each)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids

from medlake.cli.demo_data import demo_uid

pytestmark = pytest.mark.usefixtures("demo_loaded")

STUDY = [demo_uid("study", s) for s in range(4)]
CT_SERIES = demo_uid("series", 0, 0)

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
PATIENT_NAME, MODALITY, MODALITIES_IN_STUDY = "00100010", "00080060", "00080061"


def search(client, url: str, params: Any = None) -> tuple[list[dict[str, Any]], int]:
    """(results, X-Total-Count) of a successful search; 204 means no results."""
    response = client.get(url, params=params)
    assert response.status_code in (200, 204), response.text
    total = int(response.headers["x-total-count"])
    if response.status_code == 204:
        return [], total
    assert response.headers["content-type"].startswith("application/dicom+json")
    return response.json(), total


def values(results: list[dict[str, Any]], tag: str) -> list[Any]:
    """The first value of ``tag`` in each result (Alphabetic for person names)."""
    out = []
    for item in results:
        value = item[tag].get("Value", [None])[0]
        out.append(value["Alphabetic"] if isinstance(value, dict) else value)
    return out


def study_set(client, **params: str) -> set[str]:
    """StudyInstanceUIDs of a study search."""
    results, total = search(client, "/dicomweb/studies", params)
    assert total == len(results)
    return set(values(results, STUDY_UID))


def test_all_studies_with_counts_and_retrieve_url(client) -> None:
    results, total = search(client, "/dicomweb/studies")

    assert total == 4
    by_uid = {r[STUDY_UID]["Value"][0]: r for r in results}
    assert set(by_uid) == set(STUDY)
    mixed = by_uid[STUDY[3]]
    assert mixed["00201206"]["Value"] == [4]  # NumberOfStudyRelatedSeries
    assert mixed["00201208"]["Value"] == [4]  # NumberOfStudyRelatedInstances
    assert mixed[MODALITIES_IN_STUDY]["Value"] == ["CT", "MR", "OT"]
    assert by_uid[STUDY[0]]["00201208"]["Value"] == [24]
    assert mixed["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{STUDY[3]}")
    assert mixed["00080056"]["Value"] == ["ONLINE"]


def test_exact_matching(client) -> None:
    assert study_set(client, PatientID="DEMO001") == {STUDY[0], STUDY[3]}
    assert study_set(client, AccessionNumber="ACC0001") == {STUDY[1]}
    assert study_set(client, PatientName="POE^EDGAR") == {STUDY[2]}
    assert study_set(client, StudyDescription="MR HEAD") == {STUDY[1]}
    assert study_set(client, PatientID="DEMO") == set()


def test_wildcards(client) -> None:
    assert study_set(client, PatientName="DOE*") == {STUDY[0], STUDY[3]}
    assert study_set(client, PatientName="?OE^JANE") == {STUDY[0], STUDY[3]}
    assert study_set(client, PatientName="*E^*") == set(STUDY)
    assert study_set(client, StudyDescription="*CODECS") == {STUDY[3]}
    assert study_set(client, PatientID="DEMO00?") == set(STUDY)
    assert study_set(client, PatientID="DEMO0?") == set()


def test_wildcard_characters_of_sql_are_literal(client) -> None:
    assert study_set(client, StudyDescription="%") == set()
    assert study_set(client, StudyDescription="CT_CHEST") == set()
    assert study_set(client, StudyDescription="CT%") == set()


def test_percent_encoded_values_are_decoded(
    client, stow: StowCall, samples, tmp_path: Path
) -> None:
    smith = copy_with_uids(
        samples["MR_small.dcm"], tmp_path / "smith.dcm", PatientName="SMITH^JOHN"
    )
    assert stow([smith]).status_code == 200

    for raw in ("PatientName=SMI%2A", "PatientName=SMITH%5EJOHN", "PatientName=SMI%3F%3F%3FJOHN"):
        response = client.get(f"/dicomweb/studies?{raw}")
        assert response.status_code == 200, (raw, response.status_code, response.text)
        assert values(response.json(), PATIENT_NAME) == ["SMITH^JOHN"], raw


def test_non_ascii_person_names(client, stow: StowCall, samples, tmp_path: Path) -> None:
    muller = copy_with_uids(
        samples["MR_small.dcm"],
        tmp_path / "muller.dcm",
        SpecificCharacterSet="ISO_IR 192",
        PatientName="Müller^Jürgen",
    )
    assert stow([muller]).status_code == 200

    for params in (
        {"PatientName": "Müller^Jürgen"},
        {"PatientName": "MÜLLER*"},
        {"PatientName": "jürg", "fuzzymatching": "true"},
    ):
        results, _ = search(client, "/dicomweb/studies", params)
        assert values(results, PATIENT_NAME) == ["Müller^Jürgen"], params
    encoded = client.get("/dicomweb/studies?PatientName=M%C3%BCller%5E%2A")
    assert values(encoded.json(), PATIENT_NAME) == ["Müller^Jürgen"]


def test_fuzzy_matching_of_person_names(client) -> None:
    assert study_set(client, PatientName="jane") == set()
    assert study_set(client, PatientName="jane", fuzzymatching="true") == {STUDY[0], STUDY[3]}
    assert study_set(client, PatientName="ric", fuzzymatching="true") == {STUDY[1]}
    assert study_set(client, PatientName="Edgar Poe", fuzzymatching="true") == {STUDY[2]}
    assert study_set(client, PatientName="ane", fuzzymatching="true") == set()
    assert study_set(client, PatientName="jane", fuzzymatching="false") == set()


def test_date_matching_and_ranges(client) -> None:
    assert study_set(client, StudyDate="20240105") == {STUDY[0]}
    assert study_set(client, StudyDate="20230101-20241231") == {STUDY[0], STUDY[1]}
    assert study_set(client, StudyDate="20230611-20230611") == {STUDY[1]}
    assert study_set(client, StudyDate="-20230101") == {STUDY[3]}
    assert study_set(client, StudyDate="20250101-") == {STUDY[2]}
    assert study_set(client, StudyDate="20240105\\20221230") == {STUDY[0], STUDY[3]}


def test_time_ranges(client) -> None:
    assert study_set(client, StudyTime="070000-080000") == {STUDY[0]}
    assert study_set(client, StudyTime="1800-1900") == {STUDY[1], STUDY[3]}
    # The upper end of a time range includes every time that starts with it.
    assert study_set(client, StudyTime="-1850") == {STUDY[0], STUDY[1], STUDY[2], STUDY[3]}
    assert study_set(client, StudyTime="-18") == {STUDY[0], STUDY[1], STUDY[2], STUDY[3]}
    assert study_set(client, StudyTime="1851-") == set()
    assert study_set(client, StudyTime="072730") == {STUDY[0]}


def test_uid_lists(client) -> None:
    assert study_set(client, StudyInstanceUID=f"{STUDY[0]},{STUDY[2]}") == {STUDY[0], STUDY[2]}
    assert study_set(client, StudyInstanceUID=f"{STUDY[1]}\\{STUDY[3]}") == {STUDY[1], STUDY[3]}
    series, total = search(
        client, "/dicomweb/series", {"SeriesInstanceUID": f"{CT_SERIES},{demo_uid('series', 1, 0)}"}
    )
    assert total == 2
    assert set(values(series, STUDY_UID)) == {STUDY[0], STUDY[1]}


def test_modalities_in_study(client) -> None:
    assert study_set(client, ModalitiesInStudy="CT") == {STUDY[0], STUDY[3]}
    assert study_set(client, ModalitiesInStudy="OT") == {STUDY[3]}
    assert study_set(client, ModalitiesInStudy="US,MR") == {STUDY[1], STUDY[2], STUDY[3]}


def test_series_level(client) -> None:
    mixed, total = search(client, f"/dicomweb/studies/{STUDY[3]}/series")
    assert total == 4
    assert sorted(values(mixed, MODALITY)) == ["CT", "CT", "MR", "OT"]
    assert set(values(mixed, STUDY_UID)) == {STUDY[3]}
    assert values(mixed, "00201209") == [1, 1, 1, 1]  # NumberOfSeriesRelatedInstances
    # Attributes of the study come with each series.
    assert set(values(mixed, PATIENT_NAME)) == {"DOE^JANE"}
    assert mixed[0]["00081190"]["Value"][0].endswith(
        f"/studies/{STUDY[3]}/series/{mixed[0][SERIES_UID]['Value'][0]}"
    )

    ct_in_study, _ = search(client, f"/dicomweb/studies/{STUDY[3]}/series", {"Modality": "CT"})
    assert len(ct_in_study) == 2
    everywhere, total = search(client, "/dicomweb/series", {"Modality": "MR"})
    assert total == 2
    assert set(values(everywhere, STUDY_UID)) == {STUDY[1], STUDY[3]}
    numbered, _ = search(client, f"/dicomweb/studies/{STUDY[3]}/series", {"SeriesNumber": "3"})
    assert values(numbered, MODALITY) == ["OT"]


def test_instance_level(client) -> None:
    ct, total = search(client, f"/dicomweb/studies/{STUDY[0]}/series/{CT_SERIES}/instances")
    assert total == 24
    assert set(values(ct, SOP_UID)) == {demo_uid("instance", 0, 0, i) for i in range(24)}
    assert values(ct, "00280010") == [128] * 24  # Rows

    of_patient, total = search(client, "/dicomweb/instances", {"PatientID": "DEMO002"})
    assert total == 8
    assert set(values(of_patient, STUDY_UID)) == {STUDY[1]}

    in_study, total = search(client, f"/dicomweb/studies/{STUDY[3]}/instances")
    assert total == 4
    assert set(values(in_study, "00083002")) == {  # AvailableTransferSyntaxUID
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.81",
    }

    wanted = demo_uid("instance", 0, 0, 7)
    one, total = search(client, "/dicomweb/instances", {"SOPInstanceUID": wanted})
    assert total == 1
    assert one[0]["00081190"]["Value"][0].endswith(
        f"/studies/{STUDY[0]}/series/{CT_SERIES}/instances/{wanted}"
    )
    assert values(one, "00200013") == [8]  # InstanceNumber
    numbered, _ = search(
        client,
        f"/dicomweb/studies/{STUDY[0]}/series/{CT_SERIES}/instances",
        {"InstanceNumber": "3"},
    )
    assert values(numbered, SOP_UID) == [demo_uid("instance", 0, 0, 2)]


def test_includefield(client) -> None:
    plain, _ = search(client, "/dicomweb/studies", {"StudyInstanceUID": STUDY[0]})
    assert "00101010" not in plain[0]  # PatientAge only when asked for

    for field in ("PatientAge", "00101010"):
        asked, _ = search(
            client, "/dicomweb/studies", {"StudyInstanceUID": STUDY[0], "includefield": field}
        )
        assert asked[0]["00101010"]["Value"] == ["000Y"], field

    everything, _ = search(
        client, "/dicomweb/studies", {"StudyInstanceUID": STUDY[0], "includefield": "all"}
    )
    assert everything[0]["00101010"]["Value"] == ["000Y"]

    series, _ = search(
        client,
        f"/dicomweb/studies/{STUDY[0]}/series",
        [("includefield", "Manufacturer,PatientAge")],
    )
    assert series[0]["00080070"]["Value"] == ["GE MEDICAL SYSTEMS"]
    assert series[0]["00101010"]["Value"] == ["000Y"]
    repeated, _ = search(
        client,
        f"/dicomweb/studies/{STUDY[0]}/series",
        [("includefield", "Manufacturer"), ("includefield", "PatientAge")],
    )
    assert repeated == series


def test_limit_offset_and_total(client) -> None:
    first, total1 = search(client, "/dicomweb/studies", {"limit": "2"})
    second, total2 = search(client, "/dicomweb/studies", {"limit": "2", "offset": "2"})
    beyond, total3 = search(client, "/dicomweb/studies", {"limit": "2", "offset": "4"})

    assert (total1, total2, total3) == (4, 4, 4)
    assert len(first) == len(second) == 2
    assert beyond == []
    assert set(values(first, STUDY_UID)) | set(values(second, STUDY_UID)) == set(STUDY)
    assert search(client, "/dicomweb/studies", {"limit": "2"})[0] == first


def test_pages_are_stable_and_complete(client) -> None:
    url = f"/dicomweb/studies/{STUDY[0]}/series/{CT_SERIES}/instances"
    whole, _ = search(client, url)
    pages = []
    for offset in range(0, 24, 5):
        page, total = search(client, url, {"limit": "5", "offset": str(offset)})
        assert total == 24
        pages.extend(values(page, SOP_UID))

    assert pages == values(whole, SOP_UID)
    assert len(set(pages)) == 24


def test_no_match_is_empty_with_zero_total(client) -> None:
    response = client.get("/dicomweb/studies", params={"PatientID": "NOBODY"})

    assert response.status_code == 204
    assert response.headers["x-total-count"] == "0"
    assert response.content == b""


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"PatientNme": "DOE"}, "PatientNme"),
        ({"NotAnAttribute": "1"}, "NotAnAttribute"),
        ({"Manufacturer": "GE"}, "Manufacturer"),  # a real attribute, but not searchable
        ({"includefield": "NoSuchKeyword"}, "NoSuchKeyword"),
    ],
)
def test_unknown_attribute_is_400_naming_it(client, params: dict[str, str], named: str) -> None:
    response = client.get("/dicomweb/studies", params=params)

    assert response.status_code == 400
    assert named in response.json()["message"]
    assert named in response.headers["warning"]


def test_attribute_of_a_lower_level_is_rejected_at_study_level(client) -> None:
    response = client.get(
        "/dicomweb/studies", params={"SOPInstanceUID": demo_uid("instance", 0, 0, 0)}
    )

    assert response.status_code == 400
    assert "SOPInstanceUID" in response.json()["message"]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"limit": "ten"}, "ten"),
        ({"offset": "-1"}, "-1"),
        ({"fuzzymatching": "yes"}, "yes"),
    ],
)
def test_bad_paging_and_flags_are_400(client, params: dict[str, str], named: str) -> None:
    response = client.get("/dicomweb/studies", params=params)

    assert response.status_code == 400
    assert named in response.json()["message"]
