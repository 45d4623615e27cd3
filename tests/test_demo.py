"""The end-to-end demo, run as the README's first command runs it: on SoftHSM2 and the embedded
broker, every credit figure it prints is the collateral policy's arithmetic on the sample pledges
and prices (recomputed here independently, with exact fractions); the margin call it reads back
verifies against the published registry; its files are checked again with ``mcb verify-proof``
(and refused once tampered with); without SoftHSM2 (or with ``--software-key``) it warns loudly;
a second run in one work directory is refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from fractions import Fraction
from math import floor
from pathlib import Path
from typing import Any, Self

import pytest

from attestations import hsm
from attestations.canonical import compute_canonical_bytes, format_timestamp, parse_json_object
from attestations.errors import UnknownKey
from attestations.keys import KeyRegistry, KeyRole
from attestations.notices import verify_notice
from attestations.statement import SignedStatement, Statement, StatementKind
from attestations.translog import TransparencyLog
from mcb.cli import main
from mcb.demo import (
    CALLED_CLIENT,
    DECIMALS,
    EXTRA_PLEDGE,
    PRICES,
    REQUIREMENT,
    SAMPLE_PLEDGES,
    DemoResult,
    run_demo,
)
from mcb.softhsm import SoftHsm

REPO = Path(__file__).resolve().parent.parent
FILES = ("statement.json", "registry.json", "client-proof.json")
BOB_BTC = 1_500_000_000  # 12.5 BTC pledged, then 2.5 BTC more in the delta
# The collateral rates of docs/exchange.md, written out here rather than read from the policy.
RATES_BPS = {"BENJI": 9_800, "USDC": 9_500, "BTC": 8_000, "ETH": 7_500}
CENTS = 100


@dataclass(frozen=True)
class DemoRun:
    workdir: Path
    result: DemoResult
    lines: list[str]


def run_isolated(workdir: Path, softhsm: SoftHsm | None, **options: Any) -> DemoRun:
    lines: list[str] = []
    previous = os.environ.get("SOFTHSM2_CONF")
    try:
        result = run_demo(workdir, say=lines.append, **options)
    finally:
        # run_demo points SOFTHSM2_CONF at a token directory of its own and re-reads it; give
        # the rest of the session its configuration back, and make the library read it again.
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        if softhsm is not None:
            hsm.reinitialize_library(library_path=softhsm.library_path)
    return DemoRun(workdir=workdir, result=result, lines=lines)


@pytest.fixture(scope="module")
def softhsm_demo(
    softhsm_conf: SoftHsm, tansu_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> DemoRun:
    del tansu_binary  # skips (or fails in CI) when the broker is not installed
    return run_isolated(tmp_path_factory.mktemp("demo-softhsm"), softhsm_conf)


# --- the figures --------------------------------------------------------------------------------


def expected_value(asset: str, quantity: int) -> int:
    """floor(quantity x price x rate) in cents, from the sample's decimal strings."""
    whole = Fraction(quantity, 10 ** DECIMALS[asset])
    price = Fraction(Decimal(PRICES[asset]))
    return floor(whole * price * Fraction(RATES_BPS[asset], 10_000) * CENTS)


def expected_holdings(*, with_extra: bool) -> dict[str, dict[str, int]]:
    held: dict[str, dict[str, int]] = {}
    pledges = [*SAMPLE_PLEDGES, EXTRA_PLEDGE] if with_extra else list(SAMPLE_PLEDGES)
    for client, asset, quantity in pledges:
        held.setdefault(client, {}).setdefault(asset, 0)
        held[client][asset] += quantity
    return held


def cents(text: str) -> int:
    """``1,234.56 USD`` -> 123456 (exactly two decimals, as printed)."""
    number = text.removesuffix(" USD").replace(",", "")
    assert re.fullmatch(r"[0-9]+\.[0-9]{2}", number), text
    return int(number.replace(".", ""))


def units(text: str, asset: str) -> int:
    whole, _, fraction = text.replace(",", "").partition(".")
    decimals = DECIMALS[asset]
    scale: int = 10**decimals
    return int(whole) * scale + (int(fraction.ljust(decimals, "0")) if fraction else 0)


POSITION = re.compile(
    r"^    (?P<asset>[A-Z]+) +(?P<qty>[0-9,.]+) x +(?P<price>[0-9.]+) USD x +"
    r"(?P<rate>[0-9.]+) % = +(?P<value>[0-9,.]+ USD)$"
)
TOTALS = re.compile(r"^    collateral (?P<c>[0-9,.]+ USD), credit limit (?P<l>[0-9,.]+ USD)$")


def printed_credit(lines: list[str]) -> dict[str, tuple[dict[str, tuple[int, str, int]], int, int]]:
    """Per client: {asset: (quantity, price text, value)}, collateral, credit limit."""
    found: dict[str, tuple[dict[str, tuple[int, str, int]], int, int]] = {}
    client = None
    positions: dict[str, tuple[int, str, int]] = {}
    start = next(i for i, line in enumerate(lines) if line.startswith("CREDIT"))
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        if match := POSITION.match(line):
            asset = match["asset"]
            assert Fraction(Decimal(match["rate"])) * 100 == RATES_BPS[asset]
            positions[asset] = (units(match["qty"], asset), match["price"], cents(match["value"]))
        elif match := TOTALS.match(line):
            assert client is not None
            found[client] = (positions, cents(match["c"]), cents(match["l"]))
            client, positions = None, {}
        else:
            client = line.strip()
    return found


@pytest.mark.softhsm
def test_the_demo_prints_the_policys_credit_for_every_client(softhsm_demo: DemoRun) -> None:
    printed = printed_credit(softhsm_demo.lines)
    held = expected_holdings(with_extra=False)
    assert set(printed) == set(held)
    for client, assets in held.items():
        positions, collateral, limit = printed[client]
        assert {a: q for a, (q, _, _) in positions.items()} == assets, client
        for asset, (quantity, price, value) in positions.items():
            assert price == PRICES[asset]
            assert value == expected_value(asset, quantity), (client, asset)
        assert collateral == sum(expected_value(a, q) for a, q in assets.items())
        assert limit == 2 * collateral
    # Spot checks a reader can do by hand: 2.5 M BENJI at 1.00 x 98 %, 3 BTC at 64,123.45 x 80 %.
    assert printed["client-alice"][0]["BENJI"][2] == 245_000_000
    assert printed["client-dave"][1] == 15_389_628


@pytest.mark.softhsm
def test_the_delta_raises_the_credit_of_the_client_who_pledged_more(softhsm_demo: DemoRun) -> None:
    client, asset, _ = EXTRA_PLEDGE
    held = expected_holdings(with_extra=True)
    after = sum(expected_value(a, q) for a, q in held[client].items())
    before = sum(
        expected_value(a, q) for a, q in expected_holdings(with_extra=False)[client].items()
    )
    line = next(line for line in softhsm_demo.lines if line.startswith("EXCHANGE  #2"))
    match = re.search(
        r"collateral ([0-9,.]+ USD) -> ([0-9,.]+ USD), credit limit ([0-9,.]+ USD) -> "
        r"([0-9,.]+ USD)",
        line,
    )
    assert match is not None, line
    assert [cents(g) for g in match.groups()] == [before, after, 2 * before, 2 * after]
    statuses = softhsm_demo.result.statuses
    for name, assets in held.items():
        assert statuses[name].collateral == sum(expected_value(a, q) for a, q in assets.items())
        assert {v.asset: v.quantity for v in statuses[name].positions} == assets
    assert asset in {v.asset for v in statuses[client].positions}


@pytest.mark.softhsm
def test_the_margin_call_is_signed_by_the_registered_exchange_key(softhsm_demo: DemoRun) -> None:
    call = softhsm_demo.result.margin_call
    collateral = sum(
        expected_value(a, q) for a, q in expected_holdings(with_extra=True)[CALLED_CLIENT].items()
    )
    assert (call.client, call.requirement, call.collateral) == (
        CALLED_CLIENT,
        REQUIREMENT,
        collateral,
    )
    assert call.shortfall == REQUIREMENT - collateral
    assert call.ratio_bps == collateral * 10_000 // REQUIREMENT
    assert call.deadline == call.issued_at + timedelta(hours=4)
    assert any(
        line.startswith("NOTICE") and call.notice_id[:16] in line for line in softhsm_demo.lines
    )
    pretrade = [line for line in softhsm_demo.lines if line.startswith("PRETRADE")]
    assert [line.rsplit("? ", 1)[1].split(",")[0] for line in pretrade] == [
        "allowed",
        "refused (not_healthy)",
    ]


@pytest.mark.softhsm
def test_the_demo_runs_on_softhsm_and_writes_its_files(softhsm_demo: DemoRun) -> None:
    result, lines, workdir = softhsm_demo.result, softhsm_demo.lines, softhsm_demo.workdir
    assert result.hsm
    assert result.sequences == (1, 2)
    assert (result.client_account, result.client_asset) == ("client-bob", "BTC")
    assert result.client_quantity == BOB_BTC
    assert any(line.startswith("HSM") and "SoftHSM2 tokens" in line for line in lines)
    assert not any(line.startswith("WARNING") for line in lines)
    assert len([t for t in (workdir / "softhsm" / "tokens").iterdir() if t.is_dir()]) == 2
    for name in FILES:
        assert (workdir / name).is_file(), name
    latest = SignedStatement.decode((workdir / "statement.json").read_bytes())
    assert (latest.statement.sequence, latest.statement.kind) == (2, StatementKind.DELTA)
    with TransparencyLog(workdir / "transparency-log.sqlite3") as log:
        assert log.size == 2
        assert log.index_of(latest.digest) == 1
    # The published registry verifies the notice the exchange signed, and a registry without
    # the exchange's key does not.
    registry = KeyRegistry.from_wire(parse_json_object((workdir / "registry.json").read_bytes()))
    assert len(registry.records()) == 5
    call = result.margin_call
    assert verify_notice(result.margin_call_wire, registry=registry, now=call.issued_at) == call
    custodian_only = KeyRegistry.of(
        [r for r in registry.records() if r.role is not KeyRole.EXCHANGE], quorums={}
    )
    with pytest.raises(UnknownKey):
        verify_notice(result.margin_call_wire, registry=custodian_only, now=call.issued_at)
    done = next(line for line in lines if line.startswith("DONE"))
    assert float(done.split()[2]) < 60


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


def test_software_key_demo_warns_and_touches_no_token(
    tmp_path: Path, tansu_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    del tansu_binary
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)
    run = run_isolated(tmp_path, None, software_key=True)
    assert not run.result.hsm
    assert run.result.client_quantity == BOB_BTC
    warning = next(line for line in run.lines if line.startswith("WARNING"))
    assert "--software-key" in warning
    assert "INSECURE" in warning
    assert "SOFTHSM2_CONF" not in os.environ
    assert not (tmp_path / "softhsm").exists()
    assert not any(line.startswith("HSM") for line in run.lines)
    for name in FILES:
        assert (tmp_path / name).is_file(), name


def test_without_softhsm_the_demo_falls_back_loudly(
    tmp_path: Path, tansu_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    del tansu_binary
    if os.environ.get("CI") == "true":
        # CI must have SoftHSM2: the demo's first choice is the real token.
        from mcb.softhsm import find_softhsm

        assert find_softhsm() is None
    monkeypatch.setattr("mcb.demo.find_softhsm", lambda: "SoftHSM2 is not installed")
    lines: list[str] = []
    monkeypatch.setattr("mcb.demo.asyncio.run", lambda coroutine: coroutine.close())
    run_demo(tmp_path, say=lines.append)
    assert lines[0].startswith("WARNING   SoftHSM2 is not installed: ")
    assert "in-memory development keys, INSECURE" in lines[0]
    assert not (tmp_path / "softhsm").exists()


def test_second_run_in_one_workdir_is_refused(tmp_path: Path, tansu_binary: Path) -> None:
    del tansu_binary
    run_isolated(tmp_path, None, software_key=True)
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
