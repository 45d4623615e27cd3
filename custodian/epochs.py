"""Attestation epochs, the pure part: from the pledged holdings of one exchange to the next
statement and its leaf disclosure.

The custodian keeps an :class:`EpochState` per exchange stream: the sequence and digest of the
last statement, each (asset, account)'s stable tree position and quantity, and the sum trees.
:func:`plan_epoch` compares the pledged holdings now (read from the custody book) with that state
and returns an :class:`EpochPlan`: the unsigned statement, the disclosure that goes with it (every
leaf for a snapshot; set and cleared leaves for a delta) and the state after it. Nothing changes
until the caller, having signed the statement and written it to the outbox in one database
transaction, calls :meth:`EpochPlan.commit`.

Positions: an account keeps its position while it has a pledge in that asset; a new account takes
the lowest free position, so trees stay dense; an account whose pledge drops to zero leaves its
slot (cleared) for a later account. Trees never shrink, as receivers expect.

What this module does not do: read the book, sign, publish or schedule (the service does), or
decide prices (it is handed the snapshot).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from attestations.disclosure import (
    ClearedSlot,
    ClientProof,
    DisclosedLeaf,
    LeafDisclosure,
    compute_asset_roots,
    compute_salt,
)
from attestations.errors import InvariantViolation
from attestations.merkle import SumTree, TreeUpdate, compute_account_commitment
from attestations.statement import GENESIS_PREVIOUS, PricePoint, Statement, StatementKind

Holding = tuple[str, str]
"""(account, asset)"""


@dataclass
class EpochState:
    """What the custodian attested last on one (custodian, exchange) stream."""

    custodian: str
    exchange: str
    sequence: int = 0
    previous: bytes = GENESIS_PREVIOUS
    issued_at: datetime | None = None
    positions: dict[Holding, int] = field(default_factory=dict)
    quantities: dict[Holding, int] = field(default_factory=dict)
    trees: dict[str, SumTree] = field(default_factory=dict)


@dataclass
class EpochPlan:
    statement: Statement
    disclosure: LeafDisclosure
    _state: EpochState
    _updates: list[TreeUpdate]
    _new_trees: dict[str, SumTree]
    _positions: dict[Holding, int]
    _quantities: dict[Holding, int]
    _applied: bool = False

    def commit(self) -> None:
        """Make the planned statement the stream's last one (after it was signed and stored)."""
        if self._applied:
            raise InvariantViolation("an epoch plan was committed twice")
        self._applied = True
        for update in self._updates:
            update.apply()
        state = self._state
        state.trees.update(self._new_trees)
        state.positions = self._positions
        state.quantities = self._quantities
        state.sequence = self.statement.sequence
        state.previous = self.statement.compute_digest()
        state.issued_at = self.statement.issued_at


def _lowest_free(taken: set[int]) -> int:
    position = 0
    while position in taken:
        position += 1
    return position


def plan_epoch(
    state: EpochState,
    *,
    pledged: Mapping[Holding, int],
    decimals: Mapping[str, int],
    prices: tuple[PricePoint, ...],
    salt_secret: bytes,
    now: datetime,
    lifetime: timedelta,
    snapshot: bool = False,
) -> EpochPlan:
    """The next statement of ``state``'s stream for the holdings ``pledged`` ({(account, asset):
    units}, zero or absent meaning no pledge). The first statement, and any with
    ``snapshot=True``, is a snapshot; the others are deltas. Raises nothing for a well-formed
    input; an asset without ``decimals`` is a DecodeError from the statement constructor."""
    if state.issued_at is not None and now < state.issued_at:
        raise InvariantViolation("the clock went backwards since the last statement")
    current = {holding: units for holding, units in pledged.items() if units}
    positions = {h: p for h, p in state.positions.items() if h in current}
    taken: dict[str, set[int]] = {}
    for (_, asset), position in positions.items():
        taken.setdefault(asset, set()).add(position)
    for holding in sorted(current):
        if holding not in positions:
            asset_taken = taken.setdefault(holding[1], set())
            positions[holding] = _lowest_free(asset_taken)
            asset_taken.add(positions[holding])

    def leaf(holding: Holding) -> DisclosedLeaf:
        account, asset = holding
        salt = compute_salt(
            secret=salt_secret, exchange=state.exchange, account=account, asset=asset
        )
        return DisclosedLeaf(account, asset, positions[holding], salt, current[holding])

    # Kept holdings keep their positions, so a holding changes when it is new or its quantity
    # moved; a slot is cleared when its holding is gone and no new holding takes it over.
    changed = sorted(h for h in current if state.quantities.get(h) != current[h])
    set_slots = {(h[1], positions[h]) for h in changed}
    cleared = sorted(
        {(h[1], state.positions[h]) for h in state.quantities if h not in current} - set_slots
    )
    kind = StatementKind.SNAPSHOT if snapshot or state.sequence == 0 else StatementKind.DELTA
    updates: dict[str, TreeUpdate] = {}
    new_trees: dict[str, SumTree] = {}
    for asset in sorted({asset for _, asset in current} | set(state.trees)):
        tree = state.trees.get(asset)
        if tree is None:
            tree = new_trees[asset] = SumTree(asset)
        updates[asset] = tree.plan_update(
            set_leaves=[leaf(h).to_leaf() for h in changed if h[1] == asset],
            clear_positions=[position for a, position in cleared if a == asset],
        )
    statement = Statement(
        custodian=state.custodian,
        exchange=state.exchange,
        sequence=state.sequence + 1,
        previous=state.previous,
        issued_at=now,
        expires_at=now + lifetime,
        kind=kind,
        assets=compute_asset_roots(updates, decimals=decimals),
        prices=prices,
    )
    if kind is StatementKind.SNAPSHOT:
        disclosure = LeafDisclosure.for_statement(statement, [leaf(h) for h in sorted(current)])
    else:
        disclosure = LeafDisclosure.for_statement(
            statement,
            [leaf(h) for h in changed],
            [ClearedSlot(asset, position) for asset, position in cleared],
        )
    return EpochPlan(
        statement=statement,
        disclosure=disclosure,
        _state=state,
        _updates=list(updates.values()),
        _new_trees=new_trees,
        _positions=positions,
        _quantities=current,
    )


def compute_client_proof(
    state: EpochState, *, account: str, asset: str, salt_secret: bytes
) -> ClientProof | None:
    """``account``'s inclusion proof for its ``asset`` leaf in the stream's last statement, or
    None when that statement has no such leaf (or there is no statement yet)."""
    position = state.positions.get((account, asset))
    tree = state.trees.get(asset)
    if state.sequence == 0 or position is None or tree is None:
        return None
    salt = compute_salt(secret=salt_secret, exchange=state.exchange, account=account, asset=asset)
    leaf = tree.leaf(position)
    if leaf is None or compute_account_commitment(account=account, salt=salt) != leaf.commitment:
        raise InvariantViolation(f"the {asset} leaf at {position} is not {account}'s commitment")
    return ClientProof(
        custodian=state.custodian,
        exchange=state.exchange,
        sequence=state.sequence,
        statement_digest=state.previous,
        account=account,
        salt=salt,
        proof=tree.prove(position),
    )
