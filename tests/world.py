"""A small deterministic custodian/co-signer/exchange setup shared by the verification tests.

Keys come from fixed seeds so failures reproduce; the custodian key is the in-memory development
signer (the SoftHSM2 path is covered by tests/test_hsm.py and tests/test_demo.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from attestations.amounts import Price
from attestations.disclosure import (
    DisclosedLeaf,
    LeafDisclosure,
    ReceiverTrees,
    build_trees,
    compute_asset_roots,
)
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.merkle import SumTree
from attestations.p256 import SoftwareP256Signer
from attestations.signing import BlsCosigner, sign_statement
from attestations.statement import (
    GENESIS_PREVIOUS,
    AssetRoot,
    PricePoint,
    SignedStatement,
    Statement,
    StatementKind,
)

NOW = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)
CUSTODIAN = "custodian-a"
EXCHANGE = "exchange-x"
DECIMALS = {"BTC": 8, "USDC": 6}


def seed(label: str) -> bytes:
    return hashlib.sha256(b"test-seed:" + label.encode()).digest()


def custodian_signer(label: str = "custodian") -> SoftwareP256Signer:
    scalar = int.from_bytes(seed(label), "big") % (2**255)
    return SoftwareP256Signer(
        insecure_development_only=True, private_scalar=scalar.to_bytes(32, "big")
    )


def sample_leaves() -> list[DisclosedLeaf]:
    return [
        DisclosedLeaf("alice", "BTC", 0, seed("salt-alice-btc"), 150_000_000),
        DisclosedLeaf("bob", "BTC", 1, seed("salt-bob-btc"), 42),
        DisclosedLeaf("carol", "BTC", 2, seed("salt-carol-btc"), 7_000_000_000),
        DisclosedLeaf("alice", "USDC", 0, seed("salt-alice-usdc"), 1_000_000_000_000),
        DisclosedLeaf("dave", "USDC", 1, seed("salt-dave-usdc"), 25_000_000),
    ]


def sample_prices() -> tuple[PricePoint, ...]:
    return (
        PricePoint(Price.parse(asset="BTC", quote="USD", text="64123.45"), "file:test", NOW),
        PricePoint(Price.parse(asset="USDC", quote="USD", text="1.0000"), "file:test", NOW),
    )


@dataclass
class World:
    signer: SoftwareP256Signer = field(default_factory=custodian_signer)
    cosigners: list[BlsCosigner] = field(
        default_factory=lambda: [BlsCosigner.from_seed(seed(f"cosigner-{i}")) for i in range(3)]
    )
    registry: KeyRegistry = field(default_factory=KeyRegistry)
    leaves: list[DisclosedLeaf] = field(default_factory=sample_leaves)

    def __post_init__(self) -> None:
        valid_from = NOW - timedelta(days=30)
        self.registry.register(
            KeyRecord(CUSTODIAN, KeyRole.CUSTODIAN, self.signer.public_key, valid_from)
        )
        for index, cosigner in enumerate(self.cosigners):
            self.registry.register(
                KeyRecord(
                    f"cosigner-{index}",
                    KeyRole.COSIGNER,
                    cosigner.public_key,
                    valid_from,
                    proof_of_possession=cosigner.proof_of_possession(),
                    signs_for=CUSTODIAN,
                )
            )
        self.registry.set_quorum(CUSTODIAN, threshold=2)

    def trees(self) -> dict[str, SumTree]:
        return build_trees(self.leaves)

    def receiver(self, *, after_snapshot: bool = False) -> ReceiverTrees:
        """A fresh exchange-side state, or the one left by accepting the sample snapshot."""
        if not after_snapshot:
            return ReceiverTrees(DECIMALS)
        depths = {root.asset: root.depth for root in self.assets()}
        return ReceiverTrees.restore(DECIMALS, self.leaves, depths=depths)

    def disclosure(self, statement: Statement) -> LeafDisclosure:
        """All sample leaves for a snapshot; nothing changed for a delta."""
        if statement.kind is StatementKind.SNAPSHOT:
            return LeafDisclosure.for_statement(statement, self.leaves)
        return LeafDisclosure.for_statement(statement, ())

    def assets(self) -> tuple[AssetRoot, ...]:
        return compute_asset_roots(self.trees(), decimals=DECIMALS)

    def statement(
        self,
        *,
        sequence: int = 1,
        previous: bytes = GENESIS_PREVIOUS,
        kind: StatementKind = StatementKind.SNAPSHOT,
        issued_at: datetime = NOW,
        lifetime: timedelta = timedelta(hours=1),
        assets: tuple[AssetRoot, ...] | None = None,
    ) -> Statement:
        return Statement(
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            sequence=sequence,
            previous=previous,
            issued_at=issued_at,
            expires_at=issued_at + lifetime,
            kind=kind,
            assets=self.assets() if assets is None else assets,
            prices=sample_prices(),
        )

    def sign(
        self,
        statement: Statement,
        *,
        cosigners: list[BlsCosigner] | None = None,
        signer: SoftwareP256Signer | None = None,
    ) -> SignedStatement:
        chosen = self.cosigners[:2] if cosigners is None else cosigners
        digest = statement.compute_digest()
        return sign_statement(
            statement,
            custodian_signer=self.signer if signer is None else signer,
            cosignatures=[c.cosign(digest) for c in chosen],
        )

    def next_statement(self, after: Statement, **changes: object) -> Statement:
        base = replace(
            after,
            sequence=after.sequence + 1,
            previous=after.compute_digest(),
            kind=StatementKind.DELTA,
            issued_at=after.issued_at + timedelta(seconds=1),
            expires_at=after.expires_at + timedelta(seconds=1),
        )
        return replace(base, **changes) if changes else base  # type: ignore[arg-type]
