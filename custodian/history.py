"""Leaf history of the attestation streams, and client proofs at any stored sequence.

The service keeps the trees of its latest statement only; a client may ask for its proof in an
older one (the statement it was shown last week, the one a dispute is about). Rather than keep
every tree, the custodian keeps every leaf *version*: one row per (stream, asset, account) for
each stretch of sequences during which that holding had one position and one quantity
(``attested_leaf_versions``: ``from_sequence`` inclusive, ``to_sequence`` exclusive, null while
open). :func:`persist_leaf_versions` writes them in the transaction that stores each statement
(the old version of a changed or cleared holding is closed at the new sequence; the new version
opens there), so the versions valid at ``s``, ``from_sequence <= s < to_sequence``, are exactly
the leaves of statement ``s``.

:class:`ProofHistory` rebuilds the tree of one asset at one sequence from those rows (one
indexed query) at the depth the stored statement states, checks that it gives that statement's
root, total and count, and only then proves a leaf in it. A rebuilt tree that does not match the
signed statement is an :class:`~attestations.errors.InvariantViolation` (damaged or altered
history, or a changed salt secret): a proof that would not verify is never handed out. A few
rebuilt trees are kept (least recently used first out), because a client checking an old
statement tends to ask for several of its assets, and other clients ask for the same one.

Statements stored before the history was kept (a database migrated to revision 0004 with
statements in it) have no leaf versions: ``attested_leaf_history_starts`` records, for such a
stream, the first sequence whose leaves are kept (the last statement at migration time, whose
leaves were seeded from ``attested_leaves``). A stream absent from it has its whole history.

What it does not do: serve the latest statement's proofs (the service answers those from its
in-memory trees), sign, or change any statement or leaf.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Index,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    and_,
    bindparam,
    column,
    insert,
    or_,
    select,
    table,
    update,
)
from sqlalchemy.orm import Session

from attestations.disclosure import ClientProof, DisclosedLeaf, build_trees, compute_salt
from attestations.errors import (
    ConfigurationError,
    CounterpartyError,
    DecodeError,
    InvariantViolation,
)
from attestations.merkle import SumTree
from attestations.statement import SignedStatement
from bridge.outbox import run_transaction
from bridge.topics import compute_stream_key
from custodian.epochs import Holding
from custodian.store import Units, metadata

DEFAULT_CACHE_SIZE: Final = 8
"""Rebuilt trees kept in memory. A tree of n leaves costs about 2n nodes; old statements are
asked for rarely, so a few suffice."""

# --- tables (schema: custodian/migrations/versions/0004_leaf_history.py) -------------------------

leaf_versions_table: Final = Table(
    "attested_leaf_versions",
    metadata,
    Column("stream", String(300), nullable=False),
    Column("asset", String(16), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("account", String(128), nullable=False),
    Column("quantity", Units, nullable=False),
    Column("from_sequence", BigInteger, nullable=False, autoincrement=False),
    Column("to_sequence", BigInteger, nullable=True),
    # A holding has one version starting at a given sequence; the key also finds the open
    # version of a holding when a statement closes it.
    PrimaryKeyConstraint(
        "stream", "asset", "account", "from_sequence", name="pk_attested_leaf_versions"
    ),
    CheckConstraint(
        "to_sequence IS NULL OR to_sequence > from_sequence",
        name="ck_attested_leaf_versions_interval",
    ),
    # The versions valid at s: from_sequence <= s, then to_sequence filtered on the rows found.
    Index("ix_attested_leaf_versions_asset_from", "stream", "asset", "from_sequence"),
)

history_starts_table: Final = Table(
    "attested_leaf_history_starts",
    metadata,
    Column("stream", String(300), nullable=False),
    Column("first_sequence", BigInteger, nullable=False, autoincrement=False),
    PrimaryKeyConstraint("stream", name="pk_attested_leaf_history_starts"),
)

# The service's statements table, named here without importing custodian.service (which imports
# this module): only the columns read below.
_statements: Final = table(
    "attestation_statements",
    column("stream", String(300)),
    column("sequence", BigInteger),
    column("wire", LargeBinary),
)


class ProofNotKept(CounterpartyError):
    """No proof can be built at that sequence: the stream has no statement with it, or the
    statement predates the leaf history. (A lookup of something that is not there, like a 404;
    a holding absent from a stored statement is not this, but None.)"""

    reason = "proof_not_kept"


# --- writing ------------------------------------------------------------------------------------


def persist_leaf_versions(
    connection: Connection,
    *,
    stream: str,
    sequence: int,
    changed: Sequence[DisclosedLeaf],
    cleared: Sequence[Holding],
) -> None:
    """Record the leaf changes of statement ``sequence`` in the history, inside the caller's
    transaction (the one that stores the statement): close the open version of every changed or
    cleared holding at ``sequence``, then open a version for every changed leaf. ``changed`` are
    the holdings new or with another quantity, ``cleared`` the holdings gone
    (:func:`custodian.service.compute_leaf_changes`)."""
    closing = [(leaf.account, leaf.asset) for leaf in changed] + list(cleared)
    if closing:
        # One statement, many parameter sets (as the service's leaf upsert, for the same reason:
        # one expression over thousands of holdings exceeds SQLite's expression depth).
        connection.execute(
            update(leaf_versions_table)
            .where(
                leaf_versions_table.c.stream == bindparam("b_stream"),
                leaf_versions_table.c.asset == bindparam("b_asset"),
                leaf_versions_table.c.account == bindparam("b_account"),
                leaf_versions_table.c.to_sequence.is_(None),
            )
            .values(to_sequence=bindparam("b_to")),
            [
                {"b_stream": stream, "b_asset": asset, "b_account": account, "b_to": sequence}
                for account, asset in closing
            ],
        )
    if changed:
        connection.execute(
            insert(leaf_versions_table),
            [
                {
                    "stream": stream,
                    "asset": leaf.asset,
                    "position": leaf.position,
                    "account": leaf.account,
                    "quantity": leaf.quantity,
                    "from_sequence": sequence,
                    "to_sequence": None,
                }
                for leaf in changed
            ],
        )


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeafVersion:
    """One row of ``attested_leaf_versions``."""

    asset: str
    position: int
    account: str
    quantity: int
    from_sequence: int
    to_sequence: int | None


def fetch_leaf_versions(
    connection: Connection, *, stream: str, asset: str | None = None, sequence: int | None = None
) -> list[LeafVersion]:
    """The stream's leaf versions (of ``asset`` when given; valid at ``sequence`` when given),
    by asset and position."""
    versions = leaf_versions_table.c
    query = select(
        versions.asset,
        versions.position,
        versions.account,
        versions.quantity,
        versions.from_sequence,
        versions.to_sequence,
    ).where(versions.stream == stream)
    if asset is not None:
        query = query.where(versions.asset == asset)
    if sequence is not None:
        query = query.where(
            and_(
                versions.from_sequence <= sequence,
                or_(versions.to_sequence.is_(None), versions.to_sequence > sequence),
            )
        )
    rows = connection.execute(query.order_by(versions.asset, versions.position)).all()
    return [
        LeafVersion(str(a), int(p), str(acct), int(q), int(f), None if t is None else int(t))
        for a, p, acct, q, f, t in rows
    ]


@dataclass(frozen=True, slots=True)
class _Rebuilt:
    """One asset's tree at one statement, checked against that statement's signed entry."""

    sequence: int
    digest: bytes
    tree: SumTree | None
    """None when the statement has no tree of that asset."""
    positions: dict[str, int]
    """account -> position"""


class ProofHistory:
    """Client proofs of one (custodian, exchange) stream at any stored sequence, rebuilt from
    the leaf history. Thread-safe: the cache is guarded by a lock, and a rebuilt tree is only
    read (proved) under it."""

    def __init__(
        self,
        engine: Engine,
        *,
        custodian: str,
        exchange: str,
        salt_secret: bytes,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if len(salt_secret) < 32:
            raise ConfigurationError("the salt secret must be at least 32 bytes")
        if cache_size < 0:
            raise ConfigurationError("cache_size must not be negative")
        self.engine = engine
        self.custodian = custodian
        self.exchange = exchange
        self.stream = compute_stream_key(custodian=custodian, exchange=exchange)
        self._salt_secret = salt_secret
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, int], _Rebuilt] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def cached(self) -> tuple[tuple[str, str, int], ...]:
        """The (stream, asset, sequence) keys of the trees kept, least recently used first."""
        with self._lock:
            return tuple(self._cache)

    def client_proof(self, *, account: str, asset: str, sequence: int) -> ClientProof | None:
        """``account``'s proof for its ``asset`` leaf in statement ``sequence``, or None when
        that statement has no such leaf. Raises ProofNotKept when the stream has no statement
        ``sequence`` or its leaves are not kept, InvariantViolation when the history does not
        rebuild the statement's signed root, total and count, and what a database read raises
        (BridgeDatabaseUnavailable, retriable)."""
        try:
            salt = compute_salt(
                secret=self._salt_secret, exchange=self.exchange, account=account, asset=asset
            )
        except DecodeError:
            return None  # not an account or asset any tree can hold
        rebuilt = self._rebuilt(asset, sequence)
        with self._lock:
            position = rebuilt.positions.get(account)
            if rebuilt.tree is None or position is None:
                return None
            proof = rebuilt.tree.prove(position)
        return ClientProof(
            custodian=self.custodian,
            exchange=self.exchange,
            sequence=rebuilt.sequence,
            statement_digest=rebuilt.digest,
            account=account,
            salt=salt,
            proof=proof,
        )

    def _rebuilt(self, asset: str, sequence: int) -> _Rebuilt:
        key = (self.stream, asset, sequence)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        # Built outside the lock: two threads asking for the same tree may both build it (the
        # results are equal), but nobody waits behind a large rebuild of another tree.
        rebuilt = self._rebuild(asset, sequence)
        if self._cache_size:
            with self._lock:
                self._cache[key] = rebuilt
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return rebuilt

    def _rebuild(self, asset: str, sequence: int) -> _Rebuilt:
        stream = self.stream

        def work(session: Session) -> tuple[bytes | None, int, list[LeafVersion]]:
            connection = session.connection()
            wire = connection.execute(
                select(_statements.c.wire).where(
                    _statements.c.stream == stream, _statements.c.sequence == sequence
                )
            ).scalar_one_or_none()
            if wire is None:
                return None, 1, []
            first = connection.execute(
                select(history_starts_table.c.first_sequence).where(
                    history_starts_table.c.stream == stream
                )
            ).scalar_one_or_none()
            first = 1 if first is None else int(first)
            if sequence < first:
                return bytes(wire), first, []
            leaves = fetch_leaf_versions(connection, stream=stream, asset=asset, sequence=sequence)
            return bytes(wire), first, leaves

        wire, first, versions = run_transaction(
            self.engine, work, what=f"reading the leaf history at {sequence}", read_only=True
        )
        if wire is None:
            raise ProofNotKept(f"{stream} has no statement {sequence}")
        if sequence < first:
            raise ProofNotKept(
                f"{stream}: the leaves of statements before {first} are not kept (statement "
                f"{sequence} was stored before the leaf history was)"
            )
        try:
            signed = SignedStatement.decode(wire, max_bytes=len(wire))
        except CounterpartyError as exc:
            raise InvariantViolation(f"{stream}: stored statement {sequence}: {exc}") from exc
        statement = signed.statement
        if (statement.custodian, statement.exchange, statement.sequence) != (
            self.custodian,
            self.exchange,
            sequence,
        ):
            raise InvariantViolation(f"{stream}: the row of statement {sequence} holds another")
        entry = statement.asset_root(asset)
        if entry is None:
            if versions:
                raise InvariantViolation(
                    f"{stream}: {asset} leaves at {sequence}, but statement {sequence} has no "
                    f"{asset} tree"
                )
            return _Rebuilt(sequence, signed.digest, None, {})
        try:
            leaves = [
                DisclosedLeaf(
                    version.account,
                    asset,
                    version.position,
                    compute_salt(
                        secret=self._salt_secret,
                        exchange=self.exchange,
                        account=version.account,
                        asset=asset,
                    ),
                    version.quantity,
                )
                for version in versions
            ]
            tree = build_trees(leaves, depths={asset: entry.depth}).get(asset)
        except CounterpartyError as exc:
            # A malformed or duplicated row is our own damage, not a counterparty's input.
            raise InvariantViolation(
                f"{stream}: the {asset} leaf history at {sequence} does not form a tree: {exc}"
            ) from exc
        if tree is None:
            tree = SumTree(asset, depth=entry.depth)
        if (tree.root, tree.total, tree.count, tree.depth) != (
            entry.root,
            entry.total,
            entry.count,
            entry.depth,
        ):
            raise InvariantViolation(
                f"{stream}: the {asset} leaf history does not rebuild statement {sequence}'s "
                "signed root, total and count"
            )
        return _Rebuilt(
            sequence,
            signed.digest,
            tree,
            {version.account: version.position for version in versions},
        )


def compute_history_breaks(versions: Iterable[LeafVersion]) -> list[str]:
    """Consistency breaks of a stream's leaf versions, all of them (empty when consistent): a
    holding with two versions open at once or overlapping, and, per asset, a position held by
    two accounts at one sequence."""
    breaks: list[str] = []
    by_holding: dict[Holding, list[LeafVersion]] = {}
    by_slot: dict[tuple[str, int], list[LeafVersion]] = {}
    for version in versions:
        by_holding.setdefault((version.account, version.asset), []).append(version)
        by_slot.setdefault((version.asset, version.position), []).append(version)

    def overlaps(items: list[LeafVersion]) -> bool:
        ordered = sorted(items, key=lambda v: v.from_sequence)
        return any(
            earlier.to_sequence is None or earlier.to_sequence > later.from_sequence
            for earlier, later in itertools.pairwise(ordered)
        )

    for (account, asset), items in sorted(by_holding.items()):
        if overlaps(items):
            breaks.append(f"{account}/{asset}: versions overlap")
    for (asset, position), items in sorted(by_slot.items()):
        if overlaps(items):
            breaks.append(f"{asset} position {position}: two accounts at once")
    return breaks
