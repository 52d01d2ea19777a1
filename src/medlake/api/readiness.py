"""``GET /readyz``: may this server take traffic? The index answers and the lake is writable.

``/healthz`` says whether the process lives (and how its last lake write went);
``/readyz`` is what a load balancer or Kubernetes readiness probe asks before sending
requests. It runs two checks and answers 200 when both pass, else 503, with one entry
per check::

    {"status": "ready", "checks": {
        "database": {"status": "ok", "detail": "SELECT 1 answered in 0.4 ms"},
        "lake": {"status": "ok", "detail": "health-check file written 3.2 s ago: ..."}}}

- ``database``: ``SELECT 1`` on the index, given ``readiness_timeout`` seconds. The
  query runs in a thread of its own; while an earlier one still hangs no second is
  started (a probe every second must not pile up threads on a dead database).
- ``lake``: the lake health check (:class:`medlake.storage.health.LakeHealthCheck`) wrote
  and read back its file, and did so recently: within two intervals
  (``health_check_interval``) plus ``readiness_timeout``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool

from medlake.storage.health import LakeHealthCheck

router = APIRouter()


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one readiness check."""

    name: str
    ok: bool
    detail: str

    def as_json(self) -> dict[str, str]:
        """The check's entry in the /readyz body."""
        return {"status": "ok" if self.ok else "failing", "detail": self.detail}


class Readiness:
    """The checks of ``/readyz`` for one app (index engine and lake health check)."""

    def __init__(
        self, engine: Engine, health: LakeHealthCheck, *, interval: float, timeout: float
    ) -> None:
        self.engine = engine
        self.health = health
        self.interval = interval  # of the health check's writes
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medlake-readyz")
        self._lock = threading.Lock()
        self._running: Future[float] | None = None

    def check_database(self) -> CheckResult:
        """``SELECT 1`` on the index within the timeout (blocking)."""
        with self._lock:
            if self._running is None or self._running.done():
                self._running = self._executor.submit(self._select_one)
            running = self._running
        try:
            seconds = running.result(timeout=self.timeout)
        except FutureTimeout:
            return CheckResult("database", False, f"no answer to SELECT 1 within {self.timeout} s")
        except Exception as exc:  # whatever the driver raises: the database is not usable
            return CheckResult("database", False, f"SELECT 1 failed: {_describe(exc)}")
        return CheckResult("database", True, f"SELECT 1 answered in {seconds * 1000:.1f} ms")

    def _select_one(self) -> float:
        started = time.perf_counter()
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
        return time.perf_counter() - started

    def check_lake(self, now: dt.datetime | None = None) -> CheckResult:
        """The last lake health-check write succeeded and is recent."""
        status = self.health.status
        if status.checked_at is None:
            return CheckResult("lake", False, f"no health-check write yet: {status.detail}")
        now = now or dt.datetime.now(dt.UTC)
        age = (now - status.checked_at).total_seconds()
        if not status.ok:
            detail = f"health-check write {age:.1f} s ago failed: {status.detail}"
            return CheckResult("lake", False, detail)
        limit = 2 * self.interval + self.timeout
        if age > limit:
            detail = f"last health-check write {age:.1f} s ago (more than {limit:.1f} s)"
            return CheckResult("lake", False, f"{detail}: the health check has stopped")
        return CheckResult(
            "lake", True, f"health-check file written {age:.1f} s ago: {status.detail}"
        )

    def run(self) -> list[CheckResult]:
        """Every check, in order (blocking: call it from a worker thread)."""
        return [self.check_database(), self.check_lake()]

    def close(self) -> None:
        """Stop the check thread (a hanging check is left to finish on its own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _describe(exc: BaseException) -> str:
    # The driver's first line says what failed (refused, authentication, ...) without
    # the SQL and parameters SQLAlchemy appends.
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {message[0]}" if message else exc.__class__.__name__


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Readiness: 200 when the index answers and the lake health check is recent, else
    503; the body reports each check."""
    readiness: Readiness = request.app.state.readiness
    results = await run_in_threadpool(readiness.run)
    ready = all(r.ok for r in results)
    body = {
        "status": "ready" if ready else "not ready",
        "failing": [r.name for r in results if not r.ok],
        "checks": {r.name: r.as_json() for r in results},
    }
    return Response(orjson.dumps(body), 200 if ready else 503, media_type="application/json")


__all__ = ["CheckResult", "Readiness", "router"]
