"""Known DICOM Application Entities over HTTP: thin adapters around
:mod:`medlake.dimse.ae_registry` (and a C-ECHO to test one)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from medlake.api.deps import ArchiveDep, json_body
from medlake.dimse import ae_registry, scu

router = APIRouter(prefix="/application-entities")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


@router.get("")
async def list_application_entities(archive: ArchiveDep) -> Response:
    """Every registered AE, by title."""
    found = await run_in_threadpool(ae_registry.list_aes, archive)
    return _json([ae.to_json() for ae in found])


@router.post("")
async def add_application_entity(request: Request, archive: ArchiveDep) -> Response:
    """Register an AE (JSON body with aeTitle, host, port, ...): 201, or 409 if it exists."""
    ae = ae_registry.ae_from_json(await json_body(request))
    added = await run_in_threadpool(ae_registry.add_ae, archive, ae)
    return _json(added.to_json(), 201)


@router.get("/{ae_title}")
async def get_application_entity(ae_title: str, archive: ArchiveDep) -> Response:
    """One registered AE (404 if the title is not registered)."""
    found = await run_in_threadpool(ae_registry.get_ae, archive, ae_title)
    return _json(found.to_json())


@router.put("/{ae_title}")
async def put_application_entity(ae_title: str, request: Request, archive: ArchiveDep) -> Response:
    """Register or replace the AE ``ae_title``: 201 when new, 200 when replaced."""
    ae = ae_registry.ae_from_json(await json_body(request), ae_title)

    stored, existed = await run_in_threadpool(ae_registry.put_ae, archive, ae)
    return _json(stored.to_json(), 200 if existed else 201)


@router.delete("/{ae_title}", status_code=204)
async def delete_application_entity(ae_title: str, archive: ArchiveDep) -> Response:
    """Forget the AE ``ae_title`` (404 if it is not registered)."""
    await run_in_threadpool(ae_registry.remove_ae, archive, ae_title)
    return Response(status_code=204)


@router.post("/{ae_title}/echo")
async def echo_application_entity(ae_title: str, archive: ArchiveDep) -> Response:
    """C-ECHO the registered AE: 200 with its status, or 502 when it cannot be reached."""

    def ping() -> int:
        return scu.echo(archive, scu.resolve_peer(archive, ae_title))

    code = await run_in_threadpool(ping)
    return _json({"aeTitle": ae_title.strip(), "status": code, "success": code == 0})
