"""De-identified views (researcher role): thin adapters to the de-identified services.

- DICOMweb at ``/deid/dicomweb`` and ``/deid/dicomweb/partitions/{partition}``: QIDO-RS
  (studies, series, instances), WADO-RS metadata (study, series, instance) and the
  retrieve of one instance (:mod:`medlake.dicomweb.deidentified`).
- FHIR at ``/deid/fhir`` and ``/deid/fhir/partitions/{partition}``: read and search
  (:mod:`medlake.clinical.deidentified`); errors are OperationOutcomes.

Every route needs ``deid.read`` (:mod:`medlake.api.auth`), so each call is audited as a
de-identified read. UIDs and ids in these URLs are the pseudonyms the views hand out.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from medlake.api.deps import DICOM_JSON, ArchiveDep, PartitionDep
from medlake.api.fhir_routes import FhirRoute
from medlake.api.media import choose, parse_accept
from medlake.api.multipart import new_boundary
from medlake.api.qido_routes import add_qido_routes
from medlake.clinical.deidentified import deidentified_read, deidentified_search
from medlake.clinical.resources import FHIR_JSON, RESOURCE_TYPES, dump_resource
from medlake.dicom.attributes import Level
from medlake.dicomweb import deidentified as dicom_deid
from medlake.dicomweb.search import SearchResult
from medlake.errors import InvalidInput, NotAcceptable, NotFound
from medlake.ingest.archive import Archive

#: Where the two views are mounted (``/partitions/{partition}`` may follow each).
DICOMWEB_PREFIX = "/deid/dicomweb"
FHIR_PREFIX = "/deid/fhir"

dicomweb_router = APIRouter()
fhir_router = APIRouter(route_class=FhirRoute)


def _root(request: Request, prefix: str, partition: str) -> str:
    root = str(request.base_url).rstrip("/") + prefix
    if "partition" in request.path_params:
        root += f"/partitions/{partition}"
    return root


# --- DICOMweb ------------------------------------------------------------------------------


def _qido(
    request: Request, archive: Archive, partition: str, level: Level,
    query: list[tuple[str, str]], study: str | None, series: str | None,
) -> SearchResult:  # fmt: skip
    return dicom_deid.deidentified_search(
        archive, level, partition, query, study_uid=study, series_uid=series,
        base_url=_root(request, DICOMWEB_PREFIX, partition),
    )  # fmt: skip


add_qido_routes(dicomweb_router, _qido, "de-identified")


async def _metadata(
    request: Request, archive: ArchiveDep, partition: str, study: str,
    series: str | None = None, instance: str | None = None,
) -> Response:  # fmt: skip
    choose(
        parse_accept(request.headers.get("accept")), [DICOM_JSON, "application/json"], "metadata"
    )
    body = await run_in_threadpool(
        dicom_deid.deidentified_metadata, archive, partition, study, series, instance
    )
    return Response(body, media_type=DICOM_JSON)


@dicomweb_router.get("/studies/{study}/metadata")
async def study_metadata(
    request: Request, study: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """WADO-RS: de-identified DICOM JSON of every instance of a study."""
    return await _metadata(request, archive, partition, study)


@dicomweb_router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(
    request: Request, study: str, series: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """WADO-RS: de-identified DICOM JSON of every instance of a series."""
    return await _metadata(request, archive, partition, study, series)


@dicomweb_router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
async def instance_metadata(
    request: Request, study: str, series: str, instance: str,
    archive: ArchiveDep, partition: PartitionDep,
) -> Response:  # fmt: skip
    """WADO-RS: de-identified DICOM JSON of one instance."""
    return await _metadata(request, archive, partition, study, series, instance)


@dicomweb_router.get("/studies/{study}/series/{series}/instances/{instance}")
async def retrieve_instance(
    request: Request, study: str, series: str, instance: str,
    archive: ArchiveDep, partition: PartitionDep,
) -> Response:  # fmt: skip
    """WADO-RS: one instance with a de-identified header (application/dicom, or one part
    of multipart/related); pixel data as stored."""
    chosen = choose(
        parse_accept(request.headers.get("accept")),
        ["multipart/related", "application/dicom"],
        "an instance",
    )
    wanted_type = chosen.params.get("type", "application/dicom").lower()
    if chosen.name == "multipart/related" and wanted_type not in ("application/dicom", "*/*"):
        raise NotAcceptable(f"instances are returned as application/dicom, not {wanted_type!r}")
    if chosen.params.get("transfer-syntax", "*") != "*":
        raise NotAcceptable("transcoding is not supported; ask for transfer-syntax=*")
    data = await run_in_threadpool(
        dicom_deid.deidentified_instance, archive, partition, study, series, instance
    )
    if chosen.name == "application/dicom":
        return Response(data, media_type="application/dicom")
    boundary = new_boundary()
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return Response(
        body, media_type=f'multipart/related; type="application/dicom"; boundary={boundary}'
    )


# --- FHIR ----------------------------------------------------------------------------------


def _resource_type(name: str) -> str:
    if name not in RESOURCE_TYPES:
        raise NotFound(f"{name!r} is not a FHIR R4 resource type medlake supports")
    return name


def _fhir_response(request: Request, body: object) -> Response:
    wanted = request.query_params.get("_format")
    if wanted is not None and wanted.split(";")[0].strip().lower() not in (
        "json", "application/json", FHIR_JSON,
    ):  # fmt: skip
        raise NotAcceptable(f"_format {wanted!r} is not supported; use json")
    media = choose(
        parse_accept(request.headers.get("accept")),
        [FHIR_JSON, "application/json"],
        "a FHIR resource",
    )
    return Response(dump_resource(body), 200, media_type=media.name)


@fhir_router.get("/{resource_type}")
async def fhir_search(request: Request, resource_type: str, partition: PartitionDep) -> Response:
    """Search, answered with de-identified resources."""
    resource_type = _resource_type(resource_type)
    query = [
        (k, v) for k, v in request.query_params.multi_items() if k not in ("_format", "_pretty")
    ]
    strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower()
    bundle = await run_in_threadpool(
        deidentified_search, request.app.state.archive, partition, resource_type, query,
        base_url=_root(request, FHIR_PREFIX, partition), strict=strict,
    )  # fmt: skip
    return _fhir_response(request, bundle)


@fhir_router.get("/{resource_type}/{logical_id}")
async def fhir_read(
    request: Request, resource_type: str, logical_id: str, partition: PartitionDep
) -> Response:
    """Read one resource by its pseudonymous id, de-identified."""
    resource_type = _resource_type(resource_type)
    if not logical_id or len(logical_id) > 64:
        raise InvalidInput(f"{logical_id!r} is not a FHIR logical id")
    resource = await run_in_threadpool(
        deidentified_read, request.app.state.archive, partition, resource_type, logical_id,
        base_url=_root(request, FHIR_PREFIX, partition),
    )  # fmt: skip
    return _fhir_response(request, resource)


__all__ = ["DICOMWEB_PREFIX", "FHIR_PREFIX", "dicomweb_router", "fhir_router"]
