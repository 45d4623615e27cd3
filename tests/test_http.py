"""The shared HTTP edge (bridge/http.py): token stores with their own principal type, principal
parsing, the problem middleware's mapping of every error to one JSON shape and a counted status,
strict JSON bodies (415, 413, 400), query parsing and the Prometheus text helpers."""

from __future__ import annotations

import enum
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from attestations.errors import (
    ConfigurationError,
    DecodeError,
    InvariantViolation,
    SequenceGap,
    TransientError,
)
from bridge import http


class Kind(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


class Store(http.TokenStore[tuple[Kind, str | None]]):
    def parse_principal(self, value: str) -> tuple[Kind, str | None]:
        kind, subject = http.split_principal(value, Kind, without_subject=frozenset({Kind.ADMIN}))
        if kind is Kind.USER and not subject:
            raise ConfigurationError("a user has a name")
        return kind, subject


TOKEN = secrets.token_urlsafe(32)
ADMIN_TOKEN = secrets.token_urlsafe(32)


def test_a_token_store_parses_its_own_principals_and_keeps_hashes() -> None:
    store = Store.from_lines(
        [
            "# tokens",
            f"{http.compute_token_hash(TOKEN).hex()} user:ann",
            f"{http.compute_token_hash(ADMIN_TOKEN).hex()} admin",
        ]
    )
    assert len(store) == 2
    assert store.authenticate(TOKEN) == (Kind.USER, "ann")
    assert store.authenticate(ADMIN_TOKEN) == (Kind.ADMIN, None)
    assert store.authenticate(secrets.token_urlsafe(32)) is None
    assert http.authenticate(store, f"Bearer {TOKEN}", realm="r") == (Kind.USER, "ann")
    with pytest.raises(http.Unauthorized) as caught:
        http.authenticate(store, f"Bearer {'x' * 43}", realm="r")
    assert caught.value.headers["WWW-Authenticate"] == 'Bearer realm="r", error="invalid_token"'


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("nothex user:ann", "line 1: expected"),
        (f"{'0' * 64} root", "line 1: .*unknown role"),
        (f"{'0' * 64} admin:me", "line 1: the admin principal is written 'admin'"),
        (f"{'0' * 64} user", "line 1: a user has a name"),
    ],
)
def test_malformed_token_files_name_the_line(line: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Store.from_lines([line])


def test_the_base_store_has_no_principal_syntax() -> None:
    with pytest.raises(NotImplementedError):
        http.TokenStore[str].from_lines([f"{'0' * 64} anyone"])


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [("", 0, 9), ("-1", 0, 9), ("01", 0, 9), ("10", 0, 9), ("1" * 17, 0, 10**18), ("٣", 0, 9)],
)
def test_parse_decimal_refuses(value: str, low: int, high: int) -> None:
    with pytest.raises(http.BadRequest):
        http.parse_decimal(value, what="n", low=low, high=high)


def test_parse_query_refuses_unknown_and_repeated() -> None:
    from multidict import MultiDict

    assert http.parse_query(MultiDict([("a", "1")]), allowed=frozenset({"a"})) == {"a": "1"}
    with pytest.raises(http.BadRequest, match="unknown"):
        http.parse_query(MultiDict([("b", "1")]), allowed=frozenset({"a"}))
    with pytest.raises(http.BadRequest, match="repeated"):
        http.parse_query(MultiDict([("a", "1"), ("a", "2")]), allowed=frozenset({"a"}))


def test_as_bad_request_wraps_only_decode_errors() -> None:
    def bad() -> str:
        raise DecodeError("nope")

    with pytest.raises(http.BadRequest, match="thing: nope"):
        http.as_bad_request(bad, "thing")
    assert http.as_bad_request(lambda: 7, "thing") == 7


# --- the middleware and bodies ------------------------------------------------------------------


MAX_BODY = 256


async def echo(request: web.Request) -> web.Response:
    body = await http.read_json_body(request, max_bytes=MAX_BODY)
    return http.json_response({"got": body})


async def fail(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    errors: dict[str, Exception] = {
        "conflict": http.Conflict("taken", reason="stream_not_frozen"),
        "counterparty": SequenceGap("gap"),
        "transient": TransientError("database down"),
        "bug": InvariantViolation("secret internals"),
    }
    raise errors[kind]


REQUESTS = web.AppKey("requests", Counter)


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    requests: Counter[tuple[str, int]] = Counter()
    app = web.Application(middlewares=[http.create_problem_middleware(requests, service="test")])
    app[REQUESTS] = requests
    app.router.add_post("/echo", echo)
    app.router.add_get("/fail/{kind}", fail)
    async with TestClient(TestServer(app)) as opened:
        yield opened


Client = TestClient[web.Request, web.Application]


async def answer(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    return body


async def test_a_json_body_is_read_strictly(client: Client) -> None:
    ok = await client.post("/echo", data=b'{"a":"1"}', headers={"Content-Type": "application/json"})
    assert await answer(ok, 200) == {"got": {"a": "1"}}
    cases = [
        (b'{"a":1.5}', "application/json", 400),  # floats never pass
        (b'{"a":"1","a":"2"}', "application/json", 400),  # duplicate keys
        (b"[1]", "application/json", 400),
        (b"\xff", "application/json", 400),
        (b'{"a":"1"}', "text/plain", 415),
        (b'{"a":"' + b"x" * MAX_BODY + b'"}', "application/json", 413),
    ]
    for data, content_type, status in cases:
        response = await client.post("/echo", data=data, headers={"Content-Type": content_type})
        body = await answer(response, status)
        assert set(body) == {"error", "detail"}, data


async def test_errors_map_to_statuses_in_one_shape(client: Client) -> None:
    assert (await answer(await client.get("/fail/conflict"), 409))["error"] == "stream_not_frozen"
    assert (await answer(await client.get("/fail/counterparty"), 400))["error"] == "sequence_gap"
    response = await client.get("/fail/transient")
    assert response.headers["Retry-After"] == "1"
    await answer(response, 503)
    body = await answer(await client.get("/fail/bug"), 500)
    assert "secret" not in body["detail"]
    response = await client.get("/echo")
    assert response.headers["Allow"] == "POST"
    await answer(response, 405)
    await answer(await client.get("/nowhere"), 404)
    requests = client.app[REQUESTS]
    assert requests[("/fail/{kind}", 500)] == 1
    assert requests[("unmatched", 404)] == 1


def test_metric_families_format_and_escape() -> None:
    lines = http.format_family(
        "x_total", "counter", "Things.", [({"a": 'q"\\\n'}, 3), ({}, 1.25), ({"b": "c"}, 2)]
    )
    assert lines == [
        "# HELP x_total Things.",
        "# TYPE x_total counter",
        'x_total{a="q\\"\\\\\\n"} 3',
        "x_total 1.250",
        'x_total{b="c"} 2',
    ]
    assert re.fullmatch(
        r'mcb_api_requests_total\{endpoint="/a",status="200"\} 4',
        http.format_request_counters({("/a", 200): 4})[2],
    )
    with pytest.raises(ValueError, match="histogram"):
        http.format_family("h", "histogram", "no", [])
