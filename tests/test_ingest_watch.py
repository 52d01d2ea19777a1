"""The drop zone: files landing in a watched folder are ingested within seconds and moved to
processed/ or rejected/ (or kept, or deleted); a quiet drop zone closes its batch; the same
watcher runs inside ``medlake serve`` when ``dropzone`` is set."""

from __future__ import annotations

import time
from pathlib import Path

from starlette.testclient import TestClient
from tests.ingest_files import bad_file, errors_of, instance_count, make_instances

from medlake.api import create_app
from medlake.config import Settings
from medlake.ingest.archive import Archive
from medlake.ingest.batches import list_batches
from medlake.ingest.watch import DropZoneWatcher


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_landed_files_are_ingested_and_moved(archive: Archive, tmp_path: Path) -> None:
    zone = tmp_path / "drop"
    watcher = DropZoneWatcher(archive, str(zone), interval=0, quiet_seconds=3600, workers=0)
    make_instances(zone / "study-a", 2)
    bad_file(zone, "notes.txt")

    first = watcher.scan_once()  # seen once: might still be being copied in
    second = watcher.scan_once()  # unchanged since: taken

    assert (first, second) == (0, 3)
    assert instance_count(archive) == 2
    assert _files(zone) == [
        "processed/study-a/series000/IM00000.dcm",
        "processed/study-a/series000/IM00001.dcm",
        "rejected/notes.txt",
    ]
    with archive.engine.connect() as conn:
        [batch] = list_batches(conn, kind="watch")
    assert (batch.status, batch.seen, batch.stored, batch.rejected) == ("running", 3, 2, 1)
    [error] = errors_of(archive, batch.id)
    assert error.rule == "dicom_part10" and Path(error.kept_at or "").is_file()


def test_a_growing_file_waits_until_it_stops_changing(archive: Archive, tmp_path: Path) -> None:
    zone = tmp_path / "drop"
    [done] = make_instances(tmp_path / "src", 1)
    watcher = DropZoneWatcher(archive, str(zone), interval=0, quiet_seconds=3600, workers=0)
    growing = zone / "copying.dcm"
    data = done.read_bytes()
    growing.write_bytes(data[:1000])

    watcher.scan_once()
    growing.write_bytes(data[:5000])  # still arriving
    taken_while_growing = watcher.scan_once()
    growing.write_bytes(data)
    watcher.scan_once()
    taken = watcher.scan_once()

    assert (taken_while_growing, taken) == (0, 1)
    assert instance_count(archive) == 1


def test_a_quiet_drop_zone_closes_its_batch(archive: Archive, tmp_path: Path) -> None:
    zone = tmp_path / "drop"
    watcher = DropZoneWatcher(archive, str(zone), interval=0, quiet_seconds=0, workers=0)
    make_instances(zone, 2)
    watcher.scan_once()
    watcher.scan_once()  # taken; the batch stays open while files land

    watcher.scan_once()  # nothing new, quiet long enough: reconciled and closed
    make_instances(zone / "later", 1)
    watcher.scan_once()
    watcher.scan_once()

    with archive.engine.connect() as conn:
        batches = sorted(list_batches(conn, kind="watch"), key=lambda b: b.started_at)
    assert [(b.status, b.verdict, b.stored) for b in batches] == [
        ("completed", "balanced", 2),
        ("running", None, 1),
    ]


def test_keep_and_delete(archive: Archive, tmp_path: Path) -> None:
    kept_zone, deleting_zone = tmp_path / "keep", tmp_path / "delete"
    keep = DropZoneWatcher(archive, str(kept_zone), after="keep", interval=0, workers=0,
                           quiet_seconds=3600)  # fmt: skip
    delete = DropZoneWatcher(archive, str(deleting_zone), after="delete", interval=0,
                             workers=0, quiet_seconds=3600)  # fmt: skip
    make_instances(kept_zone, 1)
    make_instances(deleting_zone, 1)
    bad_file(deleting_zone, "zero-bytes.dcm")

    for watcher in (keep, delete):
        watcher.scan_once()
        watcher.scan_once()
    taken_again = keep.scan_once()

    assert taken_again == 0  # kept in place, not taken twice
    assert _files(kept_zone) == ["series000/IM00000.dcm"]
    assert _files(deleting_zone) == ["rejected/zero-bytes.dcm"]  # rejected ones are moved
    assert instance_count(archive) == 2


def test_serve_watches_the_configured_drop_zone(settings: Settings, tmp_path: Path) -> None:
    zone = tmp_path / "drop"
    configured = settings.model_copy(
        update={"dropzone": str(zone), "dropzone_interval": 0.2, "ingest_workers": 1}
    )
    archive = Archive.open(configured)
    try:
        with TestClient(create_app(archive, background=False)) as client:
            [landed] = make_instances(zone, 1)
            uid = landed.name
            deadline = time.monotonic() + 20
            while not (zone / "processed").exists():
                assert time.monotonic() < deadline, "the drop zone was not picked up"
                time.sleep(0.1)
            found = client.get("/dicomweb/instances")
            batches = client.get("/batches", params={"kind": "watch"}).json()
    finally:
        archive.close()
    assert found.status_code == 200 and len(found.json()) == 1
    assert [b["stored"] for b in batches] == [1]
    assert (zone / "processed" / "series000" / uid).is_file()
