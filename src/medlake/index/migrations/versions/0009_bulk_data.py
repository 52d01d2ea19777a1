"""FHIR bulk data export jobs and import bookkeeping

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 14:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fhir_bulk_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("parameters", sa.Text(), nullable=False),
        sa.Column("transaction_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("progress", sa.String(length=100), nullable=True),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("errors", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("batch_id", sa.String(length=36), nullable=True),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fhir_bulk_jobs")),
    )
    with op.batch_alter_table("fhir_bulk_jobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_fhir_bulk_jobs_status_created_at"),
            ["status", "created_at"],
            unique=False,
        )

    op.create_table(
        "fhir_bulk_job_patients",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["fhir_bulk_jobs.id"],
            name=op.f("fk_fhir_bulk_job_patients_job_id_fhir_bulk_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "patient_id", name=op.f("pk_fhir_bulk_job_patients")),
    )

    with op.batch_alter_table("fhir_resources", schema=None) as batch_op:
        batch_op.create_index(
            "ix_fhir_resources_partition_id_resource_type_id",
            ["partition_id", "resource_type", "id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("fhir_resources", schema=None) as batch_op:
        batch_op.drop_index("ix_fhir_resources_partition_id_resource_type_id")
    op.drop_table("fhir_bulk_job_patients")
    with op.batch_alter_table("fhir_bulk_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fhir_bulk_jobs_status_created_at"))
    op.drop_table("fhir_bulk_jobs")
