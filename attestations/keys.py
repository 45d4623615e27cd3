"""Key registry: which public keys may sign what, for whom, and when.

Each :class:`KeyRecord` names the party that holds the key (``owner``), its :class:`KeyRole`, the
algorithm and public key, a validity window and an optional revocation time. A co-signer key also
names the custodian whose statements it co-signs (``signs_for``); a quorum counts distinct
co-signer parties, not keys, so a rotation overlap or a second key of one co-signer never counts
twice. The registry is the
verifier's trust configuration (an exchange loads it at onboarding); it is plain data, checked on
registration:

* a BLS co-signer key is accepted only with a valid proof of possession (otherwise a rogue key
  could cancel honest keys out of an aggregate);
* a P-256 key must be a valid point on the curve.

Rotation registers the new key and closes the old key's window (optionally with an overlap);
revocation marks the moment from which the key is rejected: for anything dated at or after it,
and for anything at all once the verifier's clock has passed it (so a revoked key cannot back-date
a statement into acceptance). Time is always passed in, never read from a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from attestations import bls, p256
from attestations.canonical import compute_key_id, format_timestamp, parse_hex, parse_timestamp
from attestations.errors import (
    ConfigurationError,
    DecodeError,
    KeyNotValid,
    RevokedKey,
    UnknownKey,
)
from attestations.statement import (
    BLS_ALGORITHM,
    MAX_COSIGNERS,
    P256_ALGORITHM,
    require_list,
    require_members,
    require_utc,
    require_version,
    validate_party,
)

REGISTRY_VERSION: Final = 1
_RECORD_KEYS: Final = frozenset(
    {
        "algorithm",
        "key_id",
        "owner",
        "proof_of_possession",
        "public_key",
        "revoked_at",
        "role",
        "signs_for",
        "valid_from",
        "valid_until",
    }
)
_REGISTRY_KEYS: Final = frozenset({"keys", "quorums", "version"})
_PUBLIC_KEY_LENGTH: Final = {P256_ALGORITHM: 65, BLS_ALGORITHM: 48}


class KeyRole(StrEnum):
    CUSTODIAN = "custodian"
    """The custodian's HSM key (P-256) that signs statements and tree heads."""
    COSIGNER = "cosigner"
    """A BLS co-signer of the custodian's statements (registered under that custodian)."""
    EXCHANGE = "exchange"
    """The exchange's HSM key (P-256) for margin calls and instructions."""
    REGULATOR = "regulator"
    """A regulator's key (P-256) for emergency releases."""


_ROLE_ALGORITHM: Final = {
    KeyRole.CUSTODIAN: P256_ALGORITHM,
    KeyRole.COSIGNER: BLS_ALGORITHM,
    KeyRole.EXCHANGE: P256_ALGORITHM,
    KeyRole.REGULATOR: P256_ALGORITHM,
}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    owner: str
    role: KeyRole
    public_key: bytes
    valid_from: datetime
    valid_until: datetime | None = None
    revoked_at: datetime | None = None
    proof_of_possession: bytes | None = None
    signs_for: str | None = None

    def __post_init__(self) -> None:
        validate_party(self.owner, what="key owner")
        if not isinstance(self.role, KeyRole):
            raise DecodeError(f"role {self.role!r} is not a KeyRole")
        if self.role is KeyRole.COSIGNER:
            validate_party(self.signs_for, what="signs_for (the custodian co-signed for)")
            if self.signs_for == self.owner:
                raise DecodeError("a custodian cannot be its own co-signer")
        elif self.signs_for is not None:
            raise DecodeError("signs_for applies to co-signer keys only")
        expected = _PUBLIC_KEY_LENGTH[self.algorithm]
        if not isinstance(self.public_key, bytes) or len(self.public_key) != expected:
            raise DecodeError(f"{self.algorithm} public key must be {expected} bytes")
        require_utc(self.valid_from, what="valid_from")
        if self.valid_until is not None:
            require_utc(self.valid_until, what="valid_until")
            if self.valid_until <= self.valid_from:
                raise DecodeError("valid_until must be after valid_from")
        if self.revoked_at is not None:
            require_utc(self.revoked_at, what="revoked_at")
        if self.algorithm == BLS_ALGORITHM:
            if not isinstance(self.proof_of_possession, bytes):
                raise DecodeError("a BLS co-signer key needs its proof of possession")
        elif self.proof_of_possession is not None:
            raise DecodeError("proof of possession applies to BLS keys only")

    @property
    def algorithm(self) -> str:
        return _ROLE_ALGORITHM[self.role]

    @property
    def key_id(self) -> str:
        return compute_key_id(algorithm=self.algorithm, public_key=self.public_key)

    @property
    def principal(self) -> str:
        """The party whose objects this key signs: the custodian for a co-signer key, else the
        owner."""
        return self.signs_for if self.signs_for is not None else self.owner

    def check_usable(self, *, at: datetime, now: datetime) -> None:
        """Raise unless the key may sign something dated ``at``, verified at ``now``."""
        require_utc(at, what="signing time")
        require_utc(now, what="verification time")
        if self.revoked_at is not None and (at >= self.revoked_at or now >= self.revoked_at):
            raise RevokedKey(
                f"key {self.key_id[:16]} of {self.owner} was revoked at "
                f"{format_timestamp(self.revoked_at)}; used at {format_timestamp(at)}, "
                f"verified at {format_timestamp(now)}"
            )
        if at < self.valid_from or (self.valid_until is not None and at >= self.valid_until):
            raise KeyNotValid(
                f"key {self.key_id[:16]} of {self.owner} is not valid at {format_timestamp(at)}"
            )

    def to_wire(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "owner": self.owner,
            "proof_of_possession": None
            if self.proof_of_possession is None
            else self.proof_of_possession.hex(),
            "public_key": self.public_key.hex(),
            "revoked_at": None if self.revoked_at is None else format_timestamp(self.revoked_at),
            "role": self.role.value,
            "signs_for": self.signs_for,
            "valid_from": format_timestamp(self.valid_from),
            "valid_until": None if self.valid_until is None else format_timestamp(self.valid_until),
        }

    @classmethod
    def from_wire(cls, obj: object) -> KeyRecord:
        m = require_members(obj, what="key record", keys=_RECORD_KEYS)
        if not isinstance(m["role"], str) or m["role"] not in {r.value for r in KeyRole}:
            raise DecodeError(f"unknown key role {str(m['role'])[:20]!r}")
        role = KeyRole(m["role"])
        algorithm = _ROLE_ALGORITHM[role]
        if m["algorithm"] != algorithm:
            raise DecodeError(f"role {role.value} uses {algorithm}, not {m['algorithm']!r}")
        pop = m["proof_of_possession"]
        record = cls(
            owner=validate_party(m["owner"], what="key owner"),
            role=role,
            public_key=parse_hex(
                m["public_key"], length=_PUBLIC_KEY_LENGTH[algorithm], what="public key"
            ),
            valid_from=parse_timestamp(m["valid_from"]),
            valid_until=None if m["valid_until"] is None else parse_timestamp(m["valid_until"]),
            revoked_at=None if m["revoked_at"] is None else parse_timestamp(m["revoked_at"]),
            proof_of_possession=None if pop is None else parse_hex(pop, length=96, what="pop"),
            signs_for=None
            if m["signs_for"] is None
            else validate_party(m["signs_for"], what="signs_for"),
        )
        if m["key_id"] != record.key_id:
            raise DecodeError(f"key id {str(m['key_id'])[:70]!r} does not match the public key")
        return record


class KeyRegistry:
    """The set of trusted keys and the co-signer quorum threshold of each custodian."""

    def __init__(self) -> None:
        self._records: dict[str, KeyRecord] = {}
        self._quorums: dict[str, int] = {}

    # --- registration (operator actions; every key is checked before it is trusted) -------------

    def register(self, record: KeyRecord) -> KeyRecord:
        if record.key_id in self._records:
            raise ConfigurationError(f"key {record.key_id[:16]} is already registered")
        if record.algorithm == BLS_ALGORITHM:
            bls.verify_possession(
                public_key=record.public_key, proof=record.proof_of_possession or b""
            )
        else:
            p256.verify_p256_public_key(record.public_key)
        self._records[record.key_id] = record
        return record

    def revoke(self, key_id: str, *, at: datetime) -> KeyRecord:
        """Mark ``key_id`` revoked from ``at`` on. An earlier revocation time is kept."""
        record = self._get(key_id)
        require_utc(at, what="revocation time")
        if record.revoked_at is not None and record.revoked_at <= at:
            return record
        updated = replace(record, revoked_at=at)
        self._records[key_id] = updated
        return updated

    def rotate(
        self, *, old_key_id: str, new: KeyRecord, overlap: timedelta = timedelta(0)
    ) -> KeyRecord:
        """Register ``new`` and end ``old``'s window at ``new.valid_from + overlap``."""
        old = self._get(old_key_id)
        if (new.owner, new.role, new.signs_for) != (old.owner, old.role, old.signs_for):
            raise ConfigurationError(
                "a rotation keeps the owner, role and signs_for of the old key"
            )
        if overlap < timedelta(0):
            raise ConfigurationError("rotation overlap cannot be negative")
        end = new.valid_from + overlap
        if end <= old.valid_from:
            raise ConfigurationError("the new key must start after the old key's window opens")
        self.register(new)
        if old.valid_until is None or old.valid_until > end:
            self._records[old_key_id] = replace(old, valid_until=end)
        return new

    def set_quorum(self, custodian: str, *, threshold: int) -> None:
        """Require ``threshold`` distinct co-signers on every statement of ``custodian``."""
        validate_party(custodian, what="custodian")
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise ConfigurationError("quorum threshold must be an integer")
        if not 1 <= threshold <= MAX_COSIGNERS:
            raise ConfigurationError(f"quorum threshold {threshold} not in 1..{MAX_COSIGNERS}")
        self._quorums[custodian] = threshold

    # --- look-ups used by verification ----------------------------------------------------------

    def _get(self, key_id: str) -> KeyRecord:
        record = self._records.get(key_id)
        if record is None:
            raise UnknownKey(f"key {str(key_id)[:16]} is not registered")
        return record

    def resolve(
        self, key_id: str, *, principal: str, role: KeyRole, at: datetime, now: datetime
    ) -> KeyRecord:
        """The record of ``key_id`` if it may sign, in ``role``, for ``principal`` (see
        :attr:`KeyRecord.principal`) something dated ``at``, verified at ``now``."""
        record = self._get(key_id)
        if record.principal != principal or record.role is not role:
            raise UnknownKey(f"key {key_id[:16]} is not a {role.value} key for {principal}")
        record.check_usable(at=at, now=now)
        return record

    def quorum_threshold(self, custodian: str) -> int:
        threshold = self._quorums.get(custodian)
        if threshold is None:
            raise ConfigurationError(f"no co-signer quorum configured for {custodian}")
        return threshold

    def records(self) -> tuple[KeyRecord, ...]:
        return tuple(self._records[k] for k in sorted(self._records))

    # --- persistence ----------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        return {
            "keys": [r.to_wire() for r in self.records()],
            "quorums": dict(sorted(self._quorums.items())),
            "version": REGISTRY_VERSION,
        }

    @classmethod
    def from_wire(cls, obj: object) -> KeyRegistry:
        m = require_members(obj, what="key registry", keys=_REGISTRY_KEYS)
        require_version(m["version"], expected=REGISTRY_VERSION, what="key registry")
        quorums = m["quorums"]
        if not isinstance(quorums, Mapping):
            raise DecodeError("quorums must be an object of custodian -> threshold")
        registry = cls()
        for item in require_list(m["keys"], what="keys", max_items=10_000):
            registry.register(KeyRecord.from_wire(item))
        for custodian, threshold in quorums.items():
            registry.set_quorum(custodian, threshold=threshold)
        return registry

    @classmethod
    def of(cls, records: Iterable[KeyRecord], *, quorums: Mapping[str, int]) -> KeyRegistry:
        registry = cls()
        for record in records:
            registry.register(record)
        for custodian, threshold in quorums.items():
            registry.set_quorum(custodian, threshold=threshold)
        return registry
