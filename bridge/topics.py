"""The Kafka topic catalogue: which topics exist, how their messages are keyed, how many
partitions they get by default, and which message types may travel on each.

Every topic name is ``<prefix><topic>`` with a configurable prefix (default ``mcb.``), so several
deployments can share one cluster. Keys decide ordering: Kafka keeps the order of one key within
its partition, so everything about one (custodian, exchange) stream is keyed by
``<custodian>/<exchange>`` and one exchange's statements arrive in sequence order; positions
snapshots are keyed by the exchange and exposure reports by the client.

This module is pure: it names topics and answers questions about them. It does not create topics
or talk to a broker (bridge/kafka.py does), and it does not encode messages (bridge/envelope.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from attestations.errors import ConfigurationError, DecodeError
from attestations.statement import validate_party

DEFAULT_PREFIX: Final = "mcb."
MAX_TOPIC_NAME: Final = 249
"""Kafka's limit on a topic name."""
_TOPIC_CHARS_RE: Final = re.compile(r"[a-zA-Z0-9._-]*")


class TopicKind(StrEnum):
    """The topics of the bridge, by role. The value is the topic name after the prefix."""

    ATTESTATIONS = "attestations"
    """Custodian -> exchanges: signed statements and the chunks of their leaf disclosures."""
    INSTRUCTIONS = "instructions"
    """Exchange -> custodian: snapshot requests, margin calls, liquidation-due notices and release
    acknowledgements (signed liquidation instructions later)."""
    REPORTS = "reports"
    """Custodian -> exchange: executions and acknowledgements (no message type defined yet)."""
    LEDGER_SNAPSHOTS = "ledger-snapshots"
    """Exchange -> reconciliation: the signed positions snapshots of the margin ledger."""
    EXPOSURES = "exposures"
    """Trading engine -> margin ledger, inside the exchange: each client's exposure, margin
    requirement and unrealised profit and loss (unsigned: both ends are the exchange's own)."""
    DEAD_LETTERS = "dead-letters"
    """Messages a consumer could not process, preserved with the reason."""


class MessageType(StrEnum):
    """The ``ce_type`` of every message the bridge defines. The suffix is the body's version: a
    new body layout is a new type, so an old consumer rejects it instead of misreading it."""

    STATEMENT = "mcb.statement.v1"
    DISCLOSURE_CHUNK = "mcb.disclosure-chunk.v1"
    SNAPSHOT_REQUEST = "mcb.snapshot-request.v1"
    DEAD_LETTER = "mcb.dead-letter.v1"
    MARGIN_CALL = "mcb.margin-call.v1"
    LIQUIDATION_DUE = "mcb.liquidation-due.v1"
    POSITIONS_SNAPSHOT = "mcb.positions-snapshot.v1"
    EXPOSURE_REPORT = "mcb.exposure-report.v1"
    RELEASE_ACK = "mcb.release-ack.v1"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What one topic carries: producer and consumer roles, the key layout (documentation for
    people; bridge/envelope.py enforces it), default partitions, and the allowed message types."""

    kind: TopicKind
    producer: str
    consumer: str
    key: str
    partitions: int
    message_types: frozenset[MessageType]


# One table for the whole catalogue, so "what may travel where" is answered in one place.
TOPIC_SPECS: Final[Mapping[TopicKind, TopicSpec]] = {
    TopicKind.ATTESTATIONS: TopicSpec(
        kind=TopicKind.ATTESTATIONS,
        producer="custodian",
        consumer="exchange",
        key="<custodian>/<exchange>",
        # Each stream is one key, so partitions only spread streams; 12 leaves room to grow
        # without repartitioning (repartitioning moves keys and breaks per-stream order).
        partitions=12,
        message_types=frozenset({MessageType.STATEMENT, MessageType.DISCLOSURE_CHUNK}),
    ),
    TopicKind.INSTRUCTIONS: TopicSpec(
        kind=TopicKind.INSTRUCTIONS,
        producer="exchange",
        consumer="custodian",
        key="<custodian>/<exchange>",
        partitions=6,
        message_types=frozenset(
            {
                MessageType.SNAPSHOT_REQUEST,
                MessageType.MARGIN_CALL,
                MessageType.LIQUIDATION_DUE,
                MessageType.RELEASE_ACK,
            }
        ),
    ),
    TopicKind.REPORTS: TopicSpec(
        kind=TopicKind.REPORTS,
        producer="custodian",
        consumer="exchange",
        key="<custodian>/<exchange>",
        partitions=6,
        message_types=frozenset(),
    ),
    TopicKind.LEDGER_SNAPSHOTS: TopicSpec(
        kind=TopicKind.LEDGER_SNAPSHOTS,
        producer="exchange",
        consumer="reconciliation",
        # A positions snapshot covers every stream of the exchange: keyed by the exchange, so the
        # parts of one snapshot, and the snapshots in time order, share one partition.
        key="<exchange>",
        partitions=3,
        message_types=frozenset({MessageType.POSITIONS_SNAPSHOT}),
    ),
    TopicKind.EXPOSURES: TopicSpec(
        kind=TopicKind.EXPOSURES,
        producer="trading engine",
        consumer="margin ledger",
        # Keyed by client, so one client's reports stay in order; the ledger also ignores a
        # report older than the one it holds.
        key="<client>",
        partitions=6,
        message_types=frozenset({MessageType.EXPOSURE_REPORT}),
    ),
    TopicKind.DEAD_LETTERS: TopicSpec(
        kind=TopicKind.DEAD_LETTERS,
        producer="any consumer",
        consumer="operators",
        # Keyed by where the message came from, so the dead letters of one source partition stay
        # in their original order.
        key="<original topic>/<original partition>",
        partitions=3,
        message_types=frozenset({MessageType.DEAD_LETTER}),
    ),
}


def validate_topic_name(name: object) -> str:
    """A Kafka topic name: 1-249 characters of ``[a-zA-Z0-9._-]``, not ``.`` or ``..``."""
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_TOPIC_NAME
        or not _TOPIC_CHARS_RE.fullmatch(name)
        or name in {".", ".."}
    ):
        raise DecodeError(f"topic name {str(name)[:80]!r} is not a valid Kafka topic name")
    return name


def compute_stream_key(*, custodian: str, exchange: str) -> str:
    """``<custodian>/<exchange>``: party ids never contain ``/``, so the split is unambiguous."""
    validate_party(custodian, what="custodian")
    validate_party(exchange, what="exchange")
    return f"{custodian}/{exchange}"


def parse_stream_key(text: object) -> tuple[str, str]:
    """Inverse of :func:`compute_stream_key`: (custodian, exchange)."""
    if not isinstance(text, str) or text.count("/") != 1:
        raise DecodeError(f"stream {str(text)[:140]!r} is not <custodian>/<exchange>")
    custodian, exchange = text.split("/")
    validate_party(custodian, what="custodian")
    validate_party(exchange, what="exchange")
    if custodian == exchange:
        raise DecodeError("custodian and exchange must be different parties")
    return custodian, exchange


@dataclass(frozen=True, slots=True)
class TopicCatalogue:
    """The topic names of one deployment: ``prefix`` + the kind's name, and partition counts
    (the defaults of TOPIC_SPECS unless overridden)."""

    prefix: str = DEFAULT_PREFIX
    partitions: Mapping[TopicKind, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _TOPIC_CHARS_RE.fullmatch(self.prefix):
            raise ConfigurationError(f"topic prefix {self.prefix!r} must match [a-zA-Z0-9._-]*")
        longest = max(len(kind.value) for kind in TopicKind)
        if len(self.prefix) + longest > MAX_TOPIC_NAME:
            raise ConfigurationError(f"topic prefix {self.prefix[:40]!r}... is too long")
        for kind, count in self.partitions.items():
            if not isinstance(kind, TopicKind):
                raise ConfigurationError(f"{kind!r} is not a TopicKind")
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
                raise ConfigurationError(f"{kind.value}: partition count {count!r} not in 1..10000")

    def name(self, kind: TopicKind) -> str:
        return self.prefix + kind.value

    def kind_of(self, topic: str) -> TopicKind | None:
        """The kind of a topic name of this deployment, or None for any other name."""
        if not isinstance(topic, str) or not topic.startswith(self.prefix):
            return None
        try:
            return TopicKind(topic[len(self.prefix) :])
        except ValueError:
            return None

    def spec(self, kind: TopicKind) -> TopicSpec:
        return TOPIC_SPECS[kind]

    def partition_count(self, kind: TopicKind) -> int:
        return self.partitions.get(kind, TOPIC_SPECS[kind].partitions)

    def allows(self, topic: str, message_type: MessageType) -> bool:
        kind = self.kind_of(topic)
        return kind is not None and message_type in TOPIC_SPECS[kind].message_types

    def topic_for(self, message_type: MessageType) -> str:
        """The one topic a message type is published to."""
        for kind, spec in TOPIC_SPECS.items():
            if message_type in spec.message_types:
                return self.name(kind)
        raise ConfigurationError(f"no topic carries {message_type.value}")  # pragma: no cover

    def all_topics(self) -> dict[str, int]:
        """Every topic name with its partition count: what an admin client creates."""
        return {self.name(kind): self.partition_count(kind) for kind in TopicKind}


DEFAULT_CATALOGUE: Final = TopicCatalogue()
