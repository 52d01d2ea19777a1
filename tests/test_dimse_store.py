"""DIMSE Verification and Storage SCP with real clients: dcmtk echoscu / storescu and
pynetdicom; bad input (malformed data sets, conflicts, unsupported SOP classes and
transfer syntaxes, an association aborted mid-transfer); TCP_NODELAY."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select
from tests.dicomweb_payloads import copy_with_uids
from tests.dimse_support import (
    MIXED_SYNTAXES,
    RunningScp,
    fresh_copy,
    output,
    run_dcmtk,
    storescu_profile,
)

from medlake.index.schema import batches, ingest_errors, instances
from medlake.ingest.batches import list_errors

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def _pynetdicom_ae(*contexts: tuple[str, list[str]], title: str = "PYSCU") -> AE:
    ae = AE(ae_title=title)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae


def _dataset_bytes(path: Path) -> bytes:
    """The data set of a Part-10 file, without preamble and File Meta Information."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _dimse_batches(scp: RunningScp) -> list[dict[str, object]]:
    with scp.archive.engine.connect() as conn:
        rows = conn.execute(
            select(batches).where(batches.c.kind == "dimse").order_by(batches.c.started_at)
        ).mappings()
        return [dict(r) for r in rows]


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_echoscu_gets_success(scp: RunningScp) -> None:
    result = run_dcmtk("echoscu", "-v", "-aec", scp.ae_title, "127.0.0.1", scp.port)

    assert result.returncode == 0, output(result)
    assert "Received Echo Response (Success)" in output(result)


def test_storescu_stores_every_transfer_syntax_as_received(
    scp: RunningScp, mixed_folder: Path, tmp_path: Path
) -> None:
    before = len(_dimse_batches(scp))

    profile = storescu_profile(mixed_folder, tmp_path / "storescu.cfg")
    result = run_dcmtk(
        "storescu",
        *profile,
        "-aet",
        "MODALITY",
        "-aec",
        scp.ae_title,
        "+sd",
        "+r",
        "-nh",
        "127.0.0.1",
        scp.port,
        str(mixed_folder),
    )

    assert result.returncode == 0, output(result)
    for name, syntax in MIXED_SYNTAXES.items():
        sent = mixed_folder / name
        ds = pydicom.dcmread(sent, stop_before_pixels=True)
        stored = scp.lake.instance_path(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        assert stored.is_file(), f"{name} was not stored"
        # storescu re-encodes what it reads, so the header is compared element by element
        # here; test_data_sets_are_stored_byte_for_byte compares bytes.
        assert _header(pydicom.dcmread(stored)) == _header(pydicom.dcmread(sent)), name
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == syntax
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # One batch for the association, counted and closed.
    new = _dimse_batches(scp)[before:]
    assert len(new) == 1
    assert new[0]["seen"] == new[0]["stored"] == len(MIXED_SYNTAXES)
    assert new[0]["status"] == "completed"
    assert "MODALITY@127.0.0.1" in str(new[0]["source"])
    assert scp.lake.staging_files() == []


def _header(ds: Dataset) -> Dataset:
    """The data set without what storescu rewrites when it sends a file: trailing
    padding, and the fragments of encapsulated pixel data."""
    for tag in (0x7FE00010, 0xFFFCFFFC):
        if tag in ds:
            del ds[tag]
    return ds


def test_data_sets_are_stored_byte_for_byte(
    scp: RunningScp, mixed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom sending the files' own bytes: the lake has exactly those bytes."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    files = [
        copy_with_uids(mixed_folder / name, tmp_path / name)  # not stored by another test
        for name in MIXED_SYNTAXES
    ]
    ae = AE(ae_title="PYSCU")
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        statuses = [assoc.send_c_store(path).Status for path in files]
    finally:
        assoc.release()

    assert statuses == [0] * len(files)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = scp.lake.instance_path(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        assert _dataset_bytes(stored) == _dataset_bytes(path), path.name


def test_same_instance_again_is_success_and_other_bytes_are_a_conflict(
    scp: RunningScp, tmp_path: Path
) -> None:
    first = fresh_copy("CT_small.dcm", tmp_path)
    ds = pydicom.dcmread(first)
    ae = _pynetdicom_ae((CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]))
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_store(first).Status == 0x0000  # identical: a no-op
        ds.PatientName = "OTHER^NAME"
        conflict = assoc.send_c_store(ds)
    finally:
        assoc.release()

    assert conflict.Status == 0x0111
    assert "already stored" in conflict.ErrorComment
    stored = scp.lake.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert pydicom.dcmread(stored).PatientName != "OTHER^NAME"


def test_the_same_instance_from_another_ae_is_a_duplicate(scp: RunningScp, tmp_path: Path) -> None:
    path = fresh_copy("CT_small.dcm", tmp_path)
    statuses = []
    for title in ("MODALITY1", "ROUTER2"):
        ae = _pynetdicom_ae((CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]), title=title)
        assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
        try:
            statuses.append(assoc.send_c_store(path).Status)
        finally:
            assoc.release()

    assert statuses == [0x0000, 0x0000]
    assert _dimse_batches(scp)[-1]["duplicates"] == 1


def test_malformed_data_set_is_refused_recorded_and_nothing_stored(
    scp: RunningScp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    good = fresh_copy("CT_small.dcm", tmp_path)
    sop_uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    broken = tmp_path / "broken.dcm"
    data = good.read_bytes()
    # Cut the file inside an element: the header is announced, the value is missing.
    broken.write_bytes(data[: len(data) // 3])
    files_before = set(scp.lake.dicom_files())
    # Send the file's bytes as they are (pynetdicom would otherwise decode and re-encode).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = _pynetdicom_ae((CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]))
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        rsp = assoc.send_c_store(broken)
    finally:
        assoc.release()

    assert rsp.Status == 0xC000  # Cannot understand
    assert set(scp.lake.dicom_files()) == files_before
    assert scp.lake.staging_files() == []
    batch = _dimse_batches(scp)[-1]
    assert batch["rejected"] == 1
    with scp.archive.engine.connect() as conn:
        errors = list_errors(conn, str(batch["id"]))
        assert conn.execute(select(instances).where(instances.c.sop_uid == sop_uid)).first() is None
    assert [e.rule for e in errors] == ["dicom_part10"]
    assert errors[0].sop_uid is None or errors[0].sop_uid == sop_uid


def test_unsupported_sop_class_and_transfer_syntax_are_refused_in_negotiation(
    scp: RunningScp, tmp_path: Path
) -> None:
    private_class = "1.2.826.0.1.3680043.9.9999.1"
    ae = _pynetdicom_ae(
        (private_class, [ExplicitVRLittleEndian]),
        (CT_IMAGE_STORAGE, ["1.2.826.0.1.3680043.9.9999.2"]),  # a private transfer syntax
        (VERIFICATION, [ExplicitVRLittleEndian]),
    )
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        results = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        echo = assoc.send_c_echo()
        ds = pydicom.dcmread(fresh_copy("CT_small.dcm", tmp_path))
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(ds)
    finally:
        assoc.release()

    assert results == {private_class: 0x03, CT_IMAGE_STORAGE: 0x04}  # PS3.8 9.3.3.2
    assert echo.Status == 0x0000  # the association itself is fine


def test_peer_abort_mid_transfer_stores_nothing_and_records_an_error(
    scp: RunningScp, tmp_path: Path
) -> None:
    big = pydicom.dcmread(fresh_copy("CT_small.dcm", tmp_path))
    big.PixelData = bytes(600_000)  # several PDUs at the server's maximum PDU size
    big.Rows, big.Columns = 600, 500
    sop_uid = str(big.SOPInstanceUID)
    big_file = tmp_path / "big.dcm"
    big.save_as(big_file, enforce_file_format=True)
    batches_before = len(_dimse_batches(scp))
    ae = _pynetdicom_ae((CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]), title="ABORTER")
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    assert assoc.is_established
    # A scripted peer: send the C-STORE request and the first fragments, then abort.
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = sop_uid
    request.Priority = 2
    request.DataSet = io.BytesIO(_dataset_bytes(big_file))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    for i, primitive in enumerate(message.encode_msg(context_id, 16384)):
        if i == 4:
            break
        assoc.dul.send_pdu(primitive)
    time.sleep(0.3)
    assoc.abort()

    _wait_for(
        lambda: (
            len(_dimse_batches(scp)) > batches_before
            and _dimse_batches(scp)[-1]["status"] != "running"
        )
    )
    batch = _dimse_batches(scp)[-1]
    assert "ABORTER" in str(batch["source"])
    assert (batch["seen"], batch["stored"]) == (1, 0)
    assert json.loads(str(batch["detail"]))["association"] == "aborted"
    with scp.archive.engine.connect() as conn:
        rows = conn.execute(
            select(ingest_errors).where(ingest_errors.c.batch_id == batch["id"])
        ).mappings()
        errors = [dict(r) for r in rows]
        assert conn.execute(select(instances).where(instances.c.sop_uid == sop_uid)).first() is None
    assert len(errors) == 1
    assert errors[0]["sop_uid"] == sop_uid
    assert "nothing was stored" in errors[0]["message"]
    assert not any(sop_uid in p.name for p in scp.lake.files())
    assert scp.lake.staging_files() == []


def test_accepted_sockets_have_nagle_off(scp: RunningScp) -> None:
    ae = _pynetdicom_ae((VERIFICATION, [ExplicitVRLittleEndian]))
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        server_side = [
            a for a in scp.server.ae.active_associations if a.requestor.ae_title == "PYSCU"
        ]
        assert server_side, "the server has no association from PYSCU"
        sock = server_side[0].dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        assoc.release()


def test_storescu_of_one_instance_with_nagle_on_the_client_is_not_delayed(
    scp: RunningScp, tmp_path: Path
) -> None:
    """With the SCU's Nagle on (Debian dcmtk's default), the SCP's TCP_NODELAY still
    avoids the delayed-ACK stall on the C-STORE-RSP. A loose bound, not a benchmark."""
    files = [fresh_copy("MR_small.dcm", tmp_path / "nagle") for _ in range(10)]
    start = time.monotonic()
    result = run_dcmtk("storescu", "-aec", scp.ae_title, "127.0.0.1", scp.port, *map(str, files))
    elapsed = time.monotonic() - start
    assert result.returncode == 0, output(result)
    assert elapsed < 5  # 10 instances; with both sides' Nagle on this is ~0.45 s more


def test_pynetdicom_dataset_is_stored(scp: RunningScp) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PY0001"
    ds.PatientName = "Py^Net"
    ds.Modality = "OT"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()

    assert rsp.Status == 0x0000
    stored = scp.lake.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert pydicom.dcmread(stored).PatientName == "Py^Net"
