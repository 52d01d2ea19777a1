"""The audit trail: append-only, hash-chained, exported as FHIR AuditEvent.

Every record carries the SHA-256 of the one before it (``prev_hash``) and its own
``hash`` = SHA-256(``prev_hash`` + canonical JSON of its other columns), and records are
numbered 1, 2, 3, ... without gaps. Changing, removing or inserting a record breaks the
chain at that record, which :func:`verify_chain` names. Writers on any number of
processes keep one chain: each append takes a lock for its transaction (PostgreSQL: an
advisory lock; SQLite: the database write lock) before it reads the chain's head.

Event types and subtypes are the DICOM codes of PS3.16 CID 400 / CID 401 (scheme DCM),
so one record maps both to a DICOM PS3.15 audit message and to a FHIR AuditEvent.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.exc import SQLAlchemyError

from medlake.errors import InvalidInput
from medlake.index.schema import audit_log
from medlake.index.writes import utcnow
from medlake.security.errors import AuditUnavailable
from medlake.security.policy import Action

DCM = "http://dicom.nema.org/resources/ontology/DCM"
GENESIS_HASH = "0" * 64

#: DICOM audit event IDs (PS3.16 CID 400) and type codes (CID 401) used by medlake.
DCM_CODES = {
    "110100": "Application Activity",
    "110101": "Audit Log Used",
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110105": "DICOM Study Deleted",
    "110106": "Export",
    "110107": "Import",
    "110110": "Patient Record",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
    "110122": "Login",
    "110123": "Logout",
    "110128": "Network Configuration",
    "110129": "Security Configuration",
    "110131": "Software Configuration",
    "110132": "Use of Restricted Function",
    "110136": "Security Roles Changed",
    "110137": "User Security Attributes Changed",
}


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator (PS3.15), the same codes as AuditEvent.outcome (FHIR R4)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class AuditEventType:
    """The DICOM event ID, event type code and default EventActionCode of an action."""

    code: str
    subtype: str | None
    action: str  # C | R | U | D | E


#: How each audited action is recorded. Actions that are not listed (health, listing
#: partitions, reading batch counts, ...) touch no PHI and are recorded only when denied.
AUDITED_ACTIONS: dict[Action, AuditEventType] = {
    Action.DICOM_SEARCH: AuditEventType("110112", None, "E"),
    Action.DICOM_READ: AuditEventType("110104", None, "R"),
    Action.DICOM_STORE: AuditEventType("110104", None, "C"),
    Action.DICOM_DELETE: AuditEventType("110105", None, "D"),
    Action.CHANGEFEED_READ: AuditEventType("110112", None, "E"),
    Action.FHIR_READ: AuditEventType("110110", None, "R"),
    Action.FHIR_SEARCH: AuditEventType("110112", None, "E"),
    Action.FHIR_CREATE: AuditEventType("110110", None, "C"),
    Action.FHIR_UPDATE: AuditEventType("110110", None, "U"),
    Action.FHIR_DELETE: AuditEventType("110110", None, "D"),
    Action.FHIR_TRANSACTION: AuditEventType("110110", None, "E"),
    Action.FHIR_EXPORT: AuditEventType("110106", None, "R"),
    Action.FHIR_IMPORT: AuditEventType("110107", None, "C"),
    Action.HL7_RECEIVE: AuditEventType("110110", None, "C"),
    Action.HL7_READ: AuditEventType("110110", None, "R"),
    Action.DEID_READ: AuditEventType("110106", None, "R"),
    Action.AUDIT_READ: AuditEventType("110101", None, "R"),
    Action.PARTITION_CREATE: AuditEventType("110113", "110131", "C"),
    Action.TAGS_MANAGE: AuditEventType("110113", "110131", "U"),
    Action.AE_MANAGE: AuditEventType("110113", "110128", "U"),
    Action.BATCH_MANAGE: AuditEventType("110100", None, "E"),
    Action.SECURITY_MANAGE: AuditEventType("110113", "110137", "U"),
}
#: A request without valid credentials, and one refused to an authenticated principal.
AUTHENTICATION_FAILED = AuditEventType("110114", "110122", "E")
ACCESS_DENIED = AuditEventType("110113", "110132", "E")
#: A browser session opened (login link or API token) and ended.
LOGIN = AuditEventType("110114", "110122", "E")
LOGOUT = AuditEventType("110114", "110123", "E")


@dataclass(frozen=True)
class AuditRecord:
    """What happened, by whom, from where, to what and how it ended."""

    event: AuditEventType
    operation: str  # the medlake action, e.g. dicom.read
    actor: str  # subject of the principal ("anonymous" when none)
    actor_kind: str
    outcome: Outcome = Outcome.SUCCESS
    action: str | None = None  # EventActionCode; default: the event type's
    actor_name: str | None = None
    source_address: str | None = None
    partition: str | None = None
    entity: Mapping[str, str] = field(default_factory=dict)  # study, series, instance, resource
    request: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class StoredAudit:
    """Where an appended record landed in the chain."""

    seq: int
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify_chain`: ``first_broken`` is the sequence number of
    the first record that does not fit the chain (``None`` when all do)."""

    checked: int
    head_hash: str
    first_broken: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """Whether every record fits the chain."""
        return self.first_broken is None


_HASHED = (
    "seq", "recorded_at", "event_type", "event_subtype", "action", "outcome", "operation",
    "actor", "actor_kind", "actor_name", "source_address", "partition", "entity", "request",
    "detail", "prev_hash",
)  # fmt: skip


def _instant(value: dt.datetime) -> str:
    # SQLite hands timestamps back without their (UTC) offset; PostgreSQL with it.
    aware = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return aware.isoformat(timespec="microseconds").replace("+00:00", "Z")


def record_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``prev_hash`` followed by the canonical JSON of the record."""
    values = {name: row[name] for name in _HASHED}
    values["recorded_at"] = _instant(values["recorded_at"])
    canonical = orjson.dumps(values, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(row["prev_hash"].encode("ascii") + canonical).hexdigest()


def _lock_chain(conn: Connection) -> None:
    """Serialise appenders until the transaction ends, before the head is read."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended('medlake.audit_log', 0))"))
    else:
        # A write that matches no row still takes SQLite's write lock now, so no other
        # appender can read the same head in between (the triggers fire per row: none).
        conn.execute(text("UPDATE audit_log SET seq = seq WHERE 1 = 0"))


def append_audit(
    conn: Connection, record: AuditRecord, *, now: dt.datetime | None = None
) -> StoredAudit:
    """Append ``record`` in the caller's transaction (it commits with the caller's change)."""
    return append_audits(conn, [record], now=now)[0]


def append_audits(
    conn: Connection, records: Sequence[AuditRecord], *, now: dt.datetime | None = None
) -> list[StoredAudit]:
    """Append ``records``, in order, in the caller's transaction: one lock, one read of
    the chain's head and one multi-row insert for all of them (the MLLP listener writes
    a group of messages' records with their rows)."""
    if not records:
        return []
    _lock_chain(conn)
    head = conn.execute(
        select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
    ).first()
    seq, previous = (head.seq, head.hash) if head else (0, GENESIS_HASH)
    recorded_at = now or utcnow()
    rows: list[dict[str, Any]] = []
    for record in records:
        seq += 1
        row: dict[str, Any] = {
            "seq": seq,
            "recorded_at": recorded_at,
            "event_type": record.event.code,
            "event_subtype": record.event.subtype,
            "action": record.action or record.event.action,
            "outcome": int(record.outcome),
            "operation": record.operation,
            "actor": record.actor[:255],
            "actor_kind": record.actor_kind,
            "actor_name": record.actor_name[:255] if record.actor_name else None,
            "source_address": record.source_address,
            "partition": record.partition,
            "entity": orjson.dumps(dict(record.entity), option=orjson.OPT_SORT_KEYS).decode(),
            "request": record.request,
            "detail": record.detail,
            "prev_hash": previous,
        }
        row["hash"] = previous = record_hash(row)
        rows.append(row)
    conn.execute(audit_log.insert(), rows)
    return [StoredAudit(row["seq"], row["hash"]) for row in rows]


def record_audit(engine: Engine, record: AuditRecord) -> StoredAudit:
    """Append ``record`` in a transaction of its own and commit it; AuditUnavailable
    when that fails (the caller must then fail the action it audits)."""
    try:
        with engine.begin() as conn:
            return append_audit(conn, record)
    except SQLAlchemyError as exc:
        raise AuditUnavailable(
            f"the audit record could not be written: {exc.__class__.__name__}"
        ) from exc


def _rows(
    engine: Engine, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> Iterator[dict[str, Any]]:
    query = select(audit_log).order_by(audit_log.c.seq)
    if since is not None:
        query = query.where(audit_log.c.recorded_at >= since)
    if until is not None:
        query = query.where(audit_log.c.recorded_at < until)
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=1000).execute(query)
        for row in result:
            yield dict(row._mapping)


@dataclass(frozen=True)
class Anchor:
    """A record number and its hash, kept outside the database (printed by ``medlake
    audit verify``): the chain must still hold that record, unchanged."""

    seq: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """``SEQ:HASH`` as printed by ``medlake audit verify``; InvalidInput otherwise."""
        seq, _, digest = text.strip().partition(":")
        if not seq.isdigit() or int(seq) < 1 or len(digest) != 64:
            raise InvalidInput(f"anchor {text!r} is not SEQ:HASH (a record number and its hash)")
        return cls(int(seq), digest.lower())

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


def verify_chain(engine: Engine, anchor: Anchor | None = None) -> VerifyResult:
    """Recompute the chain from the first record; stop at the first that does not fit.

    A record fits when its number follows the previous one, its ``prev_hash`` is the
    previous record's hash and its ``hash`` matches its contents. Records cut from the
    end leave a shorter chain that fits: ``anchor``, a record number and hash noted
    earlier outside the database, catches that (the chain must reach it, with that hash).
    """
    result = _verify_rows(engine)
    if anchor is None or not result.ok:
        return result
    if result.checked < anchor.seq:
        reason = (
            f"the chain ends at record {result.checked}, before the anchor record {anchor.seq}: "
            "records were removed from its end"
        )
        return VerifyResult(result.checked, result.head_hash, result.checked + 1, reason)
    with engine.connect() as conn:
        held = conn.execute(
            select(audit_log.c.hash).where(audit_log.c.seq == anchor.seq)
        ).scalar_one()
    if held != anchor.hash:
        reason = f"record {anchor.seq} does not have the anchor's hash: the chain was rewritten"
        return VerifyResult(result.checked, result.head_hash, anchor.seq, reason)
    return result


def _verify_rows(engine: Engine) -> VerifyResult:
    expected_seq, previous, checked = 1, GENESIS_HASH, 0
    for row in _rows(engine):
        seq = row["seq"]
        if seq != expected_seq:
            reason = f"record {expected_seq} is missing (next is {seq})"
            return VerifyResult(checked, previous, expected_seq, reason)
        if row["prev_hash"] != previous:
            return VerifyResult(
                checked, previous, seq, f"record {seq} does not follow record {seq - 1}"
            )
        if record_hash(row) != row["hash"]:
            return VerifyResult(
                checked, previous, seq, f"record {seq} was changed after it was written"
            )
        previous, expected_seq, checked = row["hash"], seq + 1, checked + 1
    return VerifyResult(checked, previous)


# --- FHIR R4 AuditEvent -------------------------------------------------------------------

_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_ROLE_TYPE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"


def _dcm(code: str) -> dict[str, str]:
    return {"system": DCM, "code": code, "display": DCM_CODES[code]}


def _entities(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """PS3.15 participant objects as AuditEvent.entity: the study (ID type 110180 Study
    Instance UID) with its series/instance, the FHIR resource, the query."""
    entity: dict[str, str] = orjson.loads(row["entity"])
    out: list[dict[str, Any]] = []
    details = [
        {"type": name, "valueString": entity[key]}
        for key, name in (("series", "SeriesInstanceUID"), ("instance", "SOPInstanceUID"))
        if entity.get(key)
    ]
    if row["partition"]:
        details.append({"type": "partition", "valueString": row["partition"]})
    if entity.get("study"):
        study: dict[str, Any] = {
            "what": {
                "identifier": {
                    "type": {
                        "coding": [
                            {"system": DCM, "code": "110180", "display": "Study Instance UID"}
                        ]
                    },
                    "system": "urn:dicom:uid",
                    "value": f"urn:oid:{entity['study']}",
                }
            },
            "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": _OBJECT_ROLE, "code": "3", "display": "Report"},
        }
        if details:
            study["detail"] = details
        out.append(study)
    if entity.get("resource"):
        is_patient = entity["resource"].startswith("Patient/")
        out.append(
            {
                "what": {"reference": entity["resource"]},
                "type": {"system": _ENTITY_TYPE, "code": "1" if is_patient else "2",
                         "display": "Person" if is_patient else "System Object"},
                "role": {"system": _OBJECT_ROLE, "code": "1" if is_patient else "4",
                         "display": "Patient" if is_patient else "Domain Resource"},
            }
        )  # fmt: skip
    if entity.get("query") is not None:
        out.append(
            {
                "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": _OBJECT_ROLE, "code": "24", "display": "Query"},
                "query": base64.b64encode(entity["query"].encode()).decode("ascii"),
                **({"detail": details} if details and not entity.get("study") else {}),
            }
        )
    return out


def audit_event(row: Mapping[str, Any], *, site: str = "medlake") -> dict[str, Any]:
    """One audit_log row as a FHIR R4 AuditEvent (JSON)."""
    requestor: dict[str, Any] = {
        "who": {"identifier": {"value": row["actor"]}},
        "requestor": True,
    }
    if row["actor_kind"] == "user":
        requestor["type"] = {
            "coding": [{"system": _ROLE_TYPE, "code": "humanuser", "display": "human user"}]
        }
    elif row["actor_kind"] == "ae":
        requestor["type"] = {
            "coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]
        }
    if row["actor_name"]:
        requestor["name"] = row["actor_name"]
    if row["source_address"]:
        requestor["network"] = {"address": row["source_address"], "type": "2"}  # 2 = IP address
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row["seq"]),
        "type": _dcm(row["event_type"]),
        "action": row["action"],
        "recorded": _instant(row["recorded_at"]),
        "outcome": str(row["outcome"]),
        "agent": [
            requestor,
            {
                "type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
                "who": {"display": site},
                "requestor": False,
            },
        ],
        "source": {
            "site": site,
            "observer": {"display": site},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    if row["event_subtype"]:
        event["subtype"] = [_dcm(row["event_subtype"])]
    description = "; ".join(v for v in (row["operation"], row["request"], row["detail"]) if v)
    if description:
        event["outcomeDesc"] = description
    entities = _entities(row)
    if entities:
        event["entity"] = entities
    return event


def export_audit_events(
    engine: Engine,
    out: IO[bytes],
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> int:
    """Write the records recorded in [since, until) as FHIR AuditEvent NDJSON (one
    resource per line, in chain order); returns how many were written."""
    count = 0
    for row in _rows(engine, since, until):
        out.write(orjson.dumps(audit_event(row)) + b"\n")
        count += 1
    return count


__all__ = [
    "ACCESS_DENIED",
    "AUDITED_ACTIONS",
    "AUTHENTICATION_FAILED",
    "DCM",
    "DCM_CODES",
    "GENESIS_HASH",
    "LOGIN",
    "LOGOUT",
    "Anchor",
    "AuditEventType",
    "AuditRecord",
    "Outcome",
    "StoredAudit",
    "VerifyResult",
    "append_audit",
    "append_audits",
    "audit_event",
    "export_audit_events",
    "record_audit",
    "record_hash",
    "verify_chain",
]
