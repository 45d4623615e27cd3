"""Disclosed leaves: what a receiver needs to rebuild the sum trees of a statement, the
receiver's trees themselves, and the client's proof bundle.

A :class:`DisclosedLeaf` is one (account, asset) holding with its tree position and its salt. The
exchange receives a :class:`LeafDisclosure` of its own clients with each statement (every leaf in
a snapshot; the set leaves and :class:`ClearedSlot` positions in a delta). :class:`ReceiverTrees`
holds the exchange's copy of the trees and plans a disclosure against the signed roots without
changing anything; the resulting :class:`TreesPlan` is applied all or nothing. A client receives
a :class:`ClientProof` for its own leaf only: its salt and the sibling path, never another
client's account or salt.

Salts are derived by the custodian from a secret it keeps (:func:`compute_salt`), so they are
stable across epochs (stable commitments keep tree updates incremental) and unguessable by anyone
without the secret (so sibling hashes in a proof reveal no other account).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from attestations.amounts import check_units, format_units, parse_units, validate_asset_code
from attestations.canonical import parse_hex
from attestations.errors import (
    DecodeError,
    DuplicateLeaf,
    InvalidProof,
    InvariantViolation,
    PolicyViolation,
    RootMismatch,
    WrongStream,
)
from attestations.merkle import (
    POSITION_LIMIT,
    InclusionProof,
    Leaf,
    SumTree,
    compute_account_commitment,
    validate_account,
    verify_inclusion,
)
from attestations.statement import (
    MAX_SEQUENCE,
    AssetRoot,
    Statement,
    StatementKind,
    require_bytes,
    require_int,
    require_list,
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
MAX_POSITION: Final = POSITION_LIMIT - 1
DISCLOSURE_VERSION: Final = 1
MAX_DISCLOSED_LEAVES: Final = 16_000_000
_CLEARED_KEYS: Final = frozenset({"asset", "position"})
_DISCLOSURE_KEYS: Final = frozenset(
    {"clear", "custodian", "exchange", "sequence", "set", "statement", "version"}
)


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


class TreeShape(Protocol):
    """What a statement states of a tree: a SumTree, or a planned update of one."""

    @property
    def root(self) -> bytes: ...
    @property
    def total(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def depth(self) -> int: ...


def compute_asset_roots(
    trees: Mapping[str, TreeShape], *, decimals: Mapping[str, int]
) -> tuple[AssetRoot, ...]:
    """The statement's ``assets`` member for these trees (or planned updates), sorted by asset
    code."""
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
        require_int(self.sequence, what="sequence", low=1, high=MAX_SEQUENCE)
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
            sequence=require_int(m["sequence"], what="sequence", low=1, high=MAX_SEQUENCE),
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
    verify_inclusion(
        proof,
        account=client_proof.account,
        salt=client_proof.salt,
        root=asset_root.root,
        total=asset_root.total,
        depth=asset_root.depth,
    )
    return proof.quantity


# --- what a receiver gets with each statement, and how it checks it -----------------------------


@dataclass(frozen=True, slots=True)
class ClearedSlot:
    """A position of one asset's tree that a delta empties (the account left or moved)."""

    asset: str
    position: int

    def __post_init__(self) -> None:
        validate_asset_code(self.asset)
        require_int(self.position, what="position", low=0, high=MAX_POSITION)

    def to_wire(self) -> dict[str, Any]:
        return {"asset": self.asset, "position": self.position}

    @classmethod
    def from_wire(cls, obj: object) -> ClearedSlot:
        m = require_members(obj, what="cleared slot", keys=_CLEARED_KEYS)
        return cls(
            asset=validate_asset_code(m["asset"]),
            position=require_int(m["position"], what="position", low=0, high=MAX_POSITION),
        )


@dataclass(frozen=True, slots=True)
class LeafDisclosure:
    """The leaves that accompany one statement, bound to it by its digest: every leaf for a
    snapshot (``clear`` empty), the set and emptied slots since the previous sequence for a delta.
    """

    custodian: str
    exchange: str
    sequence: int
    statement_digest: bytes
    set_leaves: tuple[DisclosedLeaf, ...]
    clear: tuple[ClearedSlot, ...] = ()
    version: int = DISCLOSURE_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=DISCLOSURE_VERSION, what="disclosure")
        validate_party(self.custodian, what="custodian")
        validate_party(self.exchange, what="exchange")
        require_int(self.sequence, what="sequence", low=1, high=MAX_SEQUENCE)
        require_bytes(self.statement_digest, what="statement digest", length=32)
        if not all(isinstance(leaf, DisclosedLeaf) for leaf in self.set_leaves):
            raise DecodeError("set_leaves must be DisclosedLeaf values")
        if not all(isinstance(slot, ClearedSlot) for slot in self.clear):
            raise DecodeError("clear must be ClearedSlot values")

    @classmethod
    def for_statement(
        cls,
        statement: Statement,
        set_leaves: Iterable[DisclosedLeaf],
        clear: Iterable[ClearedSlot] = (),
    ) -> LeafDisclosure:
        return cls(
            custodian=statement.custodian,
            exchange=statement.exchange,
            sequence=statement.sequence,
            statement_digest=statement.compute_digest(),
            set_leaves=tuple(set_leaves),
            clear=tuple(clear),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "clear": [slot.to_wire() for slot in self.clear],
            "custodian": self.custodian,
            "exchange": self.exchange,
            "sequence": self.sequence,
            "set": [leaf.to_wire() for leaf in self.set_leaves],
            "statement": self.statement_digest.hex(),
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object, *, max_leaves: int = MAX_DISCLOSED_LEAVES) -> LeafDisclosure:
        m = require_members(obj, what="disclosure", keys=_DISCLOSURE_KEYS)
        require_version(m["version"], expected=DISCLOSURE_VERSION, what="disclosure")
        set_items = require_list(m["set"], what="set", max_items=max_leaves)
        clear_items = require_list(m["clear"], what="clear", max_items=max_leaves)
        return cls(
            custodian=validate_party(m["custodian"], what="custodian"),
            exchange=validate_party(m["exchange"], what="exchange"),
            sequence=require_int(m["sequence"], what="sequence", low=1, high=MAX_SEQUENCE),
            statement_digest=parse_hex(m["statement"], length=32, what="statement digest"),
            set_leaves=tuple(DisclosedLeaf.from_wire(item) for item in set_items),
            clear=tuple(ClearedSlot.from_wire(item) for item in clear_items),
        )


class TreesPlan:
    """The receiver's trees as they will be once a verified statement is applied, computed
    without changing anything. :meth:`apply` commits it; it is all or nothing across assets, and
    it refuses to apply over a receiver that changed since the plan was made."""

    def __init__(self, receiver: ReceiverTrees, commit: Callable[[], None]) -> None:
        self._receiver = receiver
        self._generation = receiver.generation
        self._commit = commit
        self._applied = False

    def apply(self) -> None:
        if self._applied:
            raise InvariantViolation("a trees plan was applied twice")
        if self._receiver.generation != self._generation:
            raise InvariantViolation("the receiver's trees changed since this plan was made")
        self._applied = True
        self._commit()
        self._receiver.generation += 1


class ReceiverTrees:
    """An exchange's copy of one stream's sum trees, rebuilt from disclosed leaves.

    It also keeps, per asset, which account holds which position, so that a delta cannot give
    one account a second leaf (a snapshot checks the same by construction). ``decimals`` is the
    receiver's own asset table: a statement that states other decimals for an asset, or an
    asset the receiver does not know, is a PolicyViolation (decimals drive valuation).
    """

    def __init__(self, decimals: Mapping[str, int]) -> None:
        self._decimals = {validate_asset_code(a): d for a, d in decimals.items()}
        self.trees: dict[str, SumTree] = {}
        self._accounts: dict[str, dict[int, str]] = {}
        self.generation = 0

    @classmethod
    def restore(
        cls,
        decimals: Mapping[str, int],
        leaves: Iterable[DisclosedLeaf],
        *,
        depths: Mapping[str, int],
    ) -> ReceiverTrees:
        """The receiver state of a stream from the leaves it last accepted (as a receiver that
        restarts rebuilds it from its database) and the depths of the last accepted statement.
        """
        receiver = cls(decimals)
        items = list(leaves)
        receiver.trees = build_trees(items, depths=depths)
        for asset, depth in depths.items():
            receiver.trees.setdefault(asset, SumTree(asset, depth=depth))
        for leaf in items:
            receiver._accounts.setdefault(leaf.asset, {})[leaf.position] = leaf.account
        return receiver

    def account_at(self, asset: str, position: int) -> str | None:
        return self._accounts.get(asset, {}).get(position)

    def plan(self, statement: Statement, disclosure: LeafDisclosure) -> TreesPlan:
        """Check ``disclosure`` against ``statement`` (whose signatures and chain the caller
        verified) and return the plan that applies it. Raises WrongStream, DecodeError,
        DuplicateLeaf, PolicyViolation, RootMismatch or SumMismatch; changes nothing."""
        if (disclosure.custodian, disclosure.exchange, disclosure.sequence) != (
            statement.custodian,
            statement.exchange,
            statement.sequence,
        ) or disclosure.statement_digest != statement.compute_digest():
            raise WrongStream("the disclosure belongs to another statement")
        for root in statement.assets:
            expected = self._decimals.get(root.asset)
            if expected is None:
                raise PolicyViolation(f"asset {root.asset} is not in the receiver's asset table")
            if root.decimals != expected:
                raise PolicyViolation(
                    f"{root.asset}: statement says {root.decimals} decimals, the receiver's "
                    f"asset table {expected}"
                )
        stated = {root.asset for root in statement.assets}
        touched = {leaf.asset for leaf in disclosure.set_leaves} | {
            s.asset for s in disclosure.clear
        }
        # A delta keeps the receiver's trees, so every asset it holds leaves of must still have a
        # root; a snapshot replaces them all, so an asset it leaves out is simply gone.
        held = (
            set()
            if statement.kind is StatementKind.SNAPSHOT
            else {asset for asset, tree in self.trees.items() if tree.count}
        )
        if missing := (touched | held) - stated:
            raise RootMismatch(f"assets {sorted(missing)} have leaves but no root in the statement")
        if statement.kind is StatementKind.SNAPSHOT:
            return self._plan_snapshot(statement, disclosure)
        return self._plan_delta(statement, disclosure)

    def _plan_snapshot(self, statement: Statement, disclosure: LeafDisclosure) -> TreesPlan:
        if disclosure.clear:
            raise DecodeError("a snapshot disclosure lists every leaf and clears nothing")
        depths = {root.asset: root.depth for root in statement.assets}
        trees = build_trees(disclosure.set_leaves, depths=depths)
        for root in statement.assets:
            tree = trees.setdefault(root.asset, SumTree(root.asset, depth=root.depth))
            tree.verify_head(root=root.root, total=root.total, count=root.count)
        accounts: dict[str, dict[int, str]] = defaultdict(dict)
        for leaf in disclosure.set_leaves:
            accounts[leaf.asset][leaf.position] = leaf.account

        def commit() -> None:
            self.trees = trees
            self._accounts = dict(accounts)

        return TreesPlan(self, commit)

    def _plan_delta(self, statement: Statement, disclosure: LeafDisclosure) -> TreesPlan:
        updates = []
        new_accounts: dict[str, dict[int, str]] = {}
        for root in statement.assets:
            asset = root.asset
            set_leaves = [leaf for leaf in disclosure.set_leaves if leaf.asset == asset]
            clears = [slot.position for slot in disclosure.clear if slot.asset == asset]
            owners = dict(self._accounts.get(asset, {}))
            for position in clears:
                owners.pop(position, None)
            for leaf in set_leaves:
                owners.pop(leaf.position, None)
            held = set(owners.values())
            for leaf in set_leaves:
                if leaf.account in held:
                    raise DuplicateLeaf(f"{leaf.account} would hold two {asset} leaves")
                held.add(leaf.account)
                owners[leaf.position] = leaf.account
            tree = self.trees.get(asset) or SumTree(asset, depth=root.depth)
            update = tree.plan_update(
                set_leaves=[leaf.to_leaf() for leaf in set_leaves],
                clear_positions=clears,
                expect_root=root.root,
                expect_total=root.total,
                expect_count=root.count,
            )
            if update.depth != root.depth:
                raise RootMismatch(
                    f"{asset}: the delta gives depth {update.depth}, statement {root.depth}"
                )
            updates.append((asset, tree, update))
            new_accounts[asset] = owners

        def commit() -> None:
            for asset, tree, update in updates:
                update.apply()
                self.trees[asset] = tree
            self._accounts.update(new_accounts)

        return TreesPlan(self, commit)
