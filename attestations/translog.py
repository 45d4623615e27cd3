"""The custodian's append-only transparency log of statement digests (RFC 6962 / RFC 9162).

Every signed statement's 32-byte digest is appended to one log per custodian. Exchanges and
regulators keep the last tree head they saw and ask for a consistency proof to every newer head;
two parties that compare heads out of band detect a custodian that showed them different
histories (a *split view*).

The module has two parts, kept apart on purpose:

1. **Pure verifier** (no I/O, no pymerkle): RFC 6962 tree hashing over SHA-256, the
   :class:`TreeHead` / :class:`LogInclusionProof` / :class:`LogConsistencyProof` values with their
   strict JSON wire codecs, the RFC 9162 section 2.1.3.2 and 2.1.4.2 verification algorithms, and
   :func:`detect_split_view`. The ``compute_*`` functions are the RFC's recursive definitions, kept
   as a reference for tests and vectors; they are linear in the tree size.
2. **I/O adapter** :class:`TransparencyLog`: a SQLite file managed by ``pymerkle.SqliteTree``.
   pymerkle's leaf/node hashing and tree shape are exactly RFC 6962 (with its default security
   prefixes), and its inclusion paths are RFC audit paths prefixed by the leaf hash. Its
   consistency proofs are *not* RFC 9162 shaped (they split at a different point and carry
   subtree hashes the verifier already knows), so the adapter derives the RFC consistency proof
   from one pymerkle inclusion path instead; see :meth:`TransparencyLog.prove_consistency`.
   pymerkle is imported only when a log is opened, so the verifier runs without it.

What this module does not do: it does not sign tree heads (a head proves nothing about who
published it until it is signed or carried inside a signed statement), does not gossip heads
between parties, and does not decide what to do about a split view beyond raising
:class:`~attestations.errors.SplitView` with both heads in the message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self

from attestations.canonical import parse_hex
from attestations.errors import (
    ConfigurationError,
    DecodeError,
    InvalidProof,
    InvariantViolation,
    SplitView,
    TransientError,
)

__all__ = [
    "EMPTY_ROOT",
    "ENTRY_SIZE",
    "HASH_SIZE",
    "LEAF_PREFIX",
    "MAX_PATH_LENGTH",
    "MAX_TREE_SIZE",
    "NODE_PREFIX",
    "LogConsistencyProof",
    "LogInclusionProof",
    "TransparencyLog",
    "TreeHead",
    "compute_consistency_path",
    "compute_inclusion_path",
    "compute_leaf_hash",
    "compute_node_hash",
    "compute_root",
    "detect_split_view",
    "verify_log_consistency",
    "verify_log_inclusion",
]

# =================================================================================================
# Part 1 - pure verifier. Nothing below this line and above part 2 does I/O or imports pymerkle.
# =================================================================================================

HASH_SIZE: Final = 32
"""SHA-256 output size: every tree node, root and path element is this long."""
ENTRY_SIZE: Final = 32
"""Every log entry is one 32-byte statement digest."""
LEAF_PREFIX: Final = b"\x00"
NODE_PREFIX: Final = b"\x01"
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""RFC 6962 section 2.1: the hash of the empty tree is the hash of the empty string."""
MAX_TREE_SIZE: Final = 2**53 - 1
"""Sizes and indices travel as JSON integers; above 2**53 - 1 they stop being exact in I-JSON."""
MAX_PATH_LENGTH: Final = 64
"""Longest path accepted from the wire. A tree of at most 2**53 - 1 leaves needs at most 54."""

_HEAD_KEYS: Final = frozenset({"size", "root"})
_INCLUSION_KEYS: Final = frozenset({"index", "size", "path"})
_CONSISTENCY_KEYS: Final = frozenset({"old_size", "new_size", "path"})


def compute_leaf_hash(entry: bytes) -> bytes:
    """``SHA-256(0x00 || entry)``: RFC 6962 leaf hash.

    Defined for any byte string, as in the RFC; this log only ever holds 32-byte entries, which
    :class:`TransparencyLog` and :func:`verify_log_inclusion` enforce.
    """
    if not isinstance(entry, bytes):
        raise DecodeError(f"log entry must be bytes, not {type(entry).__name__}")
    return hashlib.sha256(LEAF_PREFIX + entry).digest()


def compute_node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: RFC 6962 interior node hash."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below ``n`` (``n >= 2``): the size of the left subtree."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaf_hashes(leaf_hashes: Sequence[bytes]) -> None:
    for leaf in leaf_hashes:
        if not isinstance(leaf, bytes) or len(leaf) != HASH_SIZE:
            raise DecodeError(f"leaf hash must be {HASH_SIZE} bytes")


def _mth(leaf_hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """MTH(D[start:end]) from leaf hashes (RFC 6962 section 2.1), for a non-empty range."""
    n = end - start
    if n == 1:
        return leaf_hashes[start]
    k = _split(n)
    return compute_node_hash(_mth(leaf_hashes, start, start + k), _mth(leaf_hashes, start + k, end))


def compute_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash of a whole tree, given its leaf hashes in order (RFC 6962 MTH)."""
    _check_leaf_hashes(leaf_hashes)
    if not leaf_hashes:
        return EMPTY_ROOT
    return _mth(leaf_hashes, 0, len(leaf_hashes))


def compute_inclusion_path(leaf_hashes: Sequence[bytes], index: int) -> tuple[bytes, ...]:
    """RFC 6962 PATH(index, D[n]): the audit path of leaf ``index``, leaf level first."""
    _check_leaf_hashes(leaf_hashes)
    if type(index) is not int or not 0 <= index < len(leaf_hashes):
        raise DecodeError(f"leaf index outside a tree of size {len(leaf_hashes)}")
    path: list[bytes] = []
    start, end = 0, len(leaf_hashes)
    # Walk from the root down to the leaf, collecting the sibling at each level; the RFC lists
    # them leaf level first, so the list is reversed at the end.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(_mth(leaf_hashes, start + k, end))
            end = start + k
        else:
            path.append(_mth(leaf_hashes, start, start + k))
            start += k
    return tuple(reversed(path))


def compute_consistency_path(leaf_hashes: Sequence[bytes], old_size: int) -> tuple[bytes, ...]:
    """RFC 6962 PROOF(old_size, D[n]) with ``n = len(leaf_hashes)``.

    For ``old_size == 0`` and ``old_size == n`` the proof is empty: the empty tree is a prefix of
    every tree, and a tree is a prefix of itself.
    """
    _check_leaf_hashes(leaf_hashes)
    n = len(leaf_hashes)
    if type(old_size) is not int or not 0 <= old_size <= n:
        raise DecodeError(f"old size outside 0..{n}")
    if old_size in (0, n):
        return ()
    return tuple(_subproof(leaf_hashes, old_size, 0, n, complete=True))


def _subproof(
    leaf_hashes: Sequence[bytes], m: int, start: int, end: int, *, complete: bool
) -> list[bytes]:
    """RFC 6962 SUBPROOF(m, D[start:end], b); ``complete`` is the RFC's ``b``."""
    n = end - start
    if m == n:
        # The old tree's subtree at this point is known to the verifier only if it is the whole
        # old tree (b = true); otherwise the verifier needs its hash.
        return [] if complete else [_mth(leaf_hashes, start, end)]
    k = _split(n)
    if m <= k:
        return [
            *_subproof(leaf_hashes, m, start, start + k, complete=complete),
            _mth(leaf_hashes, start + k, end),
        ]
    return [
        *_subproof(leaf_hashes, m - k, start + k, end, complete=False),
        _mth(leaf_hashes, start, start + k),
    ]


# --- values and their wire form -----------------------------------------------------------------


def _show(value: int) -> str:
    # str() of an int above 4300 digits raises ValueError; never let an error message do that.
    return str(value) if value.bit_length() <= 64 else f"<{value.bit_length()}-bit integer>"


def _check_size(value: object, what: str) -> int:
    # ``type(...) is int`` on purpose: bool is an int subclass and must not pass as a size.
    if type(value) is not int:
        raise DecodeError(f"{what} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= MAX_TREE_SIZE:
        raise DecodeError(f"{what} {_show(value)} outside 0..{MAX_TREE_SIZE}")
    return value


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise DecodeError(f"{what} must be {HASH_SIZE} bytes")
    return value


def _check_path(value: object) -> tuple[bytes, ...]:
    if not isinstance(value, tuple):
        raise DecodeError(f"path must be a tuple of hashes, not {type(value).__name__}")
    if len(value) > MAX_PATH_LENGTH:
        raise DecodeError(f"path of {len(value)} hashes exceeds {MAX_PATH_LENGTH}")
    for element in value:
        _check_hash(element, "path element")
    return value


def _wire_object(obj: object, keys: frozenset[str], what: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise DecodeError(f"{what} must be a JSON object, not {type(obj).__name__}")
    present = set(obj)
    if present != keys:
        missing = sorted(keys - present)
        unknown = sorted(repr(key) for key in present - keys)
        raise DecodeError(f"{what}: missing keys {missing}, unknown keys {unknown}")
    return obj


def _parse_hash_hex(value: object, what: str) -> bytes:
    return parse_hex(value, length=HASH_SIZE, what=what)


def _parse_path(value: object) -> tuple[bytes, ...]:
    if not isinstance(value, list):
        raise DecodeError(f"path must be a JSON array, not {type(value).__name__}")
    if len(value) > MAX_PATH_LENGTH:
        raise DecodeError(f"path of {len(value)} hashes exceeds {MAX_PATH_LENGTH}")
    return tuple(_parse_hash_hex(element, "path element") for element in value)


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A log state: its size (number of entries) and RFC 6962 root hash."""

    size: int
    root: bytes

    def __post_init__(self) -> None:
        _check_size(self.size, "tree size")
        _check_hash(self.root, "tree root")
        if self.size == 0 and not hmac.compare_digest(self.root, EMPTY_ROOT):
            raise DecodeError("the empty tree's root must be SHA-256 of the empty string")

    def to_wire(self) -> dict[str, object]:
        return {"size": self.size, "root": self.root.hex()}

    @classmethod
    def from_wire(cls, obj: object) -> TreeHead:
        data = _wire_object(obj, _HEAD_KEYS, "tree head")
        return cls(
            size=_check_size(data["size"], "tree size"),
            root=_parse_hash_hex(data["root"], "tree root"),
        )


@dataclass(frozen=True, slots=True)
class LogInclusionProof:
    """RFC 9162 inclusion proof: leaf ``index`` (0-based) is in the tree of ``size`` entries.

    ``path`` is the audit path, the sibling nearest the leaf first.
    """

    index: int
    size: int
    path: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_size(self.index, "leaf index")
        _check_size(self.size, "tree size")
        if self.index >= self.size:
            raise DecodeError(f"leaf index {self.index} not below tree size {self.size}")
        _check_path(self.path)

    def to_wire(self) -> dict[str, object]:
        return {
            "index": self.index,
            "size": self.size,
            "path": [element.hex() for element in self.path],
        }

    @classmethod
    def from_wire(cls, obj: object) -> LogInclusionProof:
        data = _wire_object(obj, _INCLUSION_KEYS, "inclusion proof")
        return cls(
            index=_check_size(data["index"], "leaf index"),
            size=_check_size(data["size"], "tree size"),
            path=_parse_path(data["path"]),
        )


@dataclass(frozen=True, slots=True)
class LogConsistencyProof:
    """RFC 9162 consistency proof: the tree of ``old_size`` entries is a prefix of ``new_size``.

    ``path`` is empty when ``old_size`` is 0 or equals ``new_size``.
    """

    old_size: int
    new_size: int
    path: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_size(self.old_size, "old tree size")
        _check_size(self.new_size, "new tree size")
        if self.old_size > self.new_size:
            raise DecodeError(f"old size {self.old_size} above new size {self.new_size}")
        _check_path(self.path)

    def to_wire(self) -> dict[str, object]:
        return {
            "old_size": self.old_size,
            "new_size": self.new_size,
            "path": [element.hex() for element in self.path],
        }

    @classmethod
    def from_wire(cls, obj: object) -> LogConsistencyProof:
        data = _wire_object(obj, _CONSISTENCY_KEYS, "consistency proof")
        return cls(
            old_size=_check_size(data["old_size"], "old tree size"),
            new_size=_check_size(data["new_size"], "new tree size"),
            path=_parse_path(data["path"]),
        )


# --- verification -------------------------------------------------------------------------------


def _check_entry(entry: object) -> bytes:
    if not isinstance(entry, bytes) or len(entry) != ENTRY_SIZE:
        raise DecodeError(f"log entry must be a {ENTRY_SIZE}-byte statement digest")
    return entry


def _require(value: object, kind: type, what: str) -> None:
    # Fail closed on a wrong object rather than on an AttributeError deep inside the algorithm.
    if not isinstance(value, kind):
        raise DecodeError(f"{what} must be a {kind.__name__}, not {type(value).__name__}")


def verify_log_inclusion(*, entry: bytes, proof: LogInclusionProof, head: TreeHead) -> None:
    """Raise :class:`InvalidProof` unless ``entry`` is leaf ``proof.index`` of the tree ``head``.

    RFC 9162 section 2.1.3.2. ``head`` must come from a trusted (signed) source; the proof's size
    must equal the head's.
    """
    _check_entry(entry)
    _require(proof, LogInclusionProof, "proof")
    _require(head, TreeHead, "head")
    if proof.size != head.size:
        raise InvalidProof(f"inclusion proof for size {proof.size}, head has size {head.size}")
    # Step 1 (index < size) holds by construction of LogInclusionProof.
    fn, sn = proof.index, proof.size - 1
    r = compute_leaf_hash(entry)
    for p in proof.path:
        if sn == 0:
            raise InvalidProof("inclusion path longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = compute_node_hash(p, r)
            # On the right edge of the tree a node without a right sibling is promoted; skip
            # those levels until the node is a right child again.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = compute_node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("inclusion path shorter than the tree is deep")
    if not hmac.compare_digest(r, head.root):
        raise InvalidProof(f"inclusion proof for index {proof.index} does not match the root")


def verify_log_consistency(*, old: TreeHead, new: TreeHead, proof: LogConsistencyProof) -> None:
    """Raise :class:`InvalidProof` unless the tree ``old`` is a prefix of the tree ``new``.

    RFC 9162 section 2.1.4.2 for ``0 < old.size < new.size``; the RFC leaves the two degenerate
    cases open, so here: from the empty tree, and between equal sizes, the proof must be empty
    (and for equal sizes the roots equal).
    """
    _require(old, TreeHead, "old head")
    _require(new, TreeHead, "new head")
    _require(proof, LogConsistencyProof, "proof")
    if proof.old_size != old.size or proof.new_size != new.size:
        raise InvalidProof(
            f"consistency proof for sizes {proof.old_size}->{proof.new_size}, "
            f"heads have sizes {old.size}->{new.size}"
        )
    # old.size <= new.size holds by construction of LogConsistencyProof.
    if old.size in (0, new.size):
        if proof.path:
            raise InvalidProof("consistency proof from the empty tree or to itself must be empty")
        if old.size == new.size and not hmac.compare_digest(old.root, new.root):
            raise InvalidProof(f"two different roots for tree size {old.size}")
        return
    fr, sr = _rebuild_consistency_roots(old=old, new_size=new.size, path=proof.path)
    # RFC 9162 section 2.1.4.2 step 7 (the sn == 0 part is checked while rebuilding).
    if not hmac.compare_digest(fr, old.root):
        raise InvalidProof(f"consistency proof does not rebuild the root of size {old.size}")
    if not hmac.compare_digest(sr, new.root):
        raise InvalidProof(f"consistency proof does not rebuild the root of size {new.size}")


def _rebuild_consistency_roots(
    *, old: TreeHead, new_size: int, path: tuple[bytes, ...]
) -> tuple[bytes, bytes]:
    """RFC 9162 section 2.1.4.2 steps 1-7 for ``0 < old.size < new_size``: return (fr, sr)."""
    # Step 1: an empty path can never prove 0 < old.size < new.size.
    if not path:
        raise InvalidProof("empty consistency proof")
    # Step 2: when the old tree is a perfect subtree, its root is the first node and is omitted.
    if old.size & (old.size - 1) == 0:
        path = (old.root, *path)
    # Steps 3-4: skip the levels where the old tree's last node is a right child.
    fn, sn = old.size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5: fr rebuilds the old root, sr the new root, from the same starting node.
    fr = sr = path[0]
    # Step 6.
    for c in path[1:]:
        if sn == 0:
            raise InvalidProof("consistency path longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = compute_node_hash(c, fr)
            sr = compute_node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = compute_node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # Step 7, first part.
    if sn != 0:
        raise InvalidProof("consistency path shorter than the tree is deep")
    return fr, sr


def _describe(head: TreeHead) -> str:
    return f"(size {head.size}, root {head.root.hex()})"


def detect_split_view(
    *, seen_by_a: TreeHead, seen_by_b: TreeHead, proof: LogConsistencyProof | None
) -> None:
    """Raise :class:`SplitView` if two heads of one log cannot both be prefixes of one history.

    * Same size: the roots must be equal; ``proof`` may be None.
    * Different sizes: ``proof`` must be the consistency proof from the smaller head to the larger
      one (a missing or unrelated proof is a :class:`DecodeError`, never a pass). If it does not
      verify, the log has shown two histories.

    Whether the heads are really the custodian's (signatures) is checked before calling this.
    """
    _require(seen_by_a, TreeHead, "seen_by_a")
    _require(seen_by_b, TreeHead, "seen_by_b")
    if proof is not None:
        _require(proof, LogConsistencyProof, "proof")
    smaller, larger = sorted((seen_by_a, seen_by_b), key=lambda head: head.size)
    if proof is not None and (proof.old_size, proof.new_size) != (smaller.size, larger.size):
        raise DecodeError(
            f"proof for sizes {proof.old_size}->{proof.new_size} does not relate heads of sizes "
            f"{smaller.size} and {larger.size}"
        )
    if smaller.size == larger.size:
        if not hmac.compare_digest(smaller.root, larger.root):
            raise SplitView(
                f"two roots for one tree size: A saw {_describe(seen_by_a)}, "
                f"B saw {_describe(seen_by_b)}"
            )
        if proof is not None and proof.path:
            raise DecodeError("a consistency proof between equal heads must be empty")
        return
    if proof is None:
        raise DecodeError(
            f"heads of sizes {smaller.size} and {larger.size} need a consistency proof"
        )
    try:
        verify_log_consistency(old=smaller, new=larger, proof=proof)
    except InvalidProof as exc:
        raise SplitView(
            f"A saw {_describe(seen_by_a)}, B saw {_describe(seen_by_b)}, and no history "
            f"contains both: {exc}"
        ) from exc


# =================================================================================================
# Part 2 - I/O: the custodian's log file, stored and proved by pymerkle.
# =================================================================================================


def _as_bytes(value: object, what: str) -> bytes:
    """Contain pymerkle's untyped results: anything but a 32-byte hash is a broken invariant."""
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise InvariantViolation(f"pymerkle returned a malformed {what}")
    return value


def _as_path(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list):
        raise InvariantViolation(f"pymerkle returned a malformed {what}")
    return [_as_bytes(element, what) for element in value]


def _check_rfc6962_hashing(tree: Any) -> None:
    # pymerkle hashes exactly like RFC 6962 only with its security prefixes on (the default).
    if (tree.algorithm, tree.leaf_prefix, tree.node_prefix) != ("sha256", LEAF_PREFIX, NODE_PREFIX):
        raise InvariantViolation("pymerkle is not hashing as RFC 6962 (sha256, 0x00/0x01)")


class TransparencyLog:
    """The custodian's append-only log of statement digests in one SQLite file.

    ``path`` is a file path (created if missing) or ``":memory:"``. One process writes a file;
    methods are thread-safe within it. On open every stored entry is re-hashed and indexed, so a
    tampered or duplicated entry stops the process (:class:`InvariantViolation`) instead of being
    served. Proofs are checked against the log's own head before they are returned: the log
    never hands out a proof that does not verify.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Imported here so that the verifier above never needs pymerkle installed.
        import pymerkle  # noqa: PLC0415

        self._lock = threading.RLock()
        self._closed = False
        self._digests: list[bytes] = []
        self._positions: dict[bytes, int] = {}
        location = os.fspath(path)
        try:
            tree = pymerkle.SqliteTree(location, algorithm="sha256")
        except ValueError as exc:
            raise InvariantViolation(f"transparency log {location!r} is damaged: {exc}") from exc
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open transparency log {location!r}: {exc}") from exc
        self._tree: Any = tree
        self._challenge_error: type[Exception] = pymerkle.InvalidChallenge
        try:
            # Write-ahead log, every commit synced: an append costs one fsync of the log instead
            # of the rollback journal's several, and a committed entry survives a power failure.
            tree.con.execute("PRAGMA journal_mode=WAL")
            tree.con.execute("PRAGMA synchronous=FULL")
            _check_rfc6962_hashing(tree)
            self._load_index()
        except BaseException:
            tree.close()
            raise

    def _load_index(self) -> None:
        """Rebuild digest -> position from the file, re-checking every stored leaf."""
        # The table layout (leaf(id, entry, hash), ids 1..n contiguous, append-only by trigger)
        # is pymerkle's documented storage schema. The connection's row factory returns only the
        # first column, so this cursor restores plain tuples.
        try:
            cursor = self._tree.con.cursor()
            cursor.row_factory = None
            rows = cursor.execute("SELECT id, entry, hash FROM leaf ORDER BY id")
            for position, (row_id, entry, leaf_hash) in enumerate(rows):
                if row_id != position + 1:
                    raise InvariantViolation(f"log leaf ids are not contiguous at {row_id}")
                if not isinstance(entry, bytes) or len(entry) != ENTRY_SIZE:
                    raise InvariantViolation(f"log entry {position} is not a 32-byte digest")
                if leaf_hash != compute_leaf_hash(entry):
                    raise InvariantViolation(f"log entry {position} does not match its leaf hash")
                if entry in self._positions:
                    raise InvariantViolation(
                        f"log entry {position} repeats entry {self._positions[entry]}"
                    )
                self._positions[entry] = position
                self._digests.append(entry)
            cursor.close()
        except sqlite3.Error as exc:
            raise InvariantViolation(f"cannot read the transparency log: {exc}") from exc

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._tree.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ensure_open(self) -> None:
        if self._closed:
            raise InvariantViolation("transparency log used after close()")

    # --- writing --------------------------------------------------------------------------------

    def append(self, digest: bytes) -> int:
        """Append one statement digest; return its 0-based index.

        A digest already in the log is refused with :class:`InvariantViolation`: one statement
        is logged once, so a second append means the caller lost track of what it published.
        The row is committed before this returns.
        """
        _check_entry(digest)
        with self._lock:
            self._ensure_open()
            existing = self._positions.get(digest)
            if existing is not None:
                raise InvariantViolation(
                    f"statement digest {digest.hex()} is already in the log at index {existing}"
                )
            expected = len(self._digests)
            try:
                one_based = self._tree.append_entry(digest)
            except sqlite3.OperationalError as exc:
                # Locked database, full disk: nothing was committed, the same call may succeed.
                raise TransientError(f"cannot append to the transparency log: {exc}") from exc
            except (sqlite3.Error, ValueError) as exc:
                raise InvariantViolation(f"transparency log append failed: {exc}") from exc
            if one_based != expected + 1:
                raise InvariantViolation(
                    f"log appended at {one_based - 1}, expected {expected}: another writer?"
                )
            self._digests.append(digest)
            self._positions[digest] = expected
            return expected

    # --- reading --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of entries."""
        with self._lock:
            return len(self._digests)

    def index_of(self, digest: bytes) -> int | None:
        """0-based index of a statement digest, or None if it was never appended."""
        _check_entry(digest)
        with self._lock:
            return self._positions.get(digest)

    def _check_request(self, value: object, what: str, *, low: int, high: int) -> int:
        # Sizes and indices arrive from exchanges and regulators: a bad one is their error.
        if type(value) is not int:
            raise DecodeError(f"{what} must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            raise DecodeError(f"{what} {_show(value)} outside {low}..{high}")
        return value

    def _root(self, size: int) -> bytes:
        try:
            return _as_bytes(self._tree.get_root(size), "root")
        except ValueError as exc:
            raise InvariantViolation(f"pymerkle refused the root of size {size}: {exc}") from exc

    def head(self, size: int | None = None) -> TreeHead:
        """The head of the log now, or of its first ``size`` entries."""
        with self._lock:
            self._ensure_open()
            current = len(self._digests)
            wanted = current if size is None else size
            wanted = self._check_request(wanted, "tree size", low=0, high=current)
            return TreeHead(size=wanted, root=self._root(wanted))

    def prove_inclusion(self, index: int, size: int | None = None) -> LogInclusionProof:
        """Inclusion proof of entry ``index`` (0-based) in the head of ``size`` (default: now)."""
        with self._lock:
            self._ensure_open()
            current = len(self._digests)
            wanted = current if size is None else size
            wanted = self._check_request(wanted, "tree size", low=1, high=current)
            index = self._check_request(index, "leaf index", low=0, high=wanted - 1)
            # pymerkle's path is [leaf hash, RFC audit path...]; its index counts from one.
            path = self._pymerkle_inclusion_path(index + 1, wanted)
            if path[0] != compute_leaf_hash(self._digests[index]):
                raise InvariantViolation(f"pymerkle's leaf {index} is not the stored entry")
            proof = LogInclusionProof(index=index, size=wanted, path=tuple(path[1:]))
            head = TreeHead(size=wanted, root=self._root(wanted))
            try:
                verify_log_inclusion(entry=self._digests[index], proof=proof, head=head)
            except InvalidProof as exc:
                raise InvariantViolation(f"the log built a bad inclusion proof: {exc}") from exc
            return proof

    def prove_consistency(self, old_size: int, new_size: int | None = None) -> LogConsistencyProof:
        """RFC 9162 consistency proof from the head of ``old_size`` to ``new_size`` (default: now).

        pymerkle's own consistency proofs use another layout, so the RFC proof is derived from
        the inclusion path of the old tree's last leaf ``m - 1`` in the new tree. With ``2**l``
        the largest power of two dividing ``m``, that leaf is the rightmost leaf of a perfect
        subtree of ``2**l`` leaves ending at ``m``. The RFC proof is: that subtree's hash
        (omitted when it is the whole old tree, i.e. ``m`` is a power of two), followed by the
        leaf's audit path above level ``l``. The subtree hash is folded from the leaf and its
        first ``l`` siblings, which all lie to its left.
        """
        with self._lock:
            self._ensure_open()
            current = len(self._digests)
            wanted = current if new_size is None else new_size
            wanted = self._check_request(wanted, "new tree size", low=0, high=current)
            old_size = self._check_request(old_size, "old tree size", low=0, high=wanted)
            if old_size in (0, wanted):
                return LogConsistencyProof(old_size=old_size, new_size=wanted, path=())
            path = self._pymerkle_inclusion_path(old_size, wanted)
            level = (old_size & -old_size).bit_length() - 1
            leaf, siblings = path[0], path[1:]
            if len(siblings) < level:
                raise InvariantViolation("pymerkle's inclusion path is shorter than the tree")
            node = leaf
            for sibling in siblings[:level]:
                node = compute_node_hash(sibling, node)
            head_path = [] if old_size == 1 << level else [node]
            proof = LogConsistencyProof(
                old_size=old_size, new_size=wanted, path=(*head_path, *siblings[level:])
            )
            old = TreeHead(size=old_size, root=self._root(old_size))
            new = TreeHead(size=wanted, root=self._root(wanted))
            try:
                verify_log_consistency(old=old, new=new, proof=proof)
            except InvalidProof as exc:
                raise InvariantViolation(f"the log built a bad consistency proof: {exc}") from exc
            return proof

    def _pymerkle_inclusion_path(self, one_based_index: int, size: int) -> list[bytes]:
        try:
            proof = self._tree.prove_inclusion(one_based_index, size)
        except (self._challenge_error, ValueError, sqlite3.Error) as exc:
            # The request was checked above, so a refusal here is pymerkle disagreeing with us.
            raise InvariantViolation(f"pymerkle could not prove inclusion: {exc}") from exc
        path = _as_path(proof.path, "inclusion path")
        if not path:
            raise InvariantViolation("pymerkle returned an empty inclusion path")
        return path
