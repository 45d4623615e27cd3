"""Release acknowledgements: single use, and the ones received.

``book_journal_entries.release_ack`` holds the release id of the exchange's signed
acknowledgement an unpledge used, under a unique index: a second unpledge under the same
acknowledgement fails inside its transaction even if two race. Entries recorded before this
revision, and unpledges whose acknowledgement was not verified, leave it null (several nulls do
not collide on either database).

``book_release_acks`` keeps every signed acknowledgement the custodian received and verified
(from the instructions topic or a file), by release id, with its wire bytes, so an unpledge can
name it by id.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _units() -> sa.types.TypeEngine[Any]:
    # As in 0001: exact integers below 2**128, NUMERIC on PostgreSQL, decimal text on SQLite.
    return sa.String(40).with_variant(sa.Numeric(39, 0), "postgresql")


def upgrade() -> None:
    # A nullable column without a default: no table rebuild on SQLite.
    op.add_column("book_journal_entries", sa.Column("release_ack", sa.String(128), nullable=True))
    op.create_index(
        "uq_book_journal_entries_release_ack",
        "book_journal_entries",
        ["release_ack"],
        unique=True,
    )
    op.create_table(
        "book_release_acks",
        sa.Column("release_id", sa.String(64), nullable=False),
        sa.Column("exchange", sa.String(64), nullable=False),
        sa.Column("client", sa.String(128), nullable=False),
        sa.Column("asset", sa.String(16), nullable=False),
        sa.Column("quantity", _units(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wire", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("release_id", name="pk_book_release_acks"),
    )


def downgrade() -> None:
    op.drop_table("book_release_acks")
    op.drop_index("uq_book_journal_entries_release_ack", table_name="book_journal_entries")
    if op.get_bind().dialect.name == "sqlite":
        # SQLite (3.35+) drops a column in place; a batch rebuild would lose the journal's
        # insert-only triggers of 0001.
        op.execute("ALTER TABLE book_journal_entries DROP COLUMN release_ack")
    else:
        op.drop_column("book_journal_entries", "release_ack")
