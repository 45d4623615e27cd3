"""``mcb``: the one command line of the mirrored-collateral bridge.

Sub-commands grow with the services; today: ``demo`` (the end-to-end flow on the embedded
default), ``verify-proof`` (a client checks its inclusion proof against a signed statement) and
``custodian`` (operations on the custody book: deposit, withdraw, pledge, unpledge, show-book,
show-pledged, show-proof; and ``serve``, the attestation service, outbox relay and HTTP API of one
stream in one process; configured by :mod:`mcb.config`).

Exit status: 0 on success, 2 on any refused input or failed command, with one line on stderr
``mcb: <Reason> (<reason_code>): <message>``. Quantities are integer minor units given as decimal
strings (``150000000`` is 1.5 BTC); a fraction or an exponent is refused, never rounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import make_url

from attestations.amounts import format_decimal, parse_units
from attestations.canonical import parse_json_object, parse_timestamp, truncate_to_millis
from attestations.disclosure import ClientProof, verify_client_proof
from attestations.errors import BridgeError, CounterpartyError, DecodeError, FloatRejected
from attestations.hsm import Pkcs11Signer
from attestations.keys import KeyRegistry
from attestations.p256 import DigestSigner
from attestations.signing import BlsCosigner, Cosigner
from attestations.statement import MAX_SEQUENCE
from attestations.translog import TransparencyLog
from attestations.verify import authenticate_statement
from bridge.broker import EmbeddedBroker
from bridge.kafka import KafkaSettings
from bridge.outbox import OutboxRelay
from custodian.api import TokenStore, create_app, run_server
from custodian.book import (
    Command,
    Deposit,
    Pledge,
    RecordedEntry,
    ReleaseAckVerifier,
    SignedReleaseAckVerifier,
    Unpledge,
    Withdraw,
    compute_command_json,
    record_release_ack_unverified,
    validate_release_ack,
)
from custodian.epochs import compute_client_proof as compute_epoch_client_proof
from custodian.history import ProofHistory, ProofNotKept
from custodian.instructions import (
    create_instruction_consumer,
    fetch_release_ack,
    store_release_ack,
)
from custodian.prices import FilePriceSource
from custodian.service import AttestationService, restore_epoch_state, watch_book
from custodian.store import CustodyBook
from mcb.config import ENV_HSM_PIN, CustodianConfig, InvalidConfiguration, load_config
from mcb.demo import run_demo
from mcb.exchange_cli import add_exchange_parser
from mcb.signers import open_signer

logger = logging.getLogger(__name__)

_FRACTION_RE: Final = re.compile(r"[+-]?(?:[0-9]*\.[0-9]*|[0-9.]+[eE][+-]?[0-9]+)")
"""What a float looks like on the command line: refused as money, never rounded."""
_SEQUENCE_RE: Final = re.compile(r"[1-9][0-9]{0,15}")


def _cmd_demo(args: argparse.Namespace) -> int:
    workdir = args.workdir or f"var/demo/{datetime.now(UTC):%Y%m%d-%H%M%S-%f}"
    run_demo(Path(workdir), software_key=args.software_key)
    return 0


def _cmd_verify_proof(args: argparse.Namespace) -> int:
    registry = KeyRegistry.from_wire(parse_json_object(Path(args.registry).read_bytes()))
    proof = ClientProof.from_wire(parse_json_object(Path(args.proof).read_bytes()))
    at = truncate_to_millis(datetime.now(UTC)) if args.at is None else parse_timestamp(args.at)
    authenticated = authenticate_statement(
        Path(args.statement).read_bytes(),
        custodian=proof.custodian,
        exchange=proof.exchange,
        registry=registry,
        now=at,
    )
    quantity = verify_client_proof(proof, statement=authenticated.statement)
    print(
        json.dumps(
            {
                "account": proof.account,
                "asset": proof.proof.asset,
                "quantity": str(quantity),
                "sequence": proof.sequence,
                "verified": True,
            },
            sort_keys=True,
        )
    )
    return 0


# --- custodian ----------------------------------------------------------------------------------


class ProofUnavailable(CounterpartyError):
    """No inclusion proof can be given: no such statement (or its leaves are not kept), or the
    holding is not in it."""

    reason = "proof_unavailable"


def parse_quantity(text: str) -> int:
    """``--quantity``: integer minor units as a canonical decimal string. A fraction or an
    exponent (``1.5``, ``1e8``) is a float and refused, not rounded."""
    if _FRACTION_RE.fullmatch(text.strip()):
        raise FloatRejected(
            f"--quantity {text[:40]!r} is a fraction; give integer minor units (1.5 BTC is "
            "150000000)"
        )
    return parse_units(text, what="--quantity")


def parse_sequence(text: str) -> int:
    """``--sequence``: a statement sequence, a canonical decimal from 1 to 2**53 - 1."""
    if not _SEQUENCE_RE.fullmatch(text) or int(text) > MAX_SEQUENCE:
        raise DecodeError(f"--sequence {text[:40]!r} is not a sequence (1 to {MAX_SEQUENCE})")
    return int(text)


def _config(args: argparse.Namespace) -> CustodianConfig:
    return load_config(None if args.config is None else Path(args.config), os.environ)


@contextmanager
def _open_book(
    config: CustodianConfig, *, verify_release_ack: ReleaseAckVerifier | None = None
) -> Iterator[CustodyBook]:
    """The configured book, migrated to the current schema. A SQLite file's directory is
    created (the default lives under ``var/``). ``verify_release_ack`` is the unpledge's hook."""
    url = make_url(config.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)
    hook = record_release_ack_unverified if verify_release_ack is None else verify_release_ack
    with CustodyBook.open(
        config.database_url, assets=config.assets, verify_release_ack=hook
    ) as book:
        yield book


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def compute_entry_json(entry: RecordedEntry) -> dict[str, Any]:
    """A journal entry as printed: the command as stored, and its postings (amounts as decimal
    strings, like every amount this project writes)."""
    return {
        "entry_id": entry.entry_id,
        "recorded_at": _timestamp(entry.recorded_at),
        "command": compute_command_json(entry.command),
        "postings": [
            {
                "holder": posting.account.holder,
                "asset": posting.account.asset,
                "sub_account": posting.account.sub_account,
                "amount": str(posting.amount),
            }
            for posting in entry.postings
        ],
    }


def _idempotency_key(args: argparse.Namespace) -> str:
    if args.idempotency_key is not None:
        return str(args.idempotency_key)
    key = f"cli-{secrets.token_hex(16)}"
    # On stderr, so stdout stays one JSON document; the key is what makes a retry safe.
    print(f"mcb: idempotency key {key} (retry with --idempotency-key {key})", file=sys.stderr)
    return key


def _build_command(args: argparse.Namespace, *, release_ack: str | None = None) -> Command:
    quantity = parse_quantity(args.quantity)
    key = _idempotency_key(args)
    if args.action == "deposit":
        return Deposit(key, args.client, args.asset, quantity)
    if args.action == "withdraw":
        return Withdraw(key, args.client, args.asset, quantity)
    if args.action == "pledge":
        return Pledge(key, args.client, args.asset, args.exchange, quantity)
    if release_ack is None:
        raise InvalidConfiguration("an unpledge needs the exchange's release acknowledgement")
    return Unpledge(key, args.client, args.asset, args.exchange, quantity, release_ack)


def _cmd_apply(args: argparse.Namespace) -> int:
    command = _build_command(args)  # input errors before the database is touched
    with _open_book(_config(args)) as book:
        entry = book.apply(command)
    print(json.dumps(compute_entry_json(entry), sort_keys=True))
    return 0


def _cmd_unpledge(args: argparse.Namespace) -> int:
    """An unpledge under the exchange's signed release acknowledgement: ``--release-ack-file``
    (verified and stored first) or ``--release-ack`` (the id of one the instructions consumer
    stored). The book verifies it again at the command's time under ``--exchange-registry`` and
    uses it once (:class:`custodian.book.SignedReleaseAckVerifier`)."""
    parse_quantity(args.quantity)  # input errors before the database is touched
    config = _config(args)
    registry = KeyRegistry.from_wire(parse_json_object(Path(args.exchange_registry).read_bytes()))
    now = truncate_to_millis(datetime.now(UTC))
    ack_file = None if args.release_ack_file is None else Path(args.release_ack_file).read_bytes()
    verifier = SignedReleaseAckVerifier(registry, custodian=config.custodian)
    with _open_book(config, verify_release_ack=verifier) as book:
        if ack_file is not None:
            ack = store_release_ack(
                book.engine, ack_file, registry=registry, custodian=config.custodian, now=now
            )
            release_id = ack.release_id
        else:
            release_id = validate_release_ack(args.release_ack)
        command = _build_command(args, release_ack=release_id)
        wire = fetch_release_ack(book.engine, release_id)
        entry = book.apply(command, now=now, release_ack=wire)
    print(json.dumps(compute_entry_json(entry), sort_keys=True))
    return 0


def _print_rows(rows: list[dict[str, str]], *, columns: Sequence[str], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, sort_keys=True))
        return
    widths = [max([len(c), *(len(row[c]) for row in rows)]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        cells = (
            # Numbers right-aligned, names left-aligned.
            row[c].rjust(w) if c in ("units", "whole_units") else row[c].ljust(w)
            for c, w in zip(columns, widths, strict=True)
        )
        print("  ".join(cells).rstrip())


def _whole(config: CustodianConfig, asset: str, units: int) -> str:
    decimals = {a.code: a.decimals for a in config.assets}.get(asset)
    return "?" if decimals is None else format_decimal(units, decimals=decimals)


def _cmd_show_book(args: argparse.Namespace) -> int:
    config = _config(args)
    with _open_book(config) as book:
        balances = book.balances(client=args.client, asset=args.asset)
    rows = [
        {
            "client": account.holder,
            "asset": account.asset,
            "sub_account": account.sub_account,
            "units": str(units),
            "whole_units": _whole(config, account.asset, units),
        }
        for account, units in balances.items()
    ]
    _print_rows(
        rows, columns=("client", "asset", "sub_account", "units", "whole_units"), fmt=args.format
    )
    return 0


def _cmd_show_pledged(args: argparse.Namespace) -> int:
    config = _config(args)
    with _open_book(config) as book:
        pledged = book.pledged(args.exchange)
    rows = [
        {
            "client": client,
            "asset": asset,
            "units": str(units),
            "whole_units": _whole(config, asset, units),
        }
        for (client, asset), units in sorted(pledged.items())
    ]
    _print_rows(rows, columns=("client", "asset", "units", "whole_units"), fmt=args.format)
    return 0


def _read_salt_secret(config: CustodianConfig) -> bytes:
    if config.salt_secret_file is None:
        raise InvalidConfiguration(
            "show-proof needs the attestation service's salt secret: set salt_secret_file in "
            "[custodian] or MCB_SALT_SECRET_FILE"
        )
    secret = Path(config.salt_secret_file).read_bytes()
    if len(secret) < 32:
        raise InvalidConfiguration(f"{config.salt_secret_file}: the salt secret is under 32 bytes")
    return secret


def compute_client_proof(
    book: CustodyBook,
    *,
    custodian: str,
    exchange: str,
    client: str,
    asset: str,
    salt_secret: bytes,
    sequence: int | None = None,
) -> ClientProof:
    """The inclusion proof of (client, asset) in the stream's stored statement ``sequence``
    (None: the latest). The latest from the state the attestation service restores at start (its
    stored leaves, checked against the statement's roots); another from the leaf history
    (:class:`custodian.history.ProofHistory`, checked against that statement's roots)."""
    if sequence is not None:
        history = ProofHistory(
            book.engine, custodian=custodian, exchange=exchange, salt_secret=salt_secret
        )
        try:
            found = history.client_proof(account=client, asset=asset, sequence=sequence)
        except ProofNotKept as exc:
            raise ProofUnavailable(str(exc)) from exc
        if found is None:
            raise ProofUnavailable(
                f"{client} / {asset} is not in statement #{sequence} of {custodian}/{exchange}"
            )
        return found
    state, _ = restore_epoch_state(
        book.engine, custodian=custodian, exchange=exchange, salt_secret=salt_secret
    )
    if state.sequence == 0:
        raise ProofUnavailable(f"no statement for {custodian}/{exchange} has been published yet")
    proof = compute_epoch_client_proof(state, account=client, asset=asset, salt_secret=salt_secret)
    if proof is None:
        raise ProofUnavailable(
            f"{client} / {asset} is not in statement #{state.sequence} of {custodian}/{exchange}"
        )
    return proof


def _cmd_show_proof(args: argparse.Namespace) -> int:
    sequence = None if args.sequence is None else parse_sequence(args.sequence)
    config = _config(args)
    salt_secret = _read_salt_secret(config)
    with _open_book(config) as book:
        proof = compute_client_proof(
            book,
            custodian=config.custodian,
            exchange=args.exchange,
            client=args.client,
            asset=args.asset,
            salt_secret=salt_secret,
            sequence=sequence,
        )
    print(json.dumps(proof.to_wire(), sort_keys=True))
    return 0


# --- serve ---------------------------------------------------------------------------------------

SOFTWARE_KEY_WARNING: Final = (
    "mcb: WARNING: --software-key: the custodian key is generated in memory and lost at exit; "
    "statements it signs are verifiable by nobody who has not registered this one-off key. "
    "INSECURE, development only."
)
COSIGNER_WARNING: Final = (
    "mcb: WARNING: the co-signers run in this process with seeds read from {path}: a "
    "development arrangement; in production each co-signer is a separate party."
)


def open_serve_signer(config: CustodianConfig, *, software_key: bool) -> DigestSigner:
    """The custodian key: on the configured PKCS#11 token, or (only when asked) in memory."""
    return open_signer(
        config.hsm,
        software_key=software_key,
        software_key_warning=SOFTWARE_KEY_WARNING,
        section="hsm",
        pin_env=ENV_HSM_PIN,
        no_hsm_message=(
            "serve needs the custodian key's token: an [hsm] section with token_label "
            "(or --software-key, for development only)"
        ),
    )


def load_dev_cosigners(path: Path) -> list[Cosigner]:
    """DEVELOPMENT ONLY: in-process co-signers, one per line of ``path`` (a hex seed of at least
    32 bytes; blank and ``#`` lines ignored). In production each co-signer is a remote party
    holding its own key; this stands in for them on one machine."""
    cosigners = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            seed = bytes.fromhex(line)
        except ValueError as exc:
            raise InvalidConfiguration(f"{path} line {number}: not a hex seed") from exc
        if len(seed) < 32:
            raise InvalidConfiguration(f"{path} line {number}: a seed is at least 32 bytes")
        cosigners.append(Cosigner(BlsCosigner.from_seed(seed)))
    return cosigners


async def serve(
    config: CustodianConfig,
    *,
    signer: DigestSigner,
    kafka: KafkaSettings,
    stop: asyncio.Event,
    on_ready: Callable[[list[Any]], None],
) -> None:
    """Run the stream's attestation service, outbox relay, instructions consumer (snapshot
    requests) and HTTP API until ``stop`` is set, then wait for all four. If one of them fails,
    the others are stopped and the error propagates."""
    serve_config = config.serve
    exchange = serve_config.require("exchange")
    tokens = TokenStore.load(Path(serve_config.require("token_file")))
    prices = FilePriceSource(Path(serve_config.require("price_file")))
    seeds = Path(serve_config.require("cosigner_seeds_file"))
    cosigners = load_dev_cosigners(seeds)
    print(COSIGNER_WARNING.format(path=seeds), file=sys.stderr)
    salt_secret = _read_salt_secret(config)
    log_path = Path(serve_config.translog_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with _open_book(config) as book, TransparencyLog(log_path) as log:
        relay = OutboxRelay(book.engine, kafka)
        service = AttestationService.open(
            book,
            custodian=config.custodian,
            exchange=exchange,
            signer=signer,
            cosigners=cosigners,
            quorum=serve_config.quorum,
            salt_secret=salt_secret,
            decimals={asset.code: asset.decimals for asset in config.assets},
            prices=prices,
            log=log,
            relay=relay,
        )
        # The in-process co-signers start without any record of the stream and accept only a
        # snapshot first: without this, a restarted serve would have every delta refused.
        service.request_snapshot()
        exchange_registry = (
            None
            if serve_config.exchange_registry_file is None
            else KeyRegistry.from_wire(
                parse_json_object(Path(serve_config.exchange_registry_file).read_bytes())
            )
        )
        if exchange_registry is None:
            logger.warning(
                "no [serve] exchange_registry_file: release acknowledgements on the instructions "
                "topic will be dead-lettered, unpledges need --release-ack-file"
            )
        instructions = create_instruction_consumer(
            custodian=config.custodian,
            services=[service],
            settings=kafka,
            registry=exchange_registry,
        )
        app = create_app(service=service, tokens=tokens, log=log, signer=signer)
        tasks = [
            asyncio.create_task(relay.run(stop), name="outbox-relay"),
            asyncio.create_task(instructions.run(stop), name="instructions-consumer"),
            asyncio.create_task(
                service.run(
                    stop, interval_s=serve_config.interval_s, debounce_s=serve_config.debounce_s
                ),
                name="attestation-service",
            ),
            # Pledges made by `mcb custodian pledge` (another process) reach the next epoch
            # within a fraction of a second instead of at the next interval.
            asyncio.create_task(watch_book(book, [service], stop), name="book-watcher"),
            asyncio.create_task(
                run_server(app, serve_config.host, serve_config.port, stop=stop, on_ready=on_ready),
                name="http-api",
            ),
        ]
        try:
            # The first task to end before stop was set failed (or returned early): stop the rest.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


def _print_ready(addresses: list[Any]) -> None:
    # One line on stdout per bound address, so a script (or a test) started with port 0 can
    # find the API.
    for address in addresses:
        host, port = address[0], address[1]
        print(f"mcb: serving on http://{host}:{port}", flush=True)


async def _serve_main(config: CustodianConfig, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        with ExitStack() as stack:
            signer = open_serve_signer(config, software_key=args.software_key)
            if isinstance(signer, Pkcs11Signer):
                stack.callback(signer.close)
            if args.embedded_broker:
                broker = EmbeddedBroker()
                await asyncio.to_thread(broker.start)
                stack.callback(broker.stop)
                kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
            elif config.kafka is not None:
                kafka = config.kafka
            else:
                raise InvalidConfiguration(
                    "serve needs a Kafka broker: MCB_KAFKA_BOOTSTRAP_SERVERS or [kafka] "
                    "bootstrap_servers (or --embedded-broker, for development)"
                )
            await serve(config, signer=signer, kafka=kafka, stop=stop, on_ready=_print_ready)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _cmd_serve(args: argparse.Namespace) -> int:
    asyncio.run(_serve_main(_config(args), args))
    return 0


def _add_custodian_parser(sub: Any) -> None:
    custodian = sub.add_parser(
        "custodian",
        help="operate the custody book (deposit, withdraw, pledge, unpledge, show ...)",
        description="Operate the custody book. Configuration: --config FILE (or $MCB_CONFIG), "
        "overridden by MCB_DATABASE_URL, MCB_SALT_SECRET_FILE and MCB_KAFKA_*.",
    )
    actions = custodian.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="TOML configuration file")

    def add(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> Any:
        parser = actions.add_parser(name, help=help_text, parents=[common])
        parser.set_defaults(func=func)
        return parser

    movements = {
        "deposit": "units arrive in custody for a client (external -> available)",
        "withdraw": "units leave custody (available -> external)",
        "pledge": "pledge available units to an exchange",
        "unpledge": "release pledged units, with the exchange's signed release acknowledgement",
    }
    for name, help_text in movements.items():
        parser = add(name, help_text, _cmd_unpledge if name == "unpledge" else _cmd_apply)
        parser.add_argument("--client", required=True)
        parser.add_argument("--asset", required=True)
        parser.add_argument(
            "--quantity", required=True, help="integer minor units, e.g. 150000000 for 1.5 BTC"
        )
        if name in ("pledge", "unpledge"):
            parser.add_argument("--exchange", required=True)
        if name == "unpledge":
            ack = parser.add_mutually_exclusive_group(required=True)
            ack.add_argument(
                "--release-ack",
                help="the release id of an acknowledgement the instructions consumer received",
            )
            ack.add_argument(
                "--release-ack-file",
                help="a signed release acknowledgement (JSON: the release_ack member of the "
                "exchange's POST /v1/releases answer)",
            )
            parser.add_argument(
                "--exchange-registry",
                required=True,
                help="the key registry (JSON) holding the exchange's key",
            )
        parser.add_argument(
            "--idempotency-key",
            default=None,
            help="retrying with the same key has no second effect (default: a new random key, "
            "printed on stderr)",
        )

    show_book = add("show-book", "client balances per sub-account", _cmd_show_book)
    show_book.add_argument("--client", default=None)
    show_book.add_argument("--asset", default=None)
    show_book.add_argument("--format", choices=("table", "json"), default="table")

    show_pledged = add("show-pledged", "units pledged to one exchange", _cmd_show_pledged)
    show_pledged.add_argument("--exchange", required=True)
    show_pledged.add_argument("--format", choices=("table", "json"), default="table")

    show_proof = add(
        "show-proof",
        "a client's inclusion proof in one statement (JSON, for mcb verify-proof)",
        _cmd_show_proof,
    )
    show_proof.add_argument("--exchange", required=True)
    show_proof.add_argument("--client", required=True)
    show_proof.add_argument("--asset", required=True)
    show_proof.add_argument(
        "--sequence",
        default=None,
        help="the statement's sequence (default: the latest stored statement)",
    )

    serve_parser = add(
        "serve",
        "run the attestation service, outbox relay and HTTP API of one stream until SIGTERM",
        _cmd_serve,
    )
    serve_parser.add_argument(
        "--embedded-broker",
        action="store_true",
        help="development: start an embedded, memory-only Kafka broker instead of MCB_KAFKA_*",
    )
    serve_parser.add_argument(
        "--software-key",
        action="store_true",
        help="INSECURE, development only: a one-off custodian key in memory instead of the HSM",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcb", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the end-to-end flow on the embedded default")
    demo.add_argument(
        "--workdir",
        default=None,
        help="a new directory for the token, log and output files (default: var/demo/<time>)",
    )
    demo.add_argument(
        "--software-key",
        action="store_true",
        help="INSECURE, development only: keep the custodian key in memory instead of SoftHSM2",
    )
    demo.set_defaults(func=_cmd_demo)

    verify = sub.add_parser("verify-proof", help="check a client inclusion proof")
    verify.add_argument("--statement", required=True, help="signed statement (JSON file)")
    verify.add_argument("--registry", required=True, help="key registry (JSON file)")
    verify.add_argument("--proof", required=True, help="client proof (JSON file)")
    verify.add_argument(
        "--at",
        default=None,
        help="check as of this time (YYYY-MM-DDTHH:MM:SS.mmmZ) instead of now: a past statement",
    )
    verify.set_defaults(func=_cmd_verify_proof)
    _add_custodian_parser(sub)
    add_exchange_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.verbose:
        # Migrations run at every open of the book; their progress lines are noise on a terminal.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        if args.func is _cmd_demo:
            # The demo narrates each step itself; the parts' own progress lines would interleave.
            logging.getLogger().setLevel(logging.WARNING)
    try:
        status: int = args.func(args)
    except BridgeError as exc:
        print(f"mcb: {type(exc).__name__} ({exc.reason}): {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mcb: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
