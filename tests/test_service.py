"""The attestation service on SQLite and PostgreSQL: a statement, its leaves and its outbox rows
commit together or not at all; a restarted service continues the stream; the transparency log
catches up after a crash; and, end to end through the embedded broker, pledges at the custodian
become statements that an independent consumer decodes and verifies."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from attestations.amounts import Asset
from attestations.disclosure import LeafDisclosure, ReceiverTrees
from attestations.signing import Cosigner
from attestations.statement import SignedStatement, StatementKind
from attestations.translog import TransparencyLog
from attestations.verify import ChainHead, verify_statement
from bridge.chunks import Reassembler, decode_disclosure
from bridge.consumer import ConsumerBase, Delivery
from bridge.envelope import DisclosureChunk, decode_message
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay, decode_headers, outbox_table
from bridge.topics import TopicCatalogue, TopicKind
from custodian.book import Deposit, Pledge, Unpledge
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService, leaves_table, statements_table, watch_book
from custodian.store import CustodyBook
from tests.outbox_worker import catalogue_for
from tests.test_consumer import eventually, running
from tests.test_epochs import attested
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, NOW, World, sample_prices, seed

ASSETS = [Asset(code, decimals) for code, decimals in DECIMALS.items()]
SALT_SECRET = seed("service-salt-secret")
STREAM = f"{CUSTODIAN}/{EXCHANGE}"


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture
def book(database_url: str) -> Iterator[CustodyBook]:
    with CustodyBook.open(database_url, assets=ASSETS) as opened:
        yield opened


@pytest.fixture
def cosigners(world: World) -> list[Cosigner]:
    """The co-signers outlive any one custodian process, as remote parties do."""
    return [Cosigner(key) for key in world.cosigners]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[TransparencyLog]:
    with TransparencyLog(tmp_path / "translog.sqlite3") as opened:
        yield opened


def open_service(
    book: CustodyBook,
    world: World,
    cosigners: Sequence[Cosigner],
    log: TransparencyLog,
    **options: Any,
) -> AttestationService:
    return AttestationService.open(
        book,
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        signer=world.signer,
        cosigners=cosigners,
        quorum=2,
        salt_secret=SALT_SECRET,
        decimals=DECIMALS,
        log=log,
        **{"prices": StaticPriceSource(sample_prices()), **options},
    )


def pledge(book: CustodyBook, key: str, client: str, asset: str, quantity: int) -> None:
    book.apply(Deposit(f"d-{key}", client, asset, quantity), now=NOW)
    book.apply(Pledge(f"p-{key}", client, asset, EXCHANGE, quantity), now=NOW)


def statement_rows(engine: Engine) -> list[tuple[int, str, bytes]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(statements_table.c.sequence, statements_table.c.kind, statements_table.c.digest)
            .where(statements_table.c.stream == STREAM)
            .order_by(statements_table.c.sequence)
        ).all()
    return [(int(s), str(k), bytes(d)) for s, k, d in rows]


def outbox_records(
    engine: Engine, sequence: int
) -> list[tuple[str, bytes, bytes, tuple[tuple[str, bytes], ...]]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                outbox_table.c.topic,
                outbox_table.c.message_key,
                outbox_table.c.message_value,
                outbox_table.c.headers,
            )
            .where(outbox_table.c.stream == STREAM, outbox_table.c.sequence == sequence)
            .order_by(outbox_table.c.id)
        ).all()
    return [(str(t), bytes(k), bytes(v), decode_headers(h)) for t, k, v, h in rows]


def count_outbox(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(outbox_table)).scalar_one())


def decode_entry(
    records: Sequence[tuple[str, bytes, bytes, tuple[tuple[str, bytes], ...]]],
    catalogue: TopicCatalogue | None = None,
) -> tuple[SignedStatement, LeafDisclosure]:
    """What an exchange makes of one outbox entry: the statement record, then the chunks."""
    options = {} if catalogue is None else {"catalogue": catalogue}
    decoded = [decode_message(t, k, v, h, **options) for t, k, v, h in records]  # type: ignore[arg-type]
    statement = decoded[0].body
    assert isinstance(statement, SignedStatement)
    reassembler = Reassembler()
    completed = None
    for message in decoded[1:]:
        assert isinstance(message.body, DisclosureChunk)
        completed = reassembler.add(message.body, now_s=0.0) or completed
    assert completed is not None
    return statement, decode_disclosure(completed)


@dataclass
class Exchange:
    """The receiving side of one stream: chain head and trees, verified statement by statement."""

    world: World
    receiver: ReceiverTrees = field(default_factory=lambda: ReceiverTrees(DECIMALS))
    head: ChainHead | None = None
    accepted: list[tuple[int, StatementKind]] = field(default_factory=list)

    def accept(self, signed: SignedStatement, disclosure: LeafDisclosure) -> None:
        verified = verify_statement(
            signed.encode(),
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            registry=self.world.registry,
            head=self.head,
            now=signed.statement.issued_at,
            receiver=self.receiver,
            disclosure=disclosure,
        )
        verified.trees_plan.apply()
        self.head = verified.head
        self.accepted.append((signed.statement.sequence, signed.statement.kind))


# --- one transaction ----------------------------------------------------------------------------


def test_a_statement_its_leaves_and_its_outbox_rows_commit_together(
    book: CustodyBook, world: World, cosigners: list[Cosigner], log: TransparencyLog
) -> None:
    pledge(book, "1", "alice", "BTC", 150_000_000)
    pledge(book, "2", "bob", "USDC", 25_000_000)
    service = open_service(book, world, cosigners, log)
    signed = service.publish_epoch(NOW)
    assert signed.statement.sequence == 1
    assert signed.statement.kind is StatementKind.SNAPSHOT
    assert signed.statement.prices == sample_prices()
    assert statement_rows(book.engine) == [(1, "snapshot", signed.digest)]
    records = outbox_records(book.engine, 1)
    assert len(records) == 2  # the statement, then its one disclosure chunk
    statement, disclosure = decode_entry(records)
    assert statement == signed
    exchange = Exchange(world)
    exchange.accept(statement, disclosure)
    assert attested(exchange.receiver) == book.pledged(EXCHANGE)
    with book.engine.connect() as connection:
        leaves = connection.execute(
            select(leaves_table.c.account, leaves_table.c.asset, leaves_table.c.quantity)
        ).all()
    assert sorted((a, s, int(q)) for a, s, q in leaves) == [
        ("alice", "BTC", 150_000_000),
        ("bob", "USDC", 25_000_000),
    ]
    assert (service.state.sequence, service.state.previous) == (1, signed.digest)
    assert log.index_of(signed.digest) == 0


def test_a_failure_inside_the_transaction_leaves_no_trace(
    book: CustodyBook,
    world: World,
    cosigners: list[Cosigner],
    log: TransparencyLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pledge(book, "1", "alice", "BTC", 5)
    service = open_service(book, world, cosigners, log)
    first = service.publish_epoch(NOW)
    pledge(book, "2", "carol", "BTC", 7)
    before = (service.state.sequence, service.state.previous, dict(service.state.quantities))

    def broken_enqueue(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the outbox insert failed")

    monkeypatch.setattr("custodian.service.enqueue", broken_enqueue)
    with pytest.raises(RuntimeError, match="outbox insert failed"):
        service.publish_epoch(NOW + timedelta(seconds=1))
    assert statement_rows(book.engine) == [(1, "snapshot", first.digest)]
    assert count_outbox(book.engine) == len(outbox_records(book.engine, 1))
    assert (service.state.sequence, service.state.previous, dict(service.state.quantities)) == (
        before
    )
    assert log.size == 1
    monkeypatch.undo()
    # The co-signers saw statement 2 already: the retry stores that one, not a new one (which
    # they would refuse as a second statement at sequence 2).
    second = service.publish_epoch(NOW + timedelta(seconds=2))
    assert second.statement.sequence == 2
    assert second.statement.issued_at == NOW + timedelta(seconds=1)
    assert service.state.quantities == {("alice", "BTC"): 5, ("carol", "BTC"): 7}
    assert [row[0] for row in statement_rows(book.engine)] == [1, 2]


# --- restart ------------------------------------------------------------------------------------


def test_a_restarted_service_continues_the_stream_with_a_verifiable_delta(
    book: CustodyBook, world: World, cosigners: list[Cosigner], log: TransparencyLog
) -> None:
    exchange = Exchange(world)
    pledge(book, "1", "alice", "BTC", 150_000_000)
    pledge(book, "2", "bob", "USDC", 25_000_000)
    pledge(book, "3", "carol", "BTC", 42)
    old = open_service(book, world, cosigners, log)
    for second in (0, 1):
        signed = old.publish_epoch(NOW + timedelta(seconds=second))
        exchange.accept(*decode_entry(outbox_records(book.engine, signed.statement.sequence)))
    book.apply(Unpledge("u-1", "bob", "USDC", EXCHANGE, 25_000_000, "ack-1"), now=NOW)
    book.apply(Unpledge("u-2", "carol", "BTC", EXCHANGE, 2, "ack-2"), now=NOW)
    pledge(book, "4", "dave", "USDC", 9)
    del old  # the process ends; only the database and the co-signers remain

    new = open_service(book, world, cosigners, log)
    assert new.state.sequence == 2
    assert exchange.head is not None
    assert new.state.previous == exchange.head.digest
    assert new.state.quantities == {
        ("alice", "BTC"): 150_000_000,
        ("bob", "USDC"): 25_000_000,
        ("carol", "BTC"): 42,
    }
    signed = new.publish_epoch(NOW + timedelta(seconds=2))
    assert signed.statement.sequence == 3
    assert signed.statement.kind is StatementKind.DELTA
    statement, disclosure = decode_entry(outbox_records(book.engine, 3))
    assert [(leaf.account, leaf.position) for leaf in disclosure.set_leaves] == [
        ("carol", 1),
        ("dave", 0),  # bob's freed USDC slot
    ]
    exchange.accept(statement, disclosure)
    assert attested(exchange.receiver) == book.pledged(EXCHANGE)
    assert exchange.accepted == [
        (1, StatementKind.SNAPSHOT),
        (2, StatementKind.DELTA),
        (3, StatementKind.DELTA),
    ]


def test_snapshots_come_periodically_and_on_request(
    book: CustodyBook, world: World, cosigners: list[Cosigner], log: TransparencyLog
) -> None:
    pledge(book, "1", "alice", "BTC", 5)
    service = open_service(book, world, cosigners, log, snapshot_every=2)
    kinds = [
        service.publish_epoch(NOW + timedelta(seconds=second)).statement.kind.value
        for second in range(5)
    ]
    service.request_snapshot()
    kinds.append(service.publish_epoch(NOW + timedelta(seconds=5)).statement.kind.value)
    kinds.append(
        service.publish_epoch(NOW + timedelta(seconds=6), snapshot=True).statement.kind.value
    )
    assert kinds == ["snapshot", "delta", "delta", "snapshot", "delta", "snapshot", "snapshot"]
    restarted = open_service(book, world, cosigners, log, snapshot_every=2)
    assert restarted.last_snapshot == 7


# --- transparency log ---------------------------------------------------------------------------


def test_the_log_catches_up_after_a_crash_between_commit_and_append(
    book: CustodyBook,
    world: World,
    cosigners: list[Cosigner],
    log: TransparencyLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pledge(book, "1", "alice", "BTC", 5)
    service = open_service(book, world, cosigners, log)
    first = service.publish_epoch(NOW)

    def crash() -> int:
        raise SystemExit("killed after the commit, before the log append")

    monkeypatch.setattr(service, "catch_up_log", crash)
    with pytest.raises(SystemExit):
        service.publish_epoch(NOW + timedelta(seconds=1))
    digests = [digest for _, _, digest in statement_rows(book.engine)]
    assert len(digests) == 2
    assert log.size == 1  # committed, but not logged

    restarted = open_service(book, world, cosigners, log)
    assert [log.index_of(digest) for digest in digests] == [0, 1]
    third = restarted.publish_epoch(NOW + timedelta(seconds=2))
    assert log.index_of(third.digest) == 2
    assert log.index_of(first.digest) == 0


# --- scheduling ---------------------------------------------------------------------------------


async def test_run_publishes_at_start_soon_after_a_change_and_on_the_interval(
    book: CustodyBook, world: World, cosigners: list[Cosigner], log: TransparencyLog
) -> None:
    pledge(book, "1", "alice", "BTC", 5)
    clock = iter(NOW + timedelta(milliseconds=ms) for ms in range(0, 10**6, 10))
    service = open_service(book, world, cosigners, log, clock=lambda: next(clock))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop, interval_s=30, debounce_s=0.05))
    try:
        await eventually(lambda: service.state.sequence == 1, timeout_s=5)
        await asyncio.to_thread(pledge, book, "2", "bob", "BTC", 6)
        for _ in range(5):  # a burst of notifications makes one statement
            service.notify_change()
        await eventually(lambda: service.state.sequence == 2, timeout_s=5)
        await asyncio.sleep(0.2)
        assert service.state.sequence == 2
        assert service.state.quantities == {("alice", "BTC"): 5, ("bob", "BTC"): 6}
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    interval = open_service(book, world, cosigners, log, clock=lambda: next(clock))
    stop = asyncio.Event()
    task = asyncio.create_task(interval.run(stop, interval_s=0.1, debounce_s=0.05))
    try:
        await eventually(lambda: interval.state.sequence >= 5, timeout_s=5)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


# --- end to end ---------------------------------------------------------------------------------


@dataclass
class VerifyingExchange(ConsumerBase):
    """An exchange's consumer, independent of the custodian's code: it decodes what the broker
    delivers and verifies each statement against the chain and the trees it holds."""

    exchange: Exchange | None = None

    def apply(self, session: Session, delivery: Delivery) -> None:
        assert self.exchange is not None
        assert delivery.disclosure is not None
        self.exchange.accept(delivery.statement, delivery.disclosure)


@pytest.mark.broker
async def test_pledges_become_statements_verified_by_an_independent_consumer(
    book: CustodyBook,
    world: World,
    cosigners: list[Cosigner],
    log: TransparencyLog,
    kafka_settings: KafkaSettings,
) -> None:
    catalogue = catalogue_for(f"t{secrets.token_hex(5)}.")
    relay = OutboxRelay(
        book.engine,
        kafka_settings,
        catalogue=catalogue,
        poll_interval_s=0.05,
        backoff_initial_s=0.05,
        loss_check_interval_s=0.5,
    )
    service = open_service(book, world, cosigners, log, relay=relay, catalogue=catalogue)
    exchange = Exchange(world)
    consumer = VerifyingExchange(
        engine=book.engine,
        settings=kafka_settings,
        name="exchange-x",
        topics=[catalogue.name(TopicKind.ATTESTATIONS)],
        source="/exchanges/exchange-x/consumer",
        catalogue=catalogue,
        backoff_initial_s=0.01,
        backoff_max_s=0.2,
        exchange=exchange,
    )
    pledge(book, "1", "alice", "BTC", 150_000_000)
    pledge(book, "2", "bob", "USDC", 1_000_000_000_000)
    pledge(book, "3", "carol", "BTC", 7_000_000_000)
    async with running(relay), running(consumer):
        first = await asyncio.to_thread(service.publish_epoch, NOW)
        await eventually(lambda: len(exchange.accepted) == 1)
        assert attested(exchange.receiver) == book.pledged(EXCHANGE)
        assert exchange.head is not None
        assert exchange.head.digest == first.digest

        await asyncio.to_thread(
            book.apply, Unpledge("u-1", "carol", "BTC", EXCHANGE, 7_000_000_000, "ack-1"), now=NOW
        )
        await asyncio.to_thread(pledge, book, "4", "dave", "BTC", 42)
        second = await asyncio.to_thread(service.publish_epoch, NOW + timedelta(seconds=1))
        assert second.statement.kind is StatementKind.DELTA
        await eventually(lambda: len(exchange.accepted) == 2)
    assert exchange.accepted == [(1, StatementKind.SNAPSHOT), (2, StatementKind.DELTA)]
    assert attested(exchange.receiver) == book.pledged(EXCHANGE)
    assert attested(exchange.receiver) == {
        ("alice", "BTC"): 150_000_000,
        ("bob", "USDC"): 1_000_000_000_000,
        ("dave", "BTC"): 42,
    }
    assert consumer.metrics.dead_letters == 0
    assert relay.metrics.published == count_outbox(book.engine)


def test_a_first_statement_over_many_holdings_is_stored(
    book: CustodyBook, world: World, cosigners: list[Cosigner], log: TransparencyLog
) -> None:
    # One expression over every changed holding once exceeded SQLite's expression depth.
    for index in range(1100):
        pledge(book, f"many-{index}", f"client-{index:04d}", "USDC", 1_000 + index)
    service = open_service(book, world, cosigners, log)
    signed = service.publish_epoch(NOW)
    assert statement_rows(book.engine) == [(1, "snapshot", signed.digest)]
    _, disclosure = decode_entry(outbox_records(book.engine, 1))
    assert len(disclosure.set_leaves) == 1100


def test_the_default_clock_gives_statements_whole_milliseconds(
    book: CustodyBook, world: World, cosigners: list[Cosigner], log: TransparencyLog
) -> None:
    from datetime import UTC, datetime

    from attestations.canonical import truncate_to_millis
    from attestations.statement import PricePoint

    observed = truncate_to_millis(datetime.now(UTC))
    prices = tuple(PricePoint(p.price, p.source, observed) for p in sample_prices())
    pledge(book, "clock", "alice", "BTC", 5)
    service = open_service(book, world, cosigners, log, prices=StaticPriceSource(prices))
    signed = service.publish_epoch()  # the service's own clock
    assert signed.statement.issued_at.microsecond % 1000 == 0


# --- watching the book for changes made elsewhere -----------------------------------------------


@dataclass
class Listener:
    notified: int = 0

    def notify_change(self) -> None:
        self.notified += 1


async def test_a_change_committed_by_another_book_object_is_noticed(
    book: CustodyBook, database_url: str
) -> None:
    """``serve`` learns of pledges made by ``mcb custodian pledge`` (another process, another
    connection): the watcher sees the journal move and notifies, once per change, and not
    before anything changed."""
    listener = Listener()
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_book(book, [listener], stop, interval_s=0.02))
    try:
        await asyncio.sleep(0.1)
        assert listener.notified == 0
        with CustodyBook.open(database_url, assets=ASSETS) as elsewhere:
            await asyncio.to_thread(pledge, elsewhere, "w1", "alice", "BTC", 5)
        await eventually(lambda: listener.notified >= 1, timeout_s=5)
        settled = listener.notified
        await asyncio.sleep(0.1)
        assert listener.notified == settled  # no further change, no further notification
    finally:
        stop.set()
        await watcher
    assert book.journal_position() == 2


def test_the_journal_position_of_an_empty_book_is_zero(book: CustodyBook) -> None:
    assert book.journal_position() == 0
    pledge(book, "z", "bob", "USDC", 1)
    assert book.journal_position() == 2
