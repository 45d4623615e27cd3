"""The margin desk: the single writer of the exchange's margin ledger.

:class:`MarginDesk` holds the in-memory :class:`~exchange.ledger.MarginLedger`, the database engine
and one lock. Every change other than a statement (exposure reports, the evaluator's timer,
freezes and fork resolutions) goes through :meth:`MarginDesk.commit`, under the lock:

1. plan: the ledger plans the change against its current state (changes nothing);
2. persist: in one database transaction, :func:`exchange.store.persist_change` writes the change
   and, for each notice in it, the signed margin call or liquidation-due notice is enqueued in the
   bridge outbox, one record per addressed custodian, keyed by that custodian's stream;
3. commit;
4. apply: only now does the in-memory ledger take the change.

A failed transaction leaves the ledger as it was; a change the database holds is in memory
before the lock is released. So the ledger never runs ahead of or behind the database, and no
plan is made against a state another change is about to replace. The attestation consumer
(exchange/consumer.py), which credits statements in its own transaction with its Kafka progress,
passes :attr:`MarginDesk.lock` to :class:`bridge.consumer.ConsumerBase` as ``effect_lock`` and
writes its changes with :meth:`MarginDesk.stage`, which returns the after-commit callable. The
lock is re-entrant, so ``stage`` may take it again inside the consumer's hold.

Reads (:meth:`pretrade`, :meth:`status`) do not take the lock: the pre-trade check runs on the
event loop and must never wait for a database transaction. They are optimistic reads under a
sequence counter (a seqlock): every apply makes the counter odd before it touches the ledger and
even after; a read that saw an odd counter, or a different counter before and after, ran beside an
apply and is repeated (an exception raised during such a read, a dictionary resized while read, is
treated the same way). After a few collisions the read takes the lock. A read that passes saw one
committed state of the ledger and nothing else.

Notices are signed with the exchange's key (any :class:`~attestations.p256.DigestSigner`; PKCS#11
in production). Times are truncated to whole milliseconds at the desk's door, because every
signed object carries millisecond timestamps.

What the desk does not do: verify or credit statements (exchange/consumer.py), run the timer
(exchange/service.py calls :meth:`evaluate`), relay the outbox (bridge/outbox.py), or decide
anything about margins (exchange/ledger.py and exchange/policy.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from attestations.canonical import truncate_to_millis
from attestations.errors import InvariantViolation
from attestations.notices import (
    DEFAULT_RELEASE_VALIDITY,
    LiquidationDue,
    LiquidationReason,
    MarginCall,
    NoticeType,
    PositionLine,
    ReleaseAck,
    SignedNotice,
    StreamHeadRef,
    build_positions_snapshot,
    compute_notice_id,
    sign_notice,
)
from attestations.p256 import DigestSigner
from attestations.statement import PricePoint
from bridge.envelope import OutboundMessage, encode_notice
from bridge.outbox import enqueue, run_transaction
from bridge.topics import DEFAULT_CATALOGUE, TopicCatalogue, compute_stream_key
from exchange.ledger import (
    ClientStatus,
    ExposureReport,
    LedgerChange,
    MarginLedger,
    Notice,
    PositionView,
    PretradeDecision,
    ReleaseDecision,
)
from exchange.policy import MarginState, NoticeKind
from exchange.store import persist_change

logger = logging.getLogger(__name__)

NOTICE_OUTBOX_SEQUENCE: Final = 0
"""The outbox ``sequence`` of notices and snapshots. They are not entries of a statement chain;
after a broker lost its data the relay republishes every one of them (a receiver drops a
repeated notice by its ``notice_id``)."""
OPTIMISTIC_READ_ATTEMPTS: Final = 8
"""Optimistic reads before a read takes the lock (an apply takes microseconds, so more than a
couple of collisions in a row means a burst of writes)."""

T = TypeVar("T")
AfterCommit = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Committed:
    """A change the database holds and the ledger applied, with the notices it enqueued."""

    change: LedgerChange
    notices: tuple[SignedNotice, ...]


@dataclass(frozen=True, slots=True)
class Release:
    """The answer to a release request: the ledger's decision and, when allowed, the signed
    acknowledgement (enqueued on the instructions topic for the custodian). A refusal signs
    nothing."""

    decision: ReleaseDecision
    ack: SignedNotice | None


class DeskLock:
    """A re-entrant lock that knows whether the calling thread holds it (a write without the
    lock is a bug that must fail loudly, not a race that shows up once a month)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> DeskLock:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1
        return self

    def __exit__(self, *_: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()

    @property
    def held(self) -> bool:
        return self._owner == threading.get_ident()


class MarginDesk:
    """See the module docstring. ``exchange`` is this exchange's party id (the ``<exchange>``
    half of every stream it consumes, and the signer of its notices)."""

    def __init__(
        self,
        *,
        ledger: MarginLedger,
        engine: Engine,
        exchange: str,
        signer: DigestSigner,
        catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    ) -> None:
        self.ledger = ledger
        self.engine = engine
        self.exchange = exchange
        self.signer = signer
        self.catalogue = catalogue
        self.lock = DeskLock()
        """Held from plan to apply by every writer; pass it as the consumers' ``effect_lock``."""
        self._sequence = 0  # even: the ledger is at rest; odd: an apply is under way

    # --- writing --------------------------------------------------------------------------------

    def stage(
        self,
        session: Session,
        change: LedgerChange,
        *,
        price_points: Mapping[str, Iterable[PricePoint]] | None = None,
        now: datetime | None = None,
    ) -> tuple[AfterCommit, tuple[SignedNotice, ...]]:
        """Write ``change`` and the outbox records of its notices through ``session`` (the
        caller's transaction, not committed here) and return the after-commit callable that
        applies it to the ledger, with the signed notices. The caller holds :attr:`lock` from
        planning until that callable returned. ``price_points`` and ``now`` pass to
        :func:`exchange.store.persist_change`."""
        self._require_lock()
        signed = self.sign_notices(change)
        persist_change(session, change, price_points=price_points, now=now)
        for notice in signed:
            message = encode_notice(notice, catalogue=self.catalogue)
            enqueue(
                session, [message], sequence=NOTICE_OUTBOX_SEQUENCE, now=notice.notice.signed_at
            )
        return (lambda: self._apply(change)), signed

    def stage_exposure(
        self, session: Session, report: ExposureReport, *, now: datetime
    ) -> AfterCommit | None:
        """Plan ``report`` and stage it in the caller's transaction (:meth:`stage`); None when it
        changes nothing (older or replayed). The caller holds :attr:`lock`."""
        self._require_lock()
        change = self.ledger.plan_exposure(report, now=truncate_to_millis(now))
        if change.is_empty:
            return None
        after, _ = self.stage(session, change)
        return after

    def commit(self, plan: Callable[[], LedgerChange], *, what: str) -> Committed:
        """Plan, persist, commit and apply one change under the lock (module docstring). An
        empty change (nothing moves) touches neither the database nor the ledger."""
        with self.lock:
            change = plan()
            if change.is_empty:
                return Committed(change, ())

            def work(session: Session) -> tuple[AfterCommit, tuple[SignedNotice, ...]]:
                return self.stage(session, change)

            after, signed = run_transaction(self.engine, work, what=what)
            after()
            for notice in signed:
                body = notice.notice
                if isinstance(body, MarginCall | LiquidationDue):
                    logger.info(
                        "%s %s for %s to %s",
                        notice.type.value,
                        body.notice_id,
                        body.client,
                        body.custodian,
                    )
            return Committed(change, signed)

    def submit_exposure(self, report: ExposureReport, *, now: datetime) -> Committed:
        """Take the trading engine's report. An older report (``reported_at``) or a replayed one
        (``report_id``) is an empty change: nothing is written."""
        moment = truncate_to_millis(now)
        return self.commit(
            lambda: self.ledger.plan_exposure(report, now=moment), what="recording an exposure"
        )

    def evaluate(self, *, now: datetime) -> Committed:
        """Deadlines and staleness at ``now`` (called by the service's timer)."""
        moment = truncate_to_millis(now)
        return self.commit(
            lambda: self.ledger.plan_evaluation(now=moment), what="evaluating margins"
        )

    def freeze(self, stream: str, *, reason: str, now: datetime) -> Committed:
        moment = truncate_to_millis(now)
        return self.commit(
            lambda: self.ledger.plan_freeze(stream, reason=reason, now=moment),
            what="freezing a stream",
        )

    def resolve(self, stream: str, *, operator: str, reason: str, now: datetime) -> Committed:
        """An operator resolved the fork on ``stream`` (UnknownStream, StreamNotFrozen)."""
        moment = truncate_to_millis(now)
        return self.commit(
            lambda: self.ledger.plan_resolve(stream, operator=operator, reason=reason, now=moment),
            what="resolving a fork",
        )

    def release(
        self,
        client: str,
        custodian: str,
        asset: str,
        quantity: int,
        now: datetime,
        *,
        validity: timedelta = DEFAULT_RELEASE_VALIDITY,
    ) -> Release:
        """May ``client`` take ``quantity`` units of ``asset`` back from its pledge at
        ``custodian``? Decided by :meth:`MarginLedger.plan_release` on the stream
        ``<custodian>/<exchange>``. When allowed, in one transaction: the ``release`` journal
        entry and the signed :class:`~attestations.notices.ReleaseAck` (valid ``validity``) in
        the outbox for the instructions topic; then the ledger reserves the units. Refused: the
        reason, nothing signed or written."""
        moment = truncate_to_millis(now)
        stream = compute_stream_key(custodian=custodian, exchange=self.exchange)
        body = ReleaseAck(
            exchange=self.exchange,
            custodian=custodian,
            client=client,
            asset=asset,
            quantity=quantity,
            issued_at=moment,
            expires_at=moment + validity,
        )
        with self.lock:
            decision, change = self.ledger.plan_release(
                client,
                stream=stream,
                asset=asset,
                quantity=quantity,
                release_id=body.release_id,
                issued_at=body.issued_at,
                expires_at=body.expires_at,
                now=moment,
            )
            if not decision.allowed:
                return Release(decision, None)
            signed = sign_notice(body, self.signer)
            if change.is_empty:  # the same release asked again: already enqueued
                return Release(decision, signed)
            message = encode_notice(signed, catalogue=self.catalogue)

            def work(session: Session) -> None:
                persist_change(session, change, now=moment)
                enqueue(session, [message], sequence=NOTICE_OUTBOX_SEQUENCE, now=moment)

            run_transaction(self.engine, work, what="acknowledging a release")
            self._apply(change)
        logger.info(
            "release %s of %d %s for %s at %s acknowledged",
            body.release_id,
            quantity,
            asset,
            client,
            custodian,
        )
        return Release(decision, signed)

    def _apply(self, change: LedgerChange) -> None:
        self._require_lock()
        self._sequence += 1
        try:
            self.ledger.apply(change)
        finally:
            self._sequence += 1

    def _require_lock(self) -> None:
        if not self.lock.held:
            raise InvariantViolation("the margin desk is written without holding its lock")

    @contextlib.contextmanager
    def changing_ledger(self) -> Iterator[MarginLedger]:
        """Bracket a change of the ledger made outside :meth:`stage`, such as a reload from the
        database (:meth:`MarginLedger.reset`): the caller holds :attr:`lock`, and the read
        counter is odd for the duration, so a read beside it is repeated."""
        self._require_lock()
        self._sequence += 1
        try:
            yield self.ledger
        finally:
            self._sequence += 1

    # --- reading --------------------------------------------------------------------------------

    def read(self, read: Callable[[MarginLedger], T]) -> T:
        """``read(ledger)`` against one committed state (the seqlock of the module docstring)."""
        for _ in range(OPTIMISTIC_READ_ATTEMPTS):
            before = self._sequence
            if before % 2:
                continue
            try:
                result = read(self.ledger)
            except (RuntimeError, KeyError, InvariantViolation):
                if self._sequence == before:
                    raise
                continue
            if self._sequence == before:
                return result
        with self.lock:
            return read(self.ledger)

    def pretrade(self, client: str, *, add_exposure: int, now: datetime) -> PretradeDecision:
        """May ``client`` add ``add_exposure`` now? From memory, without the lock."""
        return self.read(
            lambda ledger: ledger.check_pretrade(client, add_exposure=add_exposure, now=now)
        )

    def status(self, client: str, *, now: datetime) -> ClientStatus | None:
        return self.read(lambda ledger: ledger.client_status(client, now=now))

    # --- notices --------------------------------------------------------------------------------

    def sign_notices(self, change: LedgerChange) -> tuple[SignedNotice, ...]:
        """The signed notices of ``change``: for each notice, one per addressed custodian.

        A liquidation-due notice names the margin call it follows (its id and deadline) when
        the client was in margin call before this change, or one issued in this change. A margin
        call issued together with liquidation is already due (its deadline is its own time); it
        cannot be a margin call with a future deadline, so only the liquidation-due notice is
        sent, for the liquidation line."""
        issued: list[SignedNotice] = []
        for notice in change.notices:
            if notice.kind is NoticeKind.MARGIN_CALL:
                if notice.deadline is None or notice.deadline <= notice.at:
                    continue
                for custodian in notice.custodians:
                    body = MarginCall(
                        exchange=self.exchange,
                        custodian=custodian,
                        client=notice.client,
                        issued_at=notice.at,
                        deadline=notice.deadline,
                        quote=self.ledger.policy.quote,
                        collateral=notice.collateral,
                        equity=notice.equity,
                        requirement=notice.requirement,
                        ratio_bps=notice.ratio_bps,
                        shortfall=notice.shortfall,
                    )
                    issued.append(sign_notice(body, self.signer))
            else:
                call = self._open_margin_call(notice)
                for custodian in notice.custodians:
                    due = self._liquidation_due(notice, custodian, call)
                    issued.append(sign_notice(due, self.signer))
        return tuple(issued)

    def _open_margin_call(self, notice: Notice) -> tuple[str, datetime] | None:
        """(id, deadline) of the margin call the client is in before this change, or None."""
        margin = self.ledger.client_margin(notice.client)
        if margin is None or margin.state is not MarginState.MARGIN_CALL or margin.deadline is None:
            return None
        call_id = compute_notice_id(
            kind=NoticeType.MARGIN_CALL,
            exchange=self.exchange,
            client=notice.client,
            issued_at=margin.since,
        )
        return call_id, margin.deadline

    def _liquidation_due(
        self, notice: Notice, custodian: str, call: tuple[str, datetime] | None
    ) -> LiquidationDue:
        if call is not None and notice.at >= call[1]:
            reason = LiquidationReason.DEADLINE_PASSED
        else:
            reason = LiquidationReason.LIQUIDATION_LINE
        return LiquidationDue(
            exchange=self.exchange,
            custodian=custodian,
            client=notice.client,
            issued_at=notice.at,
            deadline=None if call is None else call[1],
            quote=self.ledger.policy.quote,
            collateral=notice.collateral,
            equity=notice.equity,
            requirement=notice.requirement,
            ratio_bps=notice.ratio_bps,
            shortfall=notice.shortfall,
            margin_call_id=None if call is None else call[0],
            reason=reason,
        )

    # --- positions snapshot ---------------------------------------------------------------------

    def positions_snapshot(
        self, *, now: datetime, publish: bool = False
    ) -> tuple[SignedNotice, ...]:
        """The signed positions snapshot at ``now``: every credited position (client, custodian,
        asset, quantity, value at ``now``) with the stream heads they come from, in signed parts.
        With ``publish`` the parts are enqueued on the ledger-snapshots topic in one
        transaction. Taken under the lock, so the lines and the heads are one state."""
        moment = truncate_to_millis(now)
        with self.lock:
            heads = [
                StreamHeadRef(
                    custodian=status.head.custodian,
                    sequence=status.head.sequence,
                    statement=status.head.digest,
                )
                for status in self.ledger.streams().values()
                if status.head is not None
            ]
            lines = [
                PositionLine(
                    client=client,
                    custodian=view.custodian,
                    asset=view.asset,
                    quantity=view.quantity,
                    value=view.value,
                )
                for client in self.ledger.clients()
                for view in self._positions_of(client, now=moment)
            ]
            parts = build_positions_snapshot(
                exchange=self.exchange,
                as_of=moment,
                quote=self.ledger.policy.quote,
                streams=heads,
                lines=lines,
            )
            signed = tuple(sign_notice(part, self.signer) for part in parts)
            if publish:
                messages = [encode_notice(part, catalogue=self.catalogue) for part in signed]

                def work(session: Session) -> None:
                    _enqueue_each(session, messages, now=moment)

                run_transaction(self.engine, work, what="publishing a positions snapshot")
        return signed

    def _positions_of(self, client: str, *, now: datetime) -> tuple[PositionView, ...]:
        status = self.ledger.client_status(client, now=now)
        return () if status is None else status.positions


def _enqueue_each(session: Session, messages: Sequence[OutboundMessage], *, now: datetime) -> None:
    for message in messages:
        enqueue(session, [message], sequence=NOTICE_OUTBOX_SEQUENCE, now=now)
