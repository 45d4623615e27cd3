"""The signed notices the exchange publishes: margin calls, liquidation-due notices and positions
snapshots (docs/protocol.md section 12).

* :class:`MarginCall` tells one custodian that a client whose collateral it holds is below the
  margin-call level, by how much (``shortfall``), and until when (``deadline``).
* :class:`LiquidationDue` tells it that the client's pre-authorised liquidation path is now due,
  because the margin call's deadline passed or the liquidation line was crossed.
* :class:`PositionsSnapshot` is the exchange's signed word on what it credits, per client,
  custodian and asset, at one moment (``as_of``), for the twice-daily reconciliation. A large
  snapshot is cut into *parts*; every part carries the commitments over all lines (count, per-asset
  totals, total value, Merkle root) and a contiguous run of the lines, so each part is a bounded
  message and the whole is checked by :func:`combine_snapshot_parts`.
* :class:`ReleaseAck` is the exchange's consent that one custodian release ``quantity`` units of
  one asset from the client's pledge to the exchange (the unpledge needs it). It is valid from
  ``issued_at`` until ``expires_at`` (at most :data:`MAX_RELEASE_VALIDITY` later) and names itself
  by a deterministic ``release_id``; :func:`verify_release_ack` adds the expiry check to
  :func:`verify_notice`. Using an acknowledgement once is the custodian's book's business.

Every body has a ``version``, its own domain tag (``mcb/margin-call/v1``,
``mcb/liquidation-due/v1``, ``mcb/positions-snapshot/v1``, ``mcb/release-ack/v1``) and RFC 8785
canonical bytes; its
digest is ``SHA-256(tag || 0x00 || RFC8785(body))``. A :class:`SignedNotice` carries one body and
the exchange's ECDSA P-256 signature over that digest (an HSM key through PKCS#11 in production,
any :class:`~attestations.p256.DigestSigner`). :func:`verify_notice` accepts a notice only when a
registered ``exchange`` key of the body's exchange, usable at the body's time and now, signed it.

Amounts are integers carried as decimal strings: unsigned ones with the grammar of
:mod:`attestations.amounts`, signed ones (equity, margin ratio) with :func:`parse_signed_units`.
Objects are validated in their constructors, so one that exists is well-formed; ``from_wire``
takes exactly the specified members.

Pure: no clock (``now`` is passed in), no I/O. Publishing the notices (bridge/envelope.py) and
deciding when to issue them (exchange/ledger.py) happen elsewhere.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, Final

from attestations.amounts import (
    UNITS_LIMIT,
    check_units,
    format_units,
    parse_units,
    validate_asset_code,
)
from attestations.canonical import (
    MAX_MESSAGE_BYTES,
    MAX_SAFE_INTEGER,
    compute_canonical_bytes,
    compute_digest,
    compute_tagged_hash,
    format_timestamp,
    parse_hex,
    parse_json_object,
    parse_timestamp,
)
from attestations.errors import (
    AmountError,
    DecodeError,
    Expired,
    FloatRejected,
    FutureDated,
    RootMismatch,
    SumMismatch,
    SumOverflow,
)
from attestations.keys import KeyRegistry, KeyRole
from attestations.merkle import validate_account
from attestations.p256 import DigestSigner, verify_p256_digest
from attestations.signing import sign_digest_checked
from attestations.statement import (
    MAX_SEQUENCE,
    compute_p256_signature_wire,
    parse_p256_signature_wire,
    require_bytes,
    require_int,
    require_list,
    require_members,
    require_utc,
    require_version,
    validate_key_id,
    validate_party,
)
from attestations.translog import EMPTY_ROOT, compute_leaf_hash, compute_root
from attestations.verify import DEFAULT_MAX_CLOCK_SKEW

NOTICE_VERSION: Final = 1
"""``version`` of every notice body and of the signed wrapper."""

DOMAIN_MARGIN_CALL: Final = "mcb/margin-call/v1"
DOMAIN_LIQUIDATION_DUE: Final = "mcb/liquidation-due/v1"
DOMAIN_POSITIONS_SNAPSHOT: Final = "mcb/positions-snapshot/v1"
DOMAIN_NOTICE_ID: Final = "mcb/notice-id/v1"
DOMAIN_RELEASE_ACK: Final = "mcb/release-ack/v1"
DOMAIN_RELEASE_ID: Final = "mcb/release-id/v1"

DEFAULT_RELEASE_VALIDITY: Final = timedelta(minutes=15)
"""How long the exchange's release acknowledgement is valid by default: long enough for the
custodian to run the unpledge, short enough that the exchange's reservation of the released units
(exchange/ledger.py) ends soon after."""
MAX_RELEASE_VALIDITY: Final = timedelta(hours=1)
"""The longest validity a release acknowledgement may state; a longer one does not decode."""

SIGNED_LIMIT: Final = UNITS_LIMIT
"""Signed amounts lie strictly between ``-2**128`` and ``2**128``."""
MAX_LINES_PER_PART: Final = 2_000
"""Most lines one snapshot part carries. A line is at most about 350 bytes of JSON (a 128-character
client id, a 64-character custodian, two 39-digit amounts), so 2,000 lines, 256 stream heads and
256 totals stay below 800,000 bytes: a part always fits the 900,000-byte record budget."""
MAX_SNAPSHOT_STREAMS: Final = 256
MAX_SNAPSHOT_ASSETS: Final = 256
MAX_SNAPSHOT_PARTS: Final = 65_536

_SIGNED_RE: Final = re.compile(r"0|-?[1-9][0-9]*")
_MAX_SIGNED_DIGITS: Final = len(str(SIGNED_LIMIT - 1))  # 39


class NoticeType(StrEnum):
    """The ``type`` member of a signed notice; it selects the body layout and its domain tag."""

    MARGIN_CALL = "margin_call"
    LIQUIDATION_DUE = "liquidation_due"
    POSITIONS_SNAPSHOT = "positions_snapshot"
    RELEASE_ACK = "release_ack"


class LiquidationReason(StrEnum):
    DEADLINE_PASSED = "deadline_passed"
    """The margin call was not met by its deadline."""
    LIQUIDATION_LINE = "liquidation_line"
    """The margin ratio fell below the liquidation line (with or without a margin call before)."""


# --- signed amounts -----------------------------------------------------------------------------


def check_signed_units(value: object, *, what: str) -> int:
    """Return ``value`` if it is an int with ``-2**128 < value < 2**128``; raise otherwise."""
    if isinstance(value, float):
        raise FloatRejected(f"{what}: float {value!r} is not accepted as money")
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmountError(f"{what}: expected int, got {type(value).__name__}")
    if abs(value) >= SIGNED_LIMIT:
        raise SumOverflow(f"{what}: {value} does not fit in 128 bits and a sign")
    return value


def parse_signed_units(text: object, *, what: str) -> int:
    """Parse a signed decimal string: ``0`` or an optional ``-`` then a non-zero digit and digits
    (``0|-?[1-9][0-9]*``: no ``+``, no ``-0``, no leading zeros, no spaces), absolute value below
    ``2**128``. A float is ``float_rejected``, another type or form ``invalid_amount``, a value out
    of range ``sum_overflow``."""
    if isinstance(text, float):
        raise FloatRejected(f"{what}: float {text!r} is not accepted as money; send a string")
    if not isinstance(text, str):
        raise AmountError(f"{what}: expected a decimal string, got {type(text).__name__}")
    if not _SIGNED_RE.fullmatch(text):
        raise AmountError(f"{what}: {text[:64]!r} is not a canonical signed decimal integer")
    if len(text.lstrip("-")) > _MAX_SIGNED_DIGITS:  # decided before converting a long string
        raise SumOverflow(f"{what}: a {len(text)}-character value does not fit in 128 bits")
    return check_signed_units(int(text), what=what)


def format_signed_units(value: object, *, what: str) -> str:
    return str(check_signed_units(value, what=what))


def compute_margin_ratio_bps(*, equity: int, requirement: int) -> int | None:
    """``floor(equity * 10,000 / requirement)`` (rounded toward minus infinity), or None when the
    requirement is 0: the ratio a margin notice must carry for its equity and requirement."""
    if requirement == 0:
        return None
    return (equity * 10_000) // requirement


def compute_notice_id(*, kind: NoticeType, exchange: str, client: str, issued_at: datetime) -> str:
    """``hex(SHA-256("mcb/notice-id/v1" || 0x00 || kind || 0x00 || exchange || 0x00 || client ||
    0x00 || issued_at))`` with every part ASCII (the timestamp in its wire form). None of the parts
    can contain 0x00, so the separators are unambiguous. The custodian is left out on purpose:
    the notices one event sends to each custodian of the client share one id."""
    data = "\x00".join((kind.value, exchange, client, format_timestamp(issued_at)))
    return compute_tagged_hash(domain=DOMAIN_NOTICE_ID, data=data.encode("ascii")).hex()


# --- margin notices -----------------------------------------------------------------------------


_MARGIN_KEYS: Final = frozenset(
    {
        "client",
        "collateral",
        "custodian",
        "deadline",
        "equity",
        "exchange",
        "issued_at",
        "notice_id",
        "quote",
        "ratio_bps",
        "requirement",
        "shortfall",
        "version",
    }
)
_LIQUIDATION_KEYS: Final = _MARGIN_KEYS | {"margin_call_id", "reason"}


@dataclass(frozen=True, slots=True, kw_only=True)
class MarginCall:
    """The exchange calls for more margin from ``client``, addressed to one ``custodian`` that
    holds some of the client's collateral (one notice per such custodian, all with one
    ``notice_id``). All amounts are minor units of ``quote``: ``collateral`` (the credited value),
    ``equity`` (collateral plus unrealised profit and loss, may be negative), ``requirement``
    (margin required by the open exposure), ``ratio_bps`` (equity / requirement in basis points,
    rounded down; None when the requirement is 0) and ``shortfall`` (what restores the
    margin-call level). The call must be met before ``deadline``."""

    notice_type: ClassVar[NoticeType] = NoticeType.MARGIN_CALL
    domain: ClassVar[str] = DOMAIN_MARGIN_CALL

    exchange: str
    custodian: str
    client: str
    issued_at: datetime
    deadline: datetime
    quote: str
    collateral: int
    equity: int
    requirement: int
    ratio_bps: int | None
    shortfall: int
    version: int = NOTICE_VERSION

    def __post_init__(self) -> None:
        _check_margin_members(self)
        require_utc(self.deadline, what="deadline")
        if self.deadline <= self.issued_at:
            raise DecodeError("a margin call's deadline must be after its issued_at")

    @property
    def notice_id(self) -> str:
        return compute_notice_id(
            kind=self.notice_type,
            exchange=self.exchange,
            client=self.client,
            issued_at=self.issued_at,
        )

    @property
    def signed_at(self) -> datetime:
        """The time the signing key must be valid at."""
        return self.issued_at

    def to_wire(self) -> dict[str, Any]:
        return _margin_wire(self, deadline=self.deadline)

    @classmethod
    def from_wire(cls, obj: object) -> MarginCall:
        m = require_members(obj, what="margin call", keys=_MARGIN_KEYS)
        notice = cls(
            **_margin_fields(m, what="margin call"), deadline=parse_timestamp(m["deadline"])
        )
        _check_notice_id(m, notice.notice_id)
        return notice

    def canonical_bytes(self) -> bytes:
        return compute_canonical_bytes(self.to_wire())

    def compute_digest(self) -> bytes:
        return compute_digest(domain=self.domain, obj=self.to_wire())


@dataclass(frozen=True, slots=True, kw_only=True)
class LiquidationDue:
    """The client's pre-authorised liquidation is due, for ``reason``. Members as in
    :class:`MarginCall`, plus ``margin_call_id`` (the ``notice_id`` of the margin call that was not
    met; None when the liquidation line was crossed without a margin call before) and ``deadline``
    (that margin call's deadline, or None without one). ``deadline_passed`` requires both, and
    ``issued_at`` at or after the deadline."""

    notice_type: ClassVar[NoticeType] = NoticeType.LIQUIDATION_DUE
    domain: ClassVar[str] = DOMAIN_LIQUIDATION_DUE

    exchange: str
    custodian: str
    client: str
    issued_at: datetime
    deadline: datetime | None
    quote: str
    collateral: int
    equity: int
    requirement: int
    ratio_bps: int | None
    shortfall: int
    margin_call_id: str | None
    reason: LiquidationReason
    version: int = NOTICE_VERSION

    def __post_init__(self) -> None:
        _check_margin_members(self)
        if self.deadline is not None:
            require_utc(self.deadline, what="deadline")
        if self.margin_call_id is not None:
            validate_key_id(self.margin_call_id)  # the same form: 64 lowercase hex characters
        if (self.margin_call_id is None) != (self.deadline is None):
            raise DecodeError("margin_call_id and deadline are both given or both null")
        if not isinstance(self.reason, LiquidationReason):
            raise DecodeError(f"reason {self.reason!r} is not a LiquidationReason")
        if self.reason is LiquidationReason.DEADLINE_PASSED and (
            self.deadline is None or self.issued_at < self.deadline
        ):
            raise DecodeError("deadline_passed needs a margin call whose deadline has passed")

    @property
    def notice_id(self) -> str:
        return compute_notice_id(
            kind=self.notice_type,
            exchange=self.exchange,
            client=self.client,
            issued_at=self.issued_at,
        )

    @property
    def signed_at(self) -> datetime:
        return self.issued_at

    def to_wire(self) -> dict[str, Any]:
        return {
            **_margin_wire(self, deadline=self.deadline),
            "margin_call_id": self.margin_call_id,
            "reason": self.reason.value,
        }

    @classmethod
    def from_wire(cls, obj: object) -> LiquidationDue:
        m = require_members(obj, what="liquidation-due notice", keys=_LIQUIDATION_KEYS)
        reason = m["reason"]
        if not isinstance(reason, str) or reason not in {r.value for r in LiquidationReason}:
            raise DecodeError(f"reason {str(reason)[:40]!r} is not a liquidation reason")
        call_id = m["margin_call_id"]
        notice = cls(
            **_margin_fields(m, what="liquidation-due notice"),
            deadline=None if m["deadline"] is None else parse_timestamp(m["deadline"]),
            margin_call_id=None if call_id is None else validate_key_id(call_id),
            reason=LiquidationReason(reason),
        )
        _check_notice_id(m, notice.notice_id)
        return notice

    def canonical_bytes(self) -> bytes:
        return compute_canonical_bytes(self.to_wire())

    def compute_digest(self) -> bytes:
        return compute_digest(domain=self.domain, obj=self.to_wire())


def _check_margin_members(notice: MarginCall | LiquidationDue) -> None:
    require_version(notice.version, expected=NOTICE_VERSION, what=notice.notice_type.value)
    validate_party(notice.exchange, what="exchange")
    validate_party(notice.custodian, what="custodian")
    if notice.exchange == notice.custodian:
        raise DecodeError("exchange and custodian must be different parties")
    validate_account(notice.client)
    require_utc(notice.issued_at, what="issued_at")
    validate_asset_code(notice.quote)
    check_units(notice.collateral, what="collateral")
    check_signed_units(notice.equity, what="equity")
    check_units(notice.requirement, what="requirement")
    check_units(notice.shortfall, what="shortfall")
    expected = compute_margin_ratio_bps(equity=notice.equity, requirement=notice.requirement)
    if notice.ratio_bps is None or expected is None:
        if notice.ratio_bps is not expected:
            raise DecodeError("ratio_bps is null exactly when the requirement is 0")
        return
    check_signed_units(notice.ratio_bps, what="ratio_bps")
    if notice.ratio_bps != expected:
        raise DecodeError(
            f"ratio_bps {notice.ratio_bps} is not floor(equity * 10000 / requirement) = {expected}"
        )


def _margin_wire(
    notice: MarginCall | LiquidationDue, *, deadline: datetime | None
) -> dict[str, Any]:
    return {
        "client": notice.client,
        "collateral": format_units(notice.collateral, what="collateral"),
        "custodian": notice.custodian,
        "deadline": None if deadline is None else format_timestamp(deadline),
        "equity": format_signed_units(notice.equity, what="equity"),
        "exchange": notice.exchange,
        "issued_at": format_timestamp(notice.issued_at),
        "notice_id": notice.notice_id,
        "quote": notice.quote,
        "ratio_bps": None
        if notice.ratio_bps is None
        else format_signed_units(notice.ratio_bps, what="ratio_bps"),
        "requirement": format_units(notice.requirement, what="requirement"),
        "shortfall": format_units(notice.shortfall, what="shortfall"),
        "version": notice.version,
    }


def _margin_fields(m: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """The members both margin notices share, decoded; ``deadline`` is the caller's."""
    require_version(m["version"], expected=NOTICE_VERSION, what=what)
    ratio = m["ratio_bps"]
    return {
        "exchange": validate_party(m["exchange"], what="exchange"),
        "custodian": validate_party(m["custodian"], what="custodian"),
        "client": validate_account(m["client"]),
        "issued_at": parse_timestamp(m["issued_at"]),
        "quote": validate_asset_code(m["quote"]),
        "collateral": parse_units(m["collateral"], what="collateral"),
        "equity": parse_signed_units(m["equity"], what="equity"),
        "requirement": parse_units(m["requirement"], what="requirement"),
        "ratio_bps": None if ratio is None else parse_signed_units(ratio, what="ratio_bps"),
        "shortfall": parse_units(m["shortfall"], what="shortfall"),
    }


def _check_notice_id(m: Mapping[str, Any], expected: str) -> None:
    if m["notice_id"] != expected:
        raise DecodeError(f"notice_id {str(m['notice_id'])[:70]!r} is not the notice's id")


# --- positions snapshot -------------------------------------------------------------------------


_HEAD_KEYS: Final = frozenset({"custodian", "sequence", "statement"})
_LINE_KEYS: Final = frozenset({"asset", "client", "custodian", "quantity", "value"})
_TOTAL_KEYS: Final = frozenset({"asset", "quantity"})
_SNAPSHOT_KEYS: Final = frozenset(
    {
        "as_of",
        "count",
        "exchange",
        "first",
        "lines",
        "lines_root",
        "part",
        "parts",
        "quote",
        "streams",
        "totals",
        "total_value",
        "version",
    }
)


@dataclass(frozen=True, slots=True)
class StreamHeadRef:
    """The statement of stream ``<custodian>/<exchange>`` the snapshot reflects: its sequence and
    digest (the head the margin ledger had accepted at ``as_of``)."""

    custodian: str
    sequence: int
    statement: bytes

    def __post_init__(self) -> None:
        validate_party(self.custodian, what="custodian")
        require_int(self.sequence, what="sequence", low=1, high=MAX_SEQUENCE)
        require_bytes(self.statement, what="statement digest", length=32)

    def to_wire(self) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "sequence": self.sequence,
            "statement": self.statement.hex(),
        }

    @classmethod
    def from_wire(cls, obj: object) -> StreamHeadRef:
        m = require_members(obj, what="stream head", keys=_HEAD_KEYS)
        return cls(
            custodian=validate_party(m["custodian"], what="custodian"),
            sequence=require_int(m["sequence"], what="sequence", low=1, high=MAX_SEQUENCE),
            statement=parse_hex(m["statement"], length=32, what="statement digest"),
        )


@dataclass(frozen=True, slots=True)
class PositionLine:
    """What the exchange credits ``client`` for ``quantity`` minor units of ``asset`` held at
    ``custodian``: ``value`` minor units of the snapshot's quote (after the collateral rate,
    rounded down). A position of quantity 0 does not exist, so it has no line."""

    client: str
    custodian: str
    asset: str
    quantity: int
    value: int

    def __post_init__(self) -> None:
        validate_account(self.client)
        validate_party(self.custodian, what="custodian")
        validate_asset_code(self.asset)
        if check_units(self.quantity, what=f"{self.asset} quantity") == 0:
            raise DecodeError("a snapshot line's quantity must be above 0")
        check_units(self.value, what="value")

    @property
    def sort_key(self) -> tuple[str, str, str]:
        """Lines are sorted by (client, custodian, asset), code-point order, no duplicates."""
        return (self.client, self.custodian, self.asset)

    def to_wire(self) -> dict[str, Any]:
        return {
            "asset": self.asset,
            "client": self.client,
            "custodian": self.custodian,
            "quantity": format_units(self.quantity),
            "value": format_units(self.value, what="value"),
        }

    @classmethod
    def from_wire(cls, obj: object) -> PositionLine:
        m = require_members(obj, what="snapshot line", keys=_LINE_KEYS)
        return cls(
            client=validate_account(m["client"]),
            custodian=validate_party(m["custodian"], what="custodian"),
            asset=validate_asset_code(m["asset"]),
            quantity=parse_units(m["quantity"]),
            value=parse_units(m["value"], what="value"),
        )

    def compute_leaf_hash(self) -> bytes:
        """RFC 6962 leaf hash of the line's RFC 8785 bytes: ``SHA-256(0x00 || RFC8785(line))``."""
        return compute_leaf_hash(compute_canonical_bytes(self.to_wire()))


@dataclass(frozen=True, slots=True)
class AssetTotal:
    """The sum of the quantities of every line in ``asset``."""

    asset: str
    quantity: int

    def __post_init__(self) -> None:
        validate_asset_code(self.asset)
        if check_units(self.quantity, what=f"{self.asset} total") == 0:
            raise DecodeError("an asset total is listed only for an asset with lines")

    def to_wire(self) -> dict[str, Any]:
        return {"asset": self.asset, "quantity": format_units(self.quantity)}

    @classmethod
    def from_wire(cls, obj: object) -> AssetTotal:
        m = require_members(obj, what="asset total", keys=_TOTAL_KEYS)
        return cls(asset=validate_asset_code(m["asset"]), quantity=parse_units(m["quantity"]))


def compute_lines_root(lines: Sequence[PositionLine]) -> bytes:
    """RFC 6962 Merkle tree hash (the transparency log's tree, attestations.translog) of the lines'
    leaf hashes in order; ``SHA-256("")`` for no lines."""
    return compute_root([line.compute_leaf_hash() for line in lines])


def compute_totals(lines: Iterable[PositionLine]) -> tuple[tuple[AssetTotal, ...], int, int]:
    """(per-asset totals sorted by asset, total value, count) of ``lines``."""
    quantities: dict[str, int] = {}
    total_value = 0
    count = 0
    for line in lines:
        quantities[line.asset] = quantities.get(line.asset, 0) + line.quantity
        total_value += line.value
        count += 1
    totals = tuple(AssetTotal(asset, quantities[asset]) for asset in sorted(quantities))
    check_units(total_value, what="total value")
    return totals, total_value, count


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionsSnapshot:
    """Part ``part`` of ``parts`` of the exchange's positions at ``as_of``.

    Every part carries the same header: the stream heads the positions come from (sorted by
    custodian), and the commitments over *all* lines of the snapshot: ``count``, per-asset
    ``totals`` (sorted by asset), ``total_value`` and ``lines_root``. Its ``lines`` are the lines
    ``first`` to ``first + len(lines) - 1`` of the sorted list, at most MAX_LINES_PER_PART. A
    snapshot of one part is checked whole here (root -> RootMismatch, count and sums ->
    SumMismatch); one of several parts is checked by :func:`combine_snapshot_parts`."""

    notice_type: ClassVar[NoticeType] = NoticeType.POSITIONS_SNAPSHOT
    domain: ClassVar[str] = DOMAIN_POSITIONS_SNAPSHOT

    exchange: str
    as_of: datetime
    quote: str
    streams: tuple[StreamHeadRef, ...]
    count: int
    totals: tuple[AssetTotal, ...]
    total_value: int
    lines_root: bytes
    part: int
    parts: int
    first: int
    lines: tuple[PositionLine, ...]
    version: int = NOTICE_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=NOTICE_VERSION, what="positions snapshot")
        validate_party(self.exchange, what="exchange")
        require_utc(self.as_of, what="as_of")
        validate_asset_code(self.quote)
        self._check_header()
        self._check_lines()
        if self.parts == 1:
            self._check_whole()

    def _check_header(self) -> None:
        streams = _require_tuple(self.streams, StreamHeadRef, what="streams")
        if len(streams) > MAX_SNAPSHOT_STREAMS:
            raise DecodeError(f"more than {MAX_SNAPSHOT_STREAMS} streams")
        custodians = [s.custodian for s in streams]
        if custodians != sorted(set(custodians)):
            raise DecodeError("streams must be sorted by custodian without duplicates")
        if self.exchange in custodians:
            raise DecodeError("the exchange cannot be a custodian of its own snapshot")
        totals = _require_tuple(self.totals, AssetTotal, what="totals")
        if len(totals) > MAX_SNAPSHOT_ASSETS:
            raise DecodeError(f"more than {MAX_SNAPSHOT_ASSETS} asset totals")
        assets = [t.asset for t in totals]
        if assets != sorted(set(assets)):
            raise DecodeError("totals must be sorted by asset without duplicates")
        require_int(self.count, what="count", low=0, high=MAX_SAFE_INTEGER)
        check_units(self.total_value, what="total value")
        require_bytes(self.lines_root, what="lines_root", length=32)
        require_int(self.parts, what="parts", low=1, high=MAX_SNAPSHOT_PARTS)
        require_int(self.part, what="part", low=0, high=self.parts - 1)
        require_int(self.first, what="first", low=0, high=self.count)
        if self.count == 0 and (
            self.parts != 1 or totals or self.total_value or self.lines_root != EMPTY_ROOT
        ):
            raise DecodeError("an empty snapshot is one part without totals, value 0, empty root")

    def _check_lines(self) -> None:
        lines = _require_tuple(self.lines, PositionLine, what="lines")
        if len(lines) > MAX_LINES_PER_PART:
            raise DecodeError(f"more than {MAX_LINES_PER_PART} lines in one part")
        if self.first + len(lines) > self.count:
            raise DecodeError("the part's lines run past the snapshot's count")
        if self.count and not lines:
            raise DecodeError("every part of a non-empty snapshot carries lines")
        if self.part == self.parts - 1 and self.first + len(lines) != self.count:
            raise DecodeError("the last part ends at the snapshot's count")
        if self.part == 0 and self.first != 0:
            raise DecodeError("the first part starts at line 0")
        _check_sorted(lines)
        custodians = {s.custodian for s in self.streams}
        assets = {t.asset for t in self.totals}
        for line in lines:
            if line.custodian not in custodians:
                raise DecodeError(f"a line of custodian {line.custodian} without its stream head")
            if line.asset not in assets:
                raise DecodeError(f"a line of {line.asset}, an asset without a total")

    def _check_whole(self) -> None:
        _check_commitments(self, self.lines)

    @property
    def signed_at(self) -> datetime:
        return self.as_of

    def to_wire(self) -> dict[str, Any]:
        return {
            "as_of": format_timestamp(self.as_of),
            "count": self.count,
            "exchange": self.exchange,
            "first": self.first,
            "lines": [line.to_wire() for line in self.lines],
            "lines_root": self.lines_root.hex(),
            "part": self.part,
            "parts": self.parts,
            "quote": self.quote,
            "streams": [s.to_wire() for s in self.streams],
            "total_value": format_units(self.total_value, what="total value"),
            "totals": [t.to_wire() for t in self.totals],
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object) -> PositionsSnapshot:
        m = require_members(obj, what="positions snapshot", keys=_SNAPSHOT_KEYS)
        require_version(m["version"], expected=NOTICE_VERSION, what="positions snapshot")
        streams = require_list(m["streams"], what="streams", max_items=MAX_SNAPSHOT_STREAMS)
        totals = require_list(m["totals"], what="totals", max_items=MAX_SNAPSHOT_ASSETS)
        lines = require_list(m["lines"], what="lines", max_items=MAX_LINES_PER_PART)
        return cls(
            exchange=validate_party(m["exchange"], what="exchange"),
            as_of=parse_timestamp(m["as_of"]),
            quote=validate_asset_code(m["quote"]),
            streams=tuple(StreamHeadRef.from_wire(s) for s in streams),
            count=require_int(m["count"], what="count", low=0, high=MAX_SAFE_INTEGER),
            totals=tuple(AssetTotal.from_wire(t) for t in totals),
            total_value=parse_units(m["total_value"], what="total value"),
            lines_root=parse_hex(m["lines_root"], length=32, what="lines_root"),
            part=require_int(m["part"], what="part", low=0, high=MAX_SNAPSHOT_PARTS - 1),
            parts=require_int(m["parts"], what="parts", low=1, high=MAX_SNAPSHOT_PARTS),
            first=require_int(m["first"], what="first", low=0, high=MAX_SAFE_INTEGER),
            lines=tuple(PositionLine.from_wire(line) for line in lines),
        )

    def canonical_bytes(self) -> bytes:
        return compute_canonical_bytes(self.to_wire())

    def compute_digest(self) -> bytes:
        return compute_digest(domain=self.domain, obj=self.to_wire())

    def same_snapshot(self, other: PositionsSnapshot) -> bool:
        """True when ``other`` is a part of the same snapshot (every header member equal)."""
        return _header(self) == _header(other)


def _header(snapshot: PositionsSnapshot) -> tuple[object, ...]:
    return (
        snapshot.version,
        snapshot.exchange,
        snapshot.as_of,
        snapshot.quote,
        snapshot.streams,
        snapshot.count,
        snapshot.totals,
        snapshot.total_value,
        snapshot.lines_root,
        snapshot.parts,
    )


def _require_tuple(value: object, kind: type, *, what: str) -> tuple[Any, ...]:
    if not isinstance(value, tuple) or not all(isinstance(item, kind) for item in value):
        raise DecodeError(f"{what} must be a tuple of {kind.__name__}")
    return value


def _check_sorted(lines: Sequence[PositionLine]) -> None:
    for before, after in itertools.pairwise(lines):
        if not before.sort_key < after.sort_key:
            raise DecodeError(
                "lines must be sorted by (client, custodian, asset) without duplicates"
            )


def _check_commitments(snapshot: PositionsSnapshot, lines: Sequence[PositionLine]) -> None:
    """The snapshot's count, totals, total value and root are those of ``lines`` (all of them)."""
    totals, total_value, count = compute_totals(lines)
    if count != snapshot.count:
        raise SumMismatch(f"{count} lines, but the snapshot counts {snapshot.count}")
    if totals != snapshot.totals:
        raise SumMismatch("the lines' per-asset totals are not the snapshot's totals")
    if total_value != snapshot.total_value:
        raise SumMismatch(f"the lines are worth {total_value}, not {snapshot.total_value}")
    if compute_lines_root(lines) != snapshot.lines_root:
        raise RootMismatch("the lines do not give the snapshot's lines_root")


def build_positions_snapshot(
    *,
    exchange: str,
    as_of: datetime,
    quote: str,
    streams: Iterable[StreamHeadRef],
    lines: Iterable[PositionLine],
    max_lines_per_part: int = MAX_LINES_PER_PART,
) -> tuple[PositionsSnapshot, ...]:
    """Every part of the snapshot of ``lines`` (sorted here), each with at most
    ``max_lines_per_part`` lines. Duplicate (client, custodian, asset) lines raise DecodeError."""
    require_int(max_lines_per_part, what="max_lines_per_part", low=1, high=MAX_LINES_PER_PART)
    ordered = tuple(sorted(lines, key=lambda line: line.sort_key))
    _check_sorted(ordered)
    heads = tuple(sorted(streams, key=lambda head: head.custodian))
    totals, total_value, count = compute_totals(ordered)
    root = compute_lines_root(ordered)
    starts = range(0, max(count, 1), max_lines_per_part)
    return tuple(
        PositionsSnapshot(
            exchange=exchange,
            as_of=as_of,
            quote=quote,
            streams=heads,
            count=count,
            totals=totals,
            total_value=total_value,
            lines_root=root,
            part=index,
            parts=len(starts),
            first=start,
            lines=ordered[start : start + max_lines_per_part],
        )
        for index, start in enumerate(starts)
    )


def combine_snapshot_parts(parts: Iterable[PositionsSnapshot]) -> tuple[PositionLine, ...]:
    """Every line of one snapshot from all its parts (in any order; verify each part's signature
    first). The parts must share one header, be numbered 0 .. parts-1 exactly once each and join
    without a gap or overlap (DecodeError); the joined lines must be sorted (DecodeError) and give
    the header's count and sums (SumMismatch) and root (RootMismatch)."""
    ordered = sorted(parts, key=lambda p: p.part)
    if not ordered:
        raise DecodeError("a snapshot has at least one part")
    first = ordered[0]
    if [p.part for p in ordered] != list(range(first.parts)):
        raise DecodeError(f"parts {[p.part for p in ordered][:10]} are not 0..{first.parts - 1}")
    lines: list[PositionLine] = []
    for part in ordered:
        if not part.same_snapshot(first):
            raise DecodeError(f"part {part.part} belongs to another snapshot")
        if part.first != len(lines):
            raise DecodeError(f"part {part.part} starts at line {part.first}, not {len(lines)}")
        lines.extend(part.lines)
    _check_sorted(lines)
    _check_commitments(first, lines)
    return tuple(lines)


# --- release acknowledgement --------------------------------------------------------------------


_RELEASE_KEYS: Final = frozenset(
    {
        "asset",
        "client",
        "custodian",
        "exchange",
        "expires_at",
        "issued_at",
        "quantity",
        "release_id",
        "version",
    }
)


def compute_release_id(
    *, exchange: str, custodian: str, client: str, asset: str, quantity: int, issued_at: datetime
) -> str:
    """``hex(SHA-256("mcb/release-id/v1" || 0x00 || exchange || 0x00 || custodian || 0x00 ||
    client || 0x00 || asset || 0x00 || quantity || 0x00 || issued_at))``, every part ASCII (the
    quantity as its decimal string, the time in its wire form). No part contains 0x00. Two
    acknowledgements that differ in any of these members have different ids, so the custodian
    can key its single-use record by the id."""
    data = "\x00".join(
        (
            exchange,
            custodian,
            client,
            asset,
            format_units(quantity),
            format_timestamp(issued_at),
        )
    )
    return compute_tagged_hash(domain=DOMAIN_RELEASE_ID, data=data.encode("ascii")).hex()


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseAck:
    """The exchange agrees that ``custodian`` release ``quantity`` minor units of ``asset`` from
    ``client``'s pledge to the exchange, from ``issued_at`` until ``expires_at`` (strictly later,
    at most :data:`MAX_RELEASE_VALIDITY` later). ``release_id`` is derived from the members
    (:func:`compute_release_id`). An acknowledgement releases at most its quantity, once: the
    custodian's book enforces that."""

    notice_type: ClassVar[NoticeType] = NoticeType.RELEASE_ACK
    domain: ClassVar[str] = DOMAIN_RELEASE_ACK

    exchange: str
    custodian: str
    client: str
    asset: str
    quantity: int
    issued_at: datetime
    expires_at: datetime
    version: int = NOTICE_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=NOTICE_VERSION, what="release acknowledgement")
        validate_party(self.exchange, what="exchange")
        validate_party(self.custodian, what="custodian")
        if self.exchange == self.custodian:
            raise DecodeError("exchange and custodian must be different parties")
        validate_account(self.client)
        validate_asset_code(self.asset)
        if check_units(self.quantity, what="quantity") == 0:
            raise DecodeError("a release acknowledgement releases at least one unit")
        require_utc(self.issued_at, what="issued_at")
        require_utc(self.expires_at, what="expires_at")
        if self.expires_at <= self.issued_at:
            raise DecodeError("a release acknowledgement must expire after it is issued")
        if self.expires_at - self.issued_at > MAX_RELEASE_VALIDITY:
            raise DecodeError(
                f"a release acknowledgement is valid for at most {MAX_RELEASE_VALIDITY}"
            )

    @property
    def release_id(self) -> str:
        return compute_release_id(
            exchange=self.exchange,
            custodian=self.custodian,
            client=self.client,
            asset=self.asset,
            quantity=self.quantity,
            issued_at=self.issued_at,
        )

    @property
    def signed_at(self) -> datetime:
        return self.issued_at

    def to_wire(self) -> dict[str, Any]:
        return {
            "asset": self.asset,
            "client": self.client,
            "custodian": self.custodian,
            "exchange": self.exchange,
            "expires_at": format_timestamp(self.expires_at),
            "issued_at": format_timestamp(self.issued_at),
            "quantity": format_units(self.quantity),
            "release_id": self.release_id,
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object) -> ReleaseAck:
        m = require_members(obj, what="release acknowledgement", keys=_RELEASE_KEYS)
        require_version(m["version"], expected=NOTICE_VERSION, what="release acknowledgement")
        ack = cls(
            exchange=validate_party(m["exchange"], what="exchange"),
            custodian=validate_party(m["custodian"], what="custodian"),
            client=validate_account(m["client"]),
            asset=validate_asset_code(m["asset"]),
            quantity=parse_units(m["quantity"]),
            issued_at=parse_timestamp(m["issued_at"]),
            expires_at=parse_timestamp(m["expires_at"]),
        )
        if m["release_id"] != ack.release_id:
            raise DecodeError(
                f"release_id {str(m['release_id'])[:70]!r} is not the acknowledgement's id"
            )
        return ack

    def canonical_bytes(self) -> bytes:
        return compute_canonical_bytes(self.to_wire())

    def compute_digest(self) -> bytes:
        return compute_digest(domain=self.domain, obj=self.to_wire())


# --- the signed wrapper -------------------------------------------------------------------------


NoticeBody = MarginCall | LiquidationDue | PositionsSnapshot | ReleaseAck
_BODY_TYPES: Final[Mapping[NoticeType, type[NoticeBody]]] = {
    NoticeType.MARGIN_CALL: MarginCall,
    NoticeType.LIQUIDATION_DUE: LiquidationDue,
    NoticeType.POSITIONS_SNAPSHOT: PositionsSnapshot,
    NoticeType.RELEASE_ACK: ReleaseAck,
}
_SIGNED_KEYS: Final = frozenset({"notice", "signature", "type", "version"})


@dataclass(frozen=True, slots=True)
class NoticeSignature:
    """ECDSA P-256 (``ecdsa-p256-sha256``, 64 bytes ``r || s``) by the exchange key ``key_id``."""

    key_id: str
    signature: bytes

    def __post_init__(self) -> None:
        validate_key_id(self.key_id)
        require_bytes(self.signature, what="notice signature", length=64)

    def to_wire(self) -> dict[str, Any]:
        return compute_p256_signature_wire(key_id=self.key_id, signature=self.signature)

    @classmethod
    def from_wire(cls, obj: object) -> NoticeSignature:
        key_id, signature = parse_p256_signature_wire(obj, what="notice signature")
        return cls(key_id=key_id, signature=signature)


@dataclass(frozen=True, slots=True)
class SignedNotice:
    """A notice body and the exchange's signature over its digest. The ``type`` member on the wire
    names the body's layout; the digest's domain tag binds it, so a signature over one type can
    never pass for another. Its identity is the body's digest, not the signature bytes."""

    notice: NoticeBody
    signature: NoticeSignature
    version: int = NOTICE_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=NOTICE_VERSION, what="signed notice")
        if not isinstance(self.notice, tuple(_BODY_TYPES.values())):
            raise DecodeError(
                "notice must be a MarginCall, LiquidationDue, PositionsSnapshot or ReleaseAck"
            )
        if not isinstance(self.signature, NoticeSignature):
            raise DecodeError("signature must be a NoticeSignature")

    @property
    def type(self) -> NoticeType:
        return self.notice.notice_type

    @property
    def digest(self) -> bytes:
        return self.notice.compute_digest()

    def to_wire(self) -> dict[str, Any]:
        return {
            "notice": self.notice.to_wire(),
            "signature": self.signature.to_wire(),
            "type": self.type.value,
            "version": self.version,
        }

    def encode(self) -> bytes:
        """Wire bytes: RFC 8785 of :meth:`to_wire`."""
        return compute_canonical_bytes(self.to_wire())

    @classmethod
    def from_wire(cls, obj: object) -> SignedNotice:
        m = require_members(obj, what="signed notice", keys=_SIGNED_KEYS)
        require_version(m["version"], expected=NOTICE_VERSION, what="signed notice")
        kind = m["type"]
        if not isinstance(kind, str) or kind not in {t.value for t in NoticeType}:
            raise DecodeError(f"notice type {str(kind)[:40]!r} is unknown")
        body = _BODY_TYPES[NoticeType(kind)].from_wire(m["notice"])
        return cls(notice=body, signature=NoticeSignature.from_wire(m["signature"]))

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> SignedNotice:
        """Strictly decode wire bytes (size-bounded, no duplicate members, no floats)."""
        return cls.from_wire(parse_json_object(data, max_bytes=max_bytes))


def sign_notice(notice: NoticeBody, signer: DigestSigner) -> SignedNotice:
    """Sign ``notice``'s digest with the exchange's key (checked against its public key before it
    is returned, see :func:`attestations.signing.sign_digest_checked`)."""
    signature = sign_digest_checked(signer, notice.compute_digest())
    return SignedNotice(notice=notice, signature=NoticeSignature(signer.key_id, signature))


def verify_notice(
    message: SignedNotice | bytes,
    *,
    registry: KeyRegistry,
    now: datetime,
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> NoticeBody:
    """The notice's body if, in this order: it decodes strictly (DecodeError and its amount
    subclasses, RootMismatch / SumMismatch for a one-part snapshot); its key is a registered
    ``exchange`` key whose principal is the body's exchange (UnknownKey), usable at the body's
    time (``issued_at``, or ``as_of``) verified at ``now`` (RevokedKey, KeyNotValid); the signature
    verifies over the digest the verifier computes (BadSignature); and the body is not dated more
    than ``max_clock_skew`` after ``now`` (FutureDated)."""
    require_utc(now, what="now")
    signed = (
        message
        if isinstance(message, SignedNotice)
        else SignedNotice.decode(message, max_bytes=max_bytes)
    )
    notice = signed.notice
    record = registry.resolve(
        signed.signature.key_id,
        principal=notice.exchange,
        role=KeyRole.EXCHANGE,
        at=notice.signed_at,
        now=now,
    )
    verify_p256_digest(
        public_key=record.public_key,
        digest=notice.compute_digest(),
        signature=signed.signature.signature,
    )
    if notice.signed_at > now + max_clock_skew:
        raise FutureDated(
            f"{signed.type.value} dated {format_timestamp(notice.signed_at)} is ahead of "
            f"{format_timestamp(now)}"
        )
    return notice


def verify_release_ack(
    message: SignedNotice | bytes,
    *,
    registry: KeyRegistry,
    now: datetime,
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> ReleaseAck:
    """The acknowledgement if :func:`verify_notice` accepts the message, its body is a
    :class:`ReleaseAck` (else DecodeError: a margin call is not a release), and it has not
    expired at ``now`` (``now < expires_at``, else Expired). Whether it fits an unpledge and was
    used before is for the caller (custodian/book.py)."""
    body = verify_notice(
        message, registry=registry, now=now, max_clock_skew=max_clock_skew, max_bytes=max_bytes
    )
    if not isinstance(body, ReleaseAck):
        raise DecodeError(f"a {body.notice_type.value} notice is not a release acknowledgement")
    if now >= body.expires_at:
        raise Expired(
            f"release acknowledgement {body.release_id} expired at "
            f"{format_timestamp(body.expires_at)}, it is {format_timestamp(now)}"
        )
    return body
