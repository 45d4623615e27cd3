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
    ClientProof,
    DisclosedLeaf,
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
    NegativeSum,
    SumMismatch,
    SumOverflow,
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
