"""api_tokens.kind: API token, login link or browser session, so that ended login links
and sessions can be pruned

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-25 00:00:00
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

#: The longest a login link and a session could live (10 minutes, 12 hours), with a
#: minute's slack: an API token an administrator described the same way lives longer
#: or never expires, and stays a token (tokens are never pruned).
_LIFETIMES = {"login_link": dt.timedelta(minutes=11), "session": dt.timedelta(hours=12, minutes=1)}


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(length=16), server_default="token", nullable=False)
        )
    # Until now only the description and the lifetime told them apart.
    tokens = sa.table(
        "api_tokens",
        sa.column("id", sa.Integer),
        sa.column("kind", sa.String),
        sa.column("description", sa.Text),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("expires_at", sa.DateTime(timezone=True)),
    )
    conn = op.get_bind()
    candidates = conn.execute(
        sa.select(tokens.c.id, tokens.c.description, tokens.c.created_at, tokens.c.expires_at)
        .where(tokens.c.expires_at.is_not(None))
        .where(
            sa.or_(
                tokens.c.description == "one-time browser login link",
                tokens.c.description.like("browser session opened with %"),
            )
        )
    ).all()
    for row in candidates:
        kind = "login_link" if row.description == "one-time browser login link" else "session"
        if row.expires_at - row.created_at <= _LIFETIMES[kind]:
            conn.execute(sa.update(tokens).where(tokens.c.id == row.id).values(kind=kind))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("kind")
