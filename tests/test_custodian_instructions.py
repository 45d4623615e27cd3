"""The custodian's instructions consumer against the embedded broker, on SQLite and PostgreSQL:
a snapshot request makes the running service publish a snapshot statement at a sequence of at
least ``from_sequence`` within a bounded time; malformed, misaddressed, oversized, replayed,
future-dated, stale and unsupported instructions go to the dead-letter topic with their reason
and the partition keeps moving."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from attestations.canonical import truncate_to_millis
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.notices import MarginCall, ReleaseAck, sign_notice
from attestations.p256 import SoftwareP256Signer
from attestations.statement import SignedStatement, StatementKind
from attestations.translog import TransparencyLog
from bridge.envelope import (
    OutboundMessage,
    SnapshotRequest,
    compute_message_id,
    encode_notice,
    encode_snapshot_request,
    encode_statement,
)
from bridge.kafka import KafkaSettings, ensure_topics
from bridge.outbox import OutboxRelay, run_transaction
from bridge.topics import TopicCatalogue, TopicKind
from custodian.book import (
    ReleaseAckReused,
    ReleaseAckUnknown,
    SignedReleaseAckVerifier,
    Unpledge,
    pledged_to,
)
from custodian.instructions import (
    InstructionConsumer,
    create_instruction_consumer,
    fetch_release_ack,
)
from custodian.service import AttestationService
from custodian.store import CustodyBook, release_acks_table
from exchange.desk import MarginDesk
from exchange.ledger import MarginLedger
from exchange.policy import CollateralPolicy
from exchange.store import create_exchange_engine, migrate
from tests.exchange_world import credit_snapshot
from tests.outbox_worker import catalogue_for
from tests.service_worker import ASSETS, STREAM, change_pledges, fresh_cosigners, make_relay
from tests.service_worker import open_service as open_worker_service
from tests.test_consumer import eventually, publish_all, read_topic, running
from tests.test_service_crash import statements_on_the_broker, stored_statements
from tests.world import CUSTODIAN, EXCHANGE, NOW, World, seed

pytestmark = pytest.mark.broker

SNAPSHOT_BOUND_S = 5.0
"""How soon after a request its snapshot statement is stored and on the broker."""


class Clock:
    """The service's and the consumer's clock: NOW plus the time elapsed since the test began
    (prices in the test world are observed at NOW), in whole milliseconds."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def __call__(self) -> datetime:
        return truncate_to_millis(NOW + timedelta(seconds=time.monotonic() - self._start))


@dataclass
class Custodian:
    book: CustodyBook
    service: AttestationService
    relay: OutboxRelay
    consumer: InstructionConsumer
    catalogue: TopicCatalogue
    clock: Clock

    def request(self, *, from_sequence: int, **changes: object) -> SnapshotRequest:
        fields: dict[str, object] = {
            "custodian": CUSTODIAN,
            "exchange": EXCHANGE,
            "from_sequence": from_sequence,
            "reason": "sequence_gap",
            "requested_at": self.clock(),
            **changes,
        }
        return SnapshotRequest(**fields)  # type: ignore[arg-type]

    def record(self, request: SnapshotRequest) -> OutboundMessage:
        return encode_snapshot_request(request, catalogue=self.catalogue)

    def kinds(self) -> list[tuple[int, StatementKind]]:
        return [
            (sequence, SignedStatement.decode(wire).statement.kind)
            for sequence, _, wire in stored_statements(self.book.engine)
        ]


@pytest.fixture
def book(database_url: str) -> Iterator[CustodyBook]:
    with CustodyBook.open(database_url, assets=ASSETS) as opened:
        yield opened


@asynccontextmanager
async def serving(
    book: CustodyBook,
    settings: KafkaSettings,
    tmp_path: Path,
    *,
    registry: KeyRegistry | None = None,
) -> AsyncIterator[Custodian]:
    """The service's epoch loop, the relay and the instructions consumer, as ``serve`` runs
    them; the first statement (a snapshot) and a delta are published before the block.
    ``registry`` lets the consumer verify release acknowledgements."""
    world = World()
    clock = Clock()
    catalogue = catalogue_for(f"t{secrets.token_hex(5)}.")
    await ensure_topics(settings, catalogue.all_topics())
    with TransparencyLog(tmp_path / "translog.sqlite3") as log:
        relay = make_relay(book, settings, catalogue)
        service = open_worker_service(
            book,
            world,
            log,
            cosigners=fresh_cosigners(world),
            relay=relay,
            catalogue=catalogue,
            clock=clock,
        )
        consumer = create_instruction_consumer(
            custodian=CUSTODIAN,
            services=[service],
            settings=settings,
            catalogue=catalogue,
            clock=clock,
            recheck_s=0.2,
            backoff_initial_s=0.01,
            backoff_max_s=0.2,
            registry=registry,
        )
        custodian = Custodian(book, service, relay, consumer, catalogue, clock)
        stop = asyncio.Event()
        loop_task = asyncio.create_task(service.run(stop, interval_s=60, debounce_s=0.01))
        try:
            async with running(relay), running(consumer):
                await asyncio.to_thread(change_pledges, book, 1)
                await eventually(lambda: service.state.sequence == 1)
                await asyncio.to_thread(change_pledges, book, 2)
                service.notify_change()
                await eventually(lambda: service.state.sequence == 2)
                assert custodian.kinds() == [(1, StatementKind.SNAPSHOT), (2, StatementKind.DELTA)]
                yield custodian
        finally:
            stop.set()
            await asyncio.wait_for(loop_task, timeout=10)


async def dead_letter_reasons(custodian: Custodian, count: int) -> list[str]:
    letters = await read_topic(
        custodian.consumer.settings,
        custodian.catalogue.name(TopicKind.DEAD_LETTERS),
        count=count,
    )
    return [dict(headers)["mcb_dlq_reason"].decode() for *_, headers in letters]


# --- answering ----------------------------------------------------------------------------------


async def test_a_request_produces_a_snapshot_from_the_requested_sequence_in_bounded_time(
    book: CustodyBook, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with serving(book, kafka_settings, tmp_path) as custodian:
        request = custodian.request(from_sequence=2)
        started = time.monotonic()
        await publish_all(kafka_settings, [custodian.record(request)])
        await eventually(lambda: custodian.service.last_snapshot >= 2, timeout_s=SNAPSHOT_BOUND_S)
        on_broker = await statements_on_the_broker(kafka_settings, custodian.catalogue)
        elapsed = time.monotonic() - started
        assert elapsed < SNAPSHOT_BOUND_S
        assert custodian.kinds() == [
            (1, StatementKind.SNAPSHOT),
            (2, StatementKind.DELTA),
            (3, StatementKind.SNAPSHOT),
        ]
        snapshot = SignedStatement.decode(stored_statements(book.engine)[2][2])
        assert snapshot.statement.sequence >= request.from_sequence
        assert snapshot.statement.issued_at >= request.requested_at
        assert snapshot.encode() in on_broker
        await eventually(lambda: custodian.consumer.pending() == {})
    metrics = custodian.consumer.instruction_metrics
    assert (metrics.snapshot_requests, metrics.answered) == (1, 1)
    assert custodian.consumer.metrics.dead_letters == 0


async def test_a_replayed_request_makes_no_second_snapshot(
    book: CustodyBook, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with serving(book, kafka_settings, tmp_path) as custodian:
        record = custodian.record(custodian.request(from_sequence=3))
        await publish_all(kafka_settings, [record])
        await eventually(lambda: custodian.service.last_snapshot == 3)
        # The same record again (a producer retry, a replay): already answered.
        await publish_all(kafka_settings, [record, record])
        await eventually(lambda: custodian.consumer.instruction_metrics.already_answered == 2)
        await asyncio.sleep(0.3)  # a second snapshot would have been stored by now
        assert [kind for _, kind in custodian.kinds()].count(StatementKind.SNAPSHOT) == 2
        assert custodian.service.state.sequence == 3
        # An older request (dated before the snapshot) is answered by it too.
        older = custodian.request(from_sequence=2, requested_at=NOW)
        await publish_all(kafka_settings, [custodian.record(older)])
        await eventually(lambda: custodian.consumer.instruction_metrics.already_answered == 3)
        # A new request after the snapshot gets a new one.
        await publish_all(kafka_settings, [custodian.record(custodian.request(from_sequence=4))])
        await eventually(lambda: custodian.service.last_snapshot == 4)
    assert custodian.consumer.instruction_metrics.snapshot_requests == 2
    assert custodian.consumer.metrics.dead_letters == 0


async def test_a_request_survives_an_epoch_that_could_not_make_the_snapshot(
    book: CustodyBook,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``request_snapshot`` only sets a flag: an epoch that consumes it without storing a
    snapshot (here: a flag cleared behind the request's back) must not lose the request."""
    async with serving(book, kafka_settings, tmp_path) as custodian:
        service = custodian.service
        swallowed = 0

        def forgetful() -> None:
            nonlocal swallowed
            swallowed += 1
            service.notify_change()  # wakes the loop, but the flag is never set

        monkeypatch.setattr(service, "request_snapshot", forgetful)
        await publish_all(kafka_settings, [custodian.record(custodian.request(from_sequence=3))])
        await eventually(lambda: swallowed >= 2)  # the consumer asked again
        assert service.last_snapshot == 1
        monkeypatch.undo()
        await eventually(lambda: service.last_snapshot >= 3, timeout_s=SNAPSHOT_BOUND_S)
        await eventually(lambda: custodian.consumer.pending() == {})
    assert custodian.consumer.instruction_metrics.reminders >= 1


# --- refusing -----------------------------------------------------------------------------------


def with_value(message: OutboundMessage, value: bytes) -> OutboundMessage:
    """``message`` with another value and a ``ce_id`` recomputed over it, so the envelope checks
    pass and the body is what is judged."""
    headers = [(n, v) for n, v in message.headers if n != "ce_id"]
    ce_id = compute_message_id(message.key, value, headers).encode()
    rebuilt = tuple((n, ce_id if n == "ce_id" else v) for n, v in message.headers)
    return OutboundMessage(topic=message.topic, key=message.key, value=value, headers=rebuilt)


async def test_bad_instructions_are_dead_lettered_and_the_partition_moves_on(
    book: CustodyBook, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with serving(book, kafka_settings, tmp_path) as custodian:
        topic = custodian.catalogue.name(TopicKind.INSTRUCTIONS)
        good = custodian.record(custodian.request(from_sequence=3))
        statement = encode_statement(
            SignedStatement.decode(stored_statements(book.engine)[0][2]),
            catalogue=custodian.catalogue,
        )
        exchange_key = SoftwareP256Signer(
            insecure_development_only=True, private_scalar=seed("instructions-exchange")
        )
        margin_call = MarginCall(
            exchange=EXCHANGE,
            custodian=CUSTODIAN,
            client="client-001",
            issued_at=custodian.clock(),
            deadline=custodian.clock() + timedelta(hours=4),
            quote="USD",
            collateral=950_000,
            equity=900_000,
            requirement=1_000_000,
            ratio_bps=9_000,
            shortfall=100_000,
        )
        bad = [
            ("malformed", with_value(good, b'{"custodian":')),
            ("oversized", with_value(good, b" " * 1_010_000)),
            ("header_mismatch", OutboundMessage(topic, good.key, good.value + b" ", good.headers)),
            (
                "wrong_topic",  # a statement replayed onto the instructions topic
                OutboundMessage(topic, statement.key, statement.value, statement.headers),
            ),
            (
                "wrong_custodian",
                custodian.record(custodian.request(from_sequence=3, custodian="custodian-b")),
            ),
            (
                "unknown_stream",
                custodian.record(custodian.request(from_sequence=3, exchange="exchange-y")),
            ),
            ("ahead_of_stream", custodian.record(custodian.request(from_sequence=50))),
            (
                "future_dated",
                custodian.record(
                    custodian.request(
                        from_sequence=3, requested_at=custodian.clock() + timedelta(minutes=10)
                    )
                ),
            ),
            (
                "stale_request",
                custodian.record(
                    custodian.request(
                        from_sequence=3, requested_at=custodian.clock() - timedelta(hours=2)
                    )
                ),
            ),
            (
                "unsupported_instruction",
                encode_notice(
                    sign_notice(margin_call, exchange_key), catalogue=custodian.catalogue
                ),
            ),
        ]
        await publish_all(kafka_settings, [message for _, message in bad] + [good])
        # The good request after the bad ones is answered: nothing stalled the partition.
        await eventually(lambda: custodian.service.last_snapshot >= 3, timeout_s=SNAPSHOT_BOUND_S)
        await eventually(lambda: custodian.consumer.metrics.dead_letters == len(bad))
        assert await dead_letter_reasons(custodian, len(bad)) == [reason for reason, _ in bad]
        await asyncio.sleep(0.3)
        assert [kind for _, kind in custodian.kinds()] == [
            StatementKind.SNAPSHOT,
            StatementKind.DELTA,
            StatementKind.SNAPSHOT,
        ]
    assert custodian.consumer.instruction_metrics.snapshot_requests == 1


def test_the_consumer_refuses_a_service_of_another_stream(
    book: CustodyBook, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    from attestations.errors import ConfigurationError

    world = World()
    with TransparencyLog(tmp_path / "translog.sqlite3") as log:
        service = open_worker_service(book, world, log, cosigners=fresh_cosigners(world))
        with pytest.raises(ConfigurationError, match="runs stream"):
            InstructionConsumer(
                engine=book.engine,
                settings=kafka_settings,
                name="c/instructions",
                topics=["mcb.instructions"],
                source="/custodians/c",
                custodian=CUSTODIAN,
                services={"exchange-y": service},
            )
        with pytest.raises(ConfigurationError, match="at least one"):
            create_instruction_consumer(custodian=CUSTODIAN, services=[], settings=kafka_settings)
    assert service.stream == STREAM


RELEASE_KEY = SoftwareP256Signer(
    insecure_development_only=True, private_scalar=seed("instructions-release-x")
)
OTHER_KEY = SoftwareP256Signer(
    insecure_development_only=True, private_scalar=seed("instructions-release-y")
)
RELEASE_REGISTRY = KeyRegistry.of(
    [
        KeyRecord(EXCHANGE, KeyRole.EXCHANGE, RELEASE_KEY.public_key, NOW - timedelta(days=30)),
        KeyRecord("exchange-y", KeyRole.EXCHANGE, OTHER_KEY.public_key, NOW - timedelta(days=30)),
    ],
    quorums={},
)
RELEASE_VERIFIER = SignedReleaseAckVerifier(RELEASE_REGISTRY, custodian=CUSTODIAN)
EXCHANGE_KEY = RELEASE_KEY
POLICY = CollateralPolicy.default()


def release_ack_body(now: datetime) -> ReleaseAck:
    return ReleaseAck(
        exchange=EXCHANGE,
        custodian=CUSTODIAN,
        client="client-001",
        asset="BTC",
        quantity=500,
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
    )


# --- release acknowledgements: exchange desk -> broker -> this consumer -> unpledge ---------------


@pytest.mark.broker
async def test_the_whole_path_releases_once(
    database_url: str, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    with CustodyBook.open(database_url, assets=ASSETS, verify_release_ack=RELEASE_VERIFIER) as book:
        async with serving(book, kafka_settings, tmp_path, registry=RELEASE_REGISTRY) as custodian:
            engine = create_exchange_engine(database_url)
            try:
                migrate(engine)
                desk = MarginDesk(
                    ledger=MarginLedger(POLICY, decimals={"BTC": 8, "USDC": 6}),
                    engine=engine,
                    exchange=EXCHANGE,
                    signer=EXCHANGE_KEY,
                    catalogue=custodian.catalogue,
                )
                at = custodian.clock()
                credit_snapshot(
                    desk, {("client-001", "BTC"): 1001}, stream=f"{CUSTODIAN}/{EXCHANGE}", at=at
                )
                relay = OutboxRelay(
                    engine,
                    kafka_settings,
                    catalogue=custodian.catalogue,
                    poll_interval_s=0.05,
                    loss_check_interval_s=3_600.0,
                )
                release = await asyncio.to_thread(
                    desk.release, "client-001", CUSTODIAN, "BTC", 400, custodian.clock()
                )
                assert release.ack is not None
                release_id = release.ack.notice.release_id  # type: ignore[union-attr]
                async with running(relay):
                    await eventually(
                        lambda: custodian.consumer.instruction_metrics.release_acks == 1
                    )
                wire = fetch_release_ack(book.engine, release_id)
                assert wire == release.ack.encode()
                command = Unpledge("u-release", "client-001", "BTC", EXCHANGE, 400, release_id)
                entry = await asyncio.to_thread(
                    book.apply, command, now=custodian.clock(), release_ack=wire
                )
                assert entry.postings[0].account.sub_account == pledged_to(EXCHANGE)
                assert book.pledged(EXCHANGE)[("client-001", "BTC")] == 601
                again = Unpledge("u-again", "client-001", "BTC", EXCHANGE, 1, release_id)
                with pytest.raises(ReleaseAckReused):
                    book.apply(again, now=custodian.clock(), release_ack=wire)
                assert book.pledged(EXCHANGE)[("client-001", "BTC")] == 601
            finally:
                engine.dispose()


@pytest.mark.broker
async def test_bad_acknowledgements_on_the_topic_are_dead_lettered(
    database_url: str, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    with CustodyBook.open(database_url, assets=ASSETS) as book:
        async with serving(book, kafka_settings, tmp_path, registry=RELEASE_REGISTRY) as custodian:
            now = custodian.clock()
            good = release_ack_body(now)

            def record(body: ReleaseAck, key: SoftwareP256Signer = EXCHANGE_KEY) -> Any:
                return encode_notice(sign_notice(body, key), catalogue=custodian.catalogue)

            forged = record(good, OTHER_KEY)
            tampered = with_value(
                record(good),
                record(good).value.replace(b'"quantity":"500"', b'"quantity":"600"'),
            )
            bad = [
                ("unknown_key", forged),
                (
                    "expired",
                    record(
                        replace(
                            good,
                            issued_at=now - timedelta(minutes=30),
                            expires_at=now - timedelta(minutes=20),
                        )
                    ),
                ),
                ("wrong_custodian", record(replace(good, custodian="custodian-b"))),
                ("unknown_stream", record(replace(good, exchange="exchange-y"), OTHER_KEY)),
                ("malformed", tampered),  # the release id no longer matches
            ]
            await publish_all(kafka_settings, [m for _, m in bad] + [record(good), record(good)])
            await eventually(lambda: custodian.consumer.metrics.dead_letters == len(bad))
            await eventually(lambda: custodian.consumer.instruction_metrics.release_acks == 2)
            assert await dead_letter_reasons(custodian, len(bad)) == [r for r, _ in bad]

            def stored(session: Any) -> list[str]:
                rows = session.connection().execute(select(release_acks_table.c.release_id))
                return [str(row[0]) for row in rows]

            assert run_transaction(book.engine, stored, what="acks") == [good.release_id]
            with pytest.raises(ReleaseAckUnknown):
                fetch_release_ack(book.engine, "00" * 32)
