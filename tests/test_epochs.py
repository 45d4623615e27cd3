"""Attestation epochs: every planned statement verifies at an exchange, and the exchange's trees
then hold exactly the pledged holdings."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestations.disclosure import ReceiverTrees, build_trees
from attestations.errors import InvariantViolation
from attestations.statement import StatementKind
from attestations.verify import ChainHead, verify_statement
from custodian.epochs import EpochState, plan_epoch
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, NOW, World, sample_prices, seed

SALT_SECRET = seed("epoch-salt-secret")
ACCOUNTS = ("alice", "bob", "carol", "dave", "erin")

pledges = st.dictionaries(
    st.tuples(st.sampled_from(ACCOUNTS), st.sampled_from(sorted(DECIMALS))),
    st.integers(min_value=0, max_value=10**15),
    max_size=8,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def run_epochs(
    world: World, holdings_by_epoch: list[dict[tuple[str, str], int]], *, snapshot_every: int = 0
) -> tuple[EpochState, ReceiverTrees]:
    """Plan, sign and verify one statement per entry, as custodian and exchange would."""
    state = EpochState(CUSTODIAN, EXCHANGE)
    receiver = ReceiverTrees(DECIMALS)
    head: ChainHead | None = None
    for index, pledged in enumerate(holdings_by_epoch):
        now = NOW + timedelta(seconds=index)
        plan = plan_epoch(
            state,
            pledged=pledged,
            decimals=DECIMALS,
            prices=sample_prices(),
            salt_secret=SALT_SECRET,
            now=now,
            lifetime=timedelta(hours=1),
            snapshot=bool(snapshot_every) and index % snapshot_every == 0,
        )
        verified = verify_statement(
            world.sign(plan.statement).encode(),
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            registry=world.registry,
            head=head,
            now=now,
            receiver=receiver,
            disclosure=plan.disclosure,
        )
        verified.trees_plan.apply()
        plan.commit()
        head = verified.head
    return state, receiver


def attested(receiver: ReceiverTrees) -> dict[tuple[str, str], int]:
    out = {}
    for asset, tree in receiver.trees.items():
        for leaf in tree.iter_leaves():
            account = receiver.account_at(asset, leaf.position)
            assert account is not None
            out[(account, asset)] = leaf.quantity
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(epochs=st.lists(pledges, min_size=1, max_size=5), snapshot_every=st.sampled_from([0, 2]))
def test_the_exchange_ends_with_exactly_the_pledged_holdings(
    world: World, epochs: list[dict[tuple[str, str], int]], snapshot_every: int
) -> None:
    state, receiver = run_epochs(world, epochs, snapshot_every=snapshot_every)
    expected = {holding: units for holding, units in epochs[-1].items() if units}
    assert attested(receiver) == expected
    assert state.quantities == expected
    assert state.sequence == len(epochs)
    for asset, tree in state.trees.items():
        assert receiver.trees[asset].root == tree.root


def test_positions_are_stable_and_freed_slots_are_reused(world: World) -> None:
    first = {("alice", "BTC"): 5, ("bob", "BTC"): 6, ("carol", "BTC"): 7}
    second = {("alice", "BTC"): 5, ("carol", "BTC"): 8}  # bob leaves; carol changes
    third = {("alice", "BTC"): 5, ("carol", "BTC"): 8, ("dave", "BTC"): 9}  # dave takes 1
    state, _ = run_epochs(world, [first])
    assert state.positions == {("alice", "BTC"): 0, ("bob", "BTC"): 1, ("carol", "BTC"): 2}
    plan = plan_epoch(
        state,
        pledged=second,
        decimals=DECIMALS,
        prices=sample_prices(),
        salt_secret=SALT_SECRET,
        now=NOW + timedelta(seconds=5),
        lifetime=timedelta(hours=1),
    )
    assert plan.statement.kind is StatementKind.DELTA
    assert [(leaf.account, leaf.position) for leaf in plan.disclosure.set_leaves] == [("carol", 2)]
    assert [(slot.asset, slot.position) for slot in plan.disclosure.clear] == [("BTC", 1)]
    plan.commit()
    plan3 = plan_epoch(
        state,
        pledged=third,
        decimals=DECIMALS,
        prices=sample_prices(),
        salt_secret=SALT_SECRET,
        now=NOW + timedelta(seconds=6),
        lifetime=timedelta(hours=1),
    )
    assert [(leaf.account, leaf.position) for leaf in plan3.disclosure.set_leaves] == [("dave", 1)]
    assert plan3.disclosure.clear == ()


def test_a_plan_changes_nothing_until_committed_and_commits_once(world: World) -> None:
    state, _ = run_epochs(world, [{("alice", "USDC"): 10}])
    before = (state.sequence, state.previous, dict(state.quantities), state.trees["USDC"].root)
    plan = plan_epoch(
        state,
        pledged={("alice", "USDC"): 11},
        decimals=DECIMALS,
        prices=sample_prices(),
        salt_secret=SALT_SECRET,
        now=NOW + timedelta(seconds=1),
        lifetime=timedelta(hours=1),
    )
    assert (state.sequence, state.previous, dict(state.quantities), state.trees["USDC"].root) == (
        before
    )
    plan.commit()
    assert state.sequence == 2
    assert state.previous == plan.statement.compute_digest()
    with pytest.raises(InvariantViolation):
        plan.commit()


def test_the_custodian_trees_equal_a_full_rebuild(world: World) -> None:
    epochs = [
        {("alice", "BTC"): 1, ("bob", "BTC"): 2, ("carol", "USDC"): 3},
        {("bob", "BTC"): 4, ("dave", "USDC"): 5},
        {("erin", "BTC"): 6},
    ]
    state, _ = run_epochs(world, epochs)
    plan = plan_epoch(
        state,
        pledged=epochs[-1],
        decimals=DECIMALS,
        prices=sample_prices(),
        salt_secret=SALT_SECRET,
        now=NOW + timedelta(seconds=10),
        lifetime=timedelta(hours=1),
        snapshot=True,
    )
    depths = {root.asset: root.depth for root in plan.statement.assets}
    rebuilt = build_trees(plan.disclosure.set_leaves, depths=depths)
    for root in plan.statement.assets:
        tree = rebuilt.get(root.asset)
        if tree is None:
            assert root.count == 0
        else:
            assert (tree.root, tree.total, tree.count) == (root.root, root.total, root.count)


def test_the_clock_may_not_run_backwards(world: World) -> None:
    state, _ = run_epochs(world, [{("alice", "BTC"): 1}])
    with pytest.raises(InvariantViolation):
        plan_epoch(
            state,
            pledged={("alice", "BTC"): 2},
            decimals=DECIMALS,
            prices=sample_prices(),
            salt_secret=SALT_SECRET,
            now=NOW - timedelta(seconds=1),
            lifetime=timedelta(hours=1),
        )
