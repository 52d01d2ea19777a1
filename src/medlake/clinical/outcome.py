"""``OperationOutcome`` resources for errors and notices (R4 operationoutcome.html)."""

from __future__ import annotations

from typing import Any

from medlake.clinical.resources import issue
from medlake.errors import FhirError, MedlakeError

#: IssueType of the errors that are not FHIR errors, by their HTTP status.
_CODES_BY_STATUS = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-long",
    415: "not-supported",
    422: "processing",
    503: "transient",
}


def issue_code(exc: MedlakeError) -> str:
    """The FHIR IssueType of an error."""
    if isinstance(exc, FhirError):
        return exc.issue_code
    return _CODES_BY_STATUS.get(exc.http_status, "exception")


def operation_outcome(exc: MedlakeError) -> dict[str, Any]:
    """The ``OperationOutcome`` of an error: its issues, or one made from its message."""
    issues = exc.issues if isinstance(exc, FhirError) and exc.issues else None
    if issues is None:
        issues = [issue(issue_code(exc), exc.message)]
    return {"resourceType": "OperationOutcome", "issue": issues}


def information(text: str) -> dict[str, Any]:
    """An ``OperationOutcome`` with one informational issue (``Prefer:
    return=OperationOutcome`` of a successful write)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [issue("informational", text, severity="information")],
    }


__all__ = ["information", "issue_code", "operation_outcome"]
