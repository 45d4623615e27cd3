"""The margin ledger: plan / apply, crediting statements, exposures, the margin states with their
deadlines and notices, staleness, freezes, the pre-trade check, restore, and Hypothesis
properties (credit from scratch, replay, pre-trade soundness). Pure: no event loop, no I/O."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestations.amounts import UNITS_LIMIT, Price
from attestations.errors import (
    AmountError,
    DecodeError,
    InvariantViolation,
    NegativeSum,
    PolicyViolation,
)
from exchange.errors import StreamFrozen, StreamNotFrozen, UnknownStream
from exchange.ledger import (
    ClientMargin,
    CreditedStatement,
    ExposureReport,
    Holding,
    JournalEntry,
    LedgerChange,
    MarginLedger,
    StreamHead,
    StreamStatus,
    compute_pending_releases,
)
from exchange.policy import (
    CollateralPolicy,
    Freshness,
    MarginState,
    NoticeKind,
    compute_credit_limit,
    compute_freshness,
    compute_position_value,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
POLICY = CollateralPolicy.default()
DECIMALS = {"BTC": 8, "USDC": 6, "BENJI": 2, "ETH": 18, "DOGE": 8}
A = "bank-a/venue"
B = "bank-b/venue"
BTC = 100_000_000  # one whole BTC in satoshis


def _head(
    stream: str, sequence: int, *, at: datetime, snapshot: bool, lifetime: timedelta
) -> StreamHead:
    kind = "snapshot" if snapshot else "delta"
    return StreamHead(
        stream=stream,
        custodian=stream.split("/", maxsplit=1)[0],
        sequence=sequence,
        digest=hashlib.sha256(f"{stream}/{sequence}/{kind}".encode()).digest(),
        kind=kind,
        issued_at=at,
        expires_at=at + lifetime,
    )


def usd(asset: str, text: str) -> Price:
    return Price.parse(asset=asset, quote="USD", text=text)


def statement(
    stream: str,
    sequence: int,
    changed: Mapping[Holding, int],
    *,
    prices: Mapping[str, Price] | None = None,
    snapshot: bool = True,
    at: datetime = T0,
    lifetime: timedelta = timedelta(hours=1),
) -> CreditedStatement:
    return CreditedStatement(
        stream=stream,
        custodian=stream.split("/", maxsplit=1)[0],
        head=_head(stream, sequence, at=at, snapshot=snapshot, lifetime=lifetime),
        changed=changed,
        snapshot=snapshot,
        prices=prices if prices is not None else {"BTC": usd("BTC", "60000.00")},
    )


def exposure(
    client: str,
    report_id: str,
    *,
    exposure: int,
    requirement: int,
    pnl: int = 0,
    at: datetime = T0,
) -> ExposureReport:
    return ExposureReport(
        client=client,
        report_id=report_id,
        reported_at=at,
        exposure=exposure,
        requirement=requirement,
        unrealised_pnl=pnl,
    )


def commit(ledger: MarginLedger, change: LedgerChange) -> LedgerChange:
    ledger.apply(change)
    ledger.check_indexes()
    return change


def kinds(change: LedgerChange) -> list[str]:
    return [entry.kind for entry in change.journal]


@pytest.fixture
def ledger() -> MarginLedger:
    return MarginLedger(POLICY, decimals=DECIMALS)


# --- crediting ---------------------------------------------------------------------------------


def test_statement_credits_and_values_positions(ledger: MarginLedger) -> None:
    change = commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    assert kinds(change) == ["statement", "credit"]
    credit = change.journal[1]
    assert (credit.client, credit.asset, credit.quantity, credit.detail["before"]) == (
        "alice",
        "BTC",
        BTC,
        0,
    )
    assert credit.value == 4_800_000  # 60,000.00 USD at 80 %
    status = ledger.client_status("alice", now=T0)
    assert status is not None
    assert (status.collateral, status.credit_limit, status.state) == (
        4_800_000,
        9_600_000,
        MarginState.HEALTHY,
    )
    (view,) = status.positions
    assert (view.stream, view.custodian, view.freshness, view.rate_bps) == (
        A,
        "bank-a",
        Freshness.FRESH,
        8_000,
    )
    assert ledger.positions() == {A: {("alice", "BTC"): BTC}}
    assert ledger.clients() == ["alice"]


def test_collateral_sums_streams_of_every_custodian(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    commit(
        ledger,
        ledger.plan_statement(
            statement(B, 7, {("alice", "USDC"): 1_000_000_000}, prices={"USDC": usd("USDC", "1")}),
            now=T0,
        ),
    )
    status = ledger.client_status("alice", now=T0)
    assert status is not None
    # 48,000.00 + 1,000 USDC at 95 % = 950.00
    assert status.collateral == 4_800_000 + 95_000


def test_plans_change_nothing_until_applied(ledger: MarginLedger) -> None:
    before = ledger.state()
    change = ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0)
    ledger.plan_exposure(exposure("alice", "r1", exposure=1, requirement=1), now=T0)
    ledger.plan_freeze(A, reason="fork", now=T0)
    ledger.plan_await_snapshot(A, from_sequence=3, now=T0)
    assert ledger.state() == before
    assert ledger.generation == 0
    assert ledger.client_status("alice", now=T0) is None
    commit(ledger, change)
    assert ledger.generation == 1


def test_apply_refuses_a_change_planned_against_another_generation(ledger: MarginLedger) -> None:
    first = ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0)
    second = ledger.plan_exposure(exposure("alice", "r1", exposure=0, requirement=0), now=T0)
    commit(ledger, first)
    state = ledger.state()
    with pytest.raises(InvariantViolation):
        ledger.apply(second)
    with pytest.raises(InvariantViolation):
        ledger.apply(first)  # applied twice
    assert ledger.state() == state
    assert ledger.generation == 1


def test_delta_changes_only_named_holdings_and_snapshot_replaces(ledger: MarginLedger) -> None:
    commit(
        ledger,
        ledger.plan_statement(
            statement(A, 1, {("alice", "BTC"): BTC, ("bob", "BTC"): 2 * BTC}), now=T0
        ),
    )
    delta = commit(
        ledger,
        ledger.plan_statement(
            statement(
                A,
                2,
                {("alice", "BTC"): 0, ("carol", "BTC"): 5, ("bob", "BTC"): 2 * BTC},
                snapshot=False,
            ),
            now=T0,
        ),
    )
    assert delta.replace_positions == frozenset()
    assert delta.positions == {A: {("alice", "BTC"): 0, ("carol", "BTC"): 5}}
    assert [(e.client, e.quantity, e.detail.get("before")) for e in delta.journal[1:]] == [
        ("alice", 0, BTC),
        ("carol", 5, 0),
    ]
    assert ledger.positions() == {A: {("bob", "BTC"): 2 * BTC, ("carol", "BTC"): 5}}
    snap = commit(ledger, ledger.plan_statement(statement(A, 3, {("dave", "BTC"): 9}), now=T0))
    assert snap.replace_positions == frozenset({A})
    assert snap.positions == {A: {("dave", "BTC"): 9}}
    assert sorted((e.client, e.quantity) for e in snap.journal if e.kind == "credit") == [
        ("bob", 0),
        ("carol", 0),
        ("dave", 9),
    ]
    assert ledger.positions() == {A: {("dave", "BTC"): 9}}
    assert ledger.clients() == ["dave"]


def test_empty_snapshot_clears_the_stream(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    commit(ledger, ledger.plan_statement(statement(A, 2, {}), now=T0))
    assert ledger.positions() == {}
    assert ledger.client_status("alice", now=T0) is None


def test_missing_price_counts_zero_and_is_journaled(ledger: MarginLedger) -> None:
    change = commit(
        ledger,
        ledger.plan_statement(
            statement(
                A,
                1,
                {("alice", "BTC"): BTC, ("alice", "ETH"): 10**18},
                # A price in another quote is no price for this ledger.
                prices={"BTC": usd("BTC", "60000"), "ETH": Price("ETH", "EUR", 3000, 0)},
            ),
            now=T0,
        ),
    )
    missing = [e for e in change.journal if e.kind == "price_missing"]
    assert [(e.asset, e.value) for e in missing] == [("ETH", 0)]
    status = ledger.client_status("alice", now=T0)
    assert status is not None
    assert status.collateral == 4_800_000
    eth = next(p for p in status.positions if p.asset == "ETH")
    assert (eth.price, eth.value) == (None, 0)


def test_asset_outside_the_table_is_refused(ledger: MarginLedger) -> None:
    with pytest.raises(PolicyViolation):
        ledger.plan_statement(statement(A, 1, {("alice", "XRP"): 1}), now=T0)


def test_statement_that_does_not_follow_the_head_is_an_invariant_violation(
    ledger: MarginLedger,
) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): 1}), now=T0))
    for sequence in (1, 3):
        with pytest.raises(InvariantViolation):
            ledger.plan_statement(statement(A, sequence, {}), now=T0)


def test_huge_values_are_exact(ledger: MarginLedger) -> None:
    top = UNITS_LIMIT - 1
    price = Price("ETH", "USD", 10**30 + 7, 3)
    commit(
        ledger,
        ledger.plan_statement(
            statement(A, 1, {("whale", "ETH"): top}, prices={"ETH": price}), now=T0
        ),
    )
    status = ledger.client_status("whale", now=T0)
    assert status is not None
    exact = Fraction(top, 10**18) * Fraction(price.mantissa, 10**3) * Fraction(7_500, 10_000) * 100
    assert status.collateral == math.floor(exact)
    assert status.credit_limit == math.floor(exact) * 2


# --- gaps, resynchronisation, forks ------------------------------------------------------------


def test_await_snapshot_then_resync_journals_the_skipped_links(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 4, {("alice", "BTC"): 1}), now=T0))
    awaiting = commit(ledger, ledger.plan_await_snapshot(A, from_sequence=5, now=T0))
    assert kinds(awaiting) == ["await_snapshot"]
    assert awaiting.journal[0].detail == {"from_sequence": 5}
    status = ledger.stream_status(A)
    assert status is not None
    assert status.awaiting_snapshot_from == 5
    assert ledger.plan_await_snapshot(A, from_sequence=5, now=T0).is_empty
    with pytest.raises(InvariantViolation):
        ledger.plan_await_snapshot(A, from_sequence=4, now=T0)
    with pytest.raises(InvariantViolation):  # only a snapshot resynchronises
        ledger.plan_statement(statement(A, 9, {}, snapshot=False), now=T0, resync_from=5)
    with pytest.raises(InvariantViolation):  # must start after the head
        ledger.plan_statement(statement(A, 9, {}), now=T0, resync_from=4)
    change = commit(
        ledger,
        ledger.plan_statement(statement(A, 9, {("alice", "BTC"): 2}), now=T0, resync_from=5),
    )
    resync = next(e for e in change.journal if e.kind == "resync")
    assert resync.detail == {"from": 5, "to": 8, "head": 4}
    status = ledger.stream_status(A)
    assert status is not None
    assert status.awaiting_snapshot_from is None
    assert status.head is not None
    assert status.head.sequence == 9


def test_frozen_stream_refuses_statements_until_resolved(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    commit(ledger, ledger.plan_exposure(exposure("alice", "r1", exposure=0, requirement=0), now=T0))
    with pytest.raises(StreamNotFrozen):
        ledger.plan_resolve(A, operator="ops", reason="nothing", now=T0)
    with pytest.raises(UnknownStream):
        ledger.plan_resolve(B, operator="ops", reason="nothing", now=T0)
    frozen = commit(ledger, ledger.plan_freeze(A, reason="fork at 2", now=T0))
    assert kinds(frozen) == ["freeze"]
    assert ledger.plan_freeze(A, reason="again", now=T0).is_empty
    with pytest.raises(StreamFrozen) as info:
        ledger.plan_statement(statement(A, 2, {}), now=T0)
    assert info.value.reason == "stream_frozen"
    decision = ledger.check_pretrade("alice", add_exposure=1, now=T0)
    assert (decision.allowed, decision.reason, decision.headroom) == (False, "stream_frozen", 0)
    # Collateral still counts: freezing blocks new credit, it does not devalue.
    status = ledger.client_status("alice", now=T0)
    assert status is not None
    assert status.collateral == 4_800_000
    assert status.positions[0].frozen
    resolved = commit(ledger, ledger.plan_resolve(A, operator="ops-anna", reason="ok", now=T0))
    assert resolved.journal[0].detail == {
        "operator": "ops-anna",
        "reason": "ok",
        "frozen_reason": "fork at 2",
    }
    assert ledger.check_pretrade("alice", add_exposure=1, now=T0).allowed
    commit(ledger, ledger.plan_statement(statement(A, 2, {}), now=T0))


def test_a_stream_frozen_before_its_first_statement_survives_restore(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_freeze(A, reason="fork", now=T0))
    state = ledger.state()
    restored = MarginLedger.restore(
        POLICY,
        decimals=DECIMALS,
        streams=state.streams.values(),
        positions=state.positions,
        prices=state.prices,
        exposures=state.exposures.values(),
        margins=state.margins.values(),
    )
    assert restored.state() == state
    with pytest.raises(InvariantViolation):
        MarginLedger.restore(
            POLICY,
            decimals=DECIMALS,
            streams=[StreamStatus(None, True, "fork", None)],
            positions={},
            prices={},
            exposures=[],
            margins=[],
        )


# --- exposures and margin states ---------------------------------------------------------------


def test_older_and_replayed_exposure_reports_are_ignored(ledger: MarginLedger) -> None:
    first = exposure("alice", "r2", exposure=10, requirement=0, at=T0)
    change = commit(ledger, ledger.plan_exposure(first, now=T0))
    assert kinds(change) == ["exposure"]
    assert change.journal[0].value == 10
    older = exposure("alice", "r1", exposure=99, requirement=0, at=T0 - timedelta(seconds=1))
    assert ledger.plan_exposure(older, now=T0).is_empty
    replay = exposure("alice", "r2", exposure=55, requirement=0, at=T0 + timedelta(seconds=1))
    assert ledger.plan_exposure(replay, now=T0).is_empty
    newer = exposure("alice", "r3", exposure=20, requirement=0, at=T0 + timedelta(seconds=1))
    change = commit(ledger, ledger.plan_exposure(newer, now=T0))
    assert change.journal[0].detail["before"] == 10
    status = ledger.client_status("alice", now=T0)
    assert status is not None
    assert status.exposure == 20


def test_margin_call_deadline_then_liquidation_then_cure(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    commit(
        ledger,
        ledger.plan_statement(
            statement(B, 1, {("alice", "USDC"): 10**6}, prices={"USDC": usd("USDC", "1")}),
            now=T0,
        ),
    )
    # Collateral 48,000.95; requirement 50,000.00 -> ratio 9,600 bp: margin call.
    change = commit(
        ledger,
        ledger.plan_exposure(
            exposure("alice", "r1", exposure=9_000_000, requirement=5_000_000), now=T0
        ),
    )
    assert kinds(change) == ["exposure", "state"]
    assert change.journal[1].detail["after"] == "margin_call"
    (notice,) = change.notices
    deadline = T0 + timedelta(hours=4)
    assert notice.kind is NoticeKind.MARGIN_CALL
    assert notice.custodians == ("bank-a", "bank-b")
    assert (notice.deadline, notice.collateral, notice.ratio_bps) == (deadline, 4_800_095, 9_600)
    assert notice.shortfall == 5_000_000 - 4_800_095
    assert change.margins == {"alice": ClientMargin("alice", MarginState.MARGIN_CALL, T0, deadline)}
    decision = ledger.check_pretrade("alice", add_exposure=0, now=T0)
    assert (decision.allowed, decision.reason) == (False, "not_healthy")

    # Before the deadline nothing moves (statements re-sent fresh so staleness plays no part).
    quiet = ledger.plan_evaluation(now=T0 + timedelta(seconds=10))
    assert quiet.is_empty
    commit(
        ledger,
        ledger.plan_statement(
            statement(A, 2, {}, snapshot=False, at=deadline - timedelta(seconds=1)),
            now=deadline - timedelta(seconds=1),
        ),
    )
    commit(
        ledger,
        ledger.plan_statement(
            statement(
                B,
                2,
                {},
                snapshot=False,
                prices={"USDC": usd("USDC", "1")},
                at=deadline - timedelta(seconds=1),
            ),
            now=deadline - timedelta(seconds=1),
        ),
    )
    due = commit(ledger, ledger.plan_evaluation(now=deadline))
    assert [n.kind for n in due.notices] == [NoticeKind.LIQUIDATION_DUE]
    assert due.journal[0].detail["reason"] == "margin_call_deadline_passed"
    assert due.margins["alice"].state is MarginState.LIQUIDATION_DUE

    # New collateral arrives: cured.
    cured = commit(
        ledger,
        ledger.plan_statement(
            statement(A, 3, {("alice", "BTC"): 2 * BTC}, snapshot=False, at=deadline),
            now=deadline,
        ),
    )
    state_entry = next(e for e in cured.journal if e.kind == "state")
    assert (state_entry.detail["before"], state_entry.detail["reason"]) == (
        "liquidation_due",
        "cured",
    )
    assert cured.notices == ()
    assert ledger.check_pretrade("alice", add_exposure=1, now=deadline).allowed


def test_fall_through_the_line_sends_both_notices(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    change = commit(
        ledger,
        ledger.plan_exposure(
            exposure("alice", "r1", exposure=1, requirement=10_000_000, pnl=-100), now=T0
        ),
    )
    assert [n.kind for n in change.notices] == [NoticeKind.MARGIN_CALL, NoticeKind.LIQUIDATION_DUE]
    call, liquidation = change.notices
    assert call.deadline == T0  # already due
    assert liquidation.deadline is None
    assert liquidation.equity == 4_800_000 - 100
    assert liquidation.ratio_bps == 4_799


def test_margin_call_met_by_a_lower_requirement(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    commit(
        ledger,
        ledger.plan_exposure(exposure("alice", "r1", exposure=1, requirement=5_000_000), now=T0),
    )
    met = commit(
        ledger,
        ledger.plan_exposure(exposure("alice", "r2", exposure=1, requirement=4_800_000), now=T0),
    )
    assert met.journal[-1].detail["reason"] == "margin_call_met"
    assert met.margins["alice"] == ClientMargin("alice", MarginState.HEALTHY, T0, None)


def test_client_with_exposure_and_no_collateral_is_due_at_once(ledger: MarginLedger) -> None:
    change = commit(
        ledger, ledger.plan_exposure(exposure("zed", "r1", exposure=5, requirement=5), now=T0)
    )
    assert [n.kind for n in change.notices] == [NoticeKind.MARGIN_CALL, NoticeKind.LIQUIDATION_DUE]
    assert change.notices[0].custodians == ()


# --- staleness ---------------------------------------------------------------------------------


def test_staleness_fresh_then_stale_then_zero(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    commit(
        ledger,
        ledger.plan_exposure(exposure("alice", "r1", exposure=100, requirement=1_000_000), now=T0),
    )
    fresh = T0 + POLICY.stale_after
    assert ledger.check_pretrade("alice", add_exposure=1, now=fresh).allowed
    assert ledger.plan_evaluation(now=fresh).is_empty

    stale = fresh + timedelta(microseconds=1)
    decision = ledger.check_pretrade("alice", add_exposure=1, now=stale)
    assert (decision.allowed, decision.reason, decision.headroom) == (False, "stream_stale", 0)
    status = ledger.client_status("alice", now=stale)
    assert status is not None
    assert status.collateral == 4_800_000  # still counts
    assert status.positions[0].freshness is Freshness.STALE
    assert ledger.plan_evaluation(now=stale).is_empty

    zero = T0 + POLICY.stale_after + POLICY.zero_grace + timedelta(microseconds=1)
    status = ledger.client_status("alice", now=zero)
    assert status is not None
    assert (status.collateral, status.credit_limit, status.positions[0].value) == (0, 0, 0)
    assert status.positions[0].freshness is Freshness.ZERO
    decision = ledger.check_pretrade("alice", add_exposure=0, now=zero)
    assert (decision.allowed, decision.reason) == (False, "not_healthy")
    change = commit(ledger, ledger.plan_evaluation(now=zero))
    assert change.margins["alice"].state is MarginState.LIQUIDATION_DUE
    assert [n.kind for n in change.notices] == [NoticeKind.MARGIN_CALL, NoticeKind.LIQUIDATION_DUE]


def test_statement_re_evaluates_only_clients_it_can_affect(ledger: MarginLedger) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    commit(ledger, ledger.plan_statement(statement(B, 1, {("bob", "BTC"): BTC}), now=T0))
    for client in ("alice", "bob"):
        commit(
            ledger,
            ledger.plan_exposure(exposure(client, client, exposure=1, requirement=1), now=T0),
        )
    later = T0 + timedelta(hours=2)  # both streams count as zero now
    change = ledger.plan_statement(statement(A, 2, {}, snapshot=False, at=later), now=later)
    # Stream A is fresh again for alice; bob (only on B) is not touched by a statement on A.
    assert set(change.margins) == set()
    evaluation = ledger.plan_evaluation(now=later)
    assert set(evaluation.margins) == {"alice", "bob"}


# --- pre-trade ---------------------------------------------------------------------------------


def test_pretrade_reasons_and_headroom(ledger: MarginLedger) -> None:
    decision = ledger.check_pretrade("nobody", add_exposure=1, now=T0)
    assert (decision.allowed, decision.reason, decision.headroom) == (False, "unknown_client", 0)
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    decision = ledger.check_pretrade("alice", add_exposure=9_600_000, now=T0)
    assert (decision.allowed, decision.reason, decision.headroom) == (True, None, 9_600_000)
    decision = ledger.check_pretrade("alice", add_exposure=9_600_001, now=T0)
    assert (decision.allowed, decision.reason, decision.headroom) == (
        False,
        "insufficient_credit",
        9_600_000,
    )
    commit(
        ledger,
        ledger.plan_exposure(
            exposure("alice", "r1", exposure=600_000, requirement=100, pnl=-1_000_000), now=T0
        ),
    )
    # Credit (48,000.00 - 10,000.00) * 2 = 76,000.00, of which 6,000.00 used.
    decision = ledger.check_pretrade("alice", add_exposure=7_000_000, now=T0)
    assert (decision.allowed, decision.headroom) == (True, 7_000_000)
    assert not ledger.check_pretrade("alice", add_exposure=7_000_001, now=T0).allowed
    # Over the limit already (losses grew): not even zero more.
    commit(
        ledger,
        ledger.plan_exposure(
            exposure("alice", "r2", exposure=7_000_001, requirement=100, pnl=-1_300_000), now=T0
        ),
    )
    decision = ledger.check_pretrade("alice", add_exposure=0, now=T0)
    assert (decision.allowed, decision.reason, decision.headroom) == (
        False,
        "insufficient_credit",
        0,
    )
    with pytest.raises(NegativeSum):
        ledger.check_pretrade("alice", add_exposure=-1, now=T0)
    with pytest.raises(AmountError):
        ledger.check_pretrade("alice", add_exposure=1.5, now=T0)  # type: ignore[arg-type]


# --- records -----------------------------------------------------------------------------------


def test_records_are_validated() -> None:
    with pytest.raises(DecodeError):  # snapshot flag disagrees with the head
        CreditedStatement(
            stream=A,
            custodian="bank-a",
            head=_head(A, 1, at=T0, snapshot=False, lifetime=timedelta(hours=1)),
            changed={},
            snapshot=True,
            prices={},
        )
    with pytest.raises(NegativeSum):
        statement(A, 1, {("alice", "BTC"): -1})
    with pytest.raises(DecodeError):
        statement(A, 1, {("alice smith", "BTC"): 1})
    with pytest.raises(DecodeError):  # price filed under another asset
        statement(A, 1, {}, prices={"ETH": usd("BTC", "1")})
    with pytest.raises(DecodeError):  # custodian is not the stream's
        StreamHead(A, "bank-b", 1, b"\0" * 32, "snapshot", T0, T0 + timedelta(seconds=1))
    with pytest.raises(DecodeError):
        StreamHead(A, "bank-a", 1, b"\0" * 32, "snapshot", T0, T0)
    with pytest.raises(DecodeError):
        StreamStatus(None, True, None, None, stream=A)
    with pytest.raises(DecodeError):
        ClientMargin("alice", MarginState.MARGIN_CALL, T0, None)
    with pytest.raises(DecodeError):
        exposure("alice", "", exposure=0, requirement=0)
    with pytest.raises(NegativeSum):
        exposure("alice", "r", exposure=-1, requirement=0)


# --- properties --------------------------------------------------------------------------------

CLIENTS = ("alice", "bob", "carol")
ASSETS = ("BTC", "USDC", "DOGE")  # DOGE has no rate: attested, never collateral
STREAMS = (A, B)


@dataclass
class Model:
    """The latest statement of each stream, kept independently of the ledger."""

    positions: dict[str, dict[Holding, int]] = field(default_factory=dict)
    prices: dict[str, dict[str, Price]] = field(default_factory=dict)
    heads: dict[str, StreamHead] = field(default_factory=dict)
    reports: dict[str, ExposureReport] = field(default_factory=dict)

    def credit_limit(self, client: str, now: datetime) -> int:
        collateral = 0
        for stream, held in self.positions.items():
            head = self.heads[stream]
            freshness = compute_freshness(
                now=now, issued_at=head.issued_at, expires_at=head.expires_at, policy=POLICY
            )
            if freshness is Freshness.ZERO:
                continue
            for (account, asset), quantity in held.items():
                if account == client:
                    collateral += compute_position_value(
                        quantity=quantity,
                        asset_decimals=DECIMALS[asset],
                        price=self.prices[stream].get(asset),
                        rate_bps=POLICY.rate_bps(asset),
                        quote_decimals=POLICY.quote_decimals,
                    )
        report = self.reports.get(client)
        pnl = report.unrealised_pnl if report is not None else 0
        return max(0, collateral + min(pnl, 0)) * POLICY.leverage_bps // 10_000


quantities = st.one_of(st.integers(0, 10 * BTC), st.integers(0, UNITS_LIMIT - 1), st.just(0))
price_table = st.dictionaries(
    st.sampled_from(ASSETS),
    st.tuples(st.integers(0, 10**20), st.integers(0, 18)),
    max_size=3,
)
operation = st.one_of(
    st.tuples(
        st.just("statement"),
        st.sampled_from(STREAMS),
        st.booleans(),
        st.dictionaries(
            st.tuples(st.sampled_from(CLIENTS), st.sampled_from(ASSETS)), quantities, max_size=5
        ),
        price_table,
        st.integers(60, 3_600),
    ),
    st.tuples(
        st.just("exposure"),
        st.sampled_from(CLIENTS),
        st.integers(0, 10**12),
        st.integers(0, 10**12),
        st.integers(-(10**12), 10**12),
        st.booleans(),  # replay an earlier report instead
    ),
    st.tuples(st.just("evaluate")),
    st.tuples(st.just("freeze"), st.sampled_from(STREAMS)),
    st.tuples(st.just("resolve"), st.sampled_from(STREAMS)),
    st.tuples(st.just("await"), st.sampled_from(STREAMS)),
)
steps = st.lists(st.tuples(operation, st.integers(0, 700)), max_size=25)


class FakeStore:
    """Persists changes as exchange/store.py does: one row per stream, position, price table,
    exposure and margin state."""

    def __init__(self) -> None:
        self.streams: dict[str, StreamStatus] = {}
        self.positions: dict[str, dict[Holding, int]] = {}
        self.prices: dict[str, dict[str, Price]] = {}
        self.exposures: dict[str, ExposureReport] = {}
        self.margins: dict[str, ClientMargin] = {}

    def persist(self, change: LedgerChange) -> None:
        self.streams.update(change.streams)
        for stream in change.replace_positions:
            self.positions[stream] = {}
        for stream, held in change.positions.items():
            rows = self.positions.setdefault(stream, {})
            for holding, quantity in held.items():
                if quantity:
                    rows[holding] = quantity
                else:
                    rows.pop(holding, None)
        self.positions = {s: rows for s, rows in self.positions.items() if rows}
        for stream, table in change.prices.items():
            self.prices[stream] = dict(table)
        self.exposures.update(change.exposures)
        self.margins.update(change.margins)

    def restore(self) -> MarginLedger:
        return MarginLedger.restore(
            POLICY,
            decimals=DECIMALS,
            streams=self.streams.values(),
            positions=self.positions,
            prices=self.prices,
            exposures=self.exposures.values(),
            margins=self.margins.values(),
        )


def run(  # noqa: PLR0912 - one branch per kind of generated operation
    ledger: MarginLedger,
    plan: list[tuple[tuple[object, ...], int]],
    *,
    store: FakeStore | None = None,
    model: Model | None = None,
    check: bool = False,
) -> datetime:
    """Drive ``ledger`` through ``plan``; return the final time. With ``check``, verify property
    (1) against ``model`` after every step."""
    now = T0
    sequences: dict[str, int] = {}
    reports: list[ExposureReport] = []
    for number, (op, advance) in enumerate(plan):
        now += timedelta(seconds=advance)
        change: LedgerChange | None = None
        match op:
            case ("statement", str(stream), bool(snapshot), dict(changed), dict(table), int(life)):
                sequence = sequences.get(stream, 0) + 1
                credited = statement(
                    stream,
                    sequence,
                    changed,
                    prices={a: Price(a, "USD", m, s) for a, (m, s) in table.items()},
                    snapshot=snapshot,
                    at=now,
                    lifetime=timedelta(seconds=life),
                )
                status = ledger.stream_status(stream)
                if status is not None and status.frozen:
                    with pytest.raises(StreamFrozen):
                        ledger.plan_statement(credited, now=now)
                    continue
                change = ledger.plan_statement(credited, now=now)
                sequences[stream] = sequence
                if model is not None:
                    held = {} if snapshot else dict(model.positions.get(stream, {}))
                    for holding, quantity in changed.items():
                        if quantity:
                            held[holding] = quantity
                        else:
                            held.pop(holding, None)
                    model.positions[stream] = held
                    model.prices[stream] = dict(credited.prices)
                    model.heads[stream] = credited.head
            case ("exposure", str(client), int(exp), int(req), int(pnl), bool(replay)):
                if replay and reports:
                    report = reports[(exp + req) % len(reports)]
                else:
                    report = exposure(
                        client, f"r{number}", exposure=exp, requirement=req, pnl=pnl, at=now
                    )
                    reports.append(report)
                change = ledger.plan_exposure(report, now=now)
                if model is not None and change.exposures:
                    model.reports[report.client] = report
            case ("evaluate",):
                change = ledger.plan_evaluation(now=now)
            case ("freeze", str(stream)):
                change = ledger.plan_freeze(stream, reason="fork", now=now)
            case ("resolve", str(stream)):
                status = ledger.stream_status(stream)
                if status is None or not status.frozen:
                    continue
                change = ledger.plan_resolve(stream, operator="ops", reason="checked", now=now)
            case ("await", str(stream)):
                change = ledger.plan_await_snapshot(
                    stream, from_sequence=sequences.get(stream, 0) + 1, now=now
                )
            case _:
                raise AssertionError(op)
        if store is not None:
            store.persist(change)
        ledger.apply(change)
        if check:
            assert model is not None
            ledger.check_indexes()
            for client in ledger.clients():
                status_now = ledger.client_status(client, now=now)
                assert status_now is not None
                assert status_now.credit_limit == model.credit_limit(client, now)
                assert status_now.credit_limit == compute_credit_limit(
                    collateral=status_now.collateral,
                    unrealised_pnl=status_now.unrealised_pnl,
                    leverage_bps=POLICY.leverage_bps,
                )
    return now


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps)
def test_property_credit_never_exceeds_the_latest_statements(
    plan: list[tuple[tuple[object, ...], int]],
) -> None:
    run(MarginLedger(POLICY, decimals=DECIMALS), plan, model=Model(), check=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps)
def test_property_restore_and_replay_reach_the_same_ledger(
    plan: list[tuple[tuple[object, ...], int]],
) -> None:
    store = FakeStore()
    live = MarginLedger(POLICY, decimals=DECIMALS)
    now = run(live, plan, store=store)
    restored = store.restore()
    restored.check_indexes()
    replayed = MarginLedger(POLICY, decimals=DECIMALS)
    run(replayed, plan)
    assert live.state() == restored.state() == replayed.state()
    assert live.clients() == restored.clients() == replayed.clients()
    for client in live.clients():
        assert (
            live.client_status(client, now=now)
            == restored.client_status(client, now=now)
            == replayed.client_status(client, now=now)
        )
    # The restored ledger carries on exactly like the live one.
    later = now + timedelta(hours=5)
    expected = live.plan_evaluation(now=later)
    assert replace(restored.plan_evaluation(now=later), generation=expected.generation) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps, added=st.integers(0, 10**13), later=st.integers(0, 3_000))
def test_property_pretrade_allowed_implies_credit_and_health(
    plan: list[tuple[tuple[object, ...], int]], added: int, later: int
) -> None:
    ledger = MarginLedger(POLICY, decimals=DECIMALS)
    now = run(ledger, plan) + timedelta(seconds=later)
    for client in (*CLIENTS, "nobody"):
        decision = ledger.check_pretrade(client, add_exposure=added, now=now)
        status = ledger.client_status(client, now=now)
        if status is None:
            assert decision.reason == "unknown_client"
            continue
        if decision.allowed:
            assert status.exposure + added <= status.credit_limit
            assert status.state is MarginState.HEALTHY
            assert status.ratio_bps is None or status.ratio_bps >= POLICY.margin_call_bps
            assert all(p.freshness is Freshness.FRESH and not p.frozen for p in status.positions)
            assert decision.headroom == max(0, status.credit_limit - status.exposure)
        else:
            assert decision.reason is not None


# --- releases -------------------------------------------------------------------------------------

RELEASE_ID = hashlib.sha256(b"release-1").hexdigest()
EXPIRES = T0 + timedelta(minutes=15)


def _released(
    ledger: MarginLedger,
    quantity: int,
    *,
    release_id: str = RELEASE_ID,
    now: datetime = T0,
    expires_at: datetime = EXPIRES,
) -> LedgerChange:
    decision, change = ledger.plan_release(
        "alice",
        stream=A,
        asset="BTC",
        quantity=quantity,
        release_id=release_id,
        issued_at=now,
        expires_at=expires_at,
        now=now,
    )
    assert decision.allowed, decision
    return commit(ledger, change)


def _collateral(ledger: MarginLedger, now: datetime = T0) -> int:
    status = ledger.client_status("alice", now=now)
    assert status is not None
    return status.collateral


@pytest.fixture
def pledged(ledger: MarginLedger) -> MarginLedger:
    """alice: 1 BTC on stream A (4,800,000 of collateral, credit limit 9,600,000), exposure
    4,000,000 needing 2,000,000 of margin."""
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    commit(
        ledger,
        ledger.plan_exposure(
            exposure("alice", "r1", exposure=4_000_000, requirement=2_000_000), now=T0
        ),
    )
    return ledger


def test_a_release_within_the_margin_is_reserved_until_shown(pledged: MarginLedger) -> None:
    decision = pledged.check_release("alice", stream=A, asset="BTC", quantity=BTC // 2, now=T0)
    assert (decision.allowed, decision.reason, decision.releasable) == (True, None, BTC)
    assert (decision.collateral, decision.credit_limit) == (2_400_000, 4_800_000)
    assert pledged.state().releases == {}  # a check changes nothing
    change = _released(pledged, BTC // 2)
    (entry,) = change.journal
    assert (entry.kind, entry.client, entry.stream, entry.asset, entry.quantity) == (
        "release",
        "alice",
        A,
        "BTC",
        BTC // 2,
    )
    assert entry.detail["release_id"] == RELEASE_ID
    assert entry.detail["cap"] == BTC // 2
    assert entry.detail["credited"] == BTC
    assert _collateral(pledged) == 2_400_000
    status = pledged.client_status("alice", now=T0)
    assert status is not None
    (view,) = status.positions
    assert (view.quantity, view.reserved, view.value) == (BTC, BTC // 2, 2_400_000)
    # The statement that shows the unpledge: the units are not taken off a second time.
    shown = statement(
        A, 2, {("alice", "BTC"): BTC // 2}, snapshot=False, at=T0 + timedelta(minutes=1)
    )
    commit(pledged, pledged.plan_statement(shown, now=T0 + timedelta(minutes=1)))
    assert _collateral(pledged, T0 + timedelta(minutes=1)) == 2_400_000
    # A pledge added before the acknowledgement expired counts once a statement issued after
    # the expiry shows it (the reservation then ends: any unpledge under it is in that statement).
    more = statement(A, 3, {("alice", "BTC"): BTC}, snapshot=False, at=T0 + timedelta(minutes=2))
    commit(pledged, pledged.plan_statement(more, now=T0 + timedelta(minutes=2)))
    assert _collateral(pledged, T0 + timedelta(minutes=2)) == 2_400_000  # capped, conservative
    later = statement(A, 4, {("alice", "BTC"): BTC}, snapshot=False, at=EXPIRES)
    commit(pledged, pledged.plan_statement(later, now=EXPIRES))
    assert _collateral(pledged, EXPIRES) == 4_800_000
    assert pledged.pending_releases("alice") == ()


def test_an_unused_release_still_counts_until_a_statement_after_its_expiry(
    pledged: MarginLedger,
) -> None:
    """The custodian may unpledge until the expiry; a statement issued before it may not show
    the unpledge, so only a statement issued at or after it ends the reservation."""
    _released(pledged, BTC // 4)
    before = statement(
        A, 2, {("alice", "BTC"): BTC}, snapshot=False, at=EXPIRES - timedelta(milliseconds=1)
    )
    commit(pledged, pledged.plan_statement(before, now=EXPIRES))
    assert _collateral(pledged, EXPIRES) == 3_600_000
    after = statement(A, 3, {("alice", "BTC"): BTC}, snapshot=False, at=EXPIRES)
    commit(pledged, pledged.plan_statement(after, now=EXPIRES))
    assert _collateral(pledged, EXPIRES) == 4_800_000


def test_releases_add_up_and_never_exceed_what_is_counted(pledged: MarginLedger) -> None:
    _released(pledged, BTC // 4)
    second = hashlib.sha256(b"release-2").hexdigest()
    decision = pledged.check_release("alice", stream=A, asset="BTC", quantity=BTC, now=T0)
    assert (decision.allowed, decision.reason, decision.releasable) == (
        False,
        "exceeds_credited",
        3 * BTC // 4,
    )
    _released(pledged, BTC // 4, release_id=second)
    assert _collateral(pledged) == 2_400_000
    assert [r.cap for r in pledged.pending_releases("alice")] == [3 * BTC // 4, BTC // 2]
    # The first unpledge shown alone: the second release still caps the holding.
    shown = statement(
        A, 2, {("alice", "BTC"): 3 * BTC // 4}, snapshot=False, at=T0 + timedelta(minutes=1)
    )
    commit(pledged, pledged.plan_statement(shown, now=T0 + timedelta(minutes=1)))
    assert _collateral(pledged, T0 + timedelta(minutes=1)) == 2_400_000


def test_the_same_release_id_again_changes_nothing(pledged: MarginLedger) -> None:
    _released(pledged, BTC // 4)
    decision, change = pledged.plan_release(
        "alice",
        stream=A,
        asset="BTC",
        quantity=BTC // 4,
        release_id=RELEASE_ID,
        issued_at=T0,
        expires_at=EXPIRES,
        now=T0,
    )
    assert decision.allowed
    assert change.is_empty


@pytest.mark.parametrize(
    ("quantity", "exposure_value", "requirement", "reason"),
    [
        (BTC // 2, 4_800_000, 2_000_000, None),  # exactly at the new limit
        (BTC // 2 + 1, 4_800_000, 2_000_000, "insufficient_credit"),  # limit 4,799,998
        (3 * BTC // 4, 0, 2_000_000, "not_healthy"),  # ratio 6,000 bp
        (3 * BTC // 4, 2_500_000, 0, "insufficient_credit"),
        (BTC + 1, 0, 0, "exceeds_credited"),
        (BTC, 0, 0, None),  # nothing at stake: everything may go
    ],
)
def test_release_refused_by_the_margin(
    ledger: MarginLedger, quantity: int, exposure_value: int, requirement: int, reason: str | None
) -> None:
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    report = exposure("alice", "r1", exposure=exposure_value, requirement=requirement)
    commit(ledger, ledger.plan_exposure(report, now=T0))
    decision, change = ledger.plan_release(
        "alice",
        stream=A,
        asset="BTC",
        quantity=quantity,
        release_id=RELEASE_ID,
        issued_at=T0,
        expires_at=EXPIRES,
        now=T0,
    )
    assert (decision.allowed, decision.reason) == (reason is None, reason)
    assert change.is_empty == (reason is not None)


def test_release_refused_by_the_stream_or_the_client(pledged: MarginLedger) -> None:
    def reason(
        client: str = "alice", stream: str = A, asset: str = "BTC", now: datetime = T0
    ) -> str | None:
        return pledged.check_release(client, stream=stream, asset=asset, quantity=1, now=now).reason

    assert reason(client="nobody") == "unknown_client"
    assert reason(asset="USDC") == "not_credited"
    assert reason(stream=B) == "not_credited"
    stale = T0 + POLICY.stale_after + timedelta(milliseconds=1)
    assert reason(now=stale) == "stream_stale"
    commit(pledged, pledged.plan_freeze(A, reason="fork", now=T0))
    assert reason() == "stream_frozen"
    commit(pledged, pledged.plan_resolve(A, operator="op", reason="checked", now=T0))
    assert reason() is None
    bad = exposure("alice", "r2", exposure=9_000_000, requirement=5_000_000)
    commit(pledged, pledged.plan_exposure(bad, now=T0))  # margin call
    assert reason() == "not_healthy"


def test_release_input_is_checked(pledged: MarginLedger) -> None:
    with pytest.raises(DecodeError):
        pledged.check_release("alice", stream=A, asset="BTC", quantity=0, now=T0)
    with pytest.raises(NegativeSum):
        pledged.check_release("alice", stream=A, asset="BTC", quantity=-1, now=T0)
    with pytest.raises(AmountError):
        pledged.check_release("alice", stream=A, asset="BTC", quantity=1.0, now=T0)  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        pledged.check_release("alice", stream="no-slash", asset="BTC", quantity=1, now=T0)
    with pytest.raises(DecodeError):
        pledged.check_release(
            "alice", stream=A, asset="BTC", quantity=1, now=T0.replace(tzinfo=None)
        )


def test_pending_releases_survive_a_restore_from_the_journal(pledged: MarginLedger) -> None:
    change = _released(pledged, BTC // 4)
    state = pledged.state()
    restored = MarginLedger.restore(
        POLICY,
        decimals=DECIMALS,
        streams=state.streams.values(),
        positions=state.positions,
        prices=state.prices,
        exposures=state.exposures.values(),
        margins=state.margins.values(),
        releases=compute_pending_releases(change.journal),
    )
    assert restored.state() == state
    assert _collateral(restored) == _collateral(pledged) == 3_600_000
    # A release whose expiry a later statement passed is not restored.
    later = statement(A, 2, {("alice", "BTC"): BTC}, snapshot=False, at=EXPIRES)
    commit(pledged, pledged.plan_statement(later, now=EXPIRES))
    state = pledged.state()
    again = MarginLedger.restore(
        POLICY,
        decimals=DECIMALS,
        streams=state.streams.values(),
        positions=state.positions,
        prices=state.prices,
        exposures=state.exposures.values(),
        margins=state.margins.values(),
        releases=compute_pending_releases(change.journal),
    )
    assert again.state().releases == {}


def test_release_journal_entries_that_do_not_describe_a_release() -> None:
    entry = JournalEntry(
        at=T0,
        kind="release",
        client="alice",
        stream=A,
        asset="BTC",
        quantity=1,
        detail={"release_id": RELEASE_ID},
    )
    with pytest.raises(DecodeError):
        compute_pending_releases([entry])
    assert compute_pending_releases([JournalEntry(at=T0, kind="freeze", stream=A)]) == ()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    quantities=st.lists(st.integers(1, BTC), min_size=1, max_size=6),
    exposure_value=st.integers(0, 10_000_000),
)
def test_property_allowed_releases_keep_the_client_within_its_limit(
    quantities: list[int], exposure_value: int
) -> None:
    ledger = MarginLedger(POLICY, decimals=DECIMALS)
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    report = exposure("alice", "r1", exposure=exposure_value, requirement=exposure_value // 2)
    commit(ledger, ledger.plan_exposure(report, now=T0))
    released = 0
    for index, quantity in enumerate(quantities):
        release_id = hashlib.sha256(f"r{index}".encode()).hexdigest()
        decision, change = ledger.plan_release(
            "alice",
            stream=A,
            asset="BTC",
            quantity=quantity,
            release_id=release_id,
            issued_at=T0,
            expires_at=EXPIRES,
            now=T0,
        )
        commit(ledger, change)
        if decision.allowed:
            released += quantity
        status = ledger.client_status("alice", now=T0)
        assert status is not None
        assert status.exposure <= status.credit_limit or not decision.allowed
        (view,) = status.positions
        assert view.reserved == released <= BTC


# --- which clients a statement evaluates ----------------------------------------------------------


def test_credit_entries_value_each_position_as_the_policy_does(ledger: MarginLedger) -> None:
    changed = {
        ("alice", "BTC"): 123_456_789,
        ("bob", "ETH"): UNITS_LIMIT - 1,
        ("carol", "DOGE"): 5 * BTC,
        ("dave", "USDC"): 7,
    }
    prices = {
        "BTC": usd("BTC", "64123.45"),
        "ETH": Price("ETH", "USD", 10**30 + 7, 3),
        "DOGE": usd("DOGE", "0.10"),  # priced, but a rate of 0
    }  # USDC unpriced: counted at zero
    change = ledger.plan_statement(statement(A, 1, changed, prices=prices), now=T0)
    credits = [entry for entry in change.journal if entry.kind == "credit"]
    assert {(e.client, e.asset) for e in credits} == set(changed)
    for entry in credits:
        assert entry.asset is not None
        assert entry.quantity is not None
        assert entry.value == compute_position_value(
            quantity=entry.quantity,
            asset_decimals=DECIMALS[entry.asset],
            price=prices.get(entry.asset),
            rate_bps=POLICY.rate_bps(entry.asset),
            quote_decimals=POLICY.quote_decimals,
        )
        assert entry.detail == {"before": 0}
    assert next(e.value or 0 for e in credits if e.asset == "BTC") > 0
    commit(ledger, change)
    later = ledger.plan_statement(
        statement(A, 2, {("alice", "BTC"): 1}, snapshot=False, prices=prices), now=T0
    )
    (moved,) = [entry for entry in later.journal if entry.kind == "credit"]
    assert (moved.quantity, moved.detail) == (1, {"before": 123_456_789})


def test_journal_detail_is_copied_and_read_only() -> None:
    detail: dict[str, str | int] = {"before": 1}
    entry = JournalEntry(at=T0, kind="credit", detail=detail)
    detail["before"] = 2
    assert entry.detail == {"before": 1}
    with pytest.raises(TypeError):
        entry.detail["before"] = 3  # type: ignore[index]


def _count_assessments(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The clients the ledger assesses from now on, in order (an evaluation assesses each
    client it evaluates once)."""
    assessed: list[str] = []
    original = MarginLedger._assess

    def counting(self: MarginLedger, client: str, **kwargs: object) -> object:
        assessed.append(client)
        return original(self, client, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MarginLedger, "_assess", counting)
    return assessed


def _exposed_holders(ledger: MarginLedger, count: int) -> list[str]:
    names = [f"c{i:03d}" for i in range(count)]
    commit(ledger, ledger.plan_statement(statement(A, 1, {(n, "BTC"): BTC for n in names}), now=T0))
    for name in names:
        # 1 BTC at 60,000 USD counts 48,000 USD: a requirement of 40,000 USD is covered.
        report = exposure(name, f"r-{name}", exposure=1, requirement=4_000_000)
        commit(ledger, ledger.plan_exposure(report, now=T0))
    return names


def test_a_statement_that_moves_no_price_evaluates_only_the_clients_it_changes(
    ledger: MarginLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = _exposed_holders(ledger, 40)
    assessed = _count_assessments(monkeypatch)
    later = T0 + timedelta(seconds=30)
    # c007 loses half its BTC (margin call); zed, credited without exposure, cannot move.
    delta = statement(
        A, 2, {("c007", "BTC"): BTC // 2, ("zed", "BTC"): BTC}, snapshot=False, at=later
    )
    change = ledger.plan_statement(delta, now=later)
    assert assessed == ["c007"]
    assert set(change.margins) == {"c007"}
    assessed.clear()
    assert ledger.plan_statement(delta, now=later, full_evaluation=True) == change
    assert sorted(assessed) == sorted([*names, "zed"])
    # Another price table re-values every holder.
    assessed.clear()
    repriced = replace(delta, prices={"BTC": usd("BTC", "59000.00")})
    ledger.plan_statement(repriced, now=later)
    assert sorted(assessed) == names
    # A head that counts as zero at ``now`` re-values every holder too.
    assessed.clear()
    late = later + POLICY.stale_after + POLICY.zero_grace + timedelta(seconds=1)
    zeroed = ledger.plan_statement(delta, now=late)
    assert sorted(assessed) == names
    assert set(zeroed.margins) == set(names)


def test_holders_of_a_stream_counted_as_zero_elsewhere_are_evaluated(
    ledger: MarginLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = _exposed_holders(ledger, 5)
    # c001 also holds on B, which counts as zero by the time A's next statement arrives.
    commit(ledger, ledger.plan_statement(statement(B, 1, {("c001", "BTC"): BTC}), now=T0))
    assessed = _count_assessments(monkeypatch)
    late = T0 + POLICY.stale_after + POLICY.zero_grace + timedelta(seconds=1)
    delta = statement(A, 2, {("c003", "BTC"): 2 * BTC}, snapshot=False, at=late)
    change = ledger.plan_statement(delta, now=late)
    assert sorted(assessed) == ["c001", "c003"]
    assert change == ledger.plan_statement(delta, now=late, full_evaluation=True)
    assert names[1] == "c001"


def test_a_restored_ledger_with_an_uncovered_healthy_client_evaluates_every_holder(
    ledger: MarginLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = _exposed_holders(ledger, 5)
    state = ledger.state()
    # Restored under a policy that counts BTC at half the rate: every client is short of its
    # requirement, but healthy as persisted. The next statement must find out, even though it
    # moves no price and changes one other client.
    halved = CollateralPolicy.default(rates_bps={"BTC": 4_000})
    restored = MarginLedger.restore(
        halved,
        decimals=DECIMALS,
        streams=state.streams.values(),
        positions=state.positions,
        prices=state.prices,
        exposures=state.exposures.values(),
        margins=state.margins.values(),
    )
    later = T0 + timedelta(seconds=30)
    delta = statement(A, 2, {("c000", "BTC"): 2 * BTC}, snapshot=False, at=later)
    change = restored.plan_statement(delta, now=later)
    assert set(change.margins) == set(names[1:])
    assert change == restored.plan_statement(delta, now=later, full_evaluation=True)
    commit(restored, change)
    # Every healthy client is covered again: the shortcut is back.
    assert restored.plan_evaluation(now=later).is_empty
    assessed = _count_assessments(monkeypatch)
    again = statement(A, 3, {("c000", "BTC"): 3 * BTC}, snapshot=False, at=later)
    restored.plan_statement(again, now=later)
    # c000 changed; the others are in margin call (a deadline may pass).
    assert sorted(assessed) == names


def test_after_a_reset_the_next_statement_checks_every_exposed_client_once(
    ledger: MarginLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = _exposed_holders(ledger, 5)
    state = ledger.state()
    loaded = MarginLedger.restore(
        POLICY,
        decimals=DECIMALS,
        streams=state.streams.values(),
        positions=state.positions,
        prices=state.prices,
        exposures=state.exposures.values(),
        margins=state.margins.values(),
    )
    ledger.reset(loaded)
    assessed = _count_assessments(monkeypatch)
    later = T0 + timedelta(seconds=30)
    delta = statement(A, 2, {("c000", "BTC"): 2 * BTC}, snapshot=False, at=later)
    change = ledger.plan_statement(delta, now=later)
    # Every exposed client valued once to learn that all are covered, then c000 evaluated.
    assert sorted(assessed) == sorted([*names, "c000"])
    assessed.clear()
    assert ledger.plan_statement(delta, now=later) == change
    assert assessed == ["c000"]
    commit(ledger, change)
    assessed.clear()
    again = statement(A, 3, {("c001", "BTC"): 2 * BTC}, snapshot=False, at=later)
    ledger.plan_statement(again, now=later)
    assert assessed == ["c001"]


def test_a_head_issued_before_the_last_one_evaluates_every_holder(ledger: MarginLedger) -> None:
    # Released units count again once a statement issued after the release's expiry shows the
    # stream; a later statement issued earlier than that one puts the release's cap back.
    commit(ledger, ledger.plan_statement(statement(A, 1, {("alice", "BTC"): BTC}), now=T0))
    report = exposure("alice", "r1", exposure=1, requirement=2_000_000)
    commit(ledger, ledger.plan_exposure(report, now=T0))
    decision, change = ledger.plan_release(
        "alice",
        stream=A,
        asset="BTC",
        quantity=BTC // 2,
        release_id=RELEASE_ID,
        issued_at=T0,
        expires_at=EXPIRES,
        now=T0,
    )
    assert decision.allowed
    commit(ledger, change)
    after_expiry = T0 + timedelta(minutes=20)
    shown = statement(A, 2, {}, snapshot=False, at=after_expiry)
    commit(ledger, ledger.plan_statement(shown, now=after_expiry))
    more = exposure("alice", "r2", exposure=1, requirement=3_000_000, at=after_expiry)
    commit(ledger, ledger.plan_exposure(more, now=after_expiry))
    status = ledger.client_status("alice", now=after_expiry)
    assert status is not None
    assert status.state is MarginState.HEALTHY
    now = after_expiry + timedelta(minutes=1)
    earlier = statement(A, 3, {("bob", "BTC"): BTC}, snapshot=False, at=T0 + timedelta(minutes=10))
    change = ledger.plan_statement(earlier, now=now)
    assert change.margins["alice"].state is MarginState.MARGIN_CALL
    assert change == ledger.plan_statement(earlier, now=now, full_evaluation=True)


SHORTCUT_TABLES = (
    {"BTC": usd("BTC", "60000.00"), "USDC": usd("USDC", "1.00")},
    {"BTC": usd("BTC", "30000.00"), "USDC": usd("USDC", "1.00")},
    {"BTC": usd("BTC", "60000.00")},
)
# Margin calls fall due within a run of steps.
SHORT_DEADLINE = CollateralPolicy.default(margin_call_deadline=timedelta(minutes=20))
LOW_RATES = replace(SHORT_DEADLINE, rates_bps={"BTC": 4_000, "USDC": 5_000})
shortcut_statement = st.tuples(
    st.just("statement"),
    st.sampled_from(STREAMS),
    st.sampled_from((False, False, True)),  # snapshot: a delta leaves most holders alone
    st.dictionaries(
        st.tuples(st.sampled_from(CLIENTS), st.sampled_from(("BTC", "USDC"))),
        st.integers(0, 2 * BTC),
        max_size=4,
    ),
    st.one_of(st.none(), st.integers(0, len(SHORTCUT_TABLES) - 1)),  # None: the same prices
    st.integers(0, 2_000),  # issued this long before now
    st.integers(60, 3_600),  # lifetime
)
shortcut_operation = st.one_of(
    shortcut_statement,
    shortcut_statement,  # twice as likely as each other operation
    st.tuples(
        st.just("exposure"),
        st.sampled_from(CLIENTS),
        st.integers(0, 10**7),
        st.integers(0, 10**7),
        st.integers(-(10**6), 10**6),
    ),
    st.tuples(st.just("evaluate")),
    st.tuples(
        st.just("release"),
        st.sampled_from(CLIENTS),
        st.sampled_from(STREAMS),
        st.integers(1, BTC),
        st.integers(1, 1_800),
    ),
    st.tuples(st.just("restore"), st.booleans()),  # True: under lower collateral rates
    st.tuples(st.just("restore"), st.just(True)),
    st.tuples(st.just("freeze"), st.sampled_from(STREAMS)),
    st.tuples(st.just("resolve"), st.sampled_from(STREAMS)),
)


shortcut_steps = st.lists(
    st.tuples(shortcut_operation, st.one_of(st.integers(0, 60), st.integers(0, 1_200))),
    min_size=12,
    max_size=40,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requirements=st.lists(st.integers(2_000_000, 8_000_000), min_size=3, max_size=3),
    plan=shortcut_steps,
)
def test_property_a_statement_changes_what_evaluating_every_holder_changes(
    requirements: list[int], plan: list[tuple[tuple[object, ...], int]]
) -> None:
    """The clients a statement evaluates (only those whose state it can change) give exactly
    the change that evaluating every holder and every changed client gives, whatever came
    before: exposures, evaluations or none, releases, streams going stale or zero, statements
    issued earlier than the head, restores under another policy."""
    # Every client holds on both streams, with a requirement near what its collateral covers.
    start: list[tuple[tuple[object, ...], int]] = [
        (("statement", A, True, {(c, "BTC"): BTC for c in CLIENTS}, 0, 0, 3_600), 0),
        (("statement", B, True, {(c, "USDC"): 10**9 for c in CLIENTS}, 0, 0, 3_600), 0),
        *((("exposure", c, 1, r, 0), 0) for c, r in zip(CLIENTS, requirements, strict=True)),
    ]
    ledger = MarginLedger(SHORT_DEADLINE, decimals=DECIMALS)
    store = FakeStore()
    now = T0
    sequences: dict[str, int] = {}
    for number, (op, advance) in enumerate([*start, *plan]):
        now += timedelta(seconds=advance)
        match op:
            case (
                "statement",
                str(stream),
                bool(snapshot),
                dict(changed),
                table,
                int(ago),
                int(life),
            ):
                status = ledger.stream_status(stream)
                if status is not None and status.frozen:
                    continue
                sequence = sequences.get(stream, 0) + 1
                credited = statement(
                    stream,
                    sequence,
                    changed,
                    prices=SHORTCUT_TABLES[table]
                    if isinstance(table, int)
                    else ledger.prices(stream),
                    snapshot=snapshot,
                    at=now - timedelta(seconds=ago),
                    lifetime=timedelta(seconds=life),
                )
                change = ledger.plan_statement(credited, now=now)
                assert change == ledger.plan_statement(credited, now=now, full_evaluation=True)
                sequences[stream] = sequence
            case ("exposure", str(client), int(exp), int(req), int(pnl)):
                report = exposure(
                    client, f"r{number}", exposure=exp, requirement=req, pnl=pnl, at=now
                )
                change = ledger.plan_exposure(report, now=now)
            case ("evaluate",):
                change = ledger.plan_evaluation(now=now)
            case ("release", str(client), str(stream), int(quantity), int(validity)):
                _, change = ledger.plan_release(
                    client,
                    stream=stream,
                    asset="BTC",
                    quantity=quantity,
                    release_id=hashlib.sha256(f"release {number}".encode()).hexdigest(),
                    issued_at=now,
                    expires_at=now + timedelta(seconds=validity),
                    now=now,
                )
            case ("restore", bool(low)):
                ledger = MarginLedger.restore(
                    LOW_RATES if low else SHORT_DEADLINE,
                    decimals=DECIMALS,
                    streams=store.streams.values(),
                    positions=store.positions,
                    prices=store.prices,
                    exposures=store.exposures.values(),
                    margins=store.margins.values(),
                )
                continue
            case ("freeze", str(stream)):
                change = ledger.plan_freeze(stream, reason="fork", now=now)
            case ("resolve", str(stream)):
                status = ledger.stream_status(stream)
                if status is None or not status.frozen:
                    continue
                change = ledger.plan_resolve(stream, operator="ops", reason="checked", now=now)
            case _:
                raise AssertionError(op)
        if change.is_empty:  # as the desk does: nothing to persist or apply
            continue
        store.persist(change)
        commit(ledger, change)
