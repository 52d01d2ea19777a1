"""Conditional GET (RFC 9110 §13.1.2 and §13.1.3), for FHIR's conditional read: a
client that sends the ``ETag`` or ``Last-Modified`` of its copy gets ``304 Not
Modified`` instead of the resource when that copy is still current."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

#: One entity tag of an ``If-None-Match`` list: ``"x"`` or ``W/"x"``.
_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')


def not_modified(headers: Mapping[str, str], etag: str, last_modified: dt.datetime) -> bool:
    """Whether the request's validators say the client holds the current version.

    ``If-None-Match`` decides when present (weak comparison: ``W/"3"`` matches ``"3"``;
    ``*`` matches any version). Without it, ``If-Modified-Since`` does: the resource is
    not modified when it changed at or before that date (HTTP dates have whole
    seconds). A date that cannot be read is ignored, as RFC 9110 says.
    """
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if if_none_match.strip() == "*":
            return True
        current = _opaque(etag)
        return any(_opaque(tag) == current for tag in _ENTITY_TAG.findall(if_none_match))
    if_modified_since = headers.get("if-modified-since")
    if if_modified_since is None:
        return False
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError):
        return False
    if since.tzinfo is None:
        return False
    return last_modified.replace(microsecond=0) <= since


def _opaque(tag: str) -> str:
    return tag.strip().removeprefix("W/")


__all__ = ["not_modified"]
