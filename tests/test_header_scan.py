"""The header fast path (``read_instance(whole=False)``) indexes every file exactly as
pydicom's full read does: the same index values, study and series attributes,
transfer syntax and frame offsets, or the same error. Checked over pydicom's own test
files (every encoding, character sets, sequences, compressed pixel data) and over
headers built to hit each branch of the scan."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from medlake.dicom.header_scan import scan_header
from medlake.dicom.parse import read_instance
from medlake.errors import MedlakeError

HEAD = 64 << 10


def _summary(path: Path, head: bytes | None, whole: bool) -> Any:
    try:
        parsed = read_instance(path, head, whole=whole)
    except MedlakeError as exc:
        return type(exc).__name__
    frames = parsed.frame_index.to_json() if parsed.frame_index else None
    return (
        parsed.values,
        parsed.study_extra,
        parsed.series_extra,
        parsed.transfer_syntax_uid,
        frames,
    )


def _assert_same(path: Path) -> None:
    data = path.read_bytes()
    expected = _summary(path, None, whole=True)
    for head in (None, data[:HEAD], data):
        got = _summary(path, head, whole=False)
        assert got == expected, f"{path.name}, head of {len(head or b'')} bytes"


#: pydicom's bundled test files (its other test data is downloaded on demand: not here).
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


@pytest.mark.parametrize("name", sorted(p.name for p in PYDICOM_FILES.glob("*.dcm")), ids=str)
def test_pydicom_test_files_index_the_same(name: str) -> None:
    _assert_same(PYDICOM_FILES / name)


def _write(tmp_path: Path, ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax  # the data set is written in it
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P-1"
    ds.PatientName = "Doe^Jane"
    ds.Modality = "OT"
    ds.StudyDescription = "scan test"
    ds.Manufacturer = "medlake"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = 2, 2, 8, 8
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x02\x03\x04"
    return ds


def _with_sequences(undefined_wanted: bool) -> Dataset:
    ds = _dataset()
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "L", "code"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = generate_uid()
    item.ReferencedImageSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([Dataset(), inner])  # not kept: skipped
    ds.ProcedureCodeSequence = Sequence([item])  # kept at the study level
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds["ProcedureCodeSequence"].is_undefined_length = undefined_wanted
    ds.add_new(0x00091001, "LO", "private")  # a private element, skipped
    ds.add_new(0x00101001, "PN", "Other^Name")  # group 0010: kept for the study
    return ds


@pytest.mark.parametrize("undefined_wanted", [False, True], ids=["defined", "undefined"])
def test_sequences_are_skipped_or_kept_as_pydicom_reads_them(
    tmp_path: Path, undefined_wanted: bool
) -> None:
    path = _write(tmp_path, _with_sequences(undefined_wanted))
    _assert_same(path)
    parsed = read_instance(path, None, whole=False)
    assert "00081032" in parsed.study_extra  # ProcedureCodeSequence
    assert "00101001" in parsed.study_extra  # OtherPatientNames
    scanned = scan_header(path.read_bytes(), {0x00081032})  # kept: no fallback to pydicom
    assert scanned is not None
    assert scanned[0].ProcedureCodeSequence[0].CodeMeaning == "code"
    assert scanned[0].ProcedureCodeSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID


def test_a_undefined_length_sequence_that_is_not_wanted_is_walked_over(tmp_path: Path) -> None:
    path = _write(tmp_path, _with_sequences(undefined_wanted=False))
    scanned = scan_header(path.read_bytes(), {0x00100020})
    assert scanned is not None
    ds, position = scanned
    assert ds.PatientID == "P-1"
    assert path.read_bytes()[position : position + 4] == b"\xe0\x7f\x10\x00"  # Pixel Data


def test_character_sets_decode_through_pydicom(tmp_path: Path) -> None:
    ds = _dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jörg"
    ds.StudyDescription = "Schädel"
    path = _write(tmp_path, ds)
    _assert_same(path)
    assert read_instance(path, None, whole=False).values["patient_name"].startswith("Müller")


def test_other_encodings_and_bad_bytes_fall_back_to_pydicom(tmp_path: Path) -> None:
    implicit = _write(tmp_path, _dataset(), ImplicitVRLittleEndian)
    assert scan_header(implicit.read_bytes(), {0x00100020}) is None
    _assert_same(implicit)

    data = _write(tmp_path, _dataset()).read_bytes()
    no_preamble = tmp_path / "no-preamble.dcm"
    no_preamble.write_bytes(data[132:])
    assert scan_header(no_preamble.read_bytes(), {0x00100020}) is None
    _assert_same(no_preamble)

    for cut in (140, 300, len(data) - 6):
        truncated = tmp_path / f"truncated-{cut}.dcm"
        truncated.write_bytes(data[:cut])
        _assert_same(truncated)

    garbage = bytearray(data)
    at = data.index(b"LO", 200)  # the VR of some element of the data set
    garbage[at : at + 2] = b"\x00\x01"
    broken = tmp_path / "broken-vr.dcm"
    broken.write_bytes(bytes(garbage))
    assert scan_header(bytes(garbage), {0x00100020}) is None
    _assert_same(broken)


def test_a_header_longer_than_the_head_is_read_from_the_file(tmp_path: Path) -> None:
    ds = _dataset()
    ds.ImageComments = "x" * (HEAD + 100)  # LT/UT: pushes Pixel Data past the head
    ds["ImageComments"].VR = "UT"
    path = _write(tmp_path, ds)
    data = path.read_bytes()
    assert scan_header(data[:HEAD], {0x00100020}) is None
    _assert_same(path)
    assert read_instance(path, data[:HEAD], whole=False).frame_index is not None


def test_the_scan_stops_where_pydicom_stops_before_pixels(tmp_path: Path) -> None:
    path = _write(tmp_path, _dataset())
    data = path.read_bytes()
    buffer = io.BytesIO(data)
    pydicom.dcmread(buffer, stop_before_pixels=True)
    scanned = scan_header(data, {0x00100020})
    assert scanned is not None
    assert scanned[1] == buffer.tell()


def test_the_same_bytes_in_another_character_set_decode_differently(tmp_path: Path) -> None:
    # Values converted once are reused for later instances with the same raw bytes: the
    # character set is part of what makes them the same.
    latin1, utf8 = _dataset(), _dataset()
    latin1.SpecificCharacterSet, latin1.PatientName = "ISO_IR 100", "CafÃ©"
    utf8.SpecificCharacterSet, utf8.PatientName = "ISO_IR 192", "Café"
    latin1.InstitutionalDepartmentName = "CafÃ©"  # kept as a series attribute
    utf8.InstitutionalDepartmentName = "Café"
    first, second = _write(tmp_path, latin1), _write(tmp_path, utf8)
    assert b"Caf\xc3\xa9" in first.read_bytes() and b"Caf\xc3\xa9" in second.read_bytes()

    for whole in (False, True):
        a = read_instance(first, None, whole=whole)
        b = read_instance(second, None, whole=whole)
        assert a.values["patient_name"] == "CafÃ©" and b.values["patient_name"] == "Café"
        assert a.series_extra["00081040"]["Value"] == ["CafÃ©"]
        assert b.series_extra["00081040"]["Value"] == ["Café"]


def test_the_same_bytes_in_the_other_byte_order_decode_differently(tmp_path: Path) -> None:
    little, big = _dataset(), _dataset()
    little.PregnancyStatus = 4  # US, kept at the study level: bytes 04 00
    big.PregnancyStatus = 1024  # bytes 04 00 in big endian
    first = _write(tmp_path, little)
    second = _write(tmp_path, big, ExplicitVRBigEndian)

    for whole in (True, False):
        assert read_instance(first, None, whole=whole).study_extra["001021C0"]["Value"] == [4]
        assert read_instance(second, None, whole=whole).study_extra["001021C0"]["Value"] == [1024]
