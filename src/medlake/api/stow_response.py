"""The STOW-RS response dataset (PS3.18 10.5.3, Table 10.5.3-1 statuses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medlake.api.errors import warning_header
from medlake.errors import Conflict, StudyMismatch
from medlake.ingest.store import StoreResult


def _ui(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def stow_response(
    results: Sequence[StoreResult], base_url: str
) -> tuple[int, dict[str, Any], str | None]:
    """(HTTP status, DICOM JSON body, Warning header) for the results of one request.

    200: every instance stored. 202: some failed (FailedSOPSequence says which and why).
    409: none stored because of conflicts (same UID with other bytes, study mismatch).
    503: none stored because the lake or the index failed (the data may be fine).
    400: none stored because the data was unusable.
    """
    referenced = []
    failed = []
    study_urls = set()
    for result in results:
        if result.ok:
            url = (
                f"{base_url}/studies/{result.study_uid}/series/{result.series_uid}"
                f"/instances/{result.sop_uid}"
            )
            referenced.append(
                {
                    "00081150": _ui(result.sop_class_uid),
                    "00081155": _ui(result.sop_uid),
                    "00081190": {"vr": "UR", "Value": [url]},
                }
            )
            study_urls.add(f"{base_url}/studies/{result.study_uid}")
        else:
            error = result.error
            item = {
                "00081150": _ui(result.sop_class_uid),
                "00081155": _ui(result.sop_uid),
                "00081197": {"vr": "US", "Value": [error.dicom_reason if error else 0x0110]},
            }
            if error is not None:
                item["00000902"] = {"vr": "LO", "Value": [error.message[:64]]}
            failed.append(item)
    body: dict[str, Any] = {}
    if len(study_urls) == 1:
        body["00081190"] = {"vr": "UR", "Value": [study_urls.pop()]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    first_error = next((r.error for r in results if r.error is not None), None)
    warning = None
    if first_error is not None:
        more = f" (and {len(failed) - 1} more failures)" if len(failed) > 1 else ""
        warning = warning_header(first_error.message + more)
    if not failed:
        return 200, body, None
    if referenced:
        return 202, body, warning
    if any(isinstance(r.error, Conflict | StudyMismatch) for r in results):
        return 409, body, warning
    if all(r.error is not None and r.error.http_status >= 500 for r in results):
        # Nothing was wrong with the data: the lake or the index failed. Retry later.
        return 503, body, warning
    return 400, body, warning
