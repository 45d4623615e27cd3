"""The transparency log: RFC 6962 hashing, RFC 9162 proofs, pymerkle adapter, split views."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymerkle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestations.errors import (
    ConfigurationError,
    DecodeError,
    InvalidProof,
    InvariantViolation,
    SplitView,
)
from attestations.translog import (
    EMPTY_ROOT,
    MAX_PATH_LENGTH,
    MAX_TREE_SIZE,
    LogConsistencyProof,
    LogInclusionProof,
    TransparencyLog,
    TreeHead,
    compute_consistency_path,
    compute_inclusion_path,
    compute_leaf_hash,
    compute_root,
    detect_split_view,
    verify_log_consistency,
    verify_log_inclusion,
)

N = 200
DIGESTS = [hashlib.sha256(b"statement %d" % i).digest() for i in range(N)]
LEAVES = [compute_leaf_hash(d) for d in DIGESTS]


@pytest.fixture(scope="module")
def log() -> Iterator[TransparencyLog]:
    with TransparencyLog(":memory:") as opened:
        for digest in DIGESTS:
            opened.append(digest)
        yield opened


@pytest.fixture(scope="module")
def raw_tree() -> Any:
    """A plain pymerkle tree over the same entries, used without our adapter."""
    tree = pymerkle.InmemoryTree()
    for digest in DIGESTS:
        tree.append_entry(digest)
    return tree


def flip(data: bytes, bit: int) -> bytes:
    """``data`` with one bit inverted."""
    position = bit % (8 * len(data))
    changed = bytearray(data)
    changed[position // 8] ^= 1 << (position % 8)
    return bytes(changed)


sizes = st.integers(min_value=1, max_value=N)


# --- RFC 6962 known answers (certificate-transparency reference test data) ----------------------

CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_LEAF_HASHES = [compute_leaf_hash(leaf) for leaf in CT_LEAVES]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): CT_INCLUSION[(0, 8)],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def test_empty_tree_root_is_sha256_of_empty_string() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert compute_root([]) == EMPTY_ROOT
    assert TreeHead(size=0, root=EMPTY_ROOT).root == EMPTY_ROOT
    with pytest.raises(DecodeError):
        TreeHead(size=0, root=bytes(32))


@pytest.mark.parametrize("size", range(1, 9))
def test_rfc6962_reference_roots(size: int) -> None:
    assert compute_root(CT_LEAF_HASHES[:size]).hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size"), sorted(CT_INCLUSION))
def test_rfc6962_reference_inclusion_paths(index: int, size: int) -> None:
    path = compute_inclusion_path(CT_LEAF_HASHES[:size], index)
    assert [element.hex() for element in path] == CT_INCLUSION[(index, size)]


@pytest.mark.parametrize(("old_size", "new_size"), sorted(CT_CONSISTENCY))
def test_rfc6962_reference_consistency_proofs(old_size: int, new_size: int) -> None:
    path = compute_consistency_path(CT_LEAF_HASHES[:new_size], old_size)
    assert [element.hex() for element in path] == CT_CONSISTENCY[(old_size, new_size)]
    verify_log_consistency(
        old=TreeHead(size=old_size, root=bytes.fromhex(CT_ROOTS[old_size - 1])),
        new=TreeHead(size=new_size, root=bytes.fromhex(CT_ROOTS[new_size - 1])),
        proof=LogConsistencyProof(old_size=old_size, new_size=new_size, path=path),
    )


# --- pymerkle agrees with RFC 6962 ----------------------------------------------------------------


def test_pure_root_equals_pymerkle_root_at_every_size(log: TransparencyLog, raw_tree: Any) -> None:
    for size in range(N + 1):
        expected = compute_root(LEAVES[:size])
        assert raw_tree.get_root(size) == expected
        assert log.head(size) == TreeHead(size=size, root=expected)


@settings(max_examples=40)
@given(st.lists(st.binary(min_size=32, max_size=32), unique=True, max_size=70))
def test_pure_root_equals_pymerkle_root_for_random_entries(entries: list[bytes]) -> None:
    with TransparencyLog(":memory:") as fresh:
        for entry in entries:
            fresh.append(entry)
        assert fresh.head().root == compute_root([compute_leaf_hash(e) for e in entries])


@given(st.data())
def test_raw_pymerkle_inclusion_paths_verify_in_the_pure_verifier(
    raw_tree: Any, data: st.DataObject
) -> None:
    size = data.draw(sizes)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    native = raw_tree.prove_inclusion(index + 1, size)  # pymerkle counts leaves from one
    assert native.path[0] == LEAVES[index]  # its path starts with the leaf hash itself
    proof = LogInclusionProof(index=index, size=size, path=tuple(native.path[1:]))
    head = TreeHead(size=size, root=raw_tree.get_root(size))
    verify_log_inclusion(entry=DIGESTS[index], proof=proof, head=head)


def test_pymerkle_native_consistency_proof_is_not_rfc9162(raw_tree: Any) -> None:
    """Why the adapter derives consistency proofs itself: pymerkle's layout differs."""
    native = raw_tree.prove_consistency(6, 8)
    rfc = compute_consistency_path(LEAVES[:8], 6)
    assert list(native.path) != list(rfc)
    assert len(native.path) == 4
    assert len(rfc) == 3
    # A tree is a prefix of itself with an empty RFC proof; pymerkle sends the root.
    assert list(raw_tree.prove_consistency(8, 8).path) == [raw_tree.get_root(8)]


# --- proofs from the log verify, and match the RFC's definitions ---------------------------------


@given(st.data())
def test_inclusion_proofs_verify(log: TransparencyLog, data: st.DataObject) -> None:
    size = data.draw(sizes)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = log.prove_inclusion(index, size)
    assert proof.path == compute_inclusion_path(LEAVES[:size], index)
    verify_log_inclusion(entry=DIGESTS[index], proof=proof, head=log.head(size))


@given(st.data())
def test_consistency_proofs_verify_between_any_two_sizes(
    log: TransparencyLog, data: st.DataObject
) -> None:
    new_size = data.draw(st.integers(min_value=0, max_value=N))
    old_size = data.draw(st.integers(min_value=0, max_value=new_size))
    proof = log.prove_consistency(old_size, new_size)
    assert proof.path == compute_consistency_path(LEAVES[:new_size], old_size)
    verify_log_consistency(old=log.head(old_size), new=log.head(new_size), proof=proof)


def test_every_small_consistency_proof_matches_the_rfc(log: TransparencyLog) -> None:
    for new_size in range(40):
        for old_size in range(new_size + 1):
            proof = log.prove_consistency(old_size, new_size)
            assert proof.path == compute_consistency_path(LEAVES[:new_size], old_size)


def test_defaults_are_the_current_head(log: TransparencyLog) -> None:
    assert log.size == N
    assert log.head() == log.head(N)
    assert log.prove_inclusion(3) == log.prove_inclusion(3, N)
    assert log.prove_consistency(17) == log.prove_consistency(17, N)
    assert log.index_of(DIGESTS[42]) == 42
    assert log.index_of(bytes(32)) is None


# --- tampering fails ---------------------------------------------------------------------------

INCLUSION_TAMPERING = ["path", "index", "proof_size", "head_size", "root", "entry", "cut", "extend"]


@given(st.data(), st.sampled_from(INCLUSION_TAMPERING), st.integers(min_value=0))
def test_tampered_inclusion_fails(
    log: TransparencyLog, data: st.DataObject, what: str, bit: int
) -> None:
    size = data.draw(st.integers(min_value=2, max_value=N))
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = log.prove_inclusion(index, size)
    head = log.head(size)
    entry = DIGESTS[index]
    other = st.integers(min_value=1, max_value=N + 5)
    if what == "path":
        j = data.draw(st.integers(min_value=0, max_value=len(proof.path) - 1))
        path = (*proof.path[:j], flip(proof.path[j], bit), *proof.path[j + 1 :])
        proof = LogInclusionProof(index=index, size=size, path=path)
    elif what == "index":
        new_index = data.draw(st.integers(0, size - 1).filter(lambda i: i != index))
        proof = LogInclusionProof(index=new_index, size=size, path=proof.path)
    elif what == "proof_size":
        new_size = data.draw(other.filter(lambda s: s not in (size,) and s > index))
        proof = LogInclusionProof(index=index, size=new_size, path=proof.path)
    elif what == "head_size":
        head = TreeHead(size=data.draw(other.filter(lambda s: s != size)), root=head.root)
    elif what == "root":
        head = TreeHead(size=size, root=flip(head.root, bit))
    elif what == "entry":
        entry = flip(entry, bit)
    elif what == "cut":
        proof = LogInclusionProof(index=index, size=size, path=proof.path[:-1])
    else:
        extra = data.draw(st.binary(min_size=32, max_size=32))
        proof = LogInclusionProof(index=index, size=size, path=(*proof.path, extra))
    with pytest.raises(InvalidProof):
        verify_log_inclusion(entry=entry, proof=proof, head=head)


CONSISTENCY_TAMPERING = ["path", "old_root", "new_root", "old_size", "new_size", "cut", "extend"]


@given(st.data(), st.sampled_from(CONSISTENCY_TAMPERING), st.integers(min_value=0))
def test_tampered_consistency_fails(
    log: TransparencyLog, data: st.DataObject, what: str, bit: int
) -> None:
    new_size = data.draw(st.integers(min_value=2, max_value=N))
    old_size = data.draw(st.integers(min_value=1, max_value=new_size - 1))
    proof = log.prove_consistency(old_size, new_size)
    old, new = log.head(old_size), log.head(new_size)
    path = proof.path
    if what == "path":
        j = data.draw(st.integers(min_value=0, max_value=len(path) - 1))
        path = (*path[:j], flip(path[j], bit), *path[j + 1 :])
    elif what == "old_root":
        old = TreeHead(size=old_size, root=flip(old.root, bit))
    elif what == "new_root":
        new = TreeHead(size=new_size, root=flip(new.root, bit))
    elif what == "old_size":
        wrong = data.draw(st.integers(1, new_size).filter(lambda s: s != old_size))
        proof = LogConsistencyProof(old_size=wrong, new_size=new_size, path=path)
    elif what == "new_size":
        wrong = data.draw(st.integers(old_size, N + 5).filter(lambda s: s != new_size))
        proof = LogConsistencyProof(old_size=old_size, new_size=wrong, path=path)
    elif what == "cut":
        path = path[:-1]
    else:
        path = (*path, data.draw(st.binary(min_size=32, max_size=32)))
    if what in ("path", "cut", "extend"):
        proof = LogConsistencyProof(old_size=old_size, new_size=new_size, path=path)
    with pytest.raises(InvalidProof):
        verify_log_consistency(old=old, new=new, proof=proof)


@given(st.data())
def test_paths_of_the_wrong_length_fail_for_the_rfc_reason(
    log: TransparencyLog, data: st.DataObject
) -> None:
    """RFC 9162 checks the path length against the tree shape, not only the resulting root."""
    size = data.draw(st.integers(min_value=2, max_value=N))
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    old_size = data.draw(st.integers(min_value=1, max_value=size - 1))
    head, old = log.head(size), log.head(old_size)
    inclusion = log.prove_inclusion(index, size)
    consistency = log.prove_consistency(old_size, size)
    extra = data.draw(st.binary(min_size=32, max_size=32))
    for path, reason in ((inclusion.path[:-1], "shorter"), ((*inclusion.path, extra), "longer")):
        with pytest.raises(InvalidProof, match=reason):
            verify_log_inclusion(
                entry=DIGESTS[index], proof=LogInclusionProof(index, size, path), head=head
            )
    for path, reason in (
        (consistency.path[:-1], "shorter"),
        ((*consistency.path, extra), "longer"),
    ):
        if path:
            with pytest.raises(InvalidProof, match=reason):
                verify_log_consistency(
                    old=old, new=head, proof=LogConsistencyProof(old_size, size, path)
                )


def test_degenerate_consistency_proofs(log: TransparencyLog) -> None:
    empty, five = log.head(0), log.head(5)
    verify_log_consistency(old=empty, new=five, proof=LogConsistencyProof(0, 5, ()))
    verify_log_consistency(old=five, new=five, proof=LogConsistencyProof(5, 5, ()))
    with pytest.raises(InvalidProof):
        verify_log_consistency(old=empty, new=five, proof=LogConsistencyProof(0, 5, (five.root,)))
    with pytest.raises(InvalidProof):
        verify_log_consistency(old=five, new=five, proof=LogConsistencyProof(5, 5, (five.root,)))
    with pytest.raises(InvalidProof):
        verify_log_consistency(old=five, new=log.head(9), proof=LogConsistencyProof(5, 9, ()))
    other_five = TreeHead(size=5, root=log.head(6).root)
    with pytest.raises(InvalidProof):
        verify_log_consistency(old=five, new=other_five, proof=LogConsistencyProof(5, 5, ()))


def test_single_leaf_tree(log: TransparencyLog) -> None:
    proof = log.prove_inclusion(0, 1)
    assert proof.path == ()
    assert log.head(1).root == LEAVES[0]
    verify_log_inclusion(entry=DIGESTS[0], proof=proof, head=log.head(1))


def test_verifiers_reject_wrong_argument_types(log: TransparencyLog) -> None:
    head = log.head(4)
    proof = log.prove_inclusion(1, 4)
    with pytest.raises(DecodeError):
        verify_log_inclusion(entry=DIGESTS[1][:31], proof=proof, head=head)
    with pytest.raises(DecodeError):
        verify_log_inclusion(entry=DIGESTS[1], proof=proof.to_wire(), head=head)  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        verify_log_consistency(old=head, new=head.to_wire(), proof=LogConsistencyProof(4, 4, ()))  # type: ignore[arg-type]


# --- split view ----------------------------------------------------------------------------------


def forked_logs(prefix: int, extra_x: int, extra_y: int) -> tuple[TransparencyLog, TransparencyLog]:
    """Two histories sharing ``prefix`` entries, then diverging (the custodian's split view)."""
    x, y = TransparencyLog(":memory:"), TransparencyLog(":memory:")
    for digest in DIGESTS[:prefix]:
        x.append(digest)
        y.append(digest)
    for i in range(extra_x):
        x.append(hashlib.sha256(b"history X %d" % i).digest())
    for i in range(extra_y):
        y.append(hashlib.sha256(b"history Y %d" % i).digest())
    return x, y


@settings(max_examples=60)
@given(
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=1, max_value=20),
    st.integers(min_value=1, max_value=20),
)
def test_diverged_histories_are_a_split_view(prefix: int, extra_x: int, extra_y: int) -> None:
    x, y = forked_logs(prefix, extra_x, extra_y)
    with x, y:
        seen_by_a, seen_by_b = x.head(), y.head()
        if seen_by_a.size == seen_by_b.size:
            with pytest.raises(SplitView):
                detect_split_view(seen_by_a=seen_by_a, seen_by_b=seen_by_b, proof=None)
            return
        old_size, new_size = sorted((seen_by_a.size, seen_by_b.size))
        # Whichever history the custodian proves from, it cannot connect the two heads.
        for history in (x, y):
            if history.size >= new_size:
                proof = history.prove_consistency(old_size, new_size)
                with pytest.raises(SplitView):
                    detect_split_view(seen_by_a=seen_by_a, seen_by_b=seen_by_b, proof=proof)
                with pytest.raises(SplitView):
                    detect_split_view(seen_by_a=seen_by_b, seen_by_b=seen_by_a, proof=proof)


def test_a_head_from_before_the_fork_is_not_a_split_view() -> None:
    x, y = forked_logs(10, 5, 7)
    with x, y:
        before_fork = x.head(8)
        detect_split_view(seen_by_a=before_fork, seen_by_b=y.head(), proof=y.prove_consistency(8))
        with pytest.raises(SplitView):
            detect_split_view(
                seen_by_a=x.head(11), seen_by_b=y.head(), proof=y.prove_consistency(11)
            )


@given(st.data())
def test_the_honest_log_is_never_a_split_view(log: TransparencyLog, data: st.DataObject) -> None:
    a = data.draw(st.integers(min_value=0, max_value=N))
    b = data.draw(st.integers(min_value=0, max_value=N))
    proof = None if a == b else log.prove_consistency(min(a, b), max(a, b))
    detect_split_view(seen_by_a=log.head(a), seen_by_b=log.head(b), proof=proof)


def test_split_view_check_fails_closed_on_missing_or_unrelated_proofs(log: TransparencyLog) -> None:
    small, large = log.head(10), log.head(20)
    with pytest.raises(DecodeError):
        detect_split_view(seen_by_a=small, seen_by_b=large, proof=None)
    with pytest.raises(DecodeError):
        detect_split_view(seen_by_a=small, seen_by_b=large, proof=log.prove_consistency(10, 21))
    with pytest.raises(DecodeError):
        detect_split_view(seen_by_a=small, seen_by_b=small, proof=log.prove_consistency(9, 10))
    with pytest.raises(DecodeError):
        detect_split_view(
            seen_by_a=small, seen_by_b=small, proof=LogConsistencyProof(10, 10, (small.root,))
        )
    detect_split_view(seen_by_a=small, seen_by_b=small, proof=LogConsistencyProof(10, 10, ()))


# --- the I/O adapter -----------------------------------------------------------------------------


def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "translog.sqlite"
    with TransparencyLog(path) as first:
        for digest in DIGESTS[:50]:
            first.append(digest)
        head = first.head()
    with TransparencyLog(path) as again:
        assert again.head() == head
        assert again.index_of(DIGESTS[49]) == 49
        with pytest.raises(InvariantViolation):
            again.append(DIGESTS[7])
        assert again.append(DIGESTS[50]) == 50
        verify_log_consistency(old=head, new=again.head(), proof=again.prove_consistency(50))
    with TransparencyLog(str(path)) as third:
        assert third.size == 51
        assert third.head(50) == head


def test_append_returns_positions_and_refuses_bad_input() -> None:
    with TransparencyLog(":memory:") as fresh:
        assert fresh.head() == TreeHead(size=0, root=EMPTY_ROOT)
        assert [fresh.append(d) for d in DIGESTS[:3]] == [0, 1, 2]
        with pytest.raises(InvariantViolation):
            fresh.append(DIGESTS[1])
        for bad in (b"", DIGESTS[0][:31], DIGESTS[0] + b"\x00", bytearray(DIGESTS[5]), "ab" * 16):
            with pytest.raises(DecodeError):
                fresh.append(bad)  # type: ignore[arg-type]
        assert fresh.size == 3


def test_bad_requests_are_decode_errors() -> None:
    with TransparencyLog(":memory:") as fresh:
        with pytest.raises(DecodeError):
            fresh.prove_inclusion(0)
        for digest in DIGESTS[:5]:
            fresh.append(digest)
        bad_calls: list[Callable[[], object]] = [
            lambda: fresh.head(6),
            lambda: fresh.head(-1),
            lambda: fresh.head(True),
            lambda: fresh.prove_inclusion(5),
            lambda: fresh.prove_inclusion(2, 2),
            lambda: fresh.prove_inclusion(-1),
            lambda: fresh.prove_inclusion(1.0),  # type: ignore[arg-type]
            lambda: fresh.prove_consistency(4, 3),
            lambda: fresh.prove_consistency(1, 6),
            lambda: fresh.prove_consistency(False),
        ]
        for call in bad_calls:
            with pytest.raises(DecodeError):
                call()


def test_use_after_close_is_refused() -> None:
    fresh = TransparencyLog(":memory:")
    fresh.append(DIGESTS[0])
    fresh.close()
    fresh.close()
    with pytest.raises(InvariantViolation):
        fresh.append(DIGESTS[1])
    with pytest.raises(InvariantViolation):
        fresh.head()


def _insert_raw(path: Path, entry: bytes, leaf_hash: bytes) -> None:
    con = sqlite3.connect(path)
    with con:
        con.execute("INSERT INTO leaf(entry, hash) VALUES (?, ?)", (entry, leaf_hash))
    con.close()


@pytest.mark.parametrize(
    ("entry", "leaf_hash"),
    [
        pytest.param(DIGESTS[1], compute_leaf_hash(DIGESTS[2]), id="hash-mismatch"),
        pytest.param(DIGESTS[0], compute_leaf_hash(DIGESTS[0]), id="duplicate"),
        pytest.param(b"short", compute_leaf_hash(b"short"), id="not-a-digest"),
    ],
)
def test_a_tampered_file_is_refused_on_open(tmp_path: Path, entry: bytes, leaf_hash: bytes) -> None:
    path = tmp_path / "translog.sqlite"
    with TransparencyLog(path) as first:
        first.append(DIGESTS[0])
    _insert_raw(path, entry, leaf_hash)
    with pytest.raises(InvariantViolation):
        TransparencyLog(path)


def test_a_file_that_is_not_a_database_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "translog.sqlite"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ConfigurationError):
        TransparencyLog(path)


def test_the_verifier_does_not_import_pymerkle() -> None:
    code = "import sys, attestations.translog; sys.exit('pymerkle' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- wire format ---------------------------------------------------------------------------------


@given(st.data())
def test_wire_round_trip(log: TransparencyLog, data: st.DataObject) -> None:
    size = data.draw(sizes)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    old_size = data.draw(st.integers(min_value=0, max_value=size))
    head = log.head(size)
    inclusion = log.prove_inclusion(index, size)
    consistency = log.prove_consistency(old_size, size)
    for value in (head, inclusion, consistency):
        wire = json.loads(json.dumps(value.to_wire()))
        assert type(value).from_wire(wire) == value


def test_wire_shape() -> None:
    h = "ab" * 32
    assert TreeHead(size=3, root=bytes.fromhex(h)).to_wire() == {"size": 3, "root": h}
    proof = LogInclusionProof(index=1, size=3, path=(bytes.fromhex(h),))
    assert proof.to_wire() == {"index": 1, "size": 3, "path": [h]}
    consistency = LogConsistencyProof(old_size=1, new_size=3, path=(bytes.fromhex(h),))
    assert consistency.to_wire() == {"old_size": 1, "new_size": 3, "path": [h]}


HEX = "0f" * 32
GOOD_HEAD = {"size": 3, "root": HEX}
GOOD_INCLUSION = {"index": 1, "size": 3, "path": [HEX, HEX]}
GOOD_CONSISTENCY = {"old_size": 1, "new_size": 3, "path": [HEX, HEX]}


def _variants(good: dict[str, Any], int_keys: tuple[str, ...]) -> list[Any]:
    bad: list[Any] = [None, [], "x", 3, [good], json.dumps(good)]
    bad.extend({k: v for k, v in good.items() if k != key} for key in good)
    bad.append({**good, "extra": 1})
    bad.append({**good, "Size": 3})
    odd_ints = (True, False, 1.0, 3.0, "1", -1, MAX_TREE_SIZE + 1, None, 2**64, 10**5000)
    bad.extend({**good, key: value} for key in int_keys for value in odd_ints)
    return bad


def _bad_hashes() -> list[Any]:
    return [
        HEX.upper(),
        HEX[:-2],
        HEX + "00",
        "g" + HEX[1:],
        "  " + HEX[2:],
        HEX[:-1] + "\n",
        " " + HEX[1:],
        "0x" + HEX[2:],
        bytes(32),
        32,
        None,
        "",
    ]


BAD_HEADS = [
    *_variants(GOOD_HEAD, ("size",)),
    *({**GOOD_HEAD, "root": bad} for bad in _bad_hashes()),
    {"size": 0, "root": HEX},
]
BAD_INCLUSIONS = [
    *_variants(GOOD_INCLUSION, ("index", "size")),
    *({**GOOD_INCLUSION, "path": [HEX, bad]} for bad in _bad_hashes()),
    {**GOOD_INCLUSION, "index": 3},
    {**GOOD_INCLUSION, "index": 4},
    {**GOOD_INCLUSION, "size": 0, "index": 0},
    {**GOOD_INCLUSION, "path": HEX},
    {**GOOD_INCLUSION, "path": None},
    {**GOOD_INCLUSION, "path": {"0": HEX}},
    {**GOOD_INCLUSION, "path": [HEX] * (MAX_PATH_LENGTH + 1)},
    {**GOOD_INCLUSION, "path": [HEX] * 100_000},
]
BAD_CONSISTENCIES = [
    *_variants(GOOD_CONSISTENCY, ("old_size", "new_size")),
    *({**GOOD_CONSISTENCY, "path": [bad]} for bad in _bad_hashes()),
    {**GOOD_CONSISTENCY, "old_size": 4},
    {**GOOD_CONSISTENCY, "path": [HEX] * (MAX_PATH_LENGTH + 1)},
    {**GOOD_CONSISTENCY, "path": HEX},
]


@pytest.mark.parametrize(
    ("kind", "obj"),
    [
        *((TreeHead, obj) for obj in BAD_HEADS),
        *((LogInclusionProof, obj) for obj in BAD_INCLUSIONS),
        *((LogConsistencyProof, obj) for obj in BAD_CONSISTENCIES),
    ],
)
def test_strict_wire_decoding(kind: Any, obj: Any) -> None:
    with pytest.raises(DecodeError):
        kind.from_wire(obj)


def test_good_wire_objects_decode() -> None:
    assert TreeHead.from_wire(GOOD_HEAD).size == 3
    assert LogInclusionProof.from_wire(GOOD_INCLUSION).path == (bytes.fromhex(HEX),) * 2
    assert LogConsistencyProof.from_wire(GOOD_CONSISTENCY).new_size == 3
    longest = {**GOOD_INCLUSION, "path": [HEX] * MAX_PATH_LENGTH}
    assert len(LogInclusionProof.from_wire(longest).path) == MAX_PATH_LENGTH


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
wire_keys = st.sampled_from(["size", "root", "index", "path", "old_size", "new_size", "x"])


@given(st.dictionaries(wire_keys, json_values, max_size=4) | json_values)
def test_wire_decoding_only_ever_raises_decode_error(obj: Any) -> None:
    for kind in (TreeHead, LogInclusionProof, LogConsistencyProof):
        try:
            decoded = kind.from_wire(obj)
        except DecodeError:
            continue
        assert kind.from_wire(decoded.to_wire()) == decoded


def test_constructors_validate() -> None:
    digest = bytes(32)
    bad_calls: list[Callable[[], object]] = [
        lambda: TreeHead(size=-1, root=digest),
        lambda: TreeHead(size=True, root=digest),
        lambda: TreeHead(size=1, root=digest[:31]),
        lambda: TreeHead(size=1, root=bytearray(digest)),  # type: ignore[arg-type]
        lambda: LogInclusionProof(index=1, size=1, path=()),
        lambda: LogInclusionProof(index=0, size=2, path=[digest]),  # type: ignore[arg-type]
        lambda: LogInclusionProof(index=0, size=2, path=(digest[:1],)),
        lambda: LogInclusionProof(index=0, size=2, path=(digest,) * 65),
        lambda: LogConsistencyProof(old_size=3, new_size=2, path=()),
        lambda: LogConsistencyProof(old_size=1.0, new_size=2, path=()),  # type: ignore[arg-type]
    ]
    for call in bad_calls:
        with pytest.raises(DecodeError):
            call()
