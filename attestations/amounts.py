"""Money as integers: assets, amounts in minor units, and prices with an explicit scale.

What this module does: parse and format the decimal-string wire form of quantities, hold amounts
as ``int`` minor units tied to an asset, and convert between assets only through a :class:`Price`,
rounding down. What it does not do: fetch prices, know collateral policy, or touch floats - a float
offered anywhere as money raises :class:`~attestations.errors.FloatRejected`.

Every quantity and sum is an unsigned integer below ``UNITS_LIMIT`` (2**128), the same bound the
Merkle sum tree enforces, so a value that fits an amount always fits a tree node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from attestations.errors import AmountError, DecodeError, FloatRejected, NegativeSum, SumOverflow

UNITS_LIMIT: Final = 2**128
"""Exclusive upper bound of every quantity and sum (they are encoded as u128)."""

MAX_DECIMALS: Final = 18
"""Largest number of decimals an asset or a price scale may have."""

_UNITS_RE: Final = re.compile(r"0|[1-9][0-9]*")
_MAX_UNITS_DIGITS: Final = len(str(UNITS_LIMIT - 1))  # 39: longer canonical strings overflow
_NEGATIVE_RE: Final = re.compile(r"-[0-9]+")
_PRICE_RE: Final = re.compile(r"(0|[1-9][0-9]{0,38})(?:\.([0-9]{1,18}))?")
_ASSET_RE: Final = re.compile(r"[A-Z][A-Z0-9]{1,15}")


def _require_int(value: object, *, what: str) -> int:
    if isinstance(value, float):
        raise FloatRejected(
            f"{what}: float {value!r} is not accepted as money; use integer minor units"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmountError(f"{what}: expected int, got {type(value).__name__}")
    return value


def check_units(value: object, *, what: str = "quantity") -> int:
    """Return ``value`` if it is an int in ``[0, UNITS_LIMIT)``; raise otherwise."""
    units = _require_int(value, what=what)
    if units < 0:
        raise NegativeSum(f"{what}: {units} is negative")
    if units >= UNITS_LIMIT:
        raise SumOverflow(f"{what}: {units} does not fit in 128 bits")
    return units


def parse_units(text: object, *, what: str = "quantity") -> int:
    """Parse the canonical decimal-string wire form of a quantity: ASCII digits, no sign, no
    leading zeros, no whitespace, no exponent, below 2**128."""
    if isinstance(text, float):
        raise FloatRejected(
            f"{what}: float {text!r} is not accepted as money; send a decimal string"
        )
    if not isinstance(text, str):
        raise AmountError(f"{what}: expected a decimal string, got {type(text).__name__}")
    if _NEGATIVE_RE.fullmatch(text):
        raise NegativeSum(f"{what}: {text!r} is negative")
    if not _UNITS_RE.fullmatch(text):
        raise AmountError(f"{what}: {text[:64]!r} is not a canonical unsigned decimal integer")
    if len(text) > _MAX_UNITS_DIGITS:  # decided without converting an arbitrarily long string
        raise SumOverflow(f"{what}: a {len(text)}-digit value does not fit in 128 bits")
    return check_units(int(text), what=what)


def format_units(value: object, *, what: str = "quantity") -> str:
    """The canonical decimal string of an in-range quantity."""
    return str(check_units(value, what=what))


def format_decimal(units: int, *, decimals: int) -> str:
    """Human-readable whole units of a minor-unit quantity, exactly (``150000000``, 8 ->
    ``"1.50000000"``). For display; the wire form of a quantity is :func:`format_units`."""
    check_units(units)
    _check_decimals(decimals, what="decimals")
    if decimals == 0:
        return str(units)
    whole, fraction = divmod(units, 10**decimals)
    return f"{whole}.{fraction:0{decimals}d}"


def validate_asset_code(code: object) -> str:
    """Asset codes are 2-16 ASCII characters: an upper-case letter, then upper-case letters or
    digits (``BTC``, ``USDC``, ``BENJI``)."""
    if not isinstance(code, str) or not _ASSET_RE.fullmatch(code):
        raise DecodeError(f"asset code {str(code)[:32]!r} must match [A-Z][A-Z0-9]{{1,15}}")
    return code


def _check_decimals(value: object, *, what: str) -> int:
    decimals = _require_int(value, what=what)
    if not 0 <= decimals <= MAX_DECIMALS:
        raise DecodeError(f"{what}: {decimals} not in 0..{MAX_DECIMALS}")
    return decimals


@dataclass(frozen=True, slots=True)
class Asset:
    """An asset and the number of decimals of its minor unit (BTC: 8, USDC: 6)."""

    code: str
    decimals: int

    def __post_init__(self) -> None:
        validate_asset_code(self.code)
        _check_decimals(self.decimals, what=f"{self.code} decimals")


@dataclass(frozen=True, slots=True)
class Amount:
    """A non-negative quantity of one asset in integer minor units."""

    asset: str
    units: int

    def __post_init__(self) -> None:
        validate_asset_code(self.asset)
        check_units(self.units, what=f"{self.asset} amount")

    def __add__(self, other: Amount) -> Amount:
        self._same_asset(other)
        return Amount(self.asset, self.units + other.units)

    def __sub__(self, other: Amount) -> Amount:
        self._same_asset(other)
        if other.units > self.units:
            raise AmountError(f"{self.units} - {other.units} {self.asset} would be negative")
        return Amount(self.asset, self.units - other.units)

    def _same_asset(self, other: object) -> None:
        if not isinstance(other, Amount):
            raise AmountError(f"cannot combine an Amount with {type(other).__name__}")
        if other.asset != self.asset:
            raise AmountError(f"cannot combine {self.asset} with {other.asset}")


@dataclass(frozen=True, slots=True)
class Price:
    """The price of one whole unit of ``asset`` in whole units of ``quote``, exactly
    ``mantissa * 10**-scale``. The wire form is a decimal string whose fraction digits are the
    scale: ``"64123.45"`` is mantissa 6412345, scale 2 (and ``"64123.450"`` is scale 3)."""

    asset: str
    quote: str
    mantissa: int
    scale: int

    def __post_init__(self) -> None:
        validate_asset_code(self.asset)
        validate_asset_code(self.quote)
        if self.asset == self.quote:
            raise DecodeError(f"price of {self.asset} in itself")
        check_units(self.mantissa, what=f"{self.asset}/{self.quote} price")
        _check_decimals(self.scale, what=f"{self.asset}/{self.quote} price scale")

    @classmethod
    def parse(cls, *, asset: str, quote: str, text: object) -> Price:
        if isinstance(text, float):
            raise FloatRejected(f"price {text!r} is a float; send a decimal string")
        if not isinstance(text, str) or not _PRICE_RE.fullmatch(text):
            raise AmountError(f"price {str(text)[:64]!r} is not a canonical unsigned decimal")
        whole, _, fraction = text.partition(".")
        return cls(asset, quote, int(whole + fraction), len(fraction))

    def to_wire(self) -> str:
        digits = str(self.mantissa).rjust(self.scale + 1, "0")
        if self.scale == 0:
            return digits
        return f"{digits[: -self.scale]}.{digits[-self.scale :]}"

    def compute_value(self, *, units: int, asset_decimals: int, quote_decimals: int) -> int:
        """Value of ``units`` minor units of ``asset`` in minor units of ``quote``, rounded down
        (collateral is never over-valued by rounding)."""
        check_units(units, what=f"{self.asset} units")
        _check_decimals(asset_decimals, what=f"{self.asset} decimals")
        _check_decimals(quote_decimals, what=f"{self.quote} decimals")
        numerator: int = units * self.mantissa * 10**quote_decimals
        denominator: int = 10 ** (asset_decimals + self.scale)
        return numerator // denominator
