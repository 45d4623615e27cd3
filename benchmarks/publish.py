"""Benchmark of the publishing path: pledge committed -> statement acknowledged by the broker ->
statement received by an independent consumer, through the real embedded broker.

    .venv/bin/python benchmarks/publish.py [--rate 100] [--seconds 10] [--clients 1000]
                                           [--debounce-ms 5] [--softhsm]

Set-up, all in one process, in a temporary directory: the embedded Tansu broker; a SQLite custody
book; an :class:`~custodian.service.AttestationService` (in-memory development P-256 signer, or a
SoftHSM2 token with ``--softhsm``; three in-process BLS co-signers, quorum 2) scheduled by its own
``run`` loop with the debounce given; an :class:`~bridge.outbox.OutboxRelay`; and an exchange's
consumer (:class:`~bridge.consumer.ConsumerBase`, its own SQLite database) that decodes each
statement and reassembles its disclosure. Every client has deposited and pledged one unit before
the measurement starts (published in statements of at most 250 new holdings: see
:func:`seed_book`), so each measured statement is a delta over ``--clients`` leaves.

Then ``--rate`` pledges a second for ``--seconds`` seconds, round-robin over the clients, each
followed by ``notify_change()``. For each pledge:

* ``pledge_to_publish``: from the pledge's commit to the moment the relay has every record of the
  first statement that contains it (statement and disclosure chunks) acknowledged by the broker
  and marked sent in the outbox;
* ``pledge_to_consume``: from the commit to the moment the consumer applied that statement.

"Contains it" is decided from what the consumer received: the first statement whose disclosed
quantity of the client's holding reaches the pledged total. Human-readable lines first; the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select
from sqlalchemy.orm import Session

from attestations.amounts import Asset, Price
from attestations.canonical import truncate_to_millis
from attestations.p256 import DigestSigner, SoftwareP256Signer
from attestations.signing import BlsCosigner, Cosigner
from attestations.statement import PricePoint
from attestations.translog import TransparencyLog
from benchmarks.machine import machine_info
from bridge import migrations as bridge_migrations
from bridge.broker import EmbeddedBroker
from bridge.consumer import ConsumerBase, Delivery
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay, create_bridge_engine, outbox_table
from bridge.topics import TopicCatalogue, TopicKind
from custodian.book import Deposit, Pledge
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService
from custodian.store import CustodyBook

CUSTODIAN = "custodian-bank"
EXCHANGE = "exchange-one"
ASSET = "USDC"
DECIMALS = {"BTC": 8, "USDC": 6}
DEPOSIT_UNITS = 10**15
TARGET_P99_MS = 50.0
DRAIN_TIMEOUT_S = 30.0
SEED_BATCH = 250


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure is a measured sample)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


# --- instrumented relay and consumer -------------------------------------------------------------


@dataclass
class TimedRelay(OutboxRelay):
    """The relay, noting when each outbox row was marked sent (after the broker acknowledged it).
    Wraps the relay's one marking step; nothing else changes."""

    sent_at: dict[int, float] = field(default_factory=dict)

    def _mark_sent(self, acked: Sequence[Any]) -> None:
        super()._mark_sent(acked)
        moment = time.perf_counter()
        for item in acked:
            self.sent_at.setdefault(int(item.id), moment)


@dataclass
class TimedExchange(ConsumerBase):
    """The exchange's consumer: decodes each statement and its reassembled disclosure and notes
    when it applied it and which quantities it disclosed."""

    received: list[tuple[int, float, dict[tuple[str, str], int]]] = field(default_factory=list)

    def apply(self, session: Session, delivery: Delivery) -> None:
        del session
        statement = delivery.statement
        disclosure = delivery.disclosure
        leaves = (
            {}
            if disclosure is None
            else {(leaf.account, leaf.asset): leaf.quantity for leaf in disclosure.set_leaves}
        )
        self.received.append((statement.statement.sequence, time.perf_counter(), leaves))


# --- the run -------------------------------------------------------------------------------------


@dataclass
class PledgeSample:
    client: str
    target: int
    """The client's pledged total once this pledge is committed."""
    committed_at: float
    sequence: int | None = None


def open_signer(workdir: Path, *, softhsm: bool) -> DigestSigner:
    if not softhsm:
        return SoftwareP256Signer(insecure_development_only=True)
    from mcb.demo import open_signers

    # The token stays open until the process exits (the stack is never unwound: a benchmark run
    # is one process).
    keys = open_signers(workdir, software_key=False, say=print, stack=contextlib.ExitStack())
    return keys.custodian


def sample_prices(now: datetime) -> StaticPriceSource:
    # Valid for the whole run: a price source is not what this measures.
    moment = truncate_to_millis(now)
    return StaticPriceSource(
        (
            PricePoint(
                Price.parse(asset="BTC", quote="USD", text="64123.45"), "file:bench", moment
            ),
            PricePoint(Price.parse(asset="USDC", quote="USD", text="1.0000"), "file:bench", moment),
        )
    )


def open_custodian(
    book: CustodyBook,
    log: TransparencyLog,
    settings: KafkaSettings,
    *,
    signer: DigestSigner,
    cosigners: list[Cosigner],
    catalogue: TopicCatalogue,
) -> tuple[TimedRelay, AttestationService]:
    """The custodian side every pipeline benchmark measures: the timed outbox relay and the
    attestation service on ``book`` (quorum 2, fixed prices, whole-millisecond clock)."""
    relay = TimedRelay(book.engine, settings, catalogue=catalogue, loss_check_interval_s=3600.0)
    service = AttestationService.open(
        book,
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        signer=signer,
        cosigners=cosigners,
        quorum=2,
        salt_secret=secrets.token_bytes(32),
        decimals=DECIMALS,
        prices=sample_prices(datetime.now(UTC)),
        log=log,
        relay=relay,
        catalogue=catalogue,
        # Statements carry whole milliseconds; the service's default clock does not truncate.
        clock=lambda: truncate_to_millis(datetime.now(UTC)),
    )
    return relay, service


def seed_book(book: CustodyBook, service: AttestationService, clients: list[str]) -> int:
    """Deposit and pledge one unit for every client, publishing a statement after each batch of
    SEED_BATCH new holdings; returns the last statement's sequence. Batches keep the warm-up
    statements the size of the ones measured."""
    now = datetime.now(UTC)
    for start in range(0, len(clients), SEED_BATCH):
        for client in clients[start : start + SEED_BATCH]:
            book.apply(Deposit(f"seed-d-{client}", client, ASSET, DEPOSIT_UNITS), now=now)
            book.apply(Pledge(f"seed-p-{client}", client, ASSET, EXCHANGE, 1), now=now)
        service.publish_epoch()
    return service.state.sequence


# One linear set-up, measurement and tear-down: easier to audit in one piece than split.
async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:  # noqa: PLR0915
    clients = [f"client-{i:06d}" for i in range(args.clients)]
    debounce_s = args.debounce_ms / 1000
    signer = open_signer(workdir, softhsm=args.softhsm)
    cosigners = [Cosigner(BlsCosigner.from_seed(secrets.token_bytes(32))) for _ in range(3)]
    catalogue = TopicCatalogue(prefix="bench.", partitions=dict.fromkeys(TopicKind, 1))
    assets = [Asset(code, decimals) for code, decimals in DECIMALS.items()]

    with (
        EmbeddedBroker() as broker,
        CustodyBook.open(f"sqlite:///{workdir / 'custodian.sqlite3'}", assets=assets) as book,
        TransparencyLog(workdir / "translog.sqlite3") as log,
    ):
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, client_id="bench")
        print(f"  broker            {broker.bootstrap_servers} (embedded Tansu, memory only)")
        relay, service = open_custodian(
            book, log, settings, signer=signer, cosigners=cosigners, catalogue=catalogue
        )
        t = time.perf_counter()
        seeded_sequence = await asyncio.to_thread(seed_book, book, service, clients)
        pledged = dict.fromkeys(clients, 1)
        print(
            f"  seeded            {len(clients):,} clients, statements #1..#{seeded_sequence}, "
            f"in {time.perf_counter() - t:.1f} s"
        )
        exchange_engine = create_bridge_engine(f"sqlite:///{workdir / 'exchange.sqlite3'}")
        bridge_migrations.upgrade(exchange_engine)
        consumer = TimedExchange(
            engine=exchange_engine,
            settings=settings,
            name="bench-exchange",
            topics=[catalogue.name(TopicKind.ATTESTATIONS)],
            source="/exchanges/bench/consumer",
            catalogue=catalogue,
        )
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(relay.run(stop)),
            asyncio.create_task(consumer.run(stop)),
            asyncio.create_task(service.run(stop, debounce_s=debounce_s)),
        ]
        try:
            await _wait_for(
                lambda: any(seq >= seeded_sequence for seq, _, _ in consumer.received),
                what="the seeded statements",
            )
            await asyncio.sleep(0.5)  # let the service's own start-up epoch pass as well
            first_sequence = service.state.sequence
            print(f"  seeded statements consumed (up to #{first_sequence}); measuring")

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
            last_sequence_before = service.state.sequence

            def resolved() -> bool:
                _resolve(samples, consumer.received)
                return all(sample.sequence is not None for sample in samples)

            await _wait_for(
                resolved, what="every pledge at the consumer", timeout_s=DRAIN_TIMEOUT_S
            )
            await _wait_for(lambda: relay.metrics.lag == 0, what="the outbox to drain")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            exchange_engine.dispose()

        published_at = _published_at(book, relay)
        errors = consumer.metrics.dead_letters

    publish_ms: list[float] = []
    consume_ms: list[float] = []
    consumed_at = {sequence: moment for sequence, moment, _ in consumer.received}
    for sample in samples:
        assert sample.sequence is not None  # resolved() waited for every one
        publish_ms.append((published_at[sample.sequence] - sample.committed_at) * 1000)
        consume_ms.append((consumed_at[sample.sequence] - sample.committed_at) * 1000)
    statements = {sample.sequence for sample in samples}
    statements_in_window = last_sequence_before - first_sequence
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "clients": args.clients,
        "pledges": len(samples),
        "achieved_rate": round(len(samples) / pledging_s, 1),
        "debounce_ms": args.debounce_ms,
        "signer": "softhsm" if args.softhsm else "software-development",
        "statements": statements_in_window,
        "statements_carrying_pledges": len(statements),
        "statements_per_s": round(statements_in_window / pledging_s, 1),
        "pledges_per_statement": round(len(samples) / max(1, len(statements)), 2),
        "pledge_to_publish_p50_ms": round(percentile(publish_ms, 0.50), 2),
        "pledge_to_publish_p99_ms": round(percentile(publish_ms, 0.99), 2),
        "pledge_to_publish_max_ms": round(max(publish_ms), 2),
        "pledge_to_consume_p50_ms": round(percentile(consume_ms, 0.50), 2),
        "pledge_to_consume_p99_ms": round(percentile(consume_ms, 0.99), 2),
        "pledge_to_consume_max_ms": round(max(consume_ms), 2),
        "dead_letters": errors,
        "target_p99_ms": TARGET_P99_MS,
        "target_met": percentile(publish_ms, 0.99) < TARGET_P99_MS,
        **machine_info(sqlite=sqlite3.sqlite_version),
    }


def _resolve(
    samples: list[PledgeSample], received: list[tuple[int, float, dict[tuple[str, str], int]]]
) -> None:
    """Give each pledge the first received statement whose disclosed quantity of the client's
    holding reaches the pledge's total (statements arrive in sequence order; a delta discloses
    every changed leaf, a snapshot every leaf)."""
    quantities: dict[str, list[tuple[int, int]]] = {}
    for sequence, _, leaves in list(received):
        for (account, asset), quantity in leaves.items():
            if asset == ASSET:
                quantities.setdefault(account, []).append((sequence, quantity))
    for sample in samples:
        if sample.sequence is not None:
            continue
        for sequence, quantity in quantities.get(sample.client, ()):
            if quantity >= sample.target:
                sample.sequence = sequence
                break


def _published_at(book: CustodyBook, relay: TimedRelay) -> dict[int, float]:
    """Per statement sequence: when the last of its outbox rows was marked sent."""
    with book.engine.connect() as connection:
        rows = connection.execute(select(outbox_table.c.id, outbox_table.c.sequence)).all()
    published: dict[int, float] = {}
    for row_id, sequence in rows:
        moment = relay.sent_at.get(int(row_id))
        if moment is not None:
            published[int(sequence)] = max(published.get(int(sequence), 0.0), moment)
    return published


async def _wait_for(check: Any, *, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not check():
        if time.perf_counter() > deadline:
            raise SystemExit(f"benchmark: timed out waiting for {what}")
        await asyncio.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=100.0, help="pledges per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="pledging duration")
    parser.add_argument("--clients", type=int, default=1000, help="clients pledged beforehand")
    parser.add_argument(
        "--debounce-ms",
        type=float,
        default=5.0,
        help="the service's debounce after a change notification (default 5 ms)",
    )
    parser.add_argument("--softhsm", action="store_true", help="sign with a SoftHSM2 token key")
    args = parser.parse_args()
    if args.rate <= 0 or args.seconds <= 0 or args.clients < 1 or args.debounce_ms < 0:
        parser.error("--rate and --seconds must be positive, --clients >= 1, --debounce-ms >= 0")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)

    print(
        f"publish: {args.rate:g} pledges/s for {args.seconds:g} s over {args.clients:,} clients; "
        f"service debounce {args.debounce_ms:g} ms; signer "
        f"{'SoftHSM2' if args.softhsm else 'in-memory development P-256'}; co-signers 2 of 3 (BLS)"
    )
    with tempfile.TemporaryDirectory(prefix="mcb-bench-publish-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(
        f"  statements        {result['statements']} in the window, "
        f"{result['statements_per_s']} /s, {result['pledges_per_statement']} pledges each"
    )
    print(
        f"  pledge->publish   p50 {result['pledge_to_publish_p50_ms']} ms, "
        f"p99 {result['pledge_to_publish_p99_ms']} ms, max {result['pledge_to_publish_max_ms']} ms"
    )
    print(
        f"  pledge->consume   p50 {result['pledge_to_consume_p50_ms']} ms, "
        f"p99 {result['pledge_to_consume_p99_ms']} ms, max {result['pledge_to_consume_max_ms']} ms"
    )
    verdict = "met" if result["target_met"] else "NOT met"
    print(f"  target            pledge->publish p99 < {TARGET_P99_MS:g} ms: {verdict}")
    print(json.dumps(result))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
