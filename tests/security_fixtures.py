"""Fixtures of the security tests (registered with ``pytest_plugins``): the archive and
app with authentication on, as on a fresh install."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from medlake.api import create_app
from medlake.config import Settings
from medlake.ingest.archive import Archive

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


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
