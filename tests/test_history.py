"""The leaf history (custodian/history.py), on SQLite and PostgreSQL: a client's proof at every
stored sequence of a stream that saw pledges, unpledges, moves to settlement, reused slots,
growing trees and snapshots verifies against the signed statement at that sequence and gives the
quantity the client had pledged then; the history survives a restart and is written with its
statement or not at all; a damaged history is an invariant violation, never a proof that does
not verify; a database migrated with statements in it keeps proofs from its last statement on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Insert, delete, insert, select, update

from attestations.amounts import Asset
from attestations.disclosure import ClientProof, verify_client_proof
from attestations.errors import InvariantViolation
from attestations.signing import Cosigner
from attestations.statement import SignedStatement, Statement
from attestations.translog import TransparencyLog
from attestations.verify import authenticate_statement
from custodian import migrations
from custodian.book import Deposit, MoveToSettlement, Pledge, Unpledge
from custodian.history import (
    LeafVersion,
    ProofHistory,
    ProofNotKept,
    compute_history_breaks,
    fetch_leaf_versions,
    history_starts_table,
    leaf_versions_table,
)
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService, leaves_table, statements_table
from custodian.store import CustodyBook
from mcb.cli import main
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, NOW, World, sample_prices, seed

ASSETS = [Asset(code, decimals) for code, decimals in DECIMALS.items()]
SALT_SECRET = seed("history-salt-secret")
STREAM = f"{CUSTODIAN}/{EXCHANGE}"
ACCOUNTS = ("alice", "bob", "carol", "dave", "erin")

Pledged = dict[tuple[str, str], int]


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture
def book(database_url: str) -> Iterator[CustodyBook]:
    with CustodyBook.open(database_url, assets=ASSETS) as opened:
        yield opened


@pytest.fixture
def cosigners(world: World) -> list[Cosigner]:
    """The co-signers outlive any one custodian process, as remote parties do."""
    return [Cosigner(key) for key in world.cosigners]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[TransparencyLog]:
    with TransparencyLog(tmp_path / "translog.sqlite3") as opened:
        yield opened


def open_service(
    book: CustodyBook, world: World, log: TransparencyLog, cosigners: list[Cosigner]
) -> AttestationService:
    return AttestationService.open(
        book,
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        signer=world.signer,
        cosigners=cosigners,
        quorum=2,
        salt_secret=SALT_SECRET,
        decimals=DECIMALS,
        prices=StaticPriceSource(sample_prices()),
        log=log,
    )


def new_history(book: CustodyBook, **options: Any) -> ProofHistory:
    """A history with an empty cache, as a freshly started process has."""
    return ProofHistory(
        book.engine, custodian=CUSTODIAN, exchange=EXCHANGE, salt_secret=SALT_SECRET, **options
    )


def prover(history: ProofHistory) -> Callable[[str, str, int], ClientProof | None]:
    def prove(account: str, asset: str, sequence: int) -> ClientProof | None:
        return history.client_proof(account=account, asset=asset, sequence=sequence)

    return prove


class Script:
    """Drives the book and publishes epochs, recording what was pledged at each sequence."""

    def __init__(self, book: CustodyBook, service: AttestationService) -> None:
        self.book = book
        self.service = service
        self.pledged: dict[int, Pledged] = {}
        self._keys = 0

    def _key(self) -> str:
        self._keys += 1
        return f"k-{self._keys}"

    def pledge(self, client: str, asset: str, quantity: int) -> None:
        self.book.apply(Deposit(self._key(), client, asset, quantity), now=NOW)
        self.book.apply(Pledge(self._key(), client, asset, EXCHANGE, quantity), now=NOW)

    def unpledge(self, client: str, asset: str, quantity: int) -> None:
        key = self._key()
        self.book.apply(Unpledge(key, client, asset, EXCHANGE, quantity, f"ack-{key}"), now=NOW)

    def move(self, client: str, asset: str, quantity: int) -> None:
        self.book.apply(MoveToSettlement(self._key(), client, asset, EXCHANGE, quantity), now=NOW)

    def publish(self, *, snapshot: bool = False) -> SignedStatement:
        sequence = self.service.state.sequence + 1
        self.pledged[sequence] = self.book.pledged(EXCHANGE)
        signed = self.service.publish_epoch(NOW + timedelta(seconds=sequence), snapshot=snapshot)
        assert signed.statement.sequence == sequence
        return signed


def run_script(book: CustodyBook, service: AttestationService) -> Script:
    """Seven statements: every kind of leaf change, two snapshots, one statement that changes
    nothing, a slot freed and retaken, an account that leaves and comes back elsewhere, and a
    tree that grows deeper."""
    script = Script(book, service)
    script.pledge("alice", "BTC", 150_000_000)
    script.pledge("bob", "USDC", 25_000_000)
    script.pledge("carol", "BTC", 42)
    script.publish()  # 1: snapshot
    script.pledge("dave", "BTC", 7)
    script.pledge("alice", "BTC", 10)
    script.publish()  # 2: a new leaf, a quantity change
    script.unpledge("bob", "USDC", 25_000_000)
    script.move("carol", "BTC", 42)
    script.publish()  # 3: USDC tree emptied (kept), carol's BTC slot freed
    script.pledge("erin", "BTC", 5)
    script.pledge("bob", "USDC", 3)
    script.publish()  # 4: erin takes carol's old slot, bob comes back
    script.unpledge("alice", "BTC", 60_000_000)
    script.publish(snapshot=True)  # 5: a snapshot with a change
    script.publish()  # 6: nothing changed
    script.pledge("carol", "BTC", 9)
    script.pledge("carol", "USDC", 1)
    script.pledge("dave", "USDC", 2)
    script.publish()  # 7: carol returns at a new position; the USDC tree grows a level
    return script


def stored_statement(book: CustodyBook, sequence: int, world: World) -> Statement:
    """Statement ``sequence`` as a client gets it: the stored bytes, authenticated as at the
    time they were issued."""
    with book.engine.connect() as connection:
        wire = connection.execute(
            select(statements_table.c.wire).where(
                statements_table.c.stream == STREAM, statements_table.c.sequence == sequence
            )
        ).scalar_one()
    return authenticate_statement(
        bytes(wire),
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        registry=world.registry,
        now=NOW + timedelta(seconds=sequence),
    ).statement


def check_every_proof(
    book: CustodyBook,
    world: World,
    pledged: dict[int, Pledged],
    prove: Callable[[str, str, int], ClientProof | None],
) -> int:
    """Every (account, asset) at every sequence: a proof that verifies and gives the quantity
    pledged then, or None when nothing was pledged. Returns how many proofs verified."""
    verified = 0
    for sequence, holdings in pledged.items():
        statement = stored_statement(book, sequence, world)
        for account in ACCOUNTS:
            for asset in DECIMALS:
                proof = prove(account, asset, sequence)
                expected = holdings.get((account, asset))
                if expected is None:
                    assert proof is None, (account, asset, sequence)
                    continue
                assert proof is not None, (account, asset, sequence)
                # What a client checks: the wire form, decoded, against the signed statement.
                decoded = ClientProof.from_wire(json.loads(json.dumps(proof.to_wire())))
                assert verify_client_proof(decoded, statement=statement) == expected
                assert (decoded.account, decoded.sequence) == (account, sequence)
                verified += 1
    return verified


def valid_at(versions: list[LeafVersion], sequence: int) -> Pledged:
    return {
        (v.account, v.asset): v.quantity
        for v in versions
        if v.from_sequence <= sequence and (v.to_sequence is None or v.to_sequence > sequence)
    }


def all_versions(book: CustodyBook) -> list[LeafVersion]:
    with book.engine.connect() as connection:
        return fetch_leaf_versions(connection, stream=STREAM)


# --- proofs at every sequence ---------------------------------------------------------------------


def test_a_proof_at_every_sequence_verifies_and_gives_the_quantity_then(
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    cosigners: list[Cosigner],
) -> None:
    service = open_service(book, world, log, cosigners)
    script = run_script(book, service)
    assert sorted(script.pledged) == list(range(1, 8))

    # Through the service: the latest from its trees, the others from the history.
    def through_service(account: str, asset: str, sequence: int) -> ClientProof | None:
        return service.client_proof(account=account, asset=asset, sequence=sequence)

    holdings = sum(len(pledged) for pledged in script.pledged.values())
    assert holdings == 28
    assert check_every_proof(book, world, script.pledged, through_service) == holdings

    # The history alone, the latest statement included, gives the very same proofs.
    history = new_history(book)
    for account in ACCOUNTS:
        for asset in DECIMALS:
            from_trees = service.client_proof(account=account, asset=asset)
            rebuilt = history.client_proof(account=account, asset=asset, sequence=7)
            assert (from_trees is None) == (rebuilt is None)
            if from_trees is not None and rebuilt is not None:
                assert rebuilt.to_wire() == from_trees.to_wire()

    # The quantities the script asserts against really changed along the way.
    assert [script.pledged[s].get(("alice", "BTC")) for s in (1, 2, 5)] == [
        150_000_000,
        150_000_010,
        90_000_010,
    ]
    erin = history.client_proof(account="erin", asset="BTC", sequence=4)
    carol = history.client_proof(account="carol", asset="BTC", sequence=2)
    assert erin is not None
    assert carol is not None
    assert erin.proof.position == carol.proof.position  # the freed slot, retaken


def test_a_sequence_not_stored_is_not_kept_and_odd_names_have_no_leaf(
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    cosigners: list[Cosigner],
) -> None:
    history = new_history(book)
    service = open_service(book, world, log, cosigners)
    with pytest.raises(ProofNotKept):
        history.client_proof(account="alice", asset="BTC", sequence=1)  # nothing published
    run_script(book, service)
    for sequence in (8, 2**53 - 1):
        with pytest.raises(ProofNotKept) as caught:
            service.client_proof(account="alice", asset="BTC", sequence=sequence)
        assert caught.value.reason == "proof_not_kept"
    # Names no tree can hold: no leaf, not an error.
    assert history.client_proof(account="al ice", asset="BTC", sequence=1) is None
    assert history.client_proof(account="alice", asset="btc", sequence=1) is None
    assert history.client_proof(account="alice", asset="ETH", sequence=1) is None


# --- what is stored -------------------------------------------------------------------------------


def test_the_history_is_consistent_and_survives_a_restart(
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    cosigners: list[Cosigner],
) -> None:
    script = run_script(book, open_service(book, world, log, cosigners))
    versions = all_versions(book)
    assert compute_history_breaks(versions) == []
    for sequence, holdings in script.pledged.items():
        assert valid_at(versions, sequence) == holdings, sequence
        with book.engine.connect() as connection:
            at = fetch_leaf_versions(connection, stream=STREAM, sequence=sequence)
        assert {(v.account, v.asset): v.quantity for v in at} == holdings
    # The open versions are the current leaves, position for position.
    with book.engine.connect() as connection:
        current = connection.execute(
            select(
                leaves_table.c.account,
                leaves_table.c.asset,
                leaves_table.c.position,
                leaves_table.c.quantity,
            ).where(leaves_table.c.stream == STREAM)
        ).all()
    assert sorted(
        (v.account, v.asset, v.position, v.quantity) for v in versions if v.to_sequence is None
    ) == sorted((str(a), str(s), int(p), int(q)) for a, s, p, q in current)
    # Unchanged holdings keep one version across statements and snapshots.
    assert [
        (v.from_sequence, v.to_sequence)
        for v in versions
        if (v.account, v.asset) == ("dave", "BTC")
    ] == [(2, None)]

    restarted = open_service(book, world, log, cosigners)
    assert restarted.state.sequence == 7

    def after_restart(account: str, asset: str, sequence: int) -> ClientProof | None:
        return restarted.client_proof(account=account, asset=asset, sequence=sequence)

    assert check_every_proof(book, world, script.pledged, after_restart) == sum(
        len(pledged) for pledged in script.pledged.values()
    )
    script.service = restarted
    script.unpledge("dave", "BTC", 7)
    script.publish()  # 8, after the restart
    assert valid_at(all_versions(book), 8) == script.pledged[8]
    assert compute_history_breaks(all_versions(book)) == []
    assert restarted.client_proof(account="dave", asset="BTC", sequence=8) is None
    assert restarted.client_proof(account="dave", asset="BTC", sequence=7) is not None


def test_the_history_is_written_with_its_statement_or_not_at_all(
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    cosigners: list[Cosigner],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = open_service(book, world, log, cosigners)
    script = Script(book, service)
    script.pledge("alice", "BTC", 5)
    script.publish()
    before = all_versions(book)
    script.pledge("bob", "BTC", 6)

    class Lost(Exception):
        pass

    def fail(*args: object, **kwargs: object) -> None:
        raise Lost

    monkeypatch.setattr("custodian.service.enqueue", fail)
    with pytest.raises(Lost):
        service.publish_epoch(NOW + timedelta(seconds=2))
    assert all_versions(book) == before
    monkeypatch.undo()
    service.publish_epoch(NOW + timedelta(seconds=2))  # the kept statement, stored this time
    assert valid_at(all_versions(book), 2) == {("alice", "BTC"): 5, ("bob", "BTC"): 6}


def test_rebuilt_trees_are_cached_least_recently_used_first_out(
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    cosigners: list[Cosigner],
) -> None:
    run_script(book, open_service(book, world, log, cosigners))
    history = new_history(book, cache_size=2)
    for sequence in (1, 2, 1, 3):
        assert history.client_proof(account="alice", asset="BTC", sequence=sequence) is not None
    assert history.cached == ((STREAM, "BTC", 1), (STREAM, "BTC", 3))
    # A cached tree is not read again: a row changed after it was checked does not reach it.
    with book.engine.begin() as connection:
        connection.execute(
            update(leaf_versions_table)
            .where(leaf_versions_table.c.account == "carol")
            .values(quantity=1)
        )
    assert history.client_proof(account="alice", asset="BTC", sequence=1) is not None
    with pytest.raises(InvariantViolation):
        history.client_proof(account="alice", asset="BTC", sequence=2)  # evicted: re-read
    uncached = new_history(book, cache_size=0)
    with pytest.raises(InvariantViolation):
        uncached.client_proof(account="alice", asset="BTC", sequence=1)
    assert uncached.cached == ()


# --- a damaged history ----------------------------------------------------------------------------


def _where(account: str, asset: str, from_sequence: int) -> Any:
    c = leaf_versions_table.c
    return (
        (c.stream == STREAM)
        & (c.account == account)
        & (c.asset == asset)
        & (c.from_sequence == from_sequence)
    )


TAMPERING: dict[str, tuple[Callable[[], Any], int]] = {
    # name: (the statement that damages the history, a sequence whose proofs it breaks)
    "quantity raised": (
        lambda: update(leaf_versions_table).where(_where("carol", "BTC", 1)).values(quantity=4_200),
        2,
    ),
    "quantity off by one": (
        lambda: (
            update(leaf_versions_table)
            .where(_where("alice", "BTC", 1))
            .values(quantity=150_000_001)
        ),
        1,
    ),
    "position moved": (
        lambda: update(leaf_versions_table).where(_where("dave", "BTC", 2)).values(position=3),
        2,
    ),
    "account renamed": (
        lambda: (
            update(leaf_versions_table).where(_where("carol", "BTC", 1)).values(account="mallory")
        ),
        1,
    ),
    "closed version reopened": (
        lambda: (
            update(leaf_versions_table).where(_where("carol", "BTC", 1)).values(to_sequence=None)
        ),
        4,
    ),
    "version closed early": (
        lambda: update(leaf_versions_table).where(_where("dave", "BTC", 2)).values(to_sequence=5),
        6,
    ),
    "version deleted": (lambda: delete(leaf_versions_table).where(_where("erin", "BTC", 4)), 4),
    "leaf invented": (
        lambda: insert(leaf_versions_table).values(
            stream=STREAM,
            asset="BTC",
            position=3,
            account="mallory",
            quantity=0,  # the total stays the same; the root and the count do not
            from_sequence=3,
            to_sequence=None,
        ),
        5,
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_a_damaged_history_is_an_invariant_violation_never_a_bad_proof(
    book: CustodyBook, world: World, log: TransparencyLog, cosigners: list[Cosigner], name: str
) -> None:
    service = open_service(book, world, log, cosigners)
    script = run_script(book, service)
    # Proofs just before: fine (and not cached, so the damage is read).
    assert check_every_proof(book, world, script.pledged, prover(new_history(book))) > 0
    damage, broken = TAMPERING[name]
    with book.engine.begin() as connection:
        damaging = damage()
        result = connection.execute(damaging)
        if not isinstance(damaging, Insert):  # PostgreSQL reports no count for an insert
            assert result.rowcount == 1
    history = new_history(book)
    # Every account of the damaged tree, the innocent ones too: no proof of that tree is served.
    for account, asset in script.pledged[broken]:
        if asset != "BTC":
            continue
        with pytest.raises(InvariantViolation) as caught:
            history.client_proof(account=account, asset=asset, sequence=broken)
        assert caught.value.reason == "invariant_violation"
    # Another asset's tree at that sequence is untouched.
    bob = history.client_proof(account="bob", asset="USDC", sequence=broken)
    assert bob is not None
    statement = stored_statement(book, broken, world)
    assert verify_client_proof(bob, statement=statement) == script.pledged[broken][("bob", "USDC")]
    # The latest statement still comes from the service's own trees.
    assert service.client_proof(account="alice", asset="BTC") is not None


def test_a_tampered_statement_row_is_an_invariant_violation(
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    cosigners: list[Cosigner],
) -> None:
    run_script(book, open_service(book, world, log, cosigners))
    with book.engine.begin() as connection:
        second = connection.execute(
            select(statements_table.c.wire).where(
                statements_table.c.stream == STREAM, statements_table.c.sequence == 2
            )
        ).scalar_one()
        # Statement 2's bytes stored as statement 1: the leaves of 1 do not give its roots.
        connection.execute(
            update(statements_table)
            .where(statements_table.c.stream == STREAM, statements_table.c.sequence == 1)
            .values(wire=second)
        )
        connection.execute(
            update(statements_table)
            .where(statements_table.c.stream == STREAM, statements_table.c.sequence == 3)
            .values(wire=b"{not json")
        )
    for sequence in (1, 3):
        with pytest.raises(InvariantViolation):
            new_history(book).client_proof(account="alice", asset="BTC", sequence=sequence)


# --- a database migrated with statements in it ----------------------------------------------------


def test_a_migrated_database_keeps_proofs_from_its_last_statement_on(
    database_url: str,
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    cosigners: list[Cosigner],
) -> None:
    service = open_service(book, world, log, cosigners)
    script = Script(book, service)
    script.pledge("alice", "BTC", 5)
    script.publish()
    script.pledge("bob", "USDC", 6)
    script.publish()
    script.pledge("alice", "BTC", 1)
    script.publish()
    # Back to the schema before the history, then forward: what an existing deployment sees.
    migrations.downgrade(database_url, "0003")
    migrations.upgrade(database_url)
    with book.engine.connect() as connection:
        starts = connection.execute(select(history_starts_table)).all()
    assert [(str(s), int(f)) for s, f in starts] == [(STREAM, 3)]
    assert [(v.account, v.from_sequence, v.to_sequence) for v in all_versions(book)] == [
        ("alice", 3, None),
        ("bob", 3, None),
    ]
    history = new_history(book)
    for sequence in (1, 2):
        with pytest.raises(ProofNotKept, match="not kept"):
            history.client_proof(account="alice", asset="BTC", sequence=sequence)
    restarted = open_service(book, world, log, cosigners)
    script.service = restarted
    script.unpledge("bob", "USDC", 6)
    script.publish()  # 4
    kept = {sequence: script.pledged[sequence] for sequence in (3, 4)}
    assert check_every_proof(book, world, kept, prover(new_history(book))) == 3


def test_a_fresh_database_keeps_every_statement(database_url: str) -> None:
    migrations.upgrade(database_url)
    with CustodyBook.open(database_url, assets=ASSETS) as book, book.engine.connect() as c:
        assert c.execute(select(history_starts_table)).all() == []
        assert c.execute(select(leaf_versions_table)).all() == []


# --- the command line -----------------------------------------------------------------------------


def test_show_proof_with_a_sequence(  # noqa: PLR0917 - the fixtures it needs
    database_url: str,
    book: CustodyBook,
    world: World,
    log: TransparencyLog,
    cosigners: list[Cosigner],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = run_script(book, open_service(book, world, log, cosigners))
    salt_file = tmp_path / "salt"
    salt_file.write_bytes(SALT_SECRET)
    config = tmp_path / "mcb.toml"
    config.write_text(f'[custodian]\nid = "{CUSTODIAN}"\nsalt_secret_file = "{salt_file}"\n')
    monkeypatch.setenv("MCB_DATABASE_URL", database_url)
    monkeypatch.delenv("MCB_CONFIG", raising=False)

    def show(*extra: str) -> tuple[int, str, str]:
        argv = ["custodian", "show-proof", "--config", str(config), "--exchange", EXCHANGE]
        status = main([*argv, *extra])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    status, out, err = show("--client", "carol", "--asset", "BTC", "--sequence", "2")
    assert status == 0, err
    proof = ClientProof.from_wire(json.loads(out))
    assert proof.sequence == 2
    assert verify_client_proof(proof, statement=stored_statement(book, 2, world)) == 42
    assert script.pledged[2][("carol", "BTC")] == 42

    status, _, err = show("--client", "carol", "--asset", "BTC", "--sequence", "4")
    assert status == 2
    assert "(proof_unavailable): carol / BTC is not in statement #4" in err
    status, _, err = show("--client", "carol", "--asset", "BTC", "--sequence", "8")
    assert status == 2
    assert "(proof_unavailable)" in err
    assert "no statement 8" in err
    for bad in ("0", "-1", "01", "1.5", "x", str(2**53)):
        status, _, err = show("--client", "carol", "--asset", "BTC", "--sequence", bad)
        assert status == 2
        assert "(malformed): --sequence" in err
