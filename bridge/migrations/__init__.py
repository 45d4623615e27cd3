"""Schema migrations of the bridge's tables (Alembic), run from code: no alembic.ini.

The bridge keeps two kinds of state in the database of the service it runs in: the producer's
outbox (:mod:`bridge.outbox`) and a consumer's progress and dead-letter record
(:mod:`bridge.consumer`). Both live in the *same* database as that service's own tables, because
the whole point is to write them in the same transaction. The bridge's Alembic version is kept in
its own table (:data:`VERSION_TABLE`), so the custody book's migrations and these never meet. On
PostgreSQL an upgrade holds a transaction-level advisory lock, so two processes starting at once
do not both run it.

This module only names the bridge's migrations; running them is :mod:`bridge.database`'s.

What it does not do: create tables from metadata (``create_all`` is never used: the migrations
are the schema, and the tests run them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from sqlalchemy import Engine

from bridge import database as _shared

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent
VERSION_TABLE: Final = "bridge_alembic_version"
_ADVISORY_LOCK_KEY: Final = 0x6D63_625F_6272_6467  # "mcb_brdg": serializes concurrent upgrades


def _create_engine(url: str) -> Engine:
    from bridge.outbox import create_bridge_engine  # noqa: PLC0415 - outbox imports this module

    return create_bridge_engine(url)


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
