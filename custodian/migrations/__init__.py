"""Schema migrations of the custody book (Alembic), run from code: no alembic.ini.

What this module does: upgrade (or downgrade) a book database to a revision, and report the
revision a database is at and the newest one this code knows. The book keeps its Alembic version
in its own table (:data:`VERSION_TABLE`), so other packages can migrate their own tables in the
same database. On PostgreSQL an upgrade holds a transaction-level advisory lock, so two processes
starting at once do not both run it. The runner itself is :mod:`bridge.database`'s; this module
names the book's migrations, version table and lock.

What it does not do: create tables from the models (``create_all`` is never used: the migrations
are the schema, and tests run them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from sqlalchemy import Engine

from bridge import database as _shared

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent
VERSION_TABLE: Final = "custodian_alembic_version"
_ADVISORY_LOCK_KEY: Final = 0x6D63_625F_626F_6F6B  # "mcb_book": serializes concurrent upgrades


def _create_engine(url: str) -> Engine:
    from custodian.store import create_book_engine  # noqa: PLC0415 - the store imports this module

    return create_book_engine(url)


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
