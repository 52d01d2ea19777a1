"""HL7 v2 -> FHIR R4: a parsed message becomes one ``transaction`` Bundle (plus, for
ADT^A40, the patient merges to carry out). Pure functions: no database, no clock.

Follows the HL7 v2-to-FHIR mapping IG where practical; ``docs/hl7v2-mapping.md`` has
the table of every field used. Every resource is written with a conditional request
on an identifier the message carries, so mapping the same message twice (a retry
after a crash) updates the same resources instead of creating new ones:

- Patient: ``PUT Patient?identifier=`` the first PID-3 (ADT: the message is the
  source of demographics); order and result messages only create the Patient when no
  Patient has that identifier (``ifNoneExist``), so their sparser PID does not
  overwrite what ADT messages said.
- Encounter: PV1-19 visit number; Observation / DiagnosticReport / ServiceRequest:
  order numbers (placer, filler), the observation's one extended by OBX-1.

Identifier systems come from the assigning authority (HD): an ISO OID becomes
``urn:oid:…``, a URI is used as is, a namespace ID ``X`` becomes
``urn:medlake:hl7v2:authority:X``; with no authority, the sending facility (MSH-4)
is the authority.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from medlake.clinical.hl7.message import Components, ParsedMessage, Segment

AUTHORITY_PREFIX = "urn:medlake:hl7v2:authority:"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier type
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V2_0004 = "http://terminology.hl7.org/CodeSystem/v2-0004"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
#: Namespace of the entries' ``urn:uuid:`` full URLs (stable per message and entry).
_ENTRY_NAMESPACE = uuid.UUID("6f0b6d1c-3f43-4c53-9f54-8f6b1f0c2a71")

#: HL7 table 0396 coding system names -> FHIR code system URIs.
CODING_SYSTEMS = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "SNM3": "http://snomed.info/sct",
    "UCUM": UCUM,
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}

GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
PATIENT_CLASS = {
    "E": ("EMER", "emergency"),
    "I": ("IMP", "inpatient encounter"),
    "B": ("IMP", "inpatient encounter"),
    "O": ("AMB", "ambulatory"),
    "R": ("AMB", "ambulatory"),
    "C": ("AMB", "ambulatory"),
    "P": ("PRENC", "pre-admission"),
}
NAME_USE = {"L": "official", "D": "usual", "M": "maiden", "N": "nickname", "A": "anonymous"}
OBSERVATION_STATUS = {
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "I": "registered",
    "N": "cancelled",
    "O": "registered",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "U": "final",
    "W": "entered-in-error",
    "X": "cancelled",
}
REPORT_STATUS = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "C": "corrected",
    "R": "preliminary",
    "F": "final",
    "X": "cancelled",
    "Y": "unknown",
    "Z": "unknown",
}
ORDER_STATUS = {  # ORC-5, HL7 table 0038
    "A": "active",
    "CA": "revoked",
    "CM": "completed",
    "DC": "revoked",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "revoked",
    "SC": "active",
}
ORDER_CONTROL_STATUS = {  # ORC-1, HL7 table 0119, when ORC-5 is empty
    "CA": "revoked",
    "OC": "revoked",
    "CR": "revoked",
    "DC": "revoked",
    "OD": "revoked",
    "DR": "revoked",
    "HD": "on-hold",
    "OH": "on-hold",
}
PRIORITY = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "T": "urgent"}
ENCOUNTER_STATUS = {"A01": "in-progress", "A04": "arrived", "A08": "in-progress"}


@dataclass(frozen=True)
class Identifier:
    """A FHIR identifier: system (may be None) and value."""

    system: str | None
    value: str

    @property
    def token(self) -> str:
        """The ``identifier`` search value ``system|value`` with FHIR's escapes of
        ``\\ | , $`` (not URL-encoded)."""
        value = _search_escape(self.value)
        return value if self.system is None else f"{_search_escape(self.system)}|{value}"

    @property
    def search(self) -> str:
        """The ``identifier`` search parameter value, ``system|value`` (URL-encoded, the
        FHIR search escapes ``\\ | , $`` applied)."""
        value = _search_escape(self.value)
        if self.system is None:
            return quote(value, safe="")
        return quote(_search_escape(self.system), safe=":/") + "|" + quote(value, safe="")

    def to_fhir(self, type_code: str | None = None) -> dict[str, Any]:
        """The FHIR Identifier, with a v2-0203 type when ``type_code`` is given."""
        out: dict[str, Any] = {}
        if type_code:
            out["type"] = {"coding": [{"system": V2_0203, "code": type_code}]}
        if self.system:
            out["system"] = self.system
        out["value"] = self.value
        return out


def _search_escape(text: str) -> str:
    return re.sub(r"([\\|,$])", r"\\\1", text)


@dataclass(frozen=True)
class PatientMerge:
    """ADT^A40: the patient known by ``prior`` (MRG-1) is merged into ``surviving``
    (PID-3)."""

    prior: Identifier
    surviving: Identifier


@dataclass
class MappingPlan:
    """What a message becomes: a transaction Bundle, and the merges to do after it."""

    bundle: dict[str, Any]
    merges: list[PatientMerge] = field(default_factory=list)


class MappingError(ValueError):
    """The message lacks what a resource needs (e.g. no usable patient identifier)."""


def map_message(message: ParsedMessage) -> MappingPlan:
    """The transaction Bundle (and merges) for an accepted message."""
    return _Mapper(message).run()


class _Mapper:
    def __init__(self, message: ParsedMessage) -> None:
        self.message = message
        self.header = message.header
        self.entries: list[dict[str, Any]] = []
        self.merges: list[PatientMerge] = []
        msh = message.first("MSH")
        assert msh is not None
        self.msh = msh
        self.offset = _offset(msh.get(7))
        self.sender_system = _authority(msh.repetitions(4)[:1] or msh.repetitions(3)[:1])

    # --- plumbing ---------------------------------------------------------------------

    def run(self) -> MappingPlan:
        code, event = self.header.message_code, self.header.trigger_event
        if code == "ADT":
            self._adt(event)
        elif code == "ORU":
            self._oru()
        elif code in ("ORM", "OMI"):
            self._orders()
        else:
            raise MappingError(f"no mapping for message type {code}^{event}")
        for entry in self.entries:
            if entry["resource"].get("result") == []:  # a report without OBX: no empty array
                del entry["resource"]["result"]
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": self.entries}
        return MappingPlan(bundle, self.merges)

    def _full_url(self) -> str:
        header = self.header
        name = f"{header.get(3)}|{header.get(4)}|{header.control_id}|{len(self.entries)}"
        return f"urn:uuid:{uuid.uuid5(_ENTRY_NAMESPACE, name)}"

    def _add(
        self,
        resource: dict[str, Any],
        identifier: Identifier | None,
        *,
        create_only: bool = False,
    ) -> str:
        """Add an entry; return its full URL (what other entries reference)."""
        full_url = self._full_url()
        kind = resource["resourceType"]
        if identifier is None:
            request = {"method": "POST", "url": kind}
        elif create_only:
            request = {
                "method": "POST",
                "url": kind,
                "ifNoneExist": f"identifier={identifier.search}",
            }
        else:
            request = {"method": "PUT", "url": f"{kind}?identifier={identifier.search}"}
        self.entries.append({"fullUrl": full_url, "resource": resource, "request": request})
        return full_url

    # --- messages ---------------------------------------------------------------------

    def _adt(self, event: str) -> None:
        if event == "A40":
            self._merge()
            return
        pid = self._required("PID")
        patient = self._patient(pid, create_only=False)
        pv1 = self.message.first("PV1")
        if pv1 is not None:
            self._encounter(pv1, patient, ENCOUNTER_STATUS.get(event, "in-progress"))

    def _merge(self) -> None:
        segments = self.message.all()
        for index, segment in enumerate(segments):
            if segment.id != "PID":
                continue
            mrg = next((s for s in segments[index + 1 :] if s.id in ("MRG", "PID")), None)
            if mrg is None or mrg.id != "MRG":
                raise MappingError(f"PID at segment {index + 1} has no MRG after it")
            self._patient(segment, create_only=False)
            surviving = self._patient_identifiers(segment)[0][0]
            prior = self._cx_identifiers(mrg.repetitions(1))
            if not prior:
                raise MappingError("MRG-1 prior patient identifier list holds no identifier")
            self.merges.append(PatientMerge(prior[0][0], surviving))

    def _oru(self) -> None:
        patient: str | None = None
        encounter: str | None = None
        order: Segment | None = None
        report_results: list[dict[str, str]] = []
        report: dict[str, Any] | None = None
        obx_count = 0
        for segment in self.message.all():
            if segment.id == "PID":
                patient = self._patient(segment, create_only=True)
                encounter = None
            elif segment.id == "PV1" and patient is not None:
                encounter = self._visit(segment, patient)
            elif segment.id == "OBR":
                order, obx_count = segment, 0
                report_results = []
                report = self._report(segment, patient, encounter, report_results)
            elif segment.id == "OBX" and order is not None and report is not None:
                obx_count += 1
                url = self._observation(segment, order, obx_count, patient, encounter)
                report_results.append({"reference": url})

    def _orders(self) -> None:
        patient: str | None = None
        encounter: str | None = None
        segments = self.message.all()
        for index, segment in enumerate(segments):
            if segment.id == "PID":
                patient = self._patient(segment, create_only=True)
            elif segment.id == "PV1" and patient is not None:
                encounter = self._visit(segment, patient)
            elif segment.id == "ORC":
                group: list[Segment] = []
                for following in segments[index + 1 :]:
                    if following.id == "ORC":
                        break
                    group.append(following)
                self._service_request(segment, group, patient, encounter)

    def _required(self, segment_id: str) -> Segment:
        found = self.message.first(segment_id)
        if found is None:
            raise MappingError(f"the message has no {segment_id} segment")
        return found

    # --- identifiers ------------------------------------------------------------------

    def _cx_identifiers(self, repetitions: list[Components]) -> list[tuple[Identifier, str]]:
        """CX repetitions -> (Identifier, identifier type code CX-5)."""
        out = []
        for comps in repetitions:
            value = _c(comps, 1)
            if not value:
                continue
            authority = comps[3] if len(comps) > 3 else []
            system = _authority([[authority]] if authority else []) or self.sender_system
            out.append((Identifier(system, value), _c(comps, 5)))
        return out

    def _patient_identifiers(self, pid: Segment) -> list[tuple[Identifier, str]]:
        found = self._cx_identifiers(pid.repetitions(3))
        if not found:
            raise MappingError("PID-3 patient identifier list holds no identifier")
        return found

    def _ei(self, comps: Components | None) -> Identifier | None:
        """An EI (entity identifier: ID ^ namespace ^ universal ID ^ type)."""
        if not comps or not _c(comps, 1):
            return None
        authority = [_c(comps, 2), _c(comps, 3), _c(comps, 4)]
        system = _authority([[authority]]) if any(authority) else None
        return Identifier(system or self.sender_system, _c(comps, 1))

    # --- resources --------------------------------------------------------------------

    def _patient(self, pid: Segment, *, create_only: bool) -> str:
        identifiers = self._patient_identifiers(pid)
        resource: dict[str, Any] = {
            "resourceType": "Patient",
            "identifier": [ident.to_fhir(kind or None) for ident, kind in identifiers],
            "active": True,
        }
        names = [_human_name(comps) for comps in pid.repetitions(5)]
        if any(names):
            resource["name"] = [n for n in names if n]
        if pid.get(7):
            resource["birthDate"] = _date(pid.get(7))
        if pid.get(8) in GENDER:
            resource["gender"] = GENDER[pid.get(8)]
        telecom = [_contact(c, "home") for c in pid.repetitions(13)]
        telecom += [_contact(c, "work") for c in pid.repetitions(14)]
        if any(telecom):
            resource["telecom"] = [t for t in telecom if t]
        addresses = [_address(comps) for comps in pid.repetitions(11)]
        if any(addresses):
            resource["address"] = [a for a in addresses if a]
        if pid.get(29):
            resource["deceasedDateTime"] = _datetime(pid.get(29), self.offset)
        elif pid.get(30) in ("Y", "N"):
            resource["deceasedBoolean"] = pid.get(30) == "Y"
        return self._add(resource, identifiers[0][0], create_only=create_only)

    def _visit(self, pv1: Segment, patient: str) -> str | None:
        """The Encounter of an order or result message: only with a visit number
        (PV1-19), and only created when no Encounter has it (ADT messages own it)."""
        if not self._cx_identifiers(pv1.repetitions(19)[:1]):
            return None
        return self._encounter(pv1, patient, None, create_only=True)

    def _encounter(
        self, pv1: Segment, patient: str, status: str | None, *, create_only: bool = False
    ) -> str:
        patient_class = pv1.get(2)
        code, display = PATIENT_CLASS.get(patient_class, (patient_class, None))
        coding: dict[str, Any] = {
            "system": ACT_CODE if patient_class in PATIENT_CLASS else V2_0004,
            "code": code or "U",
        }
        if display:
            coding["display"] = display
        if pv1.get(45):
            status = "finished"
        resource: dict[str, Any] = {
            "resourceType": "Encounter",
            "status": status or "in-progress",
            "class": coding,
            "subject": {"reference": patient},
        }
        visit = self._cx_identifiers(pv1.repetitions(19)[:1])
        if visit:
            resource["identifier"] = [visit[0][0].to_fhir("VN")]
        period = {}
        if pv1.get(44):
            period["start"] = _datetime(pv1.get(44), self.offset)
        if pv1.get(45):
            period["end"] = _datetime(pv1.get(45), self.offset)
        if period:
            resource["period"] = period
        location = " ".join(v for v in (pv1.get(3, i) for i in (1, 2, 3, 4)) if v)
        if location:
            resource["location"] = [{"location": {"display": location}}]
        participants = []
        for number, role in ((7, "ATND"), (8, "REF"), (9, "CON"), (17, "ADM")):
            for comps in pv1.repetitions(number):
                person = _practitioner(comps)
                if person:
                    participants.append(
                        {
                            "type": [{"coding": [{"system": PARTICIPATION, "code": role}]}],
                            "individual": person,
                        }
                    )
        if participants:
            resource["participant"] = participants
        return self._add(resource, visit[0][0] if visit else None, create_only=create_only)

    def _order_identifiers(
        self, *fields: tuple[Segment | None, int, str]
    ) -> list[tuple[Identifier, str]]:
        found: list[tuple[Identifier, str]] = []
        for segment, number, kind in fields:
            if segment is None:
                continue
            ident = self._ei(
                segment.repetitions(number)[0] if segment.repetitions(number) else None
            )
            if ident is not None and all(ident != known for known, _ in found):
                found.append((ident, kind))
        return found

    def _report(
        self,
        obr: Segment,
        patient: str | None,
        encounter: str | None,
        results: list[dict[str, str]],
    ) -> dict[str, Any]:
        identifiers = self._order_identifiers((obr, 3, "FILL"), (obr, 2, "PLAC"))
        status = REPORT_STATUS.get(obr.get(25), "unknown")
        resource: dict[str, Any] = {"resourceType": "DiagnosticReport", "status": status}
        if identifiers:
            resource["identifier"] = [ident.to_fhir(kind) for ident, kind in identifiers]
        resource["code"] = _codeable(obr.repetitions(4)[0])
        self._link(resource, patient, encounter)
        if obr.get(7):
            resource["effectiveDateTime"] = _datetime(obr.get(7), self.offset)
        resource["result"] = results  # filled as the OBX segments are mapped
        self._add(resource, identifiers[0][0] if identifiers else None)
        return resource

    def _observation(
        self, obx: Segment, obr: Segment, count: int, patient: str | None, encounter: str | None
    ) -> str:
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "status": OBSERVATION_STATUS.get(obx.get(11), "unknown"),
            "code": _codeable(obx.repetitions(3)[0]),
        }
        order = self._order_identifiers((obr, 3, "FILL"), (obr, 2, "PLAC"))
        set_id = obx.get(1) or str(count)
        sub_id = obx.get(4)
        if order:
            base = order[0][0]
            identifier = Identifier(
                base.system, f"{base.value}-{set_id}" + (f".{sub_id}" if sub_id else "")
            )
        else:
            identifier = Identifier(self.sender_system, f"{self.header.control_id}-{count}")
        resource["identifier"] = [identifier.to_fhir()]
        self._link(resource, patient, encounter)
        when = obx.get(14) or obr.get(7)
        if when:
            resource["effectiveDateTime"] = _datetime(when, self.offset)
        resource.update(self._value(obx))
        interpretation = [
            {"coding": [{"system": INTERPRETATION, "code": _c(c, 1)}]}
            for c in obx.repetitions(8)
            if _c(c, 1)
        ]
        if interpretation:
            resource["interpretation"] = interpretation
        reference_range = _reference_range(obx.get(7), obx.repetitions(6))
        if reference_range:
            resource["referenceRange"] = [reference_range]
        return self._add(resource, identifier)

    def _value(self, obx: Segment) -> dict[str, Any]:
        value_type = obx.get(2)
        values = obx.repetitions(5)
        if not values:
            return {}
        first = values[0]
        if value_type == "NM":
            return {"valueQuantity": _quantity(_c(first, 1), obx.repetitions(6))}
        if value_type in ("CE", "CWE", "CNE"):
            return {"valueCodeableConcept": _codeable(first)}
        if value_type == "SN":
            return _structured_numeric(first, obx.repetitions(6))
        if value_type in ("DT", "TS", "DTM"):
            return {"valueDateTime": _datetime(_c(first, 1), self.offset)}
        if value_type == "TM":
            return {"valueTime": _time(_c(first, 1))}
        text = "\n".join(obx.text(5, n) for n in range(1, len(values) + 1))
        return {"valueString": text}

    def _service_request(
        self, orc: Segment, group: list[Segment], patient: str | None, encounter: str | None
    ) -> None:
        obr = next((s for s in group if s.id == "OBR"), None)
        ipc = [s for s in group if s.id == "IPC"]
        tq1 = next((s for s in group if s.id == "TQ1"), None)
        identifiers = self._order_identifiers(
            (orc, 2, "PLAC"), (obr, 2, "PLAC"), (orc, 3, "FILL"), (obr, 3, "FILL")
        )
        status = ORDER_STATUS.get(orc.get(5)) or ORDER_CONTROL_STATUS.get(orc.get(1), "active")
        resource: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "status": status,
            "intent": "order",
        }
        all_identifiers = [ident.to_fhir(kind) for ident, kind in identifiers]
        for segment in ipc[:1]:
            if segment.get(1):
                accession = self._ei(segment.repetitions(1)[0])
                if accession is not None:
                    all_identifiers.append(accession.to_fhir("ACSN"))
            if segment.get(3):
                all_identifiers.append(Identifier(DICOM_UID, f"urn:oid:{segment.get(3)}").to_fhir())
        if all_identifiers:
            resource["identifier"] = all_identifiers
        priority = PRIORITY.get(tq1.get(9) if tq1 is not None else orc.get(7, 6))
        if priority:
            resource["priority"] = priority
        if obr is not None and obr.repetitions(4):
            resource["code"] = _codeable(obr.repetitions(4)[0])
        self._link(resource, patient, encounter)
        if orc.get(9):
            resource["authoredOn"] = _datetime(orc.get(9), self.offset)
        requester = _practitioner(orc.repetitions(12)[0]) if orc.repetitions(12) else None
        if requester is None and obr is not None and obr.repetitions(16):
            requester = _practitioner(obr.repetitions(16)[0])
        if requester:
            resource["requester"] = requester
        if obr is not None:
            reasons = [_codeable(c) for c in obr.repetitions(31)]
            if reasons:
                resource["reasonCode"] = reasons
        self._add(resource, identifiers[0][0] if identifiers else None)

    @staticmethod
    def _link(resource: dict[str, Any], patient: str | None, encounter: str | None) -> None:
        if patient is not None:
            resource["subject"] = {"reference": patient}
        if encounter is not None:
            resource["encounter"] = {"reference": encounter}


# --- data types -----------------------------------------------------------------------


def _c(comps: Components, index: int, sub: int = 1) -> str:
    """Component ``index`` (subcomponent ``sub``) of a repetition, stripped."""
    if index > len(comps) or sub > len(comps[index - 1]):
        return ""
    return comps[index - 1][sub - 1].strip()


def _authority(hd: list[Components]) -> str | None:
    """The system URI of an assigning authority (HD: namespace ^ universal ID ^ type)."""
    if not hd:
        return None
    comps = hd[0]
    # HD arrives as components (MSH-4) or, inside CX-4 / EI, as subcomponents.
    parts = (
        comps[0] if len(comps) == 1 and len(comps[0]) > 1 else [c[0] if c else "" for c in comps]
    )
    namespace, universal, kind = [*parts, "", "", ""][:3]
    namespace, universal, kind = namespace.strip(), universal.strip(), kind.strip().upper()
    if universal and kind == "ISO":
        return f"urn:oid:{universal}"
    if universal and kind in ("URI", "URL"):
        return universal
    if universal and kind == "UUID":
        return f"urn:uuid:{universal}"
    if namespace:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", namespace):
            return namespace
        return AUTHORITY_PREFIX + quote(namespace, safe="")
    return None


def _codeable(comps: Components) -> dict[str, Any]:
    """CE / CWE / CNE -> CodeableConcept (identifier, text, coding system; then the
    alternate triplet)."""
    codings = []
    for start in (1, 4):
        code, display, system = _c(comps, start), _c(comps, start + 1), _c(comps, start + 2)
        if not code:
            continue
        coding: dict[str, Any] = {}
        uri = CODING_SYSTEMS.get(system.upper()) if system else None
        if uri is None and system.upper().startswith("HL7") and system[3:].isdigit():
            uri = f"http://terminology.hl7.org/CodeSystem/v2-{system[3:]}"
        if uri:
            coding["system"] = uri
        coding["code"] = code
        if display:
            coding["display"] = display
        codings.append(coding)
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = codings
    text = _c(comps, 9) or _c(comps, 2) or _c(comps, 5)
    if text:
        out["text"] = text
    return out


def _human_name(comps: Components) -> dict[str, Any]:
    """XPN -> HumanName."""
    name: dict[str, Any] = {}
    use = NAME_USE.get(_c(comps, 7))
    if use:
        name["use"] = use
    if _c(comps, 1):
        name["family"] = _c(comps, 1)
    given = [g for g in (_c(comps, 2), _c(comps, 3)) if g]
    if given:
        name["given"] = given
    if _c(comps, 5):
        name["prefix"] = [_c(comps, 5)]
    if _c(comps, 4):
        name["suffix"] = [_c(comps, 4)]
    return name if ("family" in name or "given" in name) else {}


def _address(comps: Components) -> dict[str, Any]:
    """XAD -> Address."""
    address: dict[str, Any] = {}
    lines = [line for line in (_c(comps, 1), _c(comps, 2)) if line]
    kind = _c(comps, 7)
    if kind in ("H", "B", "O", "C"):
        address["use"] = {"H": "home", "B": "work", "O": "work", "C": "temp"}[kind]
    if kind == "M":
        address["type"] = "postal"
    if lines:
        address["line"] = lines
    for index, key in ((3, "city"), (4, "state"), (5, "postalCode"), (6, "country")):
        if _c(comps, index):
            address[key] = _c(comps, index)
    return address if set(address) - {"use", "type"} else {}


def _contact(comps: Components, use: str) -> dict[str, Any]:
    """XTN -> ContactPoint."""
    equipment = _c(comps, 3)
    if equipment in ("Internet", "X.400") or (_c(comps, 4) and not _c(comps, 1)):
        value = _c(comps, 4)
        return {"system": "email", "value": value, "use": use} if value else {}
    number = _c(comps, 1) or "".join(p for p in (_c(comps, 6), _c(comps, 7)) if p)
    if not number:
        return {}
    system = "fax" if equipment == "FX" else "phone"
    return {"system": system, "value": number, "use": "mobile" if equipment == "CP" else use}


def _practitioner(comps: Components) -> dict[str, Any] | None:
    """XCN (ID ^ family ^ given ...) -> a Reference by identifier and display."""
    ident, family, given = _c(comps, 1), _c(comps, 2), _c(comps, 3)
    display = " ".join(p for p in (_c(comps, 6), given, family) if p)
    if not (ident or display):
        return None
    reference: dict[str, Any] = {}
    if ident:
        reference["identifier"] = {"value": ident}
    if display:
        reference["display"] = display
    return reference


def _quantity(number: str, units: list[Components]) -> dict[str, Any]:
    """NM value and OBX-6 units (CE: code ^ text ^ system) -> Quantity."""
    quantity: dict[str, Any] = {"value": _number(number)}
    if units:
        code, text, system = _c(units[0], 1), _c(units[0], 2), _c(units[0], 3)
        if text or code:
            quantity["unit"] = text or code
        # A Quantity's code needs its system (qty-3): only UCUM units carry one.
        if code and system.upper() == "UCUM":
            quantity["system"] = UCUM
            quantity["code"] = code
    return quantity


def _number(text: str) -> int | float:
    value = float(text)
    if value.is_integer() and "." not in text and "e" not in text.lower():
        return int(text)
    return value


def _structured_numeric(comps: Components, units: list[Components]) -> dict[str, Any]:
    """SN (comparator ^ num1 ^ separator ^ num2) -> valueQuantity, valueRange or
    valueRatio."""
    comparator, first, separator, second = _c(comps, 1), _c(comps, 2), _c(comps, 3), _c(comps, 4)
    if separator == "-" and first and second:
        return {"valueRange": {"low": _quantity(first, units), "high": _quantity(second, units)}}
    if separator in (":", "/") and first and second:
        return {
            "valueRatio": {
                "numerator": {"value": _number(first)},
                "denominator": {"value": _number(second)},
            }
        }
    quantity = _quantity(first, units) if first else {}
    if comparator in ("<", ">", "<=", ">="):
        quantity["comparator"] = comparator
    return {"valueQuantity": quantity} if quantity else {}


def _reference_range(text: str, units: list[Components]) -> dict[str, Any] | None:
    """OBX-7 ``low-high`` (or ``>x`` / ``<x``) -> referenceRange."""
    if not text:
        return None
    match = re.fullmatch(r"\s*([-+]?\d*\.?\d+)\s*-\s*([-+]?\d*\.?\d+)\s*", text)
    if match:
        return {"low": _quantity(match.group(1), units), "high": _quantity(match.group(2), units)}
    match = re.fullmatch(r"\s*(<=?|>=?)\s*([-+]?\d*\.?\d+)\s*", text)
    if match:
        side = "high" if match.group(1).startswith("<") else "low"
        return {side: _quantity(match.group(2), units), "text": text}
    return {"text": text}


def _offset(ts: str) -> str | None:
    """The ``+HHMM`` offset of a TS value, or None."""
    match = re.search(r"([+-]\d{4})$", ts.split("^")[0])
    return match.group(1) if match else None


def _date(ts: str) -> str:
    """TS -> FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)."""
    digits = ts[:8]
    parts = [digits[:4], digits[4:6], digits[6:8]]
    return "-".join(p for p in parts if p)


def _datetime(ts: str, default_offset: str | None) -> str:
    """TS (YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]) -> FHIR dateTime.

    FHIR requires a time zone once a time is given: a TS without one takes the offset
    of MSH-7, else UTC.
    """
    match = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d+)?([+-]\d{4})?", ts)
    if match is None:
        return ts
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if hour is None:
        return "-".join(p for p in (year, month, day) if p)
    zone = offset or default_offset or "+0000"
    zone_text = "Z" if zone in ("+0000", "-0000") else f"{zone[:3]}:{zone[3:]}"
    return (
        f"{year}-{month}-{day}T{hour}:{minute or '00'}:{second or '00'}{fraction or ''}{zone_text}"
    )


def _time(tm: str) -> str:
    """TM (HH[MM[SS[.S+]]]) -> FHIR time (HH:MM:SS)."""
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d+)?([+-]\d{4})?", tm)
    if match is None:
        return tm
    hour, minute, second, fraction, _zone = match.groups()
    return f"{hour}:{minute or '00'}:{second or '00'}{fraction or ''}"
