"""HL7 v2 messages received over MLLP

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 14:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "hl7_messages",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=True),
        sa.Column("control_id", sa.String(length=199), nullable=True),
        sa.Column("message_type", sa.String(length=16), nullable=True),
        sa.Column("version", sa.String(length=16), nullable=True),
        sa.Column("sending_application", sa.String(length=255), nullable=True),
        sa.Column("sending_facility", sa.String(length=255), nullable=True),
        sa.Column("charset", sa.String(length=32), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("raw_text", sa.Text(), nullable=True),
        sa.Column("raw_bytes", sa.LargeBinary(), nullable=True),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("ack_code", sa.String(length=2), nullable=True),
        sa.Column("error_code", sa.String(length=16), nullable=True),
        sa.Column("error_text", sa.Text(), nullable=True),
        sa.Column("duplicate_of", _ID, nullable=True),
        sa.Column("resource_refs", sa.Text(), nullable=True),
        sa.Column("mapped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hl7_messages")),
    )
    with op.batch_alter_table("hl7_messages", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_hl7_messages_status_id"), ["status", "id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_hl7_messages_control_id_sending_application_sending_facility"),
            ["control_id", "sending_application", "sending_facility"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_hl7_messages_message_type"), ["message_type"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_hl7_messages_received_at"), ["received_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("hl7_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_hl7_messages_received_at"))
        batch_op.drop_index(batch_op.f("ix_hl7_messages_message_type"))
        batch_op.drop_index(
            batch_op.f("ix_hl7_messages_control_id_sending_application_sending_facility")
        )
        batch_op.drop_index(batch_op.f("ix_hl7_messages_status_id"))

    op.drop_table("hl7_messages")
