"""DIMSE gateway: medlake as Verification, Storage and Query/Retrieve SCP (C-ECHO,
C-STORE, C-FIND, C-MOVE, C-GET) and as SCU (send, find, retrieve), with pynetdicom.

Framework-free like :mod:`medlake.dicomweb`: the same stores, queries and retrieves,
reached over the DICOM upper layer instead of HTTP.
"""

from medlake.dimse.ae_registry import (
    ApplicationEntity,
    CallingAeRules,
    add_ae,
    calling_ae_rules,
    get_ae,
    list_aes,
    remove_ae,
)
from medlake.dimse.scp import DimseServer
from medlake.dimse.scu import (
    Peer,
    RetrieveResult,
    SendResult,
    echo,
    file_items,
    find,
    find_studies,
    resolve_peer,
    retrieve,
    send,
    stored_items,
)

__all__ = [
    "ApplicationEntity",
    "CallingAeRules",
    "DimseServer",
    "Peer",
    "RetrieveResult",
    "SendResult",
    "add_ae",
    "calling_ae_rules",
    "echo",
    "file_items",
    "find",
    "find_studies",
    "get_ae",
    "list_aes",
    "remove_ae",
    "resolve_peer",
    "retrieve",
    "send",
    "stored_items",
]
