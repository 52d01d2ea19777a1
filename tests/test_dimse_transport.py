"""The C-STORE-RSP medlake encodes itself for a successful store: byte for byte the
command pynetdicom would send, so every SCU reads it as before; anything else (a
failure, a warning, an Error Comment) still goes through pynetdicom."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from medlake.dimse._transport import store_success_command

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _response(message_id: int, sop_class: str | None, sop_instance: str | None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = 0x0000
    return rsp


def _pynetdicom_bytes(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(1, 16384)
    ((_context, value),) = pdata.presentation_data_value_list
    return bytes(value)


@pytest.mark.parametrize("message_id", [1, 300, 65535])
@pytest.mark.parametrize(
    ("sop_class", "sop_instance"),
    [
        (CT_IMAGE_STORAGE, "1.2.3"),  # odd UID lengths: NUL padding
        ("1.2.840.10008.5.1.4.1.1.4", "2.25.106633050455883069920616111739343556272"),
        (None, None),  # optional in a response (U(=)): left out
    ],
)
def test_success_response_is_the_command_pynetdicom_sends(
    message_id: int, sop_class: str | None, sop_instance: str | None
) -> None:
    rsp = _response(message_id, sop_class, sop_instance)
    command = store_success_command(rsp)
    assert command is not None
    assert b"\x03" + command == _pynetdicom_bytes(rsp)


def test_other_messages_are_left_to_pynetdicom() -> None:
    failure = _response(5, CT_IMAGE_STORAGE, "1.2.3")
    failure.Status = 0xA700
    commented = _response(6, CT_IMAGE_STORAGE, "1.2.3")
    commented.ErrorComment = "why"
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = "1.2.3"
    request.Priority = 2

    assert store_success_command(failure) is None
    assert store_success_command(commented) is None
    assert store_success_command(request) is None
