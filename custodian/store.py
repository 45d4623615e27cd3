"""The custody book on a database (sqlmodel): tables, one transaction per command, queries.

What this module does: hold the book's tables, apply a command in one database transaction
(lock the two balances it touches, look its idempotency key up, let :mod:`custodian.book` accept
or reject it, insert the journal entry and its postings, update the balances, commit), and answer
queries (balances, units pledged per exchange, the journal, the invariant check). SQLite by
default, PostgreSQL by URL, same code; the schema comes from the Alembic migrations in
:mod:`custodian.migrations`, never from ``create_all``.

What it does not do: decide anything. Every rule (posting rules, limits, idempotency conflicts,
invariants) is in :mod:`custodian.book`; this module only reads what the rules need and persists
what they accepted.

Locking: on PostgreSQL each command creates its two balance rows if missing
(``INSERT ... ON CONFLICT DO NOTHING``) and locks them with ``SELECT ... FOR UPDATE``, one account
at a time in :class:`~custodian.book.Account` order, so two commands touching the same units
serialize and no lock cycle can form. On SQLite a command's transaction starts with ``BEGIN
IMMEDIATE``, which takes the database's write lock up front (after the process's in-process lock
for the file, :func:`bridge.database.sqlite_write_lock`); queries read one WAL snapshot without
taking it (:func:`bridge.database.read_only`). Lock conflicts the database resolves by aborting
(deadlock, serialization failure, "database is locked") are retried a few times, then surface as
:class:`~custodian.errors.BookUnavailable`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Self

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    ForeignKeyConstraint,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Select,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    func,
    update,
)
from sqlalchemy import select as sqlalchemy_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import registry
from sqlalchemy.sql.expression import Executable
from sqlmodel import Field, Session, SQLModel, select

from attestations.amounts import Asset
from attestations.canonical import parse_json_object
from bridge import database
from bridge.database import DEFAULT_MAX_ATTEMPTS, row_id_type
from custodian import migrations
from custodian.book import (
    Account,
    Command,
    Posting,
    RecordedEntry,
    ReleaseAckVerifier,
    Unpledge,
    compute_acceptance,
    compute_accounts,
    compute_balances_after,
    compute_command_bytes,
    compute_command_digest,
    compute_invariant_breaks,
    parse_command,
    pledged_to,
    record_release_ack_unverified,
    select_balances,
    select_totals,
    verify_retry,
)
from custodian.errors import (
    BookCorrupted,
    BookUnavailable,
    SchemaNotCurrent,
    UnsupportedDatabase,
)

_PAGE: Final = 1000


# --- column types -------------------------------------------------------------------------------


class Units(database.Units):
    """Exact minor units of the book's tables; a stored value that is not a canonical integer is
    :class:`~custodian.errors.BookCorrupted`."""

    cache_ok = True
    corrupted_error = BookCorrupted
    stored_what = "stored money"


class UtcDateTime(database.UtcDateTime):
    """Timezone-aware UTC timestamps of the book's tables; a naive one is a ``ValueError``."""

    cache_ok = True
    naive_error = ValueError
    stored_by = "the book"


# --- tables -------------------------------------------------------------------------------------

book_registry = registry(metadata=MetaData())
"""The book's own registry and metadata, so its migrations never see another package's tables."""


class _BookTable(SQLModel, registry=book_registry):
    pass


class BalanceRow(_BookTable, table=True):
    """Current balance of one account; the only mutable table. Rows are created by the first
    command that touches the account, inside that command's transaction."""

    __tablename__ = "book_balances"

    holder: str = Field(primary_key=True, max_length=128)
    asset: str = Field(primary_key=True, max_length=16)
    sub_account: str = Field(primary_key=True, max_length=80)
    balance: int = Field(sa_type=Units, nullable=False)
    last_entry_id: int = Field(sa_type=BigInteger, nullable=False)


class JournalEntryRow(_BookTable, table=True):
    """One applied command (insert-only). ``command`` is its canonical JSON, ``command_digest``
    what a retry under the same idempotency key must match."""

    __tablename__ = "book_journal_entries"
    __table_args__ = (
        UniqueConstraint("idempotency_key", name="uq_book_journal_entries_idempotency_key"),
        Index("ix_book_journal_entries_client_asset", "client", "asset"),
        # The release id a verified unpledge used: single use (migration 0003).
        Index("uq_book_journal_entries_release_ack", "release_ack", unique=True),
        {"sqlite_autoincrement": True},
    )

    entry_id: int | None = Field(
        default=None,
        sa_column=Column(row_id_type(), primary_key=True, autoincrement=True),
    )
    idempotency_key: str = Field(max_length=128)
    command_digest: str = Field(max_length=64)
    kind: str = Field(max_length=32)
    client: str = Field(max_length=128)
    asset: str = Field(max_length=16)
    command: str = Field(sa_type=Text)
    recorded_at: datetime = Field(sa_type=UtcDateTime)
    release_ack: str | None = Field(default=None, max_length=128)


class PostingRow(_BookTable, table=True):
    """One posting of a journal entry (insert-only); ``line`` keeps the entry's order."""

    __tablename__ = "book_postings"
    __table_args__ = (
        ForeignKeyConstraint(
            ["entry_id"],
            ["book_journal_entries.entry_id"],
            name="fk_book_postings_entry_id_book_journal_entries",
        ),
        ForeignKeyConstraint(
            ["holder", "asset", "sub_account"],
            ["book_balances.holder", "book_balances.asset", "book_balances.sub_account"],
            name="fk_book_postings_account_book_balances",
        ),
        Index("ix_book_postings_account", "holder", "asset", "sub_account"),
    )

    entry_id: int = Field(sa_column=Column(row_id_type(), primary_key=True, autoincrement=False))
    line: int = Field(
        sa_type=SmallInteger, primary_key=True, sa_column_kwargs={"autoincrement": False}
    )
    holder: str = Field(max_length=128)
    asset: str = Field(max_length=16)
    sub_account: str = Field(max_length=80)
    amount: int = Field(sa_type=Units, nullable=False)


metadata: Final = book_registry.metadata

# Release acknowledgements received from the exchange and verified (custodian/instructions.py),
# by release id, so an unpledge can name one (migration 0003).
release_acks_table: Final = Table(
    "book_release_acks",
    metadata,
    Column("release_id", String(64), nullable=False),
    Column("exchange", String(64), nullable=False),
    Column("client", String(128), nullable=False),
    Column("asset", String(16), nullable=False),
    Column("quantity", Units, nullable=False),
    Column("issued_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    # The signed acknowledgement's wire bytes (RFC 8785), as received.
    Column("wire", LargeBinary, nullable=False),
    PrimaryKeyConstraint("release_id", name="pk_book_release_acks"),
)
_balances: Final = metadata.tables["book_balances"]
_journal: Final = metadata.tables["book_journal_entries"]
_postings: Final = metadata.tables["book_postings"]

_BALANCE_KEY: Final = (
    (_balances.c.holder == bindparam("b_holder"))
    & (_balances.c.asset == bindparam("b_asset"))
    & (_balances.c.sub_account == bindparam("b_sub"))
)
_SELECT_BALANCE_FOR_UPDATE: Final = (
    sqlalchemy_select(_balances.c.balance).where(_BALANCE_KEY).with_for_update()
)
"""PostgreSQL locks the row until the end of the transaction; SQLite, which has no row locks,
drops FOR UPDATE (its transaction holds the database's write lock from BEGIN)."""
_UPDATE_BALANCE: Final = (
    update(_balances)
    .where(_BALANCE_KEY)
    .values(balance=bindparam("b_balance"), last_entry_id=bindparam("b_entry"))
)
_SELECT_RECORDED_DIGEST: Final = sqlalchemy_select(
    _journal.c.entry_id, _journal.c.command_digest
).where(_journal.c.idempotency_key == bindparam("b_key"))
_INSERT_MISSING_BALANCE: Final = {
    name: dialect_insert(_balances)
    .values(
        holder=bindparam("b_holder"),
        asset=bindparam("b_asset"),
        sub_account=bindparam("b_sub"),
        balance=0,
        last_entry_id=0,
    )
    .on_conflict_do_nothing(index_elements=["holder", "asset", "sub_account"])
    for name, dialect_insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}


def _insert_missing_balance(dialect: str) -> Executable:
    """``INSERT ... ON CONFLICT DO NOTHING`` of a zero balance row: created if missing, without
    failing when a concurrent transaction creates it first."""
    return _INSERT_MISSING_BALANCE[dialect]


def _balance_key(account: Account) -> dict[str, str]:
    return {"b_holder": account.holder, "b_asset": account.asset, "b_sub": account.sub_account}


# --- engine -------------------------------------------------------------------------------------


def create_book_engine(url: str) -> Engine:
    """An engine for the book: a ``sqlite:///path`` or ``postgresql+psycopg://`` URL. On SQLite
    foreign keys are enforced and every transaction takes the write lock at ``BEGIN``, before the
    balances a command reads."""
    return database.create_database_engine(
        url, owner="the custody book", unsupported=UnsupportedDatabase, sqlite_foreign_keys=True
    )


def _database_errors(what: str) -> contextlib.AbstractContextManager[None]:
    """Wrap driver errors that mean "not now" as BookUnavailable."""
    return database.database_errors(what, unavailable=BookUnavailable)


# --- the store ----------------------------------------------------------------------------------


class CustodyBook:
    """The custody book on a database. Construct it with :meth:`open` (which migrates the schema
    to head) or on an engine whose schema is already at head."""

    def __init__(
        self,
        engine: Engine,
        *,
        assets: Iterable[Asset],
        verify_release_ack: ReleaseAckVerifier = record_release_ack_unverified,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self._engine = engine
        # Queries read through this one: on SQLite they take no write lock (see
        # bridge.database.read_only), so they never queue behind commands or make them wait.
        self._reader = database.read_only(engine)
        self._mirrors: dict[str, _PledgeMirror] = {}
        self._mirrors_lock = threading.Lock()
        self._assets: Mapping[str, Asset] = {asset.code: asset for asset in assets}
        self._verify_release_ack = verify_release_ack
        self._max_attempts = max_attempts
        self._owns_engine = False
        database.verify_schema_current(
            engine,
            current_revision=migrations.current_revision,
            head_revision=migrations.head_revision(),
            schema="book schema",
            upgrade_with="custodian.migrations.upgrade",
            unavailable=BookUnavailable,
            not_current=SchemaNotCurrent,
        )

    @classmethod
    def open(
        cls,
        url: str,
        *,
        assets: Iterable[Asset],
        migrate: bool = True,
        verify_release_ack: ReleaseAckVerifier = record_release_ack_unverified,
    ) -> Self:
        """Connect to ``url``, upgrade its schema to head unless ``migrate`` is false, and return
        the book, which disposes of its engine on :meth:`close`."""
        engine = create_book_engine(url)
        try:
            if migrate:
                with _database_errors("migrating the book"):
                    migrations.upgrade(engine)
            book = cls(engine, assets=assets, verify_release_ack=verify_release_ack)
        except BaseException:
            engine.dispose()
            raise
        book._owns_engine = True
        return book

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- commands -------------------------------------------------------------------------------

    def apply(
        self, command: Command, *, now: datetime | None = None, release_ack: bytes | None = None
    ) -> RecordedEntry:
        """Apply ``command`` in one transaction and return its journal entry. A retry (same
        idempotency key, same content) returns the original entry and changes nothing; the same
        key with other content raises IdempotencyConflict; a rejected command leaves no trace.
        ``release_ack`` is the signed acknowledgement supplied with an unpledge."""
        moment = datetime.now(UTC) if now is None else now
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        moment = moment.astimezone(UTC)
        digest = compute_command_digest(command)
        # A unique-key conflict means a concurrent transaction committed the same idempotency key
        # first: the next try finds it and returns the replay (or the conflict).
        return database.run_with_retries(
            lambda: self._apply_once(command, digest=digest, moment=moment, ack=release_ack),
            what=f"applying {command.kind} {command.idempotency_key!r}",
            max_attempts=self._max_attempts,
            unavailable=BookUnavailable,
            corrupted=BookCorrupted,
        )

    def _apply_once(
        self, command: Command, *, digest: str, moment: datetime, ack: bytes | None
    ) -> RecordedEntry:
        # Core statements built once (module level), not ORM objects: a command holds SQLite's
        # write lock for as long as it runs, and the ORM's unit of work cost ~4 ms of CPU per
        # command, which every other writer then queued behind.
        with self._engine.connect() as connection, connection.begin():
            insert_missing = _insert_missing_balance(connection.dialect.name)
            balances: dict[Account, int] = {}
            for account in _lock_order(command):
                key = _balance_key(account)
                connection.execute(insert_missing, key)
                balance = connection.execute(_SELECT_BALANCE_FOR_UPDATE, key).scalar_one_or_none()
                if balance is None:
                    raise BookCorrupted(f"balance row of {account} vanished inside its transaction")
                balances[account] = int(balance)
            recorded = connection.execute(
                _SELECT_RECORDED_DIGEST, {"b_key": command.idempotency_key}
            ).first()
            if recorded is not None:
                verify_retry(command, recorded_digest=recorded.command_digest)
                with Session(bind=connection) as session:
                    row = session.get(JournalEntryRow, recorded.entry_id)
                    if row is None:
                        raise BookCorrupted("a recorded journal entry vanished")
                    return _load_entries(session, [row])[0]  # leaving rolls back
            used_by = None
            if isinstance(command, Unpledge):  # after the locks, like the key above
                used_by = connection.execute(
                    sqlalchemy_select(_journal.c.idempotency_key).where(
                        _journal.c.release_ack == command.release_ack
                    )
                ).scalar_one_or_none()
            accepted = compute_acceptance(
                command,
                balances,
                assets=self._assets,
                verify_release_ack=self._verify_release_ack,
                now=moment,
                signed_ack=ack,
                release_ack_used_by=used_by,
            )
            postings = accepted.postings
            inserted = connection.execute(
                _journal.insert().values(
                    idempotency_key=command.idempotency_key,
                    command_digest=digest,
                    kind=command.kind,
                    client=command.client,
                    asset=command.asset,
                    command=compute_command_bytes(command).decode("utf-8"),
                    recorded_at=moment,
                    release_ack=accepted.release_ack_used,
                )
            )
            entry_id = inserted.inserted_primary_key[0] if inserted.inserted_primary_key else None
            if entry_id is None:
                raise BookCorrupted("the database assigned no journal entry id")
            entry_id = int(entry_id)
            connection.execute(
                _postings.insert(),
                [
                    {
                        "entry_id": entry_id,
                        "line": line,
                        "holder": posting.account.holder,
                        "asset": posting.account.asset,
                        "sub_account": posting.account.sub_account,
                        "amount": posting.amount,
                    }
                    for line, posting in enumerate(postings)
                ],
            )
            connection.execute(
                _UPDATE_BALANCE,
                [
                    {**_balance_key(account), "b_balance": balance, "b_entry": entry_id}
                    for account, balance in compute_balances_after(balances, postings).items()
                ],
            )
            return RecordedEntry(entry_id, moment, command, postings)

    # --- queries --------------------------------------------------------------------------------

    def balances(
        self, *, client: str | None = None, asset: str | None = None
    ) -> dict[Account, int]:
        """Non-zero client balances (per client, asset and sub-account), optionally of one
        client and/or one asset, in account order."""
        query = select(BalanceRow)
        if client is not None:
            query = query.where(BalanceRow.holder == client)
        if asset is not None:
            query = query.where(BalanceRow.asset == asset)
        with _database_errors("reading balances"), Session(self._reader) as session:
            rows = session.exec(query).all()
        return select_balances(_as_balances(rows), client=client, asset=asset)

    def pledged(self, exchange: str) -> dict[tuple[str, str], int]:
        """Units pledged to ``exchange`` per (client, asset), non-zero only, ordered by (client,
        asset): what an attestation epoch for that exchange commits to. One consistent
        snapshot of the book.

        Every epoch asks for every pledge, and reading and converting 1,000 rows cost ~5 ms of
        CPU per epoch. On SQLite the book therefore keeps what it read per exchange and reads
        only the balances changed since, by journal position (see :class:`_PledgeMirror`). On
        PostgreSQL every call reads every pledged balance: there, journal ids are handed out at
        insert and transactions commit in any order, so "changed since id N" could miss a
        transaction that took an id below N and committed after the read."""
        with self._mirrors_lock:
            mirror = self._mirrors.get(exchange)
            if mirror is None:
                mirror = self._mirrors[exchange] = _PledgeMirror()
            with _database_errors("reading pledges"), self._reader.connect() as connection:
                if self._engine.dialect.name == "sqlite":
                    mirror.refresh(connection, exchange=exchange)
                else:
                    mirror.reload(connection, exchange=exchange)
            return dict(mirror.holdings)

    def totals(self) -> dict[str, int]:
        """Units held in custody per asset: every unit that entered (deposits, yield) minus every
        unit that left (withdrawals, completed redemptions), over all clients."""
        query = select(BalanceRow).where(BalanceRow.sub_account == "external")
        with _database_errors("reading totals"), Session(self._reader) as session:
            rows = session.exec(query).all()
        return select_totals(_as_balances(rows))

    def journal(self, *, after: int = 0, limit: int = _PAGE) -> list[RecordedEntry]:
        """Up to ``limit`` journal entries with ids above ``after``, in journal order."""
        with _database_errors("reading the journal"), Session(self._reader) as session:
            return _journal_page(session, after=after, limit=limit)

    def journal_position(self) -> int:
        """The id of the latest journal entry (0 for an empty book): one indexed read, cheap
        enough to poll for changes made by other processes."""
        query = sqlalchemy_select(func.max(JournalEntryRow.entry_id))
        with _database_errors("reading the journal position"), Session(self._reader) as session:
            return int(session.execute(query).scalar_one_or_none() or 0)

    def entry(self, idempotency_key: str) -> RecordedEntry | None:
        """The entry recorded under ``idempotency_key``, if any."""
        query = select(JournalEntryRow).where(JournalEntryRow.idempotency_key == idempotency_key)
        with _database_errors("reading the journal"), Session(self._reader) as session:
            row = session.exec(query).first()
            return None if row is None else _load_entries(session, [row])[0]

    def check_invariants(self) -> list[str]:
        """Recompute every balance from the postings and return every broken invariant (see
        :func:`custodian.book.compute_invariant_breaks`); empty when the book is sound. Reads
        the journal and the balances in one snapshot."""
        with _database_errors("checking the book"), self._snapshot_session() as session:
            balances = _as_balances(session.exec(select(BalanceRow)).all())
            return compute_invariant_breaks(_all_entries(session), balances)

    def verify_invariants(self) -> None:
        """Raise BookCorrupted listing every break when :meth:`check_invariants` finds any."""
        breaks = self.check_invariants()
        if breaks:
            raise BookCorrupted("; ".join(breaks))

    @contextlib.contextmanager
    def _snapshot_session(self) -> Iterator[Session]:
        if self._engine.dialect.name == "postgresql":
            with (
                self._engine.connect().execution_options(
                    isolation_level="REPEATABLE READ"
                ) as connection,
                Session(bind=connection) as session,
            ):
                yield session
        else:  # SQLite (WAL): a read-only transaction reads one snapshot from its first read on
            with Session(self._reader) as session:
                yield session


# --- pledges per exchange -----------------------------------------------------------------------


class _PledgeMirror:
    """The pledged balances of one exchange as of a journal position, brought up to date by
    reading only the balance rows whose ``last_entry_id`` is past that position.

    Sound on SQLite only: one writer at a time, and AUTOINCREMENT ids above every id ever
    used, so in any snapshot the committed journal entries are exactly those up to the highest
    id, and a balance changed after a snapshot carries an entry id above that snapshot's highest.
    Every command that changes a balance sets its ``last_entry_id`` in the same transaction
    (:meth:`CustodyBook._apply_once`)."""

    def __init__(self) -> None:
        self.holdings: dict[tuple[str, str], int] = {}
        """Non-zero pledges, ordered by (client, asset)."""
        self.through: int | None = None
        """The journal position ``holdings`` reflect; None before the first read."""

    def reload(self, connection: Connection, *, exchange: str) -> None:
        """Read every pledged balance (any database)."""
        rows = connection.execute(_pledged_query(exchange)).all()
        self.holdings = {(h, a): balance for h, a, balance in sorted(rows) if balance}
        self.through = None

    def refresh(self, connection: Connection, *, exchange: str) -> None:
        """Bring ``holdings`` up to date inside ``connection``'s (read, snapshot) transaction.
        The journal position is read first, in the same snapshot as the rows."""
        through = int(
            connection.execute(sqlalchemy_select(func.max(_journal.c.entry_id))).scalar_one() or 0
        )
        if self.through is None:
            query = _pledged_query(exchange)
        else:
            query = _pledged_query(exchange).where(_balances.c.last_entry_id > self.through)
        rows = connection.execute(query).all()
        added = False
        for holder, asset, balance in rows:
            holding = (str(holder), str(asset))
            if balance:
                added = added or holding not in self.holdings
                self.holdings[holding] = balance
            else:
                self.holdings.pop(holding, None)
        if added:
            self.holdings = dict(sorted(self.holdings.items()))
        self.through = through


def _pledged_query(exchange: str) -> Select[Any]:
    # Three columns, not BalanceRow objects: building an ORM object per row is what made
    # reading every pledge slow.
    return sqlalchemy_select(_balances.c.holder, _balances.c.asset, _balances.c.balance).where(
        _balances.c.sub_account == pledged_to(exchange)
    )


# --- row helpers --------------------------------------------------------------------------------


def _lock_order(command: Command) -> list[Account]:
    return sorted(set(compute_accounts(command)))


def _as_balances(rows: Iterable[BalanceRow]) -> dict[Account, int]:
    return {Account(row.holder, row.asset, row.sub_account): row.balance for row in rows}


def _journal_page(session: Session, *, after: int, limit: int) -> list[RecordedEntry]:
    rows = session.exec(
        select(JournalEntryRow)
        .where(JournalEntryRow.entry_id > after)  # type: ignore[operator]
        .order_by(JournalEntryRow.entry_id)  # type: ignore[arg-type]
        .limit(limit)
    ).all()
    return _load_entries(session, rows)


def _all_entries(session: Session) -> Iterator[RecordedEntry]:
    after = 0
    while page := _journal_page(session, after=after, limit=_PAGE):
        yield from page
        after = page[-1].entry_id


def _load_entries(session: Session, rows: Sequence[JournalEntryRow]) -> list[RecordedEntry]:
    ids = [row.entry_id for row in rows]
    postings: dict[int, list[Posting]] = {entry_id: [] for entry_id in ids if entry_id}
    for posting in session.exec(
        select(PostingRow)
        .where(PostingRow.entry_id.in_(ids))  # type: ignore[attr-defined]
        .order_by(PostingRow.entry_id, PostingRow.line)  # type: ignore[arg-type]
    ):
        account = Account(posting.holder, posting.asset, posting.sub_account)
        postings[posting.entry_id].append(Posting(account, posting.amount))
    entries = []
    for row in rows:
        if row.entry_id is None:
            raise BookCorrupted("journal entry without id")
        command = parse_command(parse_json_object(row.command))
        entries.append(
            RecordedEntry(row.entry_id, row.recorded_at, command, tuple(postings[row.entry_id]))
        )
    return entries
