"""Schema migrations of the custody book (Alembic), run from code: no alembic.ini.

What this module does: upgrade (or downgrade) a book database to a revision, and report the
revision a database is at and the newest one this code knows. The book keeps its Alembic version
in its own table (:data:`VERSION_TABLE`), so other packages can migrate their own tables in the
same database. On PostgreSQL an upgrade holds a transaction-level advisory lock, so two processes
starting at once do not both run it.

What it does not do: create tables from the models (``create_all`` is never used: the migrations
are the schema, and tests run them).
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
VERSION_TABLE: Final = "custodian_alembic_version"
_ADVISORY_LOCK_KEY: Final = 0x6D63_625F_626F_6F6B  # "mcb_book": serializes concurrent upgrades


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    # ConfigParser interpolates "%": escape it in the path.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision of the book schema."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision ``connection``'s database is at (None when it was never migrated)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(database: str | Engine, revision: str = "head") -> None:
    """Migrate the book schema of ``database`` (a URL or an engine) up to ``revision``, in one
    transaction. Running it on an up-to-date database does nothing."""
    _run(database, lambda config: command.upgrade(config, revision))


def downgrade(database: str | Engine, revision: str) -> None:
    """Migrate the book schema down to ``revision`` (``"base"`` drops every book table)."""
    _run(database, lambda config: command.downgrade(config, revision))


def _run(database: str | Engine, step: Callable[[Config], None]) -> None:
    from custodian.store import create_book_engine  # noqa: PLC0415 - the store imports this module

    engine = create_book_engine(database) if isinstance(database, str) else database
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_KEY})")
            step(_config(connection))
    finally:
        if isinstance(database, str):
            engine.dispose()
