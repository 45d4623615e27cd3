"""The consumer base: at-least-once delivery from Kafka, exactly-once effect in the database.

A subclass implements :meth:`ConsumerBase.apply` (its effect, written through the session it is
given) and may override :meth:`ConsumerBase.rejected` (what a refusal does besides the dead
letter, written in the dead letter's transaction). Both may return an *after-commit* callable: the
base calls it once that transaction committed, and never when it failed, which is how a service
changes an in-memory model only after the database holds the change (plan, persist, commit,
apply). The base:

* decodes every record strictly (bridge/envelope.py); a record that does not decode, a chunk set
  that conflicts, or an ``apply`` that raises :class:`~attestations.errors.CounterpartyError` is a
  *poison message*: it is published to the dead-letter topic with the reason, its place and its
  original bytes, and only then does the partition move on (the dead letter is recorded in the
  same transaction as the offset advance; if the dead-letter publication fails, nothing advances);
* collects a statement's disclosure chunks (bridge/chunks.py) and calls ``apply`` once, with the
  statement and its *complete* disclosure together; an incomplete set is never applied, and the
  statement waits (bounded by ``max_pending_statements``) until it is complete. Only a set whose
  entry was applied keeps swallowing copies of its chunks: when ``apply`` refuses the entry, or
  its statement is gone, the set is forgotten, so the entry delivered again is reassembled;
* stores its progress in the *same* transaction as the effect: per stream the last applied
  sequence (``consumer_stream_progress``), per (topic, partition) the last offset handled and a
  fingerprint of the record there (``consumer_progress``). The stream sequence is the truth: a
  record whose sequence is not above the stored one is a duplicate and has no effect (a
  subclass that keeps the digests it accepted lets a *different* statement at such a sequence
  through :meth:`ConsumerBase.is_applied`, to be refused as the fork it is). Kafka
  offsets are only a position hint, committed to the group after the database commit;
* on assignment seeks to the stored offset and checks that the record there is the one it read
  (fingerprint). A broker that lost its data restarts offsets at 0: when the log ends before the
  stored offset, or another record sits there, the consumer reads the partition from the
  beginning and relies on the sequence to skip what it already applied. Nothing stalls, nothing
  is skipped;
* retries a :class:`~attestations.errors.TransientError` (database or broker unavailable, also
  from ``apply`` or ``rejected``) with bounded exponential back-off, without advancing;
* holds ``effect_lock``, when given, from the start of each transaction that calls ``apply`` or
  ``rejected`` until its after-commit callable returned: a service whose consumers, timers and API
  all plan changes against one in-memory model passes one lock to all of them, so no change is
  planned against a model another change is about to replace.

An :class:`~attestations.errors.InvariantViolation` (a bug on our side) stops the consumer, and so
does any exception raised by an after-commit callable (the database is then ahead of memory; a
restart rebuilds memory from the database).

What it does not do: verify statements (the subclass calls attestations.verify inside ``apply``
and raises its CounterpartyError), or decide what a refusal means (a subclass that sees a gap
raises SequenceGap from ``apply``; the statement is dead-lettered, and its ``rejected`` asks for a
snapshot in the same transaction).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from attestations.disclosure import LeafDisclosure
from attestations.errors import (
    ConfigurationError,
    CounterpartyError,
    InvariantViolation,
    TransientError,
)
from attestations.statement import SignedStatement
from bridge.chunks import Reassembler, ReassemblyLimits, SetKey, decode_disclosure
from bridge.envelope import DecodedMessage, DisclosureChunk, decode_message, encode_dead_letter
from bridge.errors import BrokerUnavailable
from bridge.kafka import (
    KafkaSettings,
    create_consumer,
    create_producer,
    kafka_errors,
    publish,
)
from bridge.kafka import start_client as start_kafka_client
from bridge.outbox import (
    UtcDateTime,
    check_schema,
    metadata,
    row_id_type,
    run_transaction,
)
from bridge.topics import DEFAULT_CATALOGUE, TopicCatalogue, compute_stream_key

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_STATEMENTS: Final = 16
DEFAULT_BACKOFF_INITIAL_S: Final = 0.05
DEFAULT_BACKOFF_MAX_S: Final = 5.0
DEFAULT_POSITION_CHECK_INTERVAL_S: Final = 30.0
DEFAULT_FETCH_TIMEOUT_MS: Final = 100

AfterCommit = Callable[[], None]
"""What ``apply`` or ``rejected`` may return: run once, after their transaction committed."""

progress_table: Final = Table(
    "consumer_progress",
    metadata,
    Column("consumer", String(200), primary_key=True),
    Column("topic", String(249), primary_key=True),
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("last_offset", BigInteger, nullable=False),
    Column("last_fingerprint", String(64), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

stream_progress_table: Final = Table(
    "consumer_stream_progress",
    metadata,
    Column("consumer", String(200), primary_key=True),
    Column("stream", String(300), primary_key=True),
    Column("last_sequence", BigInteger, nullable=False),
    Column("statement_digest", String(64), nullable=True),
    Column("updated_at", UtcDateTime, nullable=False),
)

dead_letters_table: Final = Table(
    "consumer_dead_letters",
    metadata,
    Column("id", row_id_type(), primary_key=True, autoincrement=True),
    Column("consumer", String(200), nullable=False),
    Column("topic", String(249), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("error", Text, nullable=False),
    Column("dead_letter_topic", String(249), nullable=False),
    Column("dead_letter_partition", Integer, nullable=False),
    Column("dead_letter_offset", BigInteger, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
    Index("ix_consumer_dead_letters_source", "consumer", "topic", "partition", "offset"),
    sqlite_autoincrement=True,
)


def compute_record_fingerprint(key: bytes | None, value: bytes | None) -> str:
    """SHA-256 over the length-prefixed key and the value: the same record republished after a
    broker lost its log has the same fingerprint, another record at that offset does not."""
    key_bytes = key or b""
    digest = hashlib.sha256(len(key_bytes).to_bytes(4, "big") + key_bytes)
    digest.update(value or b"")
    return digest.hexdigest()


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """What :meth:`ConsumerBase.apply` receives. For a statement, ``disclosure`` is its complete,
    digest-checked leaf disclosure; ``topic``/``partition``/``offset`` are those of the record
    that completed it (the last chunk). ``stream`` and ``sequence`` are None for messages that
    carry no stream sequence (a snapshot request), which are deduplicated by offset only, so
    their ``apply`` must be idempotent. ``chunk_set`` names the chunk set the disclosure was
    reassembled from (None without a disclosure): refused, the set is forgotten so a redelivery
    of the entry completes again."""

    message: DecodedMessage
    disclosure: LeafDisclosure | None
    stream: str | None
    sequence: int | None
    topic: str
    partition: int
    offset: int
    chunk_set: SetKey | None = None

    @property
    def statement(self) -> SignedStatement:
        body = self.message.body
        if not isinstance(body, SignedStatement):
            raise TypeError(f"{self.message.envelope.type.value} is not a statement")
        return body


@dataclass(slots=True)
class ConsumerMetrics:
    """Counters since the consumer was created."""

    applied: int = 0
    duplicates: int = 0
    """Records skipped because their stream sequence was already applied."""
    dead_letters: int = 0
    retries: int = 0
    """Transient failures retried after a back-off (apply, database, broker)."""
    offset_resets: int = 0
    """Partitions read again from the beginning (log shorter than, or different at, the stored
    offset)."""
    evicted: int = 0
    """Statements or chunk sets dropped incomplete (limits or orphans); never applied."""


@dataclass(slots=True)
class _Pending:
    message: DecodedMessage
    record: ConsumerRecord[bytes, bytes]
    tp: TopicPartition


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: ConsumerBase, consumer: AIOKafkaConsumer) -> None:
        self._owner = owner
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._owner.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._owner.position(self._consumer, list(assigned))


# --- the base -----------------------------------------------------------------------------------


@dataclass
class ConsumerBase(abc.ABC):
    """Reads ``topics`` and applies each message once. ``name`` identifies the consumer's progress
    in the database (and is the group id when ``group_id`` is not given and ``use_group``).
    Without a group the consumer assigns itself every partition of its topics."""

    engine: Engine
    settings: KafkaSettings
    name: str
    topics: Sequence[str]
    source: str
    """``ce_source`` of the dead letters this consumer writes, e.g. ``/exchanges/x/consumer``."""
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE
    use_group: bool = False
    group_id: str | None = None
    reassembly_limits: ReassemblyLimits = field(default_factory=ReassemblyLimits)
    max_pending_statements: int = DEFAULT_MAX_PENDING_STATEMENTS
    require_disclosure: bool = True
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    position_check_interval_s: float = DEFAULT_POSITION_CHECK_INTERVAL_S
    effect_lock: AbstractContextManager[object] | None = None
    """Held around each effect transaction and its after-commit callable (a ``threading.Lock``
    shared by everything that changes the same in-memory model); None: no lock."""
    metrics: ConsumerMetrics = field(default_factory=ConsumerMetrics)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200:
            raise ConfigurationError("a consumer needs a name of 1..200 characters")
        if isinstance(self.topics, str) or not self.topics:
            raise ConfigurationError("topics is a non-empty sequence of topic names")
        if self.max_pending_statements < 1:
            raise ConfigurationError("max_pending_statements must be positive")
        check_schema(self.engine)
        self._reassembler = Reassembler(self.reassembly_limits)
        # (stream, sequence, statement digest) -> the statement waiting for its disclosure.
        self._pending: OrderedDict[tuple[str, int, bytes], _Pending] = OrderedDict()
        # Partitions whose first record read must be the one stored (offset and fingerprint).
        self._verify: dict[TopicPartition, tuple[int, str]] = {}
        self._assigned: set[TopicPartition] = set()

    @abc.abstractmethod
    def apply(self, session: Session, delivery: Delivery) -> AfterCommit | None:
        """The effect of one message, written through ``session`` (do not commit). Raise a
        CounterpartyError to dead-letter the message, a TransientError to have it retried.

        May return a callable, run once after the transaction committed (never if it failed or
        was retried: a retry calls ``apply`` again and runs what that call returns)."""

    def rejected(
        self, session: Session, delivery: Delivery | None, error: CounterpartyError
    ) -> AfterCommit | None:
        """What refusing a message does besides the dead letter, written through ``session``
        *inside* the transaction that records the dead letter and advances the offset (so, for
        example, freezing a stream or asking for a snapshot commits exactly when the refusal
        does). ``delivery`` is what ``apply`` refused with ``error``, or None when the record
        did not even decode (``error`` then says why). Must not raise a CounterpartyError; a
        TransientError is retried (the dead letter may then be published twice). May return an
        after-commit callable, like ``apply``. Does nothing by default."""
        del session, delivery, error
        return None

    # --- progress -------------------------------------------------------------------------------

    def stored_sequence(self, stream: str) -> int | None:
        def work(session: Session) -> int | None:
            return _load_sequence(session, consumer=self.name, stream=stream, lock=False)

        return run_transaction(self.engine, work, what="reading stream progress")

    def stored_offsets(self) -> dict[TopicPartition, tuple[int, str]]:
        def work(session: Session) -> dict[TopicPartition, tuple[int, str]]:
            rows = session.connection().execute(
                select(
                    progress_table.c.topic,
                    progress_table.c.partition,
                    progress_table.c.last_offset,
                    progress_table.c.last_fingerprint,
                ).where(progress_table.c.consumer == self.name)
            )
            return {
                TopicPartition(topic, int(partition)): (int(offset), str(fingerprint))
                for topic, partition, offset, fingerprint in rows
            }

        return run_transaction(self.engine, work, what="reading offsets")

    @property
    def assigned(self) -> frozenset[TopicPartition]:
        """The partitions this instance reads now (given by the group, or all without one)."""
        return frozenset(self._assigned)

    def forget(self, revoked: set[TopicPartition]) -> None:
        """Drop what is buffered for partitions no longer ours (a rebalance took them)."""
        self._assigned -= revoked
        for key in [k for k, p in self._pending.items() if p.tp in revoked]:
            del self._pending[key]
        for tp in revoked:
            self._verify.pop(tp, None)

    async def position(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Seek each partition to its stored offset, to be verified on the first read; read
        from the beginning when nothing is stored or the log ends before the stored offset."""
        self._assigned |= set(partitions)
        stored = await asyncio.to_thread(self.stored_offsets)
        if not partitions:
            return
        with kafka_errors("read end offsets"):
            ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            mark = stored.get(tp)
            if mark is None:
                await consumer.seek_to_beginning(tp)
                continue
            offset, fingerprint = mark
            if ends[tp] <= offset:
                # The log is shorter than what we read: the broker lost it.
                self.metrics.offset_resets += 1
                logger.warning(
                    "%s: %s ends at %d, before the stored %d; reading from the start",
                    self.name,
                    tp,
                    ends[tp],
                    offset,
                )
                await consumer.seek_to_beginning(tp)
                continue
            self._verify[tp] = (offset, fingerprint)
            consumer.seek(tp, offset)

    # --- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, reconnecting after transient failures."""
        backoff = self.backoff_initial_s
        while not stop.is_set():
            try:
                async with self._clients() as (consumer, producer):
                    backoff = self.backoff_initial_s
                    last_check = time.monotonic()
                    while not stop.is_set():
                        with kafka_errors("fetch records"):
                            batch = await consumer.getmany(timeout_ms=DEFAULT_FETCH_TIMEOUT_MS)
                        for tp, records in batch.items():
                            await self._handle_partition(consumer, producer, tp, records, stop)
                        if time.monotonic() - last_check >= self.position_check_interval_s:
                            # Re-verify the stored position: catches a broker that lost its log
                            # and was refilled while we were reading.
                            await self.position(consumer, sorted(self._assigned))
                            last_check = time.monotonic()
            except TransientError as exc:
                self.metrics.retries += 1
                logger.warning("%s: %s; retrying in %.2f s", self.name, exc, backoff)
                self._reset_buffers()
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, self.backoff_max_s)

    def _reset_buffers(self) -> None:
        self._reassembler = Reassembler(self.reassembly_limits)
        self._pending.clear()
        self._verify.clear()
        self._assigned.clear()

    @contextlib.asynccontextmanager
    async def _clients(self) -> AsyncIterator[tuple[AIOKafkaConsumer, AIOKafkaProducer]]:
        group = (self.group_id or self.name) if self.use_group else None
        # Each client is created only once the previous one started: a client created and never
        # started is never closed, and aiokafka reports it as leaked.
        producer = create_producer(self.settings)
        with kafka_errors("connect"):
            await start_kafka_client(producer)
        try:
            consumer = create_consumer(self.settings, group_id=group, topics=())
            with kafka_errors("connect"):
                await start_kafka_client(consumer)
            self._consumer: AIOKafkaConsumer | None = consumer
            try:
                if group is not None:
                    consumer.subscribe(topics=list(self.topics), listener=_Listener(self, consumer))
                else:
                    await self._assign_all(consumer)
                yield consumer, producer
            finally:
                self._consumer = None
                await consumer.stop()
        finally:
            await producer.stop()

    async def _assign_all(self, consumer: AIOKafkaConsumer) -> None:
        with kafka_errors("read topic metadata"):
            await consumer.topics()
        partitions: list[TopicPartition] = []
        for topic in self.topics:
            known = consumer.partitions_for_topic(topic)
            if not known:
                raise BrokerUnavailable(f"topic {topic} does not exist (yet)")
            partitions += [TopicPartition(topic, p) for p in sorted(known)]
        consumer.assign(partitions)
        await self.position(consumer, partitions)

    async def _handle_partition(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        stop: asyncio.Event,
    ) -> None:
        for record in records:
            if stop.is_set() or tp not in self._assigned:
                return
            check = self._verify.pop(tp, None)
            if check is not None:
                offset, fingerprint = check
                if record.offset == offset and fingerprint == compute_record_fingerprint(
                    record.key, record.value
                ):
                    continue  # the record we stored: resume right after it
                self.metrics.offset_resets += 1
                logger.warning(
                    "%s: %s holds another record at %d; reading from the start",
                    self.name,
                    tp,
                    offset,
                )
                await consumer.seek_to_beginning(tp)
                return  # the rest of this batch is from the old position
            await self._handle(producer, tp, record, stop)

    async def _handle(
        self,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        stop: asyncio.Event,
    ) -> None:
        headers = [(name, value) for name, value in record.headers]
        try:
            decoded = decode_message(
                record.topic, record.key, record.value, headers, catalogue=self.catalogue
            )
            collected = self._collect(decoded, record, tp)
        except CounterpartyError as exc:
            await self._dead_letter(producer, tp, record, exc)
            return
        if collected is None:
            return
        delivery, origin = collected
        await self._deliver(
            producer, tp, record=record, delivery=delivery, origin=origin, stop=stop
        )

    def _collect(
        self, decoded: DecodedMessage, record: ConsumerRecord[bytes, bytes], tp: TopicPartition
    ) -> tuple[Delivery, ConsumerRecord[bytes, bytes]] | None:
        """The delivery this record completes and the record to dead-letter if ``apply`` refuses
        it (the statement's for an entry), or None (buffered, duplicate or orphan)."""
        body = decoded.body
        if isinstance(body, SignedStatement):
            return self._collect_statement(decoded, body, record, tp)
        if isinstance(body, DisclosureChunk):
            return self._collect_chunk(body, record)
        return self._delivery(decoded, None, None, None, record), record

    def _collect_statement(
        self,
        decoded: DecodedMessage,
        body: SignedStatement,
        record: ConsumerRecord[bytes, bytes],
        tp: TopicPartition,
    ) -> tuple[Delivery, ConsumerRecord[bytes, bytes]] | None:
        statement = body.statement
        stream = compute_stream_key(custodian=statement.custodian, exchange=statement.exchange)
        if self._is_applied(stream, statement.sequence, body.digest):
            return None
        if not self.require_disclosure:
            return self._delivery(decoded, None, stream, statement.sequence, record), record
        key = (stream, statement.sequence, body.digest)
        if key not in self._pending:
            while len(self._pending) >= self.max_pending_statements:
                old_key, _ = self._pending.popitem(last=False)
                self.metrics.evicted += 1
                logger.warning(
                    "%s: dropped %s #%d waiting for its disclosure", self.name, *old_key[:2]
                )
            self._pending[key] = _Pending(decoded, record, tp)
        return None

    def _collect_chunk(
        self, body: DisclosureChunk, record: ConsumerRecord[bytes, bytes]
    ) -> tuple[Delivery, ConsumerRecord[bytes, bytes]] | None:
        if self._is_applied(body.stream, body.sequence, body.statement_digest):
            return None
        completed = self._reassembler.add(body, now_s=time.monotonic())
        self.metrics.evicted += len(self._reassembler.take_evictions())
        if completed is None:
            return None
        chunk_set: SetKey = (body.stream, body.sequence, body.payload_digest, body.count)
        disclosure = decode_disclosure(completed)
        pending = self._pending.pop((body.stream, body.sequence, completed.statement_digest), None)
        if pending is None:
            # The statement was dropped or never read: an incomplete entry is never applied.
            # Forget the set, so the entry delivered again (statement and chunks) completes.
            self._reassembler.forget_completed(chunk_set)
            self.metrics.evicted += 1
            return None
        delivery = self._delivery(
            pending.message, disclosure, body.stream, body.sequence, record, chunk_set=chunk_set
        )
        return delivery, pending.record

    def _delivery(
        self,
        message: DecodedMessage,
        disclosure: LeafDisclosure | None,
        stream: str | None,
        sequence: int | None,
        record: ConsumerRecord[bytes, bytes],
        *,
        chunk_set: SetKey | None = None,
    ) -> Delivery:
        return Delivery(
            message=message,
            disclosure=disclosure,
            stream=stream,
            sequence=sequence,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            chunk_set=chunk_set,
        )

    def is_applied(
        self, stream: str, sequence: int, digest: bytes | None, *, stored_sequence: int
    ) -> bool:
        """Whether the statement ``digest`` at ``sequence`` of ``stream`` is one this consumer
        applied already (a redelivery, dropped without effect), given the last sequence it
        stored for the stream. By default every sequence up to the stored one is: the sequence
        is the truth. A receiver that remembers the digests it accepted overrides this so that a
        *different* statement at an applied sequence - a fork - still reaches :meth:`apply`,
        which refuses it (and :meth:`rejected` freezes the stream). ``digest`` is None when the
        delivery carries no statement digest."""
        del stream, digest
        return sequence <= stored_sequence

    def _is_applied(self, stream: str, sequence: int, digest: bytes | None) -> bool:
        # Cached per stream between commits would be faster; a read keeps several consumer
        # instances (during a rebalance) correct.
        stored = self.stored_sequence(stream)
        if stored is not None and self.is_applied(stream, sequence, digest, stored_sequence=stored):
            self.metrics.duplicates += 1
            return True
        return False

    def _committable(self, tp: TopicPartition, offset: int) -> int:
        """The offset that may be stored for ``tp``: just before its oldest buffered statement,
        so that a restart reads that statement again."""
        waiting = [int(p.record.offset) for p in self._pending.values() if p.tp == tp]
        return min([offset, *[w - 1 for w in waiting]])

    async def _deliver(
        self,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        *,
        record: ConsumerRecord[bytes, bytes],
        delivery: Delivery,
        origin: ConsumerRecord[bytes, bytes],
        stop: asyncio.Event,
    ) -> None:
        backoff = self.backoff_initial_s
        while not stop.is_set():
            try:
                applied = await asyncio.to_thread(self._apply_in_transaction, tp, record, delivery)
            except CounterpartyError as exc:
                # Dead-letter the record the subclass refused (the statement, for an entry) and
                # advance past the record that completed it.
                await self._dead_letter(
                    producer, tp, origin, exc, progress_record=record, delivery=delivery
                )
                if delivery.chunk_set is not None:
                    # Refused, not applied: the same entry delivered again (after a fork was
                    # resolved, say) must reassemble again rather than wait for ever for chunks
                    # the reassembler would ignore as copies of a set it returned.
                    self._reassembler.forget_completed(delivery.chunk_set)
                return
            except TransientError as exc:
                self.metrics.retries += 1
                logger.warning(
                    "%s: applying %s/%d: %s; retrying in %.2f s",
                    self.name,
                    delivery.topic,
                    delivery.offset,
                    exc,
                    backoff,
                )
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            if applied:
                self.metrics.applied += 1
            else:
                self.metrics.duplicates += 1
            await self._commit_hint(tp, record.offset)
            return

    def _apply_in_transaction(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], delivery: Delivery
    ) -> bool:
        committable = self._committable(tp, record.offset)

        def work(session: Session) -> tuple[bool, AfterCommit | None]:
            after: AfterCommit | None
            if delivery.stream is not None and delivery.sequence is not None:
                body = delivery.message.body
                digest = body.digest if isinstance(body, SignedStatement) else None
                stored = _load_sequence(
                    session, consumer=self.name, stream=delivery.stream, lock=True
                )
                if stored is not None and self.is_applied(
                    delivery.stream, delivery.sequence, digest, stored_sequence=stored
                ):
                    return False, None
                after = self.apply(session, delivery)
                if stored is not None and delivery.sequence <= stored:
                    # is_applied let an old sequence through so apply could refuse it (a fork);
                    # accepting it would move the stream's progress backwards.
                    raise InvariantViolation(
                        f"{delivery.stream}: apply accepted sequence {delivery.sequence} at or "
                        f"below the stored {stored}"
                    )
                _upsert(
                    session,
                    stream_progress_table,
                    keys={"consumer": self.name, "stream": delivery.stream},
                    values={
                        "last_sequence": delivery.sequence,
                        "statement_digest": None if digest is None else digest.hex(),
                        "updated_at": datetime.now(UTC),
                    },
                )
            else:
                after = self.apply(session, delivery)
            self._store_offset(session, tp, committable, record)
            return True, after

        with self._effect_lock():
            applied, after = run_transaction(
                self.engine, work, what=f"applying {tp.topic}/{record.offset}"
            )
            if after is not None:
                after()
        return applied

    def _effect_lock(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext() if self.effect_lock is None else self.effect_lock

    def _store_offset(
        self,
        session: Session,
        tp: TopicPartition,
        offset: int,
        record: ConsumerRecord[bytes, bytes],
    ) -> None:
        if offset < 0:
            return
        if offset == record.offset:
            fingerprint = compute_record_fingerprint(record.key, record.value)
        else:
            # Held back before a buffered statement: the record at that offset is not at hand;
            # an empty fingerprint never matches, so a restart re-reads from the beginning.
            fingerprint = ""
        _upsert(
            session,
            progress_table,
            keys={"consumer": self.name, "topic": tp.topic, "partition": tp.partition},
            values={
                "last_offset": offset,
                "last_fingerprint": fingerprint,
                "updated_at": datetime.now(UTC),
            },
        )

    async def _dead_letter(
        self,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        error: CounterpartyError,
        *,
        progress_record: ConsumerRecord[bytes, bytes] | None = None,
        delivery: Delivery | None = None,
    ) -> None:
        """Publish ``record`` as a dead letter, then record it, let :meth:`rejected` write its
        effect and advance the offset in one transaction, and run the after-commit callable
        ``rejected`` returned. A failed publication raises BrokerUnavailable: nothing
        advances."""
        advance = progress_record or record
        fingerprint = compute_record_fingerprint(record.key, record.value)
        if await asyncio.to_thread(self._is_dead_lettered, record, fingerprint):
            return
        letter = encode_dead_letter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            headers=[(name, value) for name, value in record.headers],
            error=error,
            source=self.source,
            at=_now_ms(),
            catalogue=self.catalogue,
        )
        with kafka_errors(f"publish a dead letter to {letter.topic}"):
            partition, offset = await publish(
                producer, letter.topic, letter.value, key=letter.key, headers=letter.headers
            )
        logger.warning(
            "%s: dead-lettered %s/%d/%d (%s): %s",
            self.name,
            record.topic,
            record.partition,
            record.offset,
            error.reason,
            error,
        )
        committable = self._committable(tp, advance.offset)

        def work(session: Session) -> AfterCommit | None:
            session.connection().execute(
                insert(dead_letters_table).values(
                    consumer=self.name,
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    fingerprint=fingerprint,
                    reason=error.reason,
                    error=str(error)[:1000],
                    dead_letter_topic=letter.topic,
                    dead_letter_partition=partition,
                    dead_letter_offset=offset,
                    recorded_at=datetime.now(UTC),
                )
            )
            after = self.rejected(session, delivery, error)
            self._store_offset(session, tp, committable, advance)
            return after

        def record_and_follow_up() -> None:
            with self._effect_lock():
                after = run_transaction(self.engine, work, what="recording a dead letter")
                if after is not None:
                    after()

        await asyncio.to_thread(record_and_follow_up)
        self.metrics.dead_letters += 1

    def _is_dead_lettered(self, record: ConsumerRecord[bytes, bytes], fingerprint: str) -> bool:
        def work(session: Session) -> bool:
            found = session.connection().execute(
                select(dead_letters_table.c.id).where(
                    dead_letters_table.c.consumer == self.name,
                    dead_letters_table.c.topic == record.topic,
                    dead_letters_table.c.partition == record.partition,
                    dead_letters_table.c.offset == record.offset,
                    dead_letters_table.c.fingerprint == fingerprint,
                )
            )
            return found.first() is not None

        return run_transaction(self.engine, work, what="looking up dead letters")

    async def _commit_hint(self, tp: TopicPartition, offset: int) -> None:
        """Offsets in the group are only a hint (the database is the truth): failures are
        ignored, and nothing is committed without a group."""
        if not self.use_group:
            return
        consumer = getattr(self, "_consumer", None)
        if consumer is None:
            return
        with contextlib.suppress(Exception):
            await consumer.commit({tp: offset + 1})


def _load_sequence(session: Session, *, consumer: str, stream: str, lock: bool) -> int | None:
    query = select(stream_progress_table.c.last_sequence).where(
        stream_progress_table.c.consumer == consumer,
        stream_progress_table.c.stream == stream,
    )
    if lock and session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    value = session.connection().execute(query).scalar_one_or_none()
    return None if value is None else int(value)


def _upsert(
    session: Session, table: Table, *, keys: dict[str, Any], values: dict[str, Any]
) -> None:
    dialect = session.get_bind().dialect.name
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = builder(table).values(**keys, **values)
    session.connection().execute(
        statement.on_conflict_do_update(index_elements=list(keys), set_=values)
    )


def _now_ms() -> datetime:
    """Now, cut to whole milliseconds (the wire's ``ce_time`` precision)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


async def _sleep_unless(stop: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
