"""Dependencies every router shares: the archive the app serves, the partition of the path."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from medlake.errors import InvalidInput
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION, check_partition

#: The media type of DICOM JSON (PS3.18 F.2).
DICOM_JSON = "application/dicom+json"


def archive_of(request: Request) -> Archive:
    """The archive the app was created with."""
    archive: Archive = request.app.state.archive
    return archive


def partition_of(request: Request) -> str:
    """The partition named in the path, or ``default``."""
    return check_partition(request.path_params.get("partition", DEFAULT_PARTITION))


async def json_body(request: Request) -> Any:
    """The request body as JSON; InvalidInput (400) when it is not valid JSON."""
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from exc


ArchiveDep = Annotated[Archive, Depends(archive_of)]
PartitionDep = Annotated[str, Depends(partition_of)]

__all__ = ["DICOM_JSON", "ArchiveDep", "PartitionDep", "archive_of", "json_body", "partition_of"]
