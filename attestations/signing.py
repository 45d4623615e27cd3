"""Producing a :class:`~attestations.statement.SignedStatement`: the custodian's P-256 signature
plus the co-signers' aggregate BLS signature over one statement digest.

Co-signers are independent parties. A :class:`Cosigner` checks each statement it is asked to
co-sign against its own view of the stream - fresh, not expiring later than policy allows, and the
exact successor of the last statement it co-signed - and so refuses to help a custodian sign two
different statements at one sequence (equivocation) or skip one. It returns a
:class:`CoSignature`; the custodian aggregates the partial signatures. :class:`BlsCosigner` is the
key alone (in memory: for co-signer services, tests and the demo).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from attestations import bls
from attestations.canonical import compute_key_id
from attestations.errors import (
    BrokenChain,
    CounterpartyError,
    DecodeError,
    Expired,
    ForkDetected,
    FutureDated,
    InvariantViolation,
    MissingQuorum,
    PolicyViolation,
    SequenceGap,
    SequenceReplay,
)
from attestations.p256 import DigestSigner, verify_p256_digest
from attestations.statement import (
    BLS_ALGORITHM,
    CustodianSignature,
    QuorumSignature,
    SignedStatement,
    Statement,
    StatementKind,
    require_bytes,
    require_utc,
    validate_key_id,
)
from attestations.verify import VerificationPolicy


@dataclass(frozen=True, slots=True)
class CoSignature:
    """One co-signer's BLS signature (96 bytes) over a statement digest."""

    key_id: str
    signature: bytes

    def __post_init__(self) -> None:
        validate_key_id(self.key_id)
        require_bytes(self.signature, what="co-signature", length=96)


class BlsCosigner:
    """A co-signer's BLS key held in memory, with its proof of possession for registration."""

    def __init__(self, secret_key: int) -> None:
        self._secret_key = secret_key
        self.public_key = bls.compute_public_key(secret_key)
        self.key_id = compute_key_id(algorithm=BLS_ALGORITHM, public_key=self.public_key)

    @classmethod
    def from_seed(cls, seed: bytes) -> BlsCosigner:
        return cls(bls.generate_secret_key(seed))

    def proof_of_possession(self) -> bytes:
        return bls.prove_possession(self._secret_key)

    def cosign(self, digest: bytes) -> CoSignature:
        require_bytes(digest, what="statement digest", length=32)
        return CoSignature(self.key_id, bls.sign(secret_key=self._secret_key, message=digest))


class Cosigner:
    """A co-signer's key plus its record of the last statement it co-signed per stream."""

    def __init__(self, key: BlsCosigner, *, policy: VerificationPolicy | None = None) -> None:
        self.key = key
        self.policy = policy or VerificationPolicy()
        self._last: dict[tuple[str, str], tuple[int, bytes, datetime]] = {}

    @property
    def key_id(self) -> str:
        return self.key.key_id

    def cosign(self, statement: Statement, *, now: datetime) -> CoSignature:
        """Co-sign ``statement`` if it is fresh and extends this co-signer's view of its stream;
        raise FutureDated / Expired / PolicyViolation / SequenceGap / ForkDetected otherwise.
        Asking again for the statement last co-signed returns the same signature."""
        require_utc(now, what="now")
        skew = self.policy.max_clock_skew
        if statement.issued_at > now + skew:
            raise FutureDated(f"statement {statement.sequence} is dated in the future")
        if now >= statement.expires_at:
            raise Expired(f"statement {statement.sequence} has expired")
        if statement.expires_at - statement.issued_at > self.policy.max_lifetime:
            raise PolicyViolation(f"statement {statement.sequence} lives longer than policy")
        digest = statement.compute_digest()
        stream = (statement.custodian, statement.exchange)
        last = self._last.get(stream)
        if last is not None:
            sequence, last_digest, issued_at = last
            if statement.sequence == sequence and digest != last_digest:
                raise ForkDetected(f"a second, different statement {sequence} to co-sign")
            if statement.sequence < sequence:
                raise SequenceReplay(f"statement {statement.sequence} after co-signed {sequence}")
            if statement.sequence not in (sequence, sequence + 1):
                raise SequenceGap(f"statement {statement.sequence} after co-signed {sequence}")
            if statement.sequence == sequence + 1 and statement.previous != last_digest:
                raise ForkDetected(f"statement {statement.sequence} does not extend {sequence}")
            if statement.issued_at < issued_at:
                raise BrokenChain(f"statement {statement.sequence} is dated before {sequence}")
        elif statement.kind is not StatementKind.SNAPSHOT:
            raise SequenceGap("the first statement a co-signer sees must be a snapshot")
        self._last[stream] = (statement.sequence, digest, statement.issued_at)
        return self.key.cosign(digest)


def compute_quorum_signature(cosignatures: Sequence[CoSignature]) -> QuorumSignature:
    """Aggregate partial signatures into one, listing the signers sorted by key id."""
    if not cosignatures:
        raise MissingQuorum("no co-signatures to aggregate")
    ordered = sorted(cosignatures, key=lambda c: c.key_id)
    ids = [c.key_id for c in ordered]
    if len(set(ids)) != len(ids):
        raise DecodeError("a co-signer appears twice")
    aggregate = bls.aggregate_signatures([c.signature for c in ordered])
    return QuorumSignature(signers=tuple(ids), signature=aggregate)


def sign_digest_checked(signer: DigestSigner, digest: bytes) -> bytes:
    """Sign with ``signer`` and verify the result against its public key before anything leaves,
    so a faulty token cannot publish a signature nobody can verify."""
    signature = signer.sign_digest(digest)
    try:
        verify_p256_digest(public_key=signer.public_key, digest=digest, signature=signature)
    except CounterpartyError as exc:  # a bad or malformed signature here means a broken signer
        raise InvariantViolation(f"signer {signer.key_id[:16]} produced a bad signature") from exc
    return signature


def sign_statement(
    statement: Statement, *, custodian_signer: DigestSigner, cosignatures: Sequence[CoSignature]
) -> SignedStatement:
    """Sign ``statement`` with the custodian key (checked, see :func:`sign_digest_checked`) and
    attach the aggregated co-signatures."""
    digest = statement.compute_digest()
    signature = sign_digest_checked(custodian_signer, digest)
    return SignedStatement(
        statement=statement,
        custodian_signature=CustodianSignature(custodian_signer.key_id, signature),
        quorum_signature=compute_quorum_signature(cosignatures),
    )
