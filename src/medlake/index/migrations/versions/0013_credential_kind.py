"""api_tokens.kind: API token, login link or browser session, so that ended login links
and sessions can be pruned

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-25 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(length=16), server_default="token", nullable=False)
        )
    # Until now only the description told them apart (it is what medlake wrote for them).
    op.execute(
        "UPDATE api_tokens SET kind = 'login_link' "
        "WHERE description = 'one-time browser login link'"
    )
    op.execute(
        "UPDATE api_tokens SET kind = 'session' "
        "WHERE description LIKE 'browser session opened with %'"
    )


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("kind")
