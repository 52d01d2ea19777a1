"""HL7 v2 over MLLP: receive, store before acknowledging, map to FHIR in the background.

- :class:`MllpListener` — the TCP listener (``medlake serve`` / ``medlake mllp``).
- :class:`Hl7Mapper` — the background worker mapping stored messages to FHIR R4.
- :func:`map_message` — a parsed message as a FHIR transaction Bundle (pure).
- :func:`list_messages` / :func:`get_message` — the stored messages (``hl7_messages``).
- :class:`Hl7Sender`, :func:`add_sender` … — who may send (``hl7_senders``).
"""

from medlake.clinical.hl7.errors import ErrorCode, Hl7Issue, MllpError
from medlake.clinical.hl7.framing import MllpDecoder, frame
from medlake.clinical.hl7.listener import MllpListener
from medlake.clinical.hl7.mapper import Hl7Mapper, map_stored_message
from medlake.clinical.hl7.mapping import MappingPlan, PatientMerge, map_message
from medlake.clinical.hl7.message import ParsedMessage, decode_message
from medlake.clinical.hl7.records import (
    STATUSES,
    MessageQuery,
    MessageRow,
    get_message,
    list_messages,
)
from medlake.clinical.hl7.senders import (
    Hl7Sender,
    PeerIdentity,
    SenderDirectory,
    add_sender,
    list_senders,
    remove_sender,
)
from medlake.clinical.hl7.validation import validate

__all__ = [
    "STATUSES",
    "ErrorCode",
    "Hl7Issue",
    "Hl7Mapper",
    "Hl7Sender",
    "MappingPlan",
    "MessageQuery",
    "MessageRow",
    "MllpDecoder",
    "MllpError",
    "MllpListener",
    "ParsedMessage",
    "PatientMerge",
    "PeerIdentity",
    "SenderDirectory",
    "add_sender",
    "decode_message",
    "frame",
    "get_message",
    "list_messages",
    "list_senders",
    "map_message",
    "map_stored_message",
    "remove_sender",
    "validate",
]
