"""Attestation epochs, the I/O shell around :mod:`custodian.epochs`: one
:class:`AttestationService` per (custodian, exchange) stream.

What it does, for each epoch (:meth:`AttestationService.publish_epoch`):

1. read the units pledged to the exchange from the custody book and take a price snapshot;
2. plan the next statement with :func:`custodian.epochs.plan_epoch` (a delta when possible, a
   snapshot for the first statement, every ``snapshot_every`` epochs and on request);
3. have it co-signed and sign it with the custodian key;
4. in ONE database transaction, in the custody book's database: record the statement
   (``attestation_statements``), bring the stream's attested leaves up to date
   (``attested_leaves``: changed holdings upserted, cleared ones deleted), record the leaf
   history (custodian/history.py: their old versions closed, the new ones opened), and enqueue
   the statement and its disclosure chunks in the bridge outbox (:func:`bridge.outbox.enqueue`);
5. after the commit: make the plan the stream's state (:meth:`EpochPlan.commit`), append the
   digest to the transparency log, and wake the outbox relay if one is attached.

The statements table is the source of truth. The transparency log is appended after the commit,
so a crash between the two leaves the log one or more statements behind: every append first
appends, in sequence order, any committed statement the log is missing, and so does
:meth:`AttestationService.open`; the gap is repaired at the next epoch or the next start.
Likewise the stream's state is rebuilt at :meth:`AttestationService.open` from the tables (the last
statement's sequence, digest, issue time and tree depths; the leaves' positions and quantities),
and checked against the roots that statement states.

Co-signers: the service holds :class:`~attestations.signing.Cosigner` objects in-process. In
production each co-signer is a remote party with its own record of the stream; the same
interface (``cosign(statement, now=...)``) stands for the call to it. A co-signer refuses a second,
different statement at a sequence it already co-signed, so a statement that was co-signed but
whose transaction failed is kept and stored by the next call instead of a new one (as long as it
has not expired).

A fresh statement is published at every epoch even when nothing changed: it carries a new expiry,
which keeps the exchange from treating the stream as stale. :meth:`AttestationService.run`
schedules epochs: soon after :meth:`~AttestationService.notify_change` (debounced) and at least
every ``interval_s``.

What it does not do: decide what is pledged (the book), plan statements (custodian.epochs),
publish to Kafka (bridge.outbox.OutboxRelay), or serve proofs (the HTTP API).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol, Self

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
    bindparam,
    delete,
    insert,
    select,
)
from sqlalchemy.orm import Session

from attestations.canonical import truncate_to_millis
from attestations.disclosure import ClientProof, DisclosedLeaf, build_trees, compute_salt
from attestations.errors import (
    ConfigurationError,
    CounterpartyError,
    InvariantViolation,
    MissingQuorum,
    TransientError,
)
from attestations.merkle import SumTree
from attestations.p256 import DigestSigner
from attestations.signing import CoSignature, Cosigner, sign_statement
from attestations.statement import SignedStatement, StatementKind
from attestations.translog import TransparencyLog
from bridge import migrations as bridge_migrations
from bridge.chunks import encode_disclosure
from bridge.envelope import DEFAULT_BUDGET_BYTES, OutboundMessage, encode_statement
from bridge.outbox import OutboxRelay, call_on_loop, enqueue, run_transaction
from bridge.topics import DEFAULT_CATALOGUE, TopicCatalogue, compute_stream_key
from custodian import migrations as custodian_migrations
from custodian.epochs import EpochPlan, EpochState, Holding, compute_client_proof, plan_epoch
from custodian.history import ProofHistory, persist_leaf_versions
from custodian.prices import DEFAULT_MAX_AGE, PriceSnapshot, PriceSource, compute_price_snapshot
from custodian.store import CustodyBook, Units, UtcDateTime, metadata

logger = logging.getLogger(__name__)

DEFAULT_LIFETIME: Final = timedelta(hours=1)
DEFAULT_SNAPSHOT_EVERY: Final = 100
"""A full snapshot after this many deltas, so a receiver that starts from nothing (or lost its
trees) never needs a long history."""
DEFAULT_INTERVAL_S: Final = 60.0
DEFAULT_DEBOUNCE_S: Final = 0.05
DEFAULT_RETRY_S: Final = 1.0


# --- tables (schema: custodian/migrations/versions/0002_attestation_epochs.py) -------------------

statements_table: Final = Table(
    "attestation_statements",
    metadata,
    Column("stream", String(300), nullable=False),
    Column("sequence", BigInteger, nullable=False, autoincrement=False),
    Column("digest", LargeBinary, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("issued_at", UtcDateTime, nullable=False),
    # The signed statement's RFC 8785 bytes, exactly as published.
    Column("wire", LargeBinary, nullable=False),
    PrimaryKeyConstraint("stream", "sequence", name="pk_attestation_statements"),
    UniqueConstraint("digest", name="uq_attestation_statements_digest"),
)

leaves_table: Final = Table(
    "attested_leaves",
    metadata,
    Column("stream", String(300), nullable=False),
    Column("asset", String(16), nullable=False),
    Column("account", String(128), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("quantity", Units, nullable=False),
    PrimaryKeyConstraint("stream", "asset", "account", name="pk_attested_leaves"),
    UniqueConstraint(
        "stream", "asset", "position", name="uq_attested_leaves_stream_asset_position"
    ),
)


def _utc_now() -> datetime:
    # Statements carry whole milliseconds.
    return truncate_to_millis(datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class _Signed:
    """A statement co-signed and signed, with what storing it writes. Kept until it is stored:
    when its transaction fails, the next epoch stores this one rather than a new one."""

    plan: EpochPlan
    signed: SignedStatement
    messages: tuple[OutboundMessage, ...]
    changed: tuple[DisclosedLeaf, ...]
    cleared: tuple[Holding, ...]


class AttestationService:
    """Publishes the attestation statements of one (custodian, exchange) stream. Construct it
    with :meth:`open`, which migrates the database and restores the stream's state.

    Thread-safety: :meth:`publish_epoch` serializes itself with a lock; :meth:`notify_change`
    may be called from any thread."""

    def __init__(
        self,
        book: CustodyBook,
        *,
        state: EpochState,
        signer: DigestSigner,
        cosigners: Sequence[Cosigner],
        quorum: int,
        salt_secret: bytes,
        decimals: Mapping[str, int],
        prices: PriceSource,
        log: TransparencyLog,
        quote: str = "USD",
        price_max_age: timedelta = DEFAULT_MAX_AGE,
        lifetime: timedelta = DEFAULT_LIFETIME,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        last_snapshot: int = 0,
        relay: OutboxRelay | None = None,
        catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if quorum < 1 or quorum > len(cosigners):
            raise ConfigurationError(f"quorum {quorum} needs 1..{len(cosigners)} co-signers")
        if len(salt_secret) < 32:
            raise ConfigurationError("the salt secret must be at least 32 bytes")
        if snapshot_every < 1:
            raise ConfigurationError("snapshot_every must be positive")
        if lifetime <= timedelta(0):
            raise ConfigurationError("lifetime must be positive")
        self.book = book
        self.state = state
        self.stream = compute_stream_key(custodian=state.custodian, exchange=state.exchange)
        self._signer = signer
        self._cosigners = tuple(cosigners)
        self._quorum = quorum
        self._salt_secret = salt_secret
        self._decimals = dict(decimals)
        self._prices = prices
        self._quote = quote
        self._price_max_age = price_max_age
        self._lifetime = lifetime
        self._log = log
        self.snapshot_every = snapshot_every
        self.last_snapshot = last_snapshot
        """Sequence of the stream's latest snapshot statement (0 before the first)."""
        self.relay = relay
        self._catalogue = catalogue
        self._budget_bytes = budget_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._unstored: _Signed | None = None
        self._chained_to: bytes | None = None
        """``previous`` of the newest statement this service stored (None before the first)."""
        self._snapshot_requested = False
        self.last_prices: PriceSnapshot | None = None
        """The price snapshot of the latest epoch (its ``stale`` and ``missing`` are flagged in
        the log; the statement states the points it used)."""
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.history = ProofHistory(
            book.engine,
            custodian=state.custodian,
            exchange=state.exchange,
            salt_secret=salt_secret,
        )
        """Client proofs at older sequences, rebuilt from the leaf history."""

    @property
    def engine(self) -> Engine:
        return self.book.engine

    # --- open / restore -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        book: CustodyBook,
        *,
        custodian: str,
        exchange: str,
        signer: DigestSigner,
        cosigners: Sequence[Cosigner],
        quorum: int,
        salt_secret: bytes,
        decimals: Mapping[str, int],
        prices: PriceSource,
        log: TransparencyLog,
        migrate: bool = True,
        **options: object,
    ) -> Self:
        """Migrate the book's database (custody book and bridge tables live in one database, so
        the statement and the outbox rows commit together), rebuild the stream's state from the
        tables, append to ``log`` any committed statement it is missing, and return the service.
        ``options`` are the keyword arguments of the constructor (lifetime, snapshot_every,
        relay, ...)."""
        engine = book.engine
        if migrate:
            bridge_migrations.upgrade(engine)
            custodian_migrations.upgrade(engine)
        stream = compute_stream_key(custodian=custodian, exchange=exchange)
        state, last_snapshot = restore_epoch_state(
            engine,
            custodian=custodian,
            exchange=exchange,
            salt_secret=salt_secret,
        )
        service = cls(
            book,
            state=state,
            signer=signer,
            cosigners=cosigners,
            quorum=quorum,
            salt_secret=salt_secret,
            decimals=decimals,
            prices=prices,
            log=log,
            last_snapshot=last_snapshot,
            **options,  # type: ignore[arg-type]
        )
        appended = service.catch_up_log()
        if appended:
            logger.warning("%s: appended %d committed statements to the log", stream, appended)
        return service

    def catch_up_log(self) -> int:
        """Append to the transparency log, in sequence order, every committed statement of this
        stream it is missing (after a crash between a commit and its append). Returns how many.

        The stream's state names its newest committed statement (and, once this service stored
        one, the statement that one chains to). Appends are in sequence order, so when the log
        holds the newest, it holds every earlier one, and when it holds the one before, the
        newest is all that is missing: the usual case after an epoch needs no database read.
        Otherwise the statements table is walked back from the newest."""
        newest = self.state.previous if self.state.sequence else None
        if newest is not None and self._log.index_of(newest) is not None:
            return 0
        chained_to = self._chained_to
        if (
            newest is not None
            and chained_to is not None
            and self.state.sequence > 1
            and self._log.index_of(chained_to) is not None
        ):
            self._log.append(newest)
            return 1
        missing: list[bytes] = []

        def work(session: Session) -> None:
            rows = session.connection().execute(
                select(statements_table.c.digest)
                .where(statements_table.c.stream == self.stream)
                .order_by(statements_table.c.sequence.desc())
            )
            # Statements are appended in order, so the log holds a prefix of the stream: walk
            # back from the newest until one the log has.
            for (digest,) in rows:
                if self._log.index_of(bytes(digest)) is not None:
                    break
                missing.append(bytes(digest))

        run_transaction(self.engine, work, what="reading statements for the log", read_only=True)
        for digest in reversed(missing):
            self._log.append(digest)
        return len(missing)

    # --- epochs ---------------------------------------------------------------------------------

    def request_snapshot(self) -> None:
        """Make the next epoch a full snapshot (an exchange asked for one), and schedule it."""
        self._snapshot_requested = True
        self.notify_change()

    def _snapshot_due(self, *, requested: bool) -> bool:
        return (
            requested
            or self._snapshot_requested
            or self.state.sequence + 1 - self.last_snapshot > self.snapshot_every
        )

    def client_proof(
        self, *, account: str, asset: str, sequence: int | None = None
    ) -> ClientProof | None:
        """``account``'s proof for its ``asset`` leaf in statement ``sequence`` (None: the
        latest), or None when that statement has no such leaf. The latest statement's comes from
        the in-memory trees, read under the lock an epoch commits under, so sequence, digest and
        path belong to one statement; an older one is rebuilt from the leaf history
        (:class:`~custodian.history.ProofHistory`: ProofNotKept when the stream has no such
        statement, InvariantViolation when the history does not rebuild its signed roots)."""
        with self._lock:
            if sequence is None or sequence == self.state.sequence:
                return compute_client_proof(
                    self.state, account=account, asset=asset, salt_secret=self._salt_secret
                )
        return self.history.client_proof(account=account, asset=asset, sequence=sequence)

    def publish_epoch(
        self, now: datetime | None = None, *, snapshot: bool = False
    ) -> SignedStatement:
        """Publish the stream's next statement (see the module docstring) and return it.

        Publishes even when nothing changed since the last statement: the new one renews the
        expiry. Raises what the steps raise: BookUnavailable / BridgeDatabaseUnavailable /
        PriceSourceUnavailable (retriable, nothing changed), MissingQuorum when fewer than
        ``quorum`` co-signers signed, InvariantViolation for a broken invariant."""
        with self._lock:
            signed = self._publish_locked(self._clock() if now is None else now, snapshot=snapshot)
        self._wake_relay()
        return signed

    def _publish_locked(self, now: datetime, *, snapshot: bool) -> SignedStatement:
        entry = self._unstored
        if entry is None or now >= entry.signed.statement.expires_at:
            entry = self._unstored = self._plan_and_sign(now, snapshot=snapshot)
        # else: co-signed already, and storing anything else at this sequence would be an
        # equivocation the co-signers refuse.
        signed = entry.signed

        def work(session: Session) -> None:
            persist_statement(
                session,
                stream=self.stream,
                signed=signed,
                changed=entry.changed,
                cleared=entry.cleared,
            )
            enqueue(session, entry.messages, sequence=signed.statement.sequence, now=now)

        run_transaction(self.engine, work, what=f"storing statement {signed.statement.sequence}")
        # The outbox rows are committed: the relay may publish them now, while the log append
        # (a commit and sync of its own file) runs. The log was never a precondition of
        # publication (a crash between commit and append already publishes first).
        self._wake_relay()
        self._unstored = None
        entry.plan.commit()
        if signed.statement.kind is StatementKind.SNAPSHOT:
            self.last_snapshot = signed.statement.sequence
            self._snapshot_requested = False
        self._chained_to = signed.statement.previous
        self.catch_up_log()
        return signed

    def _plan_and_sign(self, now: datetime, *, snapshot: bool) -> _Signed:
        pledged = self.book.pledged(self.state.exchange)
        points = self._prices.fetch_prices(now)
        prices = compute_price_snapshot(
            points, assets=self._decimals, quote=self._quote, now=now, max_age=self._price_max_age
        )
        self.last_prices = prices
        if prices.stale or prices.missing:
            logger.warning(
                "%s: prices stale %s, missing %s",
                self.stream,
                sorted(prices.stale),
                sorted(prices.missing),
            )
        plan = plan_epoch(
            self.state,
            pledged=pledged,
            decimals=self._decimals,
            prices=prices.points,
            salt_secret=self._salt_secret,
            now=now,
            lifetime=self._lifetime,
            snapshot=self._snapshot_due(requested=snapshot),
        )
        cosignatures = self._collect_cosignatures(plan, now=now)
        signed = sign_statement(
            plan.statement, custodian_signer=self._signer, cosignatures=cosignatures
        )
        messages = (
            encode_statement(signed, catalogue=self._catalogue, budget_bytes=self._budget_bytes),
            *encode_disclosure(
                plan.disclosure,
                time=signed.statement.issued_at,
                budget_bytes=self._budget_bytes,
                catalogue=self._catalogue,
            ),
        )
        changed, cleared = compute_leaf_changes(self.state, plan, pledged=pledged)
        return _Signed(plan, signed, messages, tuple(changed), tuple(cleared))

    def _collect_cosignatures(self, plan: EpochPlan, *, now: datetime) -> list[CoSignature]:
        signatures: list[CoSignature] = []
        refusals: list[str] = []
        for cosigner in self._cosigners:
            if len(signatures) == self._quorum:
                break
            try:
                signatures.append(cosigner.cosign(plan.statement, now=now))
            except CounterpartyError as exc:
                # One refusal is not fatal while others can still make up the quorum.
                refusals.append(f"{cosigner.key_id[:16]}: {exc.reason}: {exc}")
        if len(signatures) < self._quorum:
            raise MissingQuorum(
                f"statement {plan.statement.sequence}: {len(signatures)} of {self._quorum} "
                f"co-signatures ({'; '.join(refusals)})"
            )
        return signatures

    def _wake_relay(self) -> None:
        if self.relay is not None:
            call_on_loop(self._loop, self.relay.wake)

    # --- scheduling -----------------------------------------------------------------------------

    def notify_change(self) -> None:
        """A pledge changed: publish soon (debounced). Safe from any thread."""
        call_on_loop(self._loop, self._changed.set)

    async def run(
        self,
        stop: asyncio.Event,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        debounce_s: float = DEFAULT_DEBOUNCE_S,
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        """Publish epochs until ``stop`` is set: one at start, one ``debounce_s`` after the first
        change notified since the last epoch (changes notified meanwhile join it, so a burst of
        pledges makes one statement and the delay stays bounded), and at least every
        ``interval_s``. A transient failure is retried after ``retry_s``; an invariant violation
        propagates."""
        if interval_s <= 0 or debounce_s < 0 or retry_s <= 0:
            raise ConfigurationError("interval_s and retry_s must be positive, debounce_s >= 0")
        self._loop = asyncio.get_running_loop()
        try:
            due = time.monotonic()
            while not stop.is_set():
                await _wait_any(stop, self._changed, timeout_s=max(0.0, due - time.monotonic()))
                if stop.is_set():
                    break
                if self._changed.is_set() and debounce_s:
                    await _wait_any(stop, timeout_s=debounce_s)
                    if stop.is_set():
                        break
                self._changed.clear()
                try:
                    await asyncio.to_thread(self._publish_from_loop)
                except CounterpartyError:
                    # The book holds something a statement cannot carry (an asset without
                    # decimals), or a co-signer refused: retry after the pause, loudly.
                    logger.exception("%s: epoch failed", self.stream)
                    self._changed.set()
                    await _wait_any(stop, timeout_s=retry_s)
                    continue
                except Exception as exc:
                    if not getattr(exc, "retriable", False):
                        raise
                    logger.warning("%s: epoch failed, retrying: %s", self.stream, exc)
                    self._changed.set()
                    await _wait_any(stop, timeout_s=retry_s)
                    continue
                if self.relay is not None:
                    self.relay.wake()
                due = time.monotonic() + interval_s
        finally:
            self._loop = None

    def _publish_from_loop(self) -> None:
        with self._lock:
            self._publish_locked(self._clock(), snapshot=False)


class ChangeListener(Protocol):
    def notify_change(self) -> None: ...


DEFAULT_WATCH_INTERVAL_S: Final = 0.25


async def watch_book(
    book: CustodyBook,
    listeners: Sequence[ChangeListener],
    stop: asyncio.Event,
    *,
    interval_s: float = DEFAULT_WATCH_INTERVAL_S,
) -> None:
    """Until ``stop`` is set, poll the book's journal position every ``interval_s`` and call
    ``notify_change`` on every listener when it moved: a pledge made by another process (``mcb
    custodian pledge`` next to ``serve``) is published within about one interval instead of at
    the next scheduled epoch. The read is one indexed query that takes no write lock; a failed
    read is logged and retried at the next interval."""
    if interval_s <= 0:
        raise ConfigurationError("interval_s must be positive")
    seen: int | None = None
    while not stop.is_set():
        try:
            position = await asyncio.to_thread(book.journal_position)
        except TransientError as exc:
            logger.warning("watching the custody book: %s", exc)
        else:
            if seen is not None and position != seen:
                for listener in listeners:
                    listener.notify_change()
            seen = position
        await _wait_any(stop, timeout_s=interval_s)


async def _wait_any(*events: asyncio.Event, timeout_s: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, return_exceptions=True)


# --- persistence ---------------------------------------------------------------------------------


def compute_leaf_changes(
    state: EpochState, plan: EpochPlan, *, pledged: Mapping[Holding, int]
) -> tuple[list[DisclosedLeaf], list[Holding]]:
    """The ``attested_leaves`` changes of ``plan`` against ``state``, for the holdings
    ``pledged`` it was planned from: (leaves new or with another quantity, holdings gone). The
    changed leaves are among the disclosed ones, whether the plan is a snapshot (every leaf) or a
    delta (the set ones)."""
    current = {holding: units for holding, units in pledged.items() if units}
    changed = [
        leaf
        for leaf in plan.disclosure.set_leaves
        if state.quantities.get((leaf.account, leaf.asset)) != leaf.quantity
    ]
    if {(leaf.account, leaf.asset) for leaf in changed} != {
        holding for holding, units in current.items() if state.quantities.get(holding) != units
    }:
        raise InvariantViolation("the plan's disclosure does not match the pledged holdings")
    return changed, sorted(set(state.quantities) - set(current))


def persist_statement(
    session: Session,
    *,
    stream: str,
    signed: SignedStatement,
    changed: Iterable[DisclosedLeaf],
    cleared: Iterable[Holding],
) -> None:
    """Record ``signed`` and its leaf changes through ``session`` (inside the caller's
    transaction; nothing is committed here): the statement, the current leaves and the leaf
    history (:func:`custodian.history.persist_leaf_versions`)."""
    statement = signed.statement
    connection = session.connection()
    connection.execute(
        insert(statements_table).values(
            stream=stream,
            sequence=statement.sequence,
            digest=signed.digest,
            kind=statement.kind.value,
            issued_at=statement.issued_at,
            wire=signed.encode(),
        )
    )
    changed = list(changed)
    cleared = list(cleared)
    gone = [(leaf.account, leaf.asset) for leaf in changed] + cleared
    if gone:
        # Delete then insert: portable upsert, and a slot freed and retaken in one epoch never
        # meets the (stream, asset, position) constraint twice. Executed as one statement with
        # many parameter sets: a single expression over thousands of holdings exceeds SQLite's
        # expression depth.
        connection.execute(
            delete(leaves_table).where(
                leaves_table.c.stream == bindparam("b_stream"),
                leaves_table.c.account == bindparam("b_account"),
                leaves_table.c.asset == bindparam("b_asset"),
            ),
            [{"b_stream": stream, "b_account": a, "b_asset": x} for a, x in gone],
        )
    if changed:
        connection.execute(
            insert(leaves_table),
            [
                {
                    "stream": stream,
                    "asset": leaf.asset,
                    "account": leaf.account,
                    "position": leaf.position,
                    "quantity": leaf.quantity,
                }
                for leaf in changed
            ],
        )
    persist_leaf_versions(
        connection,
        stream=stream,
        sequence=statement.sequence,
        changed=changed,
        cleared=cleared,
    )


def restore_epoch_state(
    engine: Engine, *, custodian: str, exchange: str, salt_secret: bytes
) -> tuple[EpochState, int]:
    """The stream's :class:`EpochState` as of its last stored statement, and the sequence of
    its latest snapshot (0 when none). Raises InvariantViolation when the stored leaves do not
    rebuild the roots the last statement states (a changed salt secret, or damaged tables)."""
    stream = compute_stream_key(custodian=custodian, exchange=exchange)

    def work(session: Session) -> tuple[bytes | None, int, list[tuple[str, str, int, int]]]:
        connection = session.connection()
        last = connection.execute(
            select(statements_table.c.wire)
            .where(statements_table.c.stream == stream)
            .order_by(statements_table.c.sequence.desc())
            .limit(1)
        ).scalar_one_or_none()
        last_snapshot = connection.execute(
            select(statements_table.c.sequence)
            .where(
                statements_table.c.stream == stream,
                statements_table.c.kind == StatementKind.SNAPSHOT.value,
            )
            .order_by(statements_table.c.sequence.desc())
            .limit(1)
        ).scalar_one_or_none()
        leaves = connection.execute(
            select(
                leaves_table.c.account,
                leaves_table.c.asset,
                leaves_table.c.position,
                leaves_table.c.quantity,
            ).where(leaves_table.c.stream == stream)
        ).all()
        return (
            None if last is None else bytes(last),
            int(last_snapshot or 0),
            [(str(a), str(s), int(p), int(q)) for a, s, p, q in leaves],
        )

    wire, last_snapshot, rows = run_transaction(
        engine, work, what="restoring the epoch state", read_only=True
    )
    state = EpochState(custodian, exchange)
    if wire is None:
        if rows:
            raise InvariantViolation(f"{stream}: attested leaves without any statement")
        return state, 0
    signed = SignedStatement.decode(wire, max_bytes=len(wire))
    statement = signed.statement
    leaves = [
        DisclosedLeaf(
            account,
            asset,
            position,
            compute_salt(secret=salt_secret, exchange=exchange, account=account, asset=asset),
            quantity,
        )
        for account, asset, position, quantity in rows
    ]
    depths = {root.asset: root.depth for root in statement.assets}
    if unknown := {leaf.asset for leaf in leaves} - set(depths):
        raise InvariantViolation(f"{stream}: leaves of {sorted(unknown)} not in the statement")
    trees = build_trees(leaves, depths=depths)
    for root in statement.assets:
        tree = trees.setdefault(root.asset, SumTree(root.asset, depth=root.depth))
        if (tree.root, tree.total, tree.count, tree.depth) != (
            root.root,
            root.total,
            root.count,
            root.depth,
        ):
            raise InvariantViolation(
                f"{stream}: stored {root.asset} leaves do not rebuild statement "
                f"{statement.sequence}'s root"
            )
    state.sequence = statement.sequence
    state.previous = signed.digest
    state.issued_at = statement.issued_at
    state.trees = trees
    state.positions = {(leaf.account, leaf.asset): leaf.position for leaf in leaves}
    state.quantities = {(leaf.account, leaf.asset): leaf.quantity for leaf in leaves}
    return state, last_snapshot
