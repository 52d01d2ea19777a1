"""Search criteria find their values through the index, so that a conditional create,
update or delete by identifier (what every FHIR feed does per message) costs the same
with a thousand patients as with ten times more.

Counted in SQLite virtual-machine steps (its progress handler), not in seconds: the
count is the same on every machine and under any load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlake.clinical.bulk_import import import_files
from medlake.clinical.search import matching_resources
from medlake.config import Settings
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION


def _patients(tmp_path: Path, count: int) -> Archive:
    archive = Archive.open(Settings(data=tmp_path / f"lake-{count}"))
    source = tmp_path / f"patients-{count}.ndjson"
    source.write_text(
        "".join(
            json.dumps(
                {
                    "resourceType": "Patient",
                    "identifier": [{"system": "http://mrn", "value": f"M{i}"}],
                    "gender": "female" if i % 2 else "male",
                }
            )
            + "\n"
            for i in range(count)
        )
    )
    import_files(archive, [source], partition=DEFAULT_PARTITION)
    return archive


def _steps(archive: Archive, query: list[tuple[str, str]]) -> tuple[int, int]:
    """SQLite VM steps (in hundreds) to find the matches, and how many matched."""
    with archive.engine.connect() as conn:
        partition = partition_id(conn, DEFAULT_PARTITION, create=False)
        sqlite = conn.connection.driver_connection
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        sqlite.set_progress_handler(count, 100)  # type: ignore[union-attr]
        try:
            found = matching_resources(conn, partition, "Patient", query)
        finally:
            sqlite.set_progress_handler(None, 100)  # type: ignore[union-attr]
    return steps[0], len(found)


@pytest.mark.parametrize(
    "query",
    [
        [("identifier", "http://mrn|M7")],
        [("identifier", "M7")],
        [("identifier", "M7"), ("gender", "male")],
        [("gender", "male"), ("identifier", "M7")],  # the identifier drives, wherever it is
    ],
)
def test_a_lookup_by_identifier_does_not_read_every_patient(
    tmp_path: Path, query: list[tuple[str, str]]
) -> None:
    small, large = _patients(tmp_path, 300), _patients(tmp_path, 3000)
    try:
        small_steps, small_found = _steps(small, query)
        large_steps, large_found = _steps(large, query)
    finally:
        small.close()
        large.close()
    assert small_found == large_found == (0 if ("gender", "male") in query else 1)
    # Ten times the patients: about the same work (reading them all would be ten times).
    assert large_steps < 2 * max(small_steps, 1), (small_steps, large_steps)
