"""Where a statement is verified: the exchange-side trust decision, fail closed.

:func:`verify_statement` takes a signed statement (or its wire bytes), the verifier's key
registry, the head of the chain it has accepted so far and the current time, and either returns a
:class:`VerifiedStatement` or raises one distinct :class:`~attestations.errors.AttestationError`
subclass. Nothing may be credited from a statement that did not pass. The checks run in this
order, and the order is part of the protocol (docs/protocol.md):

1. decode (malformed, oversized, negative or overflowing sums -> DecodeError / NegativeSum /
   SumOverflow);
2. custodian key known, of the custodian role, for this custodian, valid and not revoked at
   ``issued_at`` -> UnknownKey / KeyNotValid / RevokedKey; ECDSA signature -> BadSignature;
3. co-signers: each known and usable at ``issued_at``, at least the custodian's threshold of
   distinct ones -> MissingQuorum; the aggregate signature -> BadSignature;
4. time: not future-dated beyond the skew window -> FutureDated; not expired -> Expired;
5. chain against the accepted head: same sequence and different digest -> ForkDetected; not newer
   -> SequenceReplay; more than one ahead -> SequenceGap; previous digest or time order wrong ->
   BrokenChain;
6. roots: when the receiver rebuilt the trees from disclosed leaves, each asset's root, total,
   count and depth must match -> RootMismatch / SumMismatch.

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
from attestations.errors import (
    BrokenChain,
    ConfigurationError,
    Expired,
    ForkDetected,
    FutureDated,
    MissingQuorum,
    RootMismatch,
    SequenceGap,
    SequenceReplay,
)
from attestations.keys import KeyRegistry, KeyRole
from attestations.merkle import SumTree
from attestations.p256 import verify_p256_digest
from attestations.statement import SignedStatement, Statement, StatementKind, require_utc

DEFAULT_MAX_CLOCK_SKEW: Final = timedelta(seconds=30)


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
    """How much clock disagreement a verifier tolerates for future-dated statements."""

    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW

    def __post_init__(self) -> None:
        if not timedelta(0) <= self.max_clock_skew <= timedelta(minutes=10):
            raise ConfigurationError("max_clock_skew must be between 0 and 10 minutes")


@dataclass(frozen=True, slots=True)
class VerifiedStatement:
    """A statement that passed every check; the only kind anything may be credited from."""

    signed: SignedStatement
    digest: bytes
    head: ChainHead = field(repr=False)

    @property
    def statement(self) -> Statement:
        return self.signed.statement


def verify_statement(
    message: SignedStatement | bytes,
    *,
    registry: KeyRegistry,
    head: ChainHead | None,
    now: datetime,
    policy: VerificationPolicy = VerificationPolicy(),
    trees: Mapping[str, SumTree] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> VerifiedStatement:
    """Verify ``message`` completely or raise. ``head`` is None only when nothing was accepted
    yet from this stream; then only a snapshot is acceptable as the first trusted statement."""
    require_utc(now, what="now")
    signed = (
        message
        if isinstance(message, SignedStatement)
        else SignedStatement.decode(message, max_bytes=max_bytes)
    )
    statement = signed.statement
    digest = statement.compute_digest()
    verify_statement_signatures(signed, registry=registry, digest=digest)
    _verify_time(statement, now=now, policy=policy)
    _verify_chain(statement, digest=digest, head=head)
    if trees is not None:
        verify_roots(statement, trees=trees)
    new_head = ChainHead(
        custodian=statement.custodian,
        exchange=statement.exchange,
        sequence=statement.sequence,
        digest=digest,
        issued_at=statement.issued_at,
    )
    return VerifiedStatement(signed=signed, digest=digest, head=new_head)


def verify_statement_signatures(
    signed: SignedStatement, *, registry: KeyRegistry, digest: bytes | None = None
) -> None:
    """Steps 2 and 3 alone: the custodian signature and the co-signer quorum. Used by clients and
    regulators that check one statement outside a chain."""
    statement = signed.statement
    if digest is None:
        digest = statement.compute_digest()
    at = statement.issued_at
    custodian_key = registry.resolve(
        signed.custodian_signature.key_id,
        owner=statement.custodian,
        role=KeyRole.CUSTODIAN,
        at=at,
    )
    verify_p256_digest(
        public_key=custodian_key.public_key,
        digest=digest,
        signature=signed.custodian_signature.signature,
    )
    quorum = signed.quorum_signature
    threshold = registry.quorum_threshold(statement.custodian)
    public_keys = [
        registry.resolve(key_id, owner=statement.custodian, role=KeyRole.COSIGNER, at=at).public_key
        for key_id in quorum.signers
    ]
    if len(public_keys) < threshold:
        raise MissingQuorum(
            f"{len(public_keys)} co-signer(s) of {statement.custodian}, {threshold} required"
        )
    bls.verify_aggregate(public_keys=public_keys, message=digest, signature=quorum.signature)


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


def _verify_chain(statement: Statement, *, digest: bytes, head: ChainHead | None) -> None:
    if head is None:
        if statement.kind is not StatementKind.SNAPSHOT:
            raise SequenceGap(
                f"no accepted statement yet; delta {statement.sequence} needs a snapshot first"
            )
        return
    if (statement.custodian, statement.exchange) != (head.custodian, head.exchange):
        raise BrokenChain(
            f"statement of {statement.custodian}->{statement.exchange} checked against the "
            f"chain of {head.custodian}->{head.exchange}"
        )
    if statement.sequence == head.sequence and digest != head.digest:
        raise ForkDetected(
            f"two different statements with sequence {statement.sequence}: "
            f"{head.digest.hex()[:16]} accepted, {digest.hex()[:16]} received"
        )
    if statement.sequence <= head.sequence:
        raise SequenceReplay(
            f"sequence {statement.sequence} is not newer than accepted {head.sequence}"
        )
    if statement.sequence > head.sequence + 1:
        # A snapshot can re-anchor a receiver that missed statements only through the explicit
        # resynchronisation path (the receiver asks for it and checks it against the transparency
        # log); the plain chain rule never skips.
        raise SequenceGap(f"sequence {statement.sequence} after {head.sequence}: gap in the chain")
    if statement.previous != head.digest:
        raise BrokenChain(
            f"statement {statement.sequence} names previous {statement.previous.hex()[:16]}, "
            f"accepted {head.sequence} is {head.digest.hex()[:16]}"
        )
    if statement.issued_at < head.issued_at:
        raise BrokenChain(
            f"statement {statement.sequence} is dated before its predecessor "
            f"({format_timestamp(statement.issued_at)} < {format_timestamp(head.issued_at)})"
        )


def verify_roots(statement: Statement, *, trees: Mapping[str, SumTree]) -> None:
    """Compare the statement's per-asset roots with trees the receiver rebuilt from the leaves it
    was given. Every asset must be present on both sides."""
    stated = {root.asset for root in statement.assets}
    if stated != set(trees):
        raise RootMismatch(
            f"assets in statement {sorted(stated)} differ from disclosed trees {sorted(trees)}"
        )
    for asset_root in statement.assets:
        tree = trees[asset_root.asset]
        if tree.depth != asset_root.depth:
            raise RootMismatch(
                f"{asset_root.asset}: statement depth {asset_root.depth}, disclosed tree depth "
                f"{tree.depth}"
            )
        tree.verify_head(root=asset_root.root, total=asset_root.total, count=asset_root.count)
