"""``mcb``: the one command line of the mirrored-collateral bridge.

Sub-commands grow with the services; today: ``demo`` (the end-to-end flow on the embedded
default) and ``verify-proof`` (a client checks its inclusion proof against a signed statement).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from attestations.canonical import parse_json_object, parse_timestamp, truncate_to_millis
from attestations.disclosure import ClientProof, verify_client_proof
from attestations.errors import BridgeError
from attestations.keys import KeyRegistry
from attestations.verify import authenticate_statement
from mcb.demo import run_demo


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
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
