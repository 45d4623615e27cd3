"""Merkle sum trees over the pledged holdings of one asset, and their inclusion proofs.

What this module does: the byte layouts of account commitments, leaves, interior nodes and empty
slots (docs/protocol.md, "Merkle sum tree"); :class:`SumTree`, a fixed-shape tree addressed by
stable leaf positions that is built in one pass and updated in O(k log n) for k changed leaves, in
two steps (:meth:`SumTree.plan_update` checks and computes, :meth:`TreeUpdate.apply` commits);
:class:`InclusionProof` with its strict wire form; and :func:`verify_inclusion`, the check a client
runs on its own leaf.

What it does not do: sign, fetch, store or decide what a root means for credit. It reads no clock,
no environment and does no I/O; callers hand it values and it accepts or raises.

Why the layout is the way it is:

* Every hash input starts with a distinct prefix byte (leaf 0x00, node 0x01, empty slot 0x02) and
  the account commitment with an ASCII tag, so no leaf can be presented as a node or the other
  way round (second-preimage attacks).
* A node hashes both children's hashes *and* both children's sums. The flawed Maxwell form hashed
  only the parent's sum, which lets a custodian publish parent = max(children) and hide a liability.
* Sums are unsigned and below 2**128 everywhere, checked on build, update and verification, so
  nothing wraps and nothing is negative.
* Leaves sit at positions the custodian assigns and keeps across epochs, in a perfect binary tree
  of a stated depth. A change of k leaves touches k paths, so a receiver re-verifies a delta in
  O(k log n) instead of rebuilding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from operator import add, attrgetter
from typing import Any, Final, TypeVar

from attestations.amounts import (
    UNITS_LIMIT,
    check_units,
    format_units,
    parse_units,
    validate_asset_code,
)
from attestations.canonical import parse_hex
from attestations.errors import (
    CounterpartyError,
    DecodeError,
    DuplicateLeaf,
    FloatRejected,
    InvalidProof,
    InvariantViolation,
    RootMismatch,
    SumMismatch,
    SumOverflow,
)

__all__ = [
    "ACCOUNT_DOMAIN",
    "ACCOUNT_MAX_CHARS",
    "EMPTY_HASHES",
    "EMPTY_PREFIX",
    "HASH_SIZE",
    "LEAF_PREFIX",
    "MAX_DEPTH",
    "NODE_PREFIX",
    "POSITION_LIMIT",
    "PROOF_VERSION",
    "SALT_SIZE",
    "SUM_LIMIT",
    "SUM_SIZE",
    "InclusionProof",
    "Leaf",
    "SumTree",
    "TreeUpdate",
    "compute_account_commitment",
    "compute_leaf_hash",
    "compute_node",
    "is_valid_inclusion",
    "validate_account",
    "validate_asset_code",
    "verify_inclusion",
]

# --- constants of the byte layout ---------------------------------------------------------------

HASH_SIZE: Final = 32
"""SHA-256 output, and the size of every commitment and node hash."""
SALT_SIZE: Final = 32
SUM_SIZE: Final = 16
"""Quantities and sums are encoded as unsigned 128-bit big-endian integers."""
SUM_LIMIT: Final = UNITS_LIMIT
"""Exclusive upper bound of every quantity and every sum, at every level of the tree."""
MAX_DEPTH: Final = 48
POSITION_LIMIT: Final = 2**MAX_DEPTH
"""Exclusive upper bound of a leaf position (positions are encoded as u64, but a tree holds at most
2**48 slots)."""
POSITION_SIZE: Final = 8
ACCOUNT_LENGTH_SIZE: Final = 2
ACCOUNT_MAX_CHARS: Final = 128

ACCOUNT_DOMAIN: Final = b"mcb/account/v1"
LEAF_PREFIX: Final = b"\x00"
NODE_PREFIX: Final = b"\x01"
EMPTY_PREFIX: Final = b"\x02"

PROOF_VERSION: Final = 1
"""``version`` member of the wire form of an inclusion proof."""

_ACCOUNT_RE: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_PROOF_KEYS: Final = frozenset({"version", "asset", "position", "depth", "quantity", "siblings"})
_SIBLING_KEYS: Final = frozenset({"hash", "sum"})

_T = TypeVar("_T")

_DENSE_GAP: Final = 1024
"""Storage detail, not protocol. Each level keeps a prefix of its nodes in plain lists (fast to
build and to update) and the nodes far past it in a dict. Empty padding slots in the lists stay
below the number of nodes written into them plus this constant, and one write pads at most this
many, so dense trees (positions 0..n-1, with holes) get list speed while a lone leaf at position
2**47 costs one dict entry per level instead of 2**47 list slots."""


# --- validation of inputs -----------------------------------------------------------------------


def validate_account(account: object) -> str:
    """Account identifiers are 1-128 ASCII characters from ``A-Z a-z 0-9 . _ : @ -``."""
    if not isinstance(account, str) or not _ACCOUNT_RE.fullmatch(account):
        raise DecodeError(
            f"account {str(account)[:32]!r} must be 1-{ACCOUNT_MAX_CHARS} characters of "
            "[A-Za-z0-9._:@-]"
        )
    return account


def _check_bytes(value: object, *, what: str, length: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        shown = len(value) if isinstance(value, bytes) else type(value).__name__
        raise DecodeError(f"{what} must be {length} bytes, got {shown}")
    return value


def _check_int(value: object, *, what: str, limit: int) -> int:
    """An int in ``[0, limit)``; bool is not an int here, and a float is never accepted."""
    if isinstance(value, float):
        raise FloatRejected(f"{what}: float {value!r} is not accepted; send an integer")
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= value < limit:
        raise DecodeError(f"{what} {value} not in [0, {limit})")
    return value


def _check_position(value: object) -> int:
    return _check_int(value, what="position", limit=POSITION_LIMIT)


def _check_depth(value: object) -> int:
    return _check_int(value, what="depth", limit=MAX_DEPTH + 1)


def _asset_tag(asset: str) -> bytes:
    """``u8(len(asset)) || asset``, the asset's part of a leaf hash input."""
    code = validate_asset_code(asset).encode("ascii")
    return len(code).to_bytes(1, "big") + code


# --- the hash functions -------------------------------------------------------------------------


def compute_account_commitment(*, account: str, salt: bytes) -> bytes:
    """``H("mcb/account/v1" || 0x00 || salt || u16be(len(account)) || account)``.

    Keyed by the per-account salt, so a sibling hash in someone else's proof reveals nothing about
    which account it belongs to."""
    encoded = validate_account(account).encode("ascii")
    _check_bytes(salt, what="salt", length=SALT_SIZE)
    return sha256(
        b"".join(
            (
                ACCOUNT_DOMAIN,
                b"\x00",
                salt,
                len(encoded).to_bytes(ACCOUNT_LENGTH_SIZE, "big"),
                encoded,
            )
        )
    ).digest()


def _leaf_digest(position: int, commitment: bytes, tag: bytes, quantity: int) -> bytes:
    # Unchecked: callers validated every argument (a Leaf, an InclusionProof, or the public
    # compute_leaf_hash below).
    return sha256(
        b"".join(
            (
                LEAF_PREFIX,
                position.to_bytes(POSITION_SIZE, "big"),
                commitment,
                tag,
                quantity.to_bytes(SUM_SIZE, "big"),
            )
        )
    ).digest()


def _node_digest(left_hash: bytes, left_sum: int, right_hash: bytes, right_sum: int) -> bytes:
    # Unchecked: callers guarantee 32-byte hashes and sums in [0, SUM_LIMIT).
    return sha256(
        b"".join(
            (
                NODE_PREFIX,
                left_hash,
                left_sum.to_bytes(SUM_SIZE, "big"),
                right_hash,
                right_sum.to_bytes(SUM_SIZE, "big"),
            )
        )
    ).digest()


def compute_leaf_hash(*, position: int, commitment: bytes, asset: str, quantity: int) -> bytes:
    """``H(0x00 || u64be(position) || commitment || u8(len(asset)) || asset ||
    u128be(quantity))``."""
    return _leaf_digest(
        _check_position(position),
        _check_bytes(commitment, what="commitment", length=HASH_SIZE),
        _asset_tag(asset),
        check_units(quantity),
    )


def compute_node(
    *, left_hash: bytes, left_sum: int, right_hash: bytes, right_sum: int
) -> tuple[bytes, int]:
    """The parent of two nodes: ``(H(0x01 || lh || u128be(ls) || rh || u128be(rs)), ls + rs)``.

    Raises :class:`SumOverflow` if ``ls + rs`` does not fit in 128 bits."""
    _check_bytes(left_hash, what="left hash", length=HASH_SIZE)
    _check_bytes(right_hash, what="right hash", length=HASH_SIZE)
    check_units(left_sum, what="left sum")
    check_units(right_sum, what="right sum")
    total = left_sum + right_sum
    if total >= SUM_LIMIT:
        raise SumOverflow(f"node sum {left_sum} + {right_sum} does not fit in 128 bits")
    return _node_digest(left_hash, left_sum, right_hash, right_sum), total


def _compute_empty_hashes() -> tuple[bytes, ...]:
    hashes = [sha256(EMPTY_PREFIX).digest()]
    for _ in range(MAX_DEPTH):
        below = hashes[-1]
        hashes.append(_node_digest(below, 0, below, 0))
    return tuple(hashes)


EMPTY_HASHES: Final[tuple[bytes, ...]] = _compute_empty_hashes()
"""``EMPTY_HASHES[h]`` is the hash of an empty subtree of height h (its sum is 0):
``E0 = H(0x02)`` and ``E(h+1) = node(E(h), 0, E(h), 0)``."""


# --- leaves -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leaf:
    """One account's holding of the tree's asset, at the position the custodian assigned to it.

    The asset is a property of the tree, not of the leaf. A quantity of 0 is still a leaf (the
    account is present with nothing pledged), which is different from an empty slot."""

    position: int
    commitment: bytes
    quantity: int

    def __post_init__(self) -> None:
        _check_position(self.position)
        _check_bytes(self.commitment, what="commitment", length=HASH_SIZE)
        check_units(self.quantity)


def _check_leaves(items: list[Leaf], *, what: str) -> None:
    # Exact type: a subclass could override __post_init__ and smuggle in unchecked values.
    if items and set(map(type, items)) != {Leaf}:
        raise DecodeError(f"{what} must all be Leaf objects")


# --- the tree -----------------------------------------------------------------------------------


class _Level:
    """The nodes of one height of a tree: a dense prefix in two parallel lists (index i holds the
    node at index i, padding slots hold the empty node) and any nodes past it in a dict. A node
    that is in neither is the empty subtree of this height."""

    __slots__ = ("empty", "empty_node", "hashes", "padding", "sparse", "sums")

    def __init__(self, height: int) -> None:
        self.empty = EMPTY_HASHES[height]
        self.empty_node = (self.empty, 0)
        self.hashes: list[bytes] = []
        self.sums: list[int] = []
        # Slots appended to the lists only to reach a later index. Kept at most _DENSE_GAP above
        # the number of slots appended with a value, so the lists stay O(nodes ever written).
        self.padding = 0
        # Invariant: every key is > len(self.hashes) (the slot just past the lists is never here),
        # and no value is the empty node.
        self.sparse: dict[int, tuple[bytes, int]] = {}

    def get(self, index: int) -> tuple[bytes, int]:
        if index < len(self.hashes):
            return self.hashes[index], self.sums[index]
        return self.sparse.get(index, self.empty_node)

    def put(self, index: int, digest: bytes, total: int) -> None:
        hashes, sums, sparse = self.hashes, self.sums, self.sparse
        size = len(hashes)
        if index < size:
            hashes[index] = digest
            sums[index] = total
            return
        gap = index - size
        if gap > _DENSE_GAP or 2 * self.padding + gap > size + 1 + _DENSE_GAP:
            if total == 0 and digest == self.empty:
                sparse.pop(index, None)
            else:
                sparse[index] = (digest, total)
            return
        # Grow the lists up to ``index``, pulling in sparse nodes that now fall inside them.
        for slot in range(size, index):
            node = sparse.pop(slot, None)
            if node is None:
                node = self.empty_node
                self.padding += 1
            hashes.append(node[0])
            sums.append(node[1])
        sparse.pop(index, None)
        hashes.append(digest)
        sums.append(total)
        size = index + 1
        while size in sparse:
            node = sparse.pop(size)
            hashes.append(node[0])
            sums.append(node[1])
            size += 1


def _parent_level(child: _Level, height: int) -> _Level:
    """All nodes of height ``height + 1`` computed from the complete level ``child``."""
    parent = _Level(height + 1)
    parent.padding = child.padding // 2
    hashes, sums = child.hashes, child.sums
    prefix, sum_bytes = NODE_PREFIX, SUM_SIZE
    # The hot loop of a build: one list comprehension per level, hashing pairs of the dense
    # prefix. With an odd number of nodes the last one has no listed partner; zip stops before it
    # and it is paired with the empty node below.
    parent.hashes = [
        sha256(
            b"".join((prefix, lh, ls.to_bytes(sum_bytes, "big"), rh, rs.to_bytes(sum_bytes, "big")))
        ).digest()
        for lh, ls, rh, rs in zip(hashes[0::2], sums[0::2], hashes[1::2], sums[1::2], strict=False)
    ]
    parent.sums = list(map(add, sums[0::2], sums[1::2]))
    if len(hashes) % 2:
        # The right sibling of the last listed node is the slot just past the lists, which the
        # _Level invariant says is empty.
        parent.hashes.append(_node_digest(hashes[-1], sums[-1], child.empty, 0))
        parent.sums.append(sums[-1])
    for index in sorted({i >> 1 for i in child.sparse}):
        left_hash, left_sum = child.get(2 * index)
        right_hash, right_sum = child.get(2 * index + 1)
        parent.put(
            index,
            _node_digest(left_hash, left_sum, right_hash, right_sum),
            left_sum + right_sum,
        )
    return parent


def _first_sparse_index(positions: list[int]) -> int:
    """How many of the sorted ``positions`` go to the lists of level 0 (the rest go to its dict):
    the largest k such that positions[0..k-1] fit in lists of at most 2k + _DENSE_GAP slots."""
    count = len(positions)
    if not count or positions[-1] + 1 <= 2 * count + _DENSE_GAP:
        return count
    return max(
        (k for k, position in enumerate(positions, 1) if position + 1 <= 2 * k + _DENSE_GAP),
        default=0,
    )


def _leaf_level(positions: list[int], digests: list[bytes], quantities: list[int]) -> _Level:
    level = _Level(0)
    cut = _first_sparse_index(positions)
    if cut and positions[cut - 1] == cut - 1:
        # Positions 0..cut-1 without a hole: the lists are the leaves themselves.
        level.hashes = digests[:cut] if cut < len(digests) else digests
        level.sums = quantities[:cut] if cut < len(quantities) else quantities
    elif cut:
        size = positions[cut - 1] + 1
        level.hashes = [level.empty] * size
        level.sums = [0] * size
        level.padding = size - cut
        for position, digest, quantity in zip(
            positions[:cut], digests[:cut], quantities[:cut], strict=True
        ):
            level.hashes[position] = digest
            level.sums[position] = quantity
    level.sparse = dict(
        zip(positions[cut:], zip(digests[cut:], quantities[cut:], strict=True), strict=True)
    )
    return level


class SumTree:
    """A Merkle sum tree of one asset: a perfect binary tree of ``depth`` (2**depth slots) whose
    slot p holds the leaf at position p or is empty.

    Build one with :meth:`build`; ``SumTree(asset)`` is the empty tree of depth 0. The tree keeps
    every node, so :meth:`update` and :meth:`prove` cost O(k * depth) and O(depth). An update
    never makes the tree shallower (clearing the last leaf keeps the depth), because a shape that
    changed under a client's feet would invalidate proofs of leaves that did not move.

    :meth:`TreeUpdate.apply` is the only way a tree changes once built; :meth:`update` is
    :meth:`plan_update` followed by it.

    Not thread-safe: callers that share one tree between threads serialize access to it.
    """

    __slots__ = ("_asset", "_depth", "_leaves", "_levels", "_owners", "_tag", "_version")

    def __init__(self, asset: str, *, depth: int = 0) -> None:
        self._asset = validate_asset_code(asset)
        self._tag = _asset_tag(asset)
        self._depth = _check_depth(depth)
        self._levels = [_Level(height) for height in range(self._depth + 1)]
        self._leaves: dict[int, Leaf] = {}
        # commitment -> position: one account, one leaf.
        self._owners: dict[bytes, int] = {}
        # Counts applied updates, so that a TreeUpdate can tell whether the tree it was computed
        # from is still the tree it would change.
        self._version = 0

    @classmethod
    def build(cls, asset: str, leaves: Iterable[Leaf], *, depth: int | None = None) -> SumTree:
        """The tree of ``leaves`` for ``asset``.

        ``depth`` defaults to the smallest d with 2**d > the largest position (0 for no leaves).
        Raises DuplicateLeaf if two leaves share a position or a commitment, SumOverflow if the
        total does not fit in 128 bits, DecodeError if ``depth`` is too small for a position.
        """
        tree = cls(asset)
        items = list(leaves)
        _check_leaves(items, what="leaves")
        positions = [leaf.position for leaf in items]
        by_position = dict(zip(positions, items, strict=True))
        if len(by_position) != len(items):
            raise DuplicateLeaf(f"{_first_duplicate(positions)} is the position of two leaves")
        commitments = list(map(attrgetter("commitment"), items))
        owners = dict(zip(commitments, positions, strict=True))
        if len(owners) != len(items):
            duplicate = _first_duplicate(commitments)
            raise DuplicateLeaf(f"commitment {duplicate.hex()[:16]}... is used by two leaves")
        quantities = [leaf.quantity for leaf in items]
        total = sum(quantities)
        if total >= SUM_LIMIT:
            raise SumOverflow(f"the leaves sum to {total}, which does not fit in 128 bits")
        needed = max(positions).bit_length() if positions else 0
        if depth is None:
            depth = needed
        elif _check_depth(depth) < needed:
            raise DecodeError(f"depth {depth} has no slot for position {max(positions)}")

        order = sorted(by_position)
        if order != positions:
            items = [by_position[position] for position in order]
            quantities = [leaf.quantity for leaf in items]
        tag, prefix, position_bytes, sum_bytes = tree._tag, LEAF_PREFIX, POSITION_SIZE, SUM_SIZE
        # The other hot loop of a build: one hash per leaf.
        digests = [
            sha256(
                b"".join(
                    (
                        prefix,
                        leaf.position.to_bytes(position_bytes, "big"),
                        leaf.commitment,
                        tag,
                        leaf.quantity.to_bytes(sum_bytes, "big"),
                    )
                )
            ).digest()
            for leaf in items
        ]
        levels = [_leaf_level(order, digests, quantities)]
        for height in range(depth):
            levels.append(_parent_level(levels[height], height))
        tree._depth = depth
        tree._levels = levels
        tree._leaves = by_position
        tree._owners = owners
        if tree.total != total:
            raise InvariantViolation(f"root sum {tree.total} differs from the leaf total {total}")
        return tree

    # --- reading ---

    @property
    def asset(self) -> str:
        return self._asset

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def root(self) -> bytes:
        return self._levels[self._depth].get(0)[0]

    @property
    def total(self) -> int:
        return self._levels[self._depth].get(0)[1]

    @property
    def count(self) -> int:
        """Number of leaves (slots that are not empty; a leaf of quantity 0 counts)."""
        return len(self._leaves)

    def leaf(self, position: int) -> Leaf | None:
        return self._leaves.get(_check_position(position))

    def iter_leaves(self) -> Iterator[Leaf]:
        """Every leaf, by ascending position."""
        for position in sorted(self._leaves):
            yield self._leaves[position]

    def prove(self, position: int) -> InclusionProof:
        """The inclusion proof of the leaf at ``position``. Raises KeyError if the slot is empty."""
        leaf = self._leaves.get(_check_position(position))
        if leaf is None:
            raise KeyError(f"no leaf at position {position}")
        siblings = tuple(
            self._levels[height].get((position >> height) ^ 1) for height in range(self._depth)
        )
        return InclusionProof(
            asset=self._asset,
            position=position,
            depth=self._depth,
            quantity=leaf.quantity,
            siblings=siblings,
        )

    def verify_head(self, *, root: bytes, total: int, count: int) -> None:
        """Raise RootMismatch or SumMismatch unless this tree has exactly this root, total and
        leaf count. (The count is not committed by the root; it is checked here because only a
        receiver that holds the leaves can check it.)"""
        _check_bytes(root, what="root", length=HASH_SIZE)
        check_units(total, what="total")
        _check_int(count, what="count", limit=POSITION_LIMIT + 1)
        _compare_head(
            asset=self._asset,
            root=self.root,
            total=self.total,
            count=self.count,
            expect_root=root,
            expect_total=total,
            expect_count=count,
        )

    # --- changing ---

    def update(
        self,
        *,
        set_leaves: Iterable[Leaf] = (),
        clear_positions: Iterable[int] = (),
        expect_root: bytes | None = None,
        expect_total: int | None = None,
        expect_count: int | None = None,
    ) -> None:
        """``plan_update(...).apply()``: check the change and, only if every check passes, make
        it. On any error the tree is left as it was."""
        self.plan_update(
            set_leaves=set_leaves,
            clear_positions=clear_positions,
            expect_root=expect_root,
            expect_total=expect_total,
            expect_count=expect_count,
        ).apply()

    def plan_update(
        self,
        *,
        set_leaves: Iterable[Leaf] = (),
        clear_positions: Iterable[int] = (),
        expect_root: bytes | None = None,
        expect_total: int | None = None,
        expect_count: int | None = None,
    ) -> TreeUpdate:
        """Check the change that puts ``set_leaves`` into their slots (adding or replacing) and
        empties the slots at ``clear_positions``, and compute every node it changes, in
        O(k * depth) hashes for k changes. The tree itself is not changed: the returned
        :class:`TreeUpdate` tells the new root, total, count and depth, and its
        :meth:`~TreeUpdate.apply` makes the change.

        The depth grows to the smallest one that has a slot for every set position; it never
        shrinks. If ``expect_root``/``expect_total``/``expect_count`` are given, the new tree must
        match them (RootMismatch / SumMismatch), which is how a receiver checks a delta.

        Raises DuplicateLeaf (a position set twice, set and cleared, or a commitment that would be
        used by two leaves), DecodeError (a cleared slot that holds no leaf, malformed input),
        SumOverflow (the new total does not fit in 128 bits).
        """
        new_leaves = list(set_leaves)
        _check_leaves(new_leaves, what="set_leaves")
        clears = [_check_position(position) for position in clear_positions]
        if expect_root is not None:
            _check_bytes(expect_root, what="expected root", length=HASH_SIZE)
        if expect_total is not None:
            check_units(expect_total, what="expected total")
        if expect_count is not None:
            _check_int(expect_count, what="expected count", limit=POSITION_LIMIT + 1)
        released, new_total = self._check_changes(new_leaves, clears)
        depth = max(
            self._depth, max((leaf.position for leaf in new_leaves), default=0).bit_length()
        )

        levels = self._levels + [_Level(height) for height in range(self._depth + 1, depth + 1)]
        overlays = self._compute_overlays(levels, new_leaves, clears)
        root, root_total = overlays[depth].get(0) or levels[depth].get(0)
        if root_total != new_total:
            raise InvariantViolation(f"root sum {root_total} differs from the total {new_total}")
        count = len(self._leaves) - len(released) + len(new_leaves)
        _compare_head(
            asset=self._asset,
            root=root,
            total=new_total,
            count=count,
            expect_root=expect_root,
            expect_total=expect_total,
            expect_count=expect_count,
        )
        return TreeUpdate(
            _Plan(
                tree=self,
                version=self._version,
                released=frozenset(released),
                new_leaves=tuple(new_leaves),
                levels=tuple(levels),
                overlays=tuple(overlays),
                root=root,
                total=new_total,
                count=count,
                depth=depth,
            )
        )

    def _commit(self, plan: _Plan) -> None:
        """Make the change ``plan`` describes. Nothing here can fail once the version matched."""
        if plan.version != self._version:
            raise InvariantViolation(
                f"{self._asset}: the tree changed since this update was planned "
                f"(version {plan.version}, now {self._version}); plan it again"
            )
        leaves, owners = self._leaves, self._owners
        for position in plan.released:
            del owners[leaves.pop(position).commitment]
        for leaf in plan.new_leaves:
            leaves[leaf.position] = leaf
            owners[leaf.commitment] = leaf.position
        for level, overlay in zip(plan.levels, plan.overlays, strict=True):
            hashes, sums, size = level.hashes, level.sums, len(level.hashes)
            beyond = []
            for index, (digest, total) in overlay.items():
                if index < size:
                    hashes[index] = digest
                    sums[index] = total
                else:
                    beyond.append(index)
            # In ascending order, so that a level's lists grow by appending.
            for index in sorted(beyond):
                level.put(index, *overlay[index])
        self._levels = list(plan.levels)
        self._depth = plan.depth
        self._version += 1

    def _check_changes(self, new_leaves: list[Leaf], clears: list[int]) -> tuple[set[int], int]:
        """Reject an inconsistent change set; return the positions whose current leaf goes away
        (cleared or replaced) and the new total."""
        set_positions = {leaf.position for leaf in new_leaves}
        if len(set_positions) != len(new_leaves):
            duplicate = _first_duplicate([leaf.position for leaf in new_leaves])
            raise DuplicateLeaf(f"position {duplicate} is set twice in one update")
        cleared = set(clears)
        if len(cleared) != len(clears):
            raise DuplicateLeaf(f"position {_first_duplicate(clears)} is cleared twice")
        if both := cleared & set_positions:
            raise DuplicateLeaf(f"position {min(both)} is both set and cleared")
        leaves = self._leaves
        # Set operations against leaves.keys() would copy all n keys; look up the k changes.
        if missing := [position for position in clears if position not in leaves]:
            raise DecodeError(f"cannot clear position {min(missing)}: it holds no leaf")
        released = cleared | {position for position in set_positions if position in leaves}
        claimed: dict[bytes, int] = {}
        for leaf in new_leaves:
            if leaf.commitment in claimed:
                raise DuplicateLeaf(
                    f"positions {claimed[leaf.commitment]} and {leaf.position} share a commitment"
                )
            claimed[leaf.commitment] = leaf.position
            owner = self._owners.get(leaf.commitment)
            if owner is not None and owner not in released:
                raise DuplicateLeaf(
                    f"the commitment of position {leaf.position} is already at position {owner}"
                )
        new_total = (
            self.total
            - sum(leaves[position].quantity for position in released)
            + sum(leaf.quantity for leaf in new_leaves)
        )
        if new_total >= SUM_LIMIT:
            raise SumOverflow(f"the update makes the total {new_total}, beyond 128 bits")
        return released, new_total

    def _compute_overlays(
        self, levels: list[_Level], new_leaves: list[Leaf], clears: list[int]
    ) -> list[dict[int, tuple[bytes, int]]]:
        """The new nodes of every height (index -> (hash, sum)), reading unchanged nodes from
        ``levels`` and writing nothing."""
        old_depth, tag = self._depth, self._tag
        changed: dict[int, tuple[bytes, int]] = dict.fromkeys(clears, levels[0].empty_node)
        for leaf in new_leaves:
            changed[leaf.position] = (
                _leaf_digest(leaf.position, leaf.commitment, tag, leaf.quantity),
                leaf.quantity,
            )
        overlays = [changed]
        prefix, sum_bytes = NODE_PREFIX, SUM_SIZE
        for height in range(len(levels) - 1):
            parents = {index >> 1 for index in changed}
            if height >= old_depth:
                # A level the old tree did not have: its node 0 has the old root below it.
                parents.add(0)
            level = levels[height]
            hashes, sums, size = level.hashes, level.sums, len(level.hashes)
            find_changed, find_stored = changed.get, level.get
            above: dict[int, tuple[bytes, int]] = {}
            # The hot loop of an update, written out because it runs k * depth times.
            for index in parents:
                left = 2 * index
                if left + 1 < size:
                    left_hash, left_sum = hashes[left], sums[left]
                    right_hash, right_sum = hashes[left + 1], sums[left + 1]
                else:
                    left_hash, left_sum = find_stored(left)
                    right_hash, right_sum = find_stored(left + 1)
                node = find_changed(left)
                if node is not None:
                    left_hash, left_sum = node
                node = find_changed(left + 1)
                if node is not None:
                    right_hash, right_sum = node
                digest = sha256(
                    b"".join(
                        (
                            prefix,
                            left_hash,
                            left_sum.to_bytes(sum_bytes, "big"),
                            right_hash,
                            right_sum.to_bytes(sum_bytes, "big"),
                        )
                    )
                ).digest()
                above[index] = (digest, left_sum + right_sum)
            overlays.append(above)
            changed = above
        return overlays


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything :meth:`SumTree.plan_update` worked out: the tree's version it was computed from,
    the positions whose leaf goes away, the leaves that come in, every level (the tree's own ones
    and any new ones above them) and the new nodes of each, by index."""

    tree: SumTree
    version: int
    released: frozenset[int]
    new_leaves: tuple[Leaf, ...]
    levels: tuple[_Level, ...]
    overlays: tuple[dict[int, tuple[bytes, int]], ...]
    root: bytes
    total: int
    count: int
    depth: int


class TreeUpdate:
    """A change of one :class:`SumTree` that has been checked in full and whose new nodes are all
    computed, but that has not been made yet. Made by :meth:`SumTree.plan_update`.

    ``root``, ``total``, ``count`` and ``depth`` are what the tree will have after :meth:`apply`.
    This is what lets a receiver check a delta that spans several assets completely, every tree
    and every expected head, before it changes any tree: plan all, then apply all.

    A plan is tied to the state of its tree when it was made. :meth:`apply` raises
    InvariantViolation if the tree changed since (another update was applied to it), and applies
    at most once.
    """

    __slots__ = ("_applied", "_plan")

    def __init__(self, plan: _Plan) -> None:
        self._plan = plan
        self._applied = False

    @property
    def asset(self) -> str:
        return self._plan.tree.asset

    @property
    def root(self) -> bytes:
        return self._plan.root

    @property
    def total(self) -> int:
        return self._plan.total

    @property
    def count(self) -> int:
        return self._plan.count

    @property
    def depth(self) -> int:
        return self._plan.depth

    @property
    def applied(self) -> bool:
        return self._applied

    def apply(self) -> None:
        """Change the tree as planned. Raises InvariantViolation, and changes nothing, if this
        update was applied already or the tree was changed since it was planned."""
        if self._applied:
            raise InvariantViolation(f"{self.asset}: this tree update was applied already")
        self._plan.tree._commit(self._plan)
        self._applied = True


def _compare_head(
    *,
    asset: str,
    root: bytes,
    total: int,
    count: int,
    expect_root: bytes | None,
    expect_total: int | None,
    expect_count: int | None,
) -> None:
    if expect_root is not None and root != expect_root:
        raise RootMismatch(
            f"{asset}: expected root {expect_root.hex()[:16]}..., the leaves give {root.hex()[:16]}"
        )
    if expect_total is not None and total != expect_total:
        raise SumMismatch(f"{asset}: expected total {expect_total}, the leaves sum to {total}")
    if expect_count is not None and count != expect_count:
        raise SumMismatch(f"{asset}: expected {expect_count} leaves, the tree has {count}")


def _first_duplicate(values: list[_T]) -> _T:
    seen: set[_T] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    raise InvariantViolation("no duplicate found among values that were not unique")


# --- inclusion proofs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """The path from one leaf to the root: the leaf's asset, position and quantity, the tree
    depth, and the (hash, sum) of the sibling at every height from the leaves upward.

    The account and its salt are not part of the proof; the client supplies them to
    :func:`verify_inclusion`, which recomputes the commitment."""

    asset: str
    position: int
    depth: int
    quantity: int
    siblings: tuple[tuple[bytes, int], ...]

    def __post_init__(self) -> None:
        validate_asset_code(self.asset)
        _check_position(self.position)
        _check_depth(self.depth)
        if self.position >> self.depth:
            raise DecodeError(
                f"position {self.position} has no slot in a tree of depth {self.depth}"
            )
        check_units(self.quantity)
        if not isinstance(self.siblings, tuple) or len(self.siblings) != self.depth:
            raise DecodeError(f"a proof of depth {self.depth} has exactly {self.depth} siblings")
        for height, sibling in enumerate(self.siblings):
            if not isinstance(sibling, tuple) or len(sibling) != 2:
                raise DecodeError(f"sibling {height} must be a (hash, sum) pair")
            _check_bytes(sibling[0], what=f"sibling {height} hash", length=HASH_SIZE)
            check_units(sibling[1], what=f"sibling {height} sum")

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready form: hashes in lowercase hex, quantities and sums as decimal strings."""
        return {
            "version": PROOF_VERSION,
            "asset": self.asset,
            "position": self.position,
            "depth": self.depth,
            "quantity": format_units(self.quantity),
            "siblings": [
                {"hash": digest.hex(), "sum": format_units(total, what=f"sibling {height} sum")}
                for height, (digest, total) in enumerate(self.siblings)
            ],
        }

    @classmethod
    def from_wire(cls, obj: object) -> InclusionProof:
        """Parse the wire form strictly: exactly the known members, exact types, canonical
        decimal strings, lowercase hex of the right length; nothing is coerced."""
        members = _require_members(obj, keys=_PROOF_KEYS, what="inclusion proof")
        version = members["version"]
        if type(version) is not int or version != PROOF_VERSION:
            raise DecodeError(f"inclusion proof version {str(version)[:16]!r} is not supported")
        asset = validate_asset_code(members["asset"])
        position = _check_position(members["position"])
        depth = _check_depth(members["depth"])
        if position >> depth:
            raise DecodeError(f"position {position} has no slot in a tree of depth {depth}")
        quantity = parse_units(members["quantity"])
        siblings = members["siblings"]
        if not isinstance(siblings, list):
            raise DecodeError("siblings must be a list")
        # Checked before any sibling is decoded, so an oversized list costs nothing.
        if len(siblings) != depth:
            raise DecodeError(f"a proof of depth {depth} has {len(siblings)} siblings")
        return cls(
            asset=asset,
            position=position,
            depth=depth,
            quantity=quantity,
            siblings=tuple(
                _sibling_from_wire(item, height) for height, item in enumerate(siblings)
            ),
        )


def _require_members(obj: object, *, keys: frozenset[str], what: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise DecodeError(f"{what} must be a JSON object, got {type(obj).__name__}")
    if obj.keys() != keys:
        missing = sorted(keys - obj.keys())
        unknown = sorted(str(key)[:32] for key in obj.keys() - keys)
        raise DecodeError(f"{what}: missing members {missing}, unknown members {unknown}")
    return obj


def _sibling_from_wire(obj: object, height: int) -> tuple[bytes, int]:
    members = _require_members(obj, keys=_SIBLING_KEYS, what=f"sibling {height}")
    digest = parse_hex(members["hash"], length=HASH_SIZE, what=f"sibling {height} hash")
    return digest, parse_units(members["sum"], what=f"sibling {height} sum")


def verify_inclusion(
    proof: InclusionProof, *, account: str, salt: bytes, root: bytes, total: int, depth: int
) -> None:
    """Check that ``account`` (with its ``salt``) holds ``proof.quantity`` of ``proof.asset`` at
    ``proof.position`` in the tree of depth ``depth`` whose root is ``root`` and whose sum is
    ``total``.

    Returns None on success, raises otherwise: DecodeError for malformed arguments, InvalidProof
    if the proof is for a tree of another depth, NegativeSum / SumOverflow if a sibling sum or any
    sum on the path is out of range, InvalidProof if the path does not lead to ``root``,
    SumMismatch if it does but its sum is not ``total``.

    The caller takes ``root``, ``total`` and ``depth`` from the entry for ``proof.asset`` of a
    statement whose signatures it verified; the proof alone says nothing about which statement it
    is for. The depth is compared first, before anything else about the path.
    """
    if not isinstance(proof, InclusionProof):
        raise DecodeError(f"expected an InclusionProof, got {type(proof).__name__}")
    _check_depth(depth)
    if proof.depth != depth:
        raise InvalidProof(f"proof depth {str(proof.depth)[:16]}, tree depth {depth}")
    _check_bytes(root, what="root", length=HASH_SIZE)
    check_units(total, what="total")
    commitment = compute_account_commitment(account=account, salt=salt)
    # The proof validated itself when it was made; check the shape again anyway, because a
    # frozen dataclass can still be altered with object.__setattr__.
    position, siblings = proof.position, proof.siblings
    _check_position(position)
    if not isinstance(siblings, tuple) or len(siblings) != depth or position >> depth:
        raise InvalidProof(f"position {position}, depth {depth} and the siblings disagree")
    digest = _leaf_digest(
        position, commitment, _asset_tag(proof.asset), check_units(proof.quantity)
    )
    current = proof.quantity
    for height, sibling in enumerate(siblings):
        if not isinstance(sibling, tuple) or len(sibling) != 2:
            raise InvalidProof(f"sibling {height} is not a (hash, sum) pair")
        sibling_hash, sibling_sum = sibling
        _check_bytes(sibling_hash, what=f"sibling {height} hash", length=HASH_SIZE)
        check_units(sibling_sum, what=f"sibling {height} sum")
        if (position >> height) & 1:
            digest = _node_digest(sibling_hash, sibling_sum, digest, current)
        else:
            digest = _node_digest(digest, current, sibling_hash, sibling_sum)
        current += sibling_sum
        if current >= SUM_LIMIT:
            raise SumOverflow(f"the sum at height {height + 1} of the path exceeds 128 bits")
    if digest != root:
        raise InvalidProof(
            f"the {proof.asset} path of position {position} does not lead to root {root.hex()[:16]}"
        )
    if current != total:
        raise SumMismatch(f"the {proof.asset} root sums to {current}, not {total}")


def is_valid_inclusion(
    proof: InclusionProof, *, account: str, salt: bytes, root: bytes, total: int, depth: int
) -> bool:
    """:func:`verify_inclusion` as a bool: False for any proof or argument it rejects."""
    try:
        verify_inclusion(proof, account=account, salt=salt, root=root, total=total, depth=depth)
    except CounterpartyError:
        return False
    return True
