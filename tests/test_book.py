"""The custody book's pure rules: commands, postings, rejections, idempotency, invariants, and a
Hypothesis state machine over the in-memory book."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from attestations.amounts import UNITS_LIMIT, Asset
from attestations.errors import AmountError, CounterpartyError, DecodeError, FloatRejected
from custodian.book import (
    AVAILABLE,
    CUSTODIAN,
    REDEEMING,
    SETTLEMENT,
    Account,
    AccrueYield,
    CancelRedemption,
    Command,
    CompleteRedemption,
    Deposit,
    LockForRedemption,
    MemoryBook,
    MoveToSettlement,
    Pledge,
    Posting,
    RecordedEntry,
    Unpledge,
    Withdraw,
    compute_accounts,
    compute_command_digest,
    compute_command_json,
    compute_entry,
    compute_invariant_breaks,
    parse_command,
    pledged_to,
)
from custodian.errors import (
    CustodyLimitExceeded,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidQuantity,
    UnknownAsset,
)

ASSETS = {"BTC": Asset("BTC", 8), "ETH": Asset("ETH", 18), "BENJI": Asset("BENJI", 6)}
NOW = datetime(2025, 11, 25, 8, 0, tzinfo=UTC)
MAX = UNITS_LIMIT - 1


def available(client: str, asset: str) -> Account:
    return Account(client, asset, AVAILABLE)


def pledged(client: str, asset: str, exchange: str) -> Account:
    return Account(client, asset, pledged_to(exchange))


def external(asset: str) -> Account:
    return Account.external(asset)


def funded_book(quantity: int = 100) -> MemoryBook:
    book = MemoryBook(ASSETS)
    book.apply(Deposit("d1", "alice", "BTC", quantity), now=NOW)
    return book


# --- commands are well-formed once constructed ---------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "error"),
    [
        (1.5, FloatRejected),
        (100.0, FloatRejected),
        (0, InvalidQuantity),
        (-1, InvalidQuantity),
        (UNITS_LIMIT, InvalidQuantity),
        (True, AmountError),
        ("100", AmountError),
    ],
)
def test_command_quantity_must_be_positive_int_below_2_128(quantity: object, error: type) -> None:
    with pytest.raises(error):
        Deposit("k", "alice", "BTC", quantity)  # type: ignore[arg-type]
    with pytest.raises(error):
        Pledge("k", "alice", "BTC", "binance", quantity)  # type: ignore[arg-type]


def test_float_rejection_is_a_counterparty_error() -> None:
    with pytest.raises(CounterpartyError) as caught:
        Withdraw("k", "alice", "BTC", 0.1)  # type: ignore[arg-type]
    assert caught.value.reason == "float_rejected"


@pytest.mark.parametrize(
    "make",
    [
        lambda: Deposit("", "alice", "BTC", 1),
        lambda: Deposit("has space", "alice", "BTC", 1),
        lambda: Deposit("k" * 129, "alice", "BTC", 1),
        lambda: Deposit("k", "", "BTC", 1),
        lambda: Deposit("k", CUSTODIAN, "BTC", 1),
        lambda: Deposit("k", "alice", "btc", 1),
        lambda: Pledge("k", "alice", "BTC", "Binance", 1),
        lambda: Pledge("k", "alice", "BTC", "", 1),
        lambda: Unpledge("k", "alice", "BTC", "binance", 1, ""),
        lambda: Unpledge("k", "alice", "BTC", "binance", 1, None),  # type: ignore[arg-type]
        lambda: MoveToSettlement("k", "alice", "BTC", "bin ance", 1),
    ],
)
def test_malformed_commands_are_refused(make: object) -> None:
    with pytest.raises(DecodeError):
        make()  # type: ignore[operator]


def test_unpledge_requires_the_release_acknowledgement() -> None:
    with pytest.raises(TypeError):
        Unpledge("k", "alice", "BTC", "binance", 1)  # type: ignore[call-arg]
    command = Unpledge("k", "alice", "BTC", "binance", 1, "ack-77")
    assert compute_command_json(command)["release_ack"] == "ack-77"


def test_commands_are_immutable() -> None:
    command = Deposit("k", "alice", "BTC", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.quantity = 2  # type: ignore[misc]


def test_accounts_validate_holder_and_sub_account() -> None:
    with pytest.raises(DecodeError):
        Account(CUSTODIAN, "BTC", AVAILABLE)
    with pytest.raises(DecodeError):
        Account("alice", "BTC", "external")
    with pytest.raises(DecodeError):
        Account("alice", "BTC", "pledged:")
    with pytest.raises(DecodeError):
        Account("alice", "BTC", "borrowed")
    assert pledged("alice", "BTC", "binance").exchange == "binance"
    assert available("alice", "BTC").exchange is None


@pytest.mark.parametrize(
    "command",
    [
        Deposit("k1", "alice", "BTC", MAX),
        Withdraw("k2", "alice", "ETH", 1),
        Pledge("k3", "alice:sub", "BENJI", "binance", 12),
        Unpledge("k4", "bob", "BTC", "okx", 3, "ack/1"),
        MoveToSettlement("k5", "bob", "BTC", "okx", 3),
    ],
)
def test_command_json_round_trips_and_digest_binds_content(command: Command) -> None:
    assert parse_command(compute_command_json(command)) == command
    other = dataclasses.replace(command, quantity=command.quantity - 1 or 2)
    assert compute_command_digest(other) != compute_command_digest(command)


def test_parse_command_refuses_unknown_members_and_non_canonical_quantities() -> None:
    obj = compute_command_json(Deposit("k", "alice", "BTC", 5))
    with pytest.raises(DecodeError):
        parse_command({**obj, "extra": "x"})
    with pytest.raises(DecodeError):
        parse_command({**obj, "quantity": "05"})
    with pytest.raises(DecodeError):
        parse_command({**obj, "kind": "transfer"})
    with pytest.raises(DecodeError):
        parse_command({**obj, "version": 2})


# --- the posting rules ---------------------------------------------------------------------------

POSTING_TABLE = [
    (Deposit("k", "alice", "BTC", 7), external("BTC"), available("alice", "BTC")),
    (Withdraw("k", "alice", "BTC", 7), available("alice", "BTC"), external("BTC")),
    (
        Pledge("k", "alice", "BTC", "binance", 7),
        available("alice", "BTC"),
        pledged("alice", "BTC", "binance"),
    ),
    (
        Unpledge("k", "alice", "BTC", "binance", 7, "ack"),
        pledged("alice", "BTC", "binance"),
        available("alice", "BTC"),
    ),
    (
        MoveToSettlement("k", "alice", "BTC", "binance", 7),
        pledged("alice", "BTC", "binance"),
        Account("alice", "BTC", SETTLEMENT),
    ),
]


@pytest.mark.parametrize(("command", "source", "destination"), POSTING_TABLE)
def test_each_command_moves_units_from_source_to_destination(
    command: Command, source: Account, destination: Account
) -> None:
    assert compute_accounts(command) == (source, destination)
    balances = {source: 0 if source.is_external else 7}
    postings = compute_entry(command, balances, assets=ASSETS)
    assert postings == (Posting(source, -7), Posting(destination, 7))
    assert sum(posting.amount for posting in postings) == 0


@pytest.mark.parametrize(("command", "source", "destination"), POSTING_TABLE[1:])
def test_no_client_account_goes_negative(
    command: Command, source: Account, destination: Account
) -> None:
    del destination
    with pytest.raises(InsufficientBalance):
        compute_entry(command, {source: 6}, assets=ASSETS)
    with pytest.raises(InsufficientBalance):
        compute_entry(command, {}, assets=ASSETS)


def test_unknown_asset_is_rejected() -> None:
    with pytest.raises(UnknownAsset):
        compute_entry(Deposit("k", "alice", "DOGE", 1), {}, assets=ASSETS)


def test_custody_of_an_asset_stays_below_2_128() -> None:
    compute_entry(Deposit("k", "alice", "ETH", MAX), {}, assets=ASSETS)
    with pytest.raises(CustodyLimitExceeded):
        compute_entry(Deposit("k", "bob", "ETH", 1), {external("ETH"): -MAX}, assets=ASSETS)


def test_pledge_never_exceeds_available_and_a_unit_is_never_pledged_twice() -> None:
    book = funded_book(100)
    book.apply(Pledge("p1", "alice", "BTC", "binance", 60), now=NOW)
    with pytest.raises(InsufficientBalance):
        book.apply(Pledge("p2", "alice", "BTC", "okx", 41), now=NOW)
    book.apply(Pledge("p3", "alice", "BTC", "okx", 40), now=NOW)
    with pytest.raises(InsufficientBalance):
        book.apply(Pledge("p4", "alice", "BTC", "okx", 1), now=NOW)
    with pytest.raises(InsufficientBalance):
        book.apply(Withdraw("w1", "alice", "BTC", 1), now=NOW)
    assert book.pledged("binance") == {("alice", "BTC"): 60}
    assert book.pledged("okx") == {("alice", "BTC"): 40}
    assert book.balances(client="alice") == {
        pledged("alice", "BTC", "binance"): 60,
        pledged("alice", "BTC", "okx"): 40,
    }
    assert book.check_invariants() == []


def test_unpledge_and_settlement_take_only_units_pledged_to_that_exchange() -> None:
    book = funded_book(100)
    book.apply(Pledge("p1", "alice", "BTC", "binance", 30), now=NOW)
    with pytest.raises(InsufficientBalance):
        book.apply(Unpledge("u1", "alice", "BTC", "okx", 1, "ack-1"), now=NOW)
    with pytest.raises(InsufficientBalance):
        book.apply(MoveToSettlement("s1", "alice", "BTC", "binance", 31), now=NOW)
    book.apply(MoveToSettlement("s2", "alice", "BTC", "binance", 10), now=NOW)
    entry = book.apply(Unpledge("u2", "alice", "BTC", "binance", 20, "ack-2"), now=NOW)
    assert isinstance(entry.command, Unpledge)
    assert entry.command.release_ack == "ack-2"
    assert book.balances(client="alice") == {
        available("alice", "BTC"): 90,
        Account("alice", "BTC", SETTLEMENT): 10,
    }
    assert book.pledged("binance") == {}
    assert book.totals() == {"BTC": 100}


def test_the_release_ack_hook_can_refuse_an_unpledge() -> None:
    seen: list[Unpledge] = []

    class ForgedAck(CounterpartyError):
        reason = "forged_ack"

    def refuse(command: Unpledge) -> None:
        seen.append(command)
        raise ForgedAck(command.release_ack)

    book = MemoryBook(ASSETS, verify_release_ack=refuse)
    book.apply(Deposit("d", "alice", "BTC", 5), now=NOW)
    book.apply(Pledge("p", "alice", "BTC", "binance", 5), now=NOW)
    with pytest.raises(ForgedAck):
        book.apply(Unpledge("u", "alice", "BTC", "binance", 5, "forged"), now=NOW)
    assert [command.release_ack for command in seen] == ["forged"]
    assert book.pledged("binance") == {("alice", "BTC"): 5}


YIELD_AND_REDEMPTION_TABLE = [
    (
        AccrueYield.for_day(client="alice", asset="BENJI", quantity=7, day=date(2025, 11, 25)),
        external("BENJI"),
        available("alice", "BENJI"),
    ),
    (
        LockForRedemption("k", "alice", "BENJI", 7),
        available("alice", "BENJI"),
        Account("alice", "BENJI", REDEEMING),
    ),
    (
        CompleteRedemption("k", "alice", "BENJI", 7),
        Account("alice", "BENJI", REDEEMING),
        external("BENJI"),
    ),
    (
        CancelRedemption("k", "alice", "BENJI", 7),
        Account("alice", "BENJI", REDEEMING),
        available("alice", "BENJI"),
    ),
]


@pytest.mark.parametrize(("command", "source", "destination"), YIELD_AND_REDEMPTION_TABLE)
def test_yield_and_redemption_posting_rules(
    command: Command, source: Account, destination: Account
) -> None:
    assert compute_accounts(command) == (source, destination)
    postings = compute_entry(command, {source: 0 if source.is_external else 7}, assets=ASSETS)
    assert postings == (Posting(source, -7), Posting(destination, 7))
    if not source.is_external:
        with pytest.raises(InsufficientBalance):
            compute_entry(command, {source: 6}, assets=ASSETS)
    assert parse_command(compute_command_json(command)) == command


@pytest.mark.parametrize(
    "make",
    [
        lambda: LockForRedemption("k", "alice", "benji", 1),
        lambda: CompleteRedemption("", "alice", "BENJI", 1),
        lambda: CancelRedemption("k", CUSTODIAN, "BENJI", 1),
        lambda: AccrueYield("k", "alice", "BENJI", 1, date(2025, 11, 25)),
        lambda: AccrueYield.for_day(client="alice", asset="BENJI", quantity=1, day="2025-11-25"),  # type: ignore[arg-type]
    ],
)
def test_malformed_yield_and_redemption_commands_are_refused(make: object) -> None:
    with pytest.raises(DecodeError):
        make()  # type: ignore[operator]


def test_redemption_quantities_are_positive() -> None:
    for command in (LockForRedemption, CompleteRedemption, CancelRedemption):
        with pytest.raises(InvalidQuantity):
            command("k", "alice", "BENJI", 0)


def test_redeeming_units_are_counted_in_the_holdings() -> None:
    book = MemoryBook(ASSETS)
    book.apply(Deposit("d", "alice", "BENJI", 10), now=NOW)
    book.apply(LockForRedemption("r", "alice", "BENJI", 4), now=NOW)
    book.apply(CompleteRedemption("c", "alice", "BENJI", 1), now=NOW)
    assert book.check_invariants() == []
    # A journal that drops the completed redemption no longer adds up to the holdings.
    entries = book.journal()
    balances = {**book.balances(), external("BENJI"): -9}
    breaks = compute_invariant_breaks(entries[:2], balances)
    assert any("sub-accounts hold 9, deposits minus withdrawals 10" in line for line in breaks)


# --- idempotency ----------------------------------------------------------------------------------


def test_a_retry_returns_the_original_entry_and_has_no_second_effect() -> None:
    book = MemoryBook(ASSETS)
    first = book.apply(Deposit("d1", "alice", "BTC", 10), now=NOW)
    later = datetime(2025, 11, 26, tzinfo=UTC)
    assert book.apply(Deposit("d1", "alice", "BTC", 10), now=later) == first
    assert book.balances() == {available("alice", "BTC"): 10}
    assert len(book.journal()) == 1
    assert book.entry("d1") == first


@pytest.mark.parametrize(
    "conflicting",
    [
        Deposit("d1", "alice", "BTC", 11),
        Deposit("d1", "bob", "BTC", 10),
        Withdraw("d1", "alice", "BTC", 10),
        Pledge("d1", "alice", "BTC", "binance", 10),
    ],
)
def test_the_same_key_with_other_content_is_a_conflict(conflicting: Command) -> None:
    book = MemoryBook(ASSETS)
    book.apply(Deposit("d1", "alice", "BTC", 10), now=NOW)
    with pytest.raises(IdempotencyConflict):
        book.apply(conflicting, now=NOW)
    assert book.balances() == {available("alice", "BTC"): 10}


def test_a_rejected_command_leaves_no_trace_and_may_be_retried() -> None:
    book = MemoryBook(ASSETS)
    with pytest.raises(InsufficientBalance):
        book.apply(Withdraw("w1", "alice", "BTC", 5), now=NOW)
    assert book.entry("w1") is None
    book.apply(Deposit("d1", "alice", "BTC", 5), now=NOW)
    assert book.apply(Withdraw("w1", "alice", "BTC", 5), now=NOW).entry_id == 2


# --- invariants -----------------------------------------------------------------------------------


def test_invariant_check_reports_every_break() -> None:
    deposit = Deposit("d1", "alice", "BTC", 10)
    unbalanced = RecordedEntry(
        1, NOW, deposit, (Posting(external("BTC"), -10), Posting(available("alice", "BTC"), 9))
    )
    breaks = compute_invariant_breaks([unbalanced], {external("BTC"): -10})
    assert any("sum to -1" in line for line in breaks)
    assert any("posting rule" in line for line in breaks)
    assert any("stored balance 0, journal gives 9" in line for line in breaks)
    assert any("sub-accounts hold 0, deposits minus withdrawals 10" in line for line in breaks)
    assert any("BTC: balances sum to -10" in line for line in breaks)


def test_invariant_check_reports_negative_balances_and_replayed_keys() -> None:
    withdraw = Withdraw("w1", "alice", "BTC", 3)
    entries = [
        RecordedEntry(
            2, NOW, withdraw, (Posting(available("alice", "BTC"), -3), Posting(external("BTC"), 3))
        ),
        RecordedEntry(
            2, NOW, withdraw, (Posting(available("alice", "BTC"), -3), Posting(external("BTC"), 3))
        ),
    ]
    breaks = compute_invariant_breaks(entries, {available("alice", "BTC"): -6, external("BTC"): 6})
    assert any("alice/BTC/available goes to -3" in line for line in breaks)
    assert any("@custodian/BTC/external goes to 3" in line for line in breaks)
    assert any("recorded twice" in line for line in breaks)
    assert any("id not above" in line for line in breaks)


def test_a_sound_book_has_no_breaks() -> None:
    book = funded_book(10)
    book.apply(Pledge("p", "alice", "BTC", "binance", 4), now=NOW)
    assert book.check_invariants() == []


# --- any sequence of commands ---------------------------------------------------------------------

CLIENTS = ("alice", "bob")
EXCHANGES = ("binance", "okx")
QUANTITIES = st.one_of(st.integers(1, 1000), st.sampled_from([MAX // 4, MAX // 2]))
DAYS = (date(2025, 11, 25), date(2025, 11, 26))


def command_strategy() -> st.SearchStrategy[Command]:
    key = st.sampled_from([f"k{i}" for i in range(40)])
    client = st.sampled_from(CLIENTS)
    asset = st.sampled_from(["BTC", "ETH", "DOGE"])  # DOGE is not configured
    exchange = st.sampled_from(EXCHANGES)
    ack = st.sampled_from(["ack-1", "ack-2"])
    day = st.sampled_from(DAYS)
    return st.one_of(
        st.builds(Deposit, key, client, asset, QUANTITIES),
        st.builds(Withdraw, key, client, asset, QUANTITIES),
        st.builds(Pledge, key, client, asset, exchange, QUANTITIES),
        st.builds(Unpledge, key, client, asset, exchange, QUANTITIES, ack),
        st.builds(MoveToSettlement, key, client, asset, exchange, QUANTITIES),
        st.builds(AccrueYield.for_day, client=client, asset=asset, quantity=QUANTITIES, day=day),
        st.builds(LockForRedemption, key, client, asset, QUANTITIES),
        st.builds(CompleteRedemption, key, client, asset, QUANTITIES),
        st.builds(CancelRedemption, key, client, asset, QUANTITIES),
    )


class BookMachine(RuleBasedStateMachine):
    """Random commands, retries and key reuse against the in-memory book, checked against an
    independent count of the units in and out of custody (deposits and yield in, withdrawals and
    completed redemptions out), of the units being redeemed, and of the yield paid."""

    def __init__(self) -> None:
        super().__init__()
        self.book = MemoryBook(ASSETS)
        self.net_deposits: dict[tuple[str, str], int] = {}
        self.applied: dict[str, RecordedEntry] = {}
        self.redeeming: dict[tuple[str, str], int] = {}
        self.yield_days: set[tuple[str, str, date]] = set()

    @rule(command=command_strategy())
    def apply(self, command: Command) -> None:
        before = self.book.balances()
        try:
            entry = self.book.apply(command, now=NOW)
        except (IdempotencyConflict, InsufficientBalance, UnknownAsset, CustodyLimitExceeded):
            assert self.book.balances() == before
            return
        if command.idempotency_key in self.applied:
            assert entry == self.applied[command.idempotency_key]
            assert self.book.balances() == before
            return
        self.applied[command.idempotency_key] = entry
        signs = {"deposit": 1, "accrue_yield": 1, "withdraw": -1, "complete_redemption": -1}
        sign = signs.get(command.kind, 0)
        position = (command.client, command.asset)
        self.net_deposits[position] = self.net_deposits.get(position, 0) + sign * command.quantity
        lock = {"lock_for_redemption": 1, "complete_redemption": -1, "cancel_redemption": -1}
        locked = self.redeeming.get(position, 0) + lock.get(command.kind, 0) * command.quantity
        self.redeeming[position] = locked
        if isinstance(command, AccrueYield):
            paid = (command.client, command.asset, command.day)
            assert paid not in self.yield_days  # one payment per client, asset and day
            self.yield_days.add(paid)
            assert entry.postings[1].account.sub_account == AVAILABLE

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        if self.applied:
            key = data.draw(st.sampled_from(sorted(self.applied)))
            original = self.applied[key]
            before = self.book.balances()
            assert self.book.apply(original.command, now=NOW) == original
            assert self.book.balances() == before

    @invariant()
    def no_negative_balance_and_every_entry_balanced(self) -> None:
        assert all(balance > 0 for balance in self.book.balances().values())
        for entry in self.book.journal(limit=10**6):
            assert sum(posting.amount for posting in entry.postings) == 0

    @invariant()
    def units_are_conserved(self) -> None:
        totals: dict[str, int] = {}
        for (_, asset), net in self.net_deposits.items():
            totals[asset] = totals.get(asset, 0) + net
        assert self.book.totals() == {asset: total for asset, total in totals.items() if total}

    @invariant()
    def sub_accounts_add_up_to_holdings(self) -> None:
        holdings: dict[tuple[str, str], int] = {}
        for account, balance in self.book.balances().items():
            position = (account.holder, account.asset)
            holdings[position] = holdings.get(position, 0) + balance
        expected = {position: net for position, net in self.net_deposits.items() if net}
        assert holdings == expected

    @invariant()
    def redeeming_units_are_what_was_locked_and_not_yet_released(self) -> None:
        redeeming = {
            (account.holder, account.asset): balance
            for account, balance in self.book.balances().items()
            if account.sub_account == REDEEMING
        }
        assert redeeming == {position: units for position, units in self.redeeming.items() if units}

    @invariant()
    def recomputed_book_is_sound(self) -> None:
        assert self.book.check_invariants() == []


TestBookMachine = BookMachine.TestCase
TestBookMachine.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.slow
def test_book_machine_long() -> None:
    run_state_machine_as_test(
        BookMachine, settings=settings(max_examples=2000, stateful_step_count=60, deadline=None)
    )
