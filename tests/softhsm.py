"""Pytest plugin: a private SoftHSM2 installation for the test session.

Fixtures:

* ``softhsm_conf`` (session): writes a ``softhsm2.conf`` whose token directory lives in a
  temporary directory, points ``SOFTHSM2_CONF`` at it for the whole session (restored on
  teardown) and (re)initializes the PKCS#11 library so it reads that file.
* ``make_token`` (function): a factory ``make_token(label) -> (label, user_pin, so_pin)`` that
  initializes a fresh token with ``softhsm2-util``. The returned label carries a counter suffix so
  that tests never collide on the one token directory.

When SoftHSM2 is missing the fixtures skip the test with the install command, except under
``CI=true``, where they fail: integration tests are never silently skipped in CI.

Register with ``pytest_plugins = ["tests.softhsm"]`` in the top-level conftest.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from attestations import hsm

SOFTHSM_LIBRARY = hsm.DEFAULT_LIBRARY_PATH
SOFTHSM_UTIL = "softhsm2-util"
INSTALL_HINT = "apt-get install -y softhsm2"
MAX_TOKEN_LABEL = 32  # CK_TOKEN_INFO.label is 32 bytes

_token_counter = itertools.count(1)


@dataclass(frozen=True, slots=True)
class SoftHsm:
    conf_path: Path
    token_dir: Path
    library_path: str
    util_path: str


def _unavailable(reason: str) -> NoReturn:
    message = f"SoftHSM2 is not usable: {reason}. Install it with `{INSTALL_HINT}`."
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} CI must run the SoftHSM tests, not skip them.", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    util_path = shutil.which(SOFTHSM_UTIL)
    if not Path(SOFTHSM_LIBRARY).is_file():
        _unavailable(f"{SOFTHSM_LIBRARY} does not exist")
    if util_path is None:
        _unavailable(f"{SOFTHSM_UTIL} is not on PATH")

    root = tmp_path_factory.mktemp("softhsm")
    token_dir = root / "tokens"
    token_dir.mkdir()
    conf_path = root / "softhsm2.conf"
    conf_path.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
        encoding="utf-8",
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf_path)
    try:
        # SoftHSM2 reads SOFTHSM2_CONF in C_Initialize; python-pkcs11 loads a library once per
        # process, so initialize it again in case something loaded it before this fixture ran.
        hsm.reinitialize_library(library_path=SOFTHSM_LIBRARY)
        yield SoftHsm(
            conf_path=conf_path,
            token_dir=token_dir,
            library_path=SOFTHSM_LIBRARY,
            util_path=util_path,
        )
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
        result = subprocess.run(
            [
                softhsm_conf.util_path,
                "--init-token",
                "--free",
                "--label",
                unique,
                "--pin",
                user_pin,
                "--so-pin",
                so_pin,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if result.returncode != 0:
            pytest.fail(
                f"softhsm2-util --init-token failed ({result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}",
                pytrace=False,
            )
        # SoftHSM2 lists only the tokens that existed when the library was initialized.
        hsm.reinitialize_library(library_path=softhsm_conf.library_path)
        return unique, user_pin, so_pin

    return make
