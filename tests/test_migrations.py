"""The Alembic migrations build exactly the schema that index/schema.py declares."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from medlake.index.database import create_index_engine, migrate
from medlake.index.schema import metadata


def test_migrated_database_matches_schema(db_url: str) -> None:
    engine = create_index_engine(db_url)
    migrate(engine)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
        tables = set(inspect(conn).get_table_names())
    engine.dispose()
    assert differences == []
    assert set(metadata.tables) <= tables


def test_migrating_twice_changes_nothing(db_url: str) -> None:
    engine = create_index_engine(db_url)
    migrate(engine)
    migrate(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


_KILLED_MIDWAY = """
import os, sys
from alembic.operations import Operations
from medlake.index.database import create_index_engine, migrate

created = []
real = Operations.create_table

def create_then_die(self, name, *columns, **kw):
    table = real(self, name, *columns, **kw)
    created.append(name)
    if name == "clinical_files":  # the first table of migration 0004
        os._exit(9)  # no rollback, no cleanup: as kill -9
    return table

Operations.create_table = create_then_die
migrate(create_index_engine(sys.argv[1]))
"""


def test_a_migration_killed_midway_is_redone(db_url: str) -> None:
    import subprocess
    import sys

    killed = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, db_url], check=False)
    engine = create_index_engine(db_url)
    migrate(engine)  # sqlite3 used to commit each CREATE TABLE: "table already exists"
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert killed.returncode == 9
    assert differences == []
