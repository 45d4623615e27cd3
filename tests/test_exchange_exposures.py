"""Exposure reports: the strict wire form and its checks (pure), then end to end through the
embedded broker on SQLite and PostgreSQL: a report on the exposures topic moves the client into
margin call, and the signed margin call the outbox relay publishes on the instructions topic
verifies with attestations.notices.verify_notice; replayed, older, foreign, future-dated and
malformed reports change nothing (the bad ones are dead-lettered with their reason)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from attestations.errors import (
    AmountError,
    DecodeError,
    FloatRejected,
    FutureDated,
    NegativeSum,
    PolicyViolation,
    SumOverflow,
    WrongStream,
)
from attestations.notices import MarginCall, SignedNotice, verify_notice
from bridge import envelope
from bridge.consumer import dead_letters_table
from bridge.envelope import OutboundMessage, decode_message, encode_exposure_report
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay
from bridge.topics import TopicCatalogue, TopicKind
from exchange.desk import MarginDesk
from exchange.exposures import (
    compute_ledger_report,
    create_exposure_consumer,
    parse_exposure_body,
)
from exchange.ledger import MarginLedger
from exchange.policy import MarginState
from exchange.store import create_exchange_engine, journal_page, migrate
from tests.outbox_worker import catalogue_for
from tests.test_consumer import eventually, publish_all, read_topic, running, topics_ready
from tests.test_exchange_desk import BTC, DECIMALS, EXCHANGE, POLICY, SIGNER, T0, A, credit
from tests.test_exchange_desk import registry as exchange_registry

NOW = T0 + timedelta(seconds=30)


def wire(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "client": "alice",
        "exchange": EXCHANGE,
        "exposure": "0",
        "quote": "USD",
        "report_id": "r-1",
        "reported_at": "2026-03-02T09:00:10.000Z",
        "requirement": "6000000",
        "unrealised_pnl": "-1250",
        "version": 1,
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


# --- the wire form (pure) -----------------------------------------------------------------------


def test_a_report_converts_exactly() -> None:
    report = compute_ledger_report(
        parse_exposure_body(wire()), exchange=EXCHANGE, quote="USD", now=NOW
    )
    assert (report.client, report.report_id) == ("alice", "r-1")
    assert (report.exposure, report.requirement, report.unrealised_pnl) == (0, 6_000_000, -1250)
    assert report.reported_at == T0 + timedelta(seconds=10)
    huge = parse_exposure_body(wire(requirement=str(2**128 - 1), unrealised_pnl=str(-(2**127))))
    assert huge.requirement == 2**128 - 1


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (wire(requirement=6000000), DecodeError),  # a JSON number, not a decimal string
        (wire(requirement="-5"), NegativeSum),  # unsigned
        (wire(requirement="6e6"), AmountError),
        (wire(requirement="06000000"), AmountError),
        (wire(requirement=str(2**128)), SumOverflow),
        (wire(unrealised_pnl="-0"), AmountError),
        (wire(unrealised_pnl="+5"), AmountError),
        (wire(unrealised_pnl=1.5), FloatRejected),
        (wire(reported_at="2026-03-02T09:00:10Z"), DecodeError),
        (wire(client="al ice"), DecodeError),
        (wire(report_id=""), DecodeError),
        (wire(report_id="x" * 129), DecodeError),
        (wire(version=2), DecodeError),
        (wire(requirement=None), DecodeError),  # missing
        ({**wire(), "extra": "1"}, DecodeError),
    ],
)
def test_malformed_reports_are_refused(body: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_exposure_body(body)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (wire(exchange="exchange-y"), WrongStream),
        (wire(quote="EUR"), PolicyViolation),
        (wire(reported_at="2026-03-02T09:10:00.000Z"), FutureDated),  # 9.5 min ahead of NOW
    ],
)
def test_reports_that_do_not_belong_here_are_refused(
    body: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        compute_ledger_report(parse_exposure_body(body), exchange=EXCHANGE, quote="USD", now=NOW)


# --- end to end through the broker --------------------------------------------------------------


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    opened = create_exchange_engine(database_url)
    migrate(opened)
    try:
        yield opened
    finally:
        opened.dispose()


def message(catalogue: TopicCatalogue, **changes: Any) -> OutboundMessage:
    return encode_exposure_report(
        envelope.ExposureReport.from_wire(wire(**changes)), catalogue=catalogue
    )


def dead_letter_reasons(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(dead_letters_table.c.reason).order_by(dead_letters_table.c.id)
        )
        return [str(reason) for (reason,) in rows]


@pytest.mark.broker
async def test_reports_on_the_topic_move_margin_once_and_bad_ones_are_dead_lettered(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = catalogue_for(f"t{secrets.token_hex(5)}.")
    await topics_ready(kafka_settings, catalogue)
    desk = MarginDesk(
        ledger=MarginLedger(POLICY, decimals=DECIMALS),
        engine=engine,
        exchange=EXCHANGE,
        signer=SIGNER,
        catalogue=catalogue,
    )
    credit(desk, A, 1, {("alice", "BTC"): BTC})  # 4,800,000 cents of collateral
    consumer = create_exposure_consumer(
        desk,
        engine=engine,
        settings=kafka_settings,
        catalogue=catalogue,
        clock=lambda: NOW,
        backoff_initial_s=0.01,
        backoff_max_s=0.2,
    )
    assert consumer.effect_lock is desk.lock
    relay = OutboxRelay(engine, kafka_settings, catalogue=catalogue, poll_interval_s=0.05)

    # Requirement 6,000,000 against 4,800,000 - 1,250 of equity: ratio 7,997 bp, below the line.
    # First a report that keeps alice healthy, then the one that does not.
    first = message(
        catalogue, report_id="r-0", requirement="100", reported_at="2026-03-02T09:00:05.000Z"
    )
    second = message(catalogue)
    raw = message(catalogue, report_id="r-9")
    malformed = OutboundMessage(raw.topic, raw.key, b'{"client":"alice"}', raw.headers)
    bad = [
        message(catalogue, report_id="r-x", exchange="exchange-y"),  # another exchange's
        message(catalogue, report_id="r-f", reported_at="2026-03-02T09:10:00.000Z"),  # future
        malformed,  # a body its ce_id does not cover: tampered
    ]
    replayed_and_older = [
        second,  # the same record again
        message(
            catalogue, report_id="r-old", requirement="1", reported_at="2026-03-02T09:00:01.000Z"
        ),
    ]
    async with running(consumer), running(relay):
        await publish_all(kafka_settings, [first, second, *bad, *replayed_and_older])
        await eventually(lambda: len(dead_letter_reasons(engine)) == 3)
        await eventually(lambda: consumer.metrics.applied + consumer.metrics.duplicates >= 4)
        topic = catalogue.name(TopicKind.INSTRUCTIONS)
        records = await read_topic(kafka_settings, topic, count=2, timeout_s=5)

    assert sorted(dead_letter_reasons(engine)) == [
        "future_dated",
        "header_mismatch",
        "wrong_stream",
    ]
    status = desk.status("alice", now=NOW)
    assert status is not None
    assert status.state is MarginState.LIQUIDATION_DUE
    assert status.requirement == 6_000_000  # the older report did not win
    assert consumer.taken == 2

    # Crossing the line from healthy sends a liquidation-due notice; only one record, once.
    assert len(records) == 1
    _, key, value, headers = records[0]
    assert key == A.encode()
    decoded = decode_message(topic, key, value, headers, catalogue=catalogue)
    assert isinstance(decoded.body, SignedNotice)
    notice = verify_notice(value or b"", registry=exchange_registry(), now=NOW)
    assert notice.client == "alice"  # type: ignore[union-attr]
    assert notice.requirement == 6_000_000  # type: ignore[union-attr]
    kinds = [entry.kind for _, entry in journal_page(engine, limit=1000)]
    assert kinds.count("exposure") == 2


@pytest.mark.broker
async def test_a_margin_call_from_the_topic_verifies(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = catalogue_for(f"t{secrets.token_hex(5)}.")
    await topics_ready(kafka_settings, catalogue)
    desk = MarginDesk(
        ledger=MarginLedger(POLICY, decimals=DECIMALS),
        engine=engine,
        exchange=EXCHANGE,
        signer=SIGNER,
        catalogue=catalogue,
    )
    credit(desk, A, 1, {("alice", "BTC"): BTC})
    consumer = create_exposure_consumer(
        desk, engine=engine, settings=kafka_settings, catalogue=catalogue, clock=lambda: NOW
    )
    relay = OutboxRelay(engine, kafka_settings, catalogue=catalogue, poll_interval_s=0.05)
    # Ratio 4,800,000 / 5,000,000 = 9,600 bp: a margin call with a deadline.
    async with running(consumer), running(relay):
        await publish_all(
            kafka_settings, [message(catalogue, requirement="5000000", unrealised_pnl="0")]
        )
        topic = catalogue.name(TopicKind.INSTRUCTIONS)
        records = await read_topic(kafka_settings, topic, count=1, timeout_s=10)
    assert len(records) == 1
    body = verify_notice(records[0][2] or b"", registry=exchange_registry(), now=NOW)
    assert isinstance(body, MarginCall)
    assert (body.custodian, body.shortfall) == ("bank-a", 200_000)
    assert body.deadline == NOW + POLICY.margin_call_deadline
