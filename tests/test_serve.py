"""``mcb custodian serve`` end to end, as an operator runs it: a subprocess on a temporary
configuration (SQLite, a price file, a token file, port 0) with the embedded broker and the
development key; pledges made with the command line become a statement served over HTTP, a
client's proof from the API verifies against it, and SIGTERM stops everything with status 0."""

from __future__ import annotations

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from attestations.amounts import Price
from attestations.canonical import (
    compute_canonical_bytes,
    parse_json_object,
    truncate_to_millis,
)
from attestations.disclosure import ClientProof, verify_client_proof
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.p256 import SoftwareP256Signer
from attestations.statement import PricePoint, SignedStatement
from custodian.api import compute_token_hash
from mcb.config import InvalidConfiguration, parse_config

EXCHANGE = "exchange-one"
CLIENT = "client-alice"
STARTUP_TIMEOUT_S = 15.0
STATEMENT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def write_config(tmp_path: Path, token: str) -> Path:
    now = truncate_to_millis(datetime.now(UTC))
    prices = [PricePoint(Price.parse(asset="BTC", quote="USD", text="64123.45"), "file:test", now)]
    (tmp_path / "prices.json").write_text(json.dumps([p.to_wire() for p in prices]))
    (tmp_path / "tokens").write_text(f"{compute_token_hash(token).hex()} client:{CLIENT}\n")
    (tmp_path / "salt").write_bytes(secrets.token_bytes(32))
    (tmp_path / "cosigners").write_text(
        "# development co-signers\n" + "".join(secrets.token_hex(32) + "\n" for _ in range(3))
    )
    exchange_key = SoftwareP256Signer(insecure_development_only=True)
    exchange_registry = KeyRegistry.of(
        [KeyRecord(EXCHANGE, KeyRole.EXCHANGE, exchange_key.public_key, now)], quorums={}
    )
    (tmp_path / "exchange-registry.json").write_bytes(
        compute_canonical_bytes(exchange_registry.to_wire())
    )
    config = tmp_path / "mcb.toml"
    config.write_text(
        f"""
[custodian]
database_url = "sqlite:///{tmp_path}/custodian.sqlite3"
salt_secret_file = "{tmp_path}/salt"

[serve]
exchange = "{EXCHANGE}"
translog_path = "{tmp_path}/translog.sqlite3"
port = 0
token_file = "{tmp_path}/tokens"
price_file = "{tmp_path}/prices.json"
cosigner_seeds_file = "{tmp_path}/cosigners"
exchange_registry_file = "{tmp_path}/exchange-registry.json"
interval_s = 0.5
"""
    )
    return config


def mcb(config: Path, *argv: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "mcb.cli", "custodian", *argv, "--config", str(config)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def get(url: str, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def poll(url: str, token: str, *, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = get(url, token)
        if status == 200:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: still {status} after {timeout_s} s: {body[:200]!r}")
        time.sleep(0.1)


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


def test_serve_publishes_statements_and_proofs_and_stops_cleanly_on_sigterm(
    tmp_path: Path, tansu_binary: Path
) -> None:
    del tansu_binary  # skips (or fails in CI) when the broker is not installed
    token = secrets.token_urlsafe(32)
    config = write_config(tmp_path, token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCB_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mcb.cli",
            "custodian",
            "serve",
            "--config",
            str(config),
            "--embedded-broker",
            "--software-key",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        base = read_address(process)
        mcb(config, "deposit", "--client", CLIENT, "--asset", "BTC", "--quantity", "150000000")
        mcb(
            config,
            "pledge",
            "--client",
            CLIENT,
            "--asset",
            "BTC",
            "--quantity",
            "100000000",
            "--exchange",
            EXCHANGE,
        )
        stream = f"{base}/v1/streams/{EXCHANGE}"
        poll(f"{stream}/statements/latest", token, timeout_s=STATEMENT_TIMEOUT_S)
        # The first statement may predate the pledge: the proof appears with the next epoch.
        proof_body = poll(f"{stream}/proofs/{CLIENT}/BTC", token, timeout_s=STATEMENT_TIMEOUT_S)
        proof = ClientProof.from_wire(parse_json_object(proof_body))
        _, statement_body = get(f"{stream}/statements/{proof.sequence}", token)
        statement = SignedStatement.decode(statement_body).statement
        assert verify_client_proof(proof, statement=statement) == 100_000_000

        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "--software-key" in stderr
    # The exchange's registry was loaded: release acknowledgements are verified, not refused.
    assert "no [serve] exchange_registry_file" not in stderr
    assert stdout == ""  # everything after the address line went to the log, on stderr


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"hsm": {"token_label": "t", "pin": "1234"}}, "pin is not accepted"),
        ({"hsm": {"key_label": "k"}}, "token_label is required"),
        ({"serve": {"port": 70000}}, "port must be in 0..65535"),
        ({"serve": {"interval_s": 0}}, "interval_s must be positive"),
        ({"serve": {"exchange": ""}}, "exchange must be a non-empty string"),
        ({"serve": {"prot": 1}}, "unknown key(s) in [serve]: prot"),
    ],
)
def test_bad_serve_configuration_is_refused(document: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidConfiguration, match=re.escape(message)):
        parse_config(document, {})


def test_serve_configuration_defaults() -> None:
    serve = parse_config({}, {}).serve
    assert (serve.host, serve.port, serve.translog_path) == (
        "127.0.0.1",
        8080,
        "var/translog.sqlite3",
    )
    assert serve.exchange_registry_file is None
    with pytest.raises(InvalidConfiguration, match="serve needs exchange"):
        serve.require("exchange")
