"""An exchange process for the attestation consumer's crash tests.

Run as ``python -m tests.exchange_worker MODE DATABASE_URL BOOTSTRAP TOPIC_PREFIX GROUP N``.
The worker runs the exchange's :class:`~exchange.consumer.AttestationConsumer` (in consumer
group GROUP, so that it commits offsets to the broker, or without a group when GROUP is ``-``)
over the given database and the attestations topic
of the given prefix, and credits statements until it reaches sequence N of the stream. While
applying statement N it kills itself with SIGKILL, from a wrapper installed here (no library
code is changed), at the point MODE names:

* ``before_verify``: the effect's transaction is open, the statement not yet verified;
* ``after_verify``: verified and planned, its rows being written, the transaction not committed;
* ``after_commit``: the transaction committed; the in-memory ledger has not taken the change;
* ``after_apply``: the ledger took the change; the offset is not committed to the group;
* ``after_offset_commit``: the offset of the entry's last record is committed to the group.

Before the kill it prints ``KILLED <MODE> <sequence>`` on stdout. SIGKILL runs no clean-up code
at all, as in a real crash (or a power cut).
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Final

from aiokafka import AIOKafkaConsumer
from sqlalchemy.orm import Session

from bridge.consumer import AfterCommit, Delivery
from bridge.kafka import KafkaSettings
from exchange import consumer as consumer_module
from exchange.consumer import AttestationConsumer
from exchange.store import create_exchange_engine
from tests.exchange_world import CONSUMER_NOW, POLICY
from tests.outbox_worker import catalogue_for
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, World

MODES: Final = (
    "before_verify",
    "after_verify",
    "after_commit",
    "after_apply",
    "after_offset_commit",
)
HANG_DUMP_S: Final = 45.0


def make_consumer(
    url_or_engine: Any, settings: KafkaSettings, prefix: str, group: str | None, world: World
) -> AttestationConsumer:
    """The exchange's consumer as both the worker and the test's restart build it; in consumer
    group ``group`` (offsets committed to the broker after each database commit), or assigned
    every partition without a group when None."""
    engine = (
        create_exchange_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    )
    return AttestationConsumer.open(
        engine,
        settings,
        exchange=EXCHANGE,
        custodians=[CUSTODIAN],
        registry=world.registry,
        decimals=DECIMALS,
        policy=POLICY,
        catalogue=catalogue_for(prefix),
        clock=lambda: CONSUMER_NOW,
        use_group=group is not None,
        group_id=group,
        backoff_initial_s=0.01,
        backoff_max_s=0.2,
    )


def group_settings(settings: KafkaSettings) -> KafkaSettings:
    """Short group timeouts: a killed member leaves the group within two seconds, so the
    restarted consumer is not kept waiting for it (the default session is ten)."""
    return replace(settings, session_timeout_ms=2_000, heartbeat_interval_ms=300)


def _die(mode: str, sequence: int) -> None:
    print(f"KILLED {mode} {sequence}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(mode: str, consumer: AttestationConsumer, crash_at: int) -> None:
    """Install the wrapper that kills the process at ``mode``'s point of statement ``crash_at``."""
    if mode in ("before_verify", "after_verify"):
        # The name apply() calls, looked up in its module at call time.
        verify: Callable[..., Any] = getattr(consumer_module, "verify_statement")  # noqa: B009

        def verify_around(message: Any, **options: Any) -> Any:
            sequence = message.statement.sequence
            if sequence == crash_at and mode == "before_verify":
                _die(mode, sequence)
            verified = verify(message, **options)
            if sequence == crash_at:
                _die(mode, sequence)
            return verified

        setattr(consumer_module, "verify_statement", verify_around)  # noqa: B010
        return
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    apply = consumer.apply
    applied: list[int] = []

    def apply_around(session: Session, delivery: Delivery) -> AfterCommit | None:
        after = apply(session, delivery)
        sequence = delivery.sequence
        if sequence != crash_at or after is None:
            return after
        original = after

        def after_around() -> None:
            if mode == "after_commit":
                _die(mode, crash_at)
            original()
            applied.append(crash_at)
            if mode == "after_apply":
                _die(mode, crash_at)

        return after_around

    consumer.apply = apply_around  # type: ignore[method-assign]
    if mode == "after_offset_commit":
        commit = AIOKafkaConsumer.commit

        async def commit_around(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> None:
            await commit(self, *args, **kwargs)
            if applied:
                _die(mode, crash_at)

        AIOKafkaConsumer.commit = commit_around


async def _run(consumer: AttestationConsumer) -> None:
    await consumer.run(asyncio.Event())


def main(argv: Sequence[str]) -> None:
    # A worker that hangs instead of dying shows where, before the test gives up on it.
    faulthandler.dump_traceback_later(HANG_DUMP_S, exit=False)
    mode, url, bootstrap, prefix, group, crash_at = argv
    settings = group_settings(
        KafkaSettings(bootstrap_servers=bootstrap, client_id="mcb-exchange-crash-worker")
    )
    consumer = make_consumer(url, settings, prefix, None if group == "-" else group, World())
    arm(mode, consumer, int(crash_at))
    asyncio.run(_run(consumer))
    print("SURVIVED", flush=True)  # only if no wrapper fired: the test fails on it


if __name__ == "__main__":
    main(sys.argv[1:])
