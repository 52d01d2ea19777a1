"""The pseudonyms of the de-identified views: the lake's secret key and the way back.

The de-identified views (researcher role) replace UIDs, Patient IDs and FHIR ids with
HMAC-SHA256 pseudonyms (:class:`medlake.dicom.deidentify.Pseudonyms`) and accept those
pseudonyms in later requests. The key is one random 32-byte secret per lake, made on
first use and kept in the index (``deid_keys``), so every replica issues the same
pseudonyms; what each pseudonym replaced is recorded (``deid_pseudonyms``) when it is
handed out, since an HMAC cannot be reversed. Both live in the index, which holds the
identified data anyway: reading them needs the same access as reading the archive.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from medlake.dicom.deidentify import Pseudonyms
from medlake.errors import MedlakeError, NotFound
from medlake.index.schema import deid_keys, deid_pseudonyms
from medlake.index.writes import partition_id, utcnow

__all__ = [
    "UnknownPseudonym",
    "originals",
    "partition_pseudonyms",
    "pseudonymous_errors",
    "remember",
    "remember_issued",
]

_KEY_ID = 1


def _key(engine: Engine) -> bytes:
    """The lake's pseudonym key, made (once, race-free) on first use."""
    with engine.connect() as conn:
        found = conn.execute(select(deid_keys.c.secret).where(deid_keys.c.id == _KEY_ID)).scalar()
    if found is not None:
        return bytes(found)
    with engine.begin() as conn:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        conn.execute(
            dialect.insert(deid_keys).on_conflict_do_nothing(),
            {"id": _KEY_ID, "secret": secrets.token_bytes(32), "created_at": utcnow()},
        )
        # Whoever won the race, everyone uses the row that is there.
        return bytes(
            conn.execute(select(deid_keys.c.secret).where(deid_keys.c.id == _KEY_ID)).scalar_one()
        )


class UnknownPseudonym(Exception):
    """A pseudonym in a query that was never handed out: nothing can match it."""


def partition_pseudonyms(engine: Engine, partition: str) -> tuple[int, Pseudonyms]:
    """The id of ``partition`` (404 when it does not exist) and a pseudonym maker of it
    with the lake's key."""
    with engine.connect() as conn:
        found = partition_id(conn, partition, create=False)
    if found is None:
        raise NotFound(f"partition {partition!r} does not exist")
    return found, Pseudonyms(_key(engine), partition)


def remember_issued(engine: Engine, partition_pk: int, pseudonyms: Pseudonyms) -> None:
    """Record what ``pseudonyms`` handed out, in a transaction of its own."""
    with engine.begin() as conn:
        remember(conn, partition_pk, pseudonyms.issued)


def remember(conn: Connection, partition_id: int, issued: Mapping[str, tuple[str, str]]) -> None:
    """Record the way back from each pseudonym in ``issued`` (pseudonym -> (kind, value))."""
    if not issued:
        return
    now = utcnow()
    rows = [
        {"partition_id": partition_id, "kind": kind, "pseudonym": pseudonym,
         "original": original, "created_at": now}
        for pseudonym, (kind, original) in sorted(issued.items())
    ]  # fmt: skip
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(deid_pseudonyms).on_conflict_do_nothing(), rows)


def originals(
    conn: Connection, partition_id: int, wanted: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """What each (kind, pseudonym) of ``wanted`` replaced; unknown ones are left out."""
    keys = sorted(set(wanted))
    found: dict[tuple[str, str], str] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        rows = conn.execute(
            select(
                deid_pseudonyms.c.kind, deid_pseudonyms.c.pseudonym, deid_pseudonyms.c.original
            ).where(
                deid_pseudonyms.c.partition_id == partition_id,
                tuple_(deid_pseudonyms.c.kind, deid_pseudonyms.c.pseudonym).in_(chunk),
            )
        )
        found.update({(r.kind, r.pseudonym): r.original for r in rows})
    return found


@contextmanager
def pseudonymous_errors(pseudonym_of: Mapping[str, str]) -> Iterator[None]:
    """Errors raised inside name the pseudonyms, not the originals: the identified
    services a view calls word their errors with the values they were given (a study
    deleted since its pseudonym was handed out: "study 1.2.3 is not stored")."""
    longest_first = sorted(pseudonym_of, key=len, reverse=True)

    def reword(value: Any) -> Any:
        if isinstance(value, str):
            for original in longest_first:
                value = value.replace(original, pseudonym_of[original])
            return value
        if isinstance(value, list):
            return [reword(v) for v in value]
        if isinstance(value, dict):
            return {k: reword(v) for k, v in value.items()}
        return value

    try:
        yield
    except MedlakeError as exc:
        exc.message = reword(exc.message)
        exc.args = (exc.message, *exc.args[1:])
        # FHIR errors carry their OperationOutcome issues as well
        if isinstance(getattr(exc, "issues", None), list):
            exc.issues = reword(exc.issues)  # type: ignore[attr-defined]
        raise
