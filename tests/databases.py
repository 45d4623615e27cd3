"""Pytest plugin: fresh, private databases for the book's tests, on SQLite and PostgreSQL.

Fixtures:

* ``database_url`` (function, parametrized ``sqlite`` / ``postgresql``): the URL of an empty
  database for this test. SQLite: a file in the test's temporary directory. PostgreSQL: a new
  schema with a random name in the database at ``MCB_TEST_POSTGRES_URL`` (default
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``), selected through the connection's
  ``search_path``, dropped with everything in it when the test ends, so concurrent runs on a
  shared server never meet. The ``postgresql`` parameter carries the ``postgres`` marker.
* ``make_database_url`` (function, parametrized the same way): a factory for more such databases
  in one test (one per Hypothesis example, for instance).
* ``make_sqlite_url`` and ``make_postgres_url`` (function): the same factories for one backend,
  for tests that compare the two.

When PostgreSQL is unreachable its tests are skipped, except under ``CI=true``, where they fail:
integration tests are never silently skipped in CI.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import psycopg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get(
    "MCB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SCHEMA_PREFIX = "mcb_test_"

_sqlite_counter = itertools.count(1)


def _postgres_unavailable(reason: str) -> NoReturn:
    message = f"PostgreSQL at {make_url(POSTGRES_URL).render_as_string()} is not usable: {reason}."
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} CI must run the PostgreSQL tests, not skip them.", pytrace=False)
    pytest.skip(message)


def _libpq_conninfo() -> str:
    url = make_url(POSTGRES_URL)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def _postgres_conninfo() -> str:
    """The server's libpq connection string, after checking once per session that it answers."""
    conninfo = _libpq_conninfo()
    try:
        with psycopg.connect(conninfo, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        _postgres_unavailable(str(exc).strip() or type(exc).__name__)
    return conninfo


@pytest.fixture
def make_sqlite_url(tmp_path: Path) -> Callable[[], str]:
    def make() -> str:
        return f"sqlite:///{tmp_path / f'book-{next(_sqlite_counter)}.sqlite3'}"

    return make


@pytest.fixture
def make_postgres_url(_postgres_conninfo: str) -> Iterator[Callable[[], str]]:
    schemas: list[str] = []

    def make() -> str:
        schema = SCHEMA_PREFIX + secrets.token_hex(6)
        with psycopg.connect(_postgres_conninfo, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")  # random hex: nothing to escape
        schemas.append(schema)
        separator = "&" if "?" in POSTGRES_URL else "?"
        return f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"

    yield make
    if schemas:
        with psycopg.connect(_postgres_conninfo, autocommit=True) as connection:
            for schema in schemas:
                connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def make_database_url(request: pytest.FixtureRequest) -> Callable[[], str]:
    factory: Callable[[], str] = request.getfixturevalue(f"make_{_BACKENDS[request.param]}_url")
    return factory


_BACKENDS = {"sqlite": "sqlite", "postgresql": "postgres"}


@pytest.fixture
def database_url(make_database_url: Callable[[], str]) -> str:
    return make_database_url()
