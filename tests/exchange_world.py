"""What the exchange consumer's adversarial, crash and rebalance tests share: a custodian that
signs with real keys (software P-256 and BLS co-signers registered in a key registry with
proofs of possession), a stream writer that builds snapshots and deltas with their leaf
disclosures, the records the real encoders make of them (and raw records for bodies no encoder
would write), and read-backs of what the exchange's database and the dead-letter topic hold.

The writer is a pure model of the custodian's side: :meth:`StreamWriter.propose` builds the
next statement without changing the writer, :meth:`StreamWriter.accept` makes it the stream's
last. A test can therefore sign any number of bad candidates at one sequence and still publish
the good one afterwards. ``writer.holdings()`` is what the accepted statements attest, the
figure the exchange's credited positions must equal.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from sqlalchemy import Engine, text

from attestations.amounts import Price
from attestations.canonical import compute_canonical_bytes
from attestations.disclosure import ClearedSlot, DisclosedLeaf, LeafDisclosure
from attestations.disclosure import compute_asset_roots as roots_of
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.merkle import SumTree
from attestations.p256 import SoftwareP256Signer
from attestations.signing import BlsCosigner, sign_statement
from attestations.statement import (
    GENESIS_PREVIOUS,
    AssetRoot,
    SignedStatement,
    Statement,
    StatementKind,
)
from bridge.chunks import encode_disclosure
from bridge.envelope import (
    DeadLetter,
    OutboundMessage,
    compute_message_id,
    decode_message,
    encode_statement,
)
from bridge.kafka import KafkaSettings, open_consumer
from bridge.outbox import run_transaction
from bridge.topics import TopicCatalogue, TopicKind
from exchange.desk import MarginDesk
from exchange.ledger import CreditedStatement, JournalEntry, StreamHead
from exchange.policy import CollateralPolicy
from exchange.store import journal_page
from tests.databases import POSTGRES_URL, SCHEMA_PREFIX
from tests.outbox_worker import catalogue_for
from tests.world import DECIMALS, NOW, sample_prices, seed

POLICY = CollateralPolicy.default()
CONSUMER_NOW = NOW + timedelta(seconds=30)
"""The exchange's clock in these tests. Statements are issued from NOW on, a second apart, and
live an hour, so every one the writer makes is fresh at this instant."""
QUORUM = 2
STEP = timedelta(milliseconds=100)
"""Between two statements of a writer: a stream of hundreds stays well before CONSUMER_NOW."""


def credit_snapshot(
    desk: MarginDesk,
    held: Mapping[tuple[str, str], int],
    *,
    stream: str,
    at: datetime,
    sequence: int = 1,
    valid_for: timedelta = timedelta(hours=1),
) -> None:
    """Credit ``desk``'s ledger with a snapshot of ``stream`` (custodian/exchange) issued ``at``
    that holds ``held`` (BTC at 60000.00 USD), as the attestation consumer does: planned under
    the desk's lock, staged in one transaction, applied after the commit. The statement is not
    verified here: its digest is a placeholder."""
    custodian = stream.split("/", maxsplit=1)[0]
    head = StreamHead(
        stream=stream,
        custodian=custodian,
        sequence=sequence,
        digest=bytes([sequence]) * 32,
        kind="snapshot",
        issued_at=at,
        expires_at=at + valid_for,
    )
    statement = CreditedStatement(
        stream=stream,
        custodian=custodian,
        head=head,
        changed=dict(held),
        snapshot=True,
        prices={"BTC": Price.parse(asset="BTC", quote="USD", text="60000.00")},
    )
    with desk.lock:
        change = desk.ledger.plan_statement(statement, now=at)
        after, _ = run_transaction(desk.engine, lambda s: desk.stage(s, change), what="credit")
        after()


def new_catalogue() -> TopicCatalogue:
    """Topics of the test's own (one partition each): a fresh stream of records."""
    return catalogue_for(f"t{secrets.token_hex(5)}.")


def new_exchange(label: str) -> str:
    """A fresh exchange id: its stream, consumer progress and dead letters are the test's own,
    even in a database other tests of the module write too."""
    return f"x-{label}-{secrets.token_hex(3)}"


# --- keys ---------------------------------------------------------------------------------------


def p256_signer(label: str) -> SoftwareP256Signer:
    scalar = int.from_bytes(seed(label), "big") % (2**255)
    return SoftwareP256Signer(
        insecure_development_only=True, private_scalar=scalar.to_bytes(32, "big")
    )


@dataclass
class Custodian:
    """A custodian's signing keys, registered in ``registry``: its P-256 key and three BLS
    co-signers (distinct parties), quorum 2. ``revoked`` is a second custodian key, revoked
    before anything the tests date, so a statement it signs is refused as ``revoked_key``."""

    name: str
    registry: KeyRegistry
    signer: SoftwareP256Signer = field(init=False)
    cosigners: list[BlsCosigner] = field(init=False)
    revoked: SoftwareP256Signer = field(init=False)

    def __post_init__(self) -> None:
        valid_from = NOW - timedelta(days=30)
        self.signer = p256_signer(f"{self.name}-custodian")
        self.revoked = p256_signer(f"{self.name}-revoked")
        self.cosigners = [
            BlsCosigner.from_seed(seed(f"{self.name}-cosigner-{i}")) for i in range(3)
        ]
        self.registry.register(
            KeyRecord(self.name, KeyRole.CUSTODIAN, self.signer.public_key, valid_from)
        )
        self.registry.register(
            KeyRecord(
                self.name,
                KeyRole.CUSTODIAN,
                self.revoked.public_key,
                valid_from,
                revoked_at=NOW - timedelta(minutes=1),
            )
        )
        for index, cosigner in enumerate(self.cosigners):
            self.registry.register(
                KeyRecord(
                    f"{self.name}-cosigner-{index}",
                    KeyRole.COSIGNER,
                    cosigner.public_key,
                    valid_from,
                    proof_of_possession=cosigner.proof_of_possession(),
                    signs_for=self.name,
                )
            )
        self.registry.set_quorum(self.name, threshold=QUORUM)

    def sign(
        self,
        statement: Statement,
        *,
        signer: SoftwareP256Signer | None = None,
        cosigners: Sequence[BlsCosigner] | None = None,
        cosigned_digest: bytes | None = None,
    ) -> SignedStatement:
        """Sign ``statement``: by default with the custodian key and the first two co-signers.
        ``cosigned_digest`` makes the co-signers sign another digest (a bad aggregate)."""
        chosen = self.cosigners[:QUORUM] if cosigners is None else list(cosigners)
        digest = statement.compute_digest() if cosigned_digest is None else cosigned_digest
        return sign_statement(
            statement,
            custodian_signer=self.signer if signer is None else signer,
            cosignatures=[cosigner.cosign(digest) for cosigner in chosen],
        )


# --- the stream writer ----------------------------------------------------------------------------


Holding = tuple[str, str]


@dataclass(frozen=True)
class Entry:
    """One statement with its disclosure: what the custodian publishes for one sequence."""

    signed: SignedStatement
    disclosure: LeafDisclosure
    leaves: Mapping[Holding, DisclosedLeaf]
    """Every leaf of the stream once this entry is accepted."""

    @property
    def statement(self) -> Statement:
        return self.signed.statement

    @property
    def sequence(self) -> int:
        return self.signed.statement.sequence

    def records(self, catalogue: TopicCatalogue) -> list[OutboundMessage]:
        return entry_records(self.signed, self.disclosure, catalogue)

    def holdings(self) -> dict[Holding, int]:
        return {holding: leaf.quantity for holding, leaf in self.leaves.items() if leaf.quantity}


@dataclass
class StreamWriter:
    """The custodian's side of one stream (``custodian.name`` -> ``exchange``)."""

    custodian: Custodian
    exchange: str
    last: Entry | None = None
    depths: dict[str, int] = field(default_factory=dict)

    @property
    def stream(self) -> str:
        return f"{self.custodian.name}/{self.exchange}"

    def holdings(self) -> dict[Holding, int]:
        return {} if self.last is None else self.last.holdings()

    def propose(
        self,
        changes: Mapping[Holding, int] | None = None,
        *,
        snapshot: bool = False,
        sign: Callable[[Statement], SignedStatement] | None = None,
        edit: Callable[[Statement], Statement] | None = None,
        sequence: int | None = None,
        previous: bytes | None = None,
    ) -> Entry:
        """The next statement with ``changes`` applied to the holdings (quantity 0: the leaf is
        cleared), signed by ``sign`` (default: the custodian's good signatures). ``edit``
        changes the statement before it is signed; ``sequence``/``previous`` override the chain
        links (a gap, a fork). Changes nothing here: :meth:`accept` does."""
        leaves = dict(self.last.leaves) if self.last is not None else {}
        before = dict(leaves)
        for (account, asset), quantity in (changes or {}).items():
            old = leaves.get((account, asset))
            if quantity == 0:
                leaves.pop((account, asset), None)
                continue
            position = old.position if old is not None else self._free_position(leaves, asset)
            leaves[account, asset] = DisclosedLeaf(
                account, asset, position, seed(f"salt-{account}-{asset}"), quantity
            )
        if sequence is None:
            sequence = 1 if self.last is None else self.last.sequence + 1
        kind = StatementKind.SNAPSHOT if snapshot or self.last is None else StatementKind.DELTA
        trees = self._trees(leaves)
        issued_at = NOW + STEP * sequence
        statement = Statement(
            custodian=self.custodian.name,
            exchange=self.exchange,
            sequence=sequence,
            previous=previous if previous is not None else self._previous(sequence),
            issued_at=issued_at,
            expires_at=issued_at + timedelta(hours=1),
            kind=kind,
            assets=roots_of(trees, decimals=DECIMALS),
            prices=sample_prices(),
        )
        if edit is not None:
            statement = edit(statement)
        signed = (self.custodian.sign if sign is None else sign)(statement)
        if kind is StatementKind.SNAPSHOT:
            disclosure = LeafDisclosure.for_statement(statement, sorted_leaves(leaves.values()))
        else:
            changed = [leaf for key, leaf in leaves.items() if before.get(key) != leaf]
            cleared = [
                ClearedSlot(leaf.asset, leaf.position)
                for key, leaf in before.items()
                if key not in leaves
            ]
            disclosure = LeafDisclosure.for_statement(statement, sorted_leaves(changed), cleared)
        return Entry(signed, disclosure, leaves)

    def accept(self, entry: Entry) -> Entry:
        """``entry`` is now the stream's last statement (the custodian published it)."""
        self.last = entry
        for root in entry.statement.assets:
            self.depths[root.asset] = max(self.depths.get(root.asset, 0), root.depth)
        return entry

    def next(self, changes: Mapping[Holding, int] | None = None, **options: Any) -> Entry:
        return self.accept(self.propose(changes, **options))

    def _previous(self, sequence: int) -> bytes:
        if self.last is None or sequence == 1:
            return GENESIS_PREVIOUS
        return self.last.signed.digest

    def _free_position(self, leaves: Mapping[Holding, DisclosedLeaf], asset: str) -> int:
        taken = {leaf.position for leaf in leaves.values() if leaf.asset == asset}
        if self.last is not None:
            # Positions are stable: a slot emptied earlier is not handed to someone else here.
            taken |= {leaf.position for leaf in self.last.leaves.values() if leaf.asset == asset}
        return next(p for p in range(len(taken) + 1) if p not in taken)

    def _trees(self, leaves: Mapping[Holding, DisclosedLeaf]) -> dict[str, SumTree]:
        by_asset: dict[str, list[DisclosedLeaf]] = {asset: [] for asset in self.depths}
        for leaf in leaves.values():
            by_asset.setdefault(leaf.asset, []).append(leaf)
        trees: dict[str, SumTree] = {}
        for asset, items in sorted(by_asset.items()):
            smallest = SumTree.build(asset, [item.to_leaf() for item in items]).depth
            depth = max(smallest, self.depths.get(asset, 0))
            trees[asset] = SumTree.build(asset, [item.to_leaf() for item in items], depth=depth)
        return trees


def sorted_leaves(leaves: Iterable[DisclosedLeaf]) -> list[DisclosedLeaf]:
    return sorted(leaves, key=lambda leaf: (leaf.asset, leaf.position))


def first_holdings() -> dict[Holding, int]:
    """What the tests' streams start with: five leaves, two assets (BTC at depth 2 holds three
    leaves, so a count can grow by one without exceeding 2**depth)."""
    return {
        ("alice", "BTC"): 150_000_000,
        ("bob", "BTC"): 42,
        ("carol", "BTC"): 7_000_000_000,
        ("alice", "USDC"): 1_000_000_000_000,
        ("dave", "USDC"): 25_000_000,
    }


def replace_root(statement: Statement, asset: str, **changes: Any) -> Statement:
    """``statement`` with the asset root of ``asset`` changed."""
    assets = tuple(
        replace(root, **changes) if root.asset == asset else root for root in statement.assets
    )
    return replace(statement, assets=assets)


def asset_root(statement: Statement, asset: str) -> AssetRoot:
    found = statement.asset_root(asset)
    if found is None:
        raise KeyError(asset)
    return found


# --- records ------------------------------------------------------------------------------------


def entry_records(
    signed: SignedStatement, disclosure: LeafDisclosure, catalogue: TopicCatalogue
) -> list[OutboundMessage]:
    """The statement record and its disclosure's chunk records, in publication order."""
    return [
        encode_statement(signed, catalogue=catalogue),
        *encode_disclosure(disclosure, time=signed.statement.issued_at, catalogue=catalogue),
    ]


def with_value(template: OutboundMessage, value: bytes) -> OutboundMessage:
    """``template`` (a record the real encoder made) carrying ``value`` instead, with its
    ``ce_id`` recomputed: the envelope is intact, only the body is what a test wants it to be
    (a body the encoders refuse to write)."""
    headers = [(name, b"" if name == "ce_id" else data) for name, data in template.headers]
    message_id = compute_message_id(template.key, value, headers).encode("ascii")
    return OutboundMessage(
        topic=template.topic,
        key=template.key,
        value=value,
        headers=tuple((name, message_id if name == "ce_id" else data) for name, data in headers),
    )


def tampered_wire(signed: SignedStatement, path: Sequence[str | int], value: Any) -> dict[str, Any]:
    """The signed statement's wire form with the member at ``path`` set to ``value`` (the
    signatures are not recomputed)."""
    wire = copy.deepcopy(signed.to_wire())
    node: Any = wire
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return wire


def canonical(wire: Mapping[str, Any]) -> bytes:
    return compute_canonical_bytes(wire)


def raw_json(wire: Mapping[str, Any]) -> bytes:
    """RFC 8785-shaped bytes for a wire object the canonical encoder refuses (a negative or
    too large number, a member of the wrong type): sorted members, no whitespace."""
    return json.dumps(wire, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- reading back ---------------------------------------------------------------------------------


def dead_letter_rows(engine: Engine, consumer: str) -> list[tuple[int, str]]:
    """(offset of the refused record, reason) of every dead letter ``consumer`` recorded."""
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                'SELECT "offset", reason FROM consumer_dead_letters '
                "WHERE consumer = :consumer ORDER BY id"
            ),
            {"consumer": consumer},
        ).all()
    return [(int(offset), str(reason)) for offset, reason in rows]


def stream_journal(engine: Engine, stream: str) -> list[JournalEntry]:
    return [entry for _, entry in journal_page(engine, stream=stream, limit=10_000)]


def statement_sequences(engine: Engine, stream: str) -> list[int]:
    """The sequence of every "statement" journal entry of ``stream``, in journal order."""
    return [e.sequence or 0 for e in stream_journal(engine, stream) if e.kind == "statement"]


def credit_entries(engine: Engine, stream: str) -> list[tuple[int | None, str | None, str | None]]:
    """(sequence, client, asset) of every "credit" journal entry of ``stream``."""
    return [
        (e.sequence, e.client, e.asset)
        for e in stream_journal(engine, stream)
        if e.kind == "credit"
    ]


def accepted_digests(engine: Engine, stream: str) -> dict[int, bytes]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT sequence, digest FROM exchange_statement_digests WHERE stream = :stream"),
            {"stream": stream},
        ).all()
    return {int(sequence): bytes(digest) for sequence, digest in rows}


async def dead_letter_records(
    settings: KafkaSettings, catalogue: TopicCatalogue, *, count: int, timeout_s: float = 10
) -> list[DeadLetter]:
    """The first ``count`` dead letters on the catalogue's dead-letter topic, decoded strictly."""
    topic = catalogue.name(TopicKind.DEAD_LETTERS)
    found: list[DeadLetter] = []
    async with open_consumer(settings, group_id=None, topics=[topic]) as consumer:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(found) < count and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for record in records:
                    decoded = decode_message(
                        record.topic,
                        record.key,
                        record.value,
                        list(record.headers),
                        catalogue=catalogue,
                    )
                    assert isinstance(decoded.body, DeadLetter)
                    found.append(decoded.body)
    return found


# --- a database for a whole module ----------------------------------------------------------------


def module_database(backend: str, directory: Path, conninfo: Callable[[], str]) -> Iterator[str]:
    """The URL of an empty database for one test module (the ``database_url`` fixture is per
    test; the adversarial matrix shares one database and gives each case a fresh stream):
    SQLite in ``directory``, or a fresh PostgreSQL schema, dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'exchange.sqlite3'}"
        return
    info = conninfo()
    schema = SCHEMA_PREFIX + secrets.token_hex(6)
    with psycopg.connect(info, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")  # random hex: nothing to escape
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(info, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def timestamp(moment: datetime) -> str:
    from attestations.canonical import format_timestamp

    return format_timestamp(moment)
