"""Merkle sum tree: byte layouts, tree building and updating, inclusion proofs, known attacks.

The reference functions at the top re-derive every hash straight from docs/protocol.md with
``struct`` and ``hashlib``, independently of attestations.merkle, so a bug shared by the module's
build and update paths still shows up as a mismatch with the reference.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attestations.errors import (
    AmountError,
    AttestationError,
    DecodeError,
    DuplicateLeaf,
    FloatRejected,
    InvalidProof,
    InvariantViolation,
    NegativeSum,
    RootMismatch,
    SumMismatch,
    SumOverflow,
)
from attestations.merkle import (
    EMPTY_HASHES,
    MAX_DEPTH,
    POSITION_LIMIT,
    SUM_LIMIT,
    InclusionProof,
    Leaf,
    SumTree,
    TreeUpdate,
    compute_account_commitment,
    compute_leaf_hash,
    compute_node,
    is_valid_inclusion,
    validate_account,
    validate_asset_code,
    verify_inclusion,
)

ASSET = "USDC"
MAX_QUANTITY = 2**120  # 64 leaves of this size still sum below 2**128

# --- reference implementation, from the spec ----------------------------------------------------


def ref_sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_commitment(account: str, salt: bytes) -> bytes:
    raw = account.encode("utf-8")
    return ref_sha(b"mcb/account/v1\x00" + salt + struct.pack(">H", len(raw)) + raw)


def ref_leaf(position: int, commitment: bytes, asset: str, quantity: int) -> bytes:
    code = asset.encode("ascii")
    high, low = divmod(quantity, 2**64)
    return ref_sha(
        b"\x00"
        + struct.pack(">Q", position)
        + commitment
        + struct.pack(">B", len(code))
        + code
        + struct.pack(">QQ", high, low)
    )


def ref_u128(value: int) -> bytes:
    return struct.pack(">QQ", *divmod(value, 2**64))


def ref_node(left: tuple[bytes, int], right: tuple[bytes, int]) -> tuple[bytes, int]:
    digest = ref_sha(b"\x01" + left[0] + ref_u128(left[1]) + right[0] + ref_u128(right[1]))
    return digest, left[1] + right[1]


def ref_empty(height: int) -> bytes:
    digest = ref_sha(b"\x02")
    for _ in range(height):
        digest = ref_node((digest, 0), (digest, 0))[0]
    return digest


REF_EMPTY = [ref_empty(height) for height in range(MAX_DEPTH + 1)]


def ref_root(asset: str, leaves: dict[int, tuple[bytes, int]], depth: int) -> tuple[bytes, int]:
    """Root of ``leaves`` (position -> (commitment, quantity)) by recursion over the definition,
    skipping empty subtrees."""
    positions = sorted(leaves)

    def subtree(height: int, index: int) -> tuple[bytes, int]:
        low, high = index << height, (index + 1) << height
        if bisect.bisect_left(positions, low) == bisect.bisect_left(positions, high):
            return REF_EMPTY[height], 0
        if height == 0:
            commitment, quantity = leaves[index]
            return ref_leaf(index, commitment, asset, quantity), quantity
        return ref_node(subtree(height - 1, 2 * index), subtree(height - 1, 2 * index + 1))

    return subtree(depth, 0)


def commitment_of(tag: int) -> bytes:
    return ref_sha(b"test-commitment-%d" % tag)


def leaves_of(state: dict[int, tuple[bytes, int]]) -> list[Leaf]:
    return [
        Leaf(position, commitment, quantity) for position, (commitment, quantity) in state.items()
    ]


def snapshot(tree: SumTree) -> tuple[Any, ...]:
    return (tree.root, tree.total, tree.count, tree.depth, tuple(tree.iter_leaves()))


# --- strategies ---------------------------------------------------------------------------------

# Dense positions, positions around the list/dict boundary of a level, and positions anywhere.
positions_st = st.one_of(
    st.integers(0, 40),
    st.integers(1000, 3000),
    st.integers(0, POSITION_LIMIT - 1),
)
quantities_st = st.one_of(st.integers(0, 10**6), st.integers(0, MAX_QUANTITY))
accounts_st = st.from_regex(r"[A-Za-z0-9._:@-]{1,24}", fullmatch=True)
salts_st = st.binary(min_size=32, max_size=32)
assets_st = st.from_regex(r"[A-Z][A-Z0-9]{1,15}", fullmatch=True)


@st.composite
def holdings(draw: st.DrawFn, *, min_size: int = 0, max_size: int = 24) -> dict[int, int]:
    """position -> quantity."""
    return draw(st.dictionaries(positions_st, quantities_st, min_size=min_size, max_size=max_size))


@st.composite
def client_trees(draw: st.DrawFn) -> tuple[SumTree, dict[int, tuple[str, bytes, int]]]:
    """A tree with at least two leaves whose accounts and salts are known:
    position -> (account, salt, quantity)."""
    asset = draw(assets_st)
    amounts = draw(holdings(min_size=2, max_size=16))
    clients = {
        position: (f"client-{number}", draw(salts_st), quantity)
        for number, (position, quantity) in enumerate(amounts.items())
    }
    extra = draw(st.integers(0, 3))
    depth = min(max(amounts).bit_length() + extra, MAX_DEPTH)
    tree = SumTree.build(
        asset,
        [
            Leaf(position, compute_account_commitment(account=account, salt=salt), quantity)
            for position, (account, salt, quantity) in clients.items()
        ],
        depth=depth,
    )
    return tree, clients


# --- known answers (also printed in docs/protocol.md) -------------------------------------------

ALICE_SALT = bytes(range(32))
ALICE_COMMITMENT = "93d94554f431b79afe30ef640e4cacec8ef6c903477ee481a8a6f872026bd000"
PINNED_TWO_LEAF_ROOT = "fd49ab3916534ba1035e1fb537be323776684f51defe3a4c5ed7118b88def8f9"


def test_empty_hashes_follow_the_definition() -> None:
    assert len(EMPTY_HASHES) == MAX_DEPTH + 1
    assert list(EMPTY_HASHES) == REF_EMPTY
    assert EMPTY_HASHES[0].hex() == (
        "dbc1b4c900ffe48d575b5da5c638040125f65db0fe3e24494b76ea986457d986"
    )


def test_known_answer_vectors() -> None:
    commitment = compute_account_commitment(account="alice", salt=ALICE_SALT)
    assert commitment == ref_commitment("alice", ALICE_SALT)
    assert commitment.hex() == ALICE_COMMITMENT
    bob = compute_account_commitment(account="bob@desk-1", salt=bytes(32))
    tree = SumTree.build(ASSET, [Leaf(0, commitment, 1_500_000), Leaf(2, bob, 250)])
    assert tree.depth == 2
    assert tree.total == 1_500_250
    assert (tree.root, tree.total) == ref_root(
        ASSET, {0: (commitment, 1_500_000), 2: (bob, 250)}, 2
    )
    assert compute_leaf_hash(
        position=0, commitment=commitment, asset=ASSET, quantity=1_500_000
    ) == ref_leaf(0, commitment, ASSET, 1_500_000)
    assert tree.root.hex() == PINNED_TWO_LEAF_ROOT


# --- building -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(asset=assets_st, amounts=holdings(), extra_depth=st.integers(0, 2))
def test_build_matches_the_reference(asset: str, amounts: dict[int, int], extra_depth: int) -> None:
    state = {
        position: (commitment_of(position), quantity) for position, quantity in amounts.items()
    }
    needed = max(amounts, default=0).bit_length()
    depth = min(needed + extra_depth, MAX_DEPTH)
    tree = SumTree.build(asset, leaves_of(state), depth=depth)
    assert (tree.root, tree.total) == ref_root(asset, state, depth)
    assert tree.total == sum(amounts.values())
    assert tree.count == len(amounts)
    assert SumTree.build(asset, leaves_of(state)).depth == needed
    assert [leaf.position for leaf in tree.iter_leaves()] == sorted(amounts)


def test_leaf_order_does_not_matter() -> None:
    state = {position: (commitment_of(position), position * 3) for position in range(0, 90, 3)}
    forward = SumTree.build(ASSET, leaves_of(state))
    backward = SumTree.build(ASSET, reversed(leaves_of(state)))
    assert forward.root == backward.root


def test_empty_tree() -> None:
    tree = SumTree.build(ASSET, [])
    assert (tree.depth, tree.total, tree.count, tree.root) == (0, 0, 0, REF_EMPTY[0])
    assert SumTree(ASSET).root == REF_EMPTY[0]
    assert SumTree.build(ASSET, [], depth=5).root == REF_EMPTY[5]


def test_a_zero_quantity_leaf_is_not_an_empty_slot() -> None:
    tree = SumTree.build(ASSET, [Leaf(0, commitment_of(0), 0)])
    assert tree.count == 1
    assert tree.total == 0
    assert tree.root != EMPTY_HASHES[0]


def test_default_depth_is_the_smallest_that_fits() -> None:
    for position, depth in [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (2**47, 48)]:
        tree = SumTree.build(ASSET, [Leaf(position, commitment_of(1), 1)])
        assert tree.depth == depth


def test_depth_too_small_or_too_large_is_rejected() -> None:
    with pytest.raises(DecodeError):
        SumTree.build(ASSET, [Leaf(4, commitment_of(1), 1)], depth=2)
    with pytest.raises(DecodeError):
        SumTree.build(ASSET, [], depth=MAX_DEPTH + 1)
    with pytest.raises(DecodeError):
        SumTree.build(ASSET, [], depth=True)


def test_a_dense_prefix_and_far_leaves_mix() -> None:
    # Many leaves in the lists, some in the dicts, one at the last slot of the largest tree.
    state = {position: (commitment_of(position), position + 1) for position in range(2500)}
    for position in (5000, 5001, 2**30, 2**30 + 1, POSITION_LIMIT - 1):
        state[position] = (commitment_of(position), 7)
    for hole in range(100, 400):
        del state[hole]
    tree = SumTree.build(ASSET, leaves_of(state))
    assert (tree.root, tree.total) == ref_root(ASSET, state, MAX_DEPTH)


def test_non_leaf_items_are_rejected() -> None:
    with pytest.raises(DecodeError):
        SumTree.build(ASSET, [(0, commitment_of(0), 1)])  # type: ignore[list-item]
    with pytest.raises(DecodeError):
        SumTree(ASSET).update(set_leaves=["leaf"])  # type: ignore[list-item]


# --- leaves and inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "commitment", "quantity", "error"),
    [
        (-1, commitment_of(0), 1, DecodeError),
        (POSITION_LIMIT, commitment_of(0), 1, DecodeError),
        (True, commitment_of(0), 1, DecodeError),
        (1.0, commitment_of(0), 1, FloatRejected),
        ("1", commitment_of(0), 1, DecodeError),
        (0, commitment_of(0)[:31], 1, DecodeError),
        (0, commitment_of(0) + b"\x00", 1, DecodeError),
        (0, bytearray(commitment_of(0)), 1, DecodeError),
        (0, commitment_of(0).hex(), 1, DecodeError),
        (0, commitment_of(0), -1, NegativeSum),
        (0, commitment_of(0), SUM_LIMIT, SumOverflow),
        (0, commitment_of(0), 1.0, FloatRejected),
        (0, commitment_of(0), True, AmountError),
        (0, commitment_of(0), "1", AmountError),
    ],
)
def test_invalid_leaves_are_rejected(
    position: Any, commitment: Any, quantity: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        Leaf(position, commitment, quantity)


@pytest.mark.parametrize(
    "account",
    ["", "a" * 129, "alice\n", "al ice", "álice", "alice/1", "a\x00b", 5, None, b"alice"],
)
def test_invalid_accounts_are_rejected(account: Any) -> None:
    with pytest.raises(DecodeError):
        validate_account(account)
    with pytest.raises(DecodeError):
        compute_account_commitment(account=account, salt=ALICE_SALT)


def test_accounts_at_the_limits_are_accepted() -> None:
    longest = "Az09._:@-" * 14 + "xy"
    assert len(longest) == 128
    assert compute_account_commitment(account=longest, salt=ALICE_SALT) == ref_commitment(
        longest, ALICE_SALT
    )
    assert validate_account("x") == "x"


@pytest.mark.parametrize("salt", [bytes(31), bytes(33), bytearray(32), "00" * 32, None])
def test_invalid_salts_are_rejected(salt: Any) -> None:
    with pytest.raises(DecodeError):
        compute_account_commitment(account="alice", salt=salt)


@pytest.mark.parametrize(
    "code", ["usdc", "U", "USDC_", "1BTC", "A" * 17, "ÜSD", "USDC\n", "", 5, None]
)
def test_invalid_asset_codes_are_rejected(code: Any) -> None:
    with pytest.raises(DecodeError):
        validate_asset_code(code)
    with pytest.raises(DecodeError):
        SumTree(code)


def test_compute_node_checks_its_inputs() -> None:
    left, right = commitment_of(1), commitment_of(2)
    assert compute_node(left_hash=left, left_sum=3, right_hash=right, right_sum=4) == ref_node(
        (left, 3), (right, 4)
    )
    with pytest.raises(SumOverflow):
        compute_node(left_hash=left, left_sum=2**127, right_hash=right, right_sum=2**127)
    with pytest.raises(NegativeSum):
        compute_node(left_hash=left, left_sum=-1, right_hash=right, right_sum=1)
    with pytest.raises(DecodeError):
        compute_node(left_hash=left[:31], left_sum=1, right_hash=right, right_sum=1)


# --- inclusion proofs ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(case=client_trees())
def test_every_inclusion_proof_verifies(
    case: tuple[SumTree, dict[int, tuple[str, bytes, int]]],
) -> None:
    tree, clients = case
    for position, (account, salt, quantity) in clients.items():
        proof = tree.prove(position)
        assert proof.quantity == quantity
        assert len(proof.siblings) == tree.depth
        verify_inclusion(
            proof, account=account, salt=salt, root=tree.root, total=tree.total, depth=tree.depth
        )
        again = InclusionProof.from_wire(proof.to_wire())
        assert again == proof
        assert is_valid_inclusion(
            again, account=account, salt=salt, root=tree.root, total=tree.total, depth=tree.depth
        )


def _flip(data: bytes, index: int, mask: int) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _forge(proof: InclusionProof, **changes: Any) -> InclusionProof:
    """A proof object altered after construction, as a hostile caller in-process could."""
    forged = InclusionProof(
        asset=proof.asset,
        position=proof.position,
        depth=proof.depth,
        quantity=proof.quantity,
        siblings=proof.siblings,
    )
    for name, value in changes.items():
        object.__setattr__(forged, name, value)
    return forged


TAMPERINGS = [
    "sibling_hash",
    "sibling_sum",
    "position",
    "quantity",
    "account",
    "salt",
    "asset",
    "root",
    "total",
    "depth",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=client_trees(), how=st.sampled_from(TAMPERINGS), data=st.data())
def test_any_change_to_a_proof_or_its_inputs_fails(
    case: tuple[SumTree, dict[int, tuple[str, bytes, int]]], how: str, data: st.DataObject
) -> None:
    tree, clients = case
    position = data.draw(st.sampled_from(sorted(clients)))
    account, salt, _ = clients[position]
    proof = tree.prove(position)
    args: dict[str, Any] = {
        "account": account,
        "salt": salt,
        "root": tree.root,
        "total": tree.total,
        "depth": tree.depth,
    }
    siblings = list(proof.siblings)
    height = data.draw(st.integers(0, tree.depth - 1)) if tree.depth else 0
    if how == "sibling_hash":
        byte = data.draw(st.integers(0, 31))
        mask = data.draw(st.integers(1, 255))
        siblings[height] = (_flip(siblings[height][0], byte, mask), siblings[height][1])
        proof = _forge(proof, siblings=tuple(siblings))
    elif how == "sibling_sum":
        new_sum = data.draw(st.integers(0, MAX_QUANTITY).filter(lambda s: s != siblings[height][1]))
        siblings[height] = (siblings[height][0], new_sum)
        proof = _forge(proof, siblings=tuple(siblings))
    elif how == "position":
        new_position = data.draw(
            st.integers(0, 2**tree.depth - 1).filter(lambda p: p != proof.position)
        )
        proof = _forge(proof, position=new_position)
    elif how == "quantity":
        new_quantity = data.draw(quantities_st.filter(lambda q: q != proof.quantity))
        proof = _forge(proof, quantity=new_quantity)
    elif how == "account":
        args["account"] = data.draw(accounts_st.filter(lambda a: a != account))
    elif how == "salt":
        args["salt"] = _flip(salt, data.draw(st.integers(0, 31)), data.draw(st.integers(1, 255)))
    elif how == "asset":
        proof = _forge(proof, asset=data.draw(assets_st.filter(lambda a: a != proof.asset)))
    elif how == "root":
        args["root"] = _flip(tree.root, data.draw(st.integers(0, 31)), 1)
    elif how == "depth":
        args["depth"] = data.draw(st.integers(0, MAX_DEPTH).filter(lambda d: d != tree.depth))
    else:
        args["total"] = data.draw(st.integers(0, SUM_LIMIT - 1).filter(lambda t: t != tree.total))
    assert not is_valid_inclusion(proof, **args)
    expected = SumMismatch if how == "total" else (InvalidProof, SumOverflow)
    with pytest.raises(expected):
        verify_inclusion(proof, **args)


def test_prove_an_empty_slot() -> None:
    tree = SumTree.build(ASSET, [Leaf(0, commitment_of(0), 1)], depth=3)
    with pytest.raises(KeyError):
        tree.prove(1)
    with pytest.raises(DecodeError):
        tree.prove(-1)
    assert tree.leaf(1) is None
    assert tree.leaf(0) == Leaf(0, commitment_of(0), 1)


def test_proof_of_a_depth_zero_tree() -> None:
    commitment = compute_account_commitment(account="solo", salt=ALICE_SALT)
    tree = SumTree.build(ASSET, [Leaf(0, commitment, 42)])
    proof = tree.prove(0)
    assert proof.siblings == ()
    assert tree.root == ref_leaf(0, commitment, ASSET, 42)
    verify_inclusion(proof, account="solo", salt=ALICE_SALT, root=tree.root, total=42, depth=0)


def test_is_valid_inclusion_is_false_for_malformed_arguments() -> None:
    commitment = compute_account_commitment(account="alice", salt=ALICE_SALT)
    tree = SumTree.build(ASSET, [Leaf(0, commitment, 1), Leaf(1, commitment_of(1), 2)])
    proof = tree.prove(0)
    good: dict[str, Any] = {
        "account": "alice",
        "salt": ALICE_SALT,
        "root": tree.root,
        "total": 3,
        "depth": 1,
    }
    assert is_valid_inclusion(proof, **good)
    for name, bad in [
        ("root", tree.root[:31]),
        ("total", -1),
        ("total", 3.0),
        ("salt", b""),
        ("depth", 2),
        ("depth", -1),
        ("depth", 1.0),
        ("depth", True),
        ("depth", "1"),
        ("depth", None),
    ]:
        assert not is_valid_inclusion(proof, **{**good, name: bad})
    assert not is_valid_inclusion(proof.to_wire(), **good)  # type: ignore[arg-type]


# --- known attacks ------------------------------------------------------------------------------


def _two_clients(
    quantities: tuple[int, int] = (5, 7),
) -> tuple[SumTree, list[tuple[str, bytes]]]:
    clients = [("alice", bytes([1]) * 32), ("bob", bytes([2]) * 32)]
    leaves = [
        Leaf(position, compute_account_commitment(account=account, salt=salt), quantity)
        for position, ((account, salt), quantity) in enumerate(
            zip(clients, quantities, strict=True)
        )
    ]
    return SumTree.build(ASSET, leaves), clients


def test_negative_balances_are_rejected_everywhere() -> None:
    with pytest.raises(NegativeSum):
        Leaf(0, commitment_of(0), -5)
    tree, clients = _two_clients()
    proof = tree.prove(0)
    with pytest.raises(NegativeSum):
        InclusionProof(ASSET, 0, 1, 5, ((proof.siblings[0][0], -7),))
    wire = proof.to_wire()
    wire["siblings"][0]["sum"] = "-7"
    with pytest.raises(NegativeSum):
        InclusionProof.from_wire(wire)
    # A proof altered after construction still fails at verification.
    forged = _forge(proof, siblings=((proof.siblings[0][0], -7),))
    account, salt = clients[0]
    with pytest.raises(NegativeSum):
        verify_inclusion(forged, account=account, salt=salt, root=tree.root, total=12, depth=1)
    forged = _forge(proof, quantity=-1)
    with pytest.raises(NegativeSum):
        verify_inclusion(forged, account=account, salt=salt, root=tree.root, total=12, depth=1)


def test_sums_that_would_wrap_are_rejected_at_build_and_update() -> None:
    with pytest.raises(SumOverflow):
        SumTree.build(ASSET, [Leaf(0, commitment_of(0), 2**127), Leaf(1, commitment_of(1), 2**127)])
    largest = SumTree.build(ASSET, [Leaf(0, commitment_of(0), SUM_LIMIT - 1)])
    assert largest.total == SUM_LIMIT - 1
    tree = SumTree.build(ASSET, [Leaf(0, commitment_of(0), 2**127)])
    before = snapshot(tree)
    with pytest.raises(SumOverflow):
        tree.update(set_leaves=[Leaf(1, commitment_of(1), 2**127)])
    assert snapshot(tree) == before
    # Replacing the large leaf instead is fine: the old quantity leaves the total first.
    tree.update(set_leaves=[Leaf(0, commitment_of(0), 2**127 + 1)])
    assert tree.total == 2**127 + 1


def test_a_sibling_sum_that_overflows_the_parent_is_rejected_at_verify() -> None:
    tree, clients = _two_clients()
    account, salt = clients[0]
    proof = tree.prove(0)
    # Modulo 2**128 this sibling would bring the total back to 4: 5 + (2**128 - 1) wraps.
    wrapping = InclusionProof(ASSET, 0, 1, 5, ((proof.siblings[0][0], SUM_LIMIT - 1),))
    with pytest.raises(SumOverflow):
        verify_inclusion(wrapping, account=account, salt=salt, root=tree.root, total=4, depth=1)
    with pytest.raises(SumOverflow):
        InclusionProof(ASSET, 0, 1, 5, ((proof.siblings[0][0], SUM_LIMIT),))


def _maxwell_tree(
    leaves: list[tuple[bytes, int]],
) -> tuple[list[list[tuple[bytes, int]]], tuple[bytes, int]]:
    """A tree built the flawed way: hashes as ours, but every parent reports max(children)."""
    levels = [leaves]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append(
            [
                (ref_node(left, right)[0], max(left[1], right[1]))
                for left, right in zip(below[0::2], below[1::2], strict=True)
            ]
        )
    return levels, levels[-1][0]


def test_a_maxwell_form_tree_does_not_verify() -> None:
    clients = [
        (f"client-{i}", bytes([i]) * 32, quantity) for i, quantity in enumerate([9, 1, 4, 6])
    ]
    leaf_nodes = [
        (ref_leaf(i, ref_commitment(account, salt), ASSET, quantity), quantity)
        for i, (account, salt, quantity) in enumerate(clients)
    ]
    levels, (maxwell_root, maxwell_total) = _maxwell_tree(leaf_nodes)
    assert maxwell_total == 9  # the liabilities really sum to 20
    for position, (account, salt, quantity) in enumerate(clients):
        siblings = tuple(levels[height][(position >> height) ^ 1] for height in range(2))
        proof = InclusionProof(ASSET, position, 2, quantity, siblings)
        # The verifier adds the sums itself, so the path hashes the real ones and misses the root.
        with pytest.raises(InvalidProof):
            verify_inclusion(proof, account=account, salt=salt, root=maxwell_root, total=9, depth=2)
    # Honest hashes but a published total of max(children) at the root: the sum gives it away.
    tree = SumTree.build(
        ASSET,
        [Leaf(i, ref_commitment(a, s), q) for i, (a, s, q) in enumerate(clients)],
    )
    assert tree.total == 20
    for position, (account, salt, _) in enumerate(clients):
        with pytest.raises(SumMismatch):
            verify_inclusion(
                tree.prove(position), account=account, salt=salt, root=tree.root, total=10, depth=2
            )


def test_sibling_sums_rewritten_to_max_form_fail() -> None:
    tree, clients = _two_clients((5, 7))
    account, salt = clients[0]
    proof = tree.prove(0)
    # The custodian shows alice a sibling sum chosen so that her parent would be max(5, 7) = 7.
    sibling_hash, _ = proof.siblings[0]
    altered = InclusionProof(ASSET, 0, 1, 5, ((sibling_hash, 2),))
    with pytest.raises(InvalidProof):
        verify_inclusion(altered, account=account, salt=salt, root=tree.root, total=7, depth=1)
    with pytest.raises(InvalidProof):
        verify_inclusion(altered, account=account, salt=salt, root=tree.root, total=12, depth=1)


def test_an_interior_node_cannot_pass_as_a_leaf() -> None:
    clients = [(f"client-{i}", bytes([i + 1]) * 32) for i in range(4)]
    tree = SumTree.build(
        ASSET,
        [
            Leaf(i, compute_account_commitment(account=a, salt=s), 10 + i)
            for i, (a, s) in enumerate(clients)
        ],
    )
    # Node 0 of height 1 (over leaves 0 and 1) offered as the leaf at position 0 of a depth-1
    # tree, with node 1 of height 1 as its sibling: the verifier hashes a leaf, never a node.
    # (Even with a statement that declares depth 1 for this root, so the depth check passes.)
    proof = tree.prove(0)
    fake = InclusionProof(ASSET, 0, 1, 10 + 11, (proof.siblings[1],))
    for account, salt in clients:
        for depth in (1, tree.depth):
            with pytest.raises(InvalidProof):
                verify_inclusion(
                    fake, account=account, salt=salt, root=tree.root, total=tree.total, depth=depth
                )
    # And a whole depth-1 tree's root offered as a leaf of depth 0.
    small, small_clients = _two_clients()
    claim = InclusionProof(ASSET, 0, 0, small.total, ())
    for account, salt in small_clients:
        for depth in (0, small.depth):
            with pytest.raises(InvalidProof):
                verify_inclusion(
                    claim,
                    account=account,
                    salt=salt,
                    root=small.root,
                    total=small.total,
                    depth=depth,
                )


def test_leaf_node_and_empty_hashes_are_domain_separated() -> None:
    commitment = commitment_of(3)
    tail = (3).to_bytes(8, "big") + commitment + b"\x04USDC" + (9).to_bytes(16, "big")
    leaf = compute_leaf_hash(position=3, commitment=commitment, asset=ASSET, quantity=9)
    assert leaf == ref_sha(b"\x00" + tail)
    assert leaf not in (ref_sha(tail), ref_sha(b"\x01" + tail), ref_sha(b"\x02" + tail))
    node, _ = compute_node(left_hash=leaf, left_sum=9, right_hash=leaf, right_sum=9)
    body = leaf + (9).to_bytes(16, "big") + leaf + (9).to_bytes(16, "big")
    assert node == ref_sha(b"\x01" + body)
    assert node != ref_sha(b"\x00" + body)
    assert EMPTY_HASHES[0] == ref_sha(b"\x02")
    # A commitment input starts with the ASCII tag, never with a prefix byte 0x00-0x02.
    assert b"mcb/account/v1"[0] > 2


def test_duplicated_and_shared_leaves_are_rejected() -> None:
    with pytest.raises(DuplicateLeaf):
        SumTree.build(ASSET, [Leaf(0, commitment_of(0), 1), Leaf(0, commitment_of(1), 2)])
    with pytest.raises(DuplicateLeaf):
        SumTree.build(ASSET, [Leaf(0, commitment_of(0), 1), Leaf(1, commitment_of(0), 2)])
    # The same leaf object twice is a duplicate position too.
    same = Leaf(4, commitment_of(4), 1)
    with pytest.raises(DuplicateLeaf):
        SumTree.build(ASSET, [same, same])
    # One leaf cannot serve two clients: the commitment binds one account.
    tree, clients = _two_clients()
    proof = tree.prove(0)
    bob, bob_salt = clients[1]
    head: dict[str, Any] = {"root": tree.root, "total": tree.total, "depth": tree.depth}
    with pytest.raises(InvalidProof):
        verify_inclusion(proof, account=bob, salt=bob_salt, **head)
    alice_salt = clients[0][1]
    with pytest.raises(InvalidProof):
        verify_inclusion(proof, account=bob, salt=alice_salt, **head)


def test_proofs_with_the_wrong_depth_or_length() -> None:
    tree, clients = _two_clients()
    account, salt = clients[0]
    proof = tree.prove(0)
    with pytest.raises(DecodeError):
        InclusionProof(ASSET, 0, 2, 5, proof.siblings)
    with pytest.raises(DecodeError):
        InclusionProof(ASSET, 0, 0, 5, proof.siblings)
    with pytest.raises(DecodeError):
        InclusionProof(ASSET, 0, MAX_DEPTH + 1, 5, proof.siblings * (MAX_DEPTH + 1))
    with pytest.raises(DecodeError):
        InclusionProof(ASSET, 0, 1, 5, list(proof.siblings))  # type: ignore[arg-type]
    # One more (empty) level proves the leaf in a deeper tree, which has another root: refused
    # for the depth the statement declares, and for the proof's own depth by the root.
    deeper = InclusionProof(ASSET, 0, 2, 5, (*proof.siblings, (EMPTY_HASHES[1], 0)))
    head: dict[str, Any] = {
        "account": account,
        "salt": salt,
        "root": tree.root,
        "total": tree.total,
    }
    for depth in (tree.depth, deeper.depth):
        with pytest.raises(InvalidProof):
            verify_inclusion(deeper, **head, depth=depth)
    assert tree.root != SumTree.build(ASSET, tree.iter_leaves(), depth=2).root
    shallower = _forge(proof, depth=0, siblings=())
    for depth in (tree.depth, 0):
        with pytest.raises(InvalidProof):
            verify_inclusion(shallower, **head, depth=depth)
    mismatched = _forge(proof, depth=2)
    for depth in (tree.depth, 2):
        with pytest.raises(InvalidProof):
            verify_inclusion(mismatched, **head, depth=depth)
    verify_inclusion(proof, **head, depth=tree.depth)


def test_the_declared_depth_is_checked_before_the_path() -> None:
    tree, clients = _two_clients()
    account, salt = clients[0]
    proof = tree.prove(0)
    head: dict[str, Any] = {
        "account": account,
        "salt": salt,
        "root": tree.root,
        "total": tree.total,
    }
    # Each of these paths would fail in its own way (a negative sum, a wrapping sum, not a tuple,
    # a position with no slot); against another declared depth the depth is what is reported.
    broken = [
        _forge(proof, siblings=((proof.siblings[0][0], -7),)),
        _forge(proof, siblings=((proof.siblings[0][0], SUM_LIMIT),)),
        _forge(proof, siblings=[proof.siblings[0]]),
        _forge(proof, position=2),
        _forge(proof, quantity=-1),
    ]
    for forged in broken:
        with pytest.raises(InvalidProof, match="proof depth 1, tree depth 2"):
            verify_inclusion(forged, **head, depth=2)
        with pytest.raises(AttestationError):
            verify_inclusion(forged, **head, depth=1)


@pytest.mark.parametrize("depth", [-1, MAX_DEPTH + 1, True, 1.0, "1", None])
def test_a_malformed_declared_depth_is_a_decode_error(depth: Any) -> None:
    tree, clients = _two_clients()
    account, salt = clients[0]
    with pytest.raises(DecodeError):
        verify_inclusion(
            tree.prove(0), account=account, salt=salt, root=tree.root, total=12, depth=depth
        )


def test_a_position_outside_the_tree_is_rejected() -> None:
    tree, clients = _two_clients()
    account, salt = clients[1]
    proof = tree.prove(1)
    with pytest.raises(DecodeError):
        InclusionProof(ASSET, 3, 1, 7, proof.siblings)
    wire = proof.to_wire()
    wire["position"] = 2
    with pytest.raises(DecodeError):
        InclusionProof.from_wire(wire)
    # Bits above the depth are ignored by the fold, so a custodian could hash a leaf claiming
    # position 3 into slot 1 of a depth-1 tree (two "positions" for one slot). Refuse it.
    alice, bob = (compute_account_commitment(account=a, salt=s) for a, s in clients)
    crafted_root, crafted_total = ref_node(
        (ref_leaf(0, alice, ASSET, 5), 5), (ref_leaf(3, bob, ASSET, 7), 7)
    )
    forged = _forge(proof, position=3)
    with pytest.raises(InvalidProof):
        verify_inclusion(
            forged, account=account, salt=salt, root=crafted_root, total=crafted_total, depth=1
        )
    verify_inclusion(proof, account=account, salt=salt, root=tree.root, total=tree.total, depth=1)


# --- updates ------------------------------------------------------------------------------------


@st.composite
def update_batches(
    draw: st.DrawFn,
) -> tuple[dict[int, int], list[tuple[dict[int, int], list[int]]]]:
    """Initial holdings and a few batches of (sets, clears) that are valid in sequence."""
    initial = draw(holdings(max_size=16))
    state = dict(initial)
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        existing = sorted(state)
        clears = draw(st.lists(st.sampled_from(existing), unique=True)) if existing else []
        kept = [position for position in existing if position not in clears]
        changed = draw(st.lists(st.sampled_from(kept), unique=True)) if kept else []
        added = draw(st.lists(positions_st, unique=True, max_size=8))
        targets = set(changed) | {position for position in added if position not in clears}
        sets = {position: draw(quantities_st) for position in sorted(targets)}
        for position in clears:
            del state[position]
        state.update(sets)
        assume(sum(state.values()) < SUM_LIMIT)
        batches.append((sets, clears))
    return initial, batches


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=update_batches(), moved_commitments=st.booleans())
def test_incremental_updates_equal_a_full_rebuild(
    case: tuple[dict[int, int], list[tuple[dict[int, int], list[int]]]],
    moved_commitments: bool,
) -> None:
    initial, batches = case
    serial = iter(range(10**9))
    # Each leaf version gets a fresh commitment, or keeps the one of its position.
    state = {
        position: (commitment_of(position), quantity) for position, quantity in initial.items()
    }
    tree = SumTree.build(ASSET, leaves_of(state))
    for sets, clears in batches:
        new_state = {p: v for p, v in state.items() if p not in clears}
        for position, quantity in sets.items():
            commitment = (
                commitment_of(-1 - next(serial)) if moved_commitments else commitment_of(position)
            )
            new_state[position] = (commitment, quantity)
        changed = [Leaf(p, *new_state[p]) for p in sets]
        expected_depth = max(tree.depth, max(sets, default=0).bit_length())
        expected_root, expected_total = ref_root(ASSET, new_state, expected_depth)
        tree.update(
            set_leaves=changed,
            clear_positions=clears,
            expect_root=expected_root,
            expect_total=expected_total,
            expect_count=len(new_state),
        )
        state = new_state
        rebuilt = SumTree.build(ASSET, leaves_of(state), depth=tree.depth)
        assert snapshot(tree) == snapshot(rebuilt)
        assert tree.depth == expected_depth
        for position in list(state)[:3]:
            assert tree.prove(position) == rebuilt.prove(position)
        for position in clears:
            assert tree.leaf(position) is None


def test_updates_grow_the_depth_and_never_shrink_it() -> None:
    tree = SumTree(ASSET)
    tree.update(set_leaves=[Leaf(0, commitment_of(0), 1)])
    assert tree.depth == 0
    tree.update(set_leaves=[Leaf(9, commitment_of(9), 2)])
    assert tree.depth == 4
    tree.update(set_leaves=[Leaf(2**40, commitment_of(40), 3)])
    assert tree.depth == 41
    state = {0: (commitment_of(0), 1), 9: (commitment_of(9), 2), 2**40: (commitment_of(40), 3)}
    assert (tree.root, tree.total) == ref_root(ASSET, state, 41)
    tree.update(clear_positions=[2**40, 9, 0])
    assert (tree.depth, tree.count, tree.total, tree.root) == (41, 0, 0, EMPTY_HASHES[41])


def test_a_commitment_may_move_between_positions_in_one_update() -> None:
    tree = SumTree.build(ASSET, [Leaf(0, commitment_of(0), 1), Leaf(1, commitment_of(1), 2)])
    tree.update(set_leaves=[Leaf(5, commitment_of(0), 1)], clear_positions=[0])
    assert tree.leaf(0) is None
    # Swap two commitments by replacing both leaves.
    tree.update(set_leaves=[Leaf(5, commitment_of(1), 1), Leaf(1, commitment_of(0), 2)])
    rebuilt = SumTree.build(
        ASSET, [Leaf(1, commitment_of(0), 2), Leaf(5, commitment_of(1), 1)], depth=3
    )
    assert snapshot(tree) == snapshot(rebuilt)


def _base_tree() -> SumTree:
    return SumTree.build(ASSET, [Leaf(p, commitment_of(p), p + 1) for p in range(6)])


class Updater(Protocol):
    """SumTree.update or SumTree.plan_update, bound to a tree."""

    def __call__(
        self,
        *,
        set_leaves: Iterable[Leaf] = (),
        clear_positions: Iterable[int] = (),
        expect_root: bytes | None = None,
        expect_total: int | None = None,
        expect_count: int | None = None,
    ) -> object: ...


BAD_UPDATES: list[tuple[str, Callable[[Updater], object], type[Exception]]] = [
    (
        "position set twice",
        lambda u: u(set_leaves=[Leaf(9, commitment_of(90), 1), Leaf(9, commitment_of(91), 1)]),
        DuplicateLeaf,
    ),
    (
        "set and cleared",
        lambda u: u(set_leaves=[Leaf(2, commitment_of(92), 1)], clear_positions=[2]),
        DuplicateLeaf,
    ),
    ("cleared twice", lambda u: u(clear_positions=[1, 1]), DuplicateLeaf),
    ("clear an empty slot", lambda u: u(clear_positions=[1, 7]), DecodeError),
    (
        "commitment already used",
        lambda u: u(set_leaves=[Leaf(9, commitment_of(3), 1)]),
        DuplicateLeaf,
    ),
    (
        "commitment used twice in one update",
        lambda u: u(set_leaves=[Leaf(9, commitment_of(93), 1), Leaf(10, commitment_of(93), 1)]),
        DuplicateLeaf,
    ),
    (
        "overflow",
        lambda u: u(set_leaves=[Leaf(9, commitment_of(94), SUM_LIMIT - 1)]),
        SumOverflow,
    ),
    ("bad clear position", lambda u: u(clear_positions=[-1]), DecodeError),
    ("float clear position", lambda u: u(clear_positions=[1.0]), FloatRejected),  # type: ignore[list-item]
    (
        "wrong expected root",
        lambda u: u(set_leaves=[Leaf(9, commitment_of(95), 1)], expect_root=bytes(32)),
        RootMismatch,
    ),
    (
        "wrong expected total",
        lambda u: u(set_leaves=[Leaf(9, commitment_of(95), 1)], expect_total=1),
        SumMismatch,
    ),
    (
        "wrong expected count",
        lambda u: u(set_leaves=[Leaf(9, commitment_of(95), 1)], expect_count=6),
        SumMismatch,
    ),
    (
        "malformed expected root",
        lambda u: u(set_leaves=[Leaf(9, commitment_of(95), 1)], expect_root=b"x"),
        DecodeError,
    ),
]


@pytest.mark.parametrize("method", ["update", "plan_update"])
@pytest.mark.parametrize(
    ("change", "error"),
    [(change, error) for _, change, error in BAD_UPDATES],
    ids=[name for name, _, _ in BAD_UPDATES],
)
def test_a_rejected_update_leaves_the_tree_unchanged(
    change: Callable[[Updater], object], error: type[Exception], method: str
) -> None:
    # Every check happens while planning: plan_update rejects exactly what update rejects.
    tree = _base_tree()
    before = snapshot(tree)
    proofs = [tree.prove(position) for position in range(6)]
    with pytest.raises(error):
        change(getattr(tree, method))
    assert snapshot(tree) == before
    assert [tree.prove(position) for position in range(6)] == proofs
    # And the tree still updates correctly afterwards.
    tree.update(set_leaves=[Leaf(9, commitment_of(99), 4)], clear_positions=[0])
    rebuilt = SumTree.build(
        ASSET,
        [*(Leaf(p, commitment_of(p), p + 1) for p in range(1, 6)), Leaf(9, commitment_of(99), 4)],
        depth=4,
    )
    assert snapshot(tree) == snapshot(rebuilt)


def _base_change() -> tuple[list[Leaf], list[int], SumTree]:
    """A change of _base_tree() that sets, replaces, clears and grows the depth, and the tree it
    should give."""
    sets = [Leaf(2, commitment_of(20), 9), Leaf(17, commitment_of(17), 5)]
    clears = [0, 4]
    after = SumTree.build(
        ASSET,
        [
            Leaf(1, commitment_of(1), 2),
            Leaf(2, commitment_of(20), 9),
            Leaf(3, commitment_of(3), 4),
            Leaf(5, commitment_of(5), 6),
            Leaf(17, commitment_of(17), 5),
        ],
        depth=5,
    )
    return sets, clears, after


def test_a_plan_does_not_change_the_tree() -> None:
    tree = _base_tree()
    before = snapshot(tree)
    proofs = [tree.prove(position) for position in range(6)]
    sets, clears, after = _base_change()
    plan = tree.plan_update(
        set_leaves=sets,
        clear_positions=clears,
        expect_root=after.root,
        expect_total=after.total,
        expect_count=after.count,
    )
    assert isinstance(plan, TreeUpdate)
    assert (plan.asset, plan.root, plan.total, plan.count, plan.depth) == (
        ASSET,
        after.root,
        after.total,
        after.count,
        after.depth,
    )
    assert not plan.applied
    assert snapshot(tree) == before
    assert [tree.prove(position) for position in range(6)] == proofs
    # A second plan of the same change from the same state gives the same result.
    again = tree.plan_update(set_leaves=sets, clear_positions=clears)
    assert (again.root, again.total, again.count, again.depth) == (
        plan.root,
        plan.total,
        plan.count,
        plan.depth,
    )
    plan.apply()
    assert plan.applied
    assert snapshot(tree) == snapshot(after)
    assert tree.prove(17) == after.prove(17)


def test_plans_for_several_trees_are_all_checked_before_any_is_applied() -> None:
    # A receiver's multi-asset delta: the second asset's expectation is wrong, so the first
    # asset's plan, already computed, is simply never applied.
    first, second = _base_tree(), SumTree.build("BTC", [Leaf(0, commitment_of(0), 1)])
    first_before, second_before = snapshot(first), snapshot(second)
    sets, clears, after = _base_change()
    plans = [first.plan_update(set_leaves=sets, clear_positions=clears, expect_root=after.root)]
    with pytest.raises(SumMismatch):
        plans.append(second.plan_update(set_leaves=[Leaf(1, commitment_of(1), 1)], expect_total=1))
    assert (snapshot(first), snapshot(second)) == (first_before, second_before)


def test_applying_after_another_change_raises() -> None:
    tree = _base_tree()
    sets, clears, _ = _base_change()
    stale = tree.plan_update(set_leaves=sets, clear_positions=clears)
    other = tree.plan_update(set_leaves=[Leaf(9, commitment_of(9), 1)])
    other.apply()
    after_other = snapshot(tree)
    with pytest.raises(InvariantViolation, match="changed since"):
        stale.apply()
    assert not stale.applied
    assert snapshot(tree) == after_other
    # update() is plan + apply too, so it also makes older plans stale.
    fresh = tree.plan_update(clear_positions=[9])
    tree.update(set_leaves=[Leaf(10, commitment_of(10), 1)])
    with pytest.raises(InvariantViolation):
        fresh.apply()
    # Planning alone changes nothing, so an earlier plan stays good...
    first = tree.plan_update(set_leaves=[Leaf(11, commitment_of(11), 1)])
    tree.plan_update(clear_positions=[10])
    first.apply()
    assert tree.leaf(11) is not None
    # ...while applying even an empty change makes every older plan stale.
    last = tree.plan_update(clear_positions=[10])
    tree.update()
    with pytest.raises(InvariantViolation):
        last.apply()
    assert tree.leaf(10) is not None


def test_applying_twice_raises() -> None:
    tree = _base_tree()
    sets, clears, after = _base_change()
    plan = tree.plan_update(set_leaves=sets, clear_positions=clears)
    plan.apply()
    with pytest.raises(InvariantViolation, match="applied already"):
        plan.apply()
    assert snapshot(tree) == snapshot(after)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=update_batches())
def test_plan_and_apply_equals_update_equals_a_full_rebuild(
    case: tuple[dict[int, int], list[tuple[dict[int, int], list[int]]]],
) -> None:
    initial, batches = case
    state = {
        position: (commitment_of(position), quantity) for position, quantity in initial.items()
    }
    planned = SumTree.build(ASSET, leaves_of(state))
    updated = SumTree.build(ASSET, leaves_of(state))
    serial = iter(range(10**9))
    for sets, clears in batches:
        for position in clears:
            del state[position]
        changed = [Leaf(p, commitment_of(-1 - next(serial)), q) for p, q in sets.items()]
        for leaf in changed:
            state[leaf.position] = (leaf.commitment, leaf.quantity)
        before = snapshot(planned)
        plan = planned.plan_update(set_leaves=changed, clear_positions=clears)
        assert snapshot(planned) == before
        plan.apply()
        updated.update(set_leaves=changed, clear_positions=clears)
        rebuilt = SumTree.build(ASSET, leaves_of(state), depth=planned.depth)
        assert (plan.root, plan.total, plan.count, plan.depth) == (
            rebuilt.root,
            rebuilt.total,
            rebuilt.count,
            rebuilt.depth,
        )
        assert snapshot(planned) == snapshot(updated) == snapshot(rebuilt)
        assert (rebuilt.root, rebuilt.total) == ref_root(ASSET, state, rebuilt.depth)


def test_verify_head() -> None:
    tree = _base_tree()
    tree.verify_head(root=tree.root, total=21, count=6)
    with pytest.raises(RootMismatch):
        tree.verify_head(root=EMPTY_HASHES[3], total=21, count=6)
    with pytest.raises(SumMismatch):
        tree.verify_head(root=tree.root, total=20, count=6)
    with pytest.raises(SumMismatch):
        tree.verify_head(root=tree.root, total=21, count=7)


def test_an_update_that_fills_the_gap_between_lists_and_dict() -> None:
    # Leaves far apart go to a level's dict; filling the gap one leaf at a time pulls them into
    # the lists. The result must not depend on how the tree got there.
    state = {0: (commitment_of(0), 1), 3000: (commitment_of(3000), 2)}
    tree = SumTree.build(ASSET, leaves_of(state), depth=12)
    for position in range(1, 3000, 7):
        state[position] = (commitment_of(position), position)
        tree.update(set_leaves=[Leaf(position, *state[position])])
    assert (tree.root, tree.total) == ref_root(ASSET, state, 12)
    assert snapshot(tree) == snapshot(SumTree.build(ASSET, leaves_of(state), depth=12))


# --- wire form ----------------------------------------------------------------------------------


def _valid_wire() -> dict[str, Any]:
    tree = SumTree.build(ASSET, [Leaf(p, commitment_of(p), 10 * p) for p in range(3)])
    return tree.prove(1).to_wire()


def test_wire_form_is_exact() -> None:
    wire = _valid_wire()
    assert set(wire) == {"version", "asset", "position", "depth", "quantity", "siblings"}
    assert wire["version"] == 1
    assert wire["quantity"] == "10"
    assert wire["position"] == 1
    assert wire["depth"] == 2
    for sibling in wire["siblings"]:
        assert set(sibling) == {"hash", "sum"}
        assert sibling["hash"] == sibling["hash"].lower()
        assert len(sibling["hash"]) == 64
        assert isinstance(sibling["sum"], str)
    assert wire["siblings"][0]["sum"] == "0"
    assert wire["siblings"][1]["sum"] == "20"


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    wire = _valid_wire()
    target: Any = wire
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return wire


_DELETE = object()
_SIBLING_HASH = ("siblings", 0, "hash")
_SIBLING_SUM = ("siblings", 0, "sum")

MALFORMED: list[tuple[str, tuple[Any, ...], Any, type[Exception]]] = [
    ("missing member", ("quantity",), _DELETE, DecodeError),
    ("unknown member", ("extra",), 1, DecodeError),
    ("version 2", ("version",), 2, DecodeError),
    ("version true", ("version",), True, DecodeError),
    ("version string", ("version",), "1", DecodeError),
    ("version float", ("version",), 1.0, DecodeError),
    ("asset lower case", ("asset",), "usdc", DecodeError),
    ("asset not a string", ("asset",), 5, DecodeError),
    ("position string", ("position",), "1", DecodeError),
    ("position float", ("position",), 1.0, FloatRejected),
    ("position bool", ("position",), True, DecodeError),
    ("position negative", ("position",), -1, DecodeError),
    ("position too large", ("position",), POSITION_LIMIT, DecodeError),
    ("position outside depth", ("position",), 4, DecodeError),
    ("depth too large", ("depth",), MAX_DEPTH + 1, DecodeError),
    ("depth negative", ("depth",), -1, DecodeError),
    ("depth float", ("depth",), 2.0, FloatRejected),
    ("depth string", ("depth",), "2", DecodeError),
    ("depth disagrees with siblings", ("depth",), 3, DecodeError),
    ("quantity leading zero", ("quantity",), "010", AmountError),
    ("quantity plus", ("quantity",), "+10", AmountError),
    ("quantity minus", ("quantity",), "-10", NegativeSum),
    ("quantity decimal point", ("quantity",), "10.0", AmountError),
    ("quantity leading space", ("quantity",), " 10", AmountError),
    ("quantity trailing newline", ("quantity",), "10\n", AmountError),
    ("quantity exponent", ("quantity",), "1e1", AmountError),
    ("quantity empty", ("quantity",), "", AmountError),
    ("quantity non-ASCII digits", ("quantity",), "\u0661\u0660", AmountError),
    ("quantity underscore", ("quantity",), "1_0", AmountError),
    ("quantity as int", ("quantity",), 10, AmountError),
    ("quantity as float", ("quantity",), 10.0, FloatRejected),
    ("quantity 2**128", ("quantity",), str(SUM_LIMIT), SumOverflow),
    ("quantity 1000 digits", ("quantity",), "9" * 1000, SumOverflow),
    ("siblings not a list", ("siblings",), {"0": None}, DecodeError),
    ("siblings a string", ("siblings",), "[]", DecodeError),
    ("sibling not an object", ("siblings", 0), ["00" * 32, "0"], DecodeError),
    ("sibling missing sum", _SIBLING_SUM, _DELETE, DecodeError),
    ("sibling unknown member", ("siblings", 0, "side"), "left", DecodeError),
    ("sibling hash upper case", _SIBLING_HASH, "AB" * 32, DecodeError),
    ("sibling hash short", _SIBLING_HASH, "ab" * 31, DecodeError),
    ("sibling hash long", _SIBLING_HASH, "ab" * 33, DecodeError),
    ("sibling hash 0x", _SIBLING_HASH, "0x" + "ab" * 31, DecodeError),
    ("sibling hash not hex", _SIBLING_HASH, "zz" * 32, DecodeError),
    ("sibling hash spaced", _SIBLING_HASH, "ab " * 21 + "a", DecodeError),
    ("sibling hash bytes", _SIBLING_HASH, b"\x00" * 32, DecodeError),
    ("sibling sum leading zero", _SIBLING_SUM, "00", AmountError),
    ("sibling sum negative", _SIBLING_SUM, "-1", NegativeSum),
    ("sibling sum overflow", _SIBLING_SUM, str(SUM_LIMIT), SumOverflow),
    ("sibling sum float", _SIBLING_SUM, 0.0, FloatRejected),
    ("sibling sum int", _SIBLING_SUM, 0, AmountError),
]


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [(path, value, error) for _, path, value, error in MALFORMED],
    ids=[name for name, _, _, _ in MALFORMED],
)
def test_malformed_wire_proofs_are_rejected(
    path: tuple[Any, ...], value: Any, error: type[Exception]
) -> None:
    InclusionProof.from_wire(_valid_wire())  # the unaltered one parses
    with pytest.raises(error):
        InclusionProof.from_wire(_with(path, value))


@pytest.mark.parametrize("obj", [None, [], "proof", 5, b"{}"])
def test_a_wire_proof_must_be_an_object(obj: Any) -> None:
    with pytest.raises(DecodeError):
        InclusionProof.from_wire(obj)


def test_oversized_wire_proofs_are_rejected_before_decoding_siblings() -> None:
    wire = _valid_wire()
    wire["depth"] = MAX_DEPTH
    wire["siblings"] = [{"hash": "00" * 32, "sum": "0"}] * 10_000
    with pytest.raises(DecodeError, match="siblings"):
        InclusionProof.from_wire(wire)
    wire["depth"] = 10_000
    with pytest.raises(DecodeError, match="depth"):
        InclusionProof.from_wire(wire)


@settings(max_examples=60, deadline=None)
@given(case=client_trees())
def test_wire_round_trip(case: tuple[SumTree, dict[int, tuple[str, bytes, int]]]) -> None:
    tree, clients = case
    for position in clients:
        proof = tree.prove(position)
        assert InclusionProof.from_wire(proof.to_wire()) == proof


def test_every_error_here_is_a_counterparty_error() -> None:
    # Consumers dead-letter on these; none of them may be retriable.
    for error in (DecodeError, DuplicateLeaf, InvalidProof, SumOverflow, NegativeSum, SumMismatch):
        assert not error.retriable
    assert issubclass(InvalidProof, AttestationError)
