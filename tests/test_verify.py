"""verify_statement: every failure has its own error, and nothing invalid is ever accepted."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestations.canonical import compute_canonical_bytes
from attestations.disclosure import (
    ClearedSlot,
    DisclosedLeaf,
    LeafDisclosure,
    ReceiverTrees,
    compute_asset_roots,
)
from attestations.errors import (
    AttestationError,
    BadSignature,
    BrokenChain,
    CounterpartyError,
    DecodeError,
    DuplicateLeaf,
    Expired,
    ForkDetected,
    FutureDated,
    InvariantViolation,
    KeyNotValid,
    MissingQuorum,
    NegativeSum,
    PolicyViolation,
    RevokedKey,
    RootMismatch,
    SequenceGap,
    SequenceReplay,
    SumMismatch,
    SumOverflow,
    UnknownKey,
    WrongStream,
)
from attestations.keys import KeyRecord, KeyRole
from attestations.merkle import SumTree
from attestations.signing import BlsCosigner, compute_quorum_signature
from attestations.statement import (
    AssetRoot,
    QuorumSignature,
    SignedStatement,
    Statement,
    StatementKind,
)
from attestations.verify import (
    ChainHead,
    VerificationPolicy,
    verify_statement,
    verify_statement_signatures,
)
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, NOW, World, custodian_signer, seed


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def accept(
    world: World,
    message: SignedStatement | bytes,
    *,
    head: ChainHead | None = None,
    now: datetime = NOW,
    receiver: ReceiverTrees | None = None,
    disclosure: LeafDisclosure | None = None,
    history: dict[int, bytes] | None = None,
    resync_from: int | None = None,
) -> ChainHead:
    """Verify as the exchange of the sample stream and apply the result. Without an explicit
    receiver, the receiver is fresh (no head) or holds the sample snapshot (with a head); without
    an explicit disclosure, the sample leaves (snapshot) or no change (delta) come along."""
    if receiver is None:
        receiver = world.receiver(after_snapshot=head is not None)
    if disclosure is None:
        try:
            signed = (
                message if isinstance(message, SignedStatement) else SignedStatement.decode(message)
            )
            disclosure = world.disclosure(signed.statement)
        except DecodeError:  # verify_statement must reject these bytes itself
            disclosure = world.disclosure(world.statement())
    verified = verify_statement(
        message,
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        registry=world.registry,
        head=head,
        now=now,
        receiver=receiver,
        disclosure=disclosure,
        history=history,
        resync_from=resync_from,
    )
    verified.trees_plan.apply()
    return verified.head


def test_snapshot_then_delta_chain_is_accepted(world: World) -> None:
    first = world.statement()
    head = accept(world, world.sign(first).encode())
    assert (head.sequence, head.digest) == (1, first.compute_digest())
    second = world.next_statement(first)
    head2 = accept(world, world.sign(second).encode(), head=head, now=NOW + timedelta(seconds=1))
    assert head2.sequence == 2
    assert head2.digest == second.compute_digest()


def test_every_signed_field_is_covered_by_the_signature(world: World) -> None:
    signed = world.sign(world.statement())
    wire = signed.to_wire()
    mutations: dict[str, Any] = {
        "sequence": 1,  # unchanged placeholder replaced below
        "issued_at": "2026-11-25T08:00:00.001Z",
        "expires_at": "2026-11-25T09:00:00.001Z",
        "assets.0.total": "150000043",
        "assets.0.root": "00" * 32,
        "assets.0.count": 2,
        "assets.0.depth": 3,
        "assets.0.decimals": 7,
        "assets.1.asset": "USDT",
        "prices.0.price": "64123.46",
        "prices.0.source": "file:other",
        "prices.0.observed_at": "2026-11-25T07:59:59.000Z",
        "prices.1.quote": "EUR",
    }
    del mutations["sequence"]
    for path, value in mutations.items():
        tampered = json.loads(json.dumps(wire))
        target = tampered["statement"]
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last if not last.isdigit() else int(last)] = value
        data = compute_canonical_bytes(tampered)
        with pytest.raises(BadSignature):
            accept(world, data)


@pytest.mark.parametrize(
    ("member", "value"), [("custodian", "custodian-b"), ("exchange", "exchange-y")]
)
def test_tampered_stream_members_are_a_wrong_stream(world: World, member: str, value: str) -> None:
    tampered = world.sign(world.statement()).to_wire()
    tampered["statement"][member] = value
    with pytest.raises(WrongStream):
        accept(world, compute_canonical_bytes(tampered))


def test_flipped_custodian_signature_is_rejected(world: World) -> None:
    signed = world.sign(world.statement())
    sig = bytearray(signed.custodian_signature.signature)
    sig[10] ^= 1
    bad = replace(
        signed, custodian_signature=replace(signed.custodian_signature, signature=bytes(sig))
    )
    with pytest.raises(BadSignature):
        accept(world, bad)


def test_key_not_in_registry_is_unknown(world: World) -> None:
    stranger = custodian_signer("stranger")
    with pytest.raises(UnknownKey):
        accept(world, world.sign(world.statement(), signer=stranger))


def test_revoked_key_rejected_after_revocation_time_only() -> None:
    w = World()
    statement = w.statement()
    w.registry.revoke(w.signer.key_id, at=NOW + timedelta(minutes=1))
    accept(w, w.sign(statement))  # issued before the revocation: still valid
    w.registry.revoke(w.signer.key_id, at=NOW)
    with pytest.raises(RevokedKey):
        accept(w, w.sign(statement))


def test_key_outside_its_window_and_rotation() -> None:
    w = World()
    new_signer = custodian_signer("custodian-next")
    w.registry.rotate(
        old_key_id=w.signer.key_id,
        new=KeyRecord(
            CUSTODIAN, KeyRole.CUSTODIAN, new_signer.public_key, NOW - timedelta(hours=2)
        ),
        overlap=timedelta(hours=1),
    )
    # The old key's window closed one hour before NOW.
    with pytest.raises(KeyNotValid):
        accept(w, w.sign(w.statement()))
    accept(w, w.sign(w.statement(), signer=new_signer))
    early = w.statement(issued_at=NOW - timedelta(days=31))
    with pytest.raises(KeyNotValid):
        verify_statement_signatures(w.sign(early, signer=new_signer), registry=w.registry, now=NOW)


def test_missing_quorum(world: World) -> None:
    with pytest.raises(MissingQuorum):
        accept(world, world.sign(world.statement(), cosigners=world.cosigners[:1]))


def test_unregistered_cosigner_does_not_count(world: World) -> None:
    outsider = BlsCosigner.from_seed(seed("outsider"))
    with pytest.raises(UnknownKey):
        accept(world, world.sign(world.statement(), cosigners=[world.cosigners[0], outsider]))


def test_revoked_cosigner_rejected() -> None:
    w = World()
    w.registry.revoke(w.cosigners[1].key_id, at=NOW - timedelta(seconds=1))
    with pytest.raises(RevokedKey):
        accept(w, w.sign(w.statement()))
    accept(w, w.sign(w.statement(), cosigners=[w.cosigners[0], w.cosigners[2]]))


def test_quorum_that_claims_a_signer_who_did_not_sign(world: World) -> None:
    statement = world.statement()
    digest = statement.compute_digest()
    # cosigners 0 and 2 signed, but the message claims 0 and 1.
    real = compute_quorum_signature(
        [world.cosigners[0].cosign(digest), world.cosigners[2].cosign(digest)]
    )
    claimed = QuorumSignature(
        signers=tuple(sorted([world.cosigners[0].key_id, world.cosigners[1].key_id])),
        signature=real.signature,
    )
    signed = replace(world.sign(statement), quorum_signature=claimed)
    with pytest.raises(BadSignature):
        accept(world, signed)


def test_quorum_signature_over_another_statement(world: World) -> None:
    one = world.sign(world.statement())
    other = world.sign(world.statement(issued_at=NOW - timedelta(seconds=5)))
    mixed = replace(one, quorum_signature=other.quorum_signature)
    with pytest.raises(BadSignature):
        accept(world, mixed)


def test_replay_of_the_accepted_and_of_an_older_statement(world: World) -> None:
    first = world.statement()
    head1 = accept(world, world.sign(first))
    with pytest.raises(SequenceReplay):
        accept(world, world.sign(first), head=head1)
    second = world.next_statement(first)
    head2 = accept(world, world.sign(second), head=head1, now=NOW + timedelta(seconds=1))
    with pytest.raises(SequenceReplay):
        accept(world, world.sign(first), head=head2, now=NOW + timedelta(seconds=1))


def test_sequence_gap(world: World) -> None:
    first = world.statement()
    head = accept(world, world.sign(first))
    third = world.next_statement(world.next_statement(first))
    with pytest.raises(SequenceGap):
        accept(world, world.sign(third), head=head, now=NOW + timedelta(seconds=2))


def test_delta_without_an_accepted_snapshot_is_a_gap(world: World) -> None:
    delta = world.next_statement(world.statement())
    with pytest.raises(SequenceGap):
        accept(world, world.sign(delta))


def test_fork_two_signed_statements_with_one_sequence(world: World) -> None:
    head = accept(world, world.sign(world.statement()))
    other = world.statement(issued_at=NOW - timedelta(seconds=1))
    with pytest.raises(ForkDetected):
        accept(world, world.sign(other), head=head)


def test_signed_successor_of_another_statement_is_a_fork(world: World) -> None:
    # A validly signed N+1 naming a different N proves the custodian signed two N's.
    first = world.statement()
    head = accept(world, world.sign(first))
    wrong_previous = world.next_statement(first, previous=bytes([7]) * 32)
    with pytest.raises(ForkDetected):
        accept(world, world.sign(wrong_previous), head=head, now=NOW + timedelta(seconds=1))


def test_broken_chain_time_runs_backwards(world: World) -> None:
    first = world.statement()
    head = accept(world, world.sign(first))
    backwards = world.next_statement(first, issued_at=NOW - timedelta(seconds=1))
    with pytest.raises(BrokenChain):
        accept(world, world.sign(backwards), head=head)


def test_chain_of_another_stream_is_rejected(world: World) -> None:
    first = world.statement()
    head = accept(world, world.sign(first))
    foreign = replace(head, exchange="exchange-z")
    with pytest.raises(BrokenChain):
        accept(
            world,
            world.sign(world.next_statement(first)),
            head=foreign,
            now=NOW + timedelta(seconds=1),
        )


def test_expired_has_no_grace(world: World) -> None:
    signed = world.sign(world.statement(lifetime=timedelta(minutes=5)))
    accept(world, signed, now=NOW + timedelta(minutes=5) - timedelta(milliseconds=1))
    with pytest.raises(Expired):
        accept(world, signed, now=NOW + timedelta(minutes=5))


def test_future_dated_beyond_the_skew_window(world: World) -> None:
    signed = world.sign(world.statement())
    skew = VerificationPolicy().max_clock_skew
    accept(world, signed, now=NOW - skew)
    with pytest.raises(FutureDated):
        accept(world, signed, now=NOW - skew - timedelta(milliseconds=1))


def test_roots_must_match_the_disclosed_leaves(world: World) -> None:
    signed = world.sign(world.statement())
    changed = [*world.leaves]
    changed[1] = DisclosedLeaf("bob", "BTC", 1, seed("salt-bob-btc"), 43)
    statement = signed.statement
    with pytest.raises(RootMismatch):
        accept(world, signed, disclosure=LeafDisclosure.for_statement(statement, changed))
    swapped = [*world.leaves]
    swapped[1] = DisclosedLeaf("bob", "BTC", 1, seed("another-salt"), 42)
    with pytest.raises(RootMismatch):
        accept(world, signed, disclosure=LeafDisclosure.for_statement(statement, swapped))
    with pytest.raises(RootMismatch):
        accept(world, signed, disclosure=LeafDisclosure.for_statement(statement, world.leaves[:3]))


def test_stated_total_that_is_not_the_sum_of_the_leaves(world: World) -> None:
    assets = world.assets()
    lying = (replace(assets[0], total=assets[0].total + 1), assets[1])
    signed = world.sign(world.statement(assets=lying))
    with pytest.raises(SumMismatch):
        accept(world, signed)


@pytest.mark.parametrize(
    ("total", "error"),
    [("-1", NegativeSum), (str(2**128), SumOverflow), ("1.5", DecodeError), ("01", DecodeError)],
)
def test_negative_and_overflowing_sums_on_the_wire(world: World, total: str, error: type) -> None:
    wire = world.sign(world.statement()).to_wire()
    wire["statement"]["assets"][0]["total"] = total
    with pytest.raises(error):
        accept(world, compute_canonical_bytes(wire))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"version":1}',
        b'{"version":1,"version":1}',
        b'{"statement":{},"custodian_signature":{},"quorum_signature":{},"version":1.0}',
    ],
)
def test_malformed_messages(world: World, data: bytes) -> None:
    with pytest.raises(DecodeError):
        accept(world, data)


def test_oversized_message(world: World) -> None:
    wire = world.sign(world.statement()).to_wire()
    wire["padding"] = "x" * 1_000_001
    with pytest.raises(DecodeError):
        accept(world, json.dumps(wire).encode())


def test_unknown_member_is_rejected_even_when_signed_parts_are_intact(world: World) -> None:
    wire = world.sign(world.statement()).to_wire()
    wire["statement"]["note"] = "unsigned extra"
    with pytest.raises(DecodeError):
        accept(world, compute_canonical_bytes(wire))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_no_single_byte_change_is_accepted_as_something_else(
    world: World, data: st.DataObject
) -> None:
    signed = world.sign(world.statement())
    wire = bytearray(signed.encode())
    index = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    value = data.draw(st.integers(min_value=0, max_value=255).filter(lambda v: v != wire[index]))
    wire[index] = value
    try:
        verified = verify_statement(
            bytes(wire),
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            registry=world.registry,
            head=None,
            now=NOW,
            receiver=world.receiver(),
            disclosure=world.disclosure(signed.statement),
        )
    except CounterpartyError:
        return
    # Accepting is only allowed if the change did not change what was signed.
    assert verified.signed == signed


def test_errors_are_attestation_or_decode_errors(world: World) -> None:
    # The dead-letter path relies on every rejection being a CounterpartyError with a reason.
    for cls in (BadSignature, MissingQuorum, SequenceGap, ForkDetected, Expired, RootMismatch):
        assert issubclass(cls, AttestationError)
        assert cls.reason
        assert not cls.retriable


# --- rules added for receivers of a stream ------------------------------------------------------


def test_statement_for_another_exchange_is_not_credited(world: World) -> None:
    other = replace(world.statement(), exchange="exchange-other")
    signed = world.sign(other)
    with pytest.raises(WrongStream):
        accept(world, signed, disclosure=LeafDisclosure.for_statement(other, world.leaves))


def test_revoked_key_cannot_backdate_into_acceptance() -> None:
    w = World()
    statement = w.statement(lifetime=timedelta(hours=2))  # dated before the revocation
    w.registry.revoke(w.signer.key_id, at=NOW + timedelta(minutes=1))
    with pytest.raises(RevokedKey):
        accept(w, w.sign(statement), now=NOW + timedelta(minutes=2))


def test_lifetime_longer_than_policy(world: World) -> None:
    with pytest.raises(PolicyViolation):
        accept(world, world.sign(world.statement(lifetime=timedelta(hours=25))))


def test_price_observed_after_issue(world: World) -> None:
    statement = world.statement()
    late = replace(statement.prices[0], observed_at=NOW + timedelta(minutes=1))
    signed = world.sign(replace(statement, prices=(late, statement.prices[1])))
    with pytest.raises(PolicyViolation):
        accept(world, signed)


@pytest.mark.parametrize("decimals", [{"BTC": 7, "USDC": 6}, {"USDC": 6}])
def test_asset_decimals_must_match_the_receivers_table(
    world: World, decimals: dict[str, int]
) -> None:
    with pytest.raises(PolicyViolation):
        accept(world, world.sign(world.statement()), receiver=ReceiverTrees(decimals))
    assert DECIMALS == {"BTC": 8, "USDC": 6}


def test_two_keys_of_one_cosigner_are_one_vote() -> None:
    w = World()
    second_key = BlsCosigner.from_seed(seed("cosigner-0-next"))
    w.registry.rotate(
        old_key_id=w.cosigners[0].key_id,
        new=KeyRecord(
            "cosigner-0",
            KeyRole.COSIGNER,
            second_key.public_key,
            NOW - timedelta(hours=1),
            proof_of_possession=second_key.proof_of_possession(),
            signs_for=CUSTODIAN,
        ),
        overlap=timedelta(hours=2),
    )
    with pytest.raises(MissingQuorum):
        accept(w, w.sign(w.statement(), cosigners=[w.cosigners[0], second_key]))
    accept(w, w.sign(w.statement(), cosigners=[second_key, w.cosigners[1]]))


def test_replay_is_rejected_before_any_signature_work(world: World) -> None:
    first = world.statement()
    head = accept(world, world.sign(first))
    empty = World.__new__(World)  # a registry that knows no key at all
    empty.registry = type(world.registry)()
    empty.leaves = world.leaves
    with pytest.raises(SequenceReplay):
        accept(empty, world.sign(first), head=head)


def test_different_statement_at_an_older_sequence_is_a_fork(world: World) -> None:
    first = world.statement()
    head1 = accept(world, world.sign(first))
    second = world.next_statement(first)
    head2 = accept(world, world.sign(second), head=head1, now=NOW + timedelta(seconds=1))
    history = {1: head1.digest}
    other_first = world.statement(issued_at=NOW - timedelta(seconds=3))
    with pytest.raises(ForkDetected):
        accept(world, world.sign(other_first), head=head2, history=history)
    with pytest.raises(SequenceReplay):
        accept(world, world.sign(first), head=head2, history=history)


def roots_of(leaves: list[DisclosedLeaf], *, depths: dict[str, int]) -> tuple[AssetRoot, ...]:
    """The asset roots of ``leaves`` at the given depths, without the one-account-one-leaf rule
    (so a test can sign a statement that breaks it)."""
    trees = {
        asset: SumTree.build(
            asset, [leaf.to_leaf() for leaf in leaves if leaf.asset == asset], depth=depth
        )
        for asset, depth in depths.items()
    }
    return compute_asset_roots(trees, decimals=DECIMALS)


def _delta_with(world: World, leaves: list[DisclosedLeaf]) -> tuple[SignedStatement, ChainHead]:
    """A snapshot accepted, then a delta whose roots are those of ``leaves``."""
    first = world.statement()
    head = accept(world, world.sign(first))
    depths = {root.asset: root.depth for root in first.assets}
    delta = world.next_statement(first, assets=roots_of(leaves, depths=depths))
    return world.sign(delta), head


def test_delta_sets_and_clears_leaves() -> None:
    w = World()
    receiver = w.receiver(after_snapshot=True)
    raised = DisclosedLeaf("bob", "BTC", 1, seed("salt-bob-btc"), 1_000)
    after = [w.leaves[0], raised, *w.leaves[3:]]  # carol's BTC leaf (position 2) is cleared
    first = w.statement()
    head = accept(w, w.sign(first))
    depths = {root.asset: root.depth for root in first.assets}
    delta = w.next_statement(first, assets=roots_of(after, depths=depths))
    disclosure = LeafDisclosure.for_statement(delta, [raised], [ClearedSlot("BTC", 2)])
    accept(
        w,
        w.sign(delta),
        head=head,
        now=NOW + timedelta(seconds=1),
        receiver=receiver,
        disclosure=disclosure,
    )
    assert receiver.trees["BTC"].total == 150_000_000 + 1_000
    assert receiver.trees["BTC"].count == 2
    assert receiver.account_at("BTC", 2) is None


def test_forged_delta_leaves_the_receiver_unchanged() -> None:
    w = World()
    receiver = w.receiver(after_snapshot=True)
    before = {asset: (t.root, t.total) for asset, t in receiver.trees.items()}
    mallory = DisclosedLeaf("mallory", "BTC", 3, seed("salt-mallory"), 10**20)
    signed, head = _delta_with(w, [*w.leaves, mallory])
    forged = w.sign(signed.statement, signer=custodian_signer("stranger"))
    with pytest.raises(UnknownKey):
        accept(
            w,
            forged,
            head=head,
            now=NOW + timedelta(seconds=1),
            receiver=receiver,
            disclosure=LeafDisclosure.for_statement(signed.statement, [mallory]),
        )
    assert {asset: (t.root, t.total) for asset, t in receiver.trees.items()} == before


def test_delta_cannot_give_an_account_a_second_leaf() -> None:
    w = World()
    receiver = w.receiver(after_snapshot=True)
    second = DisclosedLeaf("alice", "BTC", 3, seed("another-alice-salt"), 5)
    signed, head = _delta_with(w, [*w.leaves, second])
    with pytest.raises(DuplicateLeaf):
        accept(
            w,
            signed,
            head=head,
            now=NOW + timedelta(seconds=1),
            receiver=receiver,
            disclosure=LeafDisclosure.for_statement(signed.statement, [second]),
        )


def test_delta_is_all_or_nothing_across_assets() -> None:
    w = World()
    receiver = w.receiver(after_snapshot=True)
    before = {asset: (t.root, t.total) for asset, t in receiver.trees.items()}
    btc = DisclosedLeaf("bob", "BTC", 1, seed("salt-bob-btc"), 43)
    usdc = DisclosedLeaf("dave", "USDC", 1, seed("salt-dave-usdc"), 26)
    after = [w.leaves[0], btc, w.leaves[2], w.leaves[3], usdc]
    signed, head = _delta_with(w, after)
    wrong_usdc = replace(usdc, quantity=27)  # the USDC part does not reach the signed root
    with pytest.raises(RootMismatch):
        accept(
            w,
            signed,
            head=head,
            now=NOW + timedelta(seconds=1),
            receiver=receiver,
            disclosure=LeafDisclosure.for_statement(signed.statement, [btc, wrong_usdc]),
        )
    assert {asset: (t.root, t.total) for asset, t in receiver.trees.items()} == before


def test_disclosure_of_another_statement(world: World) -> None:
    signed = world.sign(world.statement())
    other = world.statement(issued_at=NOW - timedelta(seconds=1))
    with pytest.raises(WrongStream):
        accept(world, signed, disclosure=LeafDisclosure.for_statement(other, world.leaves))


def test_an_emptied_asset_may_leave_the_statement() -> None:
    w = World()
    receiver = ReceiverTrees({**DECIMALS, "ETH": 18})
    empty_eth = AssetRoot("ETH", 18, SumTree("ETH").root, 0, 0, 0)
    first = w.statement(assets=tuple(sorted((*w.assets(), empty_eth), key=lambda r: r.asset)))
    head = accept(w, w.sign(first), receiver=receiver)
    assert receiver.trees["ETH"].count == 0
    second = w.next_statement(first, assets=w.assets())  # ETH no longer listed
    accept(w, w.sign(second), head=head, now=NOW + timedelta(seconds=1), receiver=receiver)


# --- resynchronisation (step 6, after a gap) ------------------------------------------------------

LATER = NOW + timedelta(seconds=10)
UNLINKED = bytes([9]) * 32
"""The ``previous`` of a snapshot whose predecessor the receiver never saw."""


def _after_first_snapshot() -> tuple[World, ReceiverTrees, ChainHead]:
    w = World()
    receiver = w.receiver()
    head = accept(w, w.sign(w.statement()), receiver=receiver)
    return w, receiver, head


def _resync(
    w: World,
    statement: Statement,
    *,
    head: ChainHead,
    receiver: ReceiverTrees,
    resync_from: int | None = 2,
    now: datetime = LATER,
    disclosure: LeafDisclosure | None = None,
) -> tuple[ChainHead, bool]:
    signed = w.sign(statement)
    verified = verify_statement(
        signed.encode(),
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        registry=w.registry,
        head=head,
        now=now,
        receiver=receiver,
        disclosure=w.disclosure(statement) if disclosure is None else disclosure,
        resync_from=resync_from,
    )
    verified.trees_plan.apply()
    return verified.head, verified.resynchronised


def test_a_requested_snapshot_after_a_gap_is_accepted_without_linking_to_the_head() -> None:
    w, receiver, head = _after_first_snapshot()
    # Sequences 2..4 never arrived; meanwhile carol's BTC pledge went and erin's came.
    erin = DisclosedLeaf("erin", "BTC", 2, seed("salt-erin-btc"), 9)
    w.leaves = [*w.leaves[:2], erin, *w.leaves[3:]]
    snapshot = w.statement(sequence=5, previous=UNLINKED, issued_at=LATER)
    new_head, resynchronised = _resync(w, snapshot, head=head, receiver=receiver)
    assert resynchronised
    assert (new_head.sequence, new_head.digest) == (5, snapshot.compute_digest())
    assert receiver.account_at("BTC", 2) == "erin"
    assert receiver.trees["BTC"].total == 150_000_000 + 42 + 9
    # The stream continues from the new head as always.
    delta = w.next_statement(snapshot)
    after, linked_resync = _resync(
        w, delta, head=new_head, receiver=receiver, resync_from=None, now=LATER
    )
    assert (after.sequence, linked_resync) == (6, False)


def test_a_snapshot_at_exactly_the_requested_sequence_is_accepted() -> None:
    w, receiver, head = _after_first_snapshot()
    snapshot = w.statement(sequence=3, previous=UNLINKED, issued_at=LATER)
    new_head, resynchronised = _resync(w, snapshot, head=head, receiver=receiver, resync_from=3)
    assert (new_head.sequence, resynchronised) == (3, True)


def test_without_resync_from_the_same_snapshot_is_a_gap() -> None:
    w, receiver, head = _after_first_snapshot()
    snapshot = w.statement(sequence=5, previous=UNLINKED, issued_at=LATER)
    with pytest.raises(SequenceGap):
        _resync(w, snapshot, head=head, receiver=receiver, resync_from=None)


def test_a_delta_after_a_gap_still_gaps_while_waiting_for_the_snapshot() -> None:
    w, receiver, head = _after_first_snapshot()
    delta = w.statement(sequence=5, previous=UNLINKED, issued_at=LATER, kind=StatementKind.DELTA)
    with pytest.raises(SequenceGap):
        _resync(w, delta, head=head, receiver=receiver)


def test_a_snapshot_below_the_requested_sequence_still_gaps() -> None:
    w, receiver, head = _after_first_snapshot()
    snapshot = w.statement(sequence=4, previous=UNLINKED, issued_at=LATER)
    with pytest.raises(SequenceGap):
        _resync(w, snapshot, head=head, receiver=receiver, resync_from=5)


def test_a_resync_never_goes_back_to_or_behind_the_head() -> None:
    w, receiver, head = _after_first_snapshot()
    other_first = w.statement(issued_at=LATER)  # another statement at sequence 1
    with pytest.raises(ForkDetected):
        _resync(w, other_first, head=head, receiver=receiver, resync_from=1)
    with pytest.raises(SequenceReplay):
        _resync(w, w.statement(), head=head, receiver=receiver, resync_from=1)


def test_a_snapshot_right_after_the_head_must_still_link_to_it() -> None:
    w, receiver, head = _after_first_snapshot()
    unlinked = w.statement(sequence=2, previous=UNLINKED, issued_at=LATER)
    with pytest.raises(ForkDetected):  # a signed successor of another statement 1
        _resync(w, unlinked, head=head, receiver=receiver)
    linked = w.statement(sequence=2, previous=head.digest, issued_at=LATER)
    new_head, resynchronised = _resync(w, linked, head=head, receiver=receiver)
    assert (new_head.sequence, resynchronised) == (2, False)


def test_a_resync_snapshot_dated_before_the_head_is_a_broken_chain() -> None:
    w, receiver, head = _after_first_snapshot()
    snapshot = w.statement(sequence=5, previous=UNLINKED, issued_at=NOW - timedelta(seconds=1))
    with pytest.raises(BrokenChain):
        _resync(w, snapshot, head=head, receiver=receiver, now=NOW)


def test_a_resync_snapshot_gets_every_other_check() -> None:
    w, receiver, head = _after_first_snapshot()
    before = {asset: (t.root, t.total) for asset, t in receiver.trees.items()}
    snapshot = w.statement(sequence=5, previous=UNLINKED, issued_at=LATER)
    signed = w.sign(snapshot, cosigners=w.cosigners[:1])
    checks: list[tuple[type[Exception], dict[str, Any]]] = [
        (MissingQuorum, {"message": signed.encode()}),
        (
            UnknownKey,
            {"message": w.sign(snapshot, signer=custodian_signer("stranger")).encode()},
        ),
        (Expired, {"now": snapshot.expires_at}),
        (
            RootMismatch,
            {"disclosure": LeafDisclosure.for_statement(snapshot, w.leaves[:-1])},
        ),
    ]
    for error, changes in checks:
        arguments: dict[str, Any] = {
            "message": w.sign(snapshot).encode(),
            "custodian": CUSTODIAN,
            "exchange": EXCHANGE,
            "registry": w.registry,
            "head": head,
            "now": LATER,
            "receiver": receiver,
            "disclosure": w.disclosure(snapshot),
            "resync_from": 2,
        }
        with pytest.raises(error):
            verify_statement(**{**arguments, **changes})
    assert {asset: (t.root, t.total) for asset, t in receiver.trees.items()} == before


@pytest.mark.parametrize("resync_from", [0, -1, True])
def test_resync_from_must_be_a_positive_sequence(resync_from: int) -> None:
    w, receiver, head = _after_first_snapshot()
    snapshot = w.statement(sequence=5, previous=UNLINKED, issued_at=LATER)
    with pytest.raises(InvariantViolation):
        _resync(w, snapshot, head=head, receiver=receiver, resync_from=resync_from)
