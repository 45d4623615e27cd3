"""The custodian's HTTP API (aiohttp): signed statements, client inclusion proofs, signed log
checkpoints and transparency-log proofs of one (custodian, exchange) stream, plus health and
Prometheus metrics. Every body is the canonical (RFC 8785) wire form of the object from
:mod:`attestations`, so what a client fetches is exactly what it verifies.

The module has a pure part and a thin I/O part:

* Pure, testable without a server: bearer-token authentication against a :class:`TokenStore`
  (tokens kept only as SHA-256 hashes, compared with :func:`hmac.compare_digest`), the
  :class:`Principal` a token stands for, :func:`authorize` (one table of who may read what),
  the ``parse_*`` functions for path and query values, and :func:`format_metrics`.
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

What it does not do: publish statements (the service does), keep old trees (only the latest
statement's client proofs are served: the service keeps only its current trees), issue or
rotate tokens (an operator writes the token file), or terminate TLS (run it behind a proxy that
does). The proofs come from the trees of the :class:`~custodian.service.AttestationService`
object passed in, so the API runs in the process that publishes the stream.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from attestations.amounts import validate_asset_code
from attestations.canonical import compute_canonical_bytes
from attestations.checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint
from attestations.disclosure import ClientProof
from attestations.errors import (
    ConfigurationError,
    CounterpartyError,
    DecodeError,
    TransientError,
)
from attestations.merkle import validate_account
from attestations.p256 import DigestSigner
from attestations.statement import MAX_SEQUENCE, validate_party
from attestations.translog import MAX_TREE_SIZE, TransparencyLog
from bridge.outbox import run_transaction
from custodian.service import AttestationService, statements_table

logger = logging.getLogger(__name__)

REALM: Final = "mcb-custodian"
MIN_TOKEN_CHARS: Final = 32
"""Shortest token accepted into a store: 32 characters of base64url carry 192 bits."""
DEFAULT_CHECKPOINT_MAX_AGE_S: Final = 60.0
DEFAULT_CLIENT_MAX_SIZE: Final = 16 * 1024
"""Every endpoint is a GET; a request body this large is already a mistake (413)."""

_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token
_DECIMAL_RE: Final = re.compile(r"0|[1-9][0-9]*")
_MAX_DECIMAL_CHARS: Final = 16  # MAX_SEQUENCE and MAX_TREE_SIZE have 16 digits
_HASH_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")


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
        role, _, subject = value.partition(":")
        if role not in Role.__members__.values():
            raise ConfigurationError(f"principal {value[:70]!r}: unknown role {role[:20]!r}")
        if Role(role) is Role.OPERATOR:
            if subject:
                raise ConfigurationError("the operator principal is written 'operator'")
            return cls(Role.OPERATOR)
        return cls(Role(role), subject)

    def __str__(self) -> str:
        return self.role.value if self.subject is None else f"{self.role}:{self.subject}"


def compute_token_hash(token: str) -> bytes:
    """SHA-256 of the token's UTF-8 bytes: what a :class:`TokenStore` keeps instead of it."""
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenStore:
    """Bearer tokens, kept only as SHA-256 hashes, each mapped to one :class:`Principal`.

    The token file (:meth:`load`) has one ``<sha256 hex> <principal>`` per line; blank lines and
    lines starting with ``#`` are ignored. A stolen file does not reveal the tokens."""

    def __init__(self) -> None:
        self._entries: list[tuple[bytes, Principal]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add_hash(self, digest: bytes, principal: Principal) -> None:
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise ConfigurationError("a token hash is 32 bytes of SHA-256")
        if any(hmac.compare_digest(digest, known) for known, _ in self._entries):
            raise ConfigurationError("the same token is listed twice")
        self._entries.append((digest, principal))

    def add(self, token: str, principal: Principal) -> None:
        """Accept ``token`` for ``principal`` (tests and tools; production loads hashes)."""
        if len(token) < MIN_TOKEN_CHARS or not _TOKEN_RE.fullmatch(token):
            raise ConfigurationError(
                f"a token is at least {MIN_TOKEN_CHARS} characters of [A-Za-z0-9._~+/-]"
            )
        self.add_hash(compute_token_hash(token), principal)

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> TokenStore:
        store = cls()
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            digest, _, principal = line.partition(" ")
            if not _HASH_HEX_RE.fullmatch(digest):
                raise ConfigurationError(f"token file line {number}: expected '<sha256 hex> ...'")
            store.add_hash(bytes.fromhex(digest), Principal.parse(principal.strip()))
        return store

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        try:
            content = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read the token file {path}: {exc}") from exc
        return cls.from_lines(content.splitlines())

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or None. Compares against every entry, without stopping
        at a match, so the time taken does not tell which entry matched."""
        candidate = compute_token_hash(token)
        found: Principal | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = principal
        return found


# --- errors as HTTP answers ---------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 2xx, with its JSON body ``{"error": reason, "detail": text}``."""

    status: int = 400
    reason: str = "bad_request"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    status = 400
    reason = "bad_request"


class Unauthorized(ApiError):
    status = 401
    reason = "unauthorized"


class Forbidden(ApiError):
    status = 403
    reason = "forbidden"


class NotFound(ApiError):
    status = 404
    reason = "not_found"


def compute_problem_body(reason: str, detail: str) -> bytes:
    return compute_canonical_bytes({"detail": detail, "error": reason})


def _problem(
    status: int, reason: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=compute_problem_body(reason, detail),
        content_type="application/json",
        headers=dict(headers or {}),
    )


# --- parsing ------------------------------------------------------------------------------------


def parse_bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; Unauthorized otherwise."""
    if header is None:
        raise Unauthorized(
            "this endpoint needs a bearer token",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN_RE.fullmatch(token):
        raise Unauthorized(
            "the Authorization header must be 'Bearer <token>'",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_request"'},
        )
    return token


def authenticate(tokens: TokenStore, header: str | None) -> Principal:
    principal = tokens.authenticate(parse_bearer(header))
    if principal is None:
        raise Unauthorized(
            "unknown or revoked token",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
        )
    return principal


def _as_bad_request(parse: Callable[[], str], what: str) -> str:
    try:
        return parse()
    except DecodeError as exc:
        raise BadRequest(f"{what}: {exc}") from exc


def parse_exchange(value: str) -> str:
    return _as_bad_request(lambda: validate_party(value, what="exchange"), "exchange")


def parse_account(value: str) -> str:
    return _as_bad_request(lambda: validate_account(value), "account")


def parse_asset(value: str) -> str:
    return _as_bad_request(lambda: validate_asset_code(value), "asset")


def parse_decimal(value: str, *, what: str, low: int, high: int) -> int:
    """A decimal integer in ``[low, high]`` written without sign or leading zeros. The length is
    checked before :func:`int` so a huge string costs nothing."""
    if len(value) > _MAX_DECIMAL_CHARS or not _DECIMAL_RE.fullmatch(value):
        raise BadRequest(f"{what} {value[:24]!r} must be a decimal integer in {low}..{high}")
    number = int(value)
    if not low <= number <= high:
        raise BadRequest(f"{what} {number} outside {low}..{high}")
    return number


def parse_sequence(value: str) -> int:
    return parse_decimal(value, what="sequence", low=1, high=MAX_SEQUENCE)


def parse_tree_size(value: str, *, what: str) -> int:
    return parse_decimal(value, what=what, low=0, high=MAX_TREE_SIZE)


def parse_query(query: Mapping[str, str], *, allowed: frozenset[str]) -> dict[str, str]:
    """The query parameters, refusing unknown and repeated ones (a typo must not pass silently
    as the default)."""
    keys = set(query)
    if unknown := sorted(keys - allowed):
        raise BadRequest(f"unknown query parameters {unknown[:5]}; allowed {sorted(allowed)}")
    # A multidict iterates each key once but counts every value.
    if len(query) != len(keys):
        raise BadRequest("a query parameter is repeated")
    return {key: query[key] for key in keys}


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
        raise Forbidden(
            f"{principal} may not {action.value}{target}{where}",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'},
        )


# --- metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamStats:
    stream: str
    statements: int
    last_sequence: int
    last_issued_at: datetime | None
    log_size: int


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def format_metrics(
    requests: Mapping[tuple[str, int], int], *, stats: StreamStats | None, now: datetime
) -> str:
    """Prometheus text exposition (format 0.0.4) of the request counters and, when the database
    answered (``stats`` is not None), the stream's statement metrics."""
    lines = [
        "# HELP mcb_api_requests_total HTTP requests answered, by endpoint and status.",
        "# TYPE mcb_api_requests_total counter",
    ]
    for (endpoint, status), count in sorted(requests.items()):
        lines.append(
            f"mcb_api_requests_total{_labels(endpoint=endpoint, status=str(status))} {count}"
        )
    lines += [
        "# HELP mcb_database_up Whether the database answered this scrape.",
        "# TYPE mcb_database_up gauge",
        f"mcb_database_up {0 if stats is None else 1}",
    ]
    if stats is not None:
        stream = _labels(stream=stats.stream)
        lines += [
            "# HELP mcb_statements_published_total Statements stored for the stream.",
            "# TYPE mcb_statements_published_total counter",
            f"mcb_statements_published_total{stream} {stats.statements}",
            "# HELP mcb_statement_last_sequence Sequence of the stream's latest statement.",
            "# TYPE mcb_statement_last_sequence gauge",
            f"mcb_statement_last_sequence{stream} {stats.last_sequence}",
            "# HELP mcb_transparency_log_size Entries in the stream's transparency log.",
            "# TYPE mcb_transparency_log_size gauge",
            f"mcb_transparency_log_size{stream} {stats.log_size}",
        ]
        if stats.last_issued_at is not None:
            age_s = max(0.0, (now - stats.last_issued_at).total_seconds())
            lines += [
                "# HELP mcb_statement_age_seconds Seconds since the latest statement was issued.",
                "# TYPE mcb_statement_age_seconds gauge",
                f"mcb_statement_age_seconds{stream} {age_s:.3f}",
            ]
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


def check_database(engine: Engine) -> None:
    """Raise TransientError unless the database answers ``SELECT 1``."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise TransientError(f"database unreachable: {type(exc).__name__}") from exc


def fetch_client_proof(
    service: AttestationService, *, account: str, asset: str
) -> tuple[int, ClientProof | None]:
    """(the stream's latest sequence, ``account``'s proof for its ``asset`` leaf in that
    statement, or None when it has no such leaf). 0 and None before the first statement."""
    proof = service.client_proof(account=account, asset=asset)
    return service.state.sequence if proof is None else proof.sequence, proof


# --- the application ----------------------------------------------------------------------------


def _json(obj: Mapping[str, Any], *, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=compute_canonical_bytes(obj), content_type="application/json"
    )


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
        latest, proof = await asyncio.to_thread(
            fetch_client_proof, self.service, account=account, asset=asset
        )
        if latest == 0:
            raise NotFound("no statement published yet")
        if wanted is not None and wanted != latest:
            raise NotFound(
                f"only the latest statement's proofs are served (statement {latest}); the "
                f"custodian does not keep the trees of statement {wanted}"
            )
        if proof is None:
            raise NotFound(f"{account} has no {asset} leaf in statement {latest}")
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
        return web.Response(
            text=body, content_type="text/plain", headers={"X-Content-Type-Options": "nosniff"}
        )

    # --- errors and counting --------------------------------------------------------------------

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _problem(exc.status, exc.reason, exc.detail, exc.headers)
        except web.HTTPException as exc:
            # aiohttp's own answers (unknown path 404, 405 with Allow, 413): same JSON shape.
            if exc.status < 400:
                raise
            reason = (exc.reason or "error").lower().replace(" ", "_")
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            response = _problem(exc.status, reason, exc.reason or "", headers)
        except CounterpartyError as exc:
            response = _problem(400, exc.reason, str(exc))
        except TransientError as exc:
            logger.warning("%s %s: %s", request.method, request.path, exc)
            response = _problem(503, exc.reason, "try again later", {"Retry-After": "1"})
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            response = _problem(500, "internal", "the custodian could not answer; see its log")
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        self.requests[(endpoint, response.status)] += 1
        return response


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
    app = web.Application(middlewares=[api.middleware], client_max_size=client_max_size)
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
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        logger.info("custodian API listening on %s", runner.addresses)
        if on_ready is not None:
            on_ready(list(runner.addresses))
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
