"""Schema migrations of the bridge's tables (Alembic), run from code: no alembic.ini.

The bridge keeps two kinds of state in the database of the service it runs in: the producer's
outbox (:mod:`bridge.outbox`) and a consumer's progress and dead-letter record
(:mod:`bridge.consumer`). Both live in the *same* database as that service's own tables, because
the whole point is to write them in the same transaction. The bridge's Alembic version is kept in
its own table (:data:`VERSION_TABLE`), so the custody book's migrations and these never meet. On
PostgreSQL an upgrade holds a transaction-level advisory lock, so two processes starting at once
do not both run it.

What it does not do: create tables from metadata (``create_all`` is never used: the migrations
are the schema, and the tests run them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent
VERSION_TABLE: Final = "bridge_alembic_version"
_ADVISORY_LOCK_KEY: Final = 0x6D63_625F_6272_6467  # "mcb_brdg": serializes concurrent upgrades


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    # ConfigParser interpolates "%": escape it in the path.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision of the bridge schema."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision ``connection``'s database is at (None when it was never migrated)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(database: str | Engine, revision: str = "head") -> None:
    """Migrate the bridge tables of ``database`` (a URL or an engine) up to ``revision`` in one
    transaction. Running it on an up-to-date database does nothing."""
    _run(database, lambda config: command.upgrade(config, revision))


def downgrade(database: str | Engine, revision: str) -> None:
    """Migrate the bridge tables down to ``revision`` (``"base"`` drops them all)."""
    _run(database, lambda config: command.downgrade(config, revision))


def _run(database: str | Engine, step: Callable[[Config], None]) -> None:
    from bridge.outbox import create_bridge_engine  # noqa: PLC0415 - outbox imports this module

    engine = create_bridge_engine(database) if isinstance(database, str) else database
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_KEY})")
            step(_config(connection))
    finally:
        if isinstance(database, str):
            engine.dispose()
