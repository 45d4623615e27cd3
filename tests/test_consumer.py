"""The consumer base against the embedded broker, on SQLite and PostgreSQL: exactly-once effect
from at-least-once delivery, progress in the effect's transaction, dead letters, retries, chunked
disclosures, and stored offsets the broker no longer has."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiokafka import TopicPartition
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from attestations.errors import CounterpartyError, SequenceGap, TransientError
from bridge import migrations
from bridge.consumer import AfterCommit, ConsumerBase, Delivery, progress_table
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


def committed_rows(engine: Engine, sequence: int) -> int:
    """Rows of ``sequence`` in test_effects as another connection sees them (committed only)."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT COUNT(*) FROM test_effects WHERE sequence = :s"), {"s": sequence}
            ).scalar_one()
        )


def fail_commit_once(session: Session) -> None:
    """Make this session's commit fail after the effect was written (the transaction rolls
    back), as a database that goes away between the writes and the commit would."""

    def refuse(_: Session) -> None:
        raise TransientError("the commit failed")

    event.listen(session, "before_commit", refuse, once=True)


@dataclass
class RecordingConsumer(ConsumerBase):
    """Writes one row per applied statement; can fail on demand. With ``follow_up``, every
    refusal also writes a row (the negated sequence; -1 for a record that did not decode), and
    every effect and refusal returns an after-commit callable that notes, in ``followed_up``,
    what it followed and whether the effect's row was committed when it ran."""

    refuse: set[int] = field(default_factory=set)
    transient_failures: int = 0
    failed_commits: int = 0
    failed_refusal_commits: int = 0
    follow_up: bool = False
    attempts: int = 0
    rejections: list[tuple[int | None, str]] = field(default_factory=list)
    followed_up: list[tuple[str, int, int, bool]] = field(default_factory=list)
    """(what, row sequence, committed rows of it, effect lock held)"""

    def apply(self, session: Session, delivery: Delivery) -> AfterCommit | None:
        self.attempts += 1
        if delivery.sequence in self.refuse:
            raise SequenceGap(f"sequence {delivery.sequence} refused by the test")
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise TransientError("the test's database is busy")
        disclosure = delivery.disclosure
        sequence = delivery.sequence or 0
        session.connection().execute(
            text("INSERT INTO test_effects VALUES (:stream, :sequence, :leaves)"),
            {
                "stream": delivery.stream,
                "sequence": sequence,
                "leaves": 0 if disclosure is None else len(disclosure.set_leaves),
            },
        )
        if self.failed_commits > 0:
            self.failed_commits -= 1
            fail_commit_once(session)
        return self._follow_up("applied", sequence, attempt=self.attempts)

    def rejected(
        self, session: Session, delivery: Delivery | None, error: CounterpartyError
    ) -> AfterCommit | None:
        self.rejections.append((None if delivery is None else delivery.sequence, error.reason))
        if not self.follow_up:
            return None  # the base's behaviour: the dead letter only
        sequence = -1 if delivery is None else -(delivery.sequence or 0)
        session.connection().execute(
            text("INSERT INTO test_effects VALUES (:stream, :sequence, 0)"),
            {"stream": STREAM, "sequence": sequence},
        )
        if self.failed_refusal_commits > 0:
            self.failed_refusal_commits -= 1
            fail_commit_once(session)
        return self._follow_up("rejected", sequence, attempt=len(self.rejections))

    def _follow_up(self, what: str, sequence: int, *, attempt: int) -> AfterCommit | None:
        if not self.follow_up:
            return None
        lock = self.effect_lock

        def run() -> None:
            held = isinstance(lock, type(threading.Lock())) and lock.locked()
            self.followed_up.append(
                (f"{what}#{attempt}", sequence, committed_rows(self.engine, sequence), held)
            )

        return run


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


async def test_an_entry_apply_refused_is_applied_when_delivered_again(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    """Refusing an entry forgets its chunk set: the same entry delivered again is reassembled
    and applied, and the partition's stored offset moves past it (nothing is held back)."""
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    first, second = (entry_messages(s, catalogue=catalogue) for s in (1, 2))
    await publish_all(kafka_settings, [*first, *second])
    consumer = make_consumer(engine, kafka_settings, catalogue, refuse={2})
    records = len(first) + 2 * len(second)
    async with running(consumer):
        await eventually(lambda: consumer.metrics.dead_letters == 1)
        assert consumer.stored_sequence(STREAM) == 1
        consumer.refuse.clear()  # whatever made apply refuse is over
        await publish_all(kafka_settings, second)  # at least once: the same entry again
        await eventually(lambda: consumer.stored_sequence(STREAM) == 2, timeout_s=5)
        await eventually(
            lambda: [mark for mark, _ in consumer.stored_offsets().values()] == [records - 1]
        )
    assert effects(engine) == [(1, 5), (2, 0)]
    assert consumer.rejections == [(2, "sequence_gap")]


async def test_an_entry_whose_statement_was_dropped_is_applied_when_delivered_again(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    """A chunk set completed after its statement was dropped (too many waiting) is not applied
    and not remembered: the entry delivered again is reassembled and applied."""
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    first, second = (entry_messages(s, catalogue=catalogue) for s in (1, 2))
    # Statement 2 waits, statement 1 pushes it out, then both disclosures arrive.
    await publish_all(kafka_settings, [second[0], first[0], *first[1:], *second[1:]])
    consumer = make_consumer(engine, kafka_settings, catalogue, max_pending_statements=1)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 1)
        await eventually(lambda: consumer.metrics.evicted == 2)  # statement 2, then its chunks
        await publish_all(kafka_settings, second)
        await eventually(lambda: consumer.stored_sequence(STREAM) == 2, timeout_s=5)
    assert effects(engine) == [(1, 5), (2, 0)]
    assert consumer.metrics.dead_letters == 0


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


# --- after-commit callables and the rejection hook -----------------------------------------------


async def test_the_after_commit_callable_runs_once_after_the_commit(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    entries = [m for s in (1, 2) for m in entry_messages(s, catalogue=catalogue)]
    await publish_all(kafka_settings, entries + entries)  # duplicates: no effect, no callable
    lock = threading.Lock()
    consumer = make_consumer(engine, kafka_settings, catalogue, follow_up=True, effect_lock=lock)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 2)
        await eventually(lambda: consumer.metrics.duplicates >= 2)
    # Each ran once, saw its effect committed, and ran under the effect lock.
    assert consumer.followed_up == [("applied#1", 1, 1, True), ("applied#2", 2, 1, True)]
    assert not lock.locked()


async def test_the_after_commit_callable_does_not_run_when_the_transaction_fails(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    await publish_all(kafka_settings, entry_messages(1, catalogue=catalogue))
    consumer = make_consumer(engine, kafka_settings, catalogue, follow_up=True, failed_commits=2)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 1)
    # Attempts 1 and 2 wrote their effect and returned a callable, but their commit failed: the
    # effect was rolled back and neither callable ran. Attempt 3 committed; only its callable ran.
    assert consumer.attempts == 3
    assert consumer.followed_up == [("applied#3", 1, 1, False)]
    assert effects(engine) == [(1, 5)]
    assert consumer.metrics.retries == 2


async def test_rejected_writes_in_the_dead_letters_transaction(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    topic = catalogue.name(TopicKind.ATTESTATIONS)
    garbage = OutboundMessage(
        topic=topic, key=STREAM.encode(), value=b"not a statement", headers=(("x", b"1"),)
    )
    entries = [m for s in (1, 2, 3) for m in entry_messages(s, catalogue=catalogue)]
    await publish_all(kafka_settings, [*entries[:2], garbage, *entries[2:]])
    consumer = make_consumer(engine, kafka_settings, catalogue, refuse={2}, follow_up=True)
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 3)
    # The record that did not decode reaches rejected() without a delivery; the statement
    # apply() refused with its delivery and the error.
    assert consumer.rejections == [(None, "bad_header"), (2, "sequence_gap")]
    assert effects(engine) == [(-2, 0), (-1, 0), (1, 5), (3, 0)]
    assert [f for f in consumer.followed_up if f[0].startswith("rejected")] == [
        ("rejected#1", -1, 1, False),
        ("rejected#2", -2, 1, False),
    ]
    with engine.connect() as connection:
        reasons = connection.execute(
            text("SELECT reason FROM consumer_dead_letters ORDER BY id")
        ).all()
    assert [r for (r,) in reasons] == ["bad_header", "sequence_gap"]


async def test_a_failed_refusal_commits_nothing_and_is_done_again(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    """The rejection's effect, the dead-letter row and the offset advance are one transaction:
    when it fails, none of them is kept, the callable does not run, and the record is refused
    again (its dead letter published a second time: at least once)."""
    catalogue = new_catalogue()
    await topics_ready(kafka_settings, catalogue)
    entries = [m for s in (1, 2, 3) for m in entry_messages(s, catalogue=catalogue)]
    await publish_all(kafka_settings, entries)
    consumer = make_consumer(
        engine, kafka_settings, catalogue, refuse={2}, follow_up=True, failed_refusal_commits=1
    )
    async with running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 3)
    assert consumer.rejections == [(2, "sequence_gap"), (2, "sequence_gap")]
    assert effects(engine) == [(-2, 0), (1, 5), (3, 0)]
    assert [f for f in consumer.followed_up if f[0].startswith("rejected")] == [
        ("rejected#2", -2, 1, False)
    ]
    with engine.connect() as connection:
        (count,) = connection.execute(text("SELECT COUNT(*) FROM consumer_dead_letters")).one()
    assert count == 1
    letters = await read_topic(kafka_settings, catalogue.name(TopicKind.DEAD_LETTERS), count=2)
    assert len(letters) == 2
