"""medlake: an open medical-data lakehouse (DICOM archive, clinical data, analytics)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medlake")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
