"""Custody book: balances, journal entries, postings; the journal is insert-only.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
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

# Money: exact signed integers below 2**128 in magnitude. PostgreSQL has NUMERIC(39, 0); SQLite's
# INTEGER stops at 2**63, so the canonical decimal string is stored (TEXT affinity keeps it exact).
_CUSTODIAN = "@custodian"
_JOURNAL_TABLES = ("book_journal_entries", "book_postings")

# Checks written per dialect, because the SQLite columns hold decimal strings.
_CHECKS = {
    "postgresql": {
        "ck_book_balances_client_non_negative": f"holder = '{_CUSTODIAN}' OR balance >= 0",
        "ck_book_balances_external_non_positive": f"holder <> '{_CUSTODIAN}' OR balance <= 0",
        "ck_book_postings_amount_non_zero": "amount <> 0",
    },
    "sqlite": {
        "ck_book_balances_client_non_negative": f"holder = '{_CUSTODIAN}' OR balance NOT LIKE '-%'",
        "ck_book_balances_external_non_positive": (
            f"holder <> '{_CUSTODIAN}' OR balance = '0' OR balance LIKE '-%'"
        ),
        "ck_book_postings_amount_non_zero": "amount <> '0'",
    },
}


def _units() -> sa.types.TypeEngine[Any]:
    return sa.String(40).with_variant(sa.Numeric(39, 0), "postgresql")


def _entry_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _check(table: str, name: str) -> sa.CheckConstraint:
    del table
    return sa.CheckConstraint(_CHECKS[op.get_context().dialect.name][name], name=name)


def upgrade() -> None:
    op.create_table(
        "book_balances",
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("asset", sa.String(16), nullable=False),
        sa.Column("sub_account", sa.String(80), nullable=False),
        sa.Column("balance", _units(), nullable=False),
        sa.Column("last_entry_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("holder", "asset", "sub_account", name="pk_book_balances"),
        _check("book_balances", "ck_book_balances_client_non_negative"),
        _check("book_balances", "ck_book_balances_external_non_positive"),
    )
    op.create_table(
        "book_journal_entries",
        sa.Column("entry_id", _entry_id(), primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("command_digest", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("client", sa.String(128), nullable=False),
        sa.Column("asset", sa.String(16), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("idempotency_key", name="uq_book_journal_entries_idempotency_key"),
        sqlite_autoincrement=True,  # SQLite: ids of rolled-back entries are never handed out again
    )
    op.create_index(
        "ix_book_journal_entries_client_asset", "book_journal_entries", ["client", "asset"]
    )
    op.create_table(
        "book_postings",
        sa.Column("entry_id", _entry_id(), nullable=False, autoincrement=False),
        sa.Column("line", sa.SmallInteger(), nullable=False, autoincrement=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("asset", sa.String(16), nullable=False),
        sa.Column("sub_account", sa.String(80), nullable=False),
        sa.Column("amount", _units(), nullable=False),
        sa.PrimaryKeyConstraint("entry_id", "line", name="pk_book_postings"),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["book_journal_entries.entry_id"],
            name="fk_book_postings_entry_id_book_journal_entries",
        ),
        sa.ForeignKeyConstraint(
            ["holder", "asset", "sub_account"],
            ["book_balances.holder", "book_balances.asset", "book_balances.sub_account"],
            name="fk_book_postings_account_book_balances",
        ),
        _check("book_postings", "ck_book_postings_amount_non_zero"),
    )
    op.create_index("ix_book_postings_account", "book_postings", ["holder", "asset", "sub_account"])
    _create_insert_only_guards()


def _create_insert_only_guards() -> None:
    """Journal entries and postings are insert-only: the database refuses UPDATE, DELETE and (on
    PostgreSQL) TRUNCATE on them, whoever asks."""
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION book_reject_journal_change() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'the custody journal is insert-only: % on % refused',
                    TG_OP, TG_TABLE_NAME;
            END
            $$
            """
        )
        for table in _JOURNAL_TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_insert_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION book_reject_journal_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION book_reject_journal_change()"
            )
        return
    for table in _JOURNAL_TABLES:
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'the custody journal is insert-only: {operation} "
                f"on {table} refused'); END"
            )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for table in _JOURNAL_TABLES:
            op.execute(f"DROP TRIGGER {table}_insert_only ON {table}")
            op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION book_reject_journal_change()")
    else:
        for table in _JOURNAL_TABLES:
            for operation in ("update", "delete"):
                op.execute(f"DROP TRIGGER {table}_no_{operation}")
    op.drop_index("ix_book_postings_account", table_name="book_postings")
    op.drop_table("book_postings")
    op.drop_index("ix_book_journal_entries_client_asset", table_name="book_journal_entries")
    op.drop_table("book_journal_entries")
    op.drop_table("book_balances")
