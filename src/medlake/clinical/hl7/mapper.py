"""The background mapper: stored HL7 v2 messages -> FHIR resources.

It takes accepted messages (status ``received``) oldest first, so an A08 is applied
after the A01 before it, turns each into a transaction Bundle (:mod:`.mapping`),
submits it to the FHIR store (``process_bundle``: atomic), carries out ADT^A40
merges (:func:`medlake.clinical.patient_merge.merge_patients`) and records the
outcome on the row: ``mapped`` with the resources made, or ``failed`` with why.

It never slows an acknowledgement: the listener only wakes it. A message is marked
``mapped`` in the transaction that writes its resources (one commit per message). A
merge (ADT^A40) is carried out after that transaction, and its message marked after
the merge: a stop or crash in between leaves the row ``received``; mapping it again
writes the same resources again (every entry is a conditional update or create on an
identifier from the message), not new ones.

On PostgreSQL, several server replicas may run a mapper each; a session advisory
lock lets one of them map at a time, so messages stay in order.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

from medlake.clinical.bundles import process_bundle
from medlake.clinical.hl7 import records
from medlake.clinical.hl7.mapping import MappingError, PatientMerge, map_message
from medlake.clinical.hl7.message import ParsedMessage, decode_message
from medlake.clinical.hl7.receiver import Receiver
from medlake.clinical.hl7.records import MessageRow
from medlake.clinical.patient_merge import merge_patients
from medlake.clinical.store import run_write
from medlake.errors import DatabaseUnavailable, MedlakeError
from medlake.index.statistics import refresh_statistics
from medlake.ingest.archive import Archive

log = logging.getLogger(__name__)

_BATCH = 50
#: Messages arrived this recently: the mapper gives way (``hl7_mapping_share``).
_RECEIVING_WINDOW = 1.0
_LOCATION = re.compile(r"(?:^|/)([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")


def map_stored_message(archive: Archive, row: MessageRow, base_url: str) -> None:
    """Map one stored message and record the outcome on its row (``mapped`` or
    ``failed``). Database outages are raised (the row stays ``received``)."""
    try:
        outcome = _map(archive, row, base_url)
    except (DatabaseUnavailable, OperationalError):
        raise
    except (MappingError, MedlakeError) as exc:
        message = exc.message if isinstance(exc, MedlakeError) else str(exc)
        # The reason quotes identifiers (PHI): it is on the message's record, not in the log.
        log.warning(
            "HL7 message %d (%s) not mapped: %s", row.id, row.message_type, type(exc).__name__
        )
        with archive.engine.begin() as conn:
            records.mark_failed(conn, row.id, message)
        return
    except Exception as exc:
        log.error(
            "HL7 message %d (%s) could not be mapped: %s",
            row.id,
            row.message_type,
            type(exc).__name__,
        )
        log.debug("HL7 message %d: mapping failed", row.id, exc_info=True)
        with archive.engine.begin() as conn:
            records.mark_failed(conn, row.id, f"internal error: {type(exc).__name__}: {exc}")
        return
    if outcome is not None:  # merges were carried out after the bundle: recorded now
        with archive.engine.begin() as conn:
            records.mark_mapped(conn, row.id, *outcome)


def _map(archive: Archive, row: MessageRow, base_url: str) -> tuple[list[str], str | None] | None:
    """Write the message's resources. Without merges (most messages) the row is marked
    ``mapped`` in the same transaction, and None is returned; else its resources and
    what the merges did, to record once they are done."""
    parsed = ParsedMessage(decode_message(row.payload))
    plan = map_message(parsed)

    def mapped(conn: Connection, response: dict[str, Any]) -> None:
        records.mark_mapped(conn, row.id, _references(response))

    if not plan.merges:
        process_bundle(
            archive, plan.bundle, partition=row.partition, base_url=base_url, then=mapped
        )
        return None
    response = process_bundle(archive, plan.bundle, partition=row.partition, base_url=base_url)
    notes = [_carry_out(archive, merge, row.partition) for merge in plan.merges]
    return _references(response), "; ".join(n for n in notes if n) or None


def _references(response: dict[str, Any]) -> list[str]:
    """``Type/id`` of every entry of a transaction-response Bundle, in order."""
    out: list[str] = []
    for entry in response.get("entry") or []:
        location = (entry.get("response") or {}).get("location") or entry.get("fullUrl") or ""
        match = _LOCATION.search(location)
        if match and match.group(1) not in out:
            out.append(match.group(1))
    return out


def _carry_out(archive: Archive, merge: PatientMerge, partition: str) -> str | None:
    """Merge the prior patient into the surviving one; a note when there was nothing
    to merge."""

    def find(session: Any, token: str) -> str | None:
        row = session.find_one("Patient", [("identifier", token)])
        return None if row is None else str(row.logical_id)

    prior, surviving = run_write(
        archive,
        partition,
        lambda s: (find(s, merge.prior.token), find(s, merge.surviving.token)),
    )
    if surviving is None:
        raise MappingError(f"the surviving patient {merge.surviving.token} was not stored")
    if prior is None:
        return f"no Patient with identifier {merge.prior.token}: nothing to merge"
    if prior == surviving:
        return f"Patient/{prior} already holds both identifiers: nothing to merge"
    result = merge_patients(archive, prior, surviving, partition=partition)
    return f"merged {result.source} into {result.target} ({len(result.repointed)} re-pointed)"


class Hl7Mapper:
    """A thread that maps stored messages until :meth:`stop`."""

    def __init__(
        self,
        archive: Archive,
        base_url: str,
        *,
        poll_seconds: float = 1.0,
        keep_statistics: bool = False,
    ) -> None:
        """``keep_statistics``: refresh the planner's statistics as the FHIR tables grow
        (for ``medlake mllp`` alone; ``medlake serve`` has a refresher of its own)."""
        self.archive = archive
        self.base_url = base_url.rstrip("/")
        self.poll_seconds = poll_seconds
        self.keep_statistics = keep_statistics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_conn: Connection | None = None
        self._receiver: Receiver | None = None

    def yield_to(self, receiver: Receiver) -> None:
        """Give way to ``receiver``'s acknowledgement path while it receives."""
        self._receiver = receiver

    def start(self) -> Hl7Mapper:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name="hl7-mapper", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """New messages were stored: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the message in hand, then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._release()

    def run_pending(self) -> int:
        """Map every message pending now, in this thread; returns how many."""
        done = 0
        while not self._stop.is_set():
            with self.archive.engine.connect() as conn:
                batch = records.pending(conn, _BATCH)
            if not batch:
                return done
            if self.keep_statistics:
                self._refresh_statistics()
            for row in batch:
                if self._stop.is_set():
                    return done
                started = time.monotonic()
                map_stored_message(self.archive, row, self.base_url)
                done += 1
                self._give_way(time.monotonic() - started)
        return done

    def _refresh_statistics(self) -> None:
        # The conditional writes search by identifier: a fresh PostgreSQL without
        # autovacuum has no statistics at all, and plans those searches badly.
        try:
            refresh_statistics(self.archive.engine)
        except Exception:
            log.exception("refreshing planner statistics failed")

    def _give_way(self, spent: float) -> None:
        # While messages arrive, work at most ``share`` of the time: the mapper's write
        # transactions (SQLite has one writer) and its CPU (the GIL) would otherwise hold
        # up the acknowledgements.
        receiver, share = self._receiver, self.archive.settings.hl7_mapping_share
        if receiver is not None and share < 1.0 and receiver.idle_seconds() < _RECEIVING_WINDOW:
            self._stop.wait(spent * (1 - share) / share)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                if self._leading():
                    self.run_pending()
            except (DatabaseUnavailable, OperationalError) as exc:
                log.warning("HL7 mapper: the index is unavailable (%s); retrying", exc)
                self._release()
            except Exception:
                log.exception("HL7 mapper failed; retrying")
            self._wake.wait(self.poll_seconds)

    def _leading(self) -> bool:
        """Whether this mapper holds the mapping lock (always, on SQLite)."""
        if self.archive.engine.dialect.name != "postgresql":
            return True
        if self._lock_conn is not None:
            return True
        conn = self.archive.engine.connect()
        held = conn.execute(
            text("SELECT pg_try_advisory_lock(hashtext('medlake-hl7-mapper:' || current_schema()))")
        ).scalar()
        conn.commit()  # the lock is the session's: it outlives the transaction
        if held:
            self._lock_conn = conn
            return True
        conn.close()
        return False

    def _release(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is None:
            return
        try:
            conn.execute(
                text(
                    "SELECT pg_advisory_unlock(hashtext('medlake-hl7-mapper:' || current_schema()))"
                )
            )
            conn.commit()
        except Exception:
            log.debug("HL7 mapper: releasing the lock failed", exc_info=True)
        finally:
            conn.close()
