"""Signed checkpoints of the transparency log: the custodian's word on its log's size and root.

A :class:`Checkpoint` states that the custodian's log for one exchange stream had ``size``
entries with Merkle root ``root`` at ``issued_at``. The custodian signs its digest
(``mcb/tree-head/v1``) with the same HSM key that signs statements. Exchanges and regulators keep
the last checkpoint they verified and demand a consistency proof to every newer one; two parties
comparing their checkpoints can prove a split view with the custodian's own signatures (two
signed checkpoints that no consistency proof can join).

Pure: verification takes the key registry; nothing here reads a clock or a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from attestations.canonical import (
    DOMAIN_TREE_HEAD,
    MAX_MESSAGE_BYTES,
    compute_canonical_bytes,
    compute_digest,
    format_timestamp,
    parse_hex,
    parse_json_object,
    parse_timestamp,
)
from attestations.errors import DecodeError, FutureDated, SplitView
from attestations.keys import KeyRegistry, KeyRole
from attestations.p256 import DigestSigner, verify_p256_digest
from attestations.signing import sign_digest_checked
from attestations.statement import (
    P256_ALGORITHM,
    require_int,
    require_members,
    require_utc,
    require_version,
    validate_key_id,
    validate_party,
)
from attestations.translog import (
    MAX_TREE_SIZE,
    LogConsistencyProof,
    TreeHead,
    detect_split_view,
)
from attestations.verify import DEFAULT_MAX_CLOCK_SKEW

CHECKPOINT_VERSION: Final = 1
_CHECKPOINT_KEYS: Final = frozenset({"custodian", "issued_at", "log", "root", "size", "version"})
_SIGNED_KEYS: Final = frozenset({"algorithm", "checkpoint", "key_id", "signature", "version"})


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The state of the custodian's log named ``log`` (the exchange stream it records)."""

    custodian: str
    log: str
    head: TreeHead
    issued_at: datetime
    version: int = CHECKPOINT_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=CHECKPOINT_VERSION, what="checkpoint")
        validate_party(self.custodian, what="custodian")
        validate_party(self.log, what="log name")
        if not isinstance(self.head, TreeHead):
            raise DecodeError("head must be a TreeHead")
        require_utc(self.issued_at, what="issued_at")

    def to_wire(self) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "issued_at": format_timestamp(self.issued_at),
            "log": self.log,
            "root": self.head.root.hex(),
            "size": self.head.size,
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object) -> Checkpoint:
        m = require_members(obj, what="checkpoint", keys=_CHECKPOINT_KEYS)
        require_version(m["version"], expected=CHECKPOINT_VERSION, what="checkpoint")
        head = TreeHead(
            size=require_int(m["size"], what="size", low=0, high=MAX_TREE_SIZE),
            root=parse_hex(m["root"], length=32, what="root"),
        )
        return cls(
            custodian=validate_party(m["custodian"], what="custodian"),
            log=validate_party(m["log"], what="log name"),
            head=head,
            issued_at=parse_timestamp(m["issued_at"]),
        )

    def compute_digest(self) -> bytes:
        return compute_digest(domain=DOMAIN_TREE_HEAD, obj=self.to_wire())


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    key_id: str
    signature: bytes
    version: int = CHECKPOINT_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=CHECKPOINT_VERSION, what="signed checkpoint")
        if not isinstance(self.checkpoint, Checkpoint):
            raise DecodeError("checkpoint must be a Checkpoint")
        validate_key_id(self.key_id)
        if not isinstance(self.signature, bytes) or len(self.signature) != 64:
            raise DecodeError("checkpoint signature must be 64 bytes")

    def to_wire(self) -> dict[str, Any]:
        return {
            "algorithm": P256_ALGORITHM,
            "checkpoint": self.checkpoint.to_wire(),
            "key_id": self.key_id,
            "signature": self.signature.hex(),
            "version": self.version,
        }

    def encode(self) -> bytes:
        return compute_canonical_bytes(self.to_wire())

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> SignedCheckpoint:
        obj = parse_json_object(data, max_bytes=max_bytes)
        m = require_members(obj, what="signed checkpoint", keys=_SIGNED_KEYS)
        require_version(m["version"], expected=CHECKPOINT_VERSION, what="signed checkpoint")
        if m["algorithm"] != P256_ALGORITHM:
            raise DecodeError(f"checkpoint algorithm must be {P256_ALGORITHM}")
        return cls(
            checkpoint=Checkpoint.from_wire(m["checkpoint"]),
            key_id=validate_key_id(m["key_id"]),
            signature=parse_hex(m["signature"], length=64, what="checkpoint signature"),
        )


def sign_checkpoint(checkpoint: Checkpoint, *, signer: DigestSigner) -> SignedCheckpoint:
    signature = sign_digest_checked(signer, checkpoint.compute_digest())
    return SignedCheckpoint(checkpoint=checkpoint, key_id=signer.key_id, signature=signature)


def verify_checkpoint(
    signed: SignedCheckpoint,
    *,
    registry: KeyRegistry,
    now: datetime,
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
) -> Checkpoint:
    """The checkpoint if the custodian's key, usable at ``issued_at`` and ``now``, signed it and
    it is not dated in the future; else raise UnknownKey / RevokedKey / KeyNotValid /
    BadSignature / FutureDated."""
    checkpoint = signed.checkpoint
    if checkpoint.issued_at > now + max_clock_skew:
        raise FutureDated(f"checkpoint dated {format_timestamp(checkpoint.issued_at)} is ahead")
    record = registry.resolve(
        signed.key_id,
        principal=checkpoint.custodian,
        role=KeyRole.CUSTODIAN,
        at=checkpoint.issued_at,
        now=now,
    )
    verify_p256_digest(
        public_key=record.public_key,
        digest=checkpoint.compute_digest(),
        signature=signed.signature,
    )
    return checkpoint


def verify_same_history(
    first: SignedCheckpoint,
    second: SignedCheckpoint,
    *,
    registry: KeyRegistry,
    proof: LogConsistencyProof | None,
    now: datetime,
) -> None:
    """Two parties' checkpoints of one log must describe one history. Both signatures are checked
    first, so a :class:`~attestations.errors.SplitView` raised here is backed by two checkpoints
    the custodian signed: evidence, not an accusation. A log only grows: a checkpoint issued
    later with fewer entries is a rolled-back view, also a split view."""
    a = verify_checkpoint(first, registry=registry, now=now)
    b = verify_checkpoint(second, registry=registry, now=now)
    if (a.custodian, a.log) != (b.custodian, b.log):
        raise DecodeError("the checkpoints are of different logs")
    earlier, later = sorted((a, b), key=lambda c: (c.issued_at, c.head.size))
    if later.head.size < earlier.head.size:
        raise SplitView(
            f"log {a.log} of {a.custodian} shrank from {earlier.head.size} entries at "
            f"{format_timestamp(earlier.issued_at)} to {later.head.size} at "
            f"{format_timestamp(later.issued_at)}"
        )
    detect_split_view(seen_by_a=a.head, seen_by_b=b.head, proof=proof)
