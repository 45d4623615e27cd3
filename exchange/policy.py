"""The exchange's collateral policy and the arithmetic of margin, all pure integer functions.

What this module does: hold the policy (collateral rate per asset, quote currency, leverage cap,
margin-call and liquidation levels, margin-call deadline, staleness limits), value a position
exactly (one integer expression, rounded down once), compute a client's credit limit, margin
ratio and shortfall, judge a stream's freshness, and decide margin-state transitions from ONE
table (:data:`MARGIN_TRANSITIONS`).

What it does not do: keep any state (:mod:`exchange.ledger` does), read the clock (every function
takes ``now``), or touch floats. Every amount is an ``int`` in minor units of the quote currency;
rates, the leverage cap and thresholds are ``int`` basis points (1 bp = 1/10,000).

Rounding is always in the direction that protects the exchange: a position's value and the
credit limit round down, the margin ratio rounds toward minus infinity (also for a negative
equity), the shortfall rounds up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from attestations.amounts import MAX_DECIMALS, Price, check_units, validate_asset_code
from attestations.errors import AmountError, DecodeError, InvariantViolation
from exchange.errors import InvalidPolicy

BPS: Final = 10_000
"""Basis points in one whole (100 %)."""

MAX_LEVERAGE_BPS: Final = 1_000_000
"""The largest leverage cap a policy may set (100x); anything above is a configuration slip."""


class AssetClass(StrEnum):
    """Classes of collateral; each has a default rate (:data:`DEFAULT_CLASS_RATES_BPS`)."""

    MONEY_MARKET_FUND = "money_market_fund"
    STABLECOIN = "stablecoin"
    BTC = "btc"
    ETH = "eth"
    OTHER = "other"


DEFAULT_CLASS_RATES_BPS: Final[Mapping[AssetClass, int]] = MappingProxyType(
    {
        AssetClass.MONEY_MARKET_FUND: 9_800,
        AssetClass.STABLECOIN: 9_500,
        AssetClass.BTC: 8_000,
        AssetClass.ETH: 7_500,
        # Not collateral until an operator configures a rate for it.
        AssetClass.OTHER: 0,
    }
)

DEFAULT_ASSET_CLASSES: Final[Mapping[str, AssetClass]] = MappingProxyType(
    {
        "BENJI": AssetClass.MONEY_MARKET_FUND,
        "USDC": AssetClass.STABLECOIN,
        "USDT": AssetClass.STABLECOIN,
        "BTC": AssetClass.BTC,
        "ETH": AssetClass.ETH,
    }
)


def compute_default_rates() -> dict[str, int]:
    """The default rate table: each asset of :data:`DEFAULT_ASSET_CLASSES` at its class's rate."""
    return {asset: DEFAULT_CLASS_RATES_BPS[cls] for asset, cls in DEFAULT_ASSET_CLASSES.items()}


def _require_int(value: object, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPolicy(f"{what} must be an int, got {type(value).__name__}")
    return value


def _require_bps(value: object, *, what: str, low: int = 0, high: int = BPS) -> int:
    bps = _require_int(value, what=what)
    if not low <= bps <= high:
        raise InvalidPolicy(f"{what} {bps} bp not in {low}..{high}")
    return bps


def _require_positive(value: object, *, what: str) -> timedelta:
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise InvalidPolicy(f"{what} must be a positive timedelta, got {value!r}")
    return value


def _require_aware(value: object, *, what: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvariantViolation(f"{what} must be an aware datetime, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class CollateralPolicy:
    """How the exchange values collateral and when it calls margin.

    ``rates_bps`` maps an asset code to its collateral rate; an asset not in the table has rate 0
    (it is attested and shown, but grants no credit). A policy that exists is consistent: rates in
    0..10,000 bp, a positive leverage cap, a liquidation line strictly below the margin-call level,
    positive durations and a valid quote code."""

    rates_bps: Mapping[str, int]
    quote: str = "USD"
    quote_decimals: int = 2
    leverage_bps: int = 20_000
    margin_call_bps: int = 10_000
    liquidation_bps: int = 8_000
    margin_call_deadline: timedelta = field(default=timedelta(hours=4))
    stale_after: timedelta = field(default=timedelta(seconds=180))
    zero_grace: timedelta = field(default=timedelta(seconds=900))

    def __post_init__(self) -> None:
        if not isinstance(self.rates_bps, Mapping):
            raise InvalidPolicy("rates_bps must be a mapping of asset code to basis points")
        rates: dict[str, int] = {}
        for asset, rate in self.rates_bps.items():
            try:
                validate_asset_code(asset)
            except DecodeError as exc:
                raise InvalidPolicy(f"collateral rate for an invalid asset code: {exc}") from exc
            rates[asset] = _require_bps(rate, what=f"{asset} collateral rate")
        # A read-only copy: the policy is a value and must not change under the ledger.
        object.__setattr__(self, "rates_bps", MappingProxyType(rates))
        try:
            validate_asset_code(self.quote)
        except DecodeError as exc:
            raise InvalidPolicy(f"quote currency: {exc}") from exc
        if self.quote in rates:
            raise InvalidPolicy(f"the quote currency {self.quote} cannot be priced in itself")
        decimals = _require_int(self.quote_decimals, what="quote_decimals")
        if not 0 <= decimals <= MAX_DECIMALS:
            raise InvalidPolicy(f"quote_decimals {decimals} not in 0..{MAX_DECIMALS}")
        _require_bps(self.leverage_bps, what="leverage cap", low=1, high=MAX_LEVERAGE_BPS)
        # The margin-call level may sit above 100 % (a buffer over the requirement), never at 0:
        # a zero level would mean no client is ever called.
        _require_bps(self.margin_call_bps, what="margin-call level", low=1, high=MAX_LEVERAGE_BPS)
        _require_bps(self.liquidation_bps, what="liquidation line", high=MAX_LEVERAGE_BPS)
        if self.liquidation_bps >= self.margin_call_bps:
            # Otherwise a client could be due for liquidation without ever having been called.
            raise InvalidPolicy(
                f"liquidation line {self.liquidation_bps} bp must be below the margin-call level "
                f"{self.margin_call_bps} bp"
            )
        _require_positive(self.margin_call_deadline, what="margin_call_deadline")
        _require_positive(self.stale_after, what="stale_after")
        _require_positive(self.zero_grace, what="zero_grace")

    def rate_bps(self, asset: str) -> int:
        """The collateral rate of ``asset``; 0 for an asset the policy does not name."""
        return self.rates_bps.get(asset, 0)

    @classmethod
    def default(cls, **overrides: Any) -> CollateralPolicy:
        """The default policy (docs/exchange.md): BENJI 9,800 bp, USDC and USDT 9,500 bp, BTC
        8,000 bp, ETH 7,500 bp, 2x leverage, margin call below 100 %, liquidation below 80 %.
        Any field may be overridden by keyword (``rates_bps`` replaces the whole table)."""
        arguments: dict[str, Any] = {"rates_bps": compute_default_rates()}
        arguments.update(overrides)
        return cls(**arguments)


# --- valuation ------------------------------------------------------------------------------------


def compute_position_value(
    *, quantity: int, asset_decimals: int, price: Price | None, rate_bps: int, quote_decimals: int
) -> int:
    """Collateral value of ``quantity`` minor units of an asset, in minor units of the quote:
    ``floor(quantity * mantissa * 10^quote_decimals * rate_bps / (10^(asset_decimals + scale) *
    10,000))``. One exact integer expression, rounded down once; 0 without a price.

    The price's quote is not checked here: the ledger passes only prices in the policy's quote."""
    check_units(quantity, what="position quantity")
    for what, value in (("asset decimals", asset_decimals), ("quote decimals", quote_decimals)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DECIMALS:
            raise AmountError(f"{what} {value!r} not in 0..{MAX_DECIMALS}")
    if isinstance(rate_bps, bool) or not isinstance(rate_bps, int) or not 0 <= rate_bps <= BPS:
        raise AmountError(f"collateral rate {rate_bps!r} not in 0..{BPS} bp")
    if price is None:
        return 0
    numerator: int = quantity * price.mantissa * 10**quote_decimals * rate_bps
    denominator: int = 10 ** (asset_decimals + price.scale) * BPS
    return numerator // denominator


def _require_amount(value: object, *, what: str, signed: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmountError(f"{what}: expected int, got {type(value).__name__}")
    if not signed and value < 0:
        raise AmountError(f"{what} {value} is negative")
    return value


def compute_credit_limit(*, collateral: int, unrealised_pnl: int, leverage_bps: int) -> int:
    """``floor(max(0, collateral + min(unrealised_pnl, 0)) * leverage_bps / 10,000)``: losses
    reduce credit, unrealised gains never add to it (they may vanish before they are realised)."""
    _require_amount(collateral, what="collateral")
    _require_amount(unrealised_pnl, what="unrealised pnl", signed=True)
    _require_amount(leverage_bps, what="leverage cap")
    base = max(0, collateral + min(unrealised_pnl, 0))
    return base * leverage_bps // BPS


def compute_equity(*, collateral: int, unrealised_pnl: int) -> int:
    """``collateral + unrealised_pnl``; negative when losses exceed the collateral."""
    return collateral + unrealised_pnl


def compute_margin_ratio_bps(
    *, collateral: int, unrealised_pnl: int, requirement: int
) -> int | None:
    """``floor(equity * 10,000 / requirement)`` in bp, or None (infinitely healthy) when the
    requirement is 0.

    Python's ``//`` floors toward minus infinity, which is what is wanted: for a negative equity
    the ratio is rounded *down* (``-1 * 10,000 / 3`` gives -3,334, not -3,333), so rounding never
    lifts a client above a threshold it has not reached."""
    _require_amount(collateral, what="collateral")
    _require_amount(unrealised_pnl, what="unrealised pnl", signed=True)
    _require_amount(requirement, what="margin requirement")
    if requirement == 0:
        return None
    equity = compute_equity(collateral=collateral, unrealised_pnl=unrealised_pnl)
    return equity * BPS // requirement


def compute_shortfall(
    *, collateral: int, unrealised_pnl: int, requirement: int, margin_call_bps: int
) -> int:
    """The equity (in quote minor units) the client must add for its ratio to reach the
    margin-call level again: ``max(0, ceil(requirement * margin_call_bps / 10,000) - equity)``.

    Rounded up: adding exactly the shortfall makes ``floor((equity + shortfall) * 10,000 /
    requirement) >= margin_call_bps``, and one unit less does not."""
    _require_amount(collateral, what="collateral")
    _require_amount(unrealised_pnl, what="unrealised pnl", signed=True)
    _require_amount(requirement, what="margin requirement")
    _require_amount(margin_call_bps, what="margin-call level")
    needed = -(-requirement * margin_call_bps // BPS)  # ceiling division
    equity = compute_equity(collateral=collateral, unrealised_pnl=unrealised_pnl)
    return max(0, needed - equity)


# --- freshness ------------------------------------------------------------------------------------


class Freshness(StrEnum):
    """How much a stream's last statement is still worth.

    ``fresh``: it counts and grants new credit. ``stale``: its positions still count, but no new
    credit is granted against them. ``zero``: its positions count as zero."""

    FRESH = "fresh"
    STALE = "stale"
    ZERO = "zero"


def compute_freshness(
    *, now: datetime, issued_at: datetime, expires_at: datetime, policy: CollateralPolicy
) -> Freshness:
    """Freshness of a stream whose last accepted statement was issued at ``issued_at`` and
    expires at ``expires_at`` (docs/exchange.md, "Freshness")."""
    _require_aware(now, what="now")
    _require_aware(issued_at, what="issued_at")
    _require_aware(expires_at, what="expires_at")
    age = now - issued_at
    if age > policy.stale_after + policy.zero_grace or now >= expires_at + policy.zero_grace:
        return Freshness.ZERO
    if now < expires_at and age <= policy.stale_after:
        return Freshness.FRESH
    return Freshness.STALE


# --- margin states --------------------------------------------------------------------------------


class MarginState(StrEnum):
    HEALTHY = "healthy"
    MARGIN_CALL = "margin_call"
    LIQUIDATION_DUE = "liquidation_due"


class NoticeKind(StrEnum):
    """Signed notices the exchange publishes on a transition."""

    MARGIN_CALL = "margin_call"
    LIQUIDATION_DUE = "liquidation_due"


class MarginCondition(StrEnum):
    """What the ledger observes about a client at one evaluation, the input of the state table.

    ``covered``: no requirement, or ratio >= margin-call level. ``below_call``: liquidation line
    <= ratio < margin-call level. ``below_liquidation``: ratio < liquidation line.
    ``deadline_passed``: in margin call, still below the margin-call level, and ``now`` has reached
    the call's deadline."""

    COVERED = "covered"
    BELOW_CALL = "below_call"
    BELOW_LIQUIDATION = "below_liquidation"
    DEADLINE_PASSED = "deadline_passed"


@dataclass(frozen=True, slots=True)
class _Rule:
    after: MarginState
    reason: str
    notices: tuple[NoticeKind, ...]
    starts_deadline: bool = False


MARGIN_TRANSITIONS: Final[Mapping[tuple[MarginState, MarginCondition], _Rule | None]] = (
    MappingProxyType(
        {
            # --- healthy ---------------------------------------------------------------------
            # Nothing to do while covered.
            (MarginState.HEALTHY, MarginCondition.COVERED): None,
            # Equity fell below the requirement: call margin and give the client the deadline to
            # add collateral or reduce exposure.
            (MarginState.HEALTHY, MarginCondition.BELOW_CALL): _Rule(
                MarginState.MARGIN_CALL,
                "ratio_below_margin_call",
                (NoticeKind.MARGIN_CALL,),
                starts_deadline=True,
            ),
            # Fell straight through the liquidation line (a price gap, a stream counted as zero):
            # the client still gets the margin call, so it learns why, and liquidation is due at
            # once - waiting out a deadline below the line would expose the exchange.
            (MarginState.HEALTHY, MarginCondition.BELOW_LIQUIDATION): _Rule(
                MarginState.LIQUIDATION_DUE,
                "ratio_below_liquidation",
                (NoticeKind.MARGIN_CALL, NoticeKind.LIQUIDATION_DUE),
            ),
            # Only a margin call has a deadline; a healthy client cannot pass one.
            (MarginState.HEALTHY, MarginCondition.DEADLINE_PASSED): None,
            # --- margin call -----------------------------------------------------------------
            # The call is met (new collateral, less exposure, prices recovered). Checked before the
            # deadline: a client covered when evaluated is covered, however late.
            (MarginState.MARGIN_CALL, MarginCondition.COVERED): _Rule(
                MarginState.HEALTHY, "margin_call_met", ()
            ),
            # Still short but above the line: the original deadline keeps running (it is never
            # extended by a partial top-up).
            (MarginState.MARGIN_CALL, MarginCondition.BELOW_CALL): None,
            # The line is crossed before the deadline: liquidation cannot wait for it.
            (MarginState.MARGIN_CALL, MarginCondition.BELOW_LIQUIDATION): _Rule(
                MarginState.LIQUIDATION_DUE,
                "ratio_below_liquidation",
                (NoticeKind.LIQUIDATION_DUE,),
            ),
            # The call was not met in time.
            (MarginState.MARGIN_CALL, MarginCondition.DEADLINE_PASSED): _Rule(
                MarginState.LIQUIDATION_DUE,
                "margin_call_deadline_passed",
                (NoticeKind.LIQUIDATION_DUE,),
            ),
            # --- liquidation due -------------------------------------------------------------
            # Cured (new collateral, a liquidation step that reduced exposure): back to healthy.
            (MarginState.LIQUIDATION_DUE, MarginCondition.COVERED): _Rule(
                MarginState.HEALTHY, "cured", ()
            ),
            # Hysteresis: climbing above the line is not enough; the client stays due until it is
            # covered again, so a client hovering at the line does not flap between states and
            # re-trigger notices.
            (MarginState.LIQUIDATION_DUE, MarginCondition.BELOW_CALL): None,
            (MarginState.LIQUIDATION_DUE, MarginCondition.BELOW_LIQUIDATION): None,
            # No deadline runs once liquidation is due.
            (MarginState.LIQUIDATION_DUE, MarginCondition.DEADLINE_PASSED): None,
        }
    )
)
"""Every margin-state transition, in one place. A missing rule (``None``) means: no change."""


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of margin state: ``deadline`` is the deadline in the new state (set only when a
    margin call starts), ``notices`` what must be published, in that order."""

    before: MarginState
    after: MarginState
    reason: str
    deadline: datetime | None
    notices: tuple[NoticeKind, ...]


def compute_condition(
    state: MarginState,
    *,
    ratio_bps: int | None,
    deadline: datetime | None,
    now: datetime,
    policy: CollateralPolicy,
) -> MarginCondition:
    """Classify a client for the state table (see :class:`MarginCondition`)."""
    if ratio_bps is None or ratio_bps >= policy.margin_call_bps:
        return MarginCondition.COVERED
    if ratio_bps < policy.liquidation_bps:
        return MarginCondition.BELOW_LIQUIDATION
    if state is MarginState.MARGIN_CALL:
        if deadline is None:
            raise InvariantViolation("a client in margin call has no deadline")
        if now >= deadline:
            return MarginCondition.DEADLINE_PASSED
    return MarginCondition.BELOW_CALL


def compute_transition(
    state: MarginState,
    *,
    ratio_bps: int | None,
    deadline: datetime | None,
    now: datetime,
    policy: CollateralPolicy,
) -> Transition | None:
    """The transition a client in ``state`` (with margin-call ``deadline``) makes at ``now``
    given its margin ratio, or None when it stays where it is."""
    _require_aware(now, what="now")
    state = MarginState(state)
    condition = compute_condition(
        state, ratio_bps=ratio_bps, deadline=deadline, now=now, policy=policy
    )
    rule = MARGIN_TRANSITIONS[state, condition]
    if rule is None:
        return None
    return Transition(
        before=state,
        after=rule.after,
        reason=rule.reason,
        deadline=now + policy.margin_call_deadline if rule.starts_deadline else None,
        notices=rule.notices,
    )
