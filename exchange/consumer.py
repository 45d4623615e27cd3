"""The exchange's attestation consumer: verify each statement, then credit it, in one transaction.

:class:`AttestationConsumer` is a :class:`bridge.consumer.ConsumerBase` on the attestations topic
for one exchange and the custodians it takes statements from. For each complete entry (a
statement and its whole leaf disclosure) :meth:`~AttestationConsumer.apply`:

1. refuses a stream that is not one of its own (``wrong_stream``) or is frozen after a fork
   (``stream_frozen``);
2. verifies the statement completely (:func:`attestations.verify.verify_statement`) against the
   stream's chain head, digest history and receiver trees; while the stream awaits the snapshot it
   asked for after a gap, a snapshot at or above the missing sequence is accepted as a
   resynchronisation;
3. works out what the statement credits (:func:`compute_credited_statement`: the holdings its
   disclosure sets or clears, the complete set for a snapshot) and lets the ledger plan it;
4. writes the receiver state (:func:`exchange.store.persist_statement`), the ledger change
   (:func:`exchange.store.persist_change`) and the change's notices
   (:meth:`~AttestationConsumer.publish_notices`) through the consumer's session: they commit
   with the consumer's progress, or not at all;
5. returns the after-commit step: apply the trees plan and the ledger change in memory.

Several instances of one consumer group may share the database (a rebalance hands a partition
from one to another). An instance reloads the ledger and the receiver state from the database
whenever partitions are assigned to it (:meth:`~AttestationConsumer.position`), and every
transaction that plans against a stream first reads the stream's stored status (locked until the
commit) and compares it with memory: when another writer moved it, the instance reloads and the
base retries (:class:`StaleStreamState`, transient) instead of persisting a plan made against
an old head. The store refuses a head that would go backwards in any case.

A refused statement is dead-lettered by the base; :meth:`~AttestationConsumer.rejected` adds, in
the dead letter's transaction: for a fork, the stream's freeze, an alert row and an error log;
for a sequence gap (unless the stream already awaits a snapshot), the mark "awaiting snapshot" and
a snapshot request in the exchange's outbox (``instructions`` topic). Other refusals change
nothing but the dead letter.

What it does not do: sign or publish notices (:meth:`~AttestationConsumer.publish_notices` stores
them; the service replaces it with signed margin calls in the outbox), evaluate deadlines on a
timer, take exposures, or run the outbox relay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from attestations.canonical import truncate_to_millis
from attestations.disclosure import LeafDisclosure, ReceiverTrees
from attestations.errors import (
    ConfigurationError,
    CounterpartyError,
    ForkDetected,
    InvariantViolation,
    SequenceGap,
    TransientError,
    WrongStream,
)
from attestations.keys import KeyRegistry
from attestations.statement import PricePoint, StatementKind
from attestations.verify import VerificationPolicy, VerifiedStatement, verify_statement
from bridge.consumer import AfterCommit, ConsumerBase, Delivery
from bridge.envelope import DEFAULT_BUDGET_BYTES, SnapshotRequest, encode_snapshot_request
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay, call_on_loop, enqueue
from bridge.topics import (
    DEFAULT_CATALOGUE,
    TopicCatalogue,
    TopicKind,
    compute_stream_key,
    parse_stream_key,
)
from exchange.desk import MarginDesk
from exchange.errors import StreamFrozen
from exchange.ledger import (
    CreditedStatement,
    Holding,
    LedgerChange,
    MarginLedger,
    StreamHead,
    StreamStatus,
)
from exchange.policy import CollateralPolicy
from exchange.store import (
    StoredStream,
    check_schema,
    load_ledger,
    load_stream_status,
    migrate,
    persist_change,
    persist_notices,
    persist_statement,
    record_alert,
)

logger = logging.getLogger(__name__)

FORK_ALERT: Final = "fork"
SNAPSHOT_REQUEST_REASON: Final = "sequence_gap"


class StaleStreamState(TransientError):
    """The stream's stored status (head, freeze, awaited snapshot) is not the one this instance
    planned against: another instance of the consumer group, or a tool, committed since. The
    consumer reloaded the ledger from the database; retrying plans against the stored state."""

    reason = "stale_stream_state"


def _utc_now() -> datetime:
    # Whole milliseconds, as every signed time: the verifier refuses a finer ``now``.
    return truncate_to_millis(datetime.now(UTC))


def _plan_key(status: StreamStatus | None) -> tuple[int | None, bytes | None, bool, int | None]:
    """What a plan for a stream depends on: its head, whether it is frozen, the snapshot it
    awaits (no status at all is the same as a stream with no head, not frozen)."""
    if status is None:
        return None, None, False, None
    head = status.head
    return (
        None if head is None else head.sequence,
        None if head is None else head.digest,
        status.frozen,
        status.awaiting_snapshot_from,
    )


def _describe(status: StreamStatus | None) -> str:
    sequence, _, frozen, awaiting = _plan_key(status)
    return f"head {sequence}, frozen {frozen}, awaiting {awaiting}"


def _awaited(awaiting: int | None, stored: StoredStream) -> int | None:
    """The sequence a resynchronising snapshot must reach: the one asked for, or just after
    the head when statements that linked to it arrived after the request (a late delivery)."""
    if awaiting is None or stored.head is None:
        return awaiting
    return max(awaiting, stored.head.sequence + 1)


# --- what a statement credits (pure) ------------------------------------------------------------


def compute_credited_statement(
    verified: VerifiedStatement,
    disclosure: LeafDisclosure,
    *,
    receiver: ReceiverTrees,
    quote: str,
) -> CreditedStatement:
    """What ``verified`` (checked against ``receiver``, whose trees are still those of the
    previous statement) credits: for a snapshot every disclosed holding; for a delta the holdings
    its set leaves give a new quantity, and those whose slot it empties or hands to another
    account (quantity 0 unless the account is set again elsewhere in the same delta). Prices are
    the statement's in ``quote`` (the ledger ignores the others)."""
    statement = verified.statement
    changed: dict[Holding, int] = {}
    if statement.kind is StatementKind.DELTA:
        # Holdings leaving a slot first; a set leaf below restores an account that moved.
        for slot in disclosure.clear:
            owner = receiver.account_at(slot.asset, slot.position)
            if owner is not None:
                changed[owner, slot.asset] = 0
        for leaf in disclosure.set_leaves:
            owner = receiver.account_at(leaf.asset, leaf.position)
            if owner is not None and owner != leaf.account:
                changed.setdefault((owner, leaf.asset), 0)
    for leaf in disclosure.set_leaves:
        changed[leaf.account, leaf.asset] = leaf.quantity
    points = sorted(
        (p for p in statement.prices if p.price.quote == quote), key=lambda p: p.observed_at
    )
    stream = compute_stream_key(custodian=statement.custodian, exchange=statement.exchange)
    head = StreamHead(
        stream=stream,
        custodian=statement.custodian,
        sequence=statement.sequence,
        digest=verified.digest,
        kind=statement.kind.value,
        issued_at=statement.issued_at,
        expires_at=statement.expires_at,
    )
    return CreditedStatement(
        stream=stream,
        custodian=statement.custodian,
        head=head,
        changed=changed,
        snapshot=statement.kind is StatementKind.SNAPSHOT,
        prices={point.price.asset: point.price for point in points},
    )


# --- the consumer -------------------------------------------------------------------------------


@dataclass(slots=True)
class AttestationMetrics:
    """Counters since the consumer was created (exported by the service)."""

    credited: int = 0
    """Statements verified, credited and committed."""
    resynchronised: int = 0
    """Snapshots accepted without linking to the head (after a gap)."""
    forks: int = 0
    """Streams frozen after a fork."""
    snapshot_requests: int = 0
    notices: int = 0
    reloads: int = 0
    """Ledger and receiver state reloaded from the database: on a partition assignment, and
    when a transaction found the stream's stored status ahead of memory."""


@dataclass
class AttestationConsumer(ConsumerBase):
    """Verifies and credits the statements of ``exchange`` from ``custodians``. Build it with
    :meth:`open` (which migrates the database and loads the ledger) or pass ``ledger`` and
    ``streams`` as :func:`exchange.store.load_ledger` returned them.

    ``ledger`` and ``streams`` are changed only by the after-commit steps, under ``effect_lock``
    (give the service's lock when other writers share the ledger)."""

    exchange: str = ""
    custodians: Sequence[str] = ()
    registry: KeyRegistry | None = None
    decimals: Mapping[str, int] = field(default_factory=dict)
    policy: CollateralPolicy | None = None
    verification: VerificationPolicy = field(default_factory=VerificationPolicy)
    clock: Callable[[], datetime] = _utc_now
    ledger: MarginLedger | None = None
    streams: dict[str, StoredStream] | None = None
    relay: OutboxRelay | None = None
    """Woken after a snapshot request or a notice commits, so it is published at once."""
    desk: MarginDesk | None = None
    """The service's single writer of the ledger: when given, the consumer writes through it
    (its lock, its signed notices in the outbox, its consistent reads) and shares its ledger."""
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    exchange_metrics: AttestationMetrics = field(default_factory=AttestationMetrics)

    def __post_init__(self) -> None:
        if not self.exchange:
            raise ConfigurationError("the attestation consumer needs its exchange id")
        if isinstance(self.custodians, str) or not self.custodians:
            raise ConfigurationError("the attestation consumer needs at least one custodian")
        for custodian in self.custodians:
            parse_stream_key(f"{custodian}/{self.exchange}")
        if self.registry is None or self.policy is None:
            raise ConfigurationError("the attestation consumer needs a key registry and a policy")
        if self.desk is not None:
            if self.ledger is not None and self.ledger is not self.desk.ledger:
                raise ConfigurationError("the consumer and its desk must share one ledger")
            if self.streams is None:
                raise ConfigurationError("pass the streams loaded with the desk's ledger")
            self.ledger = self.desk.ledger
            self.effect_lock = self.desk.lock
        super().__post_init__()
        check_schema(self.engine)
        if self.ledger is None:
            self.ledger, self.streams = load_ledger(self.engine, self.policy, self.decimals)
        elif self.streams is None:
            raise ConfigurationError("pass the streams loaded with the ledger")
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(
        cls,
        engine: Engine,
        settings: KafkaSettings,
        *,
        exchange: str,
        custodians: Sequence[str],
        registry: KeyRegistry,
        decimals: Mapping[str, int],
        policy: CollateralPolicy,
        catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
        migrate_schema: bool = True,
        **options: Any,
    ) -> Self:
        """Migrate the database (unless ``migrate_schema`` is false), load the ledger and return
        the consumer of ``exchange``'s attestations topic. ``options`` are further fields
        (verification, clock, relay, effect_lock, backoff, ...)."""
        if migrate_schema:
            migrate(engine)
        return cls(
            engine=engine,
            settings=settings,
            name=options.pop("name", f"{exchange}/attestations"),
            topics=[catalogue.name(TopicKind.ATTESTATIONS)],
            source=options.pop("source", f"/exchanges/{exchange}/attestations"),
            catalogue=catalogue,
            exchange=exchange,
            custodians=tuple(custodians),
            registry=registry,
            decimals=dict(decimals),
            policy=policy,
            **options,
        )

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await ConsumerBase.run(self, stop)
        finally:
            self._loop = None

    # --- state from the database ----------------------------------------------------------------

    async def position(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Reload the ledger and the receiver state from the database whenever partitions are
        newly assigned, then seek (the base). Another instance of the consumer group may have
        credited the statements of these partitions since this one loaded its state; planning
        against that old state would refuse the next statement as a gap and ask for a snapshot
        from the old head. (The base's periodic position check re-seeks partitions already
        held: no reload then.)"""
        if any(tp not in self.assigned for tp in partitions):
            await asyncio.to_thread(self.reload)
        await ConsumerBase.position(self, consumer, partitions)

    def reload(self) -> None:
        """Replace the ledger's state and the receiver state of every stream with what the
        database holds, under the effect lock (so no plan is under way), in place: the desk and
        the service keep the same objects."""
        with self._effect_lock():
            self._reload()

    def _reload(self) -> None:
        """:meth:`reload`, the caller holding the effect lock. Reads its own snapshot of the
        database (no write lock), so a transaction in progress may call it."""
        if self.policy is None:
            raise InvariantViolation("the consumer lost its policy")
        loaded, streams = load_ledger(self.engine, self.policy, self.decimals)
        ledger = self.margin_ledger
        if self.desk is not None:
            with self.desk.changing_ledger():
                ledger.reset(loaded)
        else:
            ledger.reset(loaded)
        if self.streams is None:
            self.streams = streams
        else:
            self.streams.clear()
            self.streams.update(streams)
        self.exchange_metrics.reloads += 1

    def _check_current(self, session: Session, stream: str) -> None:
        """Raise StaleStreamState, after reloading, unless the stream's status stored in the
        database is the one in memory. Read inside the caller's transaction and kept locked
        there (``FOR UPDATE`` on PostgreSQL; SQLite's transaction holds the write lock), so
        what is planned next stays planned against the stored head until the commit."""
        stored = load_stream_status(session, stream, lock=True)
        memory = self.margin_ledger.stream_status(stream)
        if _plan_key(stored) == _plan_key(memory):
            return
        logger.warning(
            "%s: the database holds %s, memory %s: another writer moved the stream; reloading",
            stream,
            _describe(stored),
            _describe(memory),
        )
        self._reload()
        raise StaleStreamState(f"{stream} moved in the database since it was loaded")

    # --- accessors (for the service and tests) --------------------------------------------------

    @property
    def margin_ledger(self) -> MarginLedger:
        if self.ledger is None:
            raise InvariantViolation("the consumer has no ledger")
        return self.ledger

    def stored_stream(self, stream: str) -> StoredStream:
        """The receiver state of ``stream`` (empty trees before its first statement)."""
        if self.streams is None:
            raise InvariantViolation("the consumer has no streams")
        found = self.streams.get(stream)
        return found if found is not None else StoredStream(ReceiverTrees(self.decimals))

    def _check_stream(self, stream: str | None) -> tuple[str, str, str]:
        if stream is None:
            raise WrongStream("the attestations topic carries statements only")
        custodian, exchange = parse_stream_key(stream)
        if exchange != self.exchange or custodian not in self.custodians:
            raise WrongStream(f"{stream} is not a stream of {self.exchange} from a known custodian")
        return stream, custodian, exchange

    def is_applied(
        self, stream: str, sequence: int, digest: bytes | None, *, stored_sequence: int
    ) -> bool:
        """A statement at an applied sequence is a redelivery only if it is the statement
        accepted there: another one is a fork, and goes on to :meth:`apply`, which refuses it
        (verification reports the fork from the digest history) so that :meth:`rejected`
        freezes the stream. A sequence whose digest is not known here is treated as applied."""
        if sequence > stored_sequence:
            return False
        if digest is None or self.streams is None:
            return True
        found = self.streams.get(stream)
        known = None if found is None else found.history.get(sequence)
        return known is None or known == digest

    # --- the effect -----------------------------------------------------------------------------

    def apply(self, session: Session, delivery: Delivery) -> AfterCommit | None:
        stream, custodian, exchange = self._check_stream(delivery.stream)
        self._check_current(session, stream)
        ledger = self.margin_ledger
        status = ledger.stream_status(stream)
        if status is not None and status.frozen:
            raise StreamFrozen(f"{stream} is frozen: {status.frozen_reason}")
        disclosure = delivery.disclosure
        if disclosure is None:
            raise InvariantViolation("the attestation consumer needs require_disclosure")
        stored = self.stored_stream(stream)
        now = self.clock()
        awaiting = _awaited(status.awaiting_snapshot_from if status else None, stored)
        if self.registry is None or self.policy is None:
            raise InvariantViolation("the consumer lost its registry or policy")
        verified = verify_statement(
            delivery.statement,
            custodian=custodian,
            exchange=exchange,
            registry=self.registry,
            head=stored.head,
            now=now,
            receiver=stored.receiver,
            disclosure=disclosure,
            history=stored.history,
            policy=self.verification,
            resync_from=awaiting,
        )
        credited = compute_credited_statement(
            verified, disclosure, receiver=stored.receiver, quote=self.policy.quote
        )
        change = ledger.plan_statement(
            credited, now=now, resync_from=awaiting if verified.resynchronised else None
        )
        persist_statement(session, verified, disclosure, now=now)
        apply_change = self._stage(
            session, change, price_points={stream: verified.statement.prices}, now=now
        )

        def after() -> None:
            verified.trees_plan.apply()
            apply_change()
            stored.head = verified.head
            stored.history[verified.head.sequence] = verified.digest
            if self.streams is not None:
                self.streams[stream] = stored
            self.exchange_metrics.credited += 1
            self.exchange_metrics.resynchronised += int(verified.resynchronised)
            self.exchange_metrics.notices += len(change.notices)

        return after

    def _stage(
        self,
        session: Session,
        change: LedgerChange,
        *,
        price_points: Mapping[str, Sequence[PricePoint]] | None = None,
        now: datetime,
    ) -> AfterCommit:
        """Write ``change`` in the caller's transaction and return what applies it after the
        commit: through the desk when there is one (signed notices in the outbox, the desk's
        consistent-read counter), else here (notices stored by :meth:`publish_notices`)."""
        if self.desk is not None:
            apply, signed = self.desk.stage(session, change, price_points=price_points, now=now)
            if not signed:
                return apply

            def apply_and_wake() -> None:
                apply()
                self._wake_relay()

            return apply_and_wake
        persist_change(session, change, price_points=price_points, now=now)
        self.publish_notices(session, change)
        ledger = self.margin_ledger
        return lambda: ledger.apply(change)

    def publish_notices(self, session: Session, change: LedgerChange) -> None:
        """Put ``change``'s margin calls and liquidation-due notices on their way, in the
        change's transaction. Here they are stored unpublished (``exchange_notices``), never
        dropped; the exchange service overrides this to sign them and enqueue them in the outbox
        (and may then leave the table empty)."""
        persist_notices(session, change.notices)

    # --- refusals -------------------------------------------------------------------------------

    def rejected(
        self, session: Session, delivery: Delivery | None, error: CounterpartyError
    ) -> AfterCommit | None:
        if delivery is None or delivery.stream is None:
            return None
        try:
            stream, custodian, exchange = self._check_stream(delivery.stream)
        except CounterpartyError:
            return None  # not one of our streams: nothing of ours to freeze or resynchronise
        if isinstance(error, ForkDetected):
            return self._freeze(session, stream, delivery, error)
        if isinstance(error, SequenceGap):
            return self._request_snapshot(session, stream, custodian, exchange)
        return None

    def _freeze(
        self, session: Session, stream: str, delivery: Delivery, error: ForkDetected
    ) -> AfterCommit | None:
        self._check_current(session, stream)
        ledger = self.margin_ledger
        now = self.clock()
        reason = f"fork at sequence {delivery.sequence}: {error}"[:1000]
        change = ledger.plan_freeze(stream, reason=reason, now=now)
        apply_change = self._stage(session, change, now=now)
        record_alert(session, kind=FORK_ALERT, stream=stream, detail=reason, at=now)
        logger.error("%s: credit frozen: %s", stream, reason)

        def after() -> None:
            apply_change()
            self.exchange_metrics.forks += 1

        return after

    def _request_snapshot(
        self, session: Session, stream: str, custodian: str, exchange: str
    ) -> AfterCommit | None:
        self._check_current(session, stream)
        ledger = self.margin_ledger
        status = ledger.stream_status(stream)
        head = None if status is None else status.head
        from_sequence = 1 if head is None else head.sequence + 1
        if status is not None and status.awaiting_snapshot_from == from_sequence:
            return None  # asked already; the snapshot (or the next periodic one) will come
        now = self.clock()
        change = ledger.plan_await_snapshot(stream, from_sequence=from_sequence, now=now)
        apply_change = self._stage(session, change, now=now)
        request = SnapshotRequest(
            custodian=custodian,
            exchange=exchange,
            from_sequence=from_sequence,
            reason=SNAPSHOT_REQUEST_REASON,
            requested_at=truncate_to_millis(now),
        )
        message = encode_snapshot_request(
            request, catalogue=self.catalogue, budget_bytes=self.budget_bytes
        )
        enqueue(session, [message], sequence=from_sequence, now=now)
        logger.warning("%s: sequence gap; snapshot requested from %d", stream, from_sequence)

        def after() -> None:
            apply_change()
            self.exchange_metrics.snapshot_requests += 1
            self._wake_relay()

        return after

    def _wake_relay(self) -> None:
        if self.relay is not None:
            call_on_loop(self._loop, self.relay.wake)
