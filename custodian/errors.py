"""Errors of the custody book, placed in the project's one hierarchy (:mod:`attestations.errors`).

* A command that is malformed or cannot be applied (unknown asset, not enough units, an
  idempotency key reused with other content) is the caller's fault: a :class:`CounterpartyError`.
  Retrying the same command cannot help until the book changes.
* A book whose journal and balances disagree is our fault: :class:`BookCorrupted` pages a human.
* A database that is briefly busy or unreachable is :class:`BookUnavailable`: retriable.
* A database whose schema is not at the migration head is :class:`SchemaNotCurrent`.

This module holds no logic; the rules that raise these live in :mod:`custodian.book`.
"""

from __future__ import annotations

from attestations.errors import (
    AmountError,
    ConfigurationError,
    CounterpartyError,
    InvariantViolation,
    TransientError,
)

# --- the caller sent a command that cannot be applied -------------------------------------------


class InvalidQuantity(AmountError):
    """A command quantity that is zero, negative or not below 2**128."""

    reason = "invalid_quantity"


class UnknownAsset(CounterpartyError):
    """A command names an asset the book is not configured for."""

    reason = "unknown_asset"


class InsufficientBalance(CounterpartyError):
    """Applying the command would take an account below zero: a pledge or withdrawal larger than
    the available units, an unpledge or settlement move larger than the pledged units."""

    reason = "insufficient_balance"


class CustodyLimitExceeded(CounterpartyError):
    """A deposit would bring the custodian's total of one asset to 2**128 or more, which no
    attestation sum could carry."""

    reason = "custody_limit_exceeded"


class IdempotencyConflict(CounterpartyError):
    """An idempotency key already recorded for a command with different content."""

    reason = "idempotency_conflict"


# --- our own invariant broke --------------------------------------------------------------------


class BookCorrupted(InvariantViolation):
    """The journal and the balances disagree, or an entry does not balance. Stop and page."""

    reason = "book_corrupted"


# --- retriable ----------------------------------------------------------------------------------


class BookUnavailable(TransientError):
    """The book's database is busy (lock conflict, serialization failure, deadlock) or
    unreachable. The command had no effect; retry it with the same idempotency key."""

    reason = "book_unavailable"


# --- configuration ------------------------------------------------------------------------------


class SchemaNotCurrent(ConfigurationError):
    """The database is not migrated to the schema this code expects."""

    reason = "schema_not_current"


class UnsupportedDatabase(ConfigurationError):
    """The book runs on SQLite and PostgreSQL only."""

    reason = "unsupported_database"
