"""The signing key a ``serve`` command runs with: on a PKCS#11 token, or generated in memory.

What this module does: read a token's PIN (from the file the ``[hsm]``-style section names, else
from an environment variable; never from the command line, where any local user could read it)
and open the key that section names, or, only when the operator asked for it, generate a one-off
software key after printing a warning. ``mcb custodian serve`` (the custodian key, ``[hsm]``) and
``mcb exchange serve`` (the notice key, ``[exchange.hsm]``) call it with their own section, PIN
variable and messages.

What it does not do: create tokens or keys (:mod:`mcb.softhsm` and the demo do, for development),
or decide which key a party should trust (the key registries do).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from attestations.hsm import Pkcs11Signer
from attestations.p256 import DigestSigner, SoftwareP256Signer
from mcb.config import HsmConfig, InvalidConfiguration


def read_pin(
    hsm: HsmConfig | None,
    *,
    section: str,
    pin_env: str,
    environ: Mapping[str, str] = os.environ,
) -> str:
    """The token PIN from ``hsm.pin_file``, else from ``$pin_env``; InvalidConfiguration naming
    the ``[section]`` and the variable when neither holds one."""
    if hsm is not None and hsm.pin_file is not None:
        pin = Path(hsm.pin_file).read_text(encoding="utf-8").strip()
    else:
        pin = environ.get(pin_env, "").strip()
    if not pin:
        raise InvalidConfiguration(
            f"no HSM PIN: set pin_file in [{section}] or ${pin_env} (never on the command line)"
        )
    return pin


def open_signer(
    hsm: HsmConfig | None,
    *,
    software_key: bool,
    software_key_warning: str,
    section: str,
    pin_env: str,
    no_hsm_message: str,
) -> DigestSigner:
    """The key on the token ``hsm`` names (opened with :func:`read_pin`'s PIN), or, when
    ``software_key``, an in-memory key after printing ``software_key_warning`` on stderr.
    Without either, InvalidConfiguration with ``no_hsm_message``."""
    if software_key:
        print(software_key_warning, file=sys.stderr)
        return SoftwareP256Signer(insecure_development_only=True)
    if hsm is None:
        raise InvalidConfiguration(no_hsm_message)
    pin = read_pin(hsm, section=section, pin_env=pin_env)
    if hsm.library_path is None:
        return Pkcs11Signer.open(token_label=hsm.token_label, pin=pin, key_label=hsm.key_label)
    return Pkcs11Signer.open(
        library_path=hsm.library_path, token_label=hsm.token_label, pin=pin, key_label=hsm.key_label
    )
