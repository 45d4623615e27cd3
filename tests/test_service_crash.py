"""SIGKILL crashes of the custodian's publishing path, on SQLite and PostgreSQL, against the
embedded broker.

A worker process (tests/service_worker.py) runs the attestation service and its outbox relay in
one process, as ``mcb custodian serve`` does, and kills itself at one point of an epoch: after
signing, inside the publishing transaction, after the commit, after the transparency-log append,
after the broker acknowledged the entry. A fresh service then opens the same database and log
(with fresh in-process co-signers: theirs died with the process) and continues the stream. Each
test proves:

* nothing committed is lost: every statement in the table is in the log at its index and reaches
  the broker byte for byte as committed; sequences run 1..N without a gap and each ``previous``
  is the digest of the statement before;
* duplicates are harmless: an independent exchange consumer (built on ConsumerBase, verifying
  every statement) credits each sequence exactly once;
* the restored state is the committed one: its chain head and its trees' roots are those of the
  last stored statement, and the exchange's trees end equal to the custodian's.

A statement signed but never stored (the first two crash points) is gone with the process and
its in-process co-signers, so the restarted service signs another one at that sequence. Remote
co-signers remember what they signed: one that does refuses the replacement (a fork), which is
why they must keep their last statement and return it (docs/operations.md, "Crashes").
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from attestations.disclosure import ReceiverTrees
from attestations.errors import ForkDetected, MissingQuorum
from attestations.keys import KeyRegistry
from attestations.signing import Cosigner
from attestations.statement import GENESIS_PREVIOUS, SignedStatement, StatementKind
from attestations.translog import TransparencyLog
from attestations.verify import ChainHead, verify_statement
from bridge import migrations as bridge_migrations
from bridge.consumer import ConsumerBase, Delivery
from bridge.envelope import decode_message
from bridge.kafka import KafkaSettings, open_consumer
from bridge.outbox import create_bridge_engine, outbox_table
from bridge.topics import MessageType, TopicCatalogue, TopicKind
from custodian.service import AttestationService, statements_table
from custodian.store import CustodyBook
from tests.crash import run_until_killed
from tests.outbox_worker import catalogue_for
from tests.service_worker import (
    ASSETS,
    MODES,
    STREAM,
    change_pledges,
    fresh_cosigners,
    make_relay,
    open_service,
)
from tests.test_consumer import eventually, running
from tests.test_epochs import attested
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, NOW, World

pytestmark = pytest.mark.broker

CRASH_AT = 4
"""The worker publishes epochs 1-3 completely and dies during epoch 4 (a delta)."""
AFTER_RESTART = 2
"""Epochs the restarted service publishes."""
WORKER_TIMEOUT_S = 60.0

NOT_STORED = frozenset({"signed", "in_transaction"})
NOT_LOGGED = NOT_STORED | {"committed"}


# --- the worker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Killed:
    mode: str
    sequence: int
    signed: SignedStatement
    """The statement of the epoch the worker died in, as it signed it."""


def run_worker(mode: str, url: str, log_path: Path, settings: KafkaSettings, prefix: str) -> Killed:
    """Start the worker, wait for it to kill itself, and return what it said before dying."""
    said_mode, sequence, wire = run_until_killed(
        "tests.service_worker",
        mode,
        url,
        str(log_path),
        settings.bootstrap_servers,
        prefix,
        str(CRASH_AT),
        timeout_s=WORKER_TIMEOUT_S,
    )
    assert said_mode == mode
    return Killed(mode, int(sequence), SignedStatement.decode(bytes.fromhex(wire)))


# --- the exchange -------------------------------------------------------------------------------


def make_exchange_engine(url: str) -> Engine:
    """The exchange's own database: its consumer progress and its credits."""
    engine = create_bridge_engine(url)
    bridge_migrations.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE exchange_credits "
                "(sequence BIGINT NOT NULL, digest VARCHAR(64) NOT NULL, leaves INT NOT NULL)"
            )
        )
    return engine


def credits(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT sequence, digest FROM exchange_credits ORDER BY sequence, digest")
        ).all()
    return [(int(s), str(d)) for s, d in rows]


@dataclass
class CreditingExchange(ConsumerBase):
    """An exchange independent of the custodian's code: verifies every statement against its
    chain head and trees and records one credit row per applied statement, in the transaction
    the base stores its progress in."""

    registry: KeyRegistry = field(default_factory=KeyRegistry)
    receiver: ReceiverTrees = field(default_factory=lambda: ReceiverTrees(DECIMALS))
    head: ChainHead | None = None

    def apply(self, session: Session, delivery: Delivery) -> None:
        assert delivery.disclosure is not None
        signed = delivery.statement
        verified = verify_statement(
            signed.encode(),
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            registry=self.registry,
            head=self.head,
            now=signed.statement.issued_at,
            receiver=self.receiver,
            disclosure=delivery.disclosure,
        )
        session.connection().execute(
            text("INSERT INTO exchange_credits VALUES (:sequence, :digest, :leaves)"),
            {
                "sequence": signed.statement.sequence,
                "digest": signed.digest.hex(),
                "leaves": len(delivery.disclosure.set_leaves),
            },
        )
        verified.trees_plan.apply()
        self.head = verified.head


def make_exchange(
    engine: Engine, settings: KafkaSettings, catalogue: TopicCatalogue, world: World
) -> CreditingExchange:
    return CreditingExchange(
        engine=engine,
        settings=settings,
        name=EXCHANGE,
        topics=[catalogue.name(TopicKind.ATTESTATIONS)],
        source=f"/exchanges/{EXCHANGE}/consumer",
        catalogue=catalogue,
        backoff_initial_s=0.01,
        backoff_max_s=0.2,
        registry=world.registry,
    )


# --- reading back -------------------------------------------------------------------------------


def stored_statements(engine: Engine) -> list[tuple[int, bytes, bytes]]:
    """(sequence, digest, wire) of every committed statement of the stream, in order."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(statements_table.c.sequence, statements_table.c.digest, statements_table.c.wire)
            .where(statements_table.c.stream == STREAM)
            .order_by(statements_table.c.sequence)
        ).all()
    return [(int(s), bytes(d), bytes(w)) for s, d, w in rows]


def outbox_state(engine: Engine) -> dict[int, list[bool]]:
    """Per sequence, whether each of its outbox rows is marked sent."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(outbox_table.c.sequence, outbox_table.c.sent_at)
            .where(outbox_table.c.stream == STREAM)
            .order_by(outbox_table.c.id)
        ).all()
    state: dict[int, list[bool]] = {}
    for sequence, sent_at in rows:
        state.setdefault(int(sequence), []).append(sent_at is not None)
    return state


async def statements_on_the_broker(
    settings: KafkaSettings, catalogue: TopicCatalogue
) -> list[bytes]:
    """The value of every statement record on the attestations topic, in offset order (repeats
    included)."""
    topic = catalogue.name(TopicKind.ATTESTATIONS)
    partition = TopicPartition(topic, 0)
    values: list[bytes] = []
    async with open_consumer(settings, group_id=None, topics=()) as consumer:
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        while await consumer.position(partition) < end:
            batch = await consumer.getmany(partition, timeout_ms=200)
            for record in batch.get(partition, []):
                decoded = decode_message(
                    record.topic,
                    record.key,
                    record.value,
                    list(record.headers),
                    catalogue=catalogue,
                )
                if decoded.envelope.type is MessageType.STATEMENT:
                    assert record.value is not None
                    values.append(record.value)
    return values


def assert_restored(service: AttestationService, stored: list[tuple[int, bytes, bytes]]) -> None:
    """The restarted service's state is that of the last committed statement."""
    sequence, digest, wire = stored[-1]
    last = SignedStatement.decode(wire)
    state = service.state
    assert (state.sequence, state.previous) == (sequence, digest)
    assert state.issued_at == last.statement.issued_at
    assert {asset: tree.root for asset, tree in state.trees.items()} == {
        root.asset: root.root for root in last.statement.assets
    }
    assert {asset: (tree.total, tree.count) for asset, tree in state.trees.items()} == {
        root.asset: (root.total, root.count) for root in last.statement.assets
    }


def assert_chain(stored: list[tuple[int, bytes, bytes]]) -> None:
    assert [sequence for sequence, _, _ in stored] == list(range(1, len(stored) + 1))
    previous = GENESIS_PREVIOUS
    for _, digest, wire in stored:
        signed = SignedStatement.decode(wire)
        assert signed.digest == digest
        assert signed.statement.previous == previous
        previous = digest


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def exchange_engine(make_database_url: Callable[[], str]) -> Iterator[Engine]:
    engine = make_exchange_engine(make_database_url())
    yield engine
    engine.dispose()


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_crash_at_any_point_of_an_epoch_loses_nothing_and_credits_once(
    mode: str,
    database_url: str,
    exchange_engine: Engine,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
) -> None:
    catalogue = catalogue_for(f"t{secrets.token_hex(5)}.")
    log_path = tmp_path / "translog.sqlite3"
    killed = await asyncio.to_thread(
        run_worker, mode, database_url, log_path, kafka_settings, catalogue.prefix
    )
    assert killed.sequence == CRASH_AT
    world = World()
    committed = CRASH_AT - 1 if mode in NOT_STORED else CRASH_AT

    with CustodyBook.open(database_url, assets=ASSETS) as book:
        # What the crash left: the tables hold exactly the committed epochs.
        stored = stored_statements(book.engine)
        assert [s for s, _, _ in stored] == list(range(1, committed + 1))
        outbox = outbox_state(book.engine)
        assert all(all(outbox[s]) for s in range(1, CRASH_AT))  # 1..3 relayed and marked
        if mode in NOT_STORED:
            assert CRASH_AT not in outbox  # the rolled-back transaction left no row
        else:
            assert stored[-1][2] == killed.signed.encode()  # what was signed is what is stored
            assert not any(outbox[CRASH_AT])  # committed, never marked sent
        with TransparencyLog(log_path) as log:
            assert log.size == (CRASH_AT - 1 if mode in NOT_LOGGED else CRASH_AT)

            # Restart: a fresh service over the same database and log.
            relay = make_relay(book, kafka_settings, catalogue)
            service = open_service(
                book,
                world,
                log,
                cosigners=fresh_cosigners(world),
                relay=relay,
                catalogue=catalogue,
            )
            assert_restored(service, stored)
            assert log.size == committed  # open() appended what the crash left out
            assert [log.index_of(digest) for _, digest, _ in stored] == list(range(committed))

            # The in-process co-signers forgot the stream: a delta is refused, a snapshot is not.
            with pytest.raises(MissingQuorum, match="sequence_gap"):
                service.publish_epoch(NOW + timedelta(seconds=100))
            service.request_snapshot()

            exchange = make_exchange(exchange_engine, kafka_settings, catalogue, world)
            last = committed + AFTER_RESTART
            async with running(relay), running(exchange):
                for sequence in range(committed + 1, last + 1):
                    await asyncio.to_thread(change_pledges, book, sequence)
                    await asyncio.to_thread(
                        service.publish_epoch, NOW + timedelta(seconds=100 + sequence)
                    )
                await eventually(lambda: exchange.stored_sequence(STREAM) == last, timeout_s=30)
                await eventually(lambda: relay.count_unsent() == 0)

            # Nothing lost: every committed statement is logged, contiguous and chained.
            final = stored_statements(book.engine)
            assert_chain(final)
            assert len(final) == last
            assert final[:committed] == stored  # nothing committed before the crash changed
            assert [log.index_of(digest) for _, digest, _ in final] == list(range(last))
            assert log.size == last

            # The broker carries each committed statement exactly as committed, and nothing else.
            on_broker = await statements_on_the_broker(kafka_settings, catalogue)
            assert set(on_broker) == {wire for _, _, wire in final}
            first_copies = list(dict.fromkeys(on_broker))
            assert first_copies == [wire for _, _, wire in final]  # in sequence order
            if mode == "published":
                # Acknowledged before the crash, republished after it: there twice at least.
                assert on_broker.count(final[CRASH_AT - 1][2]) >= 2
            elif relay.metrics.broker_losses == 0:
                # (A relay that believes the broker lost records republishes the latest snapshot
                # and what follows: more copies, still nothing else.)
                assert len(on_broker) == last

            # Duplicates are harmless: one credit per sequence, the committed statement's.
            assert credits(exchange_engine) == [(s, d.hex()) for s, d, _ in final]
            assert exchange.metrics.dead_letters == 0
            if mode == "published":
                assert exchange.metrics.duplicates >= 1
            assert exchange.head is not None
            assert exchange.head.digest == final[-1][1]
            # The exchange's trees and the custodian's restored-then-advanced state agree.
            assert attested(exchange.receiver) == book.pledged(EXCHANGE)
            assert dict(service.state.quantities) == book.pledged(EXCHANGE)
            assert {a: t.root for a, t in exchange.receiver.trees.items()} == {
                a: t.root for a, t in service.state.trees.items()
            }
            # A second restart restores the same state again.
            again = open_service(book, world, log, cosigners=fresh_cosigners(world))
            assert_restored(again, final)

        if mode in NOT_STORED:
            assert_a_remembering_cosigner_refuses_the_replacement(killed, final, world)


def assert_a_remembering_cosigner_refuses_the_replacement(
    killed: Killed, final: list[tuple[int, bytes, bytes]], world: World
) -> None:
    """The statement signed before the crash never reached the tables or the broker; the restart
    signed another one at its sequence. A co-signer that keeps its record (a remote party)
    would have seen both: it refuses the second as a fork and answers the first again."""
    lost = killed.signed
    replacement = SignedStatement.decode(final[CRASH_AT - 1][2])
    assert replacement.statement.sequence == lost.statement.sequence == CRASH_AT
    assert replacement.digest != lost.digest
    assert replacement.statement.kind is StatementKind.SNAPSHOT  # what fresh co-signers accept
    assert lost.digest not in {digest for _, digest, _ in final}

    remembering = Cosigner(world.cosigners[0])
    for _, _, wire in final[: CRASH_AT - 1]:
        statement = SignedStatement.decode(wire).statement
        remembering.cosign(statement, now=statement.issued_at)
    first = remembering.cosign(lost.statement, now=lost.statement.issued_at)
    with pytest.raises(ForkDetected):
        remembering.cosign(replacement.statement, now=replacement.statement.issued_at)
    # Asked again for the statement it signed, it answers with the same signature: what a
    # restarted custodian needs to store that statement instead of signing a new one.
    assert remembering.cosign(lost.statement, now=lost.statement.issued_at) == first
