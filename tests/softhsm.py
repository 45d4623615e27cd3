"""Pytest plugin: a private SoftHSM2 installation for the test session.

Fixtures:

* ``softhsm_conf`` (session): a ``softhsm2.conf`` whose token directory lives in a temporary
  directory (written by :func:`mcb.softhsm.prepare_softhsm`), ``SOFTHSM2_CONF`` pointing at it for
  the whole session (restored on teardown), and the PKCS#11 library re-initialized so it reads
  that file.
* ``make_token`` (function): a factory ``make_token(label) -> (label, user_pin, so_pin)`` that
  creates a fresh token. The returned label carries a counter suffix so tests never collide.

When SoftHSM2 is missing the fixtures skip the test with the install command, except under
``CI=true``, where they fail: integration tests are never silently skipped in CI.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest

from attestations import hsm
from mcb.softhsm import INSTALL_HINT, SoftHsm, find_softhsm, init_token, prepare_softhsm

SOFTHSM_LIBRARY = hsm.DEFAULT_LIBRARY_PATH
MAX_TOKEN_LABEL = 32  # CK_TOKEN_INFO.label is 32 bytes

_token_counter = itertools.count(1)


def _unavailable(reason: str) -> NoReturn:
    message = f"SoftHSM2 is not usable: {reason}."
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} CI must run the SoftHSM tests, not skip them.", pytrace=False)
    pytest.skip(f"{message} ({INSTALL_HINT})")


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    problem = find_softhsm(SOFTHSM_LIBRARY)
    if problem is not None:
        _unavailable(problem)
    previous = os.environ.get("SOFTHSM2_CONF")
    softhsm = prepare_softhsm(tmp_path_factory.mktemp("softhsm"), library_path=SOFTHSM_LIBRARY)
    try:
        # python-pkcs11 loads a library once per process and SoftHSM2 reads SOFTHSM2_CONF only
        # when initialized: initialize again in case something loaded it before this fixture.
        hsm.reinitialize_library(library_path=SOFTHSM_LIBRARY)
        yield softhsm
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def make_token(softhsm_conf: SoftHsm) -> Callable[[str], tuple[str, str, str]]:
    def make(label: str) -> tuple[str, str, str]:
        unique = f"{label}-{next(_token_counter)}"
        if len(unique.encode("utf-8")) > MAX_TOKEN_LABEL:
            raise ValueError(f"token label {label!r} is too long for a 32-byte PKCS#11 label")
        user_pin = secrets.token_hex(8)
        so_pin = secrets.token_hex(8)
        init_token(softhsm_conf, label=unique, pin=user_pin, so_pin=so_pin)
        # SoftHSM2 lists only the tokens that existed when the library was initialized.
        hsm.reinitialize_library(library_path=softhsm_conf.library_path)
        return unique, user_pin, so_pin

    return make
