"""Collateral policy: validation, exact valuation, credit, ratio, shortfall, freshness and every
transition of the margin state table. Pure: no event loop, no I/O."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestations.amounts import MAX_DECIMALS, UNITS_LIMIT, Price
from attestations.errors import AmountError, InvariantViolation, NegativeSum, SumOverflow
from exchange.errors import InvalidPolicy
from exchange.policy import (
    DEFAULT_ASSET_CLASSES,
    DEFAULT_CLASS_RATES_BPS,
    MARGIN_TRANSITIONS,
    AssetClass,
    CollateralPolicy,
    Freshness,
    MarginCondition,
    MarginState,
    NoticeKind,
    Transition,
    compute_credit_limit,
    compute_freshness,
    compute_margin_ratio_bps,
    compute_position_value,
    compute_shortfall,
    compute_transition,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
POLICY = CollateralPolicy.default()
US = timedelta(microseconds=1)


# --- the policy --------------------------------------------------------------------------------


def test_default_policy_matches_the_documented_table() -> None:
    assert dict(POLICY.rates_bps) == {
        "BENJI": 9_800,
        "USDC": 9_500,
        "USDT": 9_500,
        "BTC": 8_000,
        "ETH": 7_500,
    }
    assert (POLICY.quote, POLICY.quote_decimals) == ("USD", 2)
    assert (POLICY.leverage_bps, POLICY.margin_call_bps, POLICY.liquidation_bps) == (
        20_000,
        10_000,
        8_000,
    )
    assert POLICY.margin_call_deadline == timedelta(hours=4)
    assert POLICY.stale_after == timedelta(seconds=180)
    assert POLICY.zero_grace == timedelta(seconds=900)
    assert DEFAULT_ASSET_CLASSES["USDT"] is AssetClass.STABLECOIN
    assert DEFAULT_CLASS_RATES_BPS[AssetClass.OTHER] == 0


def test_unknown_asset_is_not_collateral_and_overrides_apply() -> None:
    assert POLICY.rate_bps("DOGE") == 0
    custom = CollateralPolicy.default(rates_bps={"DOGE": 1_000}, leverage_bps=30_000)
    assert custom.rate_bps("DOGE") == 1_000
    assert custom.rate_bps("BTC") == 0
    assert custom.leverage_bps == 30_000


def test_policy_keeps_its_own_copy_of_the_rates() -> None:
    rates = {"BTC": 8_000}
    policy = CollateralPolicy(rates)
    rates["BTC"] = 10_000
    assert policy.rate_bps("BTC") == 8_000
    with pytest.raises(TypeError):
        policy.rates_bps["BTC"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    "overrides",
    [
        {"rates_bps": {"BTC": 10_001}},
        {"rates_bps": {"BTC": -1}},
        {"rates_bps": {"BTC": True}},
        {"rates_bps": {"BTC": 80.0}},
        {"rates_bps": {"btc": 8_000}},
        {"rates_bps": {"USD": 10_000}},
        {"rates_bps": [("BTC", 8_000)]},
        {"quote": "usd"},
        {"quote": ""},
        {"quote_decimals": MAX_DECIMALS + 1},
        {"quote_decimals": -1},
        {"leverage_bps": 0},
        {"leverage_bps": 1_000_001},
        {"margin_call_bps": 0},
        {"liquidation_bps": -1},
        {"liquidation_bps": 10_000},
        {"liquidation_bps": 10_001},
        {"margin_call_bps": 7_000},
        {"margin_call_deadline": timedelta(0)},
        {"stale_after": timedelta(seconds=-1)},
        {"zero_grace": timedelta(0)},
        {"zero_grace": 900},
    ],
)
def test_inconsistent_policies_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidPolicy) as info:
        CollateralPolicy.default(**overrides)
    assert info.value.reason == "invalid_policy"


# --- valuation ---------------------------------------------------------------------------------


def _price(mantissa: int, scale: int, asset: str = "BTC") -> Price:
    return Price(asset, "USD", mantissa, scale)


def test_position_value_worked_example() -> None:
    # 1.5 BTC at 64,123.45 USD at 80 %: 76,948.14 USD exactly.
    value = compute_position_value(
        quantity=150_000_000,
        asset_decimals=8,
        price=_price(6_412_345, 2),
        rate_bps=8_000,
        quote_decimals=2,
    )
    assert value == 7_694_814


def test_position_value_rounds_down_once() -> None:
    # 1 satoshi at 64,123.45 USD at 80 % is 0.0513 cents: nothing.
    assert (
        compute_position_value(
            quantity=1,
            asset_decimals=8,
            price=_price(6_412_345, 2),
            rate_bps=8_000,
            quote_decimals=2,
        )
        == 0
    )
    # Rounded once, at the position: 7 units of 0.333 USD = 2.331 USD -> 233 cents, where
    # rounding each unit first would give 7 * 33 = 231.
    assert (
        compute_position_value(
            quantity=7, asset_decimals=0, price=_price(333, 3), rate_bps=10_000, quote_decimals=2
        )
        == 233
    )


def test_position_without_price_is_worth_zero() -> None:
    assert (
        compute_position_value(
            quantity=10**30, asset_decimals=6, price=None, rate_bps=9_500, quote_decimals=2
        )
        == 0
    )


def test_huge_position_is_exact() -> None:
    top = UNITS_LIMIT - 1
    value = compute_position_value(
        quantity=top, asset_decimals=0, price=_price(top, 0), rate_bps=10_000, quote_decimals=18
    )
    assert value == top * top * 10**18
    value = compute_position_value(
        quantity=top,
        asset_decimals=18,
        price=_price(top, 18),
        rate_bps=9_999,
        quote_decimals=0,
    )
    assert value == math.floor(Fraction(top * top * 9_999, 10**36 * 10_000))


@pytest.mark.parametrize(
    ("quantity", "error"),
    [(-1, NegativeSum), (UNITS_LIMIT, SumOverflow), (1.0, AmountError), (True, AmountError)],
)
def test_position_quantity_out_of_range_is_refused(quantity: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        compute_position_value(
            quantity=quantity, asset_decimals=8, price=None, rate_bps=0, quote_decimals=2
        )


@pytest.mark.parametrize(
    "arguments",
    [
        {"rate_bps": 10_001},
        {"rate_bps": -1},
        {"asset_decimals": 19},
        {"quote_decimals": -1},
        {"asset_decimals": 8.0},
    ],
)
def test_position_parameters_out_of_range_are_refused(arguments: dict[str, Any]) -> None:
    base: dict[str, Any] = {
        "quantity": 1,
        "asset_decimals": 8,
        "price": _price(1, 0),
        "rate_bps": 100,
        "quote_decimals": 2,
    }
    base.update(arguments)
    with pytest.raises(AmountError):
        compute_position_value(**base)


@given(
    quantity=st.integers(0, UNITS_LIMIT - 1),
    mantissa=st.integers(0, UNITS_LIMIT - 1),
    scale=st.integers(0, MAX_DECIMALS),
    asset_decimals=st.integers(0, MAX_DECIMALS),
    quote_decimals=st.integers(0, MAX_DECIMALS),
    rate_bps=st.integers(0, 10_000),
)
def test_position_value_is_the_exact_floor(  # noqa: PLR0917 - one argument per strategy
    quantity: int,
    mantissa: int,
    scale: int,
    asset_decimals: int,
    quote_decimals: int,
    rate_bps: int,
) -> None:
    exact = (
        Fraction(quantity, 10**asset_decimals)
        * Fraction(mantissa, 10**scale)
        * Fraction(rate_bps, 10_000)
        * 10**quote_decimals
    )
    value = compute_position_value(
        quantity=quantity,
        asset_decimals=asset_decimals,
        price=_price(mantissa, scale),
        rate_bps=rate_bps,
        quote_decimals=quote_decimals,
    )
    assert value == math.floor(exact)
    assert value <= exact < value + 1


# --- credit, ratio, shortfall ------------------------------------------------------------------


def test_credit_limit_examples() -> None:
    assert compute_credit_limit(collateral=1_000, unrealised_pnl=0, leverage_bps=20_000) == 2_000
    # Gains never add credit.
    assert compute_credit_limit(collateral=1_000, unrealised_pnl=500, leverage_bps=20_000) == 2_000
    # Losses reduce it.
    assert compute_credit_limit(collateral=1_000, unrealised_pnl=-400, leverage_bps=20_000) == 1_200
    # Losses beyond the collateral: no credit, never negative.
    assert compute_credit_limit(collateral=1_000, unrealised_pnl=-5_000, leverage_bps=20_000) == 0
    # Rounded down.
    assert compute_credit_limit(collateral=3, unrealised_pnl=0, leverage_bps=15_000) == 4


@given(
    collateral=st.integers(0, 2**200),
    pnl=st.integers(-(2**200), 2**200),
    leverage=st.integers(1, 1_000_000),
)
def test_credit_limit_is_the_exact_floor(collateral: int, pnl: int, leverage: int) -> None:
    exact = max(Fraction(0), Fraction(collateral + min(pnl, 0))) * Fraction(leverage, 10_000)
    assert compute_credit_limit(
        collateral=collateral, unrealised_pnl=pnl, leverage_bps=leverage
    ) == math.floor(exact)


def test_credit_limit_refuses_negative_collateral() -> None:
    with pytest.raises(AmountError):
        compute_credit_limit(collateral=-1, unrealised_pnl=0, leverage_bps=20_000)


def test_margin_ratio_none_without_requirement() -> None:
    assert compute_margin_ratio_bps(collateral=0, unrealised_pnl=-10, requirement=0) is None


def test_margin_ratio_floors_toward_minus_infinity_for_negative_equity() -> None:
    assert compute_margin_ratio_bps(collateral=0, unrealised_pnl=-1, requirement=3) == -3_334
    assert compute_margin_ratio_bps(collateral=2, unrealised_pnl=0, requirement=3) == 6_666
    assert compute_margin_ratio_bps(collateral=5, unrealised_pnl=-5, requirement=3) == 0


@given(
    collateral=st.integers(0, 2**160),
    pnl=st.integers(-(2**160), 2**160),
    requirement=st.integers(1, 2**160),
)
def test_margin_ratio_is_the_exact_floor(collateral: int, pnl: int, requirement: int) -> None:
    ratio = compute_margin_ratio_bps(
        collateral=collateral, unrealised_pnl=pnl, requirement=requirement
    )
    assert ratio == math.floor(Fraction((collateral + pnl) * 10_000, requirement))


def test_margin_ratio_refuses_negative_requirement() -> None:
    with pytest.raises(AmountError):
        compute_margin_ratio_bps(collateral=1, unrealised_pnl=0, requirement=-1)


def test_shortfall_examples() -> None:
    assert (
        compute_shortfall(
            collateral=900, unrealised_pnl=0, requirement=1_000, margin_call_bps=10_000
        )
        == 100
    )
    assert (
        compute_shortfall(
            collateral=1_000, unrealised_pnl=0, requirement=1_000, margin_call_bps=10_000
        )
        == 0
    )
    # Rounded up: 3 units at 100.01 % need 3.0003 -> 4.
    assert (
        compute_shortfall(collateral=0, unrealised_pnl=0, requirement=3, margin_call_bps=10_001)
        == 4
    )
    # A negative equity must be made good too.
    assert (
        compute_shortfall(collateral=0, unrealised_pnl=-50, requirement=100, margin_call_bps=10_000)
        == 150
    )
    assert compute_shortfall(
        collateral=0, unrealised_pnl=-50, requirement=0, margin_call_bps=1
    ) == (50)


@given(
    collateral=st.integers(0, 2**100),
    pnl=st.integers(-(2**100), 2**100),
    requirement=st.integers(1, 2**100),
    level=st.integers(1, 1_000_000),
)
def test_shortfall_is_exactly_enough(
    collateral: int, pnl: int, requirement: int, level: int
) -> None:
    shortfall = compute_shortfall(
        collateral=collateral, unrealised_pnl=pnl, requirement=requirement, margin_call_bps=level
    )
    assert shortfall >= 0
    after = compute_margin_ratio_bps(
        collateral=collateral + shortfall, unrealised_pnl=pnl, requirement=requirement
    )
    assert after is not None
    assert after >= level
    if shortfall > 0:
        short = compute_margin_ratio_bps(
            collateral=collateral + shortfall - 1, unrealised_pnl=pnl, requirement=requirement
        )
        assert short is not None
        assert short < level


# --- freshness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "lifetime", "expected"),
    [
        (timedelta(0), timedelta(hours=1), Freshness.FRESH),
        (timedelta(seconds=180), timedelta(hours=1), Freshness.FRESH),
        (timedelta(seconds=180) + US, timedelta(hours=1), Freshness.STALE),
        (timedelta(seconds=1_080), timedelta(hours=1), Freshness.STALE),
        (timedelta(seconds=1_080) + US, timedelta(hours=1), Freshness.ZERO),
        # Expiry before the staleness limit: stale at expiry, zero a grace after it.
        (timedelta(seconds=60) - US, timedelta(seconds=60), Freshness.FRESH),
        (timedelta(seconds=60), timedelta(seconds=60), Freshness.STALE),
        (timedelta(seconds=960) - US, timedelta(seconds=60), Freshness.STALE),
        (timedelta(seconds=960), timedelta(seconds=60), Freshness.ZERO),
    ],
)
def test_freshness_boundaries(offset: timedelta, lifetime: timedelta, expected: Freshness) -> None:
    assert (
        compute_freshness(now=T0 + offset, issued_at=T0, expires_at=T0 + lifetime, policy=POLICY)
        is expected
    )


def test_freshness_refuses_naive_times() -> None:
    with pytest.raises(InvariantViolation):
        compute_freshness(
            now=datetime(2025, 3, 1),  # noqa: DTZ001 - the naive time under test
            issued_at=T0,
            expires_at=T0 + timedelta(hours=1),
            policy=POLICY,
        )


# --- the margin state table --------------------------------------------------------------------


def test_state_table_covers_every_state_and_condition() -> None:
    assert set(MARGIN_TRANSITIONS) == {(s, c) for s in MarginState for c in MarginCondition}


DEADLINE = T0 + timedelta(hours=4)
CALL = MarginState.MARGIN_CALL
DUE = MarginState.LIQUIDATION_DUE
OK = MarginState.HEALTHY


@pytest.mark.parametrize(
    ("state", "ratio", "deadline", "now", "expected"),
    [
        # healthy
        (OK, None, None, T0, None),
        (OK, 10_000, None, T0, None),
        (
            OK,
            9_999,
            None,
            T0,
            Transition(OK, CALL, "ratio_below_margin_call", DEADLINE, (NoticeKind.MARGIN_CALL,)),
        ),
        (
            OK,
            8_000,
            None,
            T0,
            Transition(OK, CALL, "ratio_below_margin_call", DEADLINE, (NoticeKind.MARGIN_CALL,)),
        ),
        (
            OK,
            7_999,
            None,
            T0,
            Transition(
                OK,
                DUE,
                "ratio_below_liquidation",
                None,
                (NoticeKind.MARGIN_CALL, NoticeKind.LIQUIDATION_DUE),
            ),
        ),
        (
            OK,
            -3_334,
            None,
            T0,
            Transition(
                OK,
                DUE,
                "ratio_below_liquidation",
                None,
                (NoticeKind.MARGIN_CALL, NoticeKind.LIQUIDATION_DUE),
            ),
        ),
        # margin call
        (CALL, 10_000, DEADLINE, T0, Transition(CALL, OK, "margin_call_met", None, ())),
        (CALL, None, DEADLINE, T0, Transition(CALL, OK, "margin_call_met", None, ())),
        # Covered when evaluated, even after the deadline: the call was met.
        (CALL, 10_000, DEADLINE, DEADLINE, Transition(CALL, OK, "margin_call_met", None, ())),
        (CALL, 9_000, DEADLINE, DEADLINE - US, None),
        (
            CALL,
            9_000,
            DEADLINE,
            DEADLINE,
            Transition(
                CALL, DUE, "margin_call_deadline_passed", None, (NoticeKind.LIQUIDATION_DUE,)
            ),
        ),
        (
            CALL,
            7_999,
            DEADLINE,
            T0,
            Transition(CALL, DUE, "ratio_below_liquidation", None, (NoticeKind.LIQUIDATION_DUE,)),
        ),
        # liquidation due
        (DUE, 10_000, None, T0, Transition(DUE, OK, "cured", None, ())),
        (DUE, None, None, T0, Transition(DUE, OK, "cured", None, ())),
        (DUE, 9_999, None, T0, None),
        (DUE, 7_000, None, T0, None),
    ],
)
def test_every_transition(
    state: MarginState,
    ratio: int | None,
    deadline: datetime | None,
    now: datetime,
    expected: Transition | None,
) -> None:
    transition = compute_transition(
        state, ratio_bps=ratio, deadline=deadline, now=now, policy=POLICY
    )
    assert transition == expected
    if transition is not None and transition.after is CALL:
        assert transition.deadline == now + POLICY.margin_call_deadline


def test_margin_call_without_deadline_is_an_invariant_violation() -> None:
    with pytest.raises(InvariantViolation):
        compute_transition(CALL, ratio_bps=9_000, deadline=None, now=T0, policy=POLICY)


def test_thresholds_follow_the_policy() -> None:
    policy = CollateralPolicy.default(margin_call_bps=15_000, liquidation_bps=12_000)
    moved = compute_transition(OK, ratio_bps=14_999, deadline=None, now=T0, policy=policy)
    assert moved is not None
    assert moved.after is CALL
    moved = compute_transition(OK, ratio_bps=11_999, deadline=None, now=T0, policy=policy)
    assert moved is not None
    assert moved.after is DUE
