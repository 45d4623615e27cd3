"""The attestation service signing with a real PKCS#11 token (SoftHSM2), end to end: pledges
become statements signed on the token, relayed through the embedded broker, and an independent
exchange consumer verifies them (attestations.verify.verify_statement) under a key registry that
holds the token's public key, and under no other."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from attestations.errors import UnknownKey
from attestations.hsm import Pkcs11Signer, generate_p256_key
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.statement import SignedStatement, StatementKind
from attestations.translog import TransparencyLog
from attestations.verify import authenticate_statement
from bridge.kafka import KafkaSettings
from custodian.prices import StaticPriceSource
from custodian.service import AttestationService
from custodian.store import CustodyBook
from mcb.softhsm import SoftHsm
from tests.outbox_worker import catalogue_for
from tests.service_worker import (
    ASSETS,
    QUORUM,
    SALT_SECRET,
    STREAM,
    change_pledges,
    fresh_cosigners,
    make_relay,
)
from tests.test_consumer import eventually, running
from tests.test_epochs import attested
from tests.test_service_crash import (
    credits,
    make_exchange,
    make_exchange_engine,
    statements_on_the_broker,
    stored_statements,
)
from tests.world import CUSTODIAN, DECIMALS, EXCHANGE, NOW, World, sample_prices

pytestmark = [pytest.mark.softhsm, pytest.mark.broker]

KEY_LABEL = "attestation"


@pytest.fixture
def token_signer(
    softhsm_conf: SoftHsm, make_token: Callable[[str], tuple[str, str, str]]
) -> Iterator[Pkcs11Signer]:
    """A fresh token with a P-256 key generated on it (non-extractable), opened for signing."""
    label, pin, _ = make_token("custodian")
    generate_p256_key(
        library_path=softhsm_conf.library_path, token_label=label, pin=pin, key_label=KEY_LABEL
    )
    with Pkcs11Signer.open(
        library_path=softhsm_conf.library_path, token_label=label, pin=pin, key_label=KEY_LABEL
    ) as signer:
        yield signer


def registry_for(custodian_key: bytes, world: World) -> KeyRegistry:
    """The exchange's trust configuration: the token's key for the custodian, and the
    co-signers with their proofs of possession."""
    valid_from = NOW - timedelta(days=1)
    records = [KeyRecord(CUSTODIAN, KeyRole.CUSTODIAN, custodian_key, valid_from)]
    records += [
        KeyRecord(
            f"cosigner-{index}",
            KeyRole.COSIGNER,
            key.public_key,
            valid_from,
            proof_of_possession=key.proof_of_possession(),
            signs_for=CUSTODIAN,
        )
        for index, key in enumerate(world.cosigners)
    ]
    return KeyRegistry.of(records, quorums={CUSTODIAN: QUORUM})


@pytest.fixture
def exchange_engine(make_database_url: Callable[[], str]) -> Iterator[Engine]:
    engine = make_exchange_engine(make_database_url())
    yield engine
    engine.dispose()


async def test_statements_signed_on_the_token_verify_at_the_exchange(
    token_signer: Pkcs11Signer,
    database_url: str,
    exchange_engine: Engine,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
) -> None:
    world = World()
    registry = registry_for(token_signer.public_key, world)
    catalogue = catalogue_for(f"t{secrets.token_hex(5)}.")
    with (
        CustodyBook.open(database_url, assets=ASSETS) as book,
        TransparencyLog(tmp_path / "translog.sqlite3") as log,
    ):
        relay = make_relay(book, kafka_settings, catalogue)
        service = AttestationService.open(
            book,
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            signer=token_signer,
            cosigners=fresh_cosigners(world),
            quorum=QUORUM,
            salt_secret=SALT_SECRET,
            decimals=DECIMALS,
            prices=StaticPriceSource(sample_prices()),
            log=log,
            relay=relay,
            catalogue=catalogue,
        )
        exchange = make_exchange(exchange_engine, kafka_settings, catalogue, world)
        exchange.registry = registry
        async with running(relay), running(exchange):
            for sequence in (1, 2, 3):
                await asyncio.to_thread(change_pledges, book, sequence)
                await asyncio.to_thread(service.publish_epoch, NOW + timedelta(seconds=sequence))
            await eventually(lambda: exchange.stored_sequence(STREAM) == 3, timeout_s=30)

        stored = stored_statements(book.engine)
        assert credits(exchange_engine) == [(s, d.hex()) for s, d, _ in stored]
        assert exchange.metrics.dead_letters == 0
        assert attested(exchange.receiver) == book.pledged(EXCHANGE)
        on_broker = await statements_on_the_broker(kafka_settings, catalogue)
        assert list(dict.fromkeys(on_broker)) == [wire for _, _, wire in stored]

    kinds = []
    for wire in on_broker:
        signed = SignedStatement.decode(wire)
        kinds.append(signed.statement.kind)
        # Signed by the token's key: its key id, and only a registry holding that key accepts it.
        assert signed.custodian_signature.key_id == token_signer.key_id
        authenticate_statement(
            wire,
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            registry=registry,
            now=signed.statement.issued_at,
        )
        with pytest.raises(UnknownKey):
            authenticate_statement(
                wire,
                custodian=CUSTODIAN,
                exchange=EXCHANGE,
                registry=world.registry,  # the same co-signers, another custodian key
                now=signed.statement.issued_at,
            )
    assert kinds == [StatementKind.SNAPSHOT, StatementKind.DELTA, StatementKind.DELTA]
