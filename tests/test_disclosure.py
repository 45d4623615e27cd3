"""Disclosed leaves, salts, per-asset trees, and the client's proof bundle.

The statements here are never signed: :func:`verify_client_proof` trusts the caller to have
verified the statement's signatures (tests/test_verify.py covers that), and checks only that the
proof belongs to that statement and leads to its root.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestations.amounts import UNITS_LIMIT
from attestations.canonical import compute_canonical_bytes, parse_json_object
from attestations.disclosure import (
    MAX_POSITION,
    ClearedSlot,
    ClientProof,
    DisclosedLeaf,
    LeafDisclosure,
    ReceiverTrees,
    build_trees,
    compute_asset_roots,
    compute_salt,
    verify_client_proof,
)
from attestations.errors import (
    AmountError,
    DecodeError,
    DuplicateLeaf,
    FloatRejected,
    InvalidProof,
    InvariantViolation,
    NegativeSum,
    PolicyViolation,
    RootMismatch,
    SumMismatch,
    SumOverflow,
    WrongStream,
)
from attestations.merkle import InclusionProof, Leaf, SumTree, compute_account_commitment
from attestations.statement import GENESIS_PREVIOUS, AssetRoot, Statement, StatementKind

NOW = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)
SECRET = hashlib.sha256(b"custodian salt secret").digest()
CUSTODIAN = "custodian-a"
EXCHANGE = "exchange-x"
DECIMALS = {"BTC": 8, "USDC": 6}
HOLDINGS = (
    ("alice", "BTC", 0, 150_000_000),
    ("bob", "BTC", 1, 42),
    ("carol", "BTC", 2, 0),  # an account with nothing pledged is still a leaf
    ("alice", "USDC", 0, 1_000_000_000_000),
    ("dave", "USDC", 1, 25_000_000),
    ("erin", "USDC", 2, 7),
)


def salt(account: str, asset: str, *, exchange: str = EXCHANGE) -> bytes:
    return compute_salt(secret=SECRET, exchange=exchange, account=account, asset=asset)


def sample_leaves() -> list[DisclosedLeaf]:
    return [
        DisclosedLeaf(account, asset, position, salt(account, asset), quantity)
        for account, asset, position, quantity in HOLDINGS
    ]


TREES = build_trees(sample_leaves())


def make_statement(
    trees: dict[str, SumTree] | None = None,
    *,
    assets: tuple[AssetRoot, ...] | None = None,
    **changes: Any,
) -> Statement:
    if assets is None:
        assets = compute_asset_roots(TREES if trees is None else trees, decimals=DECIMALS)
    fields: dict[str, Any] = {
        "custodian": CUSTODIAN,
        "exchange": EXCHANGE,
        "sequence": 1,
        "previous": GENESIS_PREVIOUS,
        "issued_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "kind": StatementKind.SNAPSHOT,
        "assets": assets,
        "prices": (),
    }
    fields.update(changes)
    return Statement(**fields)


STATEMENT = make_statement()


def position_of(account: str, asset: str) -> int:
    return next(p for a, s, p, _ in HOLDINGS if (a, s) == (account, asset))


def client_proof(
    account: str = "alice",
    asset: str = "BTC",
    *,
    statement: Statement = STATEMENT,
    trees: dict[str, SumTree] | None = None,
    **changes: Any,
) -> ClientProof:
    tree = (TREES if trees is None else trees)[asset]
    fields: dict[str, Any] = {
        "custodian": statement.custodian,
        "exchange": statement.exchange,
        "sequence": statement.sequence,
        "statement_digest": statement.compute_digest(),
        "account": account,
        "salt": salt(account, asset),
        "proof": tree.prove(position_of(account, asset)),
    }
    fields.update(changes)
    return ClientProof(**fields)


# --- salts --------------------------------------------------------------------------------------


def test_salt_is_deterministic_and_32_bytes() -> None:
    one = compute_salt(secret=SECRET, exchange=EXCHANGE, account="alice", asset="BTC")
    assert one == compute_salt(secret=SECRET, exchange=EXCHANGE, account="alice", asset="BTC")
    assert len(one) == 32


def test_salt_is_the_documented_hmac() -> None:
    message = b"mcb/salt/v1\x00" + b"exchange-x\x00alice\x00BTC"
    expected = hmac.new(SECRET, message, hashlib.sha256).digest()
    assert salt("alice", "BTC") == expected


def test_every_input_separates_salts() -> None:
    base: dict[str, Any] = {
        "secret": SECRET,
        "exchange": EXCHANGE,
        "account": "alice",
        "asset": "BTC",
    }
    variants: list[dict[str, Any]] = [
        base,
        {**base, "secret": hashlib.sha256(b"another secret").digest()},
        {**base, "exchange": "exchange-y"},
        {**base, "account": "alicf"},
        {**base, "asset": "ETH"},
        # field boundaries cannot be shifted
        {**base, "exchange": "exchange-xa", "account": "lice"},
        {**base, "account": "aliceBTC", "asset": "BT"},
    ]
    salts = {compute_salt(**v) for v in variants}
    assert len(salts) == len(variants)


def test_salt_secret_must_be_at_least_32_bytes() -> None:
    with pytest.raises(DecodeError):
        compute_salt(secret=SECRET[:31], exchange=EXCHANGE, account="alice", asset="BTC")
    with pytest.raises(DecodeError):
        compute_salt(secret=b"", exchange=EXCHANGE, account="alice", asset="BTC")
    compute_salt(secret=SECRET + b"more", exchange=EXCHANGE, account="alice", asset="BTC")


@pytest.mark.parametrize(
    ("member", "value"),
    [
        ("exchange", "Exchange X"),
        ("exchange", ""),
        ("exchange", None),
        ("account", "alice smith"),
        ("account", ""),
        ("account", "a" * 129),
        ("asset", "btc"),
        ("asset", "B"),
        ("asset", None),
    ],
)
def test_salt_inputs_are_validated(member: str, value: Any) -> None:
    # Free-form inputs could collide across the 0x00 separators; only valid ids are salted.
    inputs: dict[str, Any] = {"exchange": EXCHANGE, "account": "alice", "asset": "BTC"}
    inputs[member] = value
    with pytest.raises(DecodeError):
        compute_salt(secret=SECRET, **inputs)


# --- DisclosedLeaf ------------------------------------------------------------------------------


def leaf(**changes: Any) -> DisclosedLeaf:
    fields: dict[str, Any] = {
        "account": "alice",
        "asset": "BTC",
        "position": 0,
        "salt": salt("alice", "BTC"),
        "quantity": 150_000_000,
    }
    fields.update(changes)
    return DisclosedLeaf(**fields)


def test_disclosed_leaf_bounds() -> None:
    leaf(position=MAX_POSITION, quantity=UNITS_LIMIT - 1)
    leaf(account="a" * 128, quantity=0)
    leaf(account="Client:01@desk.eu_x-1")


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"account": ""}, DecodeError),
        ({"account": "a" * 129}, DecodeError),
        ({"account": "alice smith"}, DecodeError),
        ({"account": "alic\u00e9"}, DecodeError),
        ({"account": None}, DecodeError),
        ({"asset": "btc"}, DecodeError),
        ({"asset": "B"}, DecodeError),
        ({"position": -1}, DecodeError),
        ({"position": MAX_POSITION + 1}, DecodeError),
        ({"position": True}, DecodeError),
        ({"position": 0.0}, DecodeError),
        ({"salt": bytes(31)}, DecodeError),
        ({"salt": bytes(33)}, DecodeError),
        ({"salt": bytes(32).hex()}, DecodeError),
        ({"quantity": -1}, NegativeSum),
        ({"quantity": UNITS_LIMIT}, SumOverflow),
        ({"quantity": 1.0}, FloatRejected),
        ({"quantity": "1"}, AmountError),
        ({"quantity": True}, AmountError),
    ],
)
def test_disclosed_leaf_rejects(changes: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        leaf(**changes)


def test_leaf_commits_to_account_and_salt() -> None:
    item = leaf()
    assert item.to_leaf() == Leaf(
        position=0,
        commitment=compute_account_commitment(account="alice", salt=item.salt),
        quantity=150_000_000,
    )
    commitments = {
        leaf().to_leaf().commitment,
        leaf(account="bob").to_leaf().commitment,
        leaf(salt=salt("alice", "USDC")).to_leaf().commitment,
    }
    assert len(commitments) == 3


def test_disclosed_leaf_wire_round_trip() -> None:
    for item in sample_leaves():
        data = compute_canonical_bytes(item.to_wire())
        assert DisclosedLeaf.from_wire(parse_json_object(data)) == item
    assert leaf().to_wire()["quantity"] == "150000000"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("account", "alice smith", DecodeError),
        ("account", 1, DecodeError),
        ("asset", "btc", DecodeError),
        ("position", "0", DecodeError),
        ("position", True, DecodeError),
        ("position", -1, DecodeError),
        ("position", MAX_POSITION + 1, DecodeError),
        ("salt", "AB" * 32, DecodeError),
        ("salt", "ab" * 31, DecodeError),
        ("salt", None, DecodeError),
        ("quantity", 150_000_000, AmountError),
        ("quantity", "0150000000", AmountError),
        ("quantity", "1.5e8", AmountError),
        ("quantity", "-1", NegativeSum),
        ("quantity", str(UNITS_LIMIT), SumOverflow),
        ("quantity", 150_000_000.0, FloatRejected),
    ],
)
def test_disclosed_leaf_strict_decoding(key: str, value: Any, error: type[Exception]) -> None:
    wire = leaf().to_wire()
    wire[key] = value
    with pytest.raises(error):
        DisclosedLeaf.from_wire(wire)


def test_disclosed_leaf_members_are_exact() -> None:
    for key in leaf().to_wire():
        wire = leaf().to_wire()
        del wire[key]
        with pytest.raises(DecodeError):
            DisclosedLeaf.from_wire(wire)
    with pytest.raises(DecodeError):
        DisclosedLeaf.from_wire({**leaf().to_wire(), "note": "x"})
    with pytest.raises(DecodeError):
        DisclosedLeaf.from_wire([leaf().to_wire()])


# --- trees and roots ----------------------------------------------------------------------------


def test_same_account_twice_in_one_asset_is_refused() -> None:
    # Different salts give different commitments, so only the account check can catch this.
    twice = [*sample_leaves(), leaf(position=5, salt=hashlib.sha256(b"x").digest(), quantity=1)]
    with pytest.raises(DuplicateLeaf):
        build_trees(twice)
    with pytest.raises(DuplicateLeaf):
        build_trees([*sample_leaves(), leaf(position=5)])


def test_two_leaves_at_one_position_are_refused() -> None:
    with pytest.raises(DuplicateLeaf):
        build_trees([*sample_leaves(), leaf(account="zed", position=1, salt=salt("zed", "BTC"))])


def test_one_account_in_several_assets_is_fine() -> None:
    trees = build_trees(sample_leaves())
    assert sorted(trees) == ["BTC", "USDC"]
    assert build_trees([]) == {}


def test_asset_roots_describe_the_trees() -> None:
    roots = compute_asset_roots(TREES, decimals={**DECIMALS, "ETH": 18})
    assert [r.asset for r in roots] == ["BTC", "USDC"]
    for root in roots:
        quantities = [q for _, asset, _, q in HOLDINGS if asset == root.asset]
        assert root.total == sum(quantities)
        assert root.count == len(quantities)
        assert root.decimals == DECIMALS[root.asset]
        tree = TREES[root.asset]
        assert (root.root, root.depth) == (tree.root, tree.depth)


def test_asset_roots_need_valid_decimals_for_every_tree() -> None:
    with pytest.raises(DecodeError):
        compute_asset_roots(TREES, decimals={"BTC": 8})
    with pytest.raises(DecodeError):
        compute_asset_roots(TREES, decimals={"BTC": 8, "USDC": 19})


# --- ClientProof --------------------------------------------------------------------------------


def test_client_proof_wire_round_trip() -> None:
    original = client_proof("dave", "USDC")
    data = compute_canonical_bytes(original.to_wire())
    decoded = ClientProof.from_wire(parse_json_object(data))
    assert decoded == original
    assert compute_canonical_bytes(decoded.to_wire()) == data
    assert verify_client_proof(decoded, statement=STATEMENT) == 25_000_000


@pytest.mark.parametrize(
    "changes",
    [
        {"version": 2},
        {"custodian": "Custodian"},
        {"exchange": ""},
        {"sequence": 0},
        {"sequence": True},
        {"sequence": 2**53},
        {"statement_digest": bytes(31)},
        {"account": "alice smith"},
        {"salt": bytes(31)},
        {"proof": {}},
    ],
)
def test_client_proof_rejects(changes: dict[str, Any]) -> None:
    good = client_proof()
    with pytest.raises(DecodeError):
        replace(good, **changes)


def proof_wire() -> dict[str, Any]:
    return copy.deepcopy(client_proof().to_wire())


@pytest.mark.parametrize("nested", [False, True])
def test_client_proof_members_are_exact(nested: bool) -> None:
    def target(wire: dict[str, Any]) -> dict[str, Any]:
        inner: dict[str, Any] = wire["proof"]
        return inner if nested else wire

    for key in sorted(target(proof_wire())):
        wire = proof_wire()
        del target(wire)[key]
        with pytest.raises(DecodeError):
            ClientProof.from_wire(wire)
    wire = proof_wire()
    target(wire)["note"] = "x"
    with pytest.raises(DecodeError):
        ClientProof.from_wire(wire)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("version", 2),
        ("version", True),
        ("version", "1"),
        ("statement", STATEMENT.compute_digest().hex().upper()),
        ("statement", STATEMENT.compute_digest().hex()[:-2]),
        ("salt", salt("alice", "BTC").hex()[:-2]),
        ("salt", salt("alice", "BTC").hex().upper()),
        ("sequence", True),
        ("sequence", 0),
        ("sequence", "1"),
        ("account", ""),
        ("custodian", None),
        ("proof", None),
        ("proof.version", True),
        ("proof.quantity", "0150000000"),
        ("proof.quantity", 150_000_000),
        ("proof.depth", 3),  # three siblings expected, two given
        ("proof.position", 4),  # no slot in a tree of depth 2
        ("proof.siblings", []),
        ("proof.asset", "btc"),
    ],
)
def test_client_proof_strict_decoding(path: str, value: Any) -> None:
    wire = proof_wire()
    if path.startswith("proof."):
        wire["proof"][path.removeprefix("proof.")] = value
    else:
        wire[path] = value
    with pytest.raises(DecodeError):
        ClientProof.from_wire(wire)


def test_a_float_in_a_client_proof_is_rejected() -> None:
    data = json.dumps(proof_wire()).replace('"sequence": 1', '"sequence": 1.0').encode()
    with pytest.raises(FloatRejected):
        ClientProof.from_wire(parse_json_object(data))


def test_client_proof_version_true_is_rejected() -> None:
    with pytest.raises(DecodeError):
        client_proof(version=True)


# --- verify_client_proof ------------------------------------------------------------------------


def test_every_client_can_verify_its_own_leaf() -> None:
    for account, asset, _, quantity in HOLDINGS:
        assert verify_client_proof(client_proof(account, asset), statement=STATEMENT) == quantity


@pytest.mark.parametrize(
    "statement",
    [
        make_statement(sequence=2, previous=hashlib.sha256(b"one").digest()),
        make_statement(custodian="custodian-b"),
        make_statement(exchange="exchange-y"),
        make_statement(issued_at=NOW + timedelta(seconds=1)),  # same numbers, another digest
        make_statement(assets=compute_asset_roots(TREES, decimals={"BTC": 8, "USDC": 2})),
    ],
)
def test_proof_for_another_statement_is_refused(statement: Statement) -> None:
    with pytest.raises(InvalidProof):
        verify_client_proof(client_proof(), statement=statement)


@pytest.mark.parametrize(
    "changes",
    [
        {"custodian": "custodian-b"},
        {"exchange": "exchange-y"},
        {"sequence": 2},
        {"statement_digest": hashlib.sha256(b"another statement").digest()},
    ],
)
def test_proof_that_names_another_statement_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidProof):
        verify_client_proof(client_proof(**changes), statement=STATEMENT)


@pytest.mark.parametrize(
    "wrong_salt",
    [
        salt("alice", "USDC"),
        salt("alice", "BTC", exchange="exchange-y"),
        salt("bob", "BTC"),
        bytes(32),
    ],
)
def test_wrong_salt_is_refused(wrong_salt: bytes) -> None:
    with pytest.raises(InvalidProof):
        verify_client_proof(client_proof(salt=wrong_salt), statement=STATEMENT)


def test_a_proof_cannot_be_claimed_by_another_account() -> None:
    # bob presents alice's path, with his own salt or with hers
    for claimed_salt in (salt("bob", "BTC"), salt("alice", "BTC")):
        proof = replace(client_proof("alice", "BTC"), account="bob", salt=claimed_salt)
        with pytest.raises(InvalidProof):
            verify_client_proof(proof, statement=STATEMENT)


def test_a_proof_cannot_be_moved_to_another_asset() -> None:
    btc = client_proof("alice", "BTC")
    assert TREES["BTC"].depth == TREES["USDC"].depth  # only the asset differs
    as_usdc = replace(btc, proof=replace(btc.proof, asset="USDC"), salt=salt("alice", "USDC"))
    with pytest.raises(InvalidProof):
        verify_client_proof(as_usdc, statement=STATEMENT)
    as_eth = replace(btc, proof=replace(btc.proof, asset="ETH"))
    with pytest.raises(InvalidProof):
        verify_client_proof(as_eth, statement=STATEMENT)


def test_proof_of_another_depth_is_refused() -> None:
    deeper = {
        asset: SumTree.build(asset, list(tree.iter_leaves()), depth=tree.depth + 1)
        for asset, tree in TREES.items()
    }
    # Same leaves, same total, deeper tree: the proof is valid for that tree, not this statement.
    with pytest.raises(InvalidProof):
        verify_client_proof(client_proof(trees=deeper), statement=STATEMENT)
    deep_statement = make_statement(deeper)
    assert (
        verify_client_proof(
            client_proof(statement=deep_statement, trees=deeper), statement=deep_statement
        )
        == 150_000_000
    )
    with pytest.raises(InvalidProof):
        verify_client_proof(client_proof(statement=deep_statement), statement=deep_statement)


def _tampered(proof: InclusionProof, how: str) -> InclusionProof:
    siblings = list(proof.siblings)
    digest, total = siblings[0]
    if how == "sibling hash":
        siblings[0] = (bytes([digest[0] ^ 1]) + digest[1:], total)
    elif how == "sibling sum":
        siblings[0] = (digest, total + 1)
    elif how == "upper sibling sum":
        siblings[-1] = (siblings[-1][0], siblings[-1][1] - 1)
    elif how == "quantity":
        return replace(proof, quantity=proof.quantity + 1)
    elif how == "position":
        return replace(proof, position=proof.position ^ 1)
    return replace(proof, siblings=tuple(siblings))


@pytest.mark.parametrize(
    "how", ["sibling hash", "sibling sum", "upper sibling sum", "quantity", "position"]
)
def test_tampered_proof_is_refused(how: str) -> None:
    honest = client_proof("alice", "USDC")
    assert honest.proof.siblings[-1][1] > 0
    tampered = replace(honest, proof=_tampered(honest.proof, how))
    with pytest.raises(InvalidProof):
        verify_client_proof(tampered, statement=STATEMENT)


def test_statement_total_that_is_not_the_root_sum_is_caught_by_the_client() -> None:
    btc, usdc = STATEMENT.assets
    lying = make_statement(assets=(replace(btc, total=btc.total + 1), usdc))
    with pytest.raises(SumMismatch):
        verify_client_proof(client_proof(statement=lying), statement=lying)


@st.composite
def holdings(draw: st.DrawFn) -> list[DisclosedLeaf]:
    accounts = draw(
        st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), min_size=1, max_size=12, unique=True)
    )
    positions = draw(
        st.lists(st.integers(0, 63), min_size=len(accounts), max_size=len(accounts), unique=True)
    )
    return [
        DisclosedLeaf(
            account,
            asset,
            position,
            salt(account, asset),
            draw(st.integers(0, 2**100)),
        )
        for asset in ("BTC", "USDC")
        for account, position in zip(accounts, positions, strict=True)
    ]


@settings(max_examples=40, deadline=None)
@given(leaves=holdings())
def test_every_disclosed_leaf_yields_a_verifying_client_proof(leaves: list[DisclosedLeaf]) -> None:
    trees = build_trees(leaves)
    statement = make_statement(trees)
    for item in leaves:
        proof = ClientProof(
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            sequence=1,
            statement_digest=statement.compute_digest(),
            account=item.account,
            salt=item.salt,
            proof=trees[item.asset].prove(item.position),
        )
        decoded = ClientProof.from_wire(parse_json_object(compute_canonical_bytes(proof.to_wire())))
        assert verify_client_proof(decoded, statement=statement) == item.quantity


# --- what a receiver gets with each statement ---------------------------------------------------

BOB_MOVED = DisclosedLeaf("bob", "BTC", 3, salt("bob", "BTC"), 42)
"""bob's BTC leaf moved from position 1 to the free position 3 (same account, same salt)."""


def depths_of(statement: Statement) -> dict[str, int]:
    return {root.asset: root.depth for root in statement.assets}


def delta_after(
    previous: Statement, leaves: list[DisclosedLeaf], *, sequence: int | None = None
) -> Statement:
    """The delta that follows ``previous`` and whose roots are those of ``leaves`` at
    ``previous``'s depths. The trees are built directly, without the one-account-one-leaf rule,
    so that a test can sign roots that break it."""
    trees = {
        asset: SumTree.build(
            asset, [item.to_leaf() for item in leaves if item.asset == asset], depth=depth
        )
        for asset, depth in depths_of(previous).items()
    }
    return make_statement(
        trees,
        sequence=previous.sequence + 1 if sequence is None else sequence,
        previous=previous.compute_digest(),
        kind=StatementKind.DELTA,
        issued_at=previous.issued_at + timedelta(seconds=1),
        expires_at=previous.expires_at + timedelta(seconds=1),
    )


def moved_leaves() -> list[DisclosedLeaf]:
    return [
        BOB_MOVED if (item.account, item.asset) == ("bob", "BTC") else item
        for item in sample_leaves()
    ]


MOVE = delta_after(STATEMENT, moved_leaves())


def move_disclosure() -> LeafDisclosure:
    return LeafDisclosure.for_statement(MOVE, [BOB_MOVED], [ClearedSlot("BTC", 1)])


# --- ClearedSlot --------------------------------------------------------------------------------


def test_cleared_slot_bounds_and_round_trip() -> None:
    for slot in (ClearedSlot("BTC", 0), ClearedSlot("USDC", MAX_POSITION)):
        wire = slot.to_wire()
        assert wire == {"asset": slot.asset, "position": slot.position}
        assert ClearedSlot.from_wire(parse_json_object(compute_canonical_bytes(wire))) == slot


@pytest.mark.parametrize(
    ("asset", "position"),
    [
        ("btc", 0),
        ("B", 0),
        (None, 0),
        ("BTC", -1),
        ("BTC", MAX_POSITION + 1),
        ("BTC", True),
        ("BTC", "1"),
        ("BTC", 1.0),
        ("BTC", None),
    ],
)
def test_cleared_slot_rejects(asset: Any, position: Any) -> None:
    with pytest.raises(DecodeError):
        ClearedSlot(asset, position)
    with pytest.raises(DecodeError):
        ClearedSlot.from_wire({"asset": asset, "position": position})


def test_cleared_slot_members_are_exact() -> None:
    good = ClearedSlot("BTC", 1).to_wire()
    for key in good:
        wire = dict(good)
        del wire[key]
        with pytest.raises(DecodeError):
            ClearedSlot.from_wire(wire)
    with pytest.raises(DecodeError):
        ClearedSlot.from_wire({**good, "account": "bob"})
    for not_an_object in ([good], None, "BTC:1"):
        with pytest.raises(DecodeError):
            ClearedSlot.from_wire(not_an_object)


# --- LeafDisclosure -----------------------------------------------------------------------------


def test_disclosure_is_bound_to_its_statement() -> None:
    disclosure = move_disclosure()
    assert (disclosure.custodian, disclosure.exchange, disclosure.sequence) == (
        CUSTODIAN,
        EXCHANGE,
        2,
    )
    assert disclosure.statement_digest == MOVE.compute_digest()
    assert disclosure.set_leaves == (BOB_MOVED,)
    assert disclosure.clear == (ClearedSlot("BTC", 1),)
    snapshot = LeafDisclosure.for_statement(STATEMENT, sample_leaves())
    assert snapshot.clear == ()
    assert snapshot.statement_digest == STATEMENT.compute_digest()


def test_disclosure_wire_round_trip() -> None:
    for original in (move_disclosure(), LeafDisclosure.for_statement(STATEMENT, sample_leaves())):
        data = compute_canonical_bytes(original.to_wire())
        decoded = LeafDisclosure.from_wire(parse_json_object(data))
        assert decoded == original
        assert compute_canonical_bytes(decoded.to_wire()) == data
    wire = move_disclosure().to_wire()
    assert wire["set"] == [BOB_MOVED.to_wire()]
    assert wire["clear"] == [{"asset": "BTC", "position": 1}]
    assert wire["statement"] == MOVE.compute_digest().hex()


def disclosure_wire() -> dict[str, Any]:
    return copy.deepcopy(move_disclosure().to_wire())


@pytest.mark.parametrize("level", ["disclosure", "set", "clear"])
def test_disclosure_members_are_exact(level: str) -> None:
    def target(wire: dict[str, Any]) -> dict[str, Any]:
        inner: dict[str, Any] = wire if level == "disclosure" else wire[level][0]
        return inner

    for key in sorted(target(disclosure_wire())):
        wire = disclosure_wire()
        del target(wire)[key]
        with pytest.raises(DecodeError):
            LeafDisclosure.from_wire(wire)
    wire = disclosure_wire()
    target(wire)["note"] = "x"
    with pytest.raises(DecodeError):
        LeafDisclosure.from_wire(wire)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("version", 2),
        ("version", True),
        ("version", "1"),
        ("version", None),
        ("custodian", "Custodian A"),
        ("exchange", None),
        ("sequence", 0),
        ("sequence", "2"),
        ("sequence", True),
        ("sequence", 2**53),
        ("statement", MOVE.compute_digest().hex().upper()),
        ("statement", MOVE.compute_digest().hex()[:-2]),
        ("statement", None),
        ("set", {}),
        ("set", None),
        ("set", "[]"),
        ("clear", None),
        ("clear", {"asset": "BTC", "position": 1}),
        ("set.0", None),
        ("set.0", []),
        ("set.0.quantity", 42),
        ("set.0.position", "3"),
        ("set.0.salt", salt("bob", "BTC").hex().upper()),
        ("clear.0", ["BTC", 1]),
        ("clear.0.asset", "btc"),
        ("clear.0.asset", 1),
        ("clear.0.position", "1"),
        ("clear.0.position", True),
        ("clear.0.position", -1),
        ("clear.0.position", MAX_POSITION + 1),
    ],
)
def test_disclosure_strict_decoding(path: str, value: Any) -> None:
    wire = disclosure_wire()
    *parents, last = path.split(".")
    target: Any = wire
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[int(last) if last.isdigit() else last] = value
    with pytest.raises(DecodeError):
        LeafDisclosure.from_wire(wire)


def test_a_float_in_a_disclosure_is_rejected() -> None:
    data = json.dumps(disclosure_wire()).replace('"sequence": 2', '"sequence": 2.0').encode()
    with pytest.raises(FloatRejected):
        LeafDisclosure.from_wire(parse_json_object(data))


def test_disclosure_is_limited_to_max_leaves() -> None:
    wire = LeafDisclosure.for_statement(STATEMENT, sample_leaves()).to_wire()
    count = len(HOLDINGS)
    assert len(LeafDisclosure.from_wire(wire, max_leaves=count).set_leaves) == count
    with pytest.raises(DecodeError):
        LeafDisclosure.from_wire(wire, max_leaves=count - 1)
    clears = [ClearedSlot("BTC", 0), ClearedSlot("BTC", 2)]
    wire = LeafDisclosure.for_statement(MOVE, [], clears).to_wire()
    assert len(LeafDisclosure.from_wire(wire, max_leaves=2).clear) == 2
    with pytest.raises(DecodeError):
        LeafDisclosure.from_wire(wire, max_leaves=1)


@pytest.mark.parametrize(
    "changes",
    [
        {"version": 2},
        {"custodian": "Custodian A"},
        {"exchange": ""},
        {"sequence": 0},
        {"sequence": True},
        {"statement_digest": bytes(31)},
        {"statement_digest": MOVE.compute_digest().hex()},
        {"set_leaves": (BOB_MOVED.to_wire(),)},
        {"clear": (("BTC", 1),)},
    ],
)
def test_disclosure_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        replace(move_disclosure(), **changes)


# --- ReceiverTrees ------------------------------------------------------------------------------


def heads(receiver: ReceiverTrees) -> dict[str, tuple[bytes, int, int, int]]:
    return {
        asset: (tree.root, tree.total, tree.count, tree.depth)
        for asset, tree in receiver.trees.items()
    }


def stated_heads(statement: Statement) -> dict[str, tuple[bytes, int, int, int]]:
    return {r.asset: (r.root, r.total, r.count, r.depth) for r in statement.assets}


def owners(receiver: ReceiverTrees) -> dict[tuple[str, int], str | None]:
    """Who holds each position of each asset, over more positions than any test uses."""
    return {
        (asset, position): receiver.account_at(asset, position)
        for asset in ("BTC", "USDC", "ETH")
        for position in range(8)
    }


def after_snapshot() -> ReceiverTrees:
    receiver = ReceiverTrees(DECIMALS)
    receiver.plan(STATEMENT, LeafDisclosure.for_statement(STATEMENT, sample_leaves())).apply()
    return receiver


def test_snapshot_is_planned_then_applied() -> None:
    receiver = ReceiverTrees(DECIMALS)
    plan = receiver.plan(STATEMENT, LeafDisclosure.for_statement(STATEMENT, sample_leaves()))
    # Planning checked everything and changed nothing.
    assert receiver.trees == {}
    assert set(owners(receiver).values()) == {None}
    plan.apply()
    assert heads(receiver) == stated_heads(STATEMENT)
    for account, asset, position, _ in HOLDINGS:
        assert receiver.account_at(asset, position) == account
    assert receiver.account_at("BTC", 3) is None
    assert receiver.account_at("ETH", 0) is None


def test_delta_plan_changes_nothing_before_it_is_applied() -> None:
    receiver = after_snapshot()
    before_heads, before_owners = heads(receiver), owners(receiver)
    plan = receiver.plan(MOVE, move_disclosure())
    assert heads(receiver) == before_heads
    assert owners(receiver) == before_owners
    plan.apply()
    assert heads(receiver) == stated_heads(MOVE)
    assert heads(receiver) != before_heads


@pytest.mark.parametrize("kind", ["snapshot", "delta"])
def test_a_plan_applies_once(kind: str) -> None:
    receiver = ReceiverTrees(DECIMALS) if kind == "snapshot" else after_snapshot()
    statement, disclosure = (
        (STATEMENT, LeafDisclosure.for_statement(STATEMENT, sample_leaves()))
        if kind == "snapshot"
        else (MOVE, move_disclosure())
    )
    plan = receiver.plan(statement, disclosure)
    plan.apply()
    applied_heads, applied_owners = heads(receiver), owners(receiver)
    with pytest.raises(InvariantViolation):
        plan.apply()
    assert heads(receiver) == applied_heads == stated_heads(statement)
    assert owners(receiver) == applied_owners


@pytest.mark.parametrize("deeper", [False, True])
def test_restore_is_the_state_the_snapshot_left(deeper: bool) -> None:
    statement = STATEMENT
    if deeper:  # positions are stable and trees never shrink: depth need not be the smallest
        statement = make_statement(
            {
                asset: SumTree.build(asset, list(tree.iter_leaves()), depth=tree.depth + 2)
                for asset, tree in TREES.items()
            }
        )
    applied = ReceiverTrees(DECIMALS)
    applied.plan(statement, LeafDisclosure.for_statement(statement, sample_leaves())).apply()
    restored = ReceiverTrees.restore(DECIMALS, sample_leaves(), depths=depths_of(statement))
    assert heads(restored) == heads(applied) == stated_heads(statement)
    assert owners(restored) == owners(applied)
    # And both go on the same way: the same delta is accepted by both, with the same result.
    move = delta_after(statement, moved_leaves())
    disclosure = LeafDisclosure.for_statement(move, [BOB_MOVED], [ClearedSlot("BTC", 1)])
    for receiver in (applied, restored):
        receiver.plan(move, disclosure).apply()
    assert heads(restored) == heads(applied) == stated_heads(move)
    assert owners(restored) == owners(applied)


def test_restore_keeps_an_asset_whose_leaves_are_all_gone() -> None:
    restored = ReceiverTrees.restore(DECIMALS, [], depths={"BTC": 2})
    assert heads(restored) == {"BTC": (SumTree("BTC", depth=2).root, 0, 0, 2)}


def test_delta_may_move_an_account_to_another_position() -> None:
    receiver = after_snapshot()
    receiver.plan(MOVE, move_disclosure()).apply()
    assert heads(receiver) == stated_heads(MOVE)
    assert receiver.account_at("BTC", 1) is None
    assert receiver.account_at("BTC", 3) == "bob"
    assert receiver.account_at("USDC", 1) == "dave"  # other assets untouched


@pytest.mark.parametrize(
    "second_salt",
    [hashlib.sha256(b"a second salt for bob").digest(), salt("bob", "BTC")],
    ids=["fresh salt: only the account check can see it", "same salt"],
)
def test_delta_cannot_give_an_account_a_second_position(second_salt: bytes) -> None:
    receiver = after_snapshot()
    before_heads, before_owners = heads(receiver), owners(receiver)
    second = replace(BOB_MOVED, salt=second_salt)
    statement = MOVE
    if second_salt != salt("bob", "BTC"):
        # Signed roots that include both of bob's leaves, so the roots would match.
        statement = delta_after(STATEMENT, [*sample_leaves(), second])
    with pytest.raises(DuplicateLeaf):
        receiver.plan(statement, LeafDisclosure.for_statement(statement, [second]))
    assert heads(receiver) == before_heads
    assert owners(receiver) == before_owners


def test_delta_cannot_set_one_account_twice_in_one_go() -> None:
    receiver = after_snapshot()
    twice = [
        DisclosedLeaf("zed", "BTC", 3, salt("zed", "BTC"), 1),
        DisclosedLeaf("zed", "BTC", 2, hashlib.sha256(b"zed again").digest(), 1),
    ]
    with pytest.raises(DuplicateLeaf):
        receiver.plan(MOVE, LeafDisclosure.for_statement(MOVE, twice))


def test_setting_an_occupied_position_replaces_its_leaf() -> None:
    receiver = after_snapshot()
    erin = DisclosedLeaf("erin", "BTC", 1, salt("erin", "BTC"), 5)
    leaves = [erin if (i.account, i.asset) == ("bob", "BTC") else i for i in sample_leaves()]
    statement = delta_after(STATEMENT, leaves)
    receiver.plan(statement, LeafDisclosure.for_statement(statement, [erin])).apply()
    assert receiver.account_at("BTC", 1) == "erin"
    assert "bob" not in {receiver.account_at("BTC", p) for p in range(8)}
    assert heads(receiver) == stated_heads(statement)


@pytest.mark.parametrize(
    "decimals",
    [{"BTC": 8}, {"USDC": 6}, {"BTC": 7, "USDC": 6}, {"BTC": 8, "USDC": 18}],
    ids=["USDC unknown", "BTC unknown", "BTC decimals differ", "USDC decimals differ"],
)
def test_the_receivers_asset_table_decides(decimals: dict[str, int]) -> None:
    receiver = ReceiverTrees(decimals)
    with pytest.raises(PolicyViolation):
        receiver.plan(STATEMENT, LeafDisclosure.for_statement(STATEMENT, sample_leaves()))
    assert receiver.trees == {}
    # An asset the receiver knows but the statement does not mention is fine.
    ReceiverTrees({**DECIMALS, "ETH": 18}).plan(
        STATEMENT, LeafDisclosure.for_statement(STATEMENT, sample_leaves())
    ).apply()


def test_delta_with_other_decimals_is_refused_after_a_snapshot() -> None:
    receiver = after_snapshot()
    before = heads(receiver)
    btc, usdc = MOVE.assets
    other = replace(MOVE, assets=(replace(btc, decimals=7), usdc))
    with pytest.raises(PolicyViolation):
        receiver.plan(
            other, LeafDisclosure.for_statement(other, [BOB_MOVED], move_disclosure().clear)
        )
    assert heads(receiver) == before


def test_a_disclosure_of_another_statement_is_refused() -> None:
    receiver = after_snapshot()
    with pytest.raises(WrongStream):
        receiver.plan(MOVE, LeafDisclosure.for_statement(STATEMENT, [BOB_MOVED]))
    other_exchange = replace(move_disclosure(), exchange="exchange-y")
    with pytest.raises(WrongStream):
        receiver.plan(MOVE, other_exchange)


def test_a_snapshot_disclosure_lists_leaves_and_clears_nothing() -> None:
    receiver = ReceiverTrees(DECIMALS)
    disclosure = LeafDisclosure.for_statement(STATEMENT, sample_leaves(), [ClearedSlot("BTC", 1)])
    with pytest.raises(DecodeError):
        receiver.plan(STATEMENT, disclosure)
    assert receiver.trees == {}


def test_a_snapshot_missing_a_leaf_does_not_reach_the_roots() -> None:
    receiver = ReceiverTrees(DECIMALS)
    with pytest.raises(RootMismatch):
        receiver.plan(STATEMENT, LeafDisclosure.for_statement(STATEMENT, sample_leaves()[1:]))


def test_a_plan_made_before_another_plan_was_applied_is_refused() -> None:
    receiver = after_snapshot()
    stale = receiver.plan(MOVE, move_disclosure())
    resnapshot = LeafDisclosure.for_statement(STATEMENT, sample_leaves())
    receiver.plan(STATEMENT, resnapshot).apply()
    with pytest.raises(InvariantViolation):
        stale.apply()


def test_a_snapshot_may_drop_an_asset_a_delta_may_not() -> None:
    """A snapshot replaces every tree, so an asset it no longer lists is gone (a resynchronising
    snapshot after a gap may drop an asset emptied meanwhile); a delta keeps the trees, so every
    asset the receiver holds leaves of must keep its root."""
    btc = next(root for root in STATEMENT.assets if root.asset == "BTC")
    btc_leaves = [leaf for leaf in sample_leaves() if leaf.asset == "BTC"]
    only_btc = replace(STATEMENT, assets=(btc,))
    receiver = after_snapshot()
    assert receiver.trees["USDC"].count
    receiver.plan(only_btc, LeafDisclosure.for_statement(only_btc, btc_leaves)).apply()
    assert set(receiver.trees) == {"BTC"}
    assert heads(receiver) == stated_heads(only_btc)

    receiver = after_snapshot()
    before = heads(receiver)
    move_btc = replace(MOVE, assets=tuple(r for r in MOVE.assets if r.asset == "BTC"))
    with pytest.raises(RootMismatch):
        receiver.plan(
            move_btc,
            LeafDisclosure.for_statement(move_btc, [BOB_MOVED], move_disclosure().clear),
        )
    assert heads(receiver) == before
