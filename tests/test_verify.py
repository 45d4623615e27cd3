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
from attestations.disclosure import DisclosedLeaf, build_trees
from attestations.errors import (
    AttestationError,
    BadSignature,
    BrokenChain,
    CounterpartyError,
    DecodeError,
    Expired,
    ForkDetected,
    FutureDated,
    KeyNotValid,
    MissingQuorum,
    NegativeSum,
    RevokedKey,
    RootMismatch,
    SequenceGap,
    SequenceReplay,
    SumMismatch,
    SumOverflow,
    UnknownKey,
)
from attestations.keys import KeyRecord, KeyRole
from attestations.merkle import SumTree
from attestations.signing import BlsCosigner, compute_quorum_signature
from attestations.statement import QuorumSignature, SignedStatement
from attestations.verify import (
    ChainHead,
    VerificationPolicy,
    verify_statement,
    verify_statement_signatures,
)
from tests.world import CUSTODIAN, NOW, World, custodian_signer, seed


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def accept(
    world: World,
    message: SignedStatement | bytes,
    *,
    head: ChainHead | None = None,
    now: datetime = NOW,
    trees: dict[str, SumTree] | None = None,
) -> ChainHead:
    return verify_statement(message, registry=world.registry, head=head, now=now, trees=trees).head


def test_snapshot_then_delta_chain_is_accepted(world: World) -> None:
    first = world.statement()
    head = accept(world, world.sign(first).encode(), trees=world.trees())
    assert (head.sequence, head.digest) == (1, first.compute_digest())
    second = world.next_statement(first)
    head2 = accept(world, world.sign(second).encode(), head=head, now=NOW + timedelta(seconds=1))
    assert head2.sequence == 2
    assert head2.digest == second.compute_digest()


def test_every_signed_field_is_covered_by_the_signature(world: World) -> None:
    signed = world.sign(world.statement())
    wire = signed.to_wire()
    mutations: dict[str, Any] = {
        "exchange": "exchange-y",
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


def test_custodian_field_tamper_points_at_a_key_of_another_party(world: World) -> None:
    tampered = world.sign(world.statement()).to_wire()
    tampered["statement"]["custodian"] = "custodian-b"
    with pytest.raises(UnknownKey):
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
        verify_statement_signatures(w.sign(early, signer=new_signer), registry=w.registry)


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


def test_broken_chain_previous_and_time(world: World) -> None:
    first = world.statement()
    head = accept(world, world.sign(first))
    wrong_previous = world.next_statement(first, previous=bytes([7]) * 32)
    with pytest.raises(BrokenChain):
        accept(world, world.sign(wrong_previous), head=head, now=NOW + timedelta(seconds=1))
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
    with pytest.raises(RootMismatch):
        accept(world, signed, trees=build_trees(changed))
    swapped = [*world.leaves]
    swapped[1] = DisclosedLeaf("bob", "BTC", 1, seed("another-salt"), 42)
    with pytest.raises(RootMismatch):
        accept(world, signed, trees=build_trees(swapped))
    with pytest.raises(RootMismatch):
        accept(world, signed, trees=build_trees(world.leaves[:3]))


def test_stated_total_that_is_not_the_sum_of_the_leaves(world: World) -> None:
    assets = world.assets()
    lying = (replace(assets[0], total=assets[0].total + 1), assets[1])
    signed = world.sign(world.statement(assets=lying))
    with pytest.raises(SumMismatch):
        accept(world, signed, trees=world.trees())


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
        verified = verify_statement(bytes(wire), registry=world.registry, head=None, now=NOW)
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
