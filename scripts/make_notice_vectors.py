"""Generate ``tests/vectors/notices.json``: the exchange's signed notices of docs/protocol.md
section 12 and their Kafka records (section 11).

Usage::

    .venv/bin/python scripts/make_notice_vectors.py           # (re)write the file
    .venv/bin/python scripts/make_notice_vectors.py --check   # exit 1 if it would change

The exchange's P-256 key is derived from a fixed label and signs deterministically (RFC 6979,
ECDSA with SHA-256 nonces derived from the key and the digest), so a second run reproduces the file
byte for byte and another implementation with RFC 6979 can reproduce the signatures exactly.
Every stated outcome is confirmed against the implementation before anything is written. This
script writes nothing but that one file.
"""

# ruff: noqa: E402 - the imports below need the sys.path entry made first.

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256

from attestations.canonical import (
    compute_canonical_bytes,
    compute_key_id,
    format_timestamp,
    parse_timestamp,
)
from attestations.errors import BridgeError
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.notices import (
    DOMAIN_NOTICE_ID,
    DOMAIN_RELEASE_ID,
    LiquidationDue,
    LiquidationReason,
    MarginCall,
    NoticeType,
    PositionLine,
    PositionsSnapshot,
    ReleaseAck,
    StreamHeadRef,
    build_positions_snapshot,
    combine_snapshot_parts,
    parse_signed_units,
    sign_notice,
    verify_notice,
    verify_release_ack,
)
from attestations.p256 import ALGORITHM, encode_public_key, verify_p256_digest
from bridge.envelope import ExposureReport, OutboundMessage, encode_exposure_report, encode_notice

OUTPUT: Final = ROOT / "tests" / "vectors" / "notices.json"
T0: Final = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
NOW: Final = T0 + timedelta(hours=4, seconds=5)
MAX_CLOCK_SKEW_MS: Final = 30_000
DESCRIPTION: Final = (
    "Signed exchange notices of docs/protocol.md section 12 and their Kafka records (section 11). "
    "keys: the exchange's test P-256 keys with their private scalars (test keys, never to protect "
    "anything); signatures are deterministic (RFC 6979). registry: the verifier's trust "
    "configuration (section 6.1). signed_amounts: texts of the signed decimal grammar with their "
    "value or the reason they are rejected. notice_ids: the preimage and the id. notices: each "
    "body in wire form, its RFC 8785 bytes, the digest preimage and digest, the signed notice and "
    "its wire bytes (message_utf8); verify each at `now` with the registry. snapshot_parts: a "
    "snapshot of five lines in three parts, the RFC 6962 leaf hashes of the lines and the root; "
    "verify each part, combine them and compare the lines. cases: message_utf8 verified at "
    "`now` (the case's own or the top-level one); `expected` is `ok` or the reason of the first "
    "failing check. records: Kafka records (topic, key, value, headers in producer order) of "
    "the notices and of an exposure report; encode the input and compare byte for byte. "
    "release_ids: the preimage and the id of the release acknowledgement. release_ack_cases: "
    "message_utf8 checked as a release acknowledgement (signature as for every notice, then the "
    "body type and the expiry: `now` < expires_at) at the case's `now`."
)


class DeterministicSigner:
    """A P-256 test key that signs with RFC 6979 nonces, so the vectors are reproducible."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.private_scalar = hashlib.sha256(f"mcb-vectors/notices/{label}".encode()).digest()
        self._key = ec.derive_private_key(
            int.from_bytes(self.private_scalar, "big"), ec.SECP256R1()
        )
        self.public_key = encode_public_key(self._key.public_key())
        self.key_id = compute_key_id(algorithm=ALGORITHM, public_key=self.public_key)
        self.algorithm = ALGORITHM

    def sign_digest(self, digest: bytes) -> bytes:
        der = self._key.sign(digest, ec.ECDSA(Prehashed(SHA256()), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        verify_p256_digest(public_key=self.public_key, digest=digest, signature=signature)
        return signature

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "private_scalar": self.private_scalar.hex(),
            "public_key": self.public_key.hex(),
            "key_id": self.key_id,
        }


EXCHANGE: Final = DeterministicSigner("exchange-x")
WRONG_ROLE: Final = DeterministicSigner("exchange-x-as-custodian")
REVOKED: Final = DeterministicSigner("exchange-x-revoked")
UNREGISTERED: Final = DeterministicSigner("unregistered")


def registry() -> KeyRegistry:
    since = T0 - timedelta(days=30)
    return KeyRegistry.of(
        [
            KeyRecord("exchange-x", KeyRole.EXCHANGE, EXCHANGE.public_key, since),
            KeyRecord("exchange-x", KeyRole.CUSTODIAN, WRONG_ROLE.public_key, since),
            KeyRecord(
                "exchange-x",
                KeyRole.EXCHANGE,
                REVOKED.public_key,
                since,
                revoked_at=T0 - timedelta(hours=1),
            ),
        ],
        quorums={},
    )


def margin_call() -> MarginCall:
    return MarginCall(
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


def liquidation_after_deadline() -> LiquidationDue:
    call = margin_call()
    return LiquidationDue(
        exchange="exchange-x",
        custodian="custodian-a",
        client="alice",
        issued_at=call.deadline,
        deadline=call.deadline,
        quote="USD",
        collateral=950_000,
        equity=-50_000,
        requirement=1_000_000,
        ratio_bps=-500,
        shortfall=1_050_000,
        margin_call_id=call.notice_id,
        reason=LiquidationReason.DEADLINE_PASSED,
    )


def liquidation_line() -> LiquidationDue:
    return LiquidationDue(
        exchange="exchange-x",
        custodian="custodian-b",
        client="bob@desk-1",
        issued_at=T0,
        deadline=None,
        quote="USD",
        collateral=700_000,
        equity=700_000,
        requirement=1_000_000,
        ratio_bps=7_000,
        shortfall=300_000,
        margin_call_id=None,
        reason=LiquidationReason.LIQUIDATION_LINE,
    )


def release_ack() -> ReleaseAck:
    return ReleaseAck(
        exchange="exchange-x",
        custodian="custodian-a",
        client="alice",
        asset="BTC",
        quantity=50_000_000,
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=15),
    )


HEADS: Final = (
    StreamHeadRef("custodian-a", 7, hashlib.sha256(b"statement a/7").digest()),
    StreamHeadRef("custodian-b", 2, hashlib.sha256(b"statement b/2").digest()),
)
LINES: Final = (
    PositionLine("alice", "custodian-a", "BTC", 150_000_000, 7_695_000),
    PositionLine("alice", "custodian-a", "USDC", 1_000_000_000, 95_000_000),
    PositionLine("alice", "custodian-b", "USDC", 5_000_000, 475_000),
    PositionLine("bob@desk-1", "custodian-a", "BENJI", 12_345, 1_209),
    PositionLine("carol", "custodian-b", "ETH", 10**18, 262_500),
)


def snapshot(max_lines: int) -> tuple[PositionsSnapshot, ...]:
    return build_positions_snapshot(
        exchange="exchange-x",
        as_of=T0,
        quote="USD",
        streams=HEADS,
        lines=LINES,
        max_lines_per_part=max_lines,
    )


def outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except BridgeError as exc:
        return exc.reason
    return "ok"


def confirm(name: str, expected: str, action: Callable[[], object]) -> str:
    got = outcome(action)
    if got != expected:
        raise SystemExit(f"{name}: expected {expected}, implementation says {got}")
    return expected


def notice_vector(
    name: str, body: MarginCall | LiquidationDue | PositionsSnapshot | ReleaseAck
) -> dict[str, Any]:
    signed = sign_notice(body, EXCHANGE)
    canonical = body.canonical_bytes()
    preimage = body.domain.encode("ascii") + b"\x00" + canonical
    digest = hashlib.sha256(preimage).digest()
    if digest != body.compute_digest():
        raise SystemExit(f"{name}: the written-out digest preimage disagrees")
    message = signed.encode()
    at = body.issued_at if isinstance(body, ReleaseAck) else NOW  # an acknowledgement expires
    confirm(name, "ok", lambda: verify_notice(message, registry=registry(), now=at))
    return {
        "name": name,
        "type": body.notice_type.value,
        "domain": body.domain,
        "notice": body.to_wire(),
        "canonical_utf8": canonical.decode("utf-8"),
        "digest_preimage_hex": preimage.hex(),
        "digest": digest.hex(),
        "signed_notice": signed.to_wire(),
        "message_utf8": message.decode("utf-8"),
    }


def notice_id_vector(body: MarginCall | LiquidationDue) -> dict[str, Any]:
    parts = (body.notice_type.value, body.exchange, body.client, format_timestamp(body.issued_at))
    data = "\x00".join(parts).encode("ascii")
    preimage = DOMAIN_NOTICE_ID.encode("ascii") + b"\x00" + data
    notice_id = hashlib.sha256(preimage).hexdigest()
    if notice_id != body.notice_id:
        raise SystemExit("the written-out notice id preimage disagrees")
    return {"preimage_hex": preimage.hex(), "notice_id": notice_id}


def release_id_vector(body: ReleaseAck) -> dict[str, Any]:
    parts = (
        body.exchange,
        body.custodian,
        body.client,
        body.asset,
        str(body.quantity),
        format_timestamp(body.issued_at),
    )
    preimage = DOMAIN_RELEASE_ID.encode("ascii") + b"\x00" + "\x00".join(parts).encode("ascii")
    release_id = hashlib.sha256(preimage).hexdigest()
    if release_id != body.release_id:
        raise SystemExit("the written-out release id preimage disagrees")
    return {"preimage_hex": preimage.hex(), "release_id": release_id}


def release_ack_cases() -> list[dict[str, Any]]:
    ack = release_ack()
    good = sign_notice(ack, EXCHANGE).encode()
    at = format_timestamp(ack.issued_at + timedelta(minutes=1))
    last = format_timestamp(ack.expires_at - timedelta(milliseconds=1))
    expiry = format_timestamp(ack.expires_at)
    long_validity = json.loads(good)
    long_validity["notice"]["expires_at"] = format_timestamp(ack.issued_at + timedelta(hours=2))
    raw: list[tuple[str, str, str, str]] = [
        ("the acknowledgement as signed", good.decode(), "ok", at),
        ("one millisecond before it expires", good.decode(), "ok", last),
        ("at its expires_at", good.decode(), "expired", expiry),
        ("quantity raised", _tamper(good, "quantity", "60000000"), "malformed", at),
        (
            "quantity raised, release_id recomputed",
            _tamper_release(good, quantity=60_000_000),
            "bad_signature",
            at,
        ),
        (
            "client changed, release_id recomputed",
            _tamper_release(good, client="bob"),
            "bad_signature",
            at,
        ),
        (
            "expires_at extended by a minute",
            _tamper(good, "expires_at", format_timestamp(ack.expires_at + timedelta(minutes=1))),
            "bad_signature",
            at,
        ),
        (
            "valid for more than an hour",
            compute_canonical_bytes(long_validity).decode(),
            "malformed",
            at,
        ),
        ("quantity as a JSON number", _tamper(good, "quantity", 50_000_000), "invalid_amount", at),
        (
            "signed by the revoked key",
            sign_notice(ack, REVOKED).encode().decode(),
            "revoked_key",
            at,
        ),
        (
            "a margin call is not a release acknowledgement",
            sign_notice(margin_call(), EXCHANGE).encode().decode(),
            "malformed",
            format_timestamp(NOW),
        ),
    ]
    out = []
    for description, text, expected, now_text in raw:
        now = parse_timestamp(now_text)
        data = text.encode()
        confirm(
            description, expected, partial(verify_release_ack, data, registry=registry(), now=now)
        )
        out.append(
            {
                "description": description,
                "message_utf8": text,
                "now": now_text,
                "expected": expected,
            }
        )
    return out


def _tamper_release(message: bytes, **changes: Any) -> str:
    """The signed message with body members changed and the release_id made to match them, so
    the change reaches the signature check."""
    wire = json.loads(message)
    body = ReleaseAck.from_wire(wire["notice"])
    changed = ReleaseAck(
        exchange=changes.get("exchange", body.exchange),
        custodian=changes.get("custodian", body.custodian),
        client=changes.get("client", body.client),
        asset=changes.get("asset", body.asset),
        quantity=changes.get("quantity", body.quantity),
        issued_at=body.issued_at,
        expires_at=body.expires_at,
    )
    wire["notice"] = changed.to_wire()
    return compute_canonical_bytes(wire).decode("utf-8")


def signed_amounts() -> dict[str, Any]:
    valid = ["0", "1", "-1", "900000", "-50000", str(2**128 - 1), str(-(2**128 - 1))]
    invalid_text = ["-0", "+1", "01", "-01", " 1", "1.0", "1e3", "", "-", str(2**128)]
    out: dict[str, Any] = {"valid": [], "invalid": []}
    for text in valid:
        out["valid"].append({"text": text, "value": text})
        if str(parse_signed_units(text, what="vector")) != text:
            raise SystemExit(f"{text!r} does not round-trip")
    for text in invalid_text:
        reason = outcome(partial(parse_signed_units, text, what="vector"))
        if reason == "ok":
            raise SystemExit(f"{text!r} was accepted")
        out["invalid"].append({"text": text, "expected": reason})
    return out


def _replace_text(message: bytes, old: str, new: str) -> str:
    text = message.decode("utf-8")
    if text.count(old) != 1:
        raise SystemExit(f"{old!r} is not in the message exactly once")
    return text.replace(old, new)


def _tamper(message: bytes, member: str, value: Any) -> str:
    wire = json.loads(message)
    wire["notice"][member] = value
    return compute_canonical_bytes(wire).decode("utf-8")


def cases() -> list[dict[str, Any]]:
    call = margin_call()
    good = sign_notice(call, EXCHANGE).encode()
    snap = sign_notice(snapshot(2_000)[0], EXCHANGE).encode()
    raw: list[tuple[str, str, str, str | None]] = [
        ("the margin call as signed", good.decode(), "ok", None),
        ("another member order and whitespace", json.dumps(json.loads(good), indent=1), "ok", None),
        ("custodian changed", _tamper(good, "custodian", "custodian-b"), "bad_signature", None),
        ("shortfall changed", _tamper(good, "shortfall", "1"), "bad_signature", None),
        (
            "deadline changed",
            _tamper(good, "deadline", "2026-01-15T13:00:00.001Z"),
            "bad_signature",
            None,
        ),
        ("notice_id changed", _tamper(good, "notice_id", "00" * 32), "malformed", None),
        (
            "client changed (the notice id no longer matches)",
            _tamper(good, "client", "bob"),
            "malformed",
            None,
        ),
        (
            "ratio_bps not floor(equity * 10000 / requirement)",
            _tamper(good, "ratio_bps", "9001"),
            "malformed",
            None,
        ),
        (
            "equity as a JSON number",
            _replace_text(good, '"equity":"900000"', '"equity":900000'),
            "invalid_amount",
            None,
        ),
        (
            "collateral as a float",
            _replace_text(good, '"collateral":"950000"', '"collateral":950000.0'),
            "float_rejected",
            None,
        ),
        (
            "collateral negative",
            _replace_text(good, '"collateral":"950000"', '"collateral":"-950000"'),
            "negative_sum",
            None,
        ),
        (
            "equity -0",
            _replace_text(good, '"equity":"900000"', '"equity":"-0"'),
            "invalid_amount",
            None,
        ),
        (
            "a duplicate member",
            _replace_text(good, '"quote":"USD"', '"quote":"USD","quote":"USD"'),
            "malformed",
            None,
        ),
        (
            "an unknown member",
            _replace_text(good, '"quote":"USD"', '"quote":"USD","note":"x"'),
            "malformed",
            None,
        ),
        (
            "the type of another notice",
            _replace_text(good, '"type":"margin_call"', '"type":"liquidation_due"'),
            "malformed",
            None,
        ),
        (
            "signed by the exchange's custodian-role key",
            sign_notice(call, WRONG_ROLE).encode().decode(),
            "unknown_key",
            None,
        ),
        (
            "signed by an unregistered key",
            sign_notice(call, UNREGISTERED).encode().decode(),
            "unknown_key",
            None,
        ),
        (
            "signed by a revoked key",
            sign_notice(call, REVOKED).encode().decode(),
            "revoked_key",
            None,
        ),
        (
            "verified 30.001 s before issued_at",
            good.decode(),
            "future_dated",
            "2026-01-15T08:59:29.999Z",
        ),
        ("verified 30 s before issued_at", good.decode(), "ok", "2026-01-15T08:59:30.000Z"),
        (
            "snapshot lines_root changed",
            _tamper(snap, "lines_root", "00" * 32),
            "root_mismatch",
            None,
        ),
        ("snapshot total_value changed", _tamper(snap, "total_value", "1"), "sum_mismatch", None),
        (
            "snapshot as_of changed",
            _tamper(snap, "as_of", "2026-01-15T09:00:00.001Z"),
            "bad_signature",
            None,
        ),
    ]
    out = []
    for description, text, expected, at in raw:
        now = NOW if at is None else parse_timestamp(at)
        data = text.encode()
        confirm(description, expected, partial(verify_notice, data, registry=registry(), now=now))
        case: dict[str, Any] = {"description": description, "message_utf8": text}
        if at is not None:
            case["now"] = at
        case["expected"] = expected
        out.append(case)
    return out


def record(message: OutboundMessage) -> dict[str, Any]:
    return {
        "topic": message.topic,
        "key_utf8": message.key.decode("ascii"),
        "value_utf8": message.value.decode("utf-8"),
        "headers": [[name, value.decode("utf-8")] for name, value in message.headers],
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


def build() -> dict[str, Any]:
    reg = registry()
    parts = snapshot(2)
    signed_parts = [sign_notice(part, EXCHANGE) for part in parts]
    verified = [verify_notice(p.encode(), registry=reg, now=NOW) for p in signed_parts]
    combined = combine_snapshot_parts(p for p in verified if isinstance(p, PositionsSnapshot))
    if combined != LINES:
        raise SystemExit("the snapshot parts do not combine to the lines")
    notices = [
        notice_vector("margin_call", margin_call()),
        notice_vector("liquidation_due_after_deadline", liquidation_after_deadline()),
        notice_vector("liquidation_due_at_the_line", liquidation_line()),
        notice_vector("positions_snapshot", snapshot(2_000)[0]),
        notice_vector("release_ack", release_ack()),
    ]
    records = {
        "margin_call": record(encode_notice(sign_notice(margin_call(), EXCHANGE))),
        "liquidation_due": record(
            encode_notice(sign_notice(liquidation_after_deadline(), EXCHANGE))
        ),
        "positions_snapshot_part_1": record(encode_notice(signed_parts[1])),
        "release_ack": record(encode_notice(sign_notice(release_ack(), EXCHANGE))),
        "exposure_report": {
            "input": exposure_report().to_wire(),
            **record(encode_exposure_report(exposure_report())),
        },
    }
    return {
        "description": DESCRIPTION,
        "keys": {
            "exchange": EXCHANGE.describe(),
            "exchange_custodian_role": WRONG_ROLE.describe(),
            "exchange_revoked": REVOKED.describe(),
            "unregistered": UNREGISTERED.describe(),
        },
        "registry": reg.to_wire(),
        "now": format_timestamp(NOW),
        "max_clock_skew_ms": MAX_CLOCK_SKEW_MS,
        "signed_amounts": signed_amounts(),
        "notice_ids": {
            "margin_call": notice_id_vector(margin_call()),
            "liquidation_due_after_deadline": notice_id_vector(liquidation_after_deadline()),
        },
        "notices": notices,
        "snapshot_parts": {
            "max_lines_per_part": 2,
            "lines": [line.to_wire() for line in LINES],
            "leaf_hashes": [line.compute_leaf_hash().hex() for line in LINES],
            "lines_root": parts[0].lines_root.hex(),
            "signed_parts": [p.to_wire() for p in signed_parts],
        },
        "cases": cases(),
        "release_ids": {"release_ack": release_id_vector(release_ack())},
        "release_ack_cases": release_ack_cases(),
        "records": records,
        "notice_types": [t.value for t in NoticeType],
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file would change")
    args = parser.parse_args(argv)
    text = render(build())
    current = OUTPUT.read_text() if OUTPUT.exists() else None
    if args.check:
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date")
            return 1
        return 0
    if current != text:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
