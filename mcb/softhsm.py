"""SoftHSM2 development tokens: a configuration file, a token directory and token creation.

SoftHSM2 reads its configuration from the file named by ``SOFTHSM2_CONF`` when the PKCS#11
library is first loaded in a process, so :func:`prepare_softhsm` must run before the first
``Pkcs11Signer`` or key generation. Production deployments point the signer at their HSM
vendor's PKCS#11 library instead and never use this module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from attestations.errors import ConfigurationError, TokenNotFound
from attestations.hsm import DEFAULT_LIBRARY_PATH

DEFAULT_LIBRARY: Final = DEFAULT_LIBRARY_PATH
INSTALL_HINT: Final = "install it with: apt-get install -y softhsm2"


@dataclass(frozen=True, slots=True)
class SoftHsm:
    conf_path: Path
    token_dir: Path
    library_path: str


def find_softhsm(library_path: str = DEFAULT_LIBRARY) -> str | None:
    """The reason SoftHSM2 cannot be used here, or None when it can."""
    if not Path(library_path).exists():
        return f"the SoftHSM2 PKCS#11 library {library_path} is missing; {INSTALL_HINT}"
    if shutil.which("softhsm2-util") is None:
        return f"softhsm2-util is not on PATH; {INSTALL_HINT}"
    return None


def prepare_softhsm(directory: Path, *, library_path: str = DEFAULT_LIBRARY) -> SoftHsm:
    """Write a SoftHSM2 configuration keeping tokens under ``directory`` and point
    ``SOFTHSM2_CONF`` at it for this process and its children."""
    problem = find_softhsm(library_path)
    if problem is not None:
        raise TokenNotFound(problem)
    token_dir = directory / "tokens"
    token_dir.mkdir(parents=True, exist_ok=True)
    conf_path = directory / "softhsm2.conf"
    conf_path.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
        encoding="utf-8",
    )
    os.environ["SOFTHSM2_CONF"] = str(conf_path)
    return SoftHsm(conf_path=conf_path, token_dir=token_dir, library_path=library_path)


def init_token(softhsm: SoftHsm, *, label: str, pin: str, so_pin: str) -> None:
    """Create a token named ``label`` in the first free slot."""
    command = [
        "softhsm2-util",
        "--init-token",
        "--free",
        "--label",
        label,
        "--pin",
        pin,
        "--so-pin",
        so_pin,
    ]
    env = {**os.environ, "SOFTHSM2_CONF": str(softhsm.conf_path)}
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell
        command, capture_output=True, text=True, env=env, check=False, timeout=60
    )
    if result.returncode != 0:
        raise ConfigurationError(
            f"softhsm2-util could not create token {label!r}: {result.stderr.strip()}"
        )
