"""The statement model: constructor invariants, the wire form and strict decoding, the digest.

Nothing here checks a signature: signatures are opaque bytes to this module (their verification
lives in tests/test_verify.py), so the objects below carry arbitrary bytes of the right length.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestations.amounts import UNITS_LIMIT, Price
from attestations.canonical import parse_json_object
from attestations.errors import (
    AmountError,
    DecodeError,
    FloatRejected,
    NegativeSum,
    SumOverflow,
)
from attestations.merkle import MAX_DEPTH
from attestations.statement import (
    GENESIS_PREVIOUS,
    MAX_ASSETS,
    MAX_COSIGNERS,
    MAX_PRICES,
    MAX_SEQUENCE,
    AssetRoot,
    CustodianSignature,
    PricePoint,
    QuorumSignature,
    SignedStatement,
    Statement,
    StatementKind,
)

NOW = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)
PREVIOUS = hashlib.sha256(b"statement 1").digest()
KEY_A = hashlib.sha256(b"key a").hexdigest()
KEY_B = hashlib.sha256(b"key b").hexdigest()
KEY_C = hashlib.sha256(b"key c").hexdigest()


def key_id(n: int) -> str:
    return hashlib.sha256(n.to_bytes(4, "big")).hexdigest()


def asset_root(asset: str = "BTC", **changes: Any) -> AssetRoot:
    fields: dict[str, Any] = {
        "asset": asset,
        "decimals": 8,
        "root": hashlib.sha256(asset.encode()).digest(),
        "total": 7_150_000_042,
        "count": 3,
        "depth": 2,
    }
    fields.update(changes)
    return AssetRoot(**fields)


def price_point(
    asset: str = "BTC", quote: str = "USD", text: str = "64123.45", **changes: Any
) -> PricePoint:
    fields: dict[str, Any] = {
        "price": Price.parse(asset=asset, quote=quote, text=text),
        "source": "file:test",
        "observed_at": NOW,
    }
    fields.update(changes)
    return PricePoint(**fields)


def statement(**changes: Any) -> Statement:
    """Sequence 1 (the genesis snapshot) unless ``changes`` say otherwise."""
    fields: dict[str, Any] = {
        "custodian": "custodian-a",
        "exchange": "exchange-x",
        "sequence": 1,
        "previous": GENESIS_PREVIOUS,
        "issued_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "kind": StatementKind.SNAPSHOT,
        "assets": (asset_root("BTC"), asset_root("USDC", decimals=6, total=1_025_000_000)),
        "prices": (price_point("BTC"), price_point("USDC", text="1.0000")),
    }
    fields.update(changes)
    return Statement(**fields)


def later_statement(**changes: Any) -> Statement:
    """A sequence-2 delta, so that previous and kind can both vary."""
    fields: dict[str, Any] = {
        "sequence": 2,
        "previous": PREVIOUS,
        "kind": StatementKind.DELTA,
    }
    fields.update(changes)
    return statement(**fields)


def signed_statement(base: Statement | None = None) -> SignedStatement:
    return SignedStatement(
        statement=statement() if base is None else base,
        custodian_signature=CustodianSignature(KEY_A, bytes(range(64))),
        quorum_signature=QuorumSignature(tuple(sorted([KEY_B, KEY_C])), bytes(range(96))),
    )


# --- AssetRoot ----------------------------------------------------------------------------------


def test_asset_root_accepts_its_bounds() -> None:
    asset_root(decimals=0, total=0, count=0, depth=0)
    asset_root(decimals=18, total=UNITS_LIMIT - 1, depth=MAX_DEPTH, count=2**MAX_DEPTH)
    asset_root(depth=3, count=8)  # a full tree: count == 2**depth


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"asset": "btc"}, DecodeError),
        ({"asset": "B"}, DecodeError),
        ({"asset": "B" * 17}, DecodeError),
        ({"decimals": -1}, DecodeError),
        ({"decimals": 19}, DecodeError),
        ({"decimals": True}, DecodeError),
        ({"root": bytes(31)}, DecodeError),
        ({"root": bytes(33)}, DecodeError),
        ({"root": bytearray(32)}, DecodeError),
        ({"total": -1}, NegativeSum),
        ({"total": UNITS_LIMIT}, SumOverflow),
        ({"total": 1.5}, FloatRejected),
        ({"total": True}, AmountError),
        ({"depth": -1}, DecodeError),
        ({"depth": MAX_DEPTH + 1}, DecodeError),
        ({"depth": 2, "count": 5}, DecodeError),  # more leaves than slots
        ({"count": -1}, DecodeError),
        ({"count": True}, DecodeError),
    ],
)
def test_asset_root_rejects(changes: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        asset_root(**changes)


# --- PricePoint ---------------------------------------------------------------------------------


def test_price_point_source_bounds() -> None:
    price_point(source="x")
    price_point(source="~" * 128)


@pytest.mark.parametrize(
    "changes",
    [
        {"price": "64123.45"},
        {"source": ""},
        {"source": "has space"},
        {"source": "x" * 129},
        {"source": "caf\u00e9"},
        {"source": "tab\there"},
        {"observed_at": NOW.replace(tzinfo=None)},
        {"observed_at": NOW + timedelta(microseconds=1)},
        {"observed_at": "2026-11-25T08:00:00.000Z"},
    ],
)
def test_price_point_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        price_point(**changes)


# --- Statement ----------------------------------------------------------------------------------


def test_genesis_and_later_statements_are_accepted() -> None:
    statement()
    later_statement()
    later_statement(kind=StatementKind.SNAPSHOT)  # a later snapshot is fine
    statement(sequence=MAX_SEQUENCE, previous=PREVIOUS, kind=StatementKind.DELTA)
    statement(assets=(), prices=())
    statement(expires_at=NOW + MS)


@pytest.mark.parametrize(
    "changes",
    [
        # sequence 1 starts the chain: 32 zero bytes as previous, and a snapshot
        {"previous": PREVIOUS},
        {"kind": StatementKind.DELTA},
        # every later statement names its predecessor
        {"sequence": 2, "previous": GENESIS_PREVIOUS, "kind": StatementKind.DELTA},
        {"sequence": 2, "previous": GENESIS_PREVIOUS, "kind": StatementKind.SNAPSHOT},
    ],
)
def test_chain_start_rules(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        statement(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"sequence": 0},
        {"sequence": -1},
        {"sequence": MAX_SEQUENCE + 1, "previous": PREVIOUS},
        {"sequence": True},
        {"sequence": 1.0},
        {"previous": bytes(31)},
        {"previous": "00" * 32},
        {"expires_at": NOW},
        {"expires_at": NOW - MS},
        {"issued_at": NOW.replace(tzinfo=None)},
        {"issued_at": NOW + timedelta(microseconds=500)},
        {"expires_at": (NOW + timedelta(hours=1)).replace(tzinfo=None)},
        {"kind": "snapshot"},
        {"custodian": "exchange-x"},  # custodian and exchange are different parties
        {"custodian": ""},
        {"custodian": "Custodian-a"},
        {"custodian": "-custodian"},
        {"custodian": "a" * 65},
        {"custodian": "custodian a"},
        {"exchange": "b\u00f6rse"},
        {"exchange": None},
        {"version": 2},
        {"version": 0},
    ],
)
def test_statement_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        statement(**changes)


def test_party_ids_at_their_bounds() -> None:
    statement(custodian="a" * 64, exchange="0")
    statement(custodian="c.u_s-t", exchange="x9")


def test_assets_must_be_a_sorted_tuple_without_duplicates() -> None:
    btc, usdc = asset_root("BTC"), asset_root("USDC")
    with pytest.raises(DecodeError):
        statement(assets=(usdc, btc))
    with pytest.raises(DecodeError):
        statement(assets=(btc, replace(btc, total=1)))
    with pytest.raises(DecodeError):
        statement(assets=[btc, usdc])
    with pytest.raises(DecodeError):
        statement(assets=(btc, usdc.to_wire()))


def test_prices_must_be_sorted_by_asset_then_quote_without_duplicates() -> None:
    btc_eur, btc_usd = price_point("BTC", "EUR"), price_point("BTC", "USD")
    eth_usd = price_point("ETH", "USD")
    statement(prices=(btc_eur, btc_usd, eth_usd))
    with pytest.raises(DecodeError):
        statement(prices=(btc_usd, btc_eur, eth_usd))
    with pytest.raises(DecodeError):
        statement(prices=(btc_eur, btc_usd, eth_usd, price_point("BTC", "USD", source="file:2")))
    with pytest.raises(DecodeError):
        statement(prices=[btc_eur])
    with pytest.raises(DecodeError):
        statement(prices=(btc_eur.price,))


def _codes(n: int) -> list[str]:
    return sorted(f"A{i:04d}" for i in range(n))


def test_asset_and_price_counts_are_bounded() -> None:
    many_assets = tuple(asset_root(code) for code in _codes(MAX_ASSETS + 1))
    statement(assets=many_assets[:MAX_ASSETS])
    with pytest.raises(DecodeError):
        statement(assets=many_assets)
    many_prices = tuple(price_point(code, "USD") for code in _codes(MAX_PRICES + 1))
    statement(prices=many_prices[:MAX_PRICES])
    with pytest.raises(DecodeError):
        statement(prices=many_prices)


def test_asset_root_lookup() -> None:
    s = statement()
    found = s.asset_root("USDC")
    assert found is not None
    assert found.decimals == 6
    assert s.asset_root("ETH") is None


# --- signatures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "signature"),
    [
        (KEY_A.upper(), bytes(64)),
        (KEY_A[:-1], bytes(64)),
        (KEY_A + "0", bytes(64)),
        (bytes.fromhex(KEY_A), bytes(64)),
        (KEY_A, bytes(63)),
        (KEY_A, bytes(65)),
        (KEY_A, bytes(64).hex()),
    ],
)
def test_custodian_signature_rejects(key: Any, signature: Any) -> None:
    with pytest.raises(DecodeError):
        CustodianSignature(key, signature)


def test_quorum_signature_signers_sorted_distinct_and_bounded() -> None:
    signers = tuple(sorted(key_id(i) for i in range(MAX_COSIGNERS + 1)))
    QuorumSignature(signers[:MAX_COSIGNERS], bytes(96))
    QuorumSignature((), bytes(96))  # an empty quorum is well-formed; verification refuses it
    with pytest.raises(DecodeError):
        QuorumSignature(signers, bytes(96))
    with pytest.raises(DecodeError):
        QuorumSignature((signers[1], signers[0]), bytes(96))
    with pytest.raises(DecodeError):
        QuorumSignature((signers[0], signers[0]), bytes(96))
    with pytest.raises(DecodeError):
        QuorumSignature(list(signers[:2]), bytes(96))  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        QuorumSignature((signers[0].upper(),), bytes(96))
    with pytest.raises(DecodeError):
        QuorumSignature(signers[:2], bytes(95))


def test_signed_statement_parts_are_typed() -> None:
    good = signed_statement()
    with pytest.raises(DecodeError):
        replace(good, statement=good.statement.to_wire())  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        replace(good, custodian_signature=good.quorum_signature)  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        replace(good, quorum_signature=good.custodian_signature)  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        replace(good, version=2)


# --- wire round trips ---------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LAST_MS = (datetime(9990, 1, 1, tzinfo=UTC) - EPOCH) // MS

parties = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
asset_codes = st.from_regex(r"[A-Z][A-Z0-9]{1,15}", fullmatch=True)
hashes = st.binary(min_size=32, max_size=32)


@st.composite
def moments(draw: st.DrawFn) -> datetime:
    """Millisecond instants from 1970 to 9990, in arbitrary fixed UTC offsets (the wire form is
    always UTC; the instant is what must survive)."""
    instant = EPOCH + draw(st.integers(0, LAST_MS)) * MS
    offset = timedelta(minutes=draw(st.integers(-14 * 60, 14 * 60)))
    return instant.astimezone(timezone(offset))


@st.composite
def asset_roots(draw: st.DrawFn, asset: str) -> AssetRoot:
    depth = draw(st.integers(0, MAX_DEPTH))
    return AssetRoot(
        asset=asset,
        decimals=draw(st.integers(0, 18)),
        root=draw(hashes),
        total=draw(st.integers(0, UNITS_LIMIT - 1)),
        count=draw(st.integers(0, 2**depth)),
        depth=depth,
    )


@st.composite
def price_points(draw: st.DrawFn, pair: tuple[str, str]) -> PricePoint:
    scale = draw(st.integers(0, 18))
    mantissa = draw(st.integers(0, UNITS_LIMIT - 1))
    return PricePoint(
        price=Price(pair[0], pair[1], mantissa, scale),
        source=draw(st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True)),
        observed_at=draw(moments()),
    )


@st.composite
def statements(draw: st.DrawFn) -> Statement:
    custodian = draw(parties)
    exchange = draw(parties.filter(lambda p: p != custodian))
    sequence = draw(st.one_of(st.just(1), st.integers(2, MAX_SEQUENCE)))
    if sequence == 1:
        previous, kind = GENESIS_PREVIOUS, StatementKind.SNAPSHOT
    else:
        previous = draw(hashes.filter(lambda h: h != GENESIS_PREVIOUS))
        kind = draw(st.sampled_from(StatementKind))
    issued_at = draw(moments())
    codes = sorted(draw(st.lists(asset_codes, max_size=4, unique=True)))
    pairs = sorted(
        draw(
            st.lists(
                st.tuples(asset_codes, asset_codes).filter(lambda p: p[0] != p[1]),
                max_size=4,
                unique=True,
            )
        )
    )
    return Statement(
        custodian=custodian,
        exchange=exchange,
        sequence=sequence,
        previous=previous,
        issued_at=issued_at,
        expires_at=issued_at + draw(st.integers(1, 10**11)) * MS,
        kind=kind,
        assets=tuple(draw(asset_roots(code)) for code in codes),
        prices=tuple(draw(price_points(pair)) for pair in pairs),
    )


@st.composite
def signed_statements(draw: st.DrawFn) -> SignedStatement:
    key_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
    signers = draw(st.lists(key_ids, max_size=MAX_COSIGNERS, unique=True))
    return SignedStatement(
        statement=draw(statements()),
        custodian_signature=CustodianSignature(
            draw(key_ids), draw(st.binary(min_size=64, max_size=64))
        ),
        quorum_signature=QuorumSignature(
            tuple(sorted(signers)), draw(st.binary(min_size=96, max_size=96))
        ),
    )


@settings(max_examples=200, deadline=None)
@given(original=statements())
def test_statement_wire_round_trip(original: Statement) -> None:
    data = original.canonical_bytes()
    decoded = Statement.from_wire(parse_json_object(data))
    assert decoded == original
    assert decoded.canonical_bytes() == data
    assert decoded.compute_digest() == original.compute_digest()
    # The documented digest: SHA-256("mcb/statement/v1" || 0x00 || RFC 8785 bytes).
    assert original.compute_digest() == hashlib.sha256(b"mcb/statement/v1\x00" + data).digest()


@settings(max_examples=100, deadline=None)
@given(original=signed_statements())
def test_signed_statement_wire_round_trip(original: SignedStatement) -> None:
    data = original.encode()
    decoded = SignedStatement.decode(data)
    assert decoded == original
    assert decoded.encode() == data
    assert decoded.digest == original.digest == original.statement.compute_digest()


def test_wire_form_carries_amounts_as_strings_and_times_in_utc() -> None:
    east = timezone(timedelta(hours=2))
    s = statement(issued_at=NOW.astimezone(east))
    wire = s.to_wire()
    assert wire["issued_at"] == "2026-11-25T08:00:00.000Z"
    assert wire["assets"][0]["total"] == "7150000042"
    assert wire["prices"][0]["price"] == "64123.45"
    assert wire["previous"] == "00" * 32
    # One instant, one digest, whatever the offset of the datetime it was built from.
    assert s.compute_digest() == statement().compute_digest()


def test_decode_respects_the_size_limit() -> None:
    data = signed_statement().encode()
    assert SignedStatement.decode(data, max_bytes=len(data)) == signed_statement()
    with pytest.raises(DecodeError):
        SignedStatement.decode(data, max_bytes=len(data) - 1)


def test_largest_whole_price_survives_the_wire() -> None:
    point = price_point(price=Price("BTC", "USD", UNITS_LIMIT - 1, 0))
    original = statement(prices=(point, price_point("USDC", text="1.0000")))
    decoded = Statement.from_wire(parse_json_object(original.canonical_bytes()))
    assert decoded == original


def test_early_years_survive_the_wire() -> None:
    early = datetime(999, 1, 1, tzinfo=UTC)
    original = statement(issued_at=early, expires_at=early + timedelta(hours=1))
    decoded = Statement.from_wire(parse_json_object(original.canonical_bytes()))
    assert decoded == original


# --- strict decoding ----------------------------------------------------------------------------


def wire_base() -> SignedStatement:
    """A sequence-2 delta, so that every hex member carries a non-trivial value."""
    return signed_statement(later_statement())


def wire() -> dict[str, Any]:
    return copy.deepcopy(wire_base().to_wire())


def _walk(obj: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        obj = obj[int(part)] if part.isdigit() else obj[part]
    return obj


def with_value(path: str, value: Any) -> dict[str, Any]:
    data = wire()
    *parents, last = path.split(".")
    target = _walk(data, ".".join(parents))
    target[int(last) if last.isdigit() else last] = value
    return data


def decode(data: dict[str, Any]) -> SignedStatement:
    # json.dumps, not the canonical encoder: the decoder must not rely on the sender's encoder
    # having refused anything.
    return SignedStatement.decode(json.dumps(data).encode())


def test_the_fixture_wire_decodes() -> None:
    assert decode(wire()) == wire_base()


OBJECT_PATHS = (
    "",
    "statement",
    "statement.assets.0",
    "statement.prices.0",
    "custodian_signature",
    "quorum_signature",
)
MISSING = [(path, key) for path in OBJECT_PATHS for key in sorted(_walk(wire(), path))]


@pytest.mark.parametrize(("path", "key"), MISSING)
def test_missing_member_is_rejected(path: str, key: str) -> None:
    data = wire()
    del _walk(data, path)[key]
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize("path", OBJECT_PATHS)
@pytest.mark.parametrize("extra", ["note", "Version", ""])
def test_unknown_member_is_rejected(path: str, extra: str) -> None:
    data = wire()
    _walk(data, path)[extra] = "unsigned"
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("version", "1"),
        ("version", None),
        ("version", 2),
        ("statement", None),
        ("statement", []),
        ("statement.version", "1"),
        ("statement.version", 2),
        ("statement.sequence", "1"),
        ("statement.sequence", None),
        ("statement.sequence", [1]),
        ("statement.sequence", 0),
        ("statement.previous", 0),
        ("statement.previous", None),
        ("statement.custodian", 7),
        ("statement.custodian", "exchange-x"),
        ("statement.exchange", None),
        ("statement.kind", 1),
        ("statement.kind", None),
        ("statement.kind", "SNAPSHOT"),
        ("statement.kind", "full"),
        ("statement.sequence", 1),  # sequence 1 must name no previous and be a snapshot
        ("statement.assets", {}),
        ("statement.assets", "BTC"),
        ("statement.assets", None),
        ("statement.assets.0", []),
        ("statement.assets.0", "BTC"),
        ("statement.assets.0.asset", 1),
        ("statement.assets.0.asset", "btc"),
        ("statement.assets.0.decimals", "8"),
        ("statement.assets.0.decimals", 19),
        ("statement.assets.0.total", 7_150_000_042),
        ("statement.assets.0.count", "3"),
        ("statement.assets.0.count", 5),
        ("statement.assets.0.depth", None),
        ("statement.assets.0.depth", MAX_DEPTH + 1),
        ("statement.assets.0.root", None),
        ("statement.prices", {}),
        ("statement.prices.0", "64123.45"),
        ("statement.prices.0.price", 64123),
        ("statement.prices.0.asset", None),
        ("statement.prices.0.asset", "USD"),  # a price of USD in USD
        ("statement.prices.0.quote", 5),
        ("statement.prices.0.source", 1),
        ("statement.prices.0.source", ""),
        ("statement.prices.0.observed_at", None),
        ("custodian_signature", "00" * 64),
        ("custodian_signature.algorithm", None),
        ("custodian_signature.algorithm", "ecdsa-p384-sha384"),
        ("custodian_signature.key_id", 5),
        ("custodian_signature.signature", None),
        ("quorum_signature", []),
        ("quorum_signature.algorithm", "bls12381-g2"),
        ("quorum_signature.signers", KEY_A),
        ("quorum_signature.signers", {}),
        ("quorum_signature.signers", [5]),
        ("quorum_signature.signature", []),
    ],
)
def test_wrong_types_and_values_are_rejected(path: str, value: Any) -> None:
    with pytest.raises(DecodeError):
        decode(with_value(path, value))


INTEGER_PATHS = [
    "version",
    "statement.version",
    "statement.sequence",
    "statement.assets.0.decimals",
    "statement.assets.0.count",
    "statement.assets.0.depth",
]


@pytest.mark.parametrize("path", INTEGER_PATHS)
@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_an_integer(path: str, value: bool) -> None:
    with pytest.raises(DecodeError):
        decode(with_value(path, value))


@pytest.mark.parametrize(
    "path",
    [
        *INTEGER_PATHS,
        "statement.previous",
        "statement.issued_at",
        "statement.assets.0.total",
        "statement.assets.0.root",
        "statement.prices.0.price",
        "statement.prices.0.observed_at",
        "custodian_signature.signature",
        "quorum_signature.signers.0",
        "quorum_signature.signature",
        "note",  # even in a member that would be rejected anyway
    ],
)
@pytest.mark.parametrize("spelling", ["1.0", "2.5", "1e0", "1E2", "-0.0", "1e-3"])
def test_a_float_anywhere_is_rejected(path: str, spelling: str) -> None:
    sentinel = 918_273_645
    data = json.dumps(with_value(path, sentinel)).encode()
    assert data.count(b"918273645") == 1
    with pytest.raises(FloatRejected):
        SignedStatement.decode(data.replace(b"918273645", spelling.encode()))


@pytest.mark.parametrize(
    ("path", "value"),
    [("statement.assets.0.total", 7_150_000_042.0), ("statement.prices.0.price", 64123.45)],
)
def test_float_money_is_rejected_after_any_json_parser(path: str, value: float) -> None:
    # A caller that parsed with json.loads hands floats to from_wire; money still refuses them.
    with pytest.raises(FloatRejected):
        SignedStatement.from_wire(with_value(path, value))


HEX_PATHS = [
    ("statement.previous", 32),
    ("statement.assets.0.root", 32),
    ("custodian_signature.key_id", 32),
    ("custodian_signature.signature", 64),
    ("quorum_signature.signers.0", 32),
    ("quorum_signature.signature", 96),
]


@pytest.mark.parametrize(("path", "length"), HEX_PATHS)
def test_hex_is_lowercase_and_of_exact_length(path: str, length: int) -> None:
    value = _walk(wire(), path)
    assert len(value) == 2 * length
    for bad in [
        value.upper(),
        "AB" * length,
        value[:-2],
        value + "00",
        value[:-1],
        "0x" + value[2:],
        " " + value[1:],
        "zz" * length,
    ]:
        with pytest.raises(DecodeError):
            decode(with_value(path, bad))


@pytest.mark.parametrize("path", ["statement.issued_at", "statement.prices.0.observed_at"])
@pytest.mark.parametrize(
    "text",
    [
        "2026-11-25T08:00:00Z",
        "2026-11-25T08:00:00.000+00:00",
        "2026-11-25T08:00:00.000",
        "2026-11-25 08:00:00.000Z",
        "2026-11-25T08:00:00.000z",
        "2026-11-25t08:00:00.000Z",
        "2026-11-25T08:00:00.000000Z",
        "2026-11-25T08:00:00.0Z",
        "2026-02-30T08:00:00.000Z",
        "2026-11-25T24:00:00.000Z",
        "2026-11-25T23:59:60.000Z",
        "0000-01-01T00:00:00.000Z",
        "26-11-25T08:00:00.000Z",
        " 2026-11-25T08:00:00.000Z",
        "2026-11-25T08:00:00.000Z\n",
        "",
        "2026-11-25T08:00:00.\u0661\u0662\u0663Z",
    ],
)
def test_bad_timestamps_are_rejected(path: str, text: str) -> None:
    with pytest.raises(DecodeError):
        decode(with_value(path, text))


def test_timestamp_digits_are_ascii() -> None:
    fullwidth = "\uff12\uff10\uff12\uff16-11-25T08:00:00.000Z"  # "2026" in fullwidth digits
    with pytest.raises(DecodeError):
        decode(with_value("statement.issued_at", fullwidth))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("07150000042", AmountError),
        ("+7150000042", AmountError),
        ("7150000042.0", AmountError),
        ("7.15e9", AmountError),
        (" 7150000042", AmountError),
        ("7150000042 ", AmountError),
        ("7_150_000_042", AmountError),
        ("0x1aa2c1a2a", AmountError),
        ("", AmountError),
        ("\uff17", AmountError),
        ("-1", NegativeSum),
        ("-0", NegativeSum),
        (str(UNITS_LIMIT), SumOverflow),
    ],
)
def test_non_canonical_totals_are_rejected(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(with_value("statement.assets.0.total", text))


@pytest.mark.parametrize(
    "text",
    [
        "064123.45",
        "64123.",
        ".45",
        "+64123.45",
        "6.412345e4",
        "-64123.45",
        "64 123.45",
        "1." + "0" * 19,
        "\uff16",
    ],
)
def test_non_canonical_prices_are_rejected(text: str) -> None:
    with pytest.raises(DecodeError):
        decode(with_value("statement.prices.0.price", text))


def test_price_scale_is_part_of_the_wire_value() -> None:
    decoded = decode(with_value("statement.prices.0.price", "64123.450"))
    price = decoded.statement.prices[0].price
    assert (price.mantissa, price.scale) == (64_123_450, 3)
    assert decoded.digest != wire_base().digest


def test_too_many_assets_prices_and_signers_are_rejected() -> None:
    asset = wire()["statement"]["assets"][0]
    price = wire()["statement"]["prices"][0]
    assets = [{**asset, "asset": code} for code in _codes(MAX_ASSETS + 1)]
    prices = [{**price, "asset": code} for code in _codes(MAX_PRICES + 1)]
    signers = sorted(key_id(i) for i in range(MAX_COSIGNERS + 1))
    # At the limit each list decodes ...
    assert len(decode(with_value("statement.assets", assets[:-1])).statement.assets) == MAX_ASSETS
    assert len(decode(with_value("statement.prices", prices[:-1])).statement.prices) == MAX_PRICES
    decoded = decode(with_value("quorum_signature.signers", signers[:-1]))
    assert len(decoded.quorum_signature.signers) == MAX_COSIGNERS
    # ... and one more is refused.
    with pytest.raises(DecodeError):
        decode(with_value("statement.assets", assets))
    with pytest.raises(DecodeError):
        decode(with_value("statement.prices", prices))
    with pytest.raises(DecodeError):
        decode(with_value("quorum_signature.signers", signers))


def test_unsorted_or_repeated_signers_are_rejected() -> None:
    signers = sorted([KEY_B, KEY_C])
    with pytest.raises(DecodeError):
        decode(with_value("quorum_signature.signers", signers[::-1]))
    with pytest.raises(DecodeError):
        decode(with_value("quorum_signature.signers", [signers[0], signers[0]]))


def test_unsorted_or_repeated_assets_are_rejected() -> None:
    assets = wire()["statement"]["assets"]
    with pytest.raises(DecodeError):
        decode(with_value("statement.assets", assets[::-1]))
    with pytest.raises(DecodeError):
        decode(with_value("statement.assets", [assets[0], assets[0]]))


def test_duplicate_json_keys_are_rejected() -> None:
    data = signed_statement().encode()
    assert data.startswith(b'{"custodian_signature":')
    doubled = data.replace(b'"version":1}', b'"version":1,"version":1}', 1)
    assert doubled != data
    with pytest.raises(DecodeError):
        SignedStatement.decode(doubled)


@pytest.mark.parametrize("kind", [[], {}])
def test_unhashable_kind_is_a_decode_error(kind: Any) -> None:
    with pytest.raises(DecodeError):
        decode(with_value("statement.kind", kind))


# --- the digest ---------------------------------------------------------------------------------


def test_digest_changes_when_any_field_changes() -> None:
    base = later_statement()
    btc, usdc = base.assets
    btc_usd, usdc_usd = base.prices
    variants = {
        "custodian": replace(base, custodian="custodian-b"),
        "exchange": replace(base, exchange="exchange-y"),
        "sequence": replace(base, sequence=3),
        "previous": replace(base, previous=hashlib.sha256(b"other").digest()),
        "issued_at": replace(base, issued_at=NOW - MS),
        "expires_at": replace(base, expires_at=base.expires_at + MS),
        "kind": replace(base, kind=StatementKind.SNAPSHOT),
        "asset dropped": replace(base, assets=(btc,)),
        "asset code": replace(base, assets=(replace(btc, asset="BTX"), usdc)),
        "decimals": replace(base, assets=(replace(btc, decimals=9), usdc)),
        "root": replace(base, assets=(replace(btc, root=bytes(32)), usdc)),
        "total": replace(base, assets=(replace(btc, total=btc.total + 1), usdc)),
        "count": replace(base, assets=(replace(btc, count=4), usdc)),
        "depth": replace(base, assets=(replace(btc, depth=3), usdc)),
        "price value": replace(base, prices=(price_point(text="64123.46"), usdc_usd)),
        "price scale": replace(base, prices=(price_point(text="64123.450"), usdc_usd)),
        "price quote": replace(base, prices=(price_point(quote="EUR"), usdc_usd)),
        "price source": replace(base, prices=(replace(btc_usd, source="file:x"), usdc_usd)),
        "price time": replace(base, prices=(replace(btc_usd, observed_at=NOW - MS), usdc_usd)),
        "price dropped": replace(base, prices=(btc_usd,)),
    }
    digests = {name: s.compute_digest() for name, s in variants.items()}
    assert base.compute_digest() not in digests.values()
    assert len(set(digests.values())) == len(digests)


def test_signatures_are_not_part_of_the_identity() -> None:
    one = signed_statement()
    other = replace(
        one,
        custodian_signature=CustodianSignature(KEY_B, bytes(64)),
        quorum_signature=QuorumSignature((KEY_A,), bytes(96)),
    )
    assert one.digest == other.digest
    assert one.encode() != other.encode()


@pytest.mark.parametrize("version", [True, 1.0])
@pytest.mark.parametrize("make", ["statement", "signed statement"])
def test_version_must_be_the_integer_one(make: str, version: Any) -> None:
    def build() -> object:
        if make == "statement":
            return statement(version=version)
        return replace(signed_statement(), version=version)

    with pytest.raises(DecodeError):
        build()
