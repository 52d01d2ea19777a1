"""Bad input: each gets a specific 4xx with a readable reason and leaves the store as it
was — no file in the lake or staging folder, no index row, no change-feed entry."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from tests.conftest import LiveServer, StowCall
from tests.dicomweb_payloads import copy_with_uids, multipart_body, new_boundary, stow_headers
from tests.lake_inspection import LakeInspection

FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS = 0xC000, 0xA900


def failure_reasons(response) -> list[int]:
    return [i[FAILURE_REASON]["Value"][0] for i in response.json()[FAILED_SOP_SEQUENCE]["Value"]]


def message(response) -> str:
    """The reason a user reads: the JSON message of an error, else the Warning header."""
    body = response.json()
    return str(body["message"]) if "message" in body else response.headers["warning"]


def without(source: Path, target: Path, keyword: str) -> Path:
    ds = pydicom.dcmread(source)
    delattr(ds, keyword)
    ds.save_as(target, enforce_file_format=True)
    return target


# --- bodies that are not (whole) DICOM --------------------------------------------------------


def test_not_dicom_bytes(stow: StowCall, lake: LakeInspection) -> None:
    response = stow([b"hello, this is a text file and not a DICOM instance\n" * 20])

    assert response.status_code == 400
    assert failure_reasons(response) == [CANNOT_UNDERSTAND]
    assert "not a DICOM" in message(response)
    lake.assert_untouched()


def test_not_dicom_bytes_as_single_part(client, lake: LakeInspection) -> None:
    response = client.post(
        "/dicomweb/studies", content=b"\x00" * 4000, headers={"Content-Type": "application/dicom"}
    )

    assert response.status_code == 400
    assert "DICOM" in message(response)
    lake.assert_untouched()


@pytest.mark.parametrize(
    ("name", "keep"),
    [
        ("CT_small.dcm", 300),  # inside the header
        ("CT_small.dcm", 0.6),  # inside native pixel data
        ("rtdose.dcm", 0.9),  # inside native multi-frame pixel data
        ("examples_ybr_color.dcm", 0.5),  # inside encapsulated fragments
        ("JPEG2000.dcm", 0.95),  # inside the only fragment
    ],
)
def test_truncated_dicom_file(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection, name: str, keep: float
) -> None:
    data = samples[name].read_bytes()
    cut = data[: int(keep if keep > 1 else len(data) * keep)]

    response = stow([cut])

    assert response.status_code == 400, response.text
    if keep > 1:
        # Cut inside the header: what is left lacks the UIDs, and the reason says which.
        assert failure_reasons(response) in ([CANNOT_UNDERSTAND], [DOES_NOT_MATCH_SOP_CLASS])
        assert "UID" in message(response) or "unreadable" in message(response)
    else:
        assert failure_reasons(response) == [CANNOT_UNDERSTAND]
        assert "truncated" in message(response)
    lake.assert_untouched()


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_required_uid(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection, tmp_path: Path, keyword: str
) -> None:
    broken = without(samples["CT_small.dcm"], tmp_path / "broken.dcm", keyword)

    response = stow([broken])

    assert response.status_code == 400
    assert failure_reasons(response) == [DOES_NOT_MATCH_SOP_CLASS]
    assert keyword in message(response)
    lake.assert_untouched()


def test_real_file_without_study_uid(stow: StowCall, lake: LakeInspection) -> None:
    """pydicom ships JPEGLSNearLossless_16.dcm without Study/Series Instance UIDs."""
    shipped = Path(pydicom.data.get_testdata_file("JPEGLSNearLossless_16.dcm"))

    response = stow([shipped])

    assert response.status_code == 400
    assert "StudyInstanceUID" in message(response)
    lake.assert_untouched()


def test_malformed_sop_instance_uid(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection, tmp_path: Path
) -> None:
    with pytest.warns(UserWarning, match="1.2.abc"):  # pydicom warns, and writes it anyway
        bad = copy_with_uids(samples["CT_small.dcm"], tmp_path / "bad.dcm", sop_uid="1.2.abc")

    response = stow([bad])

    assert response.status_code == 400
    assert "1.2.abc" in message(response)
    lake.assert_untouched()


def test_study_in_body_not_matching_url(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection
) -> None:
    ct = samples["CT_small.dcm"]
    in_body = pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID

    response = stow([ct], study="1.2.826.0.1.3680043.10.99")

    assert response.status_code == 409
    assert failure_reasons(response) == [DOES_NOT_MATCH_SOP_CLASS]
    assert in_body in message(response)
    assert "1.2.826.0.1.3680043.10.99" in message(response)
    lake.assert_untouched()


def test_malformed_study_uid_in_url(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection
) -> None:
    response = stow([samples["CT_small.dcm"]], study="1.2.abc")

    assert response.status_code == 400
    assert "1.2.abc" in message(response)
    lake.assert_untouched()


# --- the request envelope ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/json",
        "multipart/form-data; boundary=x",
        'multipart/related; type="application/dicom+xml"; boundary=x',
    ],
)
def test_wrong_content_type_is_415(
    client, samples: dict[str, Path], lake: LakeInspection, content_type: str
) -> None:
    body = multipart_body([samples["CT_small.dcm"]], "x")

    response = client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type}
    )

    assert response.status_code == 415
    assert content_type.split(";")[0] in message(response) or "dicom+xml" in message(response)
    lake.assert_untouched()


def test_unacceptable_response_type_is_406_before_storing(
    client, samples: dict[str, Path], lake: LakeInspection
) -> None:
    boundary = new_boundary()

    response = client.post(
        "/dicomweb/studies",
        content=multipart_body([samples["CT_small.dcm"]], boundary),
        headers=stow_headers(boundary, accept="application/dicom+xml"),
    )

    assert response.status_code == 406
    assert "application/dicom+xml" in message(response)
    lake.assert_untouched()


def test_missing_content_type_is_415(
    client, samples: dict[str, Path], lake: LakeInspection
) -> None:
    response = client.post(
        "/dicomweb/studies",
        content=samples["CT_small.dcm"].read_bytes(),
        headers={"Content-Type": ""},
    )

    assert response.status_code == 415
    lake.assert_untouched()


def test_part_of_another_type_is_415(
    client, samples: dict[str, Path], lake: LakeInspection
) -> None:
    boundary = new_boundary()
    body = (
        multipart_body([samples["CT_small.dcm"]], boundary).removesuffix(
            f"--{boundary}--\r\n".encode()
        )
        + f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n".encode()
    )

    response = client.post("/dicomweb/studies", content=body, headers=stow_headers(boundary))

    assert response.status_code == 415
    assert "text/plain" in message(response)
    lake.assert_untouched()


def test_missing_boundary_is_400(client, lake: LakeInspection) -> None:
    response = client.post(
        "/dicomweb/studies",
        content=b"--x--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"'},
    )

    assert response.status_code == 400
    assert "boundary" in message(response)
    lake.assert_untouched()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"--{b}--\r\n", "no parts"),
        (b"", "incomplete"),
        (b"\r\n", "incomplete"),
    ],
)
def test_empty_multipart_is_400(client, lake: LakeInspection, body: bytes, reason: str) -> None:
    boundary = new_boundary()

    response = client.post(
        "/dicomweb/studies",
        content=body.replace(b"{b}", boundary.encode()),
        headers=stow_headers(boundary),
    )

    assert response.status_code == 400
    assert reason in message(response)
    lake.assert_untouched()


def test_empty_single_part_body_is_400(client, lake: LakeInspection) -> None:
    response = client.post(
        "/dicomweb/studies", content=b"", headers={"Content-Type": "application/dicom"}
    )

    assert response.status_code == 400
    lake.assert_untouched()


def test_body_without_closing_boundary_is_400(
    client, samples: dict[str, Path], lake: LakeInspection
) -> None:
    boundary = new_boundary()
    whole = multipart_body([samples["CT_small.dcm"], samples["MR_small.dcm"]], boundary)
    cut = whole[: -len(f"--{boundary}--\r\n") - 5000]

    response = client.post("/dicomweb/studies", content=cut, headers=stow_headers(boundary))

    assert response.status_code == 400
    assert "incomplete" in message(response)
    lake.assert_untouched()


def test_body_with_another_boundary_is_400(
    client, samples: dict[str, Path], lake: LakeInspection
) -> None:
    body = multipart_body([samples["CT_small.dcm"]], "the-real-one")

    response = client.post("/dicomweb/studies", content=body, headers=stow_headers("announced-one"))

    assert response.status_code == 400
    lake.assert_untouched()


@pytest.mark.parametrize("single_part", [False, True])
def test_body_over_the_configured_limit_is_413(
    client, samples: dict[str, Path], lake: LakeInspection, archive, single_part: bool
) -> None:
    archive.settings.max_upload_bytes = 10_000  # CT_small is 39 kB
    data = samples["CT_small.dcm"].read_bytes()
    if single_part:
        response = client.post(
            "/dicomweb/studies", content=data, headers={"Content-Type": "application/dicom"}
        )
    else:
        boundary = new_boundary()
        response = client.post(
            "/dicomweb/studies",
            content=multipart_body([data], boundary),
            headers=stow_headers(boundary),
        )

    assert response.status_code == 413
    assert "10000" in message(response)
    lake.assert_untouched()


# --- uploads cut off mid-way -------------------------------------------------------------------


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    """Poll until ``condition`` holds; a deadline only to fail instead of hanging."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def _staged_bytes(lake: LakeInspection) -> int:
    total = 0
    for path in lake.staging_files():
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            total += path.stat().st_size
    return total


def _interrupted_upload(
    server: LiveServer, lake: LakeInspection, declared: int, chunks: Iterator[bytes], staged: int
) -> None:
    """Send headers announcing ``declared`` body bytes, then ``chunks``; once the server has
    staged at least ``staged`` bytes, close the socket."""
    boundary = new_boundary()
    head = (
        "POST /dicomweb/studies HTTP/1.1\r\n"
        f"Host: {server.host}:{server.port}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
        f"Content-Length: {declared}\r\n"
        "Accept: application/dicom+json\r\n\r\n"
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
    ).encode()
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        _wait_for(lambda: _staged_bytes(lake) >= staged, f"{staged} bytes of the upload are staged")
    _wait_for(
        lambda: lake.staging_files() == [], "the staging file of the cut-off upload is removed"
    )


def _generated(total: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """``total`` bytes in chunks of one reused buffer (the test's memory stays flat)."""
    chunk = os.urandom(chunk_size)
    sent = 0
    while sent < total:
        size = min(chunk_size, total - sent)
        yield chunk if size == chunk_size else chunk[:size]
        sent += size


def test_upload_interrupted_mid_way(
    live_server: LiveServer, lake: LakeInspection, samples: dict[str, Path]
) -> None:
    _interrupted_upload(
        live_server, lake, declared=64 << 20, chunks=_generated(8 << 20), staged=4 << 20
    )

    lake.assert_untouched()
    # The server is unharmed: the next upload is stored.
    boundary = new_boundary()
    import httpx

    response = httpx.post(
        f"{live_server.dicomweb}/studies",
        content=multipart_body([samples["CT_small.dcm"]], boundary),
        headers=stow_headers(boundary),
    )
    assert response.status_code == 200, response.text
    assert len(lake.dicom_files()) == 1


def test_upload_interrupted_inside_a_dicom_part(
    live_server: LiveServer, lake: LakeInspection, samples: dict[str, Path]
) -> None:
    """The cut falls inside a valid instance: nothing of it may be stored."""
    data = samples["examples_ybr_color.dcm"].read_bytes()

    _interrupted_upload(
        live_server,
        lake,
        declared=len(data) + 1000,
        chunks=iter([data[: len(data) // 2]]),
        staged=1,
    )

    lake.assert_untouched()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_2gb_upload_interrupted(live_server: LiveServer, lake: LakeInspection) -> None:
    """2 GiB announced and almost all of it sent before the connection drops; the server's
    memory must not grow with the upload (it streams to a staging file)."""
    two_gib = 2 << 30
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    sent = two_gib - (1 << 20)
    _interrupted_upload(
        live_server,
        lake,
        declared=two_gib + 4096,
        chunks=_generated(sent),
        staged=sent - (64 << 20),
    )

    lake.assert_untouched()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < 256 << 20, f"peak memory grew by {grown >> 20} MiB during a 2 GiB upload"


# --- malformed QIDO values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"StudyDate": "20201301"}, "20201301"),
        ({"StudyDate": "20200230"}, "20200230"),
        ({"StudyDate": "2020-01-01"}, "2020"),
        ({"StudyDate": "20200102-20200101"}, "20200102-20200101"),
        ({"StudyDate": "-"}, "-"),
        ({"StudyTime": "2500"}, "2500"),
        ({"StudyTime": "120000-110000"}, "120000-110000"),
        ({"PatientBirthDate": "yesterday"}, "yesterday"),
        ({"StudyInstanceUID": "1.2.abc"}, "1.2.abc"),
        (
            {"StudyDate": "二〇二〇年"},
            "二〇二〇年",
        ),  # not latin-1: must not break the Warning header
        ({"StudyInstanceUID": "1.2.3,1.02.3"}, "1.02.3"),
    ],
)
def test_malformed_qido_values_are_400(client, params: dict[str, str], named: str) -> None:
    response = client.get("/dicomweb/studies", params=params)

    assert response.status_code == 400, response.text
    assert named in message(response)


@pytest.mark.parametrize(
    ("params", "named"),
    [({"SeriesNumber": "many"}, "many"), ({"PerformedProcedureStepStartDate": "20241-"}, "20241")],
)
def test_malformed_series_qido_values_are_400(client, params: dict[str, str], named: str) -> None:
    response = client.get("/dicomweb/series", params=params)

    assert response.status_code == 400, response.text
    assert named in message(response)


@pytest.mark.parametrize(
    "url",
    [
        "/dicomweb/studies/1.2.abc/series",
        "/dicomweb/studies/1.2.3/series/x.y/instances",
        "/dicomweb/studies/1.2.abc/metadata",
        "/dicomweb/studies/1.2.abc",
    ],
)
def test_malformed_uid_in_path_is_400(client, url: str) -> None:
    response = client.get(url)

    assert response.status_code == 400
    assert "not a valid DICOM UID" in message(response)


def test_unknown_partition_on_read_is_404(client) -> None:
    response = client.get("/dicomweb/partitions/unknown/studies")

    assert response.status_code == 404
    assert "unknown" in message(response)
