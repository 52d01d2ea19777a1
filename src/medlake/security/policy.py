"""The one decision point: may this principal do this action in this partition?

Every adapter (HTTP routes, DIMSE, MLLP, CLI) asks :func:`authorize` and acts on the
:class:`Decision`. Deny by default: an action is allowed only when a role the principal
holds in the partition lists it in :data:`ROLE_ACTIONS` (and, for FHIR, when its SMART
scopes allow the interaction). Public actions (health, API documentation, FHIR
capabilities, static viewer files, signing in and out) need no principal at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from medlake.security.errors import Forbidden, Unauthenticated
from medlake.security.principals import Principal, Role
from medlake.security.scopes import Interaction, matching_scopes


class Action(enum.StrEnum):
    """Everything that can be asked of medlake, grouped by what it touches."""

    HEALTH = "system.health"
    DOCS = "system.docs"
    STATIC = "system.static"
    LOGIN = "session.login"  # a browser signs in (login link or API token) for a cookie
    LOGOUT = "session.logout"
    METRICS_READ = "system.metrics"
    PARTITION_LIST = "partition.list"
    PARTITION_CREATE = "partition.create"
    DICOM_SEARCH = "dicom.search"
    DICOM_READ = "dicom.read"
    DICOM_STORE = "dicom.store"
    DICOM_DELETE = "dicom.delete"
    CHANGEFEED_READ = "changefeed.read"
    TAGS_READ = "extended_tags.read"
    TAGS_MANAGE = "extended_tags.manage"
    OPERATION_READ = "operation.read"
    BATCH_READ = "batch.read"
    BATCH_MANAGE = "batch.manage"
    AE_READ = "ae.read"
    AE_MANAGE = "ae.manage"
    FHIR_CAPABILITIES = "fhir.capabilities"
    FHIR_READ = "fhir.read"
    FHIR_SEARCH = "fhir.search"
    FHIR_CREATE = "fhir.create"
    FHIR_UPDATE = "fhir.update"
    FHIR_DELETE = "fhir.delete"
    FHIR_TRANSACTION = "fhir.transaction"
    FHIR_EXPORT = "fhir.export"
    FHIR_IMPORT = "fhir.import"
    FHIR_BULK_STATUS = "fhir.bulk_status"
    HL7_RECEIVE = "hl7.receive"
    HL7_READ = "hl7.read"
    DEID_READ = "deid.read"
    AUDIT_READ = "audit.read"
    SECURITY_MANAGE = "security.manage"


#: Actions anyone may ask for, authenticated or not (nothing in them is PHI).
PUBLIC_ACTIONS = frozenset(
    {
        Action.HEALTH,
        Action.DOCS,
        Action.STATIC,
        Action.FHIR_CAPABILITIES,
        # signing in and out check the credential themselves (medlake.api.login_routes)
        Action.LOGIN,
        Action.LOGOUT,
    }
)

#: FHIR actions and the SMART interaction each needs.
FHIR_INTERACTIONS: dict[Action, frozenset[Interaction]] = {
    Action.FHIR_READ: frozenset({Interaction.READ}),
    Action.FHIR_SEARCH: frozenset({Interaction.SEARCH}),
    Action.FHIR_CREATE: frozenset({Interaction.CREATE}),
    Action.FHIR_UPDATE: frozenset({Interaction.UPDATE}),
    Action.FHIR_DELETE: frozenset({Interaction.DELETE}),
    # A transaction's entries are checked one by one by the FHIR service; the bundle as
    # a whole needs a role that may write.
    Action.FHIR_TRANSACTION: frozenset({Interaction.CREATE, Interaction.UPDATE}),
    # Bulk Data: an export reads every resource of its types (system/*.read).
    Action.FHIR_EXPORT: frozenset({Interaction.READ}),
    Action.FHIR_IMPORT: frozenset({Interaction.CREATE, Interaction.UPDATE}),
    # A bulk job's status and cancel: what its kick-off needed (export or import). As a
    # FHIR action, compartment grants and patient/ scopes limit it to the caller's own
    # compartment-limited exports.
    Action.FHIR_BULK_STATUS: frozenset({Interaction.READ, Interaction.CREATE, Interaction.UPDATE}),
}

_READ_PHI = frozenset(
    {
        Action.DICOM_SEARCH,
        Action.DICOM_READ,
        Action.CHANGEFEED_READ,
        Action.FHIR_READ,
        Action.FHIR_SEARCH,
        Action.HL7_READ,
    }
)
_ALWAYS = frozenset({Action.PARTITION_LIST, Action.TAGS_READ})
#: Actions about the archive's structure, not its data: a role in any partition allows them.
_ANY_PARTITION = _ALWAYS

#: What each role may do in the partitions it is granted. Admin may do everything.
ROLE_ACTIONS: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset(Action),
    Role.INGEST: _ALWAYS
    | {
        Action.DICOM_STORE,
        Action.FHIR_CREATE,
        Action.FHIR_UPDATE,
        Action.FHIR_TRANSACTION,
        Action.FHIR_IMPORT,
        Action.FHIR_BULK_STATUS,
        Action.HL7_RECEIVE,
        Action.BATCH_READ,
        Action.BATCH_MANAGE,
    },
    Role.READER: _ALWAYS | _READ_PHI | {Action.FHIR_EXPORT, Action.FHIR_BULK_STATUS},
    Role.RESEARCHER: _ALWAYS | {Action.DEID_READ},
    Role.AUDITOR: _ALWAYS | {Action.AUDIT_READ, Action.BATCH_READ, Action.METRICS_READ},
}


@dataclass(frozen=True)
class Decision:
    """The answer of :func:`authorize`.

    When allowed, ``compartments`` (if not ``None``) are the only FHIR compartments the
    caller may see or change (``Patient/123``): the FHIR service must restrict reads,
    searches and writes to them. ``deidentified_only`` means only de-identified views
    may be served.
    """

    allowed: bool
    action: Action
    partition: str | None
    reason: str
    authenticated: bool = True
    compartments: frozenset[str] | None = None
    deidentified_only: bool = False

    def enforce(self) -> Decision:
        """``self`` when allowed; else Unauthenticated (no principal) or Forbidden."""
        if self.allowed:
            return self
        if not self.authenticated:
            raise Unauthenticated(self.reason)
        raise Forbidden(self.reason)


def authorize(
    principal: Principal | None,
    action: Action,
    partition: str | None,
    *,
    resource_type: str | None = None,
) -> Decision:
    """Decide whether ``principal`` may do ``action`` in ``partition``.

    ``partition`` ``None`` means the whole archive (e.g. the change feed of every
    partition): only grants on every partition (``*``) count then. ``resource_type`` is
    the FHIR resource type of a FHIR action (``None`` or ``*``: any type, which only a
    wildcard scope covers).
    """
    where = f"partition {partition!r}" if partition is not None else "every partition"

    def deny(reason: str, *, authenticated: bool = True) -> Decision:
        return Decision(False, action, partition, reason, authenticated=authenticated)

    if action in PUBLIC_ACTIONS:
        return Decision(True, action, partition, "public")
    if principal is None:
        return deny(f"authentication required for {action.value}", authenticated=False)
    grants = [
        g
        for g in principal.grants
        if action in ROLE_ACTIONS[g.role] and (action in _ANY_PARTITION or g.covers(partition))
    ]
    whole = [g for g in grants if not g.compartment]
    interactions = FHIR_INTERACTIONS.get(action)
    if interactions is None:
        # Compartment grants are FHIR-only: nothing maps DICOM or admin data to them.
        grants = whole
    if not grants:
        held = ", ".join(sorted(str(g) for g in principal.grants)) or "no roles"
        return deny(f"{principal.label} ({held}) may not {action.value} in {where}")
    compartments: set[str] | None = None if whole else {g.compartment for g in grants}
    if interactions is not None and principal.scopes is not None:
        wanted = resource_type or "*"
        scopes = [s for i in interactions for s in matching_scopes(principal.scopes, wanted, i)]
        if not scopes:
            return deny(f"no SMART scope of {principal.label} allows {action.value} on {wanted}")
        if all(s.context == "patient" for s in scopes):
            if not principal.patient:
                return deny("patient/ scopes need a patient in the launch context")
            patient = f"Patient/{principal.patient}"
            if compartments is not None and patient not in compartments:
                return deny(f"{patient} is outside the compartments granted to {principal.label}")
            compartments = {patient}
    deidentified = all(g.role == Role.RESEARCHER for g in grants)
    return Decision(
        True,
        action,
        partition,
        f"{principal.label} as {', '.join(sorted({g.role.value for g in grants}))}",
        compartments=frozenset(compartments) if compartments is not None else None,
        deidentified_only=deidentified,
    )


__all__ = [
    "FHIR_INTERACTIONS",
    "PUBLIC_ACTIONS",
    "ROLE_ACTIONS",
    "Action",
    "Decision",
    "authorize",
]
