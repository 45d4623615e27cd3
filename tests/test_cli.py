"""``mcb custodian``: each sub-command through ``mcb.cli.main`` on a temporary SQLite book, and the
configuration parsing (file + environment) with its errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from attestations.amounts import Asset
from attestations.canonical import compute_canonical_bytes, truncate_to_millis
from attestations.disclosure import ClientProof, verify_client_proof
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.notices import ReleaseAck, sign_notice
from attestations.p256 import SoftwareP256Signer
from attestations.signing import Cosigner
from attestations.statement import SignedStatement
from attestations.translog import TransparencyLog
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService
from custodian.store import CustodyBook
from mcb.cli import main
from mcb.config import (
    DEFAULT_ASSETS,
    DEFAULT_CUSTODIAN,
    DEFAULT_DATABASE_URL,
    InvalidConfiguration,
    load_config,
    parse_config,
    parse_toml,
)
from tests.world import NOW, World, sample_prices, seed

EXCHANGE = "exchange-one"


@pytest.fixture
def database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'book' / 'custodian.sqlite3'}"
    monkeypatch.setenv("MCB_DATABASE_URL", url)
    monkeypatch.delenv("MCB_CONFIG", raising=False)
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["custodian", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    return json.loads(out)


def args(kind: str, quantity: str, key: str | None, *extra: str) -> list[str]:
    argv = [kind, "--client", "alice", "--asset", "BTC", "--quantity", quantity, *extra]
    return argv if key is None else [*argv, "--idempotency-key", key]


PLEDGE = ("--exchange", EXCHANGE)


# --- movements ----------------------------------------------------------------------------------


def signed_release(tmp_path: Path, *, quantity: int) -> tuple[Path, Path, str]:
    """An exchange key registry file and a release acknowledgement for alice's BTC signed with
    that key, valid now: (registry file, acknowledgement file, release id)."""
    key = SoftwareP256Signer(insecure_development_only=True, private_scalar=seed("exchange-one"))
    now = truncate_to_millis(datetime.now(UTC))
    registry = KeyRegistry.of(
        [KeyRecord(EXCHANGE, KeyRole.EXCHANGE, key.public_key, now - timedelta(days=1))],
        quorums={},
    )
    registry_file = tmp_path / "exchange-registry.json"
    registry_file.write_bytes(compute_canonical_bytes(registry.to_wire()))
    body = ReleaseAck(
        exchange=EXCHANGE,
        custodian=DEFAULT_CUSTODIAN,
        client="alice",
        asset="BTC",
        quantity=quantity,
        issued_at=now,
        expires_at=now + timedelta(minutes=15),
    )
    ack_file = tmp_path / "release-ack.json"
    ack_file.write_bytes(sign_notice(body, key).encode())
    return registry_file, ack_file, body.release_id


def test_deposit_pledge_unpledge_withdraw_print_their_journal_entries(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deposit = run_json(capsys, *args("deposit", "150000000", "d-1"))
    assert deposit["entry_id"] == 1
    assert deposit["command"] == {
        "version": 1,
        "kind": "deposit",
        "idempotency_key": "d-1",
        "client": "alice",
        "asset": "BTC",
        "quantity": "150000000",
    }
    assert deposit["postings"] == [
        {"holder": "@custodian", "asset": "BTC", "sub_account": "external", "amount": "-150000000"},
        {"holder": "alice", "asset": "BTC", "sub_account": "available", "amount": "150000000"},
    ]
    pledge = run_json(capsys, *args("pledge", "100000000", "p-1", *PLEDGE))
    assert pledge["postings"][1]["sub_account"] == f"pledged:{EXCHANGE}"
    registry_file, ack_file, release_id = signed_release(tmp_path, quantity=40000000)
    release = ("--exchange-registry", str(registry_file), "--release-ack-file", str(ack_file))
    unpledge = run_json(capsys, *args("unpledge", "40000000", "u-1", *PLEDGE, *release))
    assert unpledge["command"]["release_ack"] == release_id
    withdraw = run_json(capsys, *args("withdraw", "10000000", "w-1"))
    assert withdraw["entry_id"] == 4

    book = run_json(capsys, "show-book", "--format", "json")
    assert {(row["sub_account"], row["units"]) for row in book} == {
        ("available", "80000000"),
        (f"pledged:{EXCHANGE}", "60000000"),
    }
    assert run_json(capsys, "show-pledged", "--exchange", EXCHANGE, "--format", "json") == [
        {"client": "alice", "asset": "BTC", "units": "60000000", "whole_units": "0.60000000"}
    ]


def test_a_default_idempotency_key_is_random_and_printed(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, *args("deposit", "5", None))
    assert status == 0
    key = json.loads(out)["command"]["idempotency_key"]
    assert key.startswith("cli-")
    assert f"--idempotency-key {key}" in err
    status, out, _ = run(capsys, *args("deposit", "5", None))
    assert json.loads(out)["command"]["idempotency_key"] != key


def test_a_retry_with_the_same_key_prints_the_same_entry_and_has_no_second_effect(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run_json(capsys, *args("deposit", "500", "d-1"))
    again = run_json(capsys, *args("deposit", "500", "d-1"))
    assert again == first
    book = run_json(capsys, "show-book", "--client", "alice", "--format", "json")
    assert [row["units"] for row in book] == ["500"]


def test_reusing_a_key_for_another_command_exits_2(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_json(capsys, *args("deposit", "500", "d-1"))
    status, out, err = run(capsys, *args("deposit", "501", "d-1"))
    assert (status, out) == (2, "")
    assert err.startswith("mcb: IdempotencyConflict (idempotency_conflict): ")
    assert err.count("\n") == 1


def test_pledging_beyond_available_exits_2_and_changes_nothing(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_json(capsys, *args("deposit", "500", "d-1"))
    status, _, err = run(capsys, *args("pledge", "501", "p-1", *PLEDGE))
    assert status == 2
    assert err.startswith("mcb: InsufficientBalance (insufficient_balance): pledge of 501 BTC")
    assert run_json(capsys, "show-pledged", "--exchange", EXCHANGE, "--format", "json") == []


def test_an_unknown_asset_exits_2(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(
        capsys, "deposit", "--client", "alice", "--asset", "DOGE", "--quantity", "5"
    )
    assert status == 2
    assert "mcb: UnknownAsset (unknown_asset): asset 'DOGE'" in err


@pytest.mark.parametrize(
    ("quantity", "reason"),
    [
        ("1.5", "float_rejected"),
        ("1e8", "float_rejected"),
        ("100.", "float_rejected"),
        ("-5", "negative_sum"),
        ("0x10", "invalid_amount"),
        ("007", "invalid_amount"),
        ("", "invalid_amount"),
        (" 5", "invalid_amount"),
        (str(2**128), "sum_overflow"),
    ],
)
def test_a_float_or_malformed_quantity_exits_2_before_touching_the_book(
    database_url: str, capsys: pytest.CaptureFixture[str], quantity: str, reason: str
) -> None:
    status, out, err = run(capsys, *args("deposit", quantity, "d-1"))
    assert (status, out) == (2, "")
    assert f"({reason}):" in err
    assert err.count("\n") == 1
    assert not Path(database_url.removeprefix("sqlite:///")).exists()


def test_a_zero_quantity_is_refused(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, *args("deposit", "0", "d-1"))
    assert status == 2
    assert "(invalid_quantity):" in err


def test_show_book_prints_a_table_with_whole_units(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_json(capsys, *args("deposit", "150000000", "d-1"))
    status, out, _ = run(capsys, "show-book")
    assert status == 0
    header, row = out.splitlines()
    assert header.split() == ["client", "asset", "sub_account", "units", "whole_units"]
    assert row.split() == ["alice", "BTC", "available", "150000000", "1.50000000"]
    status, out, _ = run(capsys, "show-book", "--asset", "USDC", "--format", "json")
    assert json.loads(out) == []


# --- show-proof ---------------------------------------------------------------------------------


def test_show_proof_gives_a_proof_that_verifies_against_the_latest_statement(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    salt_file = tmp_path / "salt"
    salt_file.write_bytes(seed("cli-salt"))
    run_json(capsys, *args("deposit", "150000000", "d-1"))
    run_json(capsys, *args("pledge", "100000000", "p-1", *PLEDGE))
    status, _, err = run(
        capsys,
        "show-proof",
        "--exchange",
        EXCHANGE,
        "--client",
        "alice",
        "--asset",
        "BTC",
        "--config",
        str(write(tmp_path, salt_file)),
    )
    assert status == 2
    assert "(proof_unavailable): no statement" in err

    world = World()
    with (
        CustodyBook.open(database_url, assets=DEFAULT_ASSETS) as book,
        TransparencyLog(tmp_path / "translog.sqlite3") as log,
    ):
        service = AttestationService.open(
            book,
            custodian="custodian-bank",
            exchange=EXCHANGE,
            signer=world.signer,
            cosigners=[Cosigner(key) for key in world.cosigners],
            quorum=2,
            salt_secret=seed("cli-salt"),
            decimals={asset.code: asset.decimals for asset in DEFAULT_ASSETS},
            prices=StaticPriceSource(sample_prices()),
            log=log,
        )
        signed: SignedStatement = service.publish_epoch(NOW)

    config = str(write(tmp_path, salt_file))
    wire = run_json(
        capsys,
        "show-proof",
        "--config",
        config,
        "--exchange",
        EXCHANGE,
        "--client",
        "alice",
        "--asset",
        "BTC",
    )
    proof = ClientProof.from_wire(wire)
    assert proof.sequence == 1
    assert proof.statement_digest == signed.digest
    assert verify_client_proof(proof, statement=signed.statement) == 100_000_000

    status, _, err = run(
        capsys,
        "show-proof",
        "--config",
        config,
        "--exchange",
        EXCHANGE,
        "--client",
        "bob",
        "--asset",
        "BTC",
    )
    assert status == 2
    assert "(proof_unavailable): bob / BTC is not in statement #1" in err


def test_show_proof_without_a_salt_secret_is_a_configuration_error(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(
        capsys, "show-proof", "--exchange", EXCHANGE, "--client", "alice", "--asset", "BTC"
    )
    assert status == 2
    assert err.startswith("mcb: InvalidConfiguration (invalid_configuration): show-proof needs")


def write(tmp_path: Path, salt_file: Path) -> Path:
    path = tmp_path / "mcb.toml"
    path.write_text(f'[custodian]\nsalt_secret_file = "{salt_file}"\n')
    return path


# --- configuration ------------------------------------------------------------------------------


def test_the_defaults() -> None:
    config = parse_config({}, {})
    assert config.database_url == DEFAULT_DATABASE_URL == "sqlite:///var/custodian.sqlite3"
    assert config.assets == (
        Asset("BENJI", 6),
        Asset("USDC", 6),
        Asset("BTC", 8),
        Asset("ETH", 18),
    )
    assert config.custodian == "custodian-bank"
    assert config.kafka is None


def test_a_file_and_environment_overrides() -> None:
    document = parse_toml(
        """
        [custodian]
        id = "bank-two"
        database_url = "sqlite:///file.sqlite3"

        [assets]
        BTC = 8
        EURC = 6

        [kafka]
        bootstrap_servers = "kafka-a:9092"
        request_timeout_ms = 5000
        """,
        source="mcb.toml",
    )
    config = parse_config(document, {}, source="mcb.toml")
    assert config.custodian == "bank-two"
    assert config.database_url == "sqlite:///file.sqlite3"
    assert config.assets == (Asset("BTC", 8), Asset("EURC", 6))
    assert config.kafka is not None
    assert (config.kafka.bootstrap_servers, config.kafka.request_timeout_ms) == (
        "kafka-a:9092",
        5000,
    )

    env = {
        "MCB_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:5432/test",
        "MCB_KAFKA_BOOTSTRAP_SERVERS": "kafka-b:9093",
        "MCB_SALT_SECRET_FILE": "/run/secrets/salt",
        "UNRELATED": "x",
    }
    overridden = parse_config(document, env, source="mcb.toml")
    assert overridden.database_url == env["MCB_DATABASE_URL"]
    assert overridden.salt_secret_file == "/run/secrets/salt"
    assert overridden.kafka is not None
    assert overridden.kafka.bootstrap_servers == "kafka-b:9093"
    assert overridden.kafka.request_timeout_ms == 5000  # from the file, not overridden


def test_load_config_reads_the_file_named_by_mcb_config(tmp_path: Path) -> None:
    path = tmp_path / "mcb.toml"
    path.write_text('[custodian]\ndatabase_url = "sqlite:///x.sqlite3"\n')
    assert load_config(None, {"MCB_CONFIG": str(path)}).database_url == "sqlite:///x.sqlite3"
    with pytest.raises(InvalidConfiguration, match="cannot read"):
        load_config(tmp_path / "missing.toml", {})


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[custodian\n", {}, r"mcb.toml: not valid TOML"),
        ("[custodain]\n", {}, r"unknown section\(s\) custodain"),
        ('[custodian]\ndatabse_url = "x"\n', {}, r"unknown key\(s\) in \[custodian\]: databse_url"),
        ('[custodian]\ndatabase_url = "mysql://h/db"\n', {}, r"scheme 'mysql' is not supported"),
        ("", {"MCB_DATABASE_URL": "oracle://h/db"}, r"MCB_DATABASE_URL scheme 'oracle'"),
        ('[custodian]\ndatabase_url = "not a url"\n', {}, r"is not a database URL"),
        ("[custodian]\ndatabase_url = 5\n", {}, r"database_url must be a string"),
        ('[assets]\nBTC = "8"\n', {}, r"\[assets\] BTC must be an integer"),
        ("[assets]\nBTC = 8.0\n", {}, r"\[assets\] BTC must be an integer"),
        ("[assets]\nbtc = 8\n", {}, r"\[assets\] btc"),
        ("[assets]\nBTC = 99\n", {}, r"\[assets\] BTC"),
        ('[kafka]\nbootstrap_server = "h:1"\n', {}, r"unknown setting MCB_KAFKA_BOOTSTRAP_SERVER"),
        ("", {"MCB_KAFKA_BOOTSTRAP_SERVERS": "no-port"}, r"not 'host:port'"),
        ("", {"MCB_KAFKA_CLIENT_ID": "x"}, r"MCB_KAFKA_BOOTSTRAP_SERVERS is required"),
        ('[custodian]\nid = "has space"\n', {}, r"\[custodian\] id"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(
    text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidConfiguration, match=message):
        parse_config(parse_toml(text, source="mcb.toml"), env, source="mcb.toml")


def test_a_bad_configuration_file_makes_the_command_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MCB_DATABASE_URL", raising=False)
    path = tmp_path / "mcb.toml"
    path.write_text('[custodian]\ndatabase_url = "mysql://h/db"\n')
    status, _, err = run(capsys, "show-book", "--config", str(path))
    assert status == 2
    assert err.startswith("mcb: InvalidConfiguration (invalid_configuration): ")
    assert "scheme 'mysql' is not supported" in err
