"""The custody book on SQLite and PostgreSQL: migrations, exact money, one transaction per
command, idempotency, concurrency, the insert-only journal, and the same results as the
in-memory reference book for any command sequence."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, select

from attestations.amounts import UNITS_LIMIT, Asset
from attestations.errors import FloatRejected
from custodian import migrations
from custodian.book import (
    AVAILABLE,
    REDEEMING,
    SETTLEMENT,
    Account,
    AccrueYield,
    CancelRedemption,
    Command,
    CompleteRedemption,
    Deposit,
    LockForRedemption,
    MemoryBook,
    MoveToSettlement,
    Pledge,
    Unpledge,
    Withdraw,
    pledged_to,
)
from custodian.errors import (
    BookCorrupted,
    BookUnavailable,
    CustodyLimitExceeded,
    IdempotencyConflict,
    InsufficientBalance,
    SchemaNotCurrent,
    UnknownAsset,
)
from custodian.store import BalanceRow, CustodyBook, metadata

ASSETS = [Asset("BTC", 8), Asset("ETH", 18), Asset("BENJI", 6)]
MAX = UNITS_LIMIT - 1
NOW = datetime(2025, 11, 25, 8, 0, 0, 123456, tzinfo=UTC)
REJECTED = (IdempotencyConflict, InsufficientBalance, UnknownAsset, CustodyLimitExceeded)


@pytest.fixture
def book(database_url: str) -> Iterator[CustodyBook]:
    with CustodyBook.open(database_url, assets=ASSETS) as opened:
        yield opened


def available(client: str, asset: str) -> Account:
    return Account(client, asset, AVAILABLE)


def pledged(client: str, asset: str, exchange: str) -> Account:
    return Account(client, asset, pledged_to(exchange))


def count_rows(book: CustodyBook, table: str) -> int:
    with book.engine.connect() as connection:
        return int(connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


# --- migrations -----------------------------------------------------------------------------------


def test_migrations_build_exactly_the_schema_of_the_models(database_url: str) -> None:
    import custodian.service  # noqa: F401 - defines the epoch tables on the book's metadata

    migrations.upgrade(database_url)
    migrations.upgrade(database_url)  # a second run is a no-op
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            assert migrations.current_revision(connection) == migrations.head_revision()
            context = MigrationContext.configure(
                connection,
                opts={"compare_type": True, "version_table": migrations.VERSION_TABLE},
            )
            assert compare_metadata(context, metadata) == []
            tables = set(sa.inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert tables == {
        "book_balances",
        "book_journal_entries",
        "book_postings",
        "attestation_statements",  # custodian.service: the epochs' record of what was attested
        "attested_leaves",
        "attested_leaf_versions",  # custodian.history: every leaf's versions, by sequence
        "attested_leaf_history_starts",
        "book_release_acks",  # release acknowledgements received and verified, by release id
        migrations.VERSION_TABLE,
    }


def test_downgrade_removes_the_book_and_upgrade_restores_it(database_url: str) -> None:
    migrations.upgrade(database_url)
    migrations.downgrade(database_url, "base")
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) <= {migrations.VERSION_TABLE}
    finally:
        engine.dispose()
    migrations.upgrade(database_url)
    with CustodyBook.open(database_url, assets=ASSETS, migrate=False) as book:
        book.apply(Deposit("d", "alice", "BTC", 1))
        assert book.check_invariants() == []


def test_an_unmigrated_database_is_refused(database_url: str) -> None:
    with pytest.raises(SchemaNotCurrent):
        CustodyBook.open(database_url, assets=ASSETS, migrate=False)


def test_an_unreachable_database_is_transient() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2"
    with pytest.raises(BookUnavailable) as caught:
        CustodyBook.open(url, assets=ASSETS)
    assert caught.value.retriable


# --- money is stored exactly ----------------------------------------------------------------------


def test_money_extremes_round_trip(book: CustodyBook) -> None:
    values = [0, 1, 2**63 - 1, 2**63, 2**64, MAX]
    with Session(book.engine) as session:
        for index, value in enumerate(values):
            session.add(
                BalanceRow(
                    holder=f"c{index}",
                    asset="ETH",
                    sub_account=AVAILABLE,
                    balance=value,
                    last_entry_id=0,
                )
            )
            session.add(
                BalanceRow(
                    holder="@custodian",
                    asset=f"X{index}",
                    sub_account="external",
                    balance=-value,
                    last_entry_id=0,
                )
            )
        session.commit()
    with Session(book.engine) as session:
        stored = {(row.holder, row.asset): row.balance for row in session.exec(select(BalanceRow))}
    for index, value in enumerate(values):
        assert stored[(f"c{index}", "ETH")] == value
        assert type(stored[(f"c{index}", "ETH")]) is int
        assert stored[("@custodian", f"X{index}")] == -value


def test_largest_quantity_flows_through_the_book(book: CustodyBook) -> None:
    entry = book.apply(Deposit("d", "alice", "ETH", MAX), now=NOW)
    book.apply(Pledge("p", "alice", "ETH", "binance", MAX), now=NOW)
    assert book.pledged("binance") == {("alice", "ETH"): MAX}
    assert book.totals() == {"ETH": MAX}
    assert book.journal()[0] == entry
    assert entry.postings[0].amount == -MAX
    with pytest.raises(CustodyLimitExceeded):
        book.apply(Deposit("d2", "bob", "ETH", 1), now=NOW)
    book.apply(MoveToSettlement("s", "alice", "ETH", "binance", MAX), now=NOW)
    with Session(book.engine) as session:
        row = session.get(BalanceRow, ("alice", "ETH", AVAILABLE))
        assert row is not None
        assert row.balance == 0
    assert book.check_invariants() == []


def test_float_money_never_reaches_the_database(book: CustodyBook) -> None:
    with Session(book.engine) as session:
        row = BalanceRow(
            holder="alice", asset="BTC", sub_account=AVAILABLE, balance=1, last_entry_id=0
        )
        row.balance = 1.0  # type: ignore[assignment]
        session.add(row)
        with pytest.raises(sa.exc.StatementError) as caught:
            session.commit()
    assert isinstance(caught.value.orig, FloatRejected)


# --- commands -------------------------------------------------------------------------------------


def test_commands_balances_pledges_and_journal(book: CustodyBook) -> None:
    book.apply(Deposit("d1", "alice", "BTC", 100), now=NOW)
    book.apply(Deposit("d2", "bob", "BENJI", 5_000), now=NOW)
    book.apply(Pledge("p1", "alice", "BTC", "binance", 60), now=NOW)
    book.apply(Pledge("p2", "alice", "BTC", "okx", 30), now=NOW)
    book.apply(Pledge("p3", "bob", "BENJI", "binance", 5_000), now=NOW)
    unpledge = book.apply(Unpledge("u1", "alice", "BTC", "binance", 10, "ack-binance-1"), now=NOW)
    book.apply(MoveToSettlement("s1", "bob", "BENJI", "binance", 1_000), now=NOW)
    book.apply(Withdraw("w1", "alice", "BTC", 20), now=NOW)  # 100 - 60 - 30 + 10: all of it

    assert book.balances() == {  # zero balances are not listed
        pledged("alice", "BTC", "binance"): 50,
        pledged("alice", "BTC", "okx"): 30,
        Account("bob", "BENJI", SETTLEMENT): 1_000,
        pledged("bob", "BENJI", "binance"): 4_000,
    }
    assert book.balances(client="bob", asset="BENJI") == {
        Account("bob", "BENJI", SETTLEMENT): 1_000,
        pledged("bob", "BENJI", "binance"): 4_000,
    }
    assert book.pledged("binance") == {("alice", "BTC"): 50, ("bob", "BENJI"): 4_000}
    assert book.pledged("okx") == {("alice", "BTC"): 30}
    assert book.pledged("kraken") == {}
    assert book.totals() == {"BTC": 80, "BENJI": 5_000}

    journal = book.journal()
    assert [entry.entry_id for entry in journal] == list(range(1, 9))
    assert [entry.command.idempotency_key for entry in journal][:3] == ["d1", "d2", "p1"]
    assert book.journal(after=3, limit=2) == journal[3:5]
    assert book.entry("u1") == unpledge
    assert isinstance(unpledge.command, Unpledge)
    assert unpledge.command.release_ack == "ack-binance-1"
    assert unpledge.recorded_at == NOW
    assert book.entry("missing") is None
    assert book.check_invariants() == []
    book.verify_invariants()


def test_a_rejected_command_leaves_no_trace(book: CustodyBook) -> None:
    book.apply(Deposit("d1", "alice", "BTC", 10), now=NOW)
    rejected: list[Command] = [
        Pledge("p1", "alice", "BTC", "binance", 11),
        Withdraw("w1", "alice", "BTC", 11),
        Unpledge("u1", "alice", "BTC", "okx", 1, "ack"),
        MoveToSettlement("s1", "bob", "BTC", "okx", 1),
        Deposit("d2", "alice", "DOGE", 1),
    ]
    for command in rejected:
        with pytest.raises(REJECTED):
            book.apply(command, now=NOW)
        assert book.entry(command.idempotency_key) is None
    assert count_rows(book, "book_journal_entries") == 1
    assert count_rows(book, "book_postings") == 2
    assert count_rows(book, "book_balances") == 2  # no balance row for a rejected pledge


# --- idempotency ----------------------------------------------------------------------------------


def test_retry_returns_the_original_result_and_conflicting_reuse_is_rejected(
    database_url: str,
) -> None:
    with CustodyBook.open(database_url, assets=ASSETS) as book:
        first = book.apply(Deposit("d1", "alice", "BTC", 10), now=NOW)
        pledge = book.apply(Pledge("p1", "alice", "BTC", "binance", 4), now=NOW)
        assert book.apply(Deposit("d1", "alice", "BTC", 10), now=NOW + timedelta(hours=1)) == first
        with pytest.raises(IdempotencyConflict):
            book.apply(Deposit("d1", "alice", "BTC", 11), now=NOW)
        with pytest.raises(IdempotencyConflict):
            book.apply(Pledge("p1", "alice", "BTC", "okx", 4), now=NOW)
    with CustodyBook.open(database_url, assets=ASSETS) as reopened:  # survives a restart
        assert reopened.apply(Pledge("p1", "alice", "BTC", "binance", 4)) == pledge
        assert reopened.balances() == {
            available("alice", "BTC"): 6,
            pledged("alice", "BTC", "binance"): 4,
        }
        assert len(reopened.journal()) == 2


# --- concurrency ----------------------------------------------------------------------------------


def run_concurrently(book: CustodyBook, commands: list[Command]) -> list[object]:
    """Apply the commands from one thread each, started together; results or exceptions."""
    barrier = threading.Barrier(len(commands))

    def run(command: Command) -> object:
        barrier.wait()
        try:
            return book.apply(command, now=NOW)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(run, commands))


def test_concurrent_pledges_of_the_same_units_pledge_them_once(book: CustodyBook) -> None:
    for round_ in range(3):
        client = f"client-{round_}"
        book.apply(Deposit(f"d-{round_}", client, "BTC", 100), now=NOW)
        exchanges = ["binance", "okx", "kraken", "bybit", "deribit", "bitstamp"]
        results = run_concurrently(
            book,
            [Pledge(f"p-{round_}-{name}", client, "BTC", name, 100) for name in exchanges],
        )
        failures = [result for result in results if isinstance(result, Exception)]
        assert len(failures) == len(exchanges) - 1, failures
        assert all(isinstance(failure, InsufficientBalance) for failure in failures), failures
        pledges = {
            exchange: book.pledged(exchange).get((client, "BTC"), 0) for exchange in exchanges
        }
        assert sorted(pledges.values()) == [0] * (len(exchanges) - 1) + [100]
        assert book.balances(client=client) == {
            pledged(client, "BTC", max(pledges, key=lambda name: pledges[name])): 100
        }
    assert book.check_invariants() == []


@pytest.mark.postgres
def test_a_pledge_waits_for_the_row_lock_of_another_connection(
    make_postgres_url: Callable[[], str],
) -> None:
    with CustodyBook.open(make_postgres_url(), assets=ASSETS) as book:
        book.apply(Deposit("d", "alice", "BTC", 100), now=NOW)
        with book.engine.connect() as other, ThreadPoolExecutor(max_workers=1) as pool:
            other.exec_driver_sql(
                "SELECT balance FROM book_balances WHERE holder = 'alice' "
                "AND sub_account = 'available' FOR UPDATE"
            )
            pending = pool.submit(book.apply, Pledge("p", "alice", "BTC", "binance", 100), now=NOW)
            time.sleep(0.3)
            assert not pending.done()  # blocked behind the other connection's lock
            other.rollback()
            assert pending.result(timeout=10).postings[1].amount == 100
        assert book.pledged("binance") == {("alice", "BTC"): 100}


def test_concurrent_retries_of_one_command_apply_it_once(book: CustodyBook) -> None:
    book.apply(Deposit("d", "alice", "BTC", 100), now=NOW)
    results = run_concurrently(book, [Pledge("p", "alice", "BTC", "binance", 70)] * 6)
    assert all(result == results[0] for result in results), results
    assert book.pledged("binance") == {("alice", "BTC"): 70}
    assert count_rows(book, "book_journal_entries") == 2


def test_concurrent_deposits_to_one_asset_all_count(book: CustodyBook) -> None:
    results = run_concurrently(
        book, [Deposit(f"d{index}", f"client-{index}", "ETH", 10**18) for index in range(8)]
    )
    assert not [result for result in results if isinstance(result, Exception)], results
    assert book.totals() == {"ETH": 8 * 10**18}
    assert book.check_invariants() == []


# --- the journal is insert-only, balances are guarded ---------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE book_postings SET amount = amount",
        "DELETE FROM book_postings",
        "UPDATE book_journal_entries SET kind = 'withdraw'",
        "DELETE FROM book_journal_entries",
    ],
)
def test_the_database_refuses_changes_to_the_journal(book: CustodyBook, statement: str) -> None:
    book.apply(Deposit("d", "alice", "BTC", 10), now=NOW)
    with pytest.raises(sa.exc.DBAPIError, match="insert-only"), book.engine.begin() as connection:
        connection.exec_driver_sql(statement)
    assert count_rows(book, "book_postings") == 2


def test_the_database_refuses_a_negative_client_balance(book: CustodyBook) -> None:
    book.apply(Deposit("d", "alice", "BTC", 10), now=NOW)
    negative = "'-1'" if book.engine.dialect.name == "sqlite" else "-1"
    with pytest.raises(sa.exc.IntegrityError), book.engine.begin() as connection:
        connection.exec_driver_sql(
            f"UPDATE book_balances SET balance = {negative} WHERE holder = 'alice'"
        )


def test_tampered_balances_are_reported(book: CustodyBook) -> None:
    book.apply(Deposit("d", "alice", "BTC", 10), now=NOW)
    book.apply(Pledge("p", "alice", "BTC", "binance", 4), now=NOW)
    with Session(book.engine) as session:
        row = session.get(BalanceRow, ("alice", "BTC", pledged_to("binance")))
        assert row is not None
        row.balance = 9
        session.add(row)
        session.commit()
    breaks = book.check_invariants()
    assert any("stored balance 9, journal gives 4" in line for line in breaks), breaks
    assert any("sub-accounts hold 15" in line for line in breaks), breaks
    with pytest.raises(BookCorrupted):
        book.verify_invariants()


# --- the same command sequence, three books -------------------------------------------------------

QUANTITIES = st.one_of(st.integers(1, 500), st.sampled_from([MAX // 3, MAX // 2]))
CLIENTS = st.sampled_from(["alice", "bob"])
ASSET_CODES = st.sampled_from(["BTC", "ETH", "DOGE"])
EXCHANGES = st.sampled_from(["binance", "okx"])
KEYS = st.sampled_from([f"k{index}" for index in range(25)])
COMMANDS = st.one_of(
    st.builds(Deposit, KEYS, CLIENTS, ASSET_CODES, QUANTITIES),
    st.builds(Withdraw, KEYS, CLIENTS, ASSET_CODES, QUANTITIES),
    st.builds(Pledge, KEYS, CLIENTS, ASSET_CODES, EXCHANGES, QUANTITIES),
    st.builds(Unpledge, KEYS, CLIENTS, ASSET_CODES, EXCHANGES, QUANTITIES, st.just("ack")),
    st.builds(MoveToSettlement, KEYS, CLIENTS, ASSET_CODES, EXCHANGES, QUANTITIES),
)


def replay(book: CustodyBook | MemoryBook, commands: list[Command]) -> list[str]:
    """Apply the commands; the outcome of each: the entry id or the rejection reason."""
    outcomes = []
    for command in commands:
        try:
            outcomes.append(str(book.apply(command, now=NOW).entry_id))
        except REJECTED as exc:
            outcomes.append(exc.reason)
    return outcomes


def check_same_book(commands: list[Command], make_urls: list[Callable[[], str]]) -> None:
    reference = MemoryBook({asset.code: asset for asset in ASSETS})
    expected = replay(reference, commands)
    for make_url in make_urls:
        with CustodyBook.open(make_url(), assets=ASSETS) as book:
            assert replay(book, commands) == expected
            assert book.balances() == reference.balances()
            assert book.totals() == reference.totals()
            for exchange in ("binance", "okx"):
                assert book.pledged(exchange) == reference.pledged(exchange)
            assert book.journal(limit=10**6) == reference.journal(limit=10**6)
            assert all(balance > 0 for balance in book.balances().values())
            assert book.check_invariants() == []


STORE_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@STORE_SETTINGS
@given(commands=st.lists(COMMANDS, min_size=1, max_size=25))
def test_store_matches_the_reference_book(
    make_database_url: Callable[[], str], commands: list[Command]
) -> None:
    check_same_book(commands, [make_database_url])


@pytest.mark.postgres
@STORE_SETTINGS
@given(commands=st.lists(COMMANDS, min_size=1, max_size=25))
def test_sqlite_and_postgresql_give_identical_books(
    make_sqlite_url: Callable[[], str],
    make_postgres_url: Callable[[], str],
    commands: list[Command],
) -> None:
    check_same_book(commands, [make_sqlite_url, make_postgres_url])


@pytest.mark.slow
@pytest.mark.postgres
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(commands=st.lists(COMMANDS, min_size=1, max_size=80))
def test_sqlite_and_postgresql_give_identical_books_long(
    make_sqlite_url: Callable[[], str],
    make_postgres_url: Callable[[], str],
    commands: list[Command],
) -> None:
    check_same_book(commands, [make_sqlite_url, make_postgres_url])


# --- yield and redemption -------------------------------------------------------------------------

DAY = date(2025, 11, 25)


def test_yield_and_redemption_commands(book: CustodyBook) -> None:
    book.apply(Deposit("d1", "alice", "BENJI", 1_000), now=NOW)
    book.apply(Pledge("p1", "alice", "BENJI", "binance", 600), now=NOW)
    paid = book.apply(
        AccrueYield.for_day(client="alice", asset="BENJI", quantity=7, day=DAY), now=NOW
    )
    book.apply(LockForRedemption("r1", "alice", "BENJI", 300), now=NOW)
    for command in (
        Pledge("p2", "alice", "BENJI", "okx", 108),  # 1 000 - 600 + 7 - 300 = 107 available
        Withdraw("w1", "alice", "BENJI", 108),
        CompleteRedemption("c0", "alice", "BENJI", 301),
    ):
        with pytest.raises(InsufficientBalance):
            book.apply(command, now=NOW)
        assert book.entry(command.idempotency_key) is None
    book.apply(CompleteRedemption("c1", "alice", "BENJI", 200), now=NOW)
    book.apply(CancelRedemption("x1", "alice", "BENJI", 50), now=NOW)
    assert book.balances(client="alice") == {
        available("alice", "BENJI"): 157,
        pledged("alice", "BENJI", "binance"): 600,
        Account("alice", "BENJI", REDEEMING): 50,
    }
    assert book.pledged("binance") == {("alice", "BENJI"): 600}
    assert book.totals() == {"BENJI": 807}
    assert book.entry("yield:alice:BENJI:2025-11-25") == paid
    assert isinstance(paid.command, AccrueYield)
    assert paid.command.day == DAY
    assert [entry.command.kind for entry in book.journal()] == [
        "deposit",
        "pledge",
        "accrue_yield",
        "lock_for_redemption",
        "complete_redemption",
        "cancel_redemption",
    ]
    book.verify_invariants()


def test_a_day_of_yield_is_paid_once_across_restarts(database_url: str) -> None:
    command = AccrueYield.for_day(client="alice", asset="BENJI", quantity=5, day=DAY)
    with CustodyBook.open(database_url, assets=ASSETS) as book:
        book.apply(Deposit("d", "alice", "BENJI", 100), now=NOW)
        first = book.apply(command, now=NOW)
    with CustodyBook.open(database_url, assets=ASSETS) as reopened:
        assert reopened.apply(command, now=NOW + timedelta(hours=1)) == first
        with pytest.raises(IdempotencyConflict):
            reopened.apply(
                AccrueYield.for_day(client="alice", asset="BENJI", quantity=6, day=DAY), now=NOW
            )
        assert reopened.balances() == {available("alice", "BENJI"): 105}
        assert count_rows(reopened, "book_journal_entries") == 2


def test_concurrent_yield_runs_pay_a_day_once(book: CustodyBook) -> None:
    book.apply(Deposit("d", "alice", "BENJI", 100), now=NOW)
    command = AccrueYield.for_day(client="alice", asset="BENJI", quantity=5, day=DAY)
    results = run_concurrently(book, [command] * 4)
    assert all(result == results[0] for result in results), results
    assert book.balances() == {available("alice", "BENJI"): 105}


DAYS = st.sampled_from([DAY, DAY + timedelta(days=1)])
COMMANDS_WITH_YIELD = st.one_of(
    COMMANDS,
    st.builds(
        AccrueYield.for_day, client=CLIENTS, asset=ASSET_CODES, quantity=QUANTITIES, day=DAYS
    ),
    st.builds(LockForRedemption, KEYS, CLIENTS, ASSET_CODES, QUANTITIES),
    st.builds(CompleteRedemption, KEYS, CLIENTS, ASSET_CODES, QUANTITIES),
    st.builds(CancelRedemption, KEYS, CLIENTS, ASSET_CODES, QUANTITIES),
)


@pytest.mark.postgres
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(commands=st.lists(COMMANDS_WITH_YIELD, min_size=1, max_size=25))
def test_sqlite_and_postgresql_agree_with_yield_and_redemptions(
    make_sqlite_url: Callable[[], str],
    make_postgres_url: Callable[[], str],
    commands: list[Command],
) -> None:
    check_same_book(commands, [make_sqlite_url, make_postgres_url])
