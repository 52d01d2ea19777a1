"""Encryption at rest of the lake: with ``encrypt_at_rest`` on, nothing a patient could be
recognised by is in clear under the lake root, whichever way it came in (STOW-RS,
C-STORE, the ingest pipeline, FHIR bulk export), while every read (WADO-RS instances,
frames, rendered, metadata, WADO-URI, bulk data files) returns the plaintext; key
rotation keeps it readable; a wrong key file is refused at start-up."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from starlette.testclient import TestClient
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids, read_multipart
from tests.dimse_support import output, run_dcmtk
from typer.testing import CliRunner

from medlake.cli.main import app as cli
from medlake.config import Settings, load_settings
from medlake.dimse.scp import DimseServer
from medlake.ingest.archive import Archive
from medlake.ingest.pipeline import ingest
from medlake.security.envelope import HEADER_SIZE, MAGIC, LocalKeyFileProvider, parse_header
from medlake.security.errors import KeyUnavailable
from medlake.security.lake_encryption import decrypt_blob, decrypt_file, key_check_key
from medlake.storage import open_blob_store
from medlake.storage.encrypted import EncryptedBlobStore

runner = CliRunner()

#: What would identify the demo patients, the CSV patients and the FHIR patient.
PHI = [
    b"DOE^JANE", b"ROE^RICHARD", b"POE^EDGAR", b"DEMO001", b"DEMO002", b"DEMO003",
    b"CSVPATIENT-0001", b"CSVPATIENT-0002", b"Zebrafamily", b"MRN-ZEBRA-42",
]  # fmt: skip
LABS = (
    "patient_id,patient_name,test,value\n"
    "CSVPATIENT-0001,Zebrafamily,HB,13.1\nCSVPATIENT-0002,Zebrafamily,CRP,4\n"
)
KICKOFF = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}
OCTET_PARTS = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """The suite's archive, with encryption on: the options in {data}/medlake.toml (so
    the CLI sees the same archive) and a key file made by `medlake keys create`."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "medlake.toml").write_text(
        f'database_url = "{db_url}"\nencrypt_at_rest = true\ninsecure_no_auth = true\n'
    )
    created = runner.invoke(cli, ["keys", "create", "--data", str(data)])
    assert created.exit_code == 0, created.output
    return load_settings(data=data)


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def instance_url(path: Path) -> str:
    study, series, sop = uids(path)
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


def big_native_multiframe(folder: Path) -> Path:
    """RT Dose with 15 frames of 128x128 random 32-bit pixels (~1 MiB): its frames
    straddle the 64 KiB segments of the encryption."""
    source = get_testdata_file("rtdose.dcm")
    assert source is not None
    path = copy_with_uids(Path(source), folder / "big-rtdose.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 128
    ds.PatientName, ds.PatientID = "DOE^JANE", "DEMO001"
    ds.PixelData = os.urandom(15 * 128 * 128 * ds.BitsAllocated // 8)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Loaded:
    """What went into the encrypted lake, and by which route."""

    stowed: list[Path]
    c_stored: list[Path]
    ingested: list[Path]
    big: Path
    export_files: list[str]


def _export(client: TestClient) -> list[str]:
    patient = {
        "resourceType": "Patient",
        "id": "z1",
        "identifier": [{"system": "urn:mrn", "value": "MRN-ZEBRA-42"}],
        "name": [{"family": "Zebrafamily"}],
    }
    put = client.put("/fhir/Patient/z1", content=json.dumps(patient), headers=FHIR_JSON)
    assert put.status_code in (200, 201), put.text
    kicked = client.get("/fhir/$export", headers=KICKOFF)
    assert kicked.status_code == 202, kicked.text
    location = kicked.headers["content-location"]
    for _ in range(600):
        status = client.get(location, headers={"Accept": "application/json"})
        if status.status_code != 202:
            break
        time.sleep(0.05)
    assert status.status_code == 200, status.text
    return [item["url"] for item in status.json()["output"]]


@pytest.fixture
def loaded(
    archive: Archive,
    client: TestClient,
    stow: StowCall,
    demo_files: list[Path],
    tmp_path: Path,
) -> Iterator[Loaded]:
    """The demo studies through STOW-RS (CT CHEST, MIXED CODECS, plus a big multi-frame),
    C-STORE with dcmtk's storescu (MR HEAD) and the ingest pipeline (US CARDIAC and a
    CSV of labs), and a FHIR $export of one patient."""
    by_study: dict[str, list[Path]] = {}
    for path in demo_files:
        by_study.setdefault(path.parent.parent.name, []).append(path)
    big = big_native_multiframe(tmp_path)
    stowed = [*by_study["study0"], *by_study["study3"], big]
    assert stow(stowed).status_code == 200

    with DimseServer(archive, host="127.0.0.1", port=0) as scp:
        sent = run_dcmtk(
            "storescu", "-aet", "MODALITY", "-aec", scp.ae_title, "127.0.0.1", str(scp.port),
            *map(str, by_study["study1"]),
        )  # fmt: skip
    assert sent.returncode == 0, output(sent)

    drop = tmp_path / "drop"
    drop.mkdir()
    ingested = []
    for path in by_study["study2"]:
        ingested.append(drop / path.name)
        ingested[-1].write_bytes(path.read_bytes())
    (drop / "labs.csv").write_text(LABS)
    batch = ingest(archive, str(drop), "default", workers=1)
    assert (batch.stored, batch.rejected) == (2, 0)

    # Series metadata files are written on first request (no refresher thread here).
    for study in sorted({uids(p)[0] for p in [*stowed, *by_study["study1"], *ingested[:1]]}):
        assert client.get(f"/dicomweb/studies/{study}/metadata").status_code == 200
    yield Loaded(stowed, by_study["study1"], ingested, big, _export(client))


def lake_files(archive: Archive) -> list[Path]:
    root = Path(archive.blobs.root)
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_patient_data_is_in_clear_anywhere_in_the_lake(archive: Archive, loaded: Loaded) -> None:
    files = lake_files(archive)
    kinds = {p.name.rsplit(".", 1)[-1] for p in files}

    assert len(files) >= 40
    assert {"dcm", "gz", "csv", "ndjson"} <= kinds  # instances, metadata, CSV, export
    for path in files:
        data = path.read_bytes()
        assert data.startswith(MAGIC), f"{path} is not encrypted"
        found = [name for name in PHI if name in data]
        assert not found, f"{path} holds {found} in clear"
    assert (Path(archive.blobs.root) / key_check_key("default")).is_file()


def test_every_read_returns_the_plaintext(
    archive: Archive, client: TestClient, loaded: Loaded
) -> None:
    ct = loaded.stowed[0]
    whole = client.get(instance_url(ct), headers={"Accept": "application/dicom"})
    assert whole.status_code == 200
    assert whole.content == ct.read_bytes()  # byte for byte as received
    us = loaded.ingested[0]
    parts = client.get(
        "/dicomweb/studies/" + uids(us)[0],
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert [body for _, body in read_multipart(parts.headers["content-type"], parts.content)] == [
        us.read_bytes()
    ]

    # Native frames at plaintext offsets, across the 64 KiB encryption segments.
    big = pydicom.dcmread(loaded.big)
    size = 128 * 128 * big.BitsAllocated // 8
    frames = client.get(
        f"{instance_url(loaded.big)}/frames/1,7,15", headers={"Accept": OCTET_PARTS}
    )
    assert [body for _, body in read_multipart(frames.headers["content-type"], frames.content)] == [
        big.PixelData[n * size : (n + 1) * size] for n in (0, 6, 14)
    ]
    # Encapsulated frames (30 baseline JPEG frames of the ingested US).
    ybr = pydicom.dcmread(us)
    expected = list(generate_frames(ybr.PixelData, number_of_frames=30))
    jpeg = client.get(f"{instance_url(us)}/frames/2,30", headers={"Accept": OCTET_PARTS})
    assert [body for _, body in read_multipart(jpeg.headers["content-type"], jpeg.content)] == [
        expected[1],
        expected[29],
    ]
    # Native frame of an instance stored by C-STORE.
    mr = pydicom.dcmread(loaded.c_stored[0])
    frame = client.get(
        f"{instance_url(loaded.c_stored[0])}/frames/1", headers={"Accept": OCTET_PARTS}
    )
    assert read_multipart(frame.headers["content-type"], frame.content)[0][1] == mr.PixelData

    rendered = client.get(f"{instance_url(ct)}/rendered", headers={"Accept": "image/png"})
    assert rendered.status_code == 200
    assert Image.open(io.BytesIO(rendered.content)).size == (128, 128)

    metadata = client.get(f"/dicomweb/studies/{uids(loaded.c_stored[0])[0]}/metadata")
    assert metadata.status_code == 200
    assert {d["00100010"]["Value"][0]["Alphabetic"] for d in metadata.json()} == {"ROE^RICHARD"}

    study, series, sop = uids(ct)
    wado = client.get(
        "/dicomweb/wado",
        params={"requestType": "WADO", "studyUID": study, "seriesUID": series,
                "objectUID": sop, "contentType": "application/dicom"},
    )  # fmt: skip
    assert wado.content == ct.read_bytes()

    [url] = loaded.export_files
    exported = client.get(url, headers={"Accept": "application/fhir+ndjson"})
    assert json.loads(exported.text)["name"] == [{"family": "Zebrafamily"}]


def _kek_ids(archive: Archive) -> set[str]:
    return {parse_header(p.read_bytes()[:HEADER_SIZE]).kek_id for p in lake_files(archive)}


def test_rotation_rewraps_every_blob_and_reads_still_work(
    archive: Archive, client: TestClient, loaded: Loaded, tmp_path: Path
) -> None:
    data = str(archive.settings.data)
    key_file = archive.settings.resolved_encryption_key_file
    [first] = _kek_ids(archive)
    before = {p: p.read_bytes()[HEADER_SIZE:] for p in lake_files(archive)}

    rotated = runner.invoke(cli, ["keys", "rotate", "--data", data])
    assert rotated.exit_code == 0, rotated.output
    listed = runner.invoke(cli, ["keys", "list", "--data", data])
    [second] = _kek_ids(archive)

    assert second != first
    assert f"{second}  (current)" in listed.output and first in listed.output
    # Only the headers changed: the encrypted data is as it was.
    assert {p: p.read_bytes()[HEADER_SIZE:] for p in lake_files(archive)} == before
    ct = loaded.stowed[0]
    # The running server follows the key file by itself.
    assert client.get(instance_url(ct), headers={"Accept": "application/dicom"}).content == (
        ct.read_bytes()
    )

    retired = runner.invoke(cli, ["keys", "retire", "--data", data])
    assert retired.exit_code == 0, retired.output
    assert json.loads(key_file.read_text())["keys"].keys() == {second}
    # A blob written now is wrapped by the new key; a new process reads everything.
    assert client.get(f"{instance_url(loaded.big)}/frames/3").status_code == 200
    reopened = Archive.open(archive.settings)
    try:
        study, series, sop = uids(loaded.big)
        key = reopened.layout.instance_key("default", study, series, sop)
        assert reopened.blobs.read_bytes(key) == loaded.big.read_bytes()
    finally:
        reopened.close()

    # Outside the server: `medlake lake decrypt` and the Python function.
    stored = Path(archive.blobs.root) / key
    out = tmp_path / "plain.dcm"
    decrypted = runner.invoke(
        cli, ["lake", "decrypt", str(stored), "--out", str(out), "--data", data]
    )
    assert decrypted.exit_code == 0, decrypted.output
    assert out.read_bytes() == loaded.big.read_bytes()
    assert decrypt_blob(stored.read_bytes(), key_file) == loaded.big.read_bytes()
    tree = tmp_path / "tree"
    whole = runner.invoke(
        cli, ["lake", "decrypt", archive.blobs.root, "--out", str(tree), "--data", data]
    )
    assert whole.exit_code == 0, whole.output
    assert (tree / key).read_bytes() == loaded.big.read_bytes()


def test_a_wrong_or_missing_key_file_is_refused_at_start_up(
    archive: Archive, settings: Settings, tmp_path: Path
) -> None:
    other = tmp_path / "other-kek.json"
    LocalKeyFileProvider.create(other)
    [kek] = json.loads(settings.resolved_encryption_key_file.read_text())["keys"]

    with pytest.raises(KeyUnavailable) as wrong:
        Archive.open(settings.model_copy(update={"encryption_key_file": other}))
    with pytest.raises(KeyUnavailable) as missing:
        Archive.open(settings.model_copy(update={"encryption_key_file": tmp_path / "nope.json"}))
    with pytest.raises(KeyUnavailable) as off:
        Archive.open(settings.model_copy(update={"encrypt_at_rest": False}))
    # The same key id with other bytes (a key file restored from the wrong backup).
    document = json.loads(other.read_text())
    document = {"current": kek, "keys": {kek: next(iter(document["keys"].values()))}}
    other.write_text(json.dumps(document))
    with pytest.raises(KeyUnavailable) as same_id:
        Archive.open(settings.model_copy(update={"encryption_key_file": other}))

    assert f"encrypted with key {kek!r}" in wrong.value.message
    assert str(other) in wrong.value.message
    assert "medlake keys create" in missing.value.message
    assert "encrypt_at_rest is off" in off.value.message
    assert "is not the key the lake" in same_id.value.message
    served = runner.invoke(
        cli, ["serve", "--data", str(settings.data), "--http-port", "0", "--dimse-port", "0"],
        env={"MEDLAKE_ENCRYPTION_KEY_FILE": str(other)},
    )  # fmt: skip
    assert served.exit_code == 1
    assert "is not the key the lake" in " ".join(served.output.split())  # rich wraps lines


@pytest.mark.parametrize("url", ["local", "memory"])
def test_the_encrypted_store_reads_ranges_and_seeks_like_a_plain_file(
    url: str, tmp_path: Path, settings: Settings
) -> None:
    """Any backend: range reads and seeks at segment edges, sizes, and blobs written
    before encryption was on (read as they are)."""
    from medlake.security.lake_encryption import open_encrypted_lake

    root = str(tmp_path / "lake") if url == "local" else f"memory://enc-{tmp_path.name}"
    inner = open_blob_store(root, fsync=False)
    inner.put_bytes("old/plain.bin", b"written before encryption")
    store = open_encrypted_lake(inner, settings.resolved_encryption_key_file, "default")
    assert isinstance(store, EncryptedBlobStore)
    data = os.urandom(3 * 65536 + 1000)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    store.put_file("a/blob.bin", source)

    assert not source.exists()  # consumed, as by every backend
    assert inner.read_bytes("a/blob.bin")[: len(MAGIC)] == MAGIC
    assert store.size("a/blob.bin") == len(data)
    for offset, length in [(0, 10), (65530, 20), (65536, 65536), (len(data) - 5, 50), (10**7, 5)]:
        assert store.read_range("a/blob.bin", offset, length) == data[offset : offset + length]
    with store.open("a/blob.bin") as fh:
        fh.seek(131070)
        assert fh.read(10) == data[131070:131080]
        fh.seek(-3, io.SEEK_END)
        assert fh.read() == data[-3:]
        fh.seek(0)
        assert fh.read() == data
    assert store.read_bytes("old/plain.bin") == b"written before encryption"
    assert store.read_range("old/plain.bin", 8, 6) == b"before"
    assert store.size("old/plain.bin") == len(b"written before encryption")
    assert store.local_path("a/blob.bin") is None  # no zero-copy of ciphertext
    if url == "local":
        copy = tmp_path / "out.bin"
        assert decrypt_file(
            Path(inner.root) / "a/blob.bin", copy, settings.resolved_encryption_key_file
        )
        assert copy.read_bytes() == data
