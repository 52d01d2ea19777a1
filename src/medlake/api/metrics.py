"""``GET /metrics``: the server's counters in the Prometheus text format.

Each app has its own :class:`Metrics` (its own ``prometheus_client`` registry, so several
apps can live in one process, as in the tests). What is exported:

- ``medlake_http_requests_total{method,route,status}`` and
  ``medlake_http_request_duration_seconds{method,route}`` (histogram), observed by
  :class:`medlake.api.request_log.RequestLog`. ``route`` is the path *template*
  (``/dicomweb/studies/{study}``), ``unmatched`` when no route took the request: the
  concrete path carries UIDs (unbounded, PHI-adjacent) and never becomes a label.
- ``medlake_instances_stored_total{partition,route}``: instances this process stored, by
  the way they came in (``stow``, ``dimse``, ``ingest``, ``watch``: the kind of their
  batch; ``other`` without a batch). Counted from the archive's ``InstancesStored``
  events: the store path only adds to a dictionary; the batch kinds are looked up at
  scrape time, one query for all batches seen since the previous scrape.
- ``medlake_ingest_errors_total{severity,rule}``: the ``ingest_errors`` rows of the index
  (rejected and warned files of every route and process; the rows are never deleted).
  Read incrementally at scrape time: rows after the highest id already counted.
- ``medlake_work_queue_depth{status}`` (``pending``, ``claimed``) and
  ``medlake_hl7_messages_total{status}``: gauges read at scrape time with one
  ``COUNT … GROUP BY status`` each (an HL7 message moves from ``received`` to ``mapped``
  or ``failed``, so its counts are a gauge).
- ``medlake_dimse_associations_total{result}`` (``accepted``, ``rejected``) when the
  server's DIMSE SCP is observed (:meth:`Metrics.observe_dimse`, done by ``medlake serve``).

The counters live in the process: with several server processes each is scraped on its
own (medlake serve is one process; ``prometheus_client``'s multi-process mode is not used).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from pynetdicom import evt
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from medlake.index.schema import batches, hl7_messages, ingest_errors, work_queue
from medlake.ingest.archive import Archive
from medlake.ingest.events import IngestEvent, InstancesStored

if TYPE_CHECKING:
    from medlake.dimse.scp import DimseServer

log = logging.getLogger(__name__)

router = APIRouter()

#: The Prometheus text exposition format that :func:`generate_latest` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds: from a cached QIDO answer to a large STOW-RS upload.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Request methods kept as label values; anything else is ``other`` (labels stay bounded).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The ``route`` label of a request no route took (404, 405).
UNMATCHED = "unmatched"
#: Instances stored without a batch (a caller that keeps no ledger).
NO_BATCH = "other"
#: Batches seen since the last scrape after which their kinds are looked up anyway, so a
#: server nobody scrapes does not collect one entry per STOW-RS request for ever.
_MAX_PENDING_BATCHES = 1000
_QUEUED = ("pending", "claimed")
_HL7_STATUSES = ("received", "mapped", "failed", "rejected", "duplicate")


class Metrics:
    """The Prometheus metrics of one app and the archive it serves."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "medlake_http_requests", "HTTP requests answered, by method, route template "
            "and status.", ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "medlake_http_request_duration_seconds", "Time from the request's arrival to "
            "the end of its response, by method and route template.", ["method", "route"],
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.instances_stored = Counter(
            "medlake_instances_stored", "DICOM instances stored by this process, by "
            "partition and route (stow, dimse, ingest, watch).", ["partition", "route"],
            registry=r,
        )  # fmt: skip
        self.ingest_errors = Counter(
            "medlake_ingest_errors", "Rejected and warned files recorded in the index "
            "(ingest_errors rows), by severity and rule.", ["severity", "rule"], registry=r,
        )  # fmt: skip
        self.dimse_associations = Counter(
            "medlake_dimse_associations", "DIMSE associations requested of this process's "
            "SCP, by result (accepted, rejected).", ["result"], registry=r,
        )  # fmt: skip
        self.work_queue_depth = Gauge(
            "medlake_work_queue_depth", "Files in the ingest work queue waiting for a "
            "worker (pending) or being worked on (claimed).", ["status"], registry=r,
        )  # fmt: skip
        self.hl7_messages = Gauge(
            "medlake_hl7_messages_total", "HL7 v2 messages stored in the index, by status.",
            ["status"], registry=r,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._scrape_lock = threading.Lock()
        #: (partition, batch id) -> instances stored, not yet added to the counter.
        self._pending: defaultdict[tuple[str, str | None], int] = defaultdict(int)
        self._errors_counted_to = 0  # the highest ingest_errors.id already counted
        self._unsubscribe: Any = None

    # -- observing ------------------------------------------------------------------------

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request (``route``: its template, or :data:`UNMATCHED`)."""
        method = method if method in METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)

    def subscribe(self) -> None:
        """Count stored instances from now on (the app's lifespan calls it)."""
        if self._unsubscribe is None:
            self._unsubscribe = self.archive.events.subscribe(self._on_event)

    def unsubscribe(self) -> None:
        """Stop counting stored instances."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _on_event(self, event: IngestEvent) -> None:
        # Runs in the storing thread: a dictionary update, nothing more (the batch kind
        # is looked up at scrape time).
        if not isinstance(event, InstancesStored) or not event.sop_uids:
            return
        with self._lock:
            self._pending[(event.partition, event.batch_id)] += len(event.sop_uids)
            crowded = len(self._pending) > _MAX_PENDING_BATCHES
        if crowded:
            with contextlib.suppress(SQLAlchemyError):  # kept for the next scrape
                self._count_pending()

    def observe_dimse(self, server: DimseServer) -> None:
        """Count the associations of a started DIMSE SCP (accepted and rejected)."""
        accepted = self.dimse_associations.labels("accepted")
        rejected = self.dimse_associations.labels("rejected")
        server.bind(evt.EVT_ESTABLISHED, lambda _event: accepted.inc())
        server.bind(evt.EVT_REJECTED, lambda _event: rejected.inc())

    # -- scraping -------------------------------------------------------------------------

    def render(self) -> bytes:
        """Everything in the Prometheus text format, with the index-derived values read
        now (blocking: call it from a worker thread). An index that cannot be read
        leaves those values as they were and is logged; the rest is still served."""
        with self._scrape_lock:
            try:
                self._count_pending()
                self._read_index()
            except SQLAlchemyError as exc:
                log.warning("metrics: the index could not be read: %s", exc.__class__.__name__)
            return generate_latest(self.registry)

    def _count_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(int)
        if not pending:
            return
        ids = sorted({batch_id for _, batch_id in pending if batch_id is not None})
        kinds: dict[str, str] = {}
        try:
            if ids:
                with self.archive.engine.connect() as conn:
                    query = select(batches.c.id, batches.c.kind).where(batches.c.id.in_(ids))
                    kinds = {row.id: row.kind for row in conn.execute(query)}
        except SQLAlchemyError:
            with self._lock:  # counted at the next scrape instead
                for key, count in pending.items():
                    self._pending[key] += count
            raise
        for (partition, batch_id), count in pending.items():
            route = kinds.get(batch_id, NO_BATCH) if batch_id is not None else NO_BATCH
            self.instances_stored.labels(partition, route).inc(count)

    def _read_index(self) -> None:
        errors = (
            select(
                ingest_errors.c.severity,
                ingest_errors.c.rule,
                func.count(),
                func.max(ingest_errors.c.id),
            )
            .where(ingest_errors.c.id > self._errors_counted_to)
            .group_by(ingest_errors.c.severity, ingest_errors.c.rule)
        )
        queued = (
            select(work_queue.c.status, func.count())
            .where(work_queue.c.status.in_(_QUEUED))
            .group_by(work_queue.c.status)
        )
        hl7 = select(hl7_messages.c.status, func.count()).group_by(hl7_messages.c.status)
        with self.archive.engine.connect() as conn:
            new_errors = conn.execute(errors).all()
            queue_counts: dict[str, int] = {
                str(status): int(count) for status, count in conn.execute(queued)
            }
            hl7_counts: dict[str, int] = {
                str(status): int(count) for status, count in conn.execute(hl7)
            }
        for severity, rule, count, last_id in new_errors:
            self.ingest_errors.labels(severity, rule).inc(count)
            self._errors_counted_to = max(self._errors_counted_to, int(last_id))
        for status in _QUEUED:
            self.work_queue_depth.labels(status).set(queue_counts.get(status, 0))
        for status in {*_HL7_STATUSES, *hl7_counts}:
            self.hl7_messages.labels(status).set(hl7_counts.get(status, 0))


def metrics_of(app: Any) -> Metrics:
    """The :class:`Metrics` of an app made by :func:`medlake.api.create_app`."""
    metrics: Metrics = app.state.metrics
    return metrics


@router.get("/metrics")
async def read_metrics(request: Request) -> Response:
    """The server's metrics in the Prometheus text format (version 0.0.4)."""
    body = await run_in_threadpool(metrics_of(request.app).render)
    return Response(body, media_type=CONTENT_TYPE)


__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "UNMATCHED", "Metrics", "metrics_of", "router"]
