"""``merge_patients``: the source patient's resources move to the target, the source is
retired with a ``replaced-by`` link (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest

from medlake.clinical.patient_merge import merge_patients
from medlake.clinical.store import create_resource, read_resource, vread_resource
from medlake.errors import InvalidInput, NotFound
from medlake.ingest.archive import Archive


def create(archive: Archive, resource: dict[str, Any]) -> str:
    stored = create_resource(archive, resource)
    return stored.id


def current(archive: Archive, kind: str, logical_id: str) -> dict[str, Any]:
    found = read_resource(archive, kind, logical_id).resource()
    assert found is not None
    return found


@pytest.fixture
def two_patients(archive: Archive) -> dict[str, str]:
    source = create(archive, {"resourceType": "Patient", "name": [{"family": "OLD"}]})
    target = create(archive, {"resourceType": "Patient", "name": [{"family": "NEW"}]})
    observation = create(
        archive,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "heart rate"},
            "subject": {"reference": f"Patient/{source}"},
            "valueQuantity": {"value": 72},
        },
    )
    encounter = create(
        archive,
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{source}"},
        },
    )
    other = create(
        archive,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "unrelated"},
            "subject": {"reference": f"Patient/{target}"},
        },
    )
    return {
        "source": source,
        "target": target,
        "observation": observation,
        "encounter": encounter,
        "other": other,
    }


def test_merge_repoints_references_and_links_the_patients(
    archive: Archive, two_patients: dict[str, str]
) -> None:
    ids = two_patients
    result = merge_patients(archive, ids["source"], f"Patient/{ids['target']}")

    assert sorted(result.repointed) == sorted(
        [f"Observation/{ids['observation']}", f"Encounter/{ids['encounter']}"]
    )
    target = f"Patient/{ids['target']}"
    assert current(archive, "Observation", ids["observation"])["subject"]["reference"] == target
    assert current(archive, "Encounter", ids["encounter"])["subject"]["reference"] == target
    source = current(archive, "Patient", ids["source"])
    assert source["active"] is False
    assert source["link"] == [{"other": {"reference": target}, "type": "replaced-by"}]
    assert current(archive, "Patient", ids["target"])["link"] == [
        {"other": {"reference": f"Patient/{ids['source']}"}, "type": "replaces"}
    ]
    # history keeps what the observation said before the merge
    before = vread_resource(archive, "Observation", ids["observation"], 1).resource()
    assert before is not None
    assert before["subject"]["reference"] == f"Patient/{ids['source']}"
    assert read_resource(archive, "Observation", ids["other"]).version_id == 1


def test_merging_again_changes_nothing(archive: Archive, two_patients: dict[str, str]) -> None:
    ids = two_patients
    merge_patients(archive, ids["source"], ids["target"])
    again = merge_patients(archive, ids["source"], ids["target"])
    assert again.repointed == []
    assert read_resource(archive, "Observation", ids["observation"]).version_id == 2
    assert len(current(archive, "Patient", ids["target"])["link"]) == 1


def test_unknown_or_identical_patients_are_refused(
    archive: Archive, two_patients: dict[str, str]
) -> None:
    with pytest.raises(NotFound):
        merge_patients(archive, "no-such-patient", two_patients["target"])
    with pytest.raises(InvalidInput):
        merge_patients(archive, two_patients["target"], two_patients["target"])
    assert current(archive, "Observation", two_patients["observation"])["subject"] == {
        "reference": f"Patient/{two_patients['source']}"
    }
