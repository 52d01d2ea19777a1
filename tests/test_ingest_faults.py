"""Fault test: ``medlake ingest`` of a 1,000-file batch is killed with SIGKILL at random
points of its progress (after a random number of files, then a random fraction of a
chunk; not after a random time, which a faster ingest outruns), several times, and run
again each time. At the end every valid file is stored
exactly once, the error table lists every invalid file exactly once, and
reconciliation passes (batch and partition). About 7 s per database; the seed is in
every failure message (``MEDLAKE_FAULT_SEED`` replays it)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool
from tests.ingest_files import BAD_INPUT, bad_file, errors_of, make_instances
from tests.lake_inspection import LakeInspection

from medlake.config import Settings
from medlake.index.schema import instances
from medlake.ingest.archive import Archive
from medlake.ingest.batches import list_batches
from medlake.ingest.reconcile import reconcile_partition

VALID, INVALID_PER_KIND, KILLS = 990, 2, 4


def _seen(engine: Engine) -> int:
    """Files the ingest batch has seen so far (0 before it exists). A SQLite index is
    only opened once the ingest has put it in WAL mode (its ``-wal`` file exists):
    opening it earlier could create the file, or hold a lock while the ingest switches
    the journal mode."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and not Path(f"{database}-wal").exists():
        return 0
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT max(seen) FROM batches WHERE kind = 'ingest'")
            ).scalar()
    except SQLAlchemyError:  # no index yet, or its schema is being created
        return 0
    return int(found or 0)


def test_sigkill_at_random_points_then_resume(db_url: str, tmp_path: Path) -> None:
    source, data = tmp_path / "src", tmp_path / "data"
    valid = make_instances(source, VALID, per_series=100)
    invalid = [bad_file(source / f"bad{n}", name).path
               for name in BAD_INPUT for n in range(INVALID_PER_KIND)]  # fmt: skip
    assert len(valid) + len(invalid) == 1000
    seed = int(os.environ.get("MEDLAKE_FAULT_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    medlake = Path(sys.executable).with_name("medlake")
    command = [str(medlake), "ingest", str(source), "--data", str(data), "--workers", "2"]
    env = {**os.environ, "MEDLAKE_DATABASE_URL": db_url, "MEDLAKE_INGEST_CHUNK_FILES": "50",
           "COLUMNS": "200", "NO_COLOR": "1"}  # fmt: skip

    progress = create_engine(db_url, poolclass=NullPool)  # no connection kept open
    killed, finished = 0, None
    while finished is None:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)  # fmt: skip
        if killed < KILLS:
            # The first kill lands in the first half of the batch, so that it always
            # comes before the end; later ones anywhere.
            target = rng.randrange(0, 500 if killed == 0 else 1000)
            while process.poll() is None and _seen(progress) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.2))  # somewhere in the next chunk
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)  # the ingest process only, as `kill -9 PID`
                process.communicate(timeout=60)
                killed += 1
                continue
        output, _ = process.communicate(timeout=300)
        finished = (process.returncode, output)
    progress.dispose()

    assert killed >= 1, f"seed {seed}: the first run finished before its kill"
    assert finished[0] == 1, f"seed {seed}: {finished[1]}"  # 1: invalid files were rejected
    archive = Archive.open(Settings(data=data, database_url=db_url))
    try:
        with archive.engine.connect() as conn:
            # Every run resumed the first batch until it completed; a run started after
            # that (its kill came too late) is a new batch that finds only duplicates.
            batch, *later = sorted(list_batches(conn, kind="ingest"), key=lambda b: b.started_at)
            sop_uids = list(conn.execute(select(instances.c.sop_uid)).scalars())
        errors = errors_of(archive, batch.id)
        lake = LakeInspection(archive)
        stored = {hashlib.sha256(p.read_bytes()).hexdigest() for p in lake.dicom_files()}
        partition = reconcile_partition(archive, "default")
        staging = lake.staging_files()
    finally:
        archive.close()
    detail = f"seed {seed}, {killed} kills"
    assert (batch.status, batch.verdict) == ("completed", "balanced"), (detail, batch.detail)
    assert (batch.seen, batch.stored, batch.rejected) == (1000, VALID, len(invalid)), detail
    assert batch.duplicates == 0, detail
    assert len(sop_uids) == len(set(sop_uids)) == VALID, detail
    assert stored == {hashlib.sha256(p.read_bytes()).hexdigest() for p in valid}, detail
    per_file = Counter(e.source for e in errors)
    assert per_file == Counter(str(p) for p in invalid), detail  # each exactly once
    for again in later:
        assert (again.stored, again.duplicates, again.verdict) == (0, VALID, "balanced"), detail
    assert partition.balanced, (detail, partition.to_json())
    assert staging == [], (detail, staging)
