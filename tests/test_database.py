"""The SQL plumbing of bridge/database.py under concurrency: the in-process write lock shared by
every engine on one SQLite file, read-only transactions that take no lock, WAL with full sync,
and the custody book's pledge reads that only look at what changed (checked against a full read,
on SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from attestations.amounts import UNITS_LIMIT, Asset
from attestations.errors import AmountError, ConfigurationError, FloatRejected, InvariantViolation
from bridge import database
from bridge.database import (
    create_database_engine,
    is_lock_conflict,
    read_only,
    sqlite_write_lock,
)
from custodian import store as book_store
from custodian.book import Deposit, MoveToSettlement, Pledge, Unpledge, pledged_to
from custodian.errors import BookCorrupted, InsufficientBalance
from custodian.store import CustodyBook
from exchange import store as exchange_store

NOW = datetime(2025, 11, 25, 8, 0, tzinfo=UTC)
ASSETS = [Asset("BTC", 8), Asset("ETH", 18)]
WAIT_S = 2.0
"""Upper bound for anything that should happen at once; far below the 5 s lock timeout."""


def open_engine(url: str) -> Engine:
    return create_database_engine(
        url, owner="the tests", unsupported=ConfigurationError, sqlite_foreign_keys=False
    )


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    path = tmp_path / "shared.sqlite3"
    engine = open_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER)")
            connection.exec_driver_sql("INSERT INTO counter VALUES (1, 0)")
    finally:
        engine.dispose()
    return path


@pytest.fixture
def engines(sqlite_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two engines on one file, the second through another spelling of its path."""
    first = open_engine(f"sqlite:///{sqlite_path}")
    relative = os.path.relpath(sqlite_path.parent / "." / sqlite_path.name)
    second = open_engine(f"sqlite:///{relative}")
    try:
        yield first, second
    finally:
        first.dispose()
        second.dispose()


def read_counter(engine: Engine) -> int:
    with read_only(engine).connect() as connection:
        return int(connection.exec_driver_sql("SELECT n FROM counter").scalar_one())


# --- the write lock -------------------------------------------------------------------------------


def test_every_spelling_of_a_path_names_one_lock(sqlite_path: Path) -> None:
    relative = os.path.relpath(sqlite_path)
    assert sqlite_write_lock(sqlite_path) is sqlite_write_lock(relative)
    assert sqlite_write_lock(sqlite_path) is not sqlite_write_lock(sqlite_path.with_name("other"))


def test_concurrent_writers_on_two_engines_all_succeed_one_at_a_time(
    engines: tuple[Engine, Engine],
) -> None:
    inside = 0
    most_inside = 0
    guard = threading.Lock()
    failures: list[BaseException] = []

    def increment(engine: Engine, times: int) -> None:
        nonlocal inside, most_inside
        try:
            for _ in range(times):
                with engine.begin() as connection:
                    with guard:
                        inside += 1
                        most_inside = max(most_inside, inside)
                    # Read, yield the GIL, write: a lost update if two ran at once.
                    n = connection.exec_driver_sql("SELECT n FROM counter").scalar_one()
                    time.sleep(0.001)
                    connection.exec_driver_sql("UPDATE counter SET n = ?", (n + 1,))
                    with guard:
                        inside -= 1
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            failures.append(exc)

    threads = [threading.Thread(target=increment, args=(engines[i % 2], 25)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert most_inside == 1
    assert read_counter(engines[0]) == 150
    assert not sqlite_write_lock(engines[0].url.database or "").locked()


def test_a_waiting_writer_is_woken_when_the_holder_commits(
    engines: tuple[Engine, Engine],
) -> None:
    first, second = engines
    started = threading.Event()
    finished: list[float] = []

    def write_second() -> None:
        started.set()
        with second.begin() as connection:
            connection.exec_driver_sql("UPDATE counter SET n = n + 10")
        finished.append(time.monotonic())

    with first.begin() as connection:
        connection.exec_driver_sql("UPDATE counter SET n = n + 1")
        thread = threading.Thread(target=write_second)
        thread.start()
        started.wait(WAIT_S)
        time.sleep(0.2)
        assert finished == []  # queued behind the open transaction
        committed = time.monotonic()
    thread.join(WAIT_S)
    assert finished
    # Woken by the lock, not by SQLite's busy handler (whose sleeps reach 100 ms each).
    assert finished[0] - committed < 0.05
    assert read_counter(first) == 11


def test_a_rolled_back_transaction_releases_the_lock(engines: tuple[Engine, Engine]) -> None:
    first, second = engines

    def abandon() -> None:
        with first.begin() as connection:
            connection.exec_driver_sql("UPDATE counter SET n = 99")
            raise RuntimeError("abandon")

    with pytest.raises(RuntimeError):
        abandon()
    assert not sqlite_write_lock(first.url.database or "").locked()
    with second.begin() as connection:
        connection.exec_driver_sql("UPDATE counter SET n = n + 1")
    assert read_counter(first) == 1


def test_a_writer_that_cannot_get_the_lock_fails_as_a_retriable_lock_conflict(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = engines
    monkeypatch.setattr(database, "SQLITE_LOCK_TIMEOUT_S", 0.1)
    lock = sqlite_write_lock(first.url.database or "")
    assert lock.acquire(timeout=WAIT_S)
    try:
        with pytest.raises(OperationalError) as raised, first.begin() as connection:
            connection.exec_driver_sql("UPDATE counter SET n = 5")
        assert is_lock_conflict(raised.value)
    finally:
        lock.release()
    with first.begin() as connection:
        connection.exec_driver_sql("UPDATE counter SET n = 5")
    assert read_counter(first) == 5


def test_memory_databases_get_no_shared_lock() -> None:
    engine = open_engine("sqlite://")
    try:
        with engine.begin() as connection:
            assert connection.exec_driver_sql("SELECT 1").scalar_one() == 1
            raw = connection.connection.dbapi_connection
            assert getattr(raw, "write_lock", None) is None
    finally:
        engine.dispose()


# --- read-only transactions ------------------------------------------------------------------


def test_a_reader_neither_blocks_a_writer_nor_sees_its_commit(
    engines: tuple[Engine, Engine],
) -> None:
    first, second = engines
    with read_only(first).begin() as reader:
        before = reader.exec_driver_sql("SELECT n FROM counter").scalar_one()
        done = threading.Event()

        def write() -> None:
            with second.begin() as connection:
                connection.exec_driver_sql("UPDATE counter SET n = n + 7")
            done.set()

        thread = threading.Thread(target=write)
        thread.start()
        assert done.wait(WAIT_S)  # committed while the reader is still open
        thread.join(WAIT_S)
        # One snapshot for the whole read transaction.
        assert reader.exec_driver_sql("SELECT n FROM counter").scalar_one() == before
    assert read_counter(first) == before + 7


def test_a_write_in_a_read_only_transaction_fails_and_the_connection_writes_after(
    engines: tuple[Engine, Engine],
) -> None:
    first, _ = engines
    with pytest.raises(DBAPIError), read_only(first).begin() as reader:
        reader.exec_driver_sql("UPDATE counter SET n = 1000")
    assert read_counter(first) == 0
    assert not sqlite_write_lock(first.url.database or "").locked()
    # The pool hands the same connection out again: it is writable for a normal transaction.
    with first.begin() as connection:
        connection.exec_driver_sql("UPDATE counter SET n = 3")
    assert read_counter(first) == 3


def test_sqlite_files_are_in_wal_mode_with_full_sync(engines: tuple[Engine, Engine]) -> None:
    with engines[0].connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL


def test_read_only_transactions_read_and_write_as_usual_elsewhere(database_url: str) -> None:
    engine = open_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE things (id INTEGER PRIMARY KEY)"))
            connection.execute(sa.text("INSERT INTO things VALUES (1)"))
        with read_only(engine).begin() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM things")).scalar_one() == 1
        with engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO things VALUES (2)"))
        with read_only(engine).connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM things")).scalar_one() == 2
    finally:
        engine.dispose()


# --- exact integers -----------------------------------------------------------------------------


class DamagedAmount(InvariantViolation):
    reason = "damaged_amount"


class ProbeUnits(database.Units):
    cache_ok = True
    corrupted_error = DamagedAmount
    stored_what = "test amount"


def units_table(engine: Engine) -> sa.Table:
    """A table whose ``v`` column is raw on purpose: NUMERIC without scale on PostgreSQL and TEXT
    on SQLite accept values a Units column would never write, as a tampered table could hold."""
    raw = "NUMERIC" if engine.dialect.name == "postgresql" else "TEXT"
    with engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE TABLE amounts (id INTEGER PRIMARY KEY, v {raw})")
    return sa.Table(
        "amounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", ProbeUnits),
    )


def test_units_store_every_integer_below_2_128_exactly(database_url: str) -> None:
    engine = open_engine(database_url)
    try:
        table = units_table(engine)
        values = [0, 1, -1, 2**63, -(2**63) - 1, UNITS_LIMIT - 1, -(UNITS_LIMIT - 1)]
        with engine.begin() as connection:
            connection.execute(table.insert(), [{"id": i, "v": v} for i, v in enumerate(values)])
            connection.execute(table.insert().values(id=len(values), v=None))
        with engine.connect() as connection:
            read = connection.execute(sa.select(table.c.v).order_by(table.c.id)).scalars().all()
        assert read == [*values, None]
        assert all(type(v) is int for v in read[:-1])
        for bad, error in ((1.5, FloatRejected), (UNITS_LIMIT, AmountError), (True, AmountError)):
            with pytest.raises(sa.exc.StatementError) as raised, engine.begin() as connection:
                connection.execute(table.insert().values(id=99, v=bad))
            assert isinstance(raised.value.orig, error)  # refused before reaching the database
    finally:
        engine.dispose()


def test_a_stored_value_that_is_not_a_canonical_integer_raises_the_configured_error(
    database_url: str,
) -> None:
    engine = open_engine(database_url)
    try:
        table = units_table(engine)
        damaged = (
            ["1.5"] if engine.dialect.name == "postgresql" else ["1.5", "01", "-0", "1e3", " 1"]
        )
        for value in damaged:
            with engine.begin() as connection:
                connection.execute(sa.text("DELETE FROM amounts"))
                connection.execute(sa.text("INSERT INTO amounts VALUES (1, :v)"), {"v": value})
            with (
                pytest.raises(DamagedAmount, match=r"^test amount "),
                engine.connect() as connection,
            ):
                connection.execute(sa.select(table.c.v)).scalar_one()
    finally:
        engine.dispose()


def test_each_package_names_its_own_error_for_a_damaged_amount() -> None:
    dialect = sa.create_engine("sqlite://").dialect
    for units, error in (
        (book_store.Units(), BookCorrupted),
        (exchange_store.Units(), InvariantViolation),
    ):
        with pytest.raises(error):
            units.process_result_value("01", dialect)
        assert units.process_result_value("-12", dialect) == -12


# --- pledges read by change -------------------------------------------------------------------


def full_pledged(book: CustodyBook, exchange: str) -> dict[tuple[str, str], int]:
    with book.engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT holder, asset, balance FROM book_balances WHERE sub_account = :s"),
            {"s": pledged_to(exchange)},
        ).all()
    return {(h, a): int(b) for h, a, b in sorted(rows) if int(b)}


def test_pledged_follows_every_change_and_matches_a_full_read(database_url: str) -> None:
    with (
        CustodyBook.open(database_url, assets=ASSETS) as book,
        CustodyBook(book.engine, assets=ASSETS) as other,
    ):
        assert book.pledged("binance") == {}
        for client in ("carol", "alice", "bob"):
            book.apply(Deposit(f"d-{client}", client, "BTC", 1_000), now=NOW)
        book.apply(Pledge("p1", "carol", "BTC", "binance", 10), now=NOW)
        assert book.pledged("binance") == {("carol", "BTC"): 10}
        # Changes made through another book object (another process, say) are seen too.
        other.apply(Pledge("p2", "alice", "BTC", "binance", 5), now=NOW)
        other.apply(Pledge("p3", "bob", "BTC", "okx", 7), now=NOW)
        book.apply(Pledge("p4", "carol", "BTC", "binance", 1), now=NOW)
        seen = book.pledged("binance")
        assert seen == {("alice", "BTC"): 5, ("carol", "BTC"): 11}
        assert list(seen) == sorted(seen)  # ordered by (client, asset), new holdings included
        assert book.pledged("okx") == {("bob", "BTC"): 7}
        # A holding that drops to zero leaves; a rejected command changes nothing.
        other.apply(Unpledge("u1", "alice", "BTC", "binance", 5, "ack-1"), now=NOW)
        other.apply(MoveToSettlement("m1", "carol", "BTC", "binance", 4), now=NOW)
        with pytest.raises(InsufficientBalance):
            other.apply(Pledge("p5", "bob", "BTC", "binance", 10_000), now=NOW)
        assert book.pledged("binance") == {("carol", "BTC"): 7}
        assert book.pledged("binance") == full_pledged(book, "binance")
        assert book.pledged("okx") == full_pledged(book, "okx")
        # A fresh book object reads everything once and then agrees.
        with CustodyBook(book.engine, assets=ASSETS) as fresh:
            assert fresh.pledged("binance") == book.pledged("binance")


def test_a_returned_pledge_map_is_the_callers_own(database_url: str) -> None:
    with CustodyBook.open(database_url, assets=ASSETS) as book:
        book.apply(Deposit("d", "alice", "ETH", 100), now=NOW)
        book.apply(Pledge("p", "alice", "ETH", "binance", 40), now=NOW)
        first = book.pledged("binance")
        first[("alice", "ETH")] = 1
        first[("mallory", "ETH")] = 10**9
        assert book.pledged("binance") == {("alice", "ETH"): 40}


def test_pledged_reads_while_commands_run_in_other_threads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'book.sqlite3'}"
    clients = [f"client-{i}" for i in range(8)]
    with CustodyBook.open(url, assets=ASSETS) as book:
        for client in clients:
            book.apply(Deposit(f"d-{client}", client, "BTC", 10_000), now=NOW)
        failures: list[BaseException] = []

        def pledge_in_turn(offset: int) -> None:
            try:
                for i in range(40):
                    client = clients[(i + offset) % len(clients)]
                    book.apply(Pledge(f"p-{offset}-{i}", client, "BTC", "binance", 1), now=NOW)
            except BaseException as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=pledge_in_turn, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        reads = 0
        while any(thread.is_alive() for thread in threads) and reads < 10_000:
            seen = book.pledged("binance")
            assert sum(seen.values()) <= 120
            reads += 1
        for thread in threads:
            thread.join(timeout=60)
        assert failures == []
        assert book.pledged("binance") == full_pledged(book, "binance")
        assert sum(book.pledged("binance").values()) == 120
