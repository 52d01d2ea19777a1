"""De-identified FHIR read and search for the researcher role.

Both call the identified services (:func:`medlake.clinical.store.read_resource`,
:func:`medlake.clinical.search.search_bundle`) and pass every resource through
:func:`medlake.clinical.deidentify.deidentify_resource` before it leaves. Logical ids
and references in requests are pseudonyms of earlier answers, mapped back through the
index; one never handed out matches nothing (a 404 on read, an empty Bundle on search),
so a caller cannot probe with real ids. Parameters that would match on removed data
(:data:`IDENTIFYING_PARAMETERS`), chains and ``_has`` are refused with a 400: an answer,
even de-identified, would tell whether a named person is in the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from medlake.clinical.deidentify import deidentify_resource
from medlake.clinical.resources import parse_json
from medlake.clinical.search import search_bundle
from medlake.clinical.search_params import parameters_of
from medlake.clinical.store import read_resource
from medlake.errors import InvalidInput, NotFound
from medlake.ingest.archive import Archive
from medlake.security.pseudonyms import (
    UnknownPseudonym,
    originals,
    partition_pseudonyms,
    pseudonymous_errors,
    remember_issued,
)

__all__ = ["IDENTIFYING_PARAMETERS", "deidentified_read", "deidentified_search"]

#: Search parameters on the elements de-identification removes or coarsens.
IDENTIFYING_PARAMETERS = frozenset(
    {
        "name", "family", "given", "phonetic", "identifier", "telecom", "phone", "email",
        "address", "address-city", "address-country", "address-postalcode", "address-state",
        "address-use", "birthdate", "death-date", "_text", "_content", "_source",
    }
)  # fmt: skip


def deidentified_read(
    archive: Archive, partition: str, resource_type: str, pseudonym: str, *, base_url: str
) -> dict[str, Any]:
    """The current version of ``Type/pseudonym``, de-identified (404 for an id that is no
    pseudonym handed out by the view)."""
    part, pseudonyms = partition_pseudonyms(archive.engine, partition)
    with archive.engine.connect() as conn:
        found = originals(conn, part, [(f"fhir:{resource_type}", pseudonym)])
    original = found.get((f"fhir:{resource_type}", pseudonym))
    if original is None:
        raise NotFound(f"{resource_type}/{pseudonym} is not a de-identified resource id")
    with pseudonymous_errors({original: pseudonym}):
        stored = read_resource(archive, resource_type, original, partition=partition)
    assert stored.content is not None
    resource = deidentify_resource(
        parse_json(stored.content, "stored resource"), pseudonyms, base_url
    )
    remember_issued(archive.engine, part, pseudonyms)
    return resource


def _check_parameter(name: str, value: str) -> None:
    base = name.partition(":")[0]
    if "." in name or base == "_has":
        raise InvalidInput(f"{name} is not supported in a de-identified view (chained search)")
    if base in IDENTIFYING_PARAMETERS:
        raise InvalidInput(f"{base} cannot be searched in a de-identified view")
    if base == "_sort":
        for part in value.split(","):
            if part.lstrip("-") in IDENTIFYING_PARAMETERS:
                raise InvalidInput(f"cannot sort on {part.lstrip('-')} in a de-identified view")


def _wanted(resource_type: str, name: str, value: str) -> list[tuple[str, str, str | None]] | None:
    """(kind, pseudonym, type prefix) of each value of an id or reference parameter, or
    ``None`` for another parameter."""
    base, _, modifier = name.partition(":")
    if base == "_id":
        return [(f"fhir:{resource_type}", v, None) for v in value.split(",") if v]
    parameter = parameters_of(resource_type).get(base)
    if parameter is None or parameter.type != "reference" or modifier == "missing":
        return None
    if modifier == "identifier":
        raise InvalidInput(f"{name} matches on identifiers, which a de-identified view removes")
    out: list[tuple[str, str, str | None]] = []
    for item in (v for v in value.split(",") if v):
        kind, slash, pseudonym = item.rpartition("/")
        kind = kind.rsplit("/", 1)[-1] if slash else (modifier or "")
        if not kind and len(parameter.targets) == 1:
            kind = parameter.targets[0]
        if not kind:
            raise InvalidInput(f"{name}={item}: give the reference as Type/id")
        out.append((f"fhir:{kind}", pseudonym, kind if slash else None))
    return out


def _translated(
    archive: Archive, part: int, resource_type: str, query: Sequence[tuple[str, str]]
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The query with pseudonyms mapped back, and each original id with its pseudonym;
    400 for a forbidden parameter."""
    plan: list[tuple[str, str, list[tuple[str, str, str | None]] | None]] = []
    for name, value in query:
        _check_parameter(name, value)
        plan.append((name, value, _wanted(resource_type, name, value)))
    keys = [(kind, p) for _, _, wanted in plan for kind, p, _ in wanted or []]
    with archive.engine.connect() as conn:
        found = originals(conn, part, keys)
    out: list[tuple[str, str]] = []
    for name, value, wanted in plan:
        if wanted is None:
            out.append((name, value))
            continue
        real = [
            f"{prefix}/{found[(kind, p)]}" if prefix else found[(kind, p)]
            for kind, p, prefix in wanted
            if (kind, p) in found
        ]
        if not real:
            raise UnknownPseudonym(name)
        out.append((name, ",".join(real)))
    return out, {original: p for (_, p), original in found.items()}


def _relinked(
    links: list[dict[str, str]], root: str, query: Sequence[tuple[str, str]]
) -> list[dict[str, str]]:
    """The paging links with the caller's (pseudonymous) parameters instead of the
    translated ones: only ``_count``/``_offset`` are taken from each link."""
    kept = [(k, v) for k, v in query if k not in ("_offset", "_count")]
    out = []
    for link in links:
        paging = [
            (k, v) for k, v in parse_qsl(urlsplit(link["url"]).query) if k in ("_count", "_offset")
        ]
        out.append({"relation": link["relation"], "url": f"{root}?{urlencode([*kept, *paging])}"})
    return out


def deidentified_search(
    archive: Archive,
    partition: str,
    resource_type: str,
    query: Sequence[tuple[str, str]],
    *,
    base_url: str,
    strict: bool = False,
) -> dict[str, Any]:
    """A ``searchset`` Bundle of de-identified resources; ``base_url`` is the view's FHIR
    base (entry ``fullUrl`` and links start with it)."""
    part, pseudonyms = partition_pseudonyms(archive.engine, partition)
    root = f"{base_url}/{resource_type}"
    try:
        translated, named = _translated(archive, part, resource_type, query)
    except UnknownPseudonym:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 0,
            "link": _relinked([{"relation": "self", "url": root}], root, query),
        }
    with archive.engine.connect() as conn, pseudonymous_errors(named):
        bundle = search_bundle(
            conn, part, resource_type, translated, base_url=base_url, strict=strict
        )
    entries = []
    for entry in bundle.get("entry", []):
        resource = deidentify_resource(entry["resource"], pseudonyms, base_url)
        kind = resource.get("resourceType")
        new: dict[str, Any] = {"resource": resource, "search": entry.get("search")}
        if "id" in resource:
            new = {"fullUrl": f"{base_url}/{kind}/{resource['id']}", **new}
        entries.append(new)
    if entries:
        bundle["entry"] = entries
    bundle["link"] = _relinked(bundle.get("link", []), root, query)
    remember_issued(archive.engine, part, pseudonyms)
    return bundle
