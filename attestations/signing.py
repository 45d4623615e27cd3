"""Producing a :class:`~attestations.statement.SignedStatement`: the custodian's P-256 signature
plus the co-signers' aggregate BLS signature over one statement digest.

Co-signers are independent parties: each checks the statement it is asked to co-sign (by its own
policy) and returns a :class:`CoSignature`; the custodian aggregates the partial signatures. The
:class:`BlsCosigner` here holds a secret key in memory and exists for co-signer services, tests
and the demo; it signs only digests handed to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from attestations import bls
from attestations.canonical import compute_key_id
from attestations.errors import CounterpartyError, DecodeError, InvariantViolation, MissingQuorum
from attestations.p256 import DigestSigner, verify_p256_digest
from attestations.statement import (
    BLS_ALGORITHM,
    CustodianSignature,
    QuorumSignature,
    SignedStatement,
    Statement,
    require_bytes,
    validate_key_id,
)


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
