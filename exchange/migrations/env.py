"""Alembic environment of the exchange's ledger tables:
:func:`bridge.database.run_migration_environment` with the ledger's metadata, version table and
engine. Run through :mod:`exchange.migrations`."""

from __future__ import annotations

from bridge.database import run_migration_environment
from exchange.migrations import VERSION_TABLE
from exchange.store import create_exchange_engine, metadata

run_migration_environment(
    metadata=metadata,
    version_table=VERSION_TABLE,
    create_engine=create_exchange_engine,
    owner="exchange ledger migrations",
)
