"""A custodian process for the service crash tests, and the stream they share with it.

Run as ``python -m tests.service_worker MODE DATABASE_URL LOG_PATH BOOTSTRAP TOPIC_PREFIX N``.
The worker runs what ``mcb custodian serve`` runs (one AttestationService with its outbox relay,
in one process, on the given database, transparency log and broker) and publishes epochs 1..N,
one pledge change before each. Epochs before N are published and relayed completely (every
outbox row marked sent). Epoch N dies by SIGKILL, sent by the process to itself from a wrapper
installed here (custodian/service.py is not changed), at the point MODE names:

* ``signed``: the statement was co-signed and signed, no transaction has begun;
* ``in_transaction``: the statement row, its leaves and its outbox rows are written inside the
  publishing transaction, which has not committed;
* ``committed``: the transaction committed; the transparency log has not been appended;
* ``logged``: the log was appended; the relay has not published the entry;
* ``published``: the broker acknowledged the entry; the relay has not marked it sent.

Before the kill the worker prints ``KILLED <MODE> <sequence> <hex of the signed statement's
RFC 8785 bytes>`` on stdout, so the test can look for a statement that never reached the tables.
SIGKILL runs no clean-up code at all, as in a real crash (or a power cut).

For ``signed``, ``in_transaction``, ``committed`` and ``logged`` the relay is held back from
epoch N on (it publishes nothing more), so the crash lands exactly where the mode says whatever
the relay's timing.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

from attestations.amounts import Asset
from attestations.signing import Cosigner
from attestations.statement import SignedStatement
from attestations.translog import TransparencyLog
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay
from bridge.topics import TopicCatalogue
from custodian import service as service_module
from custodian.book import Deposit, Pledge, Unpledge
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService
from custodian.store import CustodyBook
from tests.outbox_worker import catalogue_for
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, NOW, World, sample_prices, seed

MODES: Final = ("signed", "in_transaction", "committed", "logged", "published")
ASSETS: Final = [Asset(code, decimals) for code, decimals in DECIMALS.items()]
SALT_SECRET: Final = seed("service-crash-salt-secret")
STREAM: Final = f"{CUSTODIAN}/{EXCHANGE}"
QUORUM: Final = 2
HANG_DUMP_S: Final = 45.0


def epoch_time(sequence: int) -> datetime:
    """When the worker publishes epoch ``sequence`` (a fixed clock, so runs are comparable)."""
    return NOW + timedelta(seconds=sequence)


def change_pledges(book: CustodyBook, sequence: int) -> None:
    """The book change before epoch ``sequence``: a new client pledges, and from the third epoch
    on an earlier client takes part of its pledge back (a changed leaf), so deltas set and
    change leaves. Idempotent (fixed keys): running it again for one sequence changes nothing."""
    asset = "BTC" if sequence % 2 else "USDC"
    client = f"client-{sequence:03d}"
    quantity = 1_000 + sequence
    book.apply(Deposit(f"d-{sequence}", client, asset, quantity), now=NOW)
    book.apply(Pledge(f"p-{sequence}", client, asset, EXCHANGE, quantity), now=NOW)
    if sequence >= 3:
        earlier = sequence - 2
        book.apply(
            Unpledge(
                f"u-{sequence}",
                f"client-{earlier:03d}",
                "BTC" if earlier % 2 else "USDC",
                EXCHANGE,
                1,
                f"ack-{sequence}",
            ),
            now=NOW,
        )


def fresh_cosigners(world: World) -> list[Cosigner]:
    """In-process co-signers as ``mcb custodian serve`` runs them: their record of the stream
    lives in process memory and dies with it."""
    return [Cosigner(key) for key in world.cosigners]


def open_service(
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    *,
    cosigners: Sequence[Cosigner],
    **options: Any,
) -> AttestationService:
    return AttestationService.open(
        book,
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        signer=world.signer,
        cosigners=cosigners,
        quorum=QUORUM,
        salt_secret=SALT_SECRET,
        decimals=DECIMALS,
        prices=StaticPriceSource(sample_prices()),
        log=log,
        **options,
    )


def make_relay(
    book: CustodyBook, settings: KafkaSettings, catalogue: TopicCatalogue
) -> OutboxRelay:
    return OutboxRelay(
        book.engine,
        settings,
        catalogue=catalogue,
        poll_interval_s=0.05,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        # Loss checks only when connecting: the embedded broker (Tansu) reports a partition's
        # end as the last batch's base offset + 1, so after a batch of several records a
        # periodic check takes it for a lost log and republishes, again and again.
        loss_check_interval_s=3_600.0,
    )


# --- the crash ----------------------------------------------------------------------------------


def _die(mode: str, signed: SignedStatement) -> None:
    print(f"KILLED {mode} {signed.statement.sequence} {signed.encode().hex()}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _hold_back(relay: OutboxRelay) -> None:
    """The relay publishes nothing from now on (its loop keeps running, idle)."""

    async def publish_nothing(producer: object) -> int:
        del producer
        await asyncio.sleep(0.05)
        return 0

    relay.publish_pending = publish_nothing  # type: ignore[method-assign]


def arm(mode: str, service: AttestationService, relay: OutboxRelay) -> None:
    """Install the wrapper that kills the process at ``mode``'s point of the next epoch."""
    if mode != "published":
        _hold_back(relay)
    if mode == "signed":
        plan_and_sign = service._plan_and_sign

        def signed_then_die(now: datetime, *, snapshot: bool) -> Any:
            entry = plan_and_sign(now, snapshot=snapshot)
            _die(mode, entry.signed)
            return entry  # pragma: no cover - the process is gone

        service._plan_and_sign = signed_then_die  # type: ignore[method-assign]
    elif mode == "in_transaction":
        # The name the service's transaction calls, looked up in its module at call time.
        enqueue = getattr(service_module, "enqueue")  # noqa: B009 - not re-exported
        signed_by_sequence = _remember_signed(service)

        def enqueue_then_die(session: Any, messages: Any, *, sequence: int, now: datetime) -> None:
            enqueue(session, messages, sequence=sequence, now=now)
            session.flush()
            _die(mode, signed_by_sequence[sequence])

        setattr(service_module, "enqueue", enqueue_then_die)  # noqa: B010
    elif mode in ("committed", "logged"):
        catch_up_log = service.catch_up_log
        signed_by_sequence = _remember_signed(service)

        def around_the_log() -> int:
            signed = signed_by_sequence[service.state.sequence]
            if mode == "committed":
                _die(mode, signed)
            appended = catch_up_log()
            _die(mode, signed)
            return appended  # pragma: no cover - the process is gone

        service.catch_up_log = around_the_log  # type: ignore[method-assign]
    elif mode == "published":
        signed_by_sequence = _remember_signed(service)
        sequence = service.state.sequence + 1

        def die_instead_of_marking(acked: object) -> None:
            del acked
            _die(mode, signed_by_sequence[sequence])

        relay._mark_sent = die_instead_of_marking  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def _remember_signed(service: AttestationService) -> dict[int, SignedStatement]:
    """Every statement the service signs from now on, by sequence (what the kill line prints)."""
    seen: dict[int, SignedStatement] = {}
    plan_and_sign: Callable[..., Any] = service._plan_and_sign

    def recording(now: datetime, *, snapshot: bool) -> Any:
        entry = plan_and_sign(now, snapshot=snapshot)
        seen[entry.signed.statement.sequence] = entry.signed
        return entry

    service._plan_and_sign = recording  # type: ignore[method-assign]
    return seen


# --- main ---------------------------------------------------------------------------------------


async def _run(
    mode: str, url: str, log_path: str, *, settings: KafkaSettings, prefix: str, crash_at: int
) -> None:
    world = World()
    catalogue = catalogue_for(prefix)
    with CustodyBook.open(url, assets=ASSETS) as book, TransparencyLog(log_path) as log:
        relay = make_relay(book, settings, catalogue)
        service = open_service(
            book, world, log, cosigners=fresh_cosigners(world), relay=relay, catalogue=catalogue
        )
        stop = asyncio.Event()
        relay_task = asyncio.create_task(relay.run(stop))
        for sequence in range(1, crash_at + 1):
            await asyncio.to_thread(change_pledges, book, sequence)
            if sequence == crash_at:
                arm(mode, service, relay)
            await asyncio.to_thread(service.publish_epoch, epoch_time(sequence))
            while await asyncio.to_thread(relay.count_unsent):
                await asyncio.sleep(0.02)
        print("SURVIVED", flush=True)  # only if no wrapper fired: the test fails on it
        stop.set()
        await relay_task


def main(argv: Sequence[str]) -> None:
    # A worker that hangs instead of dying shows where, before the test gives up on it.
    faulthandler.dump_traceback_later(HANG_DUMP_S, exit=False)
    mode, url, log_path, bootstrap, prefix, crash_at = argv
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    settings = KafkaSettings(bootstrap_servers=bootstrap, client_id="mcb-service-crash-worker")
    asyncio.run(_run(mode, url, log_path, settings=settings, prefix=prefix, crash_at=int(crash_at)))


if __name__ == "__main__":
    main(sys.argv[1:])
