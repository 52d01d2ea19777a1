"""Reading an HL7 v2 message: its MSH header straight from the bytes (before anything
else, to know the character set and the encoding characters), the text decoded with
the declared character set, and the segments parsed by python-hl7 (``hl7``).

python-hl7 splits a message by the separators of its own MSH-1/MSH-2 and unescapes
values on access; it is about 30 times faster than hl7apy's parser (~0.15 ms against
~4 ms for an ADT^A01 here), which matters on the acknowledgement path, and the rules
that decide AA/AE/AR are medlake's own (:mod:`.validation`), so hl7apy's strict mode
would add cost without adding the checks needed.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import hl7
from hl7.util import unescape

from medlake.clinical.hl7.errors import ErrorCode, Hl7Issue

#: HL7 table 0211 (alternate character sets, MSH-18) -> Python codec.
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "latin_1",
    "ISO IR100": "latin_1",
    "8859/2": "iso8859_2",
    "8859/3": "iso8859_3",
    "8859/4": "iso8859_4",
    "8859/5": "iso8859_5",
    "8859/6": "iso8859_6",
    "8859/7": "iso8859_7",
    "8859/8": "iso8859_8",
    "8859/9": "iso8859_9",
    "8859/15": "iso8859_15",
    "UNICODE": "utf_8",
    "UNICODE UTF-8": "utf_8",
    "ISO IR192": "utf_8",
    "UNICODE UTF-16": "utf_16",
    "UNICODE UTF-32": "utf_32",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}
#: Decoding of a message that declares no character set: HL7's default is ASCII, which
#: UTF-8 decodes the same; bytes that are not UTF-8 are kept raw and read as Latin-1.
DEFAULT_CODEC = "utf_8"
FALLBACK_CODEC = "latin_1"

DEFAULT_ENCODING_CHARACTERS = "^~\\&"


@dataclass(frozen=True)
class Header:
    """The MSH segment's fields as sent (escaped, components kept).

    ``fields[n]`` is MSH-n for n >= 1 (``fields[0]`` is ``"MSH"``), as python-hl7 and
    the standard number them.
    """

    fields: tuple[str, ...]
    encoding_ok: bool  # MSH-2 holds usable encoding characters

    def get(self, number: int) -> str:
        """MSH-``number`` as sent, or ``""``."""
        return self.fields[number] if number < len(self.fields) else ""

    def component(self, number: int, index: int) -> str:
        """Component ``index`` (1-based) of the first repetition of MSH-``number``."""
        value = self.get(number)
        if not self.encoding_ok:
            return value if index == 1 else ""
        value = value.split(self.repetition, 1)[0]
        parts = value.split(self.component_separator)
        return parts[index - 1] if index <= len(parts) else ""

    @property
    def field_separator(self) -> str:
        """MSH-1."""
        return self.get(1)

    @property
    def encoding_characters(self) -> str:
        """MSH-2 when usable, else the default ``^~\\&``."""
        return self.get(2) if self.encoding_ok else DEFAULT_ENCODING_CHARACTERS

    @property
    def component_separator(self) -> str:
        """The component separator (first encoding character)."""
        return self.encoding_characters[0]

    @property
    def repetition(self) -> str:
        """The repetition separator (second encoding character)."""
        return self.encoding_characters[1]

    @property
    def message_code(self) -> str:
        """MSH-9.1, e.g. ``ADT``."""
        return self.component(9, 1).strip()

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. ``A01``."""
        return self.component(9, 2).strip()

    @property
    def message_type(self) -> str | None:
        """``MSH-9.1^MSH-9.2`` (``^`` whatever the message's separator), or None."""
        if not self.message_code:
            return None
        return (
            f"{self.message_code}^{self.trigger_event}" if self.trigger_event else self.message_code
        )

    @property
    def control_id(self) -> str:
        """MSH-10 as sent."""
        return self.get(10)

    @property
    def processing_id(self) -> str:
        """MSH-11.1 (P, D or T)."""
        return self.component(11, 1).strip()

    @property
    def version(self) -> str:
        """MSH-12.1, e.g. ``2.5.1``."""
        return self.component(12, 1).strip()

    @property
    def charset(self) -> str:
        """The first repetition of MSH-18 (the character set of the whole message)."""
        value = self.get(18)
        return value.split(self.repetition, 1)[0].strip() if self.encoding_ok else value.strip()


@dataclass
class DecodedMessage:
    """A received block read as far as it goes: the header (None when there is no
    usable MSH), the text, whether that text is the bytes exactly decoded with the
    declared character set, and the problems found so far."""

    payload: bytes
    header: Header | None
    text: str
    exact: bool
    codec: str
    issues: list[Hl7Issue] = field(default_factory=list)


def decode_message(payload: bytes) -> DecodedMessage:
    """Read the MSH of ``payload`` from its bytes, then decode the whole message."""
    issues: list[Hl7Issue] = []
    # MSH is ASCII by rule; Latin-1 reads any byte, enough to find MSH-18.
    header = read_header(payload.decode("latin_1"), issues)
    codec = DEFAULT_CODEC
    if header is not None and header.charset:
        known = CHARSETS.get(header.charset.upper())
        if known is None:
            issues.append(
                Hl7Issue(
                    ErrorCode.TABLE_VALUE_NOT_FOUND,
                    f"MSH-18 character set {header.charset!r} is not in HL7 table 0211",
                    "MSH",
                    1,
                    18,
                )
            )
        else:
            codec = known
    try:
        text = payload.decode(codec)
    except UnicodeDecodeError as exc:
        declared = header is not None and bool(header.charset)
        if declared:
            issues.append(
                Hl7Issue(
                    ErrorCode.DATA_TYPE_ERROR,
                    f"the message is not valid {header.charset if header else ''} text: "
                    f"byte {exc.start} ({payload[exc.start : exc.start + 1]!r}) does not decode",
                    "MSH",
                    1,
                    18,
                )
            )
        return DecodedMessage(
            payload, header, payload.decode(FALLBACK_CODEC), False, FALLBACK_CODEC, issues
        )
    if header is not None and codec != FALLBACK_CODEC:
        # names in MSH-3/4 may use the declared character set
        header = read_header(text, []) or header
    return DecodedMessage(payload, header, text, True, codec, issues)


def read_header(text: str, issues: list[Hl7Issue]) -> Header | None:
    """The MSH fields of a message, read from its first segment.

    Returns None (with a rejecting issue) when the message does not start with a usable
    MSH; a header whose MSH-2 is unusable is returned with ``encoding_ok`` False.
    """
    first = text.lstrip("\r\n \t")
    if not first.startswith("MSH") or len(first) < 8:
        issues.append(
            Hl7Issue(
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                "the message does not start with an MSH segment"
                + (f" (it starts with {first[:3]!r})" if first else " (it is empty)"),
                "MSH",
                1,
                reject=True,
            )
        )
        return None
    sep = first[3]
    if sep.isalnum() or sep.isspace() or not sep.isprintable() or ord(sep) > 0x7E:
        issues.append(
            Hl7Issue(
                ErrorCode.DATA_TYPE_ERROR,
                f"MSH-1 field separator {sep!r} is not a usable separator character",
                "MSH",
                1,
                1,
                reject=True,
            )
        )
        return None
    ends = [at for at in (first.find("\r"), first.find("\n")) if at >= 0]
    line = first[: min(ends)] if ends else first
    fields = ("MSH", sep, *line[4:].split(sep))
    encoding = fields[2] if len(fields) > 2 else ""
    problem = _encoding_characters_problem(encoding, sep)
    if problem:
        issues.append(
            Hl7Issue(
                ErrorCode.DATA_TYPE_ERROR,
                f"MSH-2 encoding characters {encoding!r} {problem}",
                "MSH",
                1,
                2,
                reject=True,
            )
        )
    return Header(fields, encoding_ok=not problem)


def _encoding_characters_problem(encoding: str, separator: str) -> str:
    """Why ``encoding`` cannot be MSH-2 (component, repetition, escape, subcomponent and,
    from v2.7, truncation characters), or ``""``."""
    if len(encoding) not in (4, 5):
        return (
            "must be 4 characters (component, repetition, escape, subcomponent), "
            f"not {len(encoding)}"
        )
    if len(set(encoding)) != len(encoding) or separator in encoding:
        return "must be distinct from each other and from the field separator"
    if any(c.isalnum() or c.isspace() or not c.isprintable() for c in encoding):
        return "must not be letters, digits, spaces or control characters"
    return ""


def segment_lines(text: str) -> list[str]:
    """The segments of ``text``: split at CR (CR LF and a lone LF are accepted too),
    surrounding whitespace and empty lines dropped."""
    normalised = text.replace("\r\n", "\r").replace("\n", "\r")
    return [line for line in (part.strip(" \t") for part in normalised.split("\r")) if line]


class ParsedMessage:
    """A decoded message parsed into segments, with unescaped value access.

    Field numbers follow the standard: for MSH, ``get("MSH", 9)`` is MSH-9.
    """

    def __init__(self, decoded: DecodedMessage) -> None:
        if decoded.header is None or not decoded.header.encoding_ok:
            raise ValueError("a message without a usable MSH cannot be parsed")
        self.decoded = decoded
        self.header = decoded.header
        self.lines = segment_lines(decoded.text)
        self.message = hl7.parse("\r".join(self.lines))
        self._all = [Segment(segment, n) for n, segment in enumerate(self.message)]
        self._by_id: dict[str, list[Segment]] = {}
        for segment in self._all:
            self._by_id.setdefault(segment.id, []).append(segment)

    @property
    def segment_ids(self) -> list[str]:
        """The segment IDs in order (``MSH``, ``EVN``, ...)."""
        return [segment.id for segment in self._all]

    def segments(self, segment_id: str) -> list[Segment]:
        """Every segment with this ID, in order."""
        return self._by_id.get(segment_id, [])

    def first(self, segment_id: str) -> Segment | None:
        """The first segment with this ID, or None."""
        found = self._by_id.get(segment_id)
        return found[0] if found else None

    def all(self) -> list[Segment]:
        """Every segment, in order."""
        return list(self._all)


#: One repetition of a field: its components, each a list of subcomponents (unescaped).
Components = list[list[str]]


class Segment:
    """One parsed segment; values are unescaped on access."""

    def __init__(self, segment: hl7.Segment, position: int) -> None:
        self._segment = segment
        self.id = str(segment[0])
        self._fields: dict[int, list[Components]] = {}
        #: Index of the segment in the message (0 = MSH).
        self.position = position

    def __len__(self) -> int:
        return len(self._segment)

    def raw(self, number: int) -> str:
        """Field ``number`` as sent (escaped, separators kept)."""
        if number >= len(self._segment):
            return ""
        return str(self._segment[number])

    def repetitions(self, number: int) -> list[Components]:
        """Field ``number`` as repetitions of components of subcomponents, unescaped;
        ``[]`` when the field is empty or absent."""
        cached = self._fields.get(number)
        if cached is not None:
            return cached
        if number >= len(self._segment):
            found = []
        elif self.id == "MSH" and number in (1, 2):
            found = [[[str(self._segment[number])]]]
        else:
            nodes = _repetition_nodes(self._segment[number])
            found = [
                rep
                for rep in (_components(self._segment, node) for node in nodes)
                if any(any(sub for sub in comp) for comp in rep)
            ]
        self._fields[number] = found
        return found

    def get(
        self, number: int, component: int = 1, subcomponent: int = 1, repetition: int = 1
    ) -> str:
        """One value, unescaped, stripped; ``""`` when absent."""
        reps = self.repetitions(number)
        if repetition > len(reps):
            return ""
        comps = reps[repetition - 1]
        if component > len(comps):
            return ""
        subs = comps[component - 1]
        return subs[subcomponent - 1].strip() if subcomponent <= len(subs) else ""

    def text(self, number: int, repetition: int = 1) -> str:
        """A whole repetition of a field as text, components joined by ``^`` (unescaped;
        for ST/TX/FT values, which have a single component)."""
        reps = self.repetitions(number)
        if repetition > len(reps):
            return ""
        return "^".join("&".join(sub) for sub in reps[repetition - 1]).rstrip("^")


def _repetition_nodes(field_node: object) -> list[object]:
    if isinstance(field_node, hl7.Field) and any(isinstance(x, hl7.Repetition) for x in field_node):
        return list(field_node)
    return [field_node]


def _components(segment: hl7.Segment, repetition: object) -> Components:
    if isinstance(repetition, str):
        return [[unescape(segment, repetition)]]
    items = list(repetition) if isinstance(repetition, list) else [repetition]
    out: Components = []
    for item in items:
        if isinstance(item, hl7.Component):
            out.append([unescape(segment, str(sub)) for sub in item])
        elif isinstance(item, hl7.Repetition):
            out.extend(_components(segment, item))
        else:
            out.append([unescape(segment, str(item))])
    return out


def codec_for(charset: str | None) -> str:
    """The Python codec of an MSH-18 value (UTF-8 when none or unknown)."""
    return CHARSETS.get((charset or "").strip().upper(), DEFAULT_CODEC)


def is_known_codec(name: str) -> bool:
    """Whether Python can encode with ``name``."""
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True
