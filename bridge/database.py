"""The SQL plumbing shared by the services that keep state in SQLite or PostgreSQL.

What this module does: the column types both databases must agree on (exact integers below
2**128, timezone-aware UTC timestamps, row ids), an engine factory that accepts only SQLite and
PostgreSQL and makes SQLite take its write lock at ``BEGIN``, the translation of driver errors
into the project's hierarchy (a busy or unreachable database is a
:class:`~attestations.errors.TransientError` of the caller's choosing), a retry loop for
transactions the database aborted because of a concurrent one, and the Alembic runner and
environment behind each package's ``migrations`` module.

What it does not do: own any table, metadata or migration. The bridge (:mod:`bridge.outbox`,
:mod:`bridge.migrations`), the custody book (:mod:`custodian.store`, :mod:`custodian.migrations`)
and the exchange's ledger (:mod:`exchange.store`, :mod:`exchange.migrations`) each keep their own,
with their own error classes and version table, and pass them in here. Nothing in this module
imports any of those packages.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Numeric,
    String,
    event,
    make_url,
)
from sqlalchemy import create_engine as sqlalchemy_create_engine
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.types import TypeDecorator, TypeEngine

from attestations.amounts import UNITS_LIMIT
from attestations.errors import (
    AmountError,
    ConfigurationError,
    FloatRejected,
    InvariantViolation,
    TransientError,
)

SUPPORTED_DIALECTS: Final = frozenset({"sqlite", "postgresql"})
DEFAULT_MAX_ATTEMPTS: Final = 5
"""Tries of one transaction when the database aborts it for a lock conflict."""
_RETRY_SQLSTATES: Final = frozenset({"40001", "40P01", "55P03"})
# serialization_failure, deadlock_detected, lock_not_available: the transaction was rolled back
# and the same work may succeed on a second try.

T = TypeVar("T")


# --- column types -------------------------------------------------------------------------------

_UNITS_TEXT_RE: Final = re.compile(r"0|-?[1-9][0-9]{0,38}")
"""The canonical decimal text of an integer below 2**128 in magnitude, as SQLite stores one."""


class Units(TypeDecorator[int]):
    """Exact signed integers with magnitude below 2**128 (money in minor units, quantities,
    prices' mantissas): ``NUMERIC(39, 0)`` on PostgreSQL, the canonical decimal string on SQLite
    (whose INTEGER stops at 2**63 and whose NUMERIC affinity would turn larger values into lossy
    floats). Reads return ``int``; a float, a bool or an out-of-range value is refused before it
    reaches the database. A stored value that is not a canonical integer (the table was changed
    behind the service's back) raises :attr:`corrupted_error`, its message starting with
    :attr:`stored_what`; each package subclasses this to choose both (a subclass must set
    ``cache_ok`` again: SQLAlchemy reads it per class)."""

    impl = String(40)
    cache_ok = True
    corrupted_error: ClassVar[type[Exception]] = InvariantViolation
    stored_what: ClassVar[str] = "stored amount"

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Numeric(39, 0, asdecimal=True))
        return dialect.type_descriptor(String(40))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, float):
            raise FloatRejected(f"float {value!r} offered as stored money")
        if isinstance(value, bool) or not isinstance(value, int):
            raise AmountError(f"stored money must be int, got {type(value).__name__}")
        if abs(value) >= UNITS_LIMIT:
            raise AmountError(f"stored money {value} is beyond 128 bits")
        return Decimal(value) if dialect.name == "postgresql" else str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if isinstance(value, Decimal):
            if value != value.to_integral_value():
                raise self.corrupted_error(f"{self.stored_what} {value} is not an integer")
            return int(value)
        if isinstance(value, str) and _UNITS_TEXT_RE.fullmatch(value):
            return int(value)
        raise self.corrupted_error(
            f"{self.stored_what} {str(value)[:50]!r} is not a canonical integer"
        )

    @property
    def python_type(self) -> type[int]:
        return int


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on both databases (SQLite keeps no zone, so it is stored
    converted to UTC and read back as UTC). A naive timestamp is refused before it reaches the
    database, with :attr:`naive_error`; each package subclasses this to name itself and choose
    that error (a subclass must set ``cache_ok`` again: SQLAlchemy reads it per class)."""

    impl = DateTime(timezone=True)
    cache_ok = True
    naive_error: ClassVar[type[Exception]] = InvariantViolation
    stored_by: ClassVar[str] = "the service"

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise self.naive_error(f"timestamps stored by {self.stored_by} must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def row_id_type() -> TypeEngine[int]:
    """The type of an autoincrementing row id."""
    # BIGINT on PostgreSQL; INTEGER on SQLite, where only "INTEGER PRIMARY KEY" is the rowid.
    return BigInteger().with_variant(Integer(), "sqlite")


# --- engines ------------------------------------------------------------------------------------


SQLITE_LOCK_TIMEOUT_S: Final = 5.0
"""How long a transaction waits for a SQLite database's write lock before it fails as "database
is locked" (and is retried): the in-process lock and SQLite's own busy timeout both."""
READ_ONLY_OPTION: Final = "mcb_read_only"
"""Execution option of a connection whose transaction only reads (see :func:`read_only`)."""


class _WriteLocks:
    """One :class:`threading.Lock` per SQLite database file, shared by every engine of the
    process (the book, the service and the relay each open the same file).

    Why: SQLite lets one writer in at a time, and a connection that finds the write lock taken
    sleeps in its busy handler (1, 2, 5, 10, ... 100 ms) instead of being woken when the lock is
    released; under load the sleeps, not the work, made the latency. Taking this lock before
    ``BEGIN IMMEDIATE`` queues the writers of this process on a lock that wakes the next one at
    once. SQLite's own lock still guards against other processes, so correctness never depends
    on this one."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def for_path(self, path: str) -> threading.Lock:
        key = os.path.normcase(os.path.realpath(path))
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


_write_locks: Final = _WriteLocks()


def sqlite_write_lock(path: str | os.PathLike[str]) -> threading.Lock:
    """The in-process write lock of the SQLite database file at ``path`` (the same object for
    every spelling of the path)."""
    return _write_locks.for_path(os.fspath(path))


class _SqliteConnection(sqlite3.Connection):
    """A pysqlite connection that gives the file's in-process write lock back when its
    transaction ends (commit, rollback or close), whichever way SQLAlchemy ends it.

    The lock is taken in the engine's ``begin`` event; it is released here, after SQLite itself
    released its write lock, because SQLAlchemy's ``commit``/``rollback`` events run *before* the
    driver's commit and rollback."""

    write_lock: threading.Lock | None = None
    holds_write_lock: bool = False
    query_only: bool = False

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._after_transaction()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._after_transaction()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.release_write_lock()

    def _after_transaction(self) -> None:
        try:
            if self.in_transaction:
                return  # the commit failed and the transaction is still open: keep the lock
            if self.query_only:
                self.query_only = False
                self.execute("PRAGMA query_only = OFF")
        except sqlite3.ProgrammingError:
            pass  # closed: nothing to reset, and nothing of SQLite's is held any more
        self.release_write_lock()

    def release_write_lock(self) -> None:
        if self.holds_write_lock and self.write_lock is not None:
            self.holds_write_lock = False
            self.write_lock.release()


def _sqlite_file(url: URL) -> str | None:
    """The file of a plain ``sqlite:///path`` URL; None for memory databases and ``file:``
    URIs (those get no in-process lock, only SQLite's own)."""
    database = url.database
    if (
        not database
        or database == ":memory:"
        or url.query.get("uri")
        or database.startswith("file:")
    ):
        return None
    return database


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it to the first
    # write, after the reads the write depends on).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL: a reader reads a consistent snapshot without blocking the writer or waiting for
        # it, and a commit costs one fsync of the log instead of the rollback journal's several.
        # The mode is persistent in the file; a memory database answers "memory" and stays so.
        cursor.execute("PRAGMA journal_mode = WAL")
        # FULL (not WAL's usual NORMAL): the log is synced at every commit, so a transaction
        # reported committed survives a power failure. This is the custody book's money.
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _sqlite_on_connect_with_foreign_keys(dbapi_connection: Any, record: Any) -> None:
    _sqlite_on_connect(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    raw = connection.connection.dbapi_connection
    ours = raw if isinstance(raw, _SqliteConnection) else None
    if connection.get_execution_options().get(READ_ONLY_OPTION):
        # A deferred BEGIN takes no lock; in WAL mode the first read fixes the snapshot the
        # whole transaction reads. query_only makes a write in it fail instead of racing.
        if ours is not None:
            ours.query_only = True
        connection.exec_driver_sql("PRAGMA query_only = ON")
        connection.exec_driver_sql("BEGIN")
        return
    # Take the write lock before the first read: what a transaction reads cannot change before it
    # writes (SQLite has no SELECT ... FOR UPDATE).
    if ours is not None and ours.write_lock is not None:
        if not ours.write_lock.acquire(timeout=SQLITE_LOCK_TIMEOUT_S):
            raise OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
            )
        ours.holds_write_lock = True
    try:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        if ours is not None:
            ours.release_write_lock()
        raise


def read_only(engine: Engine) -> Engine:
    """``engine`` for transactions that only read. On SQLite they begin with a plain (deferred)
    ``BEGIN``, take neither the in-process nor SQLite's write lock, read one consistent snapshot
    (WAL), and fail on any write. On PostgreSQL nothing changes."""
    return engine.execution_options(**{READ_ONLY_OPTION: True})


def create_database_engine(
    url: str,
    *,
    owner: str,
    unsupported: type[ConfigurationError],
    sqlite_foreign_keys: bool,
) -> Engine:
    """An engine on a ``sqlite:///path`` or ``postgresql+psycopg://...`` URL. Any other database
    raises ``unsupported`` with a message naming ``owner`` (the bridge, the custody book).

    On SQLite: the database is put in WAL mode with ``synchronous = FULL``; every transaction
    starts with ``BEGIN IMMEDIATE`` after taking the file's in-process write lock
    (:func:`sqlite_write_lock`), except those of :func:`read_only` engines; foreign keys are
    enforced when ``sqlite_foreign_keys`` is true (SQLite ignores them otherwise)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_file(parsed)
        engine = sqlalchemy_create_engine(
            parsed,
            # A file has no server that could have dropped the connection: no ping per checkout.
            pool_pre_ping=False,
            connect_args={"factory": _SqliteConnection, "timeout": SQLITE_LOCK_TIMEOUT_S},
        )
        lock = None if path is None else sqlite_write_lock(path)
        base_connect = (
            _sqlite_on_connect_with_foreign_keys if sqlite_foreign_keys else _sqlite_on_connect
        )

        def on_connect(dbapi_connection: Any, record: Any) -> None:
            base_connect(dbapi_connection, record)
            if isinstance(dbapi_connection, _SqliteConnection):
                dbapi_connection.write_lock = lock

        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    engine = sqlalchemy_create_engine(parsed, pool_pre_ping=True)
    if engine.dialect.name not in SUPPORTED_DIALECTS:
        engine.dispose()
        raise unsupported(f"{owner} runs on SQLite or PostgreSQL, not {url!r}")
    return engine


# --- errors and retries -------------------------------------------------------------------------


def is_lock_conflict(exc: DBAPIError) -> bool:
    """The database rolled the transaction back because of a concurrent one."""
    if getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    return isinstance(exc, OperationalError) and "locked" in str(exc.orig)


@contextlib.contextmanager
def database_errors(what: str, *, unavailable: type[TransientError]) -> Iterator[None]:
    """Wrap driver errors that mean "not now" as ``unavailable``."""
    try:
        yield
    except OperationalError as exc:
        raise unavailable(f"{what}: {exc.orig}") from exc


def verify_schema_current(
    engine: Engine,
    *,
    current_revision: Callable[[Connection], str | None],
    head_revision: str | None,
    schema: str,
    upgrade_with: str,
    unavailable: type[TransientError],
    not_current: type[ConfigurationError],
) -> None:
    """Raise ``not_current`` unless ``engine``'s database is at ``head_revision`` according to
    ``current_revision``; ``unavailable`` when it cannot be read. ``schema`` names the schema and
    ``upgrade_with`` the function that migrates it, in the message."""
    with (
        database_errors(f"reading the {schema} revision", unavailable=unavailable),
        engine.connect() as connection,
    ):
        current = current_revision(connection)
    if current != head_revision:
        raise not_current(
            f"{schema} is at revision {current!r}, this code needs {head_revision!r}: "
            f"run {upgrade_with}"
        )


def run_with_retries(
    attempt: Callable[[], T],
    *,
    what: str,
    max_attempts: int,
    unavailable: type[TransientError],
    corrupted: type[InvariantViolation],
) -> T:
    """Call ``attempt`` (one whole transaction, committed or rolled back before it returns) until
    it succeeds, at most ``max_attempts`` times, backing off between tries.

    Retried: lock conflicts, and unique-key conflicts (a concurrent transaction inserted the same
    row first: the next try sees it). After the last try a conflict that persists raises
    ``corrupted`` for a constraint, ``unavailable`` for a lock. Any other operational error
    raises ``unavailable`` at once; every other exception propagates unchanged."""
    last: DBAPIError | None = None
    for tried in range(max_attempts):
        try:
            return attempt()
        except IntegrityError as exc:
            last = exc
        except OperationalError as exc:
            if not is_lock_conflict(exc):
                raise unavailable(f"{what}: {exc.orig}") from exc
            last = exc
        except DBAPIError as exc:
            if not is_lock_conflict(exc):
                raise
            last = exc
        time.sleep(0.005 * 2**tried)
    if isinstance(last, IntegrityError):
        raise corrupted(f"{what}: keeps violating a constraint: {last.orig}") from last
    raise unavailable(f"{what}: database busy after {max_attempts} attempts") from last


# --- migrations ---------------------------------------------------------------------------------


def _alembic_config(
    script_location: Path,
    *,
    version_table: str | None = None,
    connection: Connection | None = None,
) -> Config:
    config = Config()
    # ConfigParser interpolates "%": escape it in the path.
    config.set_main_option("script_location", str(script_location).replace("%", "%%"))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = version_table
    return config


@dataclass(frozen=True, slots=True)
class Migrations:
    """One package's Alembic migrations, run from code (no alembic.ini): the folder of its
    scripts, the table that keeps its version (its own, so several packages migrate their tables
    in one database without meeting), the PostgreSQL advisory lock that serializes concurrent
    upgrades, and how to open an engine on a URL. Each package's ``migrations`` module builds one
    and exposes its methods as its functions."""

    script_location: Path
    version_table: str
    lock_key: int
    create_engine: Callable[[str], Engine]

    def head_revision(self) -> str | None:
        """The newest revision of these migrations."""
        return ScriptDirectory.from_config(_alembic_config(self.script_location)).get_current_head()

    def current_revision(self, connection: Connection) -> str | None:
        """The revision ``connection``'s database is at (None when it was never migrated)."""
        migration = MigrationContext.configure(
            connection, opts={"version_table": self.version_table}
        )
        return migration.get_current_revision()

    def upgrade(self, database: str | Engine, revision: str = "head") -> None:
        """Migrate ``database`` (a URL, opened with :attr:`create_engine`, or an engine) up to
        ``revision`` in one transaction. Running it on an up-to-date database does nothing."""
        self._run(database, lambda config: command.upgrade(config, revision))

    def downgrade(self, database: str | Engine, revision: str) -> None:
        """Migrate ``database`` down to ``revision`` (``"base"`` drops every table of these
        migrations) in one transaction."""
        self._run(database, lambda config: command.downgrade(config, revision))

    def _run(self, database: str | Engine, step: Callable[[Config], None]) -> None:
        engine = self.create_engine(database) if isinstance(database, str) else database
        try:
            with engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    # Transaction-level: two processes starting at once do not both migrate.
                    connection.exec_driver_sql(
                        f"SELECT pg_advisory_xact_lock({int(self.lock_key)})"
                    )
                step(
                    _alembic_config(
                        self.script_location,
                        version_table=self.version_table,
                        connection=connection,
                    )
                )
        finally:
            if isinstance(database, str):
                engine.dispose()


def run_migration_environment(
    *,
    metadata: MetaData,
    version_table: str,
    create_engine: Callable[[str], Engine],
    owner: str,
) -> None:
    """The body of a package's Alembic ``env.py``. Run through :func:`upgrade` or
    :func:`downgrade`, which pass an open connection in ``config.attributes["connection"]``;
    without one (the ``alembic`` command line) ``sqlalchemy.url`` must be set on the config,
    and offline mode writes SQL scripts from it. ``owner`` names the migrations in errors."""
    config = context.config
    passed_table = config.attributes.get("version_table")
    if passed_table is not None and passed_table != version_table:
        raise ConfigurationError(
            f"{owner} keep their version in {version_table!r}, not {passed_table!r}"
        )
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=metadata,
            version_table=version_table,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    def configure_and_run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=version_table,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    connection = config.attributes.get("connection")
    if connection is not None:
        configure_and_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError(f"{owner} need a connection or sqlalchemy.url")
    engine = create_engine(url)
    try:
        with engine.begin() as own_connection:
            configure_and_run(own_connection)
    finally:
        engine.dispose()
