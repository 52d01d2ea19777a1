"""Judging a received message before it is acknowledged (HL7 v2.5.1 chapter 2).

Three tiers, in the standard's order:

1. **Readable** (``message.read_header``): an MSH first, usable MSH-1 and MSH-2.
   Otherwise AR.
2. **Acceptable** (section 2.9.2.1): MSH-9 names a message type and trigger event
   medlake takes, MSH-11 a processing ID of table 0103, MSH-12 a version it reads.
   Otherwise AR with 200 / 201 / 202 / 203.
3. **Valid content**: every segment well formed, the segments medlake knows in the
   order of the abstract message structure with the required ones present (100), the
   required fields valued (101), dates and numbers well formed (102), coded values in
   their HL7 table (103). Otherwise AE.

Segments a structure does not name (Z-segments, later additions) are ignored, as the
standard's receiving rules ask; the order is checked among the segments it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from medlake.clinical.hl7.errors import ErrorCode, Hl7Issue
from medlake.clinical.hl7.message import DecodedMessage, ParsedMessage, Segment

#: Abstract message structures (HL7 v2.5.1): ``[x]`` optional, ``{x}`` repeating,
#: ``<a|b>`` one of. Written as the standard prints them.
STRUCTURES: dict[str, str] = {
    "ADT_A01": "MSH [{SFT}] EVN PID [PD1] [{ROL}] [{NK1}] PV1 [PV2] [{ROL}] [{DB1}] [{OBX}] "
    "[{AL1}] [{DG1}] [DRG] [{PR1 [{ROL}]}] [{GT1}] [{IN1 [IN2] [{IN3}] [{ROL}]}] [ACC] [UB1] "
    "[UB2] [PDA]",
    "ADT_A39": "MSH [{SFT}] EVN {PID [PD1] MRG [PV1]}",
    "ORU_R01": "MSH [{SFT}] {[PID [PD1] [{NTE}] [{NK1}] [PV1 [PV2]]] {[ORC] OBR [{NTE}] "
    "[{TQ1 [{TQ2}]}] [CTD] [{OBX [{NTE}]}] [{FT1}] [{CTI}] [{SPM [{OBX}]}]}} [DSC]",
    "ORM_O01": "MSH [{NTE}] [PID [PD1] [{NTE}] [PV1 [PV2]] [{IN1 [IN2] [IN3]}] [GT1] [{AL1}]] "
    "{ORC [<OBR|RQD|RQ1|RXO|ODS|ODT> [{NTE}] [CTD] [{DG1}] [{OBX [{NTE}]}]] [{FT1}] [{CTI}] "
    "[BLG]}",
    "OMI_O23": "MSH [{SFT}] [{NTE}] [PID [PD1] [{NTE}] [PV1 [PV2]] [{IN1 [IN2] [IN3]}] [GT1] "
    "[{AL1}]] {ORC [{TQ1 [{TQ2}]}] OBR [{NTE}] [CTD] [{DG1}] [{OBX [{NTE}]}] {IPC}}",
}

#: Message type -> trigger event -> abstract message structure (HL7 table 0354).
SUPPORTED: dict[str, dict[str, str]] = {
    "ADT": {"A01": "ADT_A01", "A04": "ADT_A01", "A08": "ADT_A01", "A40": "ADT_A39"},
    "ORU": {"R01": "ORU_R01"},
    "ORM": {"O01": "ORM_O01"},
    "OMI": {"O23": "OMI_O23"},
}
#: Versions (MSH-12) whose messages medlake reads with the 2.5.1 rules: the segments and
#: fields used here kept their meaning from 2.3 on.
VERSIONS = frozenset(
    {"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9"}
)


def _codes(values: str) -> frozenset[str]:
    return frozenset(values.split())


#: HL7 tables checked (v2.5.1 values).
TABLES: dict[str, frozenset[str]] = {
    "0001": _codes("A F M N O U"),  # administrative sex
    "0004": _codes("B C E I N O P R U"),  # patient class
    "0085": _codes("C D F I N O P R S U W X"),  # observation result status
    "0103": _codes("D P T"),  # processing ID
    "0119": _codes(  # order control codes
        "AF CA CH CN CR DC DE DF DR FU HD HR LI NA NW OC OD OE OF OH OK OP OR PA PR RE RF RL "
        "RO RP RQ RR RU SC SN SR SS UA UC UD UF UH UM UN UR UX XO XR XX"
    ),
    "0125": _codes(  # value type
        "AD CE CF CK CN CNE CP CWE CX DR DT DTM ED FT ID IS MO NM PN RP SN ST TM TN TS TX XAD "
        "XCN XON XPN XTN"
    ),
}


@dataclass(frozen=True)
class FieldRule:
    """A field rule: required (101), data type (102: ``TS`` or ``NM``), table (103)."""

    segment: str
    field: int
    name: str
    required: bool = False
    data_type: str | None = None
    table: str | None = None


FIELD_RULES: tuple[FieldRule, ...] = (
    FieldRule("MSH", 7, "date/time of message", required=True, data_type="TS"),
    FieldRule("MSH", 10, "message control ID", required=True),
    FieldRule("EVN", 2, "recorded date/time", required=True, data_type="TS"),
    FieldRule("PID", 3, "patient identifier list", required=True),
    FieldRule("PID", 5, "patient name", required=True),
    FieldRule("PID", 7, "date/time of birth", data_type="TS"),
    FieldRule("PID", 8, "administrative sex", table="0001"),
    FieldRule("PID", 29, "patient death date and time", data_type="TS"),
    FieldRule("PV1", 2, "patient class", required=True, table="0004"),
    FieldRule("PV1", 44, "admit date/time", data_type="TS"),
    FieldRule("PV1", 45, "discharge date/time", data_type="TS"),
    FieldRule("MRG", 1, "prior patient identifier list", required=True),
    FieldRule("ORC", 1, "order control", required=True, table="0119"),
    FieldRule("ORC", 9, "date/time of transaction", data_type="TS"),
    FieldRule("OBR", 4, "universal service identifier", required=True),
    FieldRule("OBR", 7, "observation date/time", data_type="TS"),
    FieldRule("OBR", 22, "results rpt/status chng - date/time", data_type="TS"),
    FieldRule("OBX", 2, "value type", table="0125"),
    FieldRule("OBX", 3, "observation identifier", required=True),
    FieldRule("OBX", 11, "observation result status", required=True, table="0085"),
    FieldRule("OBX", 14, "date/time of the observation", data_type="TS"),
    FieldRule("IPC", 1, "accession identifier", required=True),
    FieldRule("IPC", 2, "requested procedure ID", required=True),
    FieldRule("IPC", 3, "study instance UID", required=True),
    FieldRule("IPC", 4, "scheduled procedure step ID", required=True),
)

_TS = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,4})?)?)?)?)?)?([+-]\d{4})?$")
_NM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")


def check_acceptable(decoded: DecodedMessage) -> list[Hl7Issue]:
    """Tier 2: MSH-9, MSH-11 and MSH-12 (AR when not acceptable)."""
    header = decoded.header
    if header is None or not header.encoding_ok:
        return []
    issues: list[Hl7Issue] = []
    code, event = header.message_code, header.trigger_event
    if not code:
        issues.append(
            Hl7Issue(
                ErrorCode.REQUIRED_FIELD_MISSING,
                "MSH-9 message type is empty",
                "MSH",
                1,
                9,
                reject=True,
            )
        )
    elif code not in SUPPORTED:
        issues.append(
            Hl7Issue(
                ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
                f"message type {code!r} is not supported (supported: "
                f"{', '.join(sorted(SUPPORTED))})",
                "MSH",
                1,
                9,
                1,
            )
        )
    elif event not in SUPPORTED[code]:
        issues.append(
            Hl7Issue(
                ErrorCode.UNSUPPORTED_EVENT_CODE,
                f"trigger event {event!r} of {code} is not supported (supported: "
                f"{', '.join(sorted(SUPPORTED[code]))})",
                "MSH",
                1,
                9,
                2,
            )
        )
    processing = header.processing_id
    if not processing:
        issues.append(
            Hl7Issue(
                ErrorCode.REQUIRED_FIELD_MISSING,
                "MSH-11 processing ID is empty",
                "MSH",
                1,
                11,
                reject=True,
            )
        )
    elif processing not in TABLES["0103"]:
        issues.append(
            Hl7Issue(
                ErrorCode.UNSUPPORTED_PROCESSING_ID,
                f"processing ID {processing!r} is not one of P, D, T (HL7 table 0103)",
                "MSH",
                1,
                11,
            )
        )
    version = header.version
    if not version:
        issues.append(
            Hl7Issue(
                ErrorCode.REQUIRED_FIELD_MISSING,
                "MSH-12 version ID is empty",
                "MSH",
                1,
                12,
                reject=True,
            )
        )
    elif version not in VERSIONS:
        issues.append(
            Hl7Issue(
                ErrorCode.UNSUPPORTED_VERSION_ID,
                f"version {version!r} is not supported (2.3 to 2.9 are)",
                "MSH",
                1,
                12,
            )
        )
    return issues


def check_content(parsed: ParsedMessage) -> list[Hl7Issue]:
    """Tier 3: segments, structure, required fields, data types, tables (AE)."""
    issues: list[Hl7Issue] = []
    for line_number, line in enumerate(parsed.lines, start=1):
        segment_id = line[:3]
        if not _SEGMENT_ID.match(segment_id) or (
            len(line) > 3 and line[3] != parsed.header.field_separator
        ):
            issues.append(
                Hl7Issue(
                    ErrorCode.SEGMENT_SEQUENCE_ERROR,
                    f"segment {line_number} is not a segment (it starts {line[:12]!r}; "
                    "a segment is a 3-character ID and fields separated by "
                    f"{parsed.header.field_separator!r})",
                )
            )
    if issues:
        return issues
    header = parsed.header
    structure = SUPPORTED.get(header.message_code, {}).get(header.trigger_event)
    if structure is not None:
        problem = structure_problem(structure, parsed.segment_ids)
        if problem is not None:
            issues.append(problem)
    issues.extend(_field_issues(parsed))
    return issues


def structure_problem(structure: str, segment_ids: list[str]) -> Hl7Issue | None:
    """Whether the segments named by ``structure`` appear in its order (100), or None."""
    pattern, named, required = _compiled(structure)
    relevant = [s for s in segment_ids if s in named]
    for segment_id in sorted(required):
        if segment_id not in relevant:
            return Hl7Issue(
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                f"required segment {segment_id} is missing ({structure}: {STRUCTURES[structure]})",
                segment_id,
                1,
            )
    if pattern.fullmatch("".join(f"{s}," for s in relevant)) is None:
        return Hl7Issue(
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            f"segments {' '.join(relevant)} are not in the order of {structure} "
            f"({STRUCTURES[structure]})",
        )
    return None


@cache
def _compiled(structure: str) -> tuple[re.Pattern[str], frozenset[str], frozenset[str]]:
    """The structure as a regular expression over ``ID,`` tokens, the segment IDs it
    names, and those required at its top level (outside any ``[...]``)."""
    tokens = re.findall(r"[A-Z][A-Z0-9]{2}|[\[\]{}<>|]", STRUCTURES[structure])
    parts: list[str] = []
    closers: list[str] = []
    named: set[str] = set()
    required: set[str] = set()
    for token in tokens:
        if token in "[{<":
            parts.append("(?:")
            closers.append(token)
        elif token == "]":
            parts.append(")?")
            closers.pop()
        elif token == "}":
            parts.append(")+")
            closers.pop()
        elif token == ">":
            parts.append(")")
            closers.pop()
        elif token == "|":
            parts.append("|")
        else:
            parts.append(f"{token},")
            named.add(token)
            if "[" not in closers and "<" not in closers:
                required.add(token)
    return re.compile("".join(parts)), frozenset(named), frozenset(required)


def _field_issues(parsed: ParsedMessage) -> list[Hl7Issue]:
    issues: list[Hl7Issue] = []
    for rule in FIELD_RULES:
        for sequence, segment in enumerate(parsed.segments(rule.segment), start=1):
            issue = _check_field(rule, segment, sequence)
            if issue is not None:
                issues.append(issue)
    for sequence, obx in enumerate(parsed.segments("OBX"), start=1):
        issues.extend(_observation_value_issues(obx, sequence))
    return issues


def _check_field(rule: FieldRule, segment: Segment, sequence: int) -> Hl7Issue | None:
    first = segment.get(rule.field)
    where = (rule.segment, sequence, rule.field)
    label = f"{rule.segment}-{rule.field} {rule.name}"
    if not segment.repetitions(rule.field):
        if rule.required:
            return Hl7Issue(ErrorCode.REQUIRED_FIELD_MISSING, f"{label} is empty", *where)
        return None
    if rule.required and not first:
        return Hl7Issue(
            ErrorCode.REQUIRED_FIELD_MISSING, f"{label} has no first component", *where, 1
        )
    if rule.data_type == "TS" and first and not _TS.match(first):
        return Hl7Issue(
            ErrorCode.DATA_TYPE_ERROR,
            f"{label} {first!r} is not a date/time "
            "(YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ])",
            *where,
            1,
        )
    if rule.table and first and first not in TABLES[rule.table]:
        return Hl7Issue(
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            f"{label} {first!r} is not in HL7 table {rule.table}",
            *where,
            1,
        )
    return None


def _observation_value_issues(obx: Segment, sequence: int) -> list[Hl7Issue]:
    """OBX-2 is required when OBX-5 is valued; an NM value must be a number."""
    values = obx.repetitions(5)
    value_type = obx.get(2)
    if values and not value_type:
        return [
            Hl7Issue(
                ErrorCode.REQUIRED_FIELD_MISSING,
                "OBX-2 value type is empty while OBX-5 holds a value",
                "OBX",
                sequence,
                2,
            )
        ]
    if value_type == "NM":
        for repetition in range(1, len(values) + 1):
            number = obx.get(5, repetition=repetition)
            if number and not _NM.match(number):
                return [
                    Hl7Issue(
                        ErrorCode.DATA_TYPE_ERROR,
                        f"OBX-5 observation value {number!r} is not a number (OBX-2 is NM)",
                        "OBX",
                        sequence,
                        5,
                    )
                ]
    return []


def validate(decoded: DecodedMessage) -> tuple[ParsedMessage | None, list[Hl7Issue]]:
    """Every problem of a decoded message, tier by tier (a tier that fails ends the
    checks), and the parsed message when its MSH is usable."""
    issues = list(decoded.issues)
    if decoded.header is None or not decoded.header.encoding_ok:
        return None, issues
    issues.extend(check_acceptable(decoded))
    try:
        parsed = ParsedMessage(decoded)
    except Exception as exc:  # python-hl7 raises bare exceptions on odd input
        issues.append(
            Hl7Issue(
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                f"the message cannot be parsed: {exc}",
                reject=True,
            )
        )
        return None, issues
    if not any(issue.rejects for issue in issues):
        issues.extend(check_content(parsed))
    return parsed, issues
