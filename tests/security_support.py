"""Fixtures of the security tests: the archive and app with authentication on, and
tokens for each role."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from medlake.api import create_app
from medlake.config import Settings
from medlake.ingest.archive import Archive
from medlake.security import Grant, create_token

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of a bearer token."""
    return {"Authorization": f"Bearer {token}"}


def issue(archive: Archive, subject: str, *grants: str, scopes: list[str] | None = None) -> str:
    """A new API token of ``subject`` with ``grants`` (``reader@default``, ...)."""
    created = create_token(
        archive.engine, subject, grants=[Grant.parse(g) for g in grants], scopes=scopes
    )
    return created.secret


@pytest.fixture
def secure_settings(settings: Settings) -> Settings:
    """The suite's settings with authentication on (as on a fresh install)."""
    return settings.model_copy(update={"insecure_no_auth": False})


@pytest.fixture
def secure_archive(secure_settings: Settings) -> Iterator[Archive]:
    """An archive whose app authenticates, authorizes and audits."""
    opened = Archive.open(secure_settings)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def secure_app(secure_archive: Archive) -> FastAPI:
    """The app with authentication on."""
    return create_app(secure_archive, background=False)


@pytest.fixture
def secure_client(secure_app: FastAPI) -> Iterator[TestClient]:
    """An in-process client of the app with authentication on."""
    with TestClient(secure_app) as client:
        yield client
