"""The exchange's HTTP API (aiohttp, docs/exchange-openapi.yaml): client margin status, positions
and credit, exposure reports and pre-trade checks from the trading engine, the audit journal,
stream heads and fork resolution, signed positions snapshots, health and Prometheus metrics.

Who may do what (see :func:`authorize`; tokens and principals as in bridge/http.py):

=======================  ==========  =========  ===========  =======  =========  =======
principal                own client  any client  exposures,  streams  audit,     resolve,
                         status      status      pre-trade            snapshots  metrics
=======================  ==========  =========  ===========  =======  =========  =======
``client:<account>``     yes         no          no          no       no         no
``engine:<id>``          no          no          yes         no       no         no
``auditor:<id>``,        no          no          no          yes      yes        no
``regulator:<id>``
``operator:<name>``      yes         yes         yes         yes      yes        yes
=======================  ==========  =========  ===========  =======  =========  =======

A client asks for the release of its own pledged units (``POST /v1/releases``), the operator for
any client's: the answer is the exchange's signed release acknowledgement, or the reason it is
refused (nothing is signed then).

Only the operator publishes a snapshot on the ledger-snapshots topic; auditors and regulators
take a signed one for themselves. A fork resolution is journaled with the operator's name.

Amounts are decimal strings of quote minor units (signed where they can be negative), times are
``YYYY-MM-DDTHH:MM:SS.mmmZ``, bodies are canonical (RFC 8785) JSON. Errors are
``{"error": reason, "detail": text}`` (bridge/http.py): 400 for malformed input, 401 without a
valid token, 403 outside its scope, 404, 405, 409 (resolving a stream that is not frozen), 413,
415, 503 when the database is unavailable. Bad input never produces a 500.

Writes go through the :class:`~exchange.desk.MarginDesk` (plan, persist, commit, apply) in a
worker thread; the pre-trade check and the status reads are answered from memory on the event
loop, without waiting for any database transaction.

What it does not do: credit statements (exchange/consumer.py), run the evaluator
(exchange/service.py), issue tokens, or terminate TLS.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web
from sqlalchemy import Engine, func, select

from attestations.amounts import format_units, parse_units, validate_asset_code
from attestations.canonical import format_timestamp, truncate_to_millis
from attestations.errors import ConfigurationError, DecodeError, TransientError
from attestations.merkle import validate_account
from attestations.notices import format_signed_units
from attestations.statement import validate_party
from bridge import http
from bridge.consumer import dead_letters_table
from bridge.http import BadRequest, Conflict, NotFound
from bridge.outbox import run_transaction
from bridge.topics import parse_stream_key
from exchange.desk import MarginDesk
from exchange.errors import StreamNotFrozen, UnknownStream
from exchange.exposures import MAX_EXPOSURE_BODY_BYTES, compute_ledger_report, parse_exposure_body
from exchange.ledger import (
    ClientStatus,
    JournalEntry,
    MarginLedger,
    PositionView,
    StreamStatus,
)
from exchange.policy import Freshness, MarginState, compute_freshness
from exchange.store import MAX_JOURNAL_PAGE, journal_page

logger = logging.getLogger(__name__)

REALM: Final = "mcb-exchange"
DEFAULT_CLIENT_MAX_SIZE: Final = 64 * 1024
"""Above every body the API reads (an exposure report is limited to 4 KiB on its own)."""
MAX_SMALL_BODY_BYTES: Final = 4096
DEFAULT_AUDIT_LIMIT: Final = 100
MAX_AUDIT_LIMIT: Final = min(1000, MAX_JOURNAL_PAGE)
MAX_REASON_CHARS: Final = 500


# --- principals and authorization ---------------------------------------------------------------


class Role(enum.StrEnum):
    CLIENT = "client"
    ENGINE = "engine"
    AUDITOR = "auditor"
    REGULATOR = "regulator"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token stands for: ``client:<account>``, ``engine:<id>``, ``auditor:<id>``,
    ``regulator:<id>`` or ``operator:<name>`` (the name goes into the journal of what the
    operator does)."""

    role: Role
    subject: str

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise ConfigurationError(f"unknown role {self.role!r}")
        try:
            if self.role is Role.CLIENT:
                validate_account(self.subject)
            else:
                validate_party(self.subject, what=f"{self.role} id")
        except DecodeError as exc:
            raise ConfigurationError(f"principal {self.role}: {exc}") from exc

    @classmethod
    def parse(cls, value: str) -> Principal:
        role, subject = http.split_principal(value, Role, without_subject=frozenset())
        return cls(role, subject or "")

    def __str__(self) -> str:
        return f"{self.role}:{self.subject}"


class TokenStore(http.TokenStore[Principal]):
    """The exchange API's tokens: ``<sha256 hex> <principal>`` lines (bridge/http.py)."""

    def parse_principal(self, value: str) -> Principal:
        return Principal.parse(value)


class Action(enum.Enum):
    READ_CLIENT = "read a client's margin"
    SUBMIT_EXPOSURE = "report exposure"
    PRETRADE = "ask a pre-trade check"
    READ_STREAMS = "read the streams"
    READ_AUDIT = "read the audit journal"
    TAKE_SNAPSHOT = "take a positions snapshot"
    PUBLISH_SNAPSHOT = "publish a positions snapshot"
    RESOLVE_FORK = "resolve a fork"
    REQUEST_RELEASE = "request a release"
    READ_METRICS = "read metrics"


_ALLOWED: Final[Mapping[Role, frozenset[Action]]] = {
    # A client reads its own margin (checked against the path below), nothing else.
    Role.CLIENT: frozenset({Action.READ_CLIENT, Action.REQUEST_RELEASE}),
    Role.ENGINE: frozenset({Action.SUBMIT_EXPOSURE, Action.PRETRADE}),
    Role.AUDITOR: frozenset({Action.READ_STREAMS, Action.READ_AUDIT, Action.TAKE_SNAPSHOT}),
    Role.REGULATOR: frozenset({Action.READ_STREAMS, Action.READ_AUDIT, Action.TAKE_SNAPSHOT}),
    Role.OPERATOR: frozenset(Action),
}


def authorize(principal: Principal, action: Action, *, client: str | None = None) -> None:
    """Raise Forbidden unless ``principal`` may do ``action`` (on ``client``'s margin). The
    whole policy is the table above and this function."""
    allowed = action in _ALLOWED[principal.role]
    if allowed and principal.role is Role.CLIENT:
        allowed = client == principal.subject
    if not allowed:
        target = f" of {client}" if client is not None else ""
        raise http.forbidden(f"{principal} may not {action.value}{target}", realm=REALM)


# --- parsing ------------------------------------------------------------------------------------


def parse_client(value: str) -> str:
    return http.as_bad_request(lambda: validate_account(value), "client")


def parse_stream(value: str) -> str:
    """A stream key ``<custodian>/<exchange>`` (in a path, the slash is written ``%2F``)."""

    def check() -> str:
        parse_stream_key(value)
        return value

    return http.as_bad_request(check, "stream")


def parse_amount(value: object, *, what: str) -> int:
    """An unsigned amount written as a decimal string (never a JSON number)."""
    return http.as_bad_request(lambda: parse_units(value, what=what), what)


def parse_text(value: object, *, what: str, limit: int = MAX_REASON_CHARS) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise BadRequest(f"{what} must be a non-empty string of at most {limit} characters")
    if any(ord(c) < 0x20 for c in value):
        raise BadRequest(f"{what} must not contain control characters")
    return value


def require_keys(
    body: Mapping[str, Any], *, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> None:
    keys = set(body)
    if missing := sorted(required - keys):
        raise BadRequest(f"missing members {missing}")
    if unknown := sorted(keys - required - optional):
        raise BadRequest(f"unknown members {unknown[:5]}")


# --- wire forms ---------------------------------------------------------------------------------


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else format_timestamp(truncate_to_millis(moment))


def _ratio(ratio_bps: int | None) -> str | None:
    return None if ratio_bps is None else format_signed_units(ratio_bps, what="ratio_bps")


def position_wire(view: PositionView) -> dict[str, Any]:
    return {
        "asset": view.asset,
        "custodian": view.custodian,
        "freshness": view.freshness.value,
        "frozen": view.frozen,
        "price": None if view.price is None else view.price.to_wire(),
        "quantity": format_units(view.quantity),
        "rate_bps": view.rate_bps,
        "stream": view.stream,
        "value": format_units(view.value, what="value"),
    }


def status_wire(status: ClientStatus, *, quote: str, now: datetime) -> dict[str, Any]:
    return {
        "as_of": _time(now),
        "client": status.client,
        "collateral": format_units(status.collateral, what="collateral"),
        "credit_limit": format_units(status.credit_limit, what="credit limit"),
        "deadline": _time(status.deadline),
        "equity": format_signed_units(status.equity, what="equity"),
        "exposure": format_units(status.exposure, what="exposure"),
        "quote": quote,
        "ratio_bps": _ratio(status.ratio_bps),
        "requirement": format_units(status.requirement, what="requirement"),
        "state": status.state.value,
        "unrealised_pnl": format_signed_units(status.unrealised_pnl, what="unrealised pnl"),
    }


def stream_wire(status: StreamStatus, ledger: MarginLedger, *, now: datetime) -> dict[str, Any]:
    head = status.head
    wire: dict[str, Any] = {
        "awaiting_snapshot_from": status.awaiting_snapshot_from,
        "frozen": status.frozen,
        "frozen_reason": status.frozen_reason,
        "stream": status.stream,
        "head": None,
        "freshness": None,
    }
    if head is not None:
        wire["head"] = {
            "custodian": head.custodian,
            "digest": head.digest.hex(),
            "expires_at": _time(head.expires_at),
            "issued_at": _time(head.issued_at),
            "kind": head.kind,
            "sequence": head.sequence,
        }
        wire["freshness"] = compute_freshness(
            now=now, issued_at=head.issued_at, expires_at=head.expires_at, policy=ledger.policy
        ).value
    return wire


def journal_wire(entry: JournalEntry, *, cursor: int) -> dict[str, Any]:
    # Journal details may hold big integers (amounts); strings keep them exact in any reader.
    return {
        "asset": entry.asset,
        "at": _time(entry.at),
        "client": entry.client,
        "cursor": str(cursor),
        "detail": {k: v if isinstance(v, str) else str(v) for k, v in entry.detail.items()},
        "kind": entry.kind,
        "quantity": None if entry.quantity is None else str(entry.quantity),
        "sequence": entry.sequence,
        "stream": entry.stream,
        "value": None if entry.value is None else str(entry.value),
    }


# --- metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """What the metrics read from the ledger, in one consistent read."""

    positions: Mapping[str, int]  # stream -> credited positions
    sequences: Mapping[str, int]  # stream -> head sequence
    ages_s: Mapping[str, float]  # stream -> seconds since the head was issued
    freshness: Mapping[str, Freshness]
    frozen: Sequence[str]
    clients: Mapping[MarginState, int]


def compute_ledger_stats(ledger: MarginLedger, *, now: datetime) -> LedgerStats:
    streams = ledger.streams()
    positions = {stream: len(held) for stream, held in ledger.positions().items()}
    sequences: dict[str, int] = {}
    ages: dict[str, float] = {}
    freshness: dict[str, Freshness] = {}
    for stream, status in streams.items():
        if status.head is None:
            continue
        sequences[stream] = status.head.sequence
        ages[stream] = max(0.0, (now - status.head.issued_at).total_seconds())
        freshness[stream] = compute_freshness(
            now=now,
            issued_at=status.head.issued_at,
            expires_at=status.head.expires_at,
            policy=ledger.policy,
        )
    states: Counter[MarginState] = Counter(dict.fromkeys(MarginState, 0))
    for client in ledger.clients():
        margin = ledger.client_status(client, now=now)
        if margin is not None:
            states[margin.state] += 1
    return LedgerStats(
        positions=positions,
        sequences=sequences,
        ages_s=ages,
        freshness=freshness,
        frozen=sorted(s for s, status in streams.items() if status.frozen),
        clients=dict(states),
    )


def fetch_rejections(engine: Engine) -> dict[str, int]:
    """Dead letters recorded by the exchange's consumers, by reason (durable across restarts)."""

    def work(session: Any) -> dict[str, int]:
        rows = session.connection().execute(
            select(dead_letters_table.c.reason, func.count()).group_by(dead_letters_table.c.reason)
        )
        return {str(reason): int(count) for reason, count in rows}

    return run_transaction(engine, work, what="counting rejections")


def format_metrics(
    requests: Mapping[tuple[str, int], int],
    *,
    stats: LedgerStats,
    pretrade: Mapping[str, int],
    exposures: Mapping[str, int],
    rejections: Mapping[str, int] | None,
) -> str:
    """Prometheus text (format 0.0.4). ``rejections`` is None when the database did not answer."""
    lines = http.format_request_counters(requests)
    lines += http.format_family(
        "mcb_database_up",
        "gauge",
        "Whether the database answered this scrape.",
        [({}, 0 if rejections is None else 1)],
    )
    if rejections is not None:
        lines += http.format_family(
            "mcb_exchange_rejections_total",
            "counter",
            "Messages the exchange's consumers refused (dead-lettered), by reason.",
            [({"reason": r}, n) for r, n in sorted(rejections.items())],
        )
    lines += http.format_family(
        "mcb_exchange_credited_positions",
        "gauge",
        "Positions credited from the stream's verified statements.",
        [({"stream": s}, n) for s, n in sorted(stats.positions.items())],
    )
    lines += http.format_family(
        "mcb_exchange_stream_sequence",
        "gauge",
        "Sequence of the stream's last accepted statement.",
        [({"stream": s}, n) for s, n in sorted(stats.sequences.items())],
    )
    lines += http.format_family(
        "mcb_exchange_statement_age_seconds",
        "gauge",
        "Seconds since the stream's last accepted statement was issued.",
        [({"stream": s}, age) for s, age in sorted(stats.ages_s.items())],
    )
    counts = Counter(stats.freshness.values())
    lines += http.format_family(
        "mcb_exchange_streams",
        "gauge",
        "Streams by freshness of their last statement (stale: new credit blocked; zero: counted "
        "as zero).",
        [({"freshness": f.value}, counts[f]) for f in Freshness],
    )
    lines += http.format_family(
        "mcb_exchange_streams_frozen",
        "gauge",
        "Streams whose credit is frozen after a fork, until an operator resolves it.",
        [({}, len(stats.frozen))],
    )
    lines += http.format_family(
        "mcb_exchange_clients",
        "gauge",
        "Clients by margin state.",
        [({"state": s.value}, stats.clients.get(s, 0)) for s in MarginState],
    )
    lines += http.format_family(
        "mcb_exchange_pretrade_total",
        "counter",
        "Pre-trade checks answered, by decision (allowed, or the reason of the refusal).",
        [({"decision": d}, n) for d, n in sorted(pretrade.items())],
    )
    lines += http.format_family(
        "mcb_exchange_exposure_reports_total",
        "counter",
        "Exposure reports received over HTTP, by result (applied, or ignored as older or "
        "replayed).",
        [({"result": r}, n) for r, n in sorted(exposures.items())],
    )
    return "\n".join(lines) + "\n"


# --- the application ----------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Api:
    """The handlers and what they share. Every handler authenticates, parses (400), authorizes
    (403), then looks up (404), in that order."""

    def __init__(
        self,
        *,
        desk: MarginDesk,
        tokens: TokenStore,
        clock: Callable[[], datetime],
        metrics_open: bool,
    ) -> None:
        self.desk = desk
        self.tokens = tokens
        self.clock = clock
        self.metrics_open = metrics_open
        self.requests: Counter[tuple[str, int]] = Counter()
        self.pretrade_decisions: Counter[str] = Counter()
        self.exposure_results: Counter[str] = Counter()
        self.release_results: Counter[str] = Counter()

    @property
    def quote(self) -> str:
        return self.desk.ledger.policy.quote

    def _principal(self, request: web.Request) -> Principal:
        return http.authenticate(self.tokens, request.headers.get("Authorization"), realm=REALM)

    def _now(self) -> datetime:
        return truncate_to_millis(self.clock())

    def _client(
        self, request: web.Request, principal: Principal
    ) -> tuple[str, ClientStatus, datetime]:
        client = parse_client(request.match_info["client"])
        http.parse_query(request.query, allowed=frozenset())
        authorize(principal, Action.READ_CLIENT, client=client)
        now = self._now()
        status = self.desk.status(client, now=now)
        if status is None:
            raise NotFound(f"the ledger knows no client {client}")
        return client, status, now

    # --- clients --------------------------------------------------------------------------------

    async def client_status(self, request: web.Request) -> web.Response:
        _, status, now = self._client(request, self._principal(request))
        return http.json_response(status_wire(status, quote=self.quote, now=now))

    async def client_positions(self, request: web.Request) -> web.Response:
        client, status, now = self._client(request, self._principal(request))
        return http.json_response(
            {
                "as_of": _time(now),
                "client": client,
                "collateral": format_units(status.collateral, what="collateral"),
                "positions": [position_wire(view) for view in status.positions],
                "quote": self.quote,
            }
        )

    async def client_credit(self, request: web.Request) -> web.Response:
        client, status, now = self._client(request, self._principal(request))
        decision = self.desk.pretrade(client, add_exposure=0, now=now)
        return http.json_response(
            {
                "as_of": _time(now),
                "blocked_reason": decision.reason,
                "client": client,
                "credit_limit": format_units(status.credit_limit, what="credit limit"),
                "exposure": format_units(status.exposure, what="exposure"),
                "headroom": format_units(decision.headroom, what="headroom"),
                "quote": self.quote,
                "state": status.state.value,
            }
        )

    # --- trading engine -------------------------------------------------------------------------

    async def post_exposure(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        http.parse_query(request.query, allowed=frozenset())
        authorize(principal, Action.SUBMIT_EXPOSURE)
        body = await http.read_json_body(request, max_bytes=MAX_EXPOSURE_BODY_BYTES)
        wire = http.as_bad_request(lambda: parse_exposure_body(body), "exposure report")
        now = self.clock()
        report = compute_ledger_report(wire, exchange=self.desk.exchange, quote=self.quote, now=now)
        committed = await asyncio.to_thread(self.desk.submit_exposure, report, now=now)
        applied = not committed.change.is_empty
        self.exposure_results["applied" if applied else "ignored"] += 1
        status = self.desk.status(report.client, now=self._now())
        return http.json_response(
            {
                "applied": applied,
                "client": report.client,
                "notices": len(committed.notices),
                "report_id": report.report_id,
                "state": None if status is None else status.state.value,
            }
        )

    async def _pretrade(self, principal: Principal, client: str, add_exposure: int) -> web.Response:
        authorize(principal, Action.PRETRADE)
        now = self._now()
        decision = self.desk.pretrade(client, add_exposure=add_exposure, now=now)
        self.pretrade_decisions["allowed" if decision.allowed else str(decision.reason)] += 1
        return http.json_response(
            {
                "add_exposure": format_units(add_exposure, what="add_exposure"),
                "allowed": decision.allowed,
                "as_of": _time(now),
                "client": client,
                "headroom": format_units(decision.headroom, what="headroom"),
                "quote": self.quote,
                "reason": decision.reason,
            }
        )

    async def post_pretrade(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        http.parse_query(request.query, allowed=frozenset())
        body = await http.read_json_body(request, max_bytes=MAX_SMALL_BODY_BYTES)
        require_keys(body, required=frozenset({"client", "add_exposure"}))
        client = parse_client(body["client"]) if isinstance(body["client"], str) else None
        if client is None:
            raise BadRequest("client must be a string")
        add = parse_amount(body["add_exposure"], what="add_exposure")
        return await self._pretrade(principal, client, add)

    async def get_pretrade(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        query = http.parse_query(request.query, allowed=frozenset({"client", "add_exposure"}))
        if set(query) != {"client", "add_exposure"}:
            raise BadRequest("the query parameters 'client' and 'add_exposure' are required")
        client = parse_client(query["client"])
        add = parse_amount(query["add_exposure"], what="add_exposure")
        return await self._pretrade(principal, client, add)

    # --- releases -------------------------------------------------------------------------------

    async def post_release(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        http.parse_query(request.query, allowed=frozenset())
        body = await http.read_json_body(request, max_bytes=MAX_SMALL_BODY_BYTES)
        require_keys(body, required=frozenset({"client", "custodian", "asset", "quantity"}))
        values = {name: body[name] for name in ("client", "custodian", "asset")}
        if not all(isinstance(value, str) for value in values.values()):
            raise BadRequest("client, custodian and asset must be strings")
        client = parse_client(values["client"])
        custodian = http.as_bad_request(
            lambda: validate_party(values["custodian"], what="custodian"), "custodian"
        )
        if custodian == self.desk.exchange:
            raise BadRequest("the custodian cannot be this exchange")
        asset = http.as_bad_request(lambda: validate_asset_code(values["asset"]), "asset")
        quantity = parse_amount(body["quantity"], what="quantity")
        if quantity == 0:
            raise BadRequest("quantity must be at least 1")
        authorize(principal, Action.REQUEST_RELEASE, client=client)
        release = await asyncio.to_thread(
            self.desk.release, client, custodian, asset, quantity, self.clock()
        )
        decision = release.decision
        self.release_results["allowed" if decision.allowed else str(decision.reason)] += 1
        answer: dict[str, Any] = {
            "allowed": decision.allowed,
            "asset": asset,
            "client": client,
            "collateral": format_units(decision.collateral, what="collateral"),
            "credit_limit": format_units(decision.credit_limit, what="credit limit"),
            "custodian": custodian,
            "quantity": format_units(quantity),
            "quote": self.quote,
            "reason": decision.reason,
            "releasable": format_units(decision.releasable),
            "release_ack": None if release.ack is None else release.ack.to_wire(),
        }
        return http.json_response(answer)

    # --- audit, streams, snapshots --------------------------------------------------------------

    async def audit(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        query = http.parse_query(
            request.query, allowed=frozenset({"cursor", "limit", "client", "stream"})
        )
        after = (
            http.parse_decimal(query["cursor"], what="cursor", low=0, high=2**53 - 1)
            if "cursor" in query
            else 0
        )
        limit = (
            http.parse_decimal(query["limit"], what="limit", low=1, high=MAX_AUDIT_LIMIT)
            if "limit" in query
            else DEFAULT_AUDIT_LIMIT
        )
        client = parse_client(query["client"]) if "client" in query else None
        stream = parse_stream(query["stream"]) if "stream" in query else None
        authorize(principal, Action.READ_AUDIT)
        page = await asyncio.to_thread(
            journal_page, self.desk.engine, after=after, limit=limit, stream=stream, client=client
        )
        # A full page may have more behind it; a short one is the end for now (the journal
        # grows, so the last cursor stays valid for the next poll).
        last = page[-1][0] if page else after
        return http.json_response(
            {
                "entries": [journal_wire(entry, cursor=cursor) for cursor, entry in page],
                "next_cursor": str(last) if len(page) == limit else None,
                "cursor": str(last),
            }
        )

    async def streams(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        http.parse_query(request.query, allowed=frozenset())
        authorize(principal, Action.READ_STREAMS)
        now = self._now()

        def read(ledger: MarginLedger) -> list[dict[str, Any]]:
            return [stream_wire(s, ledger, now=now) for _, s in sorted(ledger.streams().items())]

        return http.json_response({"as_of": _time(now), "streams": self.desk.read(read)})

    async def resolve(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        stream = parse_stream(request.match_info["stream"])
        http.parse_query(request.query, allowed=frozenset())
        authorize(principal, Action.RESOLVE_FORK)
        body = await http.read_json_body(request, max_bytes=MAX_SMALL_BODY_BYTES)
        require_keys(body, required=frozenset({"reason"}))
        reason = parse_text(body["reason"], what="reason")
        now = self._now()
        try:
            await asyncio.to_thread(
                self.desk.resolve, stream, operator=principal.subject, reason=reason, now=now
            )
        except UnknownStream as exc:
            raise NotFound(str(exc), reason=exc.reason) from exc
        except StreamNotFrozen as exc:
            raise Conflict(str(exc), reason=exc.reason) from exc
        logger.warning("fork on %s resolved by %s: %s", stream, principal, reason)
        status = self.desk.read(lambda ledger: ledger.stream_status(stream))
        if status is None:  # pragma: no cover - resolve refused unknown streams above
            raise NotFound(f"no stream {stream}")
        return http.json_response(
            stream_wire(status, self.desk.ledger, now=now) | {"resolved_by": str(principal)}
        )

    async def snapshot(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        query = http.parse_query(request.query, allowed=frozenset({"publish"}))
        publish = query.get("publish", "false")
        if publish not in {"true", "false"}:
            raise BadRequest("publish must be 'true' or 'false'")
        authorize(principal, Action.PUBLISH_SNAPSHOT if publish == "true" else Action.TAKE_SNAPSHOT)
        parts = await asyncio.to_thread(
            self.desk.positions_snapshot, now=self.clock(), publish=publish == "true"
        )
        return http.json_response(
            {"parts": [part.to_wire() for part in parts], "published": publish == "true"}
        )

    # --- operations -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        http.parse_query(request.query, allowed=frozenset())
        try:
            await asyncio.to_thread(http.check_database, self.desk.engine)
        except TransientError as exc:
            logger.warning("health: %s", exc)
            return http.json_response(
                {"database": "unreachable", "status": "unavailable"}, status=503
            )
        return http.json_response({"database": "ok", "status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.metrics_open:
            authorize(self._principal(request), Action.READ_METRICS)
        http.parse_query(request.query, allowed=frozenset())
        now = self.clock()
        stats = self.desk.read(lambda ledger: compute_ledger_stats(ledger, now=now))
        rejections: dict[str, int] | None
        try:
            rejections = await asyncio.to_thread(fetch_rejections, self.desk.engine)
        except TransientError as exc:
            logger.warning("metrics: %s", exc)
            rejections = None
        body = format_metrics(
            self.requests,
            stats=stats,
            pretrade=self.pretrade_decisions,
            exposures=self.exposure_results,
            rejections=rejections,
        )
        return http.text_response(body)


_API: Final = web.AppKey("exchange_api", _Api)

ROUTES: Final[Sequence[tuple[str, str, str]]] = (
    ("GET", "/v1/clients/{client}", "client_status"),
    ("GET", "/v1/clients/{client}/positions", "client_positions"),
    ("GET", "/v1/clients/{client}/credit", "client_credit"),
    ("POST", "/v1/exposures", "post_exposure"),
    ("POST", "/v1/pretrade", "post_pretrade"),
    ("POST", "/v1/releases", "post_release"),
    ("GET", "/v1/pretrade", "get_pretrade"),
    ("GET", "/v1/audit", "audit"),
    ("GET", "/v1/streams", "streams"),
    ("POST", "/v1/streams/{stream}/resolve", "resolve"),
    ("POST", "/v1/snapshots", "snapshot"),
    ("GET", "/health", "health"),
    ("GET", "/metrics", "metrics"),
)
"""Every route: (method, path, handler)."""


def create_app(
    *,
    desk: MarginDesk,
    tokens: TokenStore,
    clock: Callable[[], datetime] = _utc_now,
    metrics_open: bool = False,
    client_max_size: int = DEFAULT_CLIENT_MAX_SIZE,
) -> web.Application:
    """The API of ``desk``'s ledger. ``metrics_open`` serves /metrics without a token (for a
    scraper on a private network)."""
    api = _Api(desk=desk, tokens=tokens, clock=clock, metrics_open=metrics_open)
    middleware = http.create_problem_middleware(api.requests, service="exchange")
    app = web.Application(middlewares=[middleware], client_max_size=client_max_size)
    app[_API] = api
    for method, path, name in ROUTES:
        app.router.add_route(method, path, getattr(api, name), name=name)
    return app


async def run_server(
    app: web.Application,
    host: str,
    port: int,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[list[Any]], None] | None = None,
    shutdown_timeout_s: float = 5.0,
) -> None:
    """Serve ``app`` until ``stop`` is set (bridge.http.run_server)."""
    await http.run_server(
        app,
        host,
        port,
        stop=stop,
        on_ready=on_ready,
        shutdown_timeout_s=shutdown_timeout_s,
        name="exchange API",
    )
