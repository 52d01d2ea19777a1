"""Batches from the outside: ``medlake batches`` / ``batch show`` / ``batch resume`` and
the same over HTTP; a batch that rejects too much pauses and resumes after the fix."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from starlette.testclient import TestClient
from tests.ingest_files import bad_file, make_instances
from typer.testing import CliRunner

from medlake.cli.main import app
from medlake.config import Settings
from medlake.ingest.archive import Archive
from medlake.ingest.batches import BatchStatus
from medlake.ingest.pipeline import ingest


def _mixed_folder(folder: Path, good: int = 3) -> None:
    make_instances(folder, good)
    bad_file(folder, "notes.txt")


def test_cli_ingest_batches_and_batch_show(runner: CliRunner, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _mixed_folder(tmp_path / "src")

    ingested = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--data", str(data),
                                   "--workers", "0"])  # fmt: skip
    listed = runner.invoke(app, ["batches", "--data", str(data), "--json"])

    assert ingested.exit_code == 1, ingested.output  # a file was rejected
    assert "4 seen, 3 stored, 0 duplicate, 1 rejected" in ingested.output
    assert "notes.txt [dicom_part10]" in ingested.output
    assert "reconciliation: balanced" in ingested.output
    [batch] = orjson.loads(listed.stdout)
    assert (batch["kind"], batch["status"], batch["verdict"]) == ("ingest", "completed", "balanced")
    shown = runner.invoke(app, ["batch", "show", batch["id"], "--data", str(data)])
    as_json = runner.invoke(app, ["batch", "show", batch["id"], "--data", str(data), "--json"])
    assert shown.exit_code == 0, shown.output
    assert "dicom_part10" in shown.output and "notes.txt" in shown.output
    body = orjson.loads(as_json.stdout)
    assert (body["seen"], body["stored"], body["rejected"]) == (4, 3, 1)
    assert [e["rule"] for e in body["errors"]] == ["dicom_part10"]
    table = runner.invoke(app, ["batches", "--data", str(data)])
    assert batch["id"] in table.output and "1 batches" in table.output


def test_cli_unknown_batch_and_missing_source(runner: CliRunner, tmp_path: Path) -> None:
    data = tmp_path / "data"

    unknown = runner.invoke(app, ["batch", "show", "no-such-batch", "--data", str(data)])
    missing = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--data", str(data)])

    assert unknown.exit_code == 2 and "batch no-such-batch does not exist" in unknown.output
    assert missing.exit_code == 2 and "nope does not exist" in missing.output


def test_a_batch_that_rejects_too_much_pauses_and_resumes(
    runner: CliRunner, tmp_path: Path, db_url: str
) -> None:
    data = tmp_path / "data"
    source = tmp_path / "src"
    make_instances(source, 4, template="CT_small.dcm")
    data.mkdir()
    # Only MR is allowed, and the batch pauses after 2 files with > 50 % rejected.
    (data / "medlake.toml").write_text(
        'ingest_allowed_sop_classes = ["1.2.840.10008.5.1.4.1.1.4"]\n'
        "ingest_pause_min_files = 2\ningest_chunk_files = 2\n"
    )
    first = runner.invoke(app, ["ingest", str(source), "--data", str(data), "--workers", "0"])
    again = runner.invoke(app, ["ingest", str(source), "--data", str(data), "--workers", "0"])

    assert first.exit_code == 2, first.output
    assert "paused" in first.output and "medlake batch resume" in first.output
    assert again.exit_code == 2 and "is paused" in again.output
    listed = orjson.loads(runner.invoke(app, ["batches", "--data", str(data), "--json"]).stdout)
    [batch] = listed
    assert batch["status"] == "paused" and batch["seen"] == 2

    # The cause is fixed (CT allowed too), then the batch is resumed where it stopped.
    (data / "medlake.toml").write_text(
        'ingest_allowed_sop_classes = ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2"]\n'
        "ingest_pause_min_files = 2\ningest_chunk_files = 2\n"
    )
    resumed = runner.invoke(app, ["batch", "resume", batch["id"], "--data", str(data),
                                  "--workers", "0"])  # fmt: skip

    assert resumed.exit_code == 1, resumed.output  # the first 2 stay rejected
    done = orjson.loads(runner.invoke(app, ["batch", "show", batch["id"], "--data", str(data),
                                            "--json"]).stdout)  # fmt: skip
    assert (done["status"], done["verdict"]) == ("completed", "balanced")
    assert (done["seen"], done["stored"], done["rejected"]) == (4, 2, 2)
    again_resume = runner.invoke(app, ["batch", "resume", batch["id"], "--data", str(data)])
    assert again_resume.exit_code == 2 and "only a paused" in again_resume.output


# --- HTTP -----------------------------------------------------------------------------------


def test_http_batches_show_and_errors(client: TestClient, archive: Archive, tmp_path: Path) -> None:
    _mixed_folder(tmp_path / "src")
    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)

    listed = client.get("/batches", params={"kind": "ingest"})
    one = client.get(f"/batches/{batch.id}")
    errors = client.get(f"/batches/{batch.id}/errors")
    missing = client.get("/batches/nope")
    bad_limit = client.get("/batches", params={"limit": "many"})

    assert listed.status_code == 200 and [b["id"] for b in listed.json()] == [batch.id]
    assert one.json()["verdict"] == "balanced" and one.json()["rejected"] == 1
    [error] = errors.json()
    assert error["rule"] == "dicom_part10" and error["source"].endswith("notes.txt")
    assert missing.status_code == 404
    assert bad_limit.status_code == 400


def test_http_resume_processes_in_the_background(settings: Settings, tmp_path: Path) -> None:
    from medlake.api import create_app

    make_instances(tmp_path / "src", 4, template="CT_small.dcm")
    strict = settings.model_copy(
        update={"ingest_allowed_sop_classes": ["1.2.840.10008.5.1.4.1.1.4"],
                "ingest_pause_min_files": 2, "ingest_chunk_files": 2}
    )  # fmt: skip
    archive = Archive.open(strict)
    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)
    archive.close()
    assert batch.status == BatchStatus.PAUSED
    relaxed = Archive.open(strict.model_copy(update={"ingest_allowed_sop_classes": []}))
    try:
        with TestClient(create_app(relaxed, background=False)) as client:
            response = client.post(f"/batches/{batch.id}/resume")
            deadline = time.monotonic() + 30
            while client.get(f"/batches/{batch.id}").json()["status"] == "running":
                assert time.monotonic() < deadline, "the resumed batch did not finish"
                time.sleep(0.1)
            done = client.get(f"/batches/{batch.id}").json()
            conflict = client.post(f"/batches/{batch.id}/resume")
            recheck = client.post(f"/batches/{batch.id}/reconcile")
    finally:
        relaxed.close()
    assert response.status_code == 202 and response.json()["status"] == "running"
    assert (done["status"], done["stored"], done["rejected"]) == ("completed", 2, 2)
    assert conflict.status_code == 409
    assert recheck.json()["verdict"] == "balanced"


def test_stow_batches_are_listed(client: TestClient, samples: dict[str, Path]) -> None:
    from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers

    boundary = new_boundary()
    stored = client.post(
        "/dicomweb/studies",
        content=multipart_body([samples["CT_small.dcm"]], boundary),
        headers=stow_headers(boundary),
    )

    [batch] = client.get("/batches", params={"kind": "stow"}).json()
    assert batch["id"] == stored.headers["x-medlake-batch"]
    assert (batch["seen"], batch["stored"], batch["verdict"]) == (1, 1, "balanced")
    assert batch["source"].startswith("STOW-RS POST /dicomweb/studies")
