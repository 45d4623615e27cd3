"""Signed checkpoints of the transparency log, and split-view detection between two parties."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from attestations.canonical import DOMAIN_STATEMENT, compute_digest
from attestations.checkpoint import (
    Checkpoint,
    SignedCheckpoint,
    sign_checkpoint,
    verify_checkpoint,
    verify_same_history,
)
from attestations.errors import (
    BadSignature,
    DecodeError,
    FloatRejected,
    FutureDated,
    KeyNotValid,
    RevokedKey,
    SplitView,
    UnknownKey,
)
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.p256 import SoftwareP256Signer
from attestations.signing import BlsCosigner
from attestations.translog import EMPTY_ROOT, TransparencyLog, TreeHead
from attestations.verify import DEFAULT_MAX_CLOCK_SKEW
from tests.world import custodian_signer, seed

NOW = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)
VALID_FROM = NOW - timedelta(days=30)
CUSTODIAN = "custodian-a"
OTHER_CUSTODIAN = "custodian-b"
EXCHANGE = "exchange-x"

SIGNER = custodian_signer("checkpoint-custodian")
OTHER_CUSTODIAN_SIGNER = custodian_signer("checkpoint-custodian-b")
EXCHANGE_SIGNER = custodian_signer("checkpoint-exchange")
CUSTODIAN_EXCHANGE_ROLE_SIGNER = custodian_signer("checkpoint-custodian-exchange-role")
REGULATOR_SIGNER = custodian_signer("checkpoint-regulator")
STRANGER = custodian_signer("checkpoint-stranger")
HEAD = TreeHead(size=3, root=hashlib.sha256(b"some root").digest())


def entry(label: str) -> bytes:
    return hashlib.sha256(b"statement " + label.encode()).digest()


@pytest.fixture(scope="module")
def cosigner() -> BlsCosigner:
    return BlsCosigner.from_seed(seed("checkpoint-cosigner"))


@pytest.fixture(scope="module")
def registry(cosigner: BlsCosigner) -> KeyRegistry:
    """Every kind of key next to the custodian's. Read-only: tests must not change it."""

    def p256(owner: str, role: KeyRole, signer: SoftwareP256Signer) -> KeyRecord:
        return KeyRecord(owner, role, signer.public_key, VALID_FROM)

    records = [
        p256(CUSTODIAN, KeyRole.CUSTODIAN, SIGNER),
        p256(OTHER_CUSTODIAN, KeyRole.CUSTODIAN, OTHER_CUSTODIAN_SIGNER),
        p256(EXCHANGE, KeyRole.EXCHANGE, EXCHANGE_SIGNER),
        p256(CUSTODIAN, KeyRole.EXCHANGE, CUSTODIAN_EXCHANGE_ROLE_SIGNER),
        p256("regulator-eu", KeyRole.REGULATOR, REGULATOR_SIGNER),
        KeyRecord(
            "auditor-one",
            KeyRole.COSIGNER,
            cosigner.public_key,
            VALID_FROM,
            proof_of_possession=cosigner.proof_of_possession(),
            signs_for=CUSTODIAN,
        ),
    ]
    return KeyRegistry.of(records, quorums={CUSTODIAN: 1})


def checkpoint(
    head: TreeHead = HEAD,
    *,
    custodian: str = CUSTODIAN,
    log: str = EXCHANGE,
    issued_at: datetime = NOW,
) -> Checkpoint:
    return Checkpoint(custodian=custodian, log=log, head=head, issued_at=issued_at)


def signed(cp: Checkpoint | None = None, signer: SoftwareP256Signer = SIGNER) -> SignedCheckpoint:
    return sign_checkpoint(checkpoint() if cp is None else cp, signer=signer)


# --- signing and verifying ----------------------------------------------------------------------


def test_signed_checkpoint_verifies(registry: KeyRegistry) -> None:
    cp = checkpoint()
    result = signed(cp)
    assert result.key_id == SIGNER.key_id
    assert verify_checkpoint(result, registry=registry, now=NOW) == cp


def test_empty_log_checkpoint_verifies(registry: KeyRegistry) -> None:
    cp = checkpoint(TreeHead(size=0, root=EMPTY_ROOT))
    assert verify_checkpoint(signed(cp), registry=registry, now=NOW) == cp


@pytest.mark.parametrize(
    "changes",
    [
        {"head": TreeHead(size=HEAD.size + 1, root=HEAD.root)},
        {"head": TreeHead(size=HEAD.size, root=hashlib.sha256(b"other root").digest())},
        {"issued_at": NOW + MS},
        {"issued_at": NOW - MS},
        {"log": "exchange-y"},
    ],
)
def test_tampered_checkpoint_is_a_bad_signature(
    registry: KeyRegistry, changes: dict[str, Any]
) -> None:
    original = signed()
    tampered = replace(original, checkpoint=replace(original.checkpoint, **changes))
    with pytest.raises(BadSignature):
        verify_checkpoint(tampered, registry=registry, now=NOW)


def test_tampered_custodian_points_at_a_key_it_does_not_own(registry: KeyRegistry) -> None:
    original = signed()
    for custodian in (OTHER_CUSTODIAN, "custodian-z"):
        tampered = replace(original, checkpoint=replace(original.checkpoint, custodian=custodian))
        with pytest.raises(UnknownKey):
            verify_checkpoint(tampered, registry=registry, now=NOW)


def test_tampered_signature_bytes(registry: KeyRegistry) -> None:
    original = signed()
    flipped = bytearray(original.signature)
    flipped[40] ^= 0x01
    with pytest.raises(BadSignature):
        verify_checkpoint(replace(original, signature=bytes(flipped)), registry=registry, now=NOW)
    another = signed(checkpoint(issued_at=NOW + timedelta(seconds=1)))
    with pytest.raises(BadSignature):
        verify_checkpoint(
            replace(original, signature=another.signature), registry=registry, now=NOW
        )


def test_tampered_wire_is_a_bad_signature(registry: KeyRegistry) -> None:
    wire = signed().to_wire()
    for key, value in (("size", 4), ("issued_at", "2026-11-25T08:00:00.001Z")):
        tampered = copy.deepcopy(wire)
        tampered["checkpoint"][key] = value
        decoded = SignedCheckpoint.decode(json.dumps(tampered).encode())
        with pytest.raises(BadSignature):
            verify_checkpoint(decoded, registry=registry, now=NOW)


def test_a_statement_domain_signature_is_not_a_checkpoint_signature(
    registry: KeyRegistry,
) -> None:
    cp = checkpoint()
    # The custodian key signs the same JSON, but as a statement digest.
    cross_domain = SIGNER.sign_digest(compute_digest(domain=DOMAIN_STATEMENT, obj=cp.to_wire()))
    forged = SignedCheckpoint(checkpoint=cp, key_id=SIGNER.key_id, signature=cross_domain)
    with pytest.raises(BadSignature):
        verify_checkpoint(forged, registry=registry, now=NOW)


# --- which keys may sign ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signer",
    [EXCHANGE_SIGNER, CUSTODIAN_EXCHANGE_ROLE_SIGNER, REGULATOR_SIGNER, STRANGER],
    ids=["exchange key", "custodian's exchange-role key", "regulator key", "unregistered key"],
)
def test_only_the_custodian_key_signs_checkpoints(
    registry: KeyRegistry, signer: SoftwareP256Signer
) -> None:
    with pytest.raises(UnknownKey):
        verify_checkpoint(signed(signer=signer), registry=registry, now=NOW)


def test_a_cosigner_id_cannot_stand_for_the_custodian(
    registry: KeyRegistry, cosigner: BlsCosigner
) -> None:
    original = signed()
    claimed = SignedCheckpoint(
        checkpoint=original.checkpoint, key_id=cosigner.key_id, signature=original.signature
    )
    with pytest.raises(UnknownKey):
        verify_checkpoint(claimed, registry=registry, now=NOW)


def revoked_at_now() -> KeyRegistry:
    """The custodian key alone, revoked at NOW."""
    registry = KeyRegistry()
    registry.register(KeyRecord(CUSTODIAN, KeyRole.CUSTODIAN, SIGNER.public_key, VALID_FROM))
    registry.revoke(SIGNER.key_id, at=NOW)
    return registry


def test_revoked_key_boundary() -> None:
    registry = revoked_at_now()
    verify_checkpoint(signed(checkpoint(issued_at=NOW - MS)), registry=registry, now=NOW - MS)
    with pytest.raises(RevokedKey):
        verify_checkpoint(signed(checkpoint(issued_at=NOW)), registry=registry, now=NOW)
    later = NOW + timedelta(days=1)
    with pytest.raises(RevokedKey):
        verify_checkpoint(signed(checkpoint(issued_at=later)), registry=registry, now=later)


def test_revoked_key_cannot_backdate_a_checkpoint() -> None:
    registry = revoked_at_now()
    backdated = signed(checkpoint(issued_at=NOW - timedelta(hours=1)))
    verify_checkpoint(backdated, registry=registry, now=NOW - MS)
    # Once the verifier's clock has passed the revocation, the date the key wrote counts for
    # nothing: whoever holds a revoked key can write any date.
    with pytest.raises(RevokedKey):
        verify_checkpoint(backdated, registry=registry, now=NOW)
    with pytest.raises(RevokedKey):
        verify_checkpoint(backdated, registry=registry, now=NOW + timedelta(days=30))


def test_checkpoint_outside_the_key_window(registry: KeyRegistry) -> None:
    with pytest.raises(KeyNotValid):
        verify_checkpoint(signed(checkpoint(issued_at=VALID_FROM - MS)), registry=registry, now=NOW)
    verify_checkpoint(signed(checkpoint(issued_at=VALID_FROM)), registry=registry, now=NOW)


# --- time ---------------------------------------------------------------------------------------


def test_future_dated_checkpoint_is_refused(registry: KeyRegistry) -> None:
    skew = DEFAULT_MAX_CLOCK_SKEW
    assert skew > timedelta(0)
    at_the_edge = checkpoint(issued_at=NOW + skew)
    assert verify_checkpoint(signed(at_the_edge), registry=registry, now=NOW) == at_the_edge
    with pytest.raises(FutureDated):
        verify_checkpoint(signed(checkpoint(issued_at=NOW + skew + MS)), registry=registry, now=NOW)
    with pytest.raises(FutureDated):
        verify_checkpoint(
            signed(checkpoint(issued_at=NOW + timedelta(days=365))), registry=registry, now=NOW
        )


def test_the_clock_skew_is_the_verifiers_choice(registry: KeyRegistry) -> None:
    ahead = signed(checkpoint(issued_at=NOW + timedelta(seconds=5)))
    verify_checkpoint(ahead, registry=registry, now=NOW, max_clock_skew=timedelta(seconds=5))
    with pytest.raises(FutureDated):
        verify_checkpoint(ahead, registry=registry, now=NOW, max_clock_skew=timedelta(seconds=4))
    with pytest.raises(FutureDated):
        verify_checkpoint(
            signed(checkpoint(issued_at=NOW + MS)),
            registry=registry,
            now=NOW,
            max_clock_skew=timedelta(0),
        )


def test_a_checkpoint_from_the_future_cannot_be_compared(registry: KeyRegistry) -> None:
    present = signed(checkpoint(issued_at=NOW))
    future = signed(checkpoint(issued_at=NOW + timedelta(hours=1)))
    for first, second in ((present, future), (future, present)):
        with pytest.raises(FutureDated):
            verify_same_history(first, second, registry=registry, proof=None, now=NOW)


# --- constructors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"version": 2},
        {"custodian": "Custodian A"},
        {"custodian": ""},
        {"log": "exchange x"},
        {"log": None},
        {"head": {"size": 3, "root": HEAD.root.hex()}},
        {"issued_at": NOW.replace(tzinfo=None)},
        {"issued_at": NOW + timedelta(microseconds=1)},
    ],
)
def test_checkpoint_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        replace(checkpoint(), **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"key_id": SIGNER.key_id.upper()},
        {"key_id": SIGNER.key_id[:-1]},
        {"signature": bytes(63)},
        {"signature": bytes(65)},
        {"signature": bytes(64).hex()},
        {"checkpoint": checkpoint().to_wire()},
    ],
)
def test_signed_checkpoint_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        replace(signed(), **changes)


def test_signed_checkpoint_version_is_checked() -> None:
    with pytest.raises(DecodeError):
        replace(signed(), version=2)


# --- wire form ----------------------------------------------------------------------------------


def test_wire_round_trip(registry: KeyRegistry) -> None:
    original = signed()
    data = original.encode()
    decoded = SignedCheckpoint.decode(data)
    assert decoded == original
    assert decoded.encode() == data
    assert verify_checkpoint(decoded, registry=registry, now=NOW) == original.checkpoint


def wire() -> dict[str, Any]:
    return copy.deepcopy(signed().to_wire())


def decode(data: dict[str, Any]) -> SignedCheckpoint:
    return SignedCheckpoint.decode(json.dumps(data).encode())


@pytest.mark.parametrize("nested", [False, True])
def test_members_are_exact(nested: bool) -> None:
    def target(data: dict[str, Any]) -> dict[str, Any]:
        inner: dict[str, Any] = data["checkpoint"]
        return inner if nested else data

    for key in sorted(target(wire())):
        data = wire()
        del target(data)[key]
        with pytest.raises(DecodeError):
            decode(data)
    data = wire()
    target(data)["note"] = "x"
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("version", 2),
        ("version", True),
        ("version", "1"),
        ("algorithm", "bls12381-g2-pop"),
        ("algorithm", None),
        ("key_id", SIGNER.key_id.upper()),
        ("key_id", SIGNER.key_id[:-2]),
        ("signature", "00" * 63),
        ("signature", "AB" * 64),
        ("signature", None),
        ("checkpoint", None),
        ("checkpoint.version", 2),
        ("checkpoint.version", True),
        ("checkpoint.size", -1),
        ("checkpoint.size", True),
        ("checkpoint.size", "3"),
        ("checkpoint.size", 2**53),
        ("checkpoint.size", 0),  # the empty tree has exactly one root
        ("checkpoint.root", HEAD.root.hex().upper()),
        ("checkpoint.root", HEAD.root.hex()[:-2]),
        ("checkpoint.issued_at", "2026-11-25T08:00:00Z"),
        ("checkpoint.issued_at", "2026-11-25T08:00:00.000+00:00"),
        ("checkpoint.log", "Exchange-X"),
        ("checkpoint.custodian", ""),
    ],
)
def test_strict_decoding(path: str, value: Any) -> None:
    data = wire()
    if path.startswith("checkpoint."):
        data["checkpoint"][path.removeprefix("checkpoint.")] = value
    else:
        data[path] = value
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize("spelling", [b"3.0", b"3e0", b"0.5"])
def test_a_float_size_is_rejected(spelling: bytes) -> None:
    data = json.dumps(wire()).encode()
    assert data.count(b'"size": 3') == 1
    with pytest.raises(FloatRejected):
        SignedCheckpoint.decode(data.replace(b'"size": 3', b'"size": ' + spelling))


def test_decode_respects_the_size_limit() -> None:
    data = signed().encode()
    with pytest.raises(DecodeError):
        SignedCheckpoint.decode(data, max_bytes=len(data) - 1)


# --- one history for everyone -------------------------------------------------------------------


@pytest.fixture
def logs() -> Iterator[tuple[TransparencyLog, TransparencyLog]]:
    """An honest log of four statements, and a fork that shares the first two and then shows
    other statements (three of them, so it is longer than the honest log at size 4)."""
    honest = TransparencyLog(":memory:")
    forked = TransparencyLog(":memory:")
    try:
        for label in ("1", "2", "3", "4"):
            honest.append(entry(label))
        for label in ("1", "2", "x3", "x4", "x5"):
            forked.append(entry(label))
        yield honest, forked
    finally:
        honest.close()
        forked.close()


LATER = NOW + timedelta(minutes=1)  # when the two parties compare what they were shown


def signed_head(
    log: TransparencyLog,
    size: int,
    *,
    log_name: str = EXCHANGE,
    issued_at: datetime | None = None,
) -> SignedCheckpoint:
    """The custodian's checkpoint of ``log`` at ``size``, issued (unless told otherwise) one
    second per entry after NOW: as an honest log grows, its checkpoints get later."""
    at = NOW + timedelta(seconds=size) if issued_at is None else issued_at
    return signed(checkpoint(log.head(size), log=log_name, issued_at=at))


def _pairs(sizes: Sequence[int]) -> list[tuple[int, int]]:
    return [(a, b) for a in sizes for b in sizes]


def test_honest_log_shows_one_history(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, _ = logs
    for a, b in _pairs([0, 1, 2, 3, 4]):
        proof = honest.prove_consistency(min(a, b), max(a, b))
        verify_same_history(
            signed_head(honest, a),
            signed_head(honest, b),
            registry=registry,
            proof=proof,
            now=LATER,
        )
        if a == b:
            verify_same_history(
                signed_head(honest, a),
                signed_head(honest, b),
                registry=registry,
                proof=None,
                now=LATER,
            )


def test_a_log_that_did_not_grow_is_one_history(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, _ = logs
    earlier = signed_head(honest, 3)
    again = signed_head(honest, 3, issued_at=NOW + timedelta(seconds=30))
    for first, second in ((earlier, again), (again, earlier)):
        verify_same_history(first, second, registry=registry, proof=None, now=LATER)


def test_a_later_checkpoint_with_fewer_entries_is_a_rollback(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, _ = logs
    seen_by_a = signed_head(honest, 4, issued_at=NOW + timedelta(seconds=4))
    # B is shown, later, the log as it was at size 2: a prefix of A's, so a consistency proof
    # joins them; only the dates show that the custodian rolled B's view back.
    seen_by_b = signed_head(honest, 2, issued_at=NOW + timedelta(seconds=10))
    proof = honest.prove_consistency(2, 4)
    for first, second in ((seen_by_a, seen_by_b), (seen_by_b, seen_by_a)):
        with pytest.raises(SplitView):
            verify_same_history(first, second, registry=registry, proof=proof, now=LATER)
    # The same two heads, dated in the order the log grew, are one history.
    earlier_b = signed_head(honest, 2, issued_at=NOW + timedelta(seconds=2))
    verify_same_history(seen_by_a, earlier_b, registry=registry, proof=proof, now=LATER)


def test_checkpoints_of_one_instant_compare_the_same_in_either_order(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, _ = logs
    small = signed_head(honest, 2, issued_at=NOW)
    large = signed_head(honest, 4, issued_at=NOW)  # two appends within one millisecond
    proof = honest.prove_consistency(2, 4)
    verify_same_history(small, large, registry=registry, proof=proof, now=LATER)
    verify_same_history(large, small, registry=registry, proof=proof, now=LATER)


def test_fork_at_the_same_size_is_a_split_view(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, forked = logs
    seen_by_a, seen_by_b = signed_head(honest, 3), signed_head(forked, 3)
    # Both checkpoints carry the custodian's valid signature: evidence, not an accusation.
    verify_checkpoint(seen_by_a, registry=registry, now=LATER)
    verify_checkpoint(seen_by_b, registry=registry, now=LATER)
    with pytest.raises(SplitView):
        verify_same_history(seen_by_a, seen_by_b, registry=registry, proof=None, now=LATER)
    with pytest.raises(SplitView):
        verify_same_history(
            seen_by_b, seen_by_a, registry=registry, proof=honest.prove_consistency(3, 3), now=LATER
        )


@pytest.mark.parametrize(
    ("honest_size", "forked_size", "prover"),
    [(4, 3, "honest"), (4, 5, "forked"), (3, 5, "forked"), (3, 4, "honest")],
)
def test_fork_at_different_sizes_is_a_split_view(
    registry: KeyRegistry,
    logs: tuple[TransparencyLog, TransparencyLog],
    honest_size: int,
    forked_size: int,
    prover: str,
) -> None:
    honest, forked = logs
    seen_by_a, seen_by_b = signed_head(honest, honest_size), signed_head(forked, forked_size)
    # Whichever history the custodian proves from, it cannot join the two heads.
    source = honest if prover == "honest" else forked
    proof = source.prove_consistency(min(honest_size, forked_size), max(honest_size, forked_size))
    with pytest.raises(SplitView):
        verify_same_history(seen_by_a, seen_by_b, registry=registry, proof=proof, now=LATER)
    with pytest.raises(SplitView):
        verify_same_history(seen_by_b, seen_by_a, registry=registry, proof=proof, now=LATER)


def test_shared_prefix_is_not_a_split_view(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, forked = logs
    # B has only seen the two entries both histories share; nothing contradicts yet.
    verify_same_history(
        signed_head(forked, 5),
        signed_head(honest, 2),
        registry=registry,
        proof=forked.prove_consistency(2, 5),
        now=LATER,
    )


def test_signatures_are_checked_before_histories_are_compared(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, forked = logs
    genuine = signed_head(honest, 3)
    forged = replace(genuine, checkpoint=checkpoint(forked.head(3)))
    with pytest.raises(BadSignature):
        verify_same_history(genuine, forged, registry=registry, proof=None, now=LATER)
    with pytest.raises(UnknownKey):
        verify_same_history(
            genuine,
            sign_checkpoint(checkpoint(forked.head(3)), signer=STRANGER),
            registry=registry,
            proof=None,
            now=LATER,
        )


def test_checkpoints_of_different_logs_cannot_be_compared(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, _ = logs
    other_log = signed_head(honest, 3, log_name="exchange-y")
    with pytest.raises(DecodeError):
        verify_same_history(
            signed_head(honest, 3), other_log, registry=registry, proof=None, now=LATER
        )
    other_custodian = sign_checkpoint(
        checkpoint(honest.head(3), custodian=OTHER_CUSTODIAN), signer=OTHER_CUSTODIAN_SIGNER
    )
    verify_checkpoint(other_custodian, registry=registry, now=LATER)
    with pytest.raises(DecodeError):
        verify_same_history(
            signed_head(honest, 3), other_custodian, registry=registry, proof=None, now=LATER
        )


def test_different_sizes_need_the_matching_consistency_proof(
    registry: KeyRegistry, logs: tuple[TransparencyLog, TransparencyLog]
) -> None:
    honest, _ = logs
    small, large = signed_head(honest, 2), signed_head(honest, 4)
    with pytest.raises(DecodeError):
        verify_same_history(small, large, registry=registry, proof=None, now=LATER)
    with pytest.raises(DecodeError):
        verify_same_history(
            small, large, registry=registry, proof=honest.prove_consistency(1, 4), now=LATER
        )
