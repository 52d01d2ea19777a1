"""Opening the index database and bringing its schema up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import OperationalError

from medlake.errors import DatabaseUnavailable
from medlake.index.statistics import refresh_statistics

MIGRATIONS = Path(__file__).with_name("migrations")


def create_index_engine(url: str) -> Engine:
    """An engine for ``url`` with the settings medlake relies on (WAL on SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # hide_parameters: bound values are patient data; errors and SQL echo leave them out.
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # Wildcard matching must be case-sensitive like exact matching, and like PostgreSQL's LIKE
    # (person names are matched through upper-cased search columns instead).
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def alembic_config(engine: Engine) -> Config:
    """Alembic configuration bound to ``engine`` (used by ``migrate`` and tests)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Apply every pending migration (a fresh database gets the whole schema).

    On SQLite the migration runs in one ``BEGIN IMMEDIATE`` transaction of its own:
    the sqlite3 module would otherwise commit each CREATE TABLE on its own, so a
    process killed mid-migration (``kill -9`` during start-up) would leave tables
    without the Alembic version that names them, and every later start would fail.
    The immediate write lock also makes two processes that start at once migrate
    one after the other.
    """
    target = _transactional_sqlite(engine) if engine.dialect.name == "sqlite" else engine
    try:
        command.upgrade(alembic_config(target), "head")
    except OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the index database: {exc.orig}") from exc
    finally:
        if target is not engine:
            target.dispose()


def _transactional_sqlite(engine: Engine) -> Engine:
    """A short-lived engine on the same SQLite file whose transactions include DDL."""
    migrating = create_engine(engine.url, connect_args={"timeout": 30, "check_same_thread": False})

    def connect(dbapi_connection: Any, record: Any) -> None:
        _sqlite_pragmas(dbapi_connection, record)
        dbapi_connection.isolation_level = None  # sqlite3 issues no BEGIN/COMMIT itself

    event.listen(migrating, "connect", connect)
    event.listen(migrating, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return migrating


def open_index(url: str) -> Engine:
    """Create the engine for ``url`` and migrate its schema to the newest version."""
    engine = create_index_engine(url)
    migrate(engine)
    refresh_statistics(engine)
    return engine
