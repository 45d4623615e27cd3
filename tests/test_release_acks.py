"""Release acknowledgements: the custody book's verifier (signature under the key registry,
addressee, client, asset, quantity, expiry, single use), the exchange desk that signs, journals,
reserves and enqueues them, and the API route, on SQLite and PostgreSQL. The path through the
broker to the custodian's instructions consumer is in tests/test_custodian_instructions.py."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import Engine, select

from attestations.amounts import Asset
from attestations.canonical import compute_canonical_bytes, truncate_to_millis
from attestations.errors import BridgeError, ConfigurationError
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.notices import (
    MarginCall,
    ReleaseAck,
    SignedNotice,
    sign_notice,
    verify_release_ack,
)
from attestations.p256 import SoftwareP256Signer
from bridge.http import compute_token_hash
from bridge.outbox import outbox_table, run_transaction
from custodian.book import (
    Deposit,
    MemoryBook,
    Pledge,
    ReleaseAckCheck,
    ReleaseAckReused,
    SignedReleaseAckVerifier,
    Unpledge,
)
from custodian.store import CustodyBook
from exchange.api import TokenStore, create_app
from exchange.desk import MarginDesk
from exchange.ledger import MarginLedger
from exchange.policy import CollateralPolicy
from exchange.store import create_exchange_engine, journal_page, migrate
from tests.exchange_world import credit_snapshot
from tests.world import CUSTODIAN, EXCHANGE, NOW

BTC = 100_000_000
ASSETS = {"BTC": Asset("BTC", 8), "USDC": Asset("USDC", 6)}
EXCHANGE_KEY = SoftwareP256Signer(
    insecure_development_only=True, private_scalar=hashlib.sha256(b"release/x").digest()
)
OTHER_KEY = SoftwareP256Signer(
    insecure_development_only=True, private_scalar=hashlib.sha256(b"release/y").digest()
)
REGISTRY = KeyRegistry.of(
    [
        KeyRecord(EXCHANGE, KeyRole.EXCHANGE, EXCHANGE_KEY.public_key, NOW - timedelta(days=30)),
        KeyRecord("exchange-y", KeyRole.EXCHANGE, OTHER_KEY.public_key, NOW - timedelta(days=30)),
    ],
    quorums={},
)
VERIFIER = SignedReleaseAckVerifier(REGISTRY, custodian=CUSTODIAN)


def ack(**changes: Any) -> ReleaseAck:
    fields: dict[str, Any] = {
        "exchange": EXCHANGE,
        "custodian": CUSTODIAN,
        "client": "alice",
        "asset": "BTC",
        "quantity": BTC // 2,
        "issued_at": NOW,
        "expires_at": NOW + timedelta(minutes=15),
    }
    fields.update(changes)
    return ReleaseAck(**fields)


def signed(body: ReleaseAck | None = None, key: SoftwareP256Signer = EXCHANGE_KEY) -> bytes:
    return sign_notice(body or ack(), key).encode()


def unpledge(
    key: str = "u-1", *, quantity: int = BTC // 2, release_ack: str | None = None, **changes: Any
) -> Unpledge:
    fields: dict[str, Any] = {
        "idempotency_key": key,
        "client": "alice",
        "asset": "BTC",
        "exchange": EXCHANGE,
        "quantity": quantity,
        "release_ack": release_ack or ack().release_id,
    }
    fields.update(changes)
    return Unpledge(**fields)


def pledged_book(book: MemoryBook | CustodyBook) -> None:
    for asset in ("BTC", "USDC"):
        book.apply(Deposit(f"d-{asset}", "alice", asset, BTC), now=NOW)
        book.apply(Pledge(f"p-{asset}", "alice", asset, EXCHANGE, BTC), now=NOW)


def reason(action: Any) -> str:
    try:
        action()
    except BridgeError as exc:
        return exc.reason
    return "ok"


# --- the book's verifier ------------------------------------------------------------------------


def test_an_acknowledged_unpledge_is_applied_once() -> None:
    book = MemoryBook(ASSETS, verify_release_ack=VERIFIER)
    pledged_book(book)
    at = NOW + timedelta(minutes=1)
    entry = book.apply(unpledge(), now=at, release_ack=signed())
    assert book.pledged(EXCHANGE)[("alice", "BTC")] == BTC // 2
    # A retry of the same command is not a second use, even once the acknowledgement expired.
    later = NOW + timedelta(hours=1)
    assert book.apply(unpledge(), now=later, release_ack=signed()) == entry
    assert book.apply(unpledge(), now=later) == entry
    # Another command under the same acknowledgement is refused, even for fewer units.
    with pytest.raises(ReleaseAckReused, match="u-1"):
        book.apply(unpledge("u-2", quantity=1), now=at, release_ack=signed())
    assert book.pledged(EXCHANGE)[("alice", "BTC")] == BTC // 2
    assert book.check_invariants() == []


def test_a_partial_unpledge_uses_the_whole_acknowledgement() -> None:
    book = MemoryBook(ASSETS, verify_release_ack=VERIFIER)
    pledged_book(book)
    book.apply(unpledge(quantity=BTC // 4), now=NOW, release_ack=signed())
    with pytest.raises(ReleaseAckReused):
        book.apply(unpledge("u-2", quantity=BTC // 4), now=NOW, release_ack=signed())
    assert book.pledged(EXCHANGE)[("alice", "BTC")] == 3 * BTC // 4


def _tampered(member: str, value: Any) -> bytes:
    wire = json.loads(signed())
    wire["notice"][member] = value
    return compute_canonical_bytes(wire)


def _forged(**changes: Any) -> bytes:
    """Another body under the genuine signature (its release id recomputed)."""
    genuine = SignedNotice.decode(signed())
    return SignedNotice(notice=ack(**changes), signature=genuine.signature).encode()


@pytest.mark.parametrize(
    ("supplied", "command", "now", "expected"),
    [
        (None, unpledge(), NOW, "release_ack_unknown"),
        (_tampered("quantity", str(BTC)), unpledge(), NOW, "malformed"),  # id no longer matches
        (
            _forged(quantity=BTC),
            unpledge(release_ack=ack(quantity=BTC).release_id),
            NOW,
            "bad_signature",
        ),
        (signed(key=OTHER_KEY), unpledge(), NOW, "unknown_key"),  # exchange-y's key for x
        (
            signed(ack(exchange="exchange-y"), key=OTHER_KEY),
            unpledge(release_ack=ack(exchange="exchange-y").release_id),
            NOW,
            "release_ack_mismatch",
        ),
        (signed(), unpledge(), NOW + timedelta(minutes=15), "expired"),
        (signed(), unpledge(), NOW - timedelta(minutes=5), "future_dated"),
        (signed(), unpledge(quantity=BTC // 2 + 1), NOW, "release_ack_exceeded"),
        (
            signed(ack(client="bob")),
            unpledge(release_ack=ack(client="bob").release_id),
            NOW,
            "release_ack_mismatch",
        ),
        (
            signed(ack(asset="USDC")),
            unpledge(release_ack=ack(asset="USDC").release_id),
            NOW,
            "release_ack_mismatch",
        ),
        (
            signed(ack(custodian="custodian-b")),
            unpledge(release_ack=ack(custodian="custodian-b").release_id),
            NOW,
            "release_ack_mismatch",
        ),
        (signed(), unpledge(release_ack=ack(quantity=1).release_id), NOW, "release_ack_mismatch"),
        (signed(), unpledge(exchange="exchange-y"), NOW, "release_ack_mismatch"),
        (
            sign_notice(
                MarginCall(
                    exchange=EXCHANGE,
                    custodian=CUSTODIAN,
                    client="alice",
                    issued_at=NOW,
                    deadline=NOW + timedelta(hours=1),
                    quote="USD",
                    collateral=1,
                    equity=1,
                    requirement=1,
                    ratio_bps=10_000,
                    shortfall=0,
                ),
                EXCHANGE_KEY,
            ).encode(),
            unpledge(),
            NOW,
            "malformed",
        ),
    ],
)
def test_bad_acknowledgements_refuse_the_unpledge(
    supplied: bytes | None, command: Unpledge, now: datetime, expected: str
) -> None:
    book = MemoryBook(ASSETS, verify_release_ack=VERIFIER)
    pledged_book(book)
    before = book.balances()
    outcome = reason(lambda: book.apply(command, now=now, release_ack=supplied))
    assert outcome == expected
    assert book.balances() == before
    assert book.entry(command.idempotency_key) is None


def test_the_verifier_needs_the_commands_time() -> None:
    check = ReleaseAckCheck("u", "alice", "BTC", EXCHANGE, 1, ack().release_id, signed_ack=signed())
    with pytest.raises(ConfigurationError):
        VERIFIER(check)
    assert VERIFIER(replace(check, now=NOW)) == ack().release_id
    assert check.command == Unpledge("u", "alice", "BTC", EXCHANGE, 1, ack().release_id)


# --- the exchange desk --------------------------------------------------------------------------


POLICY = CollateralPolicy.default()
STREAM = f"{CUSTODIAN}/{EXCHANGE}"


@pytest.fixture
def exchange_engine(database_url: str) -> Iterator[Engine]:
    opened = create_exchange_engine(database_url)
    migrate(opened)
    try:
        yield opened
    finally:
        opened.dispose()


@pytest.fixture
def desk(exchange_engine: Engine) -> MarginDesk:
    opened = MarginDesk(
        ledger=MarginLedger(POLICY, decimals={"BTC": 8, "USDC": 6}),
        engine=exchange_engine,
        exchange=EXCHANGE,
        signer=EXCHANGE_KEY,
    )
    credit_snapshot(opened, {("alice", "BTC"): BTC, ("bob", "BTC"): BTC}, stream=STREAM, at=NOW)
    return opened


def outbox_types(engine: Engine) -> list[str]:
    def work(session: Any) -> list[str]:
        rows = session.connection().execute(select(outbox_table.c.message_type)).all()
        return [str(row[0]) for row in rows]

    return [t for t in run_transaction(engine, work, what="outbox") if t == "mcb.release-ack.v1"]


def test_the_desk_signs_journals_reserves_and_enqueues_an_allowed_release(
    desk: MarginDesk,
) -> None:
    at = NOW + timedelta(seconds=10)
    release = desk.release("alice", CUSTODIAN, "BTC", BTC // 4, at)
    assert release.decision.allowed
    assert release.ack is not None
    body = verify_release_ack(release.ack.encode(), registry=REGISTRY, now=at)
    assert (body.client, body.custodian, body.asset, body.quantity) == (
        "alice",
        CUSTODIAN,
        "BTC",
        BTC // 4,
    )
    assert body.expires_at - body.issued_at == timedelta(minutes=15)
    status = desk.status("alice", now=at)
    assert status is not None
    assert status.collateral == 3_600_000  # 0.75 BTC at 60,000.00 and 80 %
    (entry,) = [e for _, e in journal_page(desk.engine, after=0, limit=100) if e.kind == "release"]
    assert entry.detail["release_id"] == body.release_id
    assert len(outbox_types(desk.engine)) == 1
    # The same request in the same millisecond: the same acknowledgement, enqueued once.
    again = desk.release("alice", CUSTODIAN, "BTC", BTC // 4, at)
    assert again.ack is not None
    assert again.ack.notice == body
    assert len(outbox_types(desk.engine)) == 1
    # The reserved units cannot be released a second time.
    refused = desk.release("alice", CUSTODIAN, "BTC", BTC, at + timedelta(milliseconds=1))
    assert (refused.decision.reason, refused.decision.releasable, refused.ack) == (
        "exceeds_credited",
        3 * BTC // 4,
        None,
    )


def test_a_refused_release_signs_and_writes_nothing(desk: MarginDesk) -> None:
    at = NOW + timedelta(seconds=10)
    before = journal_page(desk.engine, after=0, limit=1000)
    for args, expected in (
        (("alice", CUSTODIAN, "USDC", 1), "not_credited"),
        (("carol", CUSTODIAN, "BTC", 1), "unknown_client"),
        (("alice", "custodian-b", "BTC", 1), "not_credited"),
        (("alice", CUSTODIAN, "BTC", BTC + 1), "exceeds_credited"),
    ):
        release = desk.release(*args, at)
        assert (release.decision.allowed, release.decision.reason, release.ack) == (
            False,
            expected,
            None,
        )
    stale = desk.release("alice", CUSTODIAN, "BTC", 1, NOW + timedelta(minutes=10))
    assert stale.decision.reason == "stream_stale"
    assert journal_page(desk.engine, after=0, limit=1000) == before
    assert outbox_types(desk.engine) == []


# --- the API ------------------------------------------------------------------------------------

TOKENS = {name: secrets.token_urlsafe(16) for name in ("alice", "bob", "operator", "engine")}
PRINCIPALS = {
    "alice": "client:alice",
    "bob": "client:bob",
    "operator": "operator:olga",
    "engine": "engine:m",
}


@pytest.fixture
async def api(desk: MarginDesk) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    tokens = TokenStore.from_lines(
        f"{compute_token_hash(TOKENS[n]).hex()} {p}" for n, p in PRINCIPALS.items()
    )
    app = create_app(desk=desk, tokens=tokens, clock=lambda: NOW + timedelta(seconds=5))
    async with TestClient(TestServer(app)) as client:
        yield client


def body(**changes: Any) -> dict[str, Any]:
    return {
        "client": "alice",
        "custodian": CUSTODIAN,
        "asset": "BTC",
        "quantity": "1000",
        **changes,
    }


async def test_the_release_route(api: TestClient[web.Request, web.Application]) -> None:
    async def post(who: str, payload: Any) -> tuple[int, Any]:
        response = await api.post(
            "/v1/releases", json=payload, headers={"Authorization": f"Bearer {TOKENS[who]}"}
        )
        return response.status, await response.json()

    status, answer = await post("alice", body())
    assert status == 200, answer
    assert answer["allowed"] is True
    assert answer["reason"] is None
    signed_ack = SignedNotice.from_wire(answer["release_ack"])
    verified = verify_release_ack(signed_ack, registry=REGISTRY, now=NOW + timedelta(seconds=5))
    assert (verified.client, verified.quantity) == ("alice", 1000)
    status, answer = await post("operator", body(client="bob", quantity="2000"))
    assert (status, answer["allowed"]) == (200, True)
    status, answer = await post("alice", body(quantity=str(2 * BTC)))
    assert (status, answer["allowed"], answer["reason"], answer["release_ack"]) == (
        200,
        False,
        "exceeds_credited",
        None,
    )
    assert (await post("bob", body()))[0] == 403  # another client's pledge
    assert (await post("engine", body()))[0] == 403
    for bad in (
        body(quantity=1000),
        body(quantity="1.5"),
        body(quantity="0"),
        body(asset="btc"),
        body(custodian=EXCHANGE),
        body(custodian="Bad"),
        body(client="has space"),
        body(extra="x"),
        {"client": "alice"},
    ):
        assert (await post("alice", bad))[0] == 400, bad
    response = await api.post("/v1/releases", json=body())
    assert response.status == 401


# --- mcb custodian unpledge -----------------------------------------------------------------------


def test_the_cli_unpledges_once_with_a_signed_acknowledgement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mcb.cli import main
    from mcb.config import DEFAULT_CUSTODIAN

    monkeypatch.setenv("MCB_DATABASE_URL", f"sqlite:///{tmp_path / 'custodian.sqlite3'}")
    monkeypatch.delenv("MCB_CONFIG", raising=False)
    now = truncate_to_millis(datetime.now(UTC))
    registry_file = tmp_path / "exchange-registry.json"
    registry = KeyRegistry.of(
        [KeyRecord(EXCHANGE, KeyRole.EXCHANGE, EXCHANGE_KEY.public_key, now - timedelta(days=1))],
        quorums={},
    )
    registry_file.write_bytes(compute_canonical_bytes(registry.to_wire()))

    def run(*argv: str) -> tuple[int, str, str]:
        status = main(["custodian", *argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    common = ("--client", "alice", "--asset", "BTC")
    assert run("deposit", *common, "--quantity", str(BTC), "--idempotency-key", "d")[0] == 0
    pledge = ("pledge", *common, "--quantity", str(BTC), "--exchange", EXCHANGE)
    assert run(*pledge, "--idempotency-key", "p")[0] == 0

    def ack_file(name: str, **changes: Any) -> Path:
        body = ack(
            custodian=DEFAULT_CUSTODIAN,
            issued_at=now,
            expires_at=now + timedelta(minutes=15),
            **changes,
        )
        path = tmp_path / name
        path.write_bytes(signed(body))
        return path

    def unpledge_with(key: str, quantity: int, *source: str) -> tuple[int, str, str]:
        return run(
            "unpledge",
            *common,
            "--quantity",
            str(quantity),
            "--exchange",
            EXCHANGE,
            "--exchange-registry",
            str(registry_file),
            "--idempotency-key",
            key,
            *source,
        )

    first = ack_file("ack.json")
    status, out, err = unpledge_with("u-1", BTC // 4, "--release-ack-file", str(first))
    assert status == 0, err
    entry = json.loads(out)
    release_id = entry["command"]["release_ack"]
    assert release_id == SignedNotice.decode(first.read_bytes()).notice.release_id  # type: ignore[union-attr]
    # The same command again is a retry; another command under the same acknowledgement is not.
    assert unpledge_with("u-1", BTC // 4, "--release-ack", release_id)[0] == 0
    status, _, err = unpledge_with("u-2", 1, "--release-ack", release_id)
    assert status == 2
    assert "release_ack_reused" in err
    for path, quantity, reason_code in (
        (ack_file("big.json"), BTC // 2 + 1, "release_ack_exceeded"),
        (ack_file("bob.json", client="bob"), 1, "release_ack_mismatch"),
    ):
        status, _, err = unpledge_with("u-3", quantity, "--release-ack-file", str(path))
        assert status == 2
        assert reason_code in err, err
    forged = tmp_path / "forged.json"
    forged.write_bytes(
        sign_notice(
            ack(
                custodian=DEFAULT_CUSTODIAN,
                issued_at=now,
                expires_at=now + timedelta(minutes=15),
                quantity=7,
            ),
            OTHER_KEY,
        ).encode()
    )
    status, _, err = unpledge_with("u-4", 1, "--release-ack-file", str(forged))
    assert status == 2
    assert "unknown_key" in err
    status, _, err = unpledge_with("u-5", 1, "--release-ack", "ff" * 32)
    assert status == 2
    assert "release_ack_unknown" in err
    status, out, _ = run("show-pledged", "--exchange", EXCHANGE, "--format", "json")
    assert json.loads(out)[0]["units"] == str(3 * BTC // 4)
