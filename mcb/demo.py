"""The end-to-end demonstration on the embedded default.

A SoftHSM2 token with a non-extractable P-256 custodian key, three BLS co-signers (two of three
required), sample pledged holdings of four assets, two signed statements (a snapshot, then a
delta after one pledge change) appended to the transparency log and covered by signed
checkpoints, verified as an exchange would, and one client's inclusion proof checked as that
client would. The signed statement, the key registry and the client proof are written to the
work directory so ``mcb verify-proof`` can check them again independently.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from attestations.amounts import Price, format_decimal
from attestations.canonical import compute_canonical_bytes, truncate_to_millis
from attestations.checkpoint import Checkpoint, sign_checkpoint, verify_same_history
from attestations.disclosure import (
    ClientProof,
    DisclosedLeaf,
    LeafDisclosure,
    ReceiverTrees,
    build_trees,
    compute_asset_roots,
    compute_salt,
    verify_client_proof,
)
from attestations.hsm import Pkcs11Signer, generate_p256_key, reinitialize_library
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.merkle import SumTree
from attestations.p256 import DigestSigner, SoftwareP256Signer
from attestations.signing import BlsCosigner, Cosigner, sign_statement
from attestations.statement import (
    GENESIS_PREVIOUS,
    PricePoint,
    SignedStatement,
    Statement,
    StatementKind,
)
from attestations.translog import TransparencyLog
from attestations.verify import ChainHead, VerifiedStatement, verify_statement
from mcb.softhsm import init_token, prepare_softhsm

CUSTODIAN = "custodian-bank"
EXCHANGE = "exchange-one"
DECIMALS = {"BENJI": 6, "BTC": 8, "ETH": 18, "USDC": 6}
PRICES = {"BENJI": "1.00", "BTC": "64123.45", "ETH": "3150.10", "USDC": "1.0000"}
SAMPLE_PLEDGES: tuple[tuple[str, str, int], ...] = (
    ("client-alice", "BENJI", 2_500_000_000_000),  # 2.5 M fund units
    ("client-alice", "USDC", 750_000_000_000),  # 750 k USDC
    ("client-bob", "BTC", 1_250_000_000),  # 12.5 BTC
    ("client-bob", "USDC", 100_000_000_000),
    ("client-carol", "ETH", 400 * 10**18),
    ("client-carol", "BENJI", 900_000_000_000),
    ("client-dave", "BTC", 300_000_000),
    ("client-erin", "USDC", 5_000_000_000_000),
)
CHANGED_PLEDGE = ("client-bob", "BTC", 1_500_000_000)  # bob pledges 2.5 BTC more


@dataclass(frozen=True, slots=True)
class DemoResult:
    heads: tuple[ChainHead, ...]
    client_account: str
    client_asset: str
    client_quantity: int


def open_custodian_signer(
    workdir: Path, *, software_key: bool, say: Callable[[str], None]
) -> DigestSigner:
    """A fresh SoftHSM2 token with a P-256 key generated on it (or, only when asked, the
    in-memory development signer)."""
    if software_key:
        return SoftwareP256Signer(insecure_development_only=True)
    softhsm = prepare_softhsm(workdir / "softhsm")
    pin = secrets.token_hex(8)
    label = f"custodian-{secrets.token_hex(3)}"
    init_token(softhsm, label=label, pin=pin, so_pin=secrets.token_hex(8))
    reinitialize_library(library_path=softhsm.library_path)
    public_key = generate_p256_key(
        library_path=softhsm.library_path, token_label=label, pin=pin, key_label="attestation"
    )
    say(f"HSM       SoftHSM2 token {label!r}: P-256 key generated on the token, non-extractable")
    say(f"          public key {public_key.hex()[:32]}...")
    return Pkcs11Signer.open(
        library_path=softhsm.library_path, token_label=label, pin=pin, key_label="attestation"
    )


COSIGNER_PARTIES = ("auditor-one", "trustee-two", "notary-three")


def build_registry(
    signer: DigestSigner, cosigners: list[Cosigner], *, valid_from: datetime
) -> KeyRegistry:
    records = [KeyRecord(CUSTODIAN, KeyRole.CUSTODIAN, signer.public_key, valid_from)]
    records += [
        KeyRecord(
            party,
            KeyRole.COSIGNER,
            c.key.public_key,
            valid_from,
            proof_of_possession=c.key.proof_of_possession(),
            signs_for=CUSTODIAN,
        )
        for party, c in zip(COSIGNER_PARTIES, cosigners, strict=True)
    ]
    return KeyRegistry.of(records, quorums={CUSTODIAN: 2})


class _Custodian:
    """The custodian side of the demo: positions, salts, trees, statements, log."""

    def __init__(self, signer: DigestSigner, cosigners: list[Cosigner], log_path: Path) -> None:
        self.signer = signer
        self.cosigners = cosigners
        self.salt_secret = secrets.token_bytes(32)
        self.positions: dict[tuple[str, str], int] = {}
        self.log = TransparencyLog(log_path)
        self.previous = GENESIS_PREVIOUS
        self.trees: dict[str, SumTree] = {}

    def disclose(self, account: str, asset: str, quantity: int) -> DisclosedLeaf:
        key = (account, asset)
        if key not in self.positions:
            self.positions[key] = sum(1 for _, a in self.positions if a == asset)
        salt = compute_salt(
            secret=self.salt_secret, exchange=EXCHANGE, account=account, asset=asset
        )
        return DisclosedLeaf(account, asset, self.positions[key], salt, quantity)

    def publish(self, *, sequence: int, kind: StatementKind, now: datetime) -> SignedStatement:
        prices = tuple(
            PricePoint(Price.parse(asset=a, quote="USD", text=p), "file:sample-prices", now)
            for a, p in sorted(PRICES.items())
        )
        statement = Statement(
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            sequence=sequence,
            previous=self.previous,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            kind=kind,
            assets=compute_asset_roots(self.trees, decimals=DECIMALS),
            prices=prices,
        )
        digest = statement.compute_digest()
        signed = sign_statement(
            statement,
            custodian_signer=self.signer,
            cosignatures=[c.cosign(statement, now=now) for c in self.cosigners[:2]],
        )
        self.log.append(digest)
        self.previous = digest
        return signed


def run_demo(
    workdir: Path, *, software_key: bool = False, say: Callable[[str], None] = print
) -> DemoResult:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "transparency-log.sqlite3"
    if log_path.exists():
        raise SystemExit(f"{log_path} already exists; use a fresh --workdir")
    start = truncate_to_millis(datetime.now(UTC))
    signer = open_custodian_signer(workdir, software_key=software_key, say=say)
    try:
        return _run(workdir, signer, start=start, say=say)
    finally:
        if isinstance(signer, Pkcs11Signer):
            signer.close()


def _run(
    workdir: Path, signer: DigestSigner, *, start: datetime, say: Callable[[str], None]
) -> DemoResult:
    cosigners = [Cosigner(BlsCosigner.from_seed(secrets.token_bytes(32))) for _ in range(3)]
    registry = build_registry(signer, cosigners, valid_from=start - timedelta(minutes=1))
    say(
        f"REGISTRY  custodian key {signer.key_id[:16]}; BLS co-signers "
        f"{', '.join(COSIGNER_PARTIES)} with checked proofs of possession; quorum 2 of 3"
    )
    custodian = _Custodian(signer, cosigners, workdir / "transparency-log.sqlite3")
    leaves = [custodian.disclose(a, s, q) for a, s, q in SAMPLE_PLEDGES]
    custodian.trees = build_trees(leaves)
    receiver = ReceiverTrees(DECIMALS)  # the exchange's copy, rebuilt from disclosed leaves

    head: ChainHead | None = None
    verified: list[VerifiedStatement] = []
    checkpoints = []
    for sequence in (1, 2):
        now = start + timedelta(seconds=sequence - 1)
        kind = StatementKind.SNAPSHOT if sequence == 1 else StatementKind.DELTA
        disclosed = leaves
        if kind is StatementKind.DELTA:
            changed = custodian.disclose(*CHANGED_PLEDGE)
            custodian.trees["BTC"].update(set_leaves=[changed.to_leaf()])
            disclosed = [changed]
            say("PLEDGE    client-bob pledges 2.5 BTC more: a delta with one changed leaf")
        signed = custodian.publish(sequence=sequence, kind=kind, now=now)
        wire = signed.encode()
        result = verify_statement(
            wire,
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            registry=registry,
            head=head,
            now=now,
            receiver=receiver,
            disclosure=LeafDisclosure.for_statement(signed.statement, disclosed),
        )
        result.trees_plan.apply()
        head = result.head
        verified.append(result)
        checkpoints.append(
            sign_checkpoint(
                Checkpoint(CUSTODIAN, EXCHANGE, custodian.log.head(), now), signer=signer
            )
        )
        say(
            f"STATEMENT #{sequence} {kind.value}: {len(wire)} bytes, digest "
            f"{result.digest.hex()[:16]}, signed by the HSM key and 2 of 3 co-signers"
        )
        for root in result.statement.assets:
            total = format_decimal(root.total, decimals=root.decimals)
            say(
                f"          {root.asset:<5} {total:>28} in {root.count} leaves, "
                f"root {root.root.hex()[:16]}"
            )
        say(f"EXCHANGE  #{sequence} verified: keys, signatures, quorum, time, chain, roots")

    proof = custodian.log.prove_consistency(1, 2)
    verify_same_history(checkpoints[0], checkpoints[1], registry=registry, proof=proof, now=start)
    say("LOG       signed checkpoints at sizes 1 and 2 verified consistent (no split view)")
    custodian.log.close()

    account, asset, _ = CHANGED_PLEDGE
    latest = verified[-1]
    client_proof = ClientProof(
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        sequence=latest.statement.sequence,
        statement_digest=latest.digest,
        account=account,
        salt=compute_salt(
            secret=custodian.salt_secret, exchange=EXCHANGE, account=account, asset=asset
        ),
        proof=custodian.trees[asset].prove(custodian.positions[(account, asset)]),
    )
    for name, obj in (
        ("statement.json", latest.signed.to_wire()),
        ("registry.json", registry.to_wire()),
        ("client-proof.json", client_proof.to_wire()),
    ):
        (workdir / name).write_bytes(compute_canonical_bytes(obj))
    say(f"CLIENT    inclusion proof of {account} / {asset} in statement #{client_proof.sequence}:")
    say(json.dumps(client_proof.to_wire(), indent=2, sort_keys=True))
    quantity = verify_client_proof(client_proof, statement=latest.statement)
    say(
        f"CLIENT    proof verified: {account} has "
        f"{format_decimal(quantity, decimals=DECIMALS[asset])} {asset} "
        f"counted in statement #{client_proof.sequence}"
    )
    say(
        f"FILES     {workdir}/statement.json, registry.json, client-proof.json; check again with: "
        f"mcb verify-proof --statement {workdir}/statement.json --registry "
        f"{workdir}/registry.json --proof {workdir}/client-proof.json"
    )
    return DemoResult(
        heads=tuple(v.head for v in verified),
        client_account=account,
        client_asset=asset,
        client_quantity=quantity,
    )
