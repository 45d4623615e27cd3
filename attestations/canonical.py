"""Canonical bytes and digests of signed objects, and the strict JSON reader for the wire.

Every signed object is a JSON object with a ``version`` member. Its *canonical bytes* are its
RFC 8785 (JSON Canonicalization Scheme) serialization; its *digest* is
``SHA-256(domain_tag || 0x00 || canonical_bytes)``, where the domain tag names the object type
(``mcb/statement/v1`` ...), so a signature over one object type can never be replayed as another.

JSON numbers are allowed only as integers in the interoperable range (|n| <= 2**53 - 1); money
and sums travel as decimal strings. Floats are rejected in both directions.

This module does not know any object's fields; each object type validates its own members.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import rfc8785

from attestations.errors import DecodeError, FloatRejected

MAX_SAFE_INTEGER: Final = 2**53 - 1
MAX_MESSAGE_BYTES: Final = 1_000_000
"""Default bound for one JSON document read from the wire (the broker's default message limit)."""
MAX_NESTING: Final = 32
"""Deepest container allowed; the top-level object is at depth 1."""
_MAX_INT_DIGITS: Final = len(str(MAX_SAFE_INTEGER))

DOMAIN_STATEMENT: Final = "mcb/statement/v1"
DOMAIN_TREE_HEAD: Final = "mcb/tree-head/v1"
DOMAIN_KEY_ID: Final = "mcb/key/v1"

_DOMAIN_RE: Final = re.compile(r"mcb/[a-z0-9-]+/v[0-9]+")
_HEX_RE: Final = re.compile(r"[0-9a-f]*")
# A whole JSON string (escapes included, closing quote optional so an unterminated one cannot make
# the scan backtrack) or one bracket. The string branch is the unrolled loop, which is linear.
_STRUCTURE_RE: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[{}\[\]]', re.DOTALL)
_TIMESTAMP_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{3})Z"
)


def _check_json_value(value: object, *, depth: int = 1) -> None:
    """``depth`` is the nesting level of ``value`` when it is a container: the top-level object is
    at depth 1, and no container may be deeper than MAX_NESTING."""
    if isinstance(value, float):
        raise FloatRejected(f"float {value!r} in a signed object; use a decimal string")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise DecodeError(f"integer {value} outside the interoperable JSON range")
        return
    if isinstance(value, Mapping | list | tuple) and depth > MAX_NESTING:
        raise DecodeError(f"JSON containers nested deeper than {MAX_NESTING}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DecodeError(f"JSON object key {key!r} is not a string")
            _check_json_value(item, depth=depth + 1)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_json_value(item, depth=depth + 1)
        return
    raise DecodeError(f"{type(value).__name__} cannot be encoded in a signed object")


def compute_canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """RFC 8785 bytes of ``obj`` after checking it holds only JSON-safe, float-free values."""
    _check_json_value(obj)
    try:
        return rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, ValueError, TypeError) as exc:
        raise DecodeError(f"cannot canonicalize: {exc}") from exc


def compute_digest(*, domain: str, obj: Mapping[str, Any]) -> bytes:
    """``SHA-256(domain || 0x00 || RFC8785(obj))``: the 32 bytes that get signed."""
    return compute_tagged_hash(domain=domain, data=compute_canonical_bytes(obj))


def compute_tagged_hash(*, domain: str, data: bytes) -> bytes:
    if not _DOMAIN_RE.fullmatch(domain):
        raise DecodeError(f"domain tag {domain!r} is not of the form mcb/<name>/v<n>")
    return hashlib.sha256(domain.encode("ascii") + b"\x00" + data).digest()


def compute_key_id(*, algorithm: str, public_key: bytes) -> str:
    """Key id: lowercase hex of ``SHA-256("mcb/key/v1" || 0x00 || algorithm || 0x00 || key)``."""
    if not algorithm.isascii() or not algorithm:
        raise DecodeError(f"algorithm name {algorithm!r} must be non-empty ASCII")
    data = algorithm.encode("ascii") + b"\x00" + bytes(public_key)
    return compute_tagged_hash(domain=DOMAIN_KEY_ID, data=data).hex()


def _reject_float(text: str) -> float:
    raise FloatRejected(f"JSON number {text[:32]} is not an integer; money travels as strings")


def _reject_constant(text: str) -> float:
    raise DecodeError(f"JSON constant {text} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DecodeError(f"duplicate JSON key {key[:64]!r}")
        out[key] = value
    return out


def _check_nesting(text: str) -> None:
    """Reject ``text`` if any container is nested deeper than MAX_NESTING, before it is parsed.

    json's scanner recurses once per container, and py_ecc raises the interpreter's recursion limit
    to 100000 on import, so a 200 KB document of brackets overflows the C stack (SIGSEGV) instead
    of raising RecursionError. This scan is linear and does not recurse. It counts ``{`` and ``[``
    outside strings only; it does not validate the JSON, which json.loads does next (an
    unterminated string swallows the rest of the text here, and json.loads rejects it)."""
    depth = 0
    for match in _STRUCTURE_RE.finditer(text):
        first = match.group()[0]
        if first in "{[":
            depth += 1
            if depth > MAX_NESTING:
                raise DecodeError(f"JSON containers nested deeper than {MAX_NESTING}")
        elif first in "}]":
            depth -= 1
            if depth < 0:
                raise DecodeError(f"not valid JSON: unmatched {first!r} at {match.start()}")


def _parse_int(text: str) -> int:
    # Bound the literal before int() sees it: int() refuses more than 4300 digits with a bare
    # ValueError and is quadratic below that. The range itself is checked by _check_json_value.
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise DecodeError(f"JSON integer {text[:32]}... outside the interoperable JSON range")
    return int(text)


def _decode_document(data: object, *, max_bytes: int) -> str:
    """The text of one wire document: bytes (or a bytes-like buffer) as UTF-8, or a str that must
    itself be encodable as UTF-8, no more than ``max_bytes`` bytes either way."""
    if isinstance(data, str):
        # A str of n code points encodes to at least n bytes: refuse a huge one before encoding.
        size = len(data)
    elif isinstance(data, memoryview):
        size = data.nbytes
    elif isinstance(data, bytes | bytearray):
        size = len(data)
    else:
        raise DecodeError(f"a JSON document must be bytes or str, not {type(data).__name__}")
    if size > max_bytes:
        raise DecodeError(f"document of {size} bytes exceeds the limit of {max_bytes}")
    try:
        if isinstance(data, str):
            size = len(data.encode("utf-8"))  # a lone surrogate is not UTF-8
            text = data
        else:
            text = bytes(data).decode("utf-8")
    except UnicodeError as exc:
        raise DecodeError(f"not valid UTF-8: {exc}") from exc
    if size > max_bytes:
        raise DecodeError(f"document of {size} bytes exceeds the limit of {max_bytes}")
    return text


def parse_json_object(
    data: bytes | bytearray | memoryview | str, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Strictly parse one JSON object from the wire: UTF-8, bounded size, no duplicate keys, no
    floats, no NaN/Infinity, integers in the interoperable range, bounded nesting."""
    text = _decode_document(data, max_bytes=max_bytes)
    _check_nesting(text)
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_float=_reject_float,
            parse_int=_parse_int,
            parse_constant=_reject_constant,
        )
    except DecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError is a ValueError; any other ValueError from the json module is wrapped
        # too, so callers only ever see DecodeError.
        raise DecodeError(f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
    _check_json_value(obj)
    return obj


def format_timestamp(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC; the moment must be timezone-aware with whole
    milliseconds (the wire form carries exactly millisecond precision)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise DecodeError("timestamps must be timezone-aware")
    try:
        utc = moment.astimezone(UTC)
    except OverflowError as exc:
        raise DecodeError(f"timestamp {moment.isoformat()} is outside the UTC range") from exc
    if utc.microsecond % 1000:
        raise DecodeError(f"timestamp {moment.isoformat()} has sub-millisecond precision")
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def parse_timestamp(text: object) -> datetime:
    """Inverse of :func:`format_timestamp`; anything else raises DecodeError."""
    match = _TIMESTAMP_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise DecodeError(f"timestamp {str(text)[:40]!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ")
    year, month, day, hour, minute, second, millis = map(int, match.groups())
    try:
        return datetime(year, month, day, hour, minute, second, millis * 1000, tzinfo=UTC)
    except ValueError as exc:
        raise DecodeError(f"timestamp {text!r} is not a valid date: {exc}") from exc


def truncate_to_millis(moment: datetime) -> datetime:
    """Drop sub-millisecond precision so a clock reading can be put in a signed object."""
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


def parse_hex(text: object, *, length: int, what: str) -> bytes:
    """Lowercase hex of exactly ``length`` bytes."""
    if not isinstance(text, str) or len(text) != 2 * length:
        raise DecodeError(f"{what} must be {2 * length} lowercase hex characters")
    if not _HEX_RE.fullmatch(text):
        raise DecodeError(f"{what} must be lowercase hex digits only")
    return bytes.fromhex(text)
