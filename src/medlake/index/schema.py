"""The index schema: SQLAlchemy 2 Core tables, one definition for SQLite and PostgreSQL.

Alembic migrations (``medlake/index/migrations``) create and evolve these tables;
``tests/test_migrations.py`` checks that the migrations and this module agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

#: SQLite only auto-increments a column declared INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UID = String(64)
TS = DateTime(timezone=True)

partitions = Table(
    "partitions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", TS, nullable=False),
)

studies = Table(
    "studies",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("partition_id", ForeignKey("partitions.id"), nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("specific_character_set", String(128)),
    Column("study_date", String(8)),
    Column("study_time", String(16)),
    Column("accession_number", String(16)),
    Column("referring_physician_name", String(330)),
    Column("referring_physician_name_search", String(330)),
    Column("timezone_offset_from_utc", String(5)),
    Column("study_description", String(64)),
    Column("patient_name", String(330)),
    Column("patient_name_search", String(330)),
    Column("patient_id", String(64)),
    Column("issuer_of_patient_id", String(64)),
    Column("patient_birth_date", String(8)),
    Column("patient_sex", String(16)),
    Column("study_id", String(16)),
    Column("modalities_in_study", String(256)),
    Column("num_series", Integer, nullable=False, default=0),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("extra", Text, nullable=False, default="{}"),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("partition_id", "study_uid"),
    Index(None, "partition_id", "patient_id"),
    Index(None, "partition_id", "study_date"),
    Index(None, "partition_id", "patient_name_search"),
    Index(None, "partition_id", "accession_number"),
)

series = Table(
    "series",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("partition_id", ForeignKey("partitions.id"), nullable=False),
    Column("study_id", ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("modality", String(16)),
    Column("series_description", String(64)),
    Column("body_part_examined", String(16)),
    Column("series_number", Integer),
    Column("pps_start_date", String(8)),
    Column("pps_start_time", String(16)),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("extra", Text, nullable=False, default="{}"),
    Column("metadata_stale", Boolean, nullable=False, default=True),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("partition_id", "series_uid"),
    Index(None, "study_id"),
    Index(None, "partition_id", "modality"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("partition_id", ForeignKey("partitions.id"), nullable=False),
    Column("study_id", ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("series_id", ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("sop_uid", UID, nullable=False),
    Column("sop_class_uid", UID),
    Column("instance_number", Integer),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("bits_allocated", Integer),
    Column("number_of_frames", Integer),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("blob_key", String(512), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("encapsulated", Boolean, nullable=False, default=False),
    Column("frames", Text),
    Column("tier", String(8), nullable=False, default="hot"),
    Column("last_accessed_at", TS, nullable=False),
    Column("created_at", TS, nullable=False),
    #: The ingest batch that stored this version of the instance (reconciliation counts
    #: its rows); no foreign key, so a store pays no lookup (batch rows are never deleted).
    Column("batch_id", String(36)),
    UniqueConstraint("partition_id", "sop_uid"),
    Index(None, "series_id", "instance_number"),
    Index(None, "study_id"),
    Index(None, "tier", "last_accessed_at"),
    Index(None, "batch_id"),
)

#: Flat, denormalised copy of the common attributes of each instance, for analytics.
instance_metadata = Table(
    "instance_metadata",
    metadata,
    Column("instance_id", ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    Column("partition", String(64), nullable=False),
    Column("patient_id", String(64)),
    Column("patient_name", String(330)),
    Column("patient_birth_date", String(8)),
    Column("patient_sex", String(16)),
    Column("study_uid", UID, nullable=False),
    Column("study_date", String(8)),
    Column("study_description", String(64)),
    Column("accession_number", String(16)),
    Column("series_uid", UID, nullable=False),
    Column("modality", String(16)),
    Column("body_part_examined", String(16)),
    Column("series_description", String(64)),
    Column("sop_uid", UID, nullable=False),
    Column("sop_class_uid", UID),
    Column("instance_number", Integer),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("number_of_frames", Integer),
    Column("transfer_syntax_uid", UID),
    Column("blob_key", String(512), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("stored_at", TS, nullable=False),
)

change_feed = Table(
    "change_feed",
    metadata,
    Column("sequence", Id, primary_key=True, autoincrement=True),
    Column("timestamp", TS, nullable=False),
    Column("action", String(8), nullable=False),  # create | update | delete
    Column("state", String(8), nullable=False),  # current | replaced | deleted
    Column("partition", String(64), nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("sop_uid", UID, nullable=False),
    Index(None, "timestamp"),
    Index(None, "partition", "sop_uid"),
)

extended_query_tags = Table(
    "extended_query_tags",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("tag", String(8), nullable=False, unique=True),
    Column("keyword", String(64)),
    Column("vr", String(2), nullable=False),
    #: Private tags: the Private Creator whose block the element belongs to.
    Column("private_creator", String(64)),
    Column("level", String(8), nullable=False),
    Column("status", String(10), nullable=False),  # adding | ready | deleting
    Column("operation_id", String(36)),
    Column("created_at", TS, nullable=False),
)

extended_query_tag_values = Table(
    "extended_query_tag_values",
    metadata,
    Column("tag_id", ForeignKey("extended_query_tags.id", ondelete="CASCADE"), primary_key=True),
    Column("instance_id", ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    Column("study_id", ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("series_id", ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("value_text", String(330)),
    Column("value_number", Float),
    Index(None, "tag_id", "value_text"),
    Index(None, "tag_id", "value_number"),
    # Deleting an instance cascades here; without it PostgreSQL scans the table.
    Index(None, "instance_id"),
)

#: Values that could not be indexed (wrong format for the VR, several values, unreadable
#: file), one row per tag and instance, so nothing is skipped silently.
extended_query_tag_errors = Table(
    "extended_query_tag_errors",
    metadata,
    Column("tag_id", ForeignKey("extended_query_tags.id", ondelete="CASCADE"), primary_key=True),
    Column("instance_id", ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    Column("message", String(512), nullable=False),
    Column("created_at", TS, nullable=False),
    Index(None, "instance_id"),
)

operations = Table(
    "operations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("status", String(12), nullable=False),  # notStarted | running | succeeded | failed
    Column("percent_complete", Integer, nullable=False, default=0),
    Column("detail", Text),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

# --- ingestion bookkeeping (batches, errors, durable work queue) ----------------------------

#: One ingest run (a folder, an upload, a DIMSE association), with its counts and verdict.
batches = Table(
    "batches",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),  # ingest | watch | stow | dimse | import
    Column("partition", String(64), nullable=False),
    Column("source", Text, nullable=False),
    Column("status", String(12), nullable=False),  # running | paused | completed | failed
    Column("seen", Integer, nullable=False, default=0),
    Column("stored", Integer, nullable=False, default=0),
    Column("duplicates", Integer, nullable=False, default=0),
    Column("rejected", Integer, nullable=False, default=0),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("verdict", String(12)),  # balanced | mismatch (reconciliation)
    Column("detail", Text),  # JSON: options, differences found by reconciliation
    Column("started_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("finished_at", TS),
    Index(None, "started_at"),
)

#: Every rejected or warned file, with the rule that caught it. Never deleted with a batch.
ingest_errors = Table(
    "ingest_errors",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("batch_id", ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
    Column("source", Text, nullable=False),
    Column("rule", String(64), nullable=False),
    Column("severity", String(8), nullable=False),  # reject | warn | error (not a rule)
    Column("message", Text, nullable=False),
    Column("sop_uid", UID),
    Column("kept_at", Text),  # where the rejected file was set aside
    Column("created_at", TS, nullable=False),
    Index(None, "batch_id"),
)

#: Durable queue of files to ingest (SQLite: one writer; PostgreSQL: FOR UPDATE SKIP LOCKED).
work_queue = Table(
    "work_queue",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("batch_id", ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
    Column("source", Text, nullable=False),
    Column("size", BigInteger),
    Column("status", String(10), nullable=False),  # pending | claimed | done
    Column("outcome", String(10)),  # stored | duplicate | rejected | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("claimed_by", String(64)),
    Column("claimed_at", TS),
    Column("finished_at", TS),
    Column("sop_uid", UID),
    UniqueConstraint("batch_id", "source"),
    Index(None, "batch_id", "status"),
)

# --- clinical staging (CSV / NDJSON files, one table or resource type per file) --------------

#: One clinical file taken in: its bytes are kept in the lake, its records in clinical_rows.
clinical_files = Table(
    "clinical_files",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("batch_id", String(36), nullable=False),
    Column("partition", String(64), nullable=False),
    Column("table_name", String(64), nullable=False),  # CSV: from the file name; NDJSON: type
    Column("format", String(8), nullable=False),  # csv | ndjson
    Column("source", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("blob_key", String(512), nullable=False),
    Column("created_at", TS, nullable=False),
    UniqueConstraint("partition", "table_name", "sha256"),
    Index(None, "batch_id"),
)

#: Staged clinical records (one per CSV row / NDJSON line), linked by patient identifier.
clinical_rows = Table(
    "clinical_rows",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("file_id", ForeignKey("clinical_files.id", ondelete="CASCADE"), nullable=False),
    Column("row_number", Integer, nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("data", Text, nullable=False),  # JSON object: column -> value, or the resource
    Index(None, "file_id"),
    Index(None, "patient_id"),
)

# --- DICOM network peers ------------------------------------------------------------------

#: Known Application Entities: destinations for C-MOVE / send, and the calling-AE
#: allow-list with the partition each calling AE writes into.
application_entities = Table(
    "application_entities",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("ae_title", String(16), nullable=False, unique=True),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("partition", String(64)),  # where its C-STOREs go; None = default partition
    Column("allow_store", Boolean, nullable=False, default=True),
    Column("allow_query", Boolean, nullable=False, default=True),
    Column("description", Text),
    Column("created_at", TS, nullable=False),
)

# --- FHIR R4 resources ----------------------------------------------------------------------

#: The current version of every FHIR resource (``deleted`` rows keep their id, so a
#: later create with the same id continues the version history).
fhir_resources = Table(
    "fhir_resources",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("partition_id", ForeignKey("partitions.id"), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("logical_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", TS, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("content", Text),  # the resource JSON as served (meta included); None when deleted
    UniqueConstraint("partition_id", "resource_type", "logical_id"),
    Index(None, "resource_type", "last_updated"),
)

#: Every version of every resource, the current one included (``_history``, vread).
fhir_resource_versions = Table(
    "fhir_resource_versions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("resource_id", ForeignKey("fhir_resources.id", ondelete="CASCADE"), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", TS, nullable=False),
    Column("method", String(8), nullable=False),  # POST | PUT | DELETE
    Column("content", Text),  # None for a DELETE
    UniqueConstraint("resource_id", "version_id"),
    Index(None, "last_updated"),
)

#: Search parameter values extracted from the current version of each resource: one
#: row per (parameter, value). Which columns are filled depends on the parameter type:
#: string -> string_value (normalised: case- and accent-folded); token -> token_system,
#: token_code (and string_value holding the display text for ``:text``); date ->
#: date_low/date_high (the period the value covers); number/quantity -> number_value
#: (+ token_system/token_code for the quantity's system and code); reference ->
#: ref_type/ref_id (and string_value holding an absolute or identifier reference);
#: uri -> string_value unfolded.
fhir_search_values = Table(
    "fhir_search_values",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("resource_id", ForeignKey("fhir_resources.id", ondelete="CASCADE"), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("string_value", String(512)),
    Column("token_system", String(256)),
    Column("token_code", String(256)),
    Column("date_low", TS),
    Column("date_high", TS),
    Column("number_value", Float),
    Column("ref_type", String(64)),
    Column("ref_id", String(64)),
    Index(None, "resource_id"),
    Index(None, "resource_type", "param", "token_code"),
    Index(None, "resource_type", "param", "string_value"),
    Index(None, "resource_type", "param", "date_low", "date_high"),
    Index(None, "resource_type", "param", "ref_type", "ref_id"),
    Index(None, "resource_type", "param", "number_value"),
)
