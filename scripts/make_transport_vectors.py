"""Generate ``tests/vectors/transport.json``: the Kafka records of docs/protocol.md section 11.

Usage::

    .venv/bin/python scripts/make_transport_vectors.py           # (re)write the file
    .venv/bin/python scripts/make_transport_vectors.py --check   # exit 1 if it would change

The inputs are the signed statement and the leaf disclosure of ``tests/vectors/statement.json``,
so the records carry a real statement; nothing here reads a clock or draws randomness, so a second
run reproduces the file byte for byte. Every stated rejection reason is confirmed against the
implementation before anything is written. This script writes nothing but that one file.
"""

# ruff: noqa: E402 - the imports below need the sys.path entry made first.

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attestations.canonical import format_timestamp, parse_timestamp
from attestations.disclosure import LeafDisclosure
from attestations.errors import BridgeError, SequenceGap
from attestations.statement import SignedStatement
from bridge.chunks import (
    Reassembler,
    compute_chunk_spans,
    decode_disclosure,
    encode_disclosure,
)
from bridge.envelope import (
    MESSAGE_ID_DOMAIN,
    DisclosureChunk,
    OutboundMessage,
    SnapshotRequest,
    compute_message_id,
    decode_message,
    encode_dead_letter,
    encode_snapshot_request,
    encode_statement,
)

VECTORS_DIR: Final = ROOT / "tests" / "vectors"
OUTPUT: Final = VECTORS_DIR / "transport.json"
STATEMENT_BUDGET: Final = 900_000
CHUNK_COUNT: Final = 3
DESCRIPTION: Final = (
    "Kafka records of docs/protocol.md section 11, built from the signed_statement and the "
    "disclosure of statement.json. Header and record values are ASCII and stored as text "
    "(*_utf8); headers are [name, value] pairs in the order the producer writes them. "
    "statement_message: encode `input` with budget_bytes and compare topic, key, value and "
    "headers byte for byte; ce_id_preimage_hex is what SHA-256 hashes into ce_id. "
    "disclosure_chunks: RFC 8785 of `input` is `payload`; cut it at `spans` into count chunks "
    "(the smallest count whose records fit budget_bytes) and compare each record; decode the "
    "records in any order and reassemble the payload, then check its SHA-256. "
    "snapshot_request and dead_letter: encode and compare likewise. rejections: decode each "
    "record as read from `topic`; `expected` is the reason of the first failing check."
)


def _record(message: OutboundMessage) -> dict[str, Any]:
    return {
        "topic": message.topic,
        "key_utf8": message.key.decode("ascii"),
        "value_utf8": message.value.decode("utf-8"),
        "headers": [[name, value.decode("utf-8")] for name, value in message.headers],
        "size": message.size,
    }


def _id_preimage(message: OutboundMessage) -> bytes:
    """The ce_id preimage written out with struct-like concatenation, independently of the
    implementation's incremental hashing; the generator checks both agree."""
    included = sorted((n.encode(), v) for n, v in message.headers if n not in {"ce_id", "ce_time"})
    out = MESSAGE_ID_DOMAIN + len(message.key).to_bytes(4, "big") + message.key
    out += len(included).to_bytes(2, "big")
    for name, value in included:
        out += len(name).to_bytes(2, "big") + name + len(value).to_bytes(4, "big") + value
    return out + message.value


def _with_headers(
    message: OutboundMessage,
    changes: dict[str, bytes | None],
    *,
    key: bytes | None = None,
    value: bytes | None = None,
    topic: str | None = None,
    recompute_id: bool = True,
    extra: Sequence[tuple[str, bytes]] = (),
) -> dict[str, Any]:
    """A tampered copy: header values replaced (None removes the header), then ce_id recomputed
    unless told otherwise, so the tampering reaches the check it is meant for."""
    changed = [(n, changes.get(n, v)) for n, v in message.headers]
    clean = [(n, v) for n, v in changed if v is not None] + list(extra)
    new_key = message.key if key is None else key
    new_value = message.value if value is None else value
    if recompute_id:
        new_id = compute_message_id(new_key, new_value, clean).encode()
        clean = [(n, new_id if n == "ce_id" else v) for n, v in clean]
    return {
        "topic": message.topic if topic is None else topic,
        "key_utf8": new_key.decode("ascii"),
        "value_utf8": new_value.decode("utf-8"),
        "headers": [[n, v.decode("utf-8")] for n, v in clean],
    }


def _decode_record(record: dict[str, Any]) -> Any:
    return decode_message(
        record["topic"],
        record["key_utf8"].encode(),
        record["value_utf8"].encode(),
        [(n, v.encode()) for n, v in record["headers"]],
    )


def _rejections(statement_message: OutboundMessage, chunk: OutboundMessage) -> list[dict[str, Any]]:
    value = statement_message.value
    sequence_plus = value.replace(b'"sequence":1', b'"sequence":2', 1)
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "a statement replayed onto the instructions topic",
            _with_headers(statement_message, {}, topic="mcb.instructions"),
            "wrong_topic",
        ),
        (
            "a topic of another deployment",
            _with_headers(statement_message, {}, topic="other.attestations"),
            "wrong_topic",
        ),
        (
            "ce_specversion 0.3",
            _with_headers(statement_message, {"ce_specversion": b"0.3"}),
            "unsupported_version",
        ),
        (
            "a later version of the statement type",
            _with_headers(statement_message, {"ce_type": b"mcb.statement.v2"}),
            "unsupported_version",
        ),
        (
            "an unknown message type",
            _with_headers(statement_message, {"ce_type": b"mcb.release.v1"}),
            "unknown_message_type",
        ),
        (
            "mcb_sequence missing",
            _with_headers(statement_message, {"mcb_sequence": None}),
            "bad_header",
        ),
        (
            "mcb_sequence twice",
            _with_headers(statement_message, {}, extra=[("mcb_sequence", b"1")]),
            "bad_header",
        ),
        (
            "an unknown header",
            _with_headers(statement_message, {}, extra=[("traceparent", b"00-ab")]),
            "bad_header",
        ),
        (
            "mcb_sequence with a leading zero",
            _with_headers(statement_message, {"mcb_sequence": b"01"}),
            "bad_header",
        ),
        (
            "mcb_sequence disagrees with the statement",
            _with_headers(statement_message, {"mcb_sequence": b"2"}),
            "header_mismatch",
        ),
        (
            "the key names another stream",
            _with_headers(statement_message, {}, key=b"custodian-a/exchange-y"),
            "header_mismatch",
        ),
        (
            "the value was changed without updating ce_id",
            _with_headers(statement_message, {}, value=sequence_plus, recompute_id=False),
            "header_mismatch",
        ),
        (
            "a chunk whose index is not below its count",
            _with_headers(chunk, {"mcb_chunk_index": b"3"}),
            "bad_header",
        ),
        (
            "a chunk whose key names another stream",
            _with_headers(chunk, {}, key=b"custodian-b/exchange-x"),
            "header_mismatch",
        ),
    ]
    out = []
    for description, record, expected in cases:
        try:
            _decode_record(record)
            outcome = "ok"
        except BridgeError as exc:
            outcome = exc.reason
        if outcome != expected:
            raise SystemExit(f"{description}: expected {expected}, implementation says {outcome}")
        out.append({"description": description, **record, "expected": expected})
    return out


def _smallest_budget_for(disclosure: LeafDisclosure, count: int, time: Any) -> int:
    for budget in range(512, 65_536):
        try:
            messages = encode_disclosure(disclosure, time=time, budget_bytes=budget)
        except BridgeError:
            continue
        if len(messages) == count:
            return budget
    raise SystemExit(f"no budget gives {count} chunks")


def build() -> dict[str, Any]:
    source = json.loads((VECTORS_DIR / "statement.json").read_text())
    signed = SignedStatement.from_wire(source["signed_statement"])
    disclosure = LeafDisclosure.from_wire(source["disclosure"])
    time = signed.statement.issued_at

    statement_message = encode_statement(signed, budget_bytes=STATEMENT_BUDGET)
    preimage = _id_preimage(statement_message)
    if hashlib.sha256(preimage).hexdigest().encode() != dict(statement_message.headers)["ce_id"]:
        raise SystemExit("the written-out ce_id preimage disagrees with the implementation")

    budget = _smallest_budget_for(disclosure, CHUNK_COUNT, time)
    chunks = encode_disclosure(disclosure, time=time, budget_bytes=budget)
    payload = b"".join(m.value for m in chunks)
    reassembler = Reassembler()
    completed = None
    for message in (chunks[2], chunks[0], chunks[0], chunks[1]):
        body = decode_message(message.topic, message.key, message.value, message.headers).body
        if not isinstance(body, DisclosureChunk):
            raise SystemExit("a chunk record did not decode to a chunk")
        completed = reassembler.add(body, now_s=0.0) or completed
    if completed is None or decode_disclosure(completed) != disclosure:
        raise SystemExit("the chunks do not reassemble to the disclosure")

    request = SnapshotRequest(
        custodian=signed.statement.custodian,
        exchange=signed.statement.exchange,
        from_sequence=4,
        reason="sequence_gap",
        requested_at=parse_timestamp("2026-01-15T09:05:00.000Z"),
    )
    request_message = encode_snapshot_request(request)
    dead = encode_dead_letter(
        topic=chunks[1].topic,
        partition=5,
        offset=1234,
        key=chunks[1].key,
        value=chunks[1].value,
        headers=chunks[1].headers,
        error=SequenceGap("sequence 7 after 5"),
        source="/exchanges/exchange-x/attestations-consumer",
        at=parse_timestamp("2026-01-15T09:06:00.000Z"),
    )
    return {
        "description": DESCRIPTION,
        "message_id_domain": MESSAGE_ID_DOMAIN[:-1].decode(),
        "statement_message": {
            "budget_bytes": STATEMENT_BUDGET,
            "input": signed.to_wire(),
            **_record(statement_message),
            "ce_id_preimage_hex": preimage.hex(),
        },
        "disclosure_chunks": {
            "budget_bytes": budget,
            "time": format_timestamp(time),
            "input": disclosure.to_wire(),
            "payload_utf8": payload.decode("utf-8"),
            "payload_size": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "count": len(chunks),
            "spans": [list(span) for span in compute_chunk_spans(len(payload), len(chunks))],
            "records": [_record(m) for m in chunks],
        },
        "snapshot_request": {"input": request.to_wire(), **_record(request_message)},
        "dead_letter": {
            "input": {
                "record": "disclosure_chunks.records[1]",
                "partition": 5,
                "offset": 1234,
                "reason": "sequence_gap",
                "error": "sequence 7 after 5",
                "source": "/exchanges/exchange-x/attestations-consumer",
                "at": "2026-01-15T09:06:00.000Z",
            },
            **_record(dead),
        },
        "rejections": _rejections(statement_message, chunks[0]),
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
