"""de-identified views: the pseudonym key and the way back from pseudonyms

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24 17:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "deid_keys",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deid_keys")),
    )
    op.create_table(
        "deid_pseudonyms",
        sa.Column("partition_id", Id, nullable=False),
        sa.Column("kind", sa.String(length=80), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("original", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["partition_id"],
            ["partitions.id"],
            name=op.f("fk_deid_pseudonyms_partition_id_partitions"),
        ),
        sa.PrimaryKeyConstraint(
            "partition_id", "kind", "pseudonym", name=op.f("pk_deid_pseudonyms")
        ),
    )


def downgrade() -> None:
    op.drop_table("deid_pseudonyms")
    op.drop_table("deid_keys")
