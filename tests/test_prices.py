"""Prices: the strict price document and the file source, selection of the latest price per
asset, staleness and future-dated observations, and the freshness gate."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from attestations.amounts import Price
from attestations.errors import ConfigurationError, DecodeError, FloatRejected, TransientError
from attestations.statement import PricePoint
from custodian.errors import (
    InvalidPriceFeed,
    MissingPrice,
    PriceSourceUnavailable,
    PriceUnavailable,
    StalePrice,
)
from custodian.prices import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_FUTURE,
    FilePriceSource,
    PriceSnapshot,
    PriceSource,
    StaticPriceSource,
    compute_price_document,
    compute_price_snapshot,
    parse_price_document,
    require_fresh,
)

NOW = datetime(2025, 11, 25, 8, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def point(
    asset: str,
    price: str,
    *,
    at: datetime = NOW,
    quote: str = "USD",
    source: str = "file:sample-prices",
) -> PricePoint:
    return PricePoint(Price.parse(asset=asset, quote=quote, text=price), source, at)


def snapshot(points: list[PricePoint], *assets: str, **kwargs: object) -> PriceSnapshot:
    return compute_price_snapshot(
        points,
        assets=assets or ("BTC",),
        quote="USD",
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )


# --- the price document and the file source -------------------------------------------------------

SAMPLE = b"""[
  {"asset": "BTC", "quote": "USD", "price": "64123.45", "source": "file:sample-prices",
   "observed_at": "2025-11-25T07:59:30.000Z"},
  {"asset": "BENJI", "quote": "USD", "price": "1.00", "source": "file:sample-prices",
   "observed_at": "2025-11-25T07:50:00.000Z"}
]"""


def test_a_price_file_is_read_into_points(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(SAMPLE)
    source = FilePriceSource(path)
    assert isinstance(source, PriceSource)
    points = source.fetch_prices(NOW)
    assert [p.price.to_wire() for p in points] == ["64123.45", "1.00"]
    assert points[0].price == Price("BTC", "USD", 6412345, 2)
    assert points[1].observed_at == NOW - timedelta(minutes=10)
    assert parse_price_document(compute_price_document(points), origin="x") == points
    assert parse_price_document(compute_price_document([]), origin="x") == ()


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (
            b'[{"asset": "BTC", "quote": "USD", "price": 64123.45, "source": "s", '
            b'"observed_at": "2025-11-25T07:59:30.000Z"}]',
            "float",
        ),
        (
            b'[{"asset": "BTC", "quote": "USD", "price": 64123, "source": "s", '
            b'"observed_at": "2025-11-25T07:59:30.000Z"}]',
            "decimal",
        ),
        (
            b'[{"asset": "BTC", "quote": "USD", "price": "6.4e4", "source": "s", '
            b'"observed_at": "2025-11-25T07:59:30.000Z"}]',
            "decimal",
        ),
        (
            b'[{"asset": "BTC", "quote": "USD", "price": "-1", "source": "s", '
            b'"observed_at": "2025-11-25T07:59:30.000Z"}]',
            "decimal",
        ),
        (b'[{"asset": "BTC", "quote": "USD", "price": "1", "source": "s"}]', "missing"),
        (
            b'[{"asset": "BTC", "quote": "USD", "price": "1", "source": "s", "x": 1, '
            b'"observed_at": "2025-11-25T07:59:30.000Z"}]',
            "unknown",
        ),
        (
            b'[{"asset": "btc", "quote": "USD", "price": "1", "source": "s", '
            b'"observed_at": "2025-11-25T07:59:30.000Z"}]',
            "asset code",
        ),
        (
            b'[{"asset": "BTC", "quote": "USD", "price": "1", "source": "s", '
            b'"observed_at": "2025-11-25 07:59:30"}]',
            "timestamp",
        ),
        (
            b'[{"asset": "BTC", "quote": "USD", "price": "1", "source": "s", "source": "t", '
            b'"observed_at": "2025-11-25T07:59:30.000Z"}]',
            "duplicate",
        ),
        (b'{"asset": "BTC"}', "array"),
        (b'[], "prices": []', "duplicate"),
        (b"[]}{", "JSON"),
        (b"[1]", "JSON object"),
        (b"", "JSON"),
        (b"\xff[]", "UTF-8"),
        (b"[" * 100 + b"]" * 100, "nested"),
    ],
)
def test_malformed_price_files_are_refused_naming_the_file(
    tmp_path: Path, document: bytes, fragment: str
) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(document)
    with pytest.raises(InvalidPriceFeed) as caught:
        FilePriceSource(path).fetch_prices(NOW)
    assert str(path) in str(caught.value)
    assert fragment in str(caught.value)
    assert not caught.value.retriable


def test_a_float_price_is_refused_as_a_float(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(
        b'[{"asset": "BTC", "quote": "USD", "price": 1.5, "source": "s", '
        b'"observed_at": "2025-11-25T07:59:30.000Z"}]'
    )
    with pytest.raises(InvalidPriceFeed) as caught:
        FilePriceSource(path).fetch_prices(NOW)
    assert isinstance(caught.value.__cause__, FloatRejected)


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(SAMPLE)
    with pytest.raises(InvalidPriceFeed, match="larger than 100 bytes"):
        FilePriceSource(path, max_bytes=100).fetch_prices(NOW)


def test_an_unreadable_file_is_transient_and_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(PriceSourceUnavailable) as caught:
        FilePriceSource(path).fetch_prices(NOW)
    assert str(path) in str(caught.value)
    assert caught.value.retriable


def test_a_static_source_serves_its_points() -> None:
    points = (point("BTC", "1"),)
    source = StaticPriceSource(points)
    assert isinstance(source, PriceSource)
    assert source.fetch_prices(NOW) is points


# --- selection ------------------------------------------------------------------------------------


def test_the_latest_price_per_asset_in_the_quote_is_selected() -> None:
    points = [
        point("BTC", "64000.00", at=NOW - timedelta(minutes=3)),
        point("BTC", "64100.00", at=NOW - timedelta(minutes=1)),
        point("BTC", "64050.00", at=NOW - timedelta(minutes=2)),
        point("BTC", "59000.00", at=NOW, quote="EUR"),  # another quote: ignored
        point("ETH", "3150.10", at=NOW - timedelta(minutes=4)),
        point("DOGE", "0.1", at=NOW),  # not requested: ignored
    ]
    result = snapshot(points, "ETH", "BTC", "USD")  # the quote needs no price
    assert [p.price.to_wire() for p in result.points] == ["64100.00", "3150.10"]
    assert [p.price.asset for p in result.points] == ["BTC", "ETH"]  # sorted, as statements need
    assert result.stale == frozenset()
    assert result.missing == frozenset()
    assert result.rejected == ()
    assert result.quote == "USD"
    assert result.taken_at == NOW
    assert result.max_age == DEFAULT_MAX_AGE
    assert result.point("DOGE") is None


def test_ties_are_broken_the_same_way_whatever_the_input_order() -> None:
    tied = [
        point("BTC", "64100.0", source="feed-b"),
        point("BTC", "64099.99", source="feed-a"),
        point("BTC", "64099.990", source="feed-c"),
        point("BTC", "64200", source="feed-d"),
    ]
    chosen = {snapshot(list(order)).points[0] for order in itertools.permutations(tied)}
    # The lower price wins a tie (equal values at other scales: the greater source name).
    assert chosen == {tied[2]}


def test_missing_assets_are_flagged() -> None:
    result = snapshot([point("BTC", "1")], "BTC", "ETH", "BENJI")
    assert result.missing == {"ETH", "BENJI"}
    assert [p.price.asset for p in result.points] == ["BTC"]
    assert result.is_fresh("BTC")
    assert not result.is_fresh("ETH")


# --- staleness ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "stale"),
    [
        (timedelta(0), False),
        (DEFAULT_MAX_AGE - MS, False),
        (DEFAULT_MAX_AGE, False),  # exactly max_age old: still fresh
        (DEFAULT_MAX_AGE + MS, True),
        (timedelta(days=3), True),
    ],
)
def test_staleness_boundary(age: timedelta, stale: bool) -> None:
    result = snapshot([point("BTC", "1", at=NOW - age)])
    assert (result.stale == {"BTC"}) is stale
    assert result.is_fresh("BTC") is not stale
    assert len(result.points) == 1  # a stale price stays in the snapshot, flagged


def test_max_age_is_configurable() -> None:
    points = [point("BTC", "1", at=NOW - timedelta(seconds=61))]
    assert snapshot(points, max_age=timedelta(minutes=1)).stale == {"BTC"}
    assert snapshot(points, max_age=timedelta(minutes=2)).stale == frozenset()


def test_an_older_fresh_price_does_not_hide_behind_a_stale_selection() -> None:
    # Only the latest observation is selected: when it is stale, the asset is stale.
    result = snapshot([point("BTC", "1", at=NOW - timedelta(hours=1))])
    with pytest.raises(StalePrice):
        require_fresh(result, "BTC")


# --- future-dated observations --------------------------------------------------------------------


def test_a_future_dated_observation_is_rejected_and_never_selected() -> None:
    past = point("BTC", "64000", at=NOW - timedelta(minutes=1))
    future = point("BTC", "99999", at=NOW + DEFAULT_MAX_FUTURE + MS)
    result = snapshot([future, past])
    assert result.points == (past,)
    assert [(r.point, r.reason) for r in result.rejected] == [(future, "future_dated")]


def test_an_observation_within_the_clock_skew_is_accepted() -> None:
    ahead = point("BTC", "64000", at=NOW + DEFAULT_MAX_FUTURE)
    assert snapshot([ahead]).points == (ahead,)
    assert snapshot([ahead], max_future=timedelta(0)).missing == {"BTC"}


def test_an_asset_with_only_future_dated_prices_is_missing() -> None:
    result = snapshot([point("BTC", "1", at=NOW + timedelta(hours=1))])
    assert result.missing == {"BTC"}
    with pytest.raises(MissingPrice):
        require_fresh(result, "BTC")


# --- the freshness gate ---------------------------------------------------------------------------


def test_require_fresh_returns_a_fresh_price() -> None:
    fresh = point("BTC", "64000", at=NOW - timedelta(minutes=5))
    assert require_fresh(snapshot([fresh]), "BTC") == fresh


def test_a_stale_price_raises_a_distinct_retriable_error() -> None:
    stale = snapshot([point("BTC", "64000", at=NOW - timedelta(minutes=16))])
    with pytest.raises(StalePrice) as caught:
        require_fresh(stale, "BTC")
    assert not isinstance(caught.value, MissingPrice)
    assert isinstance(caught.value, PriceUnavailable)
    assert isinstance(caught.value, TransientError)
    assert caught.value.reason == "stale_price"
    assert "2025-11-25T07:44:00.000Z" in str(caught.value)
    with pytest.raises(MissingPrice) as missing:
        require_fresh(stale, "ETH")
    assert missing.value.reason == "missing_price"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_age": timedelta(0)},
        {"max_age": timedelta(minutes=-1)},
        {"max_future": timedelta(seconds=-1)},
        {"max_future": timedelta(hours=1)},
        {"now": datetime(2025, 11, 25, 8, 0)},  # noqa: DTZ001  # naive on purpose
    ],
)
def test_bad_windows_and_naive_clocks_are_configuration_errors(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"assets": ["BTC"], "quote": "USD", "now": NOW, **kwargs}
    with pytest.raises(ConfigurationError):
        compute_price_snapshot([point("BTC", "1")], **arguments)  # type: ignore[arg-type]


def test_a_snapshot_is_consistent_by_construction() -> None:
    btc = point("BTC", "1")
    with pytest.raises(DecodeError):
        PriceSnapshot("USD", NOW, DEFAULT_MAX_AGE, (btc, btc), frozenset(), frozenset())
    with pytest.raises(DecodeError):
        PriceSnapshot("USD", NOW, DEFAULT_MAX_AGE, (btc,), frozenset({"ETH"}), frozenset())
    with pytest.raises(DecodeError):
        PriceSnapshot("USD", NOW, DEFAULT_MAX_AGE, (btc,), frozenset(), frozenset({"BTC"}))
    with pytest.raises(DecodeError):
        PriceSnapshot("EUR", NOW, DEFAULT_MAX_AGE, (btc,), frozenset(), frozenset())
