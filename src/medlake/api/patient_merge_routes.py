"""``POST /fhir/Patient/$merge`` (and per partition): a thin adapter over
:func:`medlake.clinical.patient_merge_operation.merge_operation`. Include this router
before the FHIR REST router, whose ``/fhir/{type}/{id}`` route would take the path."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from medlake.api.fhir_routes import FhirRoute, _body, _json, _partition
from medlake.api.path_params import PARTITION_IN_PATH
from medlake.clinical.patient_merge_operation import merge_operation
from medlake.ingest.archive import Archive

router = APIRouter(route_class=FhirRoute)


@router.post("/fhir/Patient/$merge")
@router.post("/fhir/partitions/{partition}/Patient/$merge", dependencies=PARTITION_IN_PATH)
async def patient_merge(request: Request) -> Response:
    """Merge the source Patient into the target (R5 ``Patient/$merge``)."""
    archive: Archive = request.app.state.archive
    body = await _body(request)
    result = await run_in_threadpool(merge_operation, archive, body, partition=_partition(request))
    return _json(result, 200, request)


__all__ = ["router"]
