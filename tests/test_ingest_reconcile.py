"""Reconciliation: a batch against its counts, the index and the lake; a whole partition
against the lake (``medlake reconcile``, ``GET /reconciliation``)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import update
from starlette.testclient import TestClient
from tests.ingest_files import make_instances
from tests.lake_inspection import LakeInspection
from typer.testing import CliRunner

from medlake.cli.main import app
from medlake.config import Settings
from medlake.index.schema import series
from medlake.ingest.archive import Archive
from medlake.ingest.pipeline import ingest
from medlake.ingest.reconcile import reconcile_batch, reconcile_partition


def test_a_clean_ingest_reconciles(archive: Archive, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 12, per_series=5)
    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)

    again = reconcile_batch(archive, batch.id)
    partition = reconcile_partition(archive, "default")

    assert again.balanced, again.differences
    assert again.figures["instance_rows"] == again.figures["lake_files"] == 12
    assert partition.balanced and partition.lake_files == partition.instance_rows == 12


def test_a_file_missing_from_the_lake_is_a_difference(
    archive: Archive, lake: LakeInspection, tmp_path: Path
) -> None:
    make_instances(tmp_path / "src", 3)
    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)
    gone = lake.dicom_files()[0]
    gone.unlink()

    result = reconcile_batch(archive, batch.id)
    partition = reconcile_partition(archive, "default")

    [difference] = result.differences
    assert "1 stored files are not in the lake" in difference and gone.stem in difference
    assert partition.rows_without_file == [str(gone.relative_to(lake.root))]
    assert not partition.balanced


def test_orphan_files_are_found(archive: Archive, lake: LakeInspection, tmp_path: Path) -> None:
    [one] = make_instances(tmp_path / "src", 1)
    ingest(archive, str(one), "default", workers=0)
    orphan = lake.dicom_root / "default" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(one.read_bytes())

    result = reconcile_partition(archive, "default")

    assert result.files_without_row == [str(orphan.relative_to(lake.root))]
    assert result.rows_without_file == []


def test_inconsistent_hierarchy_fails_the_batch(archive: Archive, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 4)
    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)
    with archive.engine.begin() as conn:
        conn.execute(update(series).values(num_instances=99))

    result = reconcile_batch(archive, batch.id)

    assert any("records 99 instances but has 4" in d for d in result.differences)


def test_stow_batches_reconcile(stow, archive: Archive, samples: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    response = stow([samples["CT_small.dcm"], samples["MR_small.dcm"]])

    result = reconcile_batch(archive, response.headers["x-medlake-batch"])

    assert result.balanced and result.figures["instance_rows"] == 2


def test_cli_reconcile(runner: CliRunner, tmp_path: Path, db_url: str) -> None:
    data = tmp_path / "data"
    make_instances(tmp_path / "src", 3)
    runner.invoke(app, ["ingest", str(tmp_path / "src"), "--data", str(data), "--workers", "0"])

    clean = runner.invoke(app, ["reconcile", "--data", str(data)])
    archive = Archive.open(Settings(data=data, database_url=db_url))
    try:
        LakeInspection(archive).dicom_files()[0].unlink()
    finally:
        archive.close()
    broken = runner.invoke(app, ["reconcile", "--data", str(data)])
    unknown = runner.invoke(app, ["reconcile", "--data", str(data), "--partition", "nope"])

    assert clean.exit_code == 0, clean.output
    assert "3 instance rows, 3 flat rows, 3 files in the lake" in clean.output
    assert "balanced" in clean.output
    assert broken.exit_code == 1 and "row without file" in broken.output
    assert unknown.exit_code == 2 and "partition nope does not exist" in unknown.output


def test_http_reconciliation(client: TestClient, archive: Archive, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 2)
    ingest(archive, str(tmp_path / "src"), "default", workers=0)

    response = client.get("/reconciliation", params={"partition": "default"})
    missing = client.get("/reconciliation", params={"partition": "nope"})

    assert response.status_code == 200
    assert response.json()["verdict"] == "balanced" and response.json()["lakeFiles"] == 2
    assert missing.status_code == 404
