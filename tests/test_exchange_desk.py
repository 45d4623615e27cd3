"""The margin desk on SQLite and PostgreSQL: plan -> persist (with the signed notices in the outbox,
one per custodian) -> commit -> apply under one lock; a failed transaction leaves memory as it was;
older and replayed reports write nothing; liquidation-due notices name the margin call they follow;
reads never see an apply half-done; the positions snapshot is signed and complete."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session

from attestations.errors import InvariantViolation, TransientError
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.notices import (
    LiquidationDue,
    LiquidationReason,
    MarginCall,
    PositionsSnapshot,
    SignedNotice,
    combine_snapshot_parts,
    verify_notice,
)
from bridge.envelope import decode_message
from bridge.outbox import decode_headers, outbox_table
from bridge.topics import TopicKind
from exchange.desk import MarginDesk
from exchange.errors import StreamNotFrozen, UnknownStream
from exchange.ledger import ExposureReport, MarginLedger
from exchange.policy import CollateralPolicy, MarginState
from exchange.store import create_exchange_engine, journal_page, migrate
from tests.exchange_world import credit_snapshot
from tests.world import custodian_signer

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
EXCHANGE = "exchange-x"
A = f"bank-a/{EXCHANGE}"
B = f"bank-b/{EXCHANGE}"
DECIMALS = {"BTC": 8, "USDC": 6}
# Statements stay fresh for the whole test, so only deadlines and reports move margins.
POLICY = CollateralPolicy.default(stale_after=timedelta(days=1), zero_grace=timedelta(days=1))
BTC = 100_000_000
SIGNER = custodian_signer("exchange-x-notices")


def registry() -> KeyRegistry:
    keys = KeyRegistry()
    keys.register(KeyRecord(EXCHANGE, KeyRole.EXCHANGE, SIGNER.public_key, T0 - timedelta(days=1)))
    return keys


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    opened = create_exchange_engine(database_url)
    migrate(opened)
    try:
        yield opened
    finally:
        opened.dispose()


@pytest.fixture
def desk(engine: Engine) -> MarginDesk:
    return MarginDesk(
        ledger=MarginLedger(POLICY, decimals=DECIMALS),
        engine=engine,
        exchange=EXCHANGE,
        signer=SIGNER,
    )


def credit(desk: MarginDesk, stream: str, sequence: int, held: dict[tuple[str, str], int]) -> None:
    """Credit a snapshot issued at T0 (fresh for two days) as the attestation consumer does."""
    credit_snapshot(
        desk, held, stream=stream, sequence=sequence, at=T0, valid_for=timedelta(days=2)
    )


def report(
    report_id: str, *, requirement: int, at: datetime = T0, exposure: int = 0
) -> ExposureReport:
    return ExposureReport(
        client="alice",
        report_id=report_id,
        reported_at=at,
        exposure=exposure,
        requirement=requirement,
        unrealised_pnl=0,
    )


def outbox(engine: Engine) -> list[SignedNotice]:
    """Every outbox record, decoded as a consumer would (envelope checks included)."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                outbox_table.c.topic,
                outbox_table.c.message_key,
                outbox_table.c.message_value,
                outbox_table.c.headers,
            ).order_by(outbox_table.c.id)
        ).all()
    found = []
    for topic, key, value, headers in rows:
        decoded = decode_message(topic, bytes(key), bytes(value), list(decode_headers(headers)))
        assert isinstance(decoded.body, SignedNotice)
        found.append(decoded.body)
    return found


def journal_count(engine: Engine) -> int:
    return len(journal_page(engine, limit=10_000))


@pytest.fixture
def alice(desk: MarginDesk) -> MarginDesk:
    """alice: 1 BTC at bank A and 1 BTC at bank B, 60,000 USD each, rate 80 %: 96,000.00 USD."""
    credit(desk, A, 1, {("alice", "BTC"): BTC})
    credit(desk, B, 1, {("alice", "BTC"): BTC})
    return desk


def test_a_margin_call_is_signed_and_enqueued_once_per_custodian(alice: MarginDesk) -> None:
    before = journal_count(alice.engine)
    # Equity 9,600,000 cents against a requirement of 10,000,000: ratio 9,600 bp.
    committed = alice.submit_exposure(report("r1", requirement=10_000_000), now=T0)
    status = alice.status("alice", now=T0)
    assert status is not None
    assert status.state is MarginState.MARGIN_CALL
    notices = outbox(alice.engine)
    assert [n.notice.custodian for n in notices] == ["bank-a", "bank-b"]  # type: ignore[union-attr]
    assert notices == list(committed.notices)
    for signed in notices:
        body = verify_notice(signed.encode(), registry=registry(), now=T0)
        assert isinstance(body, MarginCall)
        assert (body.client, body.collateral, body.requirement) == ("alice", 9_600_000, 10_000_000)
        assert body.shortfall == 400_000
        assert body.deadline == T0 + POLICY.margin_call_deadline
    # One notice id for the event, whoever it is addressed to.
    assert len({n.notice.notice_id for n in notices}) == 1  # type: ignore[union-attr]
    kinds = [entry.kind for _, entry in journal_page(alice.engine, after=0, limit=10_000)]
    assert journal_count(alice.engine) == before + 2
    assert kinds[-2:] == ["exposure", "state"]


def test_older_and_replayed_reports_write_nothing(alice: MarginDesk) -> None:
    alice.submit_exposure(report("r2", requirement=1_000_000, at=T0 + timedelta(seconds=5)), now=T0)
    written = journal_count(alice.engine)
    generation = alice.ledger.generation
    for stale in (
        report("r2", requirement=50_000_000, at=T0 + timedelta(seconds=5)),  # replay
        report("r1", requirement=50_000_000, at=T0),  # older
    ):
        assert alice.submit_exposure(stale, now=T0).change.is_empty
    assert (journal_count(alice.engine), alice.ledger.generation) == (written, generation)
    status = alice.status("alice", now=T0)
    assert status is not None
    assert status.requirement == 1_000_000
    assert outbox(alice.engine) == []


def test_liquidation_due_names_the_margin_call_whose_deadline_passed(alice: MarginDesk) -> None:
    call = alice.submit_exposure(report("r1", requirement=10_000_000), now=T0).notices[0]
    assert alice.evaluate(now=T0 + timedelta(hours=1)).change.is_empty  # nothing moves yet
    later = T0 + POLICY.margin_call_deadline
    committed = alice.evaluate(now=later)
    assert len(committed.notices) == 2
    for signed in committed.notices:
        body = signed.notice
        assert isinstance(body, LiquidationDue)
        assert body.reason is LiquidationReason.DEADLINE_PASSED
        assert body.margin_call_id == call.notice.notice_id  # type: ignore[union-attr]
        assert body.deadline == later
        verify_notice(signed, registry=registry(), now=later)
    assert len(outbox(alice.engine)) == 4


def test_crossing_the_line_at_once_sends_liquidation_due_without_a_call(alice: MarginDesk) -> None:
    # Ratio 9,600,000 / 20,000,000 = 4,800 bp: below the liquidation line straight from healthy.
    committed = alice.submit_exposure(report("r1", requirement=20_000_000), now=T0)
    bodies = [signed.notice for signed in committed.notices]
    assert all(isinstance(b, LiquidationDue) for b in bodies)
    assert {b.reason for b in bodies} == {LiquidationReason.LIQUIDATION_LINE}  # type: ignore[union-attr]
    assert {b.margin_call_id for b in bodies} == {None}  # type: ignore[union-attr]
    status = alice.status("alice", now=T0)
    assert status is not None
    assert status.state is MarginState.LIQUIDATION_DUE


def test_a_failed_commit_leaves_the_ledger_as_it_was(alice: MarginDesk) -> None:
    generation = alice.ledger.generation

    def refuse(_: Session) -> None:
        raise TransientError("the database went away at commit")

    event.listen(Session, "before_commit", refuse)
    try:
        with pytest.raises(TransientError):
            alice.submit_exposure(report("r1", requirement=10_000_000), now=T0)
    finally:
        event.remove(Session, "before_commit", refuse)
    assert alice.ledger.generation == generation
    status = alice.status("alice", now=T0)
    assert status is not None
    assert status.state is MarginState.HEALTHY
    assert status.requirement == 0
    assert outbox(alice.engine) == []
    # The same report goes through once the database is back.
    assert not alice.submit_exposure(report("r1", requirement=10_000_000), now=T0).change.is_empty
    assert len(outbox(alice.engine)) == 2


def test_writing_without_the_lock_is_refused(alice: MarginDesk) -> None:
    change = alice.ledger.plan_exposure(report("r1", requirement=1), now=T0)
    with Session(alice.engine) as session, pytest.raises(InvariantViolation, match="lock"):
        alice.stage(session, change)


def test_a_read_never_sees_an_apply_in_progress(alice: MarginDesk) -> None:
    """An apply that takes long (here: a pause before the real apply) must not be read around:
    the reader retries, then waits on the lock, and sees the state after the apply."""
    original = alice.ledger.apply
    inside = threading.Event()

    def slow_apply(change: object) -> None:
        inside.set()
        time.sleep(0.3)
        original(change)  # type: ignore[arg-type]

    alice.ledger.apply = slow_apply  # type: ignore[method-assign]
    seen: list[tuple[int, float]] = []

    def reader() -> None:
        inside.wait(timeout=5)
        generation = alice.read(lambda ledger: ledger.generation)
        seen.append((generation, time.monotonic()))

    thread = threading.Thread(target=reader)
    thread.start()
    before = alice.ledger.generation
    alice.submit_exposure(report("r1", requirement=1_000_000), now=T0)
    done = time.monotonic()
    thread.join(timeout=5)
    assert seen
    assert seen[0][0] == before + 1
    assert seen[0][1] >= done - 0.05


def test_pretrade_reads_from_memory(alice: MarginDesk) -> None:
    alice.submit_exposure(report("r1", requirement=1_000_000, exposure=100_000_00), now=T0)
    allowed = alice.pretrade("alice", add_exposure=1, now=T0)
    assert allowed.allowed
    assert allowed.headroom == 2 * 9_600_000 - 100_000_00
    refused = alice.pretrade("alice", add_exposure=allowed.headroom + 1, now=T0)
    assert (refused.allowed, refused.reason) == (False, "insufficient_credit")
    assert alice.pretrade("nobody", add_exposure=1, now=T0).reason == "unknown_client"


def test_freeze_and_resolve_are_journaled_with_the_operator(alice: MarginDesk) -> None:
    with pytest.raises(UnknownStream):
        alice.resolve(f"bank-z/{EXCHANGE}", operator="olga", reason="x", now=T0)
    with pytest.raises(StreamNotFrozen):
        alice.resolve(A, operator="olga", reason="x", now=T0)
    alice.freeze(A, reason="fork at 2", now=T0)
    assert alice.pretrade("alice", add_exposure=1, now=T0).reason == "stream_frozen"
    assert alice.freeze(A, reason="again", now=T0).change.is_empty
    alice.resolve(A, operator="olga", reason="custodian re-sent the true history", now=T0)
    entries = [e for _, e in journal_page(alice.engine, limit=10_000)]
    assert [e.kind for e in entries][-2:] == ["freeze", "resolve"]
    assert entries[-1].detail["operator"] == "olga"
    assert alice.pretrade("alice", add_exposure=1, now=T0).allowed


def test_the_positions_snapshot_is_signed_and_complete(alice: MarginDesk) -> None:
    credit(alice, A, 2, {("alice", "BTC"): BTC, ("bob", "BTC"): BTC // 2})
    parts = alice.positions_snapshot(now=T0 + timedelta(seconds=1))
    bodies = [verify_notice(p, registry=registry(), now=T0 + timedelta(seconds=1)) for p in parts]
    assert all(isinstance(b, PositionsSnapshot) for b in bodies)
    lines = combine_snapshot_parts(b for b in bodies if isinstance(b, PositionsSnapshot))
    assert [(x.client, x.custodian, x.quantity, x.value) for x in lines] == [
        ("alice", "bank-a", BTC, 4_800_000),
        ("alice", "bank-b", BTC, 4_800_000),
        ("bob", "bank-a", BTC // 2, 2_400_000),
    ]
    first = bodies[0]
    assert isinstance(first, PositionsSnapshot)
    assert [(h.custodian, h.sequence) for h in first.streams] == [("bank-a", 2), ("bank-b", 1)]
    assert outbox(alice.engine) == []  # taken, not published


def test_a_published_snapshot_is_in_the_outbox(alice: MarginDesk, engine: Engine) -> None:
    parts = alice.positions_snapshot(now=T0, publish=True)
    assert outbox(engine) == list(parts)
    with engine.connect() as connection:
        topics = connection.execute(select(func.distinct(outbox_table.c.topic))).scalars().all()
    assert topics == [alice.catalogue.name(TopicKind.LEDGER_SNAPSHOTS)]
