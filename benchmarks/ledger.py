"""Benchmark of the exchange's margin ledger: verified leaf credits into SQLite and PostgreSQL, the
pre-trade check, and pledge-to-credit through the real broker.

    .venv/bin/python benchmarks/ledger.py [--leaves 100000] [--delta 1000] [--pretrade-calls 200000]
                                          [--clients 1000] [--rate 100] [--seconds 10]
                                          [--require-postgres] [--skip-pipeline]

Three measurements, one process:

* **credits**: a signed snapshot statement of ``--leaves`` leaves (two assets, two leaves per
  client) is handed, decoded, with its complete disclosure, to the exchange's
  :class:`~exchange.consumer.AttestationConsumer` ``apply`` inside one transaction - exactly what
  the consumer does for a message off the broker: ``verify_statement`` (signatures, chain, every
  leaf rebuilt into the receiver's trees and compared with the signed roots), the ledger's
  ``plan_statement``, ``persist_statement`` + ``persist_change`` + the notices, commit, then the
  after-commit apply. Then a delta of ``--delta`` changed leaves the same way. Leaves per second
  for each, on SQLite (a temporary file) and on PostgreSQL (127.0.0.1:5432 database ``test``, in a
  fresh schema dropped afterwards; skipped with a note when unreachable unless
  ``--require-postgres``). Each phase is timed by wrapping the functions the consumer calls.
  Named peers, same run: the same leaves inserted one ORM object per row (SQLAlchemy ORM, one
  commit) into a table of the same shape; and, for the delta, re-verifying the whole state from
  scratch (the snapshot's verification time).
* **pre-trade**: a ledger of ``--pretrade-clients`` clients, each with a BTC position on one
  custodian's stream, a USDC position on another's and an exposure report; per-call
  ``time.perf_counter_ns`` of :meth:`MarginLedger.check_pretrade` and of :meth:`MarginDesk.pretrade`
  (the lock-free read the API uses) over many calls with random clients and amounts.
* **pledge-to-credit**: the publishing path of benchmarks/publish.py (embedded Tansu broker,
  SQLite custody book, ``AttestationService`` in its ``run`` loop, ``OutboxRelay``) with the
  exchange's ``AttestationConsumer`` writing through a ``MarginDesk`` (desk mode) as the
  receiver; every client has an exposure report, so every client is a holder whose margin state
  a statement may move (with the price table unchanged, as here, the ledger evaluates the
  clients whose holdings changed). For each pledge: from its commit at the custodian to the
  moment the exchange's ledger shows it (the consumer's transaction committed and the change
  applied in memory).

The garbage collector is tuned as the exchange service tunes it
(:func:`exchange.service.tune_garbage_collector`, once the ledger is loaded).

Human-readable lines first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import random
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from sqlalchemy import Engine, LargeBinary, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from attestations.amounts import Asset, Price
from attestations.canonical import truncate_to_millis
from attestations.disclosure import LeafDisclosure
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.p256 import SoftwareP256Signer
from attestations.signing import BlsCosigner, Cosigner, sign_statement
from attestations.statement import PricePoint, SignedStatement
from attestations.translog import TransparencyLog
from benchmarks.machine import fail, machine_info, package_version
from benchmarks.publish import (
    ASSET,
    CUSTODIAN,
    EXCHANGE,
    PledgeSample,
    _published_at,
    _resolve,
    _wait_for,
    open_custodian,
    open_signer,
    percentile,
    seed_book,
)
from bridge.broker import EmbeddedBroker
from bridge.consumer import AfterCommit, Delivery
from bridge.envelope import decode_message, encode_statement
from bridge.kafka import KafkaSettings
from bridge.topics import TopicCatalogue, TopicKind, compute_stream_key
from custodian.book import Pledge
from custodian.epochs import EpochPlan, EpochState, plan_epoch
from custodian.store import CustodyBook
from exchange import consumer as consumer_module
from exchange.consumer import AttestationConsumer
from exchange.desk import MarginDesk
from exchange.ledger import ExposureReport, MarginLedger, StreamHead, StreamStatus
from exchange.policy import CollateralPolicy
from exchange.service import tune_garbage_collector
from exchange.store import create_exchange_engine, load_ledger, migrate, run_transaction

DECIMALS = {"BTC": 8, "USDC": 6}
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TARGET_CREDITS_PER_S = 50_000
TARGET_PRETRADE_P99_US = 100.0
TARGET_PLEDGE_TO_CREDIT_P99_MS = 100.0
CATALOGUE = TopicCatalogue(prefix="bench.", partitions=dict.fromkeys(TopicKind, 1))
START = truncate_to_millis(datetime.now(UTC))
"""When the synthetic statements are issued; the consumer's clock runs a few seconds later."""


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- credits: a signed snapshot and a delta through the consumer's apply ------------------------


@dataclass
class Custodian:
    """The signing side of the synthetic stream: keys, the registry the exchange trusts, and
    the epoch state that plans the next statement."""

    signer: SoftwareP256Signer = field(
        default_factory=lambda: SoftwareP256Signer(insecure_development_only=True)
    )
    cosigners: list[BlsCosigner] = field(
        default_factory=lambda: [BlsCosigner.from_seed(secrets.token_bytes(32)) for _ in range(3)]
    )
    salt_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    state: EpochState = field(default_factory=lambda: EpochState(CUSTODIAN, EXCHANGE))

    def registry(self) -> KeyRegistry:
        return trust(self.signer.public_key, self.cosigners)

    def next(
        self, pledged: dict[tuple[str, str], int], *, at: datetime
    ) -> tuple[SignedStatement, LeafDisclosure, EpochPlan]:
        prices = (
            PricePoint(Price.parse(asset="BTC", quote="USD", text="64123.45"), "file:bench", at),
            PricePoint(Price.parse(asset="USDC", quote="USD", text="1.0000"), "file:bench", at),
        )
        plan = plan_epoch(
            self.state,
            pledged=pledged,
            decimals=DECIMALS,
            prices=prices,
            salt_secret=self.salt_secret,
            now=at,
            lifetime=timedelta(hours=1),
        )
        digest = plan.statement.compute_digest()
        signed = sign_statement(
            plan.statement,
            custodian_signer=self.signer,
            cosignatures=[cosigner.cosign(digest) for cosigner in self.cosigners[:2]],
        )
        return signed, plan.disclosure, plan


def trust(custodian_key: bytes, cosigners: list[BlsCosigner]) -> KeyRegistry:
    """The exchange's key registry: the custodian's P-256 key and a 2-of-n BLS quorum."""
    registry = KeyRegistry()
    valid_from = START - timedelta(days=1)
    registry.register(KeyRecord(CUSTODIAN, KeyRole.CUSTODIAN, custodian_key, valid_from))
    for index, cosigner in enumerate(cosigners):
        registry.register(
            KeyRecord(
                f"cosigner-{index}",
                KeyRole.COSIGNER,
                cosigner.public_key,
                valid_from,
                proof_of_possession=cosigner.proof_of_possession(),
                signs_for=CUSTODIAN,
            )
        )
    registry.set_quorum(CUSTODIAN, threshold=2)
    return registry


def holdings(leaves: int) -> dict[tuple[str, str], int]:
    """``leaves`` holdings: two per client (BTC and USDC), quantities that differ."""
    assets = sorted(DECIMALS)
    return {(f"client-{i // 2:07d}", assets[i % 2]): 1_000_000 + 37 * i for i in range(leaves)}


class PhaseTimer:
    """Seconds spent in each function the consumer's ``apply`` calls, by wrapping them where
    the consumer looks them up (its module globals; the ledger's method on the instance)."""

    PHASES: ClassVar[dict[str, str]] = {
        "verify_statement": "verify",
        "compute_credited_statement": "plan",
        "persist_statement": "persist",
        "persist_change": "persist",
        "persist_notices": "persist",
    }

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def _wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - started

        return timed

    @contextlib.contextmanager
    def around(self, ledger: MarginLedger) -> Iterator[None]:
        originals = {name: getattr(consumer_module, name) for name in self.PHASES}
        try:
            for name, phase in self.PHASES.items():
                setattr(consumer_module, name, self._wrap(phase, originals[name]))
            ledger.plan_statement = self._wrap("plan", ledger.plan_statement)  # type: ignore[method-assign]
            yield
        finally:
            for name, original in originals.items():
                setattr(consumer_module, name, original)
            del ledger.plan_statement  # the class's method again


def delivery_of(signed: SignedStatement, disclosure: LeafDisclosure, offset: int) -> Delivery:
    """What the bridge consumer hands ``apply`` once a statement and its chunks arrived."""
    record = encode_statement(signed, catalogue=CATALOGUE)
    message = decode_message(
        record.topic, record.key, record.value, list(record.headers), catalogue=CATALOGUE
    )
    statement = signed.statement
    return Delivery(
        message=message,
        disclosure=disclosure,
        stream=compute_stream_key(custodian=statement.custodian, exchange=statement.exchange),
        sequence=statement.sequence,
        topic=record.topic,
        partition=0,
        offset=offset,
    )


def credit_once(
    consumer: AttestationConsumer, delivery: Delivery, *, leaves: int
) -> dict[str, Any]:
    """One statement through the consumer's apply, commit and after-commit step, timed."""
    timer = PhaseTimer()
    engine = consumer.engine
    gc.collect()
    started = time.perf_counter()
    with timer.around(consumer.margin_ledger):

        def work(session: Session) -> AfterCommit | None:
            return consumer.apply(session, delivery)

        after = run_transaction(engine, work, what="crediting a statement")
    committed = time.perf_counter()
    if after is not None:
        after()
    finished = time.perf_counter()
    total = finished - started
    spent = timer.spent
    in_transaction = committed - started
    return {
        "leaves": leaves,
        "total_s": total,
        "leaves_per_s": leaves / total,
        "verify_s": spent.get("verify", 0.0),
        "plan_s": spent.get("plan", 0.0),
        "persist_s": spent.get("persist", 0.0),
        # Session set-up, BEGIN and COMMIT (with the fsync): the rest of the transaction.
        "commit_s": in_transaction - sum(spent.values()),
        "apply_s": finished - committed,
    }


def open_consumer(
    engine: Engine, registry: KeyRegistry, *, clock_at: datetime
) -> AttestationConsumer:
    return AttestationConsumer.open(
        engine,
        # Never connected: apply is called directly.
        KafkaSettings(bootstrap_servers="127.0.0.1:9", client_id="bench-ledger"),
        exchange=EXCHANGE,
        custodians=[CUSTODIAN],
        registry=registry,
        decimals=DECIMALS,
        policy=CollateralPolicy.default(),
        catalogue=CATALOGUE,
        clock=lambda: clock_at,
    )


def run_credits(engine: Engine, *, leaves: int, delta: int) -> dict[str, Any]:
    """A snapshot of ``leaves`` leaves, then a delta of ``delta`` changed leaves, credited on
    ``engine`` (already migrated and empty)."""
    custodian = Custodian()
    pledged = holdings(leaves)
    signed, disclosure, plan = custodian.next(pledged, at=START)
    plan.commit()
    changed = dict(pledged)
    for holding in random.Random(7).sample(sorted(pledged), delta):
        changed[holding] += 1
    delta_signed, delta_disclosure, delta_plan = custodian.next(
        changed, at=START + timedelta(seconds=1)
    )
    delta_plan.commit()
    consumer = open_consumer(engine, custodian.registry(), clock_at=START + timedelta(seconds=5))
    tune_garbage_collector()  # as the exchange service does once its ledger is loaded
    snapshot = credit_once(consumer, delivery_of(signed, disclosure, 0), leaves=leaves)
    moved = credit_once(
        consumer,
        delivery_of(delta_signed, delta_disclosure, 1),
        leaves=len(delta_disclosure.set_leaves),
    )
    credited = consumer.margin_ledger.positions()[
        compute_stream_key(custodian=CUSTODIAN, exchange=EXCHANGE)
    ]
    if credited != changed:
        fail("the ledger's positions differ from the holdings the statements attest")
    # The ledger the tables rebuild (leaves checked against the signed roots) is the same.
    restored, _ = load_ledger(engine, CollateralPolicy.default(), DECIMALS)
    if restored.state() != consumer.margin_ledger.state():
        fail("the ledger rebuilt from the tables differs from the one in memory")
    return {"snapshot": snapshot, "delta": moved}


class _Base(DeclarativeBase):
    pass


class NaiveLeaf(_Base):
    """The peer's table: the shape of ``exchange_leaves``, written one ORM object per row."""

    __tablename__ = "naive_leaves"
    stream: Mapped[str] = mapped_column(String(300), primary_key=True)
    asset: Mapped[str] = mapped_column(String(16), primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    account: Mapped[str] = mapped_column(String(128))
    salt: Mapped[bytes] = mapped_column(LargeBinary)
    quantity: Mapped[str] = mapped_column(String(40))


def run_naive_orm(url: str, disclosure: LeafDisclosure) -> float:
    """Seconds to insert the disclosure's leaves one ORM object per row, one commit."""
    engine = create_engine(url)
    try:
        _Base.metadata.create_all(engine)
        stream = compute_stream_key(custodian=CUSTODIAN, exchange=EXCHANGE)
        gc.collect()
        started = time.perf_counter()
        with Session(engine) as session, session.begin():
            for leaf in disclosure.set_leaves:
                session.add(
                    NaiveLeaf(
                        stream=stream,
                        asset=leaf.asset,
                        position=leaf.position,
                        account=leaf.account,
                        salt=leaf.salt,
                        quantity=str(leaf.quantity),
                    )
                )
        return time.perf_counter() - started
    finally:
        engine.dispose()


@contextlib.contextmanager
def postgres_schema(*, required: bool) -> Iterator[str | None]:
    """A fresh schema in the ``test`` database, dropped afterwards; None when unreachable."""
    conninfo = "postgresql://postgres@127.0.0.1:5432/test"
    try:
        with psycopg.connect(conninfo, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        if required:
            fail(f"PostgreSQL at 127.0.0.1:5432/test is unreachable: {exc}")
        print(f"  postgres          skipped: 127.0.0.1:5432/test unreachable ({exc})")
        yield None
        return
    schema = f"mcb_bench_{secrets.token_hex(6)}"
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")  # random hex: nothing to escape
    try:
        yield f"{POSTGRES_URL}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def credits_on(url: str, *, leaves: int, delta: int) -> dict[str, Any]:
    engine = create_exchange_engine(url)
    try:
        migrate(engine)
        return run_credits(engine, leaves=leaves, delta=delta)
    finally:
        engine.dispose()


def print_credits(backend: str, result: dict[str, Any]) -> None:
    for name in ("snapshot", "delta"):
        r = result[name]
        print(
            f"  {backend:<8} {name:<8} {r['leaves']:>8,} leaves in {_ms(r['total_s']):>8} ms "
            f"= {r['leaves_per_s']:>9,.0f} leaves/s  (verify {_ms(r['verify_s'])}, plan "
            f"{_ms(r['plan_s'])}, persist {_ms(r['persist_s'])}, commit {_ms(r['commit_s'])}, "
            f"apply {_ms(r['apply_s'])} ms)"
        )


# --- pre-trade ----------------------------------------------------------------------------------


def pretrade_ledger(clients: int, *, now: datetime) -> MarginLedger:
    """``clients`` clients, each with BTC on bank-a's stream, USDC on bank-b's and an exposure
    report; streams fresh at ``now``."""
    streams = [f"bank-a/{EXCHANGE}", f"bank-b/{EXCHANGE}"]
    statuses = [
        StreamStatus(
            StreamHead(
                stream=stream,
                custodian=stream.split("/", 1)[0],
                sequence=1,
                digest=bytes([index + 1]) * 32,
                kind="snapshot",
                issued_at=now - timedelta(seconds=10),
                expires_at=now + timedelta(hours=1),
            ),
            False,
            None,
            None,
        )
        for index, stream in enumerate(streams)
    ]
    names = [f"client-{i:06d}" for i in range(clients)]
    positions = {
        streams[0]: {(name, "BTC"): 10_000_000 + i for i, name in enumerate(names)},
        streams[1]: {(name, "USDC"): 5_000_000_000 + i for i, name in enumerate(names)},
    }
    prices = {
        streams[0]: {"BTC": Price.parse(asset="BTC", quote="USD", text="64123.45")},
        streams[1]: {"USDC": Price.parse(asset="USDC", quote="USD", text="1.0000")},
    }
    exposures = [
        ExposureReport(
            client=name,
            report_id=f"r-{name}",
            reported_at=now - timedelta(seconds=1),
            exposure=20_000 * (i % 50),
            requirement=10_000 * (i % 50),
            unrealised_pnl=-(i % 7) * 1_000,
        )
        for i, name in enumerate(names)
    ]
    return MarginLedger.restore(
        CollateralPolicy.default(),
        decimals=DECIMALS,
        streams=statuses,
        positions=positions,
        prices=prices,
        exposures=exposures,
        margins=[],
    )


def time_calls(call: Callable[[str, int], object], queries: list[tuple[str, int]]) -> list[int]:
    samples: list[int] = []
    clock = time.perf_counter_ns
    for client, amount in queries:
        started = clock()
        call(client, amount)
        samples.append(clock() - started)
    return samples


def run_pretrade(clients: int, calls: int, engine: Engine) -> dict[str, Any]:
    now = START
    ledger = pretrade_ledger(clients, now=now)
    tune_garbage_collector()
    desk = MarginDesk(
        ledger=ledger,
        engine=engine,
        exchange=EXCHANGE,
        signer=SoftwareP256Signer(insecure_development_only=True),
    )
    rng = random.Random(11)
    names = ledger.clients()
    # Amounts from nothing to well beyond the headroom: allowed and refused answers both.
    queries = [(rng.choice(names), rng.randrange(0, 3_000_000)) for _ in range(calls)]
    allowed = sum(
        ledger.check_pretrade(c, add_exposure=a, now=now).allowed for c, a in queries[:10_000]
    )

    def ledger_call(client: str, amount: int) -> object:
        return ledger.check_pretrade(client, add_exposure=amount, now=now)

    def desk_call(client: str, amount: int) -> object:
        return desk.pretrade(client, add_exposure=amount, now=now)

    time_calls(ledger_call, queries[: calls // 10])  # warm-up
    ledger_ns = time_calls(ledger_call, queries)
    desk_ns = time_calls(desk_call, queries)
    result: dict[str, Any] = {
        "clients": clients,
        "calls": calls,
        "allowed_fraction": round(allowed / min(calls, 10_000), 3),
    }
    for name, samples in (("ledger", ledger_ns), ("desk", desk_ns)):
        us = [ns / 1000 for ns in samples]
        result[name] = {
            "p50_us": round(percentile(us, 0.50), 2),
            "p99_us": round(percentile(us, 0.99), 2),
            "p999_us": round(percentile(us, 0.999), 2),
            "max_us": round(max(us), 1),
            "calls_per_s": round(len(us) / (sum(us) / 1e6)),
        }
    return result


# --- pledge to credit through the broker --------------------------------------------------------


@dataclass
class TimedCredit(AttestationConsumer):
    """The exchange's attestation consumer, noting when each statement's credit was applied to
    the ledger (after its transaction committed) and the quantities it disclosed."""

    credited_at: list[tuple[int, float, dict[tuple[str, str], int]]] = field(default_factory=list)
    effect_s: list[float] = field(default_factory=list)
    """Per statement: from the start of ``apply`` (inside the transaction) to the applied
    ledger change - the exchange's own share of the latency."""

    def apply(self, session: Session, delivery: Delivery) -> AfterCommit | None:
        started = time.perf_counter()
        after = super().apply(session, delivery)
        sequence = delivery.statement.statement.sequence
        disclosure = delivery.disclosure
        leaves = (
            {}
            if disclosure is None
            else {(leaf.account, leaf.asset): leaf.quantity for leaf in disclosure.set_leaves}
        )

        def timed() -> None:
            if after is not None:
                after()
            moment = time.perf_counter()
            self.credited_at.append((sequence, moment, leaves))
            self.effect_s.append(moment - started)

        return timed


async def run_pipeline(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:  # noqa: PLR0915
    clients = [f"client-{i:06d}" for i in range(args.clients)]
    signer = open_signer(workdir, softhsm=False)
    keys = [BlsCosigner.from_seed(secrets.token_bytes(32)) for _ in range(3)]
    cosigners = [Cosigner(key) for key in keys]
    assets = [Asset(code, decimals) for code, decimals in DECIMALS.items()]
    policy = CollateralPolicy.default()
    with (
        EmbeddedBroker() as broker,
        CustodyBook.open(f"sqlite:///{workdir / 'custodian.sqlite3'}", assets=assets) as book,
        TransparencyLog(workdir / "translog.sqlite3") as log,
    ):
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, client_id="bench")
        relay, service = open_custodian(
            book, log, settings, signer=signer, cosigners=cosigners, catalogue=CATALOGUE
        )
        t = time.perf_counter()
        seeded_sequence = await asyncio.to_thread(seed_book, book, service, clients)
        pledged = dict.fromkeys(clients, 1)
        print(
            f"  seeded            {len(clients):,} clients, statements #1..#{seeded_sequence}, "
            f"in {time.perf_counter() - t:.1f} s"
        )
        engine = create_exchange_engine(f"sqlite:///{workdir / 'exchange.sqlite3'}")
        migrate(engine)
        ledger, streams = load_ledger(engine, policy, DECIMALS)
        tune_garbage_collector()
        desk = MarginDesk(ledger=ledger, engine=engine, exchange=EXCHANGE, signer=signer)
        consumer = TimedCredit.open(
            engine,
            settings,
            exchange=EXCHANGE,
            custodians=[CUSTODIAN],
            registry=trust(signer.public_key, keys),
            decimals=DECIMALS,
            policy=policy,
            catalogue=CATALOGUE,
            migrate_schema=False,
            # Desk mode: the desk's lock and ledger, its staging (signed notices in the
            # outbox) and its consistent-read counter around every apply.
            desk=desk,
            streams=streams,
        )
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(relay.run(stop)),
            asyncio.create_task(consumer.run(stop)),
            asyncio.create_task(service.run(stop, debounce_s=args.debounce_ms / 1000)),
        ]
        try:
            await _wait_for(
                lambda: any(seq >= seeded_sequence for seq, _, _ in consumer.credited_at),
                what="the seeded statements at the exchange",
            )
            # Every client trades: each statement may move any holder's margin state.
            now = datetime.now(UTC)
            for index, client in enumerate(clients):
                report = ExposureReport(
                    client=client,
                    report_id=f"bench-{client}",
                    reported_at=truncate_to_millis(now),
                    # Exposed (so re-evaluated by every statement) but without a margin
                    # requirement: the seeded pledges are worth less than a cent, and clients in
                    # margin call would make this a benchmark of notices.
                    exposure=1 + index % 3,
                    requirement=0,
                    unrealised_pnl=0,
                )
                await asyncio.to_thread(desk.submit_exposure, report, now=now)
            await asyncio.sleep(0.5)  # the service's start-up epoch
            first_sequence = service.state.sequence
            print(f"  exposures         {len(clients):,} reported; measuring")

            samples: list[PledgeSample] = []
            total = int(args.rate * args.seconds)
            started = time.perf_counter()
            for index in range(total):
                delay = started + index / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                client = clients[index % len(clients)]
                command = Pledge(f"bench-{index}", client, ASSET, EXCHANGE, 1)
                await asyncio.to_thread(book.apply, command)
                committed_at = time.perf_counter()
                service.notify_change()
                pledged[client] += 1
                samples.append(PledgeSample(client, pledged[client], committed_at))
            pledging_s = time.perf_counter() - started
            last_sequence = service.state.sequence

            def resolved() -> bool:
                _resolve(samples, consumer.credited_at)
                return all(sample.sequence is not None for sample in samples)

            await _wait_for(resolved, what="every pledge credited at the exchange", timeout_s=30.0)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        # What the exchange's ledger shows, through the desk, is what the custodian's book holds.
        stream = compute_stream_key(custodian=CUSTODIAN, exchange=EXCHANGE)
        if desk.ledger.positions().get(stream) != book.pledged(EXCHANGE):
            fail("the exchange's positions differ from the custodian's pledged holdings")
        status = desk.status(clients[0], now=datetime.now(UTC))
        if status is None or [p.quantity for p in status.positions] != [pledged[clients[0]]]:
            fail("the desk does not show the first client's pledged position")
        dead_letters = consumer.metrics.dead_letters
        published_at = _published_at(book, relay)
        engine.dispose()

    credited_at = {sequence: moment for sequence, moment, _ in consumer.credited_at}
    latency_ms = [
        (credited_at[s.sequence] - s.committed_at) * 1000 for s in samples if s.sequence is not None
    ]
    publish_ms = [
        (published_at[s.sequence] - s.committed_at) * 1000
        for s in samples
        if s.sequence is not None and s.sequence in published_at
    ]
    effect_ms = [seconds * 1000 for seconds in consumer.effect_s]
    return {
        "pledges": len(samples),
        "achieved_rate": round(len(samples) / pledging_s, 1),
        "clients": args.clients,
        "debounce_ms": args.debounce_ms,
        "statements": last_sequence - first_sequence,
        "pledges_per_statement": round(
            len(samples) / max(1, len({s.sequence for s in samples})), 2
        ),
        "p50_ms": round(percentile(latency_ms, 0.50), 2),
        "p99_ms": round(percentile(latency_ms, 0.99), 2),
        "max_ms": round(max(latency_ms), 2),
        "pledge_to_publish_p50_ms": round(percentile(publish_ms, 0.50), 2),
        "pledge_to_publish_p99_ms": round(percentile(publish_ms, 0.99), 2),
        "exchange_effect_p50_ms": round(percentile(effect_ms, 0.50), 2),
        "exchange_effect_p99_ms": round(percentile(effect_ms, 0.99), 2),
        "dead_letters": dead_letters,
    }


# --- main ---------------------------------------------------------------------------------------


def main() -> None:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--leaves", type=int, default=100_000, help="leaves in the snapshot")
    parser.add_argument("--delta", type=int, default=1_000, help="leaves changed by the delta")
    parser.add_argument("--pretrade-clients", type=int, default=10_000)
    parser.add_argument("--pretrade-calls", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=1000, help="clients of the pledge run")
    parser.add_argument("--rate", type=float, default=100.0, help="pledges per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="pledging duration")
    parser.add_argument("--debounce-ms", type=float, default=5.0, help="the service's debounce")
    parser.add_argument("--require-postgres", action="store_true")
    parser.add_argument(
        "--skip-pipeline", action="store_true", help="leave out the pledge-to-credit run"
    )
    args = parser.parse_args()
    if args.leaves < 2 or not 1 <= args.delta <= args.leaves:
        parser.error("--leaves must be >= 2 and --delta in 1..leaves")
    if args.pretrade_clients < 1 or args.pretrade_calls < 100:
        parser.error("--pretrade-clients >= 1, --pretrade-calls >= 100")
    if args.rate <= 0 or args.seconds <= 0 or args.clients < 1 or args.debounce_ms < 0:
        parser.error("--rate and --seconds must be positive, --clients >= 1, --debounce-ms >= 0")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # The in-memory development signers warn once each; this benchmark means to use them.
    logging.getLogger("attestations.p256").setLevel(logging.ERROR)

    print(
        f"ledger: verified credits of a {args.leaves:,}-leaf snapshot and a {args.delta:,}-leaf "
        f"delta; pre-trade over {args.pretrade_clients:,} clients; pledge-to-credit at "
        f"{args.rate:g}/s for {args.seconds:g} s"
    )
    result: dict[str, Any] = {"leaves": args.leaves, "delta": args.delta}
    with tempfile.TemporaryDirectory(prefix="mcb-bench-ledger-") as tmp:
        workdir = Path(tmp)
        sqlite_result = credits_on(
            f"sqlite:///{workdir / 'credits.sqlite3'}", leaves=args.leaves, delta=args.delta
        )
        print_credits("sqlite", sqlite_result)
        with postgres_schema(required=args.require_postgres) as pg_url:
            pg_result = (
                None if pg_url is None else credits_on(pg_url, leaves=args.leaves, delta=args.delta)
            )
            if pg_result is not None:
                print_credits("postgres", pg_result)
            # The naive peer, on the same leaves.
            custodian = Custodian()
            _, disclosure, _ = custodian.next(holdings(args.leaves), at=START)
            naive_sqlite_s = run_naive_orm(f"sqlite:///{workdir / 'naive.sqlite3'}", disclosure)
            naive_pg_s = None if pg_url is None else run_naive_orm(pg_url, disclosure)

        snapshot = sqlite_result["snapshot"]
        delta = sqlite_result["delta"]
        naive_per_s = args.leaves / naive_sqlite_s
        print(
            f"  peer: naive ORM  {args.leaves:,} leaves inserted one SQLAlchemy ORM object per row "
            f"(no verification, no ledger): SQLite {_ms(naive_sqlite_s)} ms = "
            f"{naive_per_s:,.0f} rows/s"
            + ("" if naive_pg_s is None else f", PostgreSQL {_ms(naive_pg_s)} ms")
        )
        print(
            f"  ratio            verified credits / naive ORM insert (SQLite): "
            f"{snapshot['leaves_per_s'] / naive_per_s:.2f}x; our persist step alone "
            f"{naive_sqlite_s / snapshot['persist_s']:.2f}x faster than the naive insert"
        )
        full_over_delta = snapshot["verify_s"] / delta["verify_s"]
        print(
            f"  ratio            delta verify vs re-verifying all {args.leaves:,} leaves from "
            f"scratch: {full_over_delta:.0f}x faster"
        )

        pretrade = run_pretrade(
            args.pretrade_clients,
            args.pretrade_calls,
            create_exchange_engine(f"sqlite:///{workdir / 'pretrade.sqlite3'}"),
        )
        for name in ("ledger", "desk"):
            p = pretrade[name]
            print(
                f"  pre-trade {name:<7} p50 {p['p50_us']} us, p99 {p['p99_us']} us, p99.9 "
                f"{p['p999_us']} us, max {p['max_us']} us, {p['calls_per_s']:,} calls/s "
                f"({pretrade['calls']:,} calls, {pretrade['clients']:,} clients, "
                f"{pretrade['allowed_fraction']:.0%} allowed)"
            )

        pipeline = None
        if not args.skip_pipeline:
            pipeline = asyncio.run(run_pipeline(args, workdir))
            print(
                f"  pledge->credit   p50 {pipeline['p50_ms']} ms, p99 {pipeline['p99_ms']} ms, "
                f"max {pipeline['max_ms']} ms ({pipeline['pledges']:,} pledges at "
                f"{pipeline['achieved_rate']}/s, {pipeline['statements']} statements, "
                f"{pipeline['pledges_per_statement']} pledges each, "
                f"{pipeline['dead_letters']} dead letters)"
            )
            print(
                f"    of which       pledge->published by the relay p50 "
                f"{pipeline['pledge_to_publish_p50_ms']} ms, p99 "
                f"{pipeline['pledge_to_publish_p99_ms']} ms; the exchange's apply + commit + "
                f"apply per statement p50 {pipeline['exchange_effect_p50_ms']} ms, p99 "
                f"{pipeline['exchange_effect_p99_ms']} ms"
            )

    credits_sqlite = round(snapshot["leaves_per_s"])
    credits_pg = None if pg_result is None else round(pg_result["snapshot"]["leaves_per_s"])
    pretrade_p99 = pretrade["desk"]["p99_us"]
    pledge_p99 = None if pipeline is None else pipeline["p99_ms"]
    targets = {
        "credits_per_s_sqlite": {
            "target": f">= {TARGET_CREDITS_PER_S}",
            "met": credits_sqlite >= TARGET_CREDITS_PER_S,
        },
        "pretrade_p99_us": {
            "target": f"< {TARGET_PRETRADE_P99_US:g}",
            "met": pretrade_p99 < TARGET_PRETRADE_P99_US,
        },
        "pledge_to_credit_p99_ms": {
            "target": f"< {TARGET_PLEDGE_TO_CREDIT_P99_MS:g}",
            "met": None if pledge_p99 is None else pledge_p99 < TARGET_PLEDGE_TO_CREDIT_P99_MS,
        },
    }
    for name, target in targets.items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        print(f"  target           {name} {target['target']}: {verdict}")

    def rounded(phases: dict[str, Any]) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in phases.items()}

    result.update(
        {
            "credits_per_s_sqlite": credits_sqlite,
            "credits_per_s_postgres": credits_pg,
            "delta_credits_per_s_sqlite": round(delta["leaves_per_s"]),
            "delta_credits_per_s_postgres": (
                None if pg_result is None else round(pg_result["delta"]["leaves_per_s"])
            ),
            "phases_sqlite": {k: rounded(v) for k, v in sqlite_result.items()},
            "phases_postgres": (
                None if pg_result is None else {k: rounded(v) for k, v in pg_result.items()}
            ),
            "naive_orm_rows_per_s_sqlite": round(naive_per_s),
            "naive_orm_s_postgres": None if naive_pg_s is None else round(naive_pg_s, 3),
            "credits_vs_naive_orm_sqlite": round(snapshot["leaves_per_s"] / naive_per_s, 2),
            "delta_verify_speedup_vs_full": round(full_over_delta, 1),
            "pretrade_p50_us": pretrade["desk"]["p50_us"],
            "pretrade_p99_us": pretrade_p99,
            "pretrade": pretrade,
            "pledge_to_credit_p50_ms": None if pipeline is None else pipeline["p50_ms"],
            "pledge_to_credit_p99_ms": pledge_p99,
            "pledge_to_credit": pipeline,
            "targets": targets,
            **machine_info(
                sqlite=sqlite3.sqlite_version,
                sqlalchemy=package_version("sqlalchemy"),
                psycopg=package_version("psycopg"),
                milagro=package_version("milagro-bls-binding"),
            ),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
