"""DICOMweb routes (PS3.18): thin adapters from HTTP to the dicomweb services.

Mounted twice: at ``/dicomweb`` (partition ``default``) and at
``/dicomweb/partitions/{partition}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from medlake.api.deps import DICOM_JSON, ArchiveDep, PartitionDep, archive_of, partition_of
from medlake.api.media import choose, parse_accept, parse_media_type
from medlake.api.multipart import MultipartReceiver, StagedPart, aiter_parts, new_boundary
from medlake.api.qido_routes import add_qido_routes
from medlake.api.stow_response import stow_response
from medlake.dicom.attributes import Level
from medlake.dicom.render import RenderOptions, parse_viewport, parse_window
from medlake.dicomweb import metadata as metadata_service
from medlake.dicomweb import retrieve as retrieve_service
from medlake.dicomweb.delete import delete as delete_service
from medlake.dicomweb.locate import StoredInstance
from medlake.dicomweb.search import SearchResult, run_search
from medlake.errors import InvalidInput, NotAcceptable, PayloadTooLarge, UnsupportedMediaType
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.ingest.batches import BatchKind, request_ledger
from medlake.ingest.inspect import Inspection
from medlake.ingest.store import ReceivedFile, inspect, store_instances
from medlake.types import check_uid

#: The media type of a compressed frame of each transfer syntax (PS3.18 Table 8.7.3-5).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def base_url(request: Request, partition: str) -> str:
    """The DICOMweb root this request came through (for RetrieveURL / BulkDataURI)."""
    root = str(request.base_url).rstrip("/") + "/dicomweb"
    if "partition" in request.path_params:
        root += f"/partitions/{partition}"
    return root


router = APIRouter()


# --- STOW-RS -----------------------------------------------------------------------------


Received = list[tuple[ReceivedFile, Future[Inspection]]]


async def _receive(request: Request, archive: Archive) -> Received:
    """Stream the body to staging; each part's inspection starts as soon as it is complete
    (in a worker process), overlapping with the receipt of the next part."""
    content_type = request.headers.get("content-type", "")
    media = parse_media_type(content_type)
    folder = archive.staging_dir
    limit = archive.settings.max_upload_bytes
    if media.name == "application/dicom":
        part = StagedPart(folder)
        try:
            async for chunk in request.stream():
                part.write(chunk)
                if limit and part.size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        except BaseException:
            part.discard()
            raise
        single = part.close()
        return [(single, inspect(archive, single))]
    if media.name != "multipart/related":
        raise UnsupportedMediaType(
            'STOW-RS needs Content-Type multipart/related; type="application/dicom", '
            f"not {content_type!r}"
        )
    part_type = media.params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaType(
            f'only type="application/dicom" parts are accepted, not {part_type!r} '
            "(metadata + bulk data STOW is not supported)"
        )
    boundary = media.params.get("boundary")
    if not boundary:
        raise InvalidInput("multipart/related Content-Type has no boundary parameter")
    started: dict[Path, Future[Inspection]] = {}

    def start_inspection(received: ReceivedFile, headers: dict[str, str]) -> None:
        if parse_media_type(headers.get("content-type", "application/dicom")).name == (
            "application/dicom"
        ):
            started[received.path] = inspect(archive, received)

    receiver = MultipartReceiver(boundary, folder, limit, on_part=start_inspection)
    try:
        async for chunk in request.stream():
            receiver.feed(chunk)
        parts = receiver.finish()
    except (Exception, ClientDisconnect):
        receiver.discard()
        raise
    if not parts:
        raise InvalidInput("the multipart body contains no parts")
    for _file, headers in parts:
        part_media = parse_media_type(headers.get("content-type", "application/dicom"))
        if part_media.name != "application/dicom":
            receiver.discard()
            raise UnsupportedMediaType(
                f"a part has Content-Type {part_media.name!r}; every part must be application/dicom"
            )
    return [(file, started[file.path]) for file, _headers in parts]


async def _stow(
    request: Request, archive: Archive, partition: str, study: str | None, replace: bool
) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    choose(accept, [DICOM_JSON, "application/json"], "the STOW-RS response")
    if study is not None:
        check_uid(study, "StudyInstanceUID")
    started = utcnow()
    received = await _receive(request, archive)
    # One batch per request: its counts and error rows commit with its instances.
    client = request.client.host if request.client else "unknown client"
    ledger = request_ledger(
        BatchKind.STOW, partition, f"STOW-RS {request.method} {request.url.path} from {client}",
        len(received), started,
    )  # fmt: skip
    results = await run_in_threadpool(
        store_instances,
        archive,
        [file for file, _ in received],
        partition,
        expected_study=study,
        replace=replace,
        inspections=[future for _, future in received],
        ledger=ledger,
    )
    status, body, warning = stow_response(results, base_url(request, partition))
    headers = {"X-Medlake-Batch": ledger.batch_id}
    if warning:
        headers["Warning"] = warning
    return Response(orjson.dumps(body), status, headers=headers, media_type=DICOM_JSON)


@router.post("/studies")
async def stow_studies(request: Request, archive: ArchiveDep, partition: PartitionDep) -> Response:
    """STOW-RS: store instances of any studies."""
    return await _stow(request, archive, partition, None, replace=False)


@router.post("/studies/{study}")
async def stow_study(
    request: Request, study: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """STOW-RS: store instances that must belong to ``study``."""
    return await _stow(request, archive, partition, study, replace=False)


@router.put("/studies")
async def upsert_studies(
    request: Request, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """Store, replacing instances already stored with different content (upsert)."""
    return await _stow(request, archive, partition, None, replace=True)


@router.put("/studies/{study}")
async def upsert_study(
    request: Request, study: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """Upsert instances that must belong to ``study``."""
    return await _stow(request, archive, partition, study, replace=True)


# --- QIDO-RS -----------------------------------------------------------------------------


def _qido(
    request: Request, archive: Archive, partition: str, level: Level,
    query: list[tuple[str, str]], study: str | None, series: str | None,
) -> SearchResult:  # fmt: skip
    return run_search(
        archive, level, partition, query, study_uid=study, series_uid=series,
        base_url=base_url(request, partition),
    )  # fmt: skip


add_qido_routes(router, _qido)


# --- WADO-RS -----------------------------------------------------------------------------


def _instances_response(request: Request, found: list[StoredInstance]) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    chosen = choose(accept, ["multipart/related", "application/dicom"], "instances")
    wanted_type = chosen.params.get("type", "application/dicom").lower()
    if chosen.name == "multipart/related" and wanted_type not in ("application/dicom", "*/*"):
        raise NotAcceptable(
            f"instances are returned as application/dicom parts, not {wanted_type!r}"
        )
    wanted_ts = chosen.params.get("transfer-syntax", "*")
    if wanted_ts != "*":
        for item in found:
            if item.transfer_syntax_uid != wanted_ts:
                raise NotAcceptable(
                    f"instance {item.sop_uid} is stored as {item.transfer_syntax_uid} and "
                    f"transcoding to {wanted_ts} is not supported; ask for transfer-syntax=*"
                )
    archive = archive_of(request)
    if chosen.name == "application/dicom":
        if len(found) != 1:
            raise NotAcceptable(
                "application/dicom (single part) is only available for one instance"
            )
        return _single_blob(archive, found[0], "application/dicom")
    boundary = new_boundary()
    parts: list[tuple[str, Any]] = [
        (f"application/dicom; transfer-syntax={item.transfer_syntax_uid}", _opener(archive, item))
        for item in found
    ]
    length = sum(
        len(f"--{boundary}\r\nContent-Type: {ct}\r\n\r\n") + item.size + 2
        for (ct, _), item in zip(parts, found, strict=True)
    ) + len(f"--{boundary}--\r\n")
    return StreamingResponse(
        aiter_parts(parts, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        headers={"Content-Length": str(length)},
    )


def _opener(archive: Archive, item: StoredInstance) -> Any:
    path = archive.blobs.local_path(item.blob_key)
    if path is not None:
        return path
    return lambda: archive.blobs.open(item.blob_key)


def _single_blob(archive: Archive, item: StoredInstance, media_type: str) -> Response:
    """One stored file as the whole body, streamed (never read into memory at once)."""
    path = archive.blobs.local_path(item.blob_key)
    if path is not None:
        return FileResponse(path, media_type=media_type)
    # No plaintext file to send with sendfile (object storage, or an encrypted lake whose
    # files are ciphertext): stream what the store's reader returns (it decrypts), with
    # the plaintext size the index recorded.

    def chunks() -> Iterator[bytes]:
        with archive.blobs.open(item.blob_key) as fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(), media_type=media_type, headers={"Content-Length": str(item.size)}
    )


@router.get("/studies/{study}")
async def retrieve_study(
    request: Request, study: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """WADO-RS: every instance of a study."""
    found = await run_in_threadpool(retrieve_service.retrieve, archive, partition, study)
    return _instances_response(request, found)


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(
    request: Request, study: str, series: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """WADO-RS: every instance of a series."""
    found = await run_in_threadpool(retrieve_service.retrieve, archive, partition, study, series)
    return _instances_response(request, found)


@router.get("/studies/{study}/series/{series}/instances/{instance}")
async def retrieve_instance(
    request: Request,
    study: str,
    series: str,
    instance: str,
    archive: ArchiveDep,
    partition: PartitionDep,
) -> Response:
    """WADO-RS: one instance."""
    found = await run_in_threadpool(
        retrieve_service.retrieve, archive, partition, study, series, instance
    )
    return _instances_response(request, found)


def _metadata_response(request: Request, body: bytes, study: str, partition: str) -> Response:
    choose(
        parse_accept(request.headers.get("accept")), [DICOM_JSON, "application/json"], "metadata"
    )
    absolute = f"{base_url(request, partition)}/studies/{study}/".encode()
    body = body.replace(b'"BulkDataURI":"series/', b'"BulkDataURI":"' + absolute + b"series/")
    return Response(body, media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata")
async def study_metadata(
    request: Request, study: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """WADO-RS: DICOM JSON of every instance of a study (precomputed per series)."""
    body = await run_in_threadpool(metadata_service.study_metadata, archive, partition, study)
    return _metadata_response(request, body, study, partition)


@router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(
    request: Request, study: str, series: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """WADO-RS: DICOM JSON of every instance of a series."""
    body = await run_in_threadpool(
        metadata_service.series_metadata, archive, partition, study, series
    )
    return _metadata_response(request, body, study, partition)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
async def instance_metadata(
    request: Request,
    study: str,
    series: str,
    instance: str,
    archive: ArchiveDep,
    partition: PartitionDep,
) -> Response:
    """WADO-RS: DICOM JSON of one instance."""
    body = await run_in_threadpool(
        metadata_service.series_metadata, archive, partition, study, series
    )
    items = [i for i in orjson.loads(body) if i.get("00080018", {}).get("Value") == [instance]]
    if not items:
        found = await run_in_threadpool(
            retrieve_service.retrieve, archive, partition, study, series, instance
        )
        del found
    return _metadata_response(request, orjson.dumps(items), study, partition)


def _octet_parts(request: Request, item: StoredInstance, chunks: list[bytes]) -> Response:
    accept = parse_accept(request.headers.get("accept"))
    chosen = choose(accept, ["multipart/related", "application/octet-stream"], "frames")
    if chosen.name == "application/octet-stream":
        if len(chunks) != 1:
            raise NotAcceptable("application/octet-stream (single part) needs exactly one frame")
        return Response(chunks[0], media_type="application/octet-stream")
    wanted_ts = chosen.params.get("transfer-syntax", "*")
    if wanted_ts not in ("*", item.transfer_syntax_uid):
        raise NotAcceptable(
            f"frames are stored as {item.transfer_syntax_uid}; transcoding to {wanted_ts} is "
            "not supported (ask for transfer-syntax=*)"
        )
    wanted_type = chosen.params.get("type", "application/octet-stream").lower()
    natural = FRAME_MEDIA_TYPES.get(item.transfer_syntax_uid, "application/octet-stream")
    if wanted_type not in ("application/octet-stream", "*/*", natural):
        raise NotAcceptable(
            f"frames are stored as {item.transfer_syntax_uid} ({natural}); cannot return them "
            f"as {wanted_type} without transcoding, which is not supported"
        )
    part_media = natural if wanted_type == natural else "application/octet-stream"
    boundary = new_boundary()
    part_type = f"{part_media}; transfer-syntax={item.transfer_syntax_uid}"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + chunk + b"\r\n"
            for chunk in chunks
        )
        + f"--{boundary}--\r\n".encode()
    )
    return Response(body, media_type=f'multipart/related; type="{part_media}"; boundary={boundary}')


async def _one(
    archive: Archive, partition: str, study: str, series: str, instance: str
) -> StoredInstance:
    found = await run_in_threadpool(
        retrieve_service.retrieve, archive, partition, study, series, instance
    )
    return found[0]


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}")
async def retrieve_frames(
    request: Request, study: str, series: str, instance: str, frame_list: str,
    archive: ArchiveDep, partition: PartitionDep,
) -> Response:  # fmt: skip
    """WADO-RS: frames of an instance, each one range read of the stored file."""
    numbers = retrieve_service.parse_frame_list(frame_list)
    item = await _one(archive, partition, study, series, instance)
    chunks = await run_in_threadpool(retrieve_service.frames, archive, item, numbers)
    return _octet_parts(request, item, chunks)


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag:path}")
async def retrieve_bulkdata(
    request: Request, study: str, series: str, instance: str, tag: str,
    archive: ArchiveDep, partition: PartitionDep,
) -> Response:  # fmt: skip
    """WADO-RS: one bulk-data element (the BulkDataURI targets of the metadata)."""
    path = retrieve_service.parse_bulkdata_path(tag)
    item = await _one(archive, partition, study, series, instance)
    data = await run_in_threadpool(retrieve_service.bulkdata, archive, item, path)
    return _octet_parts(request, item, [data])


def render_options(request: Request, thumbnail: bool = False) -> RenderOptions:
    """Rendering parameters from the Accept header and query (PS3.18 8.3.5.1)."""
    accept = parse_accept(request.headers.get("accept"))
    media = choose(accept, ["image/jpeg", "image/png"], "a rendered image")
    center, width = parse_window(request.query_params.get("window"))
    viewport = parse_viewport(request.query_params.get("viewport"))
    if thumbnail and viewport is None:
        viewport = (128, 128)
    quality = request.query_params.get("quality", "90")
    if not (quality.isascii() and quality.isdigit()) or not 1 <= int(quality) <= 100:
        raise InvalidInput(f"quality must be 1..100, not {quality!r}")
    return RenderOptions(media.name, center, width, viewport, int(quality))


async def _render(
    request: Request, study: str, series: str, instance: str, frame: int, thumbnail: bool
) -> Response:
    options = render_options(request, thumbnail)
    archive, partition = archive_of(request), partition_of(request)
    item = await _one(archive, partition, study, series, instance)
    data = await run_in_threadpool(retrieve_service.rendered, archive, item, frame, options)
    return Response(data, media_type=options.media_type)


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
async def rendered_instance(request: Request, study: str, series: str, instance: str) -> Response:
    """WADO-RS: the (first frame of the) instance rendered to JPEG/PNG."""
    return await _render(request, study, series, instance, 1, False)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered")
async def rendered_frame(
    request: Request, study: str, series: str, instance: str, frame: int
) -> Response:
    """WADO-RS: one frame rendered to JPEG/PNG."""
    return await _render(request, study, series, instance, frame, False)


@router.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail")
async def thumbnail_instance(request: Request, study: str, series: str, instance: str) -> Response:
    """WADO-RS: a small rendering of the instance."""
    return await _render(request, study, series, instance, 1, True)


@router.get("/studies/{study}/series/{series}/thumbnail")
async def thumbnail_series(
    request: Request, study: str, series: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """WADO-RS: a small rendering of the series' middle instance."""
    found = await run_in_threadpool(retrieve_service.retrieve, archive, partition, study, series)
    middle = found[len(found) // 2]
    return await _render(request, study, series, middle.sop_uid, 1, True)


@router.get("/studies/{study}/thumbnail")
async def thumbnail_study(
    request: Request, study: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """WADO-RS: a small rendering of the study's first series."""
    found = await run_in_threadpool(retrieve_service.retrieve, archive, partition, study)
    first_series = found[0].series_uid
    in_series = [f for f in found if f.series_uid == first_series]
    middle = in_series[len(in_series) // 2]
    return await _render(request, study, middle.series_uid, middle.sop_uid, 1, True)


# --- DELETE ------------------------------------------------------------------------------


@router.delete("/studies/{study}")
async def delete_study(study: str, archive: ArchiveDep, partition: PartitionDep) -> Response:
    """Delete a study: files, index rows; change-feed entries are added."""
    await run_in_threadpool(delete_service, archive, partition, study)
    return Response(status_code=204)


@router.delete("/studies/{study}/series/{series}")
async def delete_series(
    study: str, series: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """Delete a series."""
    await run_in_threadpool(delete_service, archive, partition, study, series)
    return Response(status_code=204)


@router.delete("/studies/{study}/series/{series}/instances/{instance}")
async def delete_instance(
    study: str, series: str, instance: str, archive: ArchiveDep, partition: PartitionDep
) -> Response:
    """Delete one instance."""
    await run_in_threadpool(delete_service, archive, partition, study, series, instance)
    return Response(status_code=204)


# --- WADO-URI (PS3.18 chapter 9) ------------------------------------------------------------


@router.get("/wado")
async def wado_uri(request: Request, archive: ArchiveDep, partition: PartitionDep) -> Response:
    """WADO-URI: ``?requestType=WADO&studyUID=&seriesUID=&objectUID=[&contentType=]``.

    ``application/dicom`` returns the stored file; ``image/jpeg`` (the default, as
    the standard says for single-frame images) and ``image/png`` render a frame with
    ``windowCenter``/``windowWidth``, ``rows``/``columns`` and ``frameNumber``.
    """
    params = request.query_params
    if params.get("requestType") != "WADO":
        raise InvalidInput("WADO-URI needs requestType=WADO")
    missing = [k for k in ("studyUID", "seriesUID", "objectUID") if not params.get(k)]
    if missing:
        raise InvalidInput(f"WADO-URI is missing {', '.join(missing)}")
    content_type = params.get("contentType", "image/jpeg").split(",")[0].strip()
    found = await run_in_threadpool(
        retrieve_service.retrieve, archive, partition,
        params["studyUID"], params["seriesUID"], params["objectUID"],
    )  # fmt: skip
    item = found[0]
    if content_type in ("application/dicom", "*/*"):
        ts = params.get("transferSyntax")
        if ts and ts != item.transfer_syntax_uid:
            raise NotAcceptable(
                f"instance is stored as {item.transfer_syntax_uid}; "
                f"transcoding to {ts} is not supported"
            )
        return _single_blob(archive, item, "application/dicom")
    if content_type not in ("image/jpeg", "image/png"):
        raise NotAcceptable(f"WADO-URI contentType {content_type!r} is not supported")
    center = params.get("windowCenter")
    width = params.get("windowWidth")
    window = parse_window(f"{center},{width}") if center and width else (None, None)
    rows, columns = params.get("rows"), params.get("columns")
    viewport = parse_viewport(f"{columns or rows},{rows or columns}") if rows or columns else None
    frame = params.get("frameNumber", "1")
    if not (frame.isascii() and frame.isdigit()):
        raise InvalidInput(f"frameNumber must be a positive integer, not {frame!r}")
    quality = params.get("imageQuality", "90")
    if not (quality.isascii() and quality.isdigit()) or not 1 <= int(quality) <= 100:
        raise InvalidInput(f"imageQuality must be 1..100, not {quality!r}")
    options = RenderOptions(content_type, window[0], window[1], viewport, int(quality))
    data = await run_in_threadpool(retrieve_service.rendered, archive, item, int(frame), options)
    return Response(data, media_type=content_type)
