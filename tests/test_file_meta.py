"""The File Meta Information a C-STORE SCP writes before a received data set: the same
bytes pynetdicom's ``Event.file_meta`` + ``encode_file_meta`` produce, so an instance
stored by an earlier medlake (which used those) is recognised as the same file."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dsutils import encode_file_meta as pynetdicom_encode

from medlake.dicom.file_meta import PREAMBLE, encode_file_meta

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        (CT_IMAGE_STORAGE, "1.2.3", "1.2.840.10008.1.2.1"),  # odd UIDs: NUL padding
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.34", "1.2.840.10008.1.2"),  # even UIDs
        ("1.2", "2.25.106633050455883069920616111739343556272", "1.2.840.10008.1.2.4.50"),
        ("1.2.840.10008.5.1.4.1.1.7", "9" * 64, "1.2.840.10008.1.2.5"),  # 64 characters
    ],
)
def test_file_meta_bytes_are_pynetdicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    theirs = pynetdicom_encode(
        create_file_meta(
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        )
    )  # fmt: skip
    ours = encode_file_meta(
        sop_class, sop_instance, syntax,
        PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
    )  # fmt: skip
    assert ours == theirs


def test_file_meta_reads_back_with_pydicom() -> None:
    data_set = b"\x08\x00\x16\x00\x1a\x00\x00\x00" + CT_IMAGE_STORAGE.encode() + b"\0"
    meta = encode_file_meta(CT_IMAGE_STORAGE, "1.2.3.4", "1.2.840.10008.1.2", "1.2.3", "ML_1")

    ds = pydicom.dcmread(io.BytesIO(PREAMBLE + meta + data_set))

    assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert ds.file_meta.ImplementationClassUID == "1.2.3"
    assert ds.file_meta.ImplementationVersionName == "ML_1"
    assert ds.file_meta.FileMetaInformationGroupLength == len(meta) - 12
    assert ds.SOPClassUID == CT_IMAGE_STORAGE
