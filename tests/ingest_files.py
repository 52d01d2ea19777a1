"""Folders of files for the ingest tests: valid instances with fresh UIDs, and each kind of
bad input the pipeline must reject (corrupt, truncated, no preamble, empty, not DICOM).

Plain functions, no fixtures; shared by the tests/test_ingest_*.py modules.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from medlake.index.schema import ingest_errors, instances
from medlake.ingest.archive import Archive
from medlake.ingest.batches import Batch, IngestError, get_batch, list_errors

__all__ = [
    "BAD_INPUT",
    "Made",
    "bad_file",
    "error_count",
    "errors_of",
    "instance_count",
    "make_instances",
    "refresh",
]


def make_instances(
    folder: Path,
    count: int,
    *,
    template: str = "MR_small.dcm",
    per_series: int = 50,
    study_uid: str | None = None,
    **attributes: object,
) -> list[Path]:
    """``count`` valid Part-10 files under ``folder/seriesN/``, each with its own SOP
    Instance UID, ``per_series`` per series, all in one study."""
    source = get_testdata_file(template)
    assert source is not None
    base = pydicom.dcmread(source)
    study = study_uid or generate_uid()
    out: list[Path] = []
    series = ""
    for i in range(count):
        if i % per_series == 0:
            series = generate_uid()
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i % per_series + 1
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        target = folder / f"series{i // per_series:03d}" / f"IM{i:05d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


@dataclass(frozen=True)
class Made:
    """A bad file and the rule the pipeline must record for it."""

    path: Path
    rule: str


def _valid_bytes() -> bytes:
    source = get_testdata_file("MR_small.dcm")
    assert source is not None
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _corrupt(path: Path) -> Made:
    data = bytearray(_valid_bytes())
    data[132:400] = b"\xff" * 268  # the File Meta Information group is garbage
    path.write_bytes(bytes(data))
    return Made(path, "dicom_part10")


def _truncated(path: Path) -> Made:
    data = _valid_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut inside the pixel data
    return Made(path, "dicom_part10")


def _no_preamble(path: Path) -> Made:
    path.write_bytes(_valid_bytes()[132:])  # neither preamble nor "DICM"
    return Made(path, "dicom_part10")


def _empty(path: Path) -> Made:
    path.write_bytes(b"")
    return Made(path, "file_size")


def _not_dicom(path: Path) -> Made:
    path.write_text("patient notes, not an image\n" * 40)
    return Made(path, "dicom_part10")


#: name -> writer of one bad file; the rule is what ``ingest_errors`` must say.
BAD_INPUT: dict[str, Callable[[Path], Made]] = {
    "corrupt.dcm": _corrupt,
    "truncated.dcm": _truncated,
    "no-preamble.dcm": _no_preamble,
    "zero-bytes.dcm": _empty,
    "notes.txt": _not_dicom,
}


def bad_file(folder: Path, name: str) -> Made:
    """Write the bad file ``name`` (a key of BAD_INPUT) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return BAD_INPUT[name](folder / name)


def errors_of(archive: Archive, batch_id: str) -> list[IngestError]:
    """Every ingest_errors row of a batch."""
    with archive.engine.connect() as conn:
        return list_errors(conn, batch_id, limit=100000)


def instance_count(archive: Archive) -> int:
    """Instance rows in the index."""
    with archive.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())


def error_count(archive: Archive) -> int:
    """ingest_errors rows in the index."""
    with archive.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(ingest_errors)).scalar_one())


def refresh(archive: Archive, batch: Batch) -> Batch:
    """The batch as the index has it now."""
    with archive.engine.connect() as conn:
        return get_batch(conn, batch.id)
