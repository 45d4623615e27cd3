"""Alembic environment of the bridge tables. Run through :mod:`bridge.migrations`, which passes an
open connection in ``config.attributes["connection"]``; offline mode (SQL scripts) needs
``sqlalchemy.url`` set on the config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from bridge.migrations import VERSION_TABLE
from bridge.outbox import create_bridge_engine, metadata

config = context.config


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("bridge migrations need a connection or sqlalchemy.url")
    engine = create_bridge_engine(url)
    try:
        with engine.begin() as own_connection:
            _configure_and_run(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
