"""Versioned message envelopes: objects to Kafka (key, value, headers) and back, strictly.

Every bridge message is a Kafka record whose headers follow the CloudEvents Kafka binding
(``ce_specversion``, ``ce_id``, ``ce_source``, ``ce_type``, ``ce_time``, ``content-type``) plus the
bridge's own ``mcb_*`` headers, and whose value is the body: RFC 8785 bytes of a JSON object for
statements, snapshot requests, the exchange's signed notices (margin calls, liquidation-due
notices, positions snapshots, release acknowledgements) and exposure reports, a slice of the
canonical leaf disclosure for a disclosure chunk, and the untouched original value for a dead
letter. docs/protocol.md section 11 specifies every byte; this module is the reference
implementation.

:func:`decode_message` accepts a record or raises a
:class:`~attestations.errors.DecodeError` subclass whose ``reason`` the consumer writes into the
dead letter: an unknown or unsupported type, a type on a topic that does not carry it, a missing,
duplicate, unknown or ill-formed header, headers that disagree with the key or the body, or a
record over the size bound.

What this module does not do: verify signatures or chains (attestations.verify,
attestations.notices.verify_notice), split or
reassemble disclosures (bridge/chunks.py), or talk to Kafka (bridge/kafka.py). It is pure: no
clock, no environment, no I/O; the caller passes every time.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from attestations.amounts import check_units, format_units, parse_units, validate_asset_code
from attestations.canonical import (
    MAX_MESSAGE_BYTES,
    compute_canonical_bytes,
    format_timestamp,
    parse_hex,
    parse_json_object,
    parse_timestamp,
)
from attestations.errors import BridgeError, DecodeError, InvariantViolation
from attestations.merkle import validate_account
from attestations.notices import (
    MAX_SNAPSHOT_PARTS,
    LiquidationDue,
    MarginCall,
    NoticeType,
    PositionsSnapshot,
    ReleaseAck,
    SignedNotice,
    check_signed_units,
    format_signed_units,
    parse_signed_units,
)
from attestations.statement import (
    MAX_SEQUENCE,
    SignedStatement,
    require_int,
    require_members,
    require_utc,
    require_version,
    validate_party,
)
from bridge.errors import MessageTooLarge
from bridge.topics import (
    DEFAULT_CATALOGUE,
    MessageType,
    TopicCatalogue,
    compute_stream_key,
    parse_stream_key,
    validate_topic_name,
)

CE_SPECVERSION: Final = "1.0"
ENVELOPE_VERSION: Final = 1
SNAPSHOT_REQUEST_VERSION: Final = 1
EXPOSURE_REPORT_VERSION: Final = 1
DEFAULT_BUDGET_BYTES: Final = 900_000
"""What a producer allows one record (key + value + header names and values): well under the
broker's default 1 MB limit, leaving room for Kafka's own record and batch framing."""
MIN_BUDGET_BYTES: Final = 512
MAX_HEADERS: Final = 32
MAX_ERROR_TEXT_BYTES: Final = 1000
MAX_OFFSET: Final = 2**63 - 1
MAX_PARTITION: Final = 2**31 - 1
MAX_PAYLOAD_BYTES: Final = 2**53 - 1
MESSAGE_ID_DOMAIN: Final = b"mcb/message/v1\x00"

JSON: Final = "application/json"
OCTETS: Final = "application/octet-stream"

_DECIMAL_RE: Final = re.compile(rb"0|[1-9][0-9]{0,15}")
_HEX64_RE: Final = re.compile(rb"[0-9a-f]{64}")
_REASON_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SOURCE_RE: Final = re.compile(r"/[\x21-\x7e]{0,255}")
_TYPE_RE: Final = re.compile(r"mcb\.([a-z-]+)\.v([0-9]+)")
_REPORT_ID_RE: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


# --- errors -------------------------------------------------------------------------------------


class EnvelopeError(DecodeError):
    """A record that is not a well-formed bridge message."""

    reason = "malformed_envelope"


class OversizedMessage(EnvelopeError):
    reason = "oversized"


class HeaderError(EnvelopeError):
    """A header is missing, repeated, unknown for the message type, or ill-formed."""

    reason = "bad_header"


class UnsupportedVersion(EnvelopeError):
    """Another CloudEvents spec version, envelope version, or version of a known message type."""

    reason = "unsupported_version"


class UnknownMessageType(EnvelopeError):
    reason = "unknown_message_type"


class WrongTopic(EnvelopeError):
    """A topic this deployment does not have, or a type that does not travel on it (a statement
    replayed onto the instructions topic, for example)."""

    reason = "wrong_topic"


class HeaderMismatch(EnvelopeError):
    """Headers disagree with the key, with the body, or with ``ce_id``."""

    reason = "header_mismatch"


# --- values -------------------------------------------------------------------------------------

Headers = tuple[tuple[str, bytes], ...]
RawHeaders = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One record ready for the producer. ``size`` is what the budget counts."""

    topic: str
    key: bytes
    value: bytes
    headers: Headers

    def __post_init__(self) -> None:
        validate_topic_name(self.topic)
        if not isinstance(self.key, bytes) or not isinstance(self.value, bytes):
            raise InvariantViolation("key and value must be bytes")
        if not isinstance(self.headers, tuple) or not all(
            isinstance(h, tuple)
            and len(h) == 2
            and isinstance(h[0], str)
            and isinstance(h[1], bytes)
            for h in self.headers
        ):
            raise InvariantViolation("headers must be a tuple of (str, bytes) pairs")

    @property
    def size(self) -> int:
        return compute_record_size(self.key, self.value, self.headers)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The CloudEvents attributes of a decoded record, and where it was read from."""

    id: str
    type: MessageType
    source: str
    time: datetime
    content_type: str
    topic: str
    key: bytes


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """An exchange asks the custodian for a snapshot statement of its stream, at a sequence of at
    least ``from_sequence`` (the first one the exchange is missing), because of ``reason`` (an
    error reason such as ``sequence_gap``)."""

    custodian: str
    exchange: str
    from_sequence: int
    reason: str
    requested_at: datetime
    version: int = SNAPSHOT_REQUEST_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=SNAPSHOT_REQUEST_VERSION, what="snapshot request")
        compute_stream_key(custodian=self.custodian, exchange=self.exchange)
        if self.custodian == self.exchange:
            raise DecodeError("custodian and exchange must be different parties")
        require_int(self.from_sequence, what="from_sequence", low=1, high=MAX_SEQUENCE)
        _check_reason(self.reason)
        require_utc(self.requested_at, what="requested_at")

    @property
    def stream(self) -> str:
        return compute_stream_key(custodian=self.custodian, exchange=self.exchange)

    def to_wire(self) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "exchange": self.exchange,
            "from_sequence": self.from_sequence,
            "reason": self.reason,
            "requested_at": format_timestamp(self.requested_at),
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object) -> SnapshotRequest:
        m = require_members(obj, what="snapshot request", keys=_SNAPSHOT_REQUEST_KEYS)
        require_version(m["version"], expected=SNAPSHOT_REQUEST_VERSION, what="snapshot request")
        return cls(
            custodian=validate_party(m["custodian"], what="custodian"),
            exchange=validate_party(m["exchange"], what="exchange"),
            from_sequence=require_int(
                m["from_sequence"], what="from_sequence", low=1, high=MAX_SEQUENCE
            ),
            reason=_check_reason(m["reason"]),
            requested_at=parse_timestamp(m["requested_at"]),
        )


_SNAPSHOT_REQUEST_KEYS: Final = frozenset(
    {"custodian", "exchange", "from_sequence", "reason", "requested_at", "version"}
)


@dataclass(frozen=True, slots=True)
class ExposureReport:
    """The trading engine tells the margin ledger of ``exchange`` where ``client`` stands: its
    open ``exposure``, the margin ``requirement`` of that exposure (both unsigned) and its
    ``unrealised_pnl`` (signed), in minor units of ``quote``, as of ``reported_at``.
    ``report_id`` (1-128 characters ``[A-Za-z0-9._:@-]``) names the report, so a redelivered one
    is recognised. Internal to the exchange and unsigned: the exposures topic is not shared with
    any other party."""

    exchange: str
    client: str
    report_id: str
    reported_at: datetime
    exposure: int
    requirement: int
    unrealised_pnl: int
    quote: str
    version: int = EXPOSURE_REPORT_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=EXPOSURE_REPORT_VERSION, what="exposure report")
        validate_party(self.exchange, what="exchange")
        validate_account(self.client)
        _check_report_id(self.report_id)
        require_utc(self.reported_at, what="reported_at")
        check_units(self.exposure, what="exposure")
        check_units(self.requirement, what="requirement")
        check_signed_units(self.unrealised_pnl, what="unrealised_pnl")
        validate_asset_code(self.quote)

    def to_wire(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "exchange": self.exchange,
            "exposure": format_units(self.exposure, what="exposure"),
            "quote": self.quote,
            "report_id": self.report_id,
            "reported_at": format_timestamp(self.reported_at),
            "requirement": format_units(self.requirement, what="requirement"),
            "unrealised_pnl": format_signed_units(self.unrealised_pnl, what="unrealised_pnl"),
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object) -> ExposureReport:
        m = require_members(obj, what="exposure report", keys=_EXPOSURE_REPORT_KEYS)
        require_version(m["version"], expected=EXPOSURE_REPORT_VERSION, what="exposure report")
        return cls(
            exchange=validate_party(m["exchange"], what="exchange"),
            client=validate_account(m["client"]),
            report_id=_check_report_id(m["report_id"]),
            reported_at=parse_timestamp(m["reported_at"]),
            exposure=parse_units(m["exposure"], what="exposure"),
            requirement=parse_units(m["requirement"], what="requirement"),
            unrealised_pnl=parse_signed_units(m["unrealised_pnl"], what="unrealised_pnl"),
            quote=validate_asset_code(m["quote"]),
        )


_EXPOSURE_REPORT_KEYS: Final = frozenset(
    {
        "client",
        "exchange",
        "exposure",
        "quote",
        "report_id",
        "reported_at",
        "requirement",
        "unrealised_pnl",
        "version",
    }
)


@dataclass(frozen=True, slots=True)
class DisclosureChunk:
    """Chunk ``index`` of ``count`` of the canonical leaf disclosure of one statement.

    ``payload_digest`` is SHA-256 of the whole canonical disclosure (``payload_size`` bytes);
    ``data`` is its slice (bridge/chunks.py fixes the layout). A chunk proves nothing alone: the
    receiver uses the payload only once every chunk is there and the digest matches."""

    custodian: str
    exchange: str
    sequence: int
    statement_digest: bytes
    payload_digest: bytes
    payload_size: int
    index: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        compute_stream_key(custodian=self.custodian, exchange=self.exchange)
        if self.custodian == self.exchange:
            raise DecodeError("custodian and exchange must be different parties")
        require_int(self.sequence, what="sequence", low=1, high=MAX_SEQUENCE)
        for what, digest in (
            ("statement", self.statement_digest),
            ("payload", self.payload_digest),
        ):
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise DecodeError(f"{what} digest must be 32 bytes")
        require_int(self.payload_size, what="payload size", low=0, high=MAX_PAYLOAD_BYTES)
        # No chunk is empty except the single chunk of an empty payload.
        require_int(self.count, what="chunk count", low=1, high=max(1, self.payload_size))
        require_int(self.index, what="chunk index", low=0, high=self.count - 1)
        if not isinstance(self.data, bytes):
            raise DecodeError("chunk data must be bytes")

    @property
    def stream(self) -> str:
        return compute_stream_key(custodian=self.custodian, exchange=self.exchange)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record a consumer gave up on, and why. ``value`` is the original value, cut to a prefix
    only if the dead letter would not fit the budget otherwise (then ``truncated``; the original
    size and SHA-256 are always kept, so it can still be found and checked on its topic).
    ``headers`` is None when the original headers were too large to keep."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    value_size: int
    value_sha256: bytes
    headers: tuple[tuple[str, bytes | None], ...] | None
    reason: str
    error: str

    def __post_init__(self) -> None:
        validate_topic_name(self.topic)
        require_int(self.partition, what="partition", low=0, high=MAX_PARTITION)
        require_int(self.offset, what="offset", low=0, high=MAX_OFFSET)
        if self.key is not None and not isinstance(self.key, bytes):
            raise DecodeError("dead-letter key must be bytes or None")
        if not isinstance(self.value, bytes):
            raise DecodeError("dead-letter value must be bytes")
        require_int(self.value_size, what="value size", low=len(self.value), high=MAX_OFFSET)
        if not isinstance(self.value_sha256, bytes) or len(self.value_sha256) != 32:
            raise DecodeError("value_sha256 must be 32 bytes")
        if not self.truncated and hashlib.sha256(self.value).digest() != self.value_sha256:
            raise HeaderMismatch("the dead-lettered value does not match its SHA-256")
        if self.headers is not None:
            _check_raw_headers(self.headers)
        _check_reason(self.reason)
        if not isinstance(self.error, str):
            raise DecodeError("error text must be a string")

    @property
    def truncated(self) -> bool:
        return len(self.value) < self.value_size


Body = (
    SignedStatement | DisclosureChunk | SnapshotRequest | DeadLetter | SignedNotice | ExposureReport
)


@dataclass(frozen=True, slots=True)
class DecodedMessage:
    """A record that passed every envelope check; ``body`` is of the type ``envelope.type``
    names. A statement still needs attestations.verify, a notice
    attestations.notices.verify_notice; a chunk still needs reassembly."""

    envelope: Envelope
    body: Body


# --- the header table ---------------------------------------------------------------------------

_COMMON: Final = (
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "content-type",
    "mcb_envelope_version",
)
# Per type: the headers after the common ones, in the order a producer writes them; and the
# content type. A receiver requires exactly these names (plus the optional ones), in any order.
_TYPE_HEADERS: Final[Mapping[MessageType, tuple[str, ...]]] = {
    MessageType.STATEMENT: ("mcb_stream", "mcb_sequence", "mcb_statement_digest"),
    MessageType.DISCLOSURE_CHUNK: (
        "mcb_stream",
        "mcb_sequence",
        "mcb_statement_digest",
        "mcb_payload_digest",
        "mcb_payload_size",
        "mcb_chunk_index",
        "mcb_chunk_count",
    ),
    MessageType.SNAPSHOT_REQUEST: ("mcb_stream",),
    MessageType.DEAD_LETTER: (
        "mcb_dlq_topic",
        "mcb_dlq_partition",
        "mcb_dlq_offset",
        "mcb_dlq_key",
        "mcb_dlq_value_size",
        "mcb_dlq_value_sha256",
        "mcb_dlq_reason",
        "mcb_dlq_error",
        "mcb_dlq_headers",
    ),
    MessageType.MARGIN_CALL: ("mcb_stream", "mcb_notice_id", "mcb_notice_digest"),
    MessageType.LIQUIDATION_DUE: ("mcb_stream", "mcb_notice_id", "mcb_notice_digest"),
    MessageType.POSITIONS_SNAPSHOT: (
        "mcb_exchange",
        "mcb_snapshot_part",
        "mcb_snapshot_parts",
        "mcb_notice_digest",
    ),
    MessageType.EXPOSURE_REPORT: ("mcb_client",),
    MessageType.RELEASE_ACK: ("mcb_stream", "mcb_release_id", "mcb_notice_digest"),
}
_OPTIONAL_HEADERS: Final[Mapping[MessageType, frozenset[str]]] = {
    MessageType.DEAD_LETTER: frozenset({"mcb_dlq_key"}),  # absent when the original key was null
}
_CONTENT_TYPES: Final[Mapping[MessageType, str]] = {
    MessageType.STATEMENT: JSON,
    MessageType.DISCLOSURE_CHUNK: OCTETS,
    MessageType.SNAPSHOT_REQUEST: JSON,
    MessageType.DEAD_LETTER: OCTETS,
    MessageType.MARGIN_CALL: JSON,
    MessageType.LIQUIDATION_DUE: JSON,
    MessageType.POSITIONS_SNAPSHOT: JSON,
    MessageType.EXPOSURE_REPORT: JSON,
    MessageType.RELEASE_ACK: JSON,
}
# The notice type a record of each notice message type carries.
_NOTICE_TYPES: Final[Mapping[MessageType, NoticeType]] = {
    MessageType.MARGIN_CALL: NoticeType.MARGIN_CALL,
    MessageType.LIQUIDATION_DUE: NoticeType.LIQUIDATION_DUE,
    MessageType.POSITIONS_SNAPSHOT: NoticeType.POSITIONS_SNAPSHOT,
    MessageType.RELEASE_ACK: NoticeType.RELEASE_ACK,
}
_ID_EXCLUDED: Final = frozenset({"ce_id", "ce_time"})


def header_names(message_type: MessageType) -> tuple[str, ...]:
    """Every header a message of this type may carry, in the order a producer writes them."""
    return _COMMON + _TYPE_HEADERS[message_type]


# --- byte-level helpers -------------------------------------------------------------------------


def compute_record_size(key: bytes | None, value: bytes | None, headers: RawHeaders) -> int:
    """Key + value + every header name (UTF-8) and value: the bytes the budget counts."""
    size = len(key or b"") + len(value or b"")
    for name, header_value in headers:
        size += len(name.encode("utf-8")) + len(header_value or b"")
    return size


def compute_message_id(key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> str:
    """``ce_id``: lowercase hex of SHA-256 over the domain tag, the key, every header except
    ``ce_id`` and ``ce_time`` (sorted by name, length-prefixed) and the value. Deterministic, so a
    republished record has the same id (a duplicate), and any two distinct records differ."""
    included = sorted((n.encode("utf-8"), v) for n, v in headers if n not in _ID_EXCLUDED)
    digest = hashlib.sha256(MESSAGE_ID_DOMAIN)
    digest.update(len(key).to_bytes(4, "big") + key + len(included).to_bytes(2, "big"))
    for name, header_value in included:
        digest.update(len(name).to_bytes(2, "big") + name)
        digest.update(len(header_value).to_bytes(4, "big") + header_value)
    digest.update(value)
    return digest.hexdigest()


def _check_reason(value: object) -> str:
    if not isinstance(value, str) or not _REASON_RE.fullmatch(value):
        raise DecodeError(f"reason {str(value)[:70]!r} must match [a-z][a-z0-9_]{{0,63}}")
    return value


def _check_report_id(value: object) -> str:
    if not isinstance(value, str) or not _REPORT_ID_RE.fullmatch(value):
        raise DecodeError(f"report_id {str(value)[:70]!r} must match [A-Za-z0-9._:@-]{{1,128}}")
    return value


def _check_raw_headers(headers: object) -> None:
    if not isinstance(headers, Sequence) or isinstance(headers, str | bytes):
        raise EnvelopeError("headers must be a sequence of (name, value) pairs")
    for item in headers:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise HeaderError("each header must be a (name, value) pair")
        name, header_value = item
        if not isinstance(name, str):
            raise HeaderError(f"header name {name!r} is not a string")
        if header_value is not None and not isinstance(header_value, bytes):
            raise HeaderError(f"header {name[:40]!r} value is not bytes")


def _assemble(
    *,
    topic: str,
    key: bytes,
    value: bytes,
    message_type: MessageType,
    source: str,
    time: datetime,
    extra: Sequence[tuple[str, str]],
    budget_bytes: int | None,
) -> OutboundMessage:
    """Headers in the producer order, with ``ce_id`` computed over the rest."""
    if not _SOURCE_RE.fullmatch(source):
        raise InvariantViolation(f"ce_source {source[:40]!r} is not an absolute path reference")
    headers: list[tuple[str, bytes]] = [
        ("ce_specversion", CE_SPECVERSION.encode()),
        ("ce_id", b""),
        ("ce_source", source.encode("ascii")),
        ("ce_type", message_type.value.encode("ascii")),
        ("ce_time", format_timestamp(time).encode("ascii")),
        ("content-type", _CONTENT_TYPES[message_type].encode("ascii")),
        ("mcb_envelope_version", str(ENVELOPE_VERSION).encode("ascii")),
    ]
    headers.extend((name, text.encode("utf-8")) for name, text in extra)
    headers[1] = ("ce_id", compute_message_id(key, value, headers).encode("ascii"))
    message = OutboundMessage(topic=topic, key=key, value=value, headers=tuple(headers))
    if budget_bytes is not None and message.size > budget_bytes:
        raise MessageTooLarge(
            f"{message_type.value} record of {message.size} bytes exceeds the budget of "
            f"{budget_bytes}"
        )
    return message


def check_budget(budget_bytes: int) -> int:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
        raise InvariantViolation("budget_bytes must be an integer")
    if budget_bytes < MIN_BUDGET_BYTES:
        raise InvariantViolation(f"budget_bytes {budget_bytes} is below {MIN_BUDGET_BYTES}")
    return budget_bytes


# --- encoding -----------------------------------------------------------------------------------


def encode_statement(
    signed: SignedStatement,
    *,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> OutboundMessage:
    """The statement as one record on the attestations topic, keyed by its stream. ``ce_time``
    is ``issued_at``, so the record is a pure function of the statement."""
    statement = signed.statement
    stream = compute_stream_key(custodian=statement.custodian, exchange=statement.exchange)
    return _assemble(
        topic=catalogue.topic_for(MessageType.STATEMENT),
        key=stream.encode("ascii"),
        value=signed.encode(),
        message_type=MessageType.STATEMENT,
        source=f"/custodians/{statement.custodian}",
        time=statement.issued_at,
        extra=(
            ("mcb_stream", stream),
            ("mcb_sequence", str(statement.sequence)),
            ("mcb_statement_digest", signed.digest.hex()),
        ),
        budget_bytes=check_budget(budget_bytes),
    )


def encode_chunk(
    chunk: DisclosureChunk,
    *,
    time: datetime,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
) -> OutboundMessage:
    """One disclosure chunk as a record (bridge/chunks.py decides the slices). ``time`` is the
    ``ce_time`` of every chunk of the disclosure; it does not enter ``ce_id``."""
    return _assemble(
        topic=catalogue.topic_for(MessageType.DISCLOSURE_CHUNK),
        key=chunk.stream.encode("ascii"),
        value=chunk.data,
        message_type=MessageType.DISCLOSURE_CHUNK,
        source=f"/custodians/{chunk.custodian}",
        time=time,
        extra=(
            ("mcb_stream", chunk.stream),
            ("mcb_sequence", str(chunk.sequence)),
            ("mcb_statement_digest", chunk.statement_digest.hex()),
            ("mcb_payload_digest", chunk.payload_digest.hex()),
            ("mcb_payload_size", str(chunk.payload_size)),
            ("mcb_chunk_index", str(chunk.index)),
            ("mcb_chunk_count", str(chunk.count)),
        ),
        budget_bytes=None if budget_bytes is None else check_budget(budget_bytes),
    )


def encode_snapshot_request(
    request: SnapshotRequest,
    *,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> OutboundMessage:
    """The request on the instructions topic, keyed by its stream; ``ce_time`` is
    ``requested_at``."""
    return _assemble(
        topic=catalogue.topic_for(MessageType.SNAPSHOT_REQUEST),
        key=request.stream.encode("ascii"),
        value=compute_canonical_bytes(request.to_wire()),
        message_type=MessageType.SNAPSHOT_REQUEST,
        source=f"/exchanges/{request.exchange}",
        time=request.requested_at,
        extra=(("mcb_stream", request.stream),),
        budget_bytes=check_budget(budget_bytes),
    )


def encode_notice(
    signed: SignedNotice,
    *,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> OutboundMessage:
    """A signed notice as one record, a pure function of the notice (``ce_time`` is its
    ``issued_at``, or ``as_of``). Margin calls, liquidation-due notices and release
    acknowledgements go to the instructions topic keyed by ``<custodian>/<exchange>``; a positions
    snapshot part goes to ledger-snapshots keyed by the exchange. The signature is not checked
    here: the caller signed it."""
    notice = signed.notice
    digest = ("mcb_notice_digest", signed.digest.hex())
    if isinstance(notice, PositionsSnapshot):
        message_type = MessageType.POSITIONS_SNAPSHOT
        key = notice.exchange
        extra: tuple[tuple[str, str], ...] = (
            ("mcb_exchange", notice.exchange),
            ("mcb_snapshot_part", str(notice.part)),
            ("mcb_snapshot_parts", str(notice.parts)),
            digest,
        )
    elif isinstance(notice, ReleaseAck):
        message_type = MessageType.RELEASE_ACK
        key = compute_stream_key(custodian=notice.custodian, exchange=notice.exchange)
        extra = (("mcb_stream", key), ("mcb_release_id", notice.release_id), digest)
    else:
        message_type = (
            MessageType.MARGIN_CALL
            if isinstance(notice, MarginCall)
            else MessageType.LIQUIDATION_DUE
        )
        key = compute_stream_key(custodian=notice.custodian, exchange=notice.exchange)
        extra = (("mcb_stream", key), ("mcb_notice_id", notice.notice_id), digest)
    return _assemble(
        topic=catalogue.topic_for(message_type),
        key=key.encode("ascii"),
        value=signed.encode(),
        message_type=message_type,
        source=f"/exchanges/{notice.exchange}",
        time=notice.signed_at,
        extra=extra,
        budget_bytes=check_budget(budget_bytes),
    )


def encode_exposure_report(
    report: ExposureReport,
    *,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> OutboundMessage:
    """The report on the exposures topic, keyed by the client; ``ce_time`` is ``reported_at``
    and ``ce_source`` ``/exchanges/<exchange>/trading``."""
    return _assemble(
        topic=catalogue.topic_for(MessageType.EXPOSURE_REPORT),
        key=report.client.encode("ascii"),
        value=compute_canonical_bytes(report.to_wire()),
        message_type=MessageType.EXPOSURE_REPORT,
        source=f"/exchanges/{report.exchange}/trading",
        time=report.reported_at,
        extra=(("mcb_client", report.client),),
        budget_bytes=check_budget(budget_bytes),
    )


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode("utf-8", errors="replace")[:limit].decode("utf-8", errors="ignore")


def encode_dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: RawHeaders,
    error: BridgeError,
    source: str,
    at: datetime,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> OutboundMessage:
    """The record at ``topic``/``partition``/``offset`` as a dead letter: its value unchanged as
    the value (cut to fit the budget only when it must), its key, headers, place, and the error's
    ``reason`` and text in headers. ``source`` names the consumer (``/exchanges/x/consumer``)."""
    if not isinstance(error, BridgeError):
        raise InvariantViolation("dead letters carry a BridgeError (wrap other exceptions first)")
    original = value or b""  # a null value is kept as empty bytes
    _check_raw_headers(headers)
    kept: tuple[tuple[str, bytes | None], ...] | None = tuple(
        (name, header_value) for name, header_value in headers
    )
    letter = DeadLetter(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=original,
        value_size=len(original),
        value_sha256=hashlib.sha256(original).digest(),
        headers=kept,
        reason=error.reason,
        error=_truncate_utf8(str(error) or type(error).__name__, MAX_ERROR_TEXT_BYTES),
    )
    budget = check_budget(budget_bytes)
    message = _encode_dead_letter(letter, source=source, at=at, catalogue=catalogue)
    if message.size <= budget:
        return message
    room = budget - (message.size - len(original))
    if room < 0:  # the original headers alone do not fit: drop them, keep everything else
        letter = _replace_dead_letter(letter, value=original, headers=None)
        message = _encode_dead_letter(letter, source=source, at=at, catalogue=catalogue)
        room = budget - (message.size - len(original))
        if room < 0:
            raise InvariantViolation("a dead letter does not fit the budget even without value")
    letter = _replace_dead_letter(letter, value=original[:room], headers=letter.headers)
    return _encode_dead_letter(letter, source=source, at=at, catalogue=catalogue)


def _replace_dead_letter(
    letter: DeadLetter, *, value: bytes, headers: tuple[tuple[str, bytes | None], ...] | None
) -> DeadLetter:
    return DeadLetter(
        topic=letter.topic,
        partition=letter.partition,
        offset=letter.offset,
        key=letter.key,
        value=value,
        value_size=letter.value_size,
        value_sha256=letter.value_sha256,
        headers=headers,
        reason=letter.reason,
        error=letter.error,
    )


def _encode_headers_json(headers: tuple[tuple[str, bytes | None], ...] | None) -> str:
    if headers is None:
        return "null"
    items = [[name, None if v is None else v.hex()] for name, v in headers]
    # RFC 8785 of an array: canonicalize inside a wrapper object and cut the wrapper off.
    wrapped = compute_canonical_bytes({"h": items})
    return wrapped[len(b'{"h":') : -1].decode("utf-8")


def _encode_dead_letter(
    letter: DeadLetter, *, source: str, at: datetime, catalogue: TopicCatalogue
) -> OutboundMessage:
    extra = [
        ("mcb_dlq_topic", letter.topic),
        ("mcb_dlq_partition", str(letter.partition)),
        ("mcb_dlq_offset", str(letter.offset)),
    ]
    if letter.key is not None:
        extra.append(("mcb_dlq_key", letter.key.hex()))
    extra += [
        ("mcb_dlq_value_size", str(letter.value_size)),
        ("mcb_dlq_value_sha256", letter.value_sha256.hex()),
        ("mcb_dlq_reason", letter.reason),
        ("mcb_dlq_error", letter.error),
        ("mcb_dlq_headers", _encode_headers_json(letter.headers)),
    ]
    return _assemble(
        topic=catalogue.topic_for(MessageType.DEAD_LETTER),
        key=f"{letter.topic}/{letter.partition}".encode("ascii"),
        value=letter.value,
        message_type=MessageType.DEAD_LETTER,
        source=source,
        time=at,
        extra=extra,
        budget_bytes=None,
    )


# --- decoding -----------------------------------------------------------------------------------


def _header_int(headers: Mapping[str, bytes], name: str, *, high: int, low: int = 0) -> int:
    raw = headers[name]
    if not _DECIMAL_RE.fullmatch(raw):
        raise HeaderError(f"{name} {raw[:24]!r} is not a canonical decimal integer")
    number = int(raw)
    if not low <= number <= high:
        raise HeaderError(f"{name} {number} not in {low}..{high}")
    return number


def _header_hex32(headers: Mapping[str, bytes], name: str) -> bytes:
    raw = headers[name]
    if not _HEX64_RE.fullmatch(raw):
        raise HeaderError(f"{name} must be 64 lowercase hex characters")
    return bytes.fromhex(raw.decode("ascii"))


def _header_text(headers: Mapping[str, bytes], name: str) -> str:
    try:
        return headers[name].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{name} is not UTF-8") from exc


def _header_stream(headers: Mapping[str, bytes]) -> tuple[str, str]:
    try:
        return parse_stream_key(_header_text(headers, "mcb_stream"))
    except HeaderError:
        raise
    except DecodeError as exc:
        raise HeaderError(f"mcb_stream: {exc}") from exc


def _parse_type(raw: bytes) -> MessageType:
    try:
        text = raw.decode("ascii")
        return MessageType(text)
    except (UnicodeDecodeError, ValueError):
        pass
    match = _TYPE_RE.fullmatch(raw.decode("ascii", errors="replace"))
    if match and any(t.value.startswith(f"mcb.{match.group(1)}.v") for t in MessageType):
        raise UnsupportedVersion(f"message type {match.group(0)!r} is not a supported version")
    raise UnknownMessageType(f"unknown message type {raw[:60]!r}")


def _collect_headers(headers: RawHeaders) -> dict[str, bytes]:
    _check_raw_headers(headers)
    if len(headers) > MAX_HEADERS:
        raise HeaderError(f"{len(headers)} headers, more than {MAX_HEADERS}")
    out: dict[str, bytes] = {}
    for name, header_value in headers:
        if name in out:
            raise HeaderError(f"duplicate header {name[:40]!r}")
        if header_value is None:
            raise HeaderError(f"header {name[:40]!r} has a null value")
        out[name] = header_value
    return out


def _check_shape(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: RawHeaders,
    *,
    max_message_bytes: int,
) -> bytes:
    """The value, once the argument types and the size are right; a callee of a Kafka client
    gets these from the wire, so their types are checked too."""
    if not isinstance(topic, str):
        raise EnvelopeError("topic must be a string")
    if key is not None and not isinstance(key, bytes):
        raise EnvelopeError("key must be bytes or None")
    if value is not None and not isinstance(value, bytes):
        raise EnvelopeError("value must be bytes or None")
    _check_raw_headers(headers)
    size = compute_record_size(key, value, headers)
    if size > max_message_bytes:
        raise OversizedMessage(f"record of {size} bytes exceeds the limit of {max_message_bytes}")
    if value is None:
        raise EnvelopeError("the record has no value (a tombstone)")
    return value


def _read_type(topic: str, found: Mapping[str, bytes], catalogue: TopicCatalogue) -> MessageType:
    """The versions, the type, whether the topic carries it, and the exact header set."""
    for name in ("ce_specversion", "mcb_envelope_version", "ce_type"):
        if name not in found:
            raise HeaderError(f"missing header {name}")
    if found["ce_specversion"] != CE_SPECVERSION.encode():
        raise UnsupportedVersion(f"ce_specversion {found['ce_specversion'][:10]!r} is not 1.0")
    if found["mcb_envelope_version"] != str(ENVELOPE_VERSION).encode():
        raise UnsupportedVersion(
            f"mcb_envelope_version {found['mcb_envelope_version'][:10]!r} is not 1"
        )
    message_type = _parse_type(found["ce_type"])
    if not catalogue.allows(topic, message_type):
        raise WrongTopic(f"{message_type.value} does not travel on {topic}")
    allowed = set(header_names(message_type))
    required = allowed - _OPTIONAL_HEADERS.get(message_type, frozenset())
    if missing := sorted(required - set(found)):
        raise HeaderError(f"missing headers {missing}")
    if unknown := sorted(set(found) - allowed):
        raise HeaderError(f"unknown headers {[u[:40] for u in unknown][:5]}")
    return message_type


def _read_envelope(
    topic: str, key: bytes | None, found: Mapping[str, bytes], message_type: MessageType
) -> Envelope:
    content_type = _header_text(found, "content-type")
    if content_type != _CONTENT_TYPES[message_type]:
        raise HeaderError(f"content-type {content_type[:40]!r} for {message_type.value}")
    source = _header_text(found, "ce_source")
    if not _SOURCE_RE.fullmatch(source):
        raise HeaderError(f"ce_source {source[:40]!r} is not an absolute path reference")
    try:
        time = parse_timestamp(_header_text(found, "ce_time"))
    except HeaderError:
        raise
    except DecodeError as exc:
        raise HeaderError(f"ce_time: {exc}") from exc
    if not _HEX64_RE.fullmatch(found["ce_id"]):
        raise HeaderError("ce_id must be 64 lowercase hex characters")
    if key is None:
        raise HeaderMismatch("the record has no key")
    return Envelope(
        id=found["ce_id"].decode("ascii"),
        type=message_type,
        source=source,
        time=time,
        content_type=content_type,
        topic=topic,
        key=key,
    )


def decode_message(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: RawHeaders,
    *,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> DecodedMessage:
    """Strictly decode one record read from ``topic``. The checks run in the order of
    docs/protocol.md section 11.6; the first that fails raises."""
    # 1. shape and size, before anything is parsed
    body_bytes = _check_shape(topic, key, value, headers, max_message_bytes=max_message_bytes)
    # 2. the topic
    if catalogue.kind_of(topic) is None:
        raise WrongTopic(f"{topic[:80]!r} is not a topic of this deployment")
    # 3. headers: no duplicates or nulls, the versions, the type, the exact set
    found = _collect_headers(headers)
    message_type = _read_type(topic, found, catalogue)
    # 4. header values
    envelope = _read_envelope(topic, key, found, message_type)
    # 5. ce_id over key, headers and value
    if compute_message_id(envelope.key, body_bytes, list(found.items())) != envelope.id:
        raise HeaderMismatch("ce_id does not match the key, headers and value")
    # 6. the body, and its agreement with the key and headers
    body = _DECODERS[message_type](envelope, found, body_bytes)
    return DecodedMessage(envelope=envelope, body=body)


def _check_stream_key(envelope: Envelope, custodian: str, exchange: str) -> None:
    stream = compute_stream_key(custodian=custodian, exchange=exchange)
    if envelope.key != stream.encode("ascii"):
        raise HeaderMismatch(f"key {envelope.key[:140]!r} is not the stream {stream}")


def _decode_statement(envelope: Envelope, found: Mapping[str, bytes], value: bytes) -> Body:
    custodian, exchange = _header_stream(found)
    sequence = _header_int(found, "mcb_sequence", low=1, high=MAX_SEQUENCE)
    digest = _header_hex32(found, "mcb_statement_digest")
    _check_stream_key(envelope, custodian, exchange)
    signed = SignedStatement.decode(value, max_bytes=len(value))
    if signed.encode() != value:
        raise EnvelopeError("the statement body is not in RFC 8785 form")
    statement = signed.statement
    if (statement.custodian, statement.exchange) != (custodian, exchange):
        raise HeaderMismatch("mcb_stream names another stream than the statement")
    if statement.sequence != sequence:
        raise HeaderMismatch(f"mcb_sequence {sequence} but the statement is {statement.sequence}")
    if signed.digest != digest:
        raise HeaderMismatch("mcb_statement_digest is not the statement's digest")
    if envelope.time != statement.issued_at:
        raise HeaderMismatch("ce_time is not the statement's issued_at")
    if envelope.source != f"/custodians/{custodian}":
        raise HeaderMismatch("ce_source is not the statement's custodian")
    return signed


def _decode_chunk(envelope: Envelope, found: Mapping[str, bytes], value: bytes) -> Body:
    custodian, exchange = _header_stream(found)
    size = _header_int(found, "mcb_payload_size", high=MAX_PAYLOAD_BYTES)
    count = _header_int(found, "mcb_chunk_count", low=1, high=max(1, size))
    chunk = DisclosureChunk(
        custodian=custodian,
        exchange=exchange,
        sequence=_header_int(found, "mcb_sequence", low=1, high=MAX_SEQUENCE),
        statement_digest=_header_hex32(found, "mcb_statement_digest"),
        payload_digest=_header_hex32(found, "mcb_payload_digest"),
        payload_size=size,
        index=_header_int(found, "mcb_chunk_index", high=count - 1),
        count=count,
        data=value,
    )
    _check_stream_key(envelope, custodian, exchange)
    if envelope.source != f"/custodians/{custodian}":
        raise HeaderMismatch("ce_source is not the disclosure's custodian")
    return chunk


def _decode_snapshot_request(envelope: Envelope, found: Mapping[str, bytes], value: bytes) -> Body:
    custodian, exchange = _header_stream(found)
    _check_stream_key(envelope, custodian, exchange)
    request = SnapshotRequest.from_wire(parse_json_object(value, max_bytes=len(value)))
    if compute_canonical_bytes(request.to_wire()) != value:
        raise EnvelopeError("the snapshot request body is not in RFC 8785 form")
    if (request.custodian, request.exchange) != (custodian, exchange):
        raise HeaderMismatch("mcb_stream names another stream than the request")
    if envelope.time != request.requested_at:
        raise HeaderMismatch("ce_time is not the request's requested_at")
    if envelope.source != f"/exchanges/{exchange}":
        raise HeaderMismatch("ce_source is not the requesting exchange")
    return request


def _decode_dlq_headers(raw: bytes) -> tuple[tuple[str, bytes | None], ...] | None:
    if raw == b"null":
        return None
    try:
        items = parse_json_object(b'{"h":' + raw + b"}", max_bytes=len(raw) + 6)["h"]
    except DecodeError as exc:
        raise HeaderError(f"mcb_dlq_headers: {exc}") from exc
    if not isinstance(items, list):
        raise HeaderError("mcb_dlq_headers must be a JSON array or null")
    out: list[tuple[str, bytes | None]] = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise HeaderError("mcb_dlq_headers items must be [name, hex or null]")
        name, text = item
        if text is None:
            out.append((name, None))
            continue
        if not isinstance(text, str) or len(text) % 2:
            raise HeaderError("mcb_dlq_headers values must be even-length hex")
        out.append((name, parse_hex(text, length=len(text) // 2, what=f"header {name[:40]}")))
    return tuple(out)


def _decode_dead_letter(envelope: Envelope, found: Mapping[str, bytes], value: bytes) -> Body:
    topic = _header_text(found, "mcb_dlq_topic")
    partition = _header_int(found, "mcb_dlq_partition", high=MAX_PARTITION)
    key: bytes | None = None
    if "mcb_dlq_key" in found:
        raw_key = found["mcb_dlq_key"]
        if len(raw_key) % 2:
            raise HeaderError("mcb_dlq_key must be even-length hex")
        key = parse_hex(raw_key.decode("ascii", "replace"), length=len(raw_key) // 2, what="key")
    try:
        letter = DeadLetter(
            topic=topic,
            partition=partition,
            offset=_header_int(found, "mcb_dlq_offset", high=MAX_OFFSET),
            key=key,
            value=value,
            value_size=_header_int(found, "mcb_dlq_value_size", high=MAX_OFFSET),
            value_sha256=_header_hex32(found, "mcb_dlq_value_sha256"),
            headers=_decode_dlq_headers(found["mcb_dlq_headers"]),
            reason=_header_text(found, "mcb_dlq_reason"),
            error=_header_text(found, "mcb_dlq_error"),
        )
    except EnvelopeError:
        raise
    except DecodeError as exc:
        raise HeaderError(f"dead-letter headers: {exc}") from exc
    if envelope.key != f"{topic}/{partition}".encode():
        raise HeaderMismatch("a dead letter is keyed <original topic>/<original partition>")
    return letter


def _header_party(headers: Mapping[str, bytes], name: str) -> str:
    text = _header_text(headers, name)
    try:
        return validate_party(text, what=name)
    except DecodeError as exc:
        raise HeaderError(f"{name}: {exc}") from exc


def _decode_notice_body(message_type: MessageType, value: bytes) -> SignedNotice:
    signed = SignedNotice.decode(value, max_bytes=len(value))
    if signed.encode() != value:
        raise EnvelopeError("the notice body is not in RFC 8785 form")
    if signed.type is not _NOTICE_TYPES[message_type]:
        raise HeaderMismatch(f"a {signed.type.value} notice in a {message_type.value} record")
    return signed


def _check_notice_envelope(
    envelope: Envelope, found: Mapping[str, bytes], signed: SignedNotice
) -> None:
    if found["mcb_notice_digest"] != signed.digest.hex().encode("ascii"):
        raise HeaderMismatch("mcb_notice_digest is not the notice's digest")
    if envelope.time != signed.notice.signed_at:
        raise HeaderMismatch("ce_time is not the notice's time")
    if envelope.source != f"/exchanges/{signed.notice.exchange}":
        raise HeaderMismatch("ce_source is not the notice's exchange")


def _decode_margin_notice(envelope: Envelope, found: Mapping[str, bytes], value: bytes) -> Body:
    custodian, exchange = _header_stream(found)
    notice_id = _header_hex32(found, "mcb_notice_id")
    _header_hex32(found, "mcb_notice_digest")
    _check_stream_key(envelope, custodian, exchange)
    signed = _decode_notice_body(envelope.type, value)
    notice = signed.notice
    if not isinstance(notice, MarginCall | LiquidationDue):  # pragma: no cover - type checked
        raise HeaderMismatch("not a margin notice")
    if (notice.custodian, notice.exchange) != (custodian, exchange):
        raise HeaderMismatch("mcb_stream names another stream than the notice")
    if notice.notice_id != notice_id.hex():
        raise HeaderMismatch("mcb_notice_id is not the notice's id")
    _check_notice_envelope(envelope, found, signed)
    return signed


def _decode_release_ack(envelope: Envelope, found: Mapping[str, bytes], value: bytes) -> Body:
    custodian, exchange = _header_stream(found)
    release_id = _header_hex32(found, "mcb_release_id")
    _header_hex32(found, "mcb_notice_digest")
    _check_stream_key(envelope, custodian, exchange)
    signed = _decode_notice_body(envelope.type, value)
    notice = signed.notice
    if not isinstance(notice, ReleaseAck):  # pragma: no cover - type checked
        raise HeaderMismatch("not a release acknowledgement")
    if (notice.custodian, notice.exchange) != (custodian, exchange):
        raise HeaderMismatch("mcb_stream names another stream than the acknowledgement")
    if notice.release_id != release_id.hex():
        raise HeaderMismatch("mcb_release_id is not the acknowledgement's id")
    _check_notice_envelope(envelope, found, signed)
    return signed


def _decode_positions_snapshot(
    envelope: Envelope, found: Mapping[str, bytes], value: bytes
) -> Body:
    exchange = _header_party(found, "mcb_exchange")
    parts = _header_int(found, "mcb_snapshot_parts", low=1, high=MAX_SNAPSHOT_PARTS)
    part = _header_int(found, "mcb_snapshot_part", high=parts - 1)
    _header_hex32(found, "mcb_notice_digest")
    if envelope.key != exchange.encode("ascii"):
        raise HeaderMismatch(f"key {envelope.key[:80]!r} is not the exchange {exchange}")
    signed = _decode_notice_body(envelope.type, value)
    notice = signed.notice
    if not isinstance(notice, PositionsSnapshot):  # pragma: no cover - type checked
        raise HeaderMismatch("not a positions snapshot")
    if notice.exchange != exchange:
        raise HeaderMismatch("mcb_exchange names another exchange than the snapshot")
    if (notice.part, notice.parts) != (part, parts):
        raise HeaderMismatch("mcb_snapshot_part/parts are not the snapshot's")
    _check_notice_envelope(envelope, found, signed)
    return signed


def _decode_exposure_report(envelope: Envelope, found: Mapping[str, bytes], value: bytes) -> Body:
    client = _header_text(found, "mcb_client")
    try:
        validate_account(client)
    except DecodeError as exc:
        raise HeaderError(f"mcb_client: {exc}") from exc
    if envelope.key != client.encode("ascii"):
        raise HeaderMismatch(f"key {envelope.key[:140]!r} is not the client {client}")
    report = ExposureReport.from_wire(parse_json_object(value, max_bytes=len(value)))
    if compute_canonical_bytes(report.to_wire()) != value:
        raise EnvelopeError("the exposure report body is not in RFC 8785 form")
    if report.client != client:
        raise HeaderMismatch("mcb_client names another client than the report")
    if envelope.time != report.reported_at:
        raise HeaderMismatch("ce_time is not the report's reported_at")
    if envelope.source != f"/exchanges/{report.exchange}/trading":
        raise HeaderMismatch("ce_source is not the reporting exchange's trading engine")
    return report


_DECODERS: Final = {
    MessageType.STATEMENT: _decode_statement,
    MessageType.DISCLOSURE_CHUNK: _decode_chunk,
    MessageType.SNAPSHOT_REQUEST: _decode_snapshot_request,
    MessageType.DEAD_LETTER: _decode_dead_letter,
    MessageType.MARGIN_CALL: _decode_margin_notice,
    MessageType.LIQUIDATION_DUE: _decode_margin_notice,
    MessageType.POSITIONS_SNAPSHOT: _decode_positions_snapshot,
    MessageType.EXPOSURE_REPORT: _decode_exposure_report,
    MessageType.RELEASE_ACK: _decode_release_ack,
}
