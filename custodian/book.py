"""The custody book's pure core: accounts, commands, the posting rules, idempotency, invariants.

What this module does: validate commands (each one is well-formed once constructed), turn a
command plus the current balances of the two accounts it touches into a balanced journal entry
or reject it, decide whether a reused idempotency key is a harmless retry or a conflict, and
recompute the book from its journal to find every broken invariant. :class:`MemoryBook` applies
commands to an in-memory book with exactly these rules; it is the reference the database store
(:mod:`custodian.store`) is tested against.

Release acknowledgements: an :class:`Unpledge` names the exchange's acknowledgement by its id
(``release_ack``); the signed acknowledgement itself is supplied alongside the command (it is not
part of the command's content, so a retry is recognised by the id alone). The
:data:`ReleaseAckVerifier` hook sees both as a :class:`ReleaseAckCheck`, with the command's time
and whether the id was used before. :class:`SignedReleaseAckVerifier` is the real one: the
exchange's signature under the key registry, addressee, client, asset, quantity, expiry, and
single use (the id it accepts is recorded in the journal's unique ``release_ack`` column, so a
second unpledge under it is refused, inside the same transaction). The default,
:func:`record_release_ack_unverified`, only records the id (for books that take unpledges from
elsewhere, and for tests of the posting rules).

What it does not do: read or write a database, or read the clock (``now`` is passed in).

Money: quantities are ``int`` minor units in ``[1, 2**128)`` on commands; a posting is a signed
amount. A float anywhere raises :class:`~attestations.errors.FloatRejected`.

Sign convention: a posting adds its amount to its account. Client accounts (``available``,
``pledged:<exchange>``, ``settlement``, ``redeeming``) never go below zero. Each asset has one
custodian account, ``@custodian/<asset>/external``, the counterpart of every unit entering custody
(deposits, yield distributions) or leaving it (withdrawals, completed redemptions): its balance is
minus the units the custodian holds for clients, so the balances of one asset always sum to zero.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, ClassVar, Final

from attestations.amounts import UNITS_LIMIT, Asset, validate_asset_code
from attestations.canonical import compute_canonical_bytes, compute_digest
from attestations.errors import (
    AmountError,
    ConfigurationError,
    CounterpartyError,
    DecodeError,
    FloatRejected,
    InvariantViolation,
)
from attestations.keys import KeyRegistry
from attestations.merkle import validate_account
from attestations.notices import verify_release_ack as verify_signed_release_ack
from attestations.statement import validate_party
from attestations.verify import DEFAULT_MAX_CLOCK_SKEW
from custodian.errors import (
    CustodyLimitExceeded,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidQuantity,
    UnknownAsset,
)

COMMAND_VERSION: Final = 1
"""``version`` member of a command's canonical JSON (stored with every journal entry)."""
DOMAIN_COMMAND: Final = "mcb/book-command/v1"
"""Domain tag of a command digest, which decides whether a reused idempotency key is a retry."""

CUSTODIAN: Final = "@custodian"
"""Holder of the per-asset external accounts. Reserved: no client may use this id."""

AVAILABLE: Final = "available"
SETTLEMENT: Final = "settlement"
REDEEMING: Final = "redeeming"
EXTERNAL: Final = "external"
PLEDGED_PREFIX: Final = "pledged:"
YIELD_KEY_PREFIX: Final = "yield:"
"""Prefix of the idempotency key of every :class:`AccrueYield` (see :func:`compute_yield_key`)."""

_IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")
_ACK_ID_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")
_DAY_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_MAX_KEY_LENGTH: Final = 128


# --- identifiers --------------------------------------------------------------------------------


def validate_client(value: object) -> str:
    """Client ids are Merkle-leaf account ids (1-128 of ``[A-Za-z0-9._:@-]``), except the
    custodian's reserved holder id."""
    client = validate_account(value)
    if client == CUSTODIAN:
        raise DecodeError(f"client id {CUSTODIAN!r} is reserved for the custodian")
    return client


def validate_idempotency_key(value: object) -> str:
    """1-128 printable ASCII characters, no spaces."""
    if not isinstance(value, str) or not _IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise DecodeError(
            f"idempotency key {str(value)[:40]!r} must be 1-128 printable ASCII characters"
        )
    return value


def validate_release_ack(value: object) -> str:
    """The exchange's release acknowledgement id: 1-128 printable ASCII characters."""
    if not isinstance(value, str) or not _ACK_ID_RE.fullmatch(value):
        raise DecodeError(
            f"release acknowledgement {str(value)[:40]!r} must be 1-128 printable ASCII characters"
        )
    return value


def pledged_to(exchange: str) -> str:
    """The sub-account of units pledged to ``exchange``."""
    return PLEDGED_PREFIX + validate_party(exchange, what="exchange")


def validate_sub_account(value: object) -> str:
    """``available``, ``settlement``, ``redeeming``, ``external`` or ``pledged:<exchange>``."""
    if value in (AVAILABLE, SETTLEMENT, REDEEMING, EXTERNAL):
        return str(value)
    if isinstance(value, str) and value.startswith(PLEDGED_PREFIX):
        return pledged_to(value[len(PLEDGED_PREFIX) :])
    raise DecodeError(f"sub-account {str(value)[:80]!r} is not known")


def validate_day(value: object) -> date:
    """A calendar date (a ``datetime`` is refused: a day has no time of day)."""
    if isinstance(value, datetime) or not isinstance(value, date):
        raise DecodeError(f"day must be a date, got {type(value).__name__}")
    return value


def compute_yield_key(client: str, asset: str, day: date) -> str:
    """The idempotency key of the yield distribution to ``client`` in ``asset`` for ``day``:
    ``yield:<client>:<asset>:<YYYY-MM-DD>``. Keys are at most 128 characters, so when a long
    client id makes that longer, the key is ``yield:sha256:<hex>`` over the long form instead
    (no natural key ends in 64 hex digits, so the two forms never meet). One key per (client,
    asset, day): the journal's unique key is what makes a second payment impossible."""
    natural = f"{YIELD_KEY_PREFIX}{validate_client(client)}:{validate_asset_code(asset)}:"
    natural += validate_day(day).isoformat()
    if len(natural) <= _MAX_KEY_LENGTH:
        return natural
    digest = hashlib.sha256(natural.encode("ascii")).hexdigest()
    return f"{YIELD_KEY_PREFIX}sha256:{digest}"


def check_quantity(value: object, *, what: str = "quantity") -> int:
    """A command quantity: an int in ``[1, 2**128)``. Zero moves nothing, so it is refused."""
    if isinstance(value, float):
        raise FloatRejected(f"{what}: float {value!r} is not accepted as money")
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmountError(f"{what}: expected int minor units, got {type(value).__name__}")
    if value <= 0:
        raise InvalidQuantity(f"{what}: {value} is not positive")
    if value >= UNITS_LIMIT:
        raise InvalidQuantity(f"{what}: {value} does not fit in 128 bits")
    return value


@dataclass(frozen=True, slots=True, order=True)
class Account:
    """One balance: (holder, asset, sub-account). Ordered, so that locks are always taken in one
    global order."""

    holder: str
    asset: str
    sub_account: str

    def __post_init__(self) -> None:
        validate_asset_code(self.asset)
        validate_sub_account(self.sub_account)
        if self.holder == CUSTODIAN:
            if self.sub_account != EXTERNAL:
                raise DecodeError(f"the custodian holds only {EXTERNAL!r} accounts")
        else:
            validate_client(self.holder)
            if self.sub_account == EXTERNAL:
                raise DecodeError(f"{EXTERNAL!r} is the custodian's account, not a client's")

    @classmethod
    def external(cls, asset: str) -> Account:
        return cls(CUSTODIAN, asset, EXTERNAL)

    @property
    def is_external(self) -> bool:
        return self.holder == CUSTODIAN

    @property
    def exchange(self) -> str | None:
        """The exchange of a ``pledged:<exchange>`` account, else None."""
        if self.sub_account.startswith(PLEDGED_PREFIX):
            return self.sub_account[len(PLEDGED_PREFIX) :]
        return None


@dataclass(frozen=True, slots=True)
class Posting:
    """``amount`` (signed minor units, never zero) added to ``account``."""

    account: Account
    amount: int

    def __post_init__(self) -> None:
        if not isinstance(self.account, Account):
            raise DecodeError(f"posting account is a {type(self.account).__name__}")
        if isinstance(self.amount, float):
            raise FloatRejected(f"posting amount {self.amount!r} is a float")
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise AmountError(f"posting amount is a {type(self.amount).__name__}")
        if self.amount == 0 or abs(self.amount) >= UNITS_LIMIT:
            raise InvalidQuantity(f"posting amount {self.amount} is zero or beyond 128 bits")


# --- commands -----------------------------------------------------------------------------------
# Each command moves ``quantity`` units of one asset of one client from a source sub-account to a
# destination sub-account; _ROUTES below is the whole set of posting rules.


def _check_common(idempotency_key: object, client: object, asset: object, quantity: object) -> None:
    validate_idempotency_key(idempotency_key)
    validate_client(client)
    validate_asset_code(asset)
    check_quantity(quantity)


@dataclass(frozen=True, slots=True)
class Deposit:
    """Units arrive in custody for ``client``: external -> available."""

    kind: ClassVar[str] = "deposit"
    idempotency_key: str
    client: str
    asset: str
    quantity: int

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Units leave custody, from available units only: available -> external."""

    kind: ClassVar[str] = "withdraw"
    idempotency_key: str
    client: str
    asset: str
    quantity: int

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)


@dataclass(frozen=True, slots=True)
class Pledge:
    """Lock available units for one exchange: available -> pledged:<exchange>."""

    kind: ClassVar[str] = "pledge"
    idempotency_key: str
    client: str
    asset: str
    exchange: str
    quantity: int

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)
        validate_party(self.exchange, what="exchange")


@dataclass(frozen=True, slots=True)
class Unpledge:
    """Release pledged units after the exchange acknowledged the release:
    pledged:<exchange> -> available. ``release_ack`` is the exchange's acknowledgement id (the
    signed acknowledgement's ``release_id``); the book records it with the entry, and the signed
    acknowledgement supplied alongside is checked through :data:`ReleaseAckVerifier`."""

    kind: ClassVar[str] = "unpledge"
    idempotency_key: str
    client: str
    asset: str
    exchange: str
    quantity: int
    release_ack: str

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)
        validate_party(self.exchange, what="exchange")
        validate_release_ack(self.release_ack)


@dataclass(frozen=True, slots=True)
class MoveToSettlement:
    """Move pledged units to the client's settlement sub-account, the first step of a
    liquidation: pledged:<exchange> -> settlement."""

    kind: ClassVar[str] = "move_to_settlement"
    idempotency_key: str
    client: str
    asset: str
    exchange: str
    quantity: int

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)
        validate_party(self.exchange, what="exchange")


@dataclass(frozen=True, slots=True)
class AccrueYield:
    """One day's yield on a tokenized money-market fund holding, paid to the client in new units:
    external -> available. The yield belongs to the client whatever sub-account the accruing
    units sit in, and is paid to ``available`` even when they are pledged (it is not collateral
    until the client pledges it). ``idempotency_key`` must be :func:`compute_yield_key` of
    (client, asset, day), so the journal holds at most one payment per client, asset and day;
    build it with :meth:`for_day`. The quantity is computed by :mod:`custodian.yields`."""

    kind: ClassVar[str] = "accrue_yield"
    idempotency_key: str
    client: str
    asset: str
    quantity: int
    day: date

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)
        expected = compute_yield_key(self.client, self.asset, self.day)
        if self.idempotency_key != expected:
            raise DecodeError(
                f"the idempotency key of a yield distribution is {expected!r}, "
                f"not {self.idempotency_key[:40]!r}"
            )

    @classmethod
    def for_day(cls, *, client: str, asset: str, quantity: int, day: date) -> AccrueYield:
        return cls(compute_yield_key(client, asset, day), client, asset, quantity, day)


@dataclass(frozen=True, slots=True)
class LockForRedemption:
    """First step of a redemption of fund units: available -> redeeming. Locked units can no
    longer be pledged or withdrawn; they leave through :class:`CompleteRedemption` or come back
    through :class:`CancelRedemption`."""

    kind: ClassVar[str] = "lock_for_redemption"
    idempotency_key: str
    client: str
    asset: str
    quantity: int

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)


@dataclass(frozen=True, slots=True)
class CompleteRedemption:
    """The fund redeemed locked units: redeeming -> external (they leave custody; the proceeds
    arrive as a deposit of the settlement asset)."""

    kind: ClassVar[str] = "complete_redemption"
    idempotency_key: str
    client: str
    asset: str
    quantity: int

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)


@dataclass(frozen=True, slots=True)
class CancelRedemption:
    """A redemption that will not happen releases its units: redeeming -> available."""

    kind: ClassVar[str] = "cancel_redemption"
    idempotency_key: str
    client: str
    asset: str
    quantity: int

    def __post_init__(self) -> None:
        _check_common(self.idempotency_key, self.client, self.asset, self.quantity)


Command = (
    Deposit
    | Withdraw
    | Pledge
    | Unpledge
    | MoveToSettlement
    | AccrueYield
    | LockForRedemption
    | CompleteRedemption
    | CancelRedemption
)

_COMMAND_TYPES: Final[dict[str, type[Command]]] = {
    cls.kind: cls
    for cls in (
        Deposit,
        Withdraw,
        Pledge,
        Unpledge,
        MoveToSettlement,
        AccrueYield,
        LockForRedemption,
        CompleteRedemption,
        CancelRedemption,
    )
}

# --- release acknowledgements -------------------------------------------------------------------


class ReleaseAckUnknown(CounterpartyError):
    """No signed acknowledgement was supplied (or stored) for the unpledge's release id."""

    reason = "release_ack_unknown"


class ReleaseAckMismatch(CounterpartyError):
    """The acknowledgement is for another release id, exchange, custodian, client or asset."""

    reason = "release_ack_mismatch"


class ReleaseAckExceeded(CounterpartyError):
    """The unpledge releases more than the acknowledgement's quantity."""

    reason = "release_ack_exceeded"


class ReleaseAckReused(CounterpartyError):
    """An unpledge was already recorded under this acknowledgement: it is single use."""

    reason = "release_ack_reused"


@dataclass(frozen=True, slots=True)
class ReleaseAckCheck(Unpledge):
    """An unpledge as the release-ack hook sees it: the command's members, plus ``now`` (when it
    is applied), ``signed_ack`` (the exchange's signed acknowledgement supplied alongside, wire
    bytes, or None) and ``used_by`` (the idempotency key of an entry already recorded as using
    this acknowledgement, or None). A subclass of :class:`Unpledge`, so a hook written for the
    bare command still fits. ``now`` is None only from a store that does not pass the command's
    time; a verifier that judges expiry refuses such a check."""

    now: datetime | None = None
    signed_ack: bytes | None = None
    used_by: str | None = None

    def __post_init__(self) -> None:
        Unpledge.__post_init__(self)
        if self.now is not None and (
            not isinstance(self.now, datetime) or self.now.utcoffset() is None
        ):
            raise DecodeError("the unpledge's time must be a timezone-aware datetime")
        if self.signed_ack is not None and not isinstance(self.signed_ack, bytes):
            raise DecodeError("the signed acknowledgement must be bytes")

    @property
    def command(self) -> Unpledge:
        return Unpledge(
            self.idempotency_key,
            self.client,
            self.asset,
            self.exchange,
            self.quantity,
            self.release_ack,
        )


ReleaseAckVerifier = Callable[[ReleaseAckCheck], str | None]
"""Hook that checks an unpledge's release acknowledgement: it raises a CounterpartyError to refuse
the unpledge, and returns the release id to record as used (the book then refuses any later
unpledge under it), or None to record nothing beyond the command."""


def record_release_ack_unverified(check: ReleaseAckCheck) -> None:
    """Default :data:`ReleaseAckVerifier`: accepts any well-formed acknowledgement id (checked by
    :class:`Unpledge` itself) and verifies nothing. The id is stored with the journal entry's
    command for audit; it is not recorded as used."""
    del check


@dataclass(frozen=True, slots=True)
class SignedReleaseAckVerifier:
    """The :data:`ReleaseAckVerifier` of a custodian that takes the exchange's signed
    acknowledgements (docs/protocol.md 12.5). Accepts an unpledge when, in this order: a signed
    acknowledgement was supplied (ReleaseAckUnknown);
    :func:`attestations.notices.verify_release_ack` accepts it at the command's time under
    ``registry`` (an ``exchange`` key of the ack's exchange, signature, not future-dated, not
    expired: its errors); its release id is the command's
    ``release_ack``, its exchange, client and asset are the command's and its custodian is
    ``custodian`` (ReleaseAckMismatch); its quantity covers the unpledged quantity
    (ReleaseAckExceeded); and no entry used it before (ReleaseAckReused). Returns the release id,
    which the book records as used in the same transaction as the unpledge."""

    registry: KeyRegistry
    custodian: str
    max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW

    def __post_init__(self) -> None:
        validate_party(self.custodian, what="custodian")

    def __call__(self, check: ReleaseAckCheck) -> str:
        if check.now is None:
            raise ConfigurationError(
                "the book did not pass the unpledge's time, so the acknowledgement's expiry "
                "cannot be judged"
            )
        if check.signed_ack is None:
            raise ReleaseAckUnknown(
                f"no signed release acknowledgement {check.release_ack!r} was supplied"
            )
        ack = verify_signed_release_ack(
            check.signed_ack,
            registry=self.registry,
            now=check.now,
            max_clock_skew=self.max_clock_skew,
        )
        if ack.release_id != check.release_ack:
            raise ReleaseAckMismatch(
                f"the supplied acknowledgement is {ack.release_id}, the unpledge names "
                f"{check.release_ack[:70]!r}"
            )
        expected = (self.custodian, check.exchange, check.client, check.asset)
        found = (ack.custodian, ack.exchange, ack.client, ack.asset)
        if found != expected:
            raise ReleaseAckMismatch(
                f"acknowledgement {ack.release_id} releases {ack.client}'s {ack.asset} pledged to "
                f"{ack.exchange} at {ack.custodian}, not {check.client}'s {check.asset} pledged to "
                f"{check.exchange} at {self.custodian}"
            )
        if check.quantity > ack.quantity:
            raise ReleaseAckExceeded(
                f"acknowledgement {ack.release_id} releases at most {ack.quantity} {ack.asset}, "
                f"the unpledge is of {check.quantity}"
            )
        if check.used_by is not None:
            raise ReleaseAckReused(
                f"acknowledgement {ack.release_id} was already used by {check.used_by!r}"
            )
        return ack.release_id


def compute_command_json(command: Command) -> dict[str, Any]:
    """The command as a JSON object (quantities as decimal strings), as stored and digested."""
    obj: dict[str, Any] = {
        "version": COMMAND_VERSION,
        "kind": command.kind,
        "idempotency_key": command.idempotency_key,
        "client": command.client,
        "asset": command.asset,
        "quantity": str(command.quantity),
    }
    if isinstance(command, Pledge | Unpledge | MoveToSettlement):
        obj["exchange"] = command.exchange
    if isinstance(command, Unpledge):
        obj["release_ack"] = command.release_ack
    if isinstance(command, AccrueYield):
        obj["day"] = command.day.isoformat()
    return obj


def compute_command_bytes(command: Command) -> bytes:
    """RFC 8785 bytes of :func:`compute_command_json`."""
    return compute_canonical_bytes(compute_command_json(command))


def compute_command_digest(command: Command) -> str:
    """Hex digest that identifies a command's content for idempotency."""
    return compute_digest(domain=DOMAIN_COMMAND, obj=compute_command_json(command)).hex()


def parse_command(obj: Mapping[str, Any]) -> Command:
    """Inverse of :func:`compute_command_json`."""
    if obj.get("version") != COMMAND_VERSION:
        raise DecodeError(f"command version {obj.get('version')!r} is not {COMMAND_VERSION}")
    cls = _COMMAND_TYPES.get(obj.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise DecodeError(f"command kind {str(obj.get('kind'))[:40]!r} is not known")
    expected = {"version", "kind", "idempotency_key", "client", "asset", "quantity"}
    if cls in (Pledge, Unpledge, MoveToSettlement):
        expected.add("exchange")
    if cls is Unpledge:
        expected.add("release_ack")
    if cls is AccrueYield:
        expected.add("day")
    if set(obj) != expected:
        raise DecodeError(f"{cls.kind} command members {sorted(obj)} are not {sorted(expected)}")
    quantity = obj["quantity"]
    if not isinstance(quantity, str) or not re.fullmatch(r"[1-9][0-9]{0,38}", quantity):
        raise AmountError(f"command quantity {str(quantity)[:45]!r} is not a decimal string")
    fields = {k: v for k, v in obj.items() if k not in ("version", "kind")}
    fields["quantity"] = int(quantity)
    if cls is AccrueYield:
        fields["day"] = _parse_day(obj["day"])
    return cls(**fields)


def _parse_day(text: object) -> date:
    if not isinstance(text, str) or not _DAY_RE.fullmatch(text):
        raise DecodeError(f"day {str(text)[:20]!r} is not YYYY-MM-DD")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise DecodeError(f"day {text!r} is not a valid date: {exc}") from exc


# --- the posting rules --------------------------------------------------------------------------

_ROUTES: Final[dict[str, tuple[str, str]]] = {
    # kind: (source sub-account, destination sub-account); "pledged" means pledged:<exchange>.
    # The source is debited (-quantity), the destination credited (+quantity): every entry
    # balances by construction. No route leaves pledged units except through an unpledge (back to
    # available, with the exchange's acknowledgement) or a move to settlement (liquidation), and a
    # withdrawal takes available units only: that is why a pledged unit can never be withdrawn or
    # pledged a second time.
    Deposit.kind: (EXTERNAL, AVAILABLE),
    Withdraw.kind: (AVAILABLE, EXTERNAL),
    Pledge.kind: (AVAILABLE, "pledged"),
    Unpledge.kind: ("pledged", AVAILABLE),
    MoveToSettlement.kind: ("pledged", SETTLEMENT),
    # Yield is new units the fund distributed into custody, so it comes from the external
    # account like a deposit, and it goes to available even when the accruing units are pledged:
    # it belongs to the client, and only the client decides to pledge it.
    AccrueYield.kind: (EXTERNAL, AVAILABLE),
    # A redemption locks units first. Like pledged units, redeeming units have exactly two ways
    # out - to the fund (complete) or back to available (cancel) - so units being redeemed can
    # be neither pledged nor withdrawn, and a pledged unit must be unpledged before redemption.
    LockForRedemption.kind: (AVAILABLE, REDEEMING),
    CompleteRedemption.kind: (REDEEMING, EXTERNAL),
    CancelRedemption.kind: (REDEEMING, AVAILABLE),
}


def _account_for(command: Command, sub_account: str) -> Account:
    if sub_account == EXTERNAL:
        return Account.external(command.asset)
    if sub_account == "pledged":
        if not isinstance(command, Pledge | Unpledge | MoveToSettlement):
            raise TypeError(f"{command.kind} has no exchange")  # unreachable: _ROUTES is static
        return Account(command.client, command.asset, pledged_to(command.exchange))
    return Account(command.client, command.asset, sub_account)


def compute_accounts(command: Command) -> tuple[Account, Account]:
    """(source, destination) of a command: the only two balances it reads and writes."""
    source, destination = _ROUTES[command.kind]
    return _account_for(command, source), _account_for(command, destination)


def compute_postings(command: Command) -> tuple[Posting, Posting]:
    """The journal entry's postings: source debited, destination credited, in that order."""
    source, destination = compute_accounts(command)
    return Posting(source, -command.quantity), Posting(destination, command.quantity)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A command the rules accept: its postings, and the release id the release-ack hook
    recorded as used (an unpledge under a verified acknowledgement), else None."""

    postings: tuple[Posting, Posting]
    release_ack_used: str | None = None


def compute_entry(
    command: Command,
    balances: Mapping[Account, int],
    *,
    assets: Mapping[str, Asset],
    verify_release_ack: ReleaseAckVerifier = record_release_ack_unverified,
    now: datetime | None = None,
    signed_ack: bytes | None = None,
    release_ack_used_by: str | None = None,
) -> tuple[Posting, Posting]:
    """The postings of :func:`compute_acceptance` (for callers that do not record used
    acknowledgements)."""
    return compute_acceptance(
        command,
        balances,
        assets=assets,
        verify_release_ack=verify_release_ack,
        now=now,
        signed_ack=signed_ack,
        release_ack_used_by=release_ack_used_by,
    ).postings


def compute_acceptance(
    command: Command,
    balances: Mapping[Account, int],
    *,
    assets: Mapping[str, Asset],
    verify_release_ack: ReleaseAckVerifier = record_release_ack_unverified,
    now: datetime | None = None,
    signed_ack: bytes | None = None,
    release_ack_used_by: str | None = None,
) -> Accepted:
    """Accept ``command`` against the current ``balances`` (an account missing from the mapping
    holds zero) and return its postings, or raise: unknown asset, the release-ack hook refusing an
    unpledge, a client account that would go negative (pledge or withdrawal beyond available,
    unpledge or settlement beyond pledged), or custody of one asset reaching 2**128 (a deposit or
    a yield distribution). For an unpledge, ``now`` is the command's time,
    ``signed_ack`` the acknowledgement supplied alongside, ``release_ack_used_by`` the key of an
    entry that already used the command's ``release_ack``."""
    if command.asset not in assets:
        raise UnknownAsset(f"asset {command.asset!r} is not configured in the book")
    used: str | None = None
    if isinstance(command, Unpledge):
        used = verify_release_ack(
            ReleaseAckCheck(
                command.idempotency_key,
                command.client,
                command.asset,
                command.exchange,
                command.quantity,
                command.release_ack,
                now=now,
                signed_ack=signed_ack,
                used_by=release_ack_used_by,
            )
        )
        if used is not None and used != command.release_ack:
            raise InvariantViolation("the release-ack hook recorded another id than the command's")
    postings = compute_postings(command)
    for posting in postings:
        after = balances.get(posting.account, 0) + posting.amount
        if posting.account.is_external:
            if -after >= UNITS_LIMIT:
                raise CustodyLimitExceeded(
                    f"custody of {command.asset} would reach {-after}, beyond 128 bits"
                )
        elif after < 0:
            account = posting.account
            raise InsufficientBalance(
                f"{command.kind} of {command.quantity} {account.asset} for {account.holder}: "
                f"{account.sub_account} holds {balances.get(account, 0)}"
            )
    return Accepted(postings, used)


def compute_balances_after(
    balances: Mapping[Account, int], postings: Iterable[Posting]
) -> dict[Account, int]:
    """New balances of the accounts the postings touch (the other accounts do not change)."""
    changed: dict[Account, int] = {}
    for posting in postings:
        current = changed.get(posting.account, balances.get(posting.account, 0))
        changed[posting.account] = current + posting.amount
    return changed


# --- recorded entries and idempotency -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedEntry:
    """A journal entry as recorded: its position in the journal, when, the command that caused it
    (with its idempotency key and, for an unpledge, the release acknowledgement) and its
    postings. Applying a command returns this; a retry returns the same value."""

    entry_id: int
    recorded_at: datetime
    command: Command
    postings: tuple[Posting, ...]

    def __post_init__(self) -> None:
        if self.recorded_at.tzinfo is None:
            raise DecodeError("recorded_at must be timezone-aware")


def verify_retry(command: Command, *, recorded_digest: str) -> None:
    """Pass when ``command`` has the content recorded under its idempotency key (a retry, which
    must return the original result); raise :class:`IdempotencyConflict` when the key was used
    for other content."""
    if compute_command_digest(command) != recorded_digest:
        raise IdempotencyConflict(
            f"idempotency key {command.idempotency_key!r} was already used for another command"
        )


# --- invariants ---------------------------------------------------------------------------------


def compute_invariant_breaks(
    entries: Iterable[RecordedEntry], balances: Mapping[Account, int]
) -> list[str]:
    """Recompute the book from ``entries`` (in journal order) and return every broken invariant,
    not just the first; an empty list means the book is sound. Checked: each entry's postings are
    exactly its command's posting rule and sum to zero per asset; entry ids increase and
    idempotency keys are unique; no client account is ever negative and no external account ever
    positive; the recomputed balances equal ``balances``; per client and asset, the sub-accounts
    (available + pledged:* + settlement + redeeming) add up to "deposits minus withdrawals",
    where yield distributions count as deposits and completed redemptions as withdrawals (every
    unit that entered custody for the client minus every unit that left); per asset, all
    balances sum to zero."""
    breaks: list[str] = []
    replayed: dict[Account, int] = defaultdict(int)
    net_deposits: dict[tuple[str, str], int] = defaultdict(int)
    keys: set[str] = set()
    last_id = 0
    for entry in entries:
        command = entry.command
        where = f"entry {entry.entry_id} ({command.kind} {command.idempotency_key!r})"
        if entry.entry_id <= last_id:
            breaks.append(f"{where}: id not above the previous entry {last_id}")
        last_id = max(last_id, entry.entry_id)
        if command.idempotency_key in keys:
            breaks.append(f"{where}: idempotency key recorded twice")
        keys.add(command.idempotency_key)
        breaks.extend(_entry_breaks(entry, where=where, replayed=replayed))
        if isinstance(command, Deposit | AccrueYield):
            net_deposits[(command.client, command.asset)] += command.quantity
        elif isinstance(command, Withdraw | CompleteRedemption):
            net_deposits[(command.client, command.asset)] -= command.quantity
    breaks.extend(
        f"{_name(account)}: stored balance {balances.get(account, 0)}, journal gives "
        f"{replayed.get(account, 0)}"
        for account in sorted(set(replayed) | set(balances))
        if balances.get(account, 0) != replayed.get(account, 0)
    )
    return breaks + _balance_breaks(balances, net_deposits)


def _entry_breaks(entry: RecordedEntry, *, where: str, replayed: dict[Account, int]) -> list[str]:
    """Breaks within one entry; adds its postings to ``replayed``."""
    breaks: list[str] = []
    sums: dict[str, int] = defaultdict(int)
    for posting in entry.postings:
        sums[posting.account.asset] += posting.amount
    breaks.extend(
        f"{where}: {asset} postings sum to {total}, not 0"
        for asset, total in sorted(sums.items())
        if total
    )
    if entry.postings != compute_postings(entry.command):
        breaks.append(f"{where}: postings differ from the {entry.command.kind} posting rule")
    for posting in entry.postings:
        replayed[posting.account] += posting.amount
        after = replayed[posting.account]
        if after > 0 if posting.account.is_external else after < 0:
            breaks.append(f"{where}: {_name(posting.account)} goes to {after}")
    return breaks


def _balance_breaks(
    balances: Mapping[Account, int], net_deposits: Mapping[tuple[str, str], int]
) -> list[str]:
    """Breaks of the stored balances against the deposits and withdrawals of the journal."""
    holdings: dict[tuple[str, str], int] = defaultdict(int)
    per_asset: dict[str, int] = defaultdict(int)
    for account, balance in balances.items():
        per_asset[account.asset] += balance
        if not account.is_external:
            holdings[(account.holder, account.asset)] += balance
    breaks = [
        f"{client}/{asset}: sub-accounts hold {holdings.get((client, asset), 0)}, deposits minus "
        f"withdrawals {net_deposits.get((client, asset), 0)}"
        for client, asset in sorted(set(holdings) | set(net_deposits))
        if holdings.get((client, asset), 0) != net_deposits.get((client, asset), 0)
    ]
    breaks.extend(
        f"{asset}: balances sum to {total}, not 0"
        for asset, total in sorted(per_asset.items())
        if total
    )
    return breaks


def _name(account: Account) -> str:
    return f"{account.holder}/{account.asset}/{account.sub_account}"


# --- the in-memory book -------------------------------------------------------------------------


@dataclass
class MemoryBook:
    """The custody book in memory, with the same operations as the database store. Used as the
    reference model in tests and anywhere a book without persistence is enough."""

    assets: Mapping[str, Asset]
    verify_release_ack: ReleaseAckVerifier = record_release_ack_unverified
    _balances: dict[Account, int] = field(default_factory=dict)
    _journal: list[RecordedEntry] = field(default_factory=list)
    _by_key: dict[str, tuple[str, RecordedEntry]] = field(default_factory=dict)
    _used_acks: dict[str, str] = field(default_factory=dict)  # release id -> idempotency key

    def apply(
        self, command: Command, *, now: datetime, release_ack: bytes | None = None
    ) -> RecordedEntry:
        """Apply ``command`` once. A retry (same key, same content) returns the original entry
        and changes nothing; the same key with other content raises IdempotencyConflict.
        ``release_ack`` is the signed acknowledgement supplied with an unpledge."""
        recorded = self._by_key.get(command.idempotency_key)
        if recorded is not None:
            digest, entry = recorded
            verify_retry(command, recorded_digest=digest)
            return entry
        accepted = compute_acceptance(
            command,
            self._balances,
            assets=self.assets,
            verify_release_ack=self.verify_release_ack,
            now=now,
            signed_ack=release_ack,
            release_ack_used_by=self._used_acks.get(command.release_ack)
            if isinstance(command, Unpledge)
            else None,
        )
        postings = accepted.postings
        entry = RecordedEntry(len(self._journal) + 1, now, command, postings)
        self._balances.update(compute_balances_after(self._balances, postings))
        self._journal.append(entry)
        self._by_key[command.idempotency_key] = (compute_command_digest(command), entry)
        if accepted.release_ack_used is not None:
            self._used_acks[accepted.release_ack_used] = command.idempotency_key
        return entry

    def balances(
        self, *, client: str | None = None, asset: str | None = None
    ) -> dict[Account, int]:
        """Non-zero client balances, optionally of one client and/or one asset."""
        return select_balances(self._balances, client=client, asset=asset)

    def pledged(self, exchange: str) -> dict[tuple[str, str], int]:
        """Non-zero units pledged to ``exchange`` per (client, asset)."""
        return select_pledged(self._balances, exchange=exchange)

    def totals(self) -> dict[str, int]:
        """Units held in custody per asset (units in minus units out over all clients)."""
        return select_totals(self._balances)

    def journal(self, *, after: int = 0, limit: int = 1000) -> list[RecordedEntry]:
        return [entry for entry in self._journal if entry.entry_id > after][:limit]

    def entry(self, idempotency_key: str) -> RecordedEntry | None:
        recorded = self._by_key.get(idempotency_key)
        return None if recorded is None else recorded[1]

    def check_invariants(self) -> list[str]:
        return compute_invariant_breaks(self._journal, self._balances)


def select_balances(
    balances: Mapping[Account, int], *, client: str | None = None, asset: str | None = None
) -> dict[Account, int]:
    """The non-zero client balances of ``balances``, filtered, in account order."""
    return {
        account: balance
        for account, balance in sorted(balances.items())
        if balance
        and not account.is_external
        and (client is None or account.holder == client)
        and (asset is None or account.asset == asset)
    }


def select_pledged(balances: Mapping[Account, int], *, exchange: str) -> dict[tuple[str, str], int]:
    """Non-zero units pledged to ``exchange`` per (client, asset), in that order."""
    sub_account = pledged_to(exchange)
    return {
        (account.holder, account.asset): balance
        for account, balance in sorted(balances.items())
        if balance and account.sub_account == sub_account
    }


def select_totals(balances: Mapping[Account, int]) -> dict[str, int]:
    """Units in custody per asset: minus each external account's balance, non-zero only."""
    return {
        account.asset: -balance
        for account, balance in sorted(balances.items())
        if account.is_external and balance
    }
