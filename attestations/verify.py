"""Where a statement is verified: the exchange-side trust decision, fail closed.

Two entry points:

* :func:`authenticate_statement` - one statement on its own: decode, the stream it belongs to,
  keys, both signatures and time. For clients and regulators checking a single statement.
* :func:`verify_statement` - the receiver of a stream: everything above, plus the hash chain
  against the last accepted statement and the disclosed leaves against the signed roots. It
  returns a :class:`VerifiedStatement` whose :attr:`~VerifiedStatement.trees_plan` the receiver
  applies in the same transaction as its credits. Nothing may be credited from anything else.

Each failure raises one distinct :class:`~attestations.errors.AttestationError` subclass (or a
``DecodeError`` for bytes that are not a well-formed message). The order of the checks is part of
the protocol (docs/protocol.md section 7):

1. decode (malformed, oversized, invalid, negative or overflowing amounts);
2. cheap replay: the very statement already accepted at that sequence -> SequenceReplay before
   any signature work;
3. stream: custodian and exchange are the receiver's -> WrongStream;
4. custodian key and ECDSA signature; co-signer keys, quorum of distinct co-signers and the
   aggregate BLS signature (keys judged at ``issued_at`` and at ``now``: a revoked key is
   rejected from its revocation on, whatever date it writes);
5. time: future-dated beyond the skew window, expired, lifetime longer than policy, a price
   observed in the future;
6. chain: fork, replay, gap, broken chain; or, when the receiver asked for a snapshot
   (``resync_from``), a resynchronisation: a snapshot at or above the requested sequence is
   accepted without linking to the head (every other check still applies);
7. leaves: the disclosure rebuilds (snapshot) or updates (delta) the receiver's trees to exactly
   the signed roots, totals, counts and depths, with the receiver's asset decimals.

Signatures are checked before the chain, so only validly signed statements can ever be reported
as a fork. This module reads no clock: ``now`` is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from attestations import bls
from attestations.canonical import MAX_MESSAGE_BYTES, format_timestamp
from attestations.disclosure import LeafDisclosure, ReceiverTrees, TreesPlan
from attestations.errors import (
    BrokenChain,
    ConfigurationError,
    Expired,
    ForkDetected,
    FutureDated,
    InvariantViolation,
    MissingQuorum,
    PolicyViolation,
    SequenceGap,
    SequenceReplay,
    WrongStream,
)
from attestations.keys import KeyRegistry, KeyRole
from attestations.p256 import verify_p256_digest
from attestations.statement import SignedStatement, Statement, StatementKind, require_utc

DEFAULT_MAX_CLOCK_SKEW: Final = timedelta(seconds=30)
DEFAULT_MAX_LIFETIME: Final = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last statement a verifier accepted from one (custodian, exchange) stream."""

    custodian: str
    exchange: str
    sequence: int
    digest: bytes
    issued_at: datetime


@dataclass(frozen=True, slots=True)
class VerificationPolicy:
    """The receiver's tolerances. ``max_clock_skew``: how far in the future ``issued_at`` (and a
    price's ``observed_at``) may be. ``max_lifetime``: the longest ``expires_at - issued_at``
    accepted, which also bounds how long a statement signed just before a key's revocation stays
    usable."""

    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME

    def __post_init__(self) -> None:
        if not timedelta(0) <= self.max_clock_skew <= timedelta(minutes=10):
            raise ConfigurationError("max_clock_skew must be between 0 and 10 minutes")
        if not timedelta(seconds=1) <= self.max_lifetime <= timedelta(days=7):
            raise ConfigurationError("max_lifetime must be between 1 second and 7 days")


@dataclass(frozen=True, slots=True)
class AuthenticatedStatement:
    """A statement whose stream, signatures and time were checked - but not its place in the
    chain nor its leaves. Enough for a client to check its own inclusion proof; never enough to
    credit anything."""

    signed: SignedStatement
    digest: bytes

    @property
    def statement(self) -> Statement:
        return self.signed.statement


@dataclass(frozen=True, slots=True)
class VerifiedStatement:
    """A statement that passed every check, with the plan that brings the receiver's trees to
    its roots. Apply :attr:`trees_plan` together with the new :attr:`head` and the credits."""

    signed: SignedStatement
    digest: bytes
    head: ChainHead
    trees_plan: TreesPlan = field(repr=False, compare=False)
    resynchronised: bool = False
    """True when the statement was accepted as a resynchronisation: a snapshot that does not
    link to the previous head (the sequences in between are unverified links, to be checked
    against the transparency log). False for a statement that extends the head."""

    @property
    def statement(self) -> Statement:
        return self.signed.statement


def _decode(message: SignedStatement | bytes, *, max_bytes: int) -> SignedStatement:
    if isinstance(message, SignedStatement):
        return message
    return SignedStatement.decode(message, max_bytes=max_bytes)


def authenticate_statement(
    message: SignedStatement | bytes,
    *,
    custodian: str,
    exchange: str,
    registry: KeyRegistry,
    now: datetime,
    policy: VerificationPolicy = VerificationPolicy(),
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> AuthenticatedStatement:
    """Steps 1 and 3-5: decode, stream, signatures, time."""
    require_utc(now, what="now")
    signed = _decode(message, max_bytes=max_bytes)
    digest = signed.statement.compute_digest()
    _verify_stream(signed.statement, custodian=custodian, exchange=exchange)
    verify_statement_signatures(signed, registry=registry, now=now, digest=digest)
    _verify_time(signed.statement, now=now, policy=policy)
    return AuthenticatedStatement(signed=signed, digest=digest)


def verify_statement(
    message: SignedStatement | bytes,
    *,
    custodian: str,
    exchange: str,
    registry: KeyRegistry,
    head: ChainHead | None,
    now: datetime,
    receiver: ReceiverTrees,
    disclosure: LeafDisclosure,
    history: Mapping[int, bytes] | None = None,
    policy: VerificationPolicy = VerificationPolicy(),
    max_bytes: int = MAX_MESSAGE_BYTES,
    resync_from: int | None = None,
) -> VerifiedStatement:
    """Verify ``message`` completely or raise; change nothing.

    ``head`` is the last accepted statement of the stream (None only before the first, when
    only a snapshot is acceptable). ``history`` maps earlier sequences to the digests accepted
    there, so that a different statement at an old sequence is reported as the fork it is.
    ``receiver`` holds the trees of the last accepted statement and ``disclosure`` the leaves
    that came with this one.

    ``resync_from`` is given while the receiver waits for the snapshot it asked for after a
    gap (the first sequence it is missing): a *snapshot* with ``sequence >= resync_from`` and
    ``sequence > head.sequence`` is then accepted although it skips sequences or does not name
    the head as its ``previous`` (:attr:`VerifiedStatement.resynchronised`). Everything else is
    checked as always, including that it is not dated before the head; a snapshot right after
    the head must still link to it (a mismatch there proves a fork), and a delta still gaps.
    """
    require_utc(now, what="now")
    if resync_from is not None and (
        isinstance(resync_from, bool) or not isinstance(resync_from, int) or resync_from < 1
    ):
        raise InvariantViolation(f"resync_from must be a positive integer, not {resync_from!r}")
    signed = _decode(message, max_bytes=max_bytes)
    statement = signed.statement
    digest = statement.compute_digest()
    if head is not None and statement.sequence <= head.sequence:
        known = _known_digest(statement.sequence, head=head, history=history)
        if known == digest:
            raise SequenceReplay(f"statement {statement.sequence} was already accepted")
    authenticate_statement(
        signed, custodian=custodian, exchange=exchange, registry=registry, now=now, policy=policy
    )
    resynchronised = _verify_chain(
        statement, digest=digest, head=head, history=history, resync_from=resync_from
    )
    plan = receiver.plan(statement, disclosure)
    new_head = ChainHead(
        custodian=statement.custodian,
        exchange=statement.exchange,
        sequence=statement.sequence,
        digest=digest,
        issued_at=statement.issued_at,
    )
    return VerifiedStatement(
        signed=signed,
        digest=digest,
        head=new_head,
        trees_plan=plan,
        resynchronised=resynchronised,
    )


def _known_digest(
    sequence: int, *, head: ChainHead, history: Mapping[int, bytes] | None
) -> bytes | None:
    if sequence == head.sequence:
        return head.digest
    return None if history is None else history.get(sequence)


def _verify_stream(statement: Statement, *, custodian: str, exchange: str) -> None:
    if (statement.custodian, statement.exchange) != (custodian, exchange):
        raise WrongStream(
            f"statement of {statement.custodian}->{statement.exchange} received on the stream "
            f"{custodian}->{exchange}"
        )


def verify_statement_signatures(
    signed: SignedStatement,
    *,
    registry: KeyRegistry,
    now: datetime,
    digest: bytes | None = None,
) -> None:
    """Step 4: the custodian signature and the quorum of distinct co-signers."""
    statement = signed.statement
    if digest is None:
        digest = statement.compute_digest()
    at = statement.issued_at
    custodian_key = registry.resolve(
        signed.custodian_signature.key_id,
        principal=statement.custodian,
        role=KeyRole.CUSTODIAN,
        at=at,
        now=now,
    )
    verify_p256_digest(
        public_key=custodian_key.public_key,
        digest=digest,
        signature=signed.custodian_signature.signature,
    )
    quorum = signed.quorum_signature
    threshold = registry.quorum_threshold(statement.custodian)
    records = [
        registry.resolve(
            key_id, principal=statement.custodian, role=KeyRole.COSIGNER, at=at, now=now
        )
        for key_id in quorum.signers
    ]
    parties = {record.owner for record in records}
    if len(parties) < threshold:
        raise MissingQuorum(
            f"{len(parties)} distinct co-signer(s) of {statement.custodian} "
            f"({len(records)} key(s)), {threshold} required"
        )
    bls.verify_aggregate(
        public_keys=[record.public_key for record in records],
        message=digest,
        signature=quorum.signature,
    )


def _verify_time(statement: Statement, *, now: datetime, policy: VerificationPolicy) -> None:
    if statement.issued_at > now + policy.max_clock_skew:
        raise FutureDated(
            f"issued_at {format_timestamp(statement.issued_at)} is more than "
            f"{policy.max_clock_skew.total_seconds():g}s ahead of {format_timestamp(now)}"
        )
    if now >= statement.expires_at:
        raise Expired(
            f"statement {statement.sequence} expired at {format_timestamp(statement.expires_at)}"
        )
    if statement.expires_at - statement.issued_at > policy.max_lifetime:
        raise PolicyViolation(
            f"statement {statement.sequence} is valid for "
            f"{statement.expires_at - statement.issued_at}, longer than {policy.max_lifetime}"
        )
    for point in statement.prices:
        if point.observed_at > statement.issued_at + policy.max_clock_skew:
            raise PolicyViolation(
                f"price {point.price.asset}/{point.price.quote} observed at "
                f"{format_timestamp(point.observed_at)}, after the statement was issued"
            )


def _verify_chain(
    statement: Statement,
    *,
    digest: bytes,
    head: ChainHead | None,
    history: Mapping[int, bytes] | None,
    resync_from: int | None,
) -> bool:
    """Step 6. Returns True when the statement is accepted as a resynchronisation (not linked
    to the head), False when it extends the head (or is the first)."""
    if head is None:
        if statement.kind is not StatementKind.SNAPSHOT:
            raise SequenceGap(
                f"no accepted statement yet; delta {statement.sequence} needs a snapshot first"
            )
        return False
    if (statement.custodian, statement.exchange) != (head.custodian, head.exchange):
        raise BrokenChain(
            f"statement of {statement.custodian}->{statement.exchange} checked against the "
            f"chain of {head.custodian}->{head.exchange}"
        )
    if statement.sequence <= head.sequence:
        known = _known_digest(statement.sequence, head=head, history=history)
        if known is not None and known != digest:
            raise ForkDetected(
                f"two different signed statements with sequence {statement.sequence}: "
                f"{known.hex()[:16]} accepted, {digest.hex()[:16]} received"
            )
        raise SequenceReplay(
            f"sequence {statement.sequence} is not newer than accepted {head.sequence}"
        )
    if statement.sequence > head.sequence + 1:
        if (
            resync_from is not None
            and statement.kind is StatementKind.SNAPSHOT
            and statement.sequence >= resync_from
        ):
            # The snapshot the receiver asked for: it restates every leaf, so nothing of the
            # head's state is needed; the skipped links are checked later against the log.
            # Time still runs forwards.
            _verify_not_before(statement, head=head)
            return True
        # The receiver asks the custodian for a snapshot and waits; the chain never skips.
        raise SequenceGap(f"sequence {statement.sequence} after {head.sequence}: gap in the chain")
    if statement.previous != head.digest:
        # A validly signed successor of a statement other than the one accepted: the custodian
        # signed two different statements at sequence head.sequence.
        raise ForkDetected(
            f"statement {statement.sequence} extends {statement.previous.hex()[:16]}, but "
            f"{head.digest.hex()[:16]} was accepted at sequence {head.sequence}"
        )
    _verify_not_before(statement, head=head)
    return False


def _verify_not_before(statement: Statement, *, head: ChainHead) -> None:
    if statement.issued_at < head.issued_at:
        raise BrokenChain(
            f"statement {statement.sequence} is dated before its predecessor "
            f"({format_timestamp(statement.issued_at)} < {format_timestamp(head.issued_at)})"
        )
