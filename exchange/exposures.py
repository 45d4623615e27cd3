"""Exposure reports from the trading engine: over HTTP (``POST /v1/exposures``, exchange/api.py)
or on the exposures topic, both in one wire form, :class:`bridge.envelope.ExposureReport`
(docs/protocol.md section 11): amounts are decimal strings, ``unrealised_pnl`` signed, times in
whole milliseconds, and nothing else is accepted (no floats, no unknown or missing members).

* :func:`parse_exposure_body` reads an HTTP body into that wire form; :func:`compute_ledger_report`
  checks it belongs here (this exchange, the ledger's quote currency, not dated ahead of the clock
  beyond the allowed skew) and converts it into the ledger's
  :class:`~exchange.ledger.ExposureReport`. Bad input raises a
  :class:`~attestations.errors.CounterpartyError` whose ``reason`` says what is wrong (the API
  answers 400 with it, the consumer dead-letters with it).
* :class:`ExposureConsumer` (a :class:`bridge.consumer.ConsumerBase`) reads the exposures topic
  and hands each report to the :class:`~exchange.desk.MarginDesk`, in the consumer's own
  transaction with its Kafka progress, holding the desk's lock (``effect_lock``) so the ledger
  is changed only after that transaction committed.

An older report (by ``reported_at``) or one already taken (same ``report_id``) has no effect:
the ledger plans an empty change and nothing is written. Exposure records carry no stream
sequence, so the consumer base deduplicates them by offset only; the ledger's rule makes a
redelivered report harmless anyway.

What it does not do: decide what a report means for margins (exchange/ledger.py), or
authenticate the trading engine (the API does; the exposures topic is internal to the exchange).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy.orm import Session

from attestations.canonical import format_timestamp, truncate_to_millis
from attestations.errors import DecodeError, FutureDated, PolicyViolation, WrongStream
from attestations.verify import DEFAULT_MAX_CLOCK_SKEW
from bridge import envelope
from bridge.consumer import AfterCommit, ConsumerBase, Delivery
from bridge.topics import TopicKind
from exchange.desk import MarginDesk
from exchange.ledger import ExposureReport

logger = logging.getLogger(__name__)

MAX_EXPOSURE_BODY_BYTES: Final = 4096
"""An exposure report is about 400 bytes; a body ten times that is not one."""


def parse_exposure_body(obj: dict[str, Any]) -> envelope.ExposureReport:
    """The wire form of one report from a parsed JSON object (DecodeError and its amount
    subclasses when it is not exactly one)."""
    return envelope.ExposureReport.from_wire(obj)


def compute_ledger_report(
    wire: envelope.ExposureReport,
    *,
    exchange: str,
    quote: str,
    now: datetime,
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
) -> ExposureReport:
    """The ledger's report from the wire form, once it is addressed to ``exchange``
    (WrongStream), in the ledger's ``quote`` (PolicyViolation) and not dated more than
    ``max_clock_skew`` after ``now`` (FutureDated: a report from the future would shadow every
    real one until the clock caught up, since older reports are ignored)."""
    if wire.exchange != exchange:
        raise WrongStream(f"an exposure report for exchange {wire.exchange}, this is {exchange}")
    if wire.quote != quote:
        raise PolicyViolation(f"exposure in {wire.quote}; the margin ledger counts in {quote}")
    if wire.reported_at > now + max_clock_skew:
        raise FutureDated(
            f"exposure report dated {format_timestamp(wire.reported_at)} is ahead of the clock"
        )
    try:
        return ExposureReport(
            client=wire.client,
            report_id=wire.report_id,
            reported_at=wire.reported_at,
            exposure=wire.exposure,
            requirement=wire.requirement,
            unrealised_pnl=wire.unrealised_pnl,
        )
    except DecodeError:
        raise
    except ValueError as exc:  # pragma: no cover - the wire form checked the same rules
        raise DecodeError(f"exposure report: {exc}") from exc


def _utc_now() -> datetime:
    # Whole milliseconds, as every signed time: the verifier refuses a finer ``now``.
    return truncate_to_millis(datetime.now(UTC))


@dataclass(kw_only=True)
class ExposureConsumer(ConsumerBase):
    """Reads exposure reports (``topics``: the exposures topic of the catalogue) into ``desk``.
    Construct it with ``effect_lock=desk.lock`` (:func:`create_exposure_consumer` does)."""

    desk: MarginDesk
    clock: Callable[[], datetime] = _utc_now
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW
    require_disclosure: bool = False
    taken: int = field(default=0)
    """Reports that changed the ledger (the others were older or replayed)."""

    def __post_init__(self) -> None:
        if self.effect_lock is not self.desk.lock:
            # Without the desk's lock the plan could be made against a ledger another writer is
            # about to change, and the after-commit apply would then fail.
            self.effect_lock = self.desk.lock
        super().__post_init__()

    def apply(self, session: Session, delivery: Delivery) -> AfterCommit | None:
        body = delivery.message.body
        if not isinstance(body, envelope.ExposureReport):
            raise DecodeError(f"{delivery.message.envelope.type.value} is not an exposure report")
        now = self.clock()
        report = compute_ledger_report(
            body,
            exchange=self.desk.exchange,
            quote=self.desk.ledger.policy.quote,
            now=now,
            max_clock_skew=self.max_clock_skew,
        )
        staged = self.desk.stage_exposure(session, report, now=now)
        if staged is None:
            return None

        def after() -> None:
            staged()
            self.taken += 1

        return after


def create_exposure_consumer(desk: MarginDesk, **options: Any) -> ExposureConsumer:
    """An :class:`ExposureConsumer` on the exposures topic of ``options['catalogue']`` (default
    catalogue otherwise), named ``<exchange>-exposures``."""
    catalogue = options.pop("catalogue", desk.catalogue)
    return ExposureConsumer(
        desk=desk,
        name=options.pop("name", f"{desk.exchange}-exposures"),
        topics=[catalogue.name(TopicKind.EXPOSURES)],
        source=options.pop("source", f"/exchanges/{desk.exchange}/exposures"),
        catalogue=catalogue,
        effect_lock=desk.lock,
        **options,
    )
