"""The one error hierarchy of the project, split by who is at fault.

* :class:`CounterpartyError` - the other side sent bad data (a malformed message, a bad
  signature, a broken chain, a proof that does not verify). Not retriable: the same bytes will
  fail the same way. Consumers dead-letter the message with :attr:`BridgeError.reason`.
* :class:`InvariantViolation` - our own invariant broke. Page a human; do not continue.
* :class:`TransientError` - a dependency is briefly unavailable. Retriable.
* :class:`ConfigurationError` - the deployment is wrong (missing token, wrong PIN, bad key
  material). Not retriable until an operator acts.

Every class carries a stable machine-readable ``reason`` (used in dead-letter headers, metrics and
test vectors) and a ``retriable`` flag. Third-party exceptions are wrapped at the adapter that calls
the library (``raise TokenUnavailable(...) from exc``); nothing outside an adapter sees them.
"""

from __future__ import annotations

from typing import ClassVar


class BridgeError(Exception):
    """Base of every error raised by this project."""

    reason: ClassVar[str] = "error"
    retriable: ClassVar[bool] = False


# --- the counterparty sent bad data -------------------------------------------------------------


class CounterpartyError(BridgeError):
    """Input from another party is invalid. Reject it; retrying cannot help."""

    reason = "invalid_input"


class DecodeError(CounterpartyError, ValueError):
    """Bytes or JSON that do not parse into a well-formed object (malformed, oversized, wrong type,
    non-canonical, unknown version)."""

    reason = "malformed"


class AmountError(DecodeError):
    """An amount, quantity or price that is not a valid non-negative integer in minor units."""

    reason = "invalid_amount"


class FloatRejected(AmountError, TypeError):
    """A float was offered where money is expected. Money is never a float."""

    reason = "float_rejected"


class AttestationError(CounterpartyError):
    """A statement, signature or proof failed verification. Nothing may be credited from it."""

    reason = "attestation_invalid"


class UnknownKey(AttestationError):
    reason = "unknown_key"


class RevokedKey(AttestationError):
    reason = "revoked_key"


class KeyNotValid(AttestationError):
    """The key exists but signed something dated outside its validity window. (A key of another
    role or party is an UnknownKey: it is not a key of what was asked for.)"""

    reason = "key_not_valid"


class InvalidProofOfPossession(AttestationError):
    """A BLS key offered for registration without a valid proof of possession (rogue-key
    defence)."""

    reason = "invalid_proof_of_possession"


class MissingQuorum(AttestationError):
    reason = "missing_quorum"


class BadSignature(AttestationError):
    reason = "bad_signature"


class SequenceReplay(AttestationError):
    """A statement whose sequence is not newer than the last accepted one. When the receiver knows
    the digest it accepted at that sequence, a *different* statement there is a ForkDetected."""

    reason = "sequence_replay"


class SequenceGap(AttestationError):
    """A statement more than one sequence ahead of the last accepted one. The receiver must ask for
    a snapshot instead of skipping."""

    reason = "sequence_gap"


class ForkDetected(AttestationError):
    """Two different validly signed statements share one sequence. Credit must freeze."""

    reason = "fork"


class BrokenChain(AttestationError):
    """The previous-statement hash does not match, or the chain's time runs backwards."""

    reason = "broken_chain"


class WrongStream(AttestationError):
    """A statement (or disclosure) of another (custodian, exchange) stream than the receiver's."""

    reason = "wrong_stream"


class PolicyViolation(AttestationError):
    """Validly signed, but outside the receiver's policy: a lifetime longer than allowed, asset
    decimals that differ from the receiver's asset table, a price observed in the future."""

    reason = "policy_violation"


class Expired(AttestationError):
    reason = "expired"


class FutureDated(AttestationError):
    reason = "future_dated"


class RootMismatch(AttestationError):
    reason = "root_mismatch"


class SumMismatch(AttestationError):
    reason = "sum_mismatch"


class NegativeSum(AttestationError, ValueError):
    reason = "negative_sum"


class SumOverflow(AttestationError, ValueError):
    reason = "sum_overflow"


class DuplicateLeaf(AttestationError, ValueError):
    """Two leaves share a position, or one account appears twice in one asset tree."""

    reason = "duplicate_leaf"


class InvalidProof(AttestationError):
    """A Merkle inclusion or consistency proof does not verify."""

    reason = "invalid_proof"


class SplitView(AttestationError):
    """Two parties were shown histories that cannot both be true (a transparency-log fork)."""

    reason = "split_view"


# --- our own invariant broke --------------------------------------------------------------------


class InvariantViolation(BridgeError):
    """Something that must never happen did. Stop and page a human."""

    reason = "invariant_violation"


# --- retriable ----------------------------------------------------------------------------------


class TransientError(BridgeError):
    """A dependency is briefly unavailable; the same call may succeed later."""

    reason = "transient"
    retriable = True


class TokenUnavailable(TransientError):
    """The PKCS#11 token did not answer (device busy, session lost)."""

    reason = "token_unavailable"


# --- configuration ------------------------------------------------------------------------------


class ConfigurationError(BridgeError):
    """The deployment is wrong; an operator must fix it."""

    reason = "configuration"


class TokenNotFound(ConfigurationError):
    reason = "token_not_found"


class WrongPin(ConfigurationError):
    reason = "wrong_pin"


class SigningKeyNotFound(ConfigurationError):
    reason = "signing_key_not_found"
