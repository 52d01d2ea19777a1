"""The six QIDO-RS routes (PS3.18 10.6), for any search that answers like QIDO-RS.

The identified DICOMweb service (:mod:`medlake.api.dicomweb_routes`) and the
de-identified one (:mod:`medlake.api.deid_routes`) serve the same resources with the
same media types, headers and statuses; only the search behind them differs. Each
router gets its routes from :func:`add_qido_routes` with its own search.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from medlake.api.deps import DICOM_JSON, ArchiveDep, PartitionDep
from medlake.api.media import choose, parse_accept
from medlake.dicom.attributes import Level
from medlake.dicomweb.search import SearchResult
from medlake.ingest.archive import Archive

#: ``search(request, archive, partition, level, query, study, series)``, run in a thread.
QidoSearch = Callable[
    [Request, Archive, str, Level, list[tuple[str, str]], str | None, str | None], SearchResult
]


def add_qido_routes(router: APIRouter, search: QidoSearch, what: str = "") -> None:
    """Add ``/studies``, ``/series``, ``/instances``, ``/studies/{study}/series``,
    ``/studies/{study}/instances`` and ``/studies/{study}/series/{series}/instances``,
    answered by ``search`` (``what`` qualifies the resources in the docs)."""

    async def answer(
        request: Request, archive: Archive, partition: str, level: Level,
        study: str | None = None, series: str | None = None,
    ) -> Response:  # fmt: skip
        choose(
            parse_accept(request.headers.get("accept")),
            [DICOM_JSON, "application/json"],
            "QIDO-RS results",
        )
        query = request.query_params.multi_items()
        result = await run_in_threadpool(
            search, request, archive, partition, level, query, study, series
        )
        headers = {"X-Total-Count": str(result.total)}
        if result.warning:
            headers["Warning"] = result.warning
        if not result.datasets:
            return Response(status_code=204, headers=headers)
        body = orjson.dumps(result.datasets)
        return Response(body, 200, headers=headers, media_type=DICOM_JSON)

    async def search_studies(
        request: Request, archive: ArchiveDep, partition: PartitionDep
    ) -> Response:
        return await answer(request, archive, partition, Level.STUDY)

    async def search_series(
        request: Request, archive: ArchiveDep, partition: PartitionDep
    ) -> Response:
        return await answer(request, archive, partition, Level.SERIES)

    async def search_instances(
        request: Request, archive: ArchiveDep, partition: PartitionDep
    ) -> Response:
        return await answer(request, archive, partition, Level.INSTANCE)

    async def search_study_series(
        request: Request, study: str, archive: ArchiveDep, partition: PartitionDep
    ) -> Response:
        return await answer(request, archive, partition, Level.SERIES, study)

    async def search_study_instances(
        request: Request, study: str, archive: ArchiveDep, partition: PartitionDep
    ) -> Response:
        return await answer(request, archive, partition, Level.INSTANCE, study)

    async def search_series_instances(
        request: Request, study: str, series: str, archive: ArchiveDep, partition: PartitionDep
    ) -> Response:
        return await answer(request, archive, partition, Level.INSTANCE, study, series)

    prefix = f"{what} " if what else ""
    for path, endpoint, summary in (
        ("/studies", search_studies, f"QIDO-RS: search for {prefix}studies"),
        ("/series", search_series, f"QIDO-RS: search for {prefix}series across studies"),
        ("/instances", search_instances, f"QIDO-RS: search for {prefix}instances"),
        ("/studies/{study}/series", search_study_series, f"QIDO-RS: {prefix}series of a study"),
        (
            "/studies/{study}/instances",
            search_study_instances,
            f"QIDO-RS: {prefix}instances of a study",
        ),
        (
            "/studies/{study}/series/{series}/instances",
            search_series_instances,
            f"QIDO-RS: {prefix}instances of a series",
        ),
    ):
        router.add_api_route(path, endpoint, methods=["GET"], summary=summary)


__all__ = ["QidoSearch", "add_qido_routes"]
