"""Patient identity: one patient key for a person's DICOM studies and FHIR resources.

A *patient key* (``patients.id``) stands for one patient of a partition. Three tables
tie things to it:

- ``patient_identifiers``: (partition, system, value) -> key. A DICOM PatientID becomes
  an identifier whose system comes from IssuerOfPatientID (:func:`identifier_system`);
  a FHIR ``Patient.identifier`` is taken as it is. Equal identifiers are one patient.
- ``patient_records``: the FHIR Patient resources of a key (normally one; more when
  the same person was registered twice, or after a merge). ``patients.fhir_id`` is the
  one ImagingStudy.subject names.
- ``study_patients``: the key of each stored study (filled by the ImagingStudy sync,
  :mod:`medlake.clinical.imaging_study`).

FHIR Patients are taken in by :func:`sync_patient_records`, which follows the FHIR
version table from a cursor (``sync_cursors``), so a Patient written by any route
(REST, transaction bundles, HL7 v2, bulk import) is linked, whichever of the study or
the Patient came first. Identifiers are never moved from one key to another except
by a merge (:func:`relink_merged`): a later Patient version that names another key's
identifier does not silently join two people.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from sqlalchemy import Connection, Engine, and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from medlake.config import Settings
from medlake.index.schema import (
    fhir_resource_versions,
    fhir_resources,
    fhir_search_values,
    patient_identifiers,
    patient_records,
    patients,
    study_patients,
    sync_cursors,
)

__all__ = [
    "IMAGING_SOURCE",
    "PatientKey",
    "current_key",
    "ensure_patient_record",
    "identifier_system",
    "link_study",
    "patient_for_identifier",
    "patient_key_of",
    "read_cursor",
    "record_patient",
    "relink_merged",
    "sync_patient_records",
    "write_cursor",
]

#: ``meta.source`` of the resources medlake makes from DICOM (Patient, ImagingStudy,
#: Endpoint), so they can be told from resources clients wrote.
IMAGING_SOURCE = "urn:medlake:dicom"
#: ``sync_cursors`` name of :func:`sync_patient_records`.
PATIENT_CURSOR = "patient-records"
#: The system HL7 v2 mapping gives an assigning authority's namespace ID (the value of
#: ``medlake.clinical.hl7.mapping.AUTHORITY_PREFIX``, not imported so that identity does
#: not load the MLLP stack).
AUTHORITY_PREFIX = "urn:medlake:hl7v2:authority:"
#: PostgreSQL hands out version ids at insert, and transactions commit in any order:
#: versions younger than this are read again by the next sync, so a transaction that
#: committed after a younger one is not skipped.
_COMMIT_LAG = dt.timedelta(seconds=60)
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class PatientKey:
    """A patient key and the FHIR Patient that speaks for it."""

    key: int
    fhir_id: str


def identifier_system(settings: Settings, partition: str, issuer: str | None) -> str:
    """The FHIR identifier system of DICOM PatientIDs issued by ``issuer``
    (IssuerOfPatientID).

    No issuer: ``patient_id_default_system`` (``{partition}`` filled in). A configured
    issuer (``patient_id_issuers``): its system. Otherwise the issuer is read as HL7 v2
    reads an assigning authority, so DICOM and HL7 feeds of one hospital agree: a URI is
    kept, an OID becomes ``urn:oid:…``, a name ``X`` becomes
    ``urn:medlake:hl7v2:authority:X``.
    """
    issuer = (issuer or "").strip()
    if not issuer:
        return settings.patient_id_default_system.replace("{partition}", partition)
    configured = settings.patient_id_issuers.get(issuer)
    if configured:
        return configured
    if _OID.match(issuer):
        return f"urn:oid:{issuer}"
    if _URI.match(issuer):
        return issuer
    return AUTHORITY_PREFIX + quote(issuer, safe="")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _insert_ignoring_conflicts(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT … ON CONFLICT DO NOTHING: a concurrent writer may have added the row."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).on_conflict_do_nothing(), rows)


# --- lookups -------------------------------------------------------------------------------


def patient_key_of(conn: Connection, partition_pk: int, fhir_id: str) -> int | None:
    """The key of FHIR ``Patient/{fhir_id}``, if it is linked."""
    found = conn.execute(
        select(patient_records.c.patient_id).where(
            patient_records.c.partition_id == partition_pk,
            patient_records.c.fhir_id == fhir_id,
        )
    ).scalar_one_or_none()
    return None if found is None else int(found)


def current_key(conn: Connection, key: int) -> PatientKey:
    """``key``, or the key it was merged into, with its FHIR Patient."""
    row = conn.execute(
        select(patients.c.id, patients.c.fhir_id, patients.c.merged_into).where(
            patients.c.id == key
        )
    ).one()
    if row.merged_into is not None:
        return current_key(conn, int(row.merged_into))
    return PatientKey(int(row.id), str(row.fhir_id))


def patient_for_identifier(
    conn: Connection, partition_pk: int, system: str, value: str
) -> PatientKey | None:
    """The patient an identifier names, if any: a linked identifier, else a FHIR Patient
    carrying it (which is linked on the way)."""
    key = conn.execute(
        select(patient_identifiers.c.patient_id).where(
            patient_identifiers.c.partition_id == partition_pk,
            patient_identifiers.c.system == system,
            patient_identifiers.c.value == value,
        )
    ).scalar_one_or_none()
    if key is not None:
        return current_key(conn, int(key))
    v, r = fhir_search_values.c, fhir_resources.c
    system_clause = v.token_system == system if system else v.token_system.is_(None)
    found = conn.execute(
        select(r.logical_id, r.version_id, r.content)
        .join(fhir_resources, r.id == v.resource_id)
        .where(
            v.resource_type == "Patient",
            v.param == "identifier",
            v.token_code == value,
            system_clause,
            r.partition_id == partition_pk,
            r.deleted.is_(False),
        )
        .order_by(r.id)
        .limit(1)
    ).first()
    if found is None:
        return None
    key = record_patient(
        conn, partition_pk, found.logical_id, found.version_id, orjson.loads(found.content)
    )
    return current_key(conn, key)


# --- writing identity ------------------------------------------------------------------------


def _identifiers(resource: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for identifier in resource.get("identifier") or []:
        if not isinstance(identifier, dict):
            continue
        value = identifier.get("value")
        if isinstance(value, str) and value.strip():
            system = identifier.get("system")
            pair = (system if isinstance(system, str) else "", value)
            if pair not in out:
                out.append(pair)
    return out


def _new_key(conn: Connection, partition_pk: int, fhir_id: str) -> int:
    now = _now()
    _insert_ignoring_conflicts(
        conn,
        patients,
        [{"partition_id": partition_pk, "fhir_id": fhir_id, "created_at": now, "updated_at": now}],
    )
    return int(
        conn.execute(
            select(patients.c.id).where(
                patients.c.partition_id == partition_pk, patients.c.fhir_id == fhir_id
            )
        ).scalar_one()
    )


def _map_identifiers(
    conn: Connection, partition_pk: int, key: int, identifiers: Iterable[tuple[str, str]]
) -> None:
    now = _now()
    _insert_ignoring_conflicts(
        conn,
        patient_identifiers,
        [
            {
                "partition_id": partition_pk,
                "system": system[:256],
                "value": value[:256],
                "patient_id": key,
                "created_at": now,
            }
            for system, value in identifiers
        ],
    )


def _identifier_keys(
    conn: Connection, partition_pk: int, identifiers: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    if not identifiers:
        return {}
    c = patient_identifiers.c
    rows = conn.execute(
        select(c.system, c.value, c.patient_id).where(
            c.partition_id == partition_pk,
            or_(*(and_(c.system == s, c.value == v) for s, v in identifiers)),
        )
    )
    return {(row.system, row.value): int(row.patient_id) for row in rows}


def record_patient(
    conn: Connection,
    partition_pk: int,
    fhir_id: str,
    version_id: int,
    resource: dict[str, Any] | None,
    *,
    key: int | None = None,
) -> int:
    """Link FHIR ``Patient/{fhir_id}`` (version ``version_id``, ``resource`` its content,
    None when deleted) to a patient key and return the key.

    A Patient already linked keeps its key and adds its new identifiers to it. A new
    one joins the key of the first of its identifiers that is linked, or ``key`` when
    given, or gets a key of its own.
    """
    identifiers = _identifiers(resource) if resource else []
    existing = conn.execute(
        select(patient_records.c.patient_id, patient_records.c.version_id).where(
            patient_records.c.partition_id == partition_pk,
            patient_records.c.fhir_id == fhir_id,
        )
    ).first()
    known = _identifier_keys(conn, partition_pk, identifiers)
    if existing is not None:
        found = int(existing.patient_id)
        conn.execute(
            update(patient_records)
            .where(
                patient_records.c.partition_id == partition_pk,
                patient_records.c.fhir_id == fhir_id,
                patient_records.c.version_id < version_id,
            )
            .values(version_id=version_id)
        )
    else:
        linked = [known[pair] for pair in identifiers if pair in known]
        if key is not None:
            found = key
        elif linked:
            found = current_key(conn, linked[0]).key
        else:
            found = _new_key(conn, partition_pk, fhir_id)
        _insert_ignoring_conflicts(
            conn,
            patient_records,
            [
                {
                    "partition_id": partition_pk,
                    "fhir_id": fhir_id,
                    "patient_id": found,
                    "version_id": version_id,
                }
            ],
        )
        found = patient_key_of(conn, partition_pk, fhir_id) or found
    _map_identifiers(conn, partition_pk, found, [pair for pair in identifiers if pair not in known])
    return found


def ensure_patient_record(conn: Connection, partition_pk: int, fhir_id: str) -> int | None:
    """The key of ``Patient/{fhir_id}``, linking the Patient first when the sync has not
    seen it yet; None when no such Patient exists."""
    key = patient_key_of(conn, partition_pk, fhir_id)
    if key is not None:
        return key
    row = conn.execute(
        select(fhir_resources.c.version_id, fhir_resources.c.content).where(
            fhir_resources.c.partition_id == partition_pk,
            fhir_resources.c.resource_type == "Patient",
            fhir_resources.c.logical_id == fhir_id,
        )
    ).first()
    if row is None:
        return None
    content = orjson.loads(row.content) if row.content else None
    return record_patient(conn, partition_pk, fhir_id, row.version_id, content)


def link_study(
    conn: Connection,
    partition_pk: int,
    study_pk: int,
    key: int,
    study_date: dt.datetime | None,
) -> None:
    """Record (or change) the patient key of a stored study."""
    values = {"partition_id": partition_pk, "patient_id": key, "study_date": study_date}
    changed = conn.execute(
        update(study_patients)
        .where(study_patients.c.study_id == study_pk)
        .values(**values, linked_at=_now())
    )
    if changed.rowcount == 0:
        _insert_ignoring_conflicts(
            conn, study_patients, [{"study_id": study_pk, **values, "linked_at": _now()}]
        )


def relink_merged(conn: Connection, partition_pk: int, source_id: str, target_id: str) -> None:
    """The imaging side of merging ``Patient/{source_id}`` into ``Patient/{target_id}``
    (in the merge's transaction): the source's key, its identifiers, FHIR records and
    studies all move to the target's key, and the source key is marked merged."""
    target = ensure_patient_record(conn, partition_pk, target_id)
    if target is None:
        return
    target = current_key(conn, target).key
    source = patient_key_of(conn, partition_pk, source_id)
    if source is None:
        record_patient(conn, partition_pk, source_id, 0, _content(conn, partition_pk, source_id),
                       key=target)  # fmt: skip
        return
    source = current_key(conn, source).key
    if source == target:
        return
    for table in (patient_identifiers, patient_records, study_patients):
        conn.execute(update(table).where(table.c.patient_id == source).values(patient_id=target))
    conn.execute(
        update(patients)
        .where(or_(patients.c.id == source, patients.c.merged_into == source))
        .values(merged_into=target, updated_at=_now())
    )


def _content(conn: Connection, partition_pk: int, fhir_id: str) -> dict[str, Any] | None:
    text = conn.execute(
        select(fhir_resources.c.content).where(
            fhir_resources.c.partition_id == partition_pk,
            fhir_resources.c.resource_type == "Patient",
            fhir_resources.c.logical_id == fhir_id,
        )
    ).scalar_one_or_none()
    return orjson.loads(text) if text else None


# --- following FHIR Patient writes -----------------------------------------------------------


def read_cursor(conn: Connection, name: str) -> int:
    """Where the follower ``name`` has got to (0 before its first run)."""
    found = conn.execute(
        select(sync_cursors.c.position).where(sync_cursors.c.name == name)
    ).scalar_one_or_none()
    return int(found or 0)


def write_cursor(conn: Connection, name: str, position: int) -> None:
    """Move the follower ``name`` to ``position`` (never backwards)."""
    changed = conn.execute(
        update(sync_cursors)
        .where(sync_cursors.c.name == name, sync_cursors.c.position < position)
        .values(position=position, updated_at=_now())
    )
    if changed.rowcount == 0:
        _insert_ignoring_conflicts(
            conn, sync_cursors, [{"name": name, "position": position, "updated_at": _now()}]
        )


def sync_patient_records(engine: Engine, *, batch_size: int = 500) -> int:
    """Link every FHIR Patient version written since the last run; returns how many
    Patient versions were looked at. One transaction per ``batch_size`` versions."""
    v, r = fhir_resource_versions.c, fhir_resources.c
    postgres = engine.dialect.name == "postgresql"
    seen = 0
    with engine.connect() as conn:
        scanned = read_cursor(conn, PATIENT_CURSOR)
    settled_until: int | None = None  # the cursor stops before the first unsettled version
    while True:
        with engine.begin() as conn:
            rows = conn.execute(
                select(
                    v.id.label("version_pk"), v.last_updated, r.partition_id, r.logical_id,
                    r.version_id, r.deleted, r.content,
                )
                .join(fhir_resources, r.id == v.resource_id)
                .where(v.id > scanned, r.resource_type == "Patient")
                .order_by(v.id)
                .limit(batch_size)
            ).all()  # fmt: skip
            settled = _now() - _COMMIT_LAG
            for row in rows:
                content = orjson.loads(row.content) if row.content and not row.deleted else None
                record_patient(conn, row.partition_id, row.logical_id, row.version_id, content)
                if settled_until is None and postgres and _utc(row.last_updated) >= settled:
                    settled_until = row.version_pk - 1
            if rows:
                scanned = rows[-1].version_pk
                write_cursor(
                    conn, PATIENT_CURSOR, scanned if settled_until is None else settled_until
                )
            seen += len(rows)
        if len(rows) < batch_size:
            return seen


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value
