"""The co-signer's own checks: it co-signs only fresh statements that extend its view of a stream.

A custodian that could get two different statements at one sequence co-signed could show one
history to the exchange and another to a regulator. Each :class:`Cosigner` remembers the last
statement it co-signed per stream and refuses anything that is not its exact successor; with a
quorum of two of three, any two quorums share a co-signer, so two different statements at one
sequence can never both reach a quorum.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from attestations import bls
from attestations.errors import (
    AttestationError,
    BrokenChain,
    DecodeError,
    Expired,
    ForkDetected,
    FutureDated,
    MissingQuorum,
    PolicyViolation,
    SequenceGap,
    SequenceReplay,
)
from attestations.signing import CoSignature, Cosigner, sign_statement
from attestations.statement import Statement, StatementKind
from attestations.verify import VerificationPolicy, verify_statement_signatures
from tests.world import NOW, World

MS = timedelta(milliseconds=1)
SKEW = VerificationPolicy().max_clock_skew
MAX_LIFETIME = VerificationPolicy().max_lifetime


@pytest.fixture(scope="module")
def world() -> World:
    """Three registered co-signers (quorum two) and the custodian key. Read-only."""
    return World()


def cosigner(world: World, index: int = 0) -> Cosigner:
    """A fresh co-signer service (no statement co-signed yet) around a registered key."""
    return Cosigner(world.cosigners[index])


def chain(world: World, length: int) -> list[Statement]:
    """A snapshot and its deltas, one second apart."""
    statements = [world.statement()]
    while len(statements) < length:
        statements.append(world.next_statement(statements[-1]))
    return statements


def verify_cosignature(world: World, cosignature: CoSignature, statement: Statement) -> None:
    """Raise unless ``cosignature`` is a registered co-signer's signature over ``statement``."""
    index = [c.key_id for c in world.cosigners].index(cosignature.key_id)
    bls.verify_signature(
        public_key=world.cosigners[index].public_key,
        message=statement.compute_digest(),
        signature=cosignature.signature,
    )


# --- the honest stream --------------------------------------------------------------------------


def test_a_chain_is_cosigned_and_the_signatures_make_a_quorum(world: World) -> None:
    services = [cosigner(world, 0), cosigner(world, 1)]
    for statement in chain(world, 4):
        now = statement.issued_at
        cosignatures = [service.cosign(statement, now=now) for service in services]
        assert [c.key_id for c in cosignatures] == [world.cosigners[i].key_id for i in (0, 1)]
        for cosignature in cosignatures:
            verify_cosignature(world, cosignature, statement)
        signed = sign_statement(statement, custodian_signer=world.signer, cosignatures=cosignatures)
        verify_statement_signatures(signed, registry=world.registry, now=now)


def test_asking_again_for_the_last_statement_returns_its_signature(world: World) -> None:
    service = cosigner(world)
    first, second, third = chain(world, 3)
    one = service.cosign(first, now=NOW)
    assert service.cosign(first, now=NOW + timedelta(minutes=5)) == one
    two = service.cosign(second, now=NOW + timedelta(seconds=1))
    # A lost reply is asked for again: the same statement, the same signature.
    assert service.cosign(second, now=NOW + timedelta(seconds=2)) == two
    verify_cosignature(world, two, second)
    # ... and the stream goes on from there.
    verify_cosignature(world, service.cosign(third, now=NOW + timedelta(seconds=2)), third)


def test_the_first_statement_of_a_stream_may_be_any_snapshot(world: World) -> None:
    # A co-signer that joins late starts from the snapshot it is shown.
    late = world.statement(sequence=41, previous=bytes([9]) * 32)
    service = cosigner(world)
    service.cosign(late, now=NOW)
    service.cosign(world.next_statement(late), now=NOW + timedelta(seconds=1))


def test_streams_are_followed_separately(world: World) -> None:
    service = cosigner(world)
    first, second = chain(world, 2)
    service.cosign(first, now=NOW)
    service.cosign(second, now=NOW + timedelta(seconds=1))
    other_exchange = replace(world.statement(), exchange="exchange-y")
    # The other stream is at its start: a snapshot at sequence 1 is its first statement.
    service.cosign(other_exchange, now=NOW)
    service.cosign(world.next_statement(second), now=NOW + timedelta(seconds=2))
    with pytest.raises(SequenceGap):
        service.cosign(
            world.next_statement(world.next_statement(other_exchange)),
            now=NOW + timedelta(seconds=2),
        )


# --- time ---------------------------------------------------------------------------------------


def test_future_dated_statement_is_refused(world: World) -> None:
    statement = world.statement()
    with pytest.raises(FutureDated):
        cosigner(world).cosign(statement, now=NOW - SKEW - MS)
    cosigner(world).cosign(statement, now=NOW - SKEW)


def test_expired_statement_is_refused(world: World) -> None:
    statement = world.statement(lifetime=timedelta(minutes=5))
    with pytest.raises(Expired):
        cosigner(world).cosign(statement, now=statement.expires_at)
    with pytest.raises(Expired):
        cosigner(world).cosign(statement, now=statement.expires_at + timedelta(days=1))
    cosigner(world).cosign(statement, now=statement.expires_at - MS)


def test_statement_that_lives_longer_than_policy_is_refused(world: World) -> None:
    with pytest.raises(PolicyViolation):
        cosigner(world).cosign(world.statement(lifetime=MAX_LIFETIME + MS), now=NOW)
    cosigner(world).cosign(world.statement(lifetime=MAX_LIFETIME), now=NOW)


def test_the_policy_is_the_cosigners_own(world: World) -> None:
    strict = Cosigner(
        world.cosigners[0],
        policy=VerificationPolicy(max_clock_skew=timedelta(0), max_lifetime=timedelta(minutes=10)),
    )
    with pytest.raises(PolicyViolation):
        strict.cosign(world.statement(lifetime=timedelta(minutes=11)), now=NOW)
    with pytest.raises(FutureDated):
        strict.cosign(world.statement(), now=NOW - MS)
    strict.cosign(world.statement(lifetime=timedelta(minutes=10)), now=NOW)


def test_now_must_be_a_utc_millisecond_time(world: World) -> None:
    service = cosigner(world)
    with pytest.raises(DecodeError):
        service.cosign(world.statement(), now=NOW.replace(tzinfo=None))
    with pytest.raises(DecodeError):
        service.cosign(world.statement(), now=NOW + timedelta(microseconds=1))


# --- the stream: only the exact successor -------------------------------------------------------


def test_a_delta_as_the_first_statement_is_a_gap(world: World) -> None:
    delta = world.next_statement(world.statement())
    assert delta.kind is StatementKind.DELTA
    with pytest.raises(SequenceGap):
        cosigner(world).cosign(delta, now=NOW + timedelta(seconds=1))


def test_a_skipped_sequence_is_a_gap(world: World) -> None:
    first, second, third = chain(world, 3)
    service = cosigner(world)
    service.cosign(first, now=NOW)
    with pytest.raises(SequenceGap):
        service.cosign(third, now=NOW + timedelta(seconds=2))
    # Nothing was recorded: the real successor is still the next one.
    service.cosign(second, now=NOW + timedelta(seconds=2))


def test_a_different_statement_at_the_same_sequence_is_a_fork(world: World) -> None:
    first, second = chain(world, 2)
    other = world.statement(issued_at=NOW + MS)
    assert other.sequence == first.sequence
    assert other.compute_digest() != first.compute_digest()
    service = cosigner(world)
    service.cosign(first, now=NOW + MS)
    with pytest.raises(ForkDetected):
        service.cosign(other, now=NOW + MS)
    # The refused statement did not become the co-signer's view of the stream.
    with pytest.raises(ForkDetected):
        service.cosign(world.next_statement(other), now=NOW + timedelta(seconds=1))
    service.cosign(second, now=NOW + timedelta(seconds=1))


def test_a_successor_of_another_statement_is_a_fork(world: World) -> None:
    first = world.statement()
    service = cosigner(world)
    service.cosign(first, now=NOW)
    elsewhere = world.next_statement(first, previous=bytes([7]) * 32)
    with pytest.raises(ForkDetected):
        service.cosign(elsewhere, now=NOW + timedelta(seconds=1))
    # A snapshot at the next sequence must extend the last co-signed statement as well.
    fresh_snapshot = world.next_statement(
        first, previous=bytes([7]) * 32, kind=StatementKind.SNAPSHOT
    )
    with pytest.raises(ForkDetected):
        service.cosign(fresh_snapshot, now=NOW + timedelta(seconds=1))
    service.cosign(world.next_statement(first), now=NOW + timedelta(seconds=1))


def test_time_running_backwards_is_a_broken_chain(world: World) -> None:
    first = world.statement()
    service = cosigner(world)
    service.cosign(first, now=NOW)
    backwards = world.next_statement(first, issued_at=NOW - MS)
    with pytest.raises(BrokenChain):
        service.cosign(backwards, now=NOW)
    same_instant = world.next_statement(first, issued_at=NOW)
    service.cosign(same_instant, now=NOW)


def test_an_older_sequence_is_refused_and_changes_nothing(world: World) -> None:
    first, second, third = chain(world, 3)
    service = cosigner(world)
    service.cosign(first, now=NOW)
    service.cosign(second, now=NOW + timedelta(seconds=1))
    other_first = world.statement(issued_at=NOW + timedelta(seconds=1))
    for older in (first, other_first):
        with pytest.raises(AttestationError):
            service.cosign(older, now=NOW + timedelta(seconds=1))
    service.cosign(third, now=NOW + timedelta(seconds=2))


def test_an_older_sequence_is_reported_as_a_replay(world: World) -> None:
    first, second = chain(world, 2)
    service = cosigner(world)
    service.cosign(first, now=NOW)
    service.cosign(second, now=NOW + timedelta(seconds=1))
    with pytest.raises(SequenceReplay):
        service.cosign(first, now=NOW + timedelta(seconds=1))


# --- the equivocation defence -------------------------------------------------------------------


def test_two_statements_at_one_sequence_cannot_both_reach_a_quorum(world: World) -> None:
    services = [cosigner(world, i) for i in range(3)]
    assert world.registry.quorum_threshold(world.statement().custodian) == 2
    shown_to_the_exchange = world.statement()
    shown_to_the_regulator = world.statement(issued_at=NOW + MS)
    now = NOW + MS

    first = [services[i].cosign(shown_to_the_exchange, now=now) for i in (0, 1)]
    signed = sign_statement(
        shown_to_the_exchange, custodian_signer=world.signer, cosignatures=first
    )
    verify_statement_signatures(signed, registry=world.registry, now=now)

    # The custodian asks every co-signer for the second statement: both co-signers of the
    # first refuse, so only the third signs.
    second: list[CoSignature] = []
    for index, service in enumerate(services):
        if index in (0, 1):
            with pytest.raises(ForkDetected):
                service.cosign(shown_to_the_regulator, now=now)
        else:
            second.append(service.cosign(shown_to_the_regulator, now=now))
    assert len(second) == 1
    equivocation = sign_statement(
        shown_to_the_regulator, custodian_signer=world.signer, cosignatures=second
    )
    with pytest.raises(MissingQuorum):
        verify_statement_signatures(equivocation, registry=world.registry, now=now)


def test_the_fork_cannot_be_continued_either(world: World) -> None:
    # Nor can the custodian have the second history co-signed from the next sequence on.
    services = [cosigner(world, i) for i in (0, 1)]
    honest = world.statement()
    for service in services:
        service.cosign(honest, now=NOW)
    forked_first = world.statement(issued_at=NOW - timedelta(seconds=1))
    forked_next = world.next_statement(forked_first, issued_at=NOW + timedelta(seconds=1))
    for service in services:
        with pytest.raises(ForkDetected):
            service.cosign(forked_next, now=NOW + timedelta(seconds=1))
