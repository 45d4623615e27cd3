"""Generate the golden vectors in ``tests/vectors/``: inputs and expected outputs of every byte
layout and every verification decision, written out in JSON so that an implementation in another
language can check itself without running Python.

Usage::

    .venv/bin/python scripts/make_vectors.py           # (re)write tests/vectors/*.json
    .venv/bin/python scripts/make_vectors.py --check   # exit 1 if a file on disk would change

Everything is derived from fixed labels (no randomness, no clock), with one exception: ECDSA
signatures are randomized. A P-256 signature already stored in a vector file is therefore reused
when it still verifies for the same key and digest; only a digest that has no stored signature
gets a fresh one. So a second run, and ``--check``, reproduce the files byte for byte.

Every expected outcome is stated here explicitly, then confirmed by running this repository's
implementation; the generator refuses to write a vector that the implementation contradicts.
What this script does not do: it never edits anything outside ``tests/vectors/``, and the keys
in it are public test keys that must never protect anything.
"""

# ruff: noqa: E402 - the imports below need the sys.path entry made first.

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

# Run as a plain script, Python puts scripts/ (not the repository root) on the import path; put
# the root first so that ``attestations`` is this checkout's package.
ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attestations import bls
from attestations.amounts import Price
from attestations.canonical import (
    DOMAIN_KEY_ID,
    DOMAIN_STATEMENT,
    DOMAIN_TREE_HEAD,
    MAX_MESSAGE_BYTES,
    compute_canonical_bytes,
    compute_digest,
    compute_key_id,
    format_timestamp,
    parse_json_object,
    parse_timestamp,
)
from attestations.checkpoint import (
    Checkpoint,
    SignedCheckpoint,
    sign_checkpoint,
    verify_checkpoint,
    verify_same_history,
)
from attestations.disclosure import (
    ClientProof,
    DisclosedLeaf,
    build_trees,
    compute_asset_roots,
    compute_salt,
    verify_client_proof,
)
from attestations.errors import BridgeError, CounterpartyError, InvalidProof
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.merkle import (
    ACCOUNT_DOMAIN,
    EMPTY_HASHES,
    InclusionProof,
    Leaf,
    SumTree,
    compute_account_commitment,
    compute_leaf_hash,
    compute_node,
    verify_inclusion,
)
from attestations.p256 import ALGORITHM as P256_ALGORITHM
from attestations.p256 import CURVE_N, SoftwareP256Signer, verify_p256_digest
from attestations.signing import CoSignature, compute_quorum_signature, sign_statement
from attestations.statement import (
    BLS_ALGORITHM,
    GENESIS_PREVIOUS,
    AssetRoot,
    PricePoint,
    QuorumSignature,
    SignedStatement,
    Statement,
    StatementKind,
)
from attestations.translog import (
    EMPTY_ROOT,
    LogConsistencyProof,
    LogInclusionProof,
    TreeHead,
    compute_consistency_path,
    compute_inclusion_path,
    compute_root,
    detect_split_view,
    verify_log_consistency,
    verify_log_inclusion,
)
from attestations.translog import compute_leaf_hash as compute_log_leaf_hash
from attestations.verify import ChainHead, VerificationPolicy, verify_statement

VECTORS_DIR: Final = ROOT / "tests" / "vectors"
FILES: Final = (
    "canonical.json",
    "merkle.json",
    "statement.json",
    "verification.json",
    "translog.json",
    "client_proof.json",
)
OK: Final = "ok"
"""The ``expected`` value of an input that must be accepted; anything else is an error reason."""

SEED_PREFIX: Final = b"mcb-vectors/"
T0: Final = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
"""``issued_at`` of the first statement; every other time is an offset from it."""
CUSTODIAN: Final = "custodian-a"
EXCHANGE: Final = "exchange-x"
DECIMALS: Final = {"BTC": 8, "USDC": 6}
LIFETIME: Final = timedelta(hours=1)
QUORUM: Final = 2
U128_MAX: Final = 2**128 - 1

JsonObject = dict[str, Any]
StoredSignatures = Mapping[tuple[str, bytes], bytes]
"""(key id, digest) -> a 64-byte P-256 signature that verifies."""


class VectorError(Exception):
    """The implementation contradicts an expectation stated in this script."""


# --- small helpers ------------------------------------------------------------------------------


def seed(label: str) -> bytes:
    """32 fixed bytes per label: ``SHA-256("mcb-vectors/" || label)``."""
    return hashlib.sha256(SEED_PREFIX + label.encode("ascii")).digest()


def ts(moment: datetime) -> str:
    return format_timestamp(moment)


def outcome(action: Callable[[], object]) -> str:
    """``"ok"`` if ``action`` returns, else the ``reason`` of the project error it raises."""
    try:
        action()
    except BridgeError as exc:
        return exc.reason
    return OK


def confirm(name: str, expected: str, action: Callable[[], object]) -> str:
    got = outcome(action)
    if got != expected:
        raise VectorError(f"{name}: expected {expected!r}, the implementation gives {got!r}")
    return expected


def wire_copy(obj: JsonObject) -> JsonObject:
    return copy.deepcopy(obj)


def render(doc: JsonObject) -> str:
    # ASCII only, so the files survive any tool; JSON escapes decode to the same strings.
    return json.dumps(doc, indent=2, ensure_ascii=True) + "\n"


# --- P-256 signatures that stay stable across runs ----------------------------------------------


class StableSigner:
    """A development P-256 signer with a fixed private scalar that hands out the signature stored
    in the vector files for a digest (checked to verify) instead of a new random one."""

    def __init__(self, label: str, stored: StoredSignatures) -> None:
        self.label = label
        self.private_scalar = seed(f"p256/{label}")
        if not 1 <= int.from_bytes(self.private_scalar, "big") < CURVE_N:
            raise VectorError(f"the seed of {label} is not a valid P-256 scalar; pick a new label")
        self._signer = SoftwareP256Signer(
            insecure_development_only=True, private_scalar=self.private_scalar
        )
        # One signature per digest within a run too, so a digest signed for several vectors
        # carries the same signature everywhere (and the next run finds exactly one).
        self._signatures = dict(stored)

    @property
    def algorithm(self) -> str:
        return self._signer.algorithm

    @property
    def public_key(self) -> bytes:
        return self._signer.public_key

    @property
    def key_id(self) -> str:
        return self._signer.key_id

    def sign_digest(self, digest: bytes) -> bytes:
        key = (self.key_id, digest)
        signature = self._signatures.get(key)
        if signature is None:
            signature = self._signatures[key] = self._signer.sign_digest(digest)
        return signature

    def describe(self) -> JsonObject:
        return {
            "label": self.label,
            "algorithm": self.algorithm,
            "private_scalar": self.private_scalar.hex(),
            "public_key": self.public_key.hex(),
            "key_id": self.key_id,
        }


def _iter_signature_candidates(value: object) -> Iterator[tuple[str, bytes, bytes]]:
    """(key id, digest, signature) of every signed statement or signed checkpoint found anywhere
    in a parsed vector file, including messages stored as raw JSON text."""
    if isinstance(value, str):
        if value.startswith("{"):
            try:
                yield from _iter_signature_candidates(parse_json_object(value))
            except CounterpartyError:
                return
        return
    if isinstance(value, list):
        for item in value:
            yield from _iter_signature_candidates(item)
        return
    if not isinstance(value, dict):
        return
    found = _signature_of(value)
    if found is not None:
        yield found
    for item in value.values():
        yield from _iter_signature_candidates(item)


def _signature_of(obj: JsonObject) -> tuple[str, bytes, bytes] | None:
    """(key id, digest, signature) if ``obj`` is a signed statement or signed checkpoint."""
    try:
        if "custodian_signature" in obj:
            signed = SignedStatement.from_wire(obj)
            signature = signed.custodian_signature
            return signature.key_id, signed.digest, signature.signature
        if "checkpoint" in obj:
            checkpoint = SignedCheckpoint.decode(compute_canonical_bytes(obj))
            return checkpoint.key_id, checkpoint.checkpoint.compute_digest(), checkpoint.signature
    except CounterpartyError:
        return None
    return None


def load_stored_signatures(directory: Path = VECTORS_DIR) -> dict[tuple[str, bytes], bytes]:
    """Every P-256 signature in the existing vector files that verifies under one of this
    script's keys, by (key id, digest). When two verify for one digest, the smaller wins, so the
    choice does not depend on file order."""
    public_keys = {
        signer.key_id: signer.public_key
        for signer in (StableSigner(label, {}) for label in P256_LABELS)
    }
    stored: dict[tuple[str, bytes], bytes] = {}
    for name in FILES:
        path = directory / name
        if not path.exists():
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key_id, digest, signature in _iter_signature_candidates(document):
            public_key = public_keys.get(key_id)
            if public_key is None:
                continue
            try:
                verify_p256_digest(public_key=public_key, digest=digest, signature=signature)
            except CounterpartyError:
                continue
            known = stored.get((key_id, digest))
            stored[(key_id, digest)] = signature if known is None else min(known, signature)
    return stored


# --- the fixed cast: keys, registry, leaves -----------------------------------------------------

P256_LABELS: Final = (
    "custodian-primary",
    "custodian-revoked",
    "custodian-not-yet-valid",
    "custodian-unregistered",
    "exchange-primary",
)
COSIGNER_COUNT: Final = 4
"""Co-signers 0, 1 and 2 are registered (quorum 2 of 3); co-signer 3 is not."""


@dataclass(frozen=True, slots=True)
class Cosigner:
    index: int
    ikm: bytes
    secret_key: int
    public_key: bytes
    proof_of_possession: bytes
    key_id: str

    @classmethod
    def make(cls, index: int) -> Cosigner:
        ikm = seed(f"bls/cosigner-{index}")
        secret_key = bls.generate_secret_key(ikm)
        public_key = bls.compute_public_key(secret_key)
        return cls(
            index=index,
            ikm=ikm,
            secret_key=secret_key,
            public_key=public_key,
            proof_of_possession=bls.prove_possession(secret_key),
            key_id=compute_key_id(algorithm=BLS_ALGORITHM, public_key=public_key),
        )

    def cosign(self, digest: bytes) -> CoSignature:
        return CoSignature(self.key_id, bls.sign(secret_key=self.secret_key, message=digest))

    def describe(self) -> JsonObject:
        return {
            "label": f"cosigner-{self.index}",
            "algorithm": BLS_ALGORITHM,
            "ikm": self.ikm.hex(),
            "secret_key": self.secret_key.to_bytes(32, "big").hex(),
            "public_key": self.public_key.hex(),
            "proof_of_possession": self.proof_of_possession.hex(),
            "key_id": self.key_id,
        }


@functools.cache
def make_cosigner(index: int) -> Cosigner:
    # Cached: a proof of possession costs a hash to G2 on py_ecc, and the test suite runs the
    # generator more than once per process.
    return Cosigner.make(index)


@functools.cache
def make_registry(records: tuple[KeyRecord, ...], *, quorum: int | None) -> KeyRegistry:
    """The verifier's registry of ``records`` (registration runs PopVerify on every BLS key,
    which is slow on py_ecc; cached per process for the same reason). Never mutated."""
    return KeyRegistry.of(records, quorums={} if quorum is None else {CUSTODIAN: quorum})


SALT_SECRET: Final = seed("salt-secret")

STATE_1: Final = (
    ("alice", "BTC", 0, 150_000_000),
    ("bob", "BTC", 1, 42),
    ("carol", "BTC", 2, 7_000_000_000),
    ("alice", "USDC", 0, 1_000_000_000_000),
    ("dave", "USDC", 1, 25_000_000),
)
"""(account, asset, position, quantity) of every leaf at sequence 1."""
STATE_2: Final = tuple(
    (account, asset, position, 1_000_042 if (account, asset) == ("bob", "BTC") else quantity)
    for account, asset, position, quantity in STATE_1
)
"""Sequence 2 (a delta): bob pledged one more million satoshi of BTC."""


def disclosed(state: Sequence[tuple[str, str, int, int]]) -> list[DisclosedLeaf]:
    return [
        DisclosedLeaf(
            account=account,
            asset=asset,
            position=position,
            salt=compute_salt(secret=SALT_SECRET, exchange=EXCHANGE, account=account, asset=asset),
            quantity=quantity,
        )
        for account, asset, position, quantity in state
    ]


class Cast:
    """All keys and the verifier's registry, built once per run."""

    def __init__(self, stored: StoredSignatures) -> None:
        signers = {label: StableSigner(label, stored) for label in P256_LABELS}
        self.primary = signers["custodian-primary"]
        self.revoked = signers["custodian-revoked"]
        self.not_yet_valid = signers["custodian-not-yet-valid"]
        self.unregistered = signers["custodian-unregistered"]
        self.exchange = signers["exchange-primary"]
        self.cosigners = [make_cosigner(i) for i in range(COSIGNER_COUNT)]
        opened = T0 - timedelta(days=30)
        self.revoked_at = T0 - timedelta(hours=1)
        records = [
            KeyRecord(CUSTODIAN, KeyRole.CUSTODIAN, self.primary.public_key, opened),
            KeyRecord(
                CUSTODIAN,
                KeyRole.CUSTODIAN,
                self.revoked.public_key,
                opened,
                revoked_at=self.revoked_at,
            ),
            KeyRecord(
                CUSTODIAN, KeyRole.CUSTODIAN, self.not_yet_valid.public_key, T0 + timedelta(days=1)
            ),
            KeyRecord(EXCHANGE, KeyRole.EXCHANGE, self.exchange.public_key, opened),
            *(
                KeyRecord(
                    CUSTODIAN,
                    KeyRole.COSIGNER,
                    cosigner.public_key,
                    opened,
                    proof_of_possession=cosigner.proof_of_possession,
                )
                for cosigner in self.cosigners[:3]
            ),
        ]
        self.registry = make_registry(tuple(records), quorum=QUORUM)
        self.registry_wire = self.registry.to_wire()
        checkpoint_registry = make_registry(tuple(records[:1]), quorum=None)
        self.checkpoint_registry = checkpoint_registry
        self.checkpoint_registry_wire = checkpoint_registry.to_wire()


# --- statements ---------------------------------------------------------------------------------


def prices() -> tuple[PricePoint, ...]:
    observed = T0 - timedelta(seconds=5)
    return (
        PricePoint(
            Price.parse(asset="BTC", quote="USD", text="64123.45"), "vectors:fixed", observed
        ),
        PricePoint(
            Price.parse(asset="USDC", quote="USD", text="1.0000"), "vectors:fixed", observed
        ),
    )


def asset_roots(
    leaves: Sequence[DisclosedLeaf], *, depths: Mapping[str, int] | None = None
) -> tuple[AssetRoot, ...]:
    return compute_asset_roots(build_trees(leaves, depths=depths), decimals=DECIMALS)


def statement_depths(statement: Statement) -> dict[str, int]:
    return {root.asset: root.depth for root in statement.assets}


def receiver_trees(leaves: Sequence[DisclosedLeaf], data: bytes) -> dict[str, SumTree]:
    """The trees a receiver rebuilds from disclosed leaves: at the depths the statement states
    (protocol section 7, step 7), or the default depth if the message does not decode."""
    try:
        depths = statement_depths(SignedStatement.decode(data).statement)
    except CounterpartyError:
        depths = {}
    return build_trees(leaves, depths=depths)


def make_statement(
    *,
    sequence: int,
    previous: bytes,
    kind: StatementKind,
    issued_at: datetime,
    state: Sequence[tuple[str, str, int, int]],
    depths: Mapping[str, int] | None = None,
) -> Statement:
    return Statement(
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        sequence=sequence,
        previous=previous,
        issued_at=issued_at,
        expires_at=issued_at + LIFETIME,
        kind=kind,
        assets=asset_roots(disclosed(state), depths=depths),
        prices=prices(),
    )


def sign(
    cast: Cast,
    statement: Statement,
    *,
    signer: StableSigner | None = None,
    cosigners: Sequence[int] = (0, 1),
) -> SignedStatement:
    digest = statement.compute_digest()
    return sign_statement(
        statement,
        custodian_signer=cast.primary if signer is None else signer,
        cosignatures=[cast.cosigners[i].cosign(digest) for i in cosigners],
    )


def head_wire(head: ChainHead) -> JsonObject:
    return {
        "custodian": head.custodian,
        "exchange": head.exchange,
        "sequence": head.sequence,
        "digest": head.digest.hex(),
        "issued_at": ts(head.issued_at),
    }


def head_from_wire(obj: JsonObject) -> ChainHead:
    return ChainHead(
        custodian=obj["custodian"],
        exchange=obj["exchange"],
        sequence=obj["sequence"],
        digest=bytes.fromhex(obj["digest"]),
        issued_at=parse_timestamp(obj["issued_at"]),
    )


def leaves_wire(leaves: Sequence[DisclosedLeaf]) -> list[JsonObject]:
    return [leaf.to_wire() for leaf in leaves]


# --- canonical.json -----------------------------------------------------------------------------


def canonical_case(name: str, obj: JsonObject, domains: Sequence[str]) -> JsonObject:
    data = compute_canonical_bytes(obj)
    return {
        "name": name,
        "object": obj,
        "canonical_utf8": data.decode("utf-8"),
        "canonical_hex": data.hex(),
        "digests": [
            {"domain": domain, "digest": compute_digest(domain=domain, obj=obj).hex()}
            for domain in domains
        ],
    }


def key_id_case(name: str, algorithm: str, public_key: bytes) -> JsonObject:
    preimage = (
        DOMAIN_KEY_ID.encode("ascii") + b"\x00" + algorithm.encode("ascii") + b"\x00" + public_key
    )
    key_id = compute_key_id(algorithm=algorithm, public_key=public_key)
    if hashlib.sha256(preimage).hexdigest() != key_id:
        raise VectorError(f"key id preimage of {name} does not match compute_key_id")
    return {
        "name": name,
        "algorithm": algorithm,
        "public_key": public_key.hex(),
        "preimage_hex": preimage.hex(),
        "key_id": key_id,
    }


def strict_json_case(
    name: str, expected: str, *, text: str | None = None, raw: bytes | None = None, **extra: int
) -> JsonObject:
    data = raw if raw is not None else (text or "").encode("utf-8")
    max_bytes = extra.get("max_bytes", MAX_MESSAGE_BYTES)
    confirm(f"strict JSON {name}", expected, lambda: parse_json_object(data, max_bytes=max_bytes))
    case: JsonObject = {"name": name}
    if raw is not None:
        case["hex"] = raw.hex()
    else:
        case["text"] = text
    case.update(extra)
    case["expected"] = expected
    return case


def build_canonical(cast: Cast, statement: Statement) -> JsonObject:
    rfc8785_sorting = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    rfc6979_key = bytes.fromhex(
        "0460fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6"
        "7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299"
    )
    nested = '{"a":' * 32 + "1" + "}" * 32
    too_deep = '{"a":' * 33 + "1" + "}" * 33
    return {
        "description": (
            "Canonical bytes (RFC 8785 / JCS) of JSON objects, their domain-separated digests "
            "digest = SHA-256(domain_ascii || 0x00 || canonical_bytes), key ids "
            "key_id = hex(SHA-256('mcb/key/v1' || 0x00 || algorithm_ascii || 0x00 || public_key)), "
            "and the strict JSON reader every wire object goes through. For each 'cases' entry: "
            "canonicalize 'object' and compare with canonical_hex (canonical_utf8 is the same "
            "bytes as text), then hash with each domain. For each 'strict_json' entry: parse "
            "'text' (UTF-8) or 'hex' (raw bytes) with the size bound max_bytes (default "
            f"{MAX_MESSAGE_BYTES}) and compare with 'expected' ('ok' or an error reason)."
        ),
        "domain_separator_hex": "00",
        "domains": [DOMAIN_STATEMENT, DOMAIN_TREE_HEAD, DOMAIN_KEY_ID],
        "cases": [
            canonical_case("empty object", {}, [DOMAIN_STATEMENT]),
            canonical_case(
                "members sorted, no whitespace",
                {"version": 1, "b": [True, False, None], "a": {"y": "2", "x": 1}},
                [DOMAIN_STATEMENT, DOMAIN_TREE_HEAD],
            ),
            canonical_case(
                "integers at the interoperable bounds",
                {"max": 2**53 - 1, "min": -(2**53 - 1), "zero": 0, "version": 1},
                [DOMAIN_STATEMENT],
            ),
            canonical_case(
                "string escapes: control characters as \\u00xx, short forms, '/' and non-ASCII "
                "unescaped",
                {"s": '\u0000\u0001\b\t\n\f\r"\\/\u007f\u00e9\u2028', "version": 1},
                [DOMAIN_STATEMENT],
            ),
            canonical_case(
                "RFC 8785 section 3.2.3 member ordering (by UTF-16 code units)",
                rfc8785_sorting,
                [DOMAIN_STATEMENT],
            ),
            canonical_case(
                "the statement of statement.json, under two domains (the digests differ)",
                statement.to_wire(),
                [DOMAIN_STATEMENT, DOMAIN_TREE_HEAD],
            ),
        ],
        "key_ids": [
            key_id_case("RFC 6979 A.2.5 P-256 key", P256_ALGORITHM, rfc6979_key),
            key_id_case("custodian-primary", P256_ALGORITHM, cast.primary.public_key),
            key_id_case("cosigner-0", BLS_ALGORITHM, cast.cosigners[0].public_key),
        ],
        "strict_json": [
            strict_json_case("plain object", OK, text='{"a":1,"b":"x"}'),
            strict_json_case(
                "largest interoperable integers",
                OK,
                text='{"a":9007199254740991,"b":-9007199254740991}',
            ),
            strict_json_case("integer beyond 2^53-1", "malformed", text='{"a":9007199254740992}'),
            strict_json_case("fraction", "float_rejected", text='{"a":1.5}'),
            strict_json_case("integral fraction", "float_rejected", text='{"a":1.0}'),
            strict_json_case("exponent", "float_rejected", text='{"a":1e3}'),
            strict_json_case("NaN", "malformed", text='{"a":NaN}'),
            strict_json_case("Infinity", "malformed", text='{"a":Infinity}'),
            strict_json_case("duplicate member", "malformed", text='{"a":1,"a":1}'),
            strict_json_case("top level is an array", "malformed", text="[1]"),
            strict_json_case("trailing garbage", "malformed", text='{"a":1}x'),
            strict_json_case("not UTF-8", "malformed", raw=b'{"a":"\xff"}'),
            strict_json_case("32 nested objects below the top", OK, text=nested),
            strict_json_case("33 nested objects below the top", "malformed", text=too_deep),
            strict_json_case("exactly max_bytes", OK, text='{"a":"0123"}', max_bytes=12),
            strict_json_case(
                "one byte over max_bytes", "malformed", text='{"a":"01234"}', max_bytes=12
            ),
        ],
    }


# --- merkle.json --------------------------------------------------------------------------------


def commitment_case(account: str, salt: bytes) -> JsonObject:
    encoded = account.encode("ascii")
    preimage = ACCOUNT_DOMAIN + b"\x00" + salt + len(encoded).to_bytes(2, "big") + encoded
    commitment = compute_account_commitment(account=account, salt=salt)
    if hashlib.sha256(preimage).digest() != commitment:
        raise VectorError(f"commitment preimage of {account} does not match")
    return {
        "account": account,
        "salt": salt.hex(),
        "preimage_hex": preimage.hex(),
        "commitment": commitment.hex(),
    }


def leaf_case(position: int, commitment: bytes, asset: str, quantity: int) -> JsonObject:
    code = asset.encode("ascii")
    preimage = (
        b"\x00"
        + position.to_bytes(8, "big")
        + commitment
        + len(code).to_bytes(1, "big")
        + code
        + quantity.to_bytes(16, "big")
    )
    digest = compute_leaf_hash(
        position=position, commitment=commitment, asset=asset, quantity=quantity
    )
    if hashlib.sha256(preimage).digest() != digest:
        raise VectorError("leaf preimage does not match compute_leaf_hash")
    return {
        "position": position,
        "commitment": commitment.hex(),
        "asset": asset,
        "quantity": str(quantity),
        "preimage_hex": preimage.hex(),
        "hash": digest.hex(),
    }


def node_case(left: tuple[bytes, int], right: tuple[bytes, int]) -> JsonObject:
    preimage = (
        b"\x01" + left[0] + left[1].to_bytes(16, "big") + right[0] + right[1].to_bytes(16, "big")
    )
    digest, total = compute_node(
        left_hash=left[0], left_sum=left[1], right_hash=right[0], right_sum=right[1]
    )
    if hashlib.sha256(preimage).digest() != digest:
        raise VectorError("node preimage does not match compute_node")
    return {
        "left_hash": left[0].hex(),
        "left_sum": str(left[1]),
        "right_hash": right[0].hex(),
        "right_sum": str(right[1]),
        "preimage_hex": preimage.hex(),
        "hash": digest.hex(),
        "sum": str(total),
    }


@dataclass(frozen=True, slots=True)
class TreeInput:
    name: str
    asset: str
    leaves: tuple[tuple[str, bytes, int, int], ...]
    """(account, salt, position, quantity)"""


def tree_levels(tree_input: TreeInput, depth: int) -> list[list[tuple[bytes, int]]]:
    """Every node of the tree from the definition (not from SumTree): level h has 2^(depth-h)."""
    slots: list[tuple[bytes, int]] = [(EMPTY_HASHES[0], 0)] * (1 << depth)
    for account, salt, position, quantity in tree_input.leaves:
        commitment = compute_account_commitment(account=account, salt=salt)
        slots[position] = (
            compute_leaf_hash(
                position=position, commitment=commitment, asset=tree_input.asset, quantity=quantity
            ),
            quantity,
        )
    levels = [slots]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append(
            [
                compute_node(
                    left_hash=below[i][0],
                    left_sum=below[i][1],
                    right_hash=below[i + 1][0],
                    right_sum=below[i + 1][1],
                )
                for i in range(0, len(below), 2)
            ]
        )
    return levels


def build_tree_vector(tree_input: TreeInput) -> tuple[JsonObject, SumTree]:
    leaves = [
        Leaf(position, compute_account_commitment(account=account, salt=salt), quantity)
        for account, salt, position, quantity in tree_input.leaves
    ]
    tree = SumTree.build(tree_input.asset, leaves)
    levels = tree_levels(tree_input, tree.depth)
    if levels[-1][0] != (tree.root, tree.total):
        raise VectorError(f"tree {tree_input.name}: SumTree disagrees with the definition")
    proofs = []
    for account, salt, position, _quantity in tree_input.leaves:
        proof = tree.prove(position)
        confirm(
            f"proof {tree_input.name}/{position}",
            OK,
            functools.partial(
                verify_inclusion,
                proof,
                account=account,
                salt=salt,
                root=tree.root,
                total=tree.total,
            ),
        )
        proofs.append(
            {
                "account": account,
                "salt": salt.hex(),
                "proof": proof.to_wire(),
                "expected": OK,
            }
        )
    vector: JsonObject = {
        "name": tree_input.name,
        "asset": tree_input.asset,
        "leaves": [
            {
                "account": account,
                "salt": salt.hex(),
                "position": position,
                "quantity": str(quantity),
            }
            for account, salt, position, quantity in tree_input.leaves
        ],
        "depth": tree.depth,
        "count": tree.count,
        "levels": [
            {
                "height": height,
                "nodes": [
                    {"index": index, "hash": digest.hex(), "sum": str(total)}
                    for index, (digest, total) in enumerate(level)
                ],
            }
            for height, level in enumerate(levels)
        ],
        "root": tree.root.hex(),
        "total": str(tree.total),
        "proofs": proofs,
    }
    return vector, tree


def invalid_proof_case(
    name: str,
    expected: str,
    *,
    account: str,
    salt: bytes,
    root: bytes,
    total: int,
    proof: JsonObject | None = None,
    proof_json: str | None = None,
) -> JsonObject:
    text = proof_json if proof_json is not None else json.dumps(proof)

    def run() -> None:
        parsed = InclusionProof.from_wire(parse_json_object(text))
        verify_inclusion(parsed, account=account, salt=salt, root=root, total=total)

    confirm(f"invalid proof {name}", expected, run)
    case: JsonObject = {"name": name, "account": account, "salt": salt.hex()}
    if proof_json is not None:
        case["proof_json"] = proof_json
    else:
        case["proof"] = proof
    case.update({"root": root.hex(), "total": str(total), "expected": expected})
    return case


def build_merkle() -> JsonObject:
    alice_salt = bytes(range(32))
    bob_salt = bytes(32)
    c_alice = compute_account_commitment(account="alice", salt=alice_salt)
    c_bob = compute_account_commitment(account="bob@desk-1", salt=bob_salt)
    leaf_a = compute_leaf_hash(position=0, commitment=c_alice, asset="USDC", quantity=1_500_000)
    leaf_b = compute_leaf_hash(position=2, commitment=c_bob, asset="USDC", quantity=250)
    half = 2**127

    docs_tree = TreeInput(
        "docs example (docs/protocol.md section 3)",
        "USDC",
        (("alice", alice_salt, 0, 1_500_000), ("bob@desk-1", bob_salt, 2, 250)),
    )
    five = TreeInput(
        "five leaves of one asset, depth 3",
        "BTC",
        tuple(
            (account, seed(f"merkle/salt/{account}"), position, quantity)
            for position, (account, quantity) in enumerate(
                (
                    ("alice", 150_000_000),
                    ("bob", 42),
                    ("carol", 7_000_000_000),
                    ("dave", 0),
                    ("erin", 123_456_789),
                )
            )
        ),
    )
    docs_vector, _ = build_tree_vector(docs_tree)
    five_vector, tree = build_tree_vector(five)

    # Invalid proofs, all variations of bob's proof (position 1) in the five-leaf tree.
    bob_account, bob_five_salt, _, _ = five.leaves[1]
    good = tree.prove(1).to_wire()
    common: dict[str, Any] = {
        "account": bob_account,
        "salt": bob_five_salt,
        "root": tree.root,
        "total": tree.total,
    }

    def variant(change: Callable[[JsonObject], None]) -> JsonObject:
        proof = wire_copy(good)
        change(proof)
        return proof

    def set_quantity(value: str) -> Callable[[JsonObject], None]:
        return lambda p: p.__setitem__("quantity", value)

    def set_sibling(height: int, member: str, value: str) -> Callable[[JsonObject], None]:
        return lambda p: p["siblings"][height].__setitem__(member, value)

    flipped = bytearray(bytes.fromhex(good["siblings"][1]["hash"]))
    flipped[31] ^= 1
    invalid = [
        invalid_proof_case(
            "quantity changed",
            "invalid_proof",
            proof=variant(set_quantity("43")),
            **common,
        ),
        invalid_proof_case(
            "sibling hash changed",
            "invalid_proof",
            proof=variant(set_sibling(1, "hash", flipped.hex())),
            **common,
        ),
        invalid_proof_case(
            "sibling sum changed (the parent hash covers it)",
            "invalid_proof",
            proof=variant(set_sibling(2, "sum", str(int(good["siblings"][2]["sum"]) + 1))),
            **common,
        ),
        invalid_proof_case(
            "position changed (the leaf hash covers it)",
            "invalid_proof",
            proof=variant(lambda p: p.__setitem__("position", 0)),
            **common,
        ),
        invalid_proof_case(
            "another account's salt",
            "invalid_proof",
            proof=good,
            **{**common, "salt": five.leaves[0][1]},
        ),
        invalid_proof_case(
            "right root, wrong total",
            "sum_mismatch",
            proof=good,
            **{**common, "total": tree.total + 1},
        ),
        invalid_proof_case(
            "sibling sum 2^128-1: the path sum overflows",
            "sum_overflow",
            proof=variant(set_sibling(0, "sum", str(U128_MAX))),
            **common,
        ),
        invalid_proof_case(
            "negative sibling sum",
            "negative_sum",
            proof=variant(set_sibling(0, "sum", "-150000000")),
            **common,
        ),
        invalid_proof_case(
            "quantity 2^128",
            "sum_overflow",
            proof=variant(set_quantity(str(2**128))),
            **common,
        ),
        invalid_proof_case(
            "quantity with a leading zero",
            "invalid_amount",
            proof=variant(set_quantity("042")),
            **common,
        ),
        invalid_proof_case(
            "quantity as a JSON number",
            "invalid_amount",
            proof=variant(lambda p: p.__setitem__("quantity", 42)),
            **common,
        ),
        invalid_proof_case(
            "quantity as a float",
            "float_rejected",
            proof_json=json.dumps(good).replace('"quantity": "42"', '"quantity": 42.0'),
            **common,
        ),
        invalid_proof_case(
            "upper-case sibling hash",
            "malformed",
            proof=variant(set_sibling(1, "hash", good["siblings"][1]["hash"].upper())),
            **common,
        ),
        invalid_proof_case(
            "one sibling missing",
            "malformed",
            proof=variant(lambda p: p["siblings"].pop()),
            **common,
        ),
        invalid_proof_case(
            "position beyond 2^depth",
            "malformed",
            proof=variant(lambda p: p.__setitem__("position", 9)),
            **common,
        ),
        invalid_proof_case(
            "unknown member",
            "malformed",
            proof=variant(lambda p: p.__setitem__("note", "x")),
            **common,
        ),
        invalid_proof_case(
            "version true",
            "malformed",
            proof=variant(lambda p: p.__setitem__("version", True)),
            **common,
        ),
    ]
    overflow_node = {
        "left_hash": leaf_a.hex(),
        "left_sum": str(half),
        "right_hash": leaf_b.hex(),
        "right_sum": str(half),
        "expected": confirm(
            "node overflow",
            "sum_overflow",
            lambda: compute_node(
                left_hash=leaf_a, left_sum=half, right_hash=leaf_b, right_sum=half
            ),
        ),
    }
    return {
        "description": (
            "Merkle sum tree byte layouts (docs/protocol.md section 3): account commitments, leaf "
            "hashes, interior nodes, empty subtrees, whole trees level by level, inclusion "
            "proofs in wire form, and proofs that must be rejected. Hashes and salts are "
            "lowercase hex, quantities and sums decimal strings. For an 'invalid_proofs' entry, "
            "parse 'proof' (or the raw text 'proof_json') strictly, decode it as an inclusion "
            "proof and verify it with account, salt, root and total; 'expected' is the reason "
            "of the first check that fails (decoding before verification)."
        ),
        "constants": {
            "account_domain": ACCOUNT_DOMAIN.decode("ascii"),
            "leaf_prefix_hex": "00",
            "node_prefix_hex": "01",
            "empty_prefix_hex": "02",
            "sum_limit": str(2**128),
            "max_depth": 48,
            "position_limit": str(2**48),
        },
        "commitments": [
            commitment_case("alice", alice_salt),
            commitment_case("bob@desk-1", bob_salt),
            commitment_case("a.b_c:d@e-F9", seed("merkle/salt/special")),
            commitment_case("x" * 128, seed("merkle/salt/long")),
        ],
        "leaf_hashes": [
            leaf_case(0, c_alice, "USDC", 1_500_000),
            leaf_case(2, c_bob, "USDC", 250),
            leaf_case(2**48 - 1, c_bob, "BTC", U128_MAX),
            leaf_case(5, c_alice, "ABCDEFGHIJKLMNOP", 0),
        ],
        "node_hashes": [
            node_case((EMPTY_HASHES[0], 0), (EMPTY_HASHES[0], 0)),
            node_case((leaf_a, 1_500_000), (leaf_b, 250)),
            node_case((leaf_a, half), (leaf_b, half - 1)),
        ],
        "node_errors": [overflow_node],
        "empty_hashes": [
            {"height": height, "hash": EMPTY_HASHES[height].hex(), "sum": "0"}
            for height in (0, 1, 2, 3, 4, 48)
        ],
        "trees": [docs_vector, five_vector],
        "invalid_proofs": invalid,
    }


# --- statement.json -----------------------------------------------------------------------------


def build_statement(cast: Cast, first: Statement, signed: SignedStatement) -> JsonObject:
    leaves = disclosed(STATE_1)
    digest = first.compute_digest()
    cosignatures = [cast.cosigners[i].cosign(digest) for i in (0, 1)]
    now = T0 + timedelta(seconds=5)
    verified = verify_statement(
        signed.encode(),
        registry=cast.registry,
        head=None,
        now=now,
        trees=build_trees(leaves, depths=statement_depths(first)),
    )
    canonical = first.canonical_bytes()
    message = signed.encode()
    return {
        "description": (
            "One signed statement end to end. Recompute: the canonical bytes and digest of "
            "'statement' (domain mcb/statement/v1); each co-signer's secret key from its ikm "
            "(BLS KeyGen, empty key_info), its public key, proof of possession and key id; the "
            "partial BLS signatures over the 32 digest bytes and their aggregate (BLS "
            "signatures are deterministic, so they must match exactly); the disclosed leaves' "
            "salts, trees and roots. Verify: the P-256 signature (randomized, so verify it, do "
            "not recompute it) and the whole message with 'registry' at 'now' without a chain "
            "head, which must give 'expected_head'."
        ),
        "now": ts(now),
        "custodian_key": cast.primary.describe(),
        "cosigners": [cast.cosigners[i].describe() for i in range(3)],
        "registry": cast.registry_wire,
        "salt_derivation": {
            "secret": SALT_SECRET.hex(),
            "rule": "HMAC-SHA-256(secret, 'mcb/salt/v1' 0x00 exchange 0x00 account 0x00 asset)",
            "examples": [
                {
                    "exchange": EXCHANGE,
                    "account": leaf.account,
                    "asset": leaf.asset,
                    "message_hex": (
                        b"mcb/salt/v1\x00"
                        + b"\x00".join(
                            part.encode() for part in (EXCHANGE, leaf.account, leaf.asset)
                        )
                    ).hex(),
                    "salt": leaf.salt.hex(),
                }
                for leaf in leaves
            ],
        },
        "disclosed_leaves": leaves_wire(leaves),
        "statement": first.to_wire(),
        "canonical_hex": canonical.hex(),
        "digest": digest.hex(),
        "cosignatures": [
            {"key_id": c.key_id, "signature": c.signature.hex()} for c in cosignatures
        ],
        "aggregate_signature": compute_quorum_signature(cosignatures).signature.hex(),
        "signed_statement": signed.to_wire(),
        "message_utf8": message.decode("utf-8"),
        "expected": OK,
        "expected_head": head_wire(verified.head),
    }


# --- verification.json --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    expected: str
    message: JsonObject | None = None
    message_text: str | None = None
    head: ChainHead | None = None
    now: datetime = T0 + timedelta(seconds=5)
    leaves: tuple[DisclosedLeaf, ...] | None = None
    max_bytes: int | None = None
    note: str | None = None

    def data(self) -> bytes:
        if self.message_text is not None:
            return self.message_text.encode("utf-8")
        if self.message is None:
            raise VectorError(f"case {self.name} has no message")
        return compute_canonical_bytes(self.message)


def run_case(cast: Cast, case: Case) -> tuple[str, ChainHead | None]:
    result: list[ChainHead] = []

    def run() -> None:
        verified = verify_statement(
            case.data(),
            registry=cast.registry,
            head=case.head,
            now=case.now,
            trees=None if case.leaves is None else receiver_trees(case.leaves, case.data()),
            max_bytes=MAX_MESSAGE_BYTES if case.max_bytes is None else case.max_bytes,
        )
        result.append(verified.head)

    confirm(f"verification case {case.name}", case.expected, run)
    return case.expected, (result[0] if result else None)


def case_wire(cast: Cast, case: Case) -> JsonObject:
    expected, new_head = run_case(cast, case)
    out: JsonObject = {"name": case.name}
    if case.note is not None:
        out["note"] = case.note
    if case.message_text is not None:
        out["message_text"] = case.message_text
    else:
        out["message"] = case.message
    if case.max_bytes is not None:
        out["max_bytes"] = case.max_bytes
        out["message_bytes"] = len(case.data())
    out["head"] = None if case.head is None else head_wire(case.head)
    out["now"] = ts(case.now)
    if case.leaves is not None:
        out["leaves"] = leaves_wire(case.leaves)
    out["expected"] = expected
    if new_head is not None:
        out["expected_head"] = head_wire(new_head)
    return out


def replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise VectorError(f"{old!r} occurs {text.count(old)} times, expected once")
    return text.replace(old, new)


def build_verification(
    cast: Cast, first: Statement, signed_first: SignedStatement
) -> tuple[JsonObject, Statement, SignedStatement]:
    state_1 = tuple(disclosed(STATE_1))
    state_2 = tuple(disclosed(STATE_2))
    d1 = first.compute_digest()
    head_1 = ChainHead(CUSTODIAN, EXCHANGE, 1, d1, first.issued_at)

    second = make_statement(
        sequence=2,
        previous=d1,
        kind=StatementKind.DELTA,
        issued_at=T0 + timedelta(seconds=60),
        state=STATE_2,
    )
    signed_second = sign(cast, second)
    head_2 = ChainHead(CUSTODIAN, EXCHANGE, 2, second.compute_digest(), second.issued_at)
    now_2 = T0 + timedelta(seconds=65)
    third = make_statement(
        sequence=3,
        previous=second.compute_digest(),
        kind=StatementKind.DELTA,
        issued_at=T0 + timedelta(seconds=120),
        state=STATE_2,
    )
    fork = make_statement(
        sequence=2,
        previous=d1,
        kind=StatementKind.DELTA,
        issued_at=T0 + timedelta(seconds=60),
        state=[(a, s, p, 5 if (a, s) == ("bob", "BTC") else q) for a, s, p, q in STATE_1],
    )
    wrong_previous = replace(second, previous=seed("not-a-statement"))
    backdated = replace(
        second, issued_at=T0 - timedelta(seconds=1), expires_at=T0 - timedelta(seconds=1) + LIFETIME
    )

    m1 = signed_first.to_wire()
    text_1 = signed_first.encode().decode("utf-8")
    btc_total = next(root.total for root in first.assets if root.asset == "BTC")

    def tampered(change: Callable[[JsonObject], None]) -> JsonObject:
        message = wire_copy(m1)
        change(message)
        return message

    def set_btc_total(value: str) -> Callable[[JsonObject], None]:
        return lambda m: m["statement"]["assets"][0].__setitem__("total", value)

    flipped = bytearray(signed_first.custodian_signature.signature)
    flipped[31] ^= 0x01
    quorum = signed_first.quorum_signature
    digest_1 = d1
    mixed = compute_quorum_signature(
        [cast.cosigners[0].cosign(digest_1), cast.cosigners[2].cosign(digest_1)]
    )
    bad_aggregate = replace(
        signed_first,
        quorum_signature=QuorumSignature(signers=quorum.signers, signature=mixed.signature),
    )
    infinity = replace(
        signed_first,
        quorum_signature=QuorumSignature(signers=quorum.signers, signature=b"\xc0" + bytes(95)),
    )
    empty_quorum = wire_copy(m1)
    empty_quorum["quorum_signature"]["signers"] = []
    repeated_signer = wire_copy(m1)
    repeated_signer["quorum_signature"]["signers"] = [quorum.signers[0], quorum.signers[0]]

    at_revocation = make_statement(
        sequence=1,
        previous=GENESIS_PREVIOUS,
        kind=StatementKind.SNAPSHOT,
        issued_at=cast.revoked_at,
        state=STATE_1,
    )
    before_revocation = replace(
        at_revocation,
        issued_at=cast.revoked_at - timedelta(milliseconds=1),
        expires_at=cast.revoked_at - timedelta(milliseconds=1) + LIFETIME,
    )

    btc_root = next(root for root in first.assets if root.asset == "BTC")

    def with_btc_root(changed: AssetRoot) -> Statement:
        return replace(
            first, assets=tuple(changed if r.asset == "BTC" else r for r in first.assets)
        )

    wrong_count = with_btc_root(replace(btc_root, count=btc_root.count + 1))
    wrong_total = with_btc_root(replace(btc_root, total=btc_root.total + 1))
    deeper = make_statement(
        sequence=1,
        previous=GENESIS_PREVIOUS,
        kind=StatementKind.SNAPSHOT,
        issued_at=T0,
        state=STATE_1,
        depths={"BTC": btc_root.depth + 1},
    )
    other_salt = list(state_1)
    other_salt[1] = replace(other_salt[1], salt=seed("another-salt"))
    other_quantity = list(state_1)
    other_quantity[1] = replace(other_quantity[1], quantity=43)
    message_size = len(signed_first.encode())

    cases = [
        Case("valid snapshot, no head", OK, message=m1, leaves=state_1),
        Case("valid snapshot, roots not checked", OK, message=m1),
        Case(
            "valid delta after the snapshot",
            OK,
            message=signed_second.to_wire(),
            head=head_1,
            now=now_2,
            leaves=state_2,
            note="leaves: the receiver's whole state after applying the delta's changed leaves",
        ),
        Case(
            "all three co-signers",
            OK,
            message=sign(cast, first, cosigners=(0, 1, 2)).to_wire(),
        ),
        Case(
            "signed field changed after signing (expires_at)",
            "bad_signature",
            message=tampered(
                lambda m: m["statement"].__setitem__("expires_at", ts(T0 + timedelta(days=1)))
            ),
        ),
        Case(
            "custodian signature with one bit flipped",
            "bad_signature",
            message=tampered(
                lambda m: m["custodian_signature"].__setitem__("signature", flipped.hex())
            ),
        ),
        Case(
            "custodian signature s = 0",
            "bad_signature",
            message=tampered(
                lambda m: m["custodian_signature"].__setitem__(
                    "signature", signed_first.custodian_signature.signature[:32].hex() + "00" * 32
                )
            ),
        ),
        Case(
            "custodian key not in the registry",
            "unknown_key",
            message=sign(cast, first, signer=cast.unregistered).to_wire(),
        ),
        Case(
            "key of the exchange used as the custodian key",
            "unknown_key",
            message=sign(cast, first, signer=cast.exchange).to_wire(),
        ),
        Case(
            "custodian key revoked before issued_at",
            "revoked_key",
            message=sign(cast, first, signer=cast.revoked).to_wire(),
        ),
        Case(
            "custodian key revoked exactly at issued_at",
            "revoked_key",
            message=sign(cast, at_revocation, signer=cast.revoked).to_wire(),
            now=cast.revoked_at,
        ),
        Case(
            "revoked key, statement issued 1 ms before the revocation",
            OK,
            message=sign(cast, before_revocation, signer=cast.revoked).to_wire(),
            now=cast.revoked_at,
        ),
        Case(
            "custodian key not yet valid at issued_at",
            "key_not_valid",
            message=sign(cast, first, signer=cast.not_yet_valid).to_wire(),
        ),
        Case(
            "one co-signer, threshold 2",
            "missing_quorum",
            message=sign(cast, first, cosigners=(1,)).to_wire(),
        ),
        Case("no co-signers", "missing_quorum", message=empty_quorum),
        Case(
            "co-signer not in the registry",
            "unknown_key",
            message=sign(cast, first, cosigners=(0, 3)).to_wire(),
        ),
        Case(
            "aggregate of co-signers 0 and 2, signers list 0 and 1",
            "bad_signature",
            message=bad_aggregate.to_wire(),
        ),
        Case("aggregate is the point at infinity", "bad_signature", message=infinity.to_wire()),
        Case("same co-signer listed twice", "malformed", message=repeated_signer),
        Case(
            "replay of the accepted statement",
            "sequence_replay",
            message=m1,
            head=head_1,
        ),
        Case(
            "replay of an older statement",
            "sequence_replay",
            message=m1,
            head=head_2,
            now=now_2,
        ),
        Case(
            "sequence 3 after 1",
            "sequence_gap",
            message=sign(cast, third).to_wire(),
            head=head_1,
            now=T0 + timedelta(seconds=125),
        ),
        Case(
            "delta without a head",
            "sequence_gap",
            message=signed_second.to_wire(),
            now=now_2,
        ),
        Case(
            "second statement with sequence 2",
            "fork",
            message=sign(cast, fork).to_wire(),
            head=head_2,
            now=now_2,
        ),
        Case(
            "previous is not the accepted digest",
            "broken_chain",
            message=sign(cast, wrong_previous).to_wire(),
            head=head_1,
            now=now_2,
        ),
        Case(
            "issued before its predecessor",
            "broken_chain",
            message=sign(cast, backdated).to_wire(),
            head=head_1,
            now=now_2,
        ),
        Case(
            "head of another stream",
            "broken_chain",
            message=signed_second.to_wire(),
            head=replace(head_1, exchange="exchange-y"),
            now=now_2,
        ),
        Case("now equals expires_at", "expired", message=m1, now=first.expires_at),
        Case(
            "now 1 ms before expires_at",
            OK,
            message=m1,
            now=first.expires_at - timedelta(milliseconds=1),
        ),
        Case(
            "issued_at 30.001 s after now",
            "future_dated",
            message=m1,
            now=T0 - timedelta(seconds=30, milliseconds=1),
        ),
        Case(
            "issued_at exactly 30 s after now (inside the skew)",
            OK,
            message=m1,
            now=T0 - timedelta(seconds=30),
        ),
        Case(
            "disclosed leaf with another salt",
            "root_mismatch",
            message=m1,
            leaves=tuple(other_salt),
        ),
        Case(
            "disclosed leaf with another quantity",
            "root_mismatch",
            message=m1,
            leaves=tuple(other_quantity),
        ),
        Case(
            "statement total one more than the leaves (root right)",
            "sum_mismatch",
            message=sign(cast, wrong_total).to_wire(),
            leaves=state_1,
        ),
        Case(
            "statement count one more than the disclosed leaves",
            "sum_mismatch",
            message=sign(cast, wrong_count).to_wire(),
            leaves=state_1,
        ),
        Case(
            "BTC tree one level deeper than its leaves need",
            OK,
            message=sign(cast, deeper).to_wire(),
            leaves=state_1,
            note="the receiver rebuilds at the statement's depth, not the smallest that fits",
        ),
        Case(
            "disclosed leaves lack an asset",
            "root_mismatch",
            message=m1,
            leaves=tuple(leaf for leaf in state_1 if leaf.asset == "BTC"),
        ),
        Case("negative total", "negative_sum", message=tampered(set_btc_total("-5"))),
        Case(
            "total 2^128",
            "sum_overflow",
            message=tampered(set_btc_total(str(2**128))),
        ),
        Case(
            "total with a leading zero",
            "invalid_amount",
            message=tampered(set_btc_total("0" + str(btc_total))),
        ),
        Case("truncated JSON", "malformed", message_text=text_1[:-1]),
        Case(
            "duplicate member",
            "malformed",
            message_text='{"version":1,' + text_1[1:],
        ),
        Case(
            "amount as a JSON float",
            "float_rejected",
            message_text=replace_once(text_1, f'"total":"{btc_total}"', f'"total":{btc_total}.0'),
        ),
        Case(
            "sequence beyond 2^53-1",
            "malformed",
            message_text=replace_once(text_1, '"sequence":1,', '"sequence":9007199254740992,'),
        ),
        Case(
            "unknown member in the statement",
            "malformed",
            message=tampered(lambda m: m["statement"].__setitem__("note", "unsigned")),
        ),
        Case(
            "upper-case hex root",
            "malformed",
            message=tampered(
                lambda m: m["statement"]["assets"][0].__setitem__(
                    "root", m["statement"]["assets"][0]["root"].upper()
                )
            ),
        ),
        Case(
            "sequence 1 as a delta",
            "malformed",
            message=tampered(lambda m: m["statement"].__setitem__("kind", "delta")),
        ),
        Case(
            "signed statement version 2",
            "malformed",
            message=tampered(lambda m: m.__setitem__("version", 2)),
        ),
        Case(
            "message one byte over max_bytes",
            "malformed",
            message=m1,
            max_bytes=message_size - 1,
        ),
        Case("message exactly max_bytes", OK, message=m1, max_bytes=message_size),
    ]
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise VectorError("two verification cases share a name")
    document = {
        "description": (
            "Verification decisions of the exchange (docs protocol section 7). For each case: "
            "take the message bytes ('message' serialized with RFC 8785, or 'message_text' "
            "as UTF-8 exactly), the key registry 'registry', the chain head 'head' (null: "
            "nothing accepted yet), the time 'now' and the clock skew 'max_clock_skew_ms'; "
            "when 'max_bytes' is given it replaces the default size bound "
            f"({MAX_MESSAGE_BYTES} bytes) and 'message_bytes' is the message's length. When "
            "'leaves' is given, build one sum tree per asset from those disclosed leaves, at "
            "the depth the statement states for that asset, and compare them with the "
            "statement's roots (asset set, then per asset depth, root, total, count). "
            "'expected' is 'ok' or the reason of the first failing check; on success the new "
            "head must equal 'expected_head'."
        ),
        "max_clock_skew_ms": int(VerificationPolicy().max_clock_skew.total_seconds() * 1000),
        "default_max_bytes": MAX_MESSAGE_BYTES,
        "registry": cast.registry_wire,
        "cases": [case_wire(cast, case) for case in cases],
    }
    return document, second, signed_second


# --- translog.json ------------------------------------------------------------------------------

LOG_SIZE: Final = 8


def log_entries(forked_at: int | None = None) -> list[bytes]:
    return [seed(f"log-entry/{i}" + ("-forked" if i == forked_at else "")) for i in range(LOG_SIZE)]


def log_invalid_inclusion(
    name: str, expected: str, *, entry: bytes, proof: JsonObject, head: TreeHead
) -> JsonObject:
    confirm(
        f"log inclusion {name}",
        expected,
        lambda: verify_log_inclusion(
            entry=entry, proof=LogInclusionProof.from_wire(proof), head=head
        ),
    )
    return {
        "name": name,
        "entry": entry.hex(),
        "proof": proof,
        "head": head.to_wire(),
        "expected": expected,
    }


def log_invalid_consistency(
    name: str, expected: str, *, old: TreeHead, new: TreeHead, proof: JsonObject
) -> JsonObject:
    confirm(
        f"log consistency {name}",
        expected,
        lambda: verify_log_consistency(
            old=old, new=new, proof=LogConsistencyProof.from_wire(proof)
        ),
    )
    return {
        "name": name,
        "old": old.to_wire(),
        "new": new.to_wire(),
        "proof": proof,
        "expected": expected,
    }


def build_translog(cast: Cast) -> JsonObject:
    entries = log_entries()
    leaves = [compute_log_leaf_hash(entry) for entry in entries]
    forked_entries = log_entries(forked_at=3)
    forked_leaves = [compute_log_leaf_hash(entry) for entry in forked_entries]

    def head(size: int, hashes: Sequence[bytes] = leaves) -> TreeHead:
        return TreeHead(size=size, root=compute_root(list(hashes[:size])))

    heads = [head(size) for size in range(LOG_SIZE + 1)]
    if heads[0].root != EMPTY_ROOT:
        raise VectorError("the empty log's root is not SHA-256 of the empty string")
    inclusion = []
    for size in range(1, LOG_SIZE + 1):
        for index in range(size):
            proof = LogInclusionProof(
                index=index, size=size, path=compute_inclusion_path(leaves[:size], index)
            )
            confirm(
                f"log inclusion {index}/{size}",
                OK,
                functools.partial(
                    verify_log_inclusion, entry=entries[index], proof=proof, head=heads[size]
                ),
            )
            inclusion.append({"entry_index": index, "proof": proof.to_wire(), "expected": OK})
    consistency = []
    for new_size in range(1, LOG_SIZE + 1):
        for old_size in range(new_size + 1):
            step = LogConsistencyProof(
                old_size=old_size,
                new_size=new_size,
                path=compute_consistency_path(leaves[:new_size], old_size),
            )
            confirm(
                f"log consistency {old_size}->{new_size}",
                OK,
                functools.partial(
                    verify_log_consistency, old=heads[old_size], new=heads[new_size], proof=step
                ),
            )
            consistency.append({"proof": step.to_wire(), "expected": OK})

    good_5_8: JsonObject = LogInclusionProof(
        index=5, size=8, path=compute_inclusion_path(leaves, 5)
    ).to_wire()
    good_6_8: JsonObject = LogConsistencyProof(
        old_size=6, new_size=8, path=compute_consistency_path(leaves, 6)
    ).to_wire()
    invalid_inclusion = [
        log_invalid_inclusion(
            "proof of index 5 presented for index 4",
            "invalid_proof",
            entry=entries[4],
            proof={**good_5_8, "index": 4},
            head=heads[8],
        ),
        log_invalid_inclusion(
            "another entry", "invalid_proof", entry=entries[4], proof=good_5_8, head=heads[8]
        ),
        log_invalid_inclusion(
            "path one element short",
            "invalid_proof",
            entry=entries[5],
            proof={**good_5_8, "path": good_5_8["path"][:-1]},
            head=heads[8],
        ),
        log_invalid_inclusion(
            "path one element long",
            "invalid_proof",
            entry=entries[5],
            proof={**good_5_8, "path": [*good_5_8["path"], heads[1].root.hex()]},
            head=heads[8],
        ),
        log_invalid_inclusion(
            "proof size differs from the head size",
            "invalid_proof",
            entry=entries[5],
            proof=good_5_8,
            head=heads[7],
        ),
        log_invalid_inclusion(
            "index not below size",
            "malformed",
            entry=entries[5],
            proof={**good_5_8, "index": 8},
            head=heads[8],
        ),
        log_invalid_inclusion(
            "upper-case hex in the path",
            "malformed",
            entry=entries[5],
            proof={**good_5_8, "path": [good_5_8["path"][0].upper(), *good_5_8["path"][1:]]},
            head=heads[8],
        ),
        log_invalid_inclusion(
            "index true",
            "malformed",
            entry=entries[1],
            proof={"index": True, "size": 2, "path": [leaves[0].hex()]},
            head=heads[2],
        ),
    ]
    invalid_consistency = [
        log_invalid_consistency(
            "path one element short",
            "invalid_proof",
            old=heads[6],
            new=heads[8],
            proof={**good_6_8, "path": good_6_8["path"][:-1]},
        ),
        log_invalid_consistency(
            "old head of another history",
            "invalid_proof",
            old=head(6, forked_leaves),
            new=heads[8],
            proof=good_6_8,
        ),
        log_invalid_consistency(
            "empty path for 0 < old < new",
            "invalid_proof",
            old=heads[6],
            new=heads[8],
            proof={**good_6_8, "path": []},
        ),
        log_invalid_consistency(
            "non-empty path between equal sizes",
            "invalid_proof",
            old=heads[8],
            new=heads[8],
            proof={"old_size": 8, "new_size": 8, "path": [heads[8].root.hex()]},
        ),
        log_invalid_consistency(
            "old size above new size",
            "malformed",
            old=heads[6],
            new=heads[8],
            proof={**good_6_8, "old_size": 9},
        ),
    ]

    issued = T0 + timedelta(minutes=5)

    def signed_checkpoint(size: int, hashes: Sequence[bytes]) -> SignedCheckpoint:
        checkpoint = Checkpoint(CUSTODIAN, EXCHANGE, head(size, hashes), issued)
        return sign_checkpoint(checkpoint, signer=cast.primary)

    honest_6 = signed_checkpoint(6, leaves)
    honest_8 = signed_checkpoint(8, leaves)
    forked_6 = signed_checkpoint(6, forked_leaves)
    forked_8 = signed_checkpoint(8, forked_leaves)
    forked_6_8 = LogConsistencyProof(
        old_size=6, new_size=8, path=compute_consistency_path(forked_leaves, 6)
    )
    honest_6_8 = LogConsistencyProof.from_wire(good_6_8)

    def split_case(
        name: str,
        expected: str,
        first: SignedCheckpoint,
        second: SignedCheckpoint,
        proof: LogConsistencyProof | None,
    ) -> JsonObject:
        confirm(
            f"split view {name}",
            expected,
            lambda: verify_same_history(
                first, second, registry=cast.checkpoint_registry, proof=proof
            ),
        )
        return {
            "name": name,
            "first": first.to_wire(),
            "second": second.to_wire(),
            "proof": None if proof is None else proof.to_wire(),
            "expected": expected,
        }

    tampered = honest_8.to_wire()
    tampered["checkpoint"]["size"] = 7
    confirm(
        "tampered checkpoint",
        "bad_signature",
        lambda: verify_checkpoint(
            SignedCheckpoint.decode(compute_canonical_bytes(tampered)),
            registry=cast.checkpoint_registry,
        ),
    )
    confirm(
        "split view without signatures",
        "split_view",
        lambda: detect_split_view(
            seen_by_a=honest_6.checkpoint.head, seen_by_b=forked_8.checkpoint.head, proof=forked_6_8
        ),
    )
    checkpoint = honest_8.checkpoint
    return {
        "description": (
            "The custodian's transparency log (RFC 6962 hashing, RFC 9162 proof verification; "
            "docs/protocol.md section 9). 'entries' are the 32-byte log entries (statement "
            "digests in real use; here entry i = SHA-256('mcb-vectors/log-entry/' || i)). "
            "Check the leaf hashes and the head of every size 0..8, recompute and verify every "
            "inclusion proof (of entries[entry_index] against the head of proof.size) and every "
            "consistency proof (between the heads of old_size and new_size), reject the invalid "
            "ones with the given reason, verify the signed checkpoint with 'registry' (domain "
            "mcb/tree-head/v1), and run the split-view check on each pair of signed checkpoints "
            "(both signatures first, then the heads with 'proof')."
        ),
        "entries": [entry.hex() for entry in entries],
        "leaf_hashes": [leaf.hex() for leaf in leaves],
        "heads": [h.to_wire() for h in heads],
        "inclusion_proofs": inclusion,
        "consistency_proofs": consistency,
        "invalid_inclusion_proofs": invalid_inclusion,
        "invalid_consistency_proofs": invalid_consistency,
        "forked_entries": {
            "note": "the same log with entry 3 replaced: the history shown to a second party",
            "entries": [entry.hex() for entry in forked_entries],
            "heads": [head(size, forked_leaves).to_wire() for size in range(LOG_SIZE + 1)],
        },
        "registry": cast.checkpoint_registry_wire,
        "checkpoint": {
            "custodian_key": cast.primary.describe(),
            "checkpoint": checkpoint.to_wire(),
            "canonical_hex": compute_canonical_bytes(checkpoint.to_wire()).hex(),
            "digest": checkpoint.compute_digest().hex(),
            "signed": honest_8.to_wire(),
            "expected": confirm(
                "checkpoint",
                OK,
                lambda: verify_checkpoint(honest_8, registry=cast.checkpoint_registry),
            ),
            "tampered": {"signed": tampered, "expected": "bad_signature"},
        },
        "split_views": [
            split_case("one history, 6 then 8", OK, honest_6, honest_8, honest_6_8),
            split_case("one history, 8 then 6", OK, honest_8, honest_6, honest_6_8),
            split_case(
                "entry 3 differs, consistency proof from the forked log",
                "split_view",
                honest_6,
                forked_8,
                forked_6_8,
            ),
            split_case(
                "entry 3 differs, consistency proof from the honest log",
                "split_view",
                forked_6,
                honest_8,
                honest_6_8,
            ),
            split_case("two roots for size 6", "split_view", honest_6, forked_6, None),
            split_case("different sizes without a proof", "malformed", honest_6, honest_8, None),
        ],
    }


# --- client_proof.json --------------------------------------------------------------------------


def build_client_proof(cast: Cast, first: Statement, signed: SignedStatement) -> JsonObject:
    leaves = disclosed(STATE_1)
    trees = build_trees(leaves)
    digest = first.compute_digest()

    def bundle(leaf: DisclosedLeaf) -> ClientProof:
        return ClientProof(
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            sequence=first.sequence,
            statement_digest=digest,
            account=leaf.account,
            salt=leaf.salt,
            proof=trees[leaf.asset].prove(leaf.position),
        )

    def check(name: str, expected: str, obj: JsonObject) -> str:
        def run() -> None:
            client_proof = ClientProof.from_wire(parse_json_object(compute_canonical_bytes(obj)))
            verify_client_proof(client_proof, statement=signed.statement)

        return confirm(f"client proof {name}", expected, run)

    valid = []
    for leaf in (leaves[0], leaves[4]):
        wire = bundle(leaf).to_wire()
        check(f"{leaf.account}/{leaf.asset}", OK, wire)
        valid.append(
            {"client_proof": wire, "expected": OK, "expected_quantity": str(leaf.quantity)}
        )
    alice = bundle(leaves[0]).to_wire()

    def tampered(name: str, expected: str, change: Callable[[JsonObject], None]) -> JsonObject:
        obj = wire_copy(alice)
        change(obj)
        return {"name": name, "client_proof": obj, "expected": check(name, expected, obj)}

    other_digest = sign(cast, replace(first, expires_at=first.expires_at + LIFETIME)).digest
    usdc_proof = trees["USDC"].prove(0).to_wire()
    invalid_proof = InvalidProof.reason
    return {
        "description": (
            "A client's proof bundle (protocol section 8.2) and the statement it refers to. "
            "The client verifies the signed statement's signatures with 'registry' (no chain "
            "head), checks that custodian, exchange, sequence and statement digest match, "
            "takes the asset root of proof.asset, requires proof.depth == depth, and verifies "
            "the inclusion proof with its own account and salt. 'expected_quantity' is the "
            "attested quantity of a valid bundle; each 'tampered' bundle must fail with "
            "'expected'."
        ),
        "registry": cast.registry_wire,
        "signed_statement": signed.to_wire(),
        "statement_digest": digest.hex(),
        "valid": valid,
        "tampered": [
            tampered(
                "quantity raised",
                invalid_proof,
                lambda p: p["proof"].__setitem__("quantity", "150000001"),
            ),
            tampered(
                "another salt",
                invalid_proof,
                lambda p: p.__setitem__("salt", seed("another-salt").hex()),
            ),
            tampered(
                "another account",
                invalid_proof,
                lambda p: p.__setitem__("account", "mallory"),
            ),
            tampered(
                "digest of another statement",
                invalid_proof,
                lambda p: p.__setitem__("statement", other_digest.hex()),
            ),
            tampered("another sequence", invalid_proof, lambda p: p.__setitem__("sequence", 2)),
            tampered(
                "another exchange", invalid_proof, lambda p: p.__setitem__("exchange", "exchange-y")
            ),
            tampered(
                "asset the statement does not have",
                invalid_proof,
                lambda p: p["proof"].__setitem__("asset", "ETH"),
            ),
            tampered(
                "proof of another asset's tree (USDC position 0)",
                invalid_proof,
                lambda p: p.__setitem__("proof", usdc_proof),
            ),
            tampered(
                "depth one more than the statement's",
                invalid_proof,
                lambda p: p["proof"].update(
                    depth=p["proof"]["depth"] + 1,
                    siblings=[
                        *p["proof"]["siblings"],
                        {"hash": EMPTY_HASHES[p["proof"]["depth"]].hex(), "sum": "0"},
                    ],
                ),
            ),
            tampered(
                "sibling sum 2^128-1",
                "sum_overflow",
                lambda p: p["proof"]["siblings"][0].__setitem__("sum", str(U128_MAX)),
            ),
            tampered(
                "sibling sum lowered by one",
                invalid_proof,
                lambda p: p["proof"]["siblings"][0].__setitem__(
                    "sum", str(int(p["proof"]["siblings"][0]["sum"]) - 1)
                ),
            ),
            tampered("unknown member", "malformed", lambda p: p.__setitem__("note", "unsigned")),
        ],
    }


# --- the whole set ------------------------------------------------------------------------------


def build_vectors(stored: StoredSignatures) -> dict[str, str]:
    """File name -> file text of every vector file."""
    cast = Cast(stored)
    first = make_statement(
        sequence=1,
        previous=GENESIS_PREVIOUS,
        kind=StatementKind.SNAPSHOT,
        issued_at=T0,
        state=STATE_1,
    )
    signed_first = sign(cast, first)
    verification, _, _ = build_verification(cast, first, signed_first)
    documents = {
        "canonical.json": build_canonical(cast, first),
        "merkle.json": build_merkle(),
        "statement.json": build_statement(cast, first, signed_first),
        "verification.json": verification,
        "translog.json": build_translog(cast),
        "client_proof.json": build_client_proof(cast, first, signed_first),
    }
    if tuple(documents) != FILES:
        raise VectorError("the generated files differ from FILES")
    return {name: render(document) for name, document in documents.items()}


def find_drift(directory: Path = VECTORS_DIR) -> list[str]:
    """Names of the vector files that are missing or differ from what the generator makes now."""
    generated = build_vectors(load_stored_signatures(directory))
    drift = []
    for name, text in generated.items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            drift.append(name)
    return drift


def write_vectors(directory: Path = VECTORS_DIR) -> list[str]:
    """Write every file that changed; return their names."""
    generated = build_vectors(load_stored_signatures(directory))
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generated.items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate in memory and exit 1 if any file in tests/vectors/ differs",
    )
    args = parser.parse_args(argv)
    # The development signer warns on every construction; these are fixed public test keys.
    logging.getLogger("attestations.p256").setLevel(logging.ERROR)
    try:
        if args.check:
            drift = find_drift()
            for name in drift:
                print(f"tests/vectors/{name} is out of date; run scripts/make_vectors.py")
            return 1 if drift else 0
        for name in write_vectors():
            print(f"wrote tests/vectors/{name}")
    except VectorError as exc:
        print(f"make_vectors: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
