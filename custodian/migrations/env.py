"""Alembic environment of the custody book: :func:`bridge.database.run_migration_environment`
with the book's metadata, version table and engine. Run through :mod:`custodian.migrations`."""

from __future__ import annotations

from bridge.database import run_migration_environment
from custodian.migrations import VERSION_TABLE
from custodian.store import create_book_engine, metadata

run_migration_environment(
    metadata=metadata,
    version_table=VERSION_TABLE,
    create_engine=create_book_engine,
    owner="custody book migrations",
)
