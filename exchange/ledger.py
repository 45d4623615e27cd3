"""The exchange's margin ledger, in memory and pure: what has been credited, and what follows.

:class:`MarginLedger` holds, per stream (``<custodian>/<exchange>``), the head of the last
accepted statement, its freeze and resynchronisation flags, the virtual positions it credits
(quantity per (account, asset)) and the prices of its price snapshot; per client, the latest
exposure report of the trading engine and the margin state. Values are never stored: a client's
collateral is computed when asked, from the quantities, the stream's prices and the stream's
freshness at ``now``, so a price or a clock moving never leaves a stale value behind.

Plan, persist, apply. Every ``plan_*`` method returns a :class:`LedgerChange` and changes
NOTHING: the caller writes the change (new statuses, positions, prices, exposures, margin states,
journal entries, notices for the outbox) in one database transaction, and only after the commit
calls :meth:`MarginLedger.apply`. A change carries the generation it was planned against;
applying it over a ledger that moved since raises InvariantViolation (a change applied twice, or
two plans interleaved, is a bug, never a race to paper over). So the in-memory ledger - which
answers the pre-trade check - is always a state the database holds.

Pre-trade checks read memory only, in O(streams of the client x assets): per-client indexes
(client -> stream -> assets held) avoid scanning anything else. After a statement only the clients
it can affect are re-evaluated: those with exposure or an open margin state that hold positions
on the stream (its prices and freshness changed for all of them) and those whose holdings changed.

Releases (docs/exchange.md, "Releases"): :meth:`MarginLedger.check_release` decides whether a
client may take units of one asset back from its pledge on one stream; :meth:`plan_release`
records the release the exchange acknowledged as a :class:`PendingRelease`, which *caps* the
holding's counted quantity until a statement issued at or after the acknowledgement's expiry
(any unpledge under it happened before, so that statement shows it), so the released units are
never counted twice between the acknowledgement and the statement that shows the unpledge.

What this module does not do: verify statements (attestations.verify and the consumer do, before
anything reaches :meth:`MarginLedger.plan_statement`), persist, publish, sign notices or read the
clock (every method takes ``now``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Final, TypeVar

from attestations.amounts import UNITS_LIMIT, Price, check_units, validate_asset_code
from attestations.errors import AmountError, DecodeError, InvariantViolation, PolicyViolation
from attestations.merkle import validate_account
from attestations.statement import MAX_SEQUENCE, StatementKind
from bridge.topics import parse_stream_key
from exchange.errors import StreamFrozen, StreamNotFrozen, UnknownStream
from exchange.policy import (
    BPS,
    CollateralPolicy,
    Freshness,
    MarginState,
    NoticeKind,
    compute_credit_limit,
    compute_equity,
    compute_freshness,
    compute_margin_ratio_bps,
    compute_position_value,
    compute_shortfall,
    compute_transition,
)

Holding = tuple[str, str]
"""(account, asset)"""

JOURNAL_KINDS: Final = frozenset(
    {
        "credit",  # a position's quantity changed: quantity = new, detail before = old
        "statement",  # the stream's head moved
        "resync",  # a snapshot accepted without linking to the head: detail from/to skipped
        "exposure",  # a new exposure report
        "state",  # a margin state change: detail before/after/reason
        "freeze",  # credit frozen after a fork
        "resolve",  # an operator resolved the fork: detail operator/reason
        "price_missing",  # a statement attests an asset without pricing it: counted at zero
        "await_snapshot",  # a gap: a snapshot was requested from detail from_sequence
        "release",  # a release acknowledged: quantity released, detail release_id/cap/expiry
    }
)

RELEASE_REASONS: Final = frozenset(
    {
        "unknown_client",
        "not_credited",
        "exceeds_credited",
        "stream_frozen",
        "stream_stale",
        "not_healthy",
        "insufficient_credit",
    }
)

PRETRADE_REASONS: Final = frozenset(
    {"not_healthy", "stream_stale", "stream_frozen", "insufficient_credit", "unknown_client"}
)

_K = TypeVar("_K")
_V = TypeVar("_V")
_DIGEST_BYTES: Final = 32
_MAX_REPORT_ID: Final = 128
_MAX_TEXT: Final = 1_000


def _aware(value: object, *, what: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise DecodeError(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value


def _int(value: object, *, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"{what}: expected int, got {type(value).__name__}")
    if not low <= value <= high:
        raise DecodeError(f"{what} {value} not in {low}..{high}")
    return value


def _text(value: object, *, what: str, limit: int = _MAX_TEXT) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise DecodeError(f"{what} must be a non-empty string of at most {limit} characters")
    return value


def _signed_amount(value: object, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmountError(f"{what}: expected int, got {type(value).__name__}")
    if not -UNITS_LIMIT < value < UNITS_LIMIT:
        raise AmountError(f"{what} {value} does not fit in 128 bits and a sign")
    return value


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _frozen_map(items: Mapping[_K, _V]) -> Mapping[_K, _V]:
    return MappingProxyType(dict(items))


_NEW_HOLDING: Final[Mapping[str, str | int]] = MappingProxyType({"before": 0})
"""The detail of a ``credit`` entry for a holding that did not exist: one read-only mapping shared
by every such entry (a first snapshot of 100,000 leaves makes 100,000 of them)."""
_EVERY_STREAM_LIVE: Final = datetime(1, 1, 1, tzinfo=UTC)
"""A moment before any statement was issued: every stream is fresh then, so an assessment at this
moment values every position, whatever the streams' ages (see ``MarginLedger._covered_at``)."""


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamHead:
    """The last statement accepted on a stream."""

    stream: str
    custodian: str
    sequence: int
    digest: bytes
    kind: str
    issued_at: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        custodian, _ = parse_stream_key(self.stream)
        if self.custodian != custodian:
            raise DecodeError(f"stream {self.stream} is not a stream of custodian {self.custodian}")
        _int(self.sequence, what="sequence", low=1, high=MAX_SEQUENCE)
        if not isinstance(self.digest, bytes) or len(self.digest) != _DIGEST_BYTES:
            raise DecodeError("a statement digest is 32 bytes")
        StatementKind(self.kind)
        _aware(self.issued_at, what="issued_at")
        _aware(self.expires_at, what="expires_at")
        if self.expires_at <= self.issued_at:
            raise DecodeError("a statement must expire after it is issued")


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """A stream's head (None before its first statement), whether its credit is frozen after a
    fork (and why), and the sequence from which a snapshot was requested after a gap.

    ``stream`` names the stream; it is taken from ``head`` when omitted, and is required for a
    stream frozen or awaiting a snapshot before any statement was accepted on it."""

    head: StreamHead | None
    frozen: bool
    frozen_reason: str | None
    awaiting_snapshot_from: int | None
    stream: str | None = None

    def __post_init__(self) -> None:
        if self.head is not None:
            if self.stream is None:
                object.__setattr__(self, "stream", self.head.stream)
            elif self.stream != self.head.stream:
                raise DecodeError(f"status of {self.stream} carries a head of {self.head.stream}")
        elif self.stream is not None:
            parse_stream_key(self.stream)
        if not isinstance(self.frozen, bool):
            raise DecodeError("frozen must be a bool")
        if self.frozen:
            _text(self.frozen_reason, what="frozen_reason")
        elif self.frozen_reason is not None:
            raise DecodeError("a stream that is not frozen has no frozen_reason")
        if self.awaiting_snapshot_from is not None:
            _int(
                self.awaiting_snapshot_from, what="awaiting_snapshot_from", low=1, high=MAX_SEQUENCE
            )


@dataclass(frozen=True, slots=True)
class CreditedStatement:
    """What a verified statement credits: built by the consumer from the VerifiedStatement and
    its disclosure. ``changed`` maps each holding the statement sets or clears to its new quantity
    (0 = no longer held); for a ``snapshot`` it is the complete set and every other holding of the
    stream goes to 0. ``prices`` is the statement's price snapshot by asset; prices in another
    quote than the policy's are ignored."""

    stream: str
    custodian: str
    head: StreamHead
    changed: Mapping[Holding, int]
    snapshot: bool
    prices: Mapping[str, Price]

    def __post_init__(self) -> None:
        if (self.head.stream, self.head.custodian) != (self.stream, self.custodian):
            raise DecodeError("the credited statement's head belongs to another stream")
        if self.snapshot != (self.head.kind == StatementKind.SNAPSHOT):
            raise DecodeError(f"snapshot={self.snapshot} but the statement is a {self.head.kind}")
        for holding, quantity in self.changed.items():
            if not isinstance(holding, tuple) or len(holding) != 2:
                raise DecodeError("a holding is an (account, asset) pair")
            validate_account(holding[0])
            validate_asset_code(holding[1])
            check_units(quantity, what=f"{holding[0]} {holding[1]} quantity")
        for asset, price in self.prices.items():
            if not isinstance(price, Price) or price.asset != asset:
                raise DecodeError(f"the price listed under {asset} is not a price of {asset}")
        object.__setattr__(self, "changed", _frozen_map(self.changed))
        object.__setattr__(self, "prices", _frozen_map(self.prices))


@dataclass(frozen=True, slots=True)
class ExposureReport:
    """The trading engine's view of one client at ``reported_at``, in quote minor units:
    ``exposure`` (what credit covers), ``requirement`` (the margin the positions need) and the
    unrealised profit or loss."""

    client: str
    report_id: str
    reported_at: datetime
    exposure: int
    requirement: int
    unrealised_pnl: int

    def __post_init__(self) -> None:
        validate_account(self.client)
        _text(self.report_id, what="report_id", limit=_MAX_REPORT_ID)
        _aware(self.reported_at, what="reported_at")
        check_units(self.exposure, what="exposure")
        check_units(self.requirement, what="requirement")
        _signed_amount(self.unrealised_pnl, what="unrealised pnl")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One audited change (:data:`JOURNAL_KINDS`)."""

    at: datetime
    kind: str
    client: str | None = None
    stream: str | None = None
    asset: str | None = None
    sequence: int | None = None
    quantity: int | None = None
    value: int | None = None
    detail: Mapping[str, str | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _aware(self.at, what="journal time")
        if self.kind not in JOURNAL_KINDS:
            raise DecodeError(f"unknown journal kind {self.kind!r}")
        if type(self.detail) is not MappingProxyType:
            # A read-only proxy is taken as it is: the ledger shares one between the entries
            # that have the same detail. Anything else is copied, so a caller changing its dict
            # later does not change the entry.
            object.__setattr__(self, "detail", _frozen_map(self.detail))


@dataclass(frozen=True, slots=True)
class Notice:
    """A margin call or liquidation-due notice to publish (signed by attestations.notices).
    ``custodians`` are every custodian holding collateral of the client, so each one learns of
    it; ``deadline`` is the margin call's deadline (``at`` itself when liquidation is already
    due), None on a liquidation-due notice."""

    kind: NoticeKind
    client: str
    custodians: tuple[str, ...]
    at: datetime
    deadline: datetime | None
    collateral: int
    equity: int
    requirement: int
    ratio_bps: int | None
    shortfall: int


@dataclass(frozen=True, slots=True)
class ClientMargin:
    """A client's margin state since ``since``; ``deadline`` is set exactly in margin call."""

    client: str
    state: MarginState
    since: datetime
    deadline: datetime | None

    def __post_init__(self) -> None:
        validate_account(self.client)
        object.__setattr__(self, "state", MarginState(self.state))
        _aware(self.since, what="since")
        if (self.state is MarginState.MARGIN_CALL) != (self.deadline is not None):
            raise DecodeError("a deadline is set exactly when the client is in margin call")
        if self.deadline is not None:
            _aware(self.deadline, what="deadline")


@dataclass(frozen=True, slots=True)
class LedgerChange:
    """Everything one planned step changes, planned against ``generation``. Persist it, then
    :meth:`MarginLedger.apply` it. ``positions`` holds, per stream, the new quantity of each
    holding that changed (0 = delete); for a stream in ``replace_positions`` it is the stream's
    complete set of positions. ``prices`` is the whole price table of each stream it names."""

    generation: int
    streams: Mapping[str, StreamStatus] = field(default_factory=dict)
    positions: Mapping[str, Mapping[Holding, int]] = field(default_factory=dict)
    replace_positions: frozenset[str] = frozenset()
    prices: Mapping[str, Mapping[str, Price]] = field(default_factory=dict)
    exposures: Mapping[str, ExposureReport] = field(default_factory=dict)
    margins: Mapping[str, ClientMargin] = field(default_factory=dict)
    journal: tuple[JournalEntry, ...] = ()
    notices: tuple[Notice, ...] = ()
    releases: Mapping[str, tuple[PendingRelease, ...]] = field(default_factory=dict)
    """Per client, its complete set of pending releases after the change."""

    @property
    def is_empty(self) -> bool:
        """True when applying it changes nothing (a replayed or older report, a repeated
        freeze, an evaluation where nothing moved)."""
        return not (
            self.streams
            or self.positions
            or self.replace_positions
            or self.prices
            or self.exposures
            or self.margins
            or self.journal
            or self.notices
            or self.releases
        )


@dataclass(frozen=True, slots=True)
class PretradeDecision:
    """``headroom`` is the exposure the client may still add now: 0 when refused for any reason
    but ``insufficient_credit``, where it is what is left of the credit limit."""

    allowed: bool
    reason: str | None
    headroom: int


@dataclass(frozen=True, slots=True)
class PositionView:
    """One position as valued at a moment: ``value`` is what it counts for in collateral (0
    once the stream's last statement is counted as zero). ``quantity`` is what the statement
    credits; ``reserved`` the part of it pending releases keep out of the value."""

    stream: str
    custodian: str
    asset: str
    quantity: int
    price: Price | None
    rate_bps: int
    value: int
    freshness: Freshness
    frozen: bool
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class PendingRelease:
    """A release the exchange acknowledged (``release_id``) and whose unpledge no statement has
    shown for certain yet: while it is *active*, the ledger counts at most ``cap`` units of the
    client's ``asset`` on ``stream``. ``cap`` is the quantity counted when the release was given
    minus ``quantity``, so the released units count neither before nor after the statement that
    shows the unpledge. Active while the stream's head was issued before ``expires_at``."""

    release_id: str
    client: str
    stream: str
    asset: str
    quantity: int
    cap: int
    issued_at: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.release_id, str) or len(self.release_id) != 2 * _DIGEST_BYTES:
            raise DecodeError("a release id is 64 hex characters")
        validate_account(self.client)
        parse_stream_key(self.stream)
        validate_asset_code(self.asset)
        if check_units(self.quantity, what="released quantity") == 0:
            raise DecodeError("a release releases at least one unit")
        check_units(self.cap, what="release cap")
        _aware(self.issued_at, what="issued_at")
        _aware(self.expires_at, what="expires_at")
        if self.expires_at <= self.issued_at:
            raise DecodeError("a release must expire after it is given")

    def is_active(self, head: StreamHead | None) -> bool:
        """True until the stream's head is a statement issued at or after the expiry."""
        return head is None or head.issued_at < self.expires_at

    def journal_entry(self, *, at: datetime, credited: int) -> JournalEntry:
        """The ``release`` journal entry that records it (and from which a restart rebuilds it,
        :func:`compute_pending_releases`)."""
        return JournalEntry(
            at=at,
            kind="release",
            client=self.client,
            stream=self.stream,
            asset=self.asset,
            quantity=self.quantity,
            value=self.cap,
            detail={
                "release_id": self.release_id,
                "cap": self.cap,
                "credited": credited,
                "issued_at": _stamp(self.issued_at),
                "expires_at": _stamp(self.expires_at),
            },
        )


def compute_pending_releases(entries: Iterable[JournalEntry]) -> tuple[PendingRelease, ...]:
    """The pending releases the ``release`` journal entries record (other kinds are skipped), to
    restore a ledger after a restart: pass them to :meth:`MarginLedger.restore`, which drops the
    ones no longer active. Raises DecodeError for an entry that does not describe a release."""
    releases = []
    for entry in entries:
        if entry.kind != "release":
            continue
        detail = entry.detail
        if entry.client is None or entry.stream is None or entry.asset is None:
            raise DecodeError("a release entry names its client, stream and asset")
        releases.append(
            PendingRelease(
                release_id=str(detail.get("release_id")),
                client=entry.client,
                stream=entry.stream,
                asset=entry.asset,
                quantity=_int(entry.quantity, what="released quantity", low=1, high=UNITS_LIMIT),
                cap=_int(detail.get("cap"), what="release cap", low=0, high=UNITS_LIMIT),
                issued_at=_parse_stamp(detail.get("issued_at")),
                expires_at=_parse_stamp(detail.get("expires_at")),
            )
        )
    return tuple(releases)


def _active_releases(
    releases: Iterable[PendingRelease], statuses: Mapping[str, StreamStatus]
) -> dict[str, tuple[PendingRelease, ...]]:
    """Per client, the releases still active under the stream heads ``statuses``."""
    active: dict[str, tuple[PendingRelease, ...]] = {}
    for release in releases:
        status = statuses.get(release.stream)
        if release.is_active(status.head if status is not None else None):
            active[release.client] = (*active.get(release.client, ()), release)
    return active


def _parse_stamp(value: object) -> datetime:
    if not isinstance(value, str):
        raise DecodeError(f"a journal time is a string, got {type(value).__name__}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise DecodeError(f"{value[:40]!r} is not a journal time") from exc
    return _aware(moment, what="journal time")


@dataclass(frozen=True, slots=True)
class ReleaseDecision:
    """May the client release ``quantity``? ``releasable`` is what the client holds on the
    stream and the ledger still counts (the most any release could take, before the margin
    checks); after an allowed release, ``collateral`` and ``credit_limit`` are the client's with
    the release reserved."""

    allowed: bool
    reason: str | None
    releasable: int
    collateral: int
    credit_limit: int


@dataclass(frozen=True, slots=True)
class ClientStatus:
    client: str
    collateral: int
    credit_limit: int
    exposure: int
    requirement: int
    unrealised_pnl: int
    equity: int
    ratio_bps: int | None
    state: MarginState
    deadline: datetime | None
    positions: tuple[PositionView, ...]


@dataclass(frozen=True, slots=True)
class LedgerState:
    """Everything the ledger holds, for comparison (a restored ledger and one that replayed the
    same changes must be equal) and inspection."""

    streams: Mapping[str, StreamStatus]
    positions: Mapping[str, Mapping[Holding, int]]
    prices: Mapping[str, Mapping[str, Price]]
    exposures: Mapping[str, ExposureReport]
    margins: Mapping[str, ClientMargin]
    releases: Mapping[str, tuple[PendingRelease, ...]] = field(default_factory=dict)


# --- planning overlay ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """What a plan has decided so far; the ledger reads through it while planning."""

    streams: dict[str, StreamStatus] = field(default_factory=dict)
    prices: dict[str, dict[str, Price]] = field(default_factory=dict)
    # client -> (stream, asset) -> new quantity (0 = no longer held)
    holdings: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)
    exposures: dict[str, ExposureReport] = field(default_factory=dict)
    margins: dict[str, ClientMargin] = field(default_factory=dict)
    releases: dict[str, tuple[PendingRelease, ...]] = field(default_factory=dict)


_NOTHING_PENDING: Final = _Pending()
_PROBE_VALIDITY: Final = timedelta(days=1)
"""A release being checked is treated as active for the assessment, whatever its real expiry."""


@dataclass(frozen=True, slots=True)
class _Assessment:
    collateral: int
    credit_limit: int
    exposure: int
    requirement: int
    unrealised_pnl: int
    equity: int
    ratio_bps: int | None
    custodians: tuple[str, ...]
    any_frozen: bool
    any_stale: bool  # stale or zero
    positions: tuple[PositionView, ...]


class MarginLedger:
    """See the module docstring. ``decimals`` is the exchange's asset table (asset ->
    decimals of its minor unit), the same table the receiver's trees check statements against."""

    def __init__(self, policy: CollateralPolicy, *, decimals: Mapping[str, int]) -> None:
        self.policy = policy
        self.decimals: Mapping[str, int] = MappingProxyType(
            {
                validate_asset_code(a): _int(d, what=f"{a} decimals", low=0, high=18)
                for a, d in decimals.items()
            }
        )
        self.generation = 0
        self._streams: dict[str, StreamStatus] = {}
        self._positions: dict[str, dict[Holding, int]] = {}
        self._prices: dict[str, dict[str, Price]] = {}
        self._exposures: dict[str, ExposureReport] = {}
        self._margins: dict[str, ClientMargin] = {}
        self._releases: dict[str, tuple[PendingRelease, ...]] = {}  # client -> pending releases
        # Indexes, maintained by apply() only.
        self._holdings: dict[str, dict[str, set[str]]] = {}  # client -> stream -> assets
        self._stream_clients: dict[str, dict[str, int]] = {}  # stream -> client -> assets held
        self._stream_assets: dict[str, dict[str, int]] = {}  # stream -> asset -> holders
        self._exposed: set[str] = set()  # clients with exposure or requirement, or not healthy
        # The generation at which every healthy client is known to be covered (ratio none or at
        # or above the margin-call level) with every stream's positions counted, whatever the
        # streams' ages: then a statement that changes neither the stream's prices nor any
        # release cap cannot move a healthy holder whose holdings it leaves alone (see
        # plan_statement). Every plan keeps the property (a client it may lower is evaluated, a
        # release is allowed only within the margin), so apply() carries it to the next
        # generation; a restore checks it; a change of state outside apply() (a reset) moves the
        # generation without it, and the next statement finds out again. None: not known.
        self._covered_at: int | None = 0
        # The generation at which that property is known NOT to hold (a restore or a reset under
        # another policy): statements evaluate every holder until an evaluation finds nothing.
        self._uncovered_at: int | None = None

    # --- restore and inspect --------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        policy: CollateralPolicy,
        *,
        decimals: Mapping[str, int],
        streams: Iterable[StreamStatus],
        positions: Mapping[str, Mapping[Holding, int]],
        prices: Mapping[str, Mapping[str, Price]],
        exposures: Iterable[ExposureReport],
        margins: Iterable[ClientMargin],
        releases: Iterable[PendingRelease] = (),
    ) -> MarginLedger:
        """The ledger as persisted (a restart rebuilds it from the tables). Raises
        InvariantViolation when the persisted state is inconsistent (positions of a stream
        without a head, an asset outside the asset table, a client listed twice)."""
        ledger = cls(policy, decimals=decimals)
        statuses: dict[str, StreamStatus] = {}
        for status in streams:
            if status.stream is None:
                raise InvariantViolation("a persisted stream status must name its stream")
            if status.stream in statuses:
                raise InvariantViolation(f"stream {status.stream} persisted twice")
            statuses[status.stream] = status
        for stream, held in positions.items():
            known = statuses.get(stream)
            if held and (known is None or known.head is None):
                raise InvariantViolation(f"positions of stream {stream}, which has no head")
            for (account, asset), quantity in held.items():
                validate_account(account)
                if asset not in ledger.decimals:
                    raise InvariantViolation(f"a position in {asset}, not in the asset table")
                if check_units(quantity) == 0:
                    raise InvariantViolation(f"a persisted zero position of {account} {asset}")
        reports: dict[str, ExposureReport] = {}
        for report in exposures:
            if report.client in reports:
                raise InvariantViolation(f"two exposure reports persisted for {report.client}")
            reports[report.client] = report
        states: dict[str, ClientMargin] = {}
        for margin in margins:
            if margin.client in states:
                raise InvariantViolation(f"two margin states persisted for {margin.client}")
            states[margin.client] = margin
        ledger.apply(
            LedgerChange(
                generation=0,
                releases=_active_releases(releases, statuses),
                streams=statuses,
                positions={s: dict(h) for s, h in positions.items()},
                replace_positions=frozenset(positions),
                prices={s: dict(p) for s, p in prices.items()},
                exposures=reports,
                margins=states,
            )
        )
        ledger.generation = 0
        ledger._covered_at = None
        ledger._learn_coverage()
        return ledger

    def state(self) -> LedgerState:
        """A copy of everything the ledger holds."""
        return LedgerState(
            streams=dict(self._streams),
            positions={s: dict(h) for s, h in self._positions.items()},
            prices={s: dict(p) for s, p in self._prices.items()},
            exposures=dict(self._exposures),
            margins=dict(self._margins),
            releases=dict(self._releases),
        )

    def check_indexes(self) -> None:
        """Recompute the indexes from the positions and compare; InvariantViolation if they
        disagree (for tests and for an operator's consistency check)."""
        holdings: dict[str, dict[str, set[str]]] = {}
        stream_clients: dict[str, dict[str, int]] = {}
        stream_assets: dict[str, dict[str, int]] = {}
        for stream, held in self._positions.items():
            for account, asset in held:
                holdings.setdefault(account, {}).setdefault(stream, set()).add(asset)
                clients = stream_clients.setdefault(stream, {})
                clients[account] = clients.get(account, 0) + 1
                assets = stream_assets.setdefault(stream, {})
                assets[asset] = assets.get(asset, 0) + 1
        exposed = {c for c in set(self._exposures) | set(self._margins) if self._is_exposed(c)}
        if (holdings, stream_clients, stream_assets, exposed) != (
            self._holdings,
            self._stream_clients,
            self._stream_assets,
            self._exposed,
        ):
            raise InvariantViolation("the ledger's indexes disagree with its positions")

    def stream_status(self, stream: str) -> StreamStatus | None:
        return self._streams.get(stream)

    def streams(self) -> dict[str, StreamStatus]:
        return dict(self._streams)

    def client_margin(self, client: str) -> ClientMargin | None:
        """The client's stored margin state (None when it never left the default, healthy)."""
        return self._margins.get(client)

    def clients(self) -> list[str]:
        """Every client the ledger knows: with positions, an exposure report or a margin state."""
        return sorted(set(self._holdings) | set(self._exposures) | set(self._margins))

    def positions(self) -> dict[str, dict[Holding, int]]:
        """A copy of every position, for the signed positions snapshot."""
        return {stream: dict(held) for stream, held in self._positions.items()}

    def prices(self, stream: str) -> dict[str, Price]:
        return dict(self._prices.get(stream, {}))

    # --- planning -------------------------------------------------------------------------------

    def plan_statement(
        self,
        credited: CreditedStatement,
        *,
        now: datetime,
        resync_from: int | None = None,
        full_evaluation: bool = False,
    ) -> LedgerChange:
        """Credit a verified statement. ``resync_from`` is given when a snapshot answers a
        snapshot request and cannot be linked to the head: the links from ``resync_from`` up to
        the snapshot are journaled as unverified. Raises StreamFrozen on a frozen stream,
        PolicyViolation for an asset outside the asset table, InvariantViolation for a statement
        that does not follow the head (the consumer verifies the chain before this).

        Margin states are evaluated for the clients whose state the statement can change
        (:meth:`_statement_affected`); ``full_evaluation`` evaluates every holder of the stream
        with exposure or a margin state and every client whose holdings changed instead. The
        change is the same either way (the property tests compare them)."""
        _aware(now, what="now")
        stream = credited.stream
        head = credited.head
        status = self._streams.get(stream)
        if status is not None and status.frozen:
            raise StreamFrozen(f"stream {stream} is frozen ({status.frozen_reason})")
        previous = status.head if status is not None else None
        self._check_sequence(credited, previous=previous, resync_from=resync_from)
        for _, asset in credited.changed:
            if asset not in self.decimals:
                raise PolicyViolation(f"asset {asset} is not in the exchange's asset table")

        diffs, new_positions = self._diff_positions(credited)
        prices = {a: p for a, p in credited.prices.items() if p.quote == self.policy.quote}
        awaiting = status.awaiting_snapshot_from if status is not None else None
        if resync_from is not None or (
            awaiting is not None and credited.snapshot and head.sequence >= awaiting
        ):
            awaiting = None
        new_status = StreamStatus(head, False, None, awaiting, stream=stream)

        pending = _Pending(streams={stream: new_status}, prices={stream: prices})
        for (account, asset), (_, after) in diffs.items():
            pending.holdings.setdefault(account, {})[stream, asset] = after
        journal = self._statement_journal(
            credited,
            previous=previous,
            resync_from=resync_from,
            diffs=diffs,
            prices=prices,
            now=now,
        )

        affected = self._statement_affected(
            credited, previous=previous, prices=prices, diffs=diffs, now=now, full=full_evaluation
        )
        notices: list[Notice] = []
        self._evaluate(affected, now=now, pending=pending, journal=journal, notices=notices)
        return LedgerChange(
            generation=self.generation,
            streams=pending.streams,
            positions={stream: new_positions},
            replace_positions=frozenset({stream}) if credited.snapshot else frozenset(),
            prices=pending.prices,
            margins=pending.margins,
            journal=tuple(journal),
            notices=tuple(notices),
        )

    def plan_exposure(self, report: ExposureReport, *, now: datetime) -> LedgerChange:
        """Take a new exposure report and re-evaluate its client. A report older than the stored
        one (by ``reported_at``) or the same report again (``report_id``) changes nothing: the
        trading engine may deliver at least once and out of order."""
        _aware(now, what="now")
        stored = self._exposures.get(report.client)
        if stored is not None and (
            report.reported_at < stored.reported_at or report.report_id == stored.report_id
        ):
            return LedgerChange(generation=self.generation)
        pending = _Pending(exposures={report.client: report})
        journal = [
            JournalEntry(
                at=now,
                kind="exposure",
                client=report.client,
                value=report.exposure,
                detail={
                    "report_id": report.report_id,
                    "reported_at": _stamp(report.reported_at),
                    "requirement": report.requirement,
                    "unrealised_pnl": report.unrealised_pnl,
                    "before": stored.exposure if stored is not None else 0,
                },
            )
        ]
        notices: list[Notice] = []
        self._evaluate({report.client}, now=now, pending=pending, journal=journal, notices=notices)
        return LedgerChange(
            generation=self.generation,
            exposures=pending.exposures,
            margins=pending.margins,
            journal=tuple(journal),
            notices=tuple(notices),
        )

    def plan_evaluation(self, *, now: datetime) -> LedgerChange:
        """Re-evaluate every client with exposure or an open margin state at ``now``: deadlines
        that passed, streams that went stale or count as zero. Empty when nothing moves."""
        _aware(now, what="now")
        pending = _Pending()
        journal: list[JournalEntry] = []
        notices: list[Notice] = []
        self._evaluate(
            set(self._exposed), now=now, pending=pending, journal=journal, notices=notices
        )
        if not pending.margins:
            # Nothing moves: every healthy client is covered at ``now``, so with every stream
            # counted too. A fact about the current state, not a change of it (see _covered_at).
            self._covered_at = self.generation
            self._uncovered_at = None
        return LedgerChange(
            generation=self.generation,
            margins=pending.margins,
            journal=tuple(journal),
            notices=tuple(notices),
        )

    def plan_freeze(self, stream: str, *, reason: str, now: datetime) -> LedgerChange:
        """Freeze credit on ``stream`` (a fork was detected). Freezing a frozen stream changes
        nothing: the first reason stands until an operator resolves it."""
        _aware(now, what="now")
        parse_stream_key(stream)
        _text(reason, what="freeze reason")
        status = self._streams.get(stream) or StreamStatus(None, False, None, None, stream=stream)
        if status.frozen:
            return LedgerChange(generation=self.generation)
        frozen = StreamStatus(
            status.head, True, reason, status.awaiting_snapshot_from, stream=stream
        )
        entry = JournalEntry(
            at=now,
            kind="freeze",
            stream=stream,
            sequence=status.head.sequence if status.head is not None else None,
            detail={"reason": reason},
        )
        # Freezing blocks new credit only; collateral and margin are unchanged, so no evaluation.
        return LedgerChange(generation=self.generation, streams={stream: frozen}, journal=(entry,))

    def plan_resolve(
        self, stream: str, *, operator: str, reason: str, now: datetime
    ) -> LedgerChange:
        """An operator resolved the fork on ``stream``: credit may flow again. Raises
        UnknownStream or StreamNotFrozen when there is nothing to resolve."""
        _aware(now, what="now")
        _text(operator, what="operator")
        _text(reason, what="resolution reason")
        status = self._streams.get(stream)
        if status is None:
            raise UnknownStream(f"no stream {stream}")
        if not status.frozen or status.frozen_reason is None:
            raise StreamNotFrozen(f"stream {stream} is not frozen")
        resolved = StreamStatus(
            status.head, False, None, status.awaiting_snapshot_from, stream=stream
        )
        entry = JournalEntry(
            at=now,
            kind="resolve",
            stream=stream,
            sequence=status.head.sequence if status.head is not None else None,
            detail={"operator": operator, "reason": reason, "frozen_reason": status.frozen_reason},
        )
        return LedgerChange(
            generation=self.generation, streams={stream: resolved}, journal=(entry,)
        )

    def plan_await_snapshot(
        self, stream: str, *, from_sequence: int, now: datetime
    ) -> LedgerChange:
        """Mark ``stream`` as awaiting a snapshot from ``from_sequence`` (a gap was seen and a
        snapshot requested). Asking again from the same sequence changes nothing."""
        _aware(now, what="now")
        parse_stream_key(stream)
        _int(from_sequence, what="from_sequence", low=1, high=MAX_SEQUENCE)
        status = self._streams.get(stream) or StreamStatus(None, False, None, None, stream=stream)
        if status.head is not None and from_sequence <= status.head.sequence:
            raise InvariantViolation(
                f"a snapshot from {from_sequence} requested, but {stream} is at "
                f"{status.head.sequence}"
            )
        if status.awaiting_snapshot_from == from_sequence:
            return LedgerChange(generation=self.generation)
        awaiting = StreamStatus(
            status.head, status.frozen, status.frozen_reason, from_sequence, stream=stream
        )
        entry = JournalEntry(
            at=now,
            kind="await_snapshot",
            stream=stream,
            sequence=status.head.sequence if status.head is not None else None,
            detail={"from_sequence": from_sequence},
        )
        return LedgerChange(
            generation=self.generation, streams={stream: awaiting}, journal=(entry,)
        )

    def check_release(
        self, client: str, *, stream: str, asset: str, quantity: int, now: datetime
    ) -> ReleaseDecision:
        """May ``client`` take ``quantity`` units of ``asset`` credited on ``stream`` back from its
        pledge now? Allowed iff the client holds at least that much there that the ledger still
        counts (``exceeds_credited``; ``not_credited`` without any), the stream is fresh
        (``stream_stale``) and not frozen (``stream_frozen``), and with those units no longer
        counted the client is healthy - its state, and its ratio at or above the margin-call
        level (``not_healthy``) - and its exposure within the new credit limit
        (``insufficient_credit``). Changes nothing; O(streams of the client x assets)."""
        _aware(now, what="now")
        parse_stream_key(stream)
        validate_asset_code(asset)
        if check_units(quantity, what="released quantity") == 0:
            raise DecodeError("a release releases at least one unit")
        if not self._is_known(client):
            return ReleaseDecision(False, "unknown_client", 0, 0, 0)
        status = self._streams.get(stream)
        credited = self._positions.get(stream, {}).get((client, asset), 0)
        head = status.head if status is not None else None
        counted = (
            0
            if head is None
            else self._counted(client, stream, asset, credited, head=head, pending=_NOTHING_PENDING)
        )
        reason = self._release_refusal(client, status, counted, quantity, now=now)
        if reason is not None:
            before = self._assess(client, now=now, pending=_NOTHING_PENDING)
            return ReleaseDecision(False, reason, counted, before.collateral, before.credit_limit)
        # The release being checked, as a pending release in a planning overlay (its id and
        # expiry do not matter here): the assessment is the one the ledger makes once it is
        # recorded.
        probe = PendingRelease(
            release_id="0" * (2 * _DIGEST_BYTES),
            client=client,
            stream=stream,
            asset=asset,
            quantity=quantity,
            cap=counted - quantity,
            issued_at=now,
            expires_at=now + _PROBE_VALIDITY,
        )
        overlay = _Pending(
            releases={client: (*self._pending_releases(client, _NOTHING_PENDING), probe)}
        )
        after = self._assess(client, now=now, pending=overlay)
        if after.ratio_bps is not None and after.ratio_bps < self.policy.margin_call_bps:
            reason = "not_healthy"
        elif after.exposure > after.credit_limit:
            reason = "insufficient_credit"
        return ReleaseDecision(
            allowed=reason is None,
            reason=reason,
            releasable=counted,
            collateral=after.collateral,
            credit_limit=after.credit_limit,
        )

    def _release_refusal(
        self,
        client: str,
        status: StreamStatus | None,
        counted: int,
        quantity: int,
        *,
        now: datetime,
    ) -> str | None:
        """The reason to refuse a release before its effect on the margin is considered."""
        if status is None or status.head is None or counted == 0:
            return "not_credited"
        if status.frozen:
            return "stream_frozen"
        freshness = compute_freshness(
            now=now,
            issued_at=status.head.issued_at,
            expires_at=status.head.expires_at,
            policy=self.policy,
        )
        if freshness is not Freshness.FRESH:
            return "stream_stale"
        if quantity > counted:
            return "exceeds_credited"
        margin = self._margins.get(client)
        if margin is not None and margin.state is not MarginState.HEALTHY:
            return "not_healthy"
        return None

    def plan_release(
        self,
        client: str,
        *,
        stream: str,
        asset: str,
        quantity: int,
        release_id: str,
        issued_at: datetime,
        expires_at: datetime,
        now: datetime,
    ) -> tuple[ReleaseDecision, LedgerChange]:
        """Decide as :meth:`check_release` and, when allowed, plan recording the release the
        exchange acknowledges as ``release_id`` (valid from ``issued_at`` until ``expires_at``):
        the client's pending releases gain it (and drop those no longer active) and the journal a
        ``release`` entry. A refusal plans an empty change, and so does the same ``release_id``
        again (a repeated request within one millisecond), which is allowed."""
        decision = self.check_release(
            client, stream=stream, asset=asset, quantity=quantity, now=now
        )
        existing = self._releases.get(client, ())
        if any(r.release_id == release_id for r in existing):
            return replace(decision, allowed=True, reason=None), LedgerChange(
                generation=self.generation
            )
        if not decision.allowed:
            return decision, LedgerChange(generation=self.generation)
        record = PendingRelease(
            release_id=release_id,
            client=client,
            stream=stream,
            asset=asset,
            quantity=quantity,
            cap=decision.releasable - quantity,
            issued_at=issued_at,
            expires_at=expires_at,
        )
        kept = tuple(r for r in existing if r.is_active(self._head_of(r.stream)))
        credited = self._positions[stream][client, asset]
        return decision, LedgerChange(
            generation=self.generation,
            releases={client: (*kept, record)},
            journal=(record.journal_entry(at=now, credited=credited),),
        )

    def pending_releases(self, client: str) -> tuple[PendingRelease, ...]:
        """The client's releases still active (their cap applies)."""
        return tuple(
            r for r in self._releases.get(client, ()) if r.is_active(self._head_of(r.stream))
        )

    def _head_of(self, stream: str) -> StreamHead | None:
        status = self._streams.get(stream)
        return status.head if status is not None else None

    # --- applying -------------------------------------------------------------------------------

    def apply(self, change: LedgerChange) -> None:
        """Make a persisted change the ledger's state. Raises InvariantViolation when the change
        was planned against another generation (the ledger moved since, or it was applied
        before); nothing is changed then."""
        if change.generation != self.generation:
            raise InvariantViolation(
                f"a change planned at generation {change.generation} applied at {self.generation}"
            )
        # Every plan keeps every healthy client covered (see _covered_at); one that was not
        # stays so as far as is known.
        self._covered_at = self.generation + 1 if self._covered_at == change.generation else None
        self._uncovered_at = (
            self.generation + 1 if self._uncovered_at == change.generation else None
        )
        self._streams.update(change.streams)
        for stream in sorted(set(change.positions) | change.replace_positions):
            self._apply_positions(
                stream,
                change.positions.get(stream, {}),
                replace=stream in change.replace_positions,
            )
        for stream, table in change.prices.items():
            self._prices[stream] = dict(table)
        self._exposures.update(change.exposures)
        self._margins.update(change.margins)
        for client, releases in change.releases.items():
            if releases:
                self._releases[client] = releases
            else:
                self._releases.pop(client, None)
        for client in set(change.exposures) | set(change.margins):
            if self._is_exposed(client):
                self._exposed.add(client)
            else:
                self._exposed.discard(client)
        self.generation += 1

    def _apply_positions(
        self, stream: str, changes: Mapping[Holding, int], *, replace: bool
    ) -> None:
        held = self._positions.setdefault(stream, {})
        if replace:
            for holding in list(held):
                if changes.get(holding, 0) == 0:
                    del held[holding]
                    self._unindex(stream, holding)
        for holding, quantity in changes.items():
            if quantity:
                if holding not in held:
                    self._index(stream, holding)
                held[holding] = quantity
            elif holding in held:
                del held[holding]
                self._unindex(stream, holding)
        if not held:
            del self._positions[stream]

    def _index(self, stream: str, holding: Holding) -> None:
        account, asset = holding
        self._holdings.setdefault(account, {}).setdefault(stream, set()).add(asset)
        clients = self._stream_clients.setdefault(stream, {})
        clients[account] = clients.get(account, 0) + 1
        assets = self._stream_assets.setdefault(stream, {})
        assets[asset] = assets.get(asset, 0) + 1

    def _unindex(self, stream: str, holding: Holding) -> None:
        account, asset = holding
        by_stream = self._holdings[account]
        by_stream[stream].discard(asset)
        if not by_stream[stream]:
            del by_stream[stream]
            if not by_stream:
                del self._holdings[account]
        clients = self._stream_clients[stream]
        clients[account] -= 1
        if not clients[account]:
            del clients[account]
            if not clients:
                del self._stream_clients[stream]
        assets = self._stream_assets[stream]
        assets[asset] -= 1
        if not assets[asset]:
            del assets[asset]
            if not assets:
                del self._stream_assets[stream]

    # --- reading --------------------------------------------------------------------------------

    def check_pretrade(self, client: str, *, add_exposure: int, now: datetime) -> PretradeDecision:
        """May ``client`` add ``add_exposure`` (quote minor units) of exposure now? Allowed iff
        the client is healthy (its state, and its ratio now), no stream crediting it is frozen,
        stale or counted as zero, and ``exposure + add_exposure <= credit_limit``. Reads memory
        only, in O(streams of the client x assets)."""
        _aware(now, what="now")
        check_units(add_exposure, what="added exposure")
        if not self._is_known(client):
            return PretradeDecision(allowed=False, reason="unknown_client", headroom=0)
        assessment = self._assess(client, now=now, pending=_NOTHING_PENDING)
        margin = self._margins.get(client)
        ratio = assessment.ratio_bps
        if (margin is not None and margin.state is not MarginState.HEALTHY) or (
            ratio is not None and ratio < self.policy.margin_call_bps
        ):
            # The ratio is checked as well as the state: between two evaluations a stream may
            # have gone to zero, and credit must not be granted on the strength of an old state.
            return PretradeDecision(allowed=False, reason="not_healthy", headroom=0)
        if assessment.any_frozen:
            return PretradeDecision(allowed=False, reason="stream_frozen", headroom=0)
        if assessment.any_stale:
            return PretradeDecision(allowed=False, reason="stream_stale", headroom=0)
        headroom = max(0, assessment.credit_limit - assessment.exposure)
        # Compared on the totals, not against the headroom: a client already over its limit
        # (collateral fell) may not add even zero.
        if assessment.exposure + add_exposure > assessment.credit_limit:
            return PretradeDecision(allowed=False, reason="insufficient_credit", headroom=headroom)
        return PretradeDecision(allowed=True, reason=None, headroom=headroom)

    def client_status(self, client: str, *, now: datetime) -> ClientStatus | None:
        """Everything about one client valued at ``now``; None for a client the ledger does not
        know."""
        _aware(now, what="now")
        if not self._is_known(client):
            return None
        a = self._assess(client, now=now, pending=_NOTHING_PENDING)
        margin = self._margins.get(client)
        return ClientStatus(
            client=client,
            collateral=a.collateral,
            credit_limit=a.credit_limit,
            exposure=a.exposure,
            requirement=a.requirement,
            unrealised_pnl=a.unrealised_pnl,
            equity=a.equity,
            ratio_bps=a.ratio_bps,
            state=margin.state if margin is not None else MarginState.HEALTHY,
            deadline=margin.deadline if margin is not None else None,
            positions=a.positions,
        )

    # --- internals ------------------------------------------------------------------------------

    def _check_sequence(
        self, credited: CreditedStatement, *, previous: StreamHead | None, resync_from: int | None
    ) -> None:
        sequence = credited.head.sequence
        if resync_from is None:
            if previous is not None and sequence != previous.sequence + 1:
                raise InvariantViolation(
                    f"{credited.stream}: statement {sequence} does not follow head "
                    f"{previous.sequence}; the consumer must verify the chain first"
                )
            return
        _int(resync_from, what="resync_from", low=1, high=MAX_SEQUENCE)
        if not credited.snapshot:
            raise InvariantViolation("only a snapshot can resynchronise a stream")
        if resync_from > sequence or (previous is not None and resync_from <= previous.sequence):
            raise InvariantViolation(
                f"{credited.stream}: resync from {resync_from} to snapshot {sequence} does not "
                "start after the head"
            )

    def _diff_positions(
        self, credited: CreditedStatement
    ) -> tuple[dict[Holding, tuple[int, int]], dict[Holding, int]]:
        """(holding -> (before, after) for every holding that changes, the ``positions`` entry
        of the change: the complete set for a snapshot, the changed holdings for a delta)."""
        old = self._positions.get(credited.stream, {})
        if credited.snapshot:
            complete = {h: q for h, q in credited.changed.items() if q}
            diffs = {h: (q, complete.get(h, 0)) for h, q in old.items() if complete.get(h) != q}
            diffs.update({h: (0, q) for h, q in complete.items() if h not in old})
            return diffs, complete
        diffs = {
            holding: (old.get(holding, 0), quantity)
            for holding, quantity in credited.changed.items()
            if old.get(holding, 0) != quantity
        }
        return diffs, {h: after for h, (_, after) in diffs.items()}

    def _statement_journal(
        self,
        credited: CreditedStatement,
        *,
        previous: StreamHead | None,
        resync_from: int | None,
        diffs: Mapping[Holding, tuple[int, int]],
        prices: Mapping[str, Price],
        now: datetime,
    ) -> list[JournalEntry]:
        stream, head = credited.stream, credited.head
        journal = [
            JournalEntry(
                at=now,
                kind="statement",
                stream=stream,
                sequence=head.sequence,
                detail={
                    "digest": head.digest.hex(),
                    "kind": head.kind,
                    "previous_sequence": previous.sequence if previous is not None else 0,
                    "issued_at": _stamp(head.issued_at),
                    "expires_at": _stamp(head.expires_at),
                    "changed": len(diffs),
                },
            )
        ]
        if resync_from is not None:
            journal.append(
                JournalEntry(
                    at=now,
                    kind="resync",
                    stream=stream,
                    sequence=head.sequence,
                    # Sequences from..to were never seen here and the link into the snapshot is
                    # unverified: reconciliation checks them against the transparency log.
                    detail={
                        "from": resync_from,
                        "to": head.sequence - 1,
                        "head": previous.sequence if previous is not None else 0,
                    },
                )
            )
        valuers = {asset: self._valuer(asset, prices.get(asset)) for _, asset in diffs}
        journal.extend(
            JournalEntry(
                at=now,
                kind="credit",
                client=account,
                stream=stream,
                asset=asset,
                sequence=head.sequence,
                quantity=after,
                value=after * valuers[asset][0] // valuers[asset][1],
                detail=_NEW_HOLDING if before == 0 else {"before": before},
            )
            for (account, asset), (before, after) in sorted(diffs.items())
        )
        # One entry per asset held after the statement that its price snapshot does not price:
        # those positions count as zero until a statement prices them.
        journal.extend(
            JournalEntry(
                at=now,
                kind="price_missing",
                stream=stream,
                asset=asset,
                sequence=head.sequence,
                value=0,
                detail={"quote": self.policy.quote},
            )
            for asset in sorted(self._assets_after(stream, diffs))
            if asset not in prices
        )
        return journal

    def _assets_after(self, stream: str, diffs: Mapping[Holding, tuple[int, int]]) -> set[str]:
        counts = dict(self._stream_assets.get(stream, {}))
        for (_, asset), (before, after) in diffs.items():
            counts[asset] = counts.get(asset, 0) + (after != 0) - (before != 0)
        return {asset for asset, count in counts.items() if count > 0}

    def _value(self, asset: str, quantity: int, price: Price | None) -> int:
        return compute_position_value(
            quantity=quantity,
            asset_decimals=self.decimals[asset],
            price=price,
            rate_bps=self.policy.rate_bps(asset),
            quote_decimals=self.policy.quote_decimals,
        )

    def _valuer(self, asset: str, price: Price | None) -> tuple[int, int]:
        """``(factor, divisor)`` such that the value of ``quantity`` units of ``asset`` at
        ``price`` is ``quantity * factor // divisor``: the one integer expression of
        :func:`~exchange.policy.compute_position_value` with the per-asset part multiplied out
        once (for the many credit entries of one statement; exact, as integer products are)."""
        self._value(asset, 0, price)  # checks the decimals, the rate and the price as it does
        if price is None:
            return 0, 1
        factor = price.mantissa * 10**self.policy.quote_decimals * self.policy.rate_bps(asset)
        return factor, 10 ** (self.decimals[asset] + price.scale) * BPS

    def _statement_affected(
        self,
        credited: CreditedStatement,
        *,
        previous: StreamHead | None,
        prices: Mapping[str, Price],
        diffs: Mapping[Holding, tuple[int, int]],
        now: datetime,
        full: bool,
    ) -> set[str]:
        """The clients whose margin state a statement can change, to evaluate.

        A client without exposure or requirement and healthy (not in ``_exposed``) has no
        ratio and stays healthy whatever its collateral: never evaluated. Of the others, every
        holder of the stream, since the statement's prices and freshness apply to all of them,
        and every client whose holdings changed; except when nothing that values the holders'
        unchanged positions moved: the same price table, a head still counted at ``now``,
        issued no earlier than the previous one (so no release cap comes back into force), and
        every healthy client covered with all its positions counted (``_covered_at``). A
        healthy holder left alone then keeps a ratio at or above the margin-call level unless
        another of its streams counts as zero at ``now``; so only those holders, the holders
        not healthy (a deadline may have passed, a cure may come) and the changed clients are
        evaluated. ``full`` evaluates every holder and every changed client, as a reference."""
        stream, head = credited.stream, credited.head
        exposed = self._exposed
        holders = self._stream_clients.get(stream, {})
        if len(holders) <= len(exposed):
            exposed_holders = {c for c in holders if c in exposed}
        else:
            exposed_holders = {c for c in exposed if c in holders}
        if full:
            return exposed_holders | {account for account, _ in diffs}
        changed = {account for account, _ in diffs if account in exposed}
        if exposed_holders and self.generation not in (self._covered_at, self._uncovered_at):
            self._learn_coverage()
        unchanged_valuation = (
            self._covered_at == self.generation
            and previous is not None
            and head.issued_at >= previous.issued_at
            and prices == self._prices.get(stream, {})
            and compute_freshness(
                now=now, issued_at=head.issued_at, expires_at=head.expires_at, policy=self.policy
            )
            is not Freshness.ZERO
        )
        if not unchanged_valuation:
            return exposed_holders | changed
        zero = {
            other
            for other, status in self._streams.items()
            if other != stream
            and status.head is not None
            and compute_freshness(
                now=now,
                issued_at=status.head.issued_at,
                expires_at=status.head.expires_at,
                policy=self.policy,
            )
            is Freshness.ZERO
        }
        margins = self._margins
        for client in exposed_holders:
            margin = margins.get(client)
            if (margin is not None and margin.state is not MarginState.HEALTHY) or (
                zero and not zero.isdisjoint(self._holdings[client])
            ):
                changed.add(client)
        return changed

    def _learn_coverage(self) -> None:
        """Find out whether every healthy client is covered with every position counted
        (whatever the streams' ages), and record it for the current generation
        (``_covered_at`` or ``_uncovered_at``): a fact about the state, not a change of it.
        As costly as evaluating every exposed client once; done after a restore or a reset."""
        for client in self._exposed:
            margin = self._margins.get(client)
            if margin is not None and margin.state is not MarginState.HEALTHY:
                continue
            ratio = self._assess(client, now=_EVERY_STREAM_LIVE, pending=_NOTHING_PENDING).ratio_bps
            if ratio is not None and ratio < self.policy.margin_call_bps:
                self._uncovered_at = self.generation
                return
        self._covered_at = self.generation

    def _is_known(self, client: str) -> bool:
        return client in self._holdings or client in self._exposures or client in self._margins

    def _is_exposed(self, client: str, pending: _Pending = _NOTHING_PENDING) -> bool:
        report = pending.exposures.get(client) or self._exposures.get(client)
        margin = pending.margins.get(client) or self._margins.get(client)
        if margin is not None and margin.state is not MarginState.HEALTHY:
            return True
        return report is not None and (report.exposure > 0 or report.requirement > 0)

    def _client_holdings(self, client: str, pending: _Pending) -> dict[tuple[str, str], int]:
        held: dict[tuple[str, str], int] = {}
        for stream, assets in self._holdings.get(client, {}).items():
            positions = self._positions[stream]
            for asset in assets:
                held[stream, asset] = positions[client, asset]
        for key, quantity in pending.holdings.get(client, {}).items():
            if quantity:
                held[key] = quantity
            else:
                held.pop(key, None)
        return held

    def _pending_releases(self, client: str, pending: _Pending) -> tuple[PendingRelease, ...]:
        releases = pending.releases.get(client)
        return releases if releases is not None else self._releases.get(client, ())

    def _counted(
        self,
        client: str,
        stream: str,
        asset: str,
        quantity: int,
        *,
        head: StreamHead,
        pending: _Pending,
    ) -> int:
        """The part of a credited ``quantity`` the ledger counts: at most the cap of every
        active pending release on that holding."""
        counted = quantity
        for release in self._pending_releases(client, pending):
            if (release.stream, release.asset) == (stream, asset) and release.is_active(head):
                counted = min(counted, release.cap)
        return counted

    def _assess(self, client: str, *, now: datetime, pending: _Pending) -> _Assessment:
        collateral = 0
        views: list[PositionView] = []
        custodians: set[str] = set()
        any_frozen = any_stale = False
        for (stream, asset), quantity in sorted(self._client_holdings(client, pending).items()):
            status = pending.streams.get(stream) or self._streams.get(stream)
            if status is None or status.head is None:
                raise InvariantViolation(f"{client} holds {asset} on {stream}, which has no head")
            head = status.head
            freshness = compute_freshness(
                now=now, issued_at=head.issued_at, expires_at=head.expires_at, policy=self.policy
            )
            table = pending.prices.get(stream)
            price = (table if table is not None else self._prices.get(stream, {})).get(asset)
            counted = self._counted(client, stream, asset, quantity, head=head, pending=pending)
            value = 0 if freshness is Freshness.ZERO else self._value(asset, counted, price)
            collateral += value
            custodians.add(head.custodian)
            any_frozen = any_frozen or status.frozen
            any_stale = any_stale or freshness is not Freshness.FRESH
            views.append(
                PositionView(
                    stream=stream,
                    custodian=head.custodian,
                    asset=asset,
                    quantity=quantity,
                    price=price,
                    rate_bps=self.policy.rate_bps(asset),
                    value=value,
                    freshness=freshness,
                    frozen=status.frozen,
                    reserved=quantity - counted,
                )
            )
        report = pending.exposures.get(client) or self._exposures.get(client)
        exposure = report.exposure if report is not None else 0
        requirement = report.requirement if report is not None else 0
        pnl = report.unrealised_pnl if report is not None else 0
        return _Assessment(
            collateral=collateral,
            credit_limit=compute_credit_limit(
                collateral=collateral, unrealised_pnl=pnl, leverage_bps=self.policy.leverage_bps
            ),
            exposure=exposure,
            requirement=requirement,
            unrealised_pnl=pnl,
            equity=compute_equity(collateral=collateral, unrealised_pnl=pnl),
            ratio_bps=compute_margin_ratio_bps(
                collateral=collateral, unrealised_pnl=pnl, requirement=requirement
            ),
            custodians=tuple(sorted(custodians)),
            any_frozen=any_frozen,
            any_stale=any_stale,
            positions=tuple(views),
        )

    def _evaluate(
        self,
        clients: Iterable[str],
        *,
        now: datetime,
        pending: _Pending,
        journal: list[JournalEntry],
        notices: list[Notice],
    ) -> None:
        """Run the state table for ``clients`` against the ledger as ``pending`` leaves it,
        recording new margin states in ``pending`` and appending journal entries and notices."""
        for client in sorted(clients):
            current = pending.margins.get(client) or self._margins.get(client)
            state = current.state if current is not None else MarginState.HEALTHY
            deadline = current.deadline if current is not None else None
            a = self._assess(client, now=now, pending=pending)
            transition = compute_transition(
                state, ratio_bps=a.ratio_bps, deadline=deadline, now=now, policy=self.policy
            )
            if transition is None:
                continue
            pending.margins[client] = ClientMargin(
                client, transition.after, now, transition.deadline
            )
            detail: dict[str, str | int] = {
                "before": transition.before.value,
                "after": transition.after.value,
                "reason": transition.reason,
                "collateral": a.collateral,
                "equity": a.equity,
                "requirement": a.requirement,
            }
            if a.ratio_bps is not None:
                detail["ratio_bps"] = a.ratio_bps
            if transition.deadline is not None:
                detail["deadline"] = _stamp(transition.deadline)
            journal.append(
                JournalEntry(
                    at=now,
                    kind="state",
                    client=client,
                    value=a.collateral,
                    detail=detail,
                )
            )
            shortfall = compute_shortfall(
                collateral=a.collateral,
                unrealised_pnl=a.unrealised_pnl,
                requirement=a.requirement,
                margin_call_bps=self.policy.margin_call_bps,
            )
            notices.extend(
                Notice(
                    kind=kind,
                    client=client,
                    custodians=a.custodians,
                    at=now,
                    # A margin call issued together with liquidation is already due.
                    deadline=(transition.deadline or now)
                    if kind is NoticeKind.MARGIN_CALL
                    else None,
                    collateral=a.collateral,
                    equity=a.equity,
                    requirement=a.requirement,
                    ratio_bps=a.ratio_bps,
                    shortfall=shortfall,
                )
                for kind in transition.notices
            )

    # --- replacing the whole state --------------------------------------------------------------

    def reset(self, loaded: MarginLedger) -> None:
        """Take the whole state of ``loaded`` (a ledger just rebuilt from the database, see
        :func:`exchange.store.load_ledger`) in place of this one's, and move to a new
        generation, so that a change planned before the reset can never be applied after it.
        For a writer that learns the database moved under it (another instance of its consumer
        group wrote there): everyone holding this ledger sees the reloaded state. ``loaded``
        hands over its containers and must not be used afterwards. The policy stays this
        ledger's; the asset tables must be equal (InvariantViolation otherwise). Like
        :meth:`apply`, call it under the writers' lock (the desk brackets it for its readers)."""
        if loaded is self:
            raise InvariantViolation("a ledger cannot be reset to itself")
        if dict(loaded.decimals) != dict(self.decimals):
            raise InvariantViolation("a ledger reset to one with another asset table")
        self._streams = loaded._streams
        self._positions = loaded._positions
        self._prices = loaded._prices
        self._exposures = loaded._exposures
        self._margins = loaded._margins
        self._releases = loaded._releases
        self._holdings = loaded._holdings
        self._stream_clients = loaded._stream_clients
        self._stream_assets = loaded._stream_assets
        self._exposed = loaded._exposed
        self.generation += 1
