"""The producer's outbox: messages written in the producer's own transaction, relayed to Kafka.

* :func:`enqueue` writes the records of one stream entry (a statement and the chunks of its
  disclosure) into ``bridge_outbox`` through the caller's session, *inside the caller's
  transaction*: the statement is in the outbox exactly when the custodian's own state that
  produced it is committed. A rolled-back transaction leaves nothing to publish.
* :class:`OutboxRelay` reads unsent rows in id order, publishes them with the tuned producer
  (``acks=all``), waits for each acknowledgement and only then marks the row sent, in a short
  transaction of its own. A crash between the publication and the mark publishes the row again
  on restart: delivery is at least once, and the consumers drop the duplicate by stream sequence
  (the embedded broker has no idempotent producer, so duplicates are possible anyway).
* Broker data loss: the relay remembers, in the rows, the partition and offset each record got.
  When a topic it wrote to is missing, or a partition's end offset is not past the highest offset
  it was given, twice 0.2 s apart (an end offset may trail an acknowledgement for a moment), the
  broker lost its log (the embedded broker keeps nothing across a restart). The
  relay then re-creates the topics and republishes, per stream, the latest snapshot statement and
  every entry after it, with their chunks: enough for a consumer that starts from nothing. The
  same is done on request (:meth:`OutboxRelay.request_republish`, :meth:`republish_from`).
* Rows are never deleted when sent. :meth:`OutboxRelay.purge` deletes sent rows older than the
  retention, but never the latest snapshot of a stream or anything after it.

Not here: building statements (custodian), envelopes (bridge/envelope.py), chunking
(bridge/chunks.py), consuming (bridge/consumer.py). One relay per database: two relays on one
outbox would both publish every row (harmless for consumers, but twice the traffic).

Ordering: the relay publishes in id order. Ids are handed out at insert; two transactions of the
*same* stream cannot commit out of order because a stream's next sequence depends on the previous
one being committed, so per-stream order, the only order Kafka keeps, holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from attestations.errors import ConfigurationError, InvariantViolation, TransientError
from attestations.statement import SignedStatement, StatementKind
from bridge import database, migrations
from bridge.database import DEFAULT_MAX_ATTEMPTS
from bridge.envelope import OutboundMessage
from bridge.errors import BrokerUnavailable
from bridge.kafka import (
    KafkaSettings,
    create_consumer,
    create_producer,
    ensure_topics,
    kafka_errors,
    start_client,
)
from bridge.topics import DEFAULT_CATALOGUE, MessageType, TopicCatalogue

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S: Final = 0.5
DEFAULT_BATCH_ROWS: Final = 100
DEFAULT_BATCH_BYTES: Final = 8 * 2**20
DEFAULT_RETENTION: Final = timedelta(days=7)
DEFAULT_BACKOFF_INITIAL_S: Final = 0.05
DEFAULT_BACKOFF_MAX_S: Final = 5.0
DEFAULT_LOSS_CHECK_INTERVAL_S: Final = 10.0
DEFAULT_PURGE_INTERVAL_S: Final = 3600.0
LOSS_RECHECK_S: Final = 0.2
"""Pause before the second look that confirms a suspected broker data loss."""

T = TypeVar("T")


# --- errors -------------------------------------------------------------------------------------


class BridgeDatabaseUnavailable(TransientError):
    """The bridge's tables could not be read or written now (database down, locked, busy after
    retries). Retry with back-off: nothing was lost, an unsent row stays unsent."""

    reason = "bridge_database_unavailable"


class BridgeSchemaNotCurrent(ConfigurationError):
    """The database's bridge tables are not at the revision this code needs: run
    :func:`bridge.migrations.upgrade`."""

    reason = "bridge_schema_not_current"


# --- tables -------------------------------------------------------------------------------------


row_id_type: Final = database.row_id_type  # the consumer's tables import it from here


class UtcDateTime(database.UtcDateTime):
    """Timezone-aware UTC timestamps of the bridge's tables; a naive one is an
    :class:`~attestations.errors.InvariantViolation`."""

    cache_ok = True
    naive_error = InvariantViolation
    stored_by = "the bridge"


metadata: Final = MetaData()
"""The bridge's own metadata (outbox and consumer tables), migrated by :mod:`bridge.migrations`
and never mixed with the custody book's."""

outbox_table: Final = Table(
    "bridge_outbox",
    metadata,
    Column("id", row_id_type(), primary_key=True, autoincrement=True),
    Column("stream", String(300), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    # True for every record of an entry whose statement is a full snapshot: what a consumer
    # starting from nothing needs first.
    Column("snapshot", Boolean, nullable=False),
    Column("message_type", String(64), nullable=False),
    Column("topic", String(249), nullable=False),
    Column("message_key", LargeBinary, nullable=False),
    Column("message_value", LargeBinary, nullable=False),
    # JSON array of [name, hex value] pairs, in record order.
    Column("headers", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("sent_at", UtcDateTime, nullable=True),
    Column("sent_partition", Integer, nullable=True),
    Column("sent_offset", BigInteger, nullable=True),
    Column("publish_count", Integer, nullable=False, server_default="0"),
    Index(
        "ix_bridge_outbox_unsent",
        "id",
        postgresql_where=text("sent_at IS NULL"),
        sqlite_where=text("sent_at IS NULL"),
    ),
    Index("ix_bridge_outbox_stream_sequence", "stream", "sequence"),
    sqlite_autoincrement=True,
)


# --- engine and transactions --------------------------------------------------------------------


def create_bridge_engine(url: str) -> Engine:
    """An engine for the bridge tables: ``sqlite:///path`` or ``postgresql+psycopg://...``. A
    service that already has an engine on the same database passes that one instead."""
    return database.create_database_engine(
        url, owner="the bridge", unsupported=ConfigurationError, sqlite_foreign_keys=False
    )


def check_schema(engine: Engine) -> None:
    """Raise :class:`BridgeSchemaNotCurrent` unless the bridge tables are at head."""
    database.verify_schema_current(
        engine,
        current_revision=migrations.current_revision,
        head_revision=migrations.head_revision(),
        schema="bridge schema",
        upgrade_with="bridge.migrations.upgrade",
        unavailable=BridgeDatabaseUnavailable,
        not_current=BridgeSchemaNotCurrent,
    )


def database_errors(what: str) -> contextlib.AbstractContextManager[None]:
    """Wrap driver errors that mean "not now" as :class:`BridgeDatabaseUnavailable`."""
    return database.database_errors(what, unavailable=BridgeDatabaseUnavailable)


def run_transaction(
    engine: Engine,
    work: Callable[[Session], T],
    *,
    what: str,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    read_only: bool = False,
) -> T:
    """Run ``work`` in one transaction and commit; retry lock conflicts a few times, then raise
    :class:`BridgeDatabaseUnavailable`. A unique-key conflict is retried too (a concurrent
    transaction inserted the same progress row first: the next try sees it), and raises
    :class:`~attestations.errors.InvariantViolation` when it persists. Any other exception rolls
    back and propagates.

    ``read_only``: ``work`` only reads. On SQLite the transaction then reads one snapshot without
    taking the write lock (:func:`bridge.database.read_only`), so it neither waits for writers nor
    makes them wait; a write in it fails."""
    bind = database.read_only(engine) if read_only else engine

    def attempt() -> T:
        with Session(bind, expire_on_commit=False) as session, session.begin():
            return work(session)

    return database.run_with_retries(
        attempt,
        what=what,
        max_attempts=max_attempts,
        unavailable=BridgeDatabaseUnavailable,
        corrupted=InvariantViolation,
    )


# --- enqueue ------------------------------------------------------------------------------------


def _header(message: OutboundMessage, name: str) -> bytes | None:
    for header_name, value in message.headers:
        if header_name == name:
            return value
    return None


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    return json.dumps([[name, value.hex()] for name, value in headers], separators=(",", ":"))


def decode_headers(stored: str) -> tuple[tuple[str, bytes], ...]:
    return tuple((str(name), bytes.fromhex(value)) for name, value in json.loads(stored))


def _is_snapshot(message: OutboundMessage) -> bool:
    signed = SignedStatement.decode(message.value, max_bytes=max(1, len(message.value)))
    return signed.statement.kind is StatementKind.SNAPSHOT


def enqueue(
    session: Session,
    messages: Sequence[OutboundMessage],
    *,
    sequence: int,
    now: datetime | None = None,
) -> None:
    """Add the records of one stream entry (typically a statement and its disclosure chunks, in
    publication order) to the outbox through ``session``. Call it inside the transaction that
    commits the state the entry describes; nothing is committed here.

    Every record must name one stream (the ``mcb_stream`` header, or the record key for types
    without one, such as an exchange's positions snapshot, keyed by the exchange: Kafka orders by
    key) and, where it carries ``mcb_sequence``, ``sequence``. An entry whose statement is a
    snapshot is marked as such: after a broker lost its data, republication starts at the latest
    snapshot of each stream.
    """
    if not messages:
        raise InvariantViolation("enqueue needs at least one message")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise InvariantViolation(f"sequence must be a non-negative integer, not {sequence!r}")
    moment = (datetime.now(UTC) if now is None else now).astimezone(UTC)
    streams = {_header(m, "mcb_stream") or m.key for m in messages}
    if len(streams) != 1 or None in streams or b"" in streams:
        raise InvariantViolation("one outbox entry is the records of exactly one stream")
    stream = next(iter(streams)) or b""
    snapshot = False
    types: list[str] = []
    for message in messages:
        raw_type = _header(message, "ce_type")
        if raw_type is None:
            raise InvariantViolation("an outbox record needs a ce_type header")
        message_type = raw_type.decode("ascii")
        types.append(message_type)
        raw_sequence = _header(message, "mcb_sequence")
        if raw_sequence is not None and raw_sequence != str(sequence).encode("ascii"):
            raise InvariantViolation(
                f"record says sequence {raw_sequence[:24]!r}, the entry is {sequence}"
            )
        if message_type == MessageType.STATEMENT.value:
            snapshot = snapshot or _is_snapshot(message)
    rows = [
        {
            "stream": stream.decode("utf-8"),
            "sequence": sequence,
            "snapshot": snapshot,
            "message_type": message_type,
            "topic": message.topic,
            "message_key": message.key,
            "message_value": message.value,
            "headers": encode_headers(message.headers),
            "created_at": moment,
        }
        for message, message_type in zip(messages, types, strict=True)
    ]
    connection = session.connection()
    # One statement per row keeps ids in list order on every driver.
    for row in rows:
        connection.execute(insert(outbox_table).values(**row))


def call_on_loop(loop: asyncio.AbstractEventLoop | None, callback: Callable[[], None]) -> None:
    """Run ``callback`` in ``loop``'s thread: scheduled thread-safely when called from another
    thread (an asyncio event may only be set by its own loop), at once when called from that loop
    or when there is no (open) loop to defer to."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is not None and running is not loop and not loop.is_closed():
        loop.call_soon_threadsafe(callback)
    else:
        callback()


# --- the relay ----------------------------------------------------------------------------------


@dataclass(slots=True)
class RelayMetrics:
    """Counters of one relay since it was created (exported by the service as Prometheus
    counters and gauges)."""

    published: int = 0
    """Records acknowledged by the broker and marked sent (a republication counts again)."""
    republished_rows: int = 0
    """Rows reset to unsent for republication (broker data loss or request)."""
    broker_losses: int = 0
    """Times the relay found the broker had lost what it was given."""
    retries: int = 0
    """Passes that failed on a transient error and were retried after a back-off."""
    purged: int = 0
    lag: int = 0
    """Unsent rows after the last pass: those unsent when its batch was read, less the rows it
    marked sent (rows enqueued during the pass count from the next one)."""
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    @property
    def size(self) -> int:
        return len(self.key) + len(self.value) + sum(len(n) + len(v) for n, v in self.headers)


@dataclass(slots=True)
class _Acked:
    id: int
    partition: int
    offset: int


@dataclass
class OutboxRelay:
    """Publishes the outbox in id order. Run :meth:`run` as a task; :meth:`wake` after a commit
    that enqueued something makes it publish without waiting for the poll interval."""

    engine: Engine
    settings: KafkaSettings
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    batch_rows: int = DEFAULT_BATCH_ROWS
    batch_bytes: int = DEFAULT_BATCH_BYTES
    retention: timedelta = DEFAULT_RETENTION
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    loss_check_interval_s: float = DEFAULT_LOSS_CHECK_INTERVAL_S
    purge_interval_s: float = DEFAULT_PURGE_INTERVAL_S
    create_topics: bool = True
    """Create the catalogue's topics when connecting and after a loss (the embedded broker comes
    back without any). Turn off where topics are managed by the cluster's operators."""
    metrics: RelayMetrics = field(default_factory=RelayMetrics)

    def __post_init__(self) -> None:
        for name in ("poll_interval_s", "backoff_initial_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.batch_rows < 1 or self.batch_bytes < 1:
            raise ConfigurationError("batch_rows and batch_bytes must be positive")
        if self.retention < timedelta(0):
            raise ConfigurationError("retention must not be negative")
        self._wake = asyncio.Event()
        self._republish_requested = False
        self._check_loss = True
        self._unsent_seen = 0

    # --- control --------------------------------------------------------------------------------

    def wake(self) -> None:
        """Publish now rather than at the next poll (call after committing an enqueue)."""
        self._wake.set()

    def request_republish(self) -> None:
        """Republish what a consumer starting from nothing needs (latest snapshot of every
        stream and everything after it), on the next pass."""
        self._republish_requested = True
        self._wake.set()

    def republish_from(self, stream: str, sequence: int) -> int:
        """Mark every row of ``stream`` from ``sequence`` on unsent again; returns how many. The
        relay publishes them in id order on its next pass."""

        def work(session: Session) -> int:
            return self._reset(session, stream=stream, from_sequence=sequence)

        count = run_transaction(self.engine, work, what="republishing from a sequence")
        self.metrics.republished_rows += count
        self._wake.set()
        return count

    def republish_needed(self) -> int:
        """Mark unsent again, per stream, the latest snapshot entry and every entry after it (the
        whole stream when it has no snapshot); forget every recorded offset. Returns how many
        rows will be published again."""
        count = run_transaction(self.engine, self._reset_all, what="republishing after a loss")
        self.metrics.republished_rows += count
        self._wake.set()
        return count

    def _reset_all(self, session: Session) -> int:
        connection = session.connection()
        firsts = connection.execute(
            select(
                outbox_table.c.stream,
                func.min(outbox_table.c.sequence),
                func.max(outbox_table.c.sequence).filter(outbox_table.c.snapshot),
            ).group_by(outbox_table.c.stream)
        ).all()
        total = 0
        for stream, first, latest_snapshot in firsts:
            start = latest_snapshot if latest_snapshot is not None else first
            total += self._reset(session, stream=stream, from_sequence=start)
        # Offsets given by the lost log mean nothing now; keeping them would report the loss again.
        connection.execute(
            update(outbox_table)
            .where(outbox_table.c.sent_offset.is_not(None))
            .values(sent_partition=None, sent_offset=None)
        )
        return total

    @staticmethod
    def _reset(session: Session, *, stream: str, from_sequence: int) -> int:
        result = session.connection().execute(
            update(outbox_table)
            .where(
                outbox_table.c.stream == stream,
                outbox_table.c.sequence >= from_sequence,
                outbox_table.c.sent_at.is_not(None),
            )
            .values(sent_at=None, sent_partition=None, sent_offset=None)
        )
        return int(result.rowcount or 0)

    def purge(self, *, now: datetime | None = None) -> int:
        """Delete sent rows older than the retention, except each stream's latest snapshot entry
        and everything after it (what a republication needs). Returns how many were deleted."""
        moment = datetime.now(UTC) if now is None else now
        newer = outbox_table.alias("newer")
        latest_snapshot = (
            select(func.max(newer.c.sequence))
            .where(newer.c.stream == outbox_table.c.stream, newer.c.snapshot)
            .scalar_subquery()
        )

        def work(session: Session) -> int:
            result = session.connection().execute(
                delete(outbox_table).where(
                    and_(
                        outbox_table.c.sent_at.is_not(None),
                        outbox_table.c.sent_at < moment - self.retention,
                        outbox_table.c.sequence < latest_snapshot,
                    )
                )
            )
            return int(result.rowcount or 0)

        count = run_transaction(self.engine, work, what="purging the outbox")
        self.metrics.purged += count
        return count

    def count_unsent(self) -> int:
        def work(session: Session) -> int:
            return int(
                session.connection()
                .execute(
                    select(func.count())
                    .select_from(outbox_table)
                    .where(outbox_table.c.sent_at.is_(None))
                )
                .scalar_one()
            )

        return run_transaction(self.engine, work, what="counting unsent rows", read_only=True)

    # --- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set. Transient failures (broker or database unavailable) are
        retried with bounded exponential back-off, reconnecting each time; nothing is dropped.
        Any other error (an invariant) propagates: stop and look."""
        backoff = self.backoff_initial_s
        last_purge = 0.0
        while not stop.is_set():
            try:
                async with self._clients() as (producer, probe):
                    backoff = self.backoff_initial_s
                    while not stop.is_set():
                        await self._maybe_recover(probe)
                        published = await self.publish_pending(producer)
                        # Counted in the read that loaded the batch, less what was marked: no
                        # transaction of its own. Rows enqueued since were not counted; their
                        # enqueuer woke the relay, so the idle wait below returns at once.
                        self.metrics.lag = max(0, self._unsent_seen - published)
                        if time.monotonic() - last_purge >= self.purge_interval_s:
                            await asyncio.to_thread(self.purge)
                            last_purge = time.monotonic()
                        if self.metrics.lag == 0:
                            await self._idle(stop)
            except TransientError as exc:
                self.metrics.retries += 1
                self.metrics.last_error = f"{exc.reason}: {exc}"
                logger.warning("outbox relay: %s; retrying in %.2f s", exc, backoff)
                # A broker that went away may come back empty: look before publishing again.
                self._check_loss = True
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, self.backoff_max_s)

    async def _idle(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(
                waiters,
                timeout=min(self.poll_interval_s, self.loss_check_interval_s),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wake.clear()

    @contextlib.asynccontextmanager
    async def _clients(self) -> AsyncIterator[tuple[AIOKafkaProducer, AIOKafkaConsumer]]:
        # Each client is created only once the previous one started: a client created and never
        # started is never closed, and aiokafka reports it as leaked.
        producer = create_producer(self.settings)
        with kafka_errors("connect"):
            await start_client(producer)
        try:
            probe = create_consumer(self.settings, group_id=None, topics=())
            with kafka_errors("connect"):
                await start_client(probe)
            try:
                if self.create_topics:
                    with kafka_errors("create topics"):
                        await ensure_topics(self.settings, self.catalogue.all_topics())
                yield producer, probe
            finally:
                await probe.stop()
        finally:
            await producer.stop()

    async def _maybe_recover(self, probe: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        due = self._check_loss or now - getattr(self, "_last_check", 0.0) >= (
            self.loss_check_interval_s
        )
        if self._republish_requested:
            self._republish_requested = False
            await asyncio.to_thread(self.republish_needed)
        if not due:
            return
        self._check_loss = False
        self._last_check = now
        if await self.detect_loss(probe):
            logger.warning("outbox relay: the broker lost records it acknowledged; republishing")
            if self.create_topics:
                with kafka_errors("create topics"):
                    await ensure_topics(self.settings, self.catalogue.all_topics())
            await asyncio.to_thread(self.republish_needed)
            # Counted once the rows are marked for republication: whoever sees the count sees
            # the rows unsent again.
            self.metrics.broker_losses += 1

    async def detect_loss(self, probe: AIOKafkaConsumer) -> bool:
        """True when a topic the relay wrote to is gone, or a partition ends at or before the
        highest offset the broker acknowledged to it."""

        def work(session: Session) -> list[tuple[str, int, int]]:
            rows = (
                session.connection()
                .execute(
                    select(
                        outbox_table.c.topic,
                        outbox_table.c.sent_partition,
                        func.max(outbox_table.c.sent_offset),
                    )
                    .where(outbox_table.c.sent_offset.is_not(None))
                    .group_by(outbox_table.c.topic, outbox_table.c.sent_partition)
                )
                .all()
            )
            return [(str(t), int(p), int(o)) for t, p, o in rows]

        marks = await asyncio.to_thread(
            run_transaction, self.engine, work, what="reading marks", read_only=True
        )
        if not marks:
            return False
        # A broker may acknowledge a record a moment before its end offset (the high watermark)
        # shows it; the embedded broker does. A loss seen once is confirmed by a second look.
        if not await self._looks_lost(probe, marks):
            return False
        await asyncio.sleep(LOSS_RECHECK_S)
        return await self._looks_lost(probe, marks)

    @staticmethod
    async def _looks_lost(probe: AIOKafkaConsumer, marks: list[tuple[str, int, int]]) -> bool:
        with kafka_errors("read topic metadata"):
            # Names and partitions from one fresh fetch (through aiokafka's client: no public
            # call returns both). probe.topics() fetches fresh metadata but returns only the
            # names, and probe.partitions_for_topic() answers from the client's cached metadata,
            # which does not know a topic created after the client started (the relay creates
            # its topics after starting the probe): such a topic would look lost until the
            # cache's next refresh, and be republished for nothing.
            cluster = await probe._client.fetch_all_metadata()
        existing = cluster.topics()
        partitions: list[TopicPartition] = []
        for topic, partition, _ in marks:
            known = cluster.partitions_for_topic(topic) if topic in existing else None
            if not known or partition not in known:
                return True
            partitions.append(TopicPartition(topic, partition))
        with kafka_errors("read end offsets"):
            ends = await probe.end_offsets(partitions)
        return any(
            ends[TopicPartition(topic, partition)] <= offset for topic, partition, offset in marks
        )

    def _load_unsent(self) -> tuple[list[_Row], int]:
        """The next batch of unsent rows, and how many rows were unsent (one snapshot)."""

        def work(session: Session) -> tuple[list[_Row], int]:
            connection = session.connection()
            unsent = connection.execute(
                select(func.count())
                .select_from(outbox_table)
                .where(outbox_table.c.sent_at.is_(None))
            ).scalar_one()
            result = connection.execute(
                select(
                    outbox_table.c.id,
                    outbox_table.c.topic,
                    outbox_table.c.message_key,
                    outbox_table.c.message_value,
                    outbox_table.c.headers,
                )
                .where(outbox_table.c.sent_at.is_(None))
                .order_by(outbox_table.c.id)
                .limit(self.batch_rows)
            )
            rows: list[_Row] = []
            size = 0
            for row_id, topic, key, value, headers in result:
                row = _Row(int(row_id), topic, bytes(key), bytes(value), decode_headers(headers))
                if rows and size + row.size > self.batch_bytes:
                    break
                rows.append(row)
                size += row.size
            return rows, int(unsent)

        return run_transaction(self.engine, work, what="reading unsent rows", read_only=True)

    def _mark_sent(self, acked: Sequence[_Acked]) -> None:
        moment = datetime.now(UTC)

        def work(session: Session) -> None:
            # One statement with a parameter set per row: a batch is marked in one round trip
            # (executemany), inside a transaction that holds the write lock as briefly as it can.
            session.connection().execute(
                update(outbox_table)
                .where(outbox_table.c.id == bindparam("b_id"))
                .values(
                    sent_at=moment,
                    sent_partition=bindparam("b_partition"),
                    sent_offset=bindparam("b_offset"),
                    publish_count=outbox_table.c.publish_count + 1,
                ),
                [
                    {"b_id": item.id, "b_partition": item.partition, "b_offset": item.offset}
                    for item in acked
                ],
            )

        run_transaction(self.engine, work, what="marking rows sent")

    async def publish_pending(self, producer: AIOKafkaProducer) -> int:
        """One pass: publish up to one batch of unsent rows in id order, wait for every
        acknowledgement in order, mark the acknowledged ones sent. Returns how many were marked.
        A failed send marks the rows acknowledged before it and raises (the rest stay unsent)."""
        rows, self._unsent_seen = await asyncio.to_thread(self._load_unsent)
        if not rows:
            return 0
        futures: list[asyncio.Future[Any]] = []
        acked: list[_Acked] = []
        failure: BaseException | None = None
        try:
            # Sends are pipelined; the producer keeps one partition's batches in order.
            with kafka_errors("publish outbox rows"):
                for row in rows:
                    future = await producer.send(
                        row.topic, row.value, key=row.key, headers=list(row.headers)
                    )
                    futures.append(future)
            for row, future in zip(rows, futures, strict=False):
                with kafka_errors(f"publish to {row.topic}"):
                    metadata = await future
                acked.append(_Acked(row.id, int(metadata.partition), int(metadata.offset)))
        except BrokerUnavailable as exc:
            failure = exc
        finally:
            for future in futures[len(acked) :]:
                future.cancel()
        if acked:
            await asyncio.to_thread(self._mark_sent, acked)
            self.metrics.published += len(acked)
        if failure is not None:
            raise failure
        return len(acked)


async def _sleep_unless(stop: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
