"""The archive: the lake (blob store + layout), the index engine and the settings,
opened once per process and handed to every service."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from medlake.config import Settings
from medlake.index.database import open_index
from medlake.index.writes import partition_id
from medlake.ingest.events import EventHub
from medlake.ingest.validation import RuleConfig
from medlake.security.lake_encryption import open_encrypted_lake, refuse_encrypted_lake
from medlake.storage import BlobStore, LakeLayout, open_blob_store
from medlake.types import DEFAULT_PARTITION


@dataclass
class Archive:
    """Everything a service needs to read and write the lake and its index."""

    settings: Settings
    engine: Engine
    blobs: BlobStore
    layout: LakeLayout
    #: Held while a batch is checked against the index, moved into the lake and indexed.
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Ingest events (instances stored, batches finished) for whoever subscribes.
    events: EventHub = field(default_factory=EventHub)
    #: The validation rules every received file is judged by (from the settings).
    rules: RuleConfig = field(default_factory=RuleConfig)

    @classmethod
    def open(cls, settings: Settings) -> Archive:
        """Open (and, on first use, create) the lake and the index of ``settings``,
        with its ``default`` partition."""
        settings.data.mkdir(parents=True, exist_ok=True)
        rules = RuleConfig.from_settings(settings)  # a bad rule setting fails before anything opens
        engine = open_index(settings.resolved_database_url)
        with engine.begin() as conn:
            # The default partition always exists, so searching an empty archive finds
            # nothing instead of reporting an unknown partition.
            partition_id(conn, DEFAULT_PARTITION, create=True)
        blobs = open_blob_store(
            settings.resolved_lake_url,
            storage_options=settings.storage_options,
            fsync=settings.fsync,
        )
        layout = LakeLayout(settings.workspace, settings.dicom_service)
        # Encryption wraps whichever backend was opened; a wrong or missing key file, or
        # an encrypted lake opened without encryption, fails here, before anything is served.
        try:
            if settings.encrypt_at_rest:
                blobs = open_encrypted_lake(
                    blobs, settings.resolved_encryption_key_file, settings.workspace
                )
            else:
                refuse_encrypted_lake(blobs, settings.workspace)
        except BaseException:
            engine.dispose()
            raise
        return cls(settings, engine, blobs, layout, rules=rules)

    @property
    def staging_dir(self) -> Path:
        """Local folder where uploads land before they are validated and moved into the lake."""
        path = self.settings.data / "staging"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def rejected_dir(self) -> Path:
        """Local folder where rejected files are kept aside, one subfolder per batch."""
        return self.settings.data / "rejected"

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()
