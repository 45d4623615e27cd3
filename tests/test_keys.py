"""The key registry: which keys are trusted, for whom, in which role, and when.

BLS registrations verify a proof of possession on py_ecc (about 0.3 s each), so the registries
holding a co-signer key are built once per module where no test changes them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from attestations.canonical import compute_canonical_bytes, compute_key_id, parse_json_object
from attestations.errors import (
    ConfigurationError,
    DecodeError,
    FloatRejected,
    InvalidProofOfPossession,
    KeyNotValid,
    RevokedKey,
    UnknownKey,
)
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.p256 import CURVE_P
from attestations.signing import BlsCosigner
from attestations.statement import BLS_ALGORITHM, MAX_COSIGNERS, P256_ALGORITHM
from tests.world import custodian_signer, seed

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
NONE = timedelta(0)
CUSTODIAN = "custodian-a"
OTHER_CUSTODIAN = "custodian-b"
EXCHANGE = "exchange-x"
COSIGNER_PARTY = "auditor-one"

P256_KEY = custodian_signer("keys-custodian").public_key
P256_OTHER = custodian_signer("keys-other").public_key
P256_THIRD = custodian_signer("keys-third").public_key


def p256_record(
    public_key: bytes = P256_KEY,
    *,
    owner: str = CUSTODIAN,
    role: KeyRole = KeyRole.CUSTODIAN,
    **changes: Any,
) -> KeyRecord:
    fields: dict[str, Any] = {
        "owner": owner,
        "role": role,
        "public_key": public_key,
        "valid_from": T0,
    }
    fields.update(changes)
    return KeyRecord(**fields)


def registry_of(*records: KeyRecord) -> KeyRegistry:
    registry = KeyRegistry()
    for record in records:
        registry.register(record)
    return registry


@pytest.fixture(scope="module")
def cosigner() -> BlsCosigner:
    return BlsCosigner.from_seed(seed("keys-cosigner"))


@pytest.fixture(scope="module")
def other_cosigner() -> BlsCosigner:
    return BlsCosigner.from_seed(seed("keys-other-cosigner"))


@pytest.fixture(scope="module")
def cosigner_record(cosigner: BlsCosigner) -> KeyRecord:
    return KeyRecord(
        COSIGNER_PARTY,
        KeyRole.COSIGNER,
        cosigner.public_key,
        T0,
        proof_of_possession=cosigner.proof_of_possession(),
        signs_for=CUSTODIAN,
    )


@pytest.fixture(scope="module")
def bls_registry(cosigner_record: KeyRecord) -> KeyRegistry:
    """Custodian key plus one co-signer. Read-only: tests must not change it."""
    return registry_of(p256_record(), cosigner_record)


# --- KeyRecord ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "algorithm"),
    [
        (KeyRole.CUSTODIAN, P256_ALGORITHM),
        (KeyRole.EXCHANGE, P256_ALGORITHM),
        (KeyRole.REGULATOR, P256_ALGORITHM),
    ],
)
def test_p256_roles_and_key_ids(role: KeyRole, algorithm: str) -> None:
    record = p256_record(role=role)
    assert record.algorithm == algorithm
    # The id a signer puts next to its signature is the id the registry files the key under.
    assert record.key_id == custodian_signer("keys-custodian").key_id
    assert record.key_id == compute_key_id(algorithm=algorithm, public_key=P256_KEY)


def test_cosigner_role_is_bls_and_its_id_matches_the_cosigner(
    cosigner: BlsCosigner, cosigner_record: KeyRecord
) -> None:
    assert cosigner_record.algorithm == BLS_ALGORITHM
    assert cosigner_record.key_id == cosigner.key_id


@pytest.mark.parametrize(
    "changes",
    [
        {"owner": ""},
        {"owner": "Custodian-a"},
        {"owner": "a" * 65},
        {"role": "custodian"},
        {"public_key": P256_KEY[:-1]},
        {"public_key": P256_KEY + b"\x00"},
        {"public_key": bytearray(P256_KEY)},
        {"public_key": P256_KEY.hex()},
        {"public_key": bytes(48)},  # a BLS-sized key in a P-256 role
        {"valid_from": T0.replace(tzinfo=None)},
        {"valid_from": T0 + timedelta(microseconds=1)},
        {"valid_until": T0},
        {"valid_until": T0 - MS},
        {"valid_until": (T0 + timedelta(days=1)).replace(tzinfo=None)},
        {"revoked_at": T0.replace(tzinfo=None)},
        {"revoked_at": T0 + timedelta(microseconds=1)},
        {"proof_of_possession": bytes(96)},  # P-256 keys have no proof of possession
        {"proof_of_possession": b""},
    ],
)
def test_key_record_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        p256_record(**changes)


def test_key_record_window_needs_one_millisecond() -> None:
    assert p256_record(valid_until=T0 + MS).valid_until == T0 + MS


def test_cosigner_record_needs_a_bls_key_and_a_proof(cosigner: BlsCosigner) -> None:
    with pytest.raises(DecodeError):
        KeyRecord(COSIGNER_PARTY, KeyRole.COSIGNER, cosigner.public_key, T0, signs_for=CUSTODIAN)
    with pytest.raises(DecodeError):
        KeyRecord(
            COSIGNER_PARTY,
            KeyRole.COSIGNER,
            P256_KEY,
            T0,
            proof_of_possession=bytes(96),
            signs_for=CUSTODIAN,
        )
    with pytest.raises(DecodeError):
        KeyRecord(
            COSIGNER_PARTY,
            KeyRole.COSIGNER,
            cosigner.public_key,
            T0,
            proof_of_possession="00" * 96,  # type: ignore[arg-type]
            signs_for=CUSTODIAN,
        )


# --- signs_for: the custodian a co-signer key co-signs for ------------------------------------


def test_cosigner_record_names_the_cosigner_and_the_custodian(
    cosigner_record: KeyRecord,
) -> None:
    assert cosigner_record.owner == COSIGNER_PARTY
    assert cosigner_record.signs_for == CUSTODIAN
    # What the key signs is the custodian's statements; who holds it is the co-signer.
    assert cosigner_record.principal == CUSTODIAN
    custodian = p256_record()
    assert custodian.signs_for is None
    assert custodian.principal == CUSTODIAN
    assert p256_record(owner=EXCHANGE, role=KeyRole.EXCHANGE).principal == EXCHANGE


@pytest.mark.parametrize(
    "signs_for",
    [None, "", "Custodian A", "custodian a", "a" * 65, 7, COSIGNER_PARTY],
    ids=["missing", "empty", "upper case", "space", "too long", "not a string", "itself"],
)
def test_cosigner_key_needs_a_valid_signs_for(cosigner_record: KeyRecord, signs_for: Any) -> None:
    with pytest.raises(DecodeError):
        replace(cosigner_record, signs_for=signs_for)


@pytest.mark.parametrize("role", [KeyRole.CUSTODIAN, KeyRole.EXCHANGE, KeyRole.REGULATOR])
def test_signs_for_on_a_role_other_than_cosigner_is_refused(role: KeyRole) -> None:
    # A custodian key that "signs for" another custodian would let one party speak for another.
    with pytest.raises(DecodeError):
        p256_record(role=role, signs_for=OTHER_CUSTODIAN)
    with pytest.raises(DecodeError):
        p256_record(role=role, signs_for=CUSTODIAN)
    assert p256_record(role=role, signs_for=None).signs_for is None


def test_cosigner_record_wire_round_trip(cosigner_record: KeyRecord) -> None:
    wire = cosigner_record.to_wire()
    assert wire["owner"] == COSIGNER_PARTY
    assert wire["signs_for"] == CUSTODIAN
    decoded = KeyRecord.from_wire(parse_json_object(compute_canonical_bytes(wire)))
    assert decoded == cosigner_record
    assert decoded.principal == CUSTODIAN
    assert p256_record().to_wire()["signs_for"] is None
    assert KeyRecord.from_wire(p256_record().to_wire()) == p256_record()


@pytest.mark.parametrize(
    ("record", "signs_for"),
    [
        ("cosigner", None),
        ("cosigner", "Custodian A"),
        ("cosigner", 1),
        ("cosigner", COSIGNER_PARTY),
        ("custodian", CUSTODIAN),
        ("custodian", OTHER_CUSTODIAN),
    ],
)
def test_strict_signs_for_decoding(
    cosigner_record: KeyRecord, record: str, signs_for: object
) -> None:
    wire = (cosigner_record if record == "cosigner" else p256_record()).to_wire()
    wire["signs_for"] = signs_for
    with pytest.raises(DecodeError):
        KeyRecord.from_wire(wire)


# --- registration -------------------------------------------------------------------------------


def test_registered_cosigner_resolves(bls_registry: KeyRegistry, cosigner: BlsCosigner) -> None:
    record = find(bls_registry, cosigner.key_id, principal=CUSTODIAN, role=KeyRole.COSIGNER)
    assert record.public_key == cosigner.public_key


def _rogue_proofs(cosigner: BlsCosigner, other: BlsCosigner) -> dict[str, bytes]:
    return {
        "empty": b"",
        "zeros": bytes(96),
        "infinity": bytes([0xC0]) + bytes(95),
        "another key's proof": other.proof_of_possession(),
        # a valid signature by the right key, but over a statement digest, not a proof
        "a co-signature": cosigner.cosign(hashlib.sha256(b"a statement").digest()).signature,
    }


def test_bls_key_without_its_own_proof_of_possession_is_refused(
    cosigner: BlsCosigner, other_cosigner: BlsCosigner, cosigner_record: KeyRecord
) -> None:
    registry = KeyRegistry()
    for name, proof in _rogue_proofs(cosigner, other_cosigner).items():
        with pytest.raises(InvalidProofOfPossession):
            registry.register(replace(cosigner_record, proof_of_possession=proof))
        assert registry.records() == (), name
        with pytest.raises(UnknownKey):
            find(registry, cosigner.key_id, principal=CUSTODIAN, role=KeyRole.COSIGNER)
    # Nothing of the refused attempts lingers: the real proof registers the key.
    registry.register(cosigner_record)
    assert registry.records() == (cosigner_record,)


def test_bls_public_key_that_is_not_a_group_element(cosigner_record: KeyRecord) -> None:
    key = cosigner_record.public_key
    for bad in (bytes([0xC0]) + bytes(47), key[:-1] + bytes([key[-1] ^ 1]), bytes(48)):
        registry = KeyRegistry()
        with pytest.raises(DecodeError):
            registry.register(replace(cosigner_record, public_key=bad))
        assert registry.records() == ()


def _off_curve_keys() -> list[bytes]:
    flipped = P256_KEY[:-1] + bytes([P256_KEY[-1] ^ 1])
    return [
        flipped,
        b"\x02" + P256_KEY[1:],  # wrong SEC1 prefix for 65 bytes
        b"\x04" + CURVE_P.to_bytes(32, "big") + P256_KEY[33:],  # x not below the prime
        b"\x04" + bytes(64),
    ]


@pytest.mark.parametrize("public_key", _off_curve_keys())
def test_p256_key_off_the_curve_is_refused(public_key: bytes) -> None:
    registry = KeyRegistry()
    record = p256_record(public_key)
    with pytest.raises(DecodeError):
        registry.register(record)
    with pytest.raises(UnknownKey):
        find(registry, record.key_id, principal=CUSTODIAN, role=KeyRole.CUSTODIAN)


def test_duplicate_registration_is_refused() -> None:
    first = p256_record()
    registry = registry_of(first)
    with pytest.raises(ConfigurationError):
        registry.register(first)
    # One key signs for one party in one role: the same public key cannot be filed again.
    with pytest.raises(ConfigurationError):
        registry.register(p256_record(owner="custodian-b"))
    with pytest.raises(ConfigurationError):
        registry.register(p256_record(role=KeyRole.EXCHANGE))
    assert registry.records() == (first,)


def test_register_returns_the_record_and_records_are_ordered_by_key_id() -> None:
    records = [p256_record(P256_KEY), p256_record(P256_OTHER), p256_record(P256_THIRD)]
    registry = KeyRegistry()
    assert [registry.register(r) for r in records] == records
    assert registry.records() == tuple(sorted(records, key=lambda r: r.key_id))


# --- resolve ------------------------------------------------------------------------------------


def find(registry: KeyRegistry, key_id: str, *, principal: str, role: KeyRole) -> KeyRecord:
    """``registry.resolve`` for something dated and verified at T0."""
    return registry.resolve(key_id, principal=principal, role=role, at=T0, now=T0)


def test_resolve_requires_id_principal_and_role(
    bls_registry: KeyRegistry, cosigner: BlsCosigner
) -> None:
    key_id = p256_record().key_id
    assert find(bls_registry, key_id, principal=CUSTODIAN, role=KeyRole.CUSTODIAN)
    with pytest.raises(UnknownKey):
        find(bls_registry, "ab" * 32, principal=CUSTODIAN, role=KeyRole.CUSTODIAN)
    with pytest.raises(UnknownKey):
        find(bls_registry, key_id, principal=OTHER_CUSTODIAN, role=KeyRole.CUSTODIAN)
    with pytest.raises(UnknownKey):
        find(bls_registry, key_id, principal=CUSTODIAN, role=KeyRole.EXCHANGE)
    with pytest.raises(UnknownKey):
        find(bls_registry, cosigner.key_id, principal=CUSTODIAN, role=KeyRole.CUSTODIAN)


def test_a_cosigner_key_resolves_for_the_custodian_it_signs_for_only(
    bls_registry: KeyRegistry, cosigner: BlsCosigner
) -> None:
    record = find(bls_registry, cosigner.key_id, principal=CUSTODIAN, role=KeyRole.COSIGNER)
    assert (record.owner, record.signs_for) == (COSIGNER_PARTY, CUSTODIAN)
    # Not for the co-signer party itself, nor for a custodian it was not registered under.
    for principal in (COSIGNER_PARTY, OTHER_CUSTODIAN):
        with pytest.raises(UnknownKey):
            find(bls_registry, cosigner.key_id, principal=principal, role=KeyRole.COSIGNER)


def test_an_exchange_key_is_not_a_custodian_key_even_for_the_same_owner() -> None:
    record = p256_record(role=KeyRole.EXCHANGE)
    registry = registry_of(record)
    find(registry, record.key_id, principal=CUSTODIAN, role=KeyRole.EXCHANGE)
    with pytest.raises(UnknownKey):
        find(registry, record.key_id, principal=CUSTODIAN, role=KeyRole.CUSTODIAN)


# --- revocation ---------------------------------------------------------------------------------


def _resolve(
    registry: KeyRegistry, record: KeyRecord, at: datetime, *, now: datetime | None = None
) -> KeyRecord:
    """Resolve ``record``'s key for what it signs, dated ``at`` and (unless told otherwise)
    verified at that same moment."""
    return registry.resolve(
        record.key_id,
        principal=record.principal,
        role=record.role,
        at=at,
        now=at if now is None else now,
    )


def test_revocation_takes_effect_exactly_at_its_time() -> None:
    record = p256_record()
    registry = registry_of(record)
    revoked_at = T0 + timedelta(days=10)
    updated = registry.revoke(record.key_id, at=revoked_at)
    assert updated.revoked_at == revoked_at
    assert _resolve(registry, record, revoked_at - MS).revoked_at == revoked_at
    with pytest.raises(RevokedKey):
        _resolve(registry, record, revoked_at)
    with pytest.raises(RevokedKey):
        _resolve(registry, record, revoked_at + timedelta(days=365))


@pytest.mark.parametrize("later_first", [True, False])
def test_the_earlier_revocation_wins(later_first: bool) -> None:
    record = p256_record()
    registry = registry_of(record)
    early, late = T0 + timedelta(days=1), T0 + timedelta(days=2)
    order = (late, early) if later_first else (early, late)
    for at in order:
        latest = registry.revoke(record.key_id, at=at)
    assert latest.revoked_at == early
    assert registry.records()[0].revoked_at == early
    _resolve(registry, record, early - MS)
    with pytest.raises(RevokedKey):
        _resolve(registry, record, early + MS)


def test_revoking_an_unknown_key_or_at_a_naive_time_is_refused() -> None:
    record = p256_record()
    registry = registry_of(record)
    with pytest.raises(UnknownKey):
        registry.revoke("ab" * 32, at=T0)
    with pytest.raises(DecodeError):
        registry.revoke(record.key_id, at=(T0 + timedelta(days=1)).replace(tzinfo=None))
    assert registry.records() == (record,)


def test_revoked_key_is_refused_from_revocation_on_whatever_date_it_writes() -> None:
    record = p256_record()
    registry = registry_of(record)
    revoked_at = T0 + timedelta(days=10)
    registry.revoke(record.key_id, at=revoked_at)
    dated = revoked_at - timedelta(days=1)
    # Verified before the revocation, something dated before it is fine ...
    _resolve(registry, record, dated, now=revoked_at - MS)
    # ... but from the revocation on, a stolen key could write any earlier date: refused.
    with pytest.raises(RevokedKey):
        _resolve(registry, record, dated, now=revoked_at)
    with pytest.raises(RevokedKey):
        _resolve(registry, record, T0, now=revoked_at + timedelta(days=365))
    with pytest.raises(RevokedKey):
        registry.records()[0].check_usable(at=dated, now=revoked_at)
    registry.records()[0].check_usable(at=dated, now=revoked_at - MS)


def test_check_usable_needs_utc_millisecond_times() -> None:
    record = p256_record()
    record.check_usable(at=T0, now=T0)
    with pytest.raises(DecodeError):
        record.check_usable(at=T0, now=T0.replace(tzinfo=None))
    with pytest.raises(DecodeError):
        record.check_usable(at=T0 + timedelta(microseconds=1), now=T0 + timedelta(days=1))


def test_revocation_wins_over_an_open_window() -> None:
    record = p256_record(valid_until=T0 + timedelta(days=30))
    registry = registry_of(record)
    registry.revoke(record.key_id, at=T0)
    with pytest.raises(RevokedKey):
        _resolve(registry, record, T0 + timedelta(days=1))


# --- validity windows ---------------------------------------------------------------------------


def test_valid_from_is_inclusive_and_valid_until_exclusive() -> None:
    until = T0 + timedelta(days=90)
    record = p256_record(valid_until=until)
    registry = registry_of(record)
    _resolve(registry, record, T0)
    _resolve(registry, record, until - MS)
    with pytest.raises(KeyNotValid):
        _resolve(registry, record, T0 - MS)
    with pytest.raises(KeyNotValid):
        _resolve(registry, record, until)


def test_open_ended_window() -> None:
    record = p256_record()
    registry = registry_of(record)
    _resolve(registry, record, datetime(9000, 1, 1, tzinfo=UTC))
    with pytest.raises(KeyNotValid):
        _resolve(registry, record, T0 - MS)


# --- rotation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [timedelta(0), timedelta(hours=1)])
def test_rotation_hands_over_with_the_overlap(overlap: timedelta) -> None:
    old = p256_record()
    registry = registry_of(old)
    start = T0 + timedelta(days=100)
    new = p256_record(P256_OTHER, valid_from=start)
    assert registry.rotate(old_key_id=old.key_id, new=new, overlap=overlap) == new
    end = start + overlap
    _resolve(registry, old, end - MS)
    with pytest.raises(KeyNotValid):
        _resolve(registry, old, end)
    _resolve(registry, new, start)
    with pytest.raises(KeyNotValid):
        _resolve(registry, new, start - MS)


def test_rotation_keeps_an_earlier_end_of_the_old_window() -> None:
    until = T0 + timedelta(days=10)
    old = p256_record(valid_until=until)
    registry = registry_of(old)
    new = p256_record(P256_OTHER, valid_from=T0 + timedelta(days=5))
    registry.rotate(old_key_id=old.key_id, new=new, overlap=timedelta(days=30))
    rotated_old = next(r for r in registry.records() if r.key_id == old.key_id)
    assert rotated_old.valid_until == until


@pytest.mark.parametrize(
    ("new", "overlap"),
    [
        (p256_record(P256_OTHER, owner="custodian-b", valid_from=T0 + timedelta(days=1)), NONE),
        (p256_record(P256_OTHER, role=KeyRole.EXCHANGE, valid_from=T0 + timedelta(days=1)), NONE),
        (p256_record(P256_OTHER, valid_from=T0 + timedelta(days=1)), -MS),
        (p256_record(P256_OTHER, valid_from=T0), NONE),  # would close the old window at once
        (p256_record(P256_OTHER, valid_from=T0 - timedelta(days=1)), timedelta(days=1)),
        (p256_record(P256_KEY, valid_from=T0 + timedelta(days=1)), NONE),  # already registered
    ],
)
def test_refused_rotation_changes_nothing(new: KeyRecord, overlap: timedelta) -> None:
    old = p256_record()
    registry = registry_of(old)
    with pytest.raises(ConfigurationError):
        registry.rotate(old_key_id=old.key_id, new=new, overlap=overlap)
    assert registry.records() == (old,)


def test_rotation_of_an_unknown_key() -> None:
    registry = registry_of(p256_record())
    with pytest.raises(UnknownKey):
        registry.rotate(old_key_id="ab" * 32, new=p256_record(P256_OTHER))
    assert len(registry.records()) == 1


def test_rotation_to_a_cosigner_key_without_its_proof_changes_nothing(
    cosigner_record: KeyRecord, other_cosigner: BlsCosigner
) -> None:
    registry = registry_of(cosigner_record)
    new = KeyRecord(
        COSIGNER_PARTY,
        KeyRole.COSIGNER,
        other_cosigner.public_key,
        T0 + timedelta(days=1),
        proof_of_possession=b"",
        signs_for=CUSTODIAN,
    )
    with pytest.raises(InvalidProofOfPossession):
        registry.rotate(old_key_id=cosigner_record.key_id, new=new)
    assert registry.records() == (cosigner_record,)


def _next_cosigner_key(
    other_cosigner: BlsCosigner, *, owner: str = COSIGNER_PARTY, signs_for: str = CUSTODIAN
) -> KeyRecord:
    return KeyRecord(
        owner,
        KeyRole.COSIGNER,
        other_cosigner.public_key,
        T0 + timedelta(days=1),
        proof_of_possession=other_cosigner.proof_of_possession(),
        signs_for=signs_for,
    )


def test_cosigner_rotation_keeps_signs_for(
    cosigner_record: KeyRecord, other_cosigner: BlsCosigner
) -> None:
    registry = registry_of(cosigner_record)
    new = _next_cosigner_key(other_cosigner)
    registry.rotate(old_key_id=cosigner_record.key_id, new=new, overlap=timedelta(hours=1))
    rotated = _resolve(registry, new, T0 + timedelta(days=2))
    assert (rotated.owner, rotated.signs_for) == (COSIGNER_PARTY, CUSTODIAN)
    _resolve(registry, cosigner_record, T0 + timedelta(days=1, minutes=59))
    with pytest.raises(KeyNotValid):
        _resolve(registry, cosigner_record, T0 + timedelta(days=1, hours=1))


@pytest.mark.parametrize(
    ("owner", "signs_for"),
    [(COSIGNER_PARTY, OTHER_CUSTODIAN), ("trustee-two", CUSTODIAN)],
    ids=["another custodian", "another co-signer party"],
)
def test_cosigner_rotation_that_changes_who_or_for_whom_is_refused(
    cosigner_record: KeyRecord, other_cosigner: BlsCosigner, owner: str, signs_for: str
) -> None:
    registry = registry_of(cosigner_record)
    new = _next_cosigner_key(other_cosigner, owner=owner, signs_for=signs_for)
    with pytest.raises(ConfigurationError):
        registry.rotate(old_key_id=cosigner_record.key_id, new=new)
    assert registry.records() == (cosigner_record,)


# --- quorum -------------------------------------------------------------------------------------


def test_quorum_threshold_bounds() -> None:
    registry = KeyRegistry()
    registry.set_quorum(CUSTODIAN, threshold=1)
    assert registry.quorum_threshold(CUSTODIAN) == 1
    registry.set_quorum(CUSTODIAN, threshold=MAX_COSIGNERS)
    assert registry.quorum_threshold(CUSTODIAN) == MAX_COSIGNERS
    for bad in (0, -1, MAX_COSIGNERS + 1, True, "2", 2.0, None):
        with pytest.raises(ConfigurationError):
            registry.set_quorum(CUSTODIAN, threshold=bad)  # type: ignore[arg-type]
    assert registry.quorum_threshold(CUSTODIAN) == MAX_COSIGNERS
    with pytest.raises(ConfigurationError):
        registry.quorum_threshold("custodian-b")
    with pytest.raises(DecodeError):
        registry.set_quorum("Custodian B", threshold=2)


# --- persistence --------------------------------------------------------------------------------


def _round_trip(registry: KeyRegistry) -> KeyRegistry:
    data = compute_canonical_bytes(registry.to_wire())
    return KeyRegistry.from_wire(parse_json_object(data))


def test_registry_round_trip(cosigner_record: KeyRecord) -> None:
    custodian = p256_record(valid_until=T0 + timedelta(days=365))
    exchange = p256_record(P256_OTHER, owner=EXCHANGE, role=KeyRole.EXCHANGE)
    regulator = p256_record(P256_THIRD, owner="regulator-eu", role=KeyRole.REGULATOR)
    registry = registry_of(custodian, exchange, regulator, cosigner_record)
    revoked_at = T0 + timedelta(days=7)
    registry.revoke(exchange.key_id, at=revoked_at)
    registry.set_quorum(CUSTODIAN, threshold=2)
    registry.set_quorum("custodian-b", threshold=1)

    decoded = _round_trip(registry)

    assert decoded.to_wire() == registry.to_wire()
    assert decoded.records() == registry.records()
    assert decoded.quorum_threshold(CUSTODIAN) == 2
    assert decoded.quorum_threshold("custodian-b") == 1
    with pytest.raises(RevokedKey):
        _resolve(decoded, exchange, revoked_at)
    with pytest.raises(KeyNotValid):
        _resolve(decoded, custodian, T0 + timedelta(days=365))
    cosigner = _resolve(decoded, cosigner_record, T0)
    assert (cosigner.owner, cosigner.signs_for) == (COSIGNER_PARTY, CUSTODIAN)


def test_registry_bytes_do_not_depend_on_registration_order() -> None:
    records = [p256_record(P256_KEY), p256_record(P256_OTHER), p256_record(P256_THIRD)]
    one = KeyRegistry.of(records, quorums={"custodian-b": 3, CUSTODIAN: 2})
    other = KeyRegistry.of(records[::-1], quorums={CUSTODIAN: 2, "custodian-b": 3})
    assert compute_canonical_bytes(one.to_wire()) == compute_canonical_bytes(other.to_wire())


def registry_wire() -> dict[str, Any]:
    registry = registry_of(
        p256_record(valid_until=T0 + timedelta(days=365)),
        p256_record(P256_OTHER, owner=EXCHANGE, role=KeyRole.EXCHANGE, revoked_at=T0 + MS),
    )
    registry.set_quorum(CUSTODIAN, threshold=2)
    return copy.deepcopy(registry.to_wire())


def decode(wire: dict[str, Any]) -> KeyRegistry:
    return KeyRegistry.from_wire(parse_json_object(json.dumps(wire).encode()))


def with_record(index: int, **changes: Any) -> dict[str, Any]:
    wire = registry_wire()
    wire["keys"][index].update(changes)
    return wire


def test_the_fixture_registry_decodes() -> None:
    assert len(decode(registry_wire()).records()) == 2


@pytest.mark.parametrize(
    "changes",
    [
        {"key_id": compute_key_id(algorithm=P256_ALGORITHM, public_key=P256_THIRD)},
        {"key_id": compute_key_id(algorithm=BLS_ALGORITHM, public_key=P256_KEY)},
        {"role": "auditor"},
        {"role": "Custodian"},
        {"role": None},
        {"role": 1},
        {"algorithm": BLS_ALGORITHM},
        {"algorithm": "ecdsa-p256"},
        {"algorithm": None},
        {"owner": "Custodian A"},
        {"public_key": P256_KEY.hex().upper()},
        {"public_key": P256_KEY.hex()[:-2]},
        {"public_key": None},
        {"proof_of_possession": "00" * 96},
        {"valid_from": "2026-01-01T00:00:00Z"},
        {"valid_from": None},
        {"valid_until": "2025-12-31T23:59:59.999Z"},  # before valid_from
        {"signs_for": CUSTODIAN},  # a custodian key signs for no one else
        {"signs_for": ""},
        {"revoked_at": 0},
    ],
)
def test_strict_record_decoding(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode(with_record(0, **changes))


def test_upper_case_key_id_does_not_match() -> None:
    wire = registry_wire()
    wire["keys"][0]["key_id"] = wire["keys"][0]["key_id"].upper()
    with pytest.raises(DecodeError):
        decode(wire)


def test_cosigner_role_with_a_p256_key_is_refused() -> None:
    wire = with_record(0, role="cosigner")
    with pytest.raises(DecodeError):
        decode(wire)
    wire = with_record(0, role="cosigner", algorithm=BLS_ALGORITHM)
    with pytest.raises(DecodeError):
        decode(wire)


@pytest.mark.parametrize("level", ["registry", "record"])
def test_missing_and_unknown_members(level: str) -> None:
    def target_of(wire: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = wire["keys"][0]
        return wire if level == "registry" else record

    for key in sorted(target_of(registry_wire())):
        wire = registry_wire()
        del target_of(wire)[key]
        with pytest.raises(DecodeError):
            decode(wire)
    wire = registry_wire()
    target_of(wire)["comment"] = "unsigned"
    with pytest.raises(DecodeError):
        decode(wire)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("version", 2),
        ("version", "1"),
        ("version", None),
        ("version", 0),
        ("version", True),
        ("keys", {}),
        ("keys", None),
        ("quorums", []),
        ("quorums", None),
        ("quorums", {"Custodian A": 2}),
    ],
)
def test_strict_registry_decoding(key: str, value: Any) -> None:
    wire = registry_wire()
    wire[key] = value
    with pytest.raises(DecodeError):
        decode(wire)


@pytest.mark.parametrize("threshold", [0, MAX_COSIGNERS + 1, "2", True])
def test_bad_quorum_in_a_registry_file(threshold: Any) -> None:
    wire = registry_wire()
    wire["quorums"][CUSTODIAN] = threshold
    with pytest.raises(ConfigurationError):
        decode(wire)


def test_a_float_in_a_registry_file_is_rejected() -> None:
    data = json.dumps(registry_wire()).replace('"version": 1', '"version": 1.0').encode()
    with pytest.raises(FloatRejected):
        KeyRegistry.from_wire(parse_json_object(data))


def test_a_key_listed_twice_in_a_registry_file_is_refused() -> None:
    wire = registry_wire()
    wire["keys"].append(wire["keys"][0])
    with pytest.raises(ConfigurationError):
        decode(wire)


def test_a_registry_file_cannot_smuggle_a_rogue_cosigner(
    cosigner_record: KeyRecord, other_cosigner: BlsCosigner
) -> None:
    rogue = replace(cosigner_record, proof_of_possession=other_cosigner.proof_of_possession())
    wire = registry_wire()
    wire["keys"].append(rogue.to_wire())
    with pytest.raises(InvalidProofOfPossession):
        decode(wire)
    wire["keys"][-1]["proof_of_possession"] = None
    with pytest.raises(DecodeError):
        decode(wire)


@pytest.mark.parametrize("role", [[], {}])
def test_unhashable_role_is_a_decode_error(role: Any) -> None:
    with pytest.raises(DecodeError):
        decode(with_record(0, role=role))
