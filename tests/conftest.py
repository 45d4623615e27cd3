"""Shared test configuration: the SoftHSM2, broker and database plugins, and ``--run-slow``."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.softhsm", "tests.broker", "tests.databases"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the long load and soak versions of tests marked slow",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="long version: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
