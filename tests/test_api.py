"""The custodian's HTTP API: what each principal may read, the 4xx answers to bad input, and
that everything served verifies with the attestation core's own verifiers (client proofs against
an authenticated statement, log proofs against a signed checkpoint). The pure parts (tokens,
principals, the authorization table, parsing, the metrics text) are tested without a server.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import create_engine, update

from attestations.amounts import Asset
from attestations.canonical import compute_canonical_bytes
from attestations.checkpoint import SignedCheckpoint, verify_checkpoint, verify_same_history
from attestations.disclosure import ClientProof, verify_client_proof
from attestations.errors import ConfigurationError, InvalidProof
from attestations.signing import Cosigner
from attestations.statement import SignedStatement
from attestations.translog import (
    LogConsistencyProof,
    LogInclusionProof,
    TransparencyLog,
    verify_log_consistency,
    verify_log_inclusion,
)
from attestations.verify import authenticate_statement
from custodian.api import (
    ROUTES,
    Action,
    BadRequest,
    Forbidden,
    Principal,
    Role,
    StreamStats,
    TokenStore,
    Unauthorized,
    authenticate,
    authorize,
    compute_token_hash,
    create_app,
    format_metrics,
    parse_bearer,
    parse_query,
    parse_sequence,
    run_server,
)
from custodian.book import Deposit, Pledge
from custodian.history import leaf_versions_table
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService
from custodian.store import CustodyBook
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, NOW, World, sample_prices, seed

ASSETS = [Asset(code, decimals) for code, decimals in DECIMALS.items()]
SALT_SECRET = seed("api-salt-secret")
LATER = NOW + timedelta(seconds=10)
OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
BASE = f"/v1/streams/{EXCHANGE}"

TOKENS = {
    name: secrets.token_urlsafe(32)
    for name in ("alice", "bob", "dave", "exchange", "other-exchange", "regulator", "operator")
}
PRINCIPALS = {
    "alice": "client:alice",
    "bob": "client:bob",
    "dave": "client:dave",
    "exchange": f"exchange:{EXCHANGE}",
    "other-exchange": "exchange:exchange-y",
    "regulator": "regulator:fca",
    "operator": "operator",
}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def token_store() -> TokenStore:
    """As an operator deploys it: a file of hashes, never the tokens."""
    lines = ["# custodian API tokens", ""]
    lines += [f"{compute_token_hash(TOKENS[n]).hex()} {p}" for n, p in PRINCIPALS.items()]
    return TokenStore.from_lines(lines)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture
def book(database_url: str) -> Iterator[CustodyBook]:
    with CustodyBook.open(database_url, assets=ASSETS) as opened:
        yield opened


@pytest.fixture
def log(tmp_path: Path) -> Iterator[TransparencyLog]:
    with TransparencyLog(tmp_path / "translog.sqlite3") as opened:
        yield opened


def pledge(book: CustodyBook, key: str, client: str, asset: str, quantity: int) -> None:
    book.apply(Deposit(f"d-{key}", client, asset, quantity), now=NOW)
    book.apply(Pledge(f"p-{key}", client, asset, EXCHANGE, quantity), now=NOW)


@pytest.fixture
def service(book: CustodyBook, world: World, log: TransparencyLog) -> AttestationService:
    """Two epochs published: a snapshot, then a delta that adds dave."""
    opened = AttestationService.open(
        book,
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        signer=world.signer,
        cosigners=[Cosigner(key) for key in world.cosigners],
        quorum=2,
        salt_secret=SALT_SECRET,
        decimals=DECIMALS,
        prices=StaticPriceSource(sample_prices()),
        log=log,
    )
    pledge(book, "1", "alice", "BTC", 150_000_000)
    pledge(book, "2", "bob", "USDC", 25_000_000)
    pledge(book, "3", "carol", "BTC", 42)
    opened.publish_epoch(NOW)
    pledge(book, "4", "dave", "BTC", 7)
    opened.publish_epoch(NOW + timedelta(seconds=1))
    return opened


def make_app(
    service: AttestationService, log: TransparencyLog, world: World, **options: Any
) -> web.Application:
    return create_app(
        service=service,
        tokens=token_store(),
        log=log,
        signer=world.signer,
        clock=lambda: LATER,
        **options,
    )


@pytest.fixture
async def client(
    service: AttestationService, log: TransparencyLog, world: World
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(make_app(service, log, world))) as opened:
        yield opened


Client = TestClient[web.Request, web.Application]


async def get_json(client: Client, path: str, who: str = "operator") -> Any:
    response = await client.get(path, headers=auth(who))
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    body = await response.read()
    obj = await response.json()
    assert compute_canonical_bytes(obj) == body  # canonical wire bytes, not just JSON
    return obj


async def problem(
    client: Client, path: str, status: int, *, who: str | None = "operator", method: str = "GET"
) -> dict[str, Any]:
    headers = auth(who) if who is not None else {}
    response = await client.request(method, path, headers=headers)
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error", "detail"}
    return body


# --- a client's proof ---------------------------------------------------------------------------


async def test_a_client_verifies_its_proof_against_the_statement_it_fetched(
    client: Client, world: World
) -> None:
    response = await client.get(f"{BASE}/statements/latest", headers=auth("alice"))
    assert response.status == 200
    wire = await response.read()
    authenticated = authenticate_statement(
        wire, custodian=CUSTODIAN, exchange=EXCHANGE, registry=world.registry, now=LATER
    )
    assert authenticated.statement.sequence == 2
    for path in (f"{BASE}/proofs/alice/BTC", f"{BASE}/proofs/alice/BTC?sequence=2"):
        proof = ClientProof.from_wire(await get_json(client, path, "alice"))
        assert (proof.account, proof.sequence) == ("alice", 2)
        assert verify_client_proof(proof, statement=authenticated.statement) == 150_000_000
    bob = ClientProof.from_wire(await get_json(client, f"{BASE}/proofs/bob/USDC", "bob"))
    assert verify_client_proof(bob, statement=authenticated.statement) == 25_000_000


async def test_a_proof_in_an_older_statement_verifies_against_that_statement(
    client: Client, world: World
) -> None:
    response = await client.get(f"{BASE}/statements/1", headers=auth("dave"))
    assert response.status == 200
    first = authenticate_statement(
        await response.read(),
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        registry=world.registry,
        now=NOW,  # checked as at the time it was received
    ).statement
    for who, asset, quantity in (("alice", "BTC", 150_000_000), ("bob", "USDC", 25_000_000)):
        wire = await get_json(client, f"{BASE}/proofs/{who}/{asset}?sequence=1", who)
        proof = ClientProof.from_wire(wire)
        assert proof.sequence == 1
        assert verify_client_proof(proof, statement=first) == quantity
    # dave pledged after statement 1: no leaf there, one in statement 2.
    body = await problem(client, f"{BASE}/proofs/dave/BTC?sequence=1", 404, who="dave")
    assert body["detail"] == "dave has no BTC leaf in statement 1"
    later = ClientProof.from_wire(await get_json(client, f"{BASE}/proofs/dave/BTC?sequence=2"))
    with pytest.raises(InvalidProof):
        verify_client_proof(later, statement=first)


async def test_a_proof_at_a_sequence_not_stored_is_404(client: Client) -> None:
    body = await problem(client, f"{BASE}/proofs/alice/BTC?sequence=3", 404, who="alice")
    assert "no statement 3" in body["detail"]
    await problem(client, f"{BASE}/proofs/alice/BTC?sequence={2**53 - 1}", 404, who="alice")


async def test_a_damaged_leaf_history_is_a_500_never_a_proof(
    client: Client, service: AttestationService
) -> None:
    with service.engine.begin() as connection:
        changed = connection.execute(
            update(leaf_versions_table)
            .where(leaf_versions_table.c.account == "carol")
            .values(quantity=43)
        ).rowcount
    assert changed == 1
    # The latest statement's proofs come from the service's trees; statement 1's from the
    # history, whose carol leaf no longer gives the signed BTC root.
    await get_json(client, f"{BASE}/proofs/alice/BTC?sequence=2", "alice")
    response = await client.get(f"{BASE}/proofs/alice/BTC?sequence=1", headers=auth("alice"))
    assert response.status == 500
    assert (await response.json())["error"] == "internal"


# --- authentication and scope -------------------------------------------------------------------


async def test_another_clients_token_cannot_read_a_proof(client: Client) -> None:
    response = await client.get(f"{BASE}/proofs/alice/BTC", headers=auth("bob"))
    assert response.status == 403
    assert "insufficient_scope" in response.headers["WWW-Authenticate"]
    assert (await response.json())["error"] == "forbidden"
    await problem(client, f"{BASE}/proofs/alice/BTC", 403, who="exchange")
    await get_json(client, f"{BASE}/proofs/alice/BTC", "regulator")


async def test_an_exchange_reads_only_its_own_stream(client: Client) -> None:
    await get_json(client, f"{BASE}/statements/latest", "exchange")
    await get_json(client, f"{BASE}/log/checkpoint", "exchange")
    await problem(client, f"{BASE}/statements/latest", 403, who="other-exchange")
    await problem(client, f"{BASE}/log/checkpoint", 403, who="other-exchange")
    # A stream the principal may read but this custodian does not serve:
    await problem(client, "/v1/streams/exchange-y/statements/latest", 404, who="other-exchange")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer",
        "Bearer not a token",
        f"Bearer {'x' * 43}",
    ],
)
async def test_a_missing_or_invalid_token_is_401(client: Client, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for path in (f"{BASE}/statements/latest", f"{BASE}/proofs/alice/BTC", "/metrics"):
        response = await client.get(path, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="mcb-custodian"')
        assert (await response.json())["error"] == "unauthorized"


# --- bad input ----------------------------------------------------------------------------------


HUGE = "9" * 40


@pytest.mark.parametrize(
    "path",
    [
        f"{BASE}/proofs/al$ice/BTC",
        f"{BASE}/proofs/al%20ice/BTC",
        f"{BASE}/proofs/{'a' * 129}/BTC",
        f"{BASE}/proofs/alice/btc",
        f"{BASE}/proofs/alice/B",
        f"{BASE}/proofs/alice/BTC?sequence=abc",
        f"{BASE}/proofs/alice/BTC?sequence=-1",
        f"{BASE}/proofs/alice/BTC?sequence=0",
        f"{BASE}/proofs/alice/BTC?sequence=01",
        f"{BASE}/proofs/alice/BTC?sequence={HUGE}",
        f"{BASE}/proofs/alice/BTC?sequence=2&sequence=2",
        f"{BASE}/proofs/alice/BTC?seq=2",
        f"{BASE}/statements/abc",
        f"{BASE}/statements/-1",
        f"{BASE}/statements/0",
        f"{BASE}/statements/1.5",
        f"{BASE}/statements/{HUGE}",
        f"{BASE}/statements/9007199254740992",  # MAX_SEQUENCE + 1
        f"{BASE}/statements/latest?x=1",
        "/v1/streams/Exchange_X/statements/latest",
        f"{BASE}/log/inclusion/abc",
        f"{BASE}/log/inclusion/1?size=-1",
        f"{BASE}/log/inclusion/2?size=1",
        f"{BASE}/log/consistency",
        f"{BASE}/log/consistency?from=x",
        f"{BASE}/log/consistency?from=2&to=1",
        f"{BASE}/log/consistency?from={HUGE}",
        f"{BASE}/log/consistency?from=1&extra=2",
    ],
)
async def test_malformed_input_is_400(client: Client, path: str) -> None:
    body = await problem(client, path, 400)
    assert body["detail"]


@pytest.mark.parametrize(
    "path",
    [
        f"{BASE}/statements/3",
        f"{BASE}/proofs/alice/USDC",
        f"{BASE}/proofs/zed/BTC",
        f"{BASE}/proofs/alice/ETH",
        f"{BASE}/proofs/dave/BTC?sequence=1",
        f"{BASE}/proofs/bob/USDC?sequence=3",
        "/v1/streams/exchange-y/statements/1",
        "/v1/streams/exchange-y/proofs/alice/BTC",
        f"{BASE}/log/inclusion/3",
        f"{BASE}/log/inclusion/1?size=3",
        f"{BASE}/log/consistency?from=1&to=3",
        f"{BASE}/log/consistency?from=3",
        "/v1/nothing/here",
    ],
)
async def test_unknown_things_are_404(client: Client, path: str) -> None:
    await problem(client, path, 404)


async def test_a_wrong_method_is_405_in_the_same_shape(client: Client) -> None:
    response = await client.post("/health", data=b"{}")
    assert response.status == 405
    assert response.headers["Allow"] == "GET"
    assert set(await response.json()) == {"error", "detail"}


# --- statements and the log ---------------------------------------------------------------------


async def test_statements_by_sequence_form_a_chain(client: Client, world: World) -> None:
    first = SignedStatement.from_wire(await get_json(client, f"{BASE}/statements/1", "exchange"))
    second = SignedStatement.from_wire(await get_json(client, f"{BASE}/statements/2", "exchange"))
    latest = SignedStatement.from_wire(await get_json(client, f"{BASE}/statements/latest"))
    assert (first.statement.sequence, second.statement.sequence) == (1, 2)
    assert second.statement.previous == first.digest
    assert latest == second
    for signed in (first, second):
        authenticate_statement(
            signed, custodian=CUSTODIAN, exchange=EXCHANGE, registry=world.registry, now=LATER
        )


async def test_log_proofs_verify_against_signed_checkpoints(
    client: Client, service: AttestationService, world: World
) -> None:
    fetched = await client.get(f"{BASE}/log/checkpoint", headers=auth("regulator"))
    old_wire = await fetched.read()
    old = SignedCheckpoint.decode(old_wire)
    old_head = verify_checkpoint(old, registry=world.registry, now=LATER).head
    assert old_head.size == 2
    again = await client.get(f"{BASE}/log/checkpoint", headers=auth("regulator"))
    assert await again.read() == old_wire  # unchanged log: the same signed checkpoint

    digests = []
    for sequence in (1, 2):
        signed = SignedStatement.from_wire(await get_json(client, f"{BASE}/statements/{sequence}"))
        digests.append(signed.digest)
        proof = LogInclusionProof.from_wire(
            await get_json(client, f"{BASE}/log/inclusion/{sequence}", "regulator")
        )
        verify_log_inclusion(entry=signed.digest, proof=proof, head=old_head)

    await asyncio.to_thread(service.publish_epoch, NOW + timedelta(seconds=2))
    new = SignedCheckpoint.decode(
        await (await client.get(f"{BASE}/log/checkpoint", headers=auth("regulator"))).read()
    )
    new_head = verify_checkpoint(new, registry=world.registry, now=LATER).head
    assert new_head.size == 3
    consistency = LogConsistencyProof.from_wire(
        await get_json(client, f"{BASE}/log/consistency?from=2&to=3", "regulator")
    )
    verify_log_consistency(old=old_head, new=new_head, proof=consistency)
    verify_same_history(old, new, registry=world.registry, proof=consistency, now=LATER)
    default_to = await get_json(client, f"{BASE}/log/consistency?from=2", "regulator")
    assert LogConsistencyProof.from_wire(default_to) == consistency
    # An older tree size still proves an entry it holds.
    at_two = LogInclusionProof.from_wire(
        await get_json(client, f"{BASE}/log/inclusion/2?size=2", "regulator")
    )
    verify_log_inclusion(entry=digests[1], proof=at_two, head=old_head)


# --- health and metrics -------------------------------------------------------------------------


async def test_health_needs_no_token_and_reports_the_database(
    client: Client, service: AttestationService, log: TransparencyLog, world: World, tmp_path: Path
) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"database": "ok", "status": "ok"}

    unreachable = create_engine(f"sqlite:///{tmp_path / 'missing' / 'book.sqlite3'}")
    try:
        app = make_app(service, log, world, engine=unreachable)
        async with TestClient(TestServer(app)) as down:
            response = await down.get("/health")
            assert response.status == 503
            assert await response.json() == {"database": "unreachable", "status": "unavailable"}
            # Reads that need the database answer 503 too, never 500.
            response = await down.get(f"{BASE}/statements/latest", headers=auth("operator"))
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            response = await down.get("/metrics", headers=auth("operator"))
            assert response.status == 200
            assert "mcb_database_up 0" in (await response.text()).splitlines()
    finally:
        unreachable.dispose()


_SAMPLE = re.compile(
    r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)\})? (?P<value>-?[0-9]+(?:\.[0-9]+)?)'
)


def parse_samples(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+", line), line
            continue
        match = _SAMPLE.fullmatch(line)
        assert match is not None, line
        key = match["name"] + ("{" + match["labels"] + "}" if match["labels"] else "")
        samples[key] = float(match["value"])
    return samples


async def test_metrics_need_the_operator_and_parse(
    client: Client, service: AttestationService, log: TransparencyLog, world: World
) -> None:
    await get_json(client, f"{BASE}/statements/latest")
    await problem(client, f"{BASE}/statements/abc", 400)
    await problem(client, "/metrics", 403, who="regulator")
    response = await client.get("/metrics", headers=auth("operator"))
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples = parse_samples(await response.text())
    stream = f'stream="{CUSTODIAN}/{EXCHANGE}"'
    assert samples[f"mcb_statements_published_total{{{stream}}}"] == 2
    assert samples[f"mcb_statement_last_sequence{{{stream}}}"] == 2
    assert samples[f"mcb_statement_age_seconds{{{stream}}}"] == 9.0
    assert samples[f"mcb_transparency_log_size{{{stream}}}"] == 2
    assert samples["mcb_database_up"] == 1
    endpoint = "/v1/streams/{exchange}/statements/{sequence}"
    assert samples[f'mcb_api_requests_total{{endpoint="{endpoint}",status="400"}}'] == 1
    assert samples['mcb_api_requests_total{endpoint="/metrics",status="403"}'] == 1

    async with TestClient(TestServer(make_app(service, log, world, metrics_open=True))) as open_:
        response = await open_.get("/metrics")
        assert response.status == 200
        parse_samples(await response.text())


# --- the OpenAPI document -----------------------------------------------------------------------


def test_the_openapi_document_describes_exactly_the_routes(
    service: AttestationService, log: TransparencyLog, world: World
) -> None:
    document = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "patch", "head", "options"}
    }
    app = make_app(service, log, world)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    assert served == documented
    assert {path for path, _ in ROUTES} == {path for _, path in documented}
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        responses = item["get"]["responses"]
        assert "200" in responses, path
        if path != "/health":
            assert {"400", "401"} <= set(responses), path


# --- serving ------------------------------------------------------------------------------------


async def test_run_server_serves_until_stopped(
    service: AttestationService, log: TransparencyLog, world: World
) -> None:
    stop = asyncio.Event()
    ready: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_server(
            make_app(service, log, world), "127.0.0.1", 0, stop=stop, on_ready=ready.set_result
        )
    )
    host, port = (await asyncio.wait_for(ready, timeout=5))[0][:2]
    async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/health") as r:
        assert r.status == 200
    stop.set()
    await asyncio.wait_for(task, timeout=5)


# --- the pure parts -----------------------------------------------------------------------------


def test_a_token_store_keeps_hashes_and_maps_tokens_to_principals() -> None:
    store = token_store()
    assert len(store) == len(TOKENS)
    assert store.authenticate(TOKENS["alice"]) == Principal(Role.CLIENT, "alice")
    assert store.authenticate(TOKENS["operator"]) == Principal(Role.OPERATOR)
    assert store.authenticate("x" * 43) is None
    assert authenticate(store, f"bearer {TOKENS['bob']}") == Principal(Role.CLIENT, "bob")
    with pytest.raises(ConfigurationError, match="twice"):
        store.add(TOKENS["alice"], Principal(Role.CLIENT, "mallory"))
    with pytest.raises(ConfigurationError, match="at least"):
        store.add("short", Principal(Role.OPERATOR))
    with pytest.raises(ConfigurationError, match="line 1"):
        TokenStore.from_lines(["not-a-hash client:alice"])


@pytest.mark.parametrize(
    ("text", "principal"),
    [
        ("client:alice", Principal(Role.CLIENT, "alice")),
        ("client:acct:7@desk", Principal(Role.CLIENT, "acct:7@desk")),
        ("exchange:exchange-x", Principal(Role.EXCHANGE, "exchange-x")),
        ("regulator:fca", Principal(Role.REGULATOR, "fca")),
        ("operator", Principal(Role.OPERATOR)),
    ],
)
def test_principals_parse_and_print(text: str, principal: Principal) -> None:
    assert Principal.parse(text) == principal
    assert str(principal) == text


@pytest.mark.parametrize(
    "text", ["root", "client:", "client:al ice", "exchange:X", "operator:me", "regulator"]
)
def test_malformed_principals_are_configuration_errors(text: str) -> None:
    with pytest.raises(ConfigurationError):
        Principal.parse(text)


ALICE = Principal(Role.CLIENT, "alice")
EXCHANGE_X = Principal(Role.EXCHANGE, EXCHANGE)
REGULATOR = Principal(Role.REGULATOR, "fca")
OPERATOR = Principal(Role.OPERATOR)


@pytest.mark.parametrize(
    ("principal", "action", "account", "allowed"),
    [
        (ALICE, Action.READ_PROOF, "alice", True),
        (ALICE, Action.READ_PROOF, "bob", False),
        (ALICE, Action.READ_STATEMENTS, None, True),
        (ALICE, Action.READ_LOG, None, True),
        (ALICE, Action.READ_METRICS, None, False),
        (EXCHANGE_X, Action.READ_STATEMENTS, None, True),
        (EXCHANGE_X, Action.READ_LOG, None, True),
        (EXCHANGE_X, Action.READ_PROOF, "alice", False),
        (EXCHANGE_X, Action.READ_METRICS, None, False),
        (REGULATOR, Action.READ_PROOF, "alice", True),
        (REGULATOR, Action.READ_METRICS, None, False),
        (OPERATOR, Action.READ_PROOF, "alice", True),
        (OPERATOR, Action.READ_METRICS, None, True),
    ],
)
def test_the_authorization_table(
    principal: Principal, action: Action, account: str | None, allowed: bool
) -> None:
    exchange = None if action is Action.READ_METRICS else EXCHANGE
    if allowed:
        authorize(principal, action, exchange=exchange, account=account)
    else:
        with pytest.raises(Forbidden):
            authorize(principal, action, exchange=exchange, account=account)


def test_an_exchange_token_is_scoped_to_its_stream() -> None:
    with pytest.raises(Forbidden, match="exchange-y"):
        authorize(EXCHANGE_X, Action.READ_STATEMENTS, exchange="exchange-y")


@pytest.mark.parametrize("value", ["", "abc", "-1", "0", "+1", "01", " 1", "1e3", HUGE, "٣"])
def test_malformed_sequences(value: str) -> None:
    with pytest.raises(BadRequest):
        parse_sequence(value)


def test_parsing_edges() -> None:
    assert parse_sequence("9007199254740991") == 2**53 - 1
    with pytest.raises(Unauthorized):
        parse_bearer(None)
    assert parse_bearer("Bearer abc.DEF_-~+/==") == "abc.DEF_-~+/=="
    assert parse_query({"size": "1"}, allowed=frozenset({"size"})) == {"size": "1"}


def test_metrics_text_escapes_labels() -> None:
    text = format_metrics(
        {('/a"b\\c\n', 200): 3},
        stats=StreamStats("c/e", statements=0, last_sequence=0, last_issued_at=None, log_size=0),
        now=NOW,
    )
    assert 'mcb_api_requests_total{endpoint="/a\\"b\\\\c\\n",status="200"} 3' in text
    assert "mcb_statement_age_seconds" not in text  # no statement yet
    parse_samples(text)
