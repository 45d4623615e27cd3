"""The exchange's signed notices (attestations/notices.py): margin calls, liquidation-due notices
and positions snapshots. Round trips, the signed-amount grammar, every member tampered, keys of
the wrong role, party or time, strict decoding, snapshot parts, and Hypothesis properties."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestations.canonical import compute_canonical_bytes, parse_json_object, parse_timestamp
from attestations.errors import (
    AmountError,
    BridgeError,
    CounterpartyError,
    DecodeError,
    FloatRejected,
    InvariantViolation,
    RootMismatch,
    SumMismatch,
    SumOverflow,
)
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.notices import (
    DOMAIN_LIQUIDATION_DUE,
    DOMAIN_MARGIN_CALL,
    DOMAIN_POSITIONS_SNAPSHOT,
    DOMAIN_RELEASE_ACK,
    MAX_LINES_PER_PART,
    MAX_RELEASE_VALIDITY,
    AssetTotal,
    LiquidationDue,
    LiquidationReason,
    MarginCall,
    NoticeSignature,
    NoticeType,
    PositionLine,
    PositionsSnapshot,
    ReleaseAck,
    SignedNotice,
    StreamHeadRef,
    build_positions_snapshot,
    combine_snapshot_parts,
    compute_lines_root,
    compute_margin_ratio_bps,
    compute_notice_id,
    format_signed_units,
    parse_signed_units,
    sign_notice,
    verify_notice,
    verify_release_ack,
)
from attestations.p256 import SoftwareP256Signer
from attestations.translog import EMPTY_ROOT
from bridge.envelope import (
    ExposureReport,
    OutboundMessage,
    decode_message,
    encode_exposure_report,
    encode_notice,
)

T0 = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=5)


def signer(label: str) -> SoftwareP256Signer:
    scalar = hashlib.sha256(f"test-notices/{label}".encode()).digest()
    return SoftwareP256Signer(insecure_development_only=True, private_scalar=scalar)


EXCHANGE = signer("exchange-x")
OTHER_EXCHANGE = signer("exchange-y")
CUSTODIAN = signer("custodian-a")
REVOKED = signer("exchange-x-revoked")
LATER = signer("exchange-x-later")
UNREGISTERED = signer("unregistered")


def record(key: SoftwareP256Signer, owner: str, role: KeyRole, **fields: Any) -> KeyRecord:
    return KeyRecord(
        owner=owner,
        role=role,
        public_key=key.public_key,
        valid_from=fields.pop("valid_from", T0 - timedelta(days=30)),
        **fields,
    )


REGISTRY = KeyRegistry.of(
    [
        record(EXCHANGE, "exchange-x", KeyRole.EXCHANGE),
        record(OTHER_EXCHANGE, "exchange-y", KeyRole.EXCHANGE),
        record(CUSTODIAN, "exchange-x", KeyRole.CUSTODIAN),  # the right party, the wrong role
        record(REVOKED, "exchange-x", KeyRole.EXCHANGE, revoked_at=T0 - timedelta(hours=1)),
        record(LATER, "exchange-x", KeyRole.EXCHANGE, valid_from=T0 + timedelta(days=1)),
    ],
    quorums={},
)


def margin_call(**changes: Any) -> MarginCall:
    fields: dict[str, Any] = {
        "exchange": "exchange-x",
        "custodian": "custodian-a",
        "client": "alice",
        "issued_at": T0,
        "deadline": T0 + timedelta(hours=4),
        "quote": "USD",
        "collateral": 950_000,
        "equity": 900_000,
        "requirement": 1_000_000,
        "ratio_bps": 9_000,
        "shortfall": 100_000,
    }
    fields.update(changes)
    return MarginCall(**fields)


def liquidation_due(**changes: Any) -> LiquidationDue:
    call = margin_call()
    fields: dict[str, Any] = {
        "exchange": "exchange-x",
        "custodian": "custodian-a",
        "client": "alice",
        "issued_at": call.deadline,
        "deadline": call.deadline,
        "quote": "USD",
        "collateral": 950_000,
        "equity": -50_000,
        "requirement": 1_000_000,
        "ratio_bps": -500,
        "shortfall": 1_050_000,
        "margin_call_id": call.notice_id,
        "reason": LiquidationReason.DEADLINE_PASSED,
    }
    fields.update(changes)
    return LiquidationDue(**fields)


HEADS = (
    StreamHeadRef("custodian-a", 7, bytes(range(32))),
    StreamHeadRef("custodian-b", 2, bytes(range(32, 64))),
)
LINES = (
    PositionLine("alice", "custodian-a", "BTC", 150_000_000, 7_695_000),
    PositionLine("alice", "custodian-a", "USDC", 1_000_000_000, 95_000_000),
    PositionLine("alice", "custodian-b", "USDC", 5_000_000, 475_000),
    PositionLine("bob@desk-1", "custodian-a", "BENJI", 12_345, 1_209),
    PositionLine("carol", "custodian-b", "ETH", 10**18, 262_500),
)


def snapshot_parts(max_lines: int = MAX_LINES_PER_PART) -> tuple[PositionsSnapshot, ...]:
    return build_positions_snapshot(
        exchange="exchange-x",
        as_of=T0,
        quote="USD",
        streams=reversed(HEADS),
        lines=reversed(LINES),
        max_lines_per_part=max_lines,
    )


def snapshot() -> PositionsSnapshot:
    (only,) = snapshot_parts()
    return only


def release_ack(**changes: Any) -> ReleaseAck:
    fields: dict[str, Any] = {
        "exchange": "exchange-x",
        "custodian": "custodian-a",
        "client": "alice",
        "asset": "BTC",
        "quantity": 50_000_000,
        "issued_at": T0,
        "expires_at": T0 + timedelta(minutes=15),
    }
    fields.update(changes)
    return ReleaseAck(**fields)


def every_notice() -> list[MarginCall | LiquidationDue | PositionsSnapshot | ReleaseAck]:
    return [margin_call(), liquidation_due(), snapshot(), release_ack()]


def wire_of(signed: SignedNotice) -> dict[str, Any]:
    wire: dict[str, Any] = json.loads(signed.encode())
    return wire


def reason(action: Any) -> str:
    try:
        action()
    except BridgeError as exc:
        return exc.reason
    return "ok"


def verify_bytes(data: bytes, now: datetime = NOW) -> Any:
    return verify_notice(data, registry=REGISTRY, now=now)


# --- signed amounts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("1", 1), ("-1", -1), ("-90071992547409930", -90071992547409930)],
)
def test_signed_units_round_trip(text: str, value: int) -> None:
    assert parse_signed_units(text, what="x") == value
    assert format_signed_units(value, what="x") == text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("-0", AmountError),
        ("+1", AmountError),
        ("01", AmountError),
        ("-01", AmountError),
        (" 1", AmountError),
        ("1 ", AmountError),
        ("1e3", AmountError),
        ("1.0", AmountError),
        ("", AmountError),
        ("-", AmountError),
        ("\u0661", AmountError),  # a non-ASCII digit
        (1, AmountError),
        (True, AmountError),
        (None, AmountError),
        (1.5, FloatRejected),
        (str(2**128), SumOverflow),
        (str(-(2**128)), SumOverflow),
        ("9" * 400, SumOverflow),
    ],
)
def test_signed_units_rejections(text: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_signed_units(text, what="equity")


def test_signed_units_bounds() -> None:
    assert parse_signed_units(str(2**128 - 1), what="x") == 2**128 - 1
    assert parse_signed_units(str(-(2**128) + 1), what="x") == -(2**128) + 1
    with pytest.raises(FloatRejected):
        format_signed_units(1.0, what="x")


def test_ratio_rounds_toward_minus_infinity() -> None:
    assert compute_margin_ratio_bps(equity=900_000, requirement=1_000_000) == 9_000
    assert compute_margin_ratio_bps(equity=1, requirement=3) == 3_333
    assert compute_margin_ratio_bps(equity=-1, requirement=3) == -3_334
    assert compute_margin_ratio_bps(equity=5, requirement=0) is None


# --- construction -------------------------------------------------------------------------------


def test_notice_id_is_documented_hash() -> None:
    preimage = b"mcb/notice-id/v1\x00margin_call\x00exchange-x\x00alice\x002026-01-15T09:00:00.000Z"
    assert margin_call().notice_id == hashlib.sha256(preimage).hexdigest()
    assert margin_call(custodian="custodian-b").notice_id == margin_call().notice_id
    assert margin_call(client="bob").notice_id != margin_call().notice_id
    assert liquidation_due(issued_at=T0 + timedelta(hours=5)).notice_id != compute_notice_id(
        kind=NoticeType.MARGIN_CALL,
        exchange="exchange-x",
        client="alice",
        issued_at=T0 + timedelta(hours=5),
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"exchange": "Exchange"},
        {"custodian": "exchange-x"},
        {"client": "bad client"},
        {"client": ""},
        {"issued_at": T0.replace(tzinfo=None)},  # naive
        {"issued_at": T0 + timedelta(microseconds=1)},
        {"deadline": T0},
        {"deadline": T0 - timedelta(seconds=1)},
        {"quote": "usd"},
        {"collateral": -1},
        {"collateral": 2**128},
        {"collateral": 1.0},
        {"equity": 2**128},
        {"equity": "900000"},
        {"requirement": -5},
        {"shortfall": True},
        {"ratio_bps": 9_001},
        {"ratio_bps": None},
        {"requirement": 0},  # ratio 9000 given, but none is defined
        {"version": 2},
    ],
)
def test_margin_call_constructor_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(CounterpartyError):
        margin_call(**changes)


def test_margin_call_without_requirement_has_no_ratio() -> None:
    call = margin_call(requirement=0, ratio_bps=None, shortfall=0)
    assert call.to_wire()["ratio_bps"] is None
    assert MarginCall.from_wire(call.to_wire()) == call


@pytest.mark.parametrize(
    "changes",
    [
        {"margin_call_id": None},  # deadline still given
        {"deadline": None},  # margin_call_id still given
        {"margin_call_id": "AB" * 32},
        {"issued_at": T0 + timedelta(hours=3)},  # before the deadline it says passed
        {"reason": "deadline_passed"},  # a str, not the enum
        {"deadline": None, "margin_call_id": None},  # deadline_passed without a margin call
    ],
)
def test_liquidation_due_constructor_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        liquidation_due(**changes)


def test_liquidation_line_crossed_directly() -> None:
    notice = liquidation_due(
        deadline=None,
        margin_call_id=None,
        reason=LiquidationReason.LIQUIDATION_LINE,
        issued_at=T0,
    )
    wire = notice.to_wire()
    assert (wire["deadline"], wire["margin_call_id"], wire["reason"]) == (
        None,
        None,
        "liquidation_line",
    )
    assert LiquidationDue.from_wire(wire) == notice


# --- release acknowledgements -------------------------------------------------------------------


def test_release_id_is_documented_hash() -> None:
    preimage = (
        b"mcb/release-id/v1\x00exchange-x\x00custodian-a\x00alice\x00BTC\x0050000000\x00"
        b"2026-01-15T09:00:00.000Z"
    )
    assert release_ack().release_id == hashlib.sha256(preimage).hexdigest()
    ids = {
        release_ack(**changes).release_id
        for changes in (
            {},
            {"custodian": "custodian-b"},
            {"client": "bob"},
            {"asset": "USDC"},
            {"quantity": 50_000_001},
            {"issued_at": T0 + timedelta(milliseconds=1)},
        )
    }
    assert len(ids) == 6  # every member but the expiry names a different acknowledgement
    assert release_ack(expires_at=T0 + timedelta(minutes=5)).release_id == release_ack().release_id


def test_release_ack_wire_form() -> None:
    ack = release_ack()
    assert ack.canonical_bytes() == (
        b'{"asset":"BTC","client":"alice","custodian":"custodian-a","exchange":"exchange-x",'
        b'"expires_at":"2026-01-15T09:15:00.000Z","issued_at":"2026-01-15T09:00:00.000Z",'
        b'"quantity":"50000000","release_id":"' + ack.release_id.encode() + b'","version":1}'
    )
    assert ReleaseAck.from_wire(ack.to_wire()) == ack


@pytest.mark.parametrize(
    "changes",
    [
        {"exchange": "Exchange"},
        {"custodian": "exchange-x"},
        {"client": "bad client"},
        {"asset": "btc"},
        {"quantity": 0},
        {"quantity": -1},
        {"quantity": 2**128},
        {"quantity": 1.0},
        {"quantity": True},
        {"issued_at": T0.replace(tzinfo=None)},
        {"issued_at": T0 + timedelta(microseconds=1)},
        {"expires_at": T0},
        {"expires_at": T0 - timedelta(seconds=1)},
        {"expires_at": T0 + MAX_RELEASE_VALIDITY + timedelta(milliseconds=1)},
        {"version": 2},
    ],
)
def test_release_ack_constructor_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(CounterpartyError):
        release_ack(**changes)


def test_release_ack_of_the_longest_validity() -> None:
    ack = release_ack(expires_at=T0 + MAX_RELEASE_VALIDITY)
    assert verify_release_ack(sign_notice(ack, EXCHANGE).encode(), registry=REGISTRY, now=T0) == ack


@pytest.mark.parametrize(
    ("member", "value", "expected"),
    [
        ("release_id", "00" * 32, "malformed"),
        ("release_id", "AB" * 32, "malformed"),
        ("quantity", "60000000", "malformed"),  # the id no longer matches
        ("quantity", 50_000_000, "invalid_amount"),
        ("quantity", "-1", "negative_sum"),
        ("expires_at", "2026-01-15T09:16:00.000Z", "bad_signature"),
        ("expires_at", "2026-01-15T11:00:00.000Z", "malformed"),  # beyond the maximum
        ("version", 2, "malformed"),
        ("extra", "x", "malformed"),
    ],
)
def test_release_ack_member_tampered(member: str, value: Any, expected: str) -> None:
    data = _tamper(release_ack(), member, value)
    assert reason(lambda: verify_release_ack(data, registry=REGISTRY, now=NOW)) == expected


def test_release_ack_quantity_as_a_float_is_rejected() -> None:
    text = sign_notice(release_ack(), EXCHANGE).encode().decode()
    data = text.replace('"quantity":"50000000"', '"quantity":5e7').encode()
    assert reason(lambda: verify_release_ack(data, registry=REGISTRY, now=NOW)) == "float_rejected"


def test_release_ack_with_a_recomputed_id_still_needs_the_signature() -> None:
    signed = sign_notice(release_ack(), EXCHANGE)
    for changes in ({"quantity": 60_000_000}, {"client": "bob"}, {"asset": "USDC"}):
        forged = SignedNotice(notice=release_ack(**changes), signature=signed.signature)
        data = forged.encode()
        assert reason(lambda d=data: verify_release_ack(d, registry=REGISTRY, now=NOW)) == (
            "bad_signature"
        )


def test_release_ack_expiry_and_keys() -> None:
    ack = release_ack()
    data = sign_notice(ack, EXCHANGE).encode()
    last = ack.expires_at - timedelta(milliseconds=1)
    assert verify_release_ack(data, registry=REGISTRY, now=last) == ack
    assert reason(lambda: verify_release_ack(data, registry=REGISTRY, now=ack.expires_at)) == (
        "expired"
    )
    # verify_notice alone does not judge expiry: a notice is the exchange's word whenever read.
    assert verify_notice(data, registry=REGISTRY, now=ack.expires_at) == ack
    early = T0 - timedelta(minutes=1)  # issued beyond the skew after the verifier's clock
    assert reason(lambda: verify_release_ack(data, registry=REGISTRY, now=early)) == (
        "future_dated"
    )
    for key, expected in (
        (OTHER_EXCHANGE, "unknown_key"),
        (CUSTODIAN, "unknown_key"),
        (UNREGISTERED, "unknown_key"),
        (REVOKED, "revoked_key"),
        (LATER, "key_not_valid"),
    ):
        signed = sign_notice(ack, key).encode()
        outcome = reason(lambda s=signed: verify_release_ack(s, registry=REGISTRY, now=NOW))
        assert outcome == expected, key.key_id


def test_other_notices_are_not_release_acks() -> None:
    for notice in (margin_call(), liquidation_due(), snapshot()):
        data = sign_notice(notice, EXCHANGE).encode()
        with pytest.raises(DecodeError, match="not a release acknowledgement"):
            verify_release_ack(data, registry=REGISTRY, now=notice.signed_at)


def test_a_margin_call_signature_never_passes_for_a_release() -> None:
    call = sign_notice(margin_call(), EXCHANGE)
    forged = SignedNotice(notice=release_ack(), signature=call.signature)
    assert reason(lambda: verify_release_ack(forged.encode(), registry=REGISTRY, now=NOW)) == (
        "bad_signature"
    )


# --- round trips and the documented bytes -------------------------------------------------------


@pytest.mark.parametrize("notice", every_notice(), ids=lambda n: n.notice_type.value)
def test_sign_verify_round_trip(
    notice: MarginCall | LiquidationDue | PositionsSnapshot | ReleaseAck,
) -> None:
    signed = sign_notice(notice, EXCHANGE)
    assert signed.signature.key_id == EXCHANGE.key_id
    data = signed.encode()
    assert data == compute_canonical_bytes(parse_json_object(data))
    assert SignedNotice.decode(data) == signed
    now = notice.signed_at + timedelta(seconds=5)
    assert verify_bytes(data, now=now) == notice
    assert verify_notice(signed, registry=REGISTRY, now=now) == notice
    assert signed.digest == notice.compute_digest()


def test_digests_are_domain_separated() -> None:
    for notice, domain in zip(
        every_notice(),
        (DOMAIN_MARGIN_CALL, DOMAIN_LIQUIDATION_DUE, DOMAIN_POSITIONS_SNAPSHOT, DOMAIN_RELEASE_ACK),
        strict=True,
    ):
        expected = hashlib.sha256(domain.encode() + b"\x00" + notice.canonical_bytes()).digest()
        assert notice.compute_digest() == expected


def test_margin_call_wire_form() -> None:
    assert margin_call().canonical_bytes() == (
        b'{"client":"alice","collateral":"950000","custodian":"custodian-a",'
        b'"deadline":"2026-01-15T13:00:00.000Z","equity":"900000","exchange":"exchange-x",'
        b'"issued_at":"2026-01-15T09:00:00.000Z","notice_id":"'
        + margin_call().notice_id.encode()
        + b'","quote":"USD","ratio_bps":"9000","requirement":"1000000","shortfall":"100000",'
        b'"version":1}'
    )


def test_a_signature_of_one_type_never_passes_for_another() -> None:
    """A liquidation-due body under a margin call's signature, same digest bytes or not, fails."""
    call = sign_notice(margin_call(), EXCHANGE)
    due = liquidation_due()
    forged = SignedNotice(notice=due, signature=call.signature)
    assert reason(lambda: verify_bytes(forged.encode())) == "bad_signature"
    wire = wire_of(call)
    wire["type"] = "liquidation_due"
    assert reason(lambda: verify_bytes(compute_canonical_bytes(wire))) == "malformed"


# --- verification: keys, time, signature --------------------------------------------------------


def test_keys_of_the_wrong_role_party_or_time_are_rejected() -> None:
    notice = margin_call()
    cases = {
        CUSTODIAN: "unknown_key",
        OTHER_EXCHANGE: "unknown_key",
        UNREGISTERED: "unknown_key",
        REVOKED: "revoked_key",
        LATER: "key_not_valid",
        EXCHANGE: "ok",
    }
    for key, expected in cases.items():
        data = sign_notice(notice, key).encode()
        assert reason(lambda data=data: verify_bytes(data)) == expected, key.key_id


def test_revocation_is_judged_at_now_too() -> None:
    registry = KeyRegistry.of(
        [record(EXCHANGE, "exchange-x", KeyRole.EXCHANGE, revoked_at=NOW)], quorums={}
    )
    data = sign_notice(margin_call(), EXCHANGE).encode()
    assert reason(lambda: verify_notice(data, registry=registry, now=NOW - timedelta(seconds=1)))
    assert reason(lambda: verify_notice(data, registry=registry, now=NOW)) == "revoked_key"


def test_another_exchange_cannot_sign_for_this_one() -> None:
    """exchange-y's key over a notice naming exchange-y verifies; the same key over a notice
    naming exchange-x does not."""
    own = margin_call(exchange="exchange-y")
    assert verify_bytes(sign_notice(own, OTHER_EXCHANGE).encode()) == own
    forged = sign_notice(margin_call(), OTHER_EXCHANGE).encode()
    assert reason(lambda: verify_bytes(forged)) == "unknown_key"


def test_future_dated_beyond_the_skew() -> None:
    data = sign_notice(margin_call(), EXCHANGE).encode()
    assert reason(lambda: verify_bytes(data, now=T0 - timedelta(seconds=30))) == "ok"
    later = T0 - timedelta(seconds=30, milliseconds=1)
    assert reason(lambda: verify_bytes(data, now=later)) == "future_dated"
    snap = sign_notice(snapshot(), EXCHANGE).encode()
    assert reason(lambda: verify_bytes(snap, now=later)) == "future_dated"


def test_a_bad_signature_is_rejected() -> None:
    signed = sign_notice(margin_call(), EXCHANGE)
    flipped = bytearray(signed.signature.signature)
    flipped[10] ^= 0x01
    bad = replace(signed, signature=NoticeSignature(EXCHANGE.key_id, bytes(flipped)))
    assert reason(lambda: verify_bytes(bad.encode())) == "bad_signature"
    zero = replace(signed, signature=NoticeSignature(EXCHANGE.key_id, bytes(64)))
    assert reason(lambda: verify_bytes(zero.encode())) == "bad_signature"


def test_verify_requires_an_aware_now() -> None:
    with pytest.raises(DecodeError):
        verify_notice(b"{}", registry=REGISTRY, now=datetime(2026, 1, 15))  # noqa: DTZ001


def test_a_broken_signer_is_caught_before_anything_leaves() -> None:
    class Broken:
        algorithm = "ecdsa-p256-sha256"
        public_key = EXCHANGE.public_key
        key_id = EXCHANGE.key_id

        def sign_digest(self, digest: bytes) -> bytes:
            return OTHER_EXCHANGE.sign_digest(digest)

    with pytest.raises(InvariantViolation):
        sign_notice(margin_call(), Broken())


# --- every member tampered ----------------------------------------------------------------------

# (member, new value, reason): the signature is kept, so a member the decoder cannot refuse is
# caught by the signature; one that breaks a rule of the body is refused while decoding.
MARGIN_TAMPERING: list[tuple[str, Any, str]] = [
    ("version", 2, "malformed"),
    ("exchange", "exchange-y", "malformed"),  # the notice id no longer matches
    ("custodian", "custodian-b", "bad_signature"),
    ("client", "bob", "malformed"),
    ("notice_id", "00" * 32, "malformed"),
    ("issued_at", "2026-01-15T09:00:00.001Z", "malformed"),
    ("deadline", "2026-01-15T13:00:00.001Z", "bad_signature"),
    ("quote", "EUR", "bad_signature"),
    ("collateral", "950001", "bad_signature"),
    ("equity", "900001", "bad_signature"),  # ratio still 9000
    ("equity", "800000", "malformed"),  # ratio no longer 8000
    ("requirement", "1000001", "malformed"),  # floor(900000 * 10000 / 1000001) = 8999, not 9000
    ("requirement", "1000000", "ok"),  # unchanged: the control case
    ("ratio_bps", "9001", "malformed"),
    ("shortfall", "1", "bad_signature"),
]


def _tamper(notice: Any, member: str, value: Any) -> bytes:
    wire = wire_of(sign_notice(notice, EXCHANGE))
    wire["notice"][member] = value
    return compute_canonical_bytes(wire)


@pytest.mark.parametrize(("member", "value", "expected"), MARGIN_TAMPERING)
def test_margin_call_member_tampered(member: str, value: Any, expected: str) -> None:
    assert reason(lambda: verify_bytes(_tamper(margin_call(), member, value))) == expected


def test_every_margin_member_is_covered() -> None:
    assert {m for m, _, _ in MARGIN_TAMPERING} == set(margin_call().to_wire())


def _tamper_signature(member: str, value: Any) -> bytes:
    wire = wire_of(sign_notice(margin_call(), EXCHANGE))
    if value is None:
        del wire["signature"][member]
    else:
        wire["signature"][member] = value
    return compute_canonical_bytes(wire)


@pytest.mark.parametrize(
    ("member", "value", "expected"),
    [
        ("algorithm", "ecdsa-p256-sha256", "ok"),  # unchanged: the control case
        ("algorithm", "ecdsa-p384-sha384", "malformed"),
        ("algorithm", None, "malformed"),
        ("key_id", None, "malformed"),
        ("key_id", "AB" * 32, "malformed"),
        ("signature", "00" * 63, "malformed"),
        ("signature", "00" * 65, "malformed"),
        ("signature", "zz" * 64, "malformed"),
        ("signature", 7, "malformed"),
        ("extra", "x", "malformed"),
    ],
)
def test_the_signature_member_is_read_strictly(member: str, value: Any, expected: str) -> None:
    assert reason(lambda: verify_bytes(_tamper_signature(member, value))) == expected


def test_a_signature_by_another_registered_key_id_is_refused() -> None:
    other = wire_of(sign_notice(margin_call(), OTHER_EXCHANGE))["signature"]["key_id"]
    assert reason(lambda: verify_bytes(_tamper_signature("key_id", other))) != "ok"


@pytest.mark.parametrize(
    ("member", "value", "expected"),
    [
        ("margin_call_id", "11" * 32, "bad_signature"),
        ("margin_call_id", None, "malformed"),
        ("reason", "liquidation_line", "bad_signature"),
        ("reason", "because", "malformed"),
        ("deadline", None, "malformed"),
        ("custodian", "custodian-b", "bad_signature"),
        ("shortfall", "1050001", "bad_signature"),
    ],
)
def test_liquidation_due_member_tampered(member: str, value: Any, expected: str) -> None:
    assert reason(lambda: verify_bytes(_tamper(liquidation_due(), member, value))) == expected


SNAPSHOT_TAMPERING: list[tuple[str, Any, str]] = [
    ("version", 2, "malformed"),
    ("exchange", "exchange-y", "unknown_key"),
    ("as_of", "2026-01-15T09:00:00.001Z", "bad_signature"),
    ("quote", "EUR", "bad_signature"),
    ("count", 6, "malformed"),  # the last part no longer ends at the count
    ("total_value", "1", "sum_mismatch"),
    ("lines_root", "00" * 32, "root_mismatch"),
    ("part", 1, "malformed"),
    # Part 0 of 2 carrying every line is well-formed on its own: only the signature tells
    # (and combining it without a part 1 fails too).
    ("parts", 2, "bad_signature"),
    ("first", 1, "malformed"),
]


def test_every_snapshot_member_is_covered() -> None:
    tampered = {m for m, _, _ in SNAPSHOT_TAMPERING} | {"streams", "totals", "lines"}
    assert tampered == set(snapshot().to_wire())  # the last three: test_snapshot_lines_tampered


@pytest.mark.parametrize(("member", "value", "expected"), SNAPSHOT_TAMPERING)
def test_snapshot_member_tampered(member: str, value: Any, expected: str) -> None:
    assert reason(lambda: verify_bytes(_tamper(snapshot(), member, value))) == expected


def test_snapshot_lines_tampered() -> None:
    base = wire_of(sign_notice(snapshot(), EXCHANGE))

    def run(change: Any) -> str:
        wire = json.loads(json.dumps(base))
        change(wire["notice"])
        return reason(lambda: verify_bytes(compute_canonical_bytes(wire)))

    def set_line(index: int, member: str, value: str) -> Any:
        return lambda n: n["lines"][index].__setitem__(member, value)

    assert run(set_line(0, "quantity", "150000001")) == "sum_mismatch"
    assert run(set_line(0, "value", "7695001")) == "sum_mismatch"
    assert run(set_line(0, "quantity", "0")) == "malformed"
    assert run(set_line(0, "quantity", "-1")) == "negative_sum"
    assert run(set_line(4, "client", "dave")) == "root_mismatch"
    assert run(set_line(0, "custodian", "custodian-c")) == "malformed"  # no stream head
    assert run(lambda n: n["lines"].reverse()) == "malformed"  # not sorted
    assert run(lambda n: n["lines"].pop()) == "malformed"  # count
    assert run(lambda n: n["lines"].append(n["lines"][-1])) == "malformed"  # duplicate
    assert run(lambda n: n["streams"][0].__setitem__("sequence", 8)) == "bad_signature"
    assert run(lambda n: n["streams"].reverse()) == "malformed"
    assert run(lambda n: n["totals"][0].__setitem__("quantity", "1")) == "sum_mismatch"
    assert run(lambda n: n["totals"].pop()) == "malformed"  # a line's asset without a total


# --- strict decoding ----------------------------------------------------------------------------


def _signed_text() -> str:
    return sign_notice(margin_call(), EXCHANGE).encode().decode()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t.replace('"collateral":"950000"', '"collateral":950000'), "invalid_amount"),
        (lambda t: t.replace('"collateral":"950000"', '"collateral":950000.0'), "float_rejected"),
        (lambda t: t.replace('"collateral":"950000"', '"collateral":"-950000"'), "negative_sum"),
        (lambda t: t.replace('"equity":"900000"', '"equity":"+900000"'), "invalid_amount"),
        (lambda t: t.replace('"equity":"900000"', '"equity":9e5'), "float_rejected"),
        (
            lambda t: t.replace('"shortfall":"100000"', '"shortfall":"1' + "0" * 39 + '"'),
            "sum_overflow",
        ),
        (lambda t: t.replace('"version":1}', '"version":1,"version":1}'), "malformed"),
        (lambda t: t.replace('"quote":"USD"', '"quote":"USD","quote":"USD"'), "malformed"),
        (lambda t: t.replace('"quote":"USD",', '"quote":"USD","extra":1,'), "malformed"),
        (lambda t: t.replace('"quote":"USD",', ""), "malformed"),
        (lambda t: t.replace('"type":"margin_call"', '"type":"margin-call"'), "malformed"),
        (lambda t: t.replace('"version":1}', '"version":true}'), "malformed"),
        (lambda t: t.replace("ecdsa-p256-sha256", "ecdsa-p384-sha384"), "malformed"),
        (lambda t: t.replace('"signature":"', '"signature":"AB', 1), "malformed"),
        (lambda t: t[:-1], "malformed"),
        (lambda t: "[" + t + "]", "malformed"),
        (lambda t: t.replace('"alice"', '"al\\u0000ice"'), "malformed"),
    ],
)
def test_malformed_messages(mutate: Any, expected: str) -> None:
    assert reason(lambda: verify_bytes(mutate(_signed_text()).encode())) == expected


def test_oversized_and_non_utf8_messages() -> None:
    data = sign_notice(margin_call(), EXCHANGE).encode()
    assert reason(lambda: verify_notice(data, registry=REGISTRY, now=NOW, max_bytes=len(data)))
    assert (
        reason(lambda: verify_notice(data, registry=REGISTRY, now=NOW, max_bytes=len(data) - 1))
        == "malformed"
    )
    assert reason(lambda: verify_bytes(b"\xff" + data)) == "malformed"
    assert reason(lambda: verify_bytes(b" " * 1_000_001)) == "malformed"
    assert reason(lambda: verify_bytes(b"[" * 100 + b"]" * 100)) == "malformed"


def test_non_canonical_but_equal_json_verifies_to_the_same_notice() -> None:
    """Member order and whitespace are free on the wire; the digest is over the canonical form."""
    signed = sign_notice(margin_call(), EXCHANGE)
    pretty = json.dumps(wire_of(signed), indent=2, sort_keys=False).encode()
    assert verify_bytes(pretty) == margin_call()


# --- positions snapshots ------------------------------------------------------------------------


def test_snapshot_commitments() -> None:
    snap = snapshot()
    assert snap.lines == LINES  # sorted by (client, custodian, asset)
    assert snap.streams == HEADS
    assert snap.count == 5
    assert [(t.asset, t.quantity) for t in snap.totals] == [
        ("BENJI", 12_345),
        ("BTC", 150_000_000),
        ("ETH", 10**18),
        ("USDC", 1_005_000_000),
    ]
    assert snap.total_value == sum(line.value for line in LINES)
    leaves = [
        hashlib.sha256(b"\x00" + compute_canonical_bytes(x.to_wire())).digest() for x in LINES
    ]

    def node(a: bytes, b: bytes) -> bytes:
        return hashlib.sha256(b"\x01" + a + b).digest()

    # RFC 6962 shape for five leaves: ((0 1) (2 3)) 4
    expected = node(node(node(leaves[0], leaves[1]), node(leaves[2], leaves[3])), leaves[4])
    assert snap.lines_root == expected == compute_lines_root(LINES)


def test_empty_snapshot() -> None:
    (empty,) = build_positions_snapshot(
        exchange="exchange-x", as_of=T0, quote="USD", streams=(), lines=()
    )
    assert (empty.count, empty.totals, empty.total_value, empty.parts) == (0, (), 0, 1)
    assert empty.lines_root == EMPTY_ROOT
    assert verify_bytes(sign_notice(empty, EXCHANGE).encode()) == empty
    with pytest.raises(DecodeError):
        replace(empty, parts=2)


def test_snapshot_in_parts() -> None:
    parts = snapshot_parts(max_lines=2)
    assert [(p.part, p.parts, p.first, len(p.lines)) for p in parts] == [
        (0, 3, 0, 2),
        (1, 3, 2, 2),
        (2, 3, 4, 1),
    ]
    assert len({p.lines_root for p in parts}) == 1
    verified = [verify_bytes(sign_notice(p, EXCHANGE).encode()) for p in parts]
    assert combine_snapshot_parts(reversed(verified)) == LINES
    with pytest.raises(DecodeError, match="not 0"):
        combine_snapshot_parts(parts[:2])
    with pytest.raises(DecodeError, match="not 0"):
        combine_snapshot_parts([*parts, parts[1]])
    with pytest.raises(DecodeError):
        combine_snapshot_parts([])
    other = build_positions_snapshot(
        exchange="exchange-x",
        as_of=T0 + timedelta(minutes=1),
        quote="USD",
        streams=HEADS,
        lines=LINES,
        max_lines_per_part=2,
    )
    with pytest.raises(DecodeError, match="another snapshot"):
        combine_snapshot_parts([parts[0], other[1], parts[2]])


def test_snapshot_parts_that_do_not_add_up() -> None:
    parts = snapshot_parts(max_lines=2)
    shifted = replace(parts[1], first=3, lines=parts[1].lines[:1])
    with pytest.raises(DecodeError, match="starts at line"):
        combine_snapshot_parts([parts[0], shifted, parts[2]])
    changed = replace(parts[1], lines=(replace(LINES[2], value=LINES[2].value + 1), LINES[3]))
    with pytest.raises(SumMismatch):
        combine_snapshot_parts([parts[0], changed, parts[2]])
    moved = replace(parts[1], lines=(replace(LINES[2], client="alicf"), LINES[3]))
    with pytest.raises(RootMismatch):
        combine_snapshot_parts([parts[0], moved, parts[2]])
    unsorted = replace(parts[1], lines=(replace(LINES[2], client="aaa"), LINES[3]))
    with pytest.raises(DecodeError, match="sorted"):
        combine_snapshot_parts([parts[0], unsorted, parts[2]])


def test_snapshot_constructor_rejects() -> None:
    snap = snapshot()
    with pytest.raises(DecodeError):
        replace(snap, streams=(*HEADS, HEADS[0]))
    with pytest.raises(DecodeError):
        replace(snap, streams=(*HEADS, StreamHeadRef("exchange-x", 1, bytes(32))))
    with pytest.raises(DecodeError):
        replace(snap, totals=tuple(reversed(snap.totals)))
    with pytest.raises(DecodeError):
        replace(snap, lines=list(snap.lines))  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        AssetTotal("BTC", 0)
    with pytest.raises(DecodeError):
        StreamHeadRef("custodian-a", 0, bytes(32))
    with pytest.raises(DecodeError):
        build_positions_snapshot(
            exchange="exchange-x", as_of=T0, quote="USD", streams=HEADS, lines=[*LINES, LINES[0]]
        )
    with pytest.raises(DecodeError):
        snapshot_parts(max_lines=MAX_LINES_PER_PART + 1)


def test_a_full_part_fits_the_record_budget() -> None:
    """Near the worst case the bounds allow (longest ids, 256 stream heads, 256 assets, amounts
    as long as the 2**128 bound on the totals lets them be) a part stays under 900,000 bytes, so
    every part is one record."""
    heads = [StreamHeadRef(f"c{i:03d}" + "x" * 60, 2**53 - 1, bytes(32)) for i in range(256)]
    custodian = heads[0].custodian
    quantity, value = 4 * 10**37, 10**35  # 2,000 of them, 8 per asset, stay below 2**128
    lines = [
        PositionLine(
            f"{i:06d}" + "z" * 122, custodian, f"A{i % 256:03d}" + "B" * 12, quantity, value
        )
        for i in range(MAX_LINES_PER_PART)
    ]
    (part,) = build_positions_snapshot(
        exchange="exchange-x", as_of=T0, quote="USD", streams=heads, lines=lines
    )
    size = len(sign_notice(part, EXCHANGE).encode())
    assert 600_000 < size < 850_000


# --- properties ---------------------------------------------------------------------------------


amounts = st.integers(min_value=0, max_value=2**128 - 1)
clients = st.from_regex(r"[A-Za-z0-9._:@-]{1,20}", fullmatch=True)
millis = st.integers(min_value=0, max_value=10**9)


@st.composite
def margin_calls(draw: st.DrawFn) -> MarginCall:
    collateral = draw(amounts)
    equity = draw(st.integers(min_value=-(2**127), max_value=2**127))
    requirement = draw(st.integers(min_value=0, max_value=2**120))
    ratio = compute_margin_ratio_bps(equity=equity, requirement=requirement)
    if ratio is not None and abs(ratio) >= 2**128:
        ratio = compute_margin_ratio_bps(equity=0, requirement=requirement)
        equity = 0
    issued = T0 + timedelta(milliseconds=draw(millis))
    return margin_call(
        client=draw(clients),
        custodian=draw(st.sampled_from(["custodian-a", "c", "bank.1"])),
        issued_at=issued,
        deadline=issued + timedelta(milliseconds=draw(st.integers(1, 10**8))),
        collateral=collateral,
        equity=equity,
        requirement=requirement,
        ratio_bps=ratio,
        shortfall=draw(amounts),
    )


@settings(max_examples=150, deadline=None)
@given(call=margin_calls())
def test_property_margin_call_round_trip(call: MarginCall) -> None:
    signed = sign_notice(call, EXCHANGE)
    assert SignedNotice.decode(signed.encode()) == signed
    later = call.issued_at + timedelta(seconds=1)
    assert verify_notice(signed.encode(), registry=REGISTRY, now=later) == call


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(
        st.builds(
            PositionLine,
            client=clients,
            custodian=st.sampled_from(["custodian-a", "custodian-b"]),
            asset=st.sampled_from(["BTC", "USDC", "ETH"]),
            quantity=st.integers(min_value=1, max_value=2**100),
            value=st.integers(min_value=0, max_value=2**100),
        ),
        max_size=12,
        unique_by=lambda line: line.sort_key,
    ),
    per_part=st.integers(min_value=1, max_value=5),
)
def test_property_snapshot_parts_round_trip(lines: list[PositionLine], per_part: int) -> None:
    parts = build_positions_snapshot(
        exchange="exchange-x",
        as_of=T0,
        quote="USD",
        streams=HEADS,
        lines=lines,
        max_lines_per_part=per_part,
    )
    decoded = [verify_bytes(sign_notice(p, EXCHANGE).encode()) for p in parts]
    assert decoded == list(parts)
    assert list(combine_snapshot_parts(decoded)) == sorted(lines, key=lambda x: x.sort_key)


SIGNED_BYTES = {n.notice_type: sign_notice(n, EXCHANGE).encode() for n in every_notice()}


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(list(NoticeType)),
    position=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_property_a_flipped_byte_is_never_accepted(
    kind: NoticeType, position: int, mask: int
) -> None:
    data = bytearray(SIGNED_BYTES[kind])
    data[position % len(data)] ^= mask
    with pytest.raises(BridgeError) as info:
        verify_bytes(bytes(data))
    assert not info.value.retriable


# --- golden vectors (tests/vectors/notices.json) ------------------------------------------------

VECTORS = Path(__file__).resolve().parent / "vectors"
VECTOR = json.loads((VECTORS / "notices.json").read_text())
VECTOR_REGISTRY = KeyRegistry.from_wire(VECTOR["registry"])
VECTOR_NOW = parse_timestamp(VECTOR["now"])


def test_vector_keys() -> None:
    for key in VECTOR["keys"].values():
        scalar = bytes.fromhex(key["private_scalar"])
        derived = SoftwareP256Signer(insecure_development_only=True, private_scalar=scalar)
        assert derived.public_key.hex() == key["public_key"]
        assert derived.key_id == key["key_id"]


def test_vector_signed_amounts_and_ids() -> None:
    amounts = VECTOR["signed_amounts"]
    for case in amounts["valid"]:
        assert str(parse_signed_units(case["text"], what="v")) == case["value"]
    for case in amounts["invalid"]:
        assert (
            reason(lambda case=case: parse_signed_units(case["text"], what="v")) == case["expected"]
        )
    for name, case in VECTOR["notice_ids"].items():
        preimage = bytes.fromhex(case["preimage_hex"])
        assert preimage.startswith(b"mcb/notice-id/v1\x00")
        assert hashlib.sha256(preimage).hexdigest() == case["notice_id"]
        notice = next(n for n in VECTOR["notices"] if n["name"] == name)
        assert notice["notice"]["notice_id"] == case["notice_id"]


@pytest.mark.parametrize("case", VECTOR["notices"], ids=lambda c: c["name"])
def test_vector_notices(case: dict[str, Any]) -> None:
    canonical = compute_canonical_bytes(case["notice"])
    assert canonical.decode() == case["canonical_utf8"]
    preimage = case["domain"].encode() + b"\x00" + canonical
    assert preimage.hex() == case["digest_preimage_hex"]
    assert hashlib.sha256(preimage).hexdigest() == case["digest"]
    message = case["message_utf8"].encode()
    assert message == compute_canonical_bytes(case["signed_notice"])
    notice = verify_notice(message, registry=VECTOR_REGISTRY, now=VECTOR_NOW)
    assert notice.notice_type.value == case["type"]
    assert notice.to_wire() == case["notice"]
    assert notice.compute_digest().hex() == case["digest"]


def test_vector_snapshot_parts() -> None:
    case = VECTOR["snapshot_parts"]
    leaves = [compute_canonical_bytes(line) for line in case["lines"]]
    hashes = [hashlib.sha256(b"\x00" + leaf).hexdigest() for leaf in leaves]
    assert hashes == case["leaf_hashes"]
    lines = tuple(PositionLine.from_wire(line) for line in case["lines"])
    assert compute_lines_root(lines).hex() == case["lines_root"]
    parts = [
        verify_notice(compute_canonical_bytes(p), registry=VECTOR_REGISTRY, now=VECTOR_NOW)
        for p in case["signed_parts"]
    ]
    assert all(isinstance(p, PositionsSnapshot) for p in parts)
    assert combine_snapshot_parts(p for p in parts if isinstance(p, PositionsSnapshot)) == lines


@pytest.mark.parametrize("case", VECTOR["cases"], ids=lambda c: c["description"])
def test_vector_cases(case: dict[str, Any]) -> None:
    now = parse_timestamp(case.get("now", VECTOR["now"]))
    data = case["message_utf8"].encode()
    outcome = reason(lambda: verify_notice(data, registry=VECTOR_REGISTRY, now=now))
    assert outcome == case["expected"]


@pytest.mark.parametrize("case", VECTOR["release_ack_cases"], ids=lambda c: c["description"])
def test_vector_release_ack_cases(case: dict[str, Any]) -> None:
    now = parse_timestamp(case["now"])
    data = case["message_utf8"].encode()
    outcome = reason(lambda: verify_release_ack(data, registry=VECTOR_REGISTRY, now=now))
    assert outcome == case["expected"]


def test_vector_release_id() -> None:
    case = VECTOR["release_ids"]["release_ack"]
    preimage = bytes.fromhex(case["preimage_hex"])
    assert preimage.startswith(b"mcb/release-id/v1\x00")
    assert hashlib.sha256(preimage).hexdigest() == case["release_id"]
    notice = next(n for n in VECTOR["notices"] if n["name"] == "release_ack")
    assert notice["notice"]["release_id"] == case["release_id"]


def _as_message(rec: dict[str, Any]) -> OutboundMessage:
    return OutboundMessage(
        topic=rec["topic"],
        key=rec["key_utf8"].encode(),
        value=rec["value_utf8"].encode(),
        headers=tuple((n, v.encode()) for n, v in rec["headers"]),
    )


def test_vector_records() -> None:
    records = VECTOR["records"]
    for name in ("margin_call", "liquidation_due", "positions_snapshot_part_1", "release_ack"):
        message = _as_message(records[name])
        decoded = decode_message(message.topic, message.key, message.value, message.headers)
        assert isinstance(decoded.body, SignedNotice)
        assert encode_notice(decoded.body) == message
        verify_notice(decoded.body, registry=VECTOR_REGISTRY, now=VECTOR_NOW)
    exposure = records["exposure_report"]
    report = ExposureReport.from_wire(exposure["input"])
    assert encode_exposure_report(report) == _as_message(exposure)


def test_notice_vectors_are_up_to_date() -> None:
    path = Path(__file__).resolve().parent.parent / "scripts" / "make_notice_vectors.py"
    spec = importlib.util.spec_from_file_location("make_notice_vectors", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert module.render(module.build()) == (VECTORS / "notices.json").read_text(), (
        "run .venv/bin/python scripts/make_notice_vectors.py"
    )
