"""The validation rules: each rule on its own (the function other receivers call), their
configuration, and the same rules applied to STOW-RS and to a bulk ingest, with the
error table and a batch per STOW request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids, multipart_body, new_boundary, stow_headers
from tests.ingest_files import bad_file, errors_of, make_instances
from tests.lake_inspection import LakeInspection

from medlake.api import create_app
from medlake.config import Settings
from medlake.dicom.parse import read_instance
from medlake.errors import InvalidDicom, InvalidInput, MissingAttribute, SopClassNotAllowed
from medlake.ingest.archive import Archive
from medlake.ingest.batches import get_batch, list_batches
from medlake.ingest.pipeline import ingest
from medlake.ingest.validation import (
    RULES,
    RuleConfig,
    Severity,
    findings_for_error,
    rejection,
    validate_instance,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
FAILED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081197"


def rules(**settings: object) -> RuleConfig:
    return RuleConfig.from_settings(Settings(**settings))  # type: ignore[arg-type]


# --- the rules as a function (what the DIMSE gateway calls) ----------------------------------


def test_a_good_instance_has_no_findings(samples: dict[str, Path]) -> None:
    parsed = read_instance(samples["CT_small.dcm"])

    assert validate_instance(parsed, rules()) == []


def test_missing_patient_id_warns_by_default_and_rejects_when_configured(
    samples: dict[str, Path],
) -> None:
    parsed = read_instance(samples["JPEGLSNearLossless_16.dcm"])  # has no PatientID

    [warned] = validate_instance(parsed, rules())
    [refused] = validate_instance(parsed, rules(ingest_rules={"patient_id": "reject"}))
    ignored = validate_instance(parsed, rules(ingest_rules={"patient_id": "ignore"}))

    assert (warned.rule, warned.severity) == ("patient_id", Severity.WARN)
    assert rejection([warned]) is None
    assert refused.severity is Severity.REJECT
    error = rejection([refused])
    assert error is not None and "PatientID" in error.message and error.rule == "patient_id"
    assert ignored == []


def test_sop_class_allow_list(samples: dict[str, Path]) -> None:
    parsed = read_instance(samples["CT_small.dcm"])

    only_mr = validate_instance(parsed, rules(ingest_allowed_sop_classes=[MR_IMAGE]))
    ct_too = validate_instance(parsed, rules(ingest_allowed_sop_classes=[MR_IMAGE, CT_IMAGE]))

    [finding] = only_mr
    error = rejection(only_mr)
    assert finding.rule == "sop_class" and CT_IMAGE in finding.message
    assert isinstance(error, SopClassNotAllowed) and error.dicom_reason == 0x0122
    assert ct_too == []


def test_transfer_syntax_list(samples: dict[str, Path]) -> None:
    parsed = read_instance(samples["JPEG2000.dcm"])

    [finding] = validate_instance(parsed, rules(ingest_transfer_syntaxes=["1.2.840.10008.1.2.1"]))
    default = validate_instance(parsed, rules())

    assert finding.rule == "transfer_syntax" and "1.2.840.10008.1.2.4.91" in finding.message
    assert default == []


def test_findings_for_files_that_do_not_parse() -> None:
    config = rules()

    [empty] = findings_for_error(InvalidDicom("not a DICOM Part 10 file"), 0, config)
    [garbage] = findings_for_error(InvalidDicom("not a DICOM Part 10 file"), 10, config)
    [uids] = findings_for_error(MissingAttribute("SOPInstanceUID is missing"), 10, config)
    both = findings_for_error(InvalidDicom("x"), 0, rules(ingest_rules={"file_size": "warn"}))

    assert (empty.rule, garbage.rule, uids.rule) == ("file_size", "dicom_part10", "required_uids")
    assert [(f.rule, f.severity) for f in both] == [
        ("file_size", Severity.WARN),
        ("dicom_part10", Severity.REJECT),
    ]


def test_rule_configuration_is_checked() -> None:
    with pytest.raises(InvalidInput, match="unknown rule 'patient_name'"):
        rules(ingest_rules={"patient_name": "reject"})
    with pytest.raises(InvalidInput, match="required_uids cannot be set to warn"):
        rules(ingest_rules={"required_uids": "warn"})
    assert set(RULES) == {
        "file_size", "dicom_part10", "required_uids", "patient_id", "transfer_syntax",
        "sop_class", "clinical_schema",
    }  # fmt: skip


def test_rules_come_from_medlake_toml(tmp_path: Path) -> None:
    from medlake.config import load_settings

    data = tmp_path / "data"
    data.mkdir()
    (data / "medlake.toml").write_text('[ingest_rules]\npatient_id = "reject"\n')

    config = RuleConfig.from_settings(load_settings(data=data))

    assert config.severity("patient_id") is Severity.REJECT
    assert config.severity("sop_class") is Severity.REJECT


# --- STOW-RS goes through the same rules and error table -------------------------------------


@pytest.fixture
def strict(settings: Settings) -> Iterator[tuple[TestClient, Archive]]:
    """A server that rejects instances without PatientID and allows only MR images."""
    archive = Archive.open(
        settings.model_copy(
            update={"ingest_rules": {"patient_id": "reject"},
                    "ingest_allowed_sop_classes": [MR_IMAGE, "1.2.840.10008.5.1.4.1.1.7"]}
        )
    )  # fmt: skip
    app: FastAPI = create_app(archive, background=False)
    with TestClient(app) as client:
        yield client, archive
    archive.close()


def _stow(client: TestClient, files: list[Path]) -> object:
    boundary = new_boundary()
    return client.post(
        "/dicomweb/studies", content=multipart_body(files, boundary), headers=stow_headers(boundary)
    )


def test_stow_applies_the_configured_rules(
    strict: tuple[TestClient, Archive], samples: dict[str, Path]
) -> None:
    client, archive = strict
    files = [samples["CT_small.dcm"], samples["MR_small.dcm"], samples["JPEGLSNearLossless_16.dcm"]]

    response = _stow(client, files)

    assert response.status_code == 202  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    reasons = sorted(i[FAILURE_REASON]["Value"][0] for i in body[FAILED_SOP_SEQUENCE]["Value"])
    assert reasons == [0x0122, 0xA900]  # CT not in the allowed list; PatientID missing
    batch_id = response.headers["x-medlake-batch"]  # type: ignore[attr-defined]
    with archive.engine.connect() as conn:
        batch = get_batch(conn, batch_id)
    assert (batch.kind, batch.seen, batch.stored, batch.rejected) == ("stow", 3, 1, 2)
    assert (batch.status, batch.verdict) == ("completed", "balanced")
    rows = {e.rule: e for e in errors_of(archive, batch_id)}
    assert set(rows) == {"sop_class", "patient_id"}
    assert rows["sop_class"].source == "part 1" and rows["patient_id"].source == "part 3"
    assert all(e.severity == "reject" for e in rows.values())
    # Rejected files are kept aside, byte for byte.
    kept = Path(rows["sop_class"].kept_at or "")
    assert kept.read_bytes() == samples["CT_small.dcm"].read_bytes()


def test_each_stow_request_is_a_batch_with_its_warnings(
    stow: StowCall, archive: Archive, samples: dict[str, Path], lake: LakeInspection
) -> None:
    first = stow([samples["JPEGLSNearLossless_16.dcm"]])  # stored, with a patient_id warning
    second = stow([samples["CT_small.dcm"], samples["CT_small.dcm"]])

    assert first.status_code == second.status_code == 200
    with archive.engine.connect() as conn:
        stow_batches = list_batches(conn, kind="stow")
    by_id = {b.id: b for b in stow_batches}
    one = by_id[first.headers["x-medlake-batch"]]
    two = by_id[second.headers["x-medlake-batch"]]
    assert (one.seen, one.stored, one.rejected) == (1, 1, 0)
    assert (two.seen, two.stored, two.duplicates) == (2, 1, 1)
    [warning] = errors_of(archive, one.id)
    assert (warning.rule, warning.severity) == ("patient_id", "warn")
    assert warning.kept_at is None  # stored, not set aside
    assert errors_of(archive, two.id) == []
    assert lake.staging_files() == []


def test_a_rejected_stow_part_changes_nothing_but_the_error_table(
    stow: StowCall, archive: Archive, lake: LakeInspection, tmp_path: Path
) -> None:
    made = bad_file(tmp_path, "truncated.dcm")

    response = stow([made.path.read_bytes()])

    assert response.status_code == 400
    lake.assert_untouched()
    [error] = errors_of(archive, response.headers["x-medlake-batch"])
    assert error.rule == "dicom_part10" and error.severity == "reject"


def test_bulk_ingest_uses_the_same_rules(settings: Settings, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 3, template="CT_small.dcm")
    copy_with_uids(Path(str(make_instances(tmp_path / "mr", 1)[0])), tmp_path / "src" / "mr.dcm")
    archive = Archive.open(settings.model_copy(update={"ingest_allowed_sop_classes": [MR_IMAGE]}))
    try:
        batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)
        errors = errors_of(archive, batch.id)
    finally:
        archive.close()
    assert (batch.seen, batch.stored, batch.rejected, batch.verdict) == (4, 1, 3, "balanced")
    assert {e.rule for e in errors} == {"sop_class"}
    assert all(Path(e.kept_at or "").is_file() for e in errors)
