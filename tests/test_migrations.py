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


def test_0013_tells_login_links_and_sessions_from_tokens_by_description_and_lifetime(
    db_url: str,
) -> None:
    import datetime as dt

    from alembic import command
    from sqlalchemy import text

    from medlake.index.database import alembic_config

    engine = create_index_engine(db_url)
    command.upgrade(alembic_config(engine), "0012")
    now = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    rows = [  # token_id, description, lifetime (None: never expires)
        ("link", "one-time browser login link", dt.timedelta(minutes=10)),
        ("session", "browser session opened with token abc", dt.timedelta(hours=12)),
        ("short-session", "browser session opened with login link x", dt.timedelta(hours=2)),
        ("token", "CI uploads", dt.timedelta(days=90)),
        ("session-named", "browser session opened with the team", dt.timedelta(days=30)),
        ("link-named", "one-time browser login link", None),
    ]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO principals (subject, kind, created_at) VALUES ('p', 'token', :t)"),
            {"t": now},
        )
        for token_id, description, lifetime in rows:
            conn.execute(
                text(
                    "INSERT INTO api_tokens (token_id, principal_id, secret_sha256, "
                    "description, created_at, expires_at) VALUES (:id, "
                    "(SELECT id FROM principals WHERE subject = 'p'), 'x', :d, :c, :e)"
                ),
                {"id": token_id, "d": description, "c": now,
                 "e": None if lifetime is None else now + lifetime},
            )  # fmt: skip
    migrate(engine)
    with engine.connect() as conn:
        kinds = dict(conn.execute(text("SELECT token_id, kind FROM api_tokens")).all())
    engine.dispose()
    assert kinds == {
        "link": "login_link",
        "session": "session",
        "short-session": "session",
        "token": "token",
        "session-named": "token",
        "link-named": "token",
    }
