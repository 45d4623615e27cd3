"""Chunking of leaf disclosures so every record fits the budget, and their reassembly.

A snapshot's leaf disclosure grows with the number of clients (about 150 bytes per leaf, so a
million leaves is about 150 MB of canonical JSON); no broker takes that as one record. The sender
cuts the canonical bytes of the disclosure (the *payload*) into ``count`` contiguous chunks whose
lengths differ by at most one byte (:func:`compute_chunk_spans`), the smallest ``count`` for which
every record, headers included, stays within the budget. Each chunk is its own record on the
attestations topic (bridge/envelope.py, type ``mcb.disclosure-chunk.v1``) and names the payload by
SHA-256 and size, and the statement it belongs to by digest.

The signed statement is not chunked: it is at most a few hundred KB and travels as one record of
its own just before the chunks of its disclosure, so a receiver can verify the signatures before
it has every chunk. The chunks refer to it by ``mcb_statement_digest``.

:class:`Reassembler` is a pure state machine (no clock: the caller passes ``now_s``, monotonic
seconds). It collects chunks per (stream, sequence, payload digest, chunk count) in any order,
ignores exact duplicates (delivery is at least once), rejects a chunk that conflicts with one it
holds, and returns the payload only when every chunk is present and SHA-256 of their
concatenation is the payload digest. An incomplete set is never returned. It remembers the last
sets it returned and ignores their chunks when they come again, until the receiver forgets a set
whose entry it did not apply (:meth:`Reassembler.forget_completed`), so that a redelivery of
that entry is reassembled again. Memory is bounded by
:class:`ReassemblyLimits`; sets that go quiet are expired and, when a new set would exceed the
limits, the oldest partial sets are evicted. Both are reported with a reason.

This module does not verify the disclosure against the statement (attestations.disclosure does,
through ReceiverTrees.plan) and does no I/O.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

from attestations.canonical import compute_canonical_bytes, parse_json_object
from attestations.disclosure import MAX_DISCLOSED_LEAVES, LeafDisclosure
from attestations.errors import ConfigurationError, DecodeError, InvariantViolation
from bridge.envelope import (
    DEFAULT_BUDGET_BYTES,
    DisclosureChunk,
    EnvelopeError,
    HeaderMismatch,
    OutboundMessage,
    check_budget,
    encode_chunk,
)
from bridge.topics import DEFAULT_CATALOGUE, TopicCatalogue, compute_stream_key

DEFAULT_MAX_PARTIAL_PAYLOADS: Final = 8
DEFAULT_MAX_PAYLOAD_BYTES: Final = 512 * 2**20
DEFAULT_MAX_TOTAL_BYTES: Final = 2**30
DEFAULT_MAX_CHUNKS: Final = 4096
DEFAULT_IDLE_TIMEOUT_S: Final = 300.0
DEFAULT_REMEMBER_COMPLETED: Final = 256


# --- errors -------------------------------------------------------------------------------------


class ChunkError(DecodeError):
    """A chunk that cannot belong to the set it names (wrong length for its index)."""

    reason = "bad_chunk"


class ConflictingChunk(ChunkError):
    """Same set and index as a chunk already held, different bytes or metadata."""

    reason = "conflicting_chunk"


class PayloadDigestMismatch(ChunkError):
    """Every chunk arrived but their concatenation is not the payload the digest names."""

    reason = "payload_digest_mismatch"


class ReassemblyLimit(ChunkError):
    """A set larger than the receiver accepts (payload bytes or chunk count)."""

    reason = "reassembly_limit"


# --- layout -------------------------------------------------------------------------------------


def compute_chunk_spans(size: int, count: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk: the first ``size % count`` chunks are one byte longer than
    the rest, so (size, count) alone fixes every chunk and a receiver checks each length on
    arrival."""
    if count < 1 or size < 0 or (size > 0 and count > size):
        raise InvariantViolation(f"cannot cut {size} bytes into {count} non-empty chunks")
    base, longer = divmod(size, count)
    spans = []
    start = 0
    for index in range(count):
        end = start + base + (1 if index < longer else 0)
        spans.append((start, end))
        start = end
    return spans


def compute_chunk_length(size: int, count: int, index: int) -> int:
    base, longer = divmod(size, count)
    return base + (1 if index < longer else 0)


def _template(
    *,
    custodian: str,
    exchange: str,
    sequence: int,
    size: int,
    count: int,
    time: datetime,
    catalogue: TopicCatalogue,
) -> int:
    """Bytes of a chunk record without its data, at the widest index of ``count`` chunks: every
    header is fixed width except the decimal ones, which are widest there."""
    chunk = DisclosureChunk(
        custodian=custodian,
        exchange=exchange,
        sequence=sequence,
        statement_digest=bytes(32),
        payload_digest=bytes(32),
        payload_size=size,
        index=count - 1,
        count=count,
        data=b"",
    )
    return encode_chunk(chunk, time=time, catalogue=catalogue, budget_bytes=None).size


def compute_chunk_count(
    *,
    custodian: str,
    exchange: str,
    sequence: int,
    size: int,
    time: datetime,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
) -> int:
    """The smallest chunk count whose records (headers included) all fit ``budget_bytes``."""
    check_budget(budget_bytes)
    count = 1
    while True:
        overhead = _template(
            custodian=custodian,
            exchange=exchange,
            sequence=sequence,
            size=size,
            count=count,
            time=time,
            catalogue=catalogue,
        )
        room = budget_bytes - overhead
        if room < 1:
            raise InvariantViolation(f"budget {budget_bytes} leaves no room for chunk data")
        needed = max(1, -(-size // room))
        if needed <= count:  # the longest chunk, ceil(size / count), fits the room
            return count
        count = needed  # more chunks can only widen the decimal headers: iterate


def encode_payload(
    payload: bytes,
    *,
    custodian: str,
    exchange: str,
    sequence: int,
    statement_digest: bytes,
    time: datetime,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
) -> tuple[OutboundMessage, ...]:
    """The chunk records of one payload, in index order, each within ``budget_bytes``."""
    if not isinstance(payload, bytes):
        raise InvariantViolation("payload must be bytes")
    size = len(payload)
    count = compute_chunk_count(
        custodian=custodian,
        exchange=exchange,
        sequence=sequence,
        size=size,
        time=time,
        budget_bytes=budget_bytes,
        catalogue=catalogue,
    )
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    messages = []
    for index, (start, end) in enumerate(compute_chunk_spans(size, count)):
        chunk = DisclosureChunk(
            custodian=custodian,
            exchange=exchange,
            sequence=sequence,
            statement_digest=statement_digest,
            payload_digest=digest,
            payload_size=size,
            index=index,
            count=count,
            data=bytes(view[start:end]),
        )
        messages.append(
            encode_chunk(chunk, time=time, catalogue=catalogue, budget_bytes=budget_bytes)
        )
    return tuple(messages)


def encode_disclosure(
    disclosure: LeafDisclosure,
    *,
    time: datetime,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
) -> tuple[OutboundMessage, ...]:
    """The disclosure's RFC 8785 bytes as chunk records. Publish them, in order, after the record
    of the statement they belong to. ``time`` is their ``ce_time`` (the statement's issued_at is a
    good choice: then the records are a pure function of the disclosure)."""
    return encode_payload(
        compute_canonical_bytes(disclosure.to_wire()),
        custodian=disclosure.custodian,
        exchange=disclosure.exchange,
        sequence=disclosure.sequence,
        statement_digest=disclosure.statement_digest,
        time=time,
        budget_bytes=budget_bytes,
        catalogue=catalogue,
    )


# --- reassembly ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReassemblyLimits:
    """Bounds on what a :class:`Reassembler` holds. ``max_total_bytes`` counts the declared size
    of every partial payload (reserved when its first chunk arrives), so memory never exceeds it
    however the chunks interleave."""

    max_partial_payloads: int = DEFAULT_MAX_PARTIAL_PAYLOADS
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_chunks: int = DEFAULT_MAX_CHUNKS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    remember_completed: int = DEFAULT_REMEMBER_COMPLETED

    def __post_init__(self) -> None:
        for name in (
            "max_partial_payloads",
            "max_payload_bytes",
            "max_total_bytes",
            "max_chunks",
            "remember_completed",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, not {value!r}")
        if self.max_payload_bytes > self.max_total_bytes:
            raise ConfigurationError("max_payload_bytes cannot exceed max_total_bytes")
        if not isinstance(self.idle_timeout_s, int | float) or not self.idle_timeout_s > 0:
            raise ConfigurationError("idle_timeout_s must be positive")


SetKey = tuple[str, int, bytes, int]
"""(stream, sequence, payload digest, chunk count): one set of chunks."""


class EvictionReason(StrEnum):
    EXPIRED = "expired"
    """No chunk of the set arrived for ``idle_timeout_s``."""
    CAPACITY = "capacity"
    """A newer set needed the room; the oldest partial set made way."""


@dataclass(frozen=True, slots=True)
class Eviction:
    """A partial set dropped without being returned: ``received`` of ``count`` chunks."""

    stream: str
    sequence: int
    payload_digest: bytes
    count: int
    received: int
    reason: EvictionReason


@dataclass(frozen=True, slots=True)
class CompletedPayload:
    """A payload whose every chunk arrived and whose SHA-256 is ``payload_digest``."""

    custodian: str
    exchange: str
    sequence: int
    statement_digest: bytes
    payload_digest: bytes
    payload: bytes


@dataclass(slots=True)
class _Partial:
    custodian: str
    exchange: str
    statement_digest: bytes
    size: int
    last_seen_s: float
    chunks: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Collects disclosure chunks and returns each complete, digest-checked payload once."""

    def __init__(self, limits: ReassemblyLimits | None = None) -> None:
        self.limits = limits or ReassemblyLimits()
        # Insertion order is arrival order of each set's first chunk: the oldest is first.
        self._partials: OrderedDict[SetKey, _Partial] = OrderedDict()
        self._completed: OrderedDict[SetKey, None] = OrderedDict()
        self._evictions: list[Eviction] = []
        self.reserved_bytes = 0

    @property
    def partial_count(self) -> int:
        return len(self._partials)

    def take_evictions(self) -> list[Eviction]:
        """The capacity evictions since the last call (expire() returns its own)."""
        evictions, self._evictions = self._evictions, []
        return evictions

    def add(self, chunk: DisclosureChunk, *, now_s: float) -> CompletedPayload | None:
        """Take one chunk. Returns the payload when this chunk completes a set whose digest
        matches; None while the set is incomplete and for a duplicate (also of a set already
        returned and not forgotten since, :meth:`forget_completed`). Raises ReassemblyLimit,
        ChunkError, ConflictingChunk or, when the completed set does not hash to its digest,
        PayloadDigestMismatch (the set is then dropped)."""
        if not isinstance(chunk, DisclosureChunk):
            raise InvariantViolation("Reassembler.add takes a DisclosureChunk")
        limits = self.limits
        if chunk.payload_size > limits.max_payload_bytes:
            raise ReassemblyLimit(
                f"payload of {chunk.payload_size} bytes exceeds {limits.max_payload_bytes}"
            )
        if chunk.count > limits.max_chunks:
            raise ReassemblyLimit(f"{chunk.count} chunks exceed {limits.max_chunks}")
        expected = compute_chunk_length(chunk.payload_size, chunk.count, chunk.index)
        if len(chunk.data) != expected:
            raise ChunkError(
                f"chunk {chunk.index}/{chunk.count} of a {chunk.payload_size}-byte payload must "
                f"be {expected} bytes, not {len(chunk.data)}"
            )
        key: SetKey = (chunk.stream, chunk.sequence, chunk.payload_digest, chunk.count)
        if key in self._completed:
            return None  # a redelivered chunk of a payload already returned
        partial = self._partials.get(key)
        if partial is None:
            partial = self._admit(key, chunk, now_s=now_s)
        elif (partial.statement_digest, partial.size) != (
            chunk.statement_digest,
            chunk.payload_size,
        ):
            raise ConflictingChunk(
                f"chunk {chunk.index} of {key[0]} #{key[1]} names another statement or size"
            )
        held = partial.chunks.get(chunk.index)
        if held is not None:
            if held != chunk.data:
                raise ConflictingChunk(
                    f"chunk {chunk.index}/{chunk.count} of {key[0]} #{key[1]} differs from the "
                    "copy already received"
                )
            partial.last_seen_s = now_s
            return None
        partial.chunks[chunk.index] = chunk.data
        partial.last_seen_s = now_s
        if len(partial.chunks) < chunk.count:
            return None
        return self._complete(key, partial)

    def _admit(self, key: SetKey, chunk: DisclosureChunk, *, now_s: float) -> _Partial:
        limits = self.limits
        while self._partials and (
            len(self._partials) >= limits.max_partial_payloads
            or self.reserved_bytes + chunk.payload_size > limits.max_total_bytes
        ):
            oldest = next(iter(self._partials))
            self._evictions.append(self._drop(oldest, EvictionReason.CAPACITY))
        partial = _Partial(
            custodian=chunk.custodian,
            exchange=chunk.exchange,
            statement_digest=chunk.statement_digest,
            size=chunk.payload_size,
            last_seen_s=now_s,
        )
        self._partials[key] = partial
        self.reserved_bytes += chunk.payload_size
        return partial

    def _drop(self, key: SetKey, reason: EvictionReason) -> Eviction:
        partial = self._partials.pop(key)
        self.reserved_bytes -= partial.size
        return Eviction(
            stream=key[0],
            sequence=key[1],
            payload_digest=key[2],
            count=key[3],
            received=len(partial.chunks),
            reason=reason,
        )

    def _complete(self, key: SetKey, partial: _Partial) -> CompletedPayload:
        del self._partials[key]
        self.reserved_bytes -= partial.size
        payload = b"".join(partial.chunks[index] for index in range(key[3]))
        partial.chunks.clear()
        if hashlib.sha256(payload).digest() != key[2]:
            raise PayloadDigestMismatch(
                f"the {key[3]} chunks of {key[0]} #{key[1]} do not hash to the payload digest"
            )
        self._completed[key] = None
        while len(self._completed) > self.limits.remember_completed:
            self._completed.popitem(last=False)
        return CompletedPayload(
            custodian=partial.custodian,
            exchange=partial.exchange,
            sequence=key[1],
            statement_digest=partial.statement_digest,
            payload_digest=key[2],
            payload=payload,
        )

    def forget_completed(self, key: SetKey) -> None:
        """Forget that the set ``key`` was returned, so that a redelivery of its chunks is
        reassembled and returned again. The receiver calls it when the payload it returned was
        not applied (its entry was refused, or its statement was gone): only a set completed
        *and applied* may swallow later copies of its chunks, else the redelivered entry would
        wait for ever for chunks it already saw. Forgetting a set not remembered does nothing."""
        self._completed.pop(key, None)

    def expire(self, now_s: float) -> list[Eviction]:
        """Drop every partial set with no new chunk for ``idle_timeout_s`` or more."""
        stale = [
            key
            for key, partial in self._partials.items()
            if now_s - partial.last_seen_s >= self.limits.idle_timeout_s
        ]
        return [self._drop(key, EvictionReason.EXPIRED) for key in stale]


def decode_disclosure(
    completed: CompletedPayload, *, max_leaves: int = MAX_DISCLOSED_LEAVES
) -> LeafDisclosure:
    """The leaf disclosure in a completed payload. It must be RFC 8785 bytes and name the stream,
    sequence and statement digest its chunks named."""
    payload = completed.payload
    disclosure = LeafDisclosure.from_wire(
        parse_json_object(payload, max_bytes=max(1, len(payload))), max_leaves=max_leaves
    )
    if compute_canonical_bytes(disclosure.to_wire()) != payload:
        raise EnvelopeError("the disclosure payload is not in RFC 8785 form")
    stream = compute_stream_key(custodian=completed.custodian, exchange=completed.exchange)
    if (disclosure.custodian, disclosure.exchange) != (completed.custodian, completed.exchange):
        raise HeaderMismatch(f"the disclosure is not of the stream {stream} its chunks named")
    if disclosure.sequence != completed.sequence:
        raise HeaderMismatch(
            f"the disclosure is for sequence {disclosure.sequence}, its chunks said "
            f"{completed.sequence}"
        )
    if disclosure.statement_digest != completed.statement_digest:
        raise HeaderMismatch("the disclosure names another statement digest than its chunks")
    return disclosure
