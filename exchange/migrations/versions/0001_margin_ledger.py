"""Exchange margin ledger: streams and their statement history, the receiver's leaves (which are
also the credited positions), prices, exposures, margin states, notices, alerts, and the
insert-only journal.

Revision ID: 0001
Revises:
Create Date: 2026-01-12
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOURNAL = "exchange_journal"


def _units() -> sa.types.TypeEngine[Any]:
    # Exact signed integers below 2**128 in magnitude: NUMERIC(39, 0) on PostgreSQL, the
    # canonical decimal string on SQLite (whose INTEGER stops at 2**63).
    return sa.String(40).with_variant(sa.Numeric(39, 0), "postgresql")


def _row_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _at(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "exchange_streams",
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("custodian", sa.String(128), nullable=False),
        # The head: the last statement accepted (all NULL before the first one).
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("digest", sa.LargeBinary(), nullable=True),
        sa.Column("kind", sa.String(16), nullable=True),
        _at("issued_at", nullable=True),
        _at("expires_at", nullable=True),
        # Its signed statement, byte for byte, and its tree depths per asset (JSON).
        sa.Column("wire", sa.LargeBinary(), nullable=True),
        sa.Column("depths", sa.Text(), nullable=True),
        sa.Column("frozen", sa.Boolean(), nullable=False),
        sa.Column("frozen_reason", sa.Text(), nullable=True),
        _at("frozen_at", nullable=True),
        sa.Column("awaiting_snapshot_from", sa.BigInteger(), nullable=True),
        _at("updated_at"),
        sa.PrimaryKeyConstraint("stream", name="pk_exchange_streams"),
        sa.CheckConstraint(
            "(sequence IS NULL) = (digest IS NULL)", name="ck_exchange_streams_head_whole"
        ),
    )
    op.create_table(
        "exchange_statement_digests",
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        _at("issued_at"),
        sa.Column("resynchronised", sa.Boolean(), nullable=False),
        _at("accepted_at"),
        sa.PrimaryKeyConstraint("stream", "sequence", name="pk_exchange_statement_digests"),
    )
    op.create_table(
        "exchange_leaves",
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("asset", sa.String(16), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("account", sa.String(128), nullable=False),
        sa.Column("salt", sa.LargeBinary(), nullable=False),
        sa.Column("quantity", _units(), nullable=False),
        sa.PrimaryKeyConstraint("stream", "asset", "position", name="pk_exchange_leaves"),
        sa.UniqueConstraint(
            "stream", "asset", "account", name="uq_exchange_leaves_stream_asset_account"
        ),
    )
    op.create_table(
        "exchange_prices",
        sa.Column("stream", sa.String(300), nullable=False),
        sa.Column("asset", sa.String(16), nullable=False),
        sa.Column("quote", sa.String(16), nullable=False),
        sa.Column("mantissa", _units(), nullable=False),
        sa.Column("scale", sa.SmallInteger(), nullable=False),
        sa.Column("source", sa.String(128), nullable=True),
        _at("observed_at", nullable=True),
        sa.PrimaryKeyConstraint("stream", "asset", name="pk_exchange_prices"),
    )
    op.create_table(
        "exchange_exposures",
        sa.Column("client", sa.String(128), nullable=False),
        sa.Column("report_id", sa.String(128), nullable=False),
        _at("reported_at"),
        sa.Column("exposure", _units(), nullable=False),
        sa.Column("requirement", _units(), nullable=False),
        sa.Column("unrealised_pnl", _units(), nullable=False),
        sa.PrimaryKeyConstraint("client", name="pk_exchange_exposures"),
    )
    op.create_table(
        "exchange_margins",
        sa.Column("client", sa.String(128), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        _at("since"),
        _at("deadline", nullable=True),
        sa.PrimaryKeyConstraint("client", name="pk_exchange_margins"),
    )
    op.create_table(
        _JOURNAL,
        sa.Column("id", _row_id(), primary_key=True, autoincrement=True),
        _at("at"),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("client", sa.String(128), nullable=True),
        sa.Column("stream", sa.String(300), nullable=True),
        sa.Column("asset", sa.String(16), nullable=True),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("quantity", _units(), nullable=True),
        sa.Column("value", _units(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sqlite_autoincrement=True,  # ids of rolled-back entries are never handed out again
    )
    op.create_index("ix_exchange_journal_stream", _JOURNAL, ["stream", "id"])
    op.create_index("ix_exchange_journal_client", _JOURNAL, ["client", "id"])
    # Restoring pending releases reads the journal by kind.
    op.create_index("ix_exchange_journal_kind", _JOURNAL, ["kind", "id"])
    op.create_table(
        "exchange_notices",
        sa.Column("id", _row_id(), primary_key=True, autoincrement=True),
        _at("at"),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("client", sa.String(128), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        _at("published_at", nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "exchange_alerts",
        sa.Column("id", _row_id(), primary_key=True, autoincrement=True),
        _at("at"),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(300), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        _at("resolved_at", nullable=True),
        sa.Column("resolved_by", sa.String(128), nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_exchange_alerts_open", "exchange_alerts", ["resolved_at", "id"])
    _create_insert_only_guard()


def _create_insert_only_guard() -> None:
    """The journal is insert-only: the database refuses UPDATE, DELETE and (on PostgreSQL)
    TRUNCATE on it, whoever asks."""
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION exchange_reject_journal_change() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'the exchange journal is insert-only: % on % refused',
                    TG_OP, TG_TABLE_NAME;
            END
            $$
            """
        )
        op.execute(
            f"CREATE TRIGGER {_JOURNAL}_insert_only BEFORE UPDATE OR DELETE ON {_JOURNAL} "
            "FOR EACH ROW EXECUTE FUNCTION exchange_reject_journal_change()"
        )
        op.execute(
            f"CREATE TRIGGER {_JOURNAL}_no_truncate BEFORE TRUNCATE ON {_JOURNAL} "
            "FOR EACH STATEMENT EXECUTE FUNCTION exchange_reject_journal_change()"
        )
        return
    for operation in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {_JOURNAL}_no_{operation.lower()} BEFORE {operation} ON {_JOURNAL} "
            f"BEGIN SELECT RAISE(ABORT, 'the exchange journal is insert-only: {operation} "
            f"on {_JOURNAL} refused'); END"
        )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER {_JOURNAL}_insert_only ON {_JOURNAL}")
        op.execute(f"DROP TRIGGER {_JOURNAL}_no_truncate ON {_JOURNAL}")
        op.execute("DROP FUNCTION exchange_reject_journal_change()")
    else:
        for operation in ("update", "delete"):
            op.execute(f"DROP TRIGGER {_JOURNAL}_no_{operation}")
    op.drop_index("ix_exchange_alerts_open", table_name="exchange_alerts")
    op.drop_table("exchange_alerts")
    op.drop_table("exchange_notices")
    op.drop_index("ix_exchange_journal_kind", table_name=_JOURNAL)
    op.drop_index("ix_exchange_journal_client", table_name=_JOURNAL)
    op.drop_index("ix_exchange_journal_stream", table_name=_JOURNAL)
    op.drop_table(_JOURNAL)
    op.drop_table("exchange_margins")
    op.drop_table("exchange_exposures")
    op.drop_table("exchange_prices")
    op.drop_table("exchange_leaves")
    op.drop_table("exchange_statement_digests")
    op.drop_table("exchange_streams")
