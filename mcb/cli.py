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

from attestations.canonical import parse_json_object
from attestations.disclosure import ClientProof, verify_client_proof
from attestations.errors import BridgeError
from attestations.keys import KeyRegistry
from attestations.statement import SignedStatement
from attestations.verify import verify_statement_signatures
from mcb.demo import run_demo


def _cmd_demo(args: argparse.Namespace) -> int:
    workdir = args.workdir or f"var/demo/{datetime.now(UTC):%Y%m%d-%H%M%S}"
    run_demo(Path(workdir), software_key=args.software_key)
    return 0


def _cmd_verify_proof(args: argparse.Namespace) -> int:
    signed = SignedStatement.decode(Path(args.statement).read_bytes())
    registry = KeyRegistry.from_wire(parse_json_object(Path(args.registry).read_bytes()))
    verify_statement_signatures(signed, registry=registry)
    proof = ClientProof.from_wire(parse_json_object(Path(args.proof).read_bytes()))
    quantity = verify_client_proof(proof, statement=signed.statement)
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
