"""Yield on tokenized money-market fund units: exact rates, daily accrual rounded down, the
distribution schedule, the AccrueYield command and its natural idempotency key, redemptions, and
the daily run on the in-memory book and on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestations.amounts import UNITS_LIMIT, Asset
from attestations.errors import ConfigurationError, DecodeError, FloatRejected
from custodian.book import (
    AVAILABLE,
    REDEEMING,
    Account,
    AccrueYield,
    CancelRedemption,
    CompleteRedemption,
    Deposit,
    LockForRedemption,
    MemoryBook,
    Pledge,
    Withdraw,
    compute_command_json,
    compute_yield_key,
    parse_command,
    pledged_to,
)
from custodian.errors import IdempotencyConflict, InsufficientBalance, InvalidRate
from custodian.store import CustodyBook
from custodian.yields import (
    DailyRate,
    DayCount,
    apply_daily_accrual,
    compute_accruing_units,
    compute_daily_accrual,
    compute_yield_commands,
    last_distribution_day,
    next_distribution,
)

ASSETS = [Asset("BENJI", 6), Asset("BTC", 8)]
DAY = date(2025, 11, 25)
NOW = datetime(2025, 11, 25, 8, 0, tzinfo=UTC)
BENJI = 10**6  # one whole unit in minor units


def memory_book() -> MemoryBook:
    return MemoryBook({asset.code: asset for asset in ASSETS})


# --- rates and the accrual of one day -------------------------------------------------------------


def test_annual_basis_points_accrue_daily_rounded_down() -> None:
    accrual = compute_daily_accrual(holdings_units=1_000 * BENJI, day=DAY, annual_rate_bps=487)
    # 1 000 BENJI at 4.87 % a year, act/365: 1e9 * 487 / 3 650 000 = 133 424.657... minor units.
    assert accrual.rate == DailyRate(487, 3_650_000)
    assert accrual.quantity == 133_424
    assert accrual.remainder_numerator == 1_000 * BENJI * 487 - 133_424 * 3_650_000
    assert accrual.holdings_units == 1_000 * BENJI
    assert accrual.day == DAY


def test_a_daily_rate_is_an_exact_fraction() -> None:
    rate = DailyRate(1332, 10**7)
    accrual = compute_daily_accrual(holdings_units=7_500_001, day=DAY, daily_rate=rate)
    assert accrual.quantity == 7_500_001 * 1332 // 10**7 == 999
    assert compute_daily_accrual(holdings_units=7_507, day=DAY, daily_rate=rate).quantity == 0


@pytest.mark.parametrize(
    ("day_count", "day", "denominator"),
    [
        (DayCount.ACT_365, date(2024, 2, 29), 3_650_000),
        (DayCount.ACT_360, date(2025, 1, 1), 3_600_000),
        (DayCount.ACT_ACT, date(2024, 6, 1), 3_660_000),
        (DayCount.ACT_ACT, date(2025, 6, 1), 3_650_000),
        (DayCount.ACT_ACT, date(2100, 6, 1), 3_650_000),
        (DayCount.ACT_ACT, date(2000, 6, 1), 3_660_000),
    ],
)
def test_day_counts(day_count: DayCount, day: date, denominator: int) -> None:
    assert DailyRate.from_annual_bps(500, day=day, day_count=day_count) == DailyRate(
        500, denominator
    )


@given(
    holdings=st.integers(0, UNITS_LIMIT - 1),
    denominator=st.integers(1, 10**30),
    data=st.data(),
)
def test_accrual_is_exact_and_never_rounds_up(
    holdings: int, denominator: int, data: st.DataObject
) -> None:
    numerator = data.draw(st.integers(0, denominator))
    accrual = compute_daily_accrual(
        holdings_units=holdings, day=DAY, daily_rate=DailyRate(numerator, denominator)
    )
    assert accrual.quantity * denominator + accrual.remainder_numerator == holdings * numerator
    assert 0 <= accrual.remainder_numerator < denominator
    assert 0 <= accrual.quantity <= holdings


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: DailyRate(1.5, 100), FloatRejected),  # type: ignore[arg-type]
        (lambda: DailyRate(1, 100.0), FloatRejected),  # type: ignore[arg-type]
        (lambda: DailyRate(True, 100), InvalidRate),
        (lambda: DailyRate(-1, 100), InvalidRate),
        (lambda: DailyRate(1, 0), InvalidRate),
        (lambda: DailyRate(101, 100), InvalidRate),
        (lambda: DailyRate(1, UNITS_LIMIT), InvalidRate),
        (lambda: DailyRate.from_annual_bps(4.87, day=DAY), FloatRejected),  # type: ignore[arg-type]
        (lambda: DailyRate.from_annual_bps(-5, day=DAY), InvalidRate),
        (lambda: DailyRate.from_annual_bps(1_000_001, day=DAY), InvalidRate),
        (lambda: compute_daily_accrual(holdings_units=1, day=DAY), InvalidRate),
        (
            lambda: compute_daily_accrual(
                holdings_units=1, day=DAY, annual_rate_bps=1, daily_rate=DailyRate(1, 2)
            ),
            InvalidRate,
        ),
        (
            lambda: compute_daily_accrual(
                holdings_units=1.0,  # type: ignore[arg-type]
                day=DAY,
                annual_rate_bps=1,
            ),
            FloatRejected,
        ),
        (lambda: compute_daily_accrual(holdings_units=1, day=NOW, annual_rate_bps=1), DecodeError),
    ],
)
def test_rates_are_exact_non_negative_fractions(make: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        make()  # type: ignore[operator]


# --- the schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (
            datetime(2025, 11, 25, 7, 59, 59, 999_999, tzinfo=UTC),
            datetime(2025, 11, 25, 8, tzinfo=UTC),
        ),
        (datetime(2025, 11, 25, 8, 0, tzinfo=UTC), datetime(2025, 11, 26, 8, tzinfo=UTC)),
        (datetime(2025, 11, 25, 23, 0, tzinfo=UTC), datetime(2025, 11, 26, 8, tzinfo=UTC)),
        (datetime(2025, 12, 31, 9, 0, tzinfo=UTC), datetime(2026, 1, 1, 8, tzinfo=UTC)),
        # another zone for ``now`` changes nothing: 08:00 UTC is 09:00 in Zurich in winter
        (
            datetime(2025, 11, 25, 8, 30, tzinfo=ZoneInfo("Europe/Zurich")),
            datetime(2025, 11, 25, 8, tzinfo=UTC),
        ),
    ],
)
def test_next_distribution_is_at_08_00_utc_by_default(now: datetime, expected: datetime) -> None:
    assert next_distribution(now) == expected
    assert next_distribution(now).tzinfo is UTC


def test_the_schedule_time_and_zone_are_configurable() -> None:
    zurich = ZoneInfo("Europe/Zurich")
    at = time(9, 30)
    # Winter (UTC+1) and summer (UTC+2): the wall time stays 09:30 in Zurich.
    assert next_distribution(datetime(2025, 1, 10, 0, 0, tzinfo=UTC), at=at, tz=zurich) == (
        datetime(2025, 1, 10, 8, 30, tzinfo=UTC)
    )
    assert next_distribution(datetime(2025, 7, 10, 0, 0, tzinfo=UTC), at=at, tz=zurich) == (
        datetime(2025, 7, 10, 7, 30, tzinfo=UTC)
    )
    # Across the spring-forward night the next day is 23 hours away.
    first = next_distribution(datetime(2025, 3, 29, 0, 0, tzinfo=UTC), at=at, tz=zurich)
    assert first == datetime(2025, 3, 29, 8, 30, tzinfo=UTC)
    second = next_distribution(first, at=at, tz=zurich)
    assert second - first == timedelta(hours=23)
    assert next_distribution(NOW, at=time(20, 0)) == datetime(2025, 11, 25, 20, tzinfo=UTC)


def test_last_distribution_day_is_the_day_due() -> None:
    assert last_distribution_day(NOW - timedelta(microseconds=1)) == date(2025, 11, 24)
    assert last_distribution_day(NOW) == date(2025, 11, 25)
    assert last_distribution_day(NOW + timedelta(hours=15)) == date(2025, 11, 25)
    tokyo = ZoneInfo("Asia/Tokyo")  # 08:00 in Tokyo is 23:00 UTC the day before
    assert last_distribution_day(datetime(2025, 11, 24, 23, 0, tzinfo=UTC), tz=tokyo) == DAY


@pytest.mark.parametrize(
    "kwargs",
    [
        {"now": datetime(2025, 11, 25, 8, 0)},  # noqa: DTZ001  # naive on purpose
        {"now": NOW, "at": time(8, 0, tzinfo=UTC)},
        {"now": NOW, "tz": "UTC"},
    ],
)
def test_the_schedule_refuses_ambiguous_inputs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        next_distribution(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        last_distribution_day(**kwargs)  # type: ignore[arg-type]


# --- the command and its natural key --------------------------------------------------------------


def test_the_yield_key_is_one_per_client_asset_and_day() -> None:
    command = AccrueYield.for_day(client="alice", asset="BENJI", quantity=5, day=DAY)
    assert command.idempotency_key == "yield:alice:BENJI:2025-11-25"
    assert parse_command(compute_command_json(command)) == command
    assert compute_command_json(command)["day"] == "2025-11-25"
    with pytest.raises(DecodeError, match="idempotency key of a yield"):
        AccrueYield("my-own-key", "alice", "BENJI", 5, DAY)
    with pytest.raises(DecodeError, match="idempotency key of a yield"):
        AccrueYield("yield:alice:BENJI:2025-11-24", "alice", "BENJI", 5, DAY)
    with pytest.raises(DecodeError):
        AccrueYield.for_day(client="alice", asset="BENJI", quantity=5, day=NOW)
    obj = compute_command_json(command)
    for bad_day in ("2025-11-31", "2025-1-05", 20251125, "2025-11-25T00:00:00"):
        with pytest.raises(DecodeError):
            parse_command({**obj, "day": bad_day})


def test_a_long_client_id_gets_a_hashed_yield_key() -> None:
    client = "c" * 128
    key = compute_yield_key(client, "BENJI", DAY)
    assert key.startswith("yield:sha256:")
    assert len(key) == len("yield:sha256:") + 64
    assert compute_yield_key(client, "BENJI", DAY + timedelta(days=1)) != key
    command = AccrueYield.for_day(client=client, asset="BENJI", quantity=1, day=DAY)
    assert parse_command(compute_command_json(command)) == command


def test_yield_is_paid_to_available_once_per_day_even_on_pledged_units() -> None:
    book = memory_book()
    book.apply(Deposit("d", "alice", "BENJI", 1_000 * BENJI), now=NOW)
    book.apply(Pledge("p", "alice", "BENJI", "binance", 1_000 * BENJI), now=NOW)
    command = AccrueYield.for_day(client="alice", asset="BENJI", quantity=133_424, day=DAY)
    entry = book.apply(command, now=NOW)
    assert [(p.account, p.amount) for p in entry.postings] == [
        (Account.external("BENJI"), -133_424),
        (Account("alice", "BENJI", AVAILABLE), 133_424),
    ]
    assert book.apply(command, now=NOW + timedelta(hours=2)) == entry  # a restart pays nothing
    with pytest.raises(IdempotencyConflict):  # nor does a recomputation with other holdings
        book.apply(dataclasses.replace(command, quantity=133_425), now=NOW)
    tomorrow = AccrueYield.for_day(
        client="alice", asset="BENJI", quantity=133_424, day=DAY + timedelta(days=1)
    )
    book.apply(tomorrow, now=NOW + timedelta(days=1))
    assert book.pledged("binance") == {("alice", "BENJI"): 1_000 * BENJI}  # collateral unchanged
    assert book.balances(client="alice")[Account("alice", "BENJI", AVAILABLE)] == 2 * 133_424
    assert book.totals() == {"BENJI": 1_000 * BENJI + 2 * 133_424}
    assert book.check_invariants() == []


# --- redemption -----------------------------------------------------------------------------------


def test_a_redemption_locks_units_first() -> None:
    book = memory_book()
    book.apply(Deposit("d", "alice", "BENJI", 100), now=NOW)
    book.apply(LockForRedemption("r1", "alice", "BENJI", 60), now=NOW)
    for command in (
        Pledge("p", "alice", "BENJI", "binance", 41),
        Withdraw("w", "alice", "BENJI", 41),
        LockForRedemption("r2", "alice", "BENJI", 41),
    ):
        with pytest.raises(InsufficientBalance):
            book.apply(command, now=NOW)
    redeeming = Account("alice", "BENJI", REDEEMING)
    assert book.balances(client="alice") == {
        Account("alice", "BENJI", AVAILABLE): 40,
        redeeming: 60,
    }
    with pytest.raises(InsufficientBalance):
        book.apply(CompleteRedemption("c0", "alice", "BENJI", 61), now=NOW)
    book.apply(CompleteRedemption("c1", "alice", "BENJI", 50), now=NOW)  # leaves custody
    book.apply(CancelRedemption("x1", "alice", "BENJI", 10), now=NOW)  # back to available
    with pytest.raises(InsufficientBalance):
        book.apply(CancelRedemption("x2", "alice", "BENJI", 1), now=NOW)
    assert book.balances(client="alice") == {Account("alice", "BENJI", AVAILABLE): 50}
    assert book.totals() == {"BENJI": 50}
    assert book.check_invariants() == []


def test_pledged_units_must_be_released_before_redemption() -> None:
    book = memory_book()
    book.apply(Deposit("d", "alice", "BENJI", 100), now=NOW)
    book.apply(Pledge("p", "alice", "BENJI", "binance", 100), now=NOW)
    with pytest.raises(InsufficientBalance):
        book.apply(LockForRedemption("r", "alice", "BENJI", 1), now=NOW)


# --- the daily run --------------------------------------------------------------------------------

RATES = {"BENJI": DailyRate(1, 10_000)}  # 0.01 % a day, easy to check by hand


def seed(book: MemoryBook | CustodyBook) -> None:
    book.apply(Deposit("d1", "alice", "BENJI", 1_000_000), now=NOW)
    book.apply(Pledge("p1", "alice", "BENJI", "binance", 600_000), now=NOW)
    book.apply(LockForRedemption("r1", "alice", "BENJI", 100_000), now=NOW)
    book.apply(Deposit("d2", "bob", "BENJI", 9_999), now=NOW)  # accrues 0.9999: nothing paid
    book.apply(Deposit("d3", "carol", "BENJI", 20_000), now=NOW)
    book.apply(Deposit("d4", "carol", "BTC", 10**8), now=NOW)  # no rate for BTC


def test_accruing_units_are_the_whole_holding() -> None:
    book = memory_book()
    seed(book)
    balances = book.balances()
    assert compute_accruing_units(balances, client="alice", asset="BENJI") == 1_000_000
    assert compute_accruing_units(balances, client="carol", asset="BENJI") == 20_000
    assert compute_accruing_units(balances, client="dave", asset="BENJI") == 0
    commands = compute_yield_commands(balances, rates=RATES, day=DAY)
    assert commands == [
        AccrueYield.for_day(client="alice", asset="BENJI", quantity=100, day=DAY),
        AccrueYield.for_day(client="carol", asset="BENJI", quantity=2, day=DAY),
    ]
    with pytest.raises(InvalidRate):
        compute_yield_commands(balances, rates={"BENJI": (1, 10_000)}, day=DAY)  # type: ignore[dict-item]


@pytest.fixture
def store(database_url: str) -> Iterator[CustodyBook]:
    with CustodyBook.open(database_url, assets=ASSETS) as opened:
        yield opened


def check_daily_run(book: MemoryBook | CustodyBook) -> None:
    seed(book)
    first = apply_daily_accrual(book, rates=RATES, day=DAY, now=NOW)
    assert [entry.command.idempotency_key for entry in first] == [
        "yield:alice:BENJI:2025-11-25",
        "yield:carol:BENJI:2025-11-25",
    ]
    # The holdings change, then the run restarts for the same day: nothing is paid again.
    book.apply(Deposit("d5", "alice", "BENJI", 5_000_000), now=NOW)
    again = apply_daily_accrual(book, rates=RATES, day=DAY, now=NOW + timedelta(minutes=5))
    assert again == first
    following = apply_daily_accrual(book, rates=RATES, day=DAY + timedelta(days=1), now=NOW)
    assert [entry.command.quantity for entry in following] == [600, 2]  # 6 000 100 * 0.01 %
    assert book.balances(client="alice", asset="BENJI") == {
        Account("alice", "BENJI", AVAILABLE): 300_000 + 5_000_000 + 100 + 600,
        Account("alice", "BENJI", pledged_to("binance")): 600_000,
        Account("alice", "BENJI", REDEEMING): 100_000,
    }
    assert book.totals()["BENJI"] == 1_000_000 + 9_999 + 20_000 + 5_000_000 + 100 + 2 + 600 + 2
    assert book.check_invariants() == []


def test_daily_run_on_the_memory_book() -> None:
    check_daily_run(memory_book())


def test_daily_run_on_the_database(store: CustodyBook) -> None:
    check_daily_run(store)
    reference = memory_book()
    check_daily_run(reference)
    assert store.journal(limit=10**6) == reference.journal(limit=10**6)
