"""Daily yield of tokenized money-market fund units (BENJI and the like): rates, the accrual of one
day, the distribution schedule, and the book commands that pay it.

What this module does: represent a fund's rate exactly (an annual rate in basis points, or a daily
rate as an integer fraction), compute one day's accrual on a holding in integer minor units,
rounded down, compute when distributions happen (every day at a configurable wall-clock time,
08:00 UTC by default), and turn the holdings of a day into :class:`~custodian.book.AccrueYield`
commands. :func:`apply_daily_accrual` is the thin I/O step: it reads a book's balances and applies
those commands.

What it does not do: fetch rates from a fund (the caller passes them), read the clock (``now`` and
``day`` are passed in), or model negative yields (a rate below zero is refused: paying a negative
yield would mean taking units from the client, which needs the client's mandate).

Rounding: the accrual of one (client, asset, day) is ``floor(holding * rate)`` minor units. The
fraction below one minor unit is neither paid nor carried to the next day: it stays with the payer
(the fund's distribution, which is the book's external side), so the book never credits a client
more units than the fund distributed into custody. With 6 decimals (BENJI) that is under 0.000001
unit per client and day. :class:`DailyAccrual` reports the fraction so that a reconciliation can
account for it.

No floats: rates, holdings and accruals are ints; a float anywhere raises
:class:`~attestations.errors.FloatRejected`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from enum import StrEnum
from typing import Final, Protocol

from attestations.amounts import UNITS_LIMIT, check_units, validate_asset_code
from attestations.errors import ConfigurationError, FloatRejected
from custodian.book import (
    EXTERNAL,
    Account,
    AccrueYield,
    Command,
    RecordedEntry,
    validate_day,
)
from custodian.errors import InvalidRate

DEFAULT_DISTRIBUTION_TIME: Final = time(8, 0)
"""Daily distribution at 08:00 in the schedule's time zone (UTC by default)."""
BASIS_POINTS: Final = 10_000
MAX_ANNUAL_RATE_BPS: Final = 1_000_000
"""10 000 % a year: far beyond any money-market fund; a larger rate is a typo, not a yield."""


class DayCount(StrEnum):
    """How an annual rate becomes a daily one. ``act/365``: 365 days every year (the usual
    convention of US government money-market funds); ``act/360``; ``act/act``: 366 days in a leap
    year, 365 otherwise."""

    ACT_365 = "act/365"
    ACT_360 = "act/360"
    ACT_ACT = "act/act"

    def days_in_year(self, day: date) -> int:
        if self is DayCount.ACT_360:
            return 360
        if self is DayCount.ACT_ACT and _is_leap_year(day.year):
            return 366
        return 365


def _is_leap_year(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _require_int(value: object, *, what: str) -> int:
    if isinstance(value, float):
        raise FloatRejected(f"{what}: float {value!r} is not accepted; use exact integers")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRate(f"{what}: expected int, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class DailyRate:
    """The yield of one day as the exact fraction ``numerator / denominator`` (0.0001332 a day is
    ``DailyRate(1332, 10**7)``). Between 0 and 1 inclusive; the fraction is kept as given, not
    reduced, because it is what an operator configured."""

    numerator: int
    denominator: int

    def __post_init__(self) -> None:
        numerator = _require_int(self.numerator, what="daily rate numerator")
        denominator = _require_int(self.denominator, what="daily rate denominator")
        if denominator <= 0:
            raise InvalidRate(f"daily rate denominator {denominator} is not positive")
        if numerator < 0:
            raise InvalidRate(f"daily rate {numerator}/{denominator} is negative")
        if numerator > denominator:
            raise InvalidRate(f"daily rate {numerator}/{denominator} is above 100 % a day")
        if denominator >= UNITS_LIMIT:
            raise InvalidRate(f"daily rate denominator {denominator} does not fit in 128 bits")

    @classmethod
    def from_annual_bps(
        cls, annual_rate_bps: int, *, day: date, day_count: DayCount = DayCount.ACT_365
    ) -> DailyRate:
        """The daily rate of an annual rate in basis points (487 = 4.87 % a year), simple
        interest: ``bps / (10 000 * days in the year of day)``."""
        bps = _require_int(annual_rate_bps, what="annual rate (bps)")
        if not 0 <= bps <= MAX_ANNUAL_RATE_BPS:
            raise InvalidRate(f"annual rate {bps} bps is not in 0..{MAX_ANNUAL_RATE_BPS}")
        if not isinstance(day_count, DayCount):
            raise InvalidRate(f"day count {day_count!r} is not a DayCount")
        return cls(bps, BASIS_POINTS * day_count.days_in_year(validate_day(day)))


@dataclass(frozen=True, slots=True)
class DailyAccrual:
    """One day's yield on ``holdings_units``: ``quantity`` minor units are paid (rounded down);
    ``remainder_numerator / rate.denominator`` of a minor unit is the unpaid fraction."""

    day: date
    holdings_units: int
    rate: DailyRate
    quantity: int
    remainder_numerator: int


def compute_daily_accrual(
    *,
    holdings_units: int,
    day: date,
    annual_rate_bps: int | None = None,
    daily_rate: DailyRate | None = None,
    day_count: DayCount = DayCount.ACT_365,
) -> DailyAccrual:
    """The accrual of ``day`` on ``holdings_units`` minor units, at exactly one of
    ``annual_rate_bps`` (converted with ``day_count``) or ``daily_rate``: ``floor(holdings *
    numerator / denominator)``. A quantity of zero means nothing is paid that day."""
    holdings = check_units(holdings_units, what="holdings")
    validate_day(day)
    if (annual_rate_bps is None) == (daily_rate is None):
        raise InvalidRate("give exactly one of annual_rate_bps and daily_rate")
    if annual_rate_bps is not None:
        rate = DailyRate.from_annual_bps(annual_rate_bps, day=day, day_count=day_count)
    elif isinstance(daily_rate, DailyRate):
        rate = daily_rate
    else:
        raise InvalidRate(f"daily_rate must be a DailyRate, not {type(daily_rate).__name__}")
    quantity, remainder = divmod(holdings * rate.numerator, rate.denominator)
    return DailyAccrual(day, holdings, rate, quantity, remainder)


def compute_accruing_units(balances: Mapping[Account, int], *, client: str, asset: str) -> int:
    """The units of ``asset`` on which ``client`` earns yield: the whole holding, every
    sub-account (available, pledged to any exchange, settlement, redeeming). Pledged units keep
    earning because they still belong to the client; units being redeemed earn until the fund
    redeems them."""
    return sum(
        balance
        for account, balance in balances.items()
        if account.holder == client
        and account.asset == asset
        and account.sub_account != EXTERNAL
        and balance > 0
    )


def compute_yield_commands(
    balances: Mapping[Account, int],
    *,
    rates: Mapping[str, DailyRate],
    day: date,
) -> list[AccrueYield]:
    """The yield distributions of ``day``: one :class:`AccrueYield` per client holding an asset
    of ``rates``, in (client, asset) order, none where the accrual rounds down to zero."""
    for asset, rate in rates.items():
        validate_asset_code(asset)
        if not isinstance(rate, DailyRate):
            raise InvalidRate(f"rate of {asset} must be a DailyRate, not {type(rate).__name__}")
    positions = sorted(
        {
            (account.holder, account.asset)
            for account in balances
            if not account.is_external and account.asset in rates
        }
    )
    commands = []
    for client, asset in positions:
        accrual = compute_daily_accrual(
            holdings_units=compute_accruing_units(balances, client=client, asset=asset),
            day=day,
            daily_rate=rates[asset],
        )
        if accrual.quantity:
            commands.append(
                AccrueYield.for_day(client=client, asset=asset, quantity=accrual.quantity, day=day)
            )
    return commands


# --- the schedule -------------------------------------------------------------------------------


def _check_schedule(now: datetime, at: time, tz: tzinfo) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ConfigurationError("now must be a timezone-aware datetime")
    if not isinstance(at, time) or at.tzinfo is not None:
        raise ConfigurationError("the distribution time is a wall-clock time without a zone")
    if not isinstance(tz, tzinfo):
        raise ConfigurationError(f"tz must be a tzinfo, not {type(tz).__name__}")


def _distribution_of(day: date, *, at: time, tz: tzinfo) -> datetime:
    # A wall time that a DST change skips or repeats resolves by the fold=0 rule of zoneinfo.
    return datetime.combine(day, at, tzinfo=tz).astimezone(UTC)


def next_distribution(
    now: datetime, *, at: time = DEFAULT_DISTRIBUTION_TIME, tz: tzinfo = UTC
) -> datetime:
    """The first distribution moment strictly after ``now`` (in UTC): ``at`` o'clock in ``tz``
    on the day of ``now`` or the next one. Strictly after, so that a loop that runs a
    distribution and asks again always moves on to the next day."""
    _check_schedule(now, at, tz)
    moment = now.astimezone(UTC)
    local_day = now.astimezone(tz).date()
    for offset in range(3):  # two days always suffice; three is safe across any DST shift
        candidate = _distribution_of(local_day + timedelta(days=offset), at=at, tz=tz)
        if candidate > moment:
            return candidate
    raise ConfigurationError(f"no distribution after {now.isoformat()}")  # unreachable


def last_distribution_day(
    now: datetime, *, at: time = DEFAULT_DISTRIBUTION_TIME, tz: tzinfo = UTC
) -> date:
    """The date (in ``tz``) of the latest distribution at or before ``now``: the day whose yield
    is due. At 07:59 UTC it is yesterday, from 08:00 UTC on it is today."""
    _check_schedule(now, at, tz)
    moment = now.astimezone(UTC)
    local_day = now.astimezone(tz).date()
    for offset in range(3):
        day = local_day - timedelta(days=offset)
        if _distribution_of(day, at=at, tz=tz) <= moment:
            return day
    raise ConfigurationError(f"no distribution before {now.isoformat()}")  # unreachable


# --- the I/O step -------------------------------------------------------------------------------


class YieldBook(Protocol):
    """What :func:`apply_daily_accrual` needs of a book: :class:`~custodian.book.MemoryBook` and
    :class:`~custodian.store.CustodyBook` both provide it."""

    def balances(
        self, *, client: str | None = None, asset: str | None = None
    ) -> dict[Account, int]: ...

    def entry(self, idempotency_key: str) -> RecordedEntry | None: ...

    def apply(self, command: Command, *, now: datetime) -> RecordedEntry: ...


def apply_daily_accrual(
    book: YieldBook, *, rates: Mapping[str, DailyRate], day: date, now: datetime
) -> list[RecordedEntry]:
    """Pay the yield of ``day`` on the holdings the book has now, and return the entries (the
    original entry for a distribution already paid). A distribution whose key is already in the
    journal is not recomputed: after a restart the holdings may have changed, and the day was
    paid once, on the holdings of that first run."""
    entries = []
    for asset in sorted(rates):
        balances = book.balances(asset=asset)
        for command in compute_yield_commands(balances, rates={asset: rates[asset]}, day=day):
            paid = book.entry(command.idempotency_key)
            entries.append(paid if paid is not None else book.apply(command, now=now))
    return entries
