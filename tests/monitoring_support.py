"""Helpers of the monitoring and hardening tests: the app served by uvicorn exactly as
``medlake serve`` configures it (:func:`medlake.api.http_server.server_config`: the
httptools protocol with medlake's request-head limits, uvicorn's loggers propagating to
the root logger), on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from medlake.api.http_server import server_config
from medlake.config import Settings


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def served(app: FastAPI, settings: Settings) -> Iterator[str]:
    """Serve ``app`` with ``medlake serve``'s uvicorn configuration; yields the root URL."""
    config = server_config(app, settings, host="127.0.0.1", port=free_port())
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-medlake", daemon=True)
    thread.start()
    while thread.is_alive() and not server.started:
        time.sleep(0.01)
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw_request(url: str, head: bytes, *, timeout: float = 30) -> bytes:
    """Send ``head`` (a request line and headers, CRLF-terminated) on a plain socket and
    return everything the server sends back before closing (for requests no HTTP client
    library would send)."""
    host, _, port = url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)
