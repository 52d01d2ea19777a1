"""The same instance sent again by another route (different File Meta, same data set)
is a duplicate, not a conflict; a different data set is still a conflict."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from tests.conftest import StowCall


def _with_meta(path: Path, **meta: str) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in meta.items():
        setattr(ds.file_meta, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_other_file_meta_same_data_set_is_a_duplicate(
    stow: StowCall, samples: dict[str, Path]
) -> None:
    path = samples["CT_small.dcm"]
    assert stow([path]).status_code == 200
    resent = _with_meta(
        path, SourceApplicationEntityTitle="MODALITY1", ImplementationVersionName="OTHER_1"
    )
    assert resent != path.read_bytes()
    response = stow([resent])
    assert response.status_code == 200, response.text
    assert "00081198" not in response.json()


def test_other_data_set_is_still_a_conflict(stow: StowCall, samples: dict[str, Path]) -> None:
    path = samples["CT_small.dcm"]
    assert stow([path]).status_code == 200
    ds = pydicom.dcmread(path)
    ds.PatientName = "SOMEONE^ELSE"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    response = stow([out.getvalue()])
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0x0111]
