"""The ``Patient/$merge`` operation (FHIR R5 OperationDefinition Patient-merge, served
on R4 resources).

In parameters: the source patient (``source-patient`` reference or
``source-patient-identifier``), the target (``target-patient`` or
``target-patient-identifier``), optionally ``result-patient`` (the target as it should
read after the merge; its id must be the target's) and ``preview``. Identifiers must
name exactly one Patient each (400 otherwise). The merge itself is
:func:`medlake.clinical.patient_merge.merge_patients`, the same function ADT^A40 ends
in: references are re-pointed, the source becomes inactive with a ``replaced-by`` link,
and the imaging side (the source's studies and identifiers) moves to the target's
patient key. The out ``Parameters``: ``input`` (the request), ``outcome`` and
``result`` (the target Patient as stored).
"""

from __future__ import annotations

from typing import Any

from medlake.clinical.outcome import information
from medlake.clinical.patient_merge import merge_patients
from medlake.clinical.resources import check_envelope
from medlake.clinical.store import WriteSession, read_resource, run_write, update_resource
from medlake.errors import InvalidInput, NotFound
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION

__all__ = ["merge_operation"]

_KNOWN = frozenset(
    {
        "source-patient",
        "source-patient-identifier",
        "target-patient",
        "target-patient-identifier",
        "result-patient",
        "preview",
    }
)


def _parameters(body: Any) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidInput("Patient/$merge takes a Parameters resource")
    out: dict[str, list[dict[str, Any]]] = {}
    for parameter in body.get("parameter") or []:
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if name not in _KNOWN:
            raise InvalidInput(f"Patient/$merge has no parameter {name!r}")
        out.setdefault(str(name), []).append(parameter)
    return out


def _patient_id(session: WriteSession, given: dict[str, list[dict[str, Any]]], side: str) -> str:
    references = given.get(f"{side}-patient") or []
    identifiers = given.get(f"{side}-patient-identifier") or []
    if len(references) > 1:
        raise InvalidInput(f"{side}-patient is given more than once")
    if references:
        reference = (references[0].get("valueReference") or {}).get("reference")
        if not isinstance(reference, str) or not reference.startswith("Patient/"):
            raise InvalidInput(f"{side}-patient must be a valueReference to Patient/id")
        return reference.split("/")[1]
    if not identifiers:
        raise InvalidInput(f"give {side}-patient or {side}-patient-identifier")
    found: set[str] = set()
    for parameter in identifiers:
        identifier = parameter.get("valueIdentifier") or {}
        value = identifier.get("value")
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"{side}-patient-identifier needs a valueIdentifier with a value")
        token = _escape(value)
        if identifier.get("system"):
            token = f"{_escape(identifier['system'])}|{token}"
        matches = session.matches("Patient", [("identifier", token)])
        found.update(row.logical_id for row in matches)
    if len(found) != 1:
        what = "no Patient" if not found else f"{len(found)} Patients"
        raise InvalidInput(f"{side}-patient-identifier names {what}; it must name exactly one")
    return found.pop()


def _escape(text: str) -> str:
    """A search value with FHIR's escapes (``\\``, ``,``, ``$``, ``|``)."""
    for char in ("\\", ",", "$", "|"):
        text = text.replace(char, "\\" + char)
    return text


def merge_operation(
    archive: Archive, body: Any, *, partition: str = DEFAULT_PARTITION
) -> dict[str, Any]:
    """Run ``Patient/$merge`` with the in ``Parameters`` ``body``; returns the out
    ``Parameters``. 400 for bad parameters, 404 for a patient that does not exist."""
    given = _parameters(body)
    source_id, target_id = run_write(
        archive,
        partition,
        lambda s: (_patient_id(s, given, "source"), _patient_id(s, given, "target")),
    )
    if source_id == target_id:
        raise InvalidInput(f"the source and target are both Patient/{target_id}")
    result_patient = None
    if given.get("result-patient"):
        result_patient = given["result-patient"][0].get("resource")
        check_envelope(result_patient, resource_type="Patient", resource_id=target_id)
    preview = any(p.get("valueBoolean") is True for p in given.get("preview") or [])
    for logical_id in (source_id, target_id):
        read_resource(archive, "Patient", logical_id, partition=partition)  # 404 / 410
    if preview:
        text = f"preview: Patient/{source_id} would be merged into Patient/{target_id}"
    else:
        if result_patient is not None:
            update_resource(archive, "Patient", target_id, result_patient, partition=partition)
        merged = merge_patients(archive, source_id, target_id, partition=partition)
        text = (
            f"merged {merged.source} into {merged.target}; "
            f"{len(merged.repointed)} resources re-pointed"
        )
    try:
        result = read_resource(archive, "Patient", target_id, partition=partition).resource()
    except NotFound:  # pragma: no cover - read above
        result = None
    out: dict[str, Any] = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "input", "resource": body},
            {"name": "outcome", "resource": information(text)},
        ],
    }
    if result is not None:
        out["parameter"].append({"name": "result", "resource": result})
    return out
