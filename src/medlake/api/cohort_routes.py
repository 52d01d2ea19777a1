"""Cohort queries over HTTP: a thin adapter over :func:`medlake.clinical.cohort.find_cohort`.

    POST /cohorts?format=json|csv|parquet&partition=     the query as the JSON body
    GET  /cohorts?q=<url-encoded query JSON>&format=&partition=

``format`` may also come from ``Accept`` (``text/csv``, ``application/vnd.apache.parquet``).
Every answer carries the cohort's counts in ``X-Total-Count`` (rows at the query's
level) and ``X-Cohort-Patients`` / ``-Studies`` / ``-Series`` / ``-Instances``. A JSON
answer without a ``limit`` in the query holds the first 1000 rows; CSV and Parquet
downloads hold every row. A bad query is 400 naming what is wrong and where.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from medlake.api.deps import ArchiveDep
from medlake.clinical.cohort import CohortResult, find_cohort
from medlake.clinical.cohort_model import InvalidCohortQuery, parse_cohort_query
from medlake.errors import InvalidInput, UnsupportedMediaType
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION, check_partition

router = APIRouter()

#: Rows of a JSON answer when the query sets no limit.
DEFAULT_JSON_ROWS = 1000
PARQUET = "application/vnd.apache.parquet"
_FORMATS = {"json": "application/json", "csv": "text/csv", "parquet": PARQUET}


def _format(request: Request) -> str:
    given = request.query_params.get("format")
    if given is not None:
        if given not in _FORMATS:
            raise InvalidInput(f"format {given!r} is not one of json, csv, parquet")
        return given
    accept = request.headers.get("accept", "")
    for name, media in _FORMATS.items():
        if media in accept:
            return name
    return "json"


def _respond(result: CohortResult, fmt: str) -> Response:
    counts = result.counts
    headers = {
        "X-Total-Count": str(result.total),
        "X-Cohort-Patients": str(counts.patients),
        "X-Cohort-Studies": str(counts.studies),
        "X-Cohort-Series": str(counts.series),
        "X-Cohort-Instances": str(counts.instances),
    }
    if fmt == "json":
        return Response(orjson.dumps(result.to_json()), 200, media_type="application/json",
                        headers=headers)  # fmt: skip
    headers["Content-Disposition"] = f'attachment; filename="cohort-{result.level}.{fmt}"'
    body = result.to_csv() if fmt == "csv" else result.to_parquet()
    media = "text/csv; charset=utf-8" if fmt == "csv" else PARQUET
    return Response(body, 200, media_type=media, headers=headers)


async def _run(request: Request, archive: Archive, document: Any) -> Response:
    fmt = _format(request)
    query = parse_cohort_query(document)
    if fmt == "json" and query.limit is None:
        query = replace(query, limit=DEFAULT_JSON_ROWS)
    # Access is granted per partition from the URL: the query may not name another one.
    partition = check_partition(request.query_params.get("partition") or DEFAULT_PARTITION)
    if query.partition is not None and query.partition != partition:
        raise InvalidCohortQuery(
            f"partition: the query names {query.partition!r} but the request is for "
            f"{partition!r}; give the partition as the partition parameter"
        )
    base_url = archive.settings.public_base_url or str(request.base_url)
    result = await run_in_threadpool(
        find_cohort, archive, query, partition=partition, base_url=base_url
    )
    return await run_in_threadpool(_respond, result, fmt)


@router.post("/cohorts")
async def post_cohort(request: Request, archive: ArchiveDep) -> Response:
    """Run the cohort query of the JSON body."""
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type:
        raise UnsupportedMediaType(f"send the cohort query as application/json, not {content_type}")
    return await _run(request, archive, await request.body())


@router.get("/cohorts")
async def get_cohort(request: Request, archive: ArchiveDep) -> Response:
    """Run the cohort query of the ``q`` parameter (URL-encoded JSON)."""
    text = request.query_params.get("q")
    if not text:
        raise InvalidCohortQuery("give the cohort query as the q parameter (URL-encoded JSON)")
    return await _run(request, archive, text)


__all__ = ["DEFAULT_JSON_ROWS", "router"]
