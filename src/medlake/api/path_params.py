"""Path parameters that routes get from the prefix they are mounted under.

The DICOMweb and FHIR bulk routers serve ``/dicomweb/…`` and, mounted again,
``/dicomweb/partitions/{partition}/…``; their handlers read ``{partition}`` from the
request's path parameters. FastAPI documents only the parameters a route or its
dependencies take, so without :data:`PARTITION_IN_PATH` the OpenAPI schema lists paths
whose ``{partition}`` is not declared (an invalid schema, which clients and tools such as
schemathesis refuse).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path


async def partition_in_path(
    partition: Annotated[
        str,
        Path(
            description="Partition: 1-64 letters, digits, '_' or '-' (`default` is the "
            "partition of the routes without this prefix)."
        ),
    ],
) -> None:
    """Declares ``{partition}`` for the schema; the routes check and use it themselves.
    (``async``: a plain function would cost every request a trip to the thread pool.)"""


#: ``dependencies=`` of a router or route whose path holds ``{partition}``.
PARTITION_IN_PATH = [Depends(partition_in_path)]

__all__ = ["PARTITION_IN_PATH", "partition_in_path"]
