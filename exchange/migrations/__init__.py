"""Schema migrations of the exchange's margin ledger (Alembic), run from code: no alembic.ini.

What this module does: upgrade (or downgrade) the ledger's tables in a database to a revision,
and report the revision a database is at and the newest one this code knows. The ledger keeps its
Alembic version in its own table (:data:`VERSION_TABLE`), so the bridge's tables (consumer
progress, dead letters, outbox), which live in the same database because they are written in the
same transactions, are migrated separately by :mod:`bridge.migrations`
(:func:`exchange.store.migrate` runs both). On PostgreSQL an upgrade holds a transaction-level
advisory lock, so two processes starting at once do not both run it. The runner itself is
:mod:`bridge.database`'s.

What it does not do: create tables from the table definitions (``create_all`` is never used: the
migrations are the schema, and the tests run them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from sqlalchemy import Engine

from bridge import database as _shared

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent
VERSION_TABLE: Final = "exchange_alembic_version"
_ADVISORY_LOCK_KEY: Final = 0x6D63_625F_6578_6368  # "mcb_exch": serializes concurrent upgrades


def _create_engine(url: str) -> Engine:
    from exchange.store import create_exchange_engine  # noqa: PLC0415 - the store imports this

    return create_exchange_engine(url)


_MIGRATIONS: Final = _shared.Migrations(
    script_location=MIGRATIONS_DIR,
    version_table=VERSION_TABLE,
    lock_key=_ADVISORY_LOCK_KEY,
    create_engine=_create_engine,
)

head_revision: Final = _MIGRATIONS.head_revision
current_revision: Final = _MIGRATIONS.current_revision
upgrade: Final = _MIGRATIONS.upgrade
downgrade: Final = _MIGRATIONS.downgrade
