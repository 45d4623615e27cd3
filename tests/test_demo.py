"""The end-to-end demo on SoftHSM2, its files checked again with ``mcb verify-proof``, the
development-only software key, and a refused second run in one work directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Self

import pytest

from attestations import hsm
from attestations.canonical import compute_canonical_bytes, format_timestamp, parse_json_object
from attestations.statement import SignedStatement, Statement, StatementKind
from attestations.translog import TransparencyLog
from mcb.cli import main
from mcb.demo import DemoResult, run_demo
from mcb.softhsm import SoftHsm

REPO = Path(__file__).resolve().parent.parent
FILES = ("statement.json", "registry.json", "client-proof.json")
BOB_BTC = 1_500_000_000  # 12.5 BTC pledged, then 2.5 BTC more in the delta


@dataclass(frozen=True)
class DemoRun:
    workdir: Path
    result: DemoResult
    lines: list[str]


@pytest.fixture(scope="module")
def softhsm_demo(softhsm_conf: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    workdir = tmp_path_factory.mktemp("demo-softhsm")
    lines: list[str] = []
    previous = os.environ.get("SOFTHSM2_CONF")
    try:
        result = run_demo(workdir, say=lines.append)
    finally:
        # run_demo points SOFTHSM2_CONF at a token directory of its own and re-reads it; give
        # the rest of the session its configuration back, and make the library read it again.
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        hsm.reinitialize_library(library_path=softhsm_conf.library_path)
    return DemoRun(workdir=workdir, result=result, lines=lines)


def verify_proof(workdir: Path, *, at: datetime | str | None = None) -> int:
    """``mcb verify-proof`` on the files in ``workdir``, as of ``at`` (default: the clock)."""
    argv = [
        "verify-proof",
        "--statement",
        str(workdir / "statement.json"),
        "--registry",
        str(workdir / "registry.json"),
        "--proof",
        str(workdir / "client-proof.json"),
    ]
    if at is not None:
        argv += ["--at", at if isinstance(at, str) else format_timestamp(at)]
    return main(argv)


def latest_statement(workdir: Path) -> Statement:
    return SignedStatement.decode((workdir / "statement.json").read_bytes()).statement


def last_output(capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any] | None, str]:
    """The JSON line ``verify-proof`` printed (None if it printed none) and its stderr."""
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return (json.loads(lines[-1]) if lines else None), captured.err.strip()


VERIFIED = {
    "account": "client-bob",
    "asset": "BTC",
    "quantity": str(BOB_BTC),
    "sequence": 2,
    "verified": True,
}


@pytest.mark.softhsm
def test_demo_on_softhsm_verifies_two_statements_and_a_client_proof(
    softhsm_demo: DemoRun,
) -> None:
    result, lines, workdir = softhsm_demo.result, softhsm_demo.lines, softhsm_demo.workdir
    assert [head.sequence for head in result.heads] == [1, 2]
    assert (result.client_account, result.client_asset) == ("client-bob", "BTC")
    assert result.client_quantity == BOB_BTC
    assert len([line for line in lines if line.startswith("EXCHANGE")]) == 2
    assert any(line.startswith("HSM") and "SoftHSM2 token" in line for line in lines)
    assert any(token.is_dir() for token in (workdir / "softhsm" / "tokens").iterdir())
    for name in FILES:
        assert (workdir / name).is_file(), name
    latest = SignedStatement.decode((workdir / "statement.json").read_bytes())
    assert latest.digest == result.heads[-1].digest
    assert (latest.statement.sequence, latest.statement.kind) == (2, StatementKind.DELTA)
    assert latest.statement.previous == result.heads[0].digest
    with TransparencyLog(workdir / "transparency-log.sqlite3") as log:
        assert log.size == 2
        assert log.index_of(result.heads[1].digest) == 1


@pytest.mark.softhsm
def test_verify_proof_accepts_the_demo_files_during_the_statements_life(
    softhsm_demo: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = latest_statement(softhsm_demo.workdir)
    for at in (statement.issued_at, statement.expires_at - timedelta(milliseconds=1)):
        assert verify_proof(softhsm_demo.workdir, at=at) == 0
        assert last_output(capsys) == (VERIFIED, "")


@pytest.mark.softhsm
@pytest.mark.parametrize(
    ("when", "error"),
    [
        ("at expiry", "Expired (expired)"),
        ("a day after expiry", "Expired (expired)"),
        ("before issue, beyond the clock skew", "FutureDated (future_dated)"),
    ],
)
def test_verify_proof_checks_the_statement_time(
    softhsm_demo: DemoRun, capsys: pytest.CaptureFixture[str], when: str, error: str
) -> None:
    statement = latest_statement(softhsm_demo.workdir)
    at = {
        "at expiry": statement.expires_at,
        "a day after expiry": statement.expires_at + timedelta(days=1),
        "before issue, beyond the clock skew": statement.issued_at - timedelta(minutes=1),
    }[when]
    assert verify_proof(softhsm_demo.workdir, at=at) == 2
    verified, err = last_output(capsys)
    assert verified is None
    assert err.startswith(f"mcb: {error}: ")
    assert len(err.splitlines()) == 1


@pytest.mark.softhsm
def test_verify_proof_refuses_a_malformed_at(
    softhsm_demo: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify_proof(softhsm_demo.workdir, at="2026-11-25 08:00") == 2
    verified, err = last_output(capsys)
    assert verified is None
    assert err.startswith("mcb: DecodeError (malformed): ")


class SubMillisecondClock(datetime):
    """The system clock, with microseconds that are not a whole millisecond (as they almost
    always are), so that the test below does not depend on the moment it runs: a signed time
    carries whole milliseconds, and the command must round the clock before using it."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> Self:
        real = super().now(tz)
        return real.replace(microsecond=real.microsecond - real.microsecond % 1000 + 1)


@pytest.mark.softhsm
def test_verify_proof_defaults_to_now_right_after_the_demo(
    softhsm_demo: DemoRun, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    statement = latest_statement(softhsm_demo.workdir)
    assert statement.issued_at <= datetime.now(UTC) < statement.expires_at
    monkeypatch.setattr("mcb.cli.datetime", SubMillisecondClock)
    code = verify_proof(softhsm_demo.workdir)
    assert last_output(capsys) == (VERIFIED, "")
    assert code == 0


def _tamper_quantity(workdir: Path) -> None:
    path = workdir / "client-proof.json"
    proof = parse_json_object(path.read_bytes())
    assert proof["proof"]["quantity"] == str(BOB_BTC)
    proof["proof"]["quantity"] = str(BOB_BTC * 10)
    path.write_bytes(compute_canonical_bytes(proof))


def _tamper_salt(workdir: Path) -> None:
    path = workdir / "client-proof.json"
    proof = parse_json_object(path.read_bytes())
    first = proof["salt"][0]
    proof["salt"] = ("1" if first == "0" else "0") + proof["salt"][1:]
    path.write_bytes(compute_canonical_bytes(proof))


def _tamper_statement_total(workdir: Path) -> None:
    path = workdir / "statement.json"
    signed = parse_json_object(path.read_bytes())
    btc = next(a for a in signed["statement"]["assets"] if a["asset"] == "BTC")
    btc["total"] = str(int(btc["total"]) + 1)
    path.write_bytes(compute_canonical_bytes(signed))


@pytest.mark.softhsm
@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (_tamper_quantity, "InvalidProof"),
        (_tamper_salt, "InvalidProof"),
        (_tamper_statement_total, "BadSignature"),
    ],
    ids=["proof quantity", "proof salt", "statement total"],
)
def test_verify_proof_rejects_tampered_files(
    softhsm_demo: DemoRun,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tamper: Callable[[Path], None],
    error: str,
) -> None:
    for name in FILES:
        shutil.copy(softhsm_demo.workdir / name, tmp_path / name)
    issued_at = latest_statement(tmp_path).issued_at
    tamper(tmp_path)
    assert verify_proof(tmp_path, at=issued_at) == 2
    captured = capsys.readouterr()
    assert '"verified"' not in captured.out
    message = captured.err.strip()
    assert message.startswith(f"mcb: {error} (")
    assert len(message.splitlines()) == 1  # one clear line, not a traceback


def test_software_key_demo_runs_without_softhsm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)
    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="attestations.p256"):
        result = run_demo(tmp_path, software_key=True, say=lines.append)
    assert result.client_quantity == BOB_BTC
    assert [head.sequence for head in result.heads] == [1, 2]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "attestations.p256" and r.levelno == logging.WARNING
    ]
    assert any("development" in w and "never be used in production" in w for w in warnings)
    # Nothing of SoftHSM was touched.
    assert "SOFTHSM2_CONF" not in os.environ
    assert not (tmp_path / "softhsm").exists()
    assert not any(line.startswith("HSM") for line in lines)
    for name in FILES:
        assert (tmp_path / name).is_file(), name


def test_second_run_in_one_workdir_is_refused(tmp_path: Path) -> None:
    run_demo(tmp_path, software_key=True, say=lambda _: None)
    before = {name: (tmp_path / name).read_bytes() for name in FILES}
    completed = subprocess.run(
        [sys.executable, "-m", "mcb", "demo", "--workdir", str(tmp_path), "--software-key"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 1
    assert "transparency-log.sqlite3 already exists; use a fresh --workdir" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert "STATEMENT" not in completed.stdout
    # The first run's results are untouched.
    assert {name: (tmp_path / name).read_bytes() for name in FILES} == before
    with TransparencyLog(tmp_path / "transparency-log.sqlite3") as log:
        assert log.size == 2
