"""The exchange's HTTP API on SQLite and PostgreSQL: each principal's scope, exposure reports and
pre-trade checks end to end through the desk, the audit journal in pages, fork resolution,
signed snapshots that verify, metrics, and 4xx (never 500) for malformed, oversized, replayed,
stale and unauthenticated input. The OpenAPI document lists exactly the routes served."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import Engine

from attestations.canonical import compute_canonical_bytes
from attestations.errors import ConfigurationError
from attestations.notices import PositionsSnapshot, SignedNotice, verify_notice
from bridge.http import Forbidden, compute_token_hash
from exchange.api import ROUTES, Action, Principal, Role, TokenStore, authorize, create_app
from exchange.desk import MarginDesk
from exchange.ledger import MarginLedger
from exchange.store import create_exchange_engine, migrate
from tests.test_exchange_desk import BTC, DECIMALS, EXCHANGE, POLICY, SIGNER, T0, A, credit
from tests.test_exchange_desk import registry as exchange_registry

NOW = T0 + timedelta(seconds=30)
OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "exchange-openapi.yaml"
PRINCIPALS = {
    "alice": "client:alice",
    "bob": "client:bob",
    "engine": "engine:matching",
    "auditor": "auditor:kpmg",
    "regulator": "regulator:fca",
    "operator": "operator:olga",
}
TOKENS = {name: secrets.token_urlsafe(32) for name in PRINCIPALS}
STREAM_PATH = A.replace("/", "%2F")


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def tokens() -> TokenStore:
    return TokenStore.from_lines(
        f"{compute_token_hash(TOKENS[n]).hex()} {p}" for n, p in PRINCIPALS.items()
    )


def report_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "client": "alice",
        "exchange": EXCHANGE,
        "exposure": "100000",
        "quote": "USD",
        "report_id": "r-1",
        "reported_at": "2026-03-02T09:00:10.000Z",
        "requirement": "5000000",
        "unrealised_pnl": "0",
        "version": 1,
    }
    body.update(changes)
    return body


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    opened = create_exchange_engine(database_url)
    migrate(opened)
    try:
        yield opened
    finally:
        opened.dispose()


@pytest.fixture
def desk(engine: Engine) -> MarginDesk:
    opened = MarginDesk(
        ledger=MarginLedger(POLICY, decimals=DECIMALS),
        engine=engine,
        exchange=EXCHANGE,
        signer=SIGNER,
    )
    credit(opened, A, 1, {("alice", "BTC"): BTC, ("bob", "BTC"): BTC // 4})
    return opened


Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(desk: MarginDesk) -> AsyncIterator[Client]:
    app = create_app(desk=desk, tokens=tokens(), clock=lambda: NOW)
    async with TestClient(TestServer(app)) as opened:
        yield opened


async def ok(client: Client, method: str, path: str, who: str, body: Any = None) -> Any:
    response = await client.request(method, path, headers=auth(who), json=body)
    assert response.status == 200, await response.text()
    raw = await response.read()
    obj = await response.json()
    assert compute_canonical_bytes(obj) == raw
    return obj


async def problem(
    client: Client,
    method: str,
    path: str,
    status: int,
    *,
    who: str | None = "operator",
    data: bytes | None = None,
    content_type: str = "application/json",
) -> dict[str, Any]:
    headers = auth(who) if who is not None else {}
    if data is not None:
        headers["Content-Type"] = content_type
    response = await client.request(method, path, headers=headers, data=data)
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error", "detail"}
    return body


# --- clients ------------------------------------------------------------------------------------


async def test_a_client_reads_its_own_margin_and_only_its_own(client: Client) -> None:
    status = await ok(client, "GET", "/v1/clients/alice", "alice")
    assert status["collateral"] == "4800000"  # 1 BTC at 60,000.00 USD x 80 %
    assert status["credit_limit"] == "9600000"
    assert status["state"] == "healthy"
    assert status["ratio_bps"] is None
    positions = await ok(client, "GET", "/v1/clients/alice/positions", "alice")
    assert positions["positions"] == [
        {
            "asset": "BTC",
            "custodian": "bank-a",
            "freshness": "fresh",
            "frozen": False,
            "price": "60000.00",
            "quantity": str(BTC),
            "rate_bps": 8000,
            "stream": A,
            "value": "4800000",
        }
    ]
    credit_view = await ok(client, "GET", "/v1/clients/alice/credit", "alice")
    assert (credit_view["headroom"], credit_view["blocked_reason"]) == ("9600000", None)
    for path in ("/v1/clients/bob", "/v1/clients/bob/positions", "/v1/clients/bob/credit"):
        await problem(client, "GET", path, 403, who="alice")
    await problem(client, "GET", "/v1/clients/alice", 403, who="engine")
    await problem(client, "GET", "/v1/clients/zed", 404)
    await ok(client, "GET", "/v1/clients/bob", "operator")


# --- exposures and pre-trade --------------------------------------------------------------------


async def test_an_exposure_report_moves_margin_and_a_replay_does_not(client: Client) -> None:
    result = await ok(client, "POST", "/v1/exposures", "engine", report_body())
    assert result == {
        "applied": True,
        "client": "alice",
        "notices": 1,
        "report_id": "r-1",
        "state": "margin_call",
    }
    replay = await ok(client, "POST", "/v1/exposures", "engine", report_body(requirement="1"))
    assert (replay["applied"], replay["state"]) == (False, "margin_call")
    older = report_body(report_id="r-0", requirement="1", reported_at="2026-03-02T09:00:01.000Z")
    assert (await ok(client, "POST", "/v1/exposures", "engine", older))["applied"] is False
    decision = await ok(
        client, "POST", "/v1/pretrade", "engine", {"client": "alice", "add_exposure": "1"}
    )
    assert (decision["allowed"], decision["reason"]) == (False, "not_healthy")
    await problem(
        client, "POST", "/v1/exposures", 403, who="alice", data=json.dumps(report_body()).encode()
    )


async def test_pretrade_by_post_and_by_get(client: Client) -> None:
    allowed = await ok(
        client, "POST", "/v1/pretrade", "engine", {"client": "alice", "add_exposure": "9600000"}
    )
    assert (allowed["allowed"], allowed["headroom"]) == (True, "9600000")
    refused = await ok(client, "GET", "/v1/pretrade?client=alice&add_exposure=9600001", "engine")
    assert (refused["allowed"], refused["reason"]) == (False, "insufficient_credit")
    unknown = await ok(client, "GET", "/v1/pretrade?client=zed&add_exposure=1", "engine")
    assert unknown["reason"] == "unknown_client"
    await problem(client, "GET", "/v1/pretrade?client=alice&add_exposure=1", 403, who="alice")


HUGE = "9" * 40


@pytest.mark.parametrize(
    ("path", "data", "status"),
    [
        ("/v1/exposures", json.dumps(report_body(requirement=5000000)).encode(), 400),
        ("/v1/exposures", json.dumps(report_body(unrealised_pnl=-1.5)).encode(), 400),
        ("/v1/exposures", json.dumps(report_body(requirement="-1")).encode(), 400),
        ("/v1/exposures", json.dumps(report_body(requirement=HUGE)).encode(), 400),
        ("/v1/exposures", json.dumps(report_body(exchange="exchange-y")).encode(), 400),
        ("/v1/exposures", json.dumps(report_body(quote="EUR")).encode(), 400),
        (  # stale the other way: dated ahead of the clock
            "/v1/exposures",
            json.dumps(report_body(reported_at="2026-03-02T10:00:00.000Z")).encode(),
            400,
        ),
        ("/v1/exposures", b'{"client": "alice"}', 400),
        ("/v1/exposures", b'{"client": "alice", "client": "bob"}', 400),
        ("/v1/exposures", b"not json", 400),
        ("/v1/exposures", b"[]", 400),
        ("/v1/exposures", b'{"pad": "' + b"x" * 5000 + b'"}', 413),
        ("/v1/pretrade", b'{"client": "alice", "add_exposure": 1}', 400),
        ("/v1/pretrade", b'{"client": "alice", "add_exposure": "01"}', 400),
        ("/v1/pretrade", b'{"client": "al ice", "add_exposure": "1"}', 400),
        ("/v1/pretrade", b'{"client": 7, "add_exposure": "1"}', 400),
        ("/v1/pretrade", b'{"client": "alice"}', 400),
        ("/v1/pretrade", b'{"client": "alice", "add_exposure": "1", "x": "1"}', 400),
        ("/v1/pretrade?x=1", b'{"client": "alice", "add_exposure": "1"}', 400),
    ],
)
async def test_malformed_bodies_are_4xx(
    client: Client, path: str, data: bytes, status: int
) -> None:
    await problem(client, "POST", path, status, data=data)


async def test_a_body_must_be_declared_json(client: Client) -> None:
    body = json.dumps(report_body()).encode()
    await problem(client, "POST", "/v1/exposures", 415, data=body, content_type="text/plain")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/clients/al%20ice",
        f"/v1/clients/{'a' * 129}",
        "/v1/clients/alice?x=1",
        "/v1/pretrade?client=alice",
        f"/v1/pretrade?client=alice&add_exposure={HUGE}",
        "/v1/pretrade?client=alice&add_exposure=-1",
        "/v1/pretrade?client=alice&add_exposure=1&add_exposure=2",
        "/v1/audit?cursor=-1",
        "/v1/audit?limit=0",
        "/v1/audit?limit=1001",
        "/v1/audit?stream=nostream",
        "/v1/audit?kind=credit",
        "/v1/streams?x=1",
    ],
)
async def test_malformed_queries_and_paths_are_400(client: Client, path: str) -> None:
    await problem(client, "GET", path, 400)


@pytest.mark.parametrize(
    "header", [None, "Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer not a token", f"Bearer {'x' * 43}"]
)
async def test_a_missing_or_invalid_token_is_401(client: Client, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path in (
        ("GET", "/v1/clients/alice"),
        ("POST", "/v1/exposures"),
        ("GET", "/metrics"),
    ):
        response = await client.request(method, path, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="mcb-exchange"')


async def test_wrong_methods_and_paths(client: Client) -> None:
    response = await client.get("/v1/exposures", headers=auth("engine"))
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    await problem(client, "DELETE", "/v1/clients/alice", 405)
    await problem(client, "GET", "/v1/nothing", 404)


# --- audit, streams, forks, snapshots -----------------------------------------------------------


async def test_the_audit_journal_pages_with_a_cursor(client: Client) -> None:
    await ok(client, "POST", "/v1/exposures", "engine", report_body())
    first = await ok(client, "GET", "/v1/audit?limit=2", "auditor")
    assert [e["kind"] for e in first["entries"]] == ["statement", "credit"]
    assert first["next_cursor"] == first["entries"][-1]["cursor"]
    rest = await ok(client, "GET", f"/v1/audit?cursor={first['next_cursor']}", "regulator")
    assert [e["kind"] for e in rest["entries"]] == ["credit", "exposure", "state"]
    assert rest["next_cursor"] is None
    only_alice = await ok(client, "GET", "/v1/audit?client=alice", "operator")
    assert {e["client"] for e in only_alice["entries"]} == {"alice"}
    state = only_alice["entries"][-1]
    assert (state["detail"]["before"], state["detail"]["after"]) == ("healthy", "margin_call")
    await problem(client, "GET", "/v1/audit", 403, who="engine")
    await problem(client, "GET", "/v1/audit", 403, who="alice")


async def test_streams_and_fork_resolution(client: Client, desk: MarginDesk) -> None:
    streams = await ok(client, "GET", "/v1/streams", "auditor")
    (stream,) = streams["streams"]
    assert (stream["stream"], stream["frozen"], stream["freshness"]) == (A, False, "fresh")
    assert stream["head"]["sequence"] == 1
    path = f"/v1/streams/{STREAM_PATH}/resolve"
    reason = json.dumps({"reason": "checked with the custodian"}).encode()
    body = await problem(client, "POST", path, 409, data=reason)
    assert body["error"] == "stream_not_frozen"
    desk.freeze(A, reason="fork at 2", now=NOW)
    await problem(client, "POST", path, 403, who="auditor", data=reason)
    resolved = await ok(client, "POST", path, "operator", {"reason": "checked with the custodian"})
    assert (resolved["frozen"], resolved["resolved_by"]) == (False, "operator:olga")
    entries = (await ok(client, "GET", "/v1/audit", "operator"))["entries"]
    assert entries[-1]["kind"] == "resolve"
    assert entries[-1]["detail"]["operator"] == "olga"
    await problem(client, "POST", f"/v1/streams/bank-z%2F{EXCHANGE}/resolve", 404, data=reason)
    await problem(client, "POST", "/v1/streams/bad%2FX/resolve", 400, data=reason)
    await problem(client, "POST", path, 400, data=b'{"reason": ""}')
    await problem(client, "POST", path, 400, data=b"{}")


async def test_a_snapshot_verifies(client: Client) -> None:
    taken = await ok(client, "POST", "/v1/snapshots", "regulator")
    assert taken["published"] is False
    (part,) = taken["parts"]
    body = verify_notice(
        SignedNotice.from_wire(part).encode(), registry=exchange_registry(), now=NOW
    )
    assert isinstance(body, PositionsSnapshot)
    assert [(x.client, x.value) for x in body.lines] == [("alice", 4_800_000), ("bob", 1_200_000)]
    await problem(client, "POST", "/v1/snapshots?publish=true", 403, who="regulator")
    await problem(client, "POST", "/v1/snapshots?publish=yes", 400)
    await problem(client, "POST", "/v1/snapshots", 403, who="engine")


# --- health and metrics -------------------------------------------------------------------------


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9]+(?:\.[0-9]+)?)")


def samples(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line)
        assert match is not None, line
        found[match[1] + (match[2] or "")] = float(match[3])
    return found


async def test_health_and_metrics(client: Client) -> None:
    response = await client.get("/health")
    assert (response.status, await response.json()) == (200, {"database": "ok", "status": "ok"})
    await ok(client, "POST", "/v1/exposures", "engine", report_body())
    await ok(client, "GET", "/v1/pretrade?client=bob&add_exposure=1", "engine")
    await ok(client, "GET", "/v1/pretrade?client=alice&add_exposure=1", "engine")
    await problem(client, "GET", "/metrics", 403, who="auditor")
    response = await client.get("/metrics", headers=auth("operator"))
    assert response.status == 200
    found = samples(await response.text())
    assert found[f'mcb_exchange_credited_positions{{stream="{A}"}}'] == 2
    assert found['mcb_exchange_clients{state="margin_call"}'] == 1
    assert found['mcb_exchange_clients{state="healthy"}'] == 1
    assert found['mcb_exchange_pretrade_total{decision="allowed"}'] == 1
    assert found['mcb_exchange_pretrade_total{decision="not_healthy"}'] == 1
    assert found['mcb_exchange_streams{freshness="fresh"}'] == 1
    assert found["mcb_exchange_streams_frozen"] == 0
    assert found['mcb_exchange_exposure_reports_total{result="applied"}'] == 1
    assert found["mcb_database_up"] == 1
    assert found['mcb_api_requests_total{endpoint="/metrics",status="403"}'] == 1


# --- the OpenAPI document and the pure parts ----------------------------------------------------


def test_the_openapi_document_describes_exactly_the_routes(desk: MarginDesk) -> None:
    document = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "patch"}
        # Routes the exchange process adds to the app (exchange/service.py), tested there.
        and item.get("x-mcb-served-by") != "exchange.service"
    }
    app = create_app(desk=desk, tokens=tokens())
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    assert served == documented == {(m, p) for m, p, _ in ROUTES}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method.startswith("x-"):
                continue
            assert "200" in operation["responses"], (method, path)
            if not path.startswith("/health"):
                assert {"400", "401", "403"} <= set(operation["responses"]), (method, path)


@pytest.mark.parametrize(
    ("principal", "action", "client", "allowed"),
    [
        (Principal(Role.CLIENT, "alice"), Action.READ_CLIENT, "alice", True),
        (Principal(Role.CLIENT, "alice"), Action.READ_CLIENT, "bob", False),
        (Principal(Role.CLIENT, "alice"), Action.PRETRADE, None, False),
        (Principal(Role.ENGINE, "m"), Action.SUBMIT_EXPOSURE, None, True),
        (Principal(Role.ENGINE, "m"), Action.READ_AUDIT, None, False),
        (Principal(Role.AUDITOR, "a"), Action.TAKE_SNAPSHOT, None, True),
        (Principal(Role.AUDITOR, "a"), Action.PUBLISH_SNAPSHOT, None, False),
        (Principal(Role.REGULATOR, "r"), Action.RESOLVE_FORK, None, False),
        (Principal(Role.OPERATOR, "o"), Action.RESOLVE_FORK, None, True),
        (Principal(Role.OPERATOR, "o"), Action.READ_CLIENT, "bob", True),
    ],
)
def test_the_authorization_table(
    principal: Principal, action: Action, client: str | None, allowed: bool
) -> None:
    if allowed:
        authorize(principal, action, client=client)
    else:
        with pytest.raises(Forbidden):
            authorize(principal, action, client=client)


@pytest.mark.parametrize("text", ["operator", "root:x", "client:", "engine:Big", "client:al ice"])
def test_malformed_principals_are_configuration_errors(text: str) -> None:
    with pytest.raises(ConfigurationError):
        Principal.parse(text)
