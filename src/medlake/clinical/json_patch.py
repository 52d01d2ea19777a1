"""FHIR ``patch`` with a JSON Patch document (RFC 6902; FHIR R4 http.html#patch),
applied with the ``jsonpatch`` library.

A document that is not a JSON Patch (not an array of operations, an unknown ``op``,
a path that is no JSON Pointer) is 400. One that cannot be applied to the current
version (a ``test`` that fails, a path that leads nowhere in it) is 422, as is a
result that is no valid resource: nothing is written then.
"""

from __future__ import annotations

from typing import Any

import jsonpatch
import jsonpointer

from medlake.clinical.resources import issue
from medlake.errors import InvalidResource, Unprocessable


def parse_json_patch(document: Any) -> jsonpatch.JsonPatch:
    """The operations of ``document`` (the parsed request body), checked."""
    if not isinstance(document, list) or not document:
        message = "a JSON Patch document is a non-empty array of operations"
        raise InvalidResource(message, issues=[issue("structure", message)])
    try:
        return jsonpatch.JsonPatch(document)
    except (jsonpatch.InvalidJsonPatch, jsonpointer.JsonPointerException) as exc:
        raise _invalid(exc) from exc


def apply_json_patch(
    patch: jsonpatch.JsonPatch, resource: dict[str, Any], reference: str
) -> dict[str, Any]:
    """``resource`` (the current version of ``reference``) with ``patch`` applied; the
    resource itself is left unchanged."""
    try:
        patched = patch.apply(resource, in_place=False)
    except jsonpatch.InvalidJsonPatch as exc:
        raise _invalid(exc) from exc
    except (
        jsonpatch.JsonPatchConflict,
        jsonpatch.JsonPatchTestFailed,
        jsonpointer.JsonPointerException,  # a path that leads nowhere in this resource
    ) as exc:
        message = f"the patch cannot be applied to {reference}: {exc}"
        raise Unprocessable(message, issues=[issue("processing", message)]) from exc
    if not isinstance(patched, dict):
        message = f"the patch replaces {reference} with something that is no resource"
        raise Unprocessable(message, issues=[issue("processing", message)])
    return patched


def _invalid(exc: Exception) -> InvalidResource:
    message = f"not a JSON Patch document: {exc}"
    return InvalidResource(message, issues=[issue("structure", message)])


__all__ = ["apply_json_patch", "parse_json_patch"]
