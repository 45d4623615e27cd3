"""The exchange's attestation consumer is fail closed: a producer in the test publishes crafted
records on the attestations topic of the real embedded broker, and the consumer, on SQLite and
on PostgreSQL, credits nothing from any of them, dead-letters each with its reason (row and
dead-letter topic record), and keeps the partition moving: the valid statement published after
each bad one is credited.

The refusals that leave the stream healthy run as one *campaign* per database: one stream, one
consumer, and for each case a bad record (or entry: statement and disclosure), then the next
valid statement. The campaign notes what every case did (the ledger and journal before and
after the bad record, the dead letters at its offsets, whether the valid statement after it was
credited) and one parametrised test per case checks its notes, so a failure names its case. The
tampered-field matrix changes every member of the signed statement's wire form, nested asset
roots and prices included, without signing again: each is refused as ``bad_signature`` or with
the reason its decoding or an earlier check gives. Refusals that change the stream's state (a
gap, a fork) run on streams of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import Engine, select

from attestations.canonical import format_timestamp, parse_timestamp
from attestations.disclosure import DisclosedLeaf, LeafDisclosure
from attestations.errors import CounterpartyError
from attestations.keys import KeyRegistry
from attestations.p256 import SoftwareP256Signer
from attestations.signing import BlsCosigner
from attestations.statement import CustodianSignature, SignedStatement, Statement, StatementKind
from bridge.broker import EmbeddedBroker
from bridge.chunks import encode_payload
from bridge.consumer import ConsumerBase
from bridge.envelope import (
    DeadLetter,
    OutboundMessage,
    SnapshotRequest,
    decode_message,
    encode_statement,
)
from bridge.kafka import KafkaSettings, ensure_topics, open_producer, publish
from bridge.outbox import OutboxRelay, outbox_table
from bridge.topics import TopicCatalogue, TopicKind
from exchange.consumer import AttestationConsumer
from exchange.desk import MarginDesk
from exchange.store import create_exchange_engine, list_alerts, load_ledger, migrate
from tests.exchange_world import (
    CONSUMER_NOW,
    POLICY,
    Custodian,
    Entry,
    StreamWriter,
    asset_root,
    dead_letter_records,
    dead_letter_rows,
    entry_records,
    first_holdings,
    module_database,
    new_catalogue,
    new_exchange,
    p256_signer,
    raw_json,
    replace_root,
    statement_sequences,
    stream_journal,
    tampered_wire,
    with_value,
)
from tests.test_consumer import eventually, read_topic, running
from tests.world import DECIMALS, seed

pytestmark = pytest.mark.broker

CUSTODIAN = "custodian-a"
MALLORY = ("mallory", "BTC")
"""What every bad entry would credit if it got through: a holding no valid statement has."""
STEP_TIMEOUT_S = 10.0


# --- module fixtures: one database per backend, one key registry --------------------------------


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def exchange_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    directory: Path = tmp_path_factory.mktemp("exchange")
    yield from module_database(
        request.param, directory, lambda: str(request.getfixturevalue("_postgres_conninfo"))
    )


@pytest.fixture(scope="module")
def engine(exchange_url: str) -> Iterator[Engine]:
    created = create_exchange_engine(exchange_url)
    migrate(created)
    yield created
    created.dispose()


@pytest.fixture(scope="module")
def registry() -> KeyRegistry:
    return KeyRegistry()


@pytest.fixture(scope="module")
def custodian(registry: KeyRegistry) -> Custodian:
    return Custodian(CUSTODIAN, registry)


@pytest.fixture(scope="module")
def module_settings(broker: EmbeddedBroker) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=broker.bootstrap_servers, client_id="mcb-adversarial")


# --- a lane: one stream, its topics, its consumer ---------------------------------------------


@dataclass
class Lane:
    """One exchange's stream from ``custodian``, on topics of its own, and its consumer."""

    engine: Engine
    settings: KafkaSettings
    custodian: Custodian
    catalogue: TopicCatalogue
    writer: StreamWriter
    consumer: AttestationConsumer
    producer: AIOKafkaProducer | None = None

    @property
    def stream(self) -> str:
        return self.writer.stream

    async def publish(self, records: list[OutboundMessage]) -> list[int]:
        """Publish ``records`` in order; their offsets."""
        assert self.producer is not None
        offsets = []
        for message in records:
            _, offset = await publish(
                self.producer,
                message.topic,
                message.value,
                key=message.key,
                headers=message.headers,
            )
            offsets.append(offset)
        return offsets

    def head(self) -> int | None:
        status = self.consumer.margin_ledger.stream_status(self.stream)
        return None if status is None or status.head is None else status.head.sequence

    def positions(self) -> dict[tuple[str, str], int]:
        return dict(self.consumer.margin_ledger.positions().get(self.stream, {}))

    def journal_size(self) -> int:
        return len(stream_journal(self.engine, self.stream))

    def dead_letters(self) -> list[tuple[int, str]]:
        return dead_letter_rows(self.engine, self.consumer.name)

    async def credit(self, entry: Entry) -> None:
        """Publish a valid entry and wait until it is credited."""
        await self.publish(entry.records(self.catalogue))
        await eventually(lambda: self.head() == entry.sequence, timeout_s=STEP_TIMEOUT_S)


def make_lane(
    engine: Engine, settings: KafkaSettings, custodian: Custodian, label: str, **options: Any
) -> Lane:
    exchange = new_exchange(label)
    catalogue = new_catalogue()
    consumer = AttestationConsumer.open(
        engine,
        settings,
        exchange=exchange,
        custodians=[custodian.name],
        registry=custodian.registry,
        decimals=DECIMALS,
        policy=POLICY,
        catalogue=catalogue,
        clock=lambda: CONSUMER_NOW,
        backoff_initial_s=0.01,
        backoff_max_s=0.2,
        **options,
    )
    return Lane(engine, settings, custodian, catalogue, StreamWriter(custodian, exchange), consumer)


@asynccontextmanager
async def flowing(lane: Lane, *others: ConsumerBase | OutboxRelay) -> AsyncIterator[None]:
    """The lane's consumer (and ``others``) running, with a producer for the test's records."""
    await ensure_topics(lane.settings, lane.catalogue.all_topics())
    async with open_producer(lane.settings) as producer, running(lane.consumer):
        lane.producer = producer
        try:
            if others:
                async with running(others[0]):
                    yield
            else:
                yield
        finally:
            lane.producer = None


# --- the cases that leave the stream healthy --------------------------------------------------


@dataclass
class Bench:
    """What the cases build their bad records from."""

    lane: Lane
    other: StreamWriter
    """The same custodian's stream to another exchange."""
    accepted: list[Entry] = field(default_factory=list)
    stranger: SoftwareP256Signer = field(default_factory=lambda: p256_signer("stranger"))
    stranger_cosigner: BlsCosigner = field(
        default_factory=lambda: BlsCosigner.from_seed(seed("stranger-cosigner"))
    )

    @property
    def custodian(self) -> Custodian:
        return self.lane.custodian

    @property
    def catalogue(self) -> TopicCatalogue:
        return self.lane.catalogue

    def bad(self, **options: Any) -> Entry:
        """A successor of the head that credits MALLORY (nobody's real holding)."""
        return self.lane.writer.propose({MALLORY: 10**12}, **options)


Build = Callable[[Bench], list[OutboundMessage]]


@dataclass(frozen=True)
class Case:
    name: str
    reason: str | None
    """The dead letter's reason; None: a redelivery, dropped without effect or dead letter."""
    build: Build


def _entry(bench: Bench, entry: Entry) -> list[OutboundMessage]:
    return entry.records(bench.catalogue)


def _rebound(signed: SignedStatement, disclosure: LeafDisclosure) -> LeafDisclosure:
    """``disclosure``'s leaves, bound to ``signed`` (so the consumer completes the entry)."""
    statement = signed.statement
    return replace(
        disclosure,
        custodian=statement.custodian,
        exchange=statement.exchange,
        sequence=statement.sequence,
        statement_digest=signed.digest,
    )


def tampered(path: tuple[str | int, ...], change: Callable[[Any], Any]) -> Build:
    """The bad entry with the wire member at ``path`` changed and the signatures kept. A body
    that still decodes travels as the real encoder writes it, with its disclosure; one that no
    longer decodes as the raw body of an otherwise intact record."""

    def build(bench: Bench) -> list[OutboundMessage]:
        bad = bench.bad()
        node: Any = bad.signed.to_wire()
        for step in path:
            node = node[step]
        wire = tampered_wire(bad.signed, path, change(node))
        try:
            signed = SignedStatement.from_wire(wire)
        except CounterpartyError:
            return [
                with_value(encode_statement(bad.signed, catalogue=bench.catalogue), raw_json(wire))
            ]
        return entry_records(signed, _rebound(signed, bad.disclosure), bench.catalogue)

    return build


def flip_hex(value: str) -> str:
    return value[:-1] + ("0" if value[-1] != "0" else "1")


def shift_time(delta: timedelta) -> Callable[[str], str]:
    return lambda value: format_timestamp(parse_timestamp(value) + delta)


def plus(amount: int) -> Callable[[Any], Any]:
    return lambda value: str(int(value) + amount) if isinstance(value, str) else value + amount


def constant(new: Any) -> Callable[[Any], Any]:
    return lambda _: new


SIGNATURE = "bad_signature"

TAMPERS: list[tuple[tuple[str | int, ...], Callable[[Any], Any], str]] = [
    (("version",), constant(2), "malformed"),
    (("statement", "version"), constant(2), "malformed"),
    (("statement", "custodian"), constant("custodian-z"), "wrong_stream"),
    (("statement", "exchange"), constant("x-elsewhere"), "wrong_stream"),
    (("statement", "sequence"), plus(1), SIGNATURE),
    (("statement", "previous"), flip_hex, SIGNATURE),
    (("statement", "issued_at"), shift_time(timedelta(milliseconds=1)), SIGNATURE),
    (("statement", "expires_at"), shift_time(timedelta(milliseconds=1)), SIGNATURE),
    (("statement", "kind"), constant("snapshot"), SIGNATURE),
    (("statement", "assets", 0, "asset"), constant("BCH"), SIGNATURE),
    (("statement", "assets", 0, "decimals"), plus(1), SIGNATURE),
    (("statement", "assets", 0, "root"), flip_hex, SIGNATURE),
    (("statement", "assets", 0, "total"), plus(1), SIGNATURE),
    (("statement", "assets", 0, "count"), plus(-1), SIGNATURE),
    (("statement", "assets", 0, "depth"), plus(1), SIGNATURE),
    (("statement", "assets", 1, "total"), plus(-1), SIGNATURE),
    (("statement", "prices", 0, "asset"), constant("BCH"), SIGNATURE),
    (("statement", "prices", 0, "quote"), constant("EUR"), SIGNATURE),
    (("statement", "prices", 0, "price"), constant("64123.46"), SIGNATURE),
    (("statement", "prices", 0, "source"), constant("file:other"), SIGNATURE),
    (("statement", "prices", 0, "observed_at"), shift_time(-timedelta(seconds=1)), SIGNATURE),
    (("custodian_signature", "algorithm"), constant("ecdsa-p384-sha384"), "malformed"),
    (("custodian_signature", "key_id"), constant("00" * 32), "unknown_key"),
    (("custodian_signature", "signature"), flip_hex, SIGNATURE),
    (("quorum_signature", "algorithm"), constant("bls12381-g1-pop"), "malformed"),
    (("quorum_signature", "signers"), lambda signers: signers[:1], "missing_quorum"),
    (("quorum_signature", "signature"), flip_hex, SIGNATURE),
]


def _path_name(path: tuple[str | int, ...]) -> str:
    return "tamper:" + ".".join(str(step) for step in path)


def _forged_custodian_signature(bench: Bench) -> Callable[[Any], SignedStatement]:
    """Signed by a stranger's key, presented under the custodian key's id."""

    def sign(statement: Any) -> SignedStatement:
        signed = bench.custodian.sign(statement, signer=bench.stranger)
        return replace(
            signed,
            custodian_signature=CustodianSignature(
                bench.custodian.signer.key_id, signed.custodian_signature.signature
            ),
        )

    return sign


def _edit_leaves(
    bench: Bench, change: Callable[[DisclosedLeaf], DisclosedLeaf]
) -> list[OutboundMessage]:
    """A validly signed bad entry whose disclosure's MALLORY leaf is changed after signing."""
    bad = bench.bad()
    leaves = tuple(
        change(leaf) if (leaf.account, leaf.asset) == MALLORY else leaf
        for leaf in bad.disclosure.set_leaves
    )
    return _entry(bench, replace(bad, disclosure=replace(bad.disclosure, set_leaves=leaves)))


def _raw_disclosure(bench: Bench, edit: Callable[[dict[str, Any]], None]) -> list[OutboundMessage]:
    """A validly signed bad statement whose disclosure payload is edited as JSON (a value the
    disclosure type refuses to hold), cut into chunks by the real encoder."""
    bad = bench.bad()
    wire = bad.disclosure.to_wire()
    edit(wire)
    statement = bad.statement
    return [
        encode_statement(bad.signed, catalogue=bench.catalogue),
        *encode_payload(
            raw_json(wire),
            custodian=statement.custodian,
            exchange=statement.exchange,
            sequence=statement.sequence,
            statement_digest=bad.signed.digest,
            time=statement.issued_at,
            catalogue=bench.catalogue,
        ),
    ]


def _mallory_quantity(value: str) -> Callable[[dict[str, Any]], None]:
    def edit(wire: dict[str, Any]) -> None:
        for leaf in wire["set"]:
            if (leaf["account"], leaf["asset"]) == MALLORY:
                leaf["quantity"] = value

    return edit


def _raw_total(value: Any) -> Build:
    return lambda bench: [
        with_value(
            encode_statement(bench.bad().signed, catalogue=bench.catalogue),
            raw_json(tampered_wire(bench.bad().signed, ("statement", "assets", 0, "total"), value)),
        )
    ]


def _resigned_root(**changes: Callable[[Any], Any]) -> Build:
    """The bad entry with BTC's root member(s) changed and signed again: the signatures hold,
    the disclosed leaves do not rebuild what is signed."""

    def edit(statement: Any) -> Any:
        root = asset_root(statement, "BTC")
        return replace_root(
            statement, "BTC", **{name: f(getattr(root, name)) for name, f in changes.items()}
        )

    return lambda bench: _entry(bench, bench.bad(edit=edit))


def _dated(issued_at: datetime) -> Callable[[Statement], Statement]:
    return lambda statement: replace(
        statement, issued_at=issued_at, expires_at=issued_at + timedelta(hours=1)
    )


def _living(lifetime: timedelta) -> Callable[[Statement], Statement]:
    return lambda statement: replace(statement, expires_at=statement.issued_at + lifetime)


def _price_observed(after_issue: timedelta) -> Callable[[Statement], Statement]:
    def edit(statement: Statement) -> Statement:
        first, *rest = statement.prices
        moved = replace(first, observed_at=statement.issued_at + after_issue)
        return replace(statement, prices=(moved, *rest))

    return edit


def _noncanonical(bench: Bench) -> list[OutboundMessage]:
    bad = bench.bad()
    spaced = json.dumps(bad.signed.to_wire(), indent=1).encode()
    return [with_value(encode_statement(bad.signed, catalogue=bench.catalogue), spaced)]


def _head_again(bench: Bench) -> list[OutboundMessage]:
    return _entry(bench, bench.accepted[-1])


def _first_again(bench: Bench) -> list[OutboundMessage]:
    return _entry(bench, bench.accepted[0])


CASES: list[Case] = [
    *(Case(_path_name(path), reason, tampered(path, change)) for path, change, reason in TAMPERS),
    Case(
        "bad custodian signature",
        SIGNATURE,
        lambda b: _entry(b, b.bad(sign=_forged_custodian_signature(b))),
    ),
    Case(
        "bad aggregate signature",
        SIGNATURE,
        lambda b: _entry(
            b,
            b.bad(
                sign=lambda s: b.custodian.sign(s, cosigned_digest=hashlib.sha256(b"x").digest())
            ),
        ),
    ),
    Case(
        "unknown custodian key",
        "unknown_key",
        lambda b: _entry(b, b.bad(sign=lambda s: b.custodian.sign(s, signer=b.stranger))),
    ),
    Case(
        "unknown co-signer key",
        "unknown_key",
        lambda b: _entry(
            b,
            b.bad(
                sign=lambda s: b.custodian.sign(
                    s, cosigners=[b.custodian.cosigners[0], b.stranger_cosigner]
                )
            ),
        ),
    ),
    Case(
        "key revoked before issued_at",
        "revoked_key",
        lambda b: _entry(b, b.bad(sign=lambda s: b.custodian.sign(s, signer=b.custodian.revoked))),
    ),
    Case(
        "missing quorum",
        "missing_quorum",
        lambda b: _entry(
            b, b.bad(sign=lambda s: b.custodian.sign(s, cosigners=b.custodian.cosigners[:1]))
        ),
    ),
    Case(
        "expired",
        "expired",
        lambda b: _entry(b, b.bad(edit=lambda s: replace(s, expires_at=CONSUMER_NOW))),
    ),
    Case(
        "future-dated beyond the skew window",
        "future_dated",
        lambda b: _entry(b, b.bad(edit=_dated(CONSUMER_NOW + timedelta(seconds=31)))),
    ),
    Case(
        "lifetime longer than policy",
        "policy_violation",
        lambda b: _entry(b, b.bad(edit=_living(timedelta(hours=24, milliseconds=1)))),
    ),
    Case(
        "price observed after the statement",
        "policy_violation",
        lambda b: _entry(b, b.bad(edit=_price_observed(timedelta(seconds=31)))),
    ),
    Case(
        "dated before its predecessor",
        "broken_chain",
        lambda b: _entry(
            b,
            b.bad(
                edit=_dated(
                    b.accepted[-1].statement.issued_at - timedelta(milliseconds=1),
                )
            ),
        ),
    ),
    Case(
        "decimals other than the receiver's",
        "policy_violation",
        _resigned_root(decimals=lambda d: d + 1),
    ),
    Case("negative total", "negative_sum", _raw_total("-1")),
    Case("overflowing total", "sum_overflow", _raw_total(str(2**128))),
    Case("total as a JSON float", "float_rejected", _raw_total(1.5)),
    Case(
        "disclosed leaf other than the signed root",
        "root_mismatch",
        lambda b: _edit_leaves(b, lambda leaf: replace(leaf, quantity=leaf.quantity + 1)),
    ),
    Case("signed depth not the tree's", "root_mismatch", _resigned_root(depth=lambda d: d + 1)),
    Case("signed total not the leaves' sum", "sum_mismatch", _resigned_root(total=lambda t: t + 1)),
    Case("signed count not the leaves'", "sum_mismatch", _resigned_root(count=lambda c: c - 1)),
    Case(
        "disclosed leaves overflow the sum",
        "sum_overflow",
        lambda b: _edit_leaves(b, lambda leaf: replace(leaf, quantity=2**128 - 1)),
    ),
    Case(
        "negative disclosed quantity",
        "negative_sum",
        lambda b: _raw_disclosure(b, _mallory_quantity("-5")),
    ),
    Case(
        "statement for another exchange",
        "wrong_stream",
        lambda b: _entry(b, b.other.propose(first_holdings())),
    ),
    Case(
        "malformed JSON",
        "malformed",
        lambda b: [
            with_value(encode_statement(b.bad().signed, catalogue=b.catalogue), b'{"statement": {')
        ],
    ),
    Case("body not in RFC 8785 form", "malformed_envelope", _noncanonical),
    Case(
        "oversized record",
        "oversized",
        lambda b: [
            with_value(encode_statement(b.bad().signed, catalogue=b.catalogue), b" " * 1_000_001)
        ],
    ),
    Case("replayed head", None, _head_again),
    Case("replayed old statement", None, _first_again),
]


# --- the campaign -------------------------------------------------------------------------------


@dataclass
class Notes:
    """What one case did, as the campaign saw it."""

    offsets: list[int] = field(default_factory=list)
    values: dict[int, bytes] = field(default_factory=dict)
    """The published value at each of the case's offsets."""
    before: dict[tuple[str, str], int] = field(default_factory=dict)
    after_bad: dict[tuple[str, str], int] = field(default_factory=dict)
    journal_before: int = 0
    journal_after_bad: int = 0
    head_before: int | None = None
    head_after_bad: int | None = None
    duplicates: int = 0
    next_sequence: int = 0
    head_after_next: int | None = None
    after_next: dict[tuple[str, str], int] = field(default_factory=dict)
    expected_next: dict[tuple[str, str], int] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Campaign:
    lane: Lane
    notes: dict[str, Notes]
    rows: list[tuple[int, str]]
    letters: list[DeadLetter]
    metrics_dead_letters: int


async def _run_case(bench: Bench, case: Case, index: int) -> Notes:
    lane = bench.lane
    notes = Notes()
    records = case.build(bench)
    rows_before = len(lane.dead_letters())
    duplicates_before = lane.consumer.metrics.duplicates
    notes.before, notes.journal_before, notes.head_before = (
        lane.positions(),
        lane.journal_size(),
        lane.head(),
    )
    try:
        notes.offsets = await lane.publish(records)
        notes.values = dict(zip(notes.offsets, (m.value for m in records), strict=True))
        if case.reason is None:
            await eventually(
                lambda: lane.consumer.metrics.duplicates > duplicates_before,
                timeout_s=STEP_TIMEOUT_S,
            )
        else:
            await eventually(
                lambda: len(lane.dead_letters()) > rows_before, timeout_s=STEP_TIMEOUT_S
            )
    except AssertionError:
        notes.error = "the bad record was neither dead-lettered nor dropped in time"
    notes.after_bad, notes.journal_after_bad, notes.head_after_bad = (
        lane.positions(),
        lane.journal_size(),
        lane.head(),
    )
    notes.duplicates = lane.consumer.metrics.duplicates - duplicates_before
    # The next valid statement: a new client's USDC, so every case moves the holdings.
    valid = lane.writer.next({(f"client-{index:03d}", "USDC"): 1_000 + index})
    bench.accepted.append(valid)
    notes.next_sequence = valid.sequence
    notes.expected_next = lane.writer.holdings()
    try:
        await lane.credit(valid)
    except AssertionError:
        notes.error = (notes.error or "") + "; the valid statement after it was not credited"
    notes.head_after_next, notes.after_next = lane.head(), lane.positions()
    return notes


async def run_campaign(engine: Engine, settings: KafkaSettings, custodian: Custodian) -> Campaign:
    lane = make_lane(engine, settings, custodian, "campaign")
    bench = Bench(lane, StreamWriter(custodian, new_exchange("elsewhere")))
    notes: dict[str, Notes] = {}
    async with flowing(lane):
        first = lane.writer.next(first_holdings())
        bench.accepted.append(first)
        await lane.credit(first)
        for index, case in enumerate(CASES):
            notes[case.name] = await _run_case(bench, case, index)
        rows = lane.dead_letters()
        letters = await dead_letter_records(settings, lane.catalogue, count=len(rows))
    return Campaign(lane, notes, rows, letters, lane.consumer.metrics.dead_letters)


@pytest.fixture(scope="module")
def campaign(engine: Engine, module_settings: KafkaSettings, custodian: Custodian) -> Campaign:
    return asyncio.run(run_campaign(engine, module_settings, custodian))


# --- the tests ----------------------------------------------------------------------------------


def _leaf_paths(node: Any, path: tuple[str | int, ...] = ()) -> set[tuple[str | int, ...]]:
    """Every member of a wire object, arrays of objects by their first element's members (an
    array of scalars is one member)."""
    if isinstance(node, dict):
        return set().union(*(_leaf_paths(value, (*path, key)) for key, value in node.items()))
    if isinstance(node, list) and node and isinstance(node[0], dict):
        return _leaf_paths(node[0], (*path, 0))
    return {path}


def test_the_tamper_matrix_covers_every_member_of_the_wire_form(custodian: Custodian) -> None:
    writer = StreamWriter(custodian, "x-matrix")
    signed = writer.next(first_holdings()).signed
    covered = {path for path, _, _ in TAMPERS if 1 not in path[2:3]}
    assert _leaf_paths(signed.to_wire()) == covered


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_record_credits_nothing_and_the_partition_moves_on(
    campaign: Campaign, case: Case
) -> None:
    notes = campaign.notes[case.name]
    assert notes.error is None
    # Nothing credited, nothing journaled, the head where it was.
    assert notes.after_bad == notes.before
    assert MALLORY not in notes.after_bad
    assert notes.journal_after_bad == notes.journal_before
    assert notes.head_after_bad == notes.head_before
    # The dead letter, in the table and on the dead-letter topic, with the original bytes.
    expected = [] if case.reason is None else [case.reason]
    assert [reason for offset, reason in campaign.rows if offset in notes.offsets] == expected
    letters = [letter for letter in campaign.letters if letter.offset in notes.offsets]
    assert [letter.reason for letter in letters] == expected
    for letter in letters:
        original = notes.values[letter.offset]
        assert letter.value_size == len(original)
        assert letter.value_sha256 == hashlib.sha256(original).digest()
        assert original.startswith(letter.value)
        assert letter.topic == campaign.lane.catalogue.name(TopicKind.ATTESTATIONS)
    if case.reason is None:
        assert notes.duplicates >= 1  # dropped as a redelivery
    # The partition moved on: the valid statement after it was credited.
    assert notes.head_after_next == notes.next_sequence
    assert notes.after_next == notes.expected_next


def test_the_campaign_credited_exactly_the_valid_statements(
    campaign: Campaign, engine: Engine
) -> None:
    lane = campaign.lane
    last = lane.writer.last
    assert last is not None
    assert statement_sequences(engine, lane.stream) == list(range(1, last.sequence + 1))
    assert lane.positions() == lane.writer.holdings()
    refused = sum(1 for case in CASES if case.reason is not None)
    assert len(campaign.rows) == refused == campaign.metrics_dead_letters
    assert len(campaign.letters) == refused
    # A restart rebuilds the very same ledger from the tables.
    loaded, streams = load_ledger(engine, POLICY, DECIMALS)
    assert loaded.positions().get(lane.stream) == lane.writer.holdings()
    head = streams[lane.stream].head
    assert head is not None
    assert head.digest == last.signed.digest
    status = lane.consumer.margin_ledger.stream_status(lane.stream)
    assert status is not None
    assert (status.frozen, status.awaiting_snapshot_from) == (False, None)
    assert [a for a in list_alerts(engine) if a.stream == lane.stream] == []


# --- refusals that change the stream: a gap, a fork -----------------------------------------------


def _snapshot_requests(engine: Engine, stream: str) -> int:
    with engine.connect() as connection:
        rows = connection.execute(
            select(outbox_table.c.id).where(outbox_table.c.stream == stream)
        ).all()
    return len(rows)


async def test_a_gap_asks_for_a_snapshot_and_waits_for_it(
    engine: Engine, module_settings: KafkaSettings, custodian: Custodian
) -> None:
    lane = make_lane(engine, module_settings, custodian, "gap")
    relay = OutboxRelay(
        engine,
        module_settings,
        catalogue=lane.catalogue,
        poll_interval_s=0.05,
        backoff_initial_s=0.05,
        loss_check_interval_s=3_600.0,
    )
    lane.consumer.relay = relay
    writer = lane.writer
    async with flowing(lane, relay):
        await lane.credit(writer.next(first_holdings()))
        attested = writer.holdings()
        writer.next({("erin", "USDC"): 5})  # 2: never reaches the exchange
        third = writer.next({MALLORY: 10**12})  # 3: arrives after 1
        (offset, *_) = await lane.publish(third.records(lane.catalogue))
        await eventually(lambda: lane.dead_letters() == [(offset, "sequence_gap")])
        status = lane.consumer.margin_ledger.stream_status(lane.stream)
        assert status is not None
        assert status.awaiting_snapshot_from == 2
        assert lane.positions() == attested  # nothing of 3
        # The snapshot request, from the exchange's outbox, on the instructions topic.
        topic = lane.catalogue.name(TopicKind.INSTRUCTIONS)
        ((_, key, value, headers),) = await read_topic(module_settings, topic, count=1)
        request = decode_message(topic, key, value, headers, catalogue=lane.catalogue).body
        assert isinstance(request, SnapshotRequest)
        assert (request.stream, request.from_sequence, request.reason) == (
            lane.stream,
            2,
            "sequence_gap",
        )
        # The stream awaits the snapshot: a delta after the gap is refused too, and the request
        # is not repeated.
        fourth = writer.next({("frank", "BTC"): 7})
        (offset4, *_) = await lane.publish(fourth.records(lane.catalogue))
        await eventually(lambda: (offset4, "sequence_gap") in lane.dead_letters())
        assert lane.positions() == attested
        assert _snapshot_requests(engine, lane.stream) == 1
        # The custodian answers with a snapshot: the exchange resynchronises from it.
        snapshot = writer.next({}, snapshot=True)
        assert snapshot.statement.kind is StatementKind.SNAPSHOT
        await lane.credit(snapshot)
    assert lane.positions() == writer.holdings()
    status = lane.consumer.margin_ledger.stream_status(lane.stream)
    assert status is not None
    assert status.awaiting_snapshot_from is None
    journal = stream_journal(engine, lane.stream)
    assert [
        (e.sequence, e.detail["from"], e.detail["to"]) for e in journal if e.kind == "resync"
    ] == [(5, 2, 4)]
    assert statement_sequences(engine, lane.stream) == [1, 5]


async def _frozen_by(lane: Lane, forged: Entry, *, desk: MarginDesk) -> None:
    """Publish ``forged`` (validly signed, a second history), then check the freeze."""
    before, journal_before = lane.positions(), lane.journal_size()
    (offset, *_) = await lane.publish(forged.records(lane.catalogue))
    await eventually(lambda: lane.dead_letters() == [(offset, "fork")])
    status = lane.consumer.margin_ledger.stream_status(lane.stream)
    assert status is not None
    assert status.frozen
    assert status.frozen_reason is not None
    assert f"fork at sequence {forged.sequence}" in status.frozen_reason
    assert lane.positions() == before
    journal = stream_journal(lane.engine, lane.stream)
    assert [e.kind for e in journal[journal_before:]] == ["freeze"]
    (alert,) = [a for a in list_alerts(lane.engine) if a.stream == lane.stream]
    assert alert.kind == "fork"
    decision = desk.pretrade("alice", add_exposure=1, now=CONSUMER_NOW)
    assert (decision.allowed, decision.reason) == (False, "stream_frozen")


async def _refused_while_frozen(lane: Lane, entry: Entry) -> None:
    before, journal_before = lane.positions(), lane.journal_size()
    rows = len(lane.dead_letters())
    (offset, *_) = await lane.publish(entry.records(lane.catalogue))
    await eventually(lambda: len(lane.dead_letters()) > rows)
    assert lane.dead_letters()[-1] == (offset, "stream_frozen")
    assert lane.positions() == before
    assert lane.journal_size() == journal_before


def _desk(lane: Lane) -> MarginDesk:
    desk = MarginDesk(
        ledger=lane.consumer.margin_ledger,
        engine=lane.engine,
        exchange=lane.writer.exchange,
        signer=p256_signer("exchange"),
        catalogue=lane.catalogue,
    )
    lane.consumer.effect_lock = desk.lock  # one writer at a time, as in the service
    return desk


@pytest.mark.parametrize(
    "where", ["successor of another statement", "second statement at the head"]
)
async def test_a_fork_freezes_the_stream_until_resolved_through_the_desk(
    engine: Engine, module_settings: KafkaSettings, custodian: Custodian, where: str
) -> None:
    lane = make_lane(engine, module_settings, custodian, "fork")
    desk = _desk(lane)
    writer = lane.writer
    async with flowing(lane):
        await lane.credit(writer.next(first_holdings()))
        await lane.credit(writer.next({("erin", "USDC"): 5}))
        if where == "successor of another statement":
            # Sequence 3 extending a statement 2 the exchange never saw.
            forged = writer.propose({MALLORY: 10**12}, previous=hashlib.sha256(b"other").digest())
        else:
            # Another statement 2, validly signed: the custodian equivocates at the head.
            assert writer.last is not None
            forged = writer.propose(
                {MALLORY: 10**12}, sequence=2, previous=writer.last.statement.previous
            )
        await _frozen_by(lane, forged, desk=desk)
        # Whatever arrives now is refused, valid or not, and changes nothing.
        third = writer.next({("frank", "BTC"): 7})
        await _refused_while_frozen(lane, third)
        # An operator resolves the fork through the desk. The custodian's next statement is 4:
        # a gap after 2, so the exchange asks for a snapshot, and the snapshot is credited.
        await asyncio.to_thread(
            desk.resolve,
            lane.stream,
            operator="ops-1",
            reason="custodian confirmed",
            now=CONSUMER_NOW,
        )
        status = lane.consumer.margin_ledger.stream_status(lane.stream)
        assert status is not None
        assert not status.frozen
        fourth = writer.next({("gina", "USDC"): 9})
        (offset, *_) = await lane.publish(fourth.records(lane.catalogue))
        await eventually(lambda: (offset, "sequence_gap") in lane.dead_letters())
        await lane.credit(writer.next({}, snapshot=True))
        await lane.credit(writer.next({("hugo", "BTC"): 11}))
    assert lane.positions() == writer.holdings()
    assert MALLORY not in lane.positions()
    assert statement_sequences(engine, lane.stream) == [1, 2, 5, 6]
    kinds = [e.kind for e in stream_journal(engine, lane.stream) if e.kind in ("freeze", "resolve")]
    assert kinds == ["freeze", "resolve"]
    assert [reason for _, reason in lane.dead_letters()] == [
        "fork",
        "stream_frozen",
        "sequence_gap",
    ]
    assert lane.consumer.exchange_metrics.forks == 1


async def test_an_entry_refused_while_frozen_is_credited_when_delivered_again_after_resolution(
    engine: Engine, module_settings: KafkaSettings, custodian: Custodian
) -> None:
    lane = make_lane(engine, module_settings, custodian, "redeliver")
    desk = _desk(lane)
    writer = lane.writer
    async with flowing(lane):
        await lane.credit(writer.next(first_holdings()))
        forged = writer.propose({MALLORY: 10**12}, previous=hashlib.sha256(b"other").digest())
        await _frozen_by(lane, forged, desk=desk)
        second = writer.next({("erin", "USDC"): 5})
        await _refused_while_frozen(lane, second)
        await asyncio.to_thread(
            desk.resolve, lane.stream, operator="ops-1", reason="resolved", now=CONSUMER_NOW
        )
        # At-least-once delivery: the same entry again, at new offsets.
        await lane.publish(second.records(lane.catalogue))
        await eventually(lambda: lane.head() == second.sequence, timeout_s=3)
    assert lane.positions() == writer.holdings()
