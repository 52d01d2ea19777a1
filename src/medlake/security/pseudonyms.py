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
from collections.abc import Iterable, Mapping

from sqlalchemy import Connection, Engine, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from medlake.dicom.deidentify import Pseudonyms
from medlake.index.schema import deid_keys, deid_pseudonyms
from medlake.index.writes import utcnow

__all__ = ["originals", "pseudonyms_for", "remember"]

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


def pseudonyms_for(engine: Engine, partition: str) -> Pseudonyms:
    """A pseudonym maker of ``partition`` with the lake's key."""
    return Pseudonyms(_key(engine), partition)


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
