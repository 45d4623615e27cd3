"""The end-to-end demonstration: the whole path with the real parts, in one process.

In a work directory: the embedded Tansu broker; a SQLite custody book where clients deposit and
pledge BENJI, USDC, BTC and ETH to one exchange; the custodian's attestation service (its key on a
SoftHSM2 token when SoftHSM2 is installed, else an in-memory development key with a loud warning;
three in-process BLS co-signers, two of three required) and its outbox relay publishing signed
statements over the broker; the exchange service (exchange/service.py) verifying them and
crediting its own SQLite margin ledger. It prints, per client, the pledged holdings, each
position's collateral value (quantity x price x rate, rounded down), the collateral and the credit
limit (2x). Then one more pledge becomes a delta statement and a higher credit; an exposure report
from the trading engine (on the exposures topic) puts one client in margin call, and the exchange's
signed margin call is read back from the instructions topic and verified with
:func:`attestations.notices.verify_notice`; the trading engine asks two pre-trade checks over the
exchange's HTTP API; a client checks its inclusion proof. The latest statement, the key registry
and the client's proof are written to the work directory for ``mcb verify-proof``.

What it does not do: keep anything running (every part is stopped at the end; the broker keeps
nothing), or stand for a deployment: the co-signers and both parties run in one process here.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
from sqlalchemy import select

from attestations.amounts import Asset, Price, format_decimal
from attestations.canonical import compute_canonical_bytes, truncate_to_millis
from attestations.disclosure import ClientProof, verify_client_proof
from attestations.errors import ConfigurationError
from attestations.hsm import Pkcs11Signer, generate_p256_key, reinitialize_library
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.notices import MarginCall, SignedNotice, verify_notice
from attestations.p256 import DigestSigner, SoftwareP256Signer
from attestations.signing import BlsCosigner, Cosigner
from attestations.statement import PricePoint, SignedStatement
from attestations.translog import TransparencyLog
from bridge import envelope
from bridge.broker import EmbeddedBroker
from bridge.envelope import decode_message, encode_exposure_report
from bridge.kafka import KafkaSettings, ensure_topics, open_consumer, open_producer, publish
from bridge.outbox import OutboxRelay
from bridge.topics import DEFAULT_CATALOGUE, TopicKind
from custodian.book import Deposit, Pledge
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService, statements_table
from custodian.store import CustodyBook
from exchange.api import Principal, Role, TokenStore
from exchange.ledger import ClientStatus
from exchange.policy import BPS, CollateralPolicy, MarginState
from exchange.service import ExchangeService
from mcb.softhsm import find_softhsm, init_token, prepare_softhsm

CUSTODIAN: Final = "custodian-bank"
EXCHANGE: Final = "exchange-one"
QUOTE: Final = "USD"
DECIMALS: Final = {"BENJI": 6, "BTC": 8, "ETH": 18, "USDC": 6}
PRICES: Final = {"BENJI": "1.00", "BTC": "64123.45", "ETH": "3150.10", "USDC": "1.0000"}
SAMPLE_PLEDGES: Final[tuple[tuple[str, str, int], ...]] = (
    ("client-alice", "BENJI", 2_500_000_000_000),  # 2.5 M fund units
    ("client-alice", "USDC", 750_000_000_000),  # 750 k USDC
    ("client-bob", "BTC", 1_250_000_000),  # 12.5 BTC
    ("client-bob", "USDC", 100_000_000_000),
    ("client-carol", "ETH", 400 * 10**18),
    ("client-carol", "BENJI", 900_000_000_000),
    ("client-dave", "BTC", 300_000_000),
    ("client-erin", "USDC", 5_000_000_000_000),
)
EXTRA_PLEDGE: Final = ("client-bob", "BTC", 250_000_000)  # 2.5 BTC more: a delta statement
CALLED_CLIENT: Final = "client-dave"
EXPOSURE: Final = 25_000_000  # 250,000.00 USD of positions
REQUIREMENT: Final = 17_000_000  # 170,000.00 USD of margin they need
PRETRADE_CHECKS: Final = (("client-alice", 100_000_000), (CALLED_CLIENT, 100_000))
PROOF_CLIENT: Final = ("client-bob", "BTC")
COSIGNER_PARTIES: Final = ("auditor-one", "trustee-two", "notary-three")
WAIT_TIMEOUT_S: Final = 30.0
RELAY_OPTIONS: Final[dict[str, Any]] = {
    "poll_interval_s": 0.05,
    # The embedded broker under-reports a partition's end after a multi-record batch, which a
    # periodic loss check takes for lost data; in a demo of a minute the check at connection is
    # the one that matters.
    "loss_check_interval_s": 3600.0,
}
SOFTWARE_KEY_WARNING: Final = (
    "WARNING   {why}: the custodian and exchange keys are in-memory development keys, "
    "INSECURE and lost at exit; install SoftHSM2 (apt-get install softhsm2) to keep them on a "
    "PKCS#11 token"
)


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo established, for tests: the exchange's view of every client after the
    delta (and before the exposure), the margin call it verified, and the client's proof."""

    statuses: dict[str, ClientStatus]
    margin_call: MarginCall
    margin_call_wire: bytes
    """The record's value as read from the instructions topic (the signed notice)."""
    sequences: tuple[int, ...]
    client_account: str
    client_asset: str
    client_quantity: int
    hsm: bool


class DemoFailed(ConfigurationError):
    """A step of the demo did not complete in time (a part failed: see the log above)."""

    reason = "demo_failed"


# --- formatting -----------------------------------------------------------------------------------


def format_amount(units: int, decimals: int, *, trim: bool = False) -> str:
    """``units`` minor units as a decimal with thousands separators; ``trim`` drops trailing
    fractional zeros (quantities), otherwise every decimal is shown (money)."""
    text = format_decimal(units, decimals=decimals)
    whole, _, fraction = text.partition(".")
    if trim:
        fraction = fraction.rstrip("0")
    grouped = f"{int(whole):,}"
    return f"{grouped}.{fraction}" if fraction else grouped


def format_money(units: int, policy: CollateralPolicy) -> str:
    return f"{format_amount(units, policy.quote_decimals)} {policy.quote}"


def format_rate(rate_bps: int) -> str:
    whole, rest = divmod(rate_bps, 100)
    return f"{whole}.{rest:02d} %"


def format_leverage(leverage_bps: int) -> str:
    whole, rest = divmod(leverage_bps, BPS)
    return f"{whole}x" if not rest else f"{whole}.{rest:04d}".rstrip("0") + "x"


def format_price(price: Price) -> str:
    return f"{format_decimal(price.mantissa, decimals=price.scale)} {price.quote}"


def compute_client_lines(status: ClientStatus, policy: CollateralPolicy) -> list[str]:
    """The printed block of one client: each position, then collateral and credit limit."""
    lines = [f"  {status.client}"]
    for view in sorted(status.positions, key=lambda v: v.asset):
        quantity = format_amount(view.quantity, DECIMALS[view.asset], trim=True)
        price = "no price" if view.price is None else format_price(view.price)
        lines.append(
            f"    {view.asset:<5} {quantity:>12} x {price:>12} x {format_rate(view.rate_bps):>7}"
            f" = {format_money(view.value, policy):>16}"
        )
    lines.append(
        f"    collateral {format_money(status.collateral, policy)}, credit limit "
        f"{format_money(status.credit_limit, policy)}"
    )
    return lines


# --- keys -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Keys:
    custodian: DigestSigner
    exchange: DigestSigner
    hsm: bool


def open_signers(
    workdir: Path, *, software_key: bool, say: Callable[[str], None], stack: ExitStack
) -> _Keys:
    """A SoftHSM2 token per party with a P-256 key generated on it, when SoftHSM2 is installed
    and not refused; else in-memory development keys, with a warning."""
    problem = "--software-key" if software_key else find_softhsm()
    if problem is not None:
        say(SOFTWARE_KEY_WARNING.format(why=problem))
        return _Keys(
            SoftwareP256Signer(insecure_development_only=True),
            SoftwareP256Signer(insecure_development_only=True),
            hsm=False,
        )
    softhsm = prepare_softhsm(workdir / "softhsm")
    suffix = secrets.token_hex(3)
    tokens = {
        party: (f"{party}-{suffix}", secrets.token_hex(8)) for party in ("custodian", "exchange")
    }
    for label, pin in tokens.values():
        init_token(softhsm, label=label, pin=pin, so_pin=secrets.token_hex(8))
    reinitialize_library(library_path=softhsm.library_path)
    signers = []
    for label, pin in tokens.values():
        generate_p256_key(
            library_path=softhsm.library_path, token_label=label, pin=pin, key_label="signing"
        )
        signer = Pkcs11Signer.open(
            library_path=softhsm.library_path, token_label=label, pin=pin, key_label="signing"
        )
        stack.callback(signer.close)
        signers.append(signer)
    say(
        f"HSM       SoftHSM2 tokens {tokens['custodian'][0]!r} (custodian) and "
        f"{tokens['exchange'][0]!r} (exchange): P-256 keys generated on the tokens, "
        "non-extractable"
    )
    return _Keys(signers[0], signers[1], hsm=True)


def build_registry(keys: _Keys, cosigners: list[Cosigner], *, valid_from: datetime) -> KeyRegistry:
    """What the parties publish: the custodian's key, its co-signers (quorum 2 of 3) and the
    exchange's notice key."""
    records = [
        KeyRecord(CUSTODIAN, KeyRole.CUSTODIAN, keys.custodian.public_key, valid_from),
        KeyRecord(EXCHANGE, KeyRole.EXCHANGE, keys.exchange.public_key, valid_from),
    ]
    records += [
        KeyRecord(
            party,
            KeyRole.COSIGNER,
            cosigner.key.public_key,
            valid_from,
            proof_of_possession=cosigner.key.proof_of_possession(),
            signs_for=CUSTODIAN,
        )
        for party, cosigner in zip(COSIGNER_PARTIES, cosigners, strict=True)
    ]
    return KeyRegistry.of(records, quorums={CUSTODIAN: 2})


# --- the run --------------------------------------------------------------------------------------


def run_demo(
    workdir: Path, *, software_key: bool = False, say: Callable[[str], None] = print
) -> DemoResult:
    """Run the demo in ``workdir`` (created; refused if it holds a previous run)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "transparency-log.sqlite3").exists():
        raise SystemExit(
            f"{workdir / 'transparency-log.sqlite3'} already exists; use a fresh --workdir"
        )
    with ExitStack() as stack:
        keys = open_signers(workdir, software_key=software_key, say=say, stack=stack)
        return asyncio.run(_Demo(workdir, keys, say).run())


class _Demo:
    def __init__(self, workdir: Path, keys: _Keys, say: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.keys = keys
        self.say = say
        self.policy = CollateralPolicy.default()
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> DemoResult:
        started = time.monotonic()
        now = truncate_to_millis(datetime.now(UTC))
        broker = EmbeddedBroker()
        await asyncio.to_thread(broker.start)
        try:
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
            self.say(f"BROKER    embedded Tansu broker on {broker.bootstrap_servers} (memory only)")
            await ensure_topics(kafka, DEFAULT_CATALOGUE.all_topics())
            with self._custodian(now, kafka) as custodian, self._exchange(kafka) as exchange:
                try:
                    result = await self._flow(custodian, exchange, kafka)
                finally:
                    self.stop.set()
                    results = await asyncio.gather(*self.tasks, return_exceptions=True)
                for outcome in results:
                    if isinstance(outcome, BaseException):
                        raise outcome
        finally:
            await asyncio.to_thread(broker.stop)
        self.say(f"DONE      in {time.monotonic() - started:.1f} s; every part stopped")
        return result

    # --- the two parties ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _custodian(self, now: datetime, kafka: KafkaSettings) -> Iterator[_Custodian]:
        cosigners = [Cosigner(BlsCosigner.from_seed(secrets.token_bytes(32))) for _ in range(3)]
        self.registry = build_registry(self.keys, cosigners, valid_from=now - timedelta(minutes=1))
        (self.workdir / "registry.json").write_bytes(
            compute_canonical_bytes(self.registry.to_wire())
        )
        self.say(
            f"REGISTRY  custodian key {self.keys.custodian.key_id[:16]}, BLS co-signers "
            f"{', '.join(COSIGNER_PARTIES)} (quorum 2 of 3, proofs of possession checked), "
            f"exchange key {self.keys.exchange.key_id[:16]}: registry.json"
        )
        assets = [Asset(code, decimals) for code, decimals in DECIMALS.items()]
        url = f"sqlite:///{self.workdir / 'custodian.sqlite3'}"
        with (
            CustodyBook.open(url, assets=assets) as book,
            TransparencyLog(self.workdir / "transparency-log.sqlite3") as log,
        ):
            for number, (client, asset, quantity) in enumerate(SAMPLE_PLEDGES):
                # A little more is deposited than pledged: the rest stays available to the client.
                book.apply(Deposit(f"demo-d{number}", client, asset, quantity + quantity // 10))
                book.apply(Pledge(f"demo-p{number}", client, asset, EXCHANGE, quantity))
            self.say(
                f"BOOK      {len(SAMPLE_PLEDGES)} deposits and pledges to {EXCHANGE} in the "
                "custody book (custodian.sqlite3): pledged units are locked at the custodian"
            )
            points = tuple(
                PricePoint(Price.parse(asset=a, quote=QUOTE, text=p), "file:sample-prices", now)
                for a, p in sorted(PRICES.items())
            )
            relay = OutboxRelay(book.engine, kafka, **RELAY_OPTIONS)
            service = AttestationService.open(
                book,
                custodian=CUSTODIAN,
                exchange=EXCHANGE,
                signer=self.keys.custodian,
                cosigners=cosigners,
                quorum=2,
                salt_secret=secrets.token_bytes(32),
                decimals=DECIMALS,
                prices=StaticPriceSource(points),
                log=log,
                relay=relay,
            )
            yield _Custodian(book, service, relay, log)

    @contextlib.contextmanager
    def _exchange(self, kafka: KafkaSettings) -> Iterator[_Exchange]:
        self.engine_token = secrets.token_urlsafe(32)
        tokens = TokenStore()
        tokens.add(self.engine_token, Principal(Role.ENGINE, "trading-engine"))
        service = ExchangeService.open(
            f"sqlite:///{self.workdir / 'exchange.sqlite3'}",
            kafka,
            exchange=EXCHANGE,
            custodians=[CUSTODIAN],
            registry=self.registry,
            decimals=DECIMALS,
            policy=self.policy,
            signer=self.keys.exchange,
            tokens=tokens,
            port=0,
            evaluate_interval_s=1.0,
            relay_options=RELAY_OPTIONS,
        )
        try:
            yield _Exchange(service)
        finally:
            service.close()

    # --- the flow -------------------------------------------------------------------------------

    def _start(self, name: str, coroutine: Awaitable[None]) -> None:
        self.tasks.append(asyncio.create_task(coroutine, name=name))  # type: ignore[arg-type]

    async def _until(self, what: str, predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while not predicate():
            for task in self.tasks:
                if task.done():
                    error = task.exception()
                    raise DemoFailed(f"{task.get_name()} stopped while waiting for {what}") from (
                        error
                    )
            if time.monotonic() > deadline:
                raise DemoFailed(f"no {what} within {WAIT_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.02)

    def _head(self, exchange: _Exchange) -> int:
        stream = f"{CUSTODIAN}/{EXCHANGE}"
        status = exchange.service.desk.read(lambda ledger: ledger.stream_status(stream))
        return 0 if status is None or status.head is None else status.head.sequence

    def _status(self, exchange: _Exchange, client: str) -> ClientStatus:
        found = exchange.service.desk.status(client, now=truncate_to_millis(datetime.now(UTC)))
        if found is None:
            raise DemoFailed(f"the exchange knows no {client}")
        return found

    async def _flow(
        self, custodian: _Custodian, exchange: _Exchange, kafka: KafkaSettings
    ) -> DemoResult:
        addresses: list[Any] = []
        self._start("custodian-relay", custodian.relay.run(self.stop))
        self._start(
            "attestation-service",
            custodian.service.run(self.stop, interval_s=3600.0, debounce_s=0.05),
        )
        self._start("exchange", exchange.service.run(self.stop, on_ready=addresses.extend))

        await self._until(
            "statement #1 credited at the exchange", lambda: self._head(exchange) >= 1
        )
        self.say(
            "STATEMENT #1 snapshot: Merkle sum roots of the pledged holdings, signed on the HSM "
            "and by 2 of 3 co-signers, outbox -> Kafka attestations topic"
        )
        self.say(
            "EXCHANGE  #1 verified (keys, signatures, quorum, time, chain, roots) and credited "
            "into the margin ledger (exchange.sqlite3)"
        )
        self.say(
            "CREDIT    value = quantity x price x collateral rate, rounded down to the cent; "
            f"credit limit = {format_leverage(self.policy.leverage_bps)} collateral (leverage cap)"
        )
        clients = sorted({client for client, _, _ in SAMPLE_PLEDGES})
        for client in clients:
            for line in compute_client_lines(self._status(exchange, client), self.policy):
                self.say(line)

        # One more pledge: the attestation service publishes a delta.
        client, asset, quantity = EXTRA_PLEDGE
        before = self._status(exchange, client)
        await asyncio.to_thread(
            custodian.book.apply, Deposit("demo-extra-d", client, asset, quantity)
        )
        await asyncio.to_thread(
            custodian.book.apply, Pledge("demo-extra-p", client, asset, EXCHANGE, quantity)
        )
        custodian.service.notify_change()
        self.say(
            f"PLEDGE    {client} deposits and pledges "
            f"{format_amount(quantity, DECIMALS[asset], trim=True)} {asset} more"
        )
        await self._until(
            "statement #2 credited at the exchange", lambda: self._head(exchange) >= 2
        )
        after = self._status(exchange, client)
        self.say("STATEMENT #2 delta: one changed leaf, chained to #1 by its digest")
        self.say(
            f"EXCHANGE  #2 verified and credited: {client} collateral "
            f"{format_money(before.collateral, self.policy)} -> "
            f"{format_money(after.collateral, self.policy)}, credit limit "
            f"{format_money(before.credit_limit, self.policy)} -> "
            f"{format_money(after.credit_limit, self.policy)}"
        )
        statuses = {name: self._status(exchange, name) for name in clients}

        margin_call, margin_call_wire = await self._margin_call(exchange, kafka)
        await self._pretrade(addresses)
        proof, quantity = self._client_proof(custodian)
        return DemoResult(
            statuses=statuses,
            margin_call=margin_call,
            margin_call_wire=margin_call_wire,
            sequences=(1, 2),
            client_account=proof.account,
            client_asset=proof.proof.asset,
            client_quantity=quantity,
            hsm=self.keys.hsm,
        )

    async def _margin_call(
        self, exchange: _Exchange, kafka: KafkaSettings
    ) -> tuple[MarginCall, bytes]:
        reported_at = truncate_to_millis(datetime.now(UTC))
        report = envelope.ExposureReport.from_wire(
            {
                "client": CALLED_CLIENT,
                "exchange": EXCHANGE,
                "exposure": str(EXPOSURE),
                "quote": QUOTE,
                "report_id": f"demo-{secrets.token_hex(4)}",
                "reported_at": reported_at.isoformat(timespec="milliseconds").replace(
                    "+00:00", "Z"
                ),
                "requirement": str(REQUIREMENT),
                "unrealised_pnl": "0",
                "version": 1,
            }
        )
        message = encode_exposure_report(report, catalogue=DEFAULT_CATALOGUE)
        async with open_producer(kafka) as producer:
            await publish(
                producer, message.topic, message.value, key=message.key, headers=message.headers
            )
        self.say(
            f"EXPOSURE  trading engine -> exposures topic: {CALLED_CLIENT} exposure "
            f"{format_money(EXPOSURE, self.policy)}, margin requirement "
            f"{format_money(REQUIREMENT, self.policy)}"
        )
        await self._until(
            f"{CALLED_CLIENT} in margin call",
            lambda: self._status(exchange, CALLED_CLIENT).state is not MarginState.HEALTHY,
        )
        status = self._status(exchange, CALLED_CLIENT)
        ratio = "none" if status.ratio_bps is None else format_rate(status.ratio_bps)
        self.say(
            f"MARGIN    {CALLED_CLIENT}: healthy -> {status.state.value}: equity "
            f"{format_money(status.equity, self.policy)} is {ratio} of the requirement"
        )
        topic = DEFAULT_CATALOGUE.name(TopicKind.INSTRUCTIONS)
        notice, wire = await self._read_margin_call(kafka, topic)
        self.say(
            f"NOTICE    signed margin call {notice.notice_id[:16]} to {notice.custodian} on the "
            f"{topic} topic: shortfall {format_money(notice.shortfall, self.policy)}, deadline "
            f"{notice.deadline:%Y-%m-%d %H:%M:%S} UTC; signature verified against the "
            "exchange key in registry.json"
        )
        return notice, wire

    async def _read_margin_call(self, kafka: KafkaSettings, topic: str) -> tuple[MarginCall, bytes]:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        async with open_consumer(kafka, group_id=None, topics=[topic]) as consumer:
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=100)
                for records in batch.values():
                    for record in records:
                        decoded = decode_message(
                            topic, record.key, record.value, list(record.headers)
                        )
                        if not isinstance(decoded.body, SignedNotice):
                            continue
                        body = verify_notice(
                            record.value or b"",
                            registry=self.registry,
                            now=truncate_to_millis(datetime.now(UTC)),
                        )
                        if isinstance(body, MarginCall) and body.client == CALLED_CLIENT:
                            return body, record.value or b""
        raise DemoFailed(f"no margin call on {topic} within {WAIT_TIMEOUT_S:.0f} s")

    async def _pretrade(self, addresses: list[Any]) -> None:
        host, port = addresses[0][0], addresses[0][1]
        headers = {"Authorization": f"Bearer {self.engine_token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for client, add in PRETRADE_CHECKS:
                async with session.post(
                    f"http://{host}:{port}/v1/pretrade",
                    json={"client": client, "add_exposure": str(add)},
                ) as response:
                    answer = await response.json()
                if response.status != 200:
                    raise DemoFailed(f"pre-trade check answered {response.status}: {answer}")
                decision = (
                    f"allowed, headroom {format_money(int(answer['headroom']), self.policy)}"
                    if answer["allowed"]
                    else f"refused ({answer['reason']})"
                )
                self.say(
                    f"PRETRADE  POST /v1/pretrade: may {client} add "
                    f"{format_money(add, self.policy)} of exposure? {decision}"
                )

    def _client_proof(self, custodian: _Custodian) -> tuple[ClientProof, int]:
        account, asset = PROOF_CLIENT
        proof = custodian.service.client_proof(account=account, asset=asset)
        if proof is None:
            raise DemoFailed(f"no proof of {account} / {asset}")
        stream = f"{CUSTODIAN}/{EXCHANGE}"
        with custodian.book.engine.connect() as connection:
            wire = connection.execute(
                select(statements_table.c.wire).where(
                    statements_table.c.stream == stream,
                    statements_table.c.sequence == proof.sequence,
                )
            ).scalar_one()
        signed = SignedStatement.decode(bytes(wire), max_bytes=len(wire))
        (self.workdir / "statement.json").write_bytes(compute_canonical_bytes(signed.to_wire()))
        (self.workdir / "client-proof.json").write_bytes(compute_canonical_bytes(proof.to_wire()))
        quantity = verify_client_proof(proof, statement=signed.statement)
        self.say(
            f"CLIENT    {account} checks its inclusion proof against statement #{proof.sequence}: "
            f"{format_amount(quantity, DECIMALS[asset], trim=True)} {asset} counted"
        )
        self.say(
            f"FILES     {self.workdir}: statement.json, registry.json, client-proof.json; check "
            f"again with: mcb verify-proof --statement {self.workdir}/statement.json --registry "
            f"{self.workdir}/registry.json --proof {self.workdir}/client-proof.json"
        )
        return proof, quantity


@dataclass(slots=True)
class _Custodian:
    book: CustodyBook
    service: AttestationService
    relay: OutboxRelay
    log: TransparencyLog


@dataclass(slots=True)
class _Exchange:
    service: ExchangeService
