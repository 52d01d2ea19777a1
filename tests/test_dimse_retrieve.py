"""C-MOVE and C-GET as an SCP: dcmtk movescu into a storescp the test starts, getscu,
pynetdicom as SCU; unknown move destination (0xA801), invalid identifiers (0xA900)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.dsutils import split_dataset
from tests.dimse_support import (
    RunningScp,
    StoreScp,
    fresh_copy,
    output,
    run_dcmtk,
)

from medlake.dimse.ae_registry import ApplicationEntity, add_ae, remove_ae
from medlake.dimse.contexts import STUDY_ROOT_GET, STUDY_ROOT_MOVE

SERIES_SIZE = 4


@pytest.fixture(scope="module")
def study(scp: RunningScp, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A study of two series (4 MR instances, 1 CT) stored in the SCP."""
    folder = tmp_path_factory.mktemp("study")
    study_uid = pydicom.uid.generate_uid()
    mr_series, ct_series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = [
        fresh_copy(
            "MR_small.dcm",
            folder,
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=mr_series,
            InstanceNumber=i + 1,
            PatientID="RET01",
        )
        for i in range(SERIES_SIZE)
    ] + [
        fresh_copy(
            "CT_small.dcm",
            folder,
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=ct_series,
            PatientID="RET01",
        )
    ]
    ae = AE(ae_title="LOADER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        assert [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files] == [0] * 5
    finally:
        assoc.release()
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return {"study": study_uid, "mr": mr_series, "ct": ct_series, "sops": sops}


@pytest.fixture
def destination(scp: RunningScp, storescp: StoreScp) -> StoreScp:
    """storescp registered as a C-MOVE destination of the SCP."""
    add_ae(
        scp.archive, ApplicationEntity(storescp.ae_title, "127.0.0.1", storescp.port), replace=True
    )
    return storescp


def _c_move(scp: RunningScp, destination: str, **keys: str) -> list[tuple[Dataset, object]]:
    """Every response of a Study Root C-MOVE (pynetdicom SCU) of ``keys`` to ``destination``."""
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        return list(assoc.send_c_move(identifier, destination, STUDY_ROOT_MOVE))
    finally:
        assoc.release()


def _unpadded(ds: Dataset) -> Dataset:
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    return ds


def _dataset_bytes(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_movescu_moves_a_study_into_storescp(
    scp: RunningScp, study: dict[str, object], destination: StoreScp
) -> None:
    result = run_dcmtk(
        "movescu",
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        scp.ae_title,
        "-aem",
        destination.ae_title,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study['study']}",
        "127.0.0.1",
        scp.port,
    )

    assert result.returncode == 0, output(result)
    received = destination.files()
    assert len(received) == SERIES_SIZE + 1
    # storescp rewrites what it writes (it drops trailing padding), so the data sets are
    # compared element by element; the C-GET test below compares the bytes on the wire.
    for path in received:
        ds = _unpadded(pydicom.dcmread(path))
        stored = scp.lake.instance_path(
            str(study["study"]), ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        assert ds == _unpadded(pydicom.dcmread(stored))


def test_c_move_of_a_series_reports_the_sub_operations(
    scp: RunningScp, study: dict[str, object], destination: StoreScp
) -> None:
    responses = _c_move(
        scp,
        destination.ae_title,
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=str(study["study"]),
        SeriesInstanceUID=str(study["mr"]),
    )

    final = responses[-1][0]
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == SERIES_SIZE
    assert final.NumberOfFailedSuboperations == 0
    pending = [r for r, _ in responses[:-1]]
    assert [int(r.NumberOfRemainingSuboperations) for r in pending] == [3, 2, 1, 0]
    assert len(destination.files()) == SERIES_SIZE


def test_c_move_to_an_unknown_destination_is_a801(
    scp: RunningScp, study: dict[str, object]
) -> None:
    result = run_dcmtk(
        "movescu",
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        scp.ae_title,
        "-aem",
        "NOWHERE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study['study']}",
        "127.0.0.1",
        scp.port,
    )

    assert "MoveDestinationUnknown" in output(result)
    responses = _c_move(
        scp, "NOWHERE", QueryRetrieveLevel="STUDY", StudyInstanceUID=str(study["study"])
    )
    assert responses[-1][0].Status == 0xA801


def test_c_move_to_a_destination_that_does_not_answer_fails_cleanly(
    scp: RunningScp, study: dict[str, object]
) -> None:
    from tests.dimse_support import free_port

    add_ae(scp.archive, ApplicationEntity("DOWN", "127.0.0.1", free_port()), replace=True)
    try:
        responses = _c_move(
            scp, "DOWN", QueryRetrieveLevel="STUDY", StudyInstanceUID=str(study["study"])
        )
    finally:
        remove_ae(scp.archive, "DOWN")

    assert responses[-1][0].Status == 0xA801  # pynetdicom: cannot associate with it


def test_getscu_gets_a_series(scp: RunningScp, study: dict[str, object], tmp_path: Path) -> None:
    result = run_dcmtk(
        "getscu",
        "-S",
        "-aet",
        "GETSCU",
        "-aec",
        scp.ae_title,
        "-od",
        str(tmp_path),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={study['study']}",
        "-k",
        f"SeriesInstanceUID={study['mr']}",
        "127.0.0.1",
        scp.port,
    )

    assert result.returncode == 0, output(result)
    received = sorted(p for p in tmp_path.iterdir() if p.is_file())
    assert len(received) == SERIES_SIZE
    sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received}
    assert sops <= set(study["sops"])  # type: ignore[arg-type]


def test_pynetdicom_c_get_of_single_instances(scp: RunningScp, study: dict[str, object]) -> None:
    wanted = study["sops"][:2]  # type: ignore[index]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = study["study"]
    identifier.SeriesInstanceUID = study["mr"]
    identifier.SOPInstanceUID = wanted
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        received[str(event.dataset.SOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(STUDY_ROOT_GET)
    roles = []
    for cx in StoragePresentationContexts[:100]:  # the stored syntax first: no conversion
        ae.add_requested_context(
            cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        roles.append(build_role(cx.abstract_syntax, scp_role=True))
    assoc = ae.associate(
        "127.0.0.1",
        scp.server.port,
        ae_title=scp.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        responses = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))
    finally:
        assoc.release()

    assert responses[-1][0].Status == 0x0000
    assert sorted(received) == sorted(wanted)
    for sop, data in received.items():  # sent as stored, byte for byte
        stored = scp.lake.instance_path(str(study["study"]), str(study["mr"]), sop)
        assert data == _dataset_bytes(stored)


@pytest.mark.parametrize(
    ("level", "keys"),
    [("STUDY", {}), ("SERIES", {"StudyInstanceUID": "1.2.3"}), ("IMAGE", {"SOPInstanceUID": "x"})],
    ids=["study-without-uid", "series-without-uid", "bad-sop-uid"],
)
def test_retrieve_with_an_invalid_identifier_is_a900(
    scp: RunningScp, level: str, keys: dict[str, str]
) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(STUDY_ROOT_GET)
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        responses = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))
    finally:
        assoc.release()

    assert responses[-1][0].Status == 0xA900
    assert responses[-1][0].ErrorComment


def test_retrieve_of_nothing_is_success_with_no_sub_operations(scp: RunningScp) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3.4.5.6.7.8.9"
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(STUDY_ROOT_GET)
    assoc = ae.associate("127.0.0.1", scp.server.port, ae_title=scp.ae_title)
    try:
        responses = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))
    finally:
        assoc.release()

    final = responses[-1][0]
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 0
