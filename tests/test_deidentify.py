"""De-identification as pure functions: the PS3.15 Annex E actions on pydicom datasets,
keyed deterministic pseudonyms, and the FHIR direct-identifier rules."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from pydicom import Dataset, Sequence
from pydicom.data import get_testdata_file

from medlake.clinical.deidentify import deidentify_resource
from medlake.dicom.deidentify import PROFILE, Action, Pseudonyms, deidentify
from medlake.types import check_uid

KEY = b"k" * 32
STUDY, SERIES, SOP = "1.2.826.0.1.1", "1.2.826.0.1.1.2", "1.2.826.0.1.1.2.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN-4711"
    ds.PatientBirthDate = "19750314"
    ds.OtherPatientIDs = "OLD-123"
    ds.PatientAge = "049Y"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-98765"
    ds.StudyDate = "20240102"
    ds.InstanceCreationDate = "20240102"
    ds.StudyDescription = "CT chest doe follow-up MRN-4711"
    ds.InstitutionName = "ST MARY HOSPITAL"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SOPClassUID = CT_IMAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, SERIES, SOP
    ds.FrameOfReferenceUID = "1.2.826.0.1.9"
    reference = Dataset()
    reference.ReferencedSOPClassUID = CT_IMAGE
    reference.ReferencedSOPInstanceUID = SOP
    ds.ReferencedImageSequence = Sequence([reference])
    observer = Dataset()
    observer.VerifyingObserverName = "SMITH^JOHN"
    ds.VerifyingObserverSequence = Sequence([observer])
    # not listed in the table: caught by the conservative VR rules
    ds.add_new(0x00321032, "PN", "REQUESTER^ANN")  # RequestingPhysician (X)
    ds.add_new(0x00400009, "SH", "SPS-1")  # ScheduledProcedureStepID: kept
    ds.add_new(0x00181200, "DA", "20230101")  # DateOfLastCalibration: a date, removed
    ds.add_new(0x00091001, "LO", "private: DOE JANE")  # private
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)  # overlay data
    return ds


def test_profile_actions_remove_and_empty_the_identifiers() -> None:
    ds = deidentify(_dataset(), Pseudonyms(KEY, "default"))
    # Z: present (type 2 in most IODs), zero length
    for emptied in ("PatientName", "PatientBirthDate", "AccessionNumber", "PatientSex"):
        assert emptied in ds and not ds.data_element(emptied).value, emptied
    assert ds.PatientID not in ("", "MRN-4711") and len(ds.PatientID) == 16
    for gone in ("OtherPatientIDs", "PatientAge", "InstanceCreationDate", "RequestingPhysician"):
        assert gone not in ds, gone
    assert not ds.StudyDate and not ds.InstitutionName
    assert 0x00181200 not in ds  # an unlisted date
    assert ds.VerifyingObserverSequence[0].VerifyingObserverName == "ANONYMOUS"  # D
    assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"  # not identifying: kept
    assert ds.ScheduledProcedureStepID == "SPS-1"


def test_clean_descriptors_remove_the_patients_names_and_ids_from_descriptions() -> None:
    ds = deidentify(_dataset(), Pseudonyms(KEY, "default"))
    assert PROFILE[0x00081030] is Action.CLEAN
    assert ds.StudyDescription == "CT chest follow-up"
    # whole words only: the family name "Li" leaves "clinical" alone
    short = _dataset()
    short.PatientName, short.StudyDescription = "LI^WEI", "Li clinical trial"
    assert deidentify(short, Pseudonyms(KEY, "default")).StudyDescription == "clinical trial"


def test_private_elements_and_overlays_are_removed() -> None:
    ds = deidentify(_dataset(), Pseudonyms(KEY, "default"))
    assert not any(element.tag.is_private for element in ds)
    assert 0x60003000 not in ds


def test_the_header_says_how_it_was_de_identified() -> None:
    ds = deidentify(_dataset(), Pseudonyms(KEY, "default"))
    assert ds.PatientIdentityRemoved == "YES"
    assert "Basic Profile" in ds.DeidentificationMethod
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113105", "DCM")]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_uids_become_keyed_pseudonyms_consistent_within_the_dataset() -> None:
    pseudonyms = Pseudonyms(KEY, "default")
    ds = deidentify(_dataset(), pseudonyms)
    for keyword, original in (
        ("StudyInstanceUID", STUDY), ("SeriesInstanceUID", SERIES), ("SOPInstanceUID", SOP),
    ):  # fmt: skip
        value = str(ds.data_element(keyword).value)
        assert value.startswith("2.25.") and value != original
        check_uid(value, keyword)
        assert pseudonyms.issued[value] == ("uid", original)
    assert ds.SOPClassUID == CT_IMAGE  # a registered UID is no identifier
    # a reference to the instance names it by the same pseudonym
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == CT_IMAGE
    assert ds.FrameOfReferenceUID.startswith("2.25.")


def test_pseudonyms_are_deterministic_per_key_and_partition() -> None:
    one = Pseudonyms(KEY, "default").uid(STUDY)
    assert Pseudonyms(KEY, "default").uid(STUDY) == one
    assert Pseudonyms(b"x" * 32, "default").uid(STUDY) != one
    assert Pseudonyms(KEY, "other").uid(STUDY) != one
    assert Pseudonyms(KEY, "default").uid(SERIES) != one
    assert len(one) <= 64


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Pseudonyms(b"short", "default")


def test_a_part10_file_keeps_its_pixel_data_and_transfer_syntax() -> None:
    path = get_testdata_file("JPEG2000.dcm")
    original = pydicom.dcmread(path)
    ds = deidentify(pydicom.dcmread(path), Pseudonyms(KEY, "default"))
    out = io.BytesIO()
    ds.save_as(out)
    written = pydicom.dcmread(io.BytesIO(out.getvalue()))
    assert written.PixelData == original.PixelData
    assert written.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID
    assert written.SOPInstanceUID != original.SOPInstanceUID
    assert str(original.PatientName).encode() not in out.getvalue()


# --- FHIR -----------------------------------------------------------------------------------

PATIENT = {
    "resourceType": "Patient",
    "id": "pat-1",
    "meta": {"versionId": "1", "source": "#registration-desk-3"},
    "text": {"status": "generated", "div": "<div>Jane Doe</div>"},
    "identifier": [{"system": "urn:mrn", "value": "MRN-4711"}],
    "name": [{"family": "Doe", "given": ["Jane"]}],
    "telecom": [{"system": "phone", "value": "555-0100"}],
    "address": [{"city": "Springfield"}],
    "photo": [{"url": "http://example.org/jane.jpg"}],
    "contact": [{"name": {"family": "Doe"}}],
    "gender": "female",
    "birthDate": "1975-03-14",
    "generalPractitioner": [{"reference": "Practitioner/gp-7", "display": "Dr Who"}],
    "managingOrganization": {"reference": "http://elsewhere.example/Organization/1"},
    "contained": [{"resourceType": "RelatedPerson", "id": "rp", "name": [{"family": "Doe"}]}],
}


def test_fhir_direct_identifiers_are_removed_and_ids_pseudonymous() -> None:
    pseudonyms = Pseudonyms(KEY, "default")
    out = deidentify_resource(copy.deepcopy(PATIENT), pseudonyms, "http://medlake/fhir")
    for gone in ("identifier", "name", "telecom", "address", "photo", "contact", "text"):
        assert gone not in out, gone
    assert out["birthDate"] == "1975" and out["gender"] == "female"
    assert out["id"] == pseudonyms.resource_id("Patient", "pat-1") != "pat-1"
    assert pseudonyms.issued[out["id"]] == ("fhir:Patient", "pat-1")
    assert "source" not in out["meta"]
    gp = out["generalPractitioner"][0]
    assert gp == {"reference": f"Practitioner/{pseudonyms.resource_id('Practitioner', 'gp-7')}"}
    assert out["managingOrganization"] == {}  # another server's reference: dropped
    assert "name" not in out["contained"][0]
    text = str(out)
    for value in ("Doe", "Jane", "MRN-4711", "555-0100", "1975-03-14", "pat-1", "Dr Who"):
        assert value not in text, value


def test_fhir_imaging_study_uids_match_the_dicom_pseudonyms() -> None:
    study = {
        "resourceType": "ImagingStudy",
        "id": STUDY,
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"},
            {"type": {"text": "ACSN"}, "value": "ACC-98765"},
        ],
        "subject": {"reference": "Patient/pat-1"},
        "series": [{"uid": SERIES, "instance": [{"uid": SOP}]}],
    }
    pseudonyms = Pseudonyms(KEY, "default")
    out = deidentify_resource(study, pseudonyms)
    dicom = Pseudonyms(KEY, "default")
    assert out["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{dicom.uid(STUDY)}"}
    ]
    assert out["series"][0]["uid"] == dicom.uid(SERIES)
    assert out["series"][0]["instance"][0]["uid"] == dicom.uid(SOP)
    assert STUDY not in str(out) and "ACC-98765" not in str(out)
