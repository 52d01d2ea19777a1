"""Original-mode acknowledgements (HL7 v2.5.1 section 2.9.2): the ACK message.

The ACK uses the received message's separators and version and swaps its sending and
receiving application and facility (copied as sent, components included). MSA-2
echoes MSH-10. Each problem becomes an ERR segment: ERR-2 error location, ERR-3 the
table 0357 code, ERR-4 severity ``E``, ERR-8 the explanation; for versions before 2.5,
whose ERR has only ERR-1 (error code and location), ERR-1 carries the same, and MSA-3
the explanation of the first problem.
"""

from __future__ import annotations

import datetime as dt

from medlake.clinical.hl7.errors import Hl7Issue
from medlake.clinical.hl7.message import DEFAULT_ENCODING_CHARACTERS, Header, codec_for

#: The version an ACK declares when the message gave none that could be read.
DEFAULT_VERSION = "2.5.1"
#: ERR segments sent at most; the stored error text has every problem.
MAX_ERR_SEGMENTS = 20


def build_ack(
    header: Header | None,
    ack_code: str,
    control_id: str,
    issues: list[Hl7Issue],
    now: dt.datetime | None = None,
) -> bytes:
    """The ACK message (without MLLP framing), encoded in the message's character set."""
    separator = header.field_separator if header is not None else "|"
    encoding = header.encoding_characters if header is not None else DEFAULT_ENCODING_CHARACTERS
    version = (header.version if header is not None else "") or DEFAULT_VERSION
    legacy = _before_2_5(version)
    escape = _Escaper(separator, encoding)
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d%H%M%S%z")

    def get(number: int) -> str:
        return header.get(number) if header is not None else ""

    trigger = header.trigger_event if header is not None and header.encoding_ok else ""
    component = encoding[0]
    message_type = f"ACK{component}{trigger}{component}ACK" if trigger else "ACK"
    if version == "2.3" and trigger:  # MSH-9 has no message structure component before 2.3.1
        message_type = f"ACK{component}{trigger}"
    msh = [
        "MSH",
        encoding,
        get(5),  # sending application: the receiver of the message
        get(6),
        get(3),  # receiving application: its sender
        get(4),
        stamp,
        "",
        message_type,
        escape(control_id),
        get(11) or "P",
        get(12) or DEFAULT_VERSION,
    ]
    charset = get(18)
    if charset:
        msh.extend([""] * 5 + [charset])
    msa = ["MSA", ack_code, get(10)]
    if legacy and issues:
        msa.append(escape(issues[0].message))
    # MSH-1 is the separator itself, so joining the fields from MSH-2 on spells it once.
    segments = [separator.join(msh), separator.join(msa)]
    segments.extend(
        _err(issue, legacy, separator, encoding, escape) for issue in issues[:MAX_ERR_SEGMENTS]
    )
    text = "\r".join(segments) + "\r"
    return text.encode(codec_for(header.charset if header is not None else None), "replace")


def _before_2_5(version: str) -> bool:
    parts = version.split(".")
    try:
        return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) < (2, 5)
    except ValueError:
        return False


def _err(issue: Hl7Issue, legacy: bool, separator: str, encoding: str, escape: _Escaper) -> str:
    component, subcomponent = encoding[0], encoding[3]
    code = component.join([str(int(issue.code)), escape(issue.code.text), "HL70357"])
    location = component.join(
        "" if value is None else str(value)
        for value in (
            issue.segment,
            issue.sequence,
            issue.field,
            1 if issue.field else None,  # field repetition
            issue.component,
        )
    ).rstrip(component)
    if legacy:
        # ERR-1 (ELD): segment ID ^ sequence ^ field position ^ code (CE, in subcomponents)
        coded = subcomponent.join([str(int(issue.code)), escape(issue.code.text), "HL70357"])
        eld = component.join(
            ["" if v is None else str(v) for v in (issue.segment, issue.sequence, issue.field)]
            + [coded]
        )
        return separator.join(["ERR", eld])
    return separator.join(["ERR", "", location, code, "E", "", "", "", escape(issue.message)])


class _Escaper:
    """Escapes text for a field (HL7 v2.5.1 section 2.7.4) with the message's separators."""

    def __init__(self, separator: str, encoding: str) -> None:
        component, repetition, escape, subcomponent = (encoding[i] for i in range(4))
        self._escape = escape
        self._map = {
            escape: f"{escape}E{escape}",
            separator: f"{escape}F{escape}",
            component: f"{escape}S{escape}",
            subcomponent: f"{escape}T{escape}",
            repetition: f"{escape}R{escape}",
        }

    def __call__(self, text: str) -> str:
        text = " ".join(text.split())  # one line: CR would end the segment
        return "".join(self._map.get(c, c) for c in text)
