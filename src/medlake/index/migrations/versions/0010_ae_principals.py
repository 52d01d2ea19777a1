"""application entities as principals: TLS peers and calling-host checks

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("application_entities", schema=None) as batch_op:
        # Existing AEs: reached without TLS, and (now) admitted only from their host.
        batch_op.add_column(
            sa.Column("tls", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("check_host", sa.Boolean(), server_default=sa.true(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("application_entities", schema=None) as batch_op:
        batch_op.drop_column("check_host")
        batch_op.drop_column("tls")
