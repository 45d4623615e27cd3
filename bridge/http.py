"""The HTTP edge the services' APIs share (aiohttp): bearer tokens kept only as hashes, principals
written ``role[:subject]``, JSON problem answers, strict path, query and body parsing, the error
middleware that maps the error hierarchy to status codes and counts every answer, Prometheus text
formatting, a database probe and the serve loop.

Each API (custodian/api.py, exchange/api.py) keeps what is its own: its roles and principal
type (a subclass of :class:`TokenStore` parses them), its authorization table, its handlers and
its metrics. This module knows nothing of statements, ledgers or streams.

Every error answer has one shape, a JSON object ``{"error": reason, "detail": text}`` (the
problem-details idea of RFC 7807 reduced to two members, in canonical bytes): 400 for malformed
input, 401 with ``WWW-Authenticate`` without a valid token, 403 outside the token's scope, 404,
405 with ``Allow``, 409 for a request that conflicts with the state, 413 for an oversized body,
415 for a body that is not JSON, 503 with ``Retry-After`` when a dependency (the database) is
unavailable. Bad input never produces a 500; an unexpected exception does, logged with its
traceback, with a detail that reveals nothing.

What it does not do: issue or rotate tokens (an operator writes the token file), terminate TLS
(run behind a proxy that does), or rate-limit.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Generic, Self, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from attestations.canonical import compute_canonical_bytes, parse_json_object
from attestations.errors import (
    ConfigurationError,
    CounterpartyError,
    DecodeError,
    TransientError,
)

logger = logging.getLogger(__name__)

MIN_TOKEN_CHARS: Final = 32
"""Shortest token accepted into a store: 32 characters of base64url carry 192 bits."""
MAX_DECIMAL_CHARS: Final = 16
"""Longest decimal integer :func:`parse_decimal` reads (2**53 - 1 has 16 digits)."""
JSON_CONTENT_TYPE: Final = "application/json"

TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token
_DECIMAL_RE: Final = re.compile(r"0|[1-9][0-9]*")
_HASH_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")

P = TypeVar("P")
R = TypeVar("R", bound=enum.StrEnum)


# --- principals and tokens ----------------------------------------------------------------------


def split_principal(
    value: str, roles: type[R], *, without_subject: frozenset[R]
) -> tuple[R, str | None]:
    """``role`` or ``role:subject`` as (role, subject): roles in ``without_subject`` are written
    alone, every other role needs a subject (validated by the caller's principal type)."""
    role_text, colon, subject = value.partition(":")
    try:
        role = roles(role_text)
    except ValueError:
        raise ConfigurationError(
            f"principal {value[:70]!r}: unknown role {role_text[:20]!r}"
        ) from None
    if role in without_subject:
        if colon:
            raise ConfigurationError(f"the {role} principal is written {role.value!r}")
        return role, None
    return role, subject


def compute_token_hash(token: str) -> bytes:
    """SHA-256 of the token's UTF-8 bytes: what a :class:`TokenStore` keeps instead of it."""
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenStore(Generic[P]):
    """Bearer tokens, kept only as SHA-256 hashes, each mapped to one principal.

    The token file (:meth:`load`) has one ``<sha256 hex> <principal>`` per line; blank lines and
    lines starting with ``#`` are ignored. A stolen file does not reveal the tokens. A subclass
    says how a principal is read (:meth:`parse_principal`)."""

    def __init__(self) -> None:
        self._entries: list[tuple[bytes, P]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def parse_principal(self, value: str) -> P:
        """The principal written ``value`` in a token file; ConfigurationError when malformed."""
        raise NotImplementedError

    def add_hash(self, digest: bytes, principal: P) -> None:
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise ConfigurationError("a token hash is 32 bytes of SHA-256")
        if any(hmac.compare_digest(digest, known) for known, _ in self._entries):
            raise ConfigurationError("the same token is listed twice")
        self._entries.append((digest, principal))

    def add(self, token: str, principal: P) -> None:
        """Accept ``token`` for ``principal`` (tests and tools; production loads hashes)."""
        if len(token) < MIN_TOKEN_CHARS or not TOKEN_RE.fullmatch(token):
            raise ConfigurationError(
                f"a token is at least {MIN_TOKEN_CHARS} characters of [A-Za-z0-9._~+/-]"
            )
        self.add_hash(compute_token_hash(token), principal)

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> Self:
        store = cls()
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            digest, _, principal = line.partition(" ")
            if not _HASH_HEX_RE.fullmatch(digest):
                raise ConfigurationError(f"token file line {number}: expected '<sha256 hex> ...'")
            try:
                parsed = store.parse_principal(principal.strip())
            except ConfigurationError as exc:
                raise ConfigurationError(f"token file line {number}: {exc}") from exc
            store.add_hash(bytes.fromhex(digest), parsed)
        return store

    @classmethod
    def load(cls, path: Path) -> Self:
        try:
            content = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read the token file {path}: {exc}") from exc
        return cls.from_lines(content.splitlines())

    def authenticate(self, token: str) -> P | None:
        """The principal of ``token``, or None. Compares against every entry, without stopping
        at a match, so the time taken does not tell which entry matched."""
        candidate = compute_token_hash(token)
        found: P | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = principal
        return found


# --- errors as HTTP answers ---------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 2xx, with its JSON body ``{"error": reason, "detail": text}``.
    ``reason`` may be given per instance (a domain error's own reason code)."""

    status: int = 400
    reason: str = "bad_request"

    def __init__(
        self, detail: str, *, headers: Mapping[str, str] | None = None, reason: str | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        if reason is not None:
            self.reason = reason


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


class Conflict(ApiError):
    status = 409
    reason = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    reason = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    reason = "unsupported_media_type"


def compute_problem_body(reason: str, detail: str) -> bytes:
    return compute_canonical_bytes({"detail": detail, "error": reason})


def problem_response(
    status: int, reason: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=compute_problem_body(reason, detail),
        content_type=JSON_CONTENT_TYPE,
        headers=dict(headers or {}),
    )


def json_response(
    obj: Mapping[str, Any], *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """``obj`` in canonical (RFC 8785) bytes: what a client reads is what a verifier hashes."""
    return web.Response(
        status=status,
        body=compute_canonical_bytes(obj),
        content_type=JSON_CONTENT_TYPE,
        headers=dict(headers or {}),
    )


def text_response(body: str) -> web.Response:
    """Plain text (the Prometheus exposition), never sniffed as anything else."""
    return web.Response(
        text=body, content_type="text/plain", headers={"X-Content-Type-Options": "nosniff"}
    )


# --- authentication -----------------------------------------------------------------------------


def parse_bearer(header: str | None, *, realm: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; Unauthorized otherwise."""
    if header is None:
        raise Unauthorized(
            "this endpoint needs a bearer token",
            headers={"WWW-Authenticate": f'Bearer realm="{realm}"'},
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not TOKEN_RE.fullmatch(token):
        raise Unauthorized(
            "the Authorization header must be 'Bearer <token>'",
            headers={"WWW-Authenticate": f'Bearer realm="{realm}", error="invalid_request"'},
        )
    return token


def authenticate(tokens: TokenStore[P], header: str | None, *, realm: str) -> P:
    principal = tokens.authenticate(parse_bearer(header, realm=realm))
    if principal is None:
        raise Unauthorized(
            "unknown or revoked token",
            headers={"WWW-Authenticate": f'Bearer realm="{realm}", error="invalid_token"'},
        )
    return principal


def forbidden(detail: str, *, realm: str) -> Forbidden:
    """The 403 of a valid token asking outside its scope (RFC 6750 ``insufficient_scope``)."""
    return Forbidden(
        detail, headers={"WWW-Authenticate": f'Bearer realm="{realm}", error="insufficient_scope"'}
    )


# --- parsing ------------------------------------------------------------------------------------


def as_bad_request(parse: Callable[[], P], what: str) -> P:
    """The result of ``parse``, or BadRequest naming ``what`` when it raises DecodeError."""
    try:
        return parse()
    except DecodeError as exc:
        raise BadRequest(f"{what}: {exc}") from exc


def parse_decimal(value: str, *, what: str, low: int, high: int) -> int:
    """A decimal integer in ``[low, high]`` written without sign or leading zeros. The length is
    checked before :func:`int` so a huge string costs nothing."""
    if len(value) > MAX_DECIMAL_CHARS or not _DECIMAL_RE.fullmatch(value):
        raise BadRequest(f"{what} {value[:24]!r} must be a decimal integer in {low}..{high}")
    number = int(value)
    if not low <= number <= high:
        raise BadRequest(f"{what} {number} outside {low}..{high}")
    return number


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


async def read_json_body(request: web.Request, *, max_bytes: int) -> dict[str, Any]:
    """The request's body as one strictly parsed JSON object (attestations.canonical: no
    floats, no duplicate keys, bounded nesting): 415 unless it is declared JSON, 413 above
    ``max_bytes`` (checked on the declared length first, then on what arrives), 400 when it does
    not parse."""
    if request.content_type != JSON_CONTENT_TYPE:
        raise UnsupportedMediaType(f"the body must be {JSON_CONTENT_TYPE}")
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(f"the body is limited to {max_bytes} bytes")
    try:
        data = await request.content.read(max_bytes + 1)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise BadRequest(f"the body could not be read: {type(exc).__name__}") from exc
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the body is limited to {max_bytes} bytes")
    return as_bad_request(lambda: parse_json_object(data, max_bytes=max_bytes), "body")


# --- the middleware: errors and counting --------------------------------------------------------


def create_problem_middleware(requests: Counter[tuple[str, int]], *, service: str) -> Middleware:
    """A middleware answering every error in the problem shape and counting each answer in
    ``requests`` by (route, status): ApiError as itself, aiohttp's own answers (unknown path,
    405 with ``Allow``, 413) in the same shape, a CounterpartyError as 400 with its reason, a
    TransientError as 503, anything else as 500 (logged). ``service`` names the answering
    service in the 500 detail."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            response = await handler(request)
        except ApiError as exc:
            response = problem_response(exc.status, exc.reason, exc.detail, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = (exc.reason or "error").lower().replace(" ", "_")
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            response = problem_response(exc.status, reason, exc.reason or "", headers)
        except CounterpartyError as exc:
            response = problem_response(400, exc.reason, str(exc))
        except TransientError as exc:
            logger.warning("%s %s: %s", request.method, request.path, exc)
            response = problem_response(503, exc.reason, "try again later", {"Retry-After": "1"})
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            response = problem_response(
                500, "internal", f"the {service} could not answer; see its log"
            )
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        requests[(endpoint, response.status)] += 1
        return response

    return middleware


# --- Prometheus text ----------------------------------------------------------------------------


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_labels(**labels: str) -> str:
    """``{name="value",...}`` with the values escaped; empty when there are no labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


def format_family(
    name: str,
    kind: str,
    help_text: str,
    samples: Iterable[tuple[Mapping[str, str], int | float]],
) -> list[str]:
    """The lines of one metric family (text exposition format 0.0.4): HELP, TYPE, then one line
    per (labels, value). Floats are written with millisecond precision."""
    if kind not in {"counter", "gauge"}:
        raise ValueError(f"unsupported metric type {kind!r}")
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        number = f"{value:.3f}" if isinstance(value, float) else str(int(value))
        lines.append(f"{name}{format_labels(**labels)} {number}")
    return lines


def format_request_counters(requests: Mapping[tuple[str, int], int]) -> list[str]:
    return format_family(
        "mcb_api_requests_total",
        "counter",
        "HTTP requests answered, by endpoint and status.",
        (
            ({"endpoint": endpoint, "status": str(status)}, count)
            for (endpoint, status), count in sorted(requests.items())
        ),
    )


# --- database probe and serving -----------------------------------------------------------------


def check_database(engine: Engine) -> None:
    """Raise TransientError unless the database answers ``SELECT 1``."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise TransientError(f"database unreachable: {type(exc).__name__}") from exc


async def run_server(
    app: web.Application,
    host: str,
    port: int,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[list[Any]], None] | None = None,
    shutdown_timeout_s: float = 5.0,
    name: str = "API",
) -> None:
    """Serve ``app`` on ``host``:``port`` until ``stop`` is set (or the task is cancelled), then
    close the listener and wait up to ``shutdown_timeout_s`` for requests in flight.
    ``on_ready`` receives the bound addresses (useful with port 0)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        logger.info("%s listening on %s", name, runner.addresses)
        if on_ready is not None:
            on_ready(list(runner.addresses))
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
