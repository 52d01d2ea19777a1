"""patient identity linking DICOM and FHIR; what cohort queries need to be planned well

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 14:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

#: PostgreSQL multiplies the selectivities of resource_type, param and code as if they
#: were independent (a code belongs to one type and parameter) and estimated one row for
#: each clinical subquery of a cohort query: nested loops read 252 million rows for the
#: example of docs/cohorts.md. Extended statistics give it the combinations; ANALYZE
#: fills them. The series one needs PostgreSQL 14 (statistics on an expression).
_STATISTICS = {
    "fhir_search_values_token_stats": (
        "(dependencies, mcv) ON resource_type, param, token_system, token_code "
        "FROM fhir_search_values"
    ),
    "fhir_search_values_qualifier_stats": (
        "(dependencies, mcv) ON resource_type, param, qualifier_system, qualifier_code "
        "FROM fhir_search_values"
    ),
    "fhir_search_values_reference_stats": (
        "(dependencies, mcv) ON resource_type, param, ref_type FROM fhir_search_values"
    ),
}
_EXPRESSION_STATISTICS = {
    "series_modality_body_part_stats": "(mcv) ON modality, upper(body_part_examined) FROM series",
}


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("partition_id", Id, nullable=False),
        sa.Column("fhir_id", sa.String(length=64), nullable=False),
        sa.Column("merged_into", Id, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["partition_id"], ["partitions.id"], name=op.f("fk_patients_partition_id_partitions")
        ),
        sa.ForeignKeyConstraint(
            ["merged_into"], ["patients.id"], name=op.f("fk_patients_merged_into_patients")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patients")),
        sa.UniqueConstraint(
            "partition_id", "fhir_id", name=op.f("uq_patients_partition_id_fhir_id")
        ),
    )
    op.create_index(op.f("ix_patients_merged_into"), "patients", ["merged_into"], unique=False)

    op.create_table(
        "patient_identifiers",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("partition_id", Id, nullable=False),
        sa.Column("system", sa.String(length=256), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.Column("patient_id", Id, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["partition_id"],
            ["partitions.id"],
            name=op.f("fk_patient_identifiers_partition_id_partitions"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_patient_identifiers_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_identifiers")),
        sa.UniqueConstraint(
            "partition_id",
            "system",
            "value",
            name=op.f("uq_patient_identifiers_partition_id_system_value"),
        ),
    )
    op.create_index(
        op.f("ix_patient_identifiers_patient_id"),
        "patient_identifiers",
        ["patient_id"],
        unique=False,
    )

    op.create_table(
        "patient_records",
        sa.Column("partition_id", Id, nullable=False),
        sa.Column("fhir_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", Id, nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["partition_id"],
            ["partitions.id"],
            name=op.f("fk_patient_records_partition_id_partitions"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_patient_records_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("partition_id", "fhir_id", name=op.f("pk_patient_records")),
    )
    op.create_index(
        op.f("ix_patient_records_patient_id"), "patient_records", ["patient_id"], unique=False
    )

    op.create_table(
        "study_patients",
        sa.Column("study_id", Id, nullable=False),
        sa.Column("partition_id", Id, nullable=False),
        sa.Column("patient_id", Id, nullable=False),
        sa.Column("study_date", TS, nullable=True),
        sa.Column("linked_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_study_patients_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["partition_id"],
            ["partitions.id"],
            name=op.f("fk_study_patients_partition_id_partitions"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_id"], ["patients.id"], name=op.f("fk_study_patients_patient_id_patients")
        ),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_study_patients")),
    )
    op.create_index(
        op.f("ix_study_patients_patient_id"), "study_patients", ["patient_id"], unique=False
    )

    op.create_table(
        "sync_cursors",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_sync_cursors")),
    )

    # A (code, value) pair of Observation code-value-quantity by code and value range.
    op.create_index(
        "ix_fhir_search_values_qualifier_code_number_value",
        "fhir_search_values",
        ["resource_type", "param", "qualifier_code", "number_value"],
        unique=False,
        sqlite_where=sa.text("qualifier_code IS NOT NULL"),
        postgresql_where=sa.text("qualifier_code IS NOT NULL"),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        statistics = dict(_STATISTICS)
        if (bind.dialect.server_version_info or (0,)) >= (14,):
            statistics.update(_EXPRESSION_STATISTICS)
        for name, definition in statistics.items():
            op.execute(f"CREATE STATISTICS IF NOT EXISTS {name} {definition}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in (*_STATISTICS, *_EXPRESSION_STATISTICS):
            op.execute(f"DROP STATISTICS IF EXISTS {name}")
    op.drop_index(
        "ix_fhir_search_values_qualifier_code_number_value", table_name="fhir_search_values"
    )
    op.drop_table("sync_cursors")
    op.drop_index(op.f("ix_study_patients_patient_id"), table_name="study_patients")
    op.drop_table("study_patients")
    op.drop_index(op.f("ix_patient_records_patient_id"), table_name="patient_records")
    op.drop_table("patient_records")
    op.drop_index(op.f("ix_patient_identifiers_patient_id"), table_name="patient_identifiers")
    op.drop_table("patient_identifiers")
    op.drop_index(op.f("ix_patients_merged_into"), table_name="patients")
    op.drop_table("patients")
