"""The golden vectors in tests/vectors/, checked against the implementation in both directions.

Every expected value is recomputed from the inputs stored next to it (canonical bytes, hashes,
trees, digests, keys, BLS signatures), every signature and proof is verified, and every stated
outcome is reproduced through the public API, decoding from bytes where the wire carries bytes.
The last tests regenerate the files in memory with scripts/make_vectors.py and fail on any drift,
so the vectors, the generator and the implementation cannot silently disagree.

Byte layouts are rebuilt here with hashlib and ``int.to_bytes`` as well, so the vectors check the
documented layouts and not only the implementation's own helpers.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.util
import itertools
import json
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from attestations import bls
from attestations.canonical import (
    MAX_MESSAGE_BYTES,
    compute_canonical_bytes,
    compute_digest,
    compute_key_id,
    format_timestamp,
    parse_json_object,
    parse_timestamp,
)
from attestations.checkpoint import SignedCheckpoint, verify_checkpoint, verify_same_history
from attestations.disclosure import (
    ClientProof,
    DisclosedLeaf,
    LeafDisclosure,
    ReceiverTrees,
    build_trees,
    compute_asset_roots,
    compute_salt,
    verify_client_proof,
)
from attestations.errors import BridgeError
from attestations.keys import KeyRegistry, KeyRole
from attestations.merkle import (
    EMPTY_HASHES,
    InclusionProof,
    Leaf,
    SumTree,
    compute_account_commitment,
    compute_leaf_hash,
    compute_node,
    verify_inclusion,
)
from attestations.p256 import SoftwareP256Signer, verify_p256_digest
from attestations.signing import CoSignature, compute_quorum_signature
from attestations.statement import AssetRoot, SignedStatement, Statement, StatementKind
from attestations.translog import (
    LogConsistencyProof,
    LogInclusionProof,
    TransparencyLog,
    TreeHead,
    compute_consistency_path,
    compute_inclusion_path,
    compute_root,
    verify_log_consistency,
    verify_log_inclusion,
)
from attestations.translog import compute_leaf_hash as compute_log_leaf_hash
from attestations.verify import (
    ChainHead,
    VerificationPolicy,
    VerifiedStatement,
    authenticate_statement,
    verify_statement,
)

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
GENERATOR = ROOT / "scripts" / "make_vectors.py"
OK = "ok"

JsonObject = dict[str, Any]


@functools.cache
def load(name: str) -> JsonObject:
    document = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@functools.cache
def _registry(canonical: bytes) -> KeyRegistry:
    # Registering a co-signer key runs PopVerify (a pairing on py_ecc); parse each distinct
    # registry once for the whole module.
    return KeyRegistry.from_wire(parse_json_object(canonical))


def registry_of(document: JsonObject) -> KeyRegistry:
    return _registry(compute_canonical_bytes(document["registry"]))


def reason(action: Callable[[], object]) -> str:
    """``"ok"`` if ``action`` returns, else the ``reason`` of the project error it raised."""
    try:
        action()
    except BridgeError as exc:
        return exc.reason
    return OK


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def u(value: str | int, size: int) -> bytes:
    return int(value).to_bytes(size, "big")


def wire_bytes(obj: object) -> bytes:
    """What a receiver gets on the wire for a stored object: its RFC 8785 bytes."""
    assert isinstance(obj, dict)
    return compute_canonical_bytes(obj)


def head_from_wire(obj: JsonObject | None) -> ChainHead | None:
    if obj is None:
        return None
    return ChainHead(
        custodian=obj["custodian"],
        exchange=obj["exchange"],
        sequence=obj["sequence"],
        digest=bytes.fromhex(obj["digest"]),
        issued_at=parse_timestamp(obj["issued_at"]),
    )


def head_to_wire(head: ChainHead) -> JsonObject:
    return {
        "custodian": head.custodian,
        "exchange": head.exchange,
        "sequence": head.sequence,
        "digest": head.digest.hex(),
        "issued_at": format_timestamp(head.issued_at),
    }


def test_every_file_is_described_and_nothing_else_is_there() -> None:
    generator = _generator()
    on_disk = sorted(path.name for path in VECTORS.glob("*.json"))
    # transport.json belongs to the transport layer (scripts/make_transport_vectors.py) and
    # notices.json to the exchange's notices (scripts/make_notice_vectors.py, checked in
    # tests/test_notices.py).
    assert on_disk == sorted((*generator.FILES, "transport.json", "notices.json"))
    for name in on_disk:
        description = load(name)["description"]
        assert isinstance(description, str)
        assert len(description) > 80


# --- canonical.json -----------------------------------------------------------------------------


def test_canonical_bytes_and_digests() -> None:
    document = load("canonical.json")
    assert document["domain_separator_hex"] == "00"
    for case in document["cases"]:
        data = compute_canonical_bytes(case["object"])
        assert data.hex() == case["canonical_hex"], case["name"]
        assert data.decode("utf-8") == case["canonical_utf8"], case["name"]
        assert b"\x00" not in data, case["name"]
        for entry in case["digests"]:
            expected = sha256(entry["domain"].encode("ascii") + b"\x00" + data).hex()
            assert entry["digest"] == expected, case["name"]
            assert compute_digest(domain=entry["domain"], obj=case["object"]).hex() == expected
        # The canonical bytes parse back to the object they came from.
        assert parse_json_object(data) == case["object"], case["name"]


def test_canonical_digests_differ_by_domain() -> None:
    for case in load("canonical.json")["cases"]:
        digests = [entry["digest"] for entry in case["digests"]]
        assert len(set(digests)) == len(digests), case["name"]


def test_key_ids() -> None:
    for case in load("canonical.json")["key_ids"]:
        public_key = bytes.fromhex(case["public_key"])
        preimage = b"mcb/key/v1\x00" + case["algorithm"].encode("ascii") + b"\x00" + public_key
        assert preimage.hex() == case["preimage_hex"], case["name"]
        assert sha256(preimage).hex() == case["key_id"], case["name"]
        assert compute_key_id(algorithm=case["algorithm"], public_key=public_key) == case["key_id"]


def test_strict_json_reader() -> None:
    for case in load("canonical.json")["strict_json"]:
        data = bytes.fromhex(case["hex"]) if "hex" in case else case["text"].encode("utf-8")
        limit = case.get("max_bytes", MAX_MESSAGE_BYTES)
        got = reason(functools.partial(parse_json_object, data, max_bytes=limit))
        assert got == case["expected"], case["name"]


# --- merkle.json --------------------------------------------------------------------------------


def test_account_commitments() -> None:
    document = load("merkle.json")
    domain = document["constants"]["account_domain"].encode("ascii")
    for case in document["commitments"]:
        salt = bytes.fromhex(case["salt"])
        account = case["account"].encode("ascii")
        preimage = domain + b"\x00" + salt + u(len(account), 2) + account
        assert preimage.hex() == case["preimage_hex"], case["account"]
        assert sha256(preimage).hex() == case["commitment"], case["account"]
        commitment = compute_account_commitment(account=case["account"], salt=salt)
        assert commitment.hex() == case["commitment"]


def test_leaf_hashes() -> None:
    for case in load("merkle.json")["leaf_hashes"]:
        commitment = bytes.fromhex(case["commitment"])
        asset = case["asset"].encode("ascii")
        preimage = (
            b"\x00"
            + u(case["position"], 8)
            + commitment
            + u(len(asset), 1)
            + asset
            + u(case["quantity"], 16)
        )
        assert preimage.hex() == case["preimage_hex"]
        assert sha256(preimage).hex() == case["hash"]
        computed = compute_leaf_hash(
            position=case["position"],
            commitment=commitment,
            asset=case["asset"],
            quantity=int(case["quantity"]),
        )
        assert computed.hex() == case["hash"]


def test_node_hashes() -> None:
    document = load("merkle.json")
    for case in document["node_hashes"]:
        left, right = bytes.fromhex(case["left_hash"]), bytes.fromhex(case["right_hash"])
        preimage = b"\x01" + left + u(case["left_sum"], 16) + right + u(case["right_sum"], 16)
        assert preimage.hex() == case["preimage_hex"]
        assert sha256(preimage).hex() == case["hash"]
        digest, total = compute_node(
            left_hash=left,
            left_sum=int(case["left_sum"]),
            right_hash=right,
            right_sum=int(case["right_sum"]),
        )
        assert (digest.hex(), str(total)) == (case["hash"], case["sum"])
    for case in document["node_errors"]:
        got = reason(
            functools.partial(
                compute_node,
                left_hash=bytes.fromhex(case["left_hash"]),
                left_sum=int(case["left_sum"]),
                right_hash=bytes.fromhex(case["right_hash"]),
                right_sum=int(case["right_sum"]),
            )
        )
        assert got == case["expected"]


def test_empty_subtree_hashes() -> None:
    chain = [sha256(b"\x02")]
    for _ in range(48):
        chain.append(sha256(b"\x01" + chain[-1] + bytes(16) + chain[-1] + bytes(16)))
    for case in load("merkle.json")["empty_hashes"]:
        assert case["sum"] == "0"
        assert chain[case["height"]].hex() == case["hash"]
        assert EMPTY_HASHES[case["height"]].hex() == case["hash"]


def _tree(case: JsonObject) -> SumTree:
    leaves = [
        Leaf(
            leaf["position"],
            compute_account_commitment(account=leaf["account"], salt=bytes.fromhex(leaf["salt"])),
            int(leaf["quantity"]),
        )
        for leaf in case["leaves"]
    ]
    return SumTree.build(case["asset"], leaves)


def test_trees_level_by_level() -> None:
    for case in load("merkle.json")["trees"]:
        depth = case["depth"]
        levels = case["levels"]
        assert [level["height"] for level in levels] == list(range(depth + 1))
        # Height 0 from the leaves and empty slots, each higher level from the stored one below.
        slots = [(EMPTY_HASHES[0].hex(), "0")] * (1 << depth)
        for leaf in case["leaves"]:
            commitment = compute_account_commitment(
                account=leaf["account"], salt=bytes.fromhex(leaf["salt"])
            )
            digest = compute_leaf_hash(
                position=leaf["position"],
                commitment=commitment,
                asset=case["asset"],
                quantity=int(leaf["quantity"]),
            )
            slots[leaf["position"]] = (digest.hex(), leaf["quantity"])
        assert [(n["hash"], n["sum"]) for n in levels[0]["nodes"]] == slots, case["name"]
        for below, level in itertools.pairwise(levels):
            nodes = below["nodes"]
            expected = []
            for i in range(0, len(nodes), 2):
                digest, total = compute_node(
                    left_hash=bytes.fromhex(nodes[i]["hash"]),
                    left_sum=int(nodes[i]["sum"]),
                    right_hash=bytes.fromhex(nodes[i + 1]["hash"]),
                    right_sum=int(nodes[i + 1]["sum"]),
                )
                expected.append({"index": i // 2, "hash": digest.hex(), "sum": str(total)})
            assert level["nodes"] == expected, (case["name"], level["height"])
        top = levels[-1]["nodes"]
        assert [(top[0]["hash"], top[0]["sum"])] == [(case["root"], case["total"])]
        tree = _tree(case)
        assert (tree.root.hex(), str(tree.total)) == (case["root"], case["total"])
        assert (tree.depth, tree.count) == (depth, case["count"])


def test_inclusion_proofs() -> None:
    for case in load("merkle.json")["trees"]:
        tree = _tree(case)
        root, total = bytes.fromhex(case["root"]), int(case["total"])
        assert len(case["proofs"]) == len(case["leaves"])
        for item in case["proofs"]:
            proof = InclusionProof.from_wire(parse_json_object(wire_bytes(item["proof"])))
            assert proof.to_wire() == item["proof"]
            assert tree.prove(proof.position).to_wire() == item["proof"]
            salt = bytes.fromhex(item["salt"])
            got = reason(
                functools.partial(
                    verify_inclusion,
                    proof,
                    account=item["account"],
                    salt=salt,
                    root=root,
                    total=total,
                    depth=case["depth"],
                )
            )
            assert got == item["expected"] == OK


def test_invalid_inclusion_proofs() -> None:
    for case in load("merkle.json")["invalid_proofs"]:
        text = case["proof_json"] if "proof_json" in case else json.dumps(case["proof"])

        def run(c: JsonObject = case, t: str = text) -> None:
            proof = InclusionProof.from_wire(parse_json_object(t))
            verify_inclusion(
                proof,
                account=c["account"],
                salt=bytes.fromhex(c["salt"]),
                root=bytes.fromhex(c["root"]),
                total=int(c["total"]),
                depth=c["depth"],
            )

        assert reason(run) == case["expected"], case["name"]


# --- statement.json -----------------------------------------------------------------------------


def test_custodian_key_from_its_scalar() -> None:
    key = load("statement.json")["custodian_key"]
    signer = SoftwareP256Signer(
        insecure_development_only=True, private_scalar=bytes.fromhex(key["private_scalar"])
    )
    assert signer.public_key.hex() == key["public_key"]
    assert signer.key_id == key["key_id"]
    assert signer.algorithm == key["algorithm"]


def test_cosigner_keys_and_proofs_of_possession() -> None:
    document = load("statement.json")
    registered = {record.key_id: record for record in registry_of(document).records()}
    for cosigner in document["cosigners"]:
        secret_key = bls.generate_secret_key(bytes.fromhex(cosigner["ikm"]))
        assert secret_key.to_bytes(32, "big").hex() == cosigner["secret_key"]
        public_key = bls.compute_public_key(secret_key)
        assert public_key.hex() == cosigner["public_key"]
        assert bls.prove_possession(secret_key).hex() == cosigner["proof_of_possession"]
        # Registration ran PopVerify on the proof: the registry holds it only if it passed.
        record = registered[cosigner["key_id"]]
        assert record.proof_of_possession is not None
        assert record.proof_of_possession.hex() == cosigner["proof_of_possession"]
        assert (record.role, record.owner, record.signs_for) == (
            KeyRole.COSIGNER,
            cosigner["party"],
            cosigner["signs_for"],
        )
        assert (
            compute_key_id(algorithm=cosigner["algorithm"], public_key=public_key)
            == (cosigner["key_id"])
        )


def test_registry_records_name_whom_they_sign_for() -> None:
    # A co-signer key names the custodian it co-signs for; no other key names anyone.
    for record in load("statement.json")["registry"]["keys"]:
        if record["role"] == KeyRole.COSIGNER.value:
            assert record["signs_for"] not in (None, record["owner"])
        else:
            assert record["signs_for"] is None


def test_salt_derivation() -> None:
    derivation = load("statement.json")["salt_derivation"]
    secret = bytes.fromhex(derivation["secret"])
    for example in derivation["examples"]:
        message = b"\x00".join(
            [b"mcb/salt/v1"]
            + [example[k].encode("ascii") for k in ("exchange", "account", "asset")]
        )
        assert message.hex() == example["message_hex"]
        assert hmac.new(secret, message, hashlib.sha256).hexdigest() == example["salt"]
        salt = compute_salt(
            secret=secret,
            exchange=example["exchange"],
            account=example["account"],
            asset=example["asset"],
        )
        assert salt.hex() == example["salt"]


def test_statement_bytes_and_digest() -> None:
    document = load("statement.json")
    statement = Statement.from_wire(document["statement"])
    assert statement.to_wire() == document["statement"]
    canonical = statement.canonical_bytes()
    assert canonical.hex() == document["canonical_hex"]
    assert canonical == compute_canonical_bytes(document["statement"])
    digest = sha256(b"mcb/statement/v1\x00" + canonical)
    assert digest.hex() == document["digest"]
    assert statement.compute_digest() == digest


def _disclosure(obj: JsonObject) -> LeafDisclosure:
    """A stored leaf disclosure as a receiver reads it: from its RFC 8785 bytes."""
    return LeafDisclosure.from_wire(parse_json_object(wire_bytes(obj)))


def test_disclosure_is_bound_to_the_statement_and_gives_its_roots() -> None:
    document = load("statement.json")
    statement = Statement.from_wire(document["statement"])
    disclosure = _disclosure(document["disclosure"])
    assert disclosure.to_wire() == document["disclosure"]
    binding = (disclosure.custodian, disclosure.exchange, disclosure.sequence)
    assert binding == (statement.custodian, statement.exchange, statement.sequence)
    assert disclosure.statement_digest.hex() == document["digest"]
    assert disclosure.clear == ()  # a snapshot lists every leaf and clears nothing
    leaves = disclosure.set_leaves
    salts = {(e["account"], e["asset"]): e["salt"] for e in document["salt_derivation"]["examples"]}
    assert all(salts[(leaf.account, leaf.asset)] == leaf.salt.hex() for leaf in leaves)
    depths = {root.asset: root.depth for root in statement.assets}
    trees = build_trees(leaves, depths=depths)
    assert compute_asset_roots(trees, decimals=document["decimals"]) == statement.assets


def test_quorum_signature_is_reproduced() -> None:
    document = load("statement.json")
    digest = bytes.fromhex(document["digest"])
    secret_keys = {
        c["key_id"]: bls.generate_secret_key(bytes.fromhex(c["ikm"])) for c in document["cosigners"]
    }
    public_keys = {c["key_id"]: bytes.fromhex(c["public_key"]) for c in document["cosigners"]}
    cosignatures = []
    for item in document["cosignatures"]:
        signature = bls.sign(secret_key=secret_keys[item["key_id"]], message=digest)
        assert signature.hex() == item["signature"]
        bls.verify_signature(
            public_key=public_keys[item["key_id"]], message=digest, signature=signature
        )
        cosignatures.append(CoSignature(item["key_id"], signature))
    quorum = compute_quorum_signature(cosignatures)
    assert quorum.signature.hex() == document["aggregate_signature"]
    signed = SignedStatement.from_wire(document["signed_statement"])
    assert signed.quorum_signature == quorum
    bls.verify_aggregate(
        public_keys=[public_keys[key_id] for key_id in quorum.signers],
        message=digest,
        signature=quorum.signature,
    )


def test_custodian_signature_verifies() -> None:
    document = load("statement.json")
    signed = SignedStatement.from_wire(document["signed_statement"])
    key = document["custodian_key"]
    assert signed.custodian_signature.key_id == key["key_id"]
    assert signed.digest.hex() == document["digest"]
    verify_p256_digest(
        public_key=bytes.fromhex(key["public_key"]),
        digest=signed.digest,
        signature=signed.custodian_signature.signature,
    )


def trees_to_wire(receiver: ReceiverTrees) -> list[JsonObject]:
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


def roots_to_wire(statement: Statement) -> list[JsonObject]:
    """What the receiver's trees must be once ``statement`` is accepted: its signed roots."""
    return [
        {
            "asset": root.asset,
            "depth": root.depth,
            "root": root.root.hex(),
            "total": str(root.total),
            "count": root.count,
        }
        for root in statement.assets
    ]


def test_signed_statement_wire_and_verification() -> None:
    document = load("statement.json")
    signed = SignedStatement.from_wire(document["signed_statement"])
    assert signed.to_wire() == document["signed_statement"]
    message = document["message_utf8"].encode("utf-8")
    assert signed.encode() == message
    registry = registry_of(document)
    assert registry.to_wire() == document["registry"]
    receiver = ReceiverTrees(document["decimals"])
    verified = verify_statement(
        message,
        custodian=document["stream"]["custodian"],
        exchange=document["stream"]["exchange"],
        registry=registry,
        head=None,
        now=parse_timestamp(document["now"]),
        receiver=receiver,
        disclosure=_disclosure(document["disclosure"]),
    )
    assert receiver.trees == {}  # nothing changes before the plan is applied
    verified.trees_plan.apply()
    assert document["expected"] == OK
    assert head_to_wire(verified.head) == document["expected_head"]
    assert trees_to_wire(receiver) == document["expected_trees"] == roots_to_wire(signed.statement)


# --- verification.json --------------------------------------------------------------------------

_CASES = load("verification.json")["cases"]
_COVERED_REASONS = {
    OK,
    "malformed",
    "invalid_amount",
    "float_rejected",
    "negative_sum",
    "sum_overflow",
    "sequence_replay",
    "wrong_stream",
    "unknown_key",
    "revoked_key",
    "key_not_valid",
    "bad_signature",
    "missing_quorum",
    "expired",
    "future_dated",
    "policy_violation",
    "sequence_gap",
    "fork",
    "broken_chain",
    "duplicate_leaf",
    "root_mismatch",
    "sum_mismatch",
}


def test_verification_settings() -> None:
    document = load("verification.json")
    policy = VerificationPolicy()
    assert policy.max_clock_skew == timedelta(milliseconds=document["max_clock_skew_ms"])
    assert policy.max_lifetime == timedelta(milliseconds=document["max_lifetime_ms"])
    assert document["default_max_bytes"] == MAX_MESSAGE_BYTES
    assert registry_of(document).to_wire() == document["registry"]
    assert document["registry"] == load("statement.json")["registry"]
    assert document["decimals"] == load("statement.json")["decimals"]
    names = [case["name"] for case in _CASES]
    assert len(set(names)) == len(names)
    # Every reason the receiver can dead-letter a statement with is exercised at least once.
    assert {case["expected"] for case in _CASES} >= _COVERED_REASONS
    assert {case["receiver"] for case in _CASES} == set(document["receiver_states"])


def _receiver(document: JsonObject, name: str) -> ReceiverTrees:
    """The receiver's trees before a case, rebuilt from the leaves it holds (as a receiver that
    restarts does from its database)."""
    state = document["receiver_states"][name]
    leaves = [DisclosedLeaf.from_wire(item) for item in state["leaves"]]
    return ReceiverTrees.restore(document["decimals"], leaves, depths=state["depths"])


def _case(name: str) -> JsonObject:
    return next(case for case in _CASES if case["name"] == name)


def _accept(document: JsonObject, case: JsonObject, receiver: ReceiverTrees) -> ChainHead:
    verified = verify_statement(
        wire_bytes(case["message"]),
        custodian=case["stream"]["custodian"],
        exchange=case["stream"]["exchange"],
        registry=registry_of(document),
        head=head_from_wire(case["head"]),
        now=parse_timestamp(case["now"]),
        receiver=receiver,
        disclosure=_disclosure(case["disclosure"]),
    )
    verified.trees_plan.apply()
    return verified.head


def test_receiver_states_are_what_the_sample_chain_leaves() -> None:
    # The stored states are the ones a receiver reaches by accepting the sample snapshot and
    # then the sample delta, not just any leaves.
    document = load("verification.json")
    receiver = _receiver(document, "none")
    assert receiver.trees == {}
    head = _accept(document, _case("valid snapshot, no head"), receiver)
    assert trees_to_wire(receiver) == trees_to_wire(_receiver(document, "after_snapshot"))
    delta = _case("valid delta after the snapshot")
    assert delta["head"] == head_to_wire(head)
    _accept(document, delta, receiver)
    assert trees_to_wire(receiver) == trees_to_wire(_receiver(document, "after_delta"))


def _history(case: JsonObject) -> dict[int, bytes] | None:
    if "history" not in case:
        return None
    return {item["sequence"]: bytes.fromhex(item["digest"]) for item in case["history"]}


def _trees_from_leaves(
    document: JsonObject, case: JsonObject, statement: Statement
) -> list[JsonObject]:
    """The trees after an accepted statement, rebuilt from scratch: the receiver's leaves with
    the disclosure applied (all of them replaced for a snapshot), at the statement's depths."""
    disclosure = _disclosure(case["disclosure"])
    leaves: dict[tuple[str, int], DisclosedLeaf] = {}
    if statement.kind is StatementKind.DELTA:
        for item in document["receiver_states"][case["receiver"]]["leaves"]:
            leaf = DisclosedLeaf.from_wire(item)
            leaves[(leaf.asset, leaf.position)] = leaf
    for slot in disclosure.clear:
        del leaves[(slot.asset, slot.position)]
    for leaf in disclosure.set_leaves:
        leaves[(leaf.asset, leaf.position)] = leaf
    depths = {root.asset: root.depth for root in statement.assets}
    trees = build_trees(leaves.values(), depths=depths)
    for asset, depth in depths.items():
        trees.setdefault(asset, SumTree(asset, depth=depth))
    return [
        {
            "asset": asset,
            "depth": tree.depth,
            "root": tree.root.hex(),
            "total": str(tree.total),
            "count": tree.count,
        }
        for asset, tree in sorted(trees.items())
    ]


@pytest.mark.parametrize("case", _CASES, ids=[case["name"] for case in _CASES])
def test_verification_case(case: JsonObject) -> None:
    document = load("verification.json")
    if "message_text" in case:
        assert "message" not in case
        data = case["message_text"].encode("utf-8")
    else:
        data = wire_bytes(case["message"])
    max_bytes: int = document["default_max_bytes"]
    if "max_bytes" in case:
        max_bytes = case["max_bytes"]
        assert case["message_bytes"] == len(data)
    receiver = _receiver(document, case["receiver"])
    before = trees_to_wire(receiver)
    results: list[VerifiedStatement] = []

    def run() -> None:
        verified = verify_statement(
            data,
            custodian=case["stream"]["custodian"],
            exchange=case["stream"]["exchange"],
            registry=registry_of(document),
            head=head_from_wire(case["head"]),
            now=parse_timestamp(case["now"]),
            receiver=receiver,
            disclosure=_disclosure(case["disclosure"]),
            history=_history(case),
            max_bytes=max_bytes,
        )
        assert trees_to_wire(receiver) == before  # verification alone changes nothing
        verified.trees_plan.apply()
        results.append(verified)

    assert reason(run) == case["expected"]
    if case["expected"] != OK:
        assert "expected_head" not in case
        assert "expected_trees" not in case
        assert trees_to_wire(receiver) == before
        return
    verified = results[0]
    assert head_to_wire(verified.head) == case["expected_head"]
    assert verified.head.digest == verified.statement.compute_digest()
    trees = case["expected_trees"]
    assert trees_to_wire(receiver) == trees == roots_to_wire(verified.statement)
    assert _trees_from_leaves(document, case, verified.statement) == trees


# --- translog.json ------------------------------------------------------------------------------


def _log_heads(document: JsonObject) -> list[TreeHead]:
    return [TreeHead.from_wire(head) for head in document["heads"]]


def test_log_leaf_hashes_and_heads() -> None:
    document = load("translog.json")
    entries = [bytes.fromhex(e) for e in document["entries"]]
    leaves = [bytes.fromhex(h) for h in document["leaf_hashes"]]
    assert all(len(entry) == 32 for entry in entries)
    assert leaves == [sha256(b"\x00" + entry) for entry in entries]
    assert leaves == [compute_log_leaf_hash(entry) for entry in entries]
    heads = _log_heads(document)
    assert [head.size for head in heads] == list(range(len(entries) + 1))
    assert heads[0].root == sha256(b"")
    for head in heads:
        assert compute_root(leaves[: head.size]) == head.root
        assert head.to_wire() == document["heads"][head.size]
    forked = document["forked_entries"]
    forked_leaves = [compute_log_leaf_hash(bytes.fromhex(e)) for e in forked["entries"]]
    for head in forked["heads"]:
        assert compute_root(forked_leaves[: head["size"]]).hex() == head["root"]


def test_log_proofs_are_recomputed_and_verify() -> None:
    document = load("translog.json")
    entries = [bytes.fromhex(e) for e in document["entries"]]
    leaves = [compute_log_leaf_hash(entry) for entry in entries]
    heads = _log_heads(document)
    for item in document["inclusion_proofs"]:
        proof = LogInclusionProof.from_wire(item["proof"])
        assert proof.to_wire() == item["proof"]
        assert proof.path == compute_inclusion_path(leaves[: proof.size], proof.index)
        assert proof.index == item["entry_index"]
        got = reason(
            functools.partial(
                verify_log_inclusion,
                entry=entries[proof.index],
                proof=proof,
                head=heads[proof.size],
            )
        )
        assert got == item["expected"] == OK
    for item in document["consistency_proofs"]:
        step = LogConsistencyProof.from_wire(item["proof"])
        assert step.to_wire() == item["proof"]
        assert step.path == compute_consistency_path(leaves[: step.new_size], step.old_size)
        got = reason(
            functools.partial(
                verify_log_consistency,
                old=heads[step.old_size],
                new=heads[step.new_size],
                proof=step,
            )
        )
        assert got == item["expected"] == OK
    sizes = len(entries)
    assert len(document["inclusion_proofs"]) == sizes * (sizes + 1) // 2
    assert len(document["consistency_proofs"]) == sizes * (sizes + 3) // 2


def test_the_custodian_log_serves_the_same_heads_and_proofs() -> None:
    document = load("translog.json")
    inclusion = {
        (p["proof"]["index"], p["proof"]["size"]): p["proof"] for p in document["inclusion_proofs"]
    }
    consistency = {
        (p["proof"]["old_size"], p["proof"]["new_size"]): p["proof"]
        for p in document["consistency_proofs"]
    }
    with TransparencyLog(":memory:") as log:
        for entry in document["entries"]:
            log.append(bytes.fromhex(entry))
        for head in document["heads"]:
            assert log.head(head["size"]).to_wire() == head
        for (index, size), wire in inclusion.items():
            assert log.prove_inclusion(index, size).to_wire() == wire
        for (old_size, new_size), wire in consistency.items():
            assert log.prove_consistency(old_size, new_size).to_wire() == wire


def test_invalid_log_proofs() -> None:
    document = load("translog.json")
    for case in document["invalid_inclusion_proofs"]:

        def run_inclusion(c: JsonObject = case) -> None:
            verify_log_inclusion(
                entry=bytes.fromhex(c["entry"]),
                proof=LogInclusionProof.from_wire(c["proof"]),
                head=TreeHead.from_wire(c["head"]),
            )

        assert reason(run_inclusion) == case["expected"], case["name"]
    for case in document["invalid_consistency_proofs"]:

        def run_consistency(c: JsonObject = case) -> None:
            verify_log_consistency(
                old=TreeHead.from_wire(c["old"]),
                new=TreeHead.from_wire(c["new"]),
                proof=LogConsistencyProof.from_wire(c["proof"]),
            )

        assert reason(run_consistency) == case["expected"], case["name"]


def _signed_checkpoint(obj: JsonObject) -> SignedCheckpoint:
    return SignedCheckpoint.decode(wire_bytes(obj))


def test_signed_checkpoint() -> None:
    document = load("translog.json")
    vector = document["checkpoint"]
    registry = registry_of(document)
    assert registry.to_wire() == document["registry"]
    signed = _signed_checkpoint(vector["signed"])
    assert signed.to_wire() == vector["signed"]
    assert signed.checkpoint.to_wire() == vector["checkpoint"]
    canonical = compute_canonical_bytes(vector["checkpoint"])
    assert canonical.hex() == vector["canonical_hex"]
    digest = sha256(b"mcb/tree-head/v1\x00" + canonical)
    assert digest.hex() == vector["digest"] == signed.checkpoint.compute_digest().hex()
    key = vector["custodian_key"]
    assert signed.key_id == key["key_id"]
    verify_p256_digest(
        public_key=bytes.fromhex(key["public_key"]), digest=digest, signature=signed.signature
    )
    now = parse_timestamp(document["now"])
    assert reason(lambda: verify_checkpoint(signed, registry=registry, now=now)) == OK
    assert vector["expected"] == OK
    tampered = _signed_checkpoint(vector["tampered"]["signed"])
    got = reason(lambda: verify_checkpoint(tampered, registry=registry, now=now))
    assert got == vector["tampered"]["expected"]
    # The checkpoint's head is the head of the log at that size.
    head = document["heads"][vector["checkpoint"]["size"]]
    assert head["root"] == vector["checkpoint"]["root"]


def test_checkpoints_dated_around_the_clock_skew() -> None:
    document = load("translog.json")
    registry = registry_of(document)
    now = parse_timestamp(document["now"])
    skew = timedelta(milliseconds=document["max_clock_skew_ms"])
    assert skew == VerificationPolicy().max_clock_skew
    for case in document["checkpoint"]["dated"]:
        signed = _signed_checkpoint(case["signed"])
        ahead = signed.checkpoint.issued_at - now
        assert (ahead > skew) == (case["expected"] == "future_dated"), case["name"]
        got = reason(functools.partial(verify_checkpoint, signed, registry=registry, now=now))
        assert got == case["expected"], case["name"]


def test_split_views() -> None:
    document = load("translog.json")
    registry = registry_of(document)
    now = parse_timestamp(document["now"])
    for case in document["split_views"]:
        proof = None if case["proof"] is None else LogConsistencyProof.from_wire(case["proof"])
        first, second = _signed_checkpoint(case["first"]), _signed_checkpoint(case["second"])
        got = reason(
            functools.partial(
                verify_same_history, first, second, registry=registry, proof=proof, now=now
            )
        )
        assert got == case["expected"], case["name"]


def test_a_rollback_is_a_split_view_even_with_a_valid_consistency_proof() -> None:
    # The rolled-back pair carries a consistency proof that verifies on its own: only the
    # issue times betray that the log shrank.
    document = load("translog.json")
    rollbacks = [case for case in document["split_views"] if case["name"].startswith("rollback")]
    assert len(rollbacks) == 2
    for case in rollbacks:
        first, second = _signed_checkpoint(case["first"]), _signed_checkpoint(case["second"])
        smaller, larger = sorted((first, second), key=lambda c: c.checkpoint.head.size)
        assert smaller.checkpoint.issued_at > larger.checkpoint.issued_at
        proof = LogConsistencyProof.from_wire(case["proof"])
        verify_log_consistency(old=smaller.checkpoint.head, new=larger.checkpoint.head, proof=proof)
        assert case["expected"] == "split_view"


# --- client_proof.json --------------------------------------------------------------------------


def _client_check(document: JsonObject, bundle: JsonObject) -> int:
    """What a client does: read its bundle, authenticate the statement for the bundle's stream
    at its own clock, then check its own proof."""
    client_proof = ClientProof.from_wire(parse_json_object(wire_bytes(bundle)))
    authenticated = authenticate_statement(
        wire_bytes(document["signed_statement"]),
        custodian=client_proof.custodian,
        exchange=client_proof.exchange,
        registry=registry_of(document),
        now=parse_timestamp(document["now"]),
    )
    return verify_client_proof(client_proof, statement=authenticated.statement)


def test_client_proofs() -> None:
    document = load("client_proof.json")
    signed = SignedStatement.from_wire(document["signed_statement"])
    assert signed.digest.hex() == document["statement_digest"]
    # The same statement as statement.json, whose disclosed leaves give the expected proofs.
    statement_vector = load("statement.json")
    assert document["signed_statement"]["statement"] == statement_vector["statement"]
    leaves = _disclosure(statement_vector["disclosure"]).set_leaves
    depths = {root.asset: root.depth for root in signed.statement.assets}
    trees = build_trees(leaves, depths=depths)
    for item in document["valid"]:
        bundle = item["client_proof"]
        assert ClientProof.from_wire(bundle).to_wire() == bundle
        proof = bundle["proof"]
        assert trees[proof["asset"]].prove(proof["position"]).to_wire() == proof
        assert item["expected"] == OK
        assert _client_check(document, bundle) == int(item["expected_quantity"])


def test_tampered_client_proofs() -> None:
    document = load("client_proof.json")
    for case in document["tampered"]:
        got = reason(functools.partial(_client_check, document, case["client_proof"]))
        assert got == case["expected"], case["name"]


def test_asset_roots_in_client_statement_are_well_formed() -> None:
    statement = load("client_proof.json")["signed_statement"]["statement"]
    for item in statement["assets"]:
        root = AssetRoot.from_wire(item)
        assert root.to_wire() == item


# --- the generator ------------------------------------------------------------------------------


@functools.cache
def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses resolve their module through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_every_file() -> None:
    """``scripts/make_vectors.py --check`` in process: the files on disk are exactly what the
    generator makes from the current implementation (stored P-256 signatures reused)."""
    assert _generator().find_drift(VECTORS) == []


def test_generator_check_flag_reports_drift(tmp_path: Path) -> None:
    generator = _generator()
    for name in generator.FILES:
        (tmp_path / name).write_text((VECTORS / name).read_text(encoding="utf-8"))
    assert generator.find_drift(tmp_path) == []
    document = json.loads((tmp_path / "merkle.json").read_text(encoding="utf-8"))
    document["trees"][0]["total"] = "1"
    (tmp_path / "merkle.json").write_text(json.dumps(document, indent=2) + "\n")
    (tmp_path / "translog.json").unlink()
    assert generator.find_drift(tmp_path) == ["merkle.json", "translog.json"]
