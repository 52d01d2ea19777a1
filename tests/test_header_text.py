"""Text read from headers into the index, as QIDO-RS returns it: values in an ISO 2022
character set (7-bit bytes with escape sequences, e.g. Japanese) are decoded with
that character set, never taken as plain ASCII."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids

PATIENT_NAME, STUDY_DESCRIPTION = "00100010", "00081030"


def test_iso_2022_japanese_text_is_decoded(stow: StowCall, client: Any, tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    study = generate_uid()
    path = copy_with_uids(
        Path(source), tmp_path / "jp.dcm", study_uid=study,
        SpecificCharacterSet=["", "ISO 2022 IR 87"],
        PatientName="Yamada^Tarou=山田^太郎",
        StudyDescription="頭部ＣＴ",
    )  # fmt: skip
    raw = path.read_bytes()
    assert b"\x1b$B" in raw  # the file really carries ISO 2022 escape sequences

    assert stow([path]).status_code == 200
    found = client.get(
        "/dicomweb/studies", params={"StudyInstanceUID": study, "includefield": "00081030"}
    ).json()

    assert found[0][STUDY_DESCRIPTION]["Value"] == ["頭部ＣＴ"]
    assert found[0][PATIENT_NAME]["Value"][0]["Alphabetic"] == "Yamada^Tarou"
    assert found[0][PATIENT_NAME]["Value"][0]["Ideographic"] == "山田^太郎"
