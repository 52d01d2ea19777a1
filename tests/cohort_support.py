"""DICOM studies and FHIR resources made to order for the patient identity, ImagingStudy
and cohort tests: one CT template from pydicom, rewritten with the patient, dates,
modality and body part each test needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
HBA1C = "4548-4"
DIABETES = "44054006"
HYPERTENSION = "38341003"


def dicom_study(
    folder: Path,
    *,
    patient_id: str,
    study_date: str,
    modality: str = "CT",
    body_part: str | None = "CHEST",
    issuer: str | None = None,
    name: str = "DOE^JANE",
    sex: str = "F",
    birth_date: str = "19600101",
    description: str = "CT CHEST",
    series_count: int = 1,
    instances: int = 2,
    study_uid: str | None = None,
) -> list[Path]:
    """Part-10 files of one new study (``series_count`` series of ``instances`` each)."""
    template = get_testdata_file("CT_small.dcm")
    assert template is not None
    study_uid = study_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for s in range(series_count):
        series_uid = generate_uid()
        for i in range(instances):
            ds = pydicom.dcmread(template)
            ds.PatientID, ds.PatientName = patient_id, name
            if issuer is not None:
                ds.IssuerOfPatientID = issuer
            ds.PatientSex, ds.PatientBirthDate = sex, birth_date
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyDate, ds.StudyTime, ds.Modality = study_date, "101500", modality
            ds.StudyDescription = description
            if body_part is None:
                if "BodyPartExamined" in ds:
                    del ds.BodyPartExamined
            else:
                ds.BodyPartExamined = body_part
            ds.SeriesNumber, ds.InstanceNumber = s + 1, i + 1
            ds.AccessionNumber = f"A{study_uid[-8:]}"
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written


def study_uid_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def patient(identifier: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": identifier[0], "value": identifier[1]}],
        **extra,
    }


def condition(patient_id: str, code: str, *, system: str = SNOMED, onset: str = "2020-01-01"):
    return {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{patient_id}"},
        "code": {"coding": [{"system": system, "code": code}]},
        "onsetDateTime": onset,
    }


def observation(
    patient_id: str, code: str, value: float, unit: str, when: str, *, system: str = LOINC
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "subject": {"reference": f"Patient/{patient_id}"},
        "code": {"coding": [{"system": system, "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        },
    }
