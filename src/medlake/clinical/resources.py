"""FHIR R4 resources: parsing JSON bodies and validating resources.

Validation uses the pydantic models of the ``fhir.resources`` package, sub-package
``R4B``. Models of R4 itself (4.0.1) only exist in ``fhir.resources`` 6.x, which is
built on pydantic 1 and cannot share a process with pydantic 2 (the settings model);
R4B (4.3.0) is R4 with changes confined to the medication-definition, evidence and
subscription modules (hl7.org/fhir/R4B/diff.html), so every R4 resource outside
those modules has the same structure in both. medlake speaks R4 (4.0.1): it accepts
the R4 resource types whose R4B model is unchanged (:data:`RESOURCE_TYPES`), and
never the types R4B added.

On top of the models, three R4 rules the models leave out are checked: the JSON
representation rules (no ``null``, no empty object, array or string), the codes of
required bindings on ``code`` elements (``Patient.gender``, ``Observation.status``,
...), and the types of contained resources.

Decimals keep their text: ``1.50`` is read as a ``float`` that remembers it was
written ``1.50`` and is written back the same way (:func:`dump_resource`), since FHIR
counts the trailing zero as precision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from medlake.errors import InvalidResource, Unprocessable

FHIR_VERSION = "4.0.1"
FHIR_JSON = "application/fhir+json"

#: A FHIR logical id (R4 datatypes, ``id``).
ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

#: The R4 (4.0.1) resource types medlake stores: every R4 type except the ones R4B
#: removed or reworked (MedicinalProduct*, Substance*, the evidence syntheses,
#: Evidence, EvidenceVariable), whose R4B model would judge R4 content by other
#: rules, or which have no model at all. Bundle is accepted as a resource too
#: (document and collection bundles).
RESOURCE_TYPES: frozenset[str] = frozenset(
    [
        "Account",
        "ActivityDefinition",
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "AppointmentResponse",
        "AuditEvent",
        "Basic",
        "Binary",
        "BiologicallyDerivedProduct",
        "BodyStructure",
        "Bundle",
        "CapabilityStatement",
        "CarePlan",
        "CareTeam",
        "CatalogEntry",
        "ChargeItem",
        "ChargeItemDefinition",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "CodeSystem",
        "Communication",
        "CommunicationRequest",
        "CompartmentDefinition",
        "Composition",
        "ConceptMap",
        "Condition",
        "Consent",
        "Contract",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "Device",
        "DeviceDefinition",
        "DeviceMetric",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "Encounter",
        "Endpoint",
        "EnrollmentRequest",
        "EnrollmentResponse",
        "EpisodeOfCare",
        "EventDefinition",
        "ExampleScenario",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "GraphDefinition",
        "Group",
        "GuidanceResponse",
        "HealthcareService",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "ImplementationGuide",
        "InsurancePlan",
        "Invoice",
        "Library",
        "Linkage",
        "List",
        "Location",
        "Measure",
        "MeasureReport",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationKnowledge",
        "MedicationRequest",
        "MedicationStatement",
        "MessageDefinition",
        "MessageHeader",
        "MolecularSequence",
        "NamingSystem",
        "NutritionOrder",
        "Observation",
        "ObservationDefinition",
        "OperationDefinition",
        "OperationOutcome",
        "Organization",
        "OrganizationAffiliation",
        "Parameters",
        "Patient",
        "PaymentNotice",
        "PaymentReconciliation",
        "Person",
        "PlanDefinition",
        "Practitioner",
        "PractitionerRole",
        "Procedure",
        "Provenance",
        "Questionnaire",
        "QuestionnaireResponse",
        "RelatedPerson",
        "RequestGroup",
        "ResearchDefinition",
        "ResearchElementDefinition",
        "ResearchStudy",
        "ResearchSubject",
        "RiskAssessment",
        "Schedule",
        "SearchParameter",
        "ServiceRequest",
        "Slot",
        "Specimen",
        "SpecimenDefinition",
        "StructureDefinition",
        "StructureMap",
        "Subscription",
        "SupplyDelivery",
        "SupplyRequest",
        "Task",
        "TerminologyCapabilities",
        "TestReport",
        "TestScript",
        "ValueSet",
        "VerificationResult",
        "VisionPrescription",
    ]
)

#: Required value sets whose codes ``fhir.resources`` lists only in part ("a | b +").
_FULL_REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Observation", "status"): frozenset(
        [
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        ]
    ),
    ("DiagnosticReport", "status"): frozenset(
        [
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        ]
    ),
    ("Encounter", "status"): frozenset(
        [
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        ]
    ),
}


class FhirDecimal(float):
    """A JSON number with a fraction or exponent, remembering how it was written."""

    __slots__ = ("text",)

    text: str

    def __new__(cls, text: str) -> FhirDecimal:
        """The number written ``text``."""
        value = super().__new__(cls, text)
        value.text = text
        return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes | str, what: str = "request body") -> Any:
    """Parse a JSON document, keeping the text of decimals; 400 when it is not JSON."""
    try:
        return json.loads(body, parse_float=FhirDecimal, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidResource(
            f"{what} is not valid JSON: {exc}",
            issues=[issue("structure", f"{what} is not valid JSON: {exc}")],
        ) from exc


def _dump_default(value: Any) -> Any:
    if isinstance(value, FhirDecimal):
        return orjson.Fragment(value.text)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dump_resource(resource: Any) -> bytes:
    """The JSON bytes of a resource (or any JSON value), decimals as they were written."""
    return orjson.dumps(resource, default=_dump_default)


def issue(
    code: str,
    diagnostics: str,
    expression: str | None = None,
    *,
    severity: str = "error",
) -> dict[str, Any]:
    """One ``OperationOutcome.issue``; ``expression`` is a FHIRPath (also put in the
    older ``location``)."""
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
        out["location"] = [expression]
    return out


def check_id(value: str, what: str = "resource id") -> str:
    """``value`` if it is a valid FHIR id (``[A-Za-z0-9\\-.]{1,64}``), else 400."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        message = f"{what} {value!r} is not a valid FHIR id: use 1-64 letters, digits, '-' or '.'"
        raise InvalidResource(message, issues=[issue("value", message)])
    return value


def check_resource_type(name: str) -> str:
    """``name`` if medlake stores resources of that type."""
    if name not in RESOURCE_TYPES:
        message = f"{name!r} is not a FHIR R4 resource type medlake supports"
        raise InvalidResource(message, issues=[issue("not-supported", message)])
    return name


def parse_resource(
    body: bytes | str,
    *,
    resource_type: str | None = None,
    resource_id: str | None = None,
) -> dict[str, Any]:
    """Parse and validate a request body holding one resource.

    ``resource_type`` / ``resource_id`` are the ones the URL names: the body must agree
    with them (400 otherwise; on update the id is required). Raises
    :class:`InvalidResource` (400) for what is not a resource at all and
    :class:`Unprocessable` (422) for a resource that breaks the R4 rules.
    """
    resource = parse_json(body)
    check_envelope(resource, resource_type=resource_type, resource_id=resource_id)
    validate_resource(resource)
    return dict(resource)


def check_envelope(
    resource: Any,
    *,
    resource_type: str | None = None,
    resource_id: str | None = None,
    expression: str = "",
) -> None:
    """The checks that make a request body a resource of the right type and id (400)."""
    where = expression or None
    if not isinstance(resource, dict):
        message = "the body must be a JSON object holding a FHIR resource"
        raise InvalidResource(message, issues=[issue("structure", message, where)])
    found = resource.get("resourceType")
    if not isinstance(found, str) or not found:
        message = "the resource has no resourceType"
        raise InvalidResource(message, issues=[issue("required", message, where)])
    if resource_type is not None and found != resource_type:
        message = f"the resource is a {found}, but the URL names {resource_type}"
        raise InvalidResource(message, issues=[issue("invalid", message, where)])
    check_resource_type(found)
    body_id = resource.get("id")
    if body_id is not None:
        check_id(body_id)
    if resource_id is not None:
        if body_id is None:
            message = f"the resource has no id; the URL names id {resource_id!r}"
            raise InvalidResource(message, issues=[issue("required", message, where)])
        if body_id != resource_id:
            message = f"the resource id {body_id!r} differs from the id {resource_id!r} in the URL"
            raise InvalidResource(message, issues=[issue("invalid", message, where)])


def validate_resource(resource: dict[str, Any], *, expression: str | None = None) -> None:
    """Validate a resource against the R4 rules of its type; :class:`Unprocessable`
    (422) listing every problem found, each with its FHIRPath."""
    resource_type: str = resource["resourceType"]
    root = expression or resource_type
    problems = list(_json_rule_issues(resource, root))
    if not problems:
        problems = list(_model_issues(resource, root))
    if problems:
        first = problems[0]
        where = first.get("expression", [root])[0]
        summary = f"{resource_type} is not valid FHIR R4: {where}: {first['diagnostics']}"
        if len(problems) > 1:
            summary += f" (and {len(problems) - 1} more)"
        raise Unprocessable(summary, issues=problems)


def _json_rule_issues(value: Any, path: str) -> Iterator[dict[str, Any]]:
    """FHIR JSON rules: no null outside primitive-extension arrays, nothing empty."""
    if isinstance(value, dict):
        if not value:
            yield issue("invalid", "an object must not be empty", path)
        for key, item in value.items():
            child = f"{path}.{key}"
            if item is None:
                yield issue("invalid", "null is not allowed in FHIR JSON", child)
            elif key.startswith("_") and isinstance(item, list):
                # Arrays of primitive extensions align with their values: null is a gap there.
                for index, element in enumerate(item):
                    if element is not None:
                        yield from _json_rule_issues(element, f"{child}[{index}]")
            else:
                yield from _json_rule_issues(item, child)
    elif isinstance(value, list):
        if not value:
            yield issue("invalid", "an array must not be empty", path)
        for index, element in enumerate(value):
            if element is not None:
                yield from _json_rule_issues(element, f"{path}[{index}]")
    elif isinstance(value, str) and not value.strip():
        yield issue("invalid", "a string must not be empty or only whitespace", path)


_PYDANTIC_CODES = {
    "missing": "required",
    "extra_forbidden": "structure",
}


def _fhir_path(root: str, loc: tuple[int | str, ...]) -> str:
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier():
            path += f".{part}"
        # other parts name pydantic validators (``function-after[...]``), not elements
    return path


def _model_issues(resource: dict[str, Any], root: str) -> Iterator[dict[str, Any]]:
    for index, contained in enumerate(resource.get("contained") or []):
        kind = contained.get("resourceType") if isinstance(contained, dict) else None
        if kind not in RESOURCE_TYPES:
            yield issue(
                "structure",
                f"contained resource type {kind!r} is not a FHIR R4 resource type",
                f"{root}.contained[{index}]",
            )
            return
    model = _model_class(resource["resourceType"])
    try:
        validated = model.model_validate(resource)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            code = _PYDANTIC_CODES.get(error["type"], "value")
            message = error["msg"].removeprefix("Value error, ")
            yield issue(code, message, _fhir_path(root, tuple(error["loc"])))
        return
    except (KeyError, TypeError, ValueError) as exc:  # raised outside pydantic's checks
        yield issue("structure", f"cannot be read as {resource['resourceType']}: {exc}", root)
        return
    yield from _code_issues(validated, root)


@cache
def _model_class(resource_type: str) -> type[FHIRAbstractModel]:
    model: type[FHIRAbstractModel] = get_fhir_model_class(resource_type)
    return model


@cache
def _required_codes(model: type[FHIRAbstractModel]) -> dict[str, tuple[str, frozenset[str]]]:
    """``code`` fields of ``model`` bound to a value set whose codes are all known:
    field name -> (JSON name, allowed codes)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        codes = extra.get("enum_values") if isinstance(extra, dict) else None
        alias = info.alias or name
        full = _FULL_REQUIRED_CODES.get((model.__name__, alias))
        if full is not None:
            out[name] = (alias, full)
        elif (
            isinstance(codes, list)
            and codes
            and "+" not in codes
            and "Code" in repr(info.annotation)
        ):
            out[name] = (alias, frozenset(str(c) for c in codes))
    return out


@cache
def _aliases(model: type[FHIRAbstractModel]) -> dict[str, str]:
    return {name: info.alias or name for name, info in model.model_fields.items()}


def _code_issues(model: FHIRAbstractModel, path: str) -> Iterator[dict[str, Any]]:
    """Codes outside the required value set, anywhere in the validated resource."""
    cls = type(model)
    required = _required_codes(cls)
    aliases = _aliases(cls)
    for name, value in model.__dict__.items():
        if value is None:
            continue
        if name in required:
            alias, codes = required[name]
            values = value if isinstance(value, list) else [value]
            for index, code in enumerate(values):
                if code not in codes:
                    where = f"{path}.{alias}" + (f"[{index}]" if isinstance(value, list) else "")
                    allowed = ", ".join(sorted(codes))
                    yield issue(
                        "code-invalid",
                        f"{code!r} is not one of the codes allowed here: {allowed}",
                        where,
                    )
        elif isinstance(value, FHIRAbstractModel):
            yield from _code_issues(value, f"{path}.{aliases.get(name, name)}")
        elif isinstance(value, list):
            alias = aliases.get(name, name)
            for index, element in enumerate(value):
                if isinstance(element, FHIRAbstractModel):
                    yield from _code_issues(element, f"{path}.{alias}[{index}]")


__all__ = [
    "FHIR_JSON",
    "FHIR_VERSION",
    "ID_PATTERN",
    "RESOURCE_TYPES",
    "FhirDecimal",
    "check_envelope",
    "check_id",
    "check_resource_type",
    "dump_resource",
    "issue",
    "parse_json",
    "parse_resource",
    "validate_resource",
]
