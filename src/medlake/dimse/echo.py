"""C-ECHO (Verification SOP Class, PS3.4 Annex A): answered with Success.

Reaching the handler already means the association was accepted, which is what a
peer checks with an echo (the calling-AE policy ran at association time).
"""

from __future__ import annotations

from typing import Any

SUCCESS = 0x0000


def handle_echo(_event: Any) -> int:
    """The EVT_C_ECHO handler."""
    return SUCCESS


__all__ = ["handle_echo"]
