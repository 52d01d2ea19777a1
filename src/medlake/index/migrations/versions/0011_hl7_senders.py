"""HL7 v2 senders: the allow-list of the MLLP listener

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hl7_senders",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("sending_application", sa.String(length=255), nullable=True),
        sa.Column("sending_facility", sa.String(length=255), nullable=True),
        sa.Column("tls_subject", sa.String(length=255), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hl7_senders")),
        sa.UniqueConstraint("name", name=op.f("uq_hl7_senders_name")),
    )


def downgrade() -> None:
    op.drop_table("hl7_senders")
