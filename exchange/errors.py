"""Errors of the exchange's margin ledger, placed in the project's one hierarchy
(:mod:`attestations.errors`).

* A statement for a stream whose credit is frozen (a fork was detected) is refused with
  :class:`StreamFrozen`: the counterparty's data cannot be credited until an operator resolves the
  fork, and retrying the same statement cannot help. Consumers dead-letter it with the reason.
* An operator request that names a stream the ledger does not know, or resolves a stream that is
  not frozen, is :class:`UnknownStream` / :class:`StreamNotFrozen`: the request is wrong.
* A collateral policy that breaks its own rules (a rate above 100 %, a liquidation line at or
  above the margin-call level, a non-positive duration) is :class:`InvalidPolicy`: the deployment
  is wrong.
* A ledger change applied over a ledger that moved since it was planned is our own bug and raises
  :class:`~attestations.errors.InvariantViolation` directly.

This module holds no logic; :mod:`exchange.policy` and :mod:`exchange.ledger` raise these.
"""

from __future__ import annotations

from attestations.errors import ConfigurationError, CounterpartyError


class StreamFrozen(CounterpartyError):
    """A statement arrived for a stream frozen after a fork. Nothing is credited from it until an
    operator resolves the fork."""

    reason = "stream_frozen"


class UnknownStream(CounterpartyError):
    """A request names a stream from which the ledger never accepted anything."""

    reason = "unknown_stream"


class StreamNotFrozen(CounterpartyError):
    """A fork resolution for a stream that is not frozen."""

    reason = "stream_not_frozen"


class InvalidPolicy(ConfigurationError):
    """The collateral policy is inconsistent or out of range."""

    reason = "invalid_policy"
