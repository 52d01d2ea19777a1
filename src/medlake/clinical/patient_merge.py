"""Merging two Patient resources (HL7 v2 ADT^A40, or an operator's decision).

``merge_patients(archive, source, target)`` moves everything known about the
``source`` patient to the ``target`` patient, in one write transaction:

- every resource of the partition that references ``Patient/{source}`` (found by the
  reference search parameters: Observation.subject, Encounter.subject,
  DiagnosticReport.subject, ServiceRequest.subject, ... ) gets a new version whose
  references to the source point to the target instead;
- the source gets ``active: false`` and a ``link`` of type ``replaced-by`` to the
  target, the target a ``link`` of type ``replaces`` to the source (FHIR R4
  Patient.link, the patient-merge pattern of the FHIR $merge operation).

History keeps the earlier versions, so what each resource said before the merge
stays readable.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import select

from medlake.clinical.patient_identity import relink_merged
from medlake.clinical.store import CurrentRow, WriteOp, WriteSession, run_write
from medlake.errors import InvalidInput, NotFound
from medlake.index.schema import fhir_resources, fhir_search_values
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION

__all__ = ["MergeResult", "merge_patients"]


@dataclass(frozen=True)
class MergeResult:
    """What a merge changed: the resources re-pointed (``Type/id``), and the two
    patients' new versions."""

    source: str
    target: str
    repointed: list[str] = field(default_factory=list)


def _logical_id(value: str) -> str:
    """``123`` from ``123`` or ``Patient/123``."""
    if "/" in value:
        kind, _, logical_id = value.partition("/")
        if kind != "Patient":
            raise InvalidInput(f"{value!r} does not name a Patient")
        return logical_id
    return value


def merge_patients(
    archive: Archive, source: str, target: str, *, partition: str = DEFAULT_PARTITION
) -> MergeResult:
    """Merge Patient ``source`` into Patient ``target`` (ids, or ``Patient/id``).

    404 when either does not exist (or is deleted); 400 when they are the same.
    Merging again changes nothing new: the links are not repeated and nothing still
    references the source.
    """
    source_id, target_id = _logical_id(source), _logical_id(target)
    if source_id == target_id:
        raise InvalidInput(f"cannot merge Patient/{source_id} into itself")
    return run_write(archive, partition, lambda s: _merge(s, source_id, target_id))


def _merge(session: WriteSession, source_id: str, target_id: str) -> MergeResult:
    patients = session.current("Patient", [source_id, target_id])
    for logical_id in (source_id, target_id):
        row = patients.get(logical_id)
        if row is None or row.deleted:
            raise NotFound(f"Patient/{logical_id} does not exist")
    ops: list[WriteOp] = []
    repointed: list[str] = []
    pattern = _reference_pattern(source_id)
    for row in session.current_by_pk(_referencing(session, source_id)):
        if row.deleted or (
            row.resource_type == "Patient" and row.logical_id in (source_id, target_id)
        ):
            continue
        resource = _content(session, row)
        changed = _repoint(resource, pattern, f"Patient/{target_id}")
        if changed:
            ops.append(WriteOp(row.resource_type, row.logical_id, resource, "PUT", row))
            repointed.append(f"{row.resource_type}/{row.logical_id}")
    source_row, target_row = patients[source_id], patients[target_id]
    source_patient = _content(session, source_row)
    source_patient["active"] = False
    _add_link(source_patient, target_id, "replaced-by")
    target_patient = _content(session, target_row)
    _add_link(target_patient, source_id, "replaces")
    ops.append(WriteOp("Patient", source_id, source_patient, "PUT", source_row))
    ops.append(WriteOp("Patient", target_id, target_patient, "PUT", target_row))
    session.apply(ops)
    # Imaging side (patient identity): the source's studies, identifiers and records move
    # to the target's patient key in the same transaction.
    relink_merged(session.conn, session.partition_pk, source_id, target_id)
    return MergeResult(f"Patient/{source_id}", f"Patient/{target_id}", repointed)


def _referencing(session: WriteSession, source_id: str) -> list[int]:
    """Rows of the partition with a reference search value naming the source."""
    v, r = fhir_search_values.c, fhir_resources.c
    found = session.conn.execute(
        select(v.resource_id)
        .join(fhir_resources, r.id == v.resource_id)
        .where(
            v.ref_type == "Patient",
            v.ref_id == source_id,
            r.partition_id == session.partition_pk,
            r.deleted.is_(False),
        )
        .distinct()
    ).scalars()
    return sorted(int(pk) for pk in found)


def _content(session: WriteSession, row: CurrentRow) -> dict[str, Any]:
    text = session.conn.execute(
        select(fhir_resources.c.content).where(fhir_resources.c.id == row.pk)
    ).scalar_one()
    resource: dict[str, Any] = orjson.loads(text)
    resource.pop("meta", None)  # the store sets versionId / lastUpdated anew
    return resource


def _reference_pattern(source_id: str) -> re.Pattern[str]:
    """``Patient/{id}``, relative or absolute, with or without ``/_history/n``."""
    return re.compile(rf"^(?:.*/)?Patient/{re.escape(source_id)}(?:/_history/[^/]+)?$")


def _repoint(node: Any, pattern: re.Pattern[str], target: str) -> bool:
    """Replace, in place, every ``reference`` matching ``pattern`` with ``target``."""
    changed = False
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and pattern.match(value):
                node[key] = target
                changed = True
            else:
                changed = _repoint(value, pattern, target) or changed
    elif isinstance(node, list):
        for item in node:
            changed = _repoint(item, pattern, target) or changed
    return changed


def _add_link(patient: dict[str, Any], other_id: str, kind: str) -> None:
    links = copy.deepcopy(patient.get("link") or [])
    reference = f"Patient/{other_id}"
    if not any(
        link.get("other", {}).get("reference") == reference and link.get("type") == kind
        for link in links
    ):
        links.append({"other": {"reference": reference}, "type": kind})
    patient["link"] = links
