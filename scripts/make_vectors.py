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
)
from attestations.checkpoint import (
    Checkpoint,
    SignedCheckpoint,
    sign_checkpoint,
    verify_checkpoint,
    verify_same_history,
)
from attestations.disclosure import (
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
from attestations.verify import (
    ChainHead,
    VerificationPolicy,
    authenticate_statement,
    verify_statement,
)

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
NOW_1: Final = T0 + timedelta(seconds=5)
NOW_2: Final = T0 + timedelta(seconds=65)
"""The receiver's clock when sequence 1, and sequence 2 (issued at T0 + 60 s), arrive."""
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


def wire_bytes(obj: JsonObject) -> bytes:
    """What a receiver gets for a stored wire object: its RFC 8785 bytes."""
    return compute_canonical_bytes(obj)


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
OTHER_CUSTODIAN: Final = "custodian-b"
COSIGNER_KEYS: Final = (
    ("cosigner-0", "cosigner-0", CUSTODIAN),
    ("cosigner-1", "cosigner-1", CUSTODIAN),
    ("cosigner-2", "cosigner-2", CUSTODIAN),
    ("cosigner-3", "cosigner-3", CUSTODIAN),
    ("cosigner-0-next", "cosigner-0", CUSTODIAN),
    ("cosigner-1-for-b", "cosigner-1", OTHER_CUSTODIAN),
)
"""(key label, co-signer party, custodian co-signed for) of every BLS key, by index. Keys 0-2 are
three parties registered for custodian-a (quorum 2); key 3 is not registered; key 4 is co-signer
0's second key (a rotation overlap: the same party, one vote); key 5 is co-signer 1's key for
another custodian, which must not count for custodian-a."""
COSIGNER_0_NEXT: Final = 4
COSIGNER_1_FOR_B: Final = 5
UNREGISTERED_COSIGNER: Final = 3
REGISTERED_COSIGNERS: Final = (0, 1, 2, COSIGNER_0_NEXT, COSIGNER_1_FOR_B)


@dataclass(frozen=True, slots=True)
class Cosigner:
    label: str
    party: str
    signs_for: str
    ikm: bytes
    secret_key: int
    public_key: bytes
    proof_of_possession: bytes
    key_id: str

    @classmethod
    def make(cls, label: str, *, party: str, signs_for: str) -> Cosigner:
        ikm = seed(f"bls/{label}")
        secret_key = bls.generate_secret_key(ikm)
        public_key = bls.compute_public_key(secret_key)
        return cls(
            label=label,
            party=party,
            signs_for=signs_for,
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
            "label": self.label,
            "party": self.party,
            "signs_for": self.signs_for,
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
    label, party, signs_for = COSIGNER_KEYS[index]
    return Cosigner.make(label, party=party, signs_for=signs_for)


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
        self.cosigners = [make_cosigner(i) for i in range(len(COSIGNER_KEYS))]
        opened = T0 - timedelta(days=30)
        self.revoked_at = T0 - timedelta(hours=1)
        # Co-signer 0 rotates: its new key opens a day before T0, its old key closes a day after.
        rotation_opens, rotation_closes = T0 - timedelta(days=1), T0 + timedelta(days=1)
        windows = {
            0: (opened, rotation_closes),
            1: (opened, None),
            2: (opened, None),
            COSIGNER_0_NEXT: (rotation_opens, None),
            COSIGNER_1_FOR_B: (opened, None),
        }
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
                    self.cosigners[index].party,
                    KeyRole.COSIGNER,
                    self.cosigners[index].public_key,
                    valid_from,
                    valid_until=valid_until,
                    proof_of_possession=self.cosigners[index].proof_of_possession,
                    signs_for=self.cosigners[index].signs_for,
                )
                for index, (valid_from, valid_until) in windows.items()
            ),
        ]
        self.registry = make_registry(tuple(records), quorum=QUORUM)
        self.registry_wire = self.registry.to_wire()
        checkpoint_registry = make_registry(tuple(records[:1]), quorum=None)
        self.checkpoint_registry = checkpoint_registry
        self.checkpoint_registry_wire = checkpoint_registry.to_wire()


# --- statements ---------------------------------------------------------------------------------


def prices(observed: datetime = T0 - timedelta(seconds=5)) -> tuple[PricePoint, ...]:
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


def roots_of(
    leaves: Sequence[DisclosedLeaf], *, depths: Mapping[str, int]
) -> tuple[AssetRoot, ...]:
    """The asset roots of ``leaves`` at ``depths``, built leaf by leaf without the receiver's
    one-account-one-leaf rule, so that a statement breaking it can be signed."""
    trees = {
        asset: SumTree.build(
            asset, [leaf.to_leaf() for leaf in leaves if leaf.asset == asset], depth=depth
        )
        for asset, depth in depths.items()
    }
    return compute_asset_roots(trees, decimals=DECIMALS)


def statement_depths(statement: Statement) -> dict[str, int]:
    return {root.asset: root.depth for root in statement.assets}


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


def delta_disclosure(
    statement: Statement,
    *,
    before: Sequence[tuple[str, str, int, int]],
    after: Sequence[tuple[str, str, int, int]],
) -> LeafDisclosure:
    """The honest disclosure of a delta from state ``before`` to state ``after``: every leaf
    that is new or changed, and every position that no longer holds a leaf."""
    old = {(leaf.asset, leaf.position): leaf for leaf in disclosed(before)}
    new = {(leaf.asset, leaf.position): leaf for leaf in disclosed(after)}
    changed = [leaf for slot, leaf in sorted(new.items()) if old.get(slot) != leaf]
    emptied = [ClearedSlot(asset, position) for asset, position in sorted(old.keys() - new)]
    return LeafDisclosure.for_statement(statement, changed, emptied)


def head_wire(head: ChainHead) -> JsonObject:
    return {
        "custodian": head.custodian,
        "exchange": head.exchange,
        "sequence": head.sequence,
        "digest": head.digest.hex(),
        "issued_at": ts(head.issued_at),
    }


def stream_wire(custodian: str, exchange: str) -> JsonObject:
    return {"custodian": custodian, "exchange": exchange}


def leaves_wire(leaves: Sequence[DisclosedLeaf]) -> list[JsonObject]:
    return [leaf.to_wire() for leaf in leaves]


def trees_wire(receiver: ReceiverTrees) -> list[JsonObject]:
    """The receiver's trees, sorted by asset: what it holds after applying a statement."""
    return [
        {
            "asset": asset,
            "depth": tree.depth,
            "root": tree.root.hex(),
            "total": str(tree.total),
            "count": tree.count,
        }
        for asset, tree in sorted(receiver.trees.items())
    ]


@dataclass(frozen=True, slots=True)
class ReceiverState:
    """What the exchange holds for the stream before a case: the leaves it accepted last and the
    depths of the statement they came with (nothing before the first statement)."""

    leaves: tuple[DisclosedLeaf, ...] = ()
    depths: tuple[tuple[str, int], ...] = ()

    def restore(self) -> ReceiverTrees:
        return ReceiverTrees.restore(DECIMALS, self.leaves, depths=dict(self.depths))

    def to_wire(self) -> JsonObject:
        return {"leaves": leaves_wire(self.leaves), "depths": dict(self.depths)}


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
                depth=tree.depth,
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
    depth: int,
    proof: JsonObject | None = None,
    proof_json: str | None = None,
) -> JsonObject:
    text = proof_json if proof_json is not None else json.dumps(proof)

    def run() -> None:
        parsed = InclusionProof.from_wire(parse_json_object(text))
        verify_inclusion(parsed, account=account, salt=salt, root=root, total=total, depth=depth)

    confirm(f"invalid proof {name}", expected, run)
    case: JsonObject = {"name": name, "account": account, "salt": salt.hex()}
    if proof_json is not None:
        case["proof_json"] = proof_json
    else:
        case["proof"] = proof
    case.update({"root": root.hex(), "total": str(total), "depth": depth, "expected": expected})
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
        "depth": tree.depth,
    }

    def variant(change: Callable[[JsonObject], None]) -> JsonObject:
        proof = wire_copy(good)
        change(proof)
        return proof

    def set_quantity(value: str) -> Callable[[JsonObject], None]:
        return lambda p: p.__setitem__("quantity", value)

    def set_sibling(height: int, member: str, value: str) -> Callable[[JsonObject], None]:
        return lambda p: p["siblings"][height].__setitem__(member, value)

    def drop_top_sibling(proof: JsonObject) -> None:
        # Still a well-formed proof (position 1 has a slot at depth 2), just of a smaller tree.
        proof["siblings"].pop()
        proof["depth"] -= 1

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
            "a well-formed proof of depth 2 in a tree of depth 3 (top sibling dropped)",
            "invalid_proof",
            proof=variant(drop_top_sibling),
            **common,
        ),
        invalid_proof_case(
            "the right proof, but the statement declares another depth",
            "invalid_proof",
            proof=good,
            **{**common, "depth": tree.depth + 1},
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
            "proof and verify it with account, salt, root, total and depth (the depth the "
            "statement declares; a proof of any other depth is invalid_proof, checked before "
            "the path); 'expected' is the reason of the first check that fails (decoding "
            "before verification)."
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
    now = NOW_1
    disclosure = LeafDisclosure.for_statement(first, leaves)
    receiver = ReceiverTrees(DECIMALS)
    verified = verify_statement(
        signed.encode(),
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        registry=cast.registry,
        head=None,
        now=now,
        receiver=receiver,
        disclosure=LeafDisclosure.from_wire(parse_json_object(wire_bytes(disclosure.to_wire()))),
    )
    verified.trees_plan.apply()
    canonical = first.canonical_bytes()
    message = signed.encode()
    return {
        "description": (
            "One signed statement end to end. Recompute: the canonical bytes and digest of "
            "'statement' (domain mcb/statement/v1); each co-signer key's secret key from its "
            "ikm (BLS KeyGen, empty key_info), its public key, proof of possession and key id "
            "('party' is the key record's owner, 'signs_for' the custodian it co-signs for); "
            "the partial BLS signatures over the 32 digest bytes and their aggregate (BLS "
            "signatures are deterministic, so they must match exactly); the salts of the "
            "disclosed leaves. Verify: the P-256 signature (randomized, so verify it, do not "
            "recompute it), then the whole message as the receiver of the stream 'stream' "
            "does: 'registry' at 'now', no chain head, an empty receiver with the asset table "
            "'decimals', and the snapshot leaf disclosure 'disclosure' (its 'set' holds every "
            "leaf). The result must be 'expected_head', and the receiver's trees afterwards "
            "'expected_trees' (one per asset: depth, root, total, count)."
        ),
        "now": ts(now),
        "stream": stream_wire(CUSTODIAN, EXCHANGE),
        "decimals": dict(DECIMALS),
        "custodian_key": cast.primary.describe(),
        "cosigners": [cast.cosigners[i].describe() for i in REGISTERED_COSIGNERS],
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
        "statement": first.to_wire(),
        "canonical_hex": canonical.hex(),
        "digest": digest.hex(),
        "disclosure": disclosure.to_wire(),
        "cosignatures": [
            {"key_id": c.key_id, "signature": c.signature.hex()} for c in cosignatures
        ],
        "aggregate_signature": compute_quorum_signature(cosignatures).signature.hex(),
        "signed_statement": signed.to_wire(),
        "message_utf8": message.decode("utf-8"),
        "expected": OK,
        "expected_head": head_wire(verified.head),
        "expected_trees": trees_wire(receiver),
    }


# --- verification.json --------------------------------------------------------------------------

NONE: Final = "none"
AFTER_SNAPSHOT: Final = "after_snapshot"
AFTER_DELTA: Final = "after_delta"
RECEIVER_BY_HEAD: Final = {None: NONE, 1: AFTER_SNAPSHOT, 2: AFTER_DELTA}
"""The receiver state that goes with a head of this sequence (None: no head)."""


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    expected: str
    message: JsonObject | None = None
    message_text: str | None = None
    stream: tuple[str, str] = (CUSTODIAN, EXCHANGE)
    disclosure: LeafDisclosure | None = None
    """By default every leaf of sequence 1 for a snapshot and no change for a delta, bound to the
    statement in the message (to the sample snapshot when the message does not decode)."""
    head: ChainHead | None = None
    history: tuple[tuple[int, bytes], ...] = ()
    now: datetime = NOW_1
    max_bytes: int | None = None
    note: str | None = None

    def data(self) -> bytes:
        if self.message_text is not None:
            return self.message_text.encode("utf-8")
        if self.message is None:
            raise VectorError(f"case {self.name} has no message")
        return compute_canonical_bytes(self.message)

    def receiver_state(self) -> str:
        """The receiver state that goes with the case's head."""
        return RECEIVER_BY_HEAD[None if self.head is None else self.head.sequence]

    def leaf_disclosure(self, fallback: Statement) -> LeafDisclosure:
        if self.disclosure is not None:
            return self.disclosure
        try:
            statement = SignedStatement.decode(self.data()).statement
        except CounterpartyError:
            statement = fallback
        leaves = disclosed(STATE_1) if statement.kind is StatementKind.SNAPSHOT else []
        return LeafDisclosure.for_statement(statement, leaves)


def run_case(
    cast: Cast, case: Case, *, receiver: ReceiverTrees, disclosure: JsonObject
) -> tuple[ChainHead | None, list[JsonObject] | None]:
    """Run ``case`` as a receiver does, from bytes, and apply what it accepts. Returns the new
    head and trees, or (None, None) for a rejection, which must leave the trees unchanged."""
    before = trees_wire(receiver)
    result: list[ChainHead] = []
    custodian, exchange = case.stream

    def run() -> None:
        verified = verify_statement(
            case.data(),
            custodian=custodian,
            exchange=exchange,
            registry=cast.registry,
            head=case.head,
            now=case.now,
            receiver=receiver,
            disclosure=LeafDisclosure.from_wire(parse_json_object(wire_bytes(disclosure))),
            history=dict(case.history) if case.history else None,
            max_bytes=MAX_MESSAGE_BYTES if case.max_bytes is None else case.max_bytes,
        )
        verified.trees_plan.apply()
        result.append(verified.head)

    confirm(f"verification case {case.name}", case.expected, run)
    if not result:
        if trees_wire(receiver) != before:
            raise VectorError(f"verification case {case.name}: a rejection changed the trees")
        return None, None
    return result[0], trees_wire(receiver)


def case_wire(
    cast: Cast, case: Case, *, states: Mapping[str, ReceiverState], fallback: Statement
) -> JsonObject:
    state = case.receiver_state()
    disclosure = case.leaf_disclosure(fallback).to_wire()
    new_head, trees = run_case(cast, case, receiver=states[state].restore(), disclosure=disclosure)
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
    out["stream"] = stream_wire(*case.stream)
    out["receiver"] = state
    out["disclosure"] = disclosure
    out["head"] = None if case.head is None else head_wire(case.head)
    if case.history:
        out["history"] = [
            {"sequence": sequence, "digest": digest.hex()} for sequence, digest in case.history
        ]
    out["now"] = ts(case.now)
    out["expected"] = case.expected
    if new_head is not None:
        out["expected_head"] = head_wire(new_head)
        out["expected_trees"] = trees
    return out


def replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise VectorError(f"{old!r} occurs {text.count(old)} times, expected once")
    return text.replace(old, new)


STATE_SET_AND_CLEAR: Final = (
    ("alice", "BTC", 0, 150_000_000),
    ("bob", "BTC", 1, 1_000_042),
    ("alice", "USDC", 0, 1_000_000_000_000),
    ("dave", "USDC", 1, 25_000_000),
    ("erin", "USDC", 2, 5_000_000),
)
"""A delta from sequence 1: bob's BTC leaf changes, carol's (BTC position 2) is emptied and erin
gets a new USDC leaf at position 2, so the USDC tree grows a level and the BTC tree keeps its."""
STATE_TWO_ASSETS: Final = tuple(
    (account, asset, position, {("bob", "BTC"): 43, ("dave", "USDC"): 26}.get((account, asset), q))
    for account, asset, position, q in STATE_1
)
"""A delta from sequence 1 that changes one leaf in each asset."""


@dataclass(frozen=True, slots=True)
class Chain:
    """The sample stream: snapshot 1 (the statement of statement.json) and delta 2, signed."""

    first: Statement
    signed_first: SignedStatement
    second: Statement
    signed_second: SignedStatement

    @classmethod
    def make(cls, cast: Cast, first: Statement, signed_first: SignedStatement) -> Chain:
        second = make_statement(
            sequence=2,
            previous=first.compute_digest(),
            kind=StatementKind.DELTA,
            issued_at=T0 + timedelta(seconds=60),
            state=STATE_2,
        )
        return cls(first, signed_first, second, sign(cast, second))

    @property
    def d1(self) -> bytes:
        return self.first.compute_digest()

    @property
    def head_1(self) -> ChainHead:
        return ChainHead(CUSTODIAN, EXCHANGE, 1, self.d1, self.first.issued_at)

    @property
    def head_2(self) -> ChainHead:
        second = self.second
        return ChainHead(CUSTODIAN, EXCHANGE, 2, second.compute_digest(), second.issued_at)

    @property
    def m1(self) -> JsonObject:
        return self.signed_first.to_wire()

    def receiver_states(self) -> dict[str, ReceiverState]:
        return {
            NONE: ReceiverState(),
            AFTER_SNAPSHOT: ReceiverState(
                tuple(disclosed(STATE_1)), tuple(statement_depths(self.first).items())
            ),
            AFTER_DELTA: ReceiverState(
                tuple(disclosed(STATE_2)), tuple(statement_depths(self.second).items())
            ),
        }


def changes_from_1(
    statement: Statement, after: Sequence[tuple[str, str, int, int]] = STATE_2
) -> LeafDisclosure:
    return delta_disclosure(statement, before=STATE_1, after=after)


def with_change(message: JsonObject, change: Callable[[JsonObject], None]) -> JsonObject:
    copied = wire_copy(message)
    change(copied)
    return copied


def flip_custodian_signature(signed: SignedStatement) -> JsonObject:
    flipped = bytearray(signed.custodian_signature.signature)
    flipped[31] ^= 0x01
    return with_change(
        signed.to_wire(),
        lambda m: m["custodian_signature"].__setitem__("signature", flipped.hex()),
    )


def accepted_cases(cast: Cast, chain: Chain) -> list[Case]:
    first = chain.first
    return [
        Case("valid snapshot, no head", OK, message=chain.m1),
        Case(
            "valid delta after the snapshot",
            OK,
            message=chain.signed_second.to_wire(),
            disclosure=changes_from_1(chain.second),
            head=chain.head_1,
            now=NOW_2,
        ),
        Case(
            "all three co-signers",
            OK,
            message=sign(cast, first, cosigners=(0, 1, 2)).to_wire(),
        ),
    ]


def key_cases(cast: Cast, chain: Chain) -> list[Case]:
    """Step 4: the custodian key and signature, the co-signer keys, quorum and aggregate."""
    first, signed_first, m1 = chain.first, chain.signed_first, chain.m1
    quorum = signed_first.quorum_signature
    d1 = chain.d1
    mixed = compute_quorum_signature([cast.cosigners[0].cosign(d1), cast.cosigners[2].cosign(d1)])
    bad_aggregate = replace(
        signed_first,
        quorum_signature=QuorumSignature(signers=quorum.signers, signature=mixed.signature),
    )
    infinity = replace(
        signed_first,
        quorum_signature=QuorumSignature(signers=quorum.signers, signature=b"\xc0" + bytes(95)),
    )
    # Around the revocation the prices are observed before issued_at, as the policy requires.
    at_revocation = replace(
        first,
        issued_at=cast.revoked_at,
        expires_at=cast.revoked_at + LIFETIME,
        prices=prices(cast.revoked_at - timedelta(seconds=5)),
    )
    before_revocation = replace(
        at_revocation,
        issued_at=cast.revoked_at - timedelta(milliseconds=1),
        expires_at=cast.revoked_at - timedelta(milliseconds=1) + LIFETIME,
    )
    return [
        Case(
            "signed field changed after signing (expires_at)",
            "bad_signature",
            message=with_change(
                m1, lambda m: m["statement"].__setitem__("expires_at", ts(T0 + timedelta(hours=2)))
            ),
        ),
        Case(
            "custodian signature with one bit flipped",
            "bad_signature",
            message=flip_custodian_signature(signed_first),
        ),
        Case(
            "custodian signature s = 0",
            "bad_signature",
            message=with_change(
                m1,
                lambda m: m["custodian_signature"].__setitem__(
                    "signature", signed_first.custodian_signature.signature[:32].hex() + "00" * 32
                ),
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
            "revoked key, issued and verified 1 ms before the revocation",
            OK,
            message=sign(cast, before_revocation, signer=cast.revoked).to_wire(),
            now=cast.revoked_at - timedelta(milliseconds=1),
        ),
        Case(
            "revoked key, issued before the revocation, verified at it",
            "revoked_key",
            message=sign(cast, before_revocation, signer=cast.revoked).to_wire(),
            now=cast.revoked_at,
            note="a revoked key cannot back-date a statement into acceptance",
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
        Case(
            "no co-signers",
            "missing_quorum",
            message=with_change(m1, lambda m: m["quorum_signature"].__setitem__("signers", [])),
        ),
        Case(
            "two keys of co-signer 0, threshold 2",
            "missing_quorum",
            message=sign(cast, first, cosigners=(0, COSIGNER_0_NEXT)).to_wire(),
            note="both keys are valid during the rotation overlap, but one party is one vote",
        ),
        Case(
            "new key of co-signer 0 and co-signer 1",
            OK,
            message=sign(cast, first, cosigners=(COSIGNER_0_NEXT, 1)).to_wire(),
        ),
        Case(
            "co-signer not in the registry",
            "unknown_key",
            message=sign(cast, first, cosigners=(0, UNREGISTERED_COSIGNER)).to_wire(),
        ),
        Case(
            "co-signer key registered for another custodian",
            "unknown_key",
            message=sign(cast, first, cosigners=(0, COSIGNER_1_FOR_B)).to_wire(),
        ),
        Case(
            "aggregate of co-signers 0 and 2, signers list 0 and 1",
            "bad_signature",
            message=bad_aggregate.to_wire(),
        ),
        Case("aggregate is the point at infinity", "bad_signature", message=infinity.to_wire()),
        Case(
            "same co-signer listed twice",
            "malformed",
            message=with_change(
                m1,
                lambda m: m["quorum_signature"].__setitem__(
                    "signers", [quorum.signers[0], quorum.signers[0]]
                ),
            ),
        ),
    ]


def stream_and_chain_cases(cast: Cast, chain: Chain) -> list[Case]:
    """Steps 2, 3 and 6: cheap replay, the stream, and the chain against the head."""
    first, second, m1 = chain.first, chain.second, chain.m1
    head_1, head_2, history = chain.head_1, chain.head_2, ((1, chain.d1),)
    third = make_statement(
        sequence=3,
        previous=second.compute_digest(),
        kind=StatementKind.DELTA,
        issued_at=T0 + timedelta(seconds=120),
        state=STATE_2,
    )
    fork_state = [(a, s, p, 5 if (a, s) == ("bob", "BTC") else q) for a, s, p, q in STATE_1]
    fork = make_statement(
        sequence=2,
        previous=chain.d1,
        kind=StatementKind.DELTA,
        issued_at=T0 + timedelta(seconds=60),
        state=fork_state,
    )
    wrong_previous = replace(second, previous=seed("not-a-statement"))
    backdated = replace(
        second, issued_at=T0 - timedelta(seconds=1), expires_at=T0 - timedelta(seconds=1) + LIFETIME
    )
    other_first = replace(
        first, issued_at=T0 - timedelta(seconds=3), expires_at=T0 - timedelta(seconds=3) + LIFETIME
    )
    return [
        Case(
            "statement for another exchange",
            "wrong_stream",
            message=sign(cast, replace(first, exchange="exchange-y")).to_wire(),
        ),
        Case(
            "statement of another custodian",
            "wrong_stream",
            message=sign(cast, replace(first, custodian=OTHER_CUSTODIAN)).to_wire(),
            note="the stream is checked before any key is looked up",
        ),
        Case(
            "disclosure of another statement",
            "wrong_stream",
            message=m1,
            disclosure=LeafDisclosure.for_statement(other_first, disclosed(STATE_1)),
        ),
        Case("replay of the accepted statement", "sequence_replay", message=m1, head=head_1),
        Case(
            "replay of the accepted statement with a broken signature",
            "sequence_replay",
            message=flip_custodian_signature(chain.signed_first),
            head=head_1,
            note="the digest is known, so the replay is reported before any signature work",
        ),
        Case(
            "replay of the accepted statement after it expired",
            "sequence_replay",
            message=m1,
            head=head_1,
            now=first.expires_at + timedelta(minutes=1),
        ),
        Case("replay of an older statement", "sequence_replay", message=m1, head=head_2, now=NOW_2),
        Case(
            "replay of an older statement, with history",
            "sequence_replay",
            message=m1,
            head=head_2,
            history=history,
            now=NOW_2,
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
            message=chain.signed_second.to_wire(),
            disclosure=changes_from_1(second),
            now=NOW_2,
        ),
        Case(
            "second statement with sequence 2",
            "fork",
            message=sign(cast, fork).to_wire(),
            disclosure=changes_from_1(fork, fork_state),
            head=head_2,
            now=NOW_2,
        ),
        Case(
            "successor of another statement (previous is not the head)",
            "fork",
            message=sign(cast, wrong_previous).to_wire(),
            disclosure=changes_from_1(wrong_previous),
            head=head_1,
            now=NOW_2,
        ),
        Case(
            "another statement at an older sequence, with history",
            "fork",
            message=sign(cast, other_first).to_wire(),
            head=head_2,
            history=history,
            now=NOW_2,
        ),
        Case(
            "another statement at an older sequence, without history",
            "sequence_replay",
            message=sign(cast, other_first).to_wire(),
            head=head_2,
            now=NOW_2,
            note="without the digest accepted at sequence 1 the receiver cannot tell a fork",
        ),
        Case(
            "issued before its predecessor",
            "broken_chain",
            message=sign(cast, backdated).to_wire(),
            disclosure=changes_from_1(backdated),
            head=head_1,
            now=NOW_2,
        ),
        Case(
            "head of another stream",
            "broken_chain",
            message=chain.signed_second.to_wire(),
            disclosure=changes_from_1(second),
            head=replace(head_1, exchange="exchange-y"),
            now=NOW_2,
        ),
    ]


def time_and_policy_cases(cast: Cast, chain: Chain) -> list[Case]:
    """Step 5 and the asset table of step 7: what a validly signed statement may still break."""
    first, m1 = chain.first, chain.m1
    policy = VerificationPolicy()
    skew, max_lifetime = policy.max_clock_skew, policy.max_lifetime

    def prices_observed(observed: datetime) -> Statement:
        late = replace(first.prices[0], observed_at=observed)
        return replace(first, prices=(late, *first.prices[1:]))

    def btc_decimals(decimals: int) -> Statement:
        return replace(
            first,
            assets=tuple(
                replace(r, decimals=decimals) if r.asset == "BTC" else r for r in first.assets
            ),
        )

    eth = compute_asset_roots({"ETH": SumTree("ETH")}, decimals={"ETH": 18})
    with_eth = replace(first, assets=tuple(sorted((*first.assets, *eth), key=lambda r: r.asset)))
    return [
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
            now=T0 - skew - timedelta(milliseconds=1),
        ),
        Case("issued_at exactly 30 s after now (inside the skew)", OK, message=m1, now=T0 - skew),
        Case(
            "lifetime of exactly 24 h",
            OK,
            message=sign(cast, replace(first, expires_at=T0 + max_lifetime)).to_wire(),
        ),
        Case(
            "lifetime 1 ms longer than 24 h",
            "policy_violation",
            message=sign(
                cast, replace(first, expires_at=T0 + max_lifetime + timedelta(milliseconds=1))
            ).to_wire(),
        ),
        Case(
            "price observed 30 s after issued_at (inside the skew)",
            OK,
            message=sign(cast, prices_observed(T0 + skew)).to_wire(),
        ),
        Case(
            "price observed 30.001 s after issued_at",
            "policy_violation",
            message=sign(cast, prices_observed(T0 + skew + timedelta(milliseconds=1))).to_wire(),
        ),
        Case(
            "BTC with 7 decimals, the receiver's table says 8",
            "policy_violation",
            message=sign(cast, btc_decimals(7)).to_wire(),
        ),
        Case(
            "asset the receiver's table does not have (ETH)",
            "policy_violation",
            message=sign(cast, with_eth).to_wire(),
        ),
    ]


def leaf_cases(cast: Cast, chain: Chain) -> list[Case]:
    """Step 7: the disclosed leaves against the signed roots, on a snapshot and on deltas."""
    first, second, m1 = chain.first, chain.second, chain.m1
    state_1 = disclosed(STATE_1)
    btc_root = next(root for root in first.assets if root.asset == "BTC")

    def with_btc_root(changed: AssetRoot) -> Statement:
        return replace(
            first, assets=tuple(changed if r.asset == "BTC" else r for r in first.assets)
        )

    deeper = make_statement(
        sequence=1,
        previous=GENESIS_PREVIOUS,
        kind=StatementKind.SNAPSHOT,
        issued_at=T0,
        state=STATE_1,
        depths={"BTC": btc_root.depth + 1},
    )
    other_salt = [*state_1]
    other_salt[1] = replace(other_salt[1], salt=seed("another-salt"))
    other_quantity = [*state_1]
    other_quantity[1] = replace(other_quantity[1], quantity=43)

    # Deltas after sequence 1, checked against the receiver's trees of sequence 1.
    depths_1 = statement_depths(first)
    set_and_clear = replace(
        second,
        assets=roots_of(disclosed(STATE_SET_AND_CLEAR), depths={"BTC": depths_1["BTC"], "USDC": 2}),
    )
    second_alice_leaf = DisclosedLeaf("alice", "BTC", 3, seed("second-alice-salt"), 5)
    two_alice_leaves = replace(
        second, assets=roots_of([*state_1, second_alice_leaf], depths=depths_1)
    )
    two_assets = replace(second, assets=roots_of(disclosed(STATE_TWO_ASSETS), depths=depths_1))
    right_two_assets = changes_from_1(two_assets, STATE_TWO_ASSETS)
    wrong_usdc = tuple(
        replace(leaf, quantity=27) if leaf.asset == "USDC" else leaf
        for leaf in right_two_assets.set_leaves
    )
    unchanged = replace(second, assets=first.assets)
    return [
        Case(
            "disclosed leaf with another salt",
            "root_mismatch",
            message=m1,
            disclosure=LeafDisclosure.for_statement(first, other_salt),
        ),
        Case(
            "disclosed leaf with another quantity",
            "root_mismatch",
            message=m1,
            disclosure=LeafDisclosure.for_statement(first, other_quantity),
        ),
        Case(
            "statement total one more than the leaves (root right)",
            "sum_mismatch",
            message=sign(
                cast, with_btc_root(replace(btc_root, total=btc_root.total + 1))
            ).to_wire(),
        ),
        Case(
            "statement count one more than the disclosed leaves",
            "sum_mismatch",
            message=sign(
                cast, with_btc_root(replace(btc_root, count=btc_root.count + 1))
            ).to_wire(),
        ),
        Case(
            "BTC tree one level deeper than its leaves need",
            OK,
            message=sign(cast, deeper).to_wire(),
            note="the receiver builds at the statement's depth, not the smallest that fits",
        ),
        Case(
            "disclosed leaves lack an asset",
            "root_mismatch",
            message=m1,
            disclosure=LeafDisclosure.for_statement(
                first, [leaf for leaf in state_1 if leaf.asset == "BTC"]
            ),
        ),
        Case(
            "snapshot disclosure that clears a position",
            "malformed",
            message=m1,
            disclosure=LeafDisclosure.for_statement(first, state_1, [ClearedSlot("BTC", 2)]),
        ),
        Case(
            "delta that sets and clears leaves",
            OK,
            message=sign(cast, set_and_clear).to_wire(),
            disclosure=changes_from_1(set_and_clear, STATE_SET_AND_CLEAR),
            head=chain.head_1,
            now=NOW_2,
            note=(
                "bob's BTC leaf changes, BTC position 2 (carol) is emptied, erin's new USDC leaf "
                "at position 2 grows the USDC tree to depth 2; the BTC tree keeps depth 2"
            ),
        ),
        Case(
            "delta gives alice a second BTC leaf",
            "duplicate_leaf",
            message=sign(cast, two_alice_leaves).to_wire(),
            disclosure=LeafDisclosure.for_statement(two_alice_leaves, [second_alice_leaf]),
            head=chain.head_1,
            now=NOW_2,
            note="the roots match: only the receiver's account index sees the second leaf",
        ),
        Case(
            "delta of two assets, the USDC leaf does not give the USDC root",
            "root_mismatch",
            message=sign(cast, two_assets).to_wire(),
            disclosure=replace(right_two_assets, set_leaves=wrong_usdc),
            head=chain.head_1,
            now=NOW_2,
            note="the BTC part is right; nothing is applied, the receiver keeps both trees",
        ),
        Case(
            "delta clears a position that holds no leaf",
            "malformed",
            message=sign(cast, unchanged).to_wire(),
            disclosure=LeafDisclosure.for_statement(unchanged, [], [ClearedSlot("BTC", 3)]),
            head=chain.head_1,
            now=NOW_2,
        ),
    ]


def decode_cases(chain: Chain) -> list[Case]:
    """Step 1: bytes that are not a well-formed signed statement."""
    m1 = chain.m1
    text_1 = chain.signed_first.encode().decode("utf-8")
    message_size = len(text_1.encode("utf-8"))
    btc_total = next(root.total for root in chain.first.assets if root.asset == "BTC")

    def set_btc_total(value: str) -> Callable[[JsonObject], None]:
        return lambda m: m["statement"]["assets"][0].__setitem__("total", value)

    return [
        Case("negative total", "negative_sum", message=with_change(m1, set_btc_total("-5"))),
        Case("total 2^128", "sum_overflow", message=with_change(m1, set_btc_total(str(2**128)))),
        Case(
            "total with a leading zero",
            "invalid_amount",
            message=with_change(m1, set_btc_total("0" + str(btc_total))),
        ),
        Case("truncated JSON", "malformed", message_text=text_1[:-1]),
        Case("duplicate member", "malformed", message_text='{"version":1,' + text_1[1:]),
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
            message=with_change(m1, lambda m: m["statement"].__setitem__("note", "unsigned")),
        ),
        Case(
            "upper-case hex root",
            "malformed",
            message=with_change(
                m1,
                lambda m: m["statement"]["assets"][0].__setitem__(
                    "root", m["statement"]["assets"][0]["root"].upper()
                ),
            ),
        ),
        Case(
            "sequence 1 as a delta",
            "malformed",
            message=with_change(m1, lambda m: m["statement"].__setitem__("kind", "delta")),
        ),
        Case(
            "signed statement version 2",
            "malformed",
            message=with_change(m1, lambda m: m.__setitem__("version", 2)),
        ),
        Case(
            "message one byte over max_bytes", "malformed", message=m1, max_bytes=message_size - 1
        ),
        Case("message exactly max_bytes", OK, message=m1, max_bytes=message_size),
    ]


def build_verification(cast: Cast, first: Statement, signed_first: SignedStatement) -> JsonObject:
    chain = Chain.make(cast, first, signed_first)
    states = chain.receiver_states()
    cases = [
        *accepted_cases(cast, chain),
        *key_cases(cast, chain),
        *stream_and_chain_cases(cast, chain),
        *time_and_policy_cases(cast, chain),
        *leaf_cases(cast, chain),
        *decode_cases(chain),
    ]
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise VectorError("two verification cases share a name")
    policy = VerificationPolicy()
    return {
        "description": (
            "Verification decisions of the receiver of a stream (docs/protocol.md section 7). "
            "For each case: take the message bytes ('message' serialized with RFC 8785, or "
            "'message_text' as UTF-8 exactly; when 'max_bytes' is given it replaces the default "
            f"size bound of {MAX_MESSAGE_BYTES} bytes and 'message_bytes' is the message's "
            "length), the stream the receiver expects ('stream': custodian and exchange), the "
            "key registry 'registry', the chain head 'head' (null: nothing accepted yet), the "
            "digests accepted at earlier sequences 'history' (absent: none known), the time "
            "'now', the policy (clock skew 'max_clock_skew_ms', longest lifetime "
            "'max_lifetime_ms'), the receiver's asset table 'decimals', the receiver's trees "
            "(rebuilt from receiver_states[receiver]: its leaves, one sum tree per asset at the "
            "given depth) and the leaf disclosure 'disclosure' (protocol section 8.1; feed its "
            "RFC 8785 bytes to the strict reader). 'expected' is 'ok' or the reason of the "
            "first failing check. On success the new head must equal 'expected_head' and the "
            "receiver's trees, once the statement is applied, 'expected_trees'; on failure the "
            "trees must not change."
        ),
        "max_clock_skew_ms": int(policy.max_clock_skew.total_seconds() * 1000),
        "max_lifetime_ms": int(policy.max_lifetime.total_seconds() * 1000),
        "default_max_bytes": MAX_MESSAGE_BYTES,
        "decimals": dict(DECIMALS),
        "registry": cast.registry_wire,
        "receiver_states": {name: state.to_wire() for name, state in states.items()},
        "cases": [case_wire(cast, case, states=states, fallback=first) for case in cases],
    }


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

    now = T0 + timedelta(minutes=10)
    skew = VerificationPolicy().max_clock_skew

    def signed_checkpoint(
        size: int, hashes: Sequence[bytes], *, issued: datetime | None = None
    ) -> SignedCheckpoint:
        # Size 6 is signed a minute before size 8: the log grew in between.
        at = T0 + timedelta(minutes=5 if size < LOG_SIZE else 6) if issued is None else issued
        checkpoint = Checkpoint(CUSTODIAN, EXCHANGE, head(size, hashes), at)
        return sign_checkpoint(checkpoint, signer=cast.primary)

    honest_6 = signed_checkpoint(6, leaves)
    honest_8 = signed_checkpoint(8, leaves)
    forked_6 = signed_checkpoint(6, forked_leaves)
    forked_8 = signed_checkpoint(8, forked_leaves)
    rolled_back_6 = signed_checkpoint(6, leaves, issued=T0 + timedelta(minutes=7))
    same_time_8 = signed_checkpoint(8, leaves, issued=honest_6.checkpoint.issued_at)
    at_skew = signed_checkpoint(LOG_SIZE, leaves, issued=now + skew)
    future = signed_checkpoint(LOG_SIZE, leaves, issued=now + skew + timedelta(milliseconds=1))
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
                first, second, registry=cast.checkpoint_registry, proof=proof, now=now
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
            now=now,
        ),
    )

    def dated_case(name: str, expected: str, signed: SignedCheckpoint) -> JsonObject:
        confirm(
            f"checkpoint {name}",
            expected,
            lambda: verify_checkpoint(signed, registry=cast.checkpoint_registry, now=now),
        )
        return {"name": name, "signed": signed.to_wire(), "expected": expected}

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
            "mcb/tree-head/v1) at 'now' with the clock skew 'max_clock_skew_ms' (a checkpoint "
            "dated beyond it is future_dated: see checkpoint.dated), and run the split-view "
            "check at 'now' on each pair of signed checkpoints (both checkpoints first, then a "
            "later-issued checkpoint with fewer entries is a rollback, then the heads with "
            "'proof')."
        ),
        "now": ts(now),
        "max_clock_skew_ms": int(skew.total_seconds() * 1000),
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
                lambda: verify_checkpoint(honest_8, registry=cast.checkpoint_registry, now=now),
            ),
            "tampered": {"signed": tampered, "expected": "bad_signature"},
            "dated": [
                dated_case("issued exactly max_clock_skew after now", OK, at_skew),
                dated_case("issued 1 ms beyond the clock skew", "future_dated", future),
            ],
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
            split_case(
                "rollback: size 6 signed after size 8",
                "split_view",
                honest_8,
                rolled_back_6,
                honest_6_8,
            ),
            split_case(
                "rollback, the other way round",
                "split_view",
                rolled_back_6,
                honest_8,
                honest_6_8,
            ),
            split_case(
                "sizes 8 and 6 issued at the same time: not a rollback",
                OK,
                same_time_8,
                honest_6,
                honest_6_8,
            ),
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

    now = NOW_1
    message = signed.encode()

    def check(name: str, expected: str, obj: JsonObject) -> str:
        def run() -> None:
            client_proof = ClientProof.from_wire(parse_json_object(compute_canonical_bytes(obj)))
            authenticated = authenticate_statement(
                message,
                custodian=client_proof.custodian,
                exchange=client_proof.exchange,
                registry=cast.registry,
                now=now,
            )
            verify_client_proof(client_proof, statement=authenticated.statement)

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
            "The client decodes the bundle, authenticates the signed statement for the "
            "bundle's (custodian, exchange) stream with 'registry' at 'now' (decode, stream, "
            "signatures, time; no chain head), checks that custodian, exchange, sequence and "
            "statement digest match, takes the asset root of proof.asset, requires "
            "proof.depth == depth, and verifies the inclusion proof with its own account and "
            "salt. 'expected_quantity' is the attested quantity of a valid bundle; each "
            "'tampered' bundle must fail with 'expected'."
        ),
        "now": ts(now),
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
                "another exchange: the statement is not of that stream",
                "wrong_stream",
                lambda p: p.__setitem__("exchange", "exchange-y"),
            ),
            tampered(
                "another custodian: the statement is not of that stream",
                "wrong_stream",
                lambda p: p.__setitem__("custodian", OTHER_CUSTODIAN),
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
    documents = {
        "canonical.json": build_canonical(cast, first),
        "merkle.json": build_merkle(),
        "statement.json": build_statement(cast, first, signed_first),
        "verification.json": build_verification(cast, first, signed_first),
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
