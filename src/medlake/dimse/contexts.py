"""Presentation contexts: what medlake accepts as an SCP and proposes as an SCU.

medlake stores and sends instances in the transfer syntax they arrived in (it does
not transcode, as over DICOMweb), so it accepts every standard transfer syntax and,
when sending, proposes each instance's own transfer syntax.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts, build_context, build_role
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext

#: SOP Classes of the services (PS3.4 Annex A and C.6).
VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MODELS = frozenset({STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET})

#: Every standard storage SOP Class pynetdicom knows (PS3.4 Annex B and friends).
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)
#: Transfer syntaxes accepted for storage: every current standard one (stored as received),
#: uncompressed first, because the acceptor's order decides when a proposal offers several.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    *(
        str(ts)
        for ts in AllTransferSyntaxes
        if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    ),
)
#: The one transfer syntax every DICOM AE supports (PS3.5 10.1); used for C-FIND etc.
_QUERY_SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

FIND_MODELS = (PATIENT_ROOT_FIND, STUDY_ROOT_FIND)
MOVE_MODELS = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
GET_MODELS = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
#: A proposal holds at most 128 presentation contexts (PS3.8 9.3.2.2, odd IDs 1-255).
MAX_CONTEXTS = 128


class _SharedUidContext(PresentationContext):
    """A presentation context whose deep copy shares its UIDs (immutable strings).

    pynetdicom deep-copies the server's supported contexts for every association;
    a plain deep copy of 170 storage contexts re-creates (and re-validates) some 6,600
    transfer syntax UIDs, about 45 ms before each association can even be answered.
    """

    def __deepcopy__(self, memo: dict[int, object]) -> _SharedUidContext:
        copy = self.__class__.__new__(self.__class__)
        copy.__dict__.update(
            {k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()}
        )
        return copy


def _shared(context: PresentationContext) -> PresentationContext:
    context.__class__ = _SharedUidContext
    return context


def scp_contexts() -> list[PresentationContext]:
    """What the SCP accepts: Verification, storage, and Query/Retrieve (Patient Root and
    Study Root; FIND, MOVE, GET). A C-GET requestor's proposal to be the storage SCP on
    a storage context (role selection) is accepted, so C-GET can send to it.

    Give them to ``make_server(contexts=...)``: the ``supported_contexts`` setter of
    pynetdicom's AE would drop the roles (and the cheap copies)."""
    contexts = [build_context(VERIFICATION, _QUERY_SYNTAXES)]
    for sop_class in STORAGE_SOP_CLASSES:
        context = build_context(sop_class, list[str | UID](ACCEPTED_TRANSFER_SYNTAXES))
        # (scu_role, scp_role) of the acceptor, as pynetdicom's qrscp sets them: a plain
        # proposal keeps the default roles, an SCP-role proposal inverts them.
        context.scu_role, context.scp_role = False, True
        contexts.append(context)
    for model in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS):
        contexts.append(build_context(model, _QUERY_SYNTAXES))
    return [_shared(context) for context in contexts]


def prefer_proposed_syntaxes(
    supported: Sequence[PresentationContext], proposed: Sequence[PresentationContext]
) -> list[PresentationContext]:
    """``supported`` with each abstract syntax's transfer syntaxes in the order the
    requestor ``proposed`` them (then the rest).

    pynetdicom accepts the first transfer syntax in the *acceptor's* order. medlake
    stores what it receives, so the requestor's own first choice (its native syntax,
    compressed or big endian) is the better one: nothing gets converted on the way.
    """
    order: dict[str, list[str]] = {}
    for context in proposed:
        wanted = order.setdefault(str(context.abstract_syntax), [])
        wanted.extend(str(ts) for ts in context.transfer_syntax if str(ts) not in wanted)
    result = []
    for context in supported:
        first = order.get(str(context.abstract_syntax), [])
        ours = [str(ts) for ts in context.transfer_syntax]
        first = [ts for ts in first if ts in ours]
        if not first:
            result.append(context)
            continue
        syntaxes: list[str | UID] = [*first, *(ts for ts in ours if ts not in first)]
        reordered = build_context(str(context.abstract_syntax), syntaxes)
        reordered.scu_role, reordered.scp_role = context.scu_role, context.scp_role
        result.append(reordered)
    return result


def sending_contexts(
    pairs: Iterable[tuple[str, str]],
) -> tuple[list[PresentationContext], list[tuple[str, str]]]:
    """Contexts to send instances of these (SOP Class, stored transfer syntax) pairs,
    one context per pair, and the pairs that did not fit in one association.

    An uncompressed syntax also offers the other uncompressed little-endian one, so a
    peer that takes only Implicit VR gets the instance converted by pynetdicom.
    """
    contexts: list[PresentationContext] = []
    left: list[tuple[str, str]] = []
    for sop_class, syntax in sorted(set(pairs)):
        if len(contexts) >= MAX_CONTEXTS:
            left.append((sop_class, syntax))
            continue
        syntaxes: list[str | UID] = [syntax]
        if UID(syntax) in _UNCOMPRESSED:
            syntaxes += [ts for ts in _UNCOMPRESSED if ts != syntax]
        contexts.append(build_context(sop_class, syntaxes))
    return contexts, left


def query_contexts(models: Sequence[str]) -> list[PresentationContext]:
    """Contexts for C-FIND / C-MOVE / Verification requests of ``models``."""
    return [build_context(model, _QUERY_SYNTAXES) for model in models]


def get_contexts(
    model: str, sop_classes: Sequence[str] | None = None
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """Contexts and SCP-role items of a C-GET requestor: the GET model plus storage
    contexts for the instances to come back (``sop_classes``, default: the most
    common ones that fit), offering uncompressed syntaxes first."""
    classes = list(sop_classes) if sop_classes is not None else list(STORAGE_SOP_CLASSES)
    classes = classes[: MAX_CONTEXTS - 1]
    syntaxes: list[str | UID] = list(_UNCOMPRESSED) + [
        ts for ts in ACCEPTED_TRANSFER_SYNTAXES if UID(ts) not in _UNCOMPRESSED
    ]
    contexts = [build_context(model, _QUERY_SYNTAXES)]
    contexts += [build_context(sop_class, syntaxes) for sop_class in classes]
    roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
    return contexts, roles


__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "FIND_MODELS",
    "GET_MODELS",
    "MAX_CONTEXTS",
    "MOVE_MODELS",
    "PATIENT_ROOT_FIND",
    "PATIENT_ROOT_GET",
    "PATIENT_ROOT_MOVE",
    "STORAGE_SOP_CLASSES",
    "STUDY_ROOT_FIND",
    "STUDY_ROOT_GET",
    "STUDY_ROOT_MODELS",
    "STUDY_ROOT_MOVE",
    "VERIFICATION",
    "get_contexts",
    "prefer_proposed_syntaxes",
    "query_contexts",
    "scp_contexts",
    "sending_contexts",
]
