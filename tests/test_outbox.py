"""The outbox and its relay against the embedded broker, on SQLite and PostgreSQL: atomic
enqueue, ordered publication, crashes between commit and publish and between publish and mark,
a broker that comes back empty, retention."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from bridge.broker import EmbeddedBroker
from bridge.envelope import decode_message
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay, enqueue, outbox_table
from bridge.topics import TopicCatalogue, TopicKind
from tests.outbox_worker import enqueue_entries, entry_messages
from tests.test_consumer import (
    STREAM,
    effects,
    eventually,
    make_consumer,
    new_catalogue,
    read_topic,
    running,
)

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent


def make_relay(engine: Engine, settings: KafkaSettings, catalogue: TopicCatalogue) -> OutboxRelay:
    return OutboxRelay(
        engine,
        settings,
        catalogue=catalogue,
        poll_interval_s=0.05,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        loss_check_interval_s=0.5,
    )


def rows(engine: Engine) -> list[tuple[int, int, bool]]:
    """(id, sequence, sent) of every outbox row, in id order."""
    with engine.connect() as connection:
        result = connection.execute(
            select(outbox_table.c.id, outbox_table.c.sequence, outbox_table.c.sent_at).order_by(
                outbox_table.c.id
            )
        ).all()
    return [(int(i), int(s), sent is not None) for i, s, sent in result]


def unsent(engine: Engine) -> int:
    return sum(1 for _, _, sent in rows(engine) if not sent)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    from tests.test_consumer import make_engine

    created = make_engine(database_url)
    yield created
    created.dispose()


# --- enqueue and relay --------------------------------------------------------------------------


async def test_rolled_back_enqueue_is_never_published(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    with Session(engine) as session:
        session.begin()
        enqueue(session, entry_messages(1, catalogue=catalogue), sequence=1)
        session.rollback()  # the custodian's own transaction failed: nothing of it remains
    assert rows(engine) == []
    enqueue_entries(engine, [2], catalogue=catalogue)
    relay = make_relay(engine, kafka_settings, catalogue)
    async with running(relay):
        await eventually(lambda: unsent(engine) == 0)
    found = await read_topic(kafka_settings, catalogue.name(TopicKind.ATTESTATIONS), count=2)
    assert [dict(headers)["mcb_sequence"] for *_, headers in found] == [b"2", b"2"]


async def test_relay_publishes_in_order_and_marks_sent(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    expected = [m for s in (1, 2, 3) for m in entry_messages(s, catalogue=catalogue)]
    enqueue_entries(engine, [1, 2, 3], catalogue=catalogue)
    assert [sequence for _, sequence, _ in rows(engine)] == [1, 1, 2, 2, 3, 3]
    relay = make_relay(engine, kafka_settings, catalogue)
    async with running(relay):
        await eventually(lambda: unsent(engine) == 0)
    assert relay.metrics.published == len(expected)
    assert relay.metrics.lag == 0
    topic = catalogue.name(TopicKind.ATTESTATIONS)
    found = await read_topic(kafka_settings, topic, count=len(expected))
    assert [(key, value) for _, key, value, _ in found] == [(m.key, m.value) for m in expected]
    for offset, key, value, headers in found:
        decoded = decode_message(topic, key, value, headers, catalogue=catalogue)
        assert decoded.envelope.key == STREAM.encode()
        assert offset >= 0
    with engine.connect() as connection:
        offsets = connection.execute(
            select(outbox_table.c.sent_offset).order_by(outbox_table.c.id)
        ).scalars()
        assert list(offsets) == list(range(len(expected)))


async def test_enqueue_refuses_an_entry_of_two_streams_or_a_wrong_sequence(
    engine: Engine,
) -> None:
    from attestations.errors import InvariantViolation

    catalogue = new_catalogue()
    with Session(engine) as session, session.begin():
        with pytest.raises(InvariantViolation, match="sequence"):
            enqueue(session, entry_messages(1, catalogue=catalogue), sequence=2)
        with pytest.raises(InvariantViolation):
            enqueue(session, (), sequence=1)


# --- crashes ------------------------------------------------------------------------------------


def start_worker(
    mode: str, url: str, bootstrap: str, prefix: str, *sequences: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.outbox_worker",
            mode,
            url,
            bootstrap,
            prefix,
            *map(str, sequences),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def wait_for_line(worker: subprocess.Popen[str], word: str) -> None:
    assert worker.stdout is not None
    line = worker.stdout.readline().strip()
    assert line == word, f"worker said {line!r}, exit code {worker.poll()}"


def kill(worker: subprocess.Popen[str]) -> None:
    os.kill(worker.pid, signal.SIGKILL)
    try:
        assert worker.wait(timeout=10) == -signal.SIGKILL
    finally:
        if worker.stdout is not None:
            worker.stdout.close()


async def test_crash_between_commit_and_publish_loses_nothing(
    database_url: str, engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    worker = start_worker(
        "commit", database_url, kafka_settings.bootstrap_servers, catalogue.prefix, 1, 2
    )
    try:
        await asyncio.to_thread(wait_for_line, worker, "COMMITTED")
    finally:
        kill(worker)
    assert unsent(engine) == 4  # committed, never published
    relay = make_relay(engine, kafka_settings, catalogue)
    consumer = make_consumer(engine, kafka_settings, catalogue)
    async with running(relay), running(consumer):
        await eventually(lambda: consumer.stored_sequence(STREAM) == 2)
    assert effects(engine) == [(1, 5), (2, 0)]


async def test_crash_between_publish_and_mark_has_one_effect(
    database_url: str, engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    enqueue_entries(engine, [1, 2], catalogue=catalogue)
    worker = start_worker(
        "publish", database_url, kafka_settings.bootstrap_servers, catalogue.prefix
    )
    try:
        await asyncio.to_thread(wait_for_line, worker, "PUBLISHED")
    finally:
        kill(worker)
    assert unsent(engine) == 4  # on the broker, not marked
    topic = catalogue.name(TopicKind.ATTESTATIONS)
    assert len(await read_topic(kafka_settings, topic, count=4)) == 4
    relay = make_relay(engine, kafka_settings, catalogue)
    consumer = make_consumer(engine, kafka_settings, catalogue)
    async with running(relay), running(consumer):
        await eventually(lambda: unsent(engine) == 0)
        await eventually(lambda: consumer.stored_sequence(STREAM) == 2)
        await eventually(lambda: consumer.metrics.duplicates >= 2)
    assert len(await read_topic(kafka_settings, topic, count=8)) == 8  # published twice
    assert effects(engine) == [(1, 5), (2, 0)]  # applied once


# --- broker data loss ---------------------------------------------------------------------------


async def test_broker_restarted_empty_the_stream_recovers(
    engine: Engine, fresh_broker: EmbeddedBroker
) -> None:
    settings = KafkaSettings(
        bootstrap_servers=fresh_broker.bootstrap_servers,
        client_id="mcb-tests",
        request_timeout_ms=3_000,
    )
    catalogue = new_catalogue()
    # 1 snapshot, 2-4 deltas, 5 snapshot, 6 delta: 12 records, consumer offset ends at 11.
    enqueue_entries(engine, [1, 2, 3, 4, 5, 6], catalogue=catalogue)
    relay = make_relay(engine, settings, catalogue)
    consumer = make_consumer(engine, settings, catalogue)
    async with running(relay) as _:
        async with running(consumer):
            await eventually(lambda: consumer.stored_sequence(STREAM) == 6)
        (mark,) = consumer.stored_offsets().values()
        assert mark[0] == 11
        await asyncio.to_thread(fresh_broker.restart)
        # The relay notices and republishes the latest snapshot (5) and what follows (6).
        await eventually(lambda: relay.metrics.broker_losses == 1, timeout_s=30)
        await eventually(lambda: unsent(engine) == 0, timeout_s=30)
        assert relay.metrics.republished_rows == 4
        enqueue_entries(engine, [7], catalogue=catalogue)
        relay.wake()
        await eventually(lambda: unsent(engine) == 0)
        # The stored offset (11) is beyond the new log's end (6): no stall, no skip, no double.
        recovered = make_consumer(engine, settings, catalogue)
        async with running(recovered):
            await eventually(lambda: recovered.stored_sequence(STREAM) == 7, timeout_s=30)
    assert recovered.metrics.offset_resets == 1
    assert [sequence for sequence, _ in effects(engine)] == [1, 2, 3, 4, 5, 6, 7]


async def test_republish_from_a_sequence_on_request(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    enqueue_entries(engine, [1, 2, 3], catalogue=catalogue)
    relay = make_relay(engine, kafka_settings, catalogue)
    async with running(relay):
        await eventually(lambda: unsent(engine) == 0)
        assert await asyncio.to_thread(relay.republish_from, STREAM, 2) == 4
        await eventually(lambda: unsent(engine) == 0)
    found = await read_topic(kafka_settings, catalogue.name(TopicKind.ATTESTATIONS), count=10)
    assert [dict(h)["mcb_sequence"] for *_, h in found] == [
        b"1",
        b"1",
        b"2",
        b"2",
        b"3",
        b"3",
        b"2",
        b"2",
        b"3",
        b"3",
    ]


# --- retention ----------------------------------------------------------------------------------


def test_purge_keeps_the_latest_snapshot_and_everything_after(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    catalogue = new_catalogue()
    enqueue_entries(engine, [1, 2, 3, 4, 5, 6], catalogue=catalogue)
    long_ago = datetime.now(UTC) - timedelta(days=30)
    with engine.begin() as connection:
        connection.execute(update(outbox_table).values(sent_at=long_ago))
    relay = make_relay(engine, kafka_settings, catalogue)
    assert relay.purge() == 8  # entries 1-4 are before the latest snapshot (5)
    assert sorted({sequence for _, sequence, _ in rows(engine)}) == [5, 6]
    assert relay.purge() == 0
    # Unsent rows are never purged, whatever their age.
    with engine.begin() as connection:
        connection.execute(update(outbox_table).values(sent_at=None))
        (count,) = connection.execute(select(func.count()).select_from(outbox_table)).one()
    assert count == 4
