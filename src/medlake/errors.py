"""The one exception tree of medlake.

Every error carries the HTTP status it maps to and, where DICOM defines one,
the DICOM status / failure reason code (PS3.18 Annex I, PS3.4 Annex C).
Messages say what was wrong and with which value.
"""

from __future__ import annotations

from typing import Any


class MedlakeError(Exception):
    """Base of every error medlake raises on purpose."""

    http_status: int = 500
    #: DICOM failure reason for STOW-RS FailedSOPSequence (PS3.18 Table I.2-1 / PS3.4 C.4.2.1.4).
    dicom_reason: int = 0x0110  # Processing failure

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(MedlakeError):
    """The request itself is malformed (bad parameter, bad header, bad body)."""

    http_status = 400


class InvalidDicom(InvalidInput):
    """The bytes are not a usable DICOM Part 10 instance."""

    dicom_reason = 0xC000  # Cannot understand


class MissingAttribute(InvalidDicom):
    """A required attribute (e.g. SOPInstanceUID) is absent or empty."""

    dicom_reason = 0xA900  # Data set does not match SOP class


class Rejected(InvalidDicom):
    """An ingest validation rule set to ``reject`` refused the instance or file.

    ``rule`` names the rule (``patient_id``, ``sop_class``, ...); the message says
    what was wrong and ends with the rule's name, so a user can find its setting.
    """

    dicom_reason = 0xA900  # Data set does not match SOP class

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} [rule {rule}]")
        self.rule = rule
        self.reason = message


class SopClassNotAllowed(Rejected):
    """The SOP Class is not in the configured list of allowed SOP Classes."""

    dicom_reason = 0x0122  # SOP Class not supported


class StudyMismatch(InvalidDicom):
    """The instance's StudyInstanceUID differs from the one in the request URL."""

    http_status = 409
    dicom_reason = 0xA900


class UnsupportedMediaType(MedlakeError):
    """Content-Type (or Accept) names a media type medlake does not serve."""

    http_status = 415


class NotAcceptable(MedlakeError):
    """No representation satisfies the Accept header."""

    http_status = 406


class UnknownAttribute(InvalidInput):
    """A QIDO query names an attribute that is not searchable."""


class NotFound(MedlakeError):
    """The study, series, instance, frame or partition does not exist."""

    http_status = 404


class Conflict(MedlakeError):
    """The write conflicts with what is stored (same UID, different bytes)."""

    http_status = 409
    dicom_reason = 0x0111  # Duplicate SOP instance


class PayloadTooLarge(MedlakeError):
    """The request body exceeds the configured limit."""

    http_status = 413


class StorageError(MedlakeError):
    """The lake could not be read or written (permissions, disk full, network)."""

    http_status = 503
    dicom_reason = 0xA700  # Out of resources


class DatabaseUnavailable(MedlakeError):
    """The index database could not be reached or refused the write."""

    http_status = 503
    dicom_reason = 0xA700


class Unreadable(MedlakeError):
    """A source file of an ingest could not be read: permissions, not a regular file
    (a FIFO, a dangling link), vanished, or an I/O error."""

    http_status = 400


class InvalidState(MedlakeError):
    """The object is not in a state that allows the request (e.g. resuming a batch
    that is not paused)."""

    http_status = 409


class LimitExceeded(MedlakeError):
    """A configured maximum (e.g. 128 extended query tags) would be exceeded."""

    http_status = 409


class NetworkError(MedlakeError):
    """A DICOM network peer could not be reached, refused the association, or failed
    the operation; or medlake could not listen on its DIMSE port."""

    http_status = 502


class FhirError(MedlakeError):
    """A FHIR interaction failed (answered with an ``OperationOutcome``).

    ``issues`` are the outcome's issues saying what was wrong and where (FHIR
    ``OperationOutcome.issue`` JSON objects, with ``expression``); when there are none,
    one issue is made from the message with ``issue_code`` (FHIR IssueType).
    """

    issue_code = "processing"

    def __init__(self, message: str, *, issues: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.issues: list[dict[str, Any]] = issues or []


class InvalidResource(FhirError):
    """The request body is not a usable FHIR resource: not JSON, not an object, a
    ``resourceType`` or ``id`` that disagrees with the URL, an invalid id."""

    http_status = 400
    issue_code = "structure"


class Unprocessable(FhirError):
    """The resource is well-formed JSON but breaks the FHIR R4 rules of its type."""

    http_status = 422
    issue_code = "invalid"


class PreconditionFailed(FhirError):
    """``If-Match`` names another version, or a conditional interaction's criteria
    match more than one resource."""

    http_status = 412
    issue_code = "conflict"


class Gone(FhirError):
    """The FHIR resource (or the version asked for) was deleted."""

    http_status = 410
    issue_code = "deleted"


class MethodNotAllowed(FhirError):
    """The FHIR interaction is not supported on this URL; ``allow`` lists the methods
    that are (the ``Allow`` header)."""

    http_status = 405
    issue_code = "not-supported"

    def __init__(
        self,
        message: str,
        *,
        issues: list[dict[str, Any]] | None = None,
        allow: list[str] | None = None,
    ) -> None:
        super().__init__(message, issues=issues)
        self.allow: list[str] = allow or []


__all__ = [
    "Conflict",
    "DatabaseUnavailable",
    "FhirError",
    "Gone",
    "InvalidDicom",
    "InvalidInput",
    "InvalidResource",
    "InvalidState",
    "LimitExceeded",
    "MedlakeError",
    "MethodNotAllowed",
    "MissingAttribute",
    "NetworkError",
    "NotAcceptable",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "Rejected",
    "SopClassNotAllowed",
    "StorageError",
    "StudyMismatch",
    "UnknownAttribute",
    "Unprocessable",
    "Unreadable",
    "UnsupportedMediaType",
]
