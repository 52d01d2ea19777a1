"""Lake health check: a small file written under ``healthCheck/`` at an interval.

A lake that cannot be written (permissions removed, disk full, credentials
expired) is found out within one interval, not at the next upload.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
from dataclasses import dataclass

from medlake.errors import MedlakeError
from medlake.storage.base import BlobStore
from medlake.storage.layout import LakeLayout


@dataclass
class HealthStatus:
    """Result of the last health-check write."""

    ok: bool
    detail: str
    checked_at: dt.datetime | None


class LakeHealthCheck:
    """Writes and reads back ``healthCheck/{host}-{pid}.txt`` every ``interval`` seconds."""

    def __init__(self, blobs: BlobStore, layout: LakeLayout, interval: float) -> None:
        self._blobs = blobs
        self._key = f"{layout.health_check_prefix}/{socket.gethostname()}-{os.getpid()}.txt"
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = HealthStatus(False, "not checked yet", None)

    def check_once(self) -> HealthStatus:
        """Write the file, read it back, record and return the outcome."""
        now = dt.datetime.now(dt.UTC)
        payload = now.isoformat().encode()
        try:
            self._blobs.put_bytes(self._key, payload)
            if self._blobs.read_bytes(self._key) != payload:
                raise OSError("the health-check file read back differs from what was written")
            self.status = HealthStatus(True, f"wrote {self._key}", now)
        except (MedlakeError, OSError) as exc:
            self.status = HealthStatus(
                False, f"cannot write {self._key} in {self._blobs.root}: {exc}", now
            )
        return self.status

    def start(self) -> None:
        """Check now, then every interval in a daemon thread."""
        self.check_once()
        self._thread = threading.Thread(target=self._run, name="medlake-health", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check_once()

    def stop(self) -> None:
        """Stop the background checks and remove the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(MedlakeError):
            self._blobs.delete(self._key)
