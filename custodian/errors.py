"""Errors of the custody book, placed in the project's one hierarchy (:mod:`attestations.errors`).

* A command that is malformed or cannot be applied (unknown asset, not enough units, an
  idempotency key reused with other content) is the caller's fault: a :class:`CounterpartyError`.
  Retrying the same command cannot help until the book changes.
* A book whose journal and balances disagree is our fault: :class:`BookCorrupted` pages a human.
* A database that is briefly busy or unreachable is :class:`BookUnavailable`: retriable.
* A database whose schema is not at the migration head is :class:`SchemaNotCurrent`.
* Prices (:mod:`custodian.prices`): a price source whose content does not decode is
  :class:`InvalidPriceFeed` (the feed's fault); one that cannot be read right now is
  :class:`PriceSourceUnavailable`; a price too old or absent when one is required is
  :class:`StalePrice` / :class:`MissingPrice` - retriable, because the next fetch may bring a fresh
  one, and never a reason to act on the old one.
* Yield (:mod:`custodian.yields`): a rate that is not an exact non-negative fraction is
  :class:`InvalidRate`.

This module holds no logic; the rules that raise these live in :mod:`custodian.book`,
:mod:`custodian.prices` and :mod:`custodian.yields`.
"""

from __future__ import annotations

from attestations.errors import (
    AmountError,
    ConfigurationError,
    CounterpartyError,
    DecodeError,
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


class InvalidRate(AmountError):
    """A yield rate that is not an exact fraction between 0 and 1 a day (a float, a negative
    rate, a zero denominator, an absurd annual rate)."""

    reason = "invalid_rate"


# --- a price source sent data that does not decode ----------------------------------------------


class InvalidPriceFeed(DecodeError):
    """The content of a price source is malformed: not strict JSON, a float price, a member
    missing or unknown, a bad asset code or timestamp. The message names the source (the file
    path) and the offending entry. The same content fails the same way: fix the feed."""

    reason = "invalid_price_feed"


# --- our own invariant broke --------------------------------------------------------------------


class BookCorrupted(InvariantViolation):
    """The journal and the balances disagree, or an entry does not balance. Stop and page."""

    reason = "book_corrupted"


# --- retriable ----------------------------------------------------------------------------------


class PriceSourceUnavailable(TransientError):
    """A price source could not be read (file missing or unreadable, feed not answering)."""

    reason = "price_source_unavailable"


class PriceUnavailable(TransientError):
    """No usable price for an asset where one is required. A later snapshot may have one; until
    then nothing may be decided on this asset's price (no liquidation, no valuation)."""

    reason = "price_unavailable"


class StalePrice(PriceUnavailable):
    """The latest price of the asset was observed more than the allowed age before now. A stale
    price never drives a liquidation."""

    reason = "stale_price"


class MissingPrice(PriceUnavailable):
    """The snapshot has no price at all for the asset in the required quote."""

    reason = "missing_price"


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
