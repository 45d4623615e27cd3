"""Envelopes and the topic catalogue (bridge/envelope.py, bridge/topics.py): round trips of every
message type, strict rejection of malformed, tampered, oversized and replayed records, and the
golden vectors in tests/vectors/transport.json."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestations.canonical import MAX_MESSAGE_BYTES, parse_timestamp
from attestations.disclosure import LeafDisclosure
from attestations.errors import (
    BridgeError,
    ConfigurationError,
    DecodeError,
    InvariantViolation,
    SequenceGap,
)
from attestations.notices import (
    LiquidationDue,
    LiquidationReason,
    MarginCall,
    PositionLine,
    ReleaseAck,
    SignedNotice,
    StreamHeadRef,
    build_positions_snapshot,
    sign_notice,
)
from attestations.p256 import SoftwareP256Signer
from attestations.statement import SignedStatement
from bridge.chunks import Reassembler, decode_disclosure, encode_disclosure
from bridge.envelope import (
    DeadLetter,
    DisclosureChunk,
    EnvelopeError,
    ExposureReport,
    HeaderError,
    HeaderMismatch,
    OutboundMessage,
    OversizedMessage,
    SnapshotRequest,
    UnknownMessageType,
    UnsupportedVersion,
    WrongTopic,
    compute_message_id,
    decode_message,
    encode_chunk,
    encode_dead_letter,
    encode_exposure_report,
    encode_notice,
    encode_snapshot_request,
    encode_statement,
    header_names,
)
from bridge.errors import MessageTooLarge
from bridge.topics import (
    DEFAULT_CATALOGUE,
    TOPIC_SPECS,
    MessageType,
    TopicCatalogue,
    TopicKind,
    compute_stream_key,
    parse_stream_key,
)

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
SOURCE = json.loads((VECTORS / "statement.json").read_text())
SIGNED = SignedStatement.from_wire(SOURCE["signed_statement"])
DISCLOSURE = LeafDisclosure.from_wire(SOURCE["disclosure"])
T0 = datetime(2026, 1, 15, 9, 5, tzinfo=UTC)


def decode(message: OutboundMessage, **kwargs: Any) -> Any:
    return decode_message(message.topic, message.key, message.value, message.headers, **kwargs)


def request() -> SnapshotRequest:
    return SnapshotRequest(
        custodian="custodian-a",
        exchange="exchange-x",
        from_sequence=4,
        reason="sequence_gap",
        requested_at=T0,
    )


def chunk_message() -> OutboundMessage:
    return encode_disclosure(DISCLOSURE, time=T0, budget_bytes=800)[1]


def dead_letter() -> OutboundMessage:
    original = chunk_message()
    return encode_dead_letter(
        topic=original.topic,
        partition=2,
        offset=99,
        key=original.key,
        value=original.value,
        headers=original.headers,
        error=SequenceGap("sequence 7 after 5"),
        source="/exchanges/exchange-x/consumer",
        at=T0,
    )


EXCHANGE_KEY = SoftwareP256Signer(
    insecure_development_only=True, private_scalar=hashlib.sha256(b"test-envelope/x").digest()
)
MARGIN_CALL = MarginCall(
    exchange="exchange-x",
    custodian="custodian-a",
    client="alice",
    issued_at=T0,
    deadline=T0 + timedelta(hours=4),
    quote="USD",
    collateral=950_000,
    equity=900_000,
    requirement=1_000_000,
    ratio_bps=9_000,
    shortfall=100_000,
)
LIQUIDATION_DUE = LiquidationDue(
    exchange="exchange-x",
    custodian="custodian-a",
    client="alice",
    issued_at=T0,
    deadline=None,
    quote="USD",
    collateral=500_000,
    equity=500_000,
    requirement=1_000_000,
    ratio_bps=5_000,
    shortfall=500_000,
    margin_call_id=None,
    reason=LiquidationReason.LIQUIDATION_LINE,
)
SNAPSHOT_PARTS = build_positions_snapshot(
    exchange="exchange-x",
    as_of=T0,
    quote="USD",
    streams=[StreamHeadRef("custodian-a", 1, SIGNED.digest)],
    lines=[
        PositionLine("alice", "custodian-a", "BTC", 150_000_000, 7_695_000),
        PositionLine("bob", "custodian-a", "USDC", 1_000_000, 95_000),
        PositionLine("carol", "custodian-a", "USDC", 5_000_000, 475_000),
    ],
    max_lines_per_part=2,
)
RELEASE_ACK = ReleaseAck(
    exchange="exchange-x",
    custodian="custodian-a",
    client="alice",
    asset="BTC",
    quantity=50_000_000,
    issued_at=T0,
    expires_at=T0 + timedelta(minutes=15),
)
SIGNED_NOTICES = {
    MessageType.MARGIN_CALL: sign_notice(MARGIN_CALL, EXCHANGE_KEY),
    MessageType.LIQUIDATION_DUE: sign_notice(LIQUIDATION_DUE, EXCHANGE_KEY),
    MessageType.POSITIONS_SNAPSHOT: sign_notice(SNAPSHOT_PARTS[1], EXCHANGE_KEY),
    MessageType.RELEASE_ACK: sign_notice(RELEASE_ACK, EXCHANGE_KEY),
}


def exposure_report() -> ExposureReport:
    return ExposureReport(
        exchange="exchange-x",
        client="alice",
        report_id="trade-42",
        reported_at=T0,
        exposure=1_500_000,
        requirement=1_000_000,
        unrealised_pnl=-50_000,
        quote="USD",
    )


def every_message() -> dict[MessageType, OutboundMessage]:
    return {
        MessageType.STATEMENT: encode_statement(SIGNED),
        MessageType.DISCLOSURE_CHUNK: chunk_message(),
        MessageType.SNAPSHOT_REQUEST: encode_snapshot_request(request()),
        MessageType.DEAD_LETTER: dead_letter(),
        **{t: encode_notice(signed) for t, signed in SIGNED_NOTICES.items()},
        MessageType.EXPOSURE_REPORT: encode_exposure_report(exposure_report()),
    }


def tampered(
    message: OutboundMessage,
    changes: dict[str, bytes | None] | None = None,
    *,
    key: bytes | None = None,
    value: bytes | None = None,
    extra: tuple[tuple[str, bytes], ...] = (),
    recompute_id: bool = True,
) -> OutboundMessage:
    """A copy with header values replaced (None drops one) and, unless told otherwise, ce_id
    recomputed, so the change reaches the check under test instead of the ce_id check."""
    changes = changes or {}
    headers = [(n, changes.get(n, v)) for n, v in message.headers]
    kept = tuple((n, v) for n, v in headers if v is not None) + extra
    new_key = message.key if key is None else key
    new_value = message.value if value is None else value
    if recompute_id:
        ce_id = compute_message_id(new_key, new_value, kept).encode()
        kept = tuple((n, ce_id if n == "ce_id" else v) for n, v in kept)
    return OutboundMessage(topic=message.topic, key=new_key, value=new_value, headers=kept)


# --- topics -------------------------------------------------------------------------------------


def test_catalogue_names_and_defaults() -> None:
    assert DEFAULT_CATALOGUE.all_topics() == {
        "mcb.attestations": 12,
        "mcb.instructions": 6,
        "mcb.reports": 6,
        "mcb.ledger-snapshots": 3,
        "mcb.dead-letters": 3,
        "mcb.exposures": 6,
    }
    custom = TopicCatalogue(prefix="pilot-", partitions={TopicKind.ATTESTATIONS: 24})
    assert custom.name(TopicKind.DEAD_LETTERS) == "pilot-dead-letters"
    assert custom.partition_count(TopicKind.ATTESTATIONS) == 24
    assert custom.kind_of("pilot-instructions") is TopicKind.INSTRUCTIONS
    assert custom.kind_of("mcb.instructions") is None
    assert TopicCatalogue(prefix="").name(TopicKind.REPORTS) == "reports"


def test_each_message_type_travels_on_exactly_one_topic() -> None:
    for message_type in MessageType:
        carriers = [k for k, spec in TOPIC_SPECS.items() if message_type in spec.message_types]
        assert len(carriers) == 1, message_type
    assert DEFAULT_CATALOGUE.topic_for(MessageType.STATEMENT) == "mcb.attestations"
    assert DEFAULT_CATALOGUE.topic_for(MessageType.SNAPSHOT_REQUEST) == "mcb.instructions"


@pytest.mark.parametrize("prefix", ["has space.", "slash/", "é."])
def test_bad_prefix_is_a_configuration_error(prefix: str) -> None:
    with pytest.raises(ConfigurationError):
        TopicCatalogue(prefix=prefix)


def test_bad_partition_count_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        TopicCatalogue(partitions={TopicKind.REPORTS: 0})


def test_stream_keys() -> None:
    assert compute_stream_key(custodian="c1", exchange="x1") == "c1/x1"
    assert parse_stream_key("c1/x1") == ("c1", "x1")
    for bad in ("c1", "c1/x1/y", "C1/x1", "c1/c1", "/x1", 7):
        with pytest.raises(DecodeError):
            parse_stream_key(bad)


# --- round trips --------------------------------------------------------------------------------


def test_statement_round_trip() -> None:
    message = encode_statement(SIGNED)
    assert message == encode_statement(SIGNED)  # a pure function of the statement
    assert message.topic == "mcb.attestations"
    assert message.key == b"custodian-a/exchange-x"
    assert message.value == SIGNED.encode()
    assert [n for n, _ in message.headers] == list(header_names(MessageType.STATEMENT))
    headers = dict(message.headers)
    assert headers["ce_time"] == b"2026-01-15T09:00:00.000Z"
    assert headers["mcb_statement_digest"] == SIGNED.digest.hex().encode()
    decoded = decode(message)
    assert decoded.body == SIGNED
    assert decoded.envelope.type is MessageType.STATEMENT
    assert decoded.envelope.id == headers["ce_id"].decode()
    assert decoded.envelope.time == SIGNED.statement.issued_at
    assert decoded.envelope.source == "/custodians/custodian-a"


def test_snapshot_request_round_trip() -> None:
    message = encode_snapshot_request(request())
    assert message.topic == "mcb.instructions"
    assert message.value == (
        b'{"custodian":"custodian-a","exchange":"exchange-x","from_sequence":4,'
        b'"reason":"sequence_gap","requested_at":"2026-01-15T09:05:00.000Z","version":1}'
    )
    decoded = decode(message)
    assert decoded.body == request()
    assert decoded.envelope.source == "/exchanges/exchange-x"


def test_chunk_round_trip() -> None:
    message = chunk_message()
    body = decode(message).body
    assert isinstance(body, DisclosureChunk)
    assert (body.index, body.count, body.sequence) == (1, 4, 1)
    assert body.statement_digest == DISCLOSURE.statement_digest
    assert encode_chunk(body, time=T0, budget_bytes=800) == message


def test_dead_letter_round_trip_preserves_the_original() -> None:
    original = chunk_message()
    message = dead_letter()
    assert message.topic == "mcb.dead-letters"
    assert message.key == b"mcb.attestations/2"
    assert message.value == original.value
    letter = decode(message).body
    assert isinstance(letter, DeadLetter)
    assert (letter.topic, letter.partition, letter.offset) == ("mcb.attestations", 2, 99)
    assert letter.key == original.key
    assert letter.headers == original.headers
    assert letter.value == original.value
    assert not letter.truncated
    assert (letter.reason, letter.error) == ("sequence_gap", "sequence 7 after 5")
    # The dead-lettered record still decodes to what it was.
    assert decode_message(letter.topic, letter.key, letter.value, letter.headers or ()).body


def test_dead_letter_of_a_null_key_and_odd_headers() -> None:
    message = encode_dead_letter(
        topic="mcb.attestations",
        partition=0,
        offset=0,
        key=None,
        value=None,
        headers=[("x", None), ("x", b"\x00\xff")],
        error=UnknownMessageType("nope"),
        source="/exchanges/exchange-x/consumer",
        at=T0,
    )
    letter = decode(message).body
    assert isinstance(letter, DeadLetter)
    assert letter.key is None
    assert letter.value == b""
    assert letter.headers == (("x", None), ("x", b"\x00\xff"))
    assert letter.reason == "unknown_message_type"


def test_dead_letter_too_large_keeps_a_prefix_and_the_digest() -> None:
    big = bytes(range(256)) * 4_000  # 1,024,000 bytes: more than the budget
    message = encode_dead_letter(
        topic="mcb.attestations",
        partition=1,
        offset=5,
        key=b"k",
        value=big,
        headers=[("h", b"v" * 10)],
        error=OversizedMessage("too big"),
        source="/exchanges/exchange-x/consumer",
        at=T0,
    )
    assert message.size == 900_000
    letter = decode(message).body
    assert isinstance(letter, DeadLetter)
    assert letter.truncated
    assert big.startswith(letter.value)
    assert (letter.value_size, letter.value_sha256) == (len(big), hashlib.sha256(big).digest())
    assert letter.reason == "oversized"


def test_dead_letter_drops_headers_that_cannot_fit() -> None:
    message = encode_dead_letter(
        topic="mcb.attestations",
        partition=1,
        offset=5,
        key=b"k",
        value=b"v" * 100,
        headers=[("h", b"x" * 600_000)],  # twice that in hex
        error=OversizedMessage("too big"),
        source="/exchanges/exchange-x/consumer",
        at=T0,
    )
    letter = decode(message).body
    assert isinstance(letter, DeadLetter)
    assert letter.headers is None
    assert letter.value == b"v" * 100


def test_dead_letter_needs_a_bridge_error() -> None:
    with pytest.raises(InvariantViolation):
        encode_dead_letter(
            topic="t",
            partition=0,
            offset=0,
            key=None,
            value=b"",
            headers=(),
            error=ValueError("x"),  # type: ignore[arg-type]
            source="/x",
            at=T0,
        )


def test_custom_prefix_round_trip_and_isolation() -> None:
    catalogue = TopicCatalogue(prefix="pilot.")
    message = encode_statement(SIGNED, catalogue=catalogue)
    assert message.topic == "pilot.attestations"
    assert decode(message, catalogue=catalogue).body == SIGNED
    with pytest.raises(WrongTopic):
        decode(message)


# --- strict decoding ----------------------------------------------------------------------------


CASES = [(t, n) for t in MessageType for n in header_names(t) if n != "mcb_dlq_key"]


@pytest.mark.parametrize(("message_type", "name"), CASES)
def test_every_missing_header_is_rejected(message_type: MessageType, name: str) -> None:
    message = every_message()[message_type]
    with pytest.raises(HeaderError, match="missing"):
        decode(tampered(message, {name: None}))


@pytest.mark.parametrize(("message_type", "name"), CASES)
def test_every_duplicate_header_is_rejected(message_type: MessageType, name: str) -> None:
    message = every_message()[message_type]
    again = dict(message.headers)[name]
    with pytest.raises(HeaderError, match="duplicate"):
        decode(tampered(message, extra=((name, again),)))


@pytest.mark.parametrize("message_type", list(MessageType))
def test_unknown_null_and_too_many_headers(message_type: MessageType) -> None:
    message = every_message()[message_type]
    with pytest.raises(HeaderError, match="unknown"):
        decode(tampered(message, extra=(("traceparent", b"00-abc"),)))
    with pytest.raises(HeaderError, match="null"):
        decode_message(message.topic, message.key, message.value, [*message.headers, ("z", None)])
    many = tuple((f"x{i}", b"") for i in range(40))
    with pytest.raises(HeaderError, match="more than"):
        decode(tampered(message, extra=many))


@pytest.mark.parametrize(
    ("topic", "key", "value", "headers", "error"),
    [
        (b"mcb.attestations", b"k", b"v", (), EnvelopeError),
        ("mcb.attestations", "k", b"v", (), EnvelopeError),
        ("mcb.attestations", b"k", "v", (), EnvelopeError),
        ("mcb.attestations", b"k", b"v", "headers", EnvelopeError),
        ("mcb.attestations", b"k", b"v", [("a", b"1", b"2")], HeaderError),
        ("mcb.attestations", b"k", b"v", [(b"a", b"1")], HeaderError),
        ("mcb.attestations", b"k", b"v", [("a", "1")], HeaderError),
        ("mcb.attestations", b"k", None, [], EnvelopeError),
        ("mcb.attestations", b"k", b"v", [], HeaderError),
    ],
)
def test_wrong_argument_types(topic: Any, key: Any, value: Any, headers: Any, error: type) -> None:
    with pytest.raises(error):
        decode_message(topic, key, value, headers)


@pytest.mark.parametrize("message_type", list(MessageType))
def test_every_type_on_every_other_topic_is_rejected(message_type: MessageType) -> None:
    message = every_message()[message_type]
    for kind in TopicKind:
        topic = DEFAULT_CATALOGUE.name(kind)
        if topic == message.topic:
            continue
        with pytest.raises(WrongTopic):
            decode_message(topic, message.key, message.value, message.headers)
    with pytest.raises(WrongTopic):
        decode_message("mcb.unknown", message.key, message.value, message.headers)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"ce_specversion": b"0.3"}, UnsupportedVersion),
        ({"mcb_envelope_version": b"2"}, UnsupportedVersion),
        ({"ce_type": b"mcb.statement.v2"}, UnsupportedVersion),
        ({"ce_type": b"mcb.margin-call.v1"}, WrongTopic),
        ({"ce_type": b"mcb.release.v1"}, UnknownMessageType),
        ({"ce_type": b"\xff"}, UnknownMessageType),
        ({"content-type": b"application/octet-stream"}, HeaderError),
        ({"ce_time": b"2026-01-15T09:00:00Z"}, HeaderError),
        ({"ce_time": b"\xff"}, HeaderError),
        ({"ce_source": b"custodian-a"}, HeaderError),
        ({"mcb_sequence": b"01"}, HeaderError),
        ({"mcb_sequence": b"-1"}, HeaderError),
        ({"mcb_sequence": b"0"}, HeaderError),
        ({"mcb_sequence": b"9007199254740992"}, HeaderError),
        ({"mcb_statement_digest": b"AB" * 32}, HeaderError),
        ({"mcb_stream": b"custodian-a"}, HeaderError),
        ({"mcb_sequence": b"2"}, HeaderMismatch),
        ({"mcb_statement_digest": b"ab" * 32}, HeaderMismatch),
        ({"ce_time": b"2026-01-15T09:00:00.001Z"}, HeaderMismatch),
        ({"ce_source": b"/custodians/custodian-b"}, HeaderMismatch),
        ({"mcb_stream": b"custodian-a/exchange-y"}, HeaderMismatch),
    ],
)
def test_statement_headers_are_checked(changes: dict[str, bytes | None], error: type) -> None:
    with pytest.raises(error):
        decode(tampered(encode_statement(SIGNED), changes))


def test_ce_id_must_be_lowercase_hex_and_match() -> None:
    message = encode_statement(SIGNED)
    with pytest.raises(HeaderError, match="ce_id"):
        decode(tampered(message, {"ce_id": b"A" * 64}, recompute_id=False))
    with pytest.raises(HeaderMismatch, match="ce_id"):
        decode(tampered(message, {"ce_id": b"a" * 64}, recompute_id=False))


def test_tampered_body_is_rejected() -> None:
    message = encode_statement(SIGNED)
    flipped = message.value.replace(b'"sequence":1', b'"sequence":2', 1)
    with pytest.raises(HeaderMismatch, match="ce_id"):
        decode(tampered(message, value=flipped, recompute_id=False))
    # Same change with ce_id recomputed: the statement's sequence no longer matches its header
    # (and sequence 2 needs a previous digest, which the decoder reports first).
    with pytest.raises(DecodeError):
        decode(tampered(message, value=flipped))
    with pytest.raises(EnvelopeError, match="RFC 8785"):
        decode(tampered(message, value=message.value.replace(b":", b": ", 1)))
    with pytest.raises(DecodeError):
        decode(tampered(message, value=b"not json"))


def test_key_must_be_the_stream() -> None:
    for message_type in (MessageType.STATEMENT, MessageType.DISCLOSURE_CHUNK):
        message = every_message()[message_type]
        with pytest.raises(HeaderMismatch, match="key"):
            decode(tampered(message, key=b"custodian-a/exchange-y"))
        with pytest.raises(HeaderMismatch, match="no key"):
            decode_message(message.topic, None, message.value, message.headers)
    with pytest.raises(HeaderMismatch, match="keyed"):
        decode(tampered(dead_letter(), key=b"mcb.attestations/3"))


def test_statement_replayed_to_another_stream_is_rejected() -> None:
    """Every header and the key consistently rewritten for another exchange: the signed body
    still names its own stream."""
    message = encode_statement(SIGNED)
    forged = tampered(
        message, {"mcb_stream": b"custodian-a/exchange-y"}, key=b"custodian-a/exchange-y"
    )
    with pytest.raises(HeaderMismatch, match="another stream"):
        decode(forged)


def test_snapshot_request_checks() -> None:
    message = encode_snapshot_request(request())
    with pytest.raises(HeaderMismatch, match="requested_at"):
        decode(tampered(message, {"ce_time": b"2026-01-15T09:05:00.001Z"}))
    with pytest.raises(HeaderMismatch, match="ce_source"):
        decode(tampered(message, {"ce_source": b"/exchanges/exchange-y"}))
    with pytest.raises(DecodeError):
        decode(tampered(message, value=message.value.replace(b'"from_sequence":4', b'"x":4')))
    with pytest.raises(DecodeError):
        replace(request(), reason="Not A Reason")
    with pytest.raises(DecodeError):
        replace(request(), from_sequence=0)


def test_chunk_header_checks() -> None:
    message = chunk_message()
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_chunk_index": b"4"}))
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_chunk_count": b"0"}))
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_chunk_count": b"891"}))  # more chunks than bytes
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_payload_digest": b"00" * 31}))
    with pytest.raises(HeaderMismatch, match="ce_source"):
        decode(tampered(message, {"ce_source": b"/custodians/custodian-b"}))


def test_dead_letter_checks() -> None:
    message = dead_letter()
    with pytest.raises(HeaderMismatch, match="SHA-256"):
        decode(tampered(message, {"mcb_dlq_value_sha256": b"00" * 32}))
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_dlq_headers": b"{}"}))
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_dlq_headers": b'[["a","abc"]]'}))
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_dlq_reason": b"Bad Reason"}))
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_dlq_key": b"abc"}))
    with pytest.raises(HeaderError):
        decode(tampered(message, {"mcb_dlq_value_size": b"3"}))  # shorter than the value


# --- exchange notices and exposure reports ------------------------------------------------------


def test_margin_notices_round_trip() -> None:
    for message_type in (MessageType.MARGIN_CALL, MessageType.LIQUIDATION_DUE):
        signed = SIGNED_NOTICES[message_type]
        message = encode_notice(signed)
        assert message == encode_notice(signed)  # a pure function of the notice
        assert message.topic == "mcb.instructions"
        assert message.key == b"custodian-a/exchange-x"
        assert message.value == signed.encode()
        assert [n for n, _ in message.headers] == list(header_names(message_type))
        headers = dict(message.headers)
        assert headers["ce_type"] == message_type.value.encode()
        assert headers["ce_source"] == b"/exchanges/exchange-x"
        assert headers["ce_time"] == b"2026-01-15T09:05:00.000Z"
        assert headers["mcb_notice_id"] == signed.notice.notice_id.encode()  # type: ignore[union-attr]
        assert headers["mcb_notice_digest"] == signed.digest.hex().encode()
        decoded = decode(message)
        assert decoded.body == signed
        assert decoded.envelope.type is message_type


def test_one_margin_call_to_each_custodian_shares_the_notice_id() -> None:
    other = sign_notice(replace(MARGIN_CALL, custodian="custodian-b"), EXCHANGE_KEY)
    first, second = encode_notice(SIGNED_NOTICES[MessageType.MARGIN_CALL]), encode_notice(other)
    assert second.key == b"custodian-b/exchange-x"
    assert dict(first.headers)["mcb_notice_id"] == dict(second.headers)["mcb_notice_id"]
    assert dict(first.headers)["ce_id"] != dict(second.headers)["ce_id"]
    assert decode(second).body == other


def test_release_ack_round_trip() -> None:
    signed = SIGNED_NOTICES[MessageType.RELEASE_ACK]
    message = encode_notice(signed)
    assert message == encode_notice(signed)
    assert message.topic == "mcb.instructions"
    assert message.key == b"custodian-a/exchange-x"
    assert message.value == signed.encode()
    assert [n for n, _ in message.headers] == list(header_names(MessageType.RELEASE_ACK))
    headers = dict(message.headers)
    assert headers["ce_type"] == b"mcb.release-ack.v1"
    assert headers["ce_source"] == b"/exchanges/exchange-x"
    assert headers["ce_time"] == b"2026-01-15T09:05:00.000Z"
    assert headers["mcb_stream"] == b"custodian-a/exchange-x"
    assert headers["mcb_release_id"] == RELEASE_ACK.release_id.encode()
    assert headers["mcb_notice_digest"] == signed.digest.hex().encode()
    decoded = decode(message)
    assert decoded.body == signed
    assert decoded.envelope.type is MessageType.RELEASE_ACK


@pytest.mark.parametrize(
    ("changes", "key", "error"),
    [
        ({"mcb_release_id": b"AB" * 32}, None, HeaderError),
        ({"mcb_release_id": b"ab" * 32}, None, HeaderMismatch),
        ({"mcb_notice_digest": b"ab" * 32}, None, HeaderMismatch),
        ({"mcb_stream": b"custodian-a"}, None, HeaderError),
        ({"ce_time": b"2026-01-15T09:05:00.001Z"}, None, HeaderMismatch),
        ({"ce_source": b"/exchanges/exchange-y"}, None, HeaderMismatch),
        ({}, b"custodian-b/exchange-x", HeaderMismatch),
        ({"mcb_stream": b"custodian-b/exchange-x"}, b"custodian-b/exchange-x", HeaderMismatch),
        ({"mcb_release_id": None}, None, HeaderError),
        ({"mcb_notice_id": None}, None, HeaderError),  # a margin notice's header set
    ],
)
def test_release_ack_headers_are_checked(
    changes: dict[str, bytes | None], key: bytes | None, error: type
) -> None:
    message = encode_notice(SIGNED_NOTICES[MessageType.RELEASE_ACK])
    extra: tuple[tuple[str, bytes], ...] = ()
    if "mcb_notice_id" in changes:
        changes = {}
        extra = (("mcb_notice_id", b"ab" * 32),)
    with pytest.raises(error):
        decode(tampered(message, changes, key=key, extra=extra))


def test_a_release_ack_cannot_pass_for_a_margin_notice_or_back() -> None:
    """A release acknowledgement relabelled as a margin call has the wrong header set; a margin
    call under the release type is refused by its headers or its body's type."""
    ack = encode_notice(SIGNED_NOTICES[MessageType.RELEASE_ACK])
    with pytest.raises(HeaderError):
        decode(tampered(ack, {"ce_type": MessageType.MARGIN_CALL.value.encode()}))
    call = encode_notice(SIGNED_NOTICES[MessageType.MARGIN_CALL])
    relabelled = tampered(
        call,
        {"ce_type": MessageType.RELEASE_ACK.value.encode(), "mcb_notice_id": None},
        extra=(("mcb_release_id", RELEASE_ACK.release_id.encode()),),
    )
    with pytest.raises(HeaderMismatch, match="margin_call notice"):
        decode(relabelled)


def test_positions_snapshot_round_trip() -> None:
    for part in SNAPSHOT_PARTS:
        signed = sign_notice(part, EXCHANGE_KEY)
        message = encode_notice(signed)
        assert message.topic == "mcb.ledger-snapshots"
        assert message.key == b"exchange-x"
        headers = dict(message.headers)
        assert headers["mcb_snapshot_part"] == str(part.part).encode()
        assert headers["mcb_snapshot_parts"] == b"2"
        assert headers["ce_time"] == b"2026-01-15T09:05:00.000Z"
        assert decode(message).body == signed


def test_exposure_report_round_trip() -> None:
    message = encode_exposure_report(exposure_report())
    assert message.topic == "mcb.exposures"
    assert message.key == b"alice"
    assert message.value == (
        b'{"client":"alice","exchange":"exchange-x","exposure":"1500000","quote":"USD",'
        b'"report_id":"trade-42","reported_at":"2026-01-15T09:05:00.000Z",'
        b'"requirement":"1000000","unrealised_pnl":"-50000","version":1}'
    )
    assert dict(message.headers)["ce_source"] == b"/exchanges/exchange-x/trading"
    decoded = decode(message)
    assert decoded.body == exposure_report()
    assert decoded.envelope.type is MessageType.EXPOSURE_REPORT


@pytest.mark.parametrize(
    "changes",
    [
        {"exchange": "Exchange-X"},
        {"client": "has space"},
        {"report_id": ""},
        {"report_id": "x" * 129},
        {"reported_at": T0.replace(tzinfo=None)},
        {"exposure": -1},
        {"requirement": 2**128},
        {"unrealised_pnl": 2**128},
        {"unrealised_pnl": 1.5},
        {"quote": "usd"},
        {"version": 2},
    ],
)
def test_exposure_report_constructor_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(BridgeError):
        replace(exposure_report(), **changes)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (b'"exposure":"1500000"', b'"exposure":"-1500000"', "negative_sum"),
        (b'"exposure":"1500000"', b'"exposure":1500000', "invalid_amount"),
        (b'"exposure":"1500000"', b'"exposure":1.5', "float_rejected"),
        (b'"unrealised_pnl":"-50000"', b'"unrealised_pnl":"-0"', "invalid_amount"),
        (b'"unrealised_pnl":"-50000"', b'"unrealised_pnl":"+50000"', "invalid_amount"),
        (b'"quote":"USD",', b'"quote":"USD","extra":"x",', "malformed"),
        (b'"quote":"USD",', b'"quote":"USD","quote":"USD",', "malformed"),
        (b'"quote":"USD",', b"", "malformed"),
        (b'"quote":"USD",', b'"quote": "USD",', "malformed_envelope"),
        (b'"client":"alice"', b'"client":"bob"', "header_mismatch"),
        (b"09:05:00.000Z", b"09:05:00.001Z", "header_mismatch"),
        (b'"exchange":"exchange-x"', b'"exchange":"exchange-y"', "header_mismatch"),
    ],
)
def test_exposure_report_body_checks(old: bytes, new: bytes, reason: str) -> None:
    message = encode_exposure_report(exposure_report())
    assert old in message.value
    with pytest.raises(BridgeError) as info:
        decode(tampered(message, value=message.value.replace(old, new, 1)))
    assert info.value.reason == reason


def test_exposure_report_header_checks() -> None:
    message = encode_exposure_report(exposure_report())
    with pytest.raises(HeaderMismatch, match="key"):
        decode(tampered(message, key=b"bob"))
    with pytest.raises(HeaderError, match="mcb_client"):
        decode(tampered(message, {"mcb_client": b"has space"}))
    with pytest.raises(HeaderMismatch, match="client"):
        decode(tampered(message, {"mcb_client": b"bob"}, key=b"bob"))
    with pytest.raises(HeaderMismatch, match="ce_source"):
        decode(tampered(message, {"ce_source": b"/exchanges/exchange-x"}))


@pytest.mark.parametrize("message_type", [MessageType.MARGIN_CALL, MessageType.LIQUIDATION_DUE])
@pytest.mark.parametrize(
    ("changes", "key", "error"),
    [
        ({"mcb_notice_id": b"AB" * 32}, None, HeaderError),
        ({"mcb_notice_digest": b"xyz"}, None, HeaderError),
        ({"mcb_stream": b"custodian-a"}, None, HeaderError),
        ({"mcb_notice_id": b"ab" * 32}, None, HeaderMismatch),
        ({"mcb_notice_digest": b"ab" * 32}, None, HeaderMismatch),
        ({"ce_time": b"2026-01-15T09:05:00.001Z"}, None, HeaderMismatch),
        ({"ce_source": b"/exchanges/exchange-y"}, None, HeaderMismatch),
        ({"ce_source": b"/custodians/custodian-a"}, None, HeaderMismatch),
        ({}, b"custodian-b/exchange-x", HeaderMismatch),
        ({"mcb_stream": b"custodian-b/exchange-x"}, b"custodian-b/exchange-x", HeaderMismatch),
        ({"content-type": b"application/octet-stream"}, None, HeaderError),
    ],
)
def test_margin_notice_headers_are_checked(
    message_type: MessageType, changes: dict[str, bytes | None], key: bytes | None, error: type
) -> None:
    message = encode_notice(SIGNED_NOTICES[message_type])
    with pytest.raises(error):
        decode(tampered(message, changes, key=key))


def test_a_notice_under_another_notice_type_is_rejected() -> None:
    """A liquidation-due body relabelled as a margin call (same header set) is caught by the
    body's own type; a margin call relabelled as a snapshot has the wrong headers."""
    due = encode_notice(SIGNED_NOTICES[MessageType.LIQUIDATION_DUE])
    with pytest.raises(HeaderMismatch, match="liquidation_due notice"):
        decode(tampered(due, {"ce_type": MessageType.MARGIN_CALL.value.encode()}))
    call = encode_notice(SIGNED_NOTICES[MessageType.MARGIN_CALL])
    with pytest.raises(WrongTopic):
        decode(tampered(call, {"ce_type": MessageType.POSITIONS_SNAPSHOT.value.encode()}))


def test_notice_bodies_are_strict() -> None:
    message = encode_notice(SIGNED_NOTICES[MessageType.MARGIN_CALL])
    spaced = message.value.replace(b'"quote":"USD"', b'"quote": "USD"', 1)
    with pytest.raises(EnvelopeError, match="RFC 8785"):
        decode(tampered(message, value=spaced))
    flipped = message.value.replace(b'"shortfall":"100000"', b'"shortfall":100000', 1)
    with pytest.raises(DecodeError) as info:
        decode(tampered(message, value=flipped))
    assert info.value.reason == "invalid_amount"
    changed = message.value.replace(b'"shortfall":"100000"', b'"shortfall":"100001"', 1)
    with pytest.raises(HeaderMismatch, match="mcb_notice_digest"):
        decode(tampered(message, value=changed))
    # With the digest header made to agree, the record decodes: the envelope does not verify
    # signatures, attestations.notices.verify_notice does (and rejects this one).
    forged = SignedNotice.decode(changed)
    digest = forged.digest.hex().encode()
    body = decode(tampered(message, {"mcb_notice_digest": digest}, value=changed)).body
    assert body == forged
    assert forged.notice != MARGIN_CALL


def test_positions_snapshot_headers_are_checked() -> None:
    message = encode_notice(SIGNED_NOTICES[MessageType.POSITIONS_SNAPSHOT])
    cases: list[tuple[dict[str, bytes | None], bytes | None, type[Exception]]] = [
        ({"mcb_exchange": b"Exchange"}, None, HeaderError),
        ({"mcb_snapshot_part": b"2"}, None, HeaderError),  # not below parts
        ({"mcb_snapshot_parts": b"0"}, None, HeaderError),
        ({"mcb_snapshot_part": b"01"}, None, HeaderError),
        ({"mcb_snapshot_part": b"0"}, None, HeaderMismatch),
        ({"mcb_snapshot_parts": b"3"}, None, HeaderMismatch),
        ({"mcb_exchange": b"exchange-y"}, b"exchange-y", HeaderMismatch),
        ({}, b"exchange-y", HeaderMismatch),
        ({}, b"custodian-a/exchange-x", HeaderMismatch),
        ({"ce_time": b"2026-01-15T09:05:00.001Z"}, None, HeaderMismatch),
        ({"mcb_notice_digest": b"00" * 32}, None, HeaderMismatch),
    ]
    for changes, key, error in cases:
        with pytest.raises(error):
            decode(tampered(message, changes, key=key))


def test_margin_notice_keys() -> None:
    message = encode_notice(SIGNED_NOTICES[MessageType.MARGIN_CALL])
    with pytest.raises(HeaderMismatch, match="no key"):
        decode_message(message.topic, None, message.value, message.headers)
    with pytest.raises(HeaderMismatch, match="key"):
        decode(tampered(message, key=b"custodian-a/exchange-y"))


def test_oversized_records() -> None:
    message = encode_statement(SIGNED)
    with pytest.raises(OversizedMessage):
        decode(message, max_message_bytes=message.size - 1)
    assert decode(message, max_message_bytes=message.size).body == SIGNED
    huge = tampered(message, value=b" " * MAX_MESSAGE_BYTES)
    with pytest.raises(OversizedMessage) as info:
        decode(huge)
    assert info.value.reason == "oversized"
    with pytest.raises(MessageTooLarge):
        encode_statement(SIGNED, budget_bytes=message.size - 1)


def test_reasons_are_stable() -> None:
    assert {
        cls.reason
        for cls in (
            EnvelopeError,
            OversizedMessage,
            HeaderError,
            UnsupportedVersion,
            UnknownMessageType,
            WrongTopic,
            HeaderMismatch,
        )
    } == {
        "malformed_envelope",
        "oversized",
        "bad_header",
        "unsupported_version",
        "unknown_message_type",
        "wrong_topic",
        "header_mismatch",
    }
    assert all(issubclass(cls, DecodeError) for cls in (WrongTopic, HeaderMismatch))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_mutations_only_ever_raise_decode_errors(data: st.DataObject) -> None:
    """Whatever happens to a record on the way, the decoder returns the original body or raises
    a DecodeError (which the consumer dead-letters); never anything else."""
    messages = every_message()
    original = messages[data.draw(st.sampled_from(list(MessageType)))]
    headers = list(original.headers)
    key, value = original.key, original.value
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["drop", "dup", "edit", "flip", "key", "swap"]))
        if action == "drop" and headers:
            headers.pop(data.draw(st.integers(0, len(headers) - 1)))
        elif action == "dup" and headers:
            headers.append(headers[data.draw(st.integers(0, len(headers) - 1))])
        elif action == "edit" and headers:
            i = data.draw(st.integers(0, len(headers) - 1))
            headers[i] = (headers[i][0], data.draw(st.binary(max_size=70)))
        elif action == "flip" and value:
            i = data.draw(st.integers(0, len(value) - 1))
            value = value[:i] + bytes([value[i] ^ 0x01]) + value[i + 1 :]
        elif action == "key":
            key = data.draw(st.binary(max_size=30))
        elif action == "swap" and len(headers) > 1:
            headers.reverse()
    try:
        decoded = decode_message(original.topic, key, value, headers)
    except DecodeError:
        return
    assert decoded.body == decode(original).body


# --- golden vectors -----------------------------------------------------------------------------


def load_generator() -> ModuleType:
    path = ROOT / "scripts" / "make_transport_vectors.py"
    spec = importlib.util.spec_from_file_location("make_transport_vectors", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


VECTOR = json.loads((VECTORS / "transport.json").read_text())


def as_message(record: dict[str, Any]) -> OutboundMessage:
    return OutboundMessage(
        topic=record["topic"],
        key=record["key_utf8"].encode(),
        value=record["value_utf8"].encode(),
        headers=tuple((n, v.encode()) for n, v in record["headers"]),
    )


def test_vector_statement_message() -> None:
    case = VECTOR["statement_message"]
    signed = SignedStatement.from_wire(case["input"])
    message = encode_statement(signed, budget_bytes=case["budget_bytes"])
    assert message == as_message(case)
    assert message.size == case["size"]
    preimage = bytes.fromhex(case["ce_id_preimage_hex"])
    assert preimage.startswith(b"mcb/message/v1\x00")
    assert hashlib.sha256(preimage).hexdigest().encode() == dict(message.headers)["ce_id"]
    assert decode(message).body == signed


def test_vector_disclosure_chunks() -> None:
    case = VECTOR["disclosure_chunks"]
    disclosure = LeafDisclosure.from_wire(case["input"])
    payload = case["payload_utf8"].encode()
    assert hashlib.sha256(payload).hexdigest() == case["payload_sha256"]
    assert len(payload) == case["payload_size"]
    records = encode_disclosure(
        disclosure, time=parse_timestamp(case["time"]), budget_bytes=case["budget_bytes"]
    )
    assert len(records) == case["count"] == 3
    assert list(records) == [as_message(r) for r in case["records"]]
    assert [r.value for r in records] == [payload[a:b] for a, b in case["spans"]]
    reassembler = Reassembler()
    results = [
        reassembler.add(decode(as_message(r)).body, now_s=0.0) for r in case["records"][::-1]
    ]
    assert results[:2] == [None, None]
    assert results[2] is not None
    assert results[2].payload == payload
    assert decode_disclosure(results[2]) == disclosure


def test_vector_snapshot_request_and_dead_letter() -> None:
    case = VECTOR["snapshot_request"]
    assert encode_snapshot_request(SnapshotRequest.from_wire(case["input"])) == as_message(case)
    case = VECTOR["dead_letter"]
    source = as_message(VECTOR["disclosure_chunks"]["records"][1])
    spec = case["input"]
    message = encode_dead_letter(
        topic=source.topic,
        partition=spec["partition"],
        offset=spec["offset"],
        key=source.key,
        value=source.value,
        headers=source.headers,
        error=SequenceGap(spec["error"]),
        source=spec["source"],
        at=parse_timestamp(spec["at"]),
    )
    assert message == as_message(case)
    assert dict(message.headers)["mcb_dlq_reason"] == spec["reason"].encode()


@pytest.mark.parametrize("case", VECTOR["rejections"], ids=lambda c: c["description"])
def test_vector_rejections(case: dict[str, Any]) -> None:
    message = as_message(case)
    with pytest.raises(BridgeError) as info:
        decode(message)
    assert info.value.reason == case["expected"]


def test_vectors_are_up_to_date() -> None:
    generator = load_generator()
    current = (VECTORS / "transport.json").read_text()
    assert generator.render(generator.build()) == current, (
        "run .venv/bin/python scripts/make_transport_vectors.py"
    )


# --- the AsyncAPI document ----------------------------------------------------------------------


def load_asyncapi() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
    return doc


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def header_schema(doc: dict[str, Any], message_name: str) -> tuple[set[str], dict[str, Any]]:
    """(required header names, property schemas) of a message, merged over its allOf."""
    message = resolve(doc, doc["components"]["messages"][message_name])
    required: set[str] = set()
    properties: dict[str, Any] = {}
    for raw in resolve(doc, message["headers"])["allOf"]:
        part = resolve(doc, raw)
        required |= set(part.get("required", []))
        for name, schema in part.get("properties", {}).items():
            properties[name] = {**properties.get(name, {}), **resolve(doc, schema)}
    return required, properties


def test_asyncapi_topics_match_the_catalogue() -> None:
    doc = load_asyncapi()
    channels = {c["address"]: c for c in doc["channels"].values()}
    assert set(channels) == set(DEFAULT_CATALOGUE.all_topics())
    for address, channel in channels.items():
        kind = DEFAULT_CATALOGUE.kind_of(address)
        assert kind is not None
        assert channel["bindings"]["kafka"]["partitions"] == DEFAULT_CATALOGUE.partition_count(kind)
        names = {resolve(doc, m)["name"] for m in (channel.get("messages") or {}).values()}
        assert names == {t.value for t in TOPIC_SPECS[kind].message_types}, address


def test_asyncapi_headers_match_the_records() -> None:
    """Every header the code writes is described, with a pattern or constant it satisfies, and
    the required set is the code's (mcb_dlq_key is the one optional header)."""
    doc = load_asyncapi()
    by_type = {resolve(doc, m)["name"]: key for key, m in doc["components"]["messages"].items()}
    for message_type, message in every_message().items():
        required, properties = header_schema(doc, by_type[message_type.value])
        names = set(header_names(message_type))
        assert set(properties) == names, message_type
        assert required == names - {"mcb_dlq_key"}, message_type
        for name, value in message.headers:
            schema = properties[name]
            text = value.decode()
            if "const" in schema:
                assert text == schema["const"], (message_type, name)
            if "pattern" in schema:
                assert re.fullmatch(schema["pattern"].strip("^$"), text), (message_type, name)


def test_asyncapi_snapshot_request_schema_matches() -> None:
    doc = load_asyncapi()
    schema = doc["components"]["schemas"]["snapshotRequest"]
    assert set(schema["required"]) == set(request().to_wire())
    assert set(schema["properties"]) == set(request().to_wire())
    leaf = doc["components"]["schemas"]["leafDisclosure"]
    assert set(leaf["required"]) == set(DISCLOSURE.to_wire())
    signed = doc["components"]["schemas"]["signedStatement"]
    assert set(signed["required"]) == set(SIGNED.to_wire())
    body = doc["components"]["schemas"]["statementBody"]
    assert set(body["required"]) == set(SIGNED.statement.to_wire())


def test_asyncapi_notice_and_exposure_schemas_match() -> None:
    doc = load_asyncapi()
    schemas = doc["components"]["schemas"]
    for name, message_type in (
        ("signedMarginCall", MessageType.MARGIN_CALL),
        ("signedLiquidationDue", MessageType.LIQUIDATION_DUE),
        ("signedPositionsSnapshot", MessageType.POSITIONS_SNAPSHOT),
        ("signedReleaseAck", MessageType.RELEASE_ACK),
    ):
        signed = SIGNED_NOTICES[message_type]
        wire = signed.to_wire()
        assert set(schemas[name]["required"]) == set(wire) == set(schemas[name]["properties"])
        assert schemas[name]["properties"]["type"]["const"] == wire["type"]
        body = resolve(doc, schemas[name]["properties"]["notice"])
        assert set(body["required"]) == set(wire["notice"]) == set(body["properties"])
    lines = schemas["positionsSnapshot"]["properties"]["lines"]["items"]
    assert set(lines["required"]) == set(SNAPSHOT_PARTS[0].lines[0].to_wire())
    report = schemas["exposureReport"]
    assert set(report["required"]) == set(exposure_report().to_wire()) == set(report["properties"])
    signed_pattern = schemas["signedUnits"]["pattern"].strip("^$")
    assert re.fullmatch(signed_pattern, "-50000")
    assert not re.fullmatch(signed_pattern, "-0")
