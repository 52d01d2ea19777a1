"""Content-Type and Accept headers: parsing media types and their parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from medlake.errors import NotAcceptable


@dataclass(frozen=True)
class MediaType:
    """A media type with lower-cased name and unquoted parameters."""

    name: str
    params: dict[str, str] = field(default_factory=dict)
    quality: float = 1.0

    def matches(self, name: str) -> bool:
        """Whether ``name`` satisfies this (possibly wildcard) media type."""
        if self.name in ("*/*", name):
            return True
        major = name.split("/")[0]
        return self.name == f"{major}/*"


def parse_media_type(value: str) -> MediaType:
    """``multipart/related; type="application/dicom"`` → MediaType."""
    name, *raw_params = [p.strip() for p in _split(value, ";")]
    params: dict[str, str] = {}
    quality = 1.0
    for item in raw_params:
        key, _, val = item.partition("=")
        key, val = key.strip().lower(), val.strip().strip('"')
        if key == "q":
            try:
                quality = float(val)
            except ValueError:
                quality = 0.0
        else:
            params[key] = val
    return MediaType(name.lower(), params, quality)


def parse_accept(value: str | None) -> list[MediaType]:
    """The media types of an Accept header, best first; ``*/*`` when absent."""
    if not value:
        return [MediaType("*/*")]
    types = [parse_media_type(part) for part in _split(value, ",") if part.strip()]
    return sorted((t for t in types if t.quality > 0), key=lambda t: -t.quality)


def choose(accept: list[MediaType], offers: list[str], what: str) -> MediaType:
    """The first acceptable of ``offers`` (returns the matching Accept entry, named)."""
    for wanted in accept:
        for offer in offers:
            if wanted.matches(offer):
                return MediaType(offer, wanted.params, wanted.quality)
    raise NotAcceptable(
        f"cannot return {what} as {', '.join(t.name for t in accept)}; "
        f"available: {', '.join(offers)}"
    )


def _split(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out
