"""One exchange process: the margin ledger, its consumers, the evaluator, the outbox relay and the
HTTP API, started and stopped together.

:class:`ExchangeService` composes the parts the other exchange modules provide:

* the database: both schemas it holds are migrated at :meth:`ExchangeService.open` (the bridge's
  consumer progress, dead letters and outbox; the ledger's tables), then the ledger and the
  receiver state of every stream are loaded (:func:`exchange.store.load_ledger`);
* the :class:`~exchange.desk.MarginDesk`, single writer of the ledger, signing notices with the
  exchange's key (a :class:`~attestations.p256.DigestSigner`: PKCS#11 in production);
* the attestation consumer (:class:`~exchange.consumer.AttestationConsumer` given the desk):
  statements verified and credited under the desk's lock, their margin calls signed and enqueued
  in the same transaction, the ledger changed after the commit through the desk;
* the exposure consumer (:func:`exchange.exposures.create_exposure_consumer`);
* the :class:`~bridge.outbox.OutboxRelay` publishing the exchange's notices and snapshot
  requests;
* the evaluator: :meth:`MarginDesk.evaluate` every ``evaluate_interval_s`` in a worker thread,
  which moves margin-call deadlines and stream staleness into margin states and notices;
* the API (:mod:`exchange.api`), plus ``GET /health/service``: every part's state.

:meth:`ExchangeService.run` runs the five tasks until the stop event is set, then waits for all
of them; when one ends early (it failed), the others are stopped the same way and its error
propagates. :meth:`ExchangeService.health` says how each part is doing.

What it does not do: parse configuration files (mcb/config.py), open the HSM or start a broker
(the command line does), verify or value anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Self

from aiohttp import web
from sqlalchemy import Engine

from attestations.canonical import truncate_to_millis
from attestations.errors import ConfigurationError, TransientError
from attestations.keys import KeyRegistry
from attestations.p256 import DigestSigner
from bridge import http
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay, call_on_loop
from bridge.topics import DEFAULT_CATALOGUE, TopicCatalogue
from exchange.api import TokenStore, create_app, run_server
from exchange.consumer import AttestationConsumer
from exchange.desk import MarginDesk
from exchange.exposures import ExposureConsumer, create_exposure_consumer
from exchange.policy import CollateralPolicy
from exchange.store import create_exchange_engine, load_ledger, migrate

logger = logging.getLogger(__name__)

DEFAULT_EVALUATE_INTERVAL_S: Final = 5.0
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8090
EVALUATOR_LATE_FACTOR: Final = 3
"""The evaluator is reported late when its last pass is older than this many intervals."""
GC_THRESHOLDS: Final = (50_000, 20, 10)
"""The cyclic garbage collector's thresholds in an exchange process (CPython's default is 700,
10, 10). See :func:`tune_garbage_collector`."""


def tune_garbage_collector() -> None:
    """Set :data:`GC_THRESHOLDS` and freeze every object alive now (call it once the ledger and
    the receiver trees are loaded).

    Why: the ledger and the trees are millions of long-lived container objects (a position, a
    leaf, a node per tree level), and crediting a large snapshot allocates hundreds of thousands
    more. With the default thresholds the collector ran a full collection every 70,000 net
    allocations that the heap had grown enough for, rescanning all of it each time: six full
    collections took 1.26 s of a 6.55 s credit of 100,000 leaves. Frozen objects are never
    scanned again (they are still freed by reference counting, only a cycle among them would
    stay), and with these thresholds a full collection waits for ten million net allocations,
    so a bulk credit runs without one. Young collections still run every 50,000 net
    allocations, which bounds the memory held by short-lived cycles (SQLAlchemy, asyncio)."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.collect()
    gc.freeze()


def _utc_now() -> datetime:
    # Whole milliseconds: every signed time does, and the verifier refuses a finer ``now``.
    return truncate_to_millis(datetime.now(UTC))


# --- the service --------------------------------------------------------------------------------


@dataclass(slots=True)
class EvaluatorState:
    """What the evaluator did (exported by :meth:`ExchangeService.health`)."""

    passes: int = 0
    notices: int = 0
    failures: int = 0
    last_pass_monotonic: float | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class PartHealth:
    name: str
    ok: bool
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """``ok`` when every part is: the database answers, every task runs, the relay is not
    retrying and the evaluator ran recently."""

    ok: bool
    parts: tuple[PartHealth, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "degraded",
            "parts": {part.name: {"ok": part.ok, **dict(part.detail)} for part in self.parts},
        }


TASKS: Final = ("outbox-relay", "attestations", "exposures", "evaluator", "api")


class ExchangeService:
    """See the module docstring. Construct with :meth:`open`; run with :meth:`run`; then
    :meth:`close` (disposes of the engine it opened)."""

    def __init__(
        self,
        *,
        engine: Engine,
        desk: MarginDesk,
        attestations: AttestationConsumer,
        exposures: ExposureConsumer,
        relay: OutboxRelay,
        tokens: TokenStore,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        evaluate_interval_s: float = DEFAULT_EVALUATE_INTERVAL_S,
        clock: Callable[[], datetime] = _utc_now,
        owns_engine: bool = False,
    ) -> None:
        if not evaluate_interval_s > 0:
            raise ConfigurationError("evaluate_interval_s must be positive")
        self.engine = engine
        self.desk = desk
        self.attestations = attestations
        self.exposures = exposures
        self.relay = relay
        self.tokens = tokens
        self.host = host
        self.port = port
        self.evaluate_interval_s = evaluate_interval_s
        self.clock = clock
        self.evaluator = EvaluatorState()
        self.app = create_app(desk=desk, tokens=tokens, clock=clock)
        self.app.router.add_route("GET", "/health/service", self._health_handler)
        self._owns_engine = owns_engine
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(
        cls,
        database: str | Engine,
        kafka: KafkaSettings,
        *,
        exchange: str,
        custodians: Sequence[str],
        registry: KeyRegistry,
        decimals: Mapping[str, int],
        policy: CollateralPolicy,
        signer: DigestSigner,
        tokens: TokenStore,
        catalogue: TopicCatalogue = DEFAULT_CATALOGUE,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        evaluate_interval_s: float = DEFAULT_EVALUATE_INTERVAL_S,
        clock: Callable[[], datetime] = _utc_now,
        consumer_options: Mapping[str, Any] | None = None,
        relay_options: Mapping[str, Any] | None = None,
    ) -> Self:
        """Migrate the database (``sqlite:///...``, ``postgresql+psycopg://...`` or an engine),
        load the ledger, tune the garbage collector (:func:`tune_garbage_collector`) and build
        every part. ``consumer_options`` go to both consumers
        (back-off, position checks), ``relay_options`` to the relay."""
        owns = isinstance(database, str)
        engine = create_exchange_engine(database) if isinstance(database, str) else database
        try:
            migrate(engine)
            ledger, streams = load_ledger(engine, policy, decimals)
            tune_garbage_collector()
            desk = MarginDesk(
                ledger=ledger, engine=engine, exchange=exchange, signer=signer, catalogue=catalogue
            )
            relay = OutboxRelay(engine, kafka, catalogue=catalogue, **dict(relay_options or {}))
            options = dict(consumer_options or {})
            attestations = AttestationConsumer.open(
                engine,
                kafka,
                exchange=exchange,
                custodians=custodians,
                registry=registry,
                decimals=decimals,
                policy=policy,
                catalogue=catalogue,
                migrate_schema=False,
                streams=streams,
                relay=relay,
                desk=desk,
                clock=clock,
                **options,
            )
            exposures = create_exposure_consumer(
                desk, engine=engine, settings=kafka, catalogue=catalogue, clock=clock, **options
            )
            service = cls(
                engine=engine,
                desk=desk,
                attestations=attestations,
                exposures=exposures,
                relay=relay,
                tokens=tokens,
                host=host,
                port=port,
                evaluate_interval_s=evaluate_interval_s,
                clock=clock,
                owns_engine=owns,
            )
        except BaseException:
            if owns:
                engine.dispose()
            raise
        return service

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    # --- running --------------------------------------------------------------------------------

    def wake_relay(self) -> None:
        """Publish now; safe from any thread (the relay's event belongs to the service's loop)."""
        call_on_loop(self._loop, self.relay.wake)

    async def run(
        self, stop: asyncio.Event, *, on_ready: Callable[[list[Any]], None] | None = None
    ) -> None:
        """Run every part until ``stop`` is set, then wait for all of them. If one ends first
        (it failed, or returned early), the others are stopped and its error propagates."""
        self._loop = asyncio.get_running_loop()
        runners = {
            "outbox-relay": self.relay.run(stop),
            "attestations": self.attestations.run(stop),
            "exposures": self.exposures.run(stop),
            "evaluator": self.run_evaluator(stop),
            "api": run_server(self.app, self.host, self.port, stop=stop, on_ready=on_ready),
        }
        self._tasks = {
            name: asyncio.create_task(coroutine, name=f"exchange-{name}")
            for name, coroutine in runners.items()
        }
        try:
            await asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.set()
            results = await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._loop = None
        for name, result in zip(self._tasks, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("exchange %s failed: %s", name, result)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def evaluate_once(self) -> int:
        """One evaluator pass (deadlines, staleness) now; the notices it enqueued."""
        committed = self.desk.evaluate(now=self.clock())
        self.evaluator.passes += 1
        self.evaluator.notices += len(committed.notices)
        self.evaluator.last_pass_monotonic = time.monotonic()
        self.evaluator.last_error = None
        return len(committed.notices)

    async def run_evaluator(self, stop: asyncio.Event) -> None:
        """:meth:`evaluate_once` in a worker thread every ``evaluate_interval_s`` until ``stop``.
        A transient failure (the database is busy or down) is logged and tried again at the next
        pass; anything else is a bug or a broken invariant and propagates."""
        while not stop.is_set():
            try:
                notices = await asyncio.to_thread(self.evaluate_once)
            except TransientError as exc:
                self.evaluator.failures += 1
                self.evaluator.last_error = f"{type(exc).__name__}: {exc}"[:300]
                logger.warning("evaluator: %s; retrying at the next pass", exc)
            else:
                if notices:
                    self.relay.wake()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.evaluate_interval_s)

    # --- health ---------------------------------------------------------------------------------

    def _task_part(self, name: str) -> tuple[bool, str]:
        task = self._tasks.get(name)
        if task is None:
            return False, "not started"
        if not task.done():
            return True, "running"
        if task.cancelled():
            return False, "cancelled"
        return False, "failed" if task.exception() is not None else "stopped"

    def health(self, *, database_ok: bool) -> ServiceHealth:
        """Every part's state; ``database_ok`` is the result of a probe the caller ran (it
        blocks, so the API runs it in a worker thread)."""
        parts = [PartHealth("database", database_ok)]
        relay_ok, relay_state = self._task_part("outbox-relay")
        relay = self.relay.metrics
        parts.append(
            PartHealth(
                "outbox-relay",
                relay_ok and relay.last_error is None,
                {
                    "state": relay_state,
                    "lag": relay.lag,
                    "published": relay.published,
                    "retrying": relay.last_error is not None,
                },
            )
        )
        for name, consumer in (("attestations", self.attestations), ("exposures", self.exposures)):
            ok, state = self._task_part(name)
            metrics = consumer.metrics
            parts.append(
                PartHealth(
                    name,
                    ok,
                    {
                        "state": state,
                        "applied": metrics.applied,
                        "dead_letters": metrics.dead_letters,
                        "retries": metrics.retries,
                    },
                )
            )
        ok, state = self._task_part("evaluator")
        last = self.evaluator.last_pass_monotonic
        age = None if last is None else time.monotonic() - last
        late = age is None or age > EVALUATOR_LATE_FACTOR * self.evaluate_interval_s
        parts.append(
            PartHealth(
                "evaluator",
                ok and not late,
                {
                    "state": state,
                    "passes": self.evaluator.passes,
                    # Integers: the answer is canonical JSON, which carries no floats.
                    "last_pass_age_ms": None if age is None else int(age * 1000),
                    "failures": self.evaluator.failures,
                },
            )
        )
        ok, state = self._task_part("api")
        parts.append(PartHealth("api", ok, {"state": state}))
        return ServiceHealth(all(part.ok for part in parts), tuple(parts))

    async def _health_handler(self, request: web.Request) -> web.Response:
        http.parse_query(request.query, allowed=frozenset())
        try:
            await asyncio.to_thread(http.check_database, self.engine)
            database_ok = True
        except TransientError:
            database_ok = False
        report = self.health(database_ok=database_ok)
        return http.json_response(report.to_wire(), status=200 if report.ok else 503)
