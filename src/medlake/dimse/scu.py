"""medlake as an SCU: C-ECHO, C-STORE (send), C-FIND, and retrieve with C-GET or C-MOVE.

``send`` pushes stored instances (or Part-10 files) to another AE as they are: each
instance is offered in its own transfer syntax (an uncompressed one also as the
other little-endian syntax). ``retrieve`` pulls studies from another AE into the
archive: with C-GET they come back over the same association and are stored by the
same handler as the SCP's C-STOREs (one batch per association); with C-MOVE the peer
sends them to medlake's own SCP, which must be running (``medlake serve``, ``medlake
dimse``, or the temporary one ``medlake retrieve`` starts) and be known to the peer
under ``ae_title``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext

from medlake.dicomweb.locate import StoredInstance
from medlake.dimse._transport import set_tcp_nodelay
from medlake.dimse.ae_registry import CallingAeRules, check_ae_title, get_ae
from medlake.dimse.association_batch import open_association_batch
from medlake.dimse.contexts import (
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    get_contexts,
    query_contexts,
    sending_contexts,
)
from medlake.dimse.move_get import read_for_sending
from medlake.dimse.scp import new_ae
from medlake.dimse.store import StoreContext, handle_store
from medlake.dimse.tls import client_context
from medlake.errors import InvalidInput, NetworkError, NotFound
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION

log = logging.getLogger(__name__)

_SUCCESS = 0x0000
_PENDING = frozenset({0xFF00, 0xFF01})
_WARNING = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class Peer:
    """Another DICOM AE: its title and address."""

    ae_title: str
    host: str
    port: int
    #: Reached over DICOM TLS (the AE registry's ``tls``); its certificate must name ``host``.
    tls: bool = False

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


def resolve_peer(
    archive: Archive,
    ae_title: str | None = None,
    host: str | None = None,
    port: int | None = None,
) -> Peer:
    """The peer registered as ``ae_title``, or the one given by title, host and port."""
    if host is None and port is None:
        if not ae_title:
            raise InvalidInput("name a registered AE title, or give its host, port and AE title")
        known = get_ae(archive, ae_title)
        return Peer(known.ae_title, known.host, known.port, known.tls)
    if not (ae_title and host and port):
        raise InvalidInput("an unregistered peer needs its AE title, host and port")
    return Peer(check_ae_title(ae_title, "called AE title"), host, port)


@contextlib.contextmanager
def associate(
    archive: Archive,
    peer: Peer,
    contexts: list[PresentationContext],
    *,
    roles: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
    handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
) -> Iterator[Association]:
    """An established association with ``peer`` (released at the end), or NetworkError.
    A TLS peer is reached over DICOM TLS (:func:`medlake.dimse.tls.client_context`)."""
    ae = new_ae(archive)
    tls_args = (client_context(archive.settings), peer.host) if peer.tls else None
    assoc = ae.associate(
        peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title,
        ext_neg=list(roles) or None, max_pdu=archive.settings.dimse_max_pdu,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), *handlers], tls_args=tls_args,
    )  # fmt: skip
    if not assoc.is_established:
        raise NetworkError(_why_not_established(assoc, peer))
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _why_not_established(assoc: Association, peer: Peer) -> str:
    rj = assoc.acceptor.primitive
    if assoc.is_rejected and rj is not None:
        return (
            f"{peer} rejected the association (result {rj.result}, source {rj.result_source}, "
            f"reason {rj.diagnostic}: {rj.reason_str})"
        )
    # pynetdicom reports a refused connection (and a failed TLS handshake) as an abort, too.
    how = ", or the TLS handshake failed (see the log)" if peer.tls else ""
    return f"cannot connect to {peer}{how}, or it aborted the association request"


def echo(archive: Archive, peer: Peer) -> int:
    """C-ECHO ``peer``; its status (0x0000 = success)."""
    with associate(archive, peer, query_contexts([VERIFICATION])) as assoc:
        rsp = assoc.send_c_echo()
    return _status_of(rsp, peer, "C-ECHO")


def _status_of(rsp: Dataset | None, peer: Peer, what: str) -> int:
    if rsp is None or "Status" not in rsp:
        raise NetworkError(f"{what} to {peer}: no response (association aborted or timed out)")
    return int(rsp.Status)


# --- send (C-STORE) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """One instance to send: its UIDs, stored transfer syntax and how to read it."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    load: Callable[[], Dataset]
    #: Where it comes from (a path, or "archive"), for messages.
    origin: str = "archive"


@dataclass
class SendResult:
    """What a send did: instances accepted by the peer, warnings, failures and why."""

    sent: int = 0
    warnings: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every instance was accepted."""
        return not self.failed


def stored_items(archive: Archive, found: Iterable[StoredInstance]) -> list[Outgoing]:
    """Stored instances (from :func:`medlake.dicomweb.retrieve.retrieve`) to send."""
    return [
        Outgoing(
            s.sop_uid,
            s.sop_class_uid or "",
            s.transfer_syntax_uid,
            functools.partial(read_for_sending, archive, s),
        )
        for s in found
    ]


def file_items(paths: Iterable[Path]) -> tuple[list[Outgoing], list[tuple[str, str]]]:
    """Part-10 files to send, and the files that are not (path, reason)."""
    items, unusable = [], []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            sop_uid, sop_class = str(header.SOPInstanceUID), str(header.SOPClassUID)
            syntax = str(header.file_meta.TransferSyntaxUID)
        except (OSError, pydicom.errors.InvalidDicomError, AttributeError, ValueError) as exc:
            unusable.append((str(path), f"not a DICOM Part 10 file: {exc}"))
            continue
        items.append(
            Outgoing(
                sop_uid, sop_class, syntax, functools.partial(pydicom.dcmread, path), str(path)
            )
        )
    return items, unusable


def send(
    archive: Archive,
    peer: Peer,
    items: Sequence[Outgoing],
    progress: Callable[[Outgoing, int], None] | None = None,
) -> SendResult:
    """C-STORE ``items`` to ``peer``: as few associations as the 128-context limit allows.
    ``progress(item, status)`` is called after each (status -1: not sent)."""
    result = SendResult()
    pending = list(items)
    while pending:
        contexts, left = sending_contexts((i.sop_class_uid, i.transfer_syntax_uid) for i in pending)
        overflow = set(left)
        now = [i for i in pending if (i.sop_class_uid, i.transfer_syntax_uid) not in overflow]
        pending = [i for i in pending if (i.sop_class_uid, i.transfer_syntax_uid) in overflow]
        with associate(archive, peer, contexts) as assoc:
            for item in now:
                code = _store_one(assoc, item, result, peer)
                if progress is not None:
                    progress(item, code)
    return result


def _store_one(assoc: Association, item: Outgoing, result: SendResult, peer: Peer) -> int:
    if not assoc.is_established:
        result.failed.append((item.sop_uid, "the association ended before it was sent"))
        return -1
    try:
        rsp = assoc.send_c_store(item.load())
    except (ValueError, AttributeError, RuntimeError, OSError) as exc:
        result.failed.append((item.sop_uid, f"not sent: {exc}"))
        return -1
    if rsp is None or "Status" not in rsp:
        result.failed.append((item.sop_uid, f"no response from {peer}"))
        return -1
    code = int(rsp.Status)
    if code == _SUCCESS:
        result.sent += 1
    elif code in _WARNING:
        result.sent += 1
        result.warnings += 1
    else:
        comment = str(rsp.get("ErrorComment", "") or "")
        result.failed.append((item.sop_uid, f"status 0x{code:04X} {comment}".strip()))
    return code


# --- find, retrieve ---------------------------------------------------------------------------


def find(archive: Archive, peer: Peer, identifier: Dataset) -> list[Dataset]:
    """C-FIND (Study Root) ``identifier`` at ``peer``: the matches."""
    model = STUDY_ROOT_FIND
    matches: list[Dataset] = []
    with associate(archive, peer, query_contexts([model])) as assoc:
        for rsp, found in assoc.send_c_find(identifier, model):
            code = _status_of(rsp, peer, "C-FIND")
            if code in _PENDING and found is not None:
                matches.append(found)
            elif code not in _PENDING and code != _SUCCESS:
                comment = str(rsp.get("ErrorComment", "") or "")
                raise NetworkError(f"C-FIND at {peer} failed: status 0x{code:04X} {comment}")
    return matches


def find_studies(archive: Archive, peer: Peer, keys: dict[str, str]) -> list[str]:
    """StudyInstanceUIDs of the studies at ``peer`` matching ``keys`` (keyword: value)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    for keyword, value in keys.items():
        if pydicom.datadict.tag_for_keyword(keyword) is None:
            raise InvalidInput(f"{keyword!r} is not a DICOM keyword")
        setattr(identifier, keyword, value)
    found = find(archive, peer, identifier)
    return [str(ds.StudyInstanceUID) for ds in found if ds.get("StudyInstanceUID")]


@dataclass
class RetrieveResult:
    """Sub-operation counts of a retrieve, summed over its studies."""

    studies: int = 0
    completed: int = 0
    warnings: int = 0
    failed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every sub-operation completed."""
        return not self.failed and not self.problems


def retrieve(
    archive: Archive,
    peer: Peer,
    study_uids: Sequence[str],
    *,
    method: str = "get",
    partition: str | None = None,
    move_destination: str | None = None,
) -> RetrieveResult:
    """Pull studies from ``peer``: C-GET stores them into ``partition`` (default: the
    peer's registered partition); C-MOVE asks the peer to send them to
    ``move_destination`` (default: our ``ae_title``)."""
    if method not in ("get", "move"):
        raise InvalidInput(f"retrieve method must be get or move, not {method!r}")
    result = RetrieveResult()
    if method == "move":
        destination = check_ae_title(move_destination or archive.settings.ae_title)
        model = STUDY_ROOT_MOVE
        with associate(archive, peer, query_contexts([model])) as assoc:
            for uid in study_uids:
                responses = assoc.send_c_move(_study(uid), destination, model)
                _tally(responses, uid, peer, result)
        return result
    model = STUDY_ROOT_GET
    contexts, roles = get_contexts(model)
    into = partition or _partition_of(archive, peer)
    source = f"dimse-get://{peer} -> {archive.settings.ae_title}"
    context = StoreContext(
        CallingAeRules(peer.ae_title, into, True, True, True),
        open_association_batch(archive, into, source),
    )

    def on_store(event: evt.Event) -> Dataset:
        return handle_store(archive, context, event)

    try:
        with associate(
            archive, peer, contexts, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)]
        ) as assoc:
            for uid in study_uids:
                _tally(assoc.send_c_get(_study(uid), model), uid, peer, result)
    finally:
        context.batch.close("released")
    return result


def _partition_of(archive: Archive, peer: Peer) -> str:
    """Where instances from ``peer`` go: its registered partition, else the default."""
    try:
        return get_ae(archive, peer.ae_title).effective_partition
    except NotFound:
        return DEFAULT_PARTITION


def _study(uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = uid
    return identifier


def _tally(
    responses: Iterable[tuple[Dataset, Dataset | None]],
    uid: str,
    peer: Peer,
    result: RetrieveResult,
) -> None:
    """Add the final response's sub-operation counts of one study's retrieve."""
    result.studies += 1
    final: Dataset | None = None
    for rsp, _identifier in responses:
        if rsp is None or "Status" not in rsp:
            result.problems.append(f"study {uid}: no response from {peer}")
            return
        final = rsp
    if final is None:
        result.problems.append(f"study {uid}: no response from {peer}")
        return
    result.completed += int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    result.warnings += int(final.get("NumberOfWarningSuboperations", 0) or 0)
    result.failed += int(final.get("NumberOfFailedSuboperations", 0) or 0)
    code = int(final.Status)
    if code not in (_SUCCESS, *_WARNING):
        comment = str(final.get("ErrorComment", "") or "")
        result.problems.append(f"study {uid}: status 0x{code:04X} {comment}".strip())


__all__ = [
    "Outgoing",
    "Peer",
    "RetrieveResult",
    "SendResult",
    "associate",
    "echo",
    "file_items",
    "find",
    "find_studies",
    "resolve_peer",
    "retrieve",
    "send",
    "stored_items",
]
