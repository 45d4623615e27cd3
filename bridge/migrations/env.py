"""Alembic environment of the bridge tables: :func:`bridge.database.run_migration_environment`
with the bridge's metadata, version table and engine. Run through :mod:`bridge.migrations`."""

from __future__ import annotations

from bridge.database import run_migration_environment
from bridge.migrations import VERSION_TABLE
from bridge.outbox import create_bridge_engine, metadata

run_migration_environment(
    metadata=metadata,
    version_table=VERSION_TABLE,
    create_engine=create_bridge_engine,
    owner="bridge migrations",
)
