"""A producer process for the outbox crash tests, and the stream entries the bridge tests share.

Run as ``python -m tests.outbox_worker MODE DATABASE_URL BOOTSTRAP TOPIC_PREFIX SEQUENCE...``:

* ``commit``: enqueue the entries of the given sequences in one committed transaction, print
  ``COMMITTED`` and wait to be killed (the kill lands between the commit and any publication);
* ``publish``: run the relay until it has published a batch and is about to mark it sent, print
  ``PUBLISHED`` and wait to be killed there (between the broker's acknowledgement and the mark).

The test kills it with SIGKILL: no clean-up code runs, as in a real crash.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from attestations.disclosure import DisclosedLeaf, LeafDisclosure
from attestations.statement import SignedStatement, Statement, StatementKind
from bridge import migrations
from bridge.chunks import encode_disclosure
from bridge.envelope import OutboundMessage, encode_statement
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay, create_bridge_engine, enqueue
from bridge.topics import TopicCatalogue, TopicKind
from tests.world import World, seed


def catalogue_for(prefix: str) -> TopicCatalogue:
    """One partition per topic: quick to create, and one order to check."""
    return TopicCatalogue(prefix=prefix, partitions=dict.fromkeys(TopicKind, 1))


@functools.cache
def _world() -> World:
    return World()


SNAPSHOT_EVERY = 4
"""Sequences 1, 5, 9, ... are snapshots; the others deltas."""


@functools.cache
def statement_at(sequence: int) -> SignedStatement:
    world = _world()
    statement: Statement = world.statement()
    for number in range(2, sequence + 1):
        kind = StatementKind.SNAPSHOT if number % SNAPSHOT_EVERY == 1 else StatementKind.DELTA
        statement = world.next_statement(statement, kind=kind)
    return world.sign(statement)


def sample_leaves(count: int) -> tuple[DisclosedLeaf, ...]:
    return tuple(
        DisclosedLeaf(f"client-{i:06d}", "BTC", i, seed(f"salt-{i}"), 1_000 + i)
        for i in range(count)
    )


def entry_messages(
    sequence: int, *, catalogue: TopicCatalogue, leaves: int = 5, budget_bytes: int = 900_000
) -> tuple[OutboundMessage, ...]:
    """A statement and the chunks of its disclosure, in publication order."""
    signed = statement_at(sequence)
    statement = signed.statement
    disclosure = LeafDisclosure(
        custodian=statement.custodian,
        exchange=statement.exchange,
        sequence=sequence,
        statement_digest=signed.digest,
        set_leaves=sample_leaves(leaves) if statement.kind is StatementKind.SNAPSHOT else (),
    )
    return (
        encode_statement(signed, catalogue=catalogue),
        *encode_disclosure(
            disclosure, time=statement.issued_at, catalogue=catalogue, budget_bytes=budget_bytes
        ),
    )


def enqueue_entries(engine: Engine, sequences: Sequence[int], *, catalogue: TopicCatalogue) -> None:
    with Session(engine) as session, session.begin():
        for sequence in sequences:
            enqueue(session, entry_messages(sequence, catalogue=catalogue), sequence=sequence)


def _announce_and_hang(word: str) -> None:
    print(word, flush=True)
    threading.Event().wait()


async def _publish_then_hang(engine: Engine, settings: KafkaSettings, prefix: str) -> None:
    relay = OutboxRelay(engine, settings, catalogue=catalogue_for(prefix), poll_interval_s=0.05)
    relay._mark_sent = lambda acked: _announce_and_hang("PUBLISHED")  # type: ignore[method-assign]
    await relay.run(asyncio.Event())


def main(argv: Sequence[str]) -> None:
    mode, url, bootstrap, prefix, *numbers = argv
    engine = create_bridge_engine(url)
    migrations.upgrade(engine)
    if mode == "commit":
        enqueue_entries(engine, [int(n) for n in numbers], catalogue=catalogue_for(prefix))
        _announce_and_hang("COMMITTED")
    elif mode == "publish":
        settings = KafkaSettings(bootstrap_servers=bootstrap, client_id="mcb-crash-worker")
        asyncio.run(_publish_then_hang(engine, settings, prefix))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
