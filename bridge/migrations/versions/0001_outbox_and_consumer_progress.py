"""Bridge tables: the producer's outbox, a consumer's progress and its dead-letter record.

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _row_id() -> sa.types.TypeEngine[int]:
    # BIGINT on PostgreSQL; INTEGER on SQLite, where only "INTEGER PRIMARY KEY" is the rowid.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "bridge_outbox",
        sa.Column("id", _row_id(), primary_key=True, autoincrement=True),
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("snapshot", sa.Boolean(), nullable=False),
        sa.Column("message_type", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("message_key", sa.LargeBinary(), nullable=False),
        sa.Column("message_value", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_partition", sa.Integer(), nullable=True),
        sa.Column("sent_offset", sa.BigInteger(), nullable=True),
        sa.Column("publish_count", sa.Integer(), nullable=False, server_default="0"),
        sqlite_autoincrement=True,  # ids of rolled-back rows are never handed out again
    )
    # The relay's hot query: unsent rows in id order.
    op.create_index(
        "ix_bridge_outbox_unsent",
        "bridge_outbox",
        ["id"],
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    )
    op.create_index("ix_bridge_outbox_stream_sequence", "bridge_outbox", ["stream", "sequence"])
    op.create_table(
        "consumer_progress",
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("last_offset", sa.BigInteger(), nullable=False),
        # SHA-256 of the key and value read at last_offset: a broker that lost its log and
        # refilled it past that offset holds another record there, and the consumer notices.
        sa.Column("last_fingerprint", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "topic", "partition", name="pk_consumer_progress"),
    )
    op.create_table(
        "consumer_stream_progress",
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column("statement_digest", sa.String(64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "stream", name="pk_consumer_stream_progress"),
    )
    op.create_table(
        "consumer_dead_letters",
        sa.Column("id", _row_id(), primary_key=True, autoincrement=True),
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("dead_letter_topic", sa.String(249), nullable=False),
        sa.Column("dead_letter_partition", sa.Integer(), nullable=False),
        sa.Column("dead_letter_offset", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_consumer_dead_letters_source",
        "consumer_dead_letters",
        ["consumer", "topic", "partition", "offset"],
    )


def downgrade() -> None:
    op.drop_index("ix_consumer_dead_letters_source", table_name="consumer_dead_letters")
    op.drop_table("consumer_dead_letters")
    op.drop_table("consumer_stream_progress")
    op.drop_table("consumer_progress")
    op.drop_index("ix_bridge_outbox_stream_sequence", table_name="bridge_outbox")
    op.drop_index("ix_bridge_outbox_unsent", table_name="bridge_outbox")
    op.drop_table("bridge_outbox")
