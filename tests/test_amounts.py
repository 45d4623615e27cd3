"""Amounts, prices and the canonical wire helpers: integers only, strict parsing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestations.amounts import (
    UNITS_LIMIT,
    Amount,
    Asset,
    Price,
    check_units,
    format_units,
    parse_units,
    validate_asset_code,
)
from attestations.canonical import (
    MAX_NESTING,
    compute_canonical_bytes,
    compute_digest,
    compute_key_id,
    format_timestamp,
    parse_json_object,
    parse_timestamp,
)
from attestations.errors import (
    AmountError,
    DecodeError,
    FloatRejected,
    NegativeSum,
    SumOverflow,
)


@given(st.integers(min_value=0, max_value=UNITS_LIMIT - 1))
def test_units_round_trip(value: int) -> None:
    assert parse_units(format_units(value)) == value


@pytest.mark.parametrize(
    "text", ["01", "+1", " 1", "1 ", "1.0", "1e3", "", "0x10", "\u0661", "1_000"]
)
def test_non_canonical_decimal_strings_are_rejected(text: str) -> None:
    with pytest.raises(AmountError):
        parse_units(text)


def test_negative_and_overflow_have_their_own_errors() -> None:
    with pytest.raises(NegativeSum):
        parse_units("-5")
    with pytest.raises(SumOverflow):
        parse_units(str(UNITS_LIMIT))
    with pytest.raises(NegativeSum):
        check_units(-1)
    with pytest.raises(SumOverflow):
        format_units(UNITS_LIMIT)


@pytest.mark.parametrize("value", [1.0, 0.5, float("nan"), float("inf")])
def test_float_is_never_money(value: float) -> None:
    with pytest.raises(FloatRejected):
        check_units(value)
    with pytest.raises(FloatRejected):
        parse_units(value)
    with pytest.raises(FloatRejected):
        Amount("BTC", value)  # type: ignore[arg-type]
    with pytest.raises(FloatRejected):
        Price.parse(asset="BTC", quote="USD", text=value)
    # FloatRejected is also a TypeError, so generic callers see a type problem.
    with pytest.raises(TypeError):
        check_units(value)


def test_bool_is_not_an_amount() -> None:
    with pytest.raises(AmountError):
        check_units(True)


def test_amount_arithmetic_keeps_assets_apart() -> None:
    assert Amount("BTC", 5) + Amount("BTC", 7) == Amount("BTC", 12)
    with pytest.raises(AmountError):
        _ = Amount("BTC", 5) + Amount("ETH", 7)
    with pytest.raises(AmountError) as caught:
        _ = Amount("BTC", 5) - Amount("BTC", 7)
    assert not isinstance(caught.value, NegativeSum)  # our arithmetic, not a counterparty's sum


@pytest.mark.parametrize("code", ["btc", "B", "BTC-X", "", "ABCDEFGHIJKLMNOPQ", "1BTC", 7])
def test_bad_asset_codes(code: object) -> None:
    with pytest.raises(DecodeError):
        validate_asset_code(code)


def test_asset_decimals_bounded() -> None:
    assert Asset("BTC", 8).decimals == 8
    with pytest.raises(DecodeError):
        Asset("BTC", 19)


@pytest.mark.parametrize(
    ("text", "mantissa", "scale"),
    [("64123.45", 6412345, 2), ("64123.450", 6412345 * 10, 3), ("1", 1, 0), ("0.000001", 1, 6)],
)
def test_price_parse_keeps_the_scale(text: str, mantissa: int, scale: int) -> None:
    price = Price.parse(asset="BTC", quote="USD", text=text)
    assert (price.mantissa, price.scale) == (mantissa, scale)
    assert price.to_wire() == text


@pytest.mark.parametrize("text", ["-1", "1.", ".5", "01.5", "1e5", "1,5", "NaN", ""])
def test_price_rejects_non_canonical(text: str) -> None:
    with pytest.raises(AmountError):
        Price.parse(asset="BTC", quote="USD", text=text)


def test_value_conversion_rounds_down() -> None:
    # 1 satoshi at 64123.45 USD/BTC, USD with 2 decimals: 0.0064123 cents -> 0.
    price = Price.parse(asset="BTC", quote="USD", text="64123.45")
    assert price.compute_value(units=1, asset_decimals=8, quote_decimals=2) == 0
    # 1.5 BTC = 96185.175 USD -> 9618517 cents (the half cent is dropped, never rounded up).
    units = 150_000_000
    assert price.compute_value(units=units, asset_decimals=8, quote_decimals=2) == 9_618_517


@given(
    units=st.integers(min_value=0, max_value=10**30),
    mantissa=st.integers(min_value=0, max_value=10**20),
    scale=st.integers(min_value=0, max_value=18),
)
def test_value_never_exceeds_exact_value(units: int, mantissa: int, scale: int) -> None:
    price = Price("BTC", "USD", mantissa, scale)
    value = price.compute_value(units=units, asset_decimals=8, quote_decimals=2)
    exact_numerator = units * mantissa * 100
    denominator = 10 ** (8 + scale)
    assert value * denominator <= exact_numerator < (value + 1) * denominator


def test_canonical_bytes_follow_rfc8785_ordering() -> None:
    assert compute_canonical_bytes({"b": 1, "a": "x", "c": [True, None]}) == (
        b'{"a":"x","b":1,"c":[true,null]}'
    )


def test_canonical_rejects_float_and_unsafe_integers() -> None:
    with pytest.raises(FloatRejected):
        compute_canonical_bytes({"a": 1.5})
    with pytest.raises(DecodeError):
        compute_canonical_bytes({"a": 2**53})


def test_digest_is_domain_separated() -> None:
    obj = {"version": 1}
    one = compute_digest(domain="mcb/statement/v1", obj=obj)
    two = compute_digest(domain="mcb/tree-head/v1", obj=obj)
    assert one != two
    with pytest.raises(DecodeError):
        compute_digest(domain="statement", obj=obj)


def test_key_id_binds_algorithm_and_key() -> None:
    a = compute_key_id(algorithm="ecdsa-p256-sha256", public_key=b"\x04" + bytes(64))
    b = compute_key_id(algorithm="bls12381-g2-pop", public_key=b"\x04" + bytes(64))
    assert a != b
    assert len(a) == 64


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1,"a":2}',
        b'{"a":1.5}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b"[1,2]",
        b"\xff\xfe",
        b'{"a":',
        b'{"a":' + b"[" * 40 + b"]" * 40 + b"}",
        b'{"a":9007199254740993}',
    ],
)
def test_strict_json_reader_rejects(data: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_json_object(data)


def test_strict_json_reader_bounds_size() -> None:
    big = b'{"a":"' + b"x" * 2000 + b'"}'
    assert parse_json_object(big, max_bytes=3000)["a"] == "x" * 2000
    with pytest.raises(DecodeError):
        parse_json_object(big, max_bytes=1000)


def test_nesting_is_bounded_before_parsing() -> None:
    # Top-level object at depth 1; 31 arrays inside it reach exactly MAX_NESTING.
    inner = MAX_NESTING - 1
    expected: list[object] = []
    for _ in range(inner - 1):
        expected = [expected]
    ok = b'{"a":' + b"[" * inner + b"]" * inner + b"}"
    assert parse_json_object(ok) == {"a": expected}
    with pytest.raises(DecodeError, match="nested deeper"):
        parse_json_object(b'{"a":' + b"[" * (inner + 1) + b"]" * (inner + 1) + b"}")


@pytest.mark.parametrize(
    "text",
    [
        '{"a":"' + "[" * 100 + '"}',
        '{"a":"\\\\"' + ',"b":"' + "{" * 100 + '"}',
        '{"a":"\\"' + "[" * 100 + '"}',
        '{"' + "[" * 100 + '":1}',
    ],
)
def test_brackets_inside_strings_do_not_count_as_nesting(text: str) -> None:
    assert len(parse_json_object(text)) >= 1


def test_escaped_quote_does_not_end_the_string_for_the_nesting_scan() -> None:
    # If the scan took \" for the closing quote it would count the brackets after it.
    text = '{"a":"\\"' + "[" * 100 + '\\"' + "]" * 100 + '"}'
    assert parse_json_object(text) == {"a": '"' + "[" * 100 + '"' + "]" * 100}


def test_deep_nesting_is_a_decode_error_not_a_crash() -> None:
    # py_ecc (imported by attestations.bls) raises the recursion limit to 100000, so the json
    # module's recursion would overflow the C stack long before RecursionError: run it in a child
    # so a regression shows up as a signal, not as a dead test runner.
    script = textwrap.dedent(
        """
        import sys
        import attestations.bls
        assert sys.getrecursionlimit() >= 100000, sys.getrecursionlimit()
        from attestations.canonical import parse_json_object
        parse_json_object(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("attestations.errors.DecodeError: JSON containers nested"), (
        result.stderr[-2000:]
    )


@pytest.mark.parametrize("digits", [17, 4301, 100_000])
def test_long_integer_literals_are_decode_errors(digits: int) -> None:
    for sign in (b"", b"-"):
        with pytest.raises(DecodeError, match="interoperable"):
            parse_json_object(b'{"a":' + sign + b"9" * digits + b"}")


def test_integer_literals_at_the_bounds() -> None:
    assert parse_json_object(b'{"a":9007199254740991}')["a"] == 2**53 - 1
    assert parse_json_object(b'{"a":-9007199254740991}')["a"] == -(2**53 - 1)
    with pytest.raises(DecodeError):
        parse_json_object(b'{"a":9999999999999999}')  # 16 digits, past the range


def test_lone_surrogate_in_a_str_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        parse_json_object('{"a":"\ud800"}')


def test_bytes_like_and_str_inputs_are_accepted() -> None:
    data = b'{"a":[1,"x"]}'
    expected = {"a": [1, "x"]}
    assert parse_json_object(data) == expected
    assert parse_json_object(bytearray(data)) == expected
    assert parse_json_object(memoryview(data)) == expected
    assert parse_json_object(data.decode()) == expected


@pytest.mark.parametrize("data", [10**9, None, 1.5, [b"{}"], {"a": 1}, object()])
def test_other_input_types_are_decode_errors(data: object) -> None:
    with pytest.raises(DecodeError):
        parse_json_object(data)  # type: ignore[arg-type]


def test_size_bound_applies_to_every_input_type() -> None:
    big = b'{"a":"' + b"x" * 2000 + b'"}'
    for data in (big, bytearray(big), memoryview(big), big.decode()):
        with pytest.raises(DecodeError, match="exceeds"):
            parse_json_object(data, max_bytes=1000)
    # A str is bounded by its UTF-8 length, not its length in code points.
    wide = '{"a":"' + "\u00e9" * 600 + '"}'
    with pytest.raises(DecodeError, match="exceeds"):
        parse_json_object(wide, max_bytes=1000)


def test_timestamps_have_one_form() -> None:
    moment = datetime(2026, 11, 25, 8, 0, 1, 123000, tzinfo=UTC)
    text = format_timestamp(moment)
    assert text == "2026-11-25T08:00:01.123Z"
    assert parse_timestamp(text) == moment
    east = moment.astimezone(timezone(timedelta(hours=2)))
    assert format_timestamp(east) == text
    with pytest.raises(DecodeError):
        format_timestamp(moment.replace(tzinfo=None))
    with pytest.raises(DecodeError):
        format_timestamp(moment.replace(microsecond=123456))
    for bad in ["2026-11-25T08:00:01Z", "2026-11-25 08:00:01.123Z", "2026-13-25T08:00:01.123Z"]:
        with pytest.raises(DecodeError):
            parse_timestamp(bad)


@pytest.mark.parametrize("text", ["  " + "00" * 31, "AB" * 32, "0g" * 32, "00" * 31, "00" * 33, 7])
def test_hex_is_exact_lowercase_and_exact_length(text: object) -> None:
    from attestations.canonical import parse_hex

    with pytest.raises(DecodeError):
        parse_hex(text, length=32, what="root")
    assert parse_hex("ab" * 32, length=32, what="root") == b"\xab" * 32
