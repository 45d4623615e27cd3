"""The attestation statement: what the custodian signs once per (custodian, exchange, epoch).

A :class:`Statement` commits to the per-asset Merkle sum roots of the pledged holdings, the price
snapshot used, and the previous statement's digest (a hash chain ordered by ``sequence``). A
:class:`SignedStatement` carries the custodian's HSM signature (ECDSA P-256) and the co-signer
quorum's aggregate BLS signature over the same 32-byte digest.

Objects are validated in their constructors, so one that exists is well-formed; ``from_wire``
turns untrusted JSON into these objects or raises :class:`~attestations.errors.DecodeError` (or a
more precise subclass such as ``NegativeSum``). Whether a statement is *acceptable* - keys,
quorum, chain, time, roots - is decided by :mod:`attestations.verify`, not here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from attestations import p256
from attestations.amounts import (
    MAX_DECIMALS,
    Price,
    check_units,
    format_units,
    parse_units,
    validate_asset_code,
)
from attestations.canonical import (
    DOMAIN_STATEMENT,
    MAX_MESSAGE_BYTES,
    compute_canonical_bytes,
    compute_digest,
    format_timestamp,
    parse_hex,
    parse_json_object,
    parse_timestamp,
)
from attestations.errors import DecodeError
from attestations.merkle import MAX_DEPTH

STATEMENT_VERSION: Final = 1
SIGNED_STATEMENT_VERSION: Final = 1
P256_ALGORITHM: Final = p256.ALGORITHM
BLS_ALGORITHM: Final = "bls12381-g2-pop"
GENESIS_PREVIOUS: Final = bytes(32)
"""The ``previous`` of sequence 1: 32 zero bytes."""
MAX_SEQUENCE: Final = 2**53 - 1
MAX_ASSETS: Final = 256
MAX_PRICES: Final = 1024
MAX_COSIGNERS: Final = 64

_PARTY_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_KEY_ID_RE: Final = re.compile(r"[0-9a-f]{64}")
_SOURCE_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")

_ASSET_ROOT_KEYS: Final = frozenset({"asset", "count", "decimals", "depth", "root", "total"})
_PRICE_KEYS: Final = frozenset({"asset", "observed_at", "price", "quote", "source"})
_STATEMENT_KEYS: Final = frozenset(
    {
        "assets",
        "custodian",
        "exchange",
        "expires_at",
        "issued_at",
        "kind",
        "previous",
        "prices",
        "sequence",
        "version",
    }
)
_SIGNED_KEYS: Final = frozenset({"custodian_signature", "quorum_signature", "statement", "version"})
_P256_SIGNATURE_KEYS: Final = frozenset({"algorithm", "key_id", "signature"})
_QUORUM_SIG_KEYS: Final = frozenset({"algorithm", "signature", "signers"})


class StatementKind(StrEnum):
    """``snapshot``: the accompanying leaf disclosure carries every leaf. ``delta``: only the
    leaves changed since the previous sequence. The roots are always the whole state's roots."""

    SNAPSHOT = "snapshot"
    DELTA = "delta"


# --- field validators shared by the objects below and by the key registry -----------------------


def validate_party(value: object, *, what: str) -> str:
    """Party ids (custodian, exchange, co-signer owners): ``[a-z0-9][a-z0-9._-]{0,63}``."""
    if not isinstance(value, str) or not _PARTY_RE.fullmatch(value):
        raise DecodeError(f"{what} {str(value)[:70]!r} must match [a-z0-9][a-z0-9._-]{{0,63}}")
    return value


def validate_key_id(value: object) -> str:
    if not isinstance(value, str) or not _KEY_ID_RE.fullmatch(value):
        raise DecodeError(f"key id {str(value)[:70]!r} must be 64 lowercase hex characters")
    return value


def require_int(value: object, *, what: str, low: int, high: int) -> int:
    """An int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"{what} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise DecodeError(f"{what} {value} not in {low}..{high}")
    return value


def require_version(value: object, *, expected: int, what: str) -> int:
    """The integer ``expected`` exactly: ``true`` and ``1.0`` are not version 1."""
    if type(value) is not int or value != expected:
        raise DecodeError(f"{what} version {str(value)[:20]!r} unsupported (expected {expected})")
    return value


def require_members(obj: object, *, what: str, keys: frozenset[str]) -> Mapping[str, Any]:
    """A JSON object with exactly ``keys`` as members: unknown members are rejected, so nothing
    unsigned or unexpected rides along."""
    if not isinstance(obj, Mapping):
        raise DecodeError(f"{what} must be a JSON object")
    present = frozenset(obj)
    if present != keys:
        missing = sorted(keys - present)
        unknown = sorted(str(k)[:40] for k in present - keys)[:10]
        raise DecodeError(f"{what}: missing members {missing}, unknown members {unknown}")
    return obj


def require_list(value: object, *, what: str, max_items: int) -> list[Any]:
    if not isinstance(value, list):
        raise DecodeError(f"{what} must be a JSON array")
    if len(value) > max_items:
        raise DecodeError(f"{what} has {len(value)} items, more than {max_items}")
    return value


def require_bytes(value: object, *, what: str, length: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise DecodeError(f"{what} must be {length} bytes")
    return value


def require_utc(value: object, *, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise DecodeError(f"{what} must be a datetime")
    format_timestamp(value)  # raises unless timezone-aware with whole milliseconds
    return value


# --- statement parts ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssetRoot:
    """The Merkle sum tree of one asset: root hash, total units, non-empty leaf count, depth."""

    asset: str
    decimals: int
    root: bytes
    total: int
    count: int
    depth: int

    def __post_init__(self) -> None:
        validate_asset_code(self.asset)
        require_int(self.decimals, what=f"{self.asset} decimals", low=0, high=MAX_DECIMALS)
        require_bytes(self.root, what=f"{self.asset} root", length=32)
        check_units(self.total, what=f"{self.asset} total")
        require_int(self.depth, what=f"{self.asset} depth", low=0, high=MAX_DEPTH)
        require_int(self.count, what=f"{self.asset} count", low=0, high=2**self.depth)

    def to_wire(self) -> dict[str, Any]:
        return {
            "asset": self.asset,
            "count": self.count,
            "decimals": self.decimals,
            "depth": self.depth,
            "root": self.root.hex(),
            "total": format_units(self.total, what=f"{self.asset} total"),
        }

    @classmethod
    def from_wire(cls, obj: object) -> AssetRoot:
        m = require_members(obj, what="asset root", keys=_ASSET_ROOT_KEYS)
        asset = validate_asset_code(m["asset"])
        return cls(
            asset=asset,
            decimals=require_int(m["decimals"], what="decimals", low=0, high=MAX_DECIMALS),
            root=parse_hex(m["root"], length=32, what=f"{asset} root"),
            total=parse_units(m["total"], what=f"{asset} total"),
            count=require_int(m["count"], what=f"{asset} count", low=0, high=2**MAX_DEPTH),
            depth=require_int(m["depth"], what=f"{asset} depth", low=0, high=MAX_DEPTH),
        )


@dataclass(frozen=True, slots=True)
class PricePoint:
    """One price of the snapshot a statement used, with where and when it was observed."""

    price: Price
    source: str
    observed_at: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.price, Price):
            raise DecodeError("price must be a Price")
        if not isinstance(self.source, str) or not _SOURCE_RE.fullmatch(self.source):
            raise DecodeError(f"price source {str(self.source)[:40]!r} must be 1-128 visible ASCII")
        require_utc(self.observed_at, what="observed_at")

    def to_wire(self) -> dict[str, Any]:
        return {
            "asset": self.price.asset,
            "observed_at": format_timestamp(self.observed_at),
            "price": self.price.to_wire(),
            "quote": self.price.quote,
            "source": self.source,
        }

    @classmethod
    def from_wire(cls, obj: object) -> PricePoint:
        m = require_members(obj, what="price", keys=_PRICE_KEYS)
        price = Price.parse(asset=m["asset"], quote=m["quote"], text=m["price"])
        return cls(price=price, source=m["source"], observed_at=parse_timestamp(m["observed_at"]))


@dataclass(frozen=True, slots=True)
class Statement:
    """One epoch's attestation from ``custodian`` to ``exchange``.

    Invariants checked here: sequence 1 is a snapshot whose ``previous`` is 32 zero bytes and
    every later sequence names a non-zero previous digest; ``expires_at`` is after
    ``issued_at``; assets sorted by code without duplicates; prices sorted by (asset, quote)
    without duplicates.
    """

    custodian: str
    exchange: str
    sequence: int
    previous: bytes
    issued_at: datetime
    expires_at: datetime
    kind: StatementKind
    assets: tuple[AssetRoot, ...]
    prices: tuple[PricePoint, ...]
    version: int = STATEMENT_VERSION
    # The digest, computed on first use: signing, the replay check, the chain, the disclosure
    # binding and the log all need it, and the object is immutable.
    _digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        require_version(self.version, expected=STATEMENT_VERSION, what="statement")
        validate_party(self.custodian, what="custodian")
        validate_party(self.exchange, what="exchange")
        if self.custodian == self.exchange:
            raise DecodeError("custodian and exchange must be different parties")
        require_int(self.sequence, what="sequence", low=1, high=MAX_SEQUENCE)
        require_bytes(self.previous, what="previous", length=32)
        if not isinstance(self.kind, StatementKind):
            raise DecodeError(f"kind {self.kind!r} is not a StatementKind")
        self._check_chain_start()
        require_utc(self.issued_at, what="issued_at")
        require_utc(self.expires_at, what="expires_at")
        if self.expires_at <= self.issued_at:
            raise DecodeError("expires_at must be after issued_at")
        self._check_members()

    def _check_chain_start(self) -> None:
        if self.sequence == 1:
            if self.previous != GENESIS_PREVIOUS:
                raise DecodeError("sequence 1 must have 32 zero bytes as previous")
            if self.kind is not StatementKind.SNAPSHOT:
                raise DecodeError("sequence 1 must be a snapshot")
        elif self.previous == GENESIS_PREVIOUS:
            raise DecodeError(f"sequence {self.sequence} must name its previous statement")

    def _check_members(self) -> None:
        if not isinstance(self.assets, tuple) or not all(
            isinstance(a, AssetRoot) for a in self.assets
        ):
            raise DecodeError("assets must be a tuple of AssetRoot")
        if len(self.assets) > MAX_ASSETS:
            raise DecodeError(f"more than {MAX_ASSETS} assets")
        codes = [a.asset for a in self.assets]
        if codes != sorted(set(codes)):
            raise DecodeError("assets must be sorted by code without duplicates")
        if not isinstance(self.prices, tuple) or not all(
            isinstance(p, PricePoint) for p in self.prices
        ):
            raise DecodeError("prices must be a tuple of PricePoint")
        if len(self.prices) > MAX_PRICES:
            raise DecodeError(f"more than {MAX_PRICES} prices")
        pairs = [(p.price.asset, p.price.quote) for p in self.prices]
        if pairs != sorted(set(pairs)):
            raise DecodeError("prices must be sorted by (asset, quote) without duplicates")

    def asset_root(self, asset: str) -> AssetRoot | None:
        for root in self.assets:
            if root.asset == asset:
                return root
        return None

    def to_wire(self) -> dict[str, Any]:
        return {
            "assets": [a.to_wire() for a in self.assets],
            "custodian": self.custodian,
            "exchange": self.exchange,
            "expires_at": format_timestamp(self.expires_at),
            "issued_at": format_timestamp(self.issued_at),
            "kind": self.kind.value,
            "previous": self.previous.hex(),
            "prices": [p.to_wire() for p in self.prices],
            "sequence": self.sequence,
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object) -> Statement:
        m = require_members(obj, what="statement", keys=_STATEMENT_KEYS)
        require_version(m["version"], expected=STATEMENT_VERSION, what="statement")
        kind_text = m["kind"]
        if not isinstance(kind_text, str) or kind_text not in {k.value for k in StatementKind}:
            raise DecodeError(f"kind {str(kind_text)[:20]!r} is not snapshot or delta")
        assets = require_list(m["assets"], what="assets", max_items=MAX_ASSETS)
        prices = require_list(m["prices"], what="prices", max_items=MAX_PRICES)
        return cls(
            custodian=validate_party(m["custodian"], what="custodian"),
            exchange=validate_party(m["exchange"], what="exchange"),
            sequence=require_int(m["sequence"], what="sequence", low=1, high=MAX_SEQUENCE),
            previous=parse_hex(m["previous"], length=32, what="previous"),
            issued_at=parse_timestamp(m["issued_at"]),
            expires_at=parse_timestamp(m["expires_at"]),
            kind=StatementKind(kind_text),
            assets=tuple(AssetRoot.from_wire(a) for a in assets),
            prices=tuple(PricePoint.from_wire(p) for p in prices),
        )

    def canonical_bytes(self) -> bytes:
        return compute_canonical_bytes(self.to_wire())

    def compute_digest(self) -> bytes:
        """The 32 bytes both signatures cover: SHA-256("mcb/statement/v1" || 0x00 || JCS)."""
        digest = self._digest
        if digest is None:
            digest = compute_digest(domain=DOMAIN_STATEMENT, obj=self.to_wire())
            object.__setattr__(self, "_digest", digest)  # frozen: set once, never changed
        return digest


# --- signatures ---------------------------------------------------------------------------------


def compute_p256_signature_wire(*, key_id: str, signature: bytes) -> dict[str, Any]:
    """The wire object of one ECDSA P-256 signature (64 bytes ``r || s``) by ``key_id``: the
    members ``algorithm``, ``key_id`` and ``signature`` (hex). The custodian's signature of a
    statement and the exchange's of a notice are written alike."""
    return {
        "algorithm": P256_ALGORITHM,
        "key_id": key_id,
        "signature": signature.hex(),
    }


def parse_p256_signature_wire(obj: object, *, what: str) -> tuple[str, bytes]:
    """The key id and 64 signature bytes of :func:`compute_p256_signature_wire`'s object;
    DecodeError, naming ``what``, for any other member, another algorithm or another length."""
    m = require_members(obj, what=what, keys=_P256_SIGNATURE_KEYS)
    if m["algorithm"] != P256_ALGORITHM:
        raise DecodeError(f"{what} algorithm must be {P256_ALGORITHM}")
    return validate_key_id(m["key_id"]), parse_hex(m["signature"], length=64, what=what)


@dataclass(frozen=True, slots=True)
class CustodianSignature:
    """ECDSA P-256 over the statement digest by the custodian's HSM key: 64 bytes r || s."""

    key_id: str
    signature: bytes

    def __post_init__(self) -> None:
        validate_key_id(self.key_id)
        require_bytes(self.signature, what="custodian signature", length=64)

    def to_wire(self) -> dict[str, Any]:
        return compute_p256_signature_wire(key_id=self.key_id, signature=self.signature)

    @classmethod
    def from_wire(cls, obj: object) -> CustodianSignature:
        key_id, signature = parse_p256_signature_wire(obj, what="custodian signature")
        return cls(key_id=key_id, signature=signature)


@dataclass(frozen=True, slots=True)
class QuorumSignature:
    """One aggregate BLS signature (96 bytes) by the co-signers listed in ``signers`` (key ids,
    sorted, distinct), all over the statement digest."""

    signers: tuple[str, ...]
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.signers, tuple):
            raise DecodeError("signers must be a tuple of key ids")
        for key_id in self.signers:
            validate_key_id(key_id)
        if len(self.signers) > MAX_COSIGNERS:
            raise DecodeError(f"more than {MAX_COSIGNERS} co-signers")
        if list(self.signers) != sorted(set(self.signers)):
            raise DecodeError("signers must be sorted and distinct")
        require_bytes(self.signature, what="quorum signature", length=96)

    def to_wire(self) -> dict[str, Any]:
        return {
            "algorithm": BLS_ALGORITHM,
            "signature": self.signature.hex(),
            "signers": list(self.signers),
        }

    @classmethod
    def from_wire(cls, obj: object) -> QuorumSignature:
        m = require_members(obj, what="quorum_signature", keys=_QUORUM_SIG_KEYS)
        if m["algorithm"] != BLS_ALGORITHM:
            raise DecodeError(f"quorum signature algorithm must be {BLS_ALGORITHM}")
        signers = require_list(m["signers"], what="signers", max_items=MAX_COSIGNERS)
        return cls(
            signers=tuple(validate_key_id(s) for s in signers),
            signature=parse_hex(m["signature"], length=96, what="quorum signature"),
        )


@dataclass(frozen=True, slots=True)
class SignedStatement:
    """A statement with both signatures. Its identity is the statement digest; the signatures are
    not part of it (so re-encoding an ECDSA signature cannot create a "different" statement)."""

    statement: Statement
    custodian_signature: CustodianSignature
    quorum_signature: QuorumSignature
    version: int = SIGNED_STATEMENT_VERSION

    def __post_init__(self) -> None:
        require_version(self.version, expected=SIGNED_STATEMENT_VERSION, what="signed statement")
        if not isinstance(self.statement, Statement):
            raise DecodeError("statement must be a Statement")
        if not isinstance(self.custodian_signature, CustodianSignature):
            raise DecodeError("custodian_signature must be a CustodianSignature")
        if not isinstance(self.quorum_signature, QuorumSignature):
            raise DecodeError("quorum_signature must be a QuorumSignature")

    @property
    def digest(self) -> bytes:
        return self.statement.compute_digest()

    def to_wire(self) -> dict[str, Any]:
        return {
            "custodian_signature": self.custodian_signature.to_wire(),
            "quorum_signature": self.quorum_signature.to_wire(),
            "statement": self.statement.to_wire(),
            "version": self.version,
        }

    def encode(self) -> bytes:
        """Wire bytes: the RFC 8785 form of :meth:`to_wire` (canonical, so byte-stable)."""
        return compute_canonical_bytes(self.to_wire())

    @classmethod
    def from_wire(cls, obj: object) -> SignedStatement:
        m = require_members(obj, what="signed statement", keys=_SIGNED_KEYS)
        require_version(m["version"], expected=SIGNED_STATEMENT_VERSION, what="signed statement")
        return cls(
            statement=Statement.from_wire(m["statement"]),
            custodian_signature=CustodianSignature.from_wire(m["custodian_signature"]),
            quorum_signature=QuorumSignature.from_wire(m["quorum_signature"]),
        )

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> SignedStatement:
        """Strictly decode wire bytes (size-bounded, no duplicate keys, no floats)."""
        return cls.from_wire(parse_json_object(data, max_bytes=max_bytes))
