"""Small value rules shared by every layer: DICOM UIDs and partition names."""

from __future__ import annotations

import re

from medlake.errors import InvalidInput

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PARTITION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_PARTITION = "default"


def is_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return len(value) <= 64 and UID_PATTERN.match(value) is not None


def check_uid(value: str, name: str = "UID") -> str:
    """``value`` if it is a valid DICOM UID, else :class:`InvalidInput` naming it."""
    if not is_uid(value):
        raise InvalidInput(f"{name} {value!r} is not a valid DICOM UID")
    return value


#: Folder names beside the partitions in the lake layout; no partition may take them.
RESERVED_PARTITION_NAMES = frozenset({"healthcheck"})


def check_partition(name: str) -> str:
    """``name`` if it is a valid partition name (letters, digits, ``_``, ``-``; ≤ 64)."""
    if name.lower() in RESERVED_PARTITION_NAMES:
        raise InvalidInput(f"partition name {name!r} is reserved by the lake layout")
    if not PARTITION_PATTERN.match(name):
        raise InvalidInput(
            f"partition name {name!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    return name


__all__ = ["DEFAULT_PARTITION", "UID_PATTERN", "check_partition", "check_uid", "is_uid"]
