"""Sample studies for the demo and the tests, made from the DICOM files that ship
inside pydicom (no download): a CT series, a multi-frame MR and compressed images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

#: (patient id, patient name, study description, date, [(template, modality, copies)])
DEMO_STUDIES = [
    ("DEMO001", "DOE^JANE", "CT CHEST", "20240105", [("CT_small.dcm", "CT", 24)]),
    ("DEMO002", "ROE^RICHARD", "MR HEAD", "20230611", [("MR_small.dcm", "MR", 8)]),
    ("DEMO003", "POE^EDGAR", "US CARDIAC", "20250302", [("examples_ybr_color.dcm", "US", 1)]),
    ("DEMO001", "DOE^JANE", "MIXED CODECS", "20221230", [
        ("JPEG2000.dcm", "CT", 1), ("MR_small_RLE.dcm", "MR", 1),
        ("SC_rgb_jpeg_dcmtk.dcm", "OT", 1), ("JPEGLSNearLossless_16.dcm", "CT", 1),
    ]),
]  # fmt: skip


def demo_uid(*parts: object) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) arc."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def write_demo_studies(folder: Path) -> list[Path]:
    """Write the demo studies as Part-10 files under ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for s, (patient_id, name, description, date, series_list) in enumerate(DEMO_STUDIES):
        study_uid = demo_uid("study", s)
        for n, (template, modality, copies) in enumerate(series_list):
            series_uid = demo_uid("series", s, n)
            source = get_testdata_file(template)
            if source is None:
                continue
            for i in range(copies):
                ds = pydicom.dcmread(source)
                ds.PatientID, ds.PatientName = patient_id, name
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.SOPInstanceUID = demo_uid("instance", s, n, i)
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.StudyDescription, ds.StudyDate, ds.Modality = description, date, modality
                ds.SeriesNumber, ds.InstanceNumber = n + 1, i + 1
                ds.AccessionNumber = f"ACC{s:04d}"
                if "ImagePositionPatient" in ds:
                    position = [float(v) for v in ds.ImagePositionPatient]
                    ds.ImagePositionPatient = [position[0], position[1], position[2] + 5.0 * i]
                path = folder / f"study{s}" / f"series{n}" / f"{i:04d}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                written.append(path)
    return written
