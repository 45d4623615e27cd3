"""SIGKILL crashes of the exchange's attestation consumer, on SQLite and PostgreSQL, against the
embedded broker; and two consumers of one group on one database through a rebalance.

The custodian's attestation service (with its book, co-signers, transparency log and outbox
relay) publishes a stream of statements of its clients' pledges. A worker process
(tests/exchange_worker.py) runs the exchange's consumer on them and kills itself while applying
statement CRASH_AT, at one point of the apply: before verification, after verification inside
the open transaction, after the commit before the in-memory apply, after the in-memory apply
before the offset commit to the group, after the offset commit. A fresh consumer then opens the
same database and goes on. Each test proves:

* the crash left exactly the committed statements in the tables (one before the kill point,
  the crashed one after it);
* the restarted consumer ends with the credited positions equal to the attested ones (the
  custodian's pledged holdings), every sequence applied once: one "statement" journal entry per
  sequence, no credit journaled twice, the accepted digests those the custodian signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from attestations.translog import TransparencyLog
from bridge.broker import EmbeddedBroker
from bridge.kafka import KafkaSettings, ensure_topics
from bridge.topics import TopicCatalogue
from custodian.service import statements_table
from custodian.store import CustodyBook
from exchange.consumer import AttestationConsumer
from exchange.store import create_exchange_engine, load_ledger, migrate
from tests.crash import run_until_killed
from tests.exchange_worker import MODES, group_settings, make_consumer
from tests.exchange_world import (
    POLICY,
    accepted_digests,
    credit_entries,
    new_catalogue,
    statement_sequences,
)
from tests.service_worker import (
    ASSETS,
    STREAM,
    change_pledges,
    epoch_time,
    fresh_cosigners,
    make_relay,
    open_service,
)
from tests.test_consumer import eventually, running
from tests.world import DECIMALS, EXCHANGE, World

pytestmark = pytest.mark.broker

CRASH_AT = 3
"""The worker credits statements 1 and 2 and dies applying 3 (a delta)."""
LAST = 4
WORKER_TIMEOUT_S = 60.0
COMMITTED_BEFORE_THE_KILL = frozenset({"after_commit", "after_apply", "after_offset_commit"})
IN_A_GROUP = frozenset({"after_apply", "after_offset_commit"})
"""Modes whose kill point is around the offset commit to the group; the others run without a
group (joining one costs seconds, and they die before any offset commit)."""


@dataclass(frozen=True)
class Attested:
    """What the custodian published: its pledged holdings after the last statement and the
    digest of every statement, by sequence."""

    holdings: dict[tuple[str, str], int]
    digests: dict[int, bytes]


class CustodianSide:
    """The custodian's attestation service, its book, log and outbox relay, in this process."""

    def __init__(self, directory: Path, settings: KafkaSettings, catalogue: TopicCatalogue):
        self._stack = contextlib.ExitStack()
        self.book = self._stack.enter_context(
            CustodyBook.open(f"sqlite:///{directory / 'custody.sqlite3'}", assets=ASSETS)
        )
        log = self._stack.enter_context(TransparencyLog(directory / "translog.sqlite3"))
        world = World()
        self.relay = make_relay(self.book, settings, catalogue)
        self.service = open_service(
            self.book,
            world,
            log,
            cosigners=fresh_cosigners(world),
            relay=self.relay,
            catalogue=catalogue,
        )
        self.published = 0

    def close(self) -> None:
        self._stack.close()

    async def publish(self, count: int) -> None:
        """The next ``count`` epochs (a pledge change before each), relayed to the broker."""
        for _ in range(count):
            self.published += 1
            await asyncio.to_thread(change_pledges, self.book, self.published)
            await asyncio.to_thread(self.service.publish_epoch, epoch_time(self.published))
        await eventually(lambda: self.relay.count_unsent() == 0)

    def attested(self) -> Attested:
        with self.book.engine.connect() as connection:
            rows = connection.execute(
                select(statements_table.c.sequence, statements_table.c.digest).where(
                    statements_table.c.stream == STREAM
                )
            ).all()
        return Attested(self.book.pledged(EXCHANGE), {int(s): bytes(d) for s, d in rows})


@contextlib.asynccontextmanager
async def custodian_side(
    directory: Path, settings: KafkaSettings, catalogue: TopicCatalogue
) -> AsyncIterator[CustodianSide]:
    side = CustodianSide(directory, settings, catalogue)
    try:
        async with running(side.relay):
            yield side
    finally:
        side.close()


def run_worker(mode: str, url: str, settings: KafkaSettings, prefix: str, group: str) -> int:
    """Start the worker, wait for it to kill itself, and return the sequence it died on."""
    said_mode, sequence = run_until_killed(
        "tests.exchange_worker",
        mode,
        url,
        settings.bootstrap_servers,
        prefix,
        group,
        str(CRASH_AT),
        timeout_s=WORKER_TIMEOUT_S,
    )
    assert said_mode == mode
    return int(sequence)


@pytest.fixture
def exchange_engine(database_url: str) -> Iterator[Engine]:
    engine = create_exchange_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


def head_sequence(consumer: AttestationConsumer) -> int | None:
    status = consumer.margin_ledger.stream_status(STREAM)
    return None if status is None or status.head is None else status.head.sequence


def assert_credited_once(engine: Engine, attested: Attested, last: int) -> None:
    """One "statement" entry per sequence, no credit journaled twice, the custodian's digests."""
    assert statement_sequences(engine, STREAM) == list(range(1, last + 1))
    credits = Counter(credit_entries(engine, STREAM))
    assert credits
    assert max(credits.values()) == 1
    assert {sequence for sequence, _, _ in credits} <= set(range(1, last + 1))
    assert accepted_digests(engine, STREAM) == {
        s: d for s, d in attested.digests.items() if s <= last
    }


@dataclass(frozen=True)
class Published:
    catalogue: TopicCatalogue
    attested: Attested


@pytest.fixture(scope="module")
def published(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Published:
    """Statements 1..LAST on a topic of this module's own, published once: every crash test
    reads them from the beginning with a database and a group of its own."""
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, client_id="mcb-crash")
    catalogue = new_catalogue()

    async def publish() -> Attested:
        directory = tmp_path_factory.mktemp("custodian")
        async with custodian_side(directory, settings, catalogue) as custodian:
            await custodian.publish(LAST)
            return custodian.attested()

    attested = asyncio.run(publish())
    assert sorted(attested.digests) == list(range(1, LAST + 1))
    return Published(catalogue, attested)


@pytest.mark.parametrize("mode", MODES)
async def test_a_crash_at_any_point_of_an_apply_credits_each_statement_once(
    mode: str,
    database_url: str,
    exchange_engine: Engine,
    kafka_settings: KafkaSettings,
    published: Published,
) -> None:
    catalogue, attested = published.catalogue, published.attested
    group = f"g-{secrets.token_hex(4)}" if mode in IN_A_GROUP else None
    died_at = await asyncio.to_thread(
        run_worker, mode, database_url, kafka_settings, catalogue.prefix, group or "-"
    )
    assert died_at == CRASH_AT
    # What the crash left: exactly the committed statements.
    committed = CRASH_AT if mode in COMMITTED_BEFORE_THE_KILL else CRASH_AT - 1
    assert statement_sequences(exchange_engine, STREAM) == list(range(1, committed + 1))

    # Restart: a fresh consumer over the same database (in the same group, if any).
    restarted = make_consumer(
        exchange_engine, group_settings(kafka_settings), catalogue.prefix, group, World()
    )
    assert head_sequence(restarted) == committed
    assert restarted.stored_sequence(STREAM) == committed
    async with running(restarted):
        await eventually(lambda: head_sequence(restarted) == LAST, timeout_s=30)
    assert restarted.margin_ledger.positions()[STREAM] == attested.holdings
    assert_credited_once(exchange_engine, attested, LAST)
    assert restarted.exchange_metrics.credited == LAST - committed
    assert restarted.metrics.dead_letters == 0
    loaded, _ = load_ledger(exchange_engine, POLICY, DECIMALS)
    assert loaded.state() == restarted.margin_ledger.state()


# --- two consumers of one group, one database, a rebalance ----------------------------------------


async def test_two_consumers_of_one_group_credit_each_statement_once_through_a_rebalance(
    exchange_engine: Engine, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    catalogue = new_catalogue()
    group = f"g-{secrets.token_hex(4)}"

    def instance() -> AttestationConsumer:
        return make_consumer(
            exchange_engine, group_settings(kafka_settings), catalogue.prefix, group, World()
        )

    await ensure_topics(kafka_settings, catalogue.all_topics())
    async with custodian_side(tmp_path, kafka_settings, catalogue) as custodian:
        first, second = instance(), instance()
        first_stop = asyncio.Event()
        first_task = asyncio.create_task(first.run(first_stop))
        try:
            await custodian.publish(3)
            await eventually(lambda: first.stored_sequence(STREAM) == 3, timeout_s=30)
            # The second joins while the first consumes; the first leaves mid-way.
            async with running(second):
                await custodian.publish(3)
                first_stop.set()
                await asyncio.wait_for(first_task, timeout=15)
                await custodian.publish(3)
                await eventually(lambda: second.stored_sequence(STREAM) == 9, timeout_s=10)
        finally:
            first_stop.set()
            await asyncio.wait_for(first_task, timeout=15)
        attested = custodian.attested()
    assert_credited_once(exchange_engine, attested, 9)
    loaded, _ = load_ledger(exchange_engine, POLICY, DECIMALS)
    assert loaded.positions()[STREAM] == attested.holdings
    assert second.margin_ledger.positions()[STREAM] == attested.holdings
    assert first.metrics.dead_letters + second.metrics.dead_letters == 0
