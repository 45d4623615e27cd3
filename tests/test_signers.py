"""The serve commands' signing key (mcb/signers.py): where the PIN comes from, the refusals when
there is none or no token, the loud software key, and a real SoftHSM2 key opened through the
custodian's and the exchange's configuration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from attestations.hsm import Pkcs11Signer, generate_p256_key
from attestations.p256 import SoftwareP256Signer
from mcb.cli import SOFTWARE_KEY_WARNING as CUSTODIAN_WARNING
from mcb.cli import open_serve_signer
from mcb.config import (
    ENV_EXCHANGE_HSM_PIN,
    ENV_HSM_PIN,
    CustodianConfig,
    ExchangeConfig,
    HsmConfig,
    InvalidConfiguration,
)
from mcb.exchange_cli import SOFTWARE_KEY_WARNING as EXCHANGE_WARNING
from mcb.exchange_cli import open_exchange_signer
from mcb.signers import open_signer, read_pin
from mcb.softhsm import SoftHsm

MakeToken = Callable[[str], tuple[str, str, str]]


def test_the_pin_file_wins_over_the_environment(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("  1234\n", encoding="utf-8")
    hsm = HsmConfig(token_label="t", pin_file=str(pin_file))
    assert read_pin(hsm, section="hsm", pin_env="PIN", environ={"PIN": "9999"}) == "1234"


def test_without_a_pin_file_the_environment_gives_the_pin() -> None:
    hsm = HsmConfig(token_label="t")
    assert read_pin(hsm, section="hsm", pin_env="PIN", environ={"PIN": " 5678 "}) == "5678"


@pytest.mark.parametrize("environ", [{}, {"PIN": "   "}])
def test_no_pin_names_the_section_and_the_variable(environ: dict[str, str]) -> None:
    with pytest.raises(InvalidConfiguration, match=r"\[exchange\.hsm\] or \$PIN"):
        read_pin(HsmConfig(token_label="t"), section="exchange.hsm", pin_env="PIN", environ=environ)


def test_an_empty_pin_file_is_no_pin(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("\n", encoding="utf-8")
    hsm = HsmConfig(token_label="t", pin_file=str(pin_file))
    with pytest.raises(InvalidConfiguration, match="no HSM PIN"):
        read_pin(hsm, section="hsm", pin_env="PIN", environ={"PIN": "1234"})


def test_a_software_key_only_when_asked_and_with_the_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    signer = open_serve_signer(CustodianConfig(), software_key=True)
    assert isinstance(signer, SoftwareP256Signer)
    assert CUSTODIAN_WARNING in capsys.readouterr().err
    signer = open_exchange_signer(ExchangeConfig(), software_key=True)
    assert isinstance(signer, SoftwareP256Signer)
    assert EXCHANGE_WARNING in capsys.readouterr().err


def test_no_token_section_and_no_software_key_is_refused() -> None:
    with pytest.raises(InvalidConfiguration, match=r"an \[hsm\] section"):
        open_serve_signer(CustodianConfig(), software_key=False)
    with pytest.raises(InvalidConfiguration, match=r"an \[exchange\.hsm\] section"):
        open_exchange_signer(ExchangeConfig(), software_key=False)


@pytest.mark.softhsm
def test_the_configured_token_key_is_opened_with_the_pin_from_each_variable(
    softhsm_conf: SoftHsm,
    make_token: MakeToken,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    label, pin, _ = make_token("serve")
    public_key = generate_p256_key(
        library_path=softhsm_conf.library_path, token_label=label, pin=pin, key_label="k"
    )
    hsm = HsmConfig(token_label=label, library_path=softhsm_conf.library_path, key_label="k")
    for variable in (ENV_HSM_PIN, ENV_EXCHANGE_HSM_PIN):
        monkeypatch.delenv(ENV_HSM_PIN, raising=False)
        monkeypatch.delenv(ENV_EXCHANGE_HSM_PIN, raising=False)
        monkeypatch.setenv(variable, pin)
        signer = open_signer(
            hsm,
            software_key=False,
            software_key_warning="unused",
            section="hsm",
            pin_env=variable,
            no_hsm_message="unused",
        )
        assert isinstance(signer, Pkcs11Signer)
        try:
            assert signer.public_key == public_key
        finally:
            signer.close()
