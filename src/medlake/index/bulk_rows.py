"""Appending many rows to one table fast, inside the caller's transaction.

SQLAlchemy's ``executemany`` handles each row as a dict of bound parameters, which costs
more than the database's own work for the tens of thousands of rows a bulk import
writes (search values above all). :func:`append_rows` takes plain tuples instead: on
PostgreSQL it streams them with ``COPY ... FROM STDIN`` (psycopg), elsewhere it runs
one prepared ``INSERT`` through the driver's ``executemany``, each value converted by
the column type's own bind processor, so the stored values are exactly those an ORM
insert would store. Neither returns the new primary keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Table, insert

__all__ = ["append_rows"]


def append_rows(
    conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Insert ``rows`` (values in the order of ``columns``) into ``table``."""
    if not rows:
        return
    dialect = conn.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        _copy(conn, table, columns, rows)
    elif dialect.paramstyle == "qmark":
        _executemany(conn, table, columns, rows)
    else:  # pragma: no cover - medlake runs on SQLite and PostgreSQL (psycopg)
        conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])


def _quoted(conn: Connection, table: Table, columns: Sequence[str]) -> tuple[str, str]:
    prepare = conn.dialect.identifier_preparer
    names = ", ".join(prepare.quote(name) for name in columns)
    return prepare.format_table(table), names


def _copy(conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Any]) -> None:
    name, names = _quoted(conn, table, columns)
    driver: Any = conn.connection.driver_connection  # the psycopg connection of this transaction
    with driver.cursor() as cursor, cursor.copy(f"COPY {name} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _executemany(
    conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    name, names = _quoted(conn, table, columns)
    marks = ", ".join("?" for _ in columns)
    processors: list[tuple[int, Callable[[Any], Any]]] = []
    for index, column in enumerate(columns):
        found = table.c[column].type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        if found is not None:
            processors.append((index, found))
    if processors:
        converted: list[tuple[Any, ...]] = []
        for row in rows:
            values = list(row)
            for index, convert in processors:
                if values[index] is not None:
                    values[index] = convert(values[index])
            converted.append(tuple(values))
        params = converted
    else:
        params = [tuple(row) for row in rows]
    conn.exec_driver_sql(f"INSERT INTO {name} ({names}) VALUES ({marks})", params)
