"""What can be wrong with a received HL7 v2 message, in the standard's words: HL7 table
0357 (message error condition codes) and the location an ERR segment reports."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from medlake.errors import NetworkError


class ErrorCode(IntEnum):
    """HL7 table 0357 (v2.5.1): message error condition codes, as sent in ERR-3."""

    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    UNKNOWN_KEY_IDENTIFIER = 204
    DUPLICATE_KEY_IDENTIFIER = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        """The table's description of the code (ERR-3.2)."""
        return self.name.replace("_", " ").capitalize()


#: Codes that reject the message outright (MSA-1 ``AR``): HL7 v2.5.1 section 2.9.2.1
#: makes a message whose MSH-9, MSH-11 or MSH-12 the receiver does not accept an
#: application reject, as is a failure unrelated to the content (an internal error).
REJECTING_CODES = frozenset(
    {
        ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
        ErrorCode.UNSUPPORTED_EVENT_CODE,
        ErrorCode.UNSUPPORTED_PROCESSING_ID,
        ErrorCode.UNSUPPORTED_VERSION_ID,
        ErrorCode.APPLICATION_INTERNAL_ERROR,
    }
)


@dataclass(frozen=True)
class Hl7Issue:
    """One problem of a message, reported as one ERR segment.

    The location is the ERR-2 error location (ERL): segment ID, its sequence (1 = first
    occurrence of that segment), field position, component; ``None`` where it does not
    apply. ``reject`` marks problems that make the message unreadable (no MSH, unusable
    separators): they are answered with AR whatever the code.
    """

    code: ErrorCode
    message: str
    segment: str | None = None
    sequence: int | None = None
    field: int | None = None
    component: int | None = None
    reject: bool = False

    @property
    def rejects(self) -> bool:
        """Whether this problem makes the acknowledgement an AR (else AE)."""
        return self.reject or self.code in REJECTING_CODES

    @property
    def location(self) -> str:
        """``PID-3.1`` style location, or ``""``."""
        if not self.segment:
            return ""
        where = self.segment
        if self.sequence and self.sequence > 1:
            where += f"[{self.sequence}]"
        if self.field:
            where += f"-{self.field}"
            if self.component:
                where += f".{self.component}"
        return where

    def describe(self) -> str:
        """``101 PID-3: …`` for logs and the stored error text."""
        where = f" {self.location}" if self.location else ""
        return f"{int(self.code)}{where}: {self.message}"


def acknowledgment_code(issues: list[Hl7Issue]) -> str:
    """MSA-1 in original acknowledgement mode: AA, AE (content errors) or AR."""
    if any(issue.rejects for issue in issues):
        return "AR"
    return "AE" if issues else "AA"


class MllpError(NetworkError):
    """The MLLP listener could not start (e.g. its port is taken)."""
