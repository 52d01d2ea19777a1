"""One FHIR ImagingStudy per stored DICOM study, linked to the study's Patient.

For every study of the index, the FHIR store of the same partition holds
``ImagingStudy/{StudyInstanceUID}`` (R4): the Study Instance UID as identifier
(``urn:dicom:uid``), status ``available``, the patient as subject, ``started``, the
counts, modalities, series with their instances (at most
``imaging_study_max_instances`` listed), and an ``endpoint`` to
``Endpoint/dicomweb``, whose ``dicom-wado-rs`` address is the partition's DICOMweb
root under ``public_base_url``. The subject is the Patient of the study's patient key
(:mod:`medlake.clinical.patient_identity`); when no Patient carries the study's
PatientID yet, one is made from the DICOM Patient module. A deleted study's
ImagingStudy is deleted (history keeps its versions).

The DICOM write path only pays for waking a thread: :class:`ImagingStudySync` follows
the change feed (``change_feed`` sequence, cursor in ``sync_cursors``), waits until a
study has been quiet for ``imaging_study_quiet_seconds`` and writes its ImagingStudy
once per burst; versions are written only when the content changed.
:func:`sync_imaging_studies` (``medlake fhir sync-imaging``) catches up on what was
stored while no server ran, and with ``full`` rebuilds every study of the archive.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, func, select

from medlake.clinical.patient_identity import (
    IMAGING_SOURCE,
    PatientKey,
    current_key,
    identifier_system,
    link_study,
    patient_for_identifier,
    read_cursor,
    record_patient,
    sync_patient_records,
    write_cursor,
)
from medlake.clinical.resources import validate_resource
from medlake.clinical.store import Method, WriteOp, WriteSession, new_logical_id, run_write
from medlake.config import Settings
from medlake.errors import MedlakeError
from medlake.index.schema import (
    change_feed,
    fhir_resources,
    instances,
    partitions,
    series,
    studies,
    study_patients,
)
from medlake.ingest.archive import Archive
from medlake.ingest.events import IngestEvent, InstancesStored
from medlake.types import DEFAULT_PARTITION

__all__ = [
    "ENDPOINT_ID",
    "ImagingStudySync",
    "SyncReport",
    "dicomweb_root",
    "imaging_study_resource",
    "sync_imaging_studies",
    "sync_study",
]

log = logging.getLogger(__name__)

#: The logical id of the DICOMweb Endpoint of each partition's FHIR store.
ENDPOINT_ID = "dicomweb"
#: ``sync_cursors`` name of the change-feed follower.
FEED_CURSOR = "imaging-study-feed"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
#: Identifier system of DICOM UIDs (values ``urn:oid:…``), R4 ImagingStudy.identifier.
DICOM_UID = "urn:dicom:uid"
#: HL7 v2 table 0203, identifier types (``ACSN``: accession number).
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ENDPOINT_CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
#: Change-feed entries read per step.
_FEED_PAGE = 5000
#: See patient_identity._COMMIT_LAG: PostgreSQL may commit a lower sequence after a higher.
_COMMIT_LAG = dt.timedelta(seconds=60)
#: How long a quiet study waits for its ImagingStudy while other studies are still
#: being stored (a STOW-RS or C-STORE run of many studies; see ``_follow_feed``).
_BUSY_HOLD = dt.timedelta(seconds=30)
#: Advisory lock key of the follower on PostgreSQL (one replica follows at a time).
_LOCK_KEY = 0x6D6C_696D_6773_7964  # "mlimgsyd"
_GENDER = {"M": "male", "F": "female", "O": "other"}


@dataclass
class SyncReport:
    """What one pass of the ImagingStudy sync did."""

    studies: int = 0
    written: int = 0
    deleted: int = 0
    patients_created: int = 0
    patient_versions: int = 0
    #: Studies changed but not quiet yet, left for a later pass.
    pending: int = 0
    failed: list[str] = field(default_factory=list)

    def add(self, other: SyncReport) -> None:
        """Add the figures of another pass."""
        self.studies += other.studies
        self.written += other.written
        self.deleted += other.deleted
        self.patients_created += other.patients_created
        self.patient_versions += other.patient_versions
        self.pending += other.pending
        self.failed.extend(other.failed)


def dicomweb_root(settings: Settings, partition: str, *, base_url: str | None = None) -> str:
    """The DICOMweb base URL of a partition (``…/dicomweb`` or
    ``…/dicomweb/partitions/{partition}``) under ``base_url`` (default:
    ``public_base_url``)."""
    base = (base_url or settings.resolved_public_base_url).rstrip("/") + "/dicomweb"
    return base if partition == DEFAULT_PARTITION else f"{base}/partitions/{partition}"


# --- the study as the index has it ---------------------------------------------------------


@dataclass(frozen=True)
class _Instance:
    uid: str
    sop_class: str | None
    number: int | None


@dataclass(frozen=True)
class _Series:
    pk: int
    uid: str
    number: int | None
    modality: str | None
    description: str | None
    body_part: str | None
    num_instances: int
    instances: list[_Instance]


@dataclass(frozen=True)
class _Study:
    pk: int
    uid: str
    row: Any
    series: list[_Series]


def _snapshot(
    conn: Connection, partition_pk: int, study_uid: str, max_instances: int
) -> _Study | None:
    study = conn.execute(
        select(studies).where(
            studies.c.partition_id == partition_pk, studies.c.study_uid == study_uid
        )
    ).first()
    if study is None:
        return None
    series_rows = conn.execute(
        select(series)
        .where(series.c.study_id == study.id)
        .order_by(series.c.series_number, series.c.id)
    ).all()
    listed: dict[int, list[_Instance]] = {row.id: [] for row in series_rows}
    if max_instances > 0 and series_rows:
        # Each series gets its share of the listing, so a huge series does not hide the others.
        share = max(1, max_instances // len(series_rows))
        found = conn.execute(
            select(instances.c.series_id, instances.c.sop_uid, instances.c.sop_class_uid,
                   instances.c.instance_number)
            .where(instances.c.study_id == study.id)
            .order_by(instances.c.series_id, instances.c.instance_number, instances.c.id)
        )  # fmt: skip
        total = 0
        for row in found:
            bucket = listed[row.series_id]
            if len(bucket) < share and total < max_instances and row.sop_class_uid:
                bucket.append(_Instance(row.sop_uid, row.sop_class_uid, row.instance_number))
                total += 1
    return _Study(
        study.id,
        study.study_uid,
        study,
        [
            _Series(
                row.id, row.series_uid, row.series_number, row.modality, row.series_description,
                row.body_part_examined, row.num_instances, listed[row.id],
            )
            for row in series_rows
        ],
    )  # fmt: skip


# --- the resources -----------------------------------------------------------------------


def _fhir_date(value: str | None) -> str | None:
    """DICOM DA ``YYYYMMDD`` -> FHIR date, None when it is not a valid date."""
    if not value or len(value) != 8 or not value.isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:])).isoformat()
    except ValueError:
        return None


def _started(row: Any) -> str | None:
    """StudyDate + StudyTime (+ TimezoneOffsetFromUTC) -> FHIR dateTime. FHIR requires a
    zone on a time: without the offset only the date is given."""
    date = _fhir_date(row.study_date)
    if date is None:
        return None
    clock = (row.study_time or "").strip()
    offset = (row.timezone_offset_from_utc or "").strip()
    if len(clock) < 4 or not clock[:6].replace(".", "").isdigit() or len(offset) != 5:
        return date
    hh, mm, ss = clock[:2], clock[2:4], (clock[4:6] if len(clock) >= 6 else "00")
    if not (ss.isdigit() and offset[0] in "+-" and offset[1:].isdigit()):
        return date
    return f"{date}T{hh}:{mm}:{ss}{offset[:3]}:{offset[3:]}"


def study_day(row: Any) -> dt.datetime | None:
    """The StudyDate as 00:00 UTC of that day (the anchor of cohort time windows)."""
    date = _fhir_date(row.study_date)
    return None if date is None else dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC)


def _coding(system: str, code: str) -> dict[str, str]:
    return {"system": system, "code": code}


def imaging_study_resource(
    study: _Study, subject_id: str, *, with_endpoint: bool = True
) -> dict[str, Any]:
    """The ImagingStudy of a study snapshot, its subject ``Patient/{subject_id}``."""
    row = study.row
    identifiers: list[dict[str, Any]] = [{"system": DICOM_UID, "value": f"urn:oid:{study.uid}"}]
    if row.accession_number:
        identifiers.append(
            {"type": {"coding": [_coding(V2_0203, "ACSN")]}, "value": row.accession_number}
        )
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "meta": {"source": IMAGING_SOURCE},
        "identifier": identifiers,
        "status": "available",
    }
    modalities = [m for m in (row.modalities_in_study or "").split("\\") if m]
    if modalities:
        resource["modality"] = [_coding(DCM, m) for m in modalities]
    resource["subject"] = {"reference": f"Patient/{subject_id}"}
    started = _started(row)
    if started:
        resource["started"] = started
    if with_endpoint:
        resource["endpoint"] = [{"reference": f"Endpoint/{ENDPOINT_ID}"}]
    resource["numberOfSeries"] = row.num_series
    resource["numberOfInstances"] = row.num_instances
    if row.study_description:
        resource["description"] = row.study_description
    out_series = []
    for one in study.series:
        entry: dict[str, Any] = {"uid": one.uid}
        if one.number is not None:
            entry["number"] = one.number
        entry["modality"] = _coding(DCM, one.modality or "OT")
        if one.description:
            entry["description"] = one.description
        entry["numberOfInstances"] = one.num_instances
        if one.body_part:
            # Body Part Examined is a defined term, not a SNOMED code: given as its text.
            entry["bodySite"] = {"display": one.body_part}
        if one.instances:
            entry["instance"] = [_instance(i) for i in one.instances]
        out_series.append(entry)
    if out_series:
        resource["series"] = out_series
    return resource


def _instance(instance: _Instance) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": instance.uid,
        "sopClass": _coding("urn:ietf:rfc:3986", f"urn:oid:{instance.sop_class}"),
    }
    if instance.number is not None:
        out["number"] = instance.number
    return out


def endpoint_resource(settings: Settings, partition: str) -> dict[str, Any]:
    """The Endpoint of a partition's DICOMweb service (WADO-RS)."""
    return {
        "resourceType": "Endpoint",
        "meta": {"source": IMAGING_SOURCE},
        "status": "active",
        "connectionType": _coding(ENDPOINT_CONNECTION_TYPE, "dicom-wado-rs"),
        "name": f"medlake DICOMweb, partition {partition}",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": dicomweb_root(settings, partition),
    }


def _person_name(text: str | None) -> dict[str, Any] | None:
    """A DICOM PN (its alphabetic group) as a FHIR HumanName."""
    alphabetic = (text or "").split("=")[0].strip()
    if not alphabetic.replace("^", "").strip():
        return None
    parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    name: dict[str, Any] = {
        "text": " ".join(p for p in (prefix, given, middle, family, suffix) if p)
    }
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [p for p in (given, middle) if p]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def patient_resource(row: Any, identifier: tuple[str, str] | None) -> dict[str, Any]:
    """A Patient made from the Patient module of a study (name, sex, birth date)."""
    resource: dict[str, Any] = {"resourceType": "Patient", "meta": {"source": IMAGING_SOURCE}}
    if identifier is not None:
        resource["identifier"] = [{"system": identifier[0], "value": identifier[1]}]
    name = _person_name(row.patient_name)
    if name:
        resource["name"] = [name]
    gender = _GENDER.get((row.patient_sex or "").strip().upper())
    if gender:
        resource["gender"] = gender
    birth = _fhir_date(row.patient_birth_date)
    if birth:
        resource["birthDate"] = birth
    return resource


# --- writing one study ----------------------------------------------------------------------


@dataclass
class _Outcome:
    written: bool = False
    deleted: bool = False
    patient_created: bool = False


def _stored_content(session: WriteSession, pk: int) -> dict[str, Any] | None:
    text_ = session.conn.execute(
        select(fhir_resources.c.content).where(fhir_resources.c.id == pk)
    ).scalar_one_or_none()
    if not text_:
        return None
    stored: dict[str, Any] = orjson.loads(text_)
    meta = dict(stored.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    stored["meta"] = meta
    stored.pop("id", None)
    return stored


def _put_if_changed(session: WriteSession, logical_id: str, resource: dict[str, Any]) -> bool:
    """Write ``resource`` as ``Type/logical_id`` unless the stored version says the same."""
    kind = resource["resourceType"]
    current = session.current(kind, [logical_id]).get(logical_id)
    if (
        current is not None
        and not current.deleted
        and _stored_content(session, current.pk) == orjson.loads(orjson.dumps(resource))
    ):
        return False
    validate_resource(resource)
    method: Method = "POST" if current is None else "PUT"
    session.apply([WriteOp(kind, logical_id, resource, method, current)])
    return True


def _patient_for(
    session: WriteSession, settings: Settings, partition: str, study: _Study, outcome: _Outcome
) -> PatientKey:
    """The patient key of a study: by its PatientID, else the one it is linked to, else a
    new Patient made from its Patient module."""
    row = study.row
    conn, partition_pk = session.conn, session.partition_pk
    identifier: tuple[str, str] | None = None
    patient_id = (row.patient_id or "").strip()
    if patient_id:
        system = identifier_system(settings, partition, row.issuer_of_patient_id)
        identifier = (system, patient_id)
        found = patient_for_identifier(conn, partition_pk, system, patient_id)
        if found is not None:
            return found
    else:
        linked = conn.execute(
            select(study_patients.c.patient_id).where(study_patients.c.study_id == study.pk)
        ).scalar_one_or_none()
        if linked is not None:
            return current_key(conn, int(linked))
    resource = patient_resource(row, identifier)
    validate_resource(resource)
    fhir_id = new_logical_id()
    session.apply([WriteOp("Patient", fhir_id, resource, "POST", None)])
    key = record_patient(conn, partition_pk, fhir_id, 1, resource)
    outcome.patient_created = True
    return PatientKey(key, fhir_id)


def _write_study(
    session: WriteSession, settings: Settings, partition: str, study_uid: str
) -> _Outcome:
    outcome = _Outcome()
    study = _snapshot(
        session.conn, session.partition_pk, study_uid, settings.imaging_study_max_instances
    )
    if study is None:
        current = session.current("ImagingStudy", [study_uid]).get(study_uid)
        if current is not None and not current.deleted:
            stored = _stored_content(session, current.pk) or {}
            if (stored.get("meta") or {}).get("source") == IMAGING_SOURCE:
                session.apply([WriteOp("ImagingStudy", study_uid, None, "DELETE", current)])
                outcome.deleted = True
        return outcome
    patient = _patient_for(session, settings, partition, study, outcome)
    link_study(session.conn, session.partition_pk, study.pk, patient.key, study_day(study.row))
    _put_if_changed(session, ENDPOINT_ID, endpoint_resource(settings, partition))
    outcome.written = _put_if_changed(
        session, study_uid, imaging_study_resource(study, patient.fhir_id)
    )
    return outcome


def sync_study(archive: Archive, partition: str, study_uid: str) -> SyncReport:
    """Bring the ImagingStudy (and patient link) of one study up to date, in one write
    transaction; a study that no longer exists loses its ImagingStudy."""
    outcome = run_write(
        archive, partition, lambda s: _write_study(s, archive.settings, partition, study_uid)
    )
    return SyncReport(
        studies=1,
        written=int(outcome.written),
        deleted=int(outcome.deleted),
        patients_created=int(outcome.patient_created),
    )


# --- following the change feed -------------------------------------------------------------


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


class ImagingStudySync:
    """Follows the change feed and keeps ImagingStudy resources up to date.

    :meth:`run_once` is one pass (the catch-up command calls it with ``quiet=0``);
    :meth:`start` runs passes in a thread, woken by ``InstancesStored`` events and
    otherwise every ``poll_seconds`` (other processes store and delete too).
    """

    def __init__(self, archive: Archive, *, poll_seconds: float = 2.0) -> None:
        self.archive = archive
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Any = None
        #: (partition, study UID) -> time of the newest change already synced; entries
        #: the cursor has not passed yet (the PostgreSQL commit lag) are not redone.
        self._done: dict[tuple[str, str], dt.datetime] = {}

    # the thread

    def start(self) -> ImagingStudySync:
        """Subscribe to ingest events and start the thread."""
        self._unsubscribe = self.archive.events.subscribe(self._on_event)
        self._thread = threading.Thread(target=self._run, name="imaging-study-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (after the study it is writing)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Something changed: look now rather than at the next poll."""
        self._wake.set()

    def _on_event(self, event: IngestEvent) -> None:
        # Runs in the storing thread: only a wake-up, no work.
        if isinstance(event, InstancesStored):
            self._wake.set()

    def _run(self) -> None:
        quiet = self.archive.settings.imaging_study_quiet_seconds
        while not self._stop.is_set():
            self._wake.clear()
            waiting = False
            try:
                waiting = self.run_once(quiet=quiet).pending > 0
            except Exception:  # keep following; the next pass retries
                log.exception("ImagingStudy sync pass failed")
            if waiting:
                # A study is still receiving: look again once it may have gone quiet. The
                # stores meanwhile must not wake this thread: each wake-up would be one
                # more pass over the feed, per stored instance (about 2 ms of CPU each,
                # taken from the storing threads during a C-STORE association).
                self._stop.wait(max(quiet, 0.2))
            else:
                self._wake.wait(self.poll_seconds)

    # one pass

    def run_once(self, *, quiet: float = 0.0) -> SyncReport:
        """Link new FHIR Patients, then sync every study changed since the cursor that
        has been quiet for ``quiet`` seconds (``pending`` counts the others)."""
        report = SyncReport()
        with self._exclusive() as mine:
            if not mine:
                return report
            report.patient_versions = sync_patient_records(self.archive.engine)
            report.pending = self._follow_feed(quiet, report)
        return report

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[bool]:
        """On PostgreSQL, one follower of all replicas at a time (session advisory lock)."""
        engine = self.archive.engine
        if engine.dialect.name != "postgresql":
            yield True
            return
        with engine.connect() as conn:
            got = bool(conn.execute(select(func.pg_try_advisory_lock(_LOCK_KEY))).scalar())
            try:
                yield got
            finally:
                if got:
                    conn.execute(select(func.pg_advisory_unlock(_LOCK_KEY)))
                conn.commit()

    def _follow_feed(self, quiet: float, report: SyncReport) -> int:
        """Sync the quiet studies of the feed past the cursor; returns how many studies
        were left for a later pass (not quiet yet)."""
        engine = self.archive.engine
        lag = _COMMIT_LAG if engine.dialect.name == "postgresql" else dt.timedelta(0)
        with engine.connect() as conn:
            cursor = read_cursor(conn, FEED_CURSOR)
            newest = conn.execute(
                select(change_feed.c.timestamp).order_by(change_feed.c.sequence.desc()).limit(1)
            ).scalar()
        quiet_for = dt.timedelta(seconds=quiet)
        # While the archive is receiving (a store anywhere within ``quiet``), a quiet study
        # waits too, up to _BUSY_HOLD: its ImagingStudy would take CPU from the stores.
        age = dt.datetime.now(dt.UTC) - _utc(newest) if newest is not None else None
        busy = quiet > 0 and age is not None and dt.timedelta(0) <= age < quiet_for
        hold = max(_BUSY_HOLD, quiet_for) if busy else quiet_for
        while True:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(change_feed.c.sequence, change_feed.c.timestamp,
                           change_feed.c.partition, change_feed.c.study_uid)
                    .where(change_feed.c.sequence > cursor)
                    .order_by(change_feed.c.sequence)
                    .limit(_FEED_PAGE)
                ).all()  # fmt: skip
            if not rows:
                return 0
            now = dt.datetime.now(dt.UTC)
            changed: dict[tuple[str, str], tuple[int, dt.datetime]] = {}
            for row in rows:
                key = (row.partition, row.study_uid)
                first = changed.get(key, (row.sequence, row.timestamp))[0]
                changed[key] = (first, _utc(row.timestamp))
            held = [first for key, (first, last) in changed.items() if now - last < hold]
            for key, (_first, last) in changed.items():
                if now - last < hold:
                    continue
                if self._done.get(key, dt.datetime.min.replace(tzinfo=dt.UTC)) >= last:
                    continue
                self.sync_one(key, report)
                self._done[key] = last
            # The cursor passes what was synced, but not a study still waiting to go quiet,
            # nor (PostgreSQL) entries so young that an older transaction may still commit.
            stop = min(held) - 1 if held else rows[-1].sequence
            young = [r.sequence for r in rows if now - _utc(r.timestamp) < lag]
            if young:
                stop = min(stop, young[0] - 1)
            if stop > cursor:
                with engine.begin() as conn:
                    write_cursor(conn, FEED_CURSOR, stop)
                self._forget(stop, rows)
            if held or len(rows) < _FEED_PAGE or stop <= cursor:
                return len(held)
            cursor = stop

    def _forget(self, stop: int, rows: Sequence[Any]) -> None:
        passed = {(r.partition, r.study_uid) for r in rows if r.sequence <= stop}
        later = {(r.partition, r.study_uid) for r in rows if r.sequence > stop}
        for key in passed - later:
            self._done.pop(key, None)

    def sync_one(self, key: tuple[str, str], report: SyncReport) -> None:
        """Sync the study ``(partition, StudyInstanceUID)``, adding to ``report``; a
        failure is logged and listed in the report, not raised."""
        partition, study_uid = key
        try:
            report.add(sync_study(self.archive, partition, study_uid))
        except MedlakeError as exc:
            log.warning("ImagingStudy of study %s (%s) not written: %s", study_uid, partition, exc)
            report.failed.append(f"{partition}/{study_uid}: {exc.message}")


def sync_imaging_studies(
    archive: Archive, *, full: bool = False, partition: str | None = None
) -> SyncReport:
    """Catch up: link new FHIR Patients and sync every study changed since the last
    pass (``medlake fhir sync-imaging``). ``full`` syncs every study of ``partition``
    (all partitions when None) and deletes ImagingStudies medlake made for studies that
    are gone, whatever the cursor says."""
    follower = ImagingStudySync(archive)
    report = follower.run_once(quiet=0.0)
    if not full:
        return report
    with archive.engine.connect() as conn:
        query = select(partitions.c.name, studies.c.study_uid).join(
            partitions, partitions.c.id == studies.c.partition_id
        )
        orphans = (
            select(partitions.c.name, fhir_resources.c.logical_id)
            .join(partitions, partitions.c.id == fhir_resources.c.partition_id)
            .where(
                fhir_resources.c.resource_type == "ImagingStudy",
                fhir_resources.c.deleted.is_(False),
                ~select(studies.c.id)
                .where(
                    studies.c.partition_id == fhir_resources.c.partition_id,
                    studies.c.study_uid == fhir_resources.c.logical_id,
                )
                .exists(),
            )
        )
        if partition is not None:
            query = query.where(partitions.c.name == partition)
            orphans = orphans.where(partitions.c.name == partition)
        targets = [(r[0], r[1]) for r in conn.execute(query.order_by(studies.c.id))]
        targets += [(r[0], r[1]) for r in conn.execute(orphans)]
    for key in targets:
        follower.sync_one(key, report)
    return report
