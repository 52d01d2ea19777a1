"""Looking at an archive from the outside: files in the lake and staging, index rows.

Tests use this to prove that a request left the store as it was (no partial file,
no orphan row) without going through the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from medlake.index.schema import change_feed, instance_metadata, instances, series, studies
from medlake.ingest.archive import Archive

__all__ = ["LakeInspection"]


@dataclass
class LakeInspection:
    """Read-only views of an archive's lake folder, staging folder and index."""

    archive: Archive

    @property
    def root(self) -> Path:
        """The local lake root (``{data}/lake``)."""
        return Path(self.archive.blobs.root)

    @property
    def dicom_root(self) -> Path:
        """``{lake}/medlake/default/dicom/default``: spelled out here, not asked of the
        code under test, because the layout is a contract with outside tools."""
        return self.root / "medlake" / "default" / "dicom" / "default"

    def instance_path(
        self, study: str, series_uid: str, sop: str, partition: str = "default"
    ) -> Path:
        """Where the data contract says an instance's file is."""
        return self.dicom_root / partition / study / series_uid / f"{sop}.dcm"

    def files(self) -> list[Path]:
        """Every file in the lake (hidden temporaries included), health check excluded."""
        if not self.root.exists():
            return []
        return sorted(
            p for p in self.root.rglob("*") if p.is_file() and "healthCheck" not in p.parts
        )

    def dicom_files(self) -> list[Path]:
        """Every ``.dcm`` file in the lake."""
        return [p for p in self.files() if p.suffix == ".dcm"]

    def staging_files(self) -> list[Path]:
        """Every file left in the staging folder."""
        folder = self.archive.settings.data / "staging"
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []

    def row_counts(self) -> dict[str, int]:
        """Rows per index table of the study/series/instance hierarchy and the feed."""
        with self.archive.engine.connect() as conn:
            return {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (studies, series, instances, instance_metadata, change_feed)
            }

    def assert_untouched(self) -> None:
        """No DICOM file, temporary, staging file or index row exists."""
        assert self.files() == [], f"files left in the lake: {self.files()}"
        assert self.staging_files() == [], f"files left in staging: {self.staging_files()}"
        counts = self.row_counts()
        assert all(n == 0 for n in counts.values()), f"index rows left: {counts}"
