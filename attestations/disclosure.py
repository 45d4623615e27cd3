"""Disclosed leaves: what a receiver needs to rebuild the sum trees of a statement, and the
client's proof bundle.

A :class:`DisclosedLeaf` is one (account, asset) holding with its tree position and its salt. The
exchange receives the disclosed leaves of its own clients with each statement (all of them in a
snapshot, the changed ones in a delta) and rebuilds the trees to check the signed roots. A client
receives a :class:`ClientProof` for its own leaf only: its salt and the sibling path, never
another client's account or salt.

Salts are derived by the custodian from a secret it keeps (:func:`compute_salt`), so they are
stable across epochs (stable commitments keep tree updates incremental) and unguessable by anyone
without the secret (so sibling hashes in a proof reveal no other account).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from attestations.amounts import check_units, format_units, parse_units, validate_asset_code
from attestations.canonical import parse_hex
from attestations.errors import DecodeError, DuplicateLeaf, InvalidProof
from attestations.merkle import (
    InclusionProof,
    Leaf,
    SumTree,
    compute_account_commitment,
    validate_account,
    verify_inclusion,
)
from attestations.statement import (
    AssetRoot,
    Statement,
    require_bytes,
    require_int,
    require_members,
    require_version,
    validate_party,
)

CLIENT_PROOF_VERSION: Final = 1
_SALT_CONTEXT: Final = b"mcb/salt/v1\x00"
_LEAF_KEYS: Final = frozenset({"account", "asset", "position", "quantity", "salt"})
_CLIENT_PROOF_KEYS: Final = frozenset(
    {"account", "custodian", "exchange", "proof", "salt", "sequence", "statement", "version"}
)
MAX_POSITION: Final = 2**48 - 1


def compute_salt(*, secret: bytes, exchange: str, account: str, asset: str) -> bytes:
    """HMAC-SHA-256(secret, "mcb/salt/v1" 0x00 exchange 0x00 account 0x00 asset): 32 bytes."""
    if len(secret) < 32:
        raise DecodeError("the salt secret must be at least 32 bytes")
    validate_party(exchange, what="exchange")
    validate_account(account)
    validate_asset_code(asset)
    message = _SALT_CONTEXT + b"\x00".join(
        part.encode("utf-8") for part in (exchange, account, asset)
    )
    return hmac.new(secret, message, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class DisclosedLeaf:
    account: str
    asset: str
    position: int
    salt: bytes
    quantity: int

    def __post_init__(self) -> None:
        validate_account(self.account)
        validate_asset_code(self.asset)
        require_int(self.position, what="position", low=0, high=MAX_POSITION)
        require_bytes(self.salt, what="salt", length=32)
        check_units(self.quantity, what=f"{self.asset} quantity of {self.account}")

    def to_leaf(self) -> Leaf:
        commitment = compute_account_commitment(account=self.account, salt=self.salt)
        return Leaf(position=self.position, commitment=commitment, quantity=self.quantity)

    def to_wire(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "asset": self.asset,
            "position": self.position,
            "quantity": format_units(self.quantity),
            "salt": self.salt.hex(),
        }

    @classmethod
    def from_wire(cls, obj: object) -> DisclosedLeaf:
        m = require_members(obj, what="disclosed leaf", keys=_LEAF_KEYS)
        return cls(
            account=validate_account(m["account"]),
            asset=validate_asset_code(m["asset"]),
            position=require_int(m["position"], what="position", low=0, high=MAX_POSITION),
            salt=parse_hex(m["salt"], length=32, what="salt"),
            quantity=parse_units(m["quantity"]),
        )


def build_trees(
    leaves: Iterable[DisclosedLeaf], *, depths: Mapping[str, int] | None = None
) -> dict[str, SumTree]:
    """One sum tree per asset from disclosed leaves; duplicate positions or accounts within one
    asset are rejected (DuplicateLeaf). A receiver checking a snapshot passes the statement's
    depths (``{asset: depth}``): positions are stable and trees never shrink, so the depth of a
    tree is not always the smallest that fits its leaves."""
    by_asset: dict[str, list[DisclosedLeaf]] = defaultdict(list)
    for leaf in leaves:
        by_asset[leaf.asset].append(leaf)
    trees: dict[str, SumTree] = {}
    for asset, items in sorted(by_asset.items()):
        accounts = [item.account for item in items]
        if len(set(accounts)) != len(accounts):
            raise DuplicateLeaf(f"an account appears twice in the {asset} tree")
        depth = None if depths is None else depths.get(asset)
        trees[asset] = SumTree.build(asset, [item.to_leaf() for item in items], depth=depth)
    return trees


def compute_asset_roots(
    trees: Mapping[str, SumTree], *, decimals: Mapping[str, int]
) -> tuple[AssetRoot, ...]:
    """The statement's ``assets`` member for these trees, sorted by asset code."""
    roots = []
    for asset in sorted(trees):
        tree = trees[asset]
        if asset not in decimals:
            raise DecodeError(f"no decimals known for {asset}")
        roots.append(
            AssetRoot(
                asset=asset,
                decimals=decimals[asset],
                root=tree.root,
                total=tree.total,
                count=tree.count,
                depth=tree.depth,
            )
        )
    return tuple(roots)


@dataclass(frozen=True, slots=True)
class ClientProof:
    """Everything a client needs to check that its pledge is counted in one statement: which
    statement (by sequence and digest), its own account and salt, and the inclusion proof."""

    custodian: str
    exchange: str
    sequence: int
    statement_digest: bytes
    account: str
    salt: bytes
    proof: InclusionProof
    version: int = CLIENT_PROOF_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=CLIENT_PROOF_VERSION, what="client proof")
        validate_party(self.custodian, what="custodian")
        validate_party(self.exchange, what="exchange")
        require_int(self.sequence, what="sequence", low=1, high=2**53 - 1)
        require_bytes(self.statement_digest, what="statement digest", length=32)
        validate_account(self.account)
        require_bytes(self.salt, what="salt", length=32)
        if not isinstance(self.proof, InclusionProof):
            raise DecodeError("proof must be an InclusionProof")

    def to_wire(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "custodian": self.custodian,
            "exchange": self.exchange,
            "proof": self.proof.to_wire(),
            "salt": self.salt.hex(),
            "sequence": self.sequence,
            "statement": self.statement_digest.hex(),
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object) -> ClientProof:
        m = require_members(obj, what="client proof", keys=_CLIENT_PROOF_KEYS)
        require_version(m["version"], expected=CLIENT_PROOF_VERSION, what="client proof")
        return cls(
            custodian=validate_party(m["custodian"], what="custodian"),
            exchange=validate_party(m["exchange"], what="exchange"),
            sequence=require_int(m["sequence"], what="sequence", low=1, high=2**53 - 1),
            statement_digest=parse_hex(m["statement"], length=32, what="statement digest"),
            account=validate_account(m["account"]),
            salt=parse_hex(m["salt"], length=32, what="salt"),
            proof=InclusionProof.from_wire(m["proof"]),
        )


def verify_client_proof(client_proof: ClientProof, *, statement: Statement) -> int:
    """Check ``client_proof`` against ``statement`` (whose signatures the caller verified) and
    return the attested quantity of the client's leaf."""
    if (statement.custodian, statement.exchange, statement.sequence) != (
        client_proof.custodian,
        client_proof.exchange,
        client_proof.sequence,
    ):
        raise InvalidProof("the proof is for a different statement")
    if statement.compute_digest() != client_proof.statement_digest:
        raise InvalidProof("the proof names a different statement digest")
    proof = client_proof.proof
    asset_root = statement.asset_root(proof.asset)
    if asset_root is None:
        raise InvalidProof(f"the statement has no {proof.asset} tree")
    if proof.depth != asset_root.depth:
        raise InvalidProof(f"proof depth {proof.depth}, tree depth {asset_root.depth}")
    verify_inclusion(
        proof,
        account=client_proof.account,
        salt=client_proof.salt,
        root=asset_root.root,
        total=asset_root.total,
    )
    return proof.quantity
