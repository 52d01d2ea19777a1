"""The audit trail of DIMSE associations: who (the calling AE, from which address) read,
searched or stored which patient data, in the same hash-chained log as HTTP requests
(:mod:`medlake.security.audit`), with the AE as the actor (kind ``ae``).

- A rejected association (unknown calling AE, or a registered one calling from
  elsewhere) is a failed authentication (DCM 110114 / 110122).
- C-FIND is a Query (110112), C-MOVE and C-GET are DICOM Instances Transferred (110104,
  action R), each recorded before the first response is sent; when the record cannot be
  written the request fails (as HTTP answers 503) and nothing is sent.
- C-STOREs are recorded as PS3.15 A.5.3.5 describes a transfer: once it is complete,
  one DICOM Instances Transferred record (action C) per study at the end of the
  association (:class:`StoreAudit`), not one per instance.
- A request the policy refuses is a Security Alert (110113 / 110132).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from sqlalchemy import Connection, func, select
from sqlalchemy.exc import SQLAlchemyError

from medlake.dimse.ae_registry import CallingAeRules
from medlake.index.schema import instances, partitions, studies
from medlake.ingest.archive import Archive
from medlake.security import Action, AuditRecord, record_audit
from medlake.security.audit import (
    ACCESS_DENIED,
    AUDITED_ACTIONS,
    AUTHENTICATION_FAILED,
    AuditEventType,
    Outcome,
    append_audit,
)

log = logging.getLogger(__name__)

_ENTITY_KEYS = (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
                ("SOPInstanceUID", "instance"))  # fmt: skip
#: C-STORE statuses of a stored instance: success and the warnings (PS3.4 B.2.3).
_STORED = frozenset({0x0000, 0x0001, 0xB000, 0xB006, 0xB007})


def _record(
    rules: CallingAeRules,
    event: AuditEventType,
    action: Action,
    *,
    outcome: Outcome = Outcome.SUCCESS,
    entity: dict[str, str] | None = None,
    request: str | None = None,
    detail: str | None = None,
) -> AuditRecord:
    principal = rules.principal
    return AuditRecord(
        event=event,
        operation=action.value,
        actor=rules.calling_ae,
        actor_kind="ae",
        actor_name=principal.display_name if principal else None,
        source_address=rules.address,
        partition=rules.partition,
        entity=entity or {},
        request=request,
        outcome=outcome,
        detail=detail,
    )


def identifier_text(identifier: Dataset) -> str:
    """A C-FIND / C-MOVE / C-GET identifier as ``Keyword=value&…`` (the query of the
    audit record; empty values are the return keys that were asked for)."""
    parts = []
    for element in identifier:
        if element.VR == "SQ":
            continue
        value = element.value
        text = "\\".join(map(str, value)) if isinstance(value, list | tuple) else str(value or "")
        parts.append(f"{element.keyword or element.tag}={text}")
    return "&".join(parts)


def _entity(identifier: Dataset, query: str) -> dict[str, str]:
    """The study / series / instance a retrieve names (when it names one of each)."""
    entity = {"query": query}
    for keyword, key in _ENTITY_KEYS:
        value = identifier.get(keyword)
        if isinstance(value, str) and value.strip() and "\\" not in value:
            entity[key] = value.strip()
    return entity


def audit_rejected_association(
    archive: Archive, calling_ae: str, address: str | None, reason: str
) -> None:
    """Record an association refused at A-ASSOCIATE-RQ (best effort: the peer is
    rejected whether or not the record is written)."""
    record = AuditRecord(
        event=AUTHENTICATION_FAILED, operation="dimse.associate", actor=calling_ae or "(none)",
        actor_kind="ae", source_address=address, outcome=Outcome.MINOR_FAILURE, detail=reason,
    )  # fmt: skip
    try:
        record_audit(archive.engine, record)
    except Exception as exc:  # the rejection stands; only its record is missing
        log.error("audit record of a rejected association not written: %s", exc)


def audit_request(
    archive: Archive,
    rules: CallingAeRules,
    action: Action,
    identifier: Dataset,
    request: str,
    *,
    allowed: bool,
    reason: str = "",
) -> None:
    """Record a C-FIND (``DICOM_SEARCH``) or C-MOVE / C-GET (``DICOM_READ``) before it is
    answered: the event of the action when allowed, a Security Alert when refused.
    AuditUnavailable when it cannot be written (the request must then fail)."""
    query = identifier_text(identifier)
    entity = _entity(identifier, query) if action is Action.DICOM_READ else {"query": query}
    if allowed:
        record = _record(rules, AUDITED_ACTIONS[action], action, entity=entity, request=request)
    else:
        record = _record(
            rules, ACCESS_DENIED, action, outcome=Outcome.MINOR_FAILURE, entity=entity,
            request=request, detail=reason,
        )  # fmt: skip
    record_audit(archive.engine, record)


@dataclass
class StoreAudit:
    """The C-STOREs of one association, recorded when it ends (thread-safe)."""

    rules: CallingAeRules
    stored: list[str] = field(default_factory=list)
    failed: int = 0
    refused: int = 0
    refusal: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sop_uid: str | None, status: int) -> None:
        """Note one C-STORE and the status it was answered with."""
        with self._lock:
            if status in _STORED and sop_uid:
                self.stored.append(sop_uid)
            else:
                self.failed += 1

    def refuse(self, reason: str) -> None:
        """Note a C-STORE the policy refused."""
        with self._lock:
            self.refused += 1
            self.refusal = reason

    def flush(self, archive: Archive, how: str) -> None:
        """Write the association's records: one per study stored into, one for the
        failures, one for the refusals (logged, not raised, when they cannot be)."""
        with self._lock:
            stored, failed, refused = list(self.stored), self.failed, self.refused
            self.stored, self.failed, self.refused = [], 0, 0
        if not (stored or failed or refused):
            return
        event = AUDITED_ACTIONS[Action.DICOM_STORE]
        request = f"C-STORE ({how})"
        try:
            with archive.engine.begin() as conn:
                for study, count in _studies_of(conn, self.rules.partition, stored).items():
                    append_audit(conn, _record(
                        self.rules, event, Action.DICOM_STORE, entity={"study": study},
                        request=request, detail=f"instances stored: {count}",
                    ))  # fmt: skip
                if failed:
                    append_audit(conn, _record(
                        self.rules, event, Action.DICOM_STORE, outcome=Outcome.MINOR_FAILURE,
                        request=request, detail=f"instances not stored: {failed}",
                    ))  # fmt: skip
                if refused:
                    append_audit(conn, _record(
                        self.rules, ACCESS_DENIED, Action.DICOM_STORE,
                        outcome=Outcome.MINOR_FAILURE, request=request,
                        detail=f"{refused} C-STORE requests refused: {self.refusal}",
                    ))  # fmt: skip
        except SQLAlchemyError as exc:
            log.error("audit records of %s's C-STOREs not written: %s", self.rules.calling_ae, exc)


def _studies_of(conn: Connection, partition: str, sop_uids: Iterable[str]) -> Counter[str]:
    """How many of ``sop_uids`` are stored in each study of ``partition``."""
    counts: Counter[str] = Counter()
    uids = sorted(set(sop_uids))
    partition_pk = select(partitions.c.id).where(partitions.c.name == partition).scalar_subquery()
    for start in range(0, len(uids), 500):
        rows = conn.execute(
            select(studies.c.study_uid, func.count())
            .select_from(instances.join(studies, studies.c.id == instances.c.study_id))
            .where(
                instances.c.partition_id == partition_pk,
                instances.c.sop_uid.in_(uids[start : start + 500]),
            )
            .group_by(studies.c.study_uid)
        )
        for study, count in rows:
            counts[study] += count
    return counts


__all__ = [
    "StoreAudit",
    "audit_rejected_association",
    "audit_request",
    "identifier_text",
]
