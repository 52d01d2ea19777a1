"""De-identification of FHIR resources: the direct identifiers removed, ids pseudonymous.

The FHIR analogue of the DICOM Basic Profile used by the de-identified views
(:mod:`medlake.dicom.deidentify`), pure (no index, no HTTP):

- removed wherever they occur as elements of a resource (contained ones too): ``name``,
  ``identifier``, ``telecom``, ``address``, ``photo``, ``contact``, the narrative
  ``text``, ``note`` (free text, often with names) and ``meta.source``;
- ``birthDate`` and ``deceasedDateTime`` reduced to the year;
- the logical ``id`` and every ``Type/id`` reference replaced by the same keyed
  pseudonym (:meth:`Pseudonyms.resource_id`), so references still resolve within the
  view; a reference's ``display`` and ``identifier`` are removed; references to other
  servers are removed;
- DICOM UIDs of ImagingStudy (series and instance ``uid``, the study UID identifier)
  replaced by the pseudonyms the de-identified DICOMweb view uses, so the two views link.

Other dates, codes and values are kept: this removes direct identifiers, it does not
make a resource anonymous.
"""

from __future__ import annotations

import re
from typing import Any

from medlake.dicom.deidentify import Pseudonyms

__all__ = ["REMOVED_ELEMENTS", "deidentify_resource", "pseudonymous_reference"]

#: Elements removed wherever they occur in a resource.
REMOVED_ELEMENTS = frozenset(
    {"name", "identifier", "telecom", "address", "photo", "contact", "text", "note"}
)
_TO_YEAR = frozenset({"birthDate", "deceasedDateTime"})
_DICOM_UID_SYSTEM = "urn:dicom:uid"
_REFERENCE = re.compile(
    r"^(?:(?P<base>.*)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})$"
)


def pseudonymous_reference(reference: str, pseudonyms: Pseudonyms, base_url: str) -> str | None:
    """``Type/pseudonym`` of a relative (or this server's absolute) ``Type/id`` reference;
    a ``#contained`` reference as it is; ``None`` for anything else (other servers,
    ``urn:`` references), which the caller drops."""
    if reference.startswith("#"):
        return reference
    found = _REFERENCE.match(reference)
    if found is None:
        return None
    base = found.group("base")
    if base is not None and base.rstrip("/") != base_url.rstrip("/"):
        return None
    kind = found.group("type")
    return f"{kind}/{pseudonyms.resource_id(kind, found.group('id'))}"


def deidentify_resource(
    resource: dict[str, Any], pseudonyms: Pseudonyms, base_url: str = ""
) -> dict[str, Any]:
    """A de-identified copy of ``resource`` (``base_url``: this server's FHIR base, whose
    absolute references are pseudonymised like relative ones)."""
    resource_type = str(resource.get("resourceType", ""))
    out = _walk_object(resource, pseudonyms, base_url)
    if "id" in resource:
        out["id"] = pseudonyms.resource_id(resource_type, str(resource["id"]))
    meta = out.get("meta")
    if isinstance(meta, dict):
        meta.pop("source", None)
    if resource_type == "ImagingStudy":
        _imaging_study_uids(resource, out, pseudonyms)
    return out


def _walk(value: Any, pseudonyms: Pseudonyms, base_url: str) -> Any:
    if isinstance(value, list):
        return [_walk(v, pseudonyms, base_url) for v in value]
    if not isinstance(value, dict):
        return value
    if "resourceType" in value:  # a contained resource
        return deidentify_resource(value, pseudonyms, base_url)
    return _walk_object(value, pseudonyms, base_url)


def _walk_object(value: dict[str, Any], pseudonyms: Pseudonyms, base_url: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in REMOVED_ELEMENTS:
            continue
        if key in _TO_YEAR and isinstance(item, str):
            out[key] = item[:4]
        elif key == "reference" and isinstance(item, str):
            mapped = pseudonymous_reference(item, pseudonyms, base_url)
            if mapped is not None:
                out[key] = mapped
        elif key == "display" and "reference" in value:
            continue  # a reference's display is often the person's name
        else:
            out[key] = _walk(item, pseudonyms, base_url)
    return out


def _imaging_study_uids(
    original: dict[str, Any], out: dict[str, Any], pseudonyms: Pseudonyms
) -> None:
    """The study UID identifier back (pseudonymous), series and instance UIDs replaced."""
    for identifier in original.get("identifier") or []:
        value = str(identifier.get("value", ""))
        if identifier.get("system") == _DICOM_UID_SYSTEM and value.startswith("urn:oid:"):
            uid = pseudonyms.uid(value.removeprefix("urn:oid:"))
            out["identifier"] = [{"system": _DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}]
    for series in out.get("series") or []:
        if isinstance(series, dict) and "uid" in series:
            series["uid"] = pseudonyms.uid(str(series["uid"]))
        instances = series.get("instance") if isinstance(series, dict) else None
        for instance in instances or []:
            if isinstance(instance, dict) and "uid" in instance:
                instance["uid"] = pseudonyms.uid(str(instance["uid"]))
