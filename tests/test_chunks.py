"""Chunking and reassembly of leaf disclosures (bridge/chunks.py): every record within the budget
at any size, reassembly in any order with duplicates, nothing returned from an incomplete or
corrupted set, and the reassembler's memory bounds."""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestations.disclosure import DisclosedLeaf, LeafDisclosure
from attestations.errors import ConfigurationError, DecodeError, InvariantViolation
from bridge.chunks import (
    ChunkError,
    CompletedPayload,
    ConflictingChunk,
    EvictionReason,
    PayloadDigestMismatch,
    Reassembler,
    ReassemblyLimit,
    ReassemblyLimits,
    compute_chunk_count,
    compute_chunk_spans,
    decode_disclosure,
    encode_disclosure,
    encode_payload,
)
from bridge.envelope import (
    DEFAULT_BUDGET_BYTES,
    DisclosureChunk,
    EnvelopeError,
    HeaderMismatch,
    OutboundMessage,
    decode_message,
)

T0 = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)
STATEMENT_DIGEST = hashlib.sha256(b"statement").digest()
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=25)
# Hypothesis favours small integers; the second branch makes multi-megabyte payloads common.
SIZES = st.integers(0, 6_000_000) | st.integers(1_000_000, 6_000_000)


def payload_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def chunk_records(
    payload: bytes, *, budget: int = DEFAULT_BUDGET_BYTES, sequence: int = 7
) -> tuple[OutboundMessage, ...]:
    return encode_payload(
        payload,
        custodian="custodian-a",
        exchange="exchange-x",
        sequence=sequence,
        statement_digest=STATEMENT_DIGEST,
        time=T0,
        budget_bytes=budget,
    )


def decode_chunk(message: OutboundMessage, *, max_bytes: int = 1_000_000) -> DisclosureChunk:
    body = decode_message(
        message.topic, message.key, message.value, message.headers, max_message_bytes=max_bytes
    ).body
    assert isinstance(body, DisclosureChunk)
    return body


def chunks_of(payload: bytes, *, budget: int = DEFAULT_BUDGET_BYTES) -> list[DisclosureChunk]:
    return [decode_chunk(m) for m in chunk_records(payload, budget=budget)]


def feed(reassembler: Reassembler, chunks: list[DisclosureChunk]) -> list[CompletedPayload]:
    done = []
    for chunk in chunks:
        result = reassembler.add(chunk, now_s=0.0)
        if result is not None:
            done.append(result)
    return done


def leaves(count: int) -> tuple[DisclosedLeaf, ...]:
    """Cheap distinct leaves, no tree: the transport does not look inside them."""
    salt = hashlib.sha256(b"salt").digest()
    return tuple(DisclosedLeaf(f"acct-{i:08d}", "BTC", i, salt, 1_000 + i) for i in range(count))


# --- layout -------------------------------------------------------------------------------------


@given(size=st.integers(0, 10_000), count=st.integers(1, 200))
def test_spans_are_contiguous_and_balanced(size: int, count: int) -> None:
    count = min(count, max(1, size))
    spans = compute_chunk_spans(size, count)
    assert len(spans) == count
    assert spans[0][0] == 0
    assert spans[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    lengths = [end - start for start, end in spans]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)
    assert size == 0 or min(lengths) >= 1


def test_spans_refuse_empty_chunks() -> None:
    with pytest.raises(InvariantViolation):
        compute_chunk_spans(3, 4)
    with pytest.raises(InvariantViolation):
        compute_chunk_spans(3, 0)


def test_empty_payload_is_one_empty_chunk() -> None:
    (chunk,) = chunks_of(b"")
    assert (chunk.index, chunk.count, chunk.data, chunk.payload_size) == (0, 1, b"", 0)
    (done,) = feed(Reassembler(), [chunk])
    assert done.payload == b""


def test_budget_too_small_for_headers() -> None:
    with pytest.raises(InvariantViolation):
        chunk_records(b"x" * 100, budget=512)


@pytest.mark.parametrize("budget", [600, 5_000, DEFAULT_BUDGET_BYTES])
def test_chunk_count_at_the_boundaries(budget: int) -> None:
    """Sizes that exactly fill k chunks, and one byte more: k and k + 1 chunks, all fitting."""
    (one,) = chunk_records(b"", budget=budget)
    for k in (1, 2, 3):
        near = chunk_records(payload_of((budget - one.size) * k - 20 * k), budget=budget)
        assert len(near) == k
        room = budget - (near[-1].size - len(near[-1].value))  # the same header widths
        exact = chunk_records(payload_of(room * k), budget=budget)
        over = chunk_records(payload_of(room * k + 1), budget=budget)
        assert (len(exact), len(over)) == (k, k + 1)
        assert max(r.size for r in exact + over) <= budget
        assert max(r.size for r in exact) == budget


@SLOW
@given(
    size=SIZES,
    budget=st.sampled_from([100_000, 250_000, 900_000]),
    seed=st.integers(0, 2**32),
)
def test_every_chunk_record_fits_the_budget_and_count_is_minimal(
    size: int, budget: int, seed: int
) -> None:
    payload = payload_of(size, seed)
    records = chunk_records(payload, budget=budget)
    assert all(r.size <= budget for r in records)
    assert b"".join(r.value for r in records) == payload
    overhead = records[-1].size - len(records[-1].value)
    if len(records) > 1:  # one chunk fewer would not fit
        assert -(-size // (len(records) - 1)) + overhead > budget
    assert len(records) == compute_chunk_count(
        custodian="custodian-a", exchange="exchange-x", sequence=7, size=size, time=T0,
        budget_bytes=budget,
    )  # fmt: skip


@SLOW
@given(size=SIZES, seed=st.integers(0, 2**32), data=st.data())
def test_any_order_with_duplicates_reassembles_exactly(
    size: int, seed: int, data: st.DataObject
) -> None:
    payload = payload_of(size, seed)
    budget = data.draw(st.sampled_from([600, 2_000, 100_000, 900_000]) if size < 50_000 else
                       st.sampled_from([100_000, 900_000]))  # fmt: skip
    chunks = chunks_of(payload, budget=budget)
    order = data.draw(st.permutations(chunks))
    extra = data.draw(st.lists(st.sampled_from(chunks), max_size=10))
    sequence = list(order) + extra
    random.Random(seed).shuffle(sequence)
    reassembler = Reassembler()
    done = feed(reassembler, sequence)
    assert len(done) == 1
    assert done[0].payload == payload
    assert done[0].payload_digest == hashlib.sha256(payload).digest()
    assert (done[0].custodian, done[0].exchange, done[0].sequence) == (
        "custodian-a",
        "exchange-x",
        7,
    )
    assert reassembler.partial_count == 0
    assert reassembler.reserved_bytes == 0


@SLOW
@given(size=st.integers(12_000, 200_000), seed=st.integers(0, 2**32), data=st.data())
def test_any_missing_chunk_yields_nothing(size: int, seed: int, data: st.DataObject) -> None:
    chunks = chunks_of(payload_of(size, seed), budget=data.draw(st.sampled_from([700, 5_000])))
    missing = data.draw(st.integers(0, len(chunks) - 1))
    rest = [c for c in chunks if c.index != missing]
    rest = data.draw(st.permutations(rest)) + data.draw(st.lists(st.sampled_from(rest)))
    reassembler = Reassembler()
    assert feed(reassembler, rest) == []
    assert reassembler.partial_count == 1
    (eviction,) = reassembler.expire(1e9)
    assert eviction.reason is EvictionReason.EXPIRED
    assert eviction.received == len(chunks) - 1
    assert reassembler.partial_count == 0
    assert reassembler.reserved_bytes == 0


@SLOW
@given(size=st.integers(1, 200_000), seed=st.integers(0, 2**32), data=st.data())
def test_a_flipped_byte_in_any_chunk_is_rejected(size: int, seed: int, data: st.DataObject) -> None:
    payload = payload_of(size, seed)
    records = chunk_records(payload, budget=data.draw(st.sampled_from([700, 5_000, 900_000])))
    target = data.draw(st.integers(0, len(records) - 1))
    position = data.draw(st.integers(0, len(records[target].value) - 1))
    bit = 1 << data.draw(st.integers(0, 7))
    bad_value = bytearray(records[target].value)
    bad_value[position] ^= bit

    # On the wire, the record no longer matches its ce_id.
    record = records[target]
    with pytest.raises(HeaderMismatch, match="ce_id"):
        decode_message(record.topic, record.key, bytes(bad_value), record.headers)

    # A sender that recomputes ce_id gets past the envelope; the payload digest stops it.
    chunks = [decode_chunk(r) for r in records]
    chunks[target] = replace(chunks[target], data=bytes(bad_value))
    order = data.draw(st.permutations(chunks))
    reassembler = Reassembler()
    *first, last = order
    assert feed(reassembler, list(first)) == []
    with pytest.raises(PayloadDigestMismatch, match="do not hash"):
        reassembler.add(last, now_s=0.0)
    assert reassembler.partial_count == 0
    assert reassembler.reserved_bytes == 0


# --- reassembler rules --------------------------------------------------------------------------


def test_conflicting_chunk_is_rejected_and_the_good_set_still_completes() -> None:
    payload = payload_of(5_000, 1)
    chunks = chunks_of(payload, budget=2_000)
    reassembler = Reassembler()
    assert reassembler.add(chunks[0], now_s=0.0) is None
    forged = replace(chunks[0], data=bytes(len(chunks[0].data)))
    with pytest.raises(ConflictingChunk) as info:
        reassembler.add(forged, now_s=0.0)
    assert info.value.reason == "conflicting_chunk"
    (done,) = feed(reassembler, chunks[1:])
    assert done.payload == payload


def test_chunk_naming_another_statement_conflicts() -> None:
    chunks = chunks_of(payload_of(5_000, 2), budget=2_000)
    reassembler = Reassembler()
    reassembler.add(chunks[0], now_s=0.0)
    other = replace(chunks[1], statement_digest=hashlib.sha256(b"other").digest())
    with pytest.raises(ConflictingChunk, match="another statement"):
        reassembler.add(other, now_s=0.0)


def test_chunk_of_wrong_length_is_rejected() -> None:
    chunks = chunks_of(payload_of(5_000, 3), budget=2_000)
    with pytest.raises(ChunkError, match="must be"):
        Reassembler().add(replace(chunks[1], data=chunks[1].data + b"x"), now_s=0.0)


def test_duplicates_after_completion_are_ignored() -> None:
    chunks = chunks_of(payload_of(5_000, 4), budget=2_000)
    reassembler = Reassembler()
    assert len(feed(reassembler, chunks)) == 1
    assert feed(reassembler, chunks) == []
    assert reassembler.partial_count == 0


def test_a_forgotten_set_is_reassembled_again_and_only_that_one() -> None:
    """The receiver forgets a set whose entry it refused: the same chunks delivered again
    complete once more (else that entry would wait for ever). Another set it returned still
    swallows its copies, and forgetting a set never returned changes nothing."""
    refused_payload, applied_payload = payload_of(5_000, 6), payload_of(5_000, 7)
    refused = chunks_of(refused_payload, budget=2_000)
    applied = chunks_of(applied_payload, budget=2_000)
    reassembler = Reassembler()
    (first,) = feed(reassembler, refused)
    assert len(feed(reassembler, applied)) == 1
    key = (refused[0].stream, refused[0].sequence, refused[0].payload_digest, refused[0].count)
    assert feed(reassembler, refused) == []  # remembered: a copy
    reassembler.forget_completed(key)
    # Redelivered in another order: reassembled and returned again, exactly the payload.
    (again,) = feed(reassembler, refused[::-1])
    assert again == first
    assert again.payload == refused_payload
    assert feed(reassembler, refused) == []  # returned again, so remembered again
    assert feed(reassembler, applied) == []  # the applied set was never forgotten
    reassembler.forget_completed(("custodian-a/exchange-x", 99, bytes(32), 1))  # unknown: no-op
    assert feed(reassembler, applied) == []
    assert reassembler.partial_count == 0
    assert reassembler.reserved_bytes == 0


def test_other_chunking_of_same_payload_is_its_own_set() -> None:
    """A relay that restarts with another budget republishes other chunk counts; both sets
    complete to the same payload and neither conflicts with the other."""
    payload = payload_of(20_000, 5)
    small, large = chunks_of(payload, budget=2_000), chunks_of(payload, budget=9_000)
    assert len(small) != len(large)
    reassembler = Reassembler()
    mixed = [c for pair in zip(small, large, strict=False) for c in pair] + small[len(large) :]
    done = feed(reassembler, mixed)
    assert [d.payload for d in done] == [payload, payload]


def test_too_many_partial_payloads_evicts_the_oldest() -> None:
    limits = ReassemblyLimits(max_partial_payloads=2)
    reassembler = Reassembler(limits)
    sets = [chunks_of(payload_of(3_000, seed), budget=2_000) for seed in range(3)]
    for chunks in sets:
        assert reassembler.add(chunks[0], now_s=0.0) is None
    assert reassembler.partial_count == 2
    (eviction,) = reassembler.take_evictions()
    assert eviction.reason is EvictionReason.CAPACITY
    assert eviction.payload_digest == sets[0][0].payload_digest
    assert reassembler.take_evictions() == []
    # The evicted set never completes from its remaining chunks (it restarts and is incomplete).
    assert feed(reassembler, sets[0][1:]) == []


def test_total_bytes_bound_evicts_to_make_room() -> None:
    limits = ReassemblyLimits(max_payload_bytes=10_000, max_total_bytes=15_000)
    reassembler = Reassembler(limits)
    first = chunks_of(payload_of(8_000, 1), budget=2_000)
    second = chunks_of(payload_of(8_000, 2), budget=2_000)
    reassembler.add(first[0], now_s=0.0)
    reassembler.add(second[0], now_s=0.0)
    assert reassembler.reserved_bytes == 8_000
    (eviction,) = reassembler.take_evictions()
    assert eviction.payload_digest == first[0].payload_digest
    (done,) = feed(reassembler, second[1:])
    assert done.payload == payload_of(8_000, 2)


def test_oversized_payload_and_too_many_chunks_are_refused() -> None:
    chunks = chunks_of(payload_of(8_000, 1), budget=2_000)
    with pytest.raises(ReassemblyLimit, match="exceeds"):
        Reassembler(ReassemblyLimits(max_payload_bytes=7_999)).add(chunks[0], now_s=0.0)
    with pytest.raises(ReassemblyLimit, match="chunks exceed"):
        Reassembler(ReassemblyLimits(max_chunks=len(chunks) - 1)).add(chunks[0], now_s=0.0)


def test_expire_drops_only_idle_sets() -> None:
    reassembler = Reassembler(ReassemblyLimits(idle_timeout_s=10.0))
    old = chunks_of(payload_of(5_000, 1), budget=2_000)
    new = chunks_of(payload_of(5_000, 2), budget=2_000)
    reassembler.add(old[0], now_s=0.0)
    reassembler.add(new[0], now_s=5.0)
    assert reassembler.expire(9.0) == []
    (eviction,) = reassembler.expire(12.0)
    assert eviction.payload_digest == old[0].payload_digest
    assert eviction.reason is EvictionReason.EXPIRED
    assert reassembler.partial_count == 1


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigurationError):
        ReassemblyLimits(max_partial_payloads=0)
    with pytest.raises(ConfigurationError):
        ReassemblyLimits(max_payload_bytes=10, max_total_bytes=5)
    with pytest.raises(ConfigurationError):
        ReassemblyLimits(idle_timeout_s=0)


# --- disclosures --------------------------------------------------------------------------------


def disclosure_of(count: int, *, sequence: int = 1) -> LeafDisclosure:
    return LeafDisclosure(
        custodian="custodian-a",
        exchange="exchange-x",
        sequence=sequence,
        statement_digest=STATEMENT_DIGEST,
        set_leaves=leaves(count),
    )


def test_disclosure_round_trip_through_chunks() -> None:
    disclosure = disclosure_of(300)
    records = encode_disclosure(disclosure, time=T0, budget_bytes=8_000)
    assert len(records) > 3
    chunks = [decode_chunk(r) for r in reversed(records)]
    (done,) = feed(Reassembler(), chunks)
    assert decode_disclosure(done) == disclosure


def test_disclosure_must_match_what_its_chunks_named() -> None:
    disclosure = disclosure_of(20)
    (done,) = feed(Reassembler(), [decode_chunk(r) for r in encode_disclosure(disclosure, time=T0)])
    with pytest.raises(HeaderMismatch, match="sequence"):
        decode_disclosure(replace(done, sequence=2))
    with pytest.raises(HeaderMismatch, match="statement digest"):
        decode_disclosure(replace(done, statement_digest=bytes(32)))
    with pytest.raises(HeaderMismatch, match="stream"):
        decode_disclosure(replace(done, exchange="exchange-y"))
    with pytest.raises(EnvelopeError, match="RFC 8785"):
        decode_disclosure(replace(done, payload=done.payload.replace(b":", b": ", 1)))
    with pytest.raises(DecodeError):
        decode_disclosure(replace(done, payload=b"[]"))


def chunk_a_large_disclosure(count: int) -> None:
    started = time.perf_counter()
    disclosure = disclosure_of(count)
    built = time.perf_counter()
    records = encode_disclosure(disclosure, time=T0)
    chunked = time.perf_counter()
    total = sum(len(r.value) for r in records)
    print(
        f"\n{count} leaves: {total / 1e6:.1f} MB canonical, {len(records)} chunks; "
        f"leaves built in {built - started:.2f} s, canonicalized and chunked in "
        f"{chunked - built:.2f} s"
    )
    assert all(r.size <= DEFAULT_BUDGET_BYTES for r in records)
    reassembler = Reassembler()
    done = feed(reassembler, [decode_chunk(r) for r in records])
    assert len(done) == 1
    assert done[0].payload_digest == hashlib.sha256(done[0].payload).digest()
    print(f"decoded and reassembled in {time.perf_counter() - chunked:.2f} s")


def test_100k_leaf_disclosure_chunks() -> None:
    chunk_a_large_disclosure(100_000)


@pytest.mark.slow
def test_1m_leaf_disclosure_chunks() -> None:
    chunk_a_large_disclosure(1_000_000)
