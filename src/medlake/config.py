"""Settings: one model, read from arguments, ``MEDLAKE_*`` environment variables
and ``medlake.toml`` in the data folder, in that order of precedence.

No other module reads ``os.environ``; everything takes a :class:`Settings`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOML_NAME = "medlake.toml"


class Settings(BaseSettings):
    """Every option medlake has, with its default. See docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="MEDLAKE_", extra="forbid")

    data: Path = Field(
        default=Path("medlake-data"),
        description="Folder holding the local lake and the SQLite index (and medlake.toml).",
    )
    host: str = Field(default="127.0.0.1", description="Interface the HTTP server listens on.")
    http_port: int = Field(default=8042, description="HTTP port: /dicomweb, /changefeed, /healthz.")
    dimse_port: int = Field(
        default=11112,
        description="DICOM (DIMSE) port of `medlake serve` and `medlake dimse`; 0 = `serve` "
        "runs without DIMSE.",
    )
    ae_title: str = Field(
        default="MEDLAKE",
        description="Our DICOM Application Entity title: the called AE title of the DIMSE "
        "port, and the calling AE title of `medlake send` / `retrieve` and C-MOVE.",
    )
    dimse_host: str | None = Field(
        default=None,
        description="Interface the DIMSE port listens on; default: `host`.",
    )
    dimse_require_known_ae: bool = Field(
        default=False,
        description="Reject associations from calling AE titles that are not registered "
        "(`medlake ae add`, /application-entities). When false, unregistered AEs may store "
        "into and query the default partition; registered AEs always get their own "
        "partition and permissions.",
    )
    dimse_tls_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="DICOM TLS port (PS3.15 B.1 / BCP 195; 2762 is DICOM's registered one) "
        "of `medlake serve` and `medlake dimse`, beside dimse_port, with tls_cert_file and "
        "tls_key_file; 0 = no TLS port.",
    )
    dimse_tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA certificate(s) that DIMSE peers' certificates must chain to: "
        "set, the TLS port requires a client certificate (mutual TLS) and medlake as an "
        "SCU verifies peers against it; unset, any client may connect over TLS and the "
        "SCU verifies peers against the system's CAs.",
    )
    dimse_max_pdu: int = Field(
        default=65536,
        description="Largest PDU medlake accepts on an association, in bytes "
        "(0 = no limit); larger PDUs mean fewer, cheaper network reads.",
    )
    dimse_max_associations: int = Field(
        default=16, description="Most DIMSE associations served at the same time."
    )
    dimse_timeout: float = Field(
        default=60.0,
        description="Seconds a DIMSE association may stay silent, and the connect / "
        "negotiation / response timeout of medlake as an SCU.",
    )
    mllp_port: int = Field(
        default=2575,
        description="HL7 v2 MLLP port of `medlake serve` and `medlake mllp`; 0 = no plain "
        "MLLP port (`serve` then runs without the MLLP listener, unless mllp_tls_port is "
        "set: TLS only).",
    )
    mllp_host: str | None = Field(
        default=None, description="Interface the MLLP port listens on; default: `host`."
    )
    mllp_tls_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="HL7 v2 MLLP over TLS port (BCP 195 profile, as DICOM TLS) of `medlake "
        "serve` and `medlake mllp`, beside mllp_port, with tls_cert_file and tls_key_file; "
        "0 = no TLS port (with mllp_port = 0 as well: MLLP over TLS only).",
    )
    mllp_tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA certificate(s) that MLLP clients' certificates must chain to: "
        "set, the MLLP TLS port requires a client certificate (mutual TLS), whose subject "
        "a registered HL7 sender may be tied to (`medlake hl7 senders add --tls-subject`); "
        "unset, any client may connect over TLS.",
    )
    mllp_max_message_bytes: int = Field(
        default=1_048_576,
        description="Largest HL7 v2 message accepted over MLLP, in bytes (between the start "
        "and end block); a larger one is read to its end, recorded (its first 64 KiB) as "
        "rejected and answered with AR.",
    )
    mllp_idle_timeout: float = Field(
        default=600.0,
        description="Seconds an MLLP connection may stay silent before medlake closes it "
        "(0 = never); an unterminated message is then recorded as a framing error.",
    )
    hl7_partition: str = Field(
        default="default",
        description="Partition that HL7 v2 messages received over MLLP, and the FHIR "
        "resources mapped from them, belong to, when their sender is not registered "
        "(authentication off); a registered sender's (`medlake hl7 senders add`) go into "
        "its own partition.",
    )
    hl7_mapping: bool = Field(
        default=True,
        description="Map stored HL7 v2 messages to FHIR resources in a background worker of "
        "`medlake serve` / `medlake mllp` (off: messages are stored and acknowledged only).",
    )
    hl7_mapping_share: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Largest share of the time the HL7 v2 mapper works while messages are "
        "arriving over MLLP, so that acknowledgements keep their pace; it maps at full "
        "speed once the feed has paused for a second (1.0 = never give way).",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the index; default sqlite:///{data}/index.sqlite. "
        "PostgreSQL: postgresql+psycopg://user@host/db.",
    )
    lake_url: str | None = Field(
        default=None,
        description="Root of the lake: a local folder (default {data}/lake) or an fsspec URL "
        "(s3://bucket/prefix, abfs://container/prefix, memory://name).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for lake_url (JSON in MEDLAKE_STORAGE_OPTIONS).",
    )
    workspace: str = Field(default="default", description="Workspace segment of the lake layout.")
    dicom_service: str = Field(
        default="default", description="DICOM service segment of the lake layout."
    )
    fsync: bool = Field(
        default=True,
        description="fsync stored files before their index rows commit "
        "(durable against power loss).",
    )
    health_check_interval: float = Field(
        default=30.0, description="Seconds between writes of the lake health-check file."
    )
    parse_workers: int = Field(
        default=1,
        description="Worker processes that parse headers and hash received files while "
        "the server goes on receiving; 0 = parse in the server process.",
    )
    metadata_refresh_quiet_seconds: float = Field(
        default=10.0,
        description="The background refresher rebuilds a series' metadata file once the series "
        "has received nothing for this many seconds (once per series, not per instance).",
    )
    max_upload_bytes: int = Field(
        default=0, description="Largest accepted STOW-RS request body in bytes; 0 = no limit."
    )
    cool_after_days: int = Field(
        default=30,
        description="Lifecycle: blobs not read for this many days move to the cool tier.",
    )
    cold_after_days: int = Field(
        default=90,
        description="Lifecycle: blobs not read for this many days move to the cold tier.",
    )
    max_extended_query_tags: int = Field(
        default=128,
        description="Most extended query tags the archive may define "
        "(they apply to every partition).",
    )
    ingest_workers: int = Field(
        default=0,
        description="Worker processes of `medlake ingest` / `watch` that copy, hash and parse "
        "files; 0 = one per CPU core (`--workers` overrides it).",
    )
    ingest_chunk_files: int = Field(
        default=200,
        description="Files claimed from the work queue and committed to the index in one "
        "transaction by `medlake ingest` / `watch`.",
    )
    ingest_link_files: bool = Field(
        default=False,
        description="Hard-link local source files into the lake instead of copying them, when "
        "they are on the lake's filesystem (faster; the lake file then shares its bytes "
        "with the source, so rewriting the source in place changes the lake).",
    )
    ingest_direct_io: bool = Field(
        default=True,
        description="Copy local source files of 256 KiB or more into the lake with direct "
        "I/O (O_DIRECT: around the page cache, which the copies would otherwise fill) where "
        "the filesystem allows; smaller files, and all files when off, are copied through "
        "the page cache. Sources on filesystems that can clone files (XFS, btrfs) are cloned "
        "either way.",
    )
    ingest_rules: dict[str, Literal["ignore", "warn", "reject"]] = Field(
        default_factory=dict,
        description="Severity of each ingest validation rule, over the defaults: file_size, "
        "dicom_part10, required_uids (always reject), patient_id (warn), transfer_syntax, "
        "sop_class, clinical_schema (reject). TOML table or JSON.",
    )
    ingest_allowed_sop_classes: list[str] = Field(
        default_factory=list,
        description="SOP Class UIDs the sop_class rule lets in; empty = every SOP Class.",
    )
    ingest_transfer_syntaxes: list[str] = Field(
        default_factory=list,
        description="Transfer Syntax UIDs the transfer_syntax rule lets in; empty = every "
        "transfer syntax pydicom knows (the standard ones).",
    )
    ingest_pause_rejection_rate: float = Field(
        default=0.5,
        description="A bulk or drop-zone batch pauses when more than this share of its files "
        "was rejected (since it started or was last resumed); 1.0 = never pause.",
    )
    ingest_pause_min_files: int = Field(
        default=50,
        description="Files a batch must have seen (since it started or was resumed) before "
        "its rejection rate can pause it.",
    )
    ingest_keep_rejected: bool = Field(
        default=True,
        description="Keep a copy of every rejected file in {data}/rejected/{batch}/ "
        "(STOW-RS and C-STORE too); rejected files are never deleted by medlake.",
    )
    ingest_claim_timeout: float = Field(
        default=900.0,
        description="Seconds after which a work-queue item claimed by a worker that has not "
        "finished it may be claimed again (a worker on this host that died is noticed "
        "at once).",
    )
    ingest_source_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for fsspec ingest sources and drop zones "
        "(s3://bucket/prefix); JSON in MEDLAKE_INGEST_SOURCE_OPTIONS.",
    )
    dropzone: str | None = Field(
        default=None,
        description="Folder or fsspec URL that `medlake serve` watches: files landing there "
        "are ingested (as `medlake watch` does).",
    )
    dropzone_partition: str = Field(
        default="default", description="Partition the drop zone's DICOM files are stored into."
    )
    dropzone_after: Literal["keep", "move", "delete"] = Field(
        default="move",
        description="What happens to a drop-zone file once ingested: move it to processed/ "
        "or rejected/ inside the drop zone, keep it in place, or delete it (rejected files "
        "are still copied to {data}/rejected/).",
    )
    dropzone_interval: float = Field(
        default=2.0,
        description="Seconds between scans of the drop zone; a file is taken once its size "
        "and modification time did not change between two scans.",
    )
    dropzone_batch_quiet_seconds: float = Field(
        default=10.0,
        description="A drop-zone batch is closed (reconciled, cleaned up) once no file has "
        "landed for this many seconds; the next file opens a new batch.",
    )
    clinical_patient_columns: list[str] = Field(
        default_factory=lambda: ["patient_id", "PatientID", "patient", "mrn", "subject_id"],
        description="CSV columns that hold the patient identifier linking clinical rows to "
        "imaging (the first one present is used).",
    )
    clinical_required_columns: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Columns (CSV) or fields (NDJSON) each clinical table must have, by table "
        "name (CSV: the file name up to its first dot; NDJSON: the resourceType).",
    )
    fhir_import_root: Path | None = Field(
        default=None,
        description="Folder whose files FHIR `$import` may read through `file://` URLs "
        "(anything outside it is refused); unset = `file://` inputs are refused and only "
        "files in the lake can be imported over HTTP.",
    )
    fhir_import_chunk: int = Field(
        default=1000,
        ge=1,
        description="Resources stored per database transaction by FHIR `$import`, "
        "`medlake ingest --fhir` and `--mapping` (each chunk commits its resources, its "
        "error rows and the job's resume point together).",
    )
    fhir_export_file_resources: int = Field(
        default=100_000,
        ge=1,
        description="Most resources in one `$export` output file; a type with more is "
        "split into `{ResourceType}-1.ndjson`, `-2`, ...",
    )
    fhir_bulk_job_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Seconds without progress after which a running `$export` / `$import` "
        "job whose process is on another host is taken over (and resumed) by another "
        "server; a job whose process on this host is gone is resumed at once.",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Root URL clients reach medlake at (behind a proxy: its URL), used in "
        "ImagingStudy endpoints and cohort results' DICOMweb URLs; default "
        "http://{host}:{http_port}.",
    )
    patient_id_issuers: dict[str, str] = Field(
        default_factory=dict,
        description="DICOM IssuerOfPatientID -> FHIR identifier system (URI) of the patient "
        'identifiers it issues, e.g. {"HOSP_A": "http://hospital-a.example/mrn"}; an issuer '
        "not listed becomes `urn:medlake:{partition}:issuer:{IssuerOfPatientID}`. JSON in "
        "MEDLAKE_PATIENT_ID_ISSUERS.",
    )
    patient_id_default_system: str = Field(
        default="urn:medlake:{partition}:patient-id",
        description="FHIR identifier system of a DICOM PatientID without IssuerOfPatientID "
        "(`{partition}` is replaced by the partition); set it to your MRN system when the "
        "modalities send bare MRNs.",
    )
    imaging_study_sync: bool = Field(
        default=True,
        description="Keep one FHIR ImagingStudy per stored DICOM study (and the study's "
        "patient link) up to date in a background worker of `medlake serve`; "
        "`medlake fhir sync-imaging` catches up on demand.",
    )
    imaging_study_quiet_seconds: float = Field(
        default=2.0,
        ge=0,
        description="A study's ImagingStudy is (re)written once nothing was stored into or "
        "deleted from the study for this many seconds (one write per burst, not per "
        "instance); while other studies are still being stored, once nothing was stored "
        "anywhere for this long, or after 30 s.",
    )
    imaging_study_max_instances: int = Field(
        default=1000,
        ge=0,
        description="Most instances listed in one ImagingStudy (series[].instance); the "
        "counts stay exact, larger studies list the first ones of each series.",
    )
    auth: bool = Field(
        default=True,
        description="Authenticate every HTTP request (medlake API token or OIDC bearer JWT) "
        "and authorize it by role and partition; false needs insecure_no_auth = true too.",
    )
    insecure_no_auth: bool = Field(
        default=False,
        description="Serve without authentication, authorization or audit: every request "
        "acts as an admin (local demos only; `medlake serve --insecure-no-auth`).",
    )
    oidc_issuer: str | None = Field(
        default=None,
        description="Issuer (`iss`) of the OIDC / OAuth2 bearer JWTs medlake accepts; "
        "unset = only medlake API tokens.",
    )
    oidc_audience: str | None = Field(
        default=None,
        description="Audience (`aud`) those JWTs must carry; required with oidc_issuer.",
    )
    oidc_jwks_url: str | None = Field(
        default=None,
        description="URL of the issuer's JSON Web Key Set; default: `jwks_uri` of "
        "{oidc_issuer}/.well-known/openid-configuration.",
    )
    oidc_roles_claim: str = Field(
        default="medlake_roles",
        description="Claim (dotted path, e.g. realm_access.roles) holding a JWT's roles: "
        "ROLE or ROLE@PARTITION strings, or an object of partition -> roles.",
    )
    clock_skew_seconds: float = Field(
        default=60.0,
        description="Leeway in seconds when checking a JWT's exp, nbf and iat.",
    )
    encrypt_at_rest: bool = Field(
        default=False,
        description="Envelope-encrypt lake blobs (AES-256-GCM per blob, data keys wrapped by "
        "the key-encryption key of encryption_key_file).",
    )
    encryption_key_file: Path | None = Field(
        default=None,
        description="Local key file of the key-encryption keys (JSON, mode 0600); default "
        "{data}/keys/kek.json.",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate (chain) of the HTTP server; with tls_key_file, "
        "`medlake serve` speaks HTTPS.",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    log_level: str = Field(default="INFO", description="Logging level of the server and CLI.")
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines of `medlake serve`: `text` (one readable line, for a terminal) "
        "or `json` (one JSON object per line with timestamp, level, logger, message and "
        "request_id, for log collectors).",
    )
    metrics_public: bool = Field(
        default=False,
        description="Let anyone scrape /metrics without a token (e.g. a Prometheus on a "
        "private network); by default only admin and auditor tokens may. The metrics hold "
        "counts per route template and partition, never UIDs or patient data.",
    )
    readiness_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Seconds /readyz waits for the index database to answer `SELECT 1` "
        "before it reports the database as failing (503).",
    )
    http_max_header_bytes: int = Field(
        default=65_536,
        ge=1024,
        description="Largest request line, and largest sum of request header lines, the "
        "HTTP server accepts, in bytes; larger ones are answered 414 / 431 and the "
        "connection is closed.",
    )
    ohif_dist: Path | None = Field(
        default=None,
        description="Folder of the prebuilt OHIF viewer (npm @ohif/app's dist/), served at "
        "/ohif/; default {repo or cwd}/.cache/ohif/dist when present "
        "(scripts/install-ohif.sh puts it there).",
    )

    @model_validator(mode="after")
    def _auth_off_is_explicit(self) -> Settings:
        # Turning authentication off serves PHI to anyone: a stray auth = false alone
        # must not do it.
        if not self.auth and not self.insecure_no_auth:
            raise ValueError("auth = false needs insecure_no_auth = true as well")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self

    @model_validator(mode="after")
    def _dimse_tls_has_a_certificate(self) -> Settings:
        if self.dimse_tls_port and self.tls_cert_file is None:
            raise ValueError("dimse_tls_port needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _mllp_tls_has_a_certificate(self) -> Settings:
        if self.mllp_tls_port and self.tls_cert_file is None:
            raise ValueError("mllp_tls_port needs tls_cert_file and tls_key_file")
        return self

    @property
    def auth_enabled(self) -> bool:
        """Whether requests are authenticated, authorized and audited."""
        return self.auth and not self.insecure_no_auth

    @property
    def resolved_encryption_key_file(self) -> Path:
        """The KEK file, defaulting to ``{data}/keys/kek.json``."""
        return self.encryption_key_file or self.data / "keys" / "kek.json"

    @property
    def resolved_public_base_url(self) -> str:
        """The root URL clients reach medlake at, without a trailing slash."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        scheme = "https" if self.tls_cert_file else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    @property
    def resolved_database_url(self) -> str:
        """The index URL, with the SQLite default placed inside ``data``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data / 'index.sqlite').resolve()}"

    @property
    def resolved_lake_url(self) -> str:
        """The lake root, defaulting to ``{data}/lake``."""
        if self.lake_url:
            return self.lake_url
        return str((self.data / "lake").resolve())


def load_settings(**overrides: Any) -> Settings:
    """Build settings from ``overrides`` (e.g. CLI options), the environment and
    ``{data}/medlake.toml``; values that are ``None`` in ``overrides`` are ignored."""
    given = {k: v for k, v in overrides.items() if v is not None}
    first = Settings(**given)
    toml_path = first.data / TOML_NAME
    if not toml_path.is_file():
        return first
    with toml_path.open("rb") as fh:
        from_file = tomllib.load(fh)
    # Fields set by arguments or the environment win over the file.
    explicit = {name: getattr(first, name) for name in first.model_fields_set}
    return Settings(**{**from_file, **explicit})


__all__ = ["TOML_NAME", "Settings", "load_settings"]
