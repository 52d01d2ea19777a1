"""medlake: an open medical-data lakehouse (DICOM archive, clinical data, analytics)."""

from __future__ import annotations

import functools


@functools.cache
def _installed_version() -> str:
    # importlib.metadata costs 35 ms to import: only paid by what asks for the version
    # (every ``medlake`` command and worker process imports this package).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medlake")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _installed_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__"]
