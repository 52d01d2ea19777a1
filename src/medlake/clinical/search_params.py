"""The FHIR R4 search parameters medlake indexes, and the element paths that feed them.

Names, types, FHIRPath expressions and reference targets are those of the R4 (4.0.1)
specification's ``search-parameters.json``. No maintained PyPI package ships that
file for R4 (the packages that carry the specification ship StructureDefinitions,
or download the definitions at run time), so the table is written out here, for the
resource types medlake stores clinical data in.

A FHIRPath engine is far too slow for the write path (every stored resource is
indexed in the writer's transaction), so each parameter also carries one or more
:class:`ElementPath` objects: dotted element names with the choice type spelt out
(``valueQuantity``), an optional ``(key=value)`` filter per step (for
``telecom.where(system='phone')``), and ``exists()`` at the end. The reference
filter ``where(resolve() is Patient)`` becomes the parameter's ``targets``.
"""

# The parameter table is one row per parameter, as in the specification; wrapping them
# would make it harder to compare with the spec than long lines do.
# ruff: noqa: E501

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "COMMON_PARAMETERS",
    "SEARCH_PARAMETERS",
    "CompositeComponent",
    "ElementPath",
    "ParamType",
    "SearchParameter",
    "parameters_of",
]

ParamType = Literal[
    "number", "date", "string", "token", "reference", "quantity", "uri", "composite"
]

_STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)(?:\(([^)]*)\))?")


@dataclass(frozen=True)
class ElementPath:
    """A simple element path: ``Patient.telecom(system=phone)``, ``Observation.valueQuantity``,
    ``Patient.deceasedDateTime.exists()``.

    The first step names the resource type (or ``Resource``) and is not walked. Arrays
    are flattened at every step, like FHIRPath does.
    """

    text: str
    steps: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    exists: bool = False

    @classmethod
    def parse(cls, text: str) -> ElementPath:
        """Compile ``text``; raises ``ValueError`` on anything outside the small grammar."""
        body = text.strip()
        exists = body.endswith(".exists()")
        if exists:
            body = body[: -len(".exists()")]
        steps: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        position = 0
        while position < len(body):
            match = _STEP.match(body, position)
            if match is None or match.end() == position:
                raise ValueError(f"unsupported element path {text!r} at {body[position:]!r}")
            filters: tuple[tuple[str, str], ...] = ()
            if match.group(2):
                pairs = [part.split("=", 1) for part in match.group(2).split(",")]
                if any(len(pair) != 2 for pair in pairs):
                    raise ValueError(f"unsupported filter in element path {text!r}")
                filters = tuple((key.strip(), value.strip()) for key, value in pairs)
            steps.append((match.group(1), filters))
            position = match.end()
        if not steps:
            raise ValueError("empty element path")
        return cls(text, tuple(steps[1:]), exists)

    def evaluate(self, element: Any) -> list[Any]:
        """The values this path selects from ``element`` (a resource or a backbone element)."""
        current: list[Any] = [element]
        for name, filters in self.steps:
            selected: list[Any] = []
            for item in current:
                if not isinstance(item, dict):
                    continue
                value = item.get(name)
                if value is None:
                    continue
                if not filters:  # the common case, kept cheap: every value is indexed
                    if isinstance(value, list):
                        selected.extend(value)
                    else:
                        selected.append(value)
                    continue
                for one in value if isinstance(value, list) else (value,):
                    if isinstance(one, dict) and all(
                        str(one.get(key)) == wanted for key, wanted in filters
                    ):
                        selected.append(one)
            current = selected
            if not current:
                break
        if self.exists:
            return [bool(current)]
        return current


@dataclass(frozen=True)
class CompositeComponent:
    """One component of a composite parameter: its type and its paths, relative to the
    composite's root element (``Observation.code`` with root ``Observation.component``)."""

    type: ParamType
    paths: tuple[ElementPath, ...]

    def evaluate(self, element: Any) -> list[Any]:
        """The component's values within one root element."""
        return [value for path in self.paths for value in path.evaluate(element)]


@dataclass(frozen=True)
class SearchParameter:
    """One search parameter of one resource type."""

    name: str
    type: ParamType
    #: The FHIRPath expression of the specification (documentation; ``paths`` is evaluated).
    expression: str
    paths: tuple[ElementPath, ...]
    #: Resource types a reference parameter may point at; empty = any type.
    targets: tuple[str, ...] = ()
    documentation: str = ""
    #: Components of a composite parameter; ``paths`` then select its root elements.
    components: tuple[CompositeComponent, ...] = field(default=())

    def evaluate(self, resource: dict[str, Any]) -> list[Any]:
        """The values of this parameter in ``resource`` (composite: the root elements)."""
        return [value for path in self.paths for value in path.evaluate(resource)]


def _paths(text: str) -> tuple[ElementPath, ...]:
    return tuple(ElementPath.parse(part) for part in text.split("|"))


_WHERE_RESOLVE = re.compile(r"\.where\(resolve\(\) is [A-Za-z]+\)")


def _param(
    name: str,
    type_: ParamType,
    expression: str,
    documentation: str,
    *,
    paths: str | None = None,
    targets: Iterable[str] = (),
    components: Iterable[tuple[ParamType, str]] = (),
) -> SearchParameter:
    """Build a parameter; ``paths`` defaults to the expression when it is a plain path
    (``.where(resolve() is X)`` dropped: the targets say which types are kept)."""
    if paths is None:
        paths = "|".join(_WHERE_RESOLVE.sub("", part.strip()) for part in expression.split(" | "))
    return SearchParameter(
        name=name,
        type=type_,
        expression=expression,
        paths=_paths(paths),
        targets=tuple(targets),
        documentation=documentation,
        components=tuple(CompositeComponent(kind, _paths(text)) for kind, text in components),
    )


def _table(*params: SearchParameter) -> dict[str, SearchParameter]:
    return {param.name: param for param in params}


#: Parameters every resource type has (``_id`` and ``_lastUpdated`` are answered from
#: ``fhir_resources`` itself; the others are indexed like any parameter).
COMMON_PARAMETERS: dict[str, SearchParameter] = _table(
    _param("_id", "token", "Resource.id", "Logical id of this artifact"),
    _param(
        "_lastUpdated",
        "date",
        "Resource.meta.lastUpdated",
        "When the resource version last changed",
    ),
    _param("_tag", "token", "Resource.meta.tag", "Tags applied to this resource"),
    _param(
        "_profile", "uri", "Resource.meta.profile", "Profiles this resource claims to conform to"
    ),
    _param(
        "_security", "token", "Resource.meta.security", "Security Labels applied to this resource"
    ),
    _param("_source", "uri", "Resource.meta.source", "Identifies where the resource comes from"),
)

#: Parameters answered from ``fhir_resources`` columns, never from extracted values.
RESOURCE_COLUMN_PARAMETERS = frozenset({"_id", "_lastUpdated"})

_PRACTITIONERS = ("Practitioner", "PractitionerRole")
_ACTORS = ("Practitioner", "Organization", "Device", "Patient", "PractitionerRole", "RelatedPerson")

_PATIENT = _table(
    _param("active", "token", "Patient.active", "Whether the patient record is active"),
    _param("address", "string", "Patient.address", "A server defined search that may match any of the string fields in the Address"),
    _param("address-city", "string", "Patient.address.city", "A city specified in an address"),
    _param("address-country", "string", "Patient.address.country", "A country specified in an address"),
    _param("address-postalcode", "string", "Patient.address.postalCode", "A postalCode specified in an address"),
    _param("address-state", "string", "Patient.address.state", "A state specified in an address"),
    _param("address-use", "token", "Patient.address.use", "A use code specified in an address"),
    _param("birthdate", "date", "Patient.birthDate", "The patient's date of birth"),
    _param("death-date", "date", "(Patient.deceased as dateTime)", "The date of death has been provided and satisfies this search value", paths="Patient.deceasedDateTime"),
    _param("deceased", "token", "Patient.deceased.exists() and Patient.deceased != false", "This patient has been marked as deceased, or as a death date entered", paths="Patient.deceasedBoolean|Patient.deceasedDateTime.exists()"),
    _param("email", "token", "Patient.telecom.where(system='email')", "A value in an email contact", paths="Patient.telecom(system=email)"),
    _param("family", "string", "Patient.name.family", "A portion of the family name of the patient"),
    _param("gender", "token", "Patient.gender", "Gender of the patient"),
    _param("general-practitioner", "reference", "Patient.generalPractitioner", "Patient's nominated general practitioner, not the organization that manages the record", targets=("Practitioner", "Organization", "PractitionerRole")),
    _param("given", "string", "Patient.name.given", "A portion of the given name of the patient"),
    _param("identifier", "token", "Patient.identifier", "A patient identifier"),
    _param("language", "token", "Patient.communication.language", "Language code (irrespective of use value)"),
    _param("link", "reference", "Patient.link.other", "All patients linked to the given patient", targets=("Patient", "RelatedPerson")),
    _param("name", "string", "Patient.name", "A server defined search that may match any of the string fields in the HumanName, including family, give, prefix, suffix, suffix, and/or text"),
    _param("organization", "reference", "Patient.managingOrganization", "The organization that is the custodian of the patient record", targets=("Organization",)),
    _param("phone", "token", "Patient.telecom.where(system='phone')", "A value in a phone contact", paths="Patient.telecom(system=phone)"),
    _param("phonetic", "string", "Patient.name", "A portion of either family or given name using some kind of phonetic matching algorithm"),
    _param("telecom", "token", "Patient.telecom", "The value in any kind of telecom details of the patient"),
)  # fmt: skip

_PRACTITIONER = _table(
    _param("active", "token", "Practitioner.active", "Whether the practitioner record is active"),
    _param("address", "string", "Practitioner.address", "A server defined search that may match any of the string fields in the Address"),
    _param("family", "string", "Practitioner.name.family", "A portion of the family name"),
    _param("given", "string", "Practitioner.name.given", "A portion of the given name"),
    _param("identifier", "token", "Practitioner.identifier", "A practitioner's Identifier"),
    _param("name", "string", "Practitioner.name", "A server defined search that may match any of the string fields in the HumanName"),
    _param("telecom", "token", "Practitioner.telecom", "The value in any kind of contact"),
)  # fmt: skip

_ORGANIZATION = _table(
    _param("active", "token", "Organization.active", "Is the Organization record active"),
    _param("address", "string", "Organization.address", "A server defined search that may match any of the string fields in the Address"),
    _param("identifier", "token", "Organization.identifier", "Any identifier for the organization (not the accreditation issuer's identifier)"),
    _param("name", "string", "Organization.name | Organization.alias", "A portion of the organization's name or alias"),
    _param("partof", "reference", "Organization.partOf", "An organization of which this organization forms a part", targets=("Organization",)),
    _param("type", "token", "Organization.type", "A code for the type of organization"),
)  # fmt: skip

_ENCOUNTER = _table(
    _param("account", "reference", "Encounter.account", "The set of accounts that may be used for billing for this Encounter", targets=("Account",)),
    _param("appointment", "reference", "Encounter.appointment", "The appointment that scheduled this encounter", targets=("Appointment",)),
    _param("based-on", "reference", "Encounter.basedOn", "The ServiceRequest that initiated this encounter", targets=("ServiceRequest",)),
    _param("class", "token", "Encounter.class", "Classification of patient encounter"),
    _param("date", "date", "Encounter.period", "A date within the period the Encounter lasted"),
    _param("diagnosis", "reference", "Encounter.diagnosis.condition", "The diagnosis or procedure relevant to the encounter", targets=("Condition", "Procedure")),
    _param("episode-of-care", "reference", "Encounter.episodeOfCare", "Episode(s) of care that this encounter should be recorded against", targets=("EpisodeOfCare",)),
    _param("identifier", "token", "Encounter.identifier", "Identifier(s) by which this encounter is known"),
    _param("length", "quantity", "Encounter.length", "Length of encounter in days"),
    _param("location", "reference", "Encounter.location.location", "Location the encounter takes place", targets=("Location",)),
    _param("location-period", "date", "Encounter.location.period", "Time period during which the patient was present at the location"),
    _param("part-of", "reference", "Encounter.partOf", "Another Encounter this encounter is part of", targets=("Encounter",)),
    _param("participant", "reference", "Encounter.participant.individual", "Persons involved in the encounter other than the patient", targets=("Practitioner", "PractitionerRole", "RelatedPerson")),
    _param("participant-type", "token", "Encounter.participant.type", "Role of participant in encounter"),
    _param("patient", "reference", "Encounter.subject.where(resolve() is Patient)", "The patient or group present at the encounter", targets=("Patient",)),
    _param("practitioner", "reference", "Encounter.participant.individual.where(resolve() is Practitioner)", "Persons involved in the encounter other than the patient", targets=("Practitioner",)),
    _param("reason-code", "token", "Encounter.reasonCode", "Coded reason the encounter takes place"),
    _param("reason-reference", "reference", "Encounter.reasonReference", "Reason the encounter takes place (reference)", targets=("Condition", "Procedure", "Observation", "ImmunizationRecommendation")),
    _param("service-provider", "reference", "Encounter.serviceProvider", "The organization (facility) responsible for this encounter", targets=("Organization",)),
    _param("special-arrangement", "token", "Encounter.hospitalization.specialArrangement", "Wheelchair, translator, stretcher, etc."),
    _param("status", "token", "Encounter.status", "planned | arrived | triaged | in-progress | onleave | finished | cancelled +"),
    _param("subject", "reference", "Encounter.subject", "The patient or group present at the encounter", targets=("Patient", "Group")),
    _param("type", "token", "Encounter.type", "Specific type of encounter"),
)  # fmt: skip

_OBS_VALUE_QUANTITY = "Observation.valueQuantity"
_OBSERVATION = _table(
    _param("based-on", "reference", "Observation.basedOn", "Reference to the service request.", targets=("CarePlan", "DeviceRequest", "ImmunizationRecommendation", "MedicationRequest", "NutritionOrder", "ServiceRequest")),
    _param("category", "token", "Observation.category", "The classification of the type of observation"),
    _param("code", "token", "Observation.code", "The code of the observation type"),
    _param("code-value-concept", "composite", "Observation", "Code and coded value parameter pair", components=(("token", "Observation.code"), ("token", "Observation.valueCodeableConcept"))),
    _param("code-value-date", "composite", "Observation", "Code and date/time value parameter pair", components=(("token", "Observation.code"), ("date", "Observation.valueDateTime|Observation.valuePeriod"))),
    _param("code-value-quantity", "composite", "Observation", "Code and quantity value parameter pair", components=(("token", "Observation.code"), ("quantity", _OBS_VALUE_QUANTITY))),
    _param("code-value-string", "composite", "Observation", "Code and string value parameter pair", components=(("token", "Observation.code"), ("string", "Observation.valueString"))),
    _param("combo-code", "token", "Observation.code | Observation.component.code", "The code of the observation type or component type"),
    _param("combo-code-value-concept", "composite", "Observation | Observation.component", "Code and coded value parameter pair, including in components", components=(("token", "Observation.code"), ("token", "Observation.valueCodeableConcept"))),
    _param("combo-code-value-quantity", "composite", "Observation | Observation.component", "Code and quantity value parameter pair, including in components", components=(("token", "Observation.code"), ("quantity", _OBS_VALUE_QUANTITY))),
    _param("combo-data-absent-reason", "token", "Observation.dataAbsentReason | Observation.component.dataAbsentReason", "The reason why the expected value in the element Observation.value[x] or Observation.component.value[x] is missing."),
    _param("combo-value-concept", "token", "(Observation.value as CodeableConcept) | (Observation.component.value as CodeableConcept)", "The value or component value of the observation, if the value is a CodeableConcept", paths="Observation.valueCodeableConcept|Observation.component.valueCodeableConcept"),
    _param("combo-value-quantity", "quantity", "(Observation.value as Quantity) | (Observation.value as SampledData) | (Observation.component.value as Quantity) | (Observation.component.value as SampledData)", "The value or component value of the observation, if the value is a Quantity, or a SampledData (just search on the bounds of the values in sampled data)", paths="Observation.valueQuantity|Observation.component.valueQuantity"),
    _param("component-code", "token", "Observation.component.code", "The component code of the observation type"),
    _param("component-code-value-concept", "composite", "Observation.component", "Component code and component coded value parameter pair", components=(("token", "Observation.code"), ("token", "Observation.valueCodeableConcept"))),
    _param("component-code-value-quantity", "composite", "Observation.component", "Component code and component quantity value parameter pair", components=(("token", "Observation.code"), ("quantity", _OBS_VALUE_QUANTITY))),
    _param("component-data-absent-reason", "token", "Observation.component.dataAbsentReason", "The reason why the expected value in the element Observation.component.value[x] is missing."),
    _param("component-value-concept", "token", "(Observation.component.value as CodeableConcept)", "The value of the component observation, if the value is a CodeableConcept", paths="Observation.component.valueCodeableConcept"),
    _param("component-value-quantity", "quantity", "(Observation.component.value as Quantity) | (Observation.component.value as SampledData)", "The value of the component observation, if the value is a Quantity, or a SampledData (just search on the bounds of the values in sampled data)", paths="Observation.component.valueQuantity"),
    _param("data-absent-reason", "token", "Observation.dataAbsentReason", "The reason why the expected value in the element Observation.value[x] is missing."),
    _param("date", "date", "Observation.effective", "Obtained date/time. If the obtained element is a period, a date that falls in the period", paths="Observation.effectiveDateTime|Observation.effectivePeriod|Observation.effectiveTiming|Observation.effectiveInstant"),
    _param("derived-from", "reference", "Observation.derivedFrom", "Related measurements the observation is made from", targets=("DocumentReference", "ImagingStudy", "Media", "QuestionnaireResponse", "Observation", "MolecularSequence")),
    _param("device", "reference", "Observation.device", "The Device that generated the observation data.", targets=("Device", "DeviceMetric")),
    _param("encounter", "reference", "Observation.encounter", "Encounter related to the observation", targets=("Encounter",)),
    _param("focus", "reference", "Observation.focus", "The focus of an observation when the focus is not the patient of record."),
    _param("has-member", "reference", "Observation.hasMember", "Related resource that belongs to the Observation group", targets=("Observation", "QuestionnaireResponse", "MolecularSequence")),
    _param("identifier", "token", "Observation.identifier", "The unique id for a particular observation"),
    _param("method", "token", "Observation.method", "The method used for the observation"),
    _param("part-of", "reference", "Observation.partOf", "Part of referenced event", targets=("MedicationAdministration", "MedicationDispense", "MedicationStatement", "Procedure", "Immunization", "ImagingStudy")),
    _param("patient", "reference", "Observation.subject.where(resolve() is Patient)", "The subject that the observation is about (if patient)", targets=("Patient",)),
    _param("performer", "reference", "Observation.performer", "Who performed the observation", targets=("Practitioner", "Organization", "CareTeam", "Patient", "PractitionerRole", "RelatedPerson")),
    _param("specimen", "reference", "Observation.specimen", "Specimen used for this observation", targets=("Specimen",)),
    _param("status", "token", "Observation.status", "The status of the observation"),
    _param("subject", "reference", "Observation.subject", "The subject that the observation is about", targets=("Group", "Device", "Patient", "Location")),
    _param("value-concept", "token", "(Observation.value as CodeableConcept)", "The value of the observation, if the value is a CodeableConcept", paths="Observation.valueCodeableConcept"),
    _param("value-date", "date", "(Observation.value as dateTime) | (Observation.value as Period)", "The value of the observation, if the value is a date or period of time", paths="Observation.valueDateTime|Observation.valuePeriod"),
    _param("value-quantity", "quantity", "(Observation.value as Quantity) | (Observation.value as SampledData)", "The value of the observation, if the value is a Quantity, or a SampledData (just search on the bounds of the values in sampled data)", paths=_OBS_VALUE_QUANTITY),
    _param("value-string", "string", "(Observation.value as string)", "The value of the observation, if the value is a string, and also searches in CodeableConcept.text", paths="Observation.valueString"),
)  # fmt: skip

_CONDITION = _table(
    _param("abatement-age", "quantity", "Condition.abatement.as(Age) | Condition.abatement.as(Range)", "Abatement as age or age range", paths="Condition.abatementAge|Condition.abatementRange"),
    _param("abatement-date", "date", "Condition.abatement.as(dateTime) | Condition.abatement.as(Period)", "Date-related abatements (dateTime and period)", paths="Condition.abatementDateTime|Condition.abatementPeriod"),
    _param("abatement-string", "string", "Condition.abatement.as(string)", "Abatement as a string", paths="Condition.abatementString"),
    _param("asserter", "reference", "Condition.asserter", "Person who asserts this condition", targets=("Practitioner", "Patient", "PractitionerRole", "RelatedPerson")),
    _param("body-site", "token", "Condition.bodySite", "Anatomical location, if relevant"),
    _param("category", "token", "Condition.category", "The category of the condition"),
    _param("clinical-status", "token", "Condition.clinicalStatus", "The clinical status of the condition"),
    _param("code", "token", "Condition.code", "Code for the condition"),
    _param("encounter", "reference", "Condition.encounter", "Encounter created as part of", targets=("Encounter",)),
    _param("evidence", "token", "Condition.evidence.code", "Manifestation/symptom"),
    _param("evidence-detail", "reference", "Condition.evidence.detail", "Supporting information found elsewhere"),
    _param("identifier", "token", "Condition.identifier", "A unique identifier of the condition record"),
    _param("onset-age", "quantity", "Condition.onset.as(Age) | Condition.onset.as(Range)", "Onsets as age or age range", paths="Condition.onsetAge|Condition.onsetRange"),
    _param("onset-date", "date", "Condition.onset.as(dateTime) | Condition.onset.as(Period)", "Date related onsets (dateTime and Period)", paths="Condition.onsetDateTime|Condition.onsetPeriod"),
    _param("onset-info", "string", "Condition.onset.as(string)", "Onsets as a string", paths="Condition.onsetString"),
    _param("patient", "reference", "Condition.subject.where(resolve() is Patient)", "Who has the condition?", targets=("Patient",)),
    _param("recorded-date", "date", "Condition.recordedDate", "Date record was first recorded"),
    _param("severity", "token", "Condition.severity", "The severity of the condition"),
    _param("stage", "token", "Condition.stage.summary", "Simple summary (disease specific)"),
    _param("subject", "reference", "Condition.subject", "Who has the condition?", targets=("Group", "Patient")),
    _param("verification-status", "token", "Condition.verificationStatus", "unconfirmed | provisional | differential | confirmed | refuted | entered-in-error"),
)  # fmt: skip

_PROCEDURE = _table(
    _param("based-on", "reference", "Procedure.basedOn", "A request for this procedure", targets=("CarePlan", "ServiceRequest")),
    _param("category", "token", "Procedure.category", "Classification of the procedure"),
    _param("code", "token", "Procedure.code", "A code to identify a  procedure"),
    _param("date", "date", "Procedure.performed", "When the procedure was performed", paths="Procedure.performedDateTime|Procedure.performedPeriod"),
    _param("encounter", "reference", "Procedure.encounter", "Encounter created as part of", targets=("Encounter",)),
    _param("identifier", "token", "Procedure.identifier", "A unique identifier for a procedure"),
    _param("instantiates-canonical", "reference", "Procedure.instantiatesCanonical", "Instantiates FHIR protocol or definition", targets=("PlanDefinition", "HealthcareService", "ActivityDefinition", "Measure", "OperationDefinition", "Questionnaire")),
    _param("instantiates-uri", "uri", "Procedure.instantiatesUri", "Instantiates external protocol or definition"),
    _param("location", "reference", "Procedure.location", "Where the procedure happened", targets=("Location",)),
    _param("part-of", "reference", "Procedure.partOf", "Part of referenced event", targets=("Observation", "Procedure", "MedicationAdministration")),
    _param("patient", "reference", "Procedure.subject.where(resolve() is Patient)", "Search by subject - a patient", targets=("Patient",)),
    _param("performer", "reference", "Procedure.performer.actor", "The reference to the practitioner", targets=_ACTORS),
    _param("reason-code", "token", "Procedure.reasonCode", "Coded reason procedure performed"),
    _param("reason-reference", "reference", "Procedure.reasonReference", "The justification that the procedure was performed", targets=("Condition", "Observation", "Procedure", "DiagnosticReport", "DocumentReference")),
    _param("status", "token", "Procedure.status", "preparation | in-progress | not-done | on-hold | stopped | completed | entered-in-error | unknown"),
    _param("subject", "reference", "Procedure.subject", "Search by subject", targets=("Group", "Patient")),
)  # fmt: skip

_MEDICATION_REQUEST = _table(
    _param("authoredon", "date", "MedicationRequest.authoredOn", "Return prescriptions written on this date"),
    _param("category", "token", "MedicationRequest.category", "Returns prescriptions with different categories"),
    _param("code", "token", "(MedicationRequest.medication as CodeableConcept)", "Return prescriptions of this medication code", paths="MedicationRequest.medicationCodeableConcept"),
    _param("date", "date", "MedicationRequest.dosageInstruction.timing.event", "Returns medication request to be administered on a specific date"),
    _param("encounter", "reference", "MedicationRequest.encounter", "Return prescriptions with this encounter identifier", targets=("Encounter",)),
    _param("identifier", "token", "MedicationRequest.identifier", "Return prescriptions with this external identifier"),
    _param("intended-dispenser", "reference", "MedicationRequest.dispenseRequest.performer", "Returns prescriptions intended to be dispensed by this Organization", targets=("Organization",)),
    _param("intended-performer", "reference", "MedicationRequest.performer", "Returns the intended performer of the administration of the medication request", targets=("Practitioner", "Organization", "Patient", "Device", "RelatedPerson", "CareTeam", "PractitionerRole")),
    _param("intended-performertype", "token", "MedicationRequest.performerType", "Returns requests for a specific type of performer"),
    _param("intent", "token", "MedicationRequest.intent", "Returns prescriptions with different intents"),
    _param("medication", "reference", "(MedicationRequest.medication as Reference)", "Return prescriptions for this medication reference", paths="MedicationRequest.medicationReference", targets=("Medication",)),
    _param("patient", "reference", "MedicationRequest.subject.where(resolve() is Patient)", "Returns prescriptions for a specific patient", targets=("Patient",)),
    _param("priority", "token", "MedicationRequest.priority", "Returns prescriptions with different priorities"),
    _param("requester", "reference", "MedicationRequest.requester", "Returns prescriptions prescribed by this prescriber", targets=("Practitioner", "Organization", "Patient", "PractitionerRole", "Device", "RelatedPerson")),
    _param("status", "token", "MedicationRequest.status", "Status of the prescription"),
    _param("subject", "reference", "MedicationRequest.subject", "The identity of a patient to list orders  for", targets=("Group", "Patient")),
)  # fmt: skip

_DIAGNOSTIC_REPORT = _table(
    _param("based-on", "reference", "DiagnosticReport.basedOn", "Reference to the service request.", targets=("CarePlan", "ImmunizationRecommendation", "MedicationRequest", "NutritionOrder", "ServiceRequest")),
    _param("category", "token", "DiagnosticReport.category", "Which diagnostic discipline/department created the report"),
    _param("code", "token", "DiagnosticReport.code", "The code for the report, as opposed to codes for the atomic results, which are the names on the observation resource referred to from the result"),
    _param("conclusion", "token", "DiagnosticReport.conclusionCode", "A coded conclusion (interpretation/impression) on the report"),
    _param("date", "date", "DiagnosticReport.effective", "The clinically relevant time of the report", paths="DiagnosticReport.effectiveDateTime|DiagnosticReport.effectivePeriod"),
    _param("encounter", "reference", "DiagnosticReport.encounter", "The Encounter when the order was made", targets=("Encounter",)),
    _param("identifier", "token", "DiagnosticReport.identifier", "An identifier for the report"),
    _param("issued", "date", "DiagnosticReport.issued", "When the report was issued"),
    _param("media", "reference", "DiagnosticReport.media.link", "A reference to the image source.", targets=("Media",)),
    _param("patient", "reference", "DiagnosticReport.subject.where(resolve() is Patient)", "The subject of the report if a patient", targets=("Patient",)),
    _param("performer", "reference", "DiagnosticReport.performer", "Who is responsible for the report", targets=("Practitioner", "Organization", "CareTeam", "PractitionerRole")),
    _param("result", "reference", "DiagnosticReport.result", "Link to an atomic result (observation resource)", targets=("Observation",)),
    _param("results-interpreter", "reference", "DiagnosticReport.resultsInterpreter", "Who was the source of the report", targets=("Practitioner", "Organization", "CareTeam", "PractitionerRole")),
    _param("specimen", "reference", "DiagnosticReport.specimen", "The specimen details", targets=("Specimen",)),
    _param("status", "token", "DiagnosticReport.status", "The status of the report"),
    _param("subject", "reference", "DiagnosticReport.subject", "The subject of the report", targets=("Group", "Device", "Patient", "Location")),
)  # fmt: skip

_IMAGING_STUDY = _table(
    _param("basedon", "reference", "ImagingStudy.basedOn", "The order for the image", targets=("Appointment", "AppointmentResponse", "CarePlan", "Task", "ServiceRequest")),
    _param("bodysite", "token", "ImagingStudy.series.bodySite", "The body site studied"),
    _param("dicom-class", "token", "ImagingStudy.series.instance.sopClass", "The type of the instance"),
    _param("encounter", "reference", "ImagingStudy.encounter", "The context of the study", targets=("Encounter",)),
    _param("endpoint", "reference", "ImagingStudy.endpoint | ImagingStudy.series.endpoint", "The endpoint for the study or series", targets=("Endpoint",)),
    _param("identifier", "token", "ImagingStudy.identifier", "Identifiers for the Study, such as DICOM Study Instance UID and Accession number"),
    _param("instance", "token", "ImagingStudy.series.instance.uid", "SOP Instance UID for an instance"),
    _param("interpreter", "reference", "ImagingStudy.interpreter", "Who interpreted the images", targets=_PRACTITIONERS),
    _param("modality", "token", "ImagingStudy.series.modality", "The modality of the series"),
    _param("patient", "reference", "ImagingStudy.subject.where(resolve() is Patient)", "Who the study is about", targets=("Patient",)),
    _param("performer", "reference", "ImagingStudy.series.performer.actor", "The person who performed the study", targets=("Practitioner", "Organization", "CareTeam", "Patient", "Device", "PractitionerRole", "RelatedPerson")),
    _param("reason", "token", "ImagingStudy.reasonCode", "The reason for the study"),
    _param("referrer", "reference", "ImagingStudy.referrer", "The referring physician", targets=_PRACTITIONERS),
    _param("series", "token", "ImagingStudy.series.uid", "DICOM Series Instance UID for a series"),
    _param("started", "date", "ImagingStudy.started", "When the study was started"),
    _param("status", "token", "ImagingStudy.status", "The status of the study"),
    _param("subject", "reference", "ImagingStudy.subject", "Who the study is about", targets=("Group", "Device", "Patient")),
)  # fmt: skip

_DOCUMENT_REFERENCE = _table(
    _param("authenticator", "reference", "DocumentReference.authenticator", "Who/what authenticated the document", targets=("Practitioner", "Organization", "PractitionerRole")),
    _param("author", "reference", "DocumentReference.author", "Who and/or what authored the document", targets=_ACTORS),
    _param("category", "token", "DocumentReference.category", "Categorization of document"),
    _param("contenttype", "token", "DocumentReference.content.attachment.contentType", "Mime type of the content, with charset etc."),
    _param("custodian", "reference", "DocumentReference.custodian", "Organization which maintains the document", targets=("Organization",)),
    _param("date", "date", "DocumentReference.date", "When this document reference was created"),
    _param("description", "string", "DocumentReference.description", "Human-readable description"),
    _param("encounter", "reference", "DocumentReference.context.encounter", "Context of the document  content", targets=("Encounter", "EpisodeOfCare")),
    _param("event", "token", "DocumentReference.context.event", "Main clinical acts documented"),
    _param("facility", "token", "DocumentReference.context.facilityType", "Kind of facility where patient was seen"),
    _param("format", "token", "DocumentReference.content.format", "Format/content rules for the document"),
    _param("identifier", "token", "DocumentReference.masterIdentifier | DocumentReference.identifier", "Master Version Specific Identifier"),
    _param("language", "token", "DocumentReference.content.attachment.language", "Human language of the content (BCP-47)"),
    _param("location", "uri", "DocumentReference.content.attachment.url", "Uri where the data can be found"),
    _param("patient", "reference", "DocumentReference.subject.where(resolve() is Patient)", "Who/what is the subject of the document", targets=("Patient",)),
    _param("period", "date", "DocumentReference.context.period", "Time of service that is being documented"),
    _param("related", "reference", "DocumentReference.context.related", "Related identifiers or resources"),
    _param("relatesto", "reference", "DocumentReference.relatesTo.target", "Target of the relationship", targets=("DocumentReference",)),
    _param("relation", "token", "DocumentReference.relatesTo.code", "replaces | transforms | signs | appends"),
    _param("security-label", "token", "DocumentReference.securityLabel", "Document security-tags"),
    _param("setting", "token", "DocumentReference.context.practiceSetting", "Additional details about where the content was created (e.g. clinical specialty)"),
    _param("status", "token", "DocumentReference.status", "current | superseded | entered-in-error"),
    _param("subject", "reference", "DocumentReference.subject", "Who/what is the subject of the document", targets=("Practitioner", "Group", "Device", "Patient")),
    _param("type", "token", "DocumentReference.type", "Kind of document (LOINC if possible)"),
)  # fmt: skip

_AUDIT_EVENT = _table(
    _param("action", "token", "AuditEvent.action", "Type of action performed during the event"),
    _param("address", "string", "AuditEvent.agent.network.address", "Identifier for the network access point of the user device"),
    _param("agent", "reference", "AuditEvent.agent.who", "Identifier of who", targets=_ACTORS),
    _param("agent-name", "string", "AuditEvent.agent.name", "Human friendly name for the agent"),
    _param("agent-role", "token", "AuditEvent.agent.role", "Agent role in the event"),
    _param("altid", "token", "AuditEvent.agent.altId", "Alternative User identity"),
    _param("date", "date", "AuditEvent.recorded", "Time when the event was recorded"),
    _param("entity", "reference", "AuditEvent.entity.what", "Specific instance of resource"),
    _param("entity-name", "string", "AuditEvent.entity.name", "Descriptor for entity"),
    _param("entity-role", "token", "AuditEvent.entity.role", "What role the entity played"),
    _param("entity-type", "token", "AuditEvent.entity.type", "Type of entity involved"),
    _param("outcome", "token", "AuditEvent.outcome", "Whether the event succeeded or failed"),
    _param("patient", "reference", "AuditEvent.agent.who.where(resolve() is Patient) | AuditEvent.entity.what.where(resolve() is Patient)", "Identifier of who", targets=("Patient",)),
    _param("policy", "uri", "AuditEvent.agent.policy", "Policy that authorized event"),
    _param("site", "token", "AuditEvent.source.site", "Logical source location within the enterprise"),
    _param("source", "reference", "AuditEvent.source.observer", "The identity of source detecting the event", targets=_ACTORS),
    _param("subtype", "token", "AuditEvent.subtype", "More specific type/id for the event"),
    _param("type", "token", "AuditEvent.type", "Type/identifier of event"),
)  # fmt: skip

_PROVENANCE = _table(
    _param("agent", "reference", "Provenance.agent.who", "Who participated", targets=_ACTORS),
    _param("agent-role", "token", "Provenance.agent.role", "What the agents role was"),
    _param("agent-type", "token", "Provenance.agent.type", "How the agent participated"),
    _param("entity", "reference", "Provenance.entity.what", "Identity of entity"),
    _param("location", "reference", "Provenance.location", "Where the activity occurred, if relevant", targets=("Location",)),
    _param("patient", "reference", "Provenance.target.where(resolve() is Patient)", "Target Reference(s) (usually version specific)", targets=("Patient",)),
    _param("recorded", "date", "Provenance.recorded", "When the activity was recorded / updated"),
    _param("signature-type", "token", "Provenance.signature.type", "Indication of the reason the entity signed the object(s)"),
    _param("target", "reference", "Provenance.target", "Target Reference(s) (usually version specific)"),
    _param("when", "date", "(Provenance.occurred as dateTime)", "When the activity occurred", paths="Provenance.occurredDateTime"),
)  # fmt: skip

_CONSENT = _table(
    _param("action", "token", "Consent.provision.action", "Actions controlled by this rule"),
    _param("actor", "reference", "Consent.provision.actor.reference", "Resource for the actor (or group, by role)", targets=("Device", "Group", "CareTeam", "Organization", "Patient", "Practitioner", "RelatedPerson", "PractitionerRole")),
    _param("category", "token", "Consent.category", "Classification of the consent statement - for indexing/retrieval"),
    _param("consentor", "reference", "Consent.performer", "Who is agreeing to the policy and rules", targets=("Organization", "Patient", "Practitioner", "RelatedPerson", "PractitionerRole")),
    _param("data", "reference", "Consent.provision.data.reference", "The actual data reference"),
    _param("date", "date", "Consent.dateTime", "When this Consent was created or indexed"),
    _param("identifier", "token", "Consent.identifier", "Identifier for this record (external references)"),
    _param("organization", "reference", "Consent.organization", "Custodian of the consent", targets=("Organization",)),
    _param("patient", "reference", "Consent.patient", "Who the consent applies to", targets=("Patient",)),
    _param("period", "date", "Consent.provision.period", "Timeframe for this rule"),
    _param("purpose", "token", "Consent.provision.purpose", "Context of activities covered by this rule"),
    _param("scope", "token", "Consent.scope", "Which of the four areas this resource covers (extensible)"),
    _param("security-label", "token", "Consent.provision.securityLabel", "Security Labels that define affected resources"),
    _param("source-reference", "reference", "Consent.source", "Search by reference to a Consent, DocumentReference, Contract  or QuestionnaireResponse", paths="Consent.sourceReference", targets=("Consent", "QuestionnaireResponse", "DocumentReference", "Contract")),
    _param("status", "token", "Consent.status", "draft | proposed | active | rejected | inactive | entered-in-error"),
)  # fmt: skip

_SERVICE_REQUEST = _table(
    _param("authored", "date", "ServiceRequest.authoredOn", "Date request signed"),
    _param("based-on", "reference", "ServiceRequest.basedOn", "What request fulfills", targets=("CarePlan", "MedicationRequest", "ServiceRequest")),
    _param("body-site", "token", "ServiceRequest.bodySite", "Where procedure is going to be done"),
    _param("category", "token", "ServiceRequest.category", "Classification of service"),
    _param("code", "token", "ServiceRequest.code", "What is being requested/ordered"),
    _param("encounter", "reference", "ServiceRequest.encounter", "An encounter in which this request is made", targets=("Encounter",)),
    _param("identifier", "token", "ServiceRequest.identifier", "Identifiers assigned to this order"),
    _param("instantiates-canonical", "reference", "ServiceRequest.instantiatesCanonical", "Instantiates FHIR protocol or definition", targets=("PlanDefinition", "ActivityDefinition")),
    _param("instantiates-uri", "uri", "ServiceRequest.instantiatesUri", "Instantiates external protocol or definition"),
    _param("intent", "token", "ServiceRequest.intent", "proposal | plan | directive | order | original-order | reflex-order | filler-order | instance-order | option"),
    _param("occurrence", "date", "ServiceRequest.occurrence", "When service should occur", paths="ServiceRequest.occurrenceDateTime|ServiceRequest.occurrencePeriod|ServiceRequest.occurrenceTiming"),
    _param("patient", "reference", "ServiceRequest.subject.where(resolve() is Patient)", "Search by subject - a patient", targets=("Patient",)),
    _param("performer", "reference", "ServiceRequest.performer", "Requested performer", targets=("Practitioner", "Organization", "CareTeam", "HealthcareService", "Patient", "Device", "PractitionerRole", "RelatedPerson")),
    _param("performer-type", "token", "ServiceRequest.performerType", "Performer role"),
    _param("priority", "token", "ServiceRequest.priority", "routine | urgent | asap | stat"),
    _param("replaces", "reference", "ServiceRequest.replaces", "What request replaces", targets=("ServiceRequest",)),
    _param("requester", "reference", "ServiceRequest.requester", "Who/what is requesting service", targets=_ACTORS),
    _param("requisition", "token", "ServiceRequest.requisition", "Composite Request ID"),
    _param("specimen", "reference", "ServiceRequest.specimen", "Specimen to be tested", targets=("Specimen",)),
    _param("status", "token", "ServiceRequest.status", "draft | active | on-hold | revoked | completed | entered-in-error | unknown"),
    _param("subject", "reference", "ServiceRequest.subject", "Search by subject", targets=("Group", "Device", "Patient", "Location")),
)  # fmt: skip

_GROUP = _table(
    _param("actual", "token", "Group.actual", "Descriptive or actual"),
    _param("characteristic", "token", "Group.characteristic.code", "Kind of characteristic"),
    _param("characteristic-value", "composite", "Group.characteristic", "A composite of both characteristic and value", components=(("token", "Group.code"), ("token", "Group.valueCodeableConcept|Group.valueBoolean"))),
    _param("code", "token", "Group.code", "The kind of resources contained"),
    _param("exclude", "token", "Group.characteristic.exclude", "Group includes or excludes"),
    _param("identifier", "token", "Group.identifier", "Unique id"),
    _param("managing-entity", "reference", "Group.managingEntity", "Entity that is the custodian of the Group's definition", targets=("Practitioner", "Organization", "RelatedPerson", "PractitionerRole")),
    _param("member", "reference", "Group.member.entity", "Reference to the group member", targets=("Practitioner", "Device", "Medication", "Patient", "Substance", "Group", "PractitionerRole")),
    _param("type", "token", "Group.type", "The type of resources the group contains"),
    _param("value", "token", "(Group.characteristic.value as CodeableConcept) | (Group.characteristic.value as boolean)", "Value held by characteristic", paths="Group.characteristic.valueCodeableConcept|Group.characteristic.valueBoolean"),
)  # fmt: skip

#: resource type -> parameter name -> parameter (the common parameters included).
SEARCH_PARAMETERS: dict[str, dict[str, SearchParameter]] = {
    resource_type: {**COMMON_PARAMETERS, **table}
    for resource_type, table in {
        "Patient": _PATIENT,
        "Practitioner": _PRACTITIONER,
        "Organization": _ORGANIZATION,
        "Encounter": _ENCOUNTER,
        "Observation": _OBSERVATION,
        "Condition": _CONDITION,
        "Procedure": _PROCEDURE,
        "MedicationRequest": _MEDICATION_REQUEST,
        "DiagnosticReport": _DIAGNOSTIC_REPORT,
        "ImagingStudy": _IMAGING_STUDY,
        "DocumentReference": _DOCUMENT_REFERENCE,
        "AuditEvent": _AUDIT_EVENT,
        "Provenance": _PROVENANCE,
        "Consent": _CONSENT,
        "ServiceRequest": _SERVICE_REQUEST,
        "Group": _GROUP,
    }.items()
}


def parameters_of(resource_type: str) -> dict[str, SearchParameter]:
    """The search parameters of ``resource_type``: its own and the common ones (any other
    resource type is still searchable by ``_id``, ``_lastUpdated``, ``_tag``, ...)."""
    return SEARCH_PARAMETERS.get(resource_type, COMMON_PARAMETERS)
