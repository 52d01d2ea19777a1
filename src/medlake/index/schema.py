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
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
    true,
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
    # Reached over DICOM TLS (C-MOVE destination, send / retrieve target).
    Column("tls", Boolean, nullable=False, default=False, server_default=false()),
    # Its associations are admitted only from its host's addresses (migration 0010).
    Column("check_host", Boolean, nullable=False, default=True, server_default=true()),
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
#: string -> string_value (normalised: case- and accent-folded) and string_exact (as
#: written, for ``:exact``); token -> token_system, token_code (and string_value holding
#: the folded display text for ``:text``; an Identifier's type in qualifier_system/
#: qualifier_code for ``:of-type``); date -> date_low/date_high (the period the value
#: covers, high exclusive, UTC); number/quantity -> number_value (+ token_system/
#: token_code for the quantity's system and code, string_value for its unit);
#: reference -> ref_type/ref_id of a relative reference, string_value holding an
#: absolute or canonical one, token_system/token_code its identifier; uri ->
#: string_value unfolded. A composite row holds its first (token) component in
#: qualifier_system/qualifier_code and its second in the columns of that type.
fhir_search_values = Table(
    "fhir_search_values",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("resource_id", ForeignKey("fhir_resources.id", ondelete="CASCADE"), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("string_value", String(512)),
    Column("string_exact", String(512)),
    Column("token_system", String(256)),
    Column("token_code", String(256)),
    Column("qualifier_system", String(256)),
    Column("qualifier_code", String(256)),
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
    # The (code, value) pairs of composite parameters (Observation code-value-quantity),
    # found by code and value range in one index range: cohort queries (migration 0008).
    Index(
        "ix_fhir_search_values_qualifier_code_number_value",
        "resource_type",
        "param",
        "qualifier_code",
        "number_value",
        sqlite_where=text("qualifier_code IS NOT NULL"),
        postgresql_where=text("qualifier_code IS NOT NULL"),
    ),
)

# --- HL7 v2 messages (MLLP) -----------------------------------------------------------------

#: Every HL7 v2 message received over MLLP, committed before its ACK is sent: accepted,
#: rejected and duplicate ones alike, and framing errors (bytes outside a block, a block
#: cut off at close, an oversized block). ``raw_text`` is the message decoded with its
#: MSH-18 character set; ``raw_bytes`` holds the bytes instead when they do not decode.
hl7_messages = Table(
    "hl7_messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("received_at", TS, nullable=False),
    Column("partition", String(64), nullable=False),
    Column("peer", String(64)),  # host:port of the sender
    Column("control_id", String(199)),  # MSH-10
    Column("message_type", String(16)),  # MSH-9.1^MSH-9.2, e.g. ADT^A01
    Column("version", String(16)),  # MSH-12
    Column("sending_application", String(255)),  # MSH-3 as sent
    Column("sending_facility", String(255)),  # MSH-4 as sent
    Column("charset", String(32)),  # MSH-18 as sent
    Column("size", Integer, nullable=False),  # bytes between the start and end block
    Column("raw_text", Text),
    Column("raw_bytes", LargeBinary),
    # received | mapped | failed | rejected | duplicate
    Column("status", String(12), nullable=False),
    Column("ack_code", String(2)),  # AA | AE | AR; None: no ACK could be sent
    Column("error_code", String(16)),  # HL7 table 0357, or a framing error name
    Column("error_text", Text),
    Column("duplicate_of", Id),  # the first message with the same sender and MSH-10
    Column("resource_refs", Text),  # JSON list of the FHIR resources made from it
    Column("mapped_at", TS),
    Index(None, "status", "id"),
    Index(None, "control_id", "sending_application", "sending_facility"),
    Index(None, "message_type"),
    Index(None, "received_at"),
)

#: The senders the MLLP listener accepts when authentication is on (migration 0011): a
#: message is theirs when it comes from ``host`` (``*``: any address), over TLS with a
#: client certificate whose subject has every attribute of ``tls_subject`` (when set),
#: with MSH-3 / MSH-4 equal to ``sending_application`` / ``sending_facility`` (when set).
hl7_senders = Table(
    "hl7_senders",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("host", String(255), nullable=False),
    Column("partition", String(64), nullable=False),
    Column("sending_application", String(255)),
    Column("sending_facility", String(255)),
    Column("tls_subject", String(255)),
    Column("description", Text),
    Column("created_at", TS, nullable=False),
)

# --- security: principals, role grants, API tokens, audit log -------------------------------

#: Who may act: a user (the ``sub`` of an OIDC token), a token holder, or a DICOM AE.
principals = Table(
    "principals",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("subject", String(255), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),  # user | token | ae
    Column("display_name", String(255)),
    Column("created_at", TS, nullable=False),
)

#: Roles of a principal, each in one partition (``*`` = every partition) and, when
#: ``compartment`` is not empty, only within one FHIR compartment (``Patient/123``).
role_grants = Table(
    "role_grants",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("principal_id", ForeignKey("principals.id", ondelete="CASCADE"), nullable=False),
    Column("role", String(16), nullable=False),  # admin | ingest | reader | researcher | auditor
    Column("partition", String(64), nullable=False),
    Column("compartment", String(128), nullable=False, default=""),
    Column("created_at", TS, nullable=False),
    UniqueConstraint("principal_id", "role", "partition", "compartment"),
)

#: medlake's own API tokens: the secret is shown once and kept only as its SHA-256.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("token_id", String(16), nullable=False, unique=True),  # the public part of a token
    Column("principal_id", ForeignKey("principals.id", ondelete="CASCADE"), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    # token | login_link | session (medlake.security.browser_login)
    Column("kind", String(16), nullable=False, server_default="token"),
    Column("scopes", Text),  # space-separated SMART scopes; None = not limited by scopes
    Column("description", Text),
    Column("created_at", TS, nullable=False),
    Column("expires_at", TS),  # None = never
    Column("revoked_at", TS),
    Column("last_used_at", TS),
    Index(None, "principal_id"),
)

#: Append-only, hash-chained audit trail: ``hash`` = SHA-256 of ``prev_hash`` and the
#: canonical JSON of the other columns; ``seq`` is gap-free (1, 2, 3, ...).
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", Id, primary_key=True, autoincrement=False),
    Column("recorded_at", TS, nullable=False),
    Column("event_type", String(16), nullable=False),  # DCM code of CID 400, e.g. 110112 Query
    Column("event_subtype", String(16)),  # DCM code of CID 401, e.g. 110122 Login
    Column("action", String(1), nullable=False),  # C | R | U | D | E
    Column("outcome", Integer, nullable=False),  # 0 success | 4 minor | 8 serious | 12 major
    Column("operation", String(64), nullable=False),  # medlake action, e.g. dicom.read
    Column("actor", String(255), nullable=False),
    Column("actor_kind", String(8), nullable=False),
    Column("actor_name", String(255)),
    Column("source_address", String(255)),
    Column("partition", String(64)),
    Column("entity", Text, nullable=False),  # JSON object: UIDs, resource, patient
    Column("request", Text),  # method, path and query
    Column("detail", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index(None, "recorded_at"),
    Index(None, "actor"),
)

# --- bulk data: FHIR $export / $import jobs -------------------------------------------------

#: One FHIR bulk data job ($export or $import, the async request pattern): its request,
#: where it has got to (``cursor``, JSON, so an interrupted job resumes there) and what it
#: produced. ``output`` / ``errors`` are JSON lists of the manifest's file items (type,
#: file name, count); ``owner`` is the ``host:pid:nonce`` of the process running it, which
#: refreshes ``heartbeat_at`` as it goes.
fhir_bulk_jobs = Table(
    "fhir_bulk_jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(8), nullable=False),  # export | import
    Column("partition", String(64), nullable=False),
    # accepted | running | completed | failed | cancelled
    Column("status", String(12), nullable=False),
    Column("request", Text, nullable=False),  # the kick-off URL (or the CLI's source)
    Column("parameters", Text, nullable=False),  # JSON
    Column("transaction_time", TS),
    Column("progress", String(100)),  # the X-Progress text
    Column("cursor", Text),
    Column("output", Text),
    Column("errors", Text),
    Column("error_message", Text),  # why a failed job failed
    Column("batch_id", String(36)),  # the ingest batch of an import
    Column("owner", String(64)),
    Column("heartbeat_at", TS),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("finished_at", TS),
    Index(None, "status", "created_at"),
)

#: The patients whose compartments a Patient- or Group-level export covers (the Group's
#: members, or the ``patient`` parameter), fixed when the job starts.
fhir_bulk_job_patients = Table(
    "fhir_bulk_job_patients",
    metadata,
    Column("job_id", ForeignKey("fhir_bulk_jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("patient_id", String(64), primary_key=True),
)

#: $export reads one resource type of one partition in primary-key order (keyset pages).
Index(
    "ix_fhir_resources_partition_id_resource_type_id",
    fhir_resources.c.partition_id,
    fhir_resources.c.resource_type,
    fhir_resources.c.id,
)

# --- patient identity: one patient across DICOM and FHIR ----------------------------------

#: One patient of a partition (the "patient key" of imaging and clinical rows). ``fhir_id``
#: is the Patient resource that speaks for it (ImagingStudy.subject); a key merged into
#: another keeps its row, with ``merged_into`` naming the surviving key.
patients = Table(
    "patients",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("partition_id", ForeignKey("partitions.id"), nullable=False),
    Column("fhir_id", String(64), nullable=False),
    Column("merged_into", ForeignKey("patients.id")),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("partition_id", "fhir_id"),
    Index(None, "merged_into"),
)

#: Identifiers that name a patient: DICOM PatientID (system from IssuerOfPatientID) and
#: FHIR Patient.identifier. ``system`` is '' for an identifier without one.
patient_identifiers = Table(
    "patient_identifiers",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("partition_id", ForeignKey("partitions.id"), nullable=False),
    Column("system", String(256), nullable=False),
    Column("value", String(256), nullable=False),
    Column("patient_id", ForeignKey("patients.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", TS, nullable=False),
    UniqueConstraint("partition_id", "system", "value"),
    Index(None, "patient_id"),
)

#: Every FHIR Patient resource known to belong to a patient key (several when the same
#: person was registered twice, or after a merge), with the version last looked at.
patient_records = Table(
    "patient_records",
    metadata,
    Column("partition_id", ForeignKey("partitions.id"), primary_key=True),
    Column("fhir_id", String(64), primary_key=True),
    Column("patient_id", ForeignKey("patients.id", ondelete="CASCADE"), nullable=False),
    Column("version_id", Integer, nullable=False),
    Index(None, "patient_id"),
)

#: The patient of each stored study, and its StudyDate as an instant (00:00 UTC) for the
#: temporal relations of cohort queries. Goes with the study (cascade).
study_patients = Table(
    "study_patients",
    metadata,
    Column("study_id", ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True),
    Column("partition_id", ForeignKey("partitions.id"), nullable=False),
    Column("patient_id", ForeignKey("patients.id"), nullable=False),
    Column("study_date", TS),
    Column("linked_at", TS, nullable=False),
    Index(None, "patient_id"),
)

#: Where background followers of the index have got to (``change_feed`` sequence, FHIR
#: resource version id), by follower name.
sync_cursors = Table(
    "sync_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", TS, nullable=False),
)

# --- de-identified views ------------------------------------------------------------------

#: The secret of the lake's pseudonyms (HMAC-SHA256 key, one row, id 1): in the index so
#: that every replica of a scaled-out deployment issues the same pseudonyms.
deid_keys = Table(
    "deid_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("secret", LargeBinary, nullable=False),
    Column("created_at", TS, nullable=False),
)

#: The way back from a pseudonym the de-identified views handed out to what it replaced:
#: ``kind`` ``uid`` (a DICOM UID), ``patient`` (a DICOM Patient ID) or ``fhir:{Type}``
#: (a FHIR logical id). Rows are only added (a pseudonym never changes).
deid_pseudonyms = Table(
    "deid_pseudonyms",
    metadata,
    Column("partition_id", ForeignKey("partitions.id"), primary_key=True),
    Column("kind", String(80), primary_key=True),
    Column("pseudonym", String(64), primary_key=True),
    Column("original", String(256), nullable=False),
    Column("created_at", TS, nullable=False),
)
