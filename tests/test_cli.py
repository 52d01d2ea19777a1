"""The ``medlake`` command line: --version, ingest, ls (index on SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.lake_inspection import LakeInspection
from typer.testing import CliRunner

from medlake import __version__
from medlake.cli.main import _LAZY_COMMANDS, app, lazy_group
from medlake.config import Settings
from medlake.ingest.archive import Archive


@pytest.fixture
def inspect(data: Path, db_url: str) -> Iterator[Callable[[], LakeInspection]]:
    """``inspect()``: open the archive the commands wrote to (after they ran) and look at it."""
    opened: list[Archive] = []

    def open_lake() -> LakeInspection:
        opened.append(Archive.open(Settings(data=data, database_url=db_url)))
        return LakeInspection(opened[-1])

    yield open_lake
    for archive in opened:
        archive.close()


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])

    assert result.exit_code == 0
    assert result.output.strip() == f"medlake {__version__}"


def test_installed_entry_point_prints_the_version() -> None:
    script = Path(sys.executable).with_name("medlake")

    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


def test_ingest_then_ls(
    runner: CliRunner, data: Path, demo_files: list[Path], inspect: Callable[[], LakeInspection]
) -> None:
    folder = demo_files[0].parents[2]
    before = {p: p.read_bytes() for p in demo_files}

    ingested = runner.invoke(app, ["ingest", str(folder), "--data", str(data)])
    listed = runner.invoke(app, ["ls", "--data", str(data)])

    assert ingested.exit_code == 0, ingested.output
    assert "37 seen, 37 stored, 0 duplicate, 0 rejected" in ingested.output
    assert "reconciliation: balanced" in ingested.output
    assert listed.exit_code == 0, listed.output
    assert "4 studies" in listed.output
    for text in ("DEMO001", "DOE^JANE", "ROE^RICHARD", "POE^EDGAR", "CT\\MR\\OT"):
        assert text in listed.output
    # Sources are untouched, and the lake holds byte-identical copies.
    assert {p: p.read_bytes() for p in demo_files} == before
    assert sorted(p.read_bytes() for p in inspect().dicom_files()) == sorted(before.values())
    assert inspect().staging_files() == []


def test_ingest_twice_is_idempotent(runner: CliRunner, data: Path, demo_files: list[Path]) -> None:
    folder = demo_files[0].parents[2]
    assert runner.invoke(app, ["ingest", str(folder), "--data", str(data)]).exit_code == 0

    again = runner.invoke(app, ["ingest", str(folder), "--data", str(data)])

    assert again.exit_code == 0, again.output
    assert "0 stored, 37 duplicate" in again.output


def test_ingest_into_a_partition(
    runner: CliRunner, data: Path, samples: dict[str, Path], inspect: Callable[[], LakeInspection]
) -> None:
    ct = samples["CT_small.dcm"]

    result = runner.invoke(app, ["ingest", str(ct), "--data", str(data), "--partition", "research"])
    in_partition = runner.invoke(app, ["ls", "--data", str(data), "--partition", "research"])
    in_default = runner.invoke(app, ["ls", "--data", str(data)])

    assert result.exit_code == 0, result.output
    assert "1 stored" in result.output
    assert "1 studies" in in_partition.output
    assert "CompressedSamples^CT1" in in_partition.output
    assert "CompressedSamples^CT1" not in in_default.output
    lake = inspect()
    [stored] = lake.dicom_files()
    assert stored.relative_to(lake.dicom_root).parts[0] == "research"


def test_ingest_reports_rejected_files(
    runner: CliRunner,
    data: Path,
    samples: dict[str, Path],
    tmp_path: Path,
    inspect: Callable[[], LakeInspection],
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.dcm").write_bytes(samples["MR_small.dcm"].read_bytes())
    (folder / "notes.txt").write_text("not an image\n" * 50)

    result = runner.invoke(app, ["ingest", str(folder), "--data", str(data)])

    assert result.exit_code == 1
    assert "rejected" in result.output
    assert "notes.txt" in result.output
    assert "not a DICOM" in result.output
    assert "1 stored, 0 duplicate, 1 rejected" in result.output
    assert len(inspect().dicom_files()) == 1
    assert inspect().staging_files() == []


def test_ingest_of_a_missing_path_fails(runner: CliRunner, data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--data", str(data)])

    assert result.exit_code != 0
    assert "nope" in result.output


def test_ls_of_an_empty_archive(runner: CliRunner, data: Path) -> None:
    result = runner.invoke(app, ["ls", "--data", str(data)])

    assert result.exit_code == 0, result.output
    assert "0 studies" in result.output


def test_help_lists_every_command_and_a_typo_gets_a_suggestion(runner: CliRunner) -> None:
    listed = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0
    for command in ("serve", "ingest", "batch", "dimse", "mllp", "cohort", "token", "lake"):
        assert f" {command} " in listed.output
    typo = runner.invoke(app, ["ingset"], env={"COLUMNS": "200"})
    assert typo.exit_code == 2
    assert "Did you mean 'ingest'?" in typo.output


def test_the_lazy_command_table_names_every_command_of_each_module() -> None:
    # A command a module registers but the table does not name would vanish from `medlake`.
    modules = set(_LAZY_COMMANDS.values())
    for module in modules:
        named = {name for name, owner in _LAZY_COMMANDS.items() if owner == module}
        assert set(lazy_group(module).commands) == named, module


def test_a_command_loads_only_what_it_needs() -> None:
    # `medlake ingest` starts without the web framework, the DIMSE stack or the FHIR model.
    code = (
        "import sys; from medlake.cli.main import app; import medlake.cli.ingest_views; "
        "print(sorted(m for m in ('fastapi', 'pynetdicom', 'fhir', 'fhir.resources') "
        "if m in sys.modules))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert found.strip() == "[]"


def test_worker_processes_start_without_the_command_line(tmp_path: Path) -> None:
    # A spawned worker first imports the program's main module again. For the console
    # script that is `medlake.__main__`, which must cost the workers nothing: no Typer,
    # Rich or settings model in each of them.
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["medlake"] == "medlake.__main__:main"
    script = tmp_path / "medlake"
    script.write_text(  # the console script pip writes, and a probe run in a worker
        "import sys\n"
        "from medlake.__main__ import main\n"
        "def loaded():\n"
        "    return sorted({m.split('.')[0] for m in sys.modules})\n"
        "if __name__ == '__main__':\n"
        "    from medlake.ingest.workers import pool, start_workers\n"
        "    start_workers(1)\n"
        "    print(' '.join(pool(1).submit(loaded).result()))\n"
    )
    found = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "pydicom" in found  # the worker is ready to parse
    assert not {"typer", "rich", "click", "pydantic", "pydantic_settings"} & set(found)


def test_python_dash_m_runs_the_command_line() -> None:
    found = subprocess.run(
        [sys.executable, "-m", "medlake", "--version"], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == f"medlake {__version__}"


@pytest.mark.parametrize(
    ("command", "status"),
    [
        (["ae", "list"], 1),
        (["hl7", "senders", "list"], 1),
        (["token", "list"], 1),
        (["audit", "verify"], 1),
        (["cohort", "-"], 1),
        (["batches"], 2),  # the ingest commands keep 1 for rejected files
        (["lifecycle", "status"], 2),
    ],
)
def test_an_unreachable_index_database_is_one_line_not_a_traceback(
    tmp_path: Path, command: list[str], status: int
) -> None:
    env = {"MEDLAKE_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nothing"}
    result = subprocess.run(
        [sys.executable, "-m", "medlake", *command, "--data", str(tmp_path)],
        input=b'{"resource": "studies"}',
        capture_output=True,
        env={**os.environ, **env, "COLUMNS": "200"},
        check=False,
    )
    stderr = result.stderr.decode() + result.stdout.decode()
    assert result.returncode == status, stderr
    assert "error: cannot reach the index database" in stderr
    assert "Traceback" not in stderr
