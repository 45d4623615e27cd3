"""Prices for the custodian: pluggable sources, the price snapshot an attestation states, and the
staleness rule.

What this module does: define :class:`PriceSource` (anything that can fetch timestamped
:class:`~attestations.statement.PricePoint` values; the I/O edge), provide
:class:`FilePriceSource` (a JSON file, the default of the demo set-up) and
:class:`StaticPriceSource` (fixed points, for tests), decode a price document strictly
(:func:`parse_price_document`), and build a :class:`PriceSnapshot` (:func:`compute_price_snapshot`):
the latest price of each asset in one quote, with the stale and missing assets flagged and
future-dated observations rejected. :func:`require_fresh` is the gate every decision that acts on
a price goes through: a stale or missing price raises, so it can never drive a liquidation.

What it does not do: read the clock (``now`` is passed in), convert amounts (that is
:meth:`attestations.amounts.Price.compute_value`), or decide what a stale price means for credit
(the exchange's policy).

Price document (the file source's format): a JSON array of objects with exactly these members::

    [
      {"asset": "BTC", "quote": "USD", "price": "64123.45", "source": "file:sample-prices",
       "observed_at": "2025-11-25T07:59:30.000Z"}
    ]

``asset`` and ``quote`` are asset codes (``[A-Z][A-Z0-9]{1,15}``), ``price`` a canonical unsigned
decimal string (its fraction digits are the scale; never a JSON number), ``source`` 1-128 visible
ASCII characters, ``observed_at`` a UTC timestamp with milliseconds. The JSON is read with the
project's strict reader (UTF-8, no duplicate keys, no floats, bounded size and nesting). Several
entries may name one pair (a history, or several sources); the snapshot picks among them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

from attestations.amounts import MAX_DECIMALS, validate_asset_code
from attestations.canonical import MAX_MESSAGE_BYTES, format_timestamp, parse_json_object
from attestations.errors import ConfigurationError, DecodeError, FloatRejected
from attestations.statement import PricePoint
from custodian.errors import (
    InvalidPriceFeed,
    MissingPrice,
    PriceSourceUnavailable,
    StalePrice,
)

DEFAULT_MAX_AGE: Final = timedelta(minutes=15)
"""A price observed more than this before ``now`` is stale."""
DEFAULT_MAX_FUTURE: Final = timedelta(seconds=5)
"""A price observed more than this after ``now`` is rejected (the feed's clock is ahead, or the
point is forged). Keep it well below the exchanges' clock-skew window (30 s by default in
:mod:`attestations.verify`), which refuses a statement whose prices postdate it."""
MAX_FUTURE_LIMIT: Final = timedelta(minutes=1)

REJECTED_FUTURE_DATED: Final = "future_dated"


@runtime_checkable
class PriceSource(Protocol):
    """Where prices come from. ``fetch_prices`` does the I/O (read a file, ask a feed) and returns
    well-formed points, or raises :class:`~custodian.errors.PriceSourceUnavailable` (retriable)
    or :class:`~custodian.errors.InvalidPriceFeed`. It does not select or judge freshness:
    :func:`compute_price_snapshot` does, the same way for every source. ``now`` is the caller's
    clock, for sources that ask for prices as of a moment; the file source ignores it."""

    def fetch_prices(self, now: datetime) -> tuple[PricePoint, ...]: ...


def parse_price_document(
    data: bytes, *, origin: str, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[PricePoint, ...]:
    """Strictly decode a price document (see the module docstring) into its points, in document
    order. ``origin`` names the source (a file path) in every error: :class:`InvalidPriceFeed`."""
    if not isinstance(data, bytes):
        raise InvalidPriceFeed(f"{origin}: expected bytes, got {type(data).__name__}")
    # The strict reader takes one JSON object; the document is an array, so it is read as the
    # single member of {"prices": ...}. Only a document that is exactly one JSON value yields an
    # object whose one member is "prices" (anything that closes the object early or adds a member
    # is a syntax error, a duplicate key, or an unknown member refused below), and the reader's
    # guards (size, nesting depth before recursion, floats, duplicate keys) all apply.
    try:
        wrapper = parse_json_object(b'{"prices":' + data + b"}", max_bytes=max_bytes + 12)
    except FloatRejected as exc:
        raise InvalidPriceFeed(
            f"{origin}: a float number in the document (prices are decimal strings): {exc}"
        ) from exc
    except DecodeError as exc:
        raise InvalidPriceFeed(f"{origin}: not a strict JSON price document: {exc}") from exc
    if set(wrapper) != {"prices"}:
        raise InvalidPriceFeed(f"{origin}: not a single JSON array")
    entries = wrapper["prices"]
    if not isinstance(entries, list):
        raise InvalidPriceFeed(
            f"{origin}: the document must be a JSON array of prices, not {type(entries).__name__}"
        )
    points = []
    for index, entry in enumerate(entries):
        try:
            points.append(PricePoint.from_wire(entry))
        except DecodeError as exc:
            raise InvalidPriceFeed(f"{origin}: price [{index}]: {exc}") from exc
    return tuple(points)


def compute_price_document(points: Iterable[PricePoint]) -> bytes:
    """The document :func:`parse_price_document` reads (one point per line, UTF-8)."""
    lines = [json.dumps(point.to_wire(), sort_keys=True) for point in points]
    return ("[\n" + ",\n".join(lines) + "\n]\n").encode("utf-8") if lines else b"[]\n"


@dataclass(frozen=True, slots=True)
class FilePriceSource:
    """Prices from a JSON file in the price-document format, read afresh on every fetch (so an
    operator or a feed process can rewrite it; write a new file and rename it over the old one,
    so a reader never sees half a document)."""

    path: Path
    max_bytes: int = MAX_MESSAGE_BYTES

    def fetch_prices(self, now: datetime) -> tuple[PricePoint, ...]:
        del now  # a file holds what it holds; freshness is judged by the snapshot
        try:
            with self.path.open("rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError as exc:
            raise PriceSourceUnavailable(f"{self.path}: cannot read prices: {exc}") from exc
        if len(data) > self.max_bytes:
            raise InvalidPriceFeed(f"{self.path}: larger than {self.max_bytes} bytes")
        return parse_price_document(data, origin=str(self.path), max_bytes=self.max_bytes)


@dataclass(frozen=True, slots=True)
class StaticPriceSource:
    """A fixed set of points: the in-memory source for tests and examples."""

    points: tuple[PricePoint, ...]

    def fetch_prices(self, now: datetime) -> tuple[PricePoint, ...]:
        del now
        return self.points


# --- the snapshot -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RejectedPrice:
    """An observation the snapshot refused to use, and why (``future_dated``)."""

    point: PricePoint
    reason: str


@dataclass(frozen=True, slots=True)
class PriceSnapshot:
    """The prices of a set of assets in one quote, as of ``taken_at``.

    ``points``: the selected price of each asset that has one, sorted by (asset, quote) - what a
    statement's ``prices`` carries; stale points are included (they are the latest known, and a
    statement states what the custodian used) and listed in ``stale``. ``missing``: requested
    assets without any acceptable price. ``rejected``: observations refused (future-dated).
    """

    quote: str
    taken_at: datetime
    max_age: timedelta
    points: tuple[PricePoint, ...]
    stale: frozenset[str]
    missing: frozenset[str]
    rejected: tuple[RejectedPrice, ...] = ()

    def __post_init__(self) -> None:
        validate_asset_code(self.quote)
        _require_aware(self.taken_at, what="taken_at")
        assets = [point.price.asset for point in self.points]
        if assets != sorted(set(assets)):
            raise DecodeError("snapshot points must be sorted by asset without duplicates")
        if any(point.price.quote != self.quote for point in self.points):
            raise DecodeError(f"every snapshot point must be quoted in {self.quote}")
        if not self.stale <= set(assets):
            raise DecodeError("a stale asset must have a point in the snapshot")
        if self.missing & set(assets):
            raise DecodeError("a missing asset cannot have a point in the snapshot")

    def point(self, asset: str) -> PricePoint | None:
        """The selected point of ``asset`` (fresh or stale), or None."""
        for point in self.points:
            if point.price.asset == asset:
                return point
        return None

    def is_fresh(self, asset: str) -> bool:
        return self.point(asset) is not None and asset not in self.stale


def _require_aware(moment: object, *, what: str) -> None:
    if not isinstance(moment, datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise ConfigurationError(f"{what} must be a timezone-aware datetime")


def _check_window(*, max_age: timedelta, max_future: timedelta) -> None:
    if not isinstance(max_age, timedelta) or max_age <= timedelta(0):
        raise ConfigurationError(f"max_age must be a positive timedelta, not {max_age!r}")
    if not isinstance(max_future, timedelta) or not (
        timedelta(0) <= max_future <= MAX_FUTURE_LIMIT
    ):
        raise ConfigurationError(f"max_future must be between 0 and {MAX_FUTURE_LIMIT}")


def _preference(point: PricePoint) -> tuple[datetime, int, str]:
    """Sort key of the observations of one pair; the greatest wins. The latest observation wins;
    at equal times the lower price (collateral is never over-valued by a tie), then the greater
    source name, so the choice never depends on the order of the input."""
    price = point.price
    value = price.mantissa * 10 ** (MAX_DECIMALS - price.scale)
    return point.observed_at, -value, point.source


def compute_price_snapshot(
    points: Iterable[PricePoint],
    *,
    assets: Iterable[str],
    quote: str,
    now: datetime,
    max_age: timedelta = DEFAULT_MAX_AGE,
    max_future: timedelta = DEFAULT_MAX_FUTURE,
) -> PriceSnapshot:
    """Select, for each of ``assets``, its latest price in ``quote`` among ``points``.

    * An observation dated more than ``max_future`` after ``now`` is rejected (listed in
      ``rejected``, never selected); the latest remaining one is selected.
    * A selected price observed more than ``max_age`` before ``now`` is stale (an age of exactly
      ``max_age`` is still fresh).
    * An asset with no acceptable observation is missing. The quote itself needs no price and is
      skipped when it appears in ``assets``.

    To keep the last known prices across fetches of a source that sends only changes, pass the
    previous snapshot's points along with the new ones.
    """
    validate_asset_code(quote)
    _check_window(max_age=max_age, max_future=max_future)
    _require_aware(now, what="now")
    wanted = {validate_asset_code(asset) for asset in assets} - {quote}
    latest: dict[str, PricePoint] = {}
    rejected: list[RejectedPrice] = []
    for point in points:
        if not isinstance(point, PricePoint):
            raise DecodeError(f"expected PricePoint, got {type(point).__name__}")
        asset = point.price.asset
        if asset not in wanted or point.price.quote != quote:
            continue
        if point.observed_at > now + max_future:
            rejected.append(RejectedPrice(point, REJECTED_FUTURE_DATED))
            continue
        current = latest.get(asset)
        if current is None or _preference(point) > _preference(current):
            latest[asset] = point
    selected = tuple(latest[asset] for asset in sorted(latest))
    stale = frozenset(p.price.asset for p in selected if now - p.observed_at > max_age)
    rejected.sort(key=lambda r: (r.point.price.asset, r.point.observed_at, r.point.source))
    return PriceSnapshot(
        quote=quote,
        taken_at=now,
        max_age=max_age,
        points=selected,
        stale=stale,
        missing=frozenset(wanted - set(latest)),
        rejected=tuple(rejected),
    )


def require_fresh(snapshot: PriceSnapshot, asset: str) -> PricePoint:
    """The fresh price of ``asset`` in the snapshot, or raise: :class:`MissingPrice` when it has
    none, :class:`StalePrice` when it is older than the snapshot's ``max_age``. Every decision
    that acts on a price (a liquidation step, a valuation) goes through this."""
    point = snapshot.point(asset)
    if point is None:
        raise MissingPrice(f"no {asset}/{snapshot.quote} price in the snapshot")
    if asset in snapshot.stale:
        age = snapshot.taken_at - point.observed_at
        raise StalePrice(
            f"{asset}/{snapshot.quote} price from {point.source} was observed at "
            f"{format_timestamp(point.observed_at)}, {age} before "
            f"{format_timestamp(snapshot.taken_at)} (limit {snapshot.max_age})"
        )
    return point
