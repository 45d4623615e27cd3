"""``mcb exchange serve`` as an operator runs it: a subprocess on a temporary configuration
(SQLite, the custodian's published registry file, a token file, port 0, a broker of the test's
own, the development key). A custodian's attestation service publishes a statement on that broker;
the served exchange credits it, and the operator commands (status, streams, resolve-fork) read and
act through its API; SIGTERM stops everything with status 0. Also: the [exchange] configuration
and the custodian registry files, bad ones refused."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from attestations.amounts import Asset, Price
from attestations.canonical import compute_canonical_bytes, truncate_to_millis
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.signing import Cosigner
from attestations.statement import PricePoint
from attestations.translog import TransparencyLog
from bridge.broker import EmbeddedBroker
from bridge.http import compute_token_hash
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay
from custodian.book import Deposit, Pledge
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService
from custodian.store import CustodyBook
from mcb.config import InvalidConfiguration, parse_config
from mcb.exchange_cli import load_custodian_keys
from tests.world import CUSTODIAN, EXCHANGE, World, custodian_signer

STARTUP_TIMEOUT_S = 30.0
CREDIT_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
BTC = 100_000_000
PRICE = "64123.45"
# 1.5 BTC x 64,123.45 USD x 80 %, rounded down to the cent.
ALICE_COLLATERAL = 150_000_000 * 6_412_345 * 100 * 8_000 // (10**8 * 100 * 10_000)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def write_config(tmp_path: Path, world: World, broker: EmbeddedBroker, token: str) -> Path:
    (tmp_path / "registry.json").write_bytes(compute_canonical_bytes(world.registry.to_wire()))
    (tmp_path / "tokens").write_text(
        f"# operator tokens\n{compute_token_hash(token).hex()} operator:ops\n"
    )
    config = tmp_path / "mcb.toml"
    config.write_text(
        f"""
[assets]
BTC = 8
USDC = 6

[kafka]
bootstrap_servers = "{broker.bootstrap_servers}"

[exchange]
id = "{EXCHANGE}"
database_url = "sqlite:///{tmp_path}/exchange.sqlite3"
port = 0
token_file = "{tmp_path}/tokens"
evaluate_interval_s = 0.5

[exchange.custodians.{CUSTODIAN}]
registry_file = "{tmp_path}/registry.json"

[exchange.policy]
stale_after_s = 600
"""
    )
    return config


def read_address(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("mcb: serving on "):
            return line.removeprefix("mcb: serving on ").strip()
    raise AssertionError(f"serve did not print its address (status {process.poll()})")


def operator(config: Path, base: str, token: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCB_")}
    env |= {"MCB_EXCHANGE_URL": base, "MCB_EXCHANGE_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "mcb.cli", "exchange", *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def get(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def publish_statement(tmp_path: Path, world: World, broker: EmbeddedBroker) -> None:
    """The custodian side: alice pledges 1.5 BTC; one statement goes out through the outbox."""
    now = truncate_to_millis(datetime.now(UTC))
    assets = [Asset("BTC", 8), Asset("USDC", 6)]
    with (
        CustodyBook.open(f"sqlite:///{tmp_path}/custodian.sqlite3", assets=assets) as book,
        TransparencyLog(tmp_path / "translog.sqlite3") as log,
    ):
        book.apply(Deposit("d-1", "alice", "BTC", 2 * BTC))
        book.apply(Pledge("p-1", "alice", "BTC", EXCHANGE, 150_000_000))
        settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        relay = OutboxRelay(book.engine, settings, poll_interval_s=0.05)
        service = AttestationService.open(
            book,
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            signer=world.signer,
            cosigners=[Cosigner(key) for key in world.cosigners],
            quorum=2,
            salt_secret=secrets.token_bytes(32),
            decimals={"BTC": 8, "USDC": 6},
            prices=StaticPriceSource(
                (PricePoint(Price.parse(asset="BTC", quote="USD", text=PRICE), "test", now),)
            ),
            log=log,
            relay=relay,
        )
        service.publish_epoch()

        async def drain() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(relay.run(stop))
            deadline = time.monotonic() + CREDIT_TIMEOUT_S
            while relay.metrics.published < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await task

        asyncio.run(drain())
        assert relay.metrics.published >= 1


@pytest.mark.broker
def test_serve_credits_statements_answers_operators_and_stops_on_sigterm(
    tmp_path: Path, world: World, fresh_broker: EmbeddedBroker
) -> None:
    token = secrets.token_urlsafe(32)
    config = write_config(tmp_path, world, fresh_broker, token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCB_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mcb.cli",
            "exchange",
            "serve",
            "--config",
            str(config),
            "--software-key",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        base = read_address(process)
        publish_statement(tmp_path, world, fresh_broker)
        deadline = time.monotonic() + CREDIT_TIMEOUT_S
        while True:
            status, body = get(f"{base}/v1/clients/alice", token)
            if status == 200:
                break
            assert time.monotonic() < deadline, f"alice never credited: {status} {body}"
            time.sleep(0.1)

        shown = operator(config, base, token, "status", "alice")
        assert shown.returncode == 0, shown.stderr
        alice = json.loads(shown.stdout)
        assert alice["collateral"] == str(ALICE_COLLATERAL) == "7694814"
        assert alice["credit_limit"] == str(2 * ALICE_COLLATERAL)
        assert alice["state"] == "healthy"
        assert [(p["asset"], p["quantity"]) for p in alice["positions"]] == [("BTC", "150000000")]

        streams = operator(config, base, token, "streams")
        assert streams.returncode == 0, streams.stderr
        (stream,) = json.loads(streams.stdout)["streams"]
        assert (stream["stream"], stream["head"]["sequence"]) == (f"{CUSTODIAN}/{EXCHANGE}", 1)
        assert (stream["frozen"], stream["freshness"]) == (False, "fresh")

        # Nothing is frozen: the API refuses, the command says so in one line and exits 2.
        resolve = operator(
            config,
            base,
            token,
            "resolve-fork",
            f"{CUSTODIAN}/{EXCHANGE}",
            "--operator",
            "ops",
            "--reason",
            "checked",
        )
        assert resolve.returncode == 2
        assert resolve.stderr.startswith("mcb: ExchangeApiRefused (exchange_api_refused): ")
        assert "409 stream_not_frozen" in resolve.stderr
        unknown = operator(config, base, token, "status", "nobody")
        assert unknown.returncode == 2
        assert "404" in unknown.stderr
        wrong = operator(config, base, secrets.token_urlsafe(32), "streams")
        assert wrong.returncode == 2
        assert "401" in wrong.stderr

        status, health = get(f"{base}/health/service")
        assert status == 200, health
        assert health["status"] == "ok"
        assert set(health["parts"]) == {
            "database",
            "outbox-relay",
            "attestations",
            "exposures",
            "evaluator",
            "api",
        }
        assert health["parts"]["attestations"]["applied"] >= 1
        assert health["parts"]["evaluator"]["passes"] >= 1

        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "--software-key" in stderr
    assert "Traceback" not in stderr
    assert stdout == ""  # everything after the address line went to the log, on stderr


def test_operator_commands_without_a_token_or_a_server_fail_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCB_")}
    no_token = subprocess.run(
        [sys.executable, "-m", "mcb.cli", "exchange", "streams"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert no_token.returncode == 2
    assert "MCB_EXCHANGE_TOKEN" in no_token.stderr
    env |= {
        "MCB_EXCHANGE_TOKEN": secrets.token_urlsafe(32),
        "MCB_EXCHANGE_URL": "http://127.0.0.1:9",
    }
    nobody = subprocess.run(
        [sys.executable, "-m", "mcb.cli", "exchange", "status", "alice"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert nobody.returncode == 2
    assert nobody.stderr.startswith("mcb: ExchangeApiUnavailable (exchange_api_unavailable): ")
    assert len(nobody.stderr.strip().splitlines()) == 1


# --- configuration --------------------------------------------------------------------------------


def test_exchange_configuration_defaults_and_overrides() -> None:
    config = parse_config(
        {
            "exchange": {
                "id": "exchange-one",
                "custodians": {"bank-a": {"registry_file": "/r/a.json"}},
                "policy": {
                    "leverage_bps": 15_000,
                    "stale_after_s": 60,
                    "rates_bps": {"BTC": 7_000, "SOL": 5_000},
                },
            }
        },
        {"MCB_EXCHANGE_DATABASE_URL": "sqlite:///x.sqlite3"},
    ).exchange
    assert (config.id, config.database_url, config.port) == (
        "exchange-one",
        "sqlite:///x.sqlite3",
        8090,
    )
    assert config.api_url == "http://127.0.0.1:8090"
    assert [(c.id, c.registry_file) for c in config.custodians] == [("bank-a", "/r/a.json")]
    policy = config.policy
    assert policy.leverage_bps == 15_000
    assert policy.stale_after == timedelta(seconds=60)
    assert policy.zero_grace == timedelta(seconds=900)  # default kept
    assert dict(policy.rates_bps) == {
        "BENJI": 9_800,
        "USDC": 9_500,
        "USDT": 9_500,
        "BTC": 7_000,
        "ETH": 7_500,
        "SOL": 5_000,
    }
    defaults = parse_config({}, {}).exchange
    assert defaults.id is None
    with pytest.raises(InvalidConfiguration, match="exchange serve needs id"):
        defaults.require("id")


@pytest.mark.parametrize(
    ("exchange", "message"),
    [
        ({"prot": 1}, "unknown key(s) in [exchange]: prot"),
        ({"id": ""}, "[exchange] id must be a non-empty string"),
        ({"port": 70000}, "port must be in 0..65535"),
        ({"evaluate_interval_s": 0}, "evaluate_interval_s must be positive"),
        ({"database_url": "mysql://x"}, "scheme 'mysql' is not supported"),
        ({"custodians": {"bank a": {"registry_file": "r"}}}, "[exchange.custodians.bank a]"),
        ({"custodians": {"bank-a": {}}}, "registry_file is required"),
        ({"custodians": {"bank-a": {"registry": "r"}}}, "unknown key(s)"),
        ({"policy": {"liquidation_bps": 12_000}}, "liquidation line 12000 bp must be below"),
        ({"policy": {"leverage_bps": 1.5}}, "leverage_bps must be an integer"),
        ({"policy": {"stale_after_s": 0}}, "stale_after_s must be a positive number"),
        ({"policy": {"rates_bps": {"BTC": 12_000}}}, "BTC collateral rate 12000 bp"),
        ({"policy": {"rates_bps": {"BTC": "80%"}}}, "BTC must be an integer"),
        ({"hsm": {"token_label": "t", "pin": "1"}}, "[exchange.hsm] pin is not accepted"),
        ({"url": "ftp://x"}, "url must start with http"),
    ],
)
def test_bad_exchange_configuration_is_refused(exchange: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidConfiguration, match=re.escape(message)):
        parse_config({"exchange": exchange}, {})


def test_custodian_registry_files_vouch_for_their_own_custodian_only(
    tmp_path: Path, world: World
) -> None:
    stranger = custodian_signer("another-custodian")
    published = KeyRegistry.from_wire(world.registry.to_wire())
    published.register(
        KeyRecord(
            "bank-z", KeyRole.CUSTODIAN, stranger.public_key, datetime(2026, 1, 1, tzinfo=UTC)
        )
    )
    published.set_quorum("bank-z", threshold=1)
    path = tmp_path / "registry.json"
    path.write_bytes(compute_canonical_bytes(published.to_wire()))
    source = parse_config(
        {"exchange": {"custodians": {CUSTODIAN: {"registry_file": str(path)}}}}, {}
    ).exchange.custodians
    keys = load_custodian_keys(source)
    assert {record.principal for record in keys.records()} == {CUSTODIAN}
    assert len(keys.records()) == 4  # the custodian key and three co-signers
    assert keys.quorum_threshold(CUSTODIAN) == 2

    # A file that does not carry the custodian's key, or is not a registry, is refused.
    wrong = parse_config(
        {"exchange": {"custodians": {"bank-y": {"registry_file": str(path)}}}}, {}
    ).exchange.custodians
    with pytest.raises(InvalidConfiguration, match="no custodian key of bank-y"):
        load_custodian_keys(wrong)
    path.write_text('{"keys": []}')
    with pytest.raises(InvalidConfiguration, match="not a key registry"):
        load_custodian_keys(source)
    with pytest.raises(InvalidConfiguration, match="at least one"):
        load_custodian_keys(())
