"""The lake layout: the single owner of every key (path) in the lake.

This is a data contract for Spark, DuckDB and azcopy users (see README)::

    medlake/{workspace}/dicom/{service}/{partition}/{Study}/{Series}/{SOP}.dcm
    medlake/{workspace}/dicom/{service}/{partition}/{Study}/{Series}/series-metadata.json.gz
    medlake/{workspace}/dicom/{service}/healthCheck/
    medlake/{workspace}/clinical/{store}/{ResourceType}/...ndjson
    medlake/{workspace}/clinical/imports/{table}/{sha256}.csv|.ndjson   (files as received)
    medlake/{workspace}/clinical/{store}/export|import/{job}/{ResourceType}-{n}.ndjson
    medlake/{workspace}/tables/{table}/
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medlake.types import check_partition, check_uid

HEALTH_CHECK_FOLDER = "healthCheck"
SERIES_METADATA_NAME = "series-metadata.json.gz"
#: Clinical "store" folder of the files taken in by the ingest pipeline.
CLINICAL_IMPORTS = "imports"
#: Folders of FHIR bulk data jobs inside a clinical store.
BULK_JOB_KINDS = ("export", "import")
_BULK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class LakeLayout:
    """Builds lake keys for one workspace and DICOM service."""

    workspace: str = "default"
    service: str = "default"

    @property
    def dicom_root(self) -> str:
        """Key prefix of this DICOM service."""
        return f"medlake/{self.workspace}/dicom/{self.service}"

    def partition_prefix(self, partition: str) -> str:
        """Folder of one partition."""
        return f"{self.dicom_root}/{check_partition(partition)}"

    def study_prefix(self, partition: str, study: str) -> str:
        """Folder of one study."""
        return f"{self.partition_prefix(partition)}/{check_uid(study, 'StudyInstanceUID')}"

    def series_prefix(self, partition: str, study: str, series: str) -> str:
        """Folder of one series."""
        return f"{self.study_prefix(partition, study)}/{check_uid(series, 'SeriesInstanceUID')}"

    def instance_key(self, partition: str, study: str, series: str, sop: str) -> str:
        """The Part-10 file of one instance, byte-identical to what was received."""
        return (
            f"{self.series_prefix(partition, study, series)}/{check_uid(sop, 'SOPInstanceUID')}.dcm"
        )

    def series_metadata_key(self, partition: str, study: str, series: str) -> str:
        """Precomputed DICOM JSON of every instance of a series (gzip)."""
        return f"{self.series_prefix(partition, study, series)}/{SERIES_METADATA_NAME}"

    @property
    def health_check_prefix(self) -> str:
        """Folder the server writes its health-check file into."""
        return f"{self.dicom_root}/{HEALTH_CHECK_FOLDER}"

    def clinical_root(self, store: str) -> str:
        """Folder of everything clinical of one store (a partition, or ``imports``)."""
        return f"medlake/{self.workspace}/clinical/{store}"

    def clinical_prefix(self, store: str, resource_type: str) -> str:
        """Folder of NDJSON files of one clinical resource type."""
        return f"{self.clinical_root(store)}/{resource_type}"

    def clinical_import_key(self, table: str, sha256: str, suffix: str) -> str:
        """A clinical file (CSV / NDJSON) exactly as it was ingested, named by its SHA-256."""
        return f"{self.clinical_prefix(CLINICAL_IMPORTS, table)}/{sha256}{suffix}"

    def bulk_job_prefix(self, store: str, kind: str, job_id: str) -> str:
        """Folder of the files of one FHIR bulk data job (``kind``: export or import)."""
        if kind not in BULK_JOB_KINDS:
            raise ValueError(f"bulk data job kind {kind!r} is not one of {BULK_JOB_KINDS}")
        if not _BULK_NAME.match(job_id):
            raise ValueError(f"bulk data job id {job_id!r} is not a valid folder name")
        return f"{self.clinical_root(check_partition(store))}/{kind}/{job_id}"

    def bulk_job_file_key(self, store: str, kind: str, job_id: str, name: str) -> str:
        """One NDJSON file of a bulk data job: ``{ResourceType}-{n}.ndjson`` of an
        $export, ``OperationOutcome-{n}.ndjson`` of its errors."""
        if not _BULK_NAME.match(name):
            raise ValueError(f"bulk data file name {name!r} is not valid")
        return f"{self.bulk_job_prefix(store, kind, job_id)}/{name}"

    def table_prefix(self, table: str) -> str:
        """Folder of one Delta table."""
        return f"medlake/{self.workspace}/tables/{table}"
