"""The decision point: roles per partition, deny by default, SMART scopes for FHIR."""

from __future__ import annotations

import pytest

from medlake.errors import InvalidInput
from medlake.security import Action, Grant, Principal, PrincipalKind, Role, authorize
from medlake.security.errors import Forbidden, Unauthenticated
from medlake.security.scopes import Interaction, parse_scope


def who(*grants: str, scopes: str | None = None, patient: str | None = None) -> Principal:
    return Principal(
        subject="u",
        kind=PrincipalKind.USER,
        grants=frozenset(Grant.parse(g) for g in grants),
        scopes=frozenset(scopes.split()) if scopes is not None else None,
        patient=patient,
    )


def test_no_principal_is_unauthenticated_except_for_public_actions() -> None:
    assert authorize(None, Action.HEALTH, None).allowed
    assert authorize(None, Action.FHIR_CAPABILITIES, "default").allowed
    decision = authorize(None, Action.DICOM_READ, "default")
    assert not decision.allowed and not decision.authenticated
    with pytest.raises(Unauthenticated):
        decision.enforce()


def test_roles_apply_only_in_their_partition() -> None:
    reader = who("reader@a")
    assert authorize(reader, Action.DICOM_READ, "a").allowed
    denied = authorize(reader, Action.DICOM_READ, "b")
    assert not denied.allowed and denied.authenticated
    with pytest.raises(Forbidden, match=r"may not dicom\.read in partition 'b'"):
        denied.enforce()
    assert not authorize(reader, Action.DICOM_STORE, "a").allowed
    assert not authorize(reader, Action.CHANGEFEED_READ, None).allowed  # every partition
    assert authorize(who("reader"), Action.CHANGEFEED_READ, None).allowed


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (Role.ADMIN, set(Action)),
        (Role.INGEST, {"dicom.store", "fhir.create", "fhir.update", "hl7.receive"}),
        (Role.READER, {"dicom.read", "dicom.search", "fhir.read", "fhir.search", "hl7.read"}),
        (Role.RESEARCHER, {"deid.read"}),
        (Role.AUDITOR, {"audit.read", "batch.read"}),
    ],
)
def test_each_role_may_do_what_it_is_for(role: Role, allowed: set[str]) -> None:
    principal = who(role.value)
    granted = {a.value for a in Action if authorize(principal, a, "default").allowed}
    assert allowed <= granted
    if role != Role.ADMIN:
        for never in ("dicom.delete", "security.manage", "partition.create", "ae.manage"):
            assert never not in granted
    if role in (Role.RESEARCHER, Role.AUDITOR, Role.INGEST):
        assert not {"dicom.read", "dicom.search", "fhir.read"} & granted  # no identified PHI


def test_researcher_decisions_are_de_identified_only() -> None:
    decision = authorize(who("researcher@a"), Action.DEID_READ, "a")
    assert decision.allowed and decision.deidentified_only
    assert not authorize(who("reader@a"), Action.DEID_READ, "a").deidentified_only


def test_clinician_is_reader() -> None:
    assert Grant.parse("clinician@a") == Grant(Role.READER, "a")
    with pytest.raises(InvalidInput):
        Grant.parse("root@a")
    with pytest.raises(InvalidInput):
        Grant.parse("reader@../etc")


def test_smart_scopes_narrow_fhir() -> None:
    reader = who("reader@a", scopes="openid user/Observation.read")
    assert authorize(reader, Action.FHIR_READ, "a", resource_type="Observation").allowed
    assert authorize(reader, Action.FHIR_SEARCH, "a", resource_type="Observation").allowed
    assert not authorize(reader, Action.FHIR_READ, "a", resource_type="Patient").allowed
    assert not authorize(reader, Action.FHIR_READ, "a").allowed  # any type needs a * scope
    writer = who("ingest@a", scopes="user/*.cu")  # SMART v2
    assert authorize(writer, Action.FHIR_CREATE, "a", resource_type="Patient").allowed
    assert not authorize(writer, Action.FHIR_DELETE, "a", resource_type="Patient").allowed
    # scopes never widen roles
    assert not authorize(who("reader@a", scopes="user/*.*"), Action.FHIR_DELETE, "a").allowed
    # no FHIR scope at all: nothing in FHIR
    assert not authorize(who("reader@a", scopes="openid profile"), Action.FHIR_READ, "a").allowed


def test_patient_scopes_limit_to_the_launch_patient() -> None:
    no_context = who("reader@a", scopes="patient/*.read")
    assert not authorize(no_context, Action.FHIR_READ, "a", resource_type="Observation").allowed
    launched = who("reader@a", scopes="patient/*.read", patient="123")
    decision = authorize(launched, Action.FHIR_READ, "a", resource_type="Observation")
    assert decision.allowed and decision.compartments == {"Patient/123"}


def test_compartment_grants_are_fhir_only() -> None:
    nurse = who("reader@a:Patient/7")
    decision = authorize(nurse, Action.FHIR_READ, "a", resource_type="Observation")
    assert decision.allowed and decision.compartments == {"Patient/7"}
    assert not authorize(nurse, Action.DICOM_READ, "a").allowed
    other = who("reader@a:Patient/7", scopes="patient/*.read", patient="8")
    assert not authorize(other, Action.FHIR_READ, "a", resource_type="Observation").allowed


def test_scope_grammar() -> None:
    v1 = parse_scope("patient/Observation.read")
    assert v1 is not None and v1.interactions == {Interaction.READ, Interaction.SEARCH}
    v2 = parse_scope("user/*.cruds")
    assert v2 is not None and v2.interactions == set(Interaction)
    for not_a_resource_scope in ("openid", "launch/patient", "user/*.sr", "user/Obs.rs?code=1"):
        assert parse_scope(not_a_resource_scope) is None
