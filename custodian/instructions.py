"""The custodian's consumer of the instructions topic (exchange -> custodian).

What it does: for a :class:`~bridge.envelope.SnapshotRequest` addressed to one of the streams it
serves, it asks that stream's :class:`~custodian.service.AttestationService` for a snapshot
(:meth:`~custodian.service.AttestationService.request_snapshot`); the service's epoch loop then
publishes a snapshot statement at the next sequence, which is at least the request's
``from_sequence``. ``request_snapshot`` only sets a flag and wakes the loop, so the consumer
keeps each accepted request pending until the stream's latest snapshot is newer than the
statement that was the last when the request was accepted, and checks every ``recheck_s``: when
the stream stored another statement than the snapshot meanwhile (an epoch that stored a
statement co-signed before the request, for example), it asks again. The service's
:meth:`~custodian.service.AttestationService.run` must be running in the same process.

Refused (a :class:`~attestations.errors.CounterpartyError`, so the base dead-letters the record
with the reason and the partition moves on):

* ``wrong_custodian``: a request addressed to another custodian;
* ``unknown_stream``: a request for an exchange this custodian serves no stream for;
* ``ahead_of_stream``: ``from_sequence`` beyond the stream's next sequence (the exchange claims
  to miss a statement that was never published: a bug or a forged request);
* ``future_dated`` / ``stale_request``: ``requested_at`` further in the future than the clock
  skew allows, or older than ``max_request_age`` (an exchange that still needs a snapshot asks
  again);
* ``unsupported_instruction``: any other message type the instructions topic carries (margin
  calls, liquidation-due notices), and release acknowledgements when the consumer has no key
  registry to verify them with. The custodian does not act on them yet; they are preserved on the
  dead-letter topic, never silently dropped.

Release acknowledgements (docs/protocol.md 12.5): one addressed to this custodian for a stream
it serves is verified with :func:`attestations.notices.verify_release_ack` under the consumer's
``registry`` (the exchange's key, signature, not future-dated, not expired) and stored in
``book_release_acks`` by its release id, in the consumer's transaction, so an unpledge can name
it (``mcb custodian unpledge --release-ack ID``). Refused ones are dead-lettered with the
verification's reason (``bad_signature``, ``unknown_key``, ``expired``, ...) or
``wrong_custodian`` / ``unknown_stream``; the same acknowledgement again is stored once.
Whether an unpledge may use it (client, asset, quantity, single use) is the book's check at the
unpledge (:class:`custodian.book.SignedReleaseAckVerifier`).

Records that do not decode (malformed, oversized, a statement replayed onto this topic) are
dead-lettered by the base with the envelope's reasons.

Duplicates are harmless: a request already answered (the statements table holds a snapshot at a
sequence of at least ``from_sequence`` issued at or after ``requested_at``) has no effect, and a
request that arrives while another is pending joins it. The base deduplicates snapshot requests
by offset only, and asks ``apply`` to be idempotent: this is how it is.

What it does not do: authenticate requests (they are unsigned; a forged one costs one snapshot
statement, which carries nothing that the stream does not publish anyway), republish old
statements (:meth:`bridge.outbox.OutboxRelay.republish_from`), or execute margin calls and
liquidations (the liquidation package).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    Engine,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from attestations.canonical import truncate_to_millis
from attestations.errors import ConfigurationError, CounterpartyError, FutureDated
from attestations.keys import KeyRegistry
from attestations.notices import ReleaseAck, SignedNotice, verify_release_ack
from attestations.statement import StatementKind, validate_party
from attestations.verify import DEFAULT_MAX_CLOCK_SKEW
from bridge.consumer import ConsumerBase, Delivery
from bridge.envelope import SnapshotRequest
from bridge.kafka import KafkaSettings
from bridge.outbox import run_transaction
from bridge.topics import DEFAULT_CATALOGUE, TopicCatalogue, TopicKind
from custodian.book import ReleaseAckUnknown
from custodian.service import AttestationService, statements_table
from custodian.store import release_acks_table

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_AGE: Final = timedelta(hours=1)
DEFAULT_RECHECK_S: Final = 1.0


# --- received release acknowledgements (table: custodian.store.release_acks_table) -------------


def persist_release_ack(session: Session, signed: SignedNotice, *, received_at: datetime) -> None:
    """Store a verified acknowledgement (the caller verified it) in ``session``'s transaction;
    one already stored under its release id is kept as it is."""
    ack = signed.notice
    if not isinstance(ack, ReleaseAck):
        raise ConfigurationError("only release acknowledgements are stored here")
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.connection().execute(
        insert(release_acks_table)
        .values(
            release_id=ack.release_id,
            exchange=ack.exchange,
            client=ack.client,
            asset=ack.asset,
            quantity=ack.quantity,
            issued_at=ack.issued_at,
            expires_at=ack.expires_at,
            received_at=received_at,
            wire=signed.encode(),
        )
        .on_conflict_do_nothing(index_elements=["release_id"])
    )


def store_release_ack(
    engine: Engine,
    message: bytes,
    *,
    registry: KeyRegistry,
    custodian: str,
    now: datetime,
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
) -> ReleaseAck:
    """Verify a signed acknowledgement addressed to ``custodian`` (from a file, say) and store it
    as the consumer does; return it. Raises the verification's errors or WrongCustodian."""
    signed = SignedNotice.decode(message)
    ack = verify_release_ack(signed, registry=registry, now=now, max_clock_skew=max_clock_skew)
    if ack.custodian != custodian:
        raise WrongCustodian(
            f"release acknowledgement {ack.release_id} is addressed to {ack.custodian}, this is "
            f"{custodian}"
        )

    def work(session: Session) -> None:
        persist_release_ack(session, signed, received_at=now)

    run_transaction(engine, work, what="storing a release acknowledgement")
    return ack


def fetch_release_ack(engine: Engine, release_id: str) -> bytes:
    """The wire bytes of the stored acknowledgement ``release_id``; ReleaseAckUnknown when none
    was received."""

    def work(session: Session) -> bytes | None:
        row = (
            session.connection()
            .execute(
                select(release_acks_table.c.wire).where(
                    release_acks_table.c.release_id == release_id
                )
            )
            .first()
        )
        return None if row is None else bytes(row[0])

    wire = run_transaction(engine, work, what="reading a release acknowledgement")
    if wire is None:
        raise ReleaseAckUnknown(f"no release acknowledgement {release_id[:70]!r} was received")
    return wire


# --- errors -------------------------------------------------------------------------------------


class UnsupportedInstruction(CounterpartyError):
    """A message type the instructions topic carries that this custodian does not act on yet."""

    reason = "unsupported_instruction"


class WrongCustodian(CounterpartyError):
    """An instruction addressed to another custodian."""

    reason = "wrong_custodian"


class UnknownStream(CounterpartyError):
    """An instruction for an exchange this custodian serves no stream for."""

    reason = "unknown_stream"


class AheadOfStream(CounterpartyError):
    """A snapshot request from a sequence beyond the stream's next one."""

    reason = "ahead_of_stream"


class StaleRequest(CounterpartyError):
    """A request older than the consumer's ``max_request_age``."""

    reason = "stale_request"


# --- the consumer -------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return truncate_to_millis(datetime.now(UTC))


@dataclass(slots=True)
class InstructionMetrics:
    """Counters since the consumer was created."""

    snapshot_requests: int = 0
    """Requests accepted and passed to a stream's service."""
    already_answered: int = 0
    """Requests a snapshot already stored had answered (replays, redeliveries)."""
    answered: int = 0
    """Pending requests a new snapshot answered."""
    reminders: int = 0
    """Times a pending request was passed to its service again."""
    release_acks: int = 0
    """Release acknowledgements verified and stored (a redelivered one counts again)."""


@dataclass
class InstructionConsumer(ConsumerBase):
    """Reads the instructions topic for ``custodian``'s streams; ``services`` maps each exchange
    to its stream's service. ``engine`` must be the database those services store statements in.
    Build it with :func:`create_instruction_consumer`."""

    custodian: str = ""
    services: Mapping[str, AttestationService] = field(default_factory=dict)
    clock: Callable[[], datetime] = _utc_now
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW
    max_request_age: timedelta = DEFAULT_MAX_REQUEST_AGE
    registry: KeyRegistry | None = None
    """The exchanges' keys, to verify release acknowledgements; without it they are refused."""
    recheck_s: float = DEFAULT_RECHECK_S
    require_disclosure: bool = False  # no statements travel on instructions
    instruction_metrics: InstructionMetrics = field(default_factory=InstructionMetrics)

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_party(self.custodian, what="custodian")
        if not self.services:
            raise ConfigurationError("an instruction consumer needs at least one stream")
        for exchange, service in self.services.items():
            if (service.state.custodian, service.state.exchange) != (self.custodian, exchange):
                raise ConfigurationError(
                    f"the service for {exchange} runs stream {service.stream}, not "
                    f"{self.custodian}/{exchange}"
                )
        if self.recheck_s <= 0:
            raise ConfigurationError("recheck_s must be positive")
        # stream -> the last stored sequence when the newest pending request was accepted; the
        # request is answered by a snapshot after it. Written by apply (a worker thread), read
        # by the reminder task (the event loop).
        self._requests: dict[str, int] = {}
        self._requests_lock = threading.Lock()

    # --- apply ----------------------------------------------------------------------------------

    def apply(self, session: Session, delivery: Delivery) -> None:
        body = delivery.message.body
        if isinstance(body, SignedNotice) and isinstance(body.notice, ReleaseAck):
            self._store_release_ack(session, body)
            return
        if not isinstance(body, SnapshotRequest):
            raise UnsupportedInstruction(
                f"{delivery.message.envelope.type.value}: this custodian does not act on it yet"
            )
        service = self._service_for(body)
        now = self.clock()
        if body.requested_at > now + self.max_clock_skew:
            raise FutureDated(f"snapshot request dated {body.requested_at.isoformat()}")
        if now - body.requested_at > self.max_request_age:
            raise StaleRequest(
                f"snapshot request dated {body.requested_at.isoformat()}, older than "
                f"{self.max_request_age}"
            )
        stored = _last_sequence(session, service.stream)
        if body.from_sequence > stored + 1:
            raise AheadOfStream(
                f"{service.stream}: snapshot requested from {body.from_sequence}, the stream's "
                f"next statement is {stored + 1}"
            )
        if _is_answered(session, service.stream, body):
            self.instruction_metrics.already_answered += 1
            logger.info(
                "%s: snapshot request from %d (%s) already answered",
                service.stream,
                body.from_sequence,
                body.reason,
            )
            return
        # Set before the offset commits: if the commit fails the record comes again, and a
        # second request for the same snapshot joins this one.
        with self._requests_lock:
            self._requests[service.stream] = max(self._requests.get(service.stream, 0), stored)
        service.request_snapshot()
        self.instruction_metrics.snapshot_requests += 1
        logger.info(
            "%s: snapshot requested from %d (%s)", service.stream, body.from_sequence, body.reason
        )

    def _store_release_ack(self, session: Session, signed: SignedNotice) -> None:
        if self.registry is None:
            raise UnsupportedInstruction(
                "release acknowledgement: this consumer has no key registry to verify it with"
            )
        now = self.clock()
        ack = verify_release_ack(
            signed, registry=self.registry, now=now, max_clock_skew=self.max_clock_skew
        )
        if ack.custodian != self.custodian:
            raise WrongCustodian(
                f"release acknowledgement for custodian {ack.custodian}, this is {self.custodian}"
            )
        if ack.exchange not in self.services:
            raise UnknownStream(f"{self.custodian} serves no stream for {ack.exchange}")
        persist_release_ack(session, signed, received_at=now)
        self.instruction_metrics.release_acks += 1
        logger.info(
            "release acknowledgement %s: %s may release %d %s pledged to %s until %s",
            ack.release_id,
            ack.client,
            ack.quantity,
            ack.asset,
            ack.exchange,
            ack.expires_at.isoformat(),
        )

    def _service_for(self, request: SnapshotRequest) -> AttestationService:
        if request.custodian != self.custodian:
            raise WrongCustodian(
                f"snapshot request for custodian {request.custodian}, this is {self.custodian}"
            )
        service = self.services.get(request.exchange)
        if service is None:
            raise UnknownStream(f"{self.custodian} serves no stream for {request.exchange}")
        return service

    # --- pending requests -----------------------------------------------------------------------

    def pending(self) -> dict[str, int]:
        """Streams with a request not yet answered, and the sequence a snapshot must follow."""
        with self._requests_lock:
            return dict(self._requests)

    def remind(self) -> None:
        """Drop the pending requests a snapshot answered. Ask again for those whose stream
        stored a statement that is not a snapshot since (an epoch that stored a statement
        co-signed before the request, for example); the others wait for their epoch. Asking
        only then never wakes the loop for an extra statement while the snapshot is under way."""
        with self._requests_lock:
            pending = list(self._requests.items())
        for stream, after in pending:
            service = next(s for s in self.services.values() if s.stream == stream)
            if service.last_snapshot > after:
                with self._requests_lock:
                    if self._requests.get(stream) == after:
                        del self._requests[stream]
                self.instruction_metrics.answered += 1
                continue
            current = service.state.sequence
            if current > after:
                with self._requests_lock:
                    if self._requests.get(stream) == after:
                        self._requests[stream] = current
                service.request_snapshot()
                self.instruction_metrics.reminders += 1

    async def run(self, stop: asyncio.Event) -> None:
        reminder = asyncio.create_task(self._remind_until(stop), name="instruction-reminders")
        try:
            await super().run(stop)
        finally:
            reminder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reminder

    async def _remind_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.recheck_s)
            if self._requests:
                self.remind()


def create_instruction_consumer(
    *,
    custodian: str,
    services: Sequence[AttestationService],
    settings: KafkaSettings,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    **options: Any,
) -> InstructionConsumer:
    """The instructions consumer of ``custodian``'s ``services`` (one per exchange, all on one
    database), named ``<custodian>/instructions`` in the consumer progress tables. ``options``
    are further fields (clock, max_request_age, recheck_s, back-off, ...)."""
    if not services:
        raise ConfigurationError("an instruction consumer needs at least one stream")
    engine = services[0].engine
    if any(service.engine is not engine for service in services):
        raise ConfigurationError("the streams of one instruction consumer share one database")
    by_exchange = {service.state.exchange: service for service in services}
    if len(by_exchange) != len(services):
        raise ConfigurationError("two services for one exchange")
    return InstructionConsumer(
        engine=engine,
        settings=settings,
        name=f"{custodian}/instructions",
        topics=[catalogue.name(TopicKind.INSTRUCTIONS)],
        source=f"/custodians/{custodian}/instructions",
        catalogue=catalogue,
        custodian=custodian,
        services=by_exchange,
        **options,
    )


# --- reads --------------------------------------------------------------------------------------


def _last_sequence(session: Session, stream: str) -> int:
    value = (
        session.connection()
        .execute(
            select(func.max(statements_table.c.sequence)).where(statements_table.c.stream == stream)
        )
        .scalar_one_or_none()
    )
    return int(value or 0)


def _is_answered(session: Session, stream: str, request: SnapshotRequest) -> bool:
    """A snapshot at ``from_sequence`` or later, issued at or after the request, is stored."""
    found = session.connection().execute(
        select(statements_table.c.sequence)
        .where(
            statements_table.c.stream == stream,
            statements_table.c.kind == StatementKind.SNAPSHOT.value,
            statements_table.c.sequence >= request.from_sequence,
            statements_table.c.issued_at >= request.requested_at,
        )
        .limit(1)
    )
    return found.first() is not None
