"""Leaf history: every version of every attested leaf, so a client proof can be rebuilt for any
stored statement (custodian/history.py).

``attested_leaf_versions`` holds one row per (stream, asset, account) and stretch of sequences
with one position and quantity: valid from ``from_sequence`` (inclusive) to ``to_sequence``
(exclusive; null while it is the current leaf). The service writes it in the transaction that
stores each statement.

A database that already holds statements has no history of them: its current leaves
(``attested_leaves``, the leaves of each stream's last statement) are seeded as versions open at
that statement's sequence, and ``attested_leaf_history_starts`` records that sequence as the
first one whose proofs can be rebuilt. A stream without a row there has its whole history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _units() -> sa.types.TypeEngine[Any]:
    # As in 0001: exact integers below 2**128, NUMERIC on PostgreSQL, decimal text on SQLite.
    return sa.String(40).with_variant(sa.Numeric(39, 0), "postgresql")


def upgrade() -> None:
    op.create_table(
        "attested_leaf_versions",
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("asset", sa.String(16), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("account", sa.String(128), nullable=False),
        sa.Column("quantity", _units(), nullable=False),
        sa.Column("from_sequence", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("to_sequence", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint(
            "stream", "asset", "account", "from_sequence", name="pk_attested_leaf_versions"
        ),
        sa.CheckConstraint(
            "to_sequence IS NULL OR to_sequence > from_sequence",
            name="ck_attested_leaf_versions_interval",
        ),
    )
    op.create_index(
        "ix_attested_leaf_versions_asset_from",
        "attested_leaf_versions",
        ["stream", "asset", "from_sequence"],
    )
    op.create_table(
        "attested_leaf_history_starts",
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("first_sequence", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.PrimaryKeyConstraint("stream", name="pk_attested_leaf_history_starts"),
    )
    # Seed from what exists: each stream's last statement and its leaves. Leaves of a stream
    # without statements have no sequence to start from; the service refuses to open such a
    # stream anyway (restore_epoch_state).
    op.execute(
        "INSERT INTO attested_leaf_history_starts (stream, first_sequence) "
        "SELECT stream, max(sequence) FROM attestation_statements GROUP BY stream"
    )
    op.execute(
        "INSERT INTO attested_leaf_versions "
        "(stream, asset, position, account, quantity, from_sequence, to_sequence) "
        "SELECT l.stream, l.asset, l.position, l.account, l.quantity, s.first_sequence, NULL "
        "FROM attested_leaves l "
        "JOIN attested_leaf_history_starts s ON s.stream = l.stream"
    )


def downgrade() -> None:
    op.drop_table("attested_leaf_history_starts")
    op.drop_index("ix_attested_leaf_versions_asset_from", table_name="attested_leaf_versions")
    op.drop_table("attested_leaf_versions")
