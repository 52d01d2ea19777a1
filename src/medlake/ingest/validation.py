"""Pre-ingestion validation: named rules, each set to ``ignore``, ``warn`` or ``reject``.

Every file that arrives is judged by the same rules, whatever brought it: STOW-RS,
C-STORE, ``medlake ingest``, the drop zone. A ``reject`` finding keeps the file out
of the lake (it is set aside and gets an ``ingest_errors`` row); a ``warn`` finding
stores it and records the row; ``ignore`` does neither.

The rules and their defaults (``RULES``):

===================  =========  ====================================================
rule                 default    fails when
===================  =========  ====================================================
``file_size``        reject     the file is empty (0 bytes)
``dicom_part10``     reject*    not DICOM Part 10 (preamble, ``DICM``, File Meta
                                Information), unparsable or truncated
``required_uids``    reject*    SOP Class / SOP Instance / Study / Series Instance
                                UID missing, empty or not a valid UID
``patient_id``       warn       PatientID (0010,0020) missing or empty
``transfer_syntax``  reject     transfer syntax not in ``ingest_transfer_syntaxes``
                                (default: every transfer syntax pydicom knows)
``sop_class``        reject     SOP Class not in ``ingest_allowed_sop_classes``
                                (default: empty list = every SOP Class)
``clinical_schema``  reject     a CSV / NDJSON file does not match its table's schema
===================  =========  ====================================================

\\* fixed: the lake layout needs a parsed header and the UIDs, so these two cannot be
relaxed. Failures that are not rules (a conflicting duplicate, a lake or index
failure, an unreadable source) are recorded under the names of ``OUTCOME_RULES``.

Other receivers (the DIMSE gateway) call :func:`validate_instance` on a parsed
header and :func:`rejection` on its findings.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydicom._uid_dict import UID_dictionary  # the registry of PS3.6 UIDs

from medlake.config import Settings
from medlake.dicom.parse import ParsedInstance
from medlake.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidDicom,
    InvalidInput,
    MedlakeError,
    MissingAttribute,
    Rejected,
    SopClassNotAllowed,
    StorageError,
    StudyMismatch,
    Unreadable,
)


class Severity(enum.StrEnum):
    """What a failing rule does to the file."""

    IGNORE = "ignore"
    WARN = "warn"
    REJECT = "reject"
    #: Not a rule's decision: the file could not be stored (source, lake or index failure).
    ERROR = "error"


@dataclass(frozen=True)
class Rule:
    """One named validation rule."""

    name: str
    default: Severity
    description: str
    #: Cannot be set to anything but reject (storing is impossible without it).
    fixed: bool = False


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("file_size", Severity.REJECT, "the file is not empty"),
        Rule("dicom_part10", Severity.REJECT, "the file parses as DICOM Part 10", fixed=True),
        Rule(
            "required_uids",
            Severity.REJECT,
            "SOP Class, SOP Instance, Study and Series Instance UIDs are present and valid",
            fixed=True,
        ),
        Rule("patient_id", Severity.WARN, "PatientID (0010,0020) is present"),
        Rule("transfer_syntax", Severity.REJECT, "the transfer syntax is supported"),
        Rule("sop_class", Severity.REJECT, "the SOP Class is allowed"),
        Rule("clinical_schema", Severity.REJECT, "a clinical file matches its table's schema"),
    )
}

#: Names under which failures that are not validation rules are recorded.
OUTCOME_RULES = {
    "conflict": "the SOP Instance UID is stored with other content",
    "study_mismatch": "the StudyInstanceUID differs from the one the request named",
    "unreadable": "the source file could not be read",
    "lake_write": "the lake could not be written",
    "index_write": "the index database could not be reached or written",
    "error": "any other failure",
}

#: Every transfer syntax pydicom knows (the standard ones, retired included).
KNOWN_TRANSFER_SYNTAXES = frozenset(
    uid for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax"
)


@dataclass(frozen=True)
class Finding:
    """One rule that failed for one file, with the severity it is configured to."""

    rule: str
    severity: Severity
    message: str

    def error(self) -> Rejected:
        """The error a rejecting finding raises (what STOW-RS and C-STORE report)."""
        if self.rule == "sop_class":
            return SopClassNotAllowed(self.rule, self.message)
        return Rejected(self.rule, self.message)


def failure_finding(error: MedlakeError, *, rejected: bool) -> Finding:
    """The finding recorded for a file kept out by ``error``: a rule's rejection, or a
    failure (severity ``error``) that a retry may get past."""
    message = error.reason if isinstance(error, Rejected) else error.message
    return Finding(rule_of(error), Severity.REJECT if rejected else Severity.ERROR, message)


@dataclass(frozen=True)
class RuleConfig:
    """The configured severities and lists of the rules (see ``Settings.ingest_*``)."""

    severities: Mapping[str, Severity] = field(default_factory=dict)
    allowed_sop_classes: frozenset[str] = frozenset()
    transfer_syntaxes: frozenset[str] = KNOWN_TRANSFER_SYNTAXES
    patient_columns: tuple[str, ...] = ("patient_id", "PatientID", "patient", "mrn", "subject_id")
    required_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> RuleConfig:
        """The rules as ``settings`` configure them; unknown rule names and attempts to
        relax a fixed rule are :class:`InvalidInput`."""
        severities = {name: rule.default for name, rule in RULES.items()}
        for name, value in settings.ingest_rules.items():
            rule = RULES.get(name)
            if rule is None:
                raise InvalidInput(
                    f"ingest_rules names an unknown rule {name!r}; rules are {', '.join(RULES)}"
                )
            severity = Severity(value)
            if rule.fixed and severity is not Severity.REJECT:
                raise InvalidInput(
                    f"rule {name} cannot be set to {severity}: a file that fails it cannot be "
                    "stored (the lake layout needs a parsed header and its UIDs)"
                )
            severities[name] = severity
        return cls(
            severities=severities,
            allowed_sop_classes=frozenset(settings.ingest_allowed_sop_classes),
            transfer_syntaxes=frozenset(settings.ingest_transfer_syntaxes)
            or KNOWN_TRANSFER_SYNTAXES,
            patient_columns=tuple(settings.clinical_patient_columns),
            required_columns={
                table: tuple(columns)
                for table, columns in settings.clinical_required_columns.items()
            },
        )

    def severity(self, rule: str) -> Severity:
        """The configured severity of ``rule``."""
        return self.severities.get(rule, RULES[rule].default)

    def finding(self, rule: str, message: str) -> Finding | None:
        """A finding of ``rule`` at its configured severity; None when ignored."""
        severity = self.severity(rule)
        return None if severity is Severity.IGNORE else Finding(rule, severity, message)


def validate_instance(parsed: ParsedInstance, rules: RuleConfig) -> list[Finding]:
    """The findings of the header rules (``patient_id``, ``transfer_syntax``,
    ``sop_class``) on a parsed instance; empty when it passes.

    ``dicom_part10`` and ``required_uids`` are enforced by the parse itself
    (:func:`medlake.dicom.parse.read_instance` raises); see :func:`findings_for_error`.
    """
    found: list[Finding | None] = []
    if not parsed.values.get("patient_id"):
        found.append(rules.finding("patient_id", "PatientID (0010,0020) is missing or empty"))
    ts = parsed.transfer_syntax_uid
    if ts not in rules.transfer_syntaxes:
        found.append(rules.finding("transfer_syntax", f"transfer syntax {ts} is not supported"))
    sop_class = parsed.values.get("sop_class_uid")
    if rules.allowed_sop_classes and sop_class not in rules.allowed_sop_classes:
        found.append(
            rules.finding("sop_class", f"SOP Class {sop_class} is not in the allowed list")
        )
    return [f for f in found if f is not None]


def findings_for_error(error: MedlakeError, size: int | None, rules: RuleConfig) -> list[Finding]:
    """The findings for a file whose header could not be parsed (``error``)."""
    found: list[Finding] = []
    if size == 0 and isinstance(error, InvalidDicom):
        empty = rules.finding("file_size", "the file is empty (0 bytes)")
        if empty is not None:
            found.append(empty)
            if empty.severity is Severity.REJECT:
                return found
    if isinstance(error, MissingAttribute):
        found.append(Finding("required_uids", Severity.REJECT, error.message))
    elif isinstance(error, InvalidDicom):
        found.append(Finding("dicom_part10", Severity.REJECT, error.message))
    return found


def rejection(findings: Sequence[Finding]) -> Rejected | None:
    """The error of the first rejecting finding, or None when the file may be stored."""
    for finding in findings:
        if finding.severity is Severity.REJECT:
            return finding.error()
    return None


def rule_of(error: MedlakeError) -> str:
    """The rule name under which a failure is recorded in ``ingest_errors``."""
    if isinstance(error, Rejected):
        return error.rule
    if isinstance(error, MissingAttribute):
        return "required_uids"
    if isinstance(error, StudyMismatch):
        return "study_mismatch"
    if isinstance(error, InvalidDicom):
        return "dicom_part10"
    if isinstance(error, Conflict):
        return "conflict"
    if isinstance(error, Unreadable):
        return "unreadable"
    if isinstance(error, StorageError):
        return "lake_write"
    if isinstance(error, DatabaseUnavailable):
        return "index_write"
    return "error"


__all__ = [
    "KNOWN_TRANSFER_SYNTAXES",
    "OUTCOME_RULES",
    "RULES",
    "Finding",
    "Rule",
    "RuleConfig",
    "Severity",
    "failure_finding",
    "findings_for_error",
    "rejection",
    "rule_of",
    "validate_instance",
]
