"""``mcb exchange``: run the exchange's margin ledger and operate it.

* ``serve``: one exchange process (:class:`exchange.service.ExchangeService`): the attestation
  and exposure consumers, the evaluator, the outbox relay and the HTTP API, until SIGINT or
  SIGTERM. Configured by the ``[exchange]`` section (:mod:`mcb.config`).
* ``status CLIENT``, ``streams``, ``resolve-fork STREAM --operator NAME --reason TEXT``: operator
  commands, answered by the running service's API (the in-memory ledger is the one that counts;
  writing the tables behind its back would make them disagree). They authenticate with the
  operator's bearer token from ``$MCB_EXCHANGE_TOKEN`` (never on the command line) and print one
  JSON document.

What it does not do: issue API tokens, publish a custodian's key registry, or start custodians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from attestations.canonical import parse_json_object
from attestations.errors import BridgeError, ConfigurationError, CounterpartyError, TransientError
from attestations.hsm import Pkcs11Signer
from attestations.keys import KeyRegistry, KeyRole
from attestations.p256 import DigestSigner
from bridge.broker import EmbeddedBroker
from bridge.kafka import KafkaSettings
from exchange.api import TokenStore
from exchange.service import ExchangeService
from mcb.config import (
    ENV_EXCHANGE_HSM_PIN,
    ENV_EXCHANGE_TOKEN,
    CustodianConfig,
    CustodianSource,
    ExchangeConfig,
    InvalidConfiguration,
    load_config,
)
from mcb.signers import open_signer

SOFTWARE_KEY_WARNING: Final = (
    "mcb: WARNING: --software-key: the exchange's notice key is generated in memory and lost at "
    "exit; margin calls it signs are verifiable by nobody who has not registered this one-off "
    "key. INSECURE, development only."
)
HTTP_TIMEOUT_S: Final = 10.0
MAX_ANSWER_BYTES: Final = 16 * 2**20


class ExchangeApiRefused(CounterpartyError):
    """The exchange API answered the operator command with an error (its reason and detail are
    in the message)."""

    reason = "exchange_api_refused"


class ExchangeApiUnavailable(TransientError):
    """The exchange API could not be reached (is ``mcb exchange serve`` running there?)."""

    reason = "exchange_api_unavailable"


# --- configuration -------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> CustodianConfig:
    return load_config(None if args.config is None else Path(args.config), os.environ)


def load_custodian_keys(sources: Sequence[CustodianSource]) -> KeyRegistry:
    """The exchange's registry of custodian keys: from each custodian's published registry file,
    its own HSM keys, the co-signer keys registered as signing for it (proofs of possession
    checked again) and its quorum. Keys that file lists for any other party are ignored: a
    custodian vouches for itself only."""
    if not sources:
        raise InvalidConfiguration(
            "exchange serve needs at least one [exchange.custodians.<id>] with registry_file"
        )
    merged = KeyRegistry()
    for source in sources:
        path = Path(source.registry_file)
        try:
            published = KeyRegistry.from_wire(parse_json_object(path.read_bytes()))
        except OSError as exc:
            raise InvalidConfiguration(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except BridgeError as exc:
            raise InvalidConfiguration(f"{path}: not a key registry: {exc}") from exc
        own = [
            record
            for record in published.records()
            if record.principal == source.id
            and record.role in (KeyRole.CUSTODIAN, KeyRole.COSIGNER)
        ]
        if not any(record.role is KeyRole.CUSTODIAN for record in own):
            raise InvalidConfiguration(f"{path}: no custodian key of {source.id}")
        try:
            threshold = published.quorum_threshold(source.id)
        except ConfigurationError as exc:
            raise InvalidConfiguration(f"{path}: no co-signer quorum for {source.id}") from exc
        for record in own:
            merged.register(record)
        merged.set_quorum(source.id, threshold=threshold)
    return merged


def open_exchange_signer(config: ExchangeConfig, *, software_key: bool) -> DigestSigner:
    """The exchange's notice key: on the configured PKCS#11 token, or (only when asked) in
    memory."""
    return open_signer(
        config.hsm,
        software_key=software_key,
        software_key_warning=SOFTWARE_KEY_WARNING,
        section="exchange.hsm",
        pin_env=ENV_EXCHANGE_HSM_PIN,
        no_hsm_message=(
            "exchange serve needs the exchange key's token: an [exchange.hsm] section with "
            "token_label (or --software-key, for development only)"
        ),
    )


# --- serve ---------------------------------------------------------------------------------------


def _print_ready(addresses: list[Any]) -> None:
    # One line on stdout per bound address, so a script started with port 0 finds the API.
    for address in addresses:
        print(f"mcb: serving on http://{address[0]}:{address[1]}", flush=True)


async def serve_exchange(
    config: CustodianConfig,
    *,
    signer: DigestSigner,
    kafka: KafkaSettings,
    stop: asyncio.Event,
    on_ready: Callable[[list[Any]], None],
) -> None:
    """Open the exchange service of ``config`` and run it until ``stop`` is set."""
    exchange = config.exchange
    exchange_id = exchange.require("id")
    tokens = TokenStore.load(Path(exchange.require("token_file")))
    registry = load_custodian_keys(exchange.custodians)
    url = exchange.database_url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    service = await asyncio.to_thread(
        ExchangeService.open,
        url,
        kafka,
        exchange=exchange_id,
        custodians=[source.id for source in exchange.custodians],
        registry=registry,
        decimals={asset.code: asset.decimals for asset in config.assets},
        policy=exchange.policy,
        signer=signer,
        tokens=tokens,
        host=exchange.host,
        port=exchange.port,
        evaluate_interval_s=exchange.evaluate_interval_s,
    )
    print(
        f"mcb: exchange {exchange_id}: notice key {signer.key_id[:16]}, custodians "
        f"{', '.join(source.id for source in exchange.custodians)}",
        file=sys.stderr,
    )
    try:
        await service.run(stop, on_ready=on_ready)
    finally:
        service.close()


async def _serve_main(config: CustodianConfig, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        with ExitStack() as stack:
            signer = open_exchange_signer(config.exchange, software_key=args.software_key)
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
                    "exchange serve needs a Kafka broker: MCB_KAFKA_BOOTSTRAP_SERVERS or [kafka] "
                    "bootstrap_servers (or --embedded-broker, for development)"
                )
            await serve_exchange(
                config, signer=signer, kafka=kafka, stop=stop, on_ready=_print_ready
            )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _cmd_serve(args: argparse.Namespace) -> int:
    asyncio.run(_serve_main(_config(args), args))
    return 0


# --- operator commands ---------------------------------------------------------------------------


def _operator_token() -> str:
    token = os.environ.get(ENV_EXCHANGE_TOKEN, "").strip()
    if not token:
        raise InvalidConfiguration(
            f"set ${ENV_EXCHANGE_TOKEN} to an operator token of the exchange API (never on the "
            "command line)"
        )
    return token


def call_api(
    base_url: str,
    method: str,
    path: str,
    *,
    token: str,
    body: Mapping[str, Any] | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> dict[str, Any]:
    """One request to the exchange API; its JSON answer, or ExchangeApiRefused with the API's
    reason, or ExchangeApiUnavailable when nothing answers."""
    data = None if body is None else json.dumps(body, sort_keys=True).encode("utf-8")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if not base_url.startswith(("http://", "https://")):
        raise InvalidConfiguration(f"the exchange API URL {base_url!r} is not http(s)")
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        base_url + path, data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            raw = response.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = exc.read(4096).decode("utf-8", "replace")
        try:
            problem = json.loads(detail)
            reason, text = problem.get("error"), problem.get("detail")
        except (ValueError, AttributeError):
            reason, text = None, detail[:200]
        raise ExchangeApiRefused(f"{method} {path}: HTTP {exc.code} {reason}: {text}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ExchangeApiUnavailable(f"{base_url}: {exc}") from exc
    if len(raw) > MAX_ANSWER_BYTES:
        raise ExchangeApiRefused(f"{method} {path}: answer larger than {MAX_ANSWER_BYTES} bytes")
    return parse_json_object(raw)


def _print(document: Mapping[str, Any]) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def _cmd_status(args: argparse.Namespace) -> int:
    base, token = _config(args).exchange.api_url, _operator_token()
    client = urllib.parse.quote(args.client, safe="")
    status = call_api(base, "GET", f"/v1/clients/{client}", token=token)
    positions = call_api(base, "GET", f"/v1/clients/{client}/positions", token=token)
    credit = call_api(base, "GET", f"/v1/clients/{client}/credit", token=token)
    status["positions"] = positions["positions"]
    status["headroom"] = credit["headroom"]
    status["blocked_reason"] = credit["blocked_reason"]
    _print(status)
    return 0


def _cmd_streams(args: argparse.Namespace) -> int:
    _print(call_api(_config(args).exchange.api_url, "GET", "/v1/streams", token=_operator_token()))
    return 0


def _cmd_resolve_fork(args: argparse.Namespace) -> int:
    base, token = _config(args).exchange.api_url, _operator_token()
    stream = urllib.parse.quote(args.stream, safe="")
    answer = call_api(
        base, "POST", f"/v1/streams/{stream}/resolve", token=token, body={"reason": args.reason}
    )
    _print(answer)
    # The journal names the operator of the token; --operator states who the caller believes
    # that is, so a token used by the wrong person is noticed at once.
    if answer.get("resolved_by") != f"operator:{args.operator}":
        print(
            f"mcb: WARNING: the resolution was journaled as {answer.get('resolved_by')}, the "
            f"operator of ${ENV_EXCHANGE_TOKEN}, not operator:{args.operator}",
            file=sys.stderr,
        )
        return 2
    return 0


# --- the parser ----------------------------------------------------------------------------------


def add_exchange_parser(sub: Any) -> None:
    """Register ``mcb exchange ...`` on the sub-parsers ``sub`` of the main parser."""
    exchange = sub.add_parser(
        "exchange",
        help="run the exchange's margin ledger (serve) and operate it (status, streams, ...)",
        description="Run and operate the exchange. Configuration: --config FILE (or "
        "$MCB_CONFIG), section [exchange]; overridden by MCB_EXCHANGE_DATABASE_URL, "
        "MCB_EXCHANGE_URL and MCB_KAFKA_*. Operator commands read the API token from "
        f"${ENV_EXCHANGE_TOKEN}.",
    )
    actions = exchange.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="TOML configuration file")

    serve = actions.add_parser(
        "serve",
        help="run consumers, evaluator, outbox relay and HTTP API until SIGTERM",
        parents=[common],
    )
    serve.add_argument(
        "--embedded-broker",
        action="store_true",
        help="development: start an embedded, memory-only Kafka broker instead of MCB_KAFKA_*",
    )
    serve.add_argument(
        "--software-key",
        action="store_true",
        help="INSECURE, development only: a one-off notice key in memory instead of the HSM",
    )
    serve.set_defaults(func=_cmd_serve)

    status = actions.add_parser(
        "status", help="a client's margin, credit and positions", parents=[common]
    )
    status.add_argument("client")
    status.set_defaults(func=_cmd_status)

    streams = actions.add_parser(
        "streams", help="every stream's head, freshness, freeze", parents=[common]
    )
    streams.set_defaults(func=_cmd_streams)

    resolve = actions.add_parser(
        "resolve-fork",
        help="lift the freeze of a stream after a fork was investigated (journaled)",
        parents=[common],
    )
    resolve.add_argument("stream", help="<custodian>/<exchange>")
    resolve.add_argument(
        "--operator", required=True, help="your operator name (the one of your API token)"
    )
    resolve.add_argument("--reason", required=True, help="why the fork is resolved (journaled)")
    resolve.set_defaults(func=_cmd_resolve_fork)
