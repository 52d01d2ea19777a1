"""The stored HL7 v2 messages over HTTP (every message received over MLLP, accepted or
not, as received):

    GET /hl7/messages?type=ADT^A01&status=&control_id=&since=&partition=&limit=&offset=
        newest first; X-Total-Count: matches before paging
    GET /hl7/messages/{id}        the row, the raw message and the resources made from it
    GET /hl7/messages/{id}/raw    the message itself (x-application/hl7-v2+er7)

and the senders the MLLP listener accepts (as ``medlake hl7 senders``):

    GET /hl7/senders, POST /hl7/senders (201; 409 when the name is taken)
    GET|PUT|DELETE /hl7/senders/{name} (PUT: 201 when new, 200 when replaced)
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from medlake.api.deps import ArchiveDep, json_body
from medlake.clinical.hl7 import MessageQuery, get_message, list_messages
from medlake.clinical.hl7.senders import (
    add_sender,
    get_sender,
    list_senders,
    put_sender,
    remove_sender,
    sender_from_json,
)
from medlake.errors import InvalidInput

router = APIRouter()

#: Media type of HL7 v2 messages in the ER7 (pipe and hat) encoding.
ER7_MEDIA_TYPE = "x-application/hl7-v2+er7"


def _int(request: Request, name: str, default: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= high:
        raise InvalidInput(f"{name} must be an integer from 0 to {high}, not {value!r}")
    return int(value)


def _since(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"since must be an ISO 8601 date or date-time, not {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@router.get("/hl7/messages")
async def read_messages(request: Request, archive: ArchiveDep) -> JSONResponse:
    """Stored messages matching the filters, newest first."""
    params = request.query_params
    query = MessageQuery(
        message_type=params.get("type"),
        status=params.get("status"),
        control_id=params.get("control_id"),
        since=_since(params.get("since")),
        partition=params.get("partition"),
        limit=_int(request, "limit", 100, 1000),
        offset=_int(request, "offset", 0, 10**9),
    )

    def read() -> tuple[int, list[dict[str, Any]]]:
        with archive.engine.connect() as conn:
            total, rows = list_messages(conn, query)
        return total, [row.to_json() for row in rows]

    total, body = await run_in_threadpool(read)
    return JSONResponse(body, headers={"X-Total-Count": str(total)})


def _message_id(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise InvalidInput(f"a message id is a number, not {value!r}")
    return int(value)


@router.get("/hl7/messages/{message_id}")
async def read_message(message_id: str, archive: ArchiveDep) -> dict[str, Any]:
    """One message: its row, the raw message, and the FHIR resources made from it."""
    number = _message_id(message_id)

    def read() -> dict[str, Any]:
        with archive.engine.connect() as conn:
            return get_message(conn, number).to_json(raw=True)

    return await run_in_threadpool(read)


@router.get("/hl7/messages/{message_id}/raw")
async def read_raw_message(message_id: str, archive: ArchiveDep) -> Response:
    """The message as received (as far as it was kept), segments separated by CR."""
    number = _message_id(message_id)

    def read() -> bytes:
        with archive.engine.connect() as conn:
            return get_message(conn, number).payload

    return Response(await run_in_threadpool(read), media_type=ER7_MEDIA_TYPE)


# --- senders ----------------------------------------------------------------------------


@router.get("/hl7/senders")
async def senders(archive: ArchiveDep) -> JSONResponse:
    """Every registered sender, by name."""
    found = await run_in_threadpool(list_senders, archive.engine)
    return JSONResponse([sender.to_json() for sender in found])


@router.post("/hl7/senders")
async def add_hl7_sender(request: Request, archive: ArchiveDep) -> JSONResponse:
    """Register a sender (its JSON, as listed): 201, or 409 when the name is taken."""
    sender = sender_from_json(await json_body(request))
    added = await run_in_threadpool(add_sender, archive.engine, sender)
    return JSONResponse(added.to_json(), 201)


@router.get("/hl7/senders/{name}")
async def hl7_sender(name: str, archive: ArchiveDep) -> JSONResponse:
    """One registered sender (404 when the name is not registered)."""
    found = await run_in_threadpool(get_sender, archive.engine, name)
    return JSONResponse(found.to_json())


@router.put("/hl7/senders/{name}")
async def put_hl7_sender(name: str, request: Request, archive: ArchiveDep) -> JSONResponse:
    """Register or replace the sender ``name``: 201 when new, 200 when replaced."""
    sender = sender_from_json(await json_body(request), name)

    stored, existed = await run_in_threadpool(put_sender, archive.engine, sender)
    return JSONResponse(stored.to_json(), 200 if existed else 201)


@router.delete("/hl7/senders/{name}", status_code=204)
async def delete_hl7_sender(name: str, archive: ArchiveDep) -> Response:
    """Forget the sender ``name`` (404 when it is not registered); its open connections
    are refused within seconds."""
    await run_in_threadpool(remove_sender, archive.engine, name)
    return Response(status_code=204)
