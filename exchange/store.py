"""The exchange's margin ledger on a database: tables, persisting what the ledger and the verifier
decided, and rebuilding both from the tables after a restart.

What this module does:

* hold the ledger's tables (SQLAlchemy Core; the schema is the Alembic migrations in
  :mod:`exchange.migrations`, never ``create_all``), with money as exact integers below 2**128
  (``NUMERIC(39, 0)`` on PostgreSQL, canonical decimal text on SQLite) and UTC timestamps;
* :func:`persist_statement`: what accepting a verified statement changes in the receiver's state
  of its stream (the signed statement as the stream's last, its digest in the stream's history,
  the disclosed leaves); :func:`persist_change`: what a :class:`~exchange.ledger.LedgerChange`
  changes (stream statuses, prices, exposures, margin states, journal entries). Both write through
  the caller's session, inside the caller's transaction, and commit nothing. A stream's stored
  head never goes back: a status whose head is older than the stored one, or another statement
  at its sequence, is refused (InvariantViolation), whoever planned it against what;
* :func:`load_ledger`: the :class:`~exchange.ledger.MarginLedger` and, per stream, the receiver's
  trees, chain head and digest history, as the tables hold them, from one snapshot; the leaves are
  checked to rebuild exactly the roots the stream's last statement signs (damaged tables raise
  InvariantViolation); :func:`load_stream_status`: one stream's stored status inside the
  caller's transaction, for a writer to check it planned against the stored head;
* alerts (record, list, resolve), stored notices, and pages of the journal.

The leaves table is both the receiver's trees (with each leaf's position and salt) and the
credited positions (one per (stream, account, asset) with a non-zero quantity): the ledger's
positions are never stored twice, so they cannot disagree with the trees the next delta is
checked against.

What it does not do: decide anything (the verifier and the ledger do), read Kafka, or sign
notices. The journal is insert-only: the database refuses UPDATE and DELETE on it (triggers on
both databases).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ColumnElement,
    Engine,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from attestations.amounts import Price
from attestations.disclosure import DisclosedLeaf, LeafDisclosure, ReceiverTrees
from attestations.errors import (
    ConfigurationError,
    CounterpartyError,
    DecodeError,
    InvariantViolation,
    TransientError,
)
from attestations.statement import PricePoint, SignedStatement, StatementKind
from attestations.verify import ChainHead, VerifiedStatement
from bridge import database
from bridge import migrations as bridge_migrations
from bridge.database import DEFAULT_MAX_ATTEMPTS, row_id_type
from bridge.outbox import check_schema as check_bridge_schema
from bridge.topics import compute_stream_key, parse_stream_key
from exchange import migrations
from exchange.ledger import (
    ClientMargin,
    ExposureReport,
    Holding,
    JournalEntry,
    LedgerChange,
    MarginLedger,
    Notice,
    StreamHead,
    StreamStatus,
    compute_pending_releases,
)
from exchange.policy import CollateralPolicy, MarginState

T = TypeVar("T")

DEFAULT_JOURNAL_PAGE: Final = 1000
MAX_JOURNAL_PAGE: Final = 10_000
_MAX_TEXT: Final = 1000


# --- errors -------------------------------------------------------------------------------------


class ExchangeDatabaseUnavailable(TransientError):
    """The ledger's tables could not be read or written now (database down, locked, busy after
    retries). Retry with back-off: nothing was changed."""

    reason = "exchange_database_unavailable"


class ExchangeSchemaNotCurrent(ConfigurationError):
    """The database's ledger tables are not at the revision this code needs: run
    :func:`migrate`."""

    reason = "exchange_schema_not_current"


class UnknownAlert(CounterpartyError):
    """An operator named an alert that does not exist."""

    reason = "unknown_alert"


class AlertAlreadyResolved(CounterpartyError):
    """An operator resolved an alert someone already resolved."""

    reason = "alert_already_resolved"


# --- column types -------------------------------------------------------------------------------


class Units(database.Units):
    """Exact integers of the ledger's tables (quantities, quote amounts, prices' mantissas); a
    stored value that is not a canonical integer is an InvariantViolation (the table was changed
    behind the ledger's back)."""

    cache_ok = True
    corrupted_error = InvariantViolation
    stored_what = "stored amount"


class UtcDateTime(database.UtcDateTime):
    """Timezone-aware UTC timestamps of the ledger's tables; a naive one is an
    InvariantViolation (every time the ledger handles is aware)."""

    cache_ok = True
    naive_error = InvariantViolation
    stored_by = "the exchange ledger"


# --- tables (schema: exchange/migrations/versions/) ---------------------------------------------

metadata: Final = MetaData()
"""The ledger's own metadata, migrated by :mod:`exchange.migrations` and never mixed with the
bridge's."""

streams_table: Final = Table(
    "exchange_streams",
    metadata,
    Column("stream", String(300), nullable=False),
    Column("custodian", String(128), nullable=False),
    Column("sequence", BigInteger, nullable=True),
    Column("digest", LargeBinary, nullable=True),
    Column("kind", String(16), nullable=True),
    Column("issued_at", UtcDateTime, nullable=True),
    Column("expires_at", UtcDateTime, nullable=True),
    Column("wire", LargeBinary, nullable=True),
    Column("depths", Text, nullable=True),
    Column("frozen", Boolean, nullable=False),
    Column("frozen_reason", Text, nullable=True),
    Column("frozen_at", UtcDateTime, nullable=True),
    Column("awaiting_snapshot_from", BigInteger, nullable=True),
    Column("updated_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("stream", name="pk_exchange_streams"),
    CheckConstraint("(sequence IS NULL) = (digest IS NULL)", name="ck_exchange_streams_head_whole"),
)

digests_table: Final = Table(
    "exchange_statement_digests",
    metadata,
    Column("stream", String(300), nullable=False),
    Column("sequence", BigInteger, nullable=False, autoincrement=False),
    Column("digest", LargeBinary, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("issued_at", UtcDateTime, nullable=False),
    # True when accepted as a resynchronisation (not linked to the head before it).
    Column("resynchronised", Boolean, nullable=False),
    Column("accepted_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("stream", "sequence", name="pk_exchange_statement_digests"),
)

leaves_table: Final = Table(
    "exchange_leaves",
    metadata,
    Column("stream", String(300), nullable=False),
    Column("asset", String(16), nullable=False),
    Column("position", BigInteger, nullable=False, autoincrement=False),
    Column("account", String(128), nullable=False),
    Column("salt", LargeBinary, nullable=False),
    Column("quantity", Units, nullable=False),
    PrimaryKeyConstraint("stream", "asset", "position", name="pk_exchange_leaves"),
    UniqueConstraint("stream", "asset", "account", name="uq_exchange_leaves_stream_asset_account"),
)

prices_table: Final = Table(
    "exchange_prices",
    metadata,
    Column("stream", String(300), nullable=False),
    Column("asset", String(16), nullable=False),
    Column("quote", String(16), nullable=False),
    Column("mantissa", Units, nullable=False),
    Column("scale", SmallInteger, nullable=False),
    Column("source", String(128), nullable=True),
    Column("observed_at", UtcDateTime, nullable=True),
    PrimaryKeyConstraint("stream", "asset", name="pk_exchange_prices"),
)

exposures_table: Final = Table(
    "exchange_exposures",
    metadata,
    Column("client", String(128), nullable=False),
    Column("report_id", String(128), nullable=False),
    Column("reported_at", UtcDateTime, nullable=False),
    Column("exposure", Units, nullable=False),
    Column("requirement", Units, nullable=False),
    Column("unrealised_pnl", Units, nullable=False),
    PrimaryKeyConstraint("client", name="pk_exchange_exposures"),
)

margins_table: Final = Table(
    "exchange_margins",
    metadata,
    Column("client", String(128), nullable=False),
    Column("state", String(32), nullable=False),
    Column("since", UtcDateTime, nullable=False),
    Column("deadline", UtcDateTime, nullable=True),
    PrimaryKeyConstraint("client", name="pk_exchange_margins"),
)

journal_table: Final = Table(
    "exchange_journal",
    metadata,
    Column("id", row_id_type(), primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("client", String(128), nullable=True),
    Column("stream", String(300), nullable=True),
    Column("asset", String(16), nullable=True),
    Column("sequence", BigInteger, nullable=True),
    Column("quantity", Units, nullable=True),
    Column("value", Units, nullable=True),
    # JSON object of the entry's detail (text, so integers beyond 2**53 stay exact).
    Column("detail", Text, nullable=False),
    Index("ix_exchange_journal_stream", "stream", "id"),
    Index("ix_exchange_journal_client", "client", "id"),
    Index("ix_exchange_journal_kind", "kind", "id"),
    sqlite_autoincrement=True,
)

notices_table: Final = Table(
    "exchange_notices",
    metadata,
    Column("id", row_id_type(), primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("client", String(128), nullable=False),
    Column("body", Text, nullable=False),
    Column("published_at", UtcDateTime, nullable=True),
    sqlite_autoincrement=True,
)

alerts_table: Final = Table(
    "exchange_alerts",
    metadata,
    Column("id", row_id_type(), primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("stream", String(300), nullable=True),
    Column("detail", Text, nullable=False),
    Column("resolved_at", UtcDateTime, nullable=True),
    Column("resolved_by", String(128), nullable=True),
    Column("resolution", Text, nullable=True),
    Index("ix_exchange_alerts_open", "resolved_at", "id"),
    sqlite_autoincrement=True,
)


# --- engine, schema, transactions ---------------------------------------------------------------


def create_exchange_engine(url: str) -> Engine:
    """An engine for the ledger's database: ``sqlite:///path`` or ``postgresql+psycopg://...``.
    On SQLite every transaction takes the write lock at ``BEGIN``."""
    return database.create_database_engine(
        url,
        owner="the exchange ledger",
        unsupported=ConfigurationError,
        sqlite_foreign_keys=True,
    )


def migrate(database_or_engine: str | Engine) -> None:
    """Bring both schemas the exchange's database holds to head: the bridge's tables (consumer
    progress, dead letters, outbox: written in the ledger's transactions) and the ledger's."""
    bridge_migrations.upgrade(database_or_engine)
    migrations.upgrade(database_or_engine)


def check_schema(engine: Engine) -> None:
    """Raise :class:`ExchangeSchemaNotCurrent` (or the bridge's equivalent) unless both schemas
    are at head."""
    check_bridge_schema(engine)
    database.verify_schema_current(
        engine,
        current_revision=migrations.current_revision,
        head_revision=migrations.head_revision(),
        schema="exchange ledger schema",
        upgrade_with="exchange.store.migrate",
        unavailable=ExchangeDatabaseUnavailable,
        not_current=ExchangeSchemaNotCurrent,
    )


def run_transaction(
    engine: Engine,
    work: Callable[[Session], T],
    *,
    what: str,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> T:
    """Run ``work`` in one transaction and commit; lock conflicts are retried a few times, then
    raise :class:`ExchangeDatabaseUnavailable`."""

    def attempt() -> T:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            return work(session)

    return database.run_with_retries(
        attempt,
        what=what,
        max_attempts=max_attempts,
        unavailable=ExchangeDatabaseUnavailable,
        corrupted=InvariantViolation,
    )


def _upsert(
    session: Session,
    table: Table,
    *,
    keys: Mapping[str, Any],
    values: Mapping[str, Any],
    insert_only: Mapping[str, Any] | None = None,
) -> None:
    """Insert ``keys + values + insert_only``, or update ``values`` of the existing row."""
    dialect = session.get_bind().dialect.name
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = builder(table).values(**keys, **values, **(insert_only or {}))
    session.connection().execute(
        statement.on_conflict_do_update(index_elements=list(keys), set_=dict(values))
    )


def _now() -> datetime:
    return datetime.now(UTC)


_JSON: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json(detail: Mapping[str, object]) -> str:
    return _JSON.encode(dict(detail))


# --- persisting a verified statement ------------------------------------------------------------


def persist_statement(
    session: Session,
    verified: VerifiedStatement,
    disclosure: LeafDisclosure,
    *,
    cleared: Iterable[tuple[str, int]] = (),
    now: datetime | None = None,
) -> None:
    """Record what accepting ``verified`` changes in its stream's receiver state, through
    ``session`` (inside the caller's transaction): the signed statement as the stream's last (with
    its tree depths), its digest in the stream's history, and the leaves - for a snapshot the
    complete set replaces the stream's leaves, for a delta the ``clear`` slots of ``disclosure``
    are emptied and its set leaves written. ``cleared`` is accepted for symmetry with the
    disclosure and ignored (the disclosure's own ``clear`` is used).

    Call it only for a statement the verifier accepted, with the disclosure it was verified
    against; the stream head and status columns are written by :func:`persist_change`."""
    del cleared
    moment = _now() if now is None else now
    statement = verified.statement
    stream = compute_stream_key(custodian=statement.custodian, exchange=statement.exchange)
    connection = session.connection()
    depths = {root.asset: root.depth for root in statement.assets}
    _upsert(
        session,
        streams_table,
        keys={"stream": stream},
        values={
            "wire": verified.signed.encode(),
            "depths": _json(depths),
            "updated_at": moment,
        },
        insert_only={"custodian": statement.custodian, "frozen": False},
    )
    connection.execute(
        insert(digests_table).values(
            stream=stream,
            sequence=statement.sequence,
            digest=verified.digest,
            kind=statement.kind.value,
            issued_at=statement.issued_at,
            resynchronised=verified.resynchronised,
            accepted_at=moment,
        )
    )
    if statement.kind is StatementKind.SNAPSHOT:
        connection.execute(delete(leaves_table).where(leaves_table.c.stream == stream))
    else:
        # Delete every slot the delta empties or sets, then insert the set leaves: a portable
        # upsert, and an account that moves (its old slot cleared, a new one set) never meets
        # the one-account-per-asset constraint twice. One statement with many parameter sets:
        # one expression over thousands of slots would exceed SQLite's expression depth.
        slots = [(slot.asset, slot.position) for slot in disclosure.clear] + [
            (leaf.asset, leaf.position) for leaf in disclosure.set_leaves
        ]
        if slots and connection.dialect.name == "postgresql":
            # One DELETE joined against the slots as arrays. As one DELETE per slot, the planner
            # - before the table's first ANALYZE, e.g. right after a snapshot was copied in -
            # may take the (stream, asset, account) index and filter every leaf of the asset
            # for each slot: 17 s for a 1,000-leaf delta over 100,000 leaves
            # (benchmarks/ledger.py). The join is at worst one scan of the stream's leaves.
            connection.exec_driver_sql(
                f"DELETE FROM {leaves_table.name} AS l "  # noqa: S608 (a constant, never input)
                "USING unnest(%(assets)s::varchar[], %(positions)s::bigint[]) "
                "AS d(asset, position) "
                "WHERE l.stream = %(stream)s AND l.asset = d.asset AND l.position = d.position",
                {
                    "assets": [asset for asset, _ in slots],
                    "positions": [position for _, position in slots],
                    "stream": stream,
                },
            )
        elif slots:
            connection.execute(
                delete(leaves_table).where(
                    leaves_table.c.stream == bindparam("b_stream"),
                    leaves_table.c.asset == bindparam("b_asset"),
                    leaves_table.c.position == bindparam("b_position"),
                ),
                [{"b_stream": stream, "b_asset": a, "b_position": p} for a, p in slots],
            )
    insert_leaves(session, stream, disclosure.set_leaves)


def bulk_insert(
    session: Session,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    repeated: frozenset[str] = frozenset(),
) -> None:
    """Insert ``rows`` (values in ``columns`` order) into ``table`` with ONE driver-level
    executemany: each value still goes through its column type's bind processing (so Units and
    UtcDateTime refuse what they refuse), but not through SQLAlchemy's per-row statement
    machinery, which costs several times what the database does for a snapshot of a million
    leaves. Values of the ``repeated`` columns (a change's journal entries share one time) are
    processed once per distinct value."""
    connection = session.connection()
    dialect = connection.dialect
    active: list[tuple[int, Callable[[Any], Any], dict[Any, Any] | None]] = []
    for index, name in enumerate(columns):
        found = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        if found is not None:
            active.append((index, found, {} if name in repeated else None))
    converted: list[tuple[Any, ...]] = []
    for row in rows:
        values = list(row)
        for index, processor, cache in active:
            value = values[index]
            if value is None:
                continue
            if cache is None:
                values[index] = processor(value)
            else:
                key = (type(value), value)
                if key not in cache:
                    cache[key] = processor(value)
                values[index] = cache[key]
        converted.append(tuple(values))
    if not converted:
        return
    if dialect.name == "postgresql":
        # COPY: several times faster than an executemany of INSERTs, same transaction.
        cursor = connection.connection.cursor()
        try:
            with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
                for converted_row in converted:
                    copy.write_row(converted_row)
        finally:
            cursor.close()
        return
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    # Table and column names are this module's constants, never input.
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "  # noqa: S608
        f"VALUES ({', '.join([mark] * len(columns))})"
    )
    connection.exec_driver_sql(sql, converted)


_LEAF_COLUMNS: Final = ("stream", "asset", "position", "account", "salt", "quantity")


def insert_leaves(session: Session, stream: str, leaves: Sequence[DisclosedLeaf]) -> None:
    """Insert ``leaves`` of ``stream`` in one executemany."""
    bulk_insert(
        session,
        leaves_table,
        _LEAF_COLUMNS,
        (
            (stream, leaf.asset, leaf.position, leaf.account, leaf.salt, leaf.quantity)
            for leaf in leaves
        ),
    )


# --- persisting a ledger change -----------------------------------------------------------------


def persist_change(
    session: Session,
    change: LedgerChange,
    *,
    price_points: Mapping[str, Iterable[PricePoint]] | None = None,
    now: datetime | None = None,
) -> None:
    """Record ``change`` through ``session`` (inside the caller's transaction): the new status
    of each stream it names (head, freeze, awaited snapshot), each stream's whole price table,
    exposures, margin states and the journal entries. ``price_points`` (stream -> the statement's
    price points) adds each stored price's source and observation time.

    Positions are not written here: they are the leaves :func:`persist_statement` writes in the
    same transaction (a statement is the only change that moves positions). Notices are not
    written here either: see :func:`persist_notices`."""
    moment = _now() if now is None else now
    connection = session.connection()
    freezes = {e.stream: e.at for e in change.journal if e.kind == "freeze" and e.stream}
    for stream, status in change.streams.items():
        _persist_status(session, stream, status, frozen_at=freezes.get(stream), now=moment)
    for stream, table in change.prices.items():
        points = {
            point.price.asset: point
            for point in (price_points or {}).get(stream, ())
            if isinstance(point, PricePoint)
        }
        connection.execute(delete(prices_table).where(prices_table.c.stream == stream))
        rows = []
        for asset, price in sorted(table.items()):
            point = points.get(asset)
            known = point is not None and point.price == price
            rows.append(
                {
                    "stream": stream,
                    "asset": asset,
                    "quote": price.quote,
                    "mantissa": price.mantissa,
                    "scale": price.scale,
                    "source": point.source if known and point is not None else None,
                    "observed_at": point.observed_at if known and point is not None else None,
                }
            )
        if rows:
            connection.execute(insert(prices_table), rows)
    for client, report in change.exposures.items():
        _upsert(
            session,
            exposures_table,
            keys={"client": client},
            values={
                "report_id": report.report_id,
                "reported_at": report.reported_at,
                "exposure": report.exposure,
                "requirement": report.requirement,
                "unrealised_pnl": report.unrealised_pnl,
            },
        )
    for client, margin in change.margins.items():
        _upsert(
            session,
            margins_table,
            keys={"client": client},
            values={
                "state": margin.state.value,
                "since": margin.since,
                "deadline": margin.deadline,
            },
        )
    persist_journal(session, change.journal)


def _persist_status(
    session: Session,
    stream: str,
    status: StreamStatus,
    *,
    frozen_at: datetime | None,
    now: datetime,
) -> None:
    custodian, _ = parse_stream_key(stream)
    head = status.head
    values: dict[str, Any] = {
        "sequence": None if head is None else head.sequence,
        "digest": None if head is None else head.digest,
        "kind": None if head is None else head.kind,
        "issued_at": None if head is None else head.issued_at,
        "expires_at": None if head is None else head.expires_at,
        "frozen": status.frozen,
        "frozen_reason": status.frozen_reason,
        "awaiting_snapshot_from": status.awaiting_snapshot_from,
        "updated_at": now,
    }
    if not status.frozen:
        values["frozen_at"] = None
    elif frozen_at is not None:
        values["frozen_at"] = frozen_at
    # else: still frozen since the time already stored.
    # The stored head only moves forward: a status planned against a stale in-memory head (an
    # instance that missed what another one committed) must not write an older or emptier head
    # over the stored one. The condition is part of the upsert, so it holds against concurrent
    # writers too (PostgreSQL evaluates it on the row as committed, after waiting for its lock).
    c = streams_table.c
    keeps_head: ColumnElement[bool]
    if head is None:
        keeps_head = c.sequence.is_(None)
    else:
        keeps_head = or_(
            c.sequence.is_(None),
            c.sequence < head.sequence,
            and_(c.sequence == head.sequence, c.digest == head.digest),
        )
    dialect = session.get_bind().dialect.name
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    result = session.connection().execute(
        builder(streams_table)
        .values(stream=stream, custodian=custodian, **values)
        .on_conflict_do_update(index_elements=["stream"], set_=values, where=keeps_head)
        .returning(streams_table.c.stream)
    )
    if result.first() is None:  # the row exists and the condition refused the update
        stored = load_stream_status(session, stream, lock=False)
        raise InvariantViolation(
            f"{stream}: refusing to store head {_describe(head)} over the stored head "
            f"{_describe(None if stored is None else stored.head)}: a head never goes back"
        )


def _describe(head: StreamHead | None) -> str:
    return "none" if head is None else f"#{head.sequence} {head.digest.hex()[:16]}"


_JOURNAL_COLUMNS: Final = (
    "at",
    "kind",
    "client",
    "stream",
    "asset",
    "sequence",
    "quantity",
    "value",
    "detail",
)


def persist_journal(session: Session, entries: Sequence[JournalEntry]) -> None:
    """Append ``entries`` to the journal in order, in one executemany (ids follow the order)."""
    # Encoded once per detail object: the ledger shares one read-only detail between the many
    # credit entries of new holdings. Keyed by identity, valid while ``entries`` holds them.
    encoded: dict[int, str] = {}

    def detail_json(detail: Mapping[str, object]) -> str:
        text = encoded.get(id(detail))
        if text is None:
            text = encoded[id(detail)] = _json(detail)
        return text

    bulk_insert(
        session,
        journal_table,
        _JOURNAL_COLUMNS,
        (
            (
                entry.at,
                entry.kind,
                entry.client,
                entry.stream,
                entry.asset,
                entry.sequence,
                entry.quantity,
                entry.value,
                detail_json(entry.detail),
            )
            for entry in entries
        ),
        repeated=frozenset({"at"}),
    )


def compute_notice_body(notice: Notice) -> dict[str, object]:
    """The stored form of a notice (JSON-safe: amounts are integers, times ISO 8601)."""
    deadline = notice.deadline
    return {
        "kind": notice.kind.value,
        "client": notice.client,
        "custodians": list(notice.custodians),
        "at": notice.at.astimezone(UTC).isoformat(),
        "deadline": None if deadline is None else deadline.astimezone(UTC).isoformat(),
        "collateral": notice.collateral,
        "equity": notice.equity,
        "requirement": notice.requirement,
        "ratio_bps": notice.ratio_bps,
        "shortfall": notice.shortfall,
    }


def persist_notices(session: Session, notices: Sequence[Notice]) -> None:
    """Store ``notices`` as unpublished (``published_at`` NULL), in order: the margin calls and
    liquidation-due notices a change produced, kept in its transaction until a publisher signs
    and sends them."""
    if not notices:
        return
    session.connection().execute(
        insert(notices_table),
        [
            {
                "at": notice.at,
                "kind": notice.kind.value,
                "client": notice.client,
                "body": _json(compute_notice_body(notice)),
                "published_at": None,
            }
            for notice in notices
        ],
    )


def load_unpublished_notices(engine: Engine) -> list[tuple[int, dict[str, Any]]]:
    """(id, body) of every stored notice not yet published, in order."""

    def work(session: Session) -> list[tuple[int, dict[str, Any]]]:
        rows = session.connection().execute(
            select(notices_table.c.id, notices_table.c.body)
            .where(notices_table.c.published_at.is_(None))
            .order_by(notices_table.c.id)
        )
        return [(int(i), json.loads(body)) for i, body in rows]

    return run_transaction(engine, work, what="reading unpublished notices")


# --- alerts -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    """Something an operator must look at (a fork, ...); open until resolved."""

    id: int
    at: datetime
    kind: str
    stream: str | None
    detail: str
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution: str | None = None


def record_alert(
    session: Session, *, kind: str, stream: str | None, detail: str, at: datetime
) -> int:
    """Record an open alert through ``session`` (inside the caller's transaction); its id."""
    result = session.connection().execute(
        insert(alerts_table)
        .values(kind=kind, stream=stream, detail=detail[:_MAX_TEXT], at=at)
        .returning(alerts_table.c.id)
    )
    return int(result.scalar_one())


def _alert(row: Any) -> Alert:
    return Alert(
        id=int(row.id),
        at=row.at,
        kind=str(row.kind),
        stream=row.stream,
        detail=str(row.detail),
        resolved_at=row.resolved_at,
        resolved_by=row.resolved_by,
        resolution=row.resolution,
    )


def list_alerts(engine: Engine, *, include_resolved: bool = False) -> list[Alert]:
    """Alerts in the order they were raised; open ones only unless ``include_resolved``."""

    def work(session: Session) -> list[Alert]:
        query = select(alerts_table).order_by(alerts_table.c.id)
        if not include_resolved:
            query = query.where(alerts_table.c.resolved_at.is_(None))
        return [_alert(row) for row in session.connection().execute(query)]

    return run_transaction(engine, work, what="listing alerts")


def resolve_alert(
    session: Session, alert_id: int, *, by: str, resolution: str, at: datetime
) -> Alert:
    """Mark alert ``alert_id`` resolved by ``by`` with ``resolution``, through ``session`` (so a
    fork's resolution in the ledger and its alert's commit together). Raises UnknownAlert or
    AlertAlreadyResolved."""
    if not by or not resolution:
        raise ConfigurationError("resolving an alert needs who resolved it and why")
    connection = session.connection()
    query = select(alerts_table).where(alerts_table.c.id == alert_id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    row = connection.execute(query).first()
    if row is None:
        raise UnknownAlert(f"no alert {alert_id}")
    if row.resolved_at is not None:
        raise AlertAlreadyResolved(f"alert {alert_id} was resolved by {row.resolved_by}")
    connection.execute(
        update(alerts_table)
        .where(alerts_table.c.id == alert_id)
        .values(resolved_at=at, resolved_by=by[:128], resolution=resolution[:_MAX_TEXT])
    )
    return Alert(
        id=alert_id,
        at=row.at,
        kind=str(row.kind),
        stream=row.stream,
        detail=str(row.detail),
        resolved_at=at,
        resolved_by=by[:128],
        resolution=resolution[:_MAX_TEXT],
    )


# --- the journal --------------------------------------------------------------------------------


def journal_page(
    engine: Engine,
    *,
    after: int = 0,
    limit: int = DEFAULT_JOURNAL_PAGE,
    stream: str | None = None,
    client: str | None = None,
) -> list[tuple[int, JournalEntry]]:
    """Up to ``limit`` journal entries with ids above ``after``, in journal order, optionally of
    one stream and/or one client: (id, entry). Page on with the last id."""
    if not 1 <= limit <= MAX_JOURNAL_PAGE:
        raise ConfigurationError(f"a journal page holds 1..{MAX_JOURNAL_PAGE} entries")
    query = select(journal_table).where(journal_table.c.id > after)
    if stream is not None:
        query = query.where(journal_table.c.stream == stream)
    if client is not None:
        query = query.where(journal_table.c.client == client)
    query = query.order_by(journal_table.c.id).limit(limit)

    def work(session: Session) -> list[tuple[int, JournalEntry]]:
        return [(int(row.id), _journal_entry(row)) for row in session.connection().execute(query)]

    return run_transaction(engine, work, what="reading the journal")


def _journal_entry(row: Any) -> JournalEntry:
    return JournalEntry(
        at=row.at,
        kind=str(row.kind),
        client=row.client,
        stream=row.stream,
        asset=row.asset,
        sequence=None if row.sequence is None else int(row.sequence),
        quantity=row.quantity,
        value=row.value,
        detail=json.loads(row.detail),
    )


# --- loading ------------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredStream:
    """The receiver's state of one stream: its trees, the chain head the next statement must
    extend (None before the first) and the digests accepted at earlier sequences (for fork
    detection)."""

    receiver: ReceiverTrees
    head: ChainHead | None = None
    history: dict[int, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class _StreamRow:
    status: StreamStatus
    wire: bytes | None
    depths: dict[str, int]


def _status_of(row: Any) -> StreamStatus:
    head = None
    if row.sequence is not None:
        head = StreamHead(
            stream=row.stream,
            custodian=row.custodian,
            sequence=int(row.sequence),
            digest=bytes(row.digest),
            kind=str(row.kind),
            issued_at=row.issued_at,
            expires_at=row.expires_at,
        )
    return StreamStatus(
        head=head,
        frozen=bool(row.frozen),
        frozen_reason=row.frozen_reason,
        awaiting_snapshot_from=(
            None if row.awaiting_snapshot_from is None else int(row.awaiting_snapshot_from)
        ),
        stream=row.stream,
    )


def load_stream_status(session: Session, stream: str, *, lock: bool) -> StreamStatus | None:
    """The stored status of ``stream`` (head, freeze, awaited snapshot), None before its first
    row, read through ``session``. With ``lock`` the row stays locked until the caller's
    transaction ends (``FOR UPDATE`` on PostgreSQL; a SQLite transaction holds the write lock
    from its ``BEGIN IMMEDIATE`` anyway), so a writer that compares it with what it planned
    against keeps it that way until it commits."""
    query = select(streams_table).where(streams_table.c.stream == stream)
    if lock and session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    row = session.connection().execute(query).first()
    return None if row is None else _status_of(row)


def _stream_rows(session: Session) -> dict[str, _StreamRow]:
    found: dict[str, _StreamRow] = {}
    for row in session.connection().execute(select(streams_table).order_by(streams_table.c.stream)):
        status = _status_of(row)
        stored_depths = {} if row.depths is None else json.loads(row.depths)
        depths = {str(asset): int(depth) for asset, depth in stored_depths.items()}
        found[row.stream] = _StreamRow(
            status, None if row.wire is None else bytes(row.wire), depths
        )
    return found


def load_ledger(
    engine: Engine, policy: CollateralPolicy, decimals: Mapping[str, int]
) -> tuple[MarginLedger, dict[str, StoredStream]]:
    """The ledger and the receiver state of every stream, as the tables hold them, read from one
    snapshot of the database (a read-only transaction: SQLite's WAL snapshot, PostgreSQL's
    REPEATABLE READ), so a load beside a writer that commits - another instance of the consumer
    group - sees that commit whole or not at all. The pending releases are rebuilt from the
    ``release`` journal entries. Raises InvariantViolation when the tables disagree with
    themselves: a stream's leaves that do not rebuild the roots its last signed statement
    states, a head whose digest is not that statement's, a release entry that does not describe
    a release, or anything :meth:`MarginLedger.restore` refuses. It takes no write lock, so a
    writer may call it from inside its own open transaction (to catch up with what another
    instance committed)."""
    reader = database.read_only(engine)
    check_schema(reader)

    def work(
        session: Session,
    ) -> tuple[
        dict[str, _StreamRow],
        dict[str, list[DisclosedLeaf]],
        dict[str, dict[int, bytes]],
        dict[str, dict[str, Price]],
        list[ExposureReport],
        list[ClientMargin],
        list[JournalEntry],
    ]:
        if session.get_bind().dialect.name == "postgresql":
            # One snapshot for every table below (READ COMMITTED would take one per statement).
            connection = session.connection(
                execution_options={"isolation_level": "REPEATABLE READ"}
            )
        else:
            connection = session.connection()
        rows = _stream_rows(session)
        leaves: dict[str, list[DisclosedLeaf]] = {}
        for stream, asset, position, account, salt, quantity in connection.execute(
            select(
                leaves_table.c.stream,
                leaves_table.c.asset,
                leaves_table.c.position,
                leaves_table.c.account,
                leaves_table.c.salt,
                leaves_table.c.quantity,
            )
        ):
            leaves.setdefault(stream, []).append(
                DisclosedLeaf(account, asset, int(position), bytes(salt), quantity)
            )
        history: dict[str, dict[int, bytes]] = {}
        for stream, sequence, digest in connection.execute(
            select(digests_table.c.stream, digests_table.c.sequence, digests_table.c.digest)
        ):
            history.setdefault(stream, {})[int(sequence)] = bytes(digest)
        prices: dict[str, dict[str, Price]] = {}
        for row in connection.execute(select(prices_table)):
            prices.setdefault(row.stream, {})[row.asset] = Price(
                row.asset, row.quote, row.mantissa, int(row.scale)
            )
        exposures = [
            ExposureReport(
                client=row.client,
                report_id=row.report_id,
                reported_at=row.reported_at,
                exposure=row.exposure,
                requirement=row.requirement,
                unrealised_pnl=row.unrealised_pnl,
            )
            for row in connection.execute(select(exposures_table))
        ]
        margins = [
            ClientMargin(
                client=row.client,
                state=MarginState(row.state),
                since=row.since,
                deadline=row.deadline,
            )
            for row in connection.execute(select(margins_table))
        ]
        releases = [
            _journal_entry(row)
            for row in connection.execute(
                select(journal_table)
                .where(journal_table.c.kind == "release")
                .order_by(journal_table.c.id)
            )
        ]
        return rows, leaves, history, prices, exposures, margins, releases

    rows, leaves, history, prices, exposures, margins, release_entries = run_transaction(
        reader, work, what="loading the ledger"
    )
    try:
        releases = compute_pending_releases(release_entries)
    except DecodeError as exc:
        raise InvariantViolation(f"a stored release entry is damaged: {exc}") from exc
    streams: dict[str, StoredStream] = {}
    positions: dict[str, dict[Holding, int]] = {}
    for stream in sorted(set(rows) | set(leaves) | set(history)):
        row = rows.get(stream)
        if row is None:
            raise InvariantViolation(f"{stream}: leaves or digests without a stream row")
        stored = _restore_stream(stream, row, leaves.get(stream, []), decimals=decimals)
        stored.history = history.get(stream, {})
        head = stored.head
        if head is not None and stored.history.get(head.sequence) != head.digest:
            raise InvariantViolation(f"{stream}: the head is missing from the digest history")
        streams[stream] = stored
        held = {
            (leaf.account, leaf.asset): leaf.quantity
            for leaf in leaves.get(stream, [])
            if leaf.quantity
        }
        if held:
            positions[stream] = held
    ledger = MarginLedger.restore(
        policy,
        decimals=decimals,
        streams=[row.status for row in rows.values()],
        positions=positions,
        prices=prices,
        exposures=exposures,
        margins=margins,
        releases=releases,
    )
    return ledger, streams


def _restore_stream(
    stream: str, row: _StreamRow, leaves: list[DisclosedLeaf], *, decimals: Mapping[str, int]
) -> StoredStream:
    head = row.status.head
    if head is None:
        if leaves or row.wire is not None:
            raise InvariantViolation(f"{stream}: leaves or a statement without a head")
        return StoredStream(ReceiverTrees(decimals))
    if row.wire is None:
        raise InvariantViolation(f"{stream}: a head without its signed statement")
    signed = SignedStatement.decode(row.wire, max_bytes=len(row.wire))
    statement = signed.statement
    if signed.digest != head.digest or statement.sequence != head.sequence:
        raise InvariantViolation(f"{stream}: the stored statement is not the head's")
    depths = {root.asset: root.depth for root in statement.assets}
    if depths != row.depths:
        raise InvariantViolation(f"{stream}: stored depths differ from the statement's")
    receiver = ReceiverTrees.restore(decimals, leaves, depths=depths)
    for root in statement.assets:
        tree = receiver.trees[root.asset]
        if (tree.root, tree.total, tree.count, tree.depth) != (
            root.root,
            root.total,
            root.count,
            root.depth,
        ):
            raise InvariantViolation(
                f"{stream}: stored {root.asset} leaves do not rebuild statement "
                f"{statement.sequence}'s root"
            )
    if extra := set(receiver.trees) - set(depths):
        raise InvariantViolation(f"{stream}: leaves of {sorted(extra)} not in the statement")
    custodian, exchange = parse_stream_key(stream)
    chain = ChainHead(
        custodian=custodian,
        exchange=exchange,
        sequence=statement.sequence,
        digest=signed.digest,
        issued_at=statement.issued_at,
    )
    return StoredStream(receiver, chain)
