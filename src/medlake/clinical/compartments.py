"""FHIR Patient compartments (R4 ``CompartmentDefinition`` patient) and the restriction
of what a caller sees or writes to them.

A caller limited to compartments (a grant on ``Patient/123``, or SMART ``patient/``
scopes with a patient in the launch context) may only see and change resources in
those patients' compartments. One definition serves every place that needs it: the
SQL condition (search, ``_include``/``_revinclude``, counts, conditional matches,
history, Patient/Group ``$export``) and the check of one resource's JSON (reads and
writes), so they cannot disagree.

A resource is in ``Patient/123``'s compartment when it is that Patient, or when one of
the reference parameters :data:`PATIENT_COMPARTMENT` lists for its type points at it.
Types that list none (Organization, Practitioner, Medication...) are in no patient's
compartment, so a compartment-limited caller does not see them.

Only Patient compartments are supported: a grant on an Encounter, RelatedPerson,
Practitioner or Device compartment is refused (403) by :func:`compartment_patients`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import Select, and_, exists, false, literal, or_, select, true
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import FromClause

from medlake.clinical.search_index import extract_values
from medlake.clinical.search_params import parameters_of
from medlake.index.schema import fhir_search_values
from medlake.security.errors import Forbidden

#: The Patient compartment (R4 CompartmentDefinition ``patient``) for the resource types
#: medlake indexes: the reference parameters that put a resource in a patient's
#: compartment. Patient itself is in its own compartment by id.
PATIENT_COMPARTMENT: dict[str, tuple[str, ...]] = {
    "AuditEvent": ("patient",),
    "Condition": ("patient", "asserter"),
    "Consent": ("patient",),
    "DiagnosticReport": ("subject",),
    "DocumentReference": ("subject", "author"),
    "Encounter": ("patient",),
    "Group": ("member",),
    "ImagingStudy": ("patient",),
    "MedicationRequest": ("subject",),
    "Observation": ("subject", "performer"),
    "Procedure": ("patient", "performer"),
    "Provenance": ("patient",),
    "ServiceRequest": ("subject", "performer"),
}

#: The patients whose compartments a caller may see: ids, a subquery of ids, or ``None``
#: for every patient's compartment (Patient-level export).
PatientIds = Sequence[str] | Select[Any] | None


def compartment_params(resource_type: str) -> tuple[str, ...]:
    """The reference parameters of ``resource_type`` that medlake indexes and that put a
    resource in a Patient compartment (empty: not in the compartment)."""
    known = parameters_of(resource_type)
    return tuple(
        name
        for name in PATIENT_COMPARTMENT.get(resource_type, ())
        if name in known and known[name].type == "reference"
    )


def in_patient_compartment_types() -> list[str]:
    """Every resource type that can be in a Patient compartment, Patient included."""
    return ["Patient", *sorted(t for t in PATIENT_COMPARTMENT if compartment_params(t))]


def compartment_patients(compartments: Iterable[str] | None) -> tuple[str, ...] | None:
    """The patient ids of a decision's compartments (``Patient/123`` → ``123``);
    ``None`` stays ``None`` (no limit). Other compartments are refused (403): medlake
    cannot yet tell which resources they hold."""
    if compartments is None:
        return None
    patients: list[str] = []
    for compartment in sorted(compartments):
        kind, _, patient = compartment.partition("/")
        if kind != "Patient" or not patient:
            raise Forbidden(
                f"access limited to the {compartment} compartment is not supported; only "
                "Patient compartments (Patient/<id>) are"
            )
        patients.append(patient)
    return tuple(patients)


def compartment_condition(
    resource: FromClause, patients: PatientIds, resource_type: str | None = None
) -> ColumnElement[bool]:
    """SQL: the row of ``resource`` (``fhir_resources`` or an alias) is in the compartment
    of one of ``patients`` (``None``: of any patient). ``resource_type`` narrows the
    condition to one type when the caller already selects only that type."""
    types = [resource_type] if resource_type else in_patient_compartment_types()
    alternatives: list[ColumnElement[bool]] = []
    if "Patient" in types:
        own: ColumnElement[bool] = (
            true() if patients is None else resource.c.logical_id.in_(patients)
        )
        if resource_type is None:
            own = and_(resource.c.resource_type == "Patient", own)
        alternatives.append(own)
    by_type = [(t, compartment_params(t)) for t in types if t != "Patient"]
    by_type = [(t, params) for t, params in by_type if params]
    if by_type:
        values = fhir_search_values.alias()
        param_match: ColumnElement[bool]
        if resource_type is not None:
            param_match = values.c.param.in_(by_type[0][1])
        else:
            param_match = or_(
                *(
                    and_(values.c.resource_type == t, values.c.param.in_(params))
                    for t, params in by_type
                )
            )
        reference = select(literal(1)).where(
            values.c.resource_id == resource.c.id,
            param_match,
            values.c.ref_type == "Patient",
        )
        if patients is not None:
            reference = reference.where(values.c.ref_id.in_(patients))
        alternatives.append(exists(reference))
    if not alternatives:
        return false()
    return alternatives[0] if len(alternatives) == 1 else or_(*alternatives)


def resource_in_compartment(resource: dict[str, Any], patients: Collection[str]) -> bool:
    """Whether the resource JSON (with its ``id``) is in one of ``patients``'
    compartments, by the same parameters the SQL condition uses."""
    resource_type = str(resource.get("resourceType", ""))
    if resource_type == "Patient":
        return resource.get("id") in patients
    params = compartment_params(resource_type)
    if not params:
        return False
    return any(
        row["param"] in params and row["ref_type"] == "Patient" and row["ref_id"] in patients
        for row in extract_values(resource)
    )


def outside_compartment(reference: str, patients: Collection[str]) -> Forbidden:
    """The refusal of a write that would leave (or reach outside) the compartments."""
    allowed = ", ".join(f"Patient/{p}" for p in patients) or "none"
    return Forbidden(f"{reference} is outside the compartments this caller may change ({allowed})")


__all__ = [
    "PATIENT_COMPARTMENT",
    "PatientIds",
    "compartment_condition",
    "compartment_params",
    "compartment_patients",
    "in_patient_compartment_types",
    "outside_compartment",
    "resource_in_compartment",
]
