"""The consumer base against the embedded broker, on SQLite and PostgreSQL: exactly-once effect
from at-least-once delivery, progress in the effect's transaction, dead letters, retries, chunked
disclosures, and stored offsets the broker no longer has."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiokafka import TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from attestations.errors import SequenceGap, TransientError
from bridge import migrations
from bridge.consumer import ConsumerBase, Delivery, progress_table
from bridge.envelope import OutboundMessage, decode_message
from bridge.kafka import KafkaSettings, ensure_topics, open_consumer, open_producer, publish
from bridge.outbox import OutboxRelay, create_bridge_engine, run_transaction
from bridge.topics import MessageType, TopicCatalogue, TopicKind
from tests.outbox_worker import catalogue_for, entry_messages

pytestmark = pytest.mark.broker

STREAM = "custodian-a/exchange-x"


# --- helpers shared with test_outbox ------------------------------------------------------------


def make_engine(url: str) -> Engine:
    engine = create_bridge_engine(url)
    migrations.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE test_effects (stream VARCHAR(300), sequence BIGINT, leaves INT)")
        )
    return engine


def effects(engine: Engine) -> list[tuple[int, int]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT sequence, leaves FROM test_effects ORDER BY sequence")
        ).all()
    return [(int(s), int(n)) for s, n in rows]


@dataclass
class RecordingConsumer(ConsumerBase):
    """Writes one row per applied statement; can fail on demand."""

    refuse: set[int] = field(default_factory=set)
    transient_failures: int = 0
    attempts: int = 0

    def apply(self, session: Session, delivery: Delivery) -> None:
        self.attempts += 1
        if delivery.sequence in self.refuse:
            raise SequenceGap(f"sequence {delivery.sequence} refused by the test")
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise TransientError("the test's database is busy")
        disclosure = delivery.disclosure
        session.connection().execute(
            text("INSERT INTO test_effects VALUES (:stream, :sequence, :leaves)"),
            {
                "stream": delivery.stream,
                "sequence": delivery.sequence,
                "leaves": 0 if disclosure is None else len(disclosure.set_leaves),
            },
        )


def new_catalogue() -> TopicCatalogue:
    return catalogue_for(f"t{secrets.token_hex(5)}.")


def make_consumer(
    engine: Engine, settings: KafkaSettings, catalogue: TopicCatalogue, **options: object
) -> RecordingConsumer:
    return RecordingConsumer(
        engine=engine,
        settings=settings,
        name="exchange-x",
        topics=[catalogue.name(TopicKind.ATTESTATIONS)],
        source="/exchanges/exchange-x/consumer",
        catalogue=catalogue,
        backoff_initial_s=0.01,
        backoff_max_s=0.2,
        **options,  # type: ignore[arg-type]
    )


@asynccontextmanager
async def running(worker: ConsumerBase | OutboxRelay) -> AsyncIterator[asyncio.Event]:
    """Run ``worker.run(stop)`` as a task for the duration of the block."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


async def eventually(check: Callable[[], bool | Awaitable[bool]], *, timeout_s: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def publish_all(settings: KafkaSettings, messages: Iterable[OutboundMessage]) -> None:
    async with open_producer(settings) as producer:
        for message in messages:
            await publish(
                producer, message.topic, message.value, key=message.key, headers=message.headers
            )


async def read_topic(
    settings: KafkaSettings, topic: str, *, count: int, timeout_s: float = 10
) -> list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """``count`` records of a one-partition topic from the beginning: (offset, key, value,
    headers)."""
    found: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    async with open_consumer(settings, group_id=None, topics=[topic]) as consumer:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < count and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                found += [(r.offset, r.key, r.value, list(r.headers)) for r in records]
    return found


async def topics_ready(settings: KafkaSettings, catalogue: TopicCatalogue) -> None:
    await ensure_topics(settings, catalogue.all_topics())


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    created = make_engine(database_url)
    yield created
    created.dispose()


# --- tests --------------------------------------------------------------------------------------


async def test_duplicates_have_one_effect_and_progress_is_stored(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    entries = [m for s in (1, 2, 3) for m in entry_messages(s, catalogue=catalogue)]
    # Every record twice, and the first entry a third time: at-least-once delivery.
    await publish_all(kafka_settings, entries + entries + entries[:2])
    consumer = make_consumer(engine, kafka_settings, catalogue)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 3)
        await eventually(lambda: consumer.metrics.duplicates >= 3)
    assert effects(engine) == [(1, 5), (2, 0), (3, 0)]
    assert consumer.metrics.applied == 3
    (mark,) = consumer.stored_offsets().values()
    assert mark[0] >= 5  # the last record of the third entry, at least


async def test_restart_resumes_after_the_stored_offset(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    await publish_all(kafka_settings, entry_messages(1, catalogue=catalogue))
    first = make_consumer(engine, kafka_settings, catalogue)
    async with running(first):
        await eventually(lambda: first.stored_sequence(STREAM) == 1)
    await publish_all(kafka_settings, entry_messages(2, catalogue=catalogue))
    second = make_consumer(engine, kafka_settings, catalogue)
    async with running(second):
        await eventually(lambda: second.stored_sequence(STREAM) == 2)
    assert effects(engine) == [(1, 5), (2, 0)]
    assert second.metrics.duplicates == 0  # it resumed after entry 1, not from the beginning
    assert second.metrics.offset_resets == 0


async def test_stored_offset_beyond_the_log_end_neither_stalls_nor_skips(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    topic = catalogue.name(TopicKind.ATTESTATIONS)

    def far_ahead(session: Session) -> None:
        # What a broker that lost its data leaves behind: our offset 1000, its log at 0.
        session.connection().execute(
            progress_table.insert().values(
                consumer="exchange-x",
                topic=topic,
                partition=0,
                last_offset=1000,
                last_fingerprint="00" * 32,
                updated_at=__import__("datetime").datetime.now(__import__("datetime").UTC),
            )
        )

    run_transaction(engine, far_ahead, what="test setup")
    await publish_all(kafka_settings, entry_messages(1, catalogue=catalogue))
    consumer = make_consumer(engine, kafka_settings, catalogue)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 1)
    assert effects(engine) == [(1, 5)]
    assert consumer.metrics.offset_resets == 1


async def test_another_record_at_the_stored_offset_rereads_from_the_start(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    """A broker that lost its log and was refilled past our offset: the fingerprint differs, so
    the consumer reads from the beginning and the sequence drops what it already applied."""
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    topic = catalogue.name(TopicKind.ATTESTATIONS)

    def applied_elsewhere(session: Session) -> None:
        session.connection().execute(
            progress_table.insert().values(
                consumer="exchange-x",
                topic=topic,
                partition=0,
                last_offset=1,
                last_fingerprint="ab" * 32,
                updated_at=__import__("datetime").datetime.now(__import__("datetime").UTC),
            )
        )

    run_transaction(engine, applied_elsewhere, what="test setup")
    await publish_all(
        kafka_settings, [m for s in (1, 2) for m in entry_messages(s, catalogue=catalogue)]
    )
    consumer = make_consumer(engine, kafka_settings, catalogue)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 2)
    assert effects(engine) == [(1, 5), (2, 0)]  # nothing skipped
    assert consumer.metrics.offset_resets == 1


async def test_poison_message_goes_to_the_dead_letter_topic_and_the_partition_moves(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    topic = catalogue.name(TopicKind.ATTESTATIONS)
    garbage = OutboundMessage(
        topic=topic, key=STREAM.encode(), value=b"not a statement", headers=(("x", b"1"),)
    )
    await publish_all(
        kafka_settings,
        [*entry_messages(1, catalogue=catalogue), garbage, *entry_messages(2, catalogue=catalogue)],
    )
    consumer = make_consumer(engine, kafka_settings, catalogue)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 2)
    assert effects(engine) == [(1, 5), (2, 0)]
    assert consumer.metrics.dead_letters == 1
    (letter,) = await read_topic(kafka_settings, catalogue.name(TopicKind.DEAD_LETTERS), count=1)
    decoded = decode_message(
        catalogue.name(TopicKind.DEAD_LETTERS), letter[1], letter[2], letter[3], catalogue=catalogue
    )
    assert decoded.envelope.type is MessageType.DEAD_LETTER
    headers = dict(letter[3])
    assert headers["mcb_dlq_reason"] == b"bad_header"
    assert headers["mcb_dlq_offset"] == b"2"
    assert letter[2] == b"not a statement"
    with engine.connect() as connection:
        (count,) = connection.execute(text("SELECT COUNT(*) FROM consumer_dead_letters")).one()
    assert count == 1


async def test_a_statement_apply_refuses_is_dead_lettered_once(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    entries = [m for s in (1, 2, 3) for m in entry_messages(s, catalogue=catalogue)]
    await publish_all(kafka_settings, entries)
    consumer = make_consumer(engine, kafka_settings, catalogue, refuse={2})
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 3)
    assert effects(engine) == [(1, 5), (3, 0)]
    (letter,) = await read_topic(kafka_settings, catalogue.name(TopicKind.DEAD_LETTERS), count=1)
    headers = dict(letter[3])
    assert headers["mcb_dlq_reason"] == b"sequence_gap"
    assert letter[2] == entries[2].value  # the statement of entry 2, byte for byte


async def test_transient_apply_error_is_retried_not_skipped(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    await publish_all(
        kafka_settings, [m for s in (1, 2) for m in entry_messages(s, catalogue=catalogue)]
    )
    consumer = make_consumer(engine, kafka_settings, catalogue, transient_failures=3)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 2)
    assert effects(engine) == [(1, 5), (2, 0)]
    assert consumer.metrics.retries == 3
    assert consumer.attempts == 5


async def test_a_large_disclosure_arrives_complete(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    messages = entry_messages(1, catalogue=catalogue, leaves=20_000, budget_bytes=300_000)
    assert len(messages) > 4  # the statement and several chunks
    await publish_all(kafka_settings, messages)
    consumer = make_consumer(engine, kafka_settings, catalogue)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 1, timeout_s=30)
    assert effects(engine) == [(1, 20_000)]


async def test_missing_chunks_mean_nothing_is_applied(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    messages = entry_messages(1, catalogue=catalogue, leaves=2_000, budget_bytes=50_000)
    assert len(messages) > 3
    await publish_all(kafka_settings, messages[:-1])  # the last chunk never comes
    consumer = make_consumer(engine, kafka_settings, catalogue)
    async with running(consumer):
        await asyncio.sleep(1.5)
        assert consumer.stored_sequence(STREAM) is None
        assert effects(engine) == []
        # Nothing stored past the statement either: a restart reads it again.
        assert consumer.stored_offsets() == {}
        # The last chunk arrives late: now the entry is complete and applied, once.
        await publish_all(kafka_settings, messages[-1:])
        await eventually(lambda: consumer.stored_sequence(STREAM) == 1)
    assert effects(engine) == [(1, 2_000)]


async def test_consumer_group_assignment_seeks_to_the_stored_offset(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    settings = KafkaSettings(
        bootstrap_servers=kafka_settings.bootstrap_servers,
        client_id="mcb-tests",
        session_timeout_ms=2_000,
        heartbeat_interval_ms=500,
    )
    catalogue = new_catalogue()
    await topics_ready(settings, catalogue)
    await publish_all(settings, entry_messages(1, catalogue=catalogue))
    first = make_consumer(
        engine, settings, catalogue, use_group=True, group_id=f"g-{secrets.token_hex(4)}"
    )
    async with running(first):
        await eventually(lambda: first.stored_sequence(STREAM) == 1)
    await publish_all(settings, entry_messages(2, catalogue=catalogue))
    second = make_consumer(
        engine, settings, catalogue, use_group=True, group_id=f"g-{secrets.token_hex(4)}"
    )  # a new group: no commit hint
    async with running(second):
        await eventually(lambda: second.stored_sequence(STREAM) == 2)
    # Exactly once, whatever the group's first fetch delivered before the seek.
    assert effects(engine) == [(1, 5), (2, 0)]


def test_partition_keys_are_topic_partitions() -> None:
    # TopicPartition is what stored_offsets() returns: a named tuple, usable as a dict key.
    assert TopicPartition("a", 0) == TopicPartition("a", 0)
