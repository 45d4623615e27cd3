"""Attestation epochs: the statements the custodian signed and the leaves they attest.

``attestation_statements`` keeps every statement of every (custodian, exchange) stream with its
wire bytes: the source of truth for the stream head and for the transparency log. The
``attested_leaves`` table is the stream's leaf set as of its last statement (one row per pledged
holding, with its stable tree position), from which the custodian rebuilds its sum trees after a
restart.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-27
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _units() -> sa.types.TypeEngine[Any]:
    # As in 0001: exact integers below 2**128, NUMERIC on PostgreSQL, decimal text on SQLite.
    return sa.String(40).with_variant(sa.Numeric(39, 0), "postgresql")


def upgrade() -> None:
    op.create_table(
        "attestation_statements",
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wire", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("stream", "sequence", name="pk_attestation_statements"),
        sa.UniqueConstraint("digest", name="uq_attestation_statements_digest"),
    )
    op.create_table(
        "attested_leaves",
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("asset", sa.String(16), nullable=False),
        sa.Column("account", sa.String(128), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("quantity", _units(), nullable=False),
        sa.PrimaryKeyConstraint("stream", "asset", "account", name="pk_attested_leaves"),
        sa.UniqueConstraint(
            "stream", "asset", "position", name="uq_attested_leaves_stream_asset_position"
        ),
    )


def downgrade() -> None:
    op.drop_table("attested_leaves")
    op.drop_table("attestation_statements")
