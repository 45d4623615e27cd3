"""The custodian's HTTP API (aiohttp): signed statements, client inclusion proofs, signed log
checkpoints and transparency-log proofs of one (custodian, exchange) stream, plus health and
Prometheus metrics. Every body is the canonical (RFC 8785) wire form of the object from
:mod:`attestations`, so what a client fetches is exactly what it verifies.

The module has a pure part and a thin I/O part:

* Pure, testable without a server: the :class:`Principal` a bearer token stands for (tokens
  are kept as SHA-256 hashes by the :class:`TokenStore` of bridge/http.py, the HTTP edge this
  API shares with the exchange's), :func:`authorize` (one table of who may read what), the
  ``parse_*`` functions for path and query values, and :func:`format_metrics`.
* I/O: ``fetch_*`` functions that read the statements table, the service's in-memory trees and
  the transparency log, and :func:`create_app` / :func:`run_server`.

Who may read what (see :func:`authorize`):

=========================  ==========  =============  ===========  =========
principal                  statements  log, checkpts  own proofs   metrics
=========================  ==========  =============  ===========  =========
``client:<account>``       any stream  any stream     yes          no
``exchange:<id>``          its stream  its stream     no           no
``regulator:<id>``         any stream  any stream     any account  no
``operator``               any stream  any stream     any account  yes
=========================  ==========  =============  ===========  =========

Clients read statements and log proofs because they need them to check their own proof; those
carry roots and totals, never another client's account or salt.

Errors are JSON ``{"error": reason, "detail": text}``: 400 for a malformed value, 401 (with
``WWW-Authenticate``) without a valid token, 403 outside the token's scope, 404 for what does
not exist, 405 for a wrong method, 503 when the database is unreachable. Bad input never
produces a 500.

What it does not do: publish statements (the service does), build trees (the latest
statement's client proofs come from the trees of the
:class:`~custodian.service.AttestationService` object passed in, so the API runs in the process
that publishes the stream; an older statement's are rebuilt by its leaf history,
:mod:`custodian.history`), issue or rotate tokens (an operator writes the token file), or
terminate TLS (run it behind a proxy that does).
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
from sqlalchemy.orm import Session

from attestations.amounts import validate_asset_code
from attestations.checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint
from attestations.disclosure import ClientProof
from attestations.errors import ConfigurationError, DecodeError, TransientError
from attestations.merkle import validate_account
from attestations.p256 import DigestSigner
from attestations.statement import MAX_SEQUENCE, validate_party
from attestations.translog import MAX_TREE_SIZE, TransparencyLog
from bridge import http
from bridge.http import (
    MIN_TOKEN_CHARS,
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    Unauthorized,
    check_database,
    compute_problem_body,
    compute_token_hash,
    parse_decimal,
    parse_query,
)
from bridge.outbox import run_transaction
from custodian.history import ProofNotKept
from custodian.service import AttestationService, statements_table

__all__ = [
    "MIN_TOKEN_CHARS",
    "ROUTES",
    "Action",
    "ApiError",
    "BadRequest",
    "Forbidden",
    "NotFound",
    "Principal",
    "Role",
    "StreamStats",
    "TokenStore",
    "Unauthorized",
    "authenticate",
    "authorize",
    "check_database",
    "compute_problem_body",
    "compute_token_hash",
    "create_app",
    "format_metrics",
    "parse_bearer",
    "parse_decimal",
    "parse_query",
    "parse_sequence",
    "run_server",
]

logger = logging.getLogger(__name__)

REALM: Final = "mcb-custodian"
DEFAULT_CHECKPOINT_MAX_AGE_S: Final = 60.0
DEFAULT_CLIENT_MAX_SIZE: Final = 16 * 1024
"""Every endpoint is a GET; a request body this large is already a mistake (413)."""


# --- principals and tokens ----------------------------------------------------------------------


class Role(enum.StrEnum):
    CLIENT = "client"
    EXCHANGE = "exchange"
    REGULATOR = "regulator"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token stands for: ``client:<account>``, ``exchange:<id>``, ``regulator:<id>`` or
    ``operator``."""

    role: Role
    subject: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise ConfigurationError(f"unknown role {self.role!r}")
        try:
            if self.role is Role.OPERATOR:
                if self.subject is not None:
                    raise ConfigurationError("the operator principal has no subject")
            elif self.role is Role.CLIENT:
                validate_account(self.subject)
            else:
                validate_party(self.subject, what=f"{self.role} id")
        except DecodeError as exc:
            raise ConfigurationError(f"principal {self.role}: {exc}") from exc

    @classmethod
    def parse(cls, value: str) -> Principal:
        role, subject = http.split_principal(
            value, Role, without_subject=frozenset({Role.OPERATOR})
        )
        return cls(role, subject)

    def __str__(self) -> str:
        return self.role.value if self.subject is None else f"{self.role}:{self.subject}"


class TokenStore(http.TokenStore[Principal]):
    """The custodian API's tokens: ``<sha256 hex> <principal>`` lines (bridge/http.py)."""

    def parse_principal(self, value: str) -> Principal:
        return Principal.parse(value)


# --- parsing ------------------------------------------------------------------------------------


def parse_bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; Unauthorized otherwise."""
    return http.parse_bearer(header, realm=REALM)


def authenticate(tokens: TokenStore, header: str | None) -> Principal:
    return http.authenticate(tokens, header, realm=REALM)


def parse_exchange(value: str) -> str:
    return http.as_bad_request(lambda: validate_party(value, what="exchange"), "exchange")


def parse_account(value: str) -> str:
    return http.as_bad_request(lambda: validate_account(value), "account")


def parse_asset(value: str) -> str:
    return http.as_bad_request(lambda: validate_asset_code(value), "asset")


def parse_sequence(value: str) -> int:
    return parse_decimal(value, what="sequence", low=1, high=MAX_SEQUENCE)


def parse_tree_size(value: str, *, what: str) -> int:
    return parse_decimal(value, what=what, low=0, high=MAX_TREE_SIZE)


# --- authorization ------------------------------------------------------------------------------


class Action(enum.Enum):
    READ_STATEMENTS = "read statements"
    READ_LOG = "read the transparency log"
    READ_PROOF = "read a client proof"
    READ_METRICS = "read metrics"


def authorize(
    principal: Principal, action: Action, *, exchange: str | None = None, account: str | None = None
) -> None:
    """Raise Forbidden unless ``principal`` may do ``action`` on ``exchange``'s stream (and, for
    a proof, ``account``'s leaf). The whole policy is this one function."""
    role = principal.role
    allowed: bool
    if role is Role.OPERATOR:
        allowed = True
    elif action is Action.READ_METRICS:
        allowed = False
    elif role is Role.REGULATOR:
        allowed = True
    elif role is Role.EXCHANGE:
        allowed = action is not Action.READ_PROOF and exchange == principal.subject
    else:  # a client: its own proofs, and the statements and log proofs that check them
        allowed = action is not Action.READ_PROOF or account == principal.subject
    if not allowed:
        target = f" of {account}" if action is Action.READ_PROOF else ""
        where = f" on stream {exchange}" if exchange is not None else ""
        raise http.forbidden(f"{principal} may not {action.value}{target}{where}", realm=REALM)


# --- metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamStats:
    stream: str
    statements: int
    last_sequence: int
    last_issued_at: datetime | None
    log_size: int


def format_metrics(
    requests: Mapping[tuple[str, int], int], *, stats: StreamStats | None, now: datetime
) -> str:
    """Prometheus text exposition (format 0.0.4) of the request counters and, when the database
    answered (``stats`` is not None), the stream's statement metrics."""
    lines = http.format_request_counters(requests)
    lines += http.format_family(
        "mcb_database_up",
        "gauge",
        "Whether the database answered this scrape.",
        [({}, 0 if stats is None else 1)],
    )
    if stats is not None:
        stream = {"stream": stats.stream}
        lines += http.format_family(
            "mcb_statements_published_total",
            "counter",
            "Statements stored for the stream.",
            [(stream, stats.statements)],
        )
        lines += http.format_family(
            "mcb_statement_last_sequence",
            "gauge",
            "Sequence of the stream's latest statement.",
            [(stream, stats.last_sequence)],
        )
        lines += http.format_family(
            "mcb_transparency_log_size",
            "gauge",
            "Entries in the stream's transparency log.",
            [(stream, stats.log_size)],
        )
        if stats.last_issued_at is not None:
            age_s = max(0.0, (now - stats.last_issued_at).total_seconds())
            lines += http.format_family(
                "mcb_statement_age_seconds",
                "gauge",
                "Seconds since the latest statement was issued.",
                [(stream, age_s)],
            )
    return "\n".join(lines) + "\n"


# --- reads (blocking; called through asyncio.to_thread) -----------------------------------------


@dataclass(frozen=True, slots=True)
class StoredStatement:
    sequence: int
    digest: bytes
    wire: bytes


def fetch_statement(engine: Engine, *, stream: str, sequence: int | None) -> StoredStatement | None:
    """The stored statement of ``stream`` at ``sequence`` (None: the latest), or None."""
    query = select(
        statements_table.c.sequence, statements_table.c.digest, statements_table.c.wire
    ).where(statements_table.c.stream == stream)
    if sequence is None:
        query = query.order_by(statements_table.c.sequence.desc()).limit(1)
    else:
        query = query.where(statements_table.c.sequence == sequence)

    def work(session: Session) -> StoredStatement | None:
        row = session.connection().execute(query).first()
        if row is None:
            return None
        return StoredStatement(int(row[0]), bytes(row[1]), bytes(row[2]))

    return run_transaction(engine, work, what="reading a statement")


def fetch_stream_stats(engine: Engine, *, stream: str, log: TransparencyLog) -> StreamStats:
    def work(session: Session) -> tuple[int, int | None]:
        row = (
            session.connection()
            .execute(
                select(func.count(), func.max(statements_table.c.sequence)).where(
                    statements_table.c.stream == stream
                )
            )
            .one()
        )
        return int(row[0]), None if row[1] is None else int(row[1])

    count, last = run_transaction(engine, work, what="reading stream metrics")
    issued_at = None
    if last is not None:

        def issued(session: Session) -> datetime:
            value: datetime = (
                session.connection()
                .execute(
                    select(statements_table.c.issued_at).where(
                        statements_table.c.stream == stream, statements_table.c.sequence == last
                    )
                )
                .scalar_one()
            )
            return value

        issued_at = run_transaction(engine, issued, what="reading stream metrics")
    return StreamStats(stream, count, last or 0, issued_at, log.size)


def fetch_client_proof(
    service: AttestationService, *, account: str, asset: str, sequence: int | None = None
) -> tuple[int, ClientProof | None]:
    """(the statement's sequence, ``account``'s proof for its ``asset`` leaf in that statement,
    or None when it has no such leaf), for statement ``sequence`` (None: the latest; 0 and None
    before the first statement). An older statement's proof is rebuilt from the leaf history;
    ProofNotKept when the stream has no statement ``sequence`` or its leaves are not kept."""
    proof = service.client_proof(account=account, asset=asset, sequence=sequence)
    if proof is not None:
        return proof.sequence, proof
    return service.state.sequence if sequence is None else sequence, None


# --- the application ----------------------------------------------------------------------------


def _json(obj: Mapping[str, Any], *, status: int = 200) -> web.Response:
    return http.json_response(obj, status=status)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Api:
    """The handlers and what they share. Every handler authenticates, parses (400), authorizes
    (403), then looks up (404), in that order."""

    def __init__(
        self,
        *,
        service: AttestationService,
        tokens: TokenStore,
        log: TransparencyLog,
        signer: DigestSigner,
        engine: Engine,
        clock: Callable[[], datetime],
        metrics_open: bool,
        checkpoint_max_age_s: float,
    ) -> None:
        self.service = service
        self.tokens = tokens
        self.log = log
        self.signer = signer
        self.engine = engine
        self.clock = clock
        self.metrics_open = metrics_open
        self.checkpoint_max_age_s = checkpoint_max_age_s
        self.requests: Counter[tuple[str, int]] = Counter()
        self._checkpoint: SignedCheckpoint | None = None

    # --- shared steps ---------------------------------------------------------------------------

    def _principal(self, request: web.Request) -> Principal:
        return authenticate(self.tokens, request.headers.get("Authorization"))

    def _stream(self, request: web.Request, principal: Principal, action: Action) -> str:
        """The path's exchange, once the principal may read it and it is this service's."""
        exchange = parse_exchange(request.match_info["exchange"])
        authorize(principal, action, exchange=exchange)
        self._require_stream(exchange)
        return exchange

    def _require_stream(self, exchange: str) -> None:
        if exchange != self.service.state.exchange:
            raise NotFound(f"no stream of exchange {exchange} here")

    async def _statement(self, sequence: int | None) -> StoredStatement:
        stored = await asyncio.to_thread(
            fetch_statement, self.engine, stream=self.service.stream, sequence=sequence
        )
        if stored is None:
            raise NotFound(
                "no statement published yet" if sequence is None else f"no statement {sequence}"
            )
        return stored

    # --- statements -----------------------------------------------------------------------------

    async def latest_statement(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        parse_query(request.query, allowed=frozenset())
        self._stream(request, principal, Action.READ_STATEMENTS)
        stored = await self._statement(None)
        return web.Response(
            body=stored.wire, content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def statement(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        sequence = parse_sequence(request.match_info["sequence"])
        parse_query(request.query, allowed=frozenset())
        self._stream(request, principal, Action.READ_STATEMENTS)
        stored = await self._statement(sequence)
        return web.Response(body=stored.wire, content_type="application/json")

    # --- client proofs --------------------------------------------------------------------------

    async def client_proof(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        exchange = parse_exchange(request.match_info["exchange"])
        account = parse_account(request.match_info["account"])
        asset = parse_asset(request.match_info["asset"])
        query = parse_query(request.query, allowed=frozenset({"sequence"}))
        wanted = parse_sequence(query["sequence"]) if "sequence" in query else None
        authorize(principal, Action.READ_PROOF, exchange=exchange, account=account)
        self._require_stream(exchange)
        try:
            sequence, proof = await asyncio.to_thread(
                fetch_client_proof, self.service, account=account, asset=asset, sequence=wanted
            )
        except ProofNotKept as exc:
            raise NotFound(str(exc)) from exc
        if sequence == 0:
            raise NotFound("no statement published yet")
        if proof is None:
            raise NotFound(f"{account} has no {asset} leaf in statement {sequence}")
        return _json(proof.to_wire())

    # --- transparency log -----------------------------------------------------------------------

    def _sign_checkpoint(self) -> SignedCheckpoint:
        head = self.log.head()
        now = self.clock()
        cached = self._checkpoint
        if (
            cached is not None
            and cached.checkpoint.head == head
            and (now - cached.checkpoint.issued_at).total_seconds() < self.checkpoint_max_age_s
        ):
            return cached
        state = self.service.state
        signed = sign_checkpoint(
            Checkpoint(custodian=state.custodian, log=state.exchange, head=head, issued_at=now),
            signer=self.signer,
        )
        self._checkpoint = signed
        return signed

    async def checkpoint(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        parse_query(request.query, allowed=frozenset())
        self._stream(request, principal, Action.READ_LOG)
        # A checkpoint is re-signed only when the log grew or the last one aged, so a burst of
        # requests does not become a burst of HSM signatures.
        signed = await asyncio.to_thread(self._sign_checkpoint)
        return web.Response(body=signed.encode(), content_type="application/json")

    async def log_inclusion(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        sequence = parse_sequence(request.match_info["sequence"])
        query = parse_query(request.query, allowed=frozenset({"size"}))
        size = parse_tree_size(query["size"], what="size") if "size" in query else None
        self._stream(request, principal, Action.READ_LOG)
        stored = await self._statement(sequence)
        index = self.log.index_of(stored.digest)
        if index is None:
            raise NotFound(f"statement {sequence} is not in the log yet")
        current = self.log.size
        if size is not None and size > current:
            raise NotFound(f"the log has {current} entries, not {size}")
        if size is not None and size <= index:
            raise BadRequest(f"statement {sequence} is entry {index}: not in a tree of size {size}")
        proof = await asyncio.to_thread(self.log.prove_inclusion, index, size)
        return _json(proof.to_wire())

    async def log_consistency(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        query = parse_query(request.query, allowed=frozenset({"from", "to"}))
        if "from" not in query:
            raise BadRequest("the query parameter 'from' (the old tree size) is required")
        old = parse_tree_size(query["from"], what="from")
        new = parse_tree_size(query["to"], what="to") if "to" in query else None
        self._stream(request, principal, Action.READ_LOG)
        current = self.log.size
        if (new if new is not None else old) > current:
            raise NotFound(f"the log has {current} entries")
        if new is not None and old > new:
            raise BadRequest(f"from {old} is above to {new}")
        proof = await asyncio.to_thread(self.log.prove_consistency, old, new)
        return _json(proof.to_wire())

    # --- operations -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        try:
            await asyncio.to_thread(check_database, self.engine)
        except TransientError as exc:
            logger.warning("health: %s", exc)
            return _json({"database": "unreachable", "status": "unavailable"}, status=503)
        return _json({"database": "ok", "status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.metrics_open:
            authorize(self._principal(request), Action.READ_METRICS)
        parse_query(request.query, allowed=frozenset())
        stats: StreamStats | None
        try:
            stats = await asyncio.to_thread(
                fetch_stream_stats, self.engine, stream=self.service.stream, log=self.log
            )
        except TransientError as exc:
            logger.warning("metrics: %s", exc)
            stats = None
        body = format_metrics(self.requests, stats=stats, now=self.clock())
        return http.text_response(body)


_API: Final = web.AppKey("custodian_api", _Api)

ROUTES: Final[Sequence[tuple[str, str]]] = (
    ("/v1/streams/{exchange}/statements/latest", "latest_statement"),
    ("/v1/streams/{exchange}/statements/{sequence}", "statement"),
    ("/v1/streams/{exchange}/proofs/{account}/{asset}", "client_proof"),
    ("/v1/streams/{exchange}/log/checkpoint", "checkpoint"),
    ("/v1/streams/{exchange}/log/inclusion/{sequence}", "log_inclusion"),
    ("/v1/streams/{exchange}/log/consistency", "log_consistency"),
    ("/health", "health"),
    ("/metrics", "metrics"),
)
"""Every route (all GET), in matching order: ``statements/latest`` before ``{sequence}``."""


def create_app(
    *,
    service: AttestationService,
    tokens: TokenStore,
    log: TransparencyLog,
    signer: DigestSigner,
    engine: Engine | None = None,
    clock: Callable[[], datetime] = _utc_now,
    metrics_open: bool = False,
    checkpoint_max_age_s: float = DEFAULT_CHECKPOINT_MAX_AGE_S,
    client_max_size: int = DEFAULT_CLIENT_MAX_SIZE,
) -> web.Application:
    """The API of ``service``'s stream. ``log`` is the stream's transparency log and ``signer``
    the custodian key that signs its checkpoints. ``engine`` is the database read for
    statements and probed by /health (default: the service's). ``metrics_open`` serves /metrics
    without a token (for a scraper on a private network)."""
    if checkpoint_max_age_s <= 0:
        raise ConfigurationError("checkpoint_max_age_s must be positive")
    api = _Api(
        service=service,
        tokens=tokens,
        log=log,
        signer=signer,
        engine=service.engine if engine is None else engine,
        clock=clock,
        metrics_open=metrics_open,
        checkpoint_max_age_s=checkpoint_max_age_s,
    )
    middleware = http.create_problem_middleware(api.requests, service="custodian")
    app = web.Application(middlewares=[middleware], client_max_size=client_max_size)
    app[_API] = api
    for path, name in ROUTES:
        app.router.add_get(path, getattr(api, name), name=name, allow_head=False)
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
    """Serve ``app`` on ``host``:``port`` until ``stop`` is set (or the task is cancelled), then
    close the listener and wait up to ``shutdown_timeout_s`` for requests in flight.
    ``on_ready`` receives the bound addresses (useful with port 0)."""
    await http.run_server(
        app,
        host,
        port,
        stop=stop,
        on_ready=on_ready,
        shutdown_timeout_s=shutdown_timeout_s,
        name="custodian API",
    )
