"""The PKCS#11 signer against a real SoftHSM2 token (fails instead of skipping when CI=true)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from attestations import hsm
from attestations.canonical import compute_key_id
from attestations.errors import (
    ConfigurationError,
    DecodeError,
    InvariantViolation,
    SigningKeyNotFound,
    TokenNotFound,
    TokenUnavailable,
    WrongPin,
)
from attestations.hsm import Pkcs11Signer, generate_p256_key, reinitialize_library
from attestations.p256 import DigestSigner, verify_p256_digest
from mcb.softhsm import SoftHsm

pytestmark = pytest.mark.softhsm

MakeToken = Callable[[str], tuple[str, str, str]]
KEY_LABEL = "custodian-attestation"


@dataclass(frozen=True)
class Provisioned:
    library_path: str
    token_label: str
    pin: str
    so_pin: str
    key_label: str
    public_key: bytes

    def open(self) -> Pkcs11Signer:
        return Pkcs11Signer.open(
            library_path=self.library_path,
            token_label=self.token_label,
            pin=self.pin,
            key_label=self.key_label,
        )


def _digest(i: int) -> bytes:
    return hashlib.sha256(b"statement %d" % i).digest()


def _independently_verifies(public_key: bytes, digest: bytes, signature: bytes) -> bool:
    """Check with the cryptography package alone, not through attestations.p256."""
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.verify(der, digest, ec.ECDSA(Prehashed(SHA256())))
    except Exception:
        return False
    return True


@pytest.fixture
def provisioned(softhsm_conf: SoftHsm, make_token: MakeToken) -> Provisioned:
    token_label, pin, so_pin = make_token("hsm")
    public_key = generate_p256_key(
        library_path=softhsm_conf.library_path,
        token_label=token_label,
        pin=pin,
        key_label=KEY_LABEL,
    )
    return Provisioned(softhsm_conf.library_path, token_label, pin, so_pin, KEY_LABEL, public_key)


@pytest.fixture
def signer(provisioned: Provisioned) -> Iterator[Pkcs11Signer]:
    with provisioned.open() as opened:
        yield opened


@pytest.fixture
def raw_session(provisioned: Provisioned) -> Iterator[pkcs11.Session]:
    """A logged-in session opened with python-pkcs11 directly, to inspect the token. Tests
    close it themselves before opening a signer (one login per token per process)."""
    token = pkcs11.lib(provisioned.library_path).get_token(token_label=provisioned.token_label)
    session = token.open(rw=True, user_pin=provisioned.pin)
    yield session
    with contextlib.suppress(p11.SessionHandleInvalid):
        session.close()


# --- key generation -----------------------------------------------------------------------------


def test_generated_private_key_is_sensitive_and_not_extractable(
    provisioned: Provisioned, raw_session: pkcs11.Session
) -> None:
    private = raw_session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=KEY_LABEL)
    attrs = private.get_attributes(
        [
            Attribute.KEY_TYPE,
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.LOCAL,
            Attribute.SIGN,
            Attribute.DECRYPT,
            Attribute.DERIVE,
            Attribute.UNWRAP,
            Attribute.EC_PARAMS,
        ]
    )
    assert attrs == {
        Attribute.KEY_TYPE: KeyType.EC,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.ALWAYS_SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.NEVER_EXTRACTABLE: True,
        Attribute.LOCAL: True,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.DERIVE: False,
        Attribute.UNWRAP: False,
        Attribute.EC_PARAMS: hsm.P256_EC_PARAMS,
    }
    with pytest.raises(p11.AttributeSensitive):
        private[Attribute.VALUE]
    # Neither flag can be relaxed after creation.
    with pytest.raises(p11.PKCS11Error):
        private[Attribute.EXTRACTABLE] = True
    with pytest.raises(p11.PKCS11Error):
        private[Attribute.SENSITIVE] = False
    public = raw_session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=KEY_LABEL)
    assert public[Attribute.EC_POINT] == b"\x04\x41" + provisioned.public_key


def test_generate_refuses_a_second_key_with_the_same_label(provisioned: Provisioned) -> None:
    with pytest.raises(ConfigurationError, match="already holds an object labelled"):
        generate_p256_key(
            library_path=provisioned.library_path,
            token_label=provisioned.token_label,
            pin=provisioned.pin,
            key_label=provisioned.key_label,
        )
    with provisioned.open() as opened:  # the original key is untouched
        assert opened.public_key == provisioned.public_key


def test_generate_with_wrong_pin(provisioned: Provisioned) -> None:
    with pytest.raises(WrongPin) as caught:
        generate_p256_key(
            library_path=provisioned.library_path,
            token_label=provisioned.token_label,
            pin="not-the-pin",
            key_label="another",
        )
    assert isinstance(caught.value.__cause__, p11.PinIncorrect)


def test_generate_refuses_while_a_signer_is_logged_in(
    provisioned: Provisioned, signer: Pkcs11Signer
) -> None:
    with pytest.raises(ConfigurationError, match="already logged in"):
        generate_p256_key(
            library_path=provisioned.library_path,
            token_label=provisioned.token_label,
            pin=provisioned.pin,
            key_label="another",
        )


# --- opening fails closed -----------------------------------------------------------------------


def test_wrong_pin(provisioned: Provisioned) -> None:
    with pytest.raises(WrongPin) as caught:
        Pkcs11Signer.open(
            library_path=provisioned.library_path,
            token_label=provisioned.token_label,
            pin="0000000000000000",
            key_label=provisioned.key_label,
        )
    assert not caught.value.retriable
    assert isinstance(caught.value.__cause__, p11.PinIncorrect)
    assert "0000000000000000" not in str(caught.value)


def test_missing_token(softhsm_conf: SoftHsm) -> None:
    with pytest.raises(TokenNotFound, match="no PKCS#11 token labelled 'no-such-token'") as caught:
        Pkcs11Signer.open(
            library_path=softhsm_conf.library_path,
            token_label="no-such-token",
            pin="1234",
            key_label=KEY_LABEL,
        )
    assert isinstance(caught.value.__cause__, p11.NoSuchToken)


def test_missing_library(tmp_path: Path) -> None:
    with pytest.raises(TokenNotFound, match="apt-get install -y softhsm2") as caught:
        Pkcs11Signer.open(
            library_path=str(tmp_path / "libmissing.so"),
            token_label="any",
            pin="1234",
            key_label=KEY_LABEL,
        )
    assert isinstance(caught.value.__cause__, p11.PKCS11Error)


def test_missing_key(provisioned: Provisioned) -> None:
    with pytest.raises(SigningKeyNotFound, match="no private key labelled 'absent'"):
        Pkcs11Signer.open(
            library_path=provisioned.library_path,
            token_label=provisioned.token_label,
            pin=provisioned.pin,
            key_label="absent",
        )
    # The failed open logged out again, so the next open works.
    with provisioned.open() as opened:
        assert opened.public_key == provisioned.public_key


@pytest.mark.parametrize("field", ["token_label", "pin", "key_label", "library_path"])
def test_empty_parameters_are_configuration_errors(provisioned: Provisioned, field: str) -> None:
    params = {
        "library_path": provisioned.library_path,
        "token_label": provisioned.token_label,
        "pin": provisioned.pin,
        "key_label": provisioned.key_label,
    }
    params[field] = ""
    with pytest.raises(ConfigurationError, match=field):
        Pkcs11Signer.open(**params)


def test_extractable_key_is_refused(provisioned: Provisioned, raw_session: pkcs11.Session) -> None:
    raw_session.generate_keypair(
        KeyType.EC,
        label="weak",
        store=True,
        public_template={Attribute.EC_PARAMS: hsm.P256_EC_PARAMS},
        private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    raw_session.close()
    with pytest.raises(ConfigurationError, match="can leave the token"):
        Pkcs11Signer.open(
            library_path=provisioned.library_path,
            token_label=provisioned.token_label,
            pin=provisioned.pin,
            key_label="weak",
        )


def _open_label(provisioned: Provisioned, key_label: str) -> Pkcs11Signer:
    return Pkcs11Signer.open(
        library_path=provisioned.library_path,
        token_label=provisioned.token_label,
        pin=provisioned.pin,
        key_label=key_label,
    )


@pytest.mark.parametrize(
    ("created_with", "locked_later", "history"),
    [
        # Extractable when created, then locked: CKA_NEVER_EXTRACTABLE stays false.
        (
            {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True},
            {Attribute.EXTRACTABLE: False},
            "NEVER_EXTRACTABLE",
        ),
        # Readable in the clear when created, then made sensitive: CKA_ALWAYS_SENSITIVE stays
        # false.
        (
            {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: False},
            {Attribute.SENSITIVE: True},
            "ALWAYS_SENSITIVE",
        ),
    ],
    ids=["extractable-then-locked", "sensitive-later"],
)
def test_a_key_that_was_ever_exposed_is_refused(
    provisioned: Provisioned,
    raw_session: pkcs11.Session,
    created_with: dict[Attribute, Any],
    locked_later: dict[Attribute, Any],
    history: str,
) -> None:
    _, private = raw_session.generate_keypair(
        KeyType.EC,
        label="relocked",
        store=True,
        public_template={Attribute.EC_PARAMS: hsm.P256_EC_PARAMS},
        private_template=created_with,
    )
    for attribute, value in locked_later.items():
        private[attribute] = value
    # Today the key looks locked: only its history gives it away.
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.EXTRACTABLE] is False
    assert private[getattr(Attribute, history)] is False
    raw_session.close()
    with pytest.raises(ConfigurationError, match=f"may exist outside the token: CKA_{history}"):
        _open_label(provisioned, "relocked")
    with provisioned.open() as opened:  # the token is usable again after the refusal
        assert opened.public_key == provisioned.public_key


def test_an_imported_key_is_refused(provisioned: Provisioned, raw_session: pkcs11.Session) -> None:
    # A key made in software and imported with the right flags set: sensitive, not extractable,
    # a correct pair. Its private value existed outside the token, which CKA_LOCAL false records.
    software_key = ec.generate_private_key(ec.SECP256R1())
    point = software_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    raw_session.create_object(
        {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.LABEL: "imported",
            Attribute.EC_PARAMS: hsm.P256_EC_PARAMS,
            Attribute.VALUE: software_key.private_numbers().private_value.to_bytes(32, "big"),
        }
    )
    raw_session.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.TOKEN: True,
            Attribute.VERIFY: True,
            Attribute.LABEL: "imported",
            Attribute.EC_PARAMS: hsm.P256_EC_PARAMS,
            Attribute.EC_POINT: b"\x04\x41" + point,
        }
    )
    raw_session.close()
    with pytest.raises(ConfigurationError, match="may exist outside the token") as caught:
        _open_label(provisioned, "imported")
    assert "CKA_LOCAL" in str(caught.value)
    assert not caught.value.retriable


@pytest.mark.parametrize("how", ["raises", "omits"])
def test_an_attribute_the_token_does_not_report_is_a_configuration_error(
    provisioned: Provisioned, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # A token that does not know CKA_LOCAL. python-pkcs11 raises AttributeTypeInvalid when no
    # attribute asked for is reported, and leaves the unreported ones out of the dict otherwise.
    object_class: Any = pkcs11._pkcs11.Object  # type: ignore[attr-defined]
    real = object_class.get_attributes

    def without_local(self: Any, keys: list[Attribute]) -> dict[Attribute, Any]:
        if Attribute.LOCAL not in keys:
            return real(self, keys)  # type: ignore[no-any-return]
        if how == "raises":
            raise p11.AttributeTypeInvalid
        values = real(self, keys)
        del values[Attribute.LOCAL]
        return values  # type: ignore[no-any-return]

    monkeypatch.setattr(object_class, "get_attributes", without_local)
    with pytest.raises(ConfigurationError, match="does not report") as caught:
        provisioned.open()
    assert not isinstance(caught.value, TokenUnavailable)
    assert not caught.value.retriable
    if how == "raises":
        assert isinstance(caught.value.__cause__, p11.AttributeTypeInvalid)
    monkeypatch.undo()
    with provisioned.open() as opened:
        assert opened.public_key == provisioned.public_key


def test_non_p256_key_is_refused(provisioned: Provisioned, raw_session: pkcs11.Session) -> None:
    secp384r1 = bytes.fromhex("06052b81040022")
    raw_session.generate_keypair(
        KeyType.EC,
        label="p384",
        store=True,
        public_template={Attribute.EC_PARAMS: secp384r1},
        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )
    raw_session.close()
    with pytest.raises(ConfigurationError, match="not an EC P-256 key"):
        Pkcs11Signer.open(
            library_path=provisioned.library_path,
            token_label=provisioned.token_label,
            pin=provisioned.pin,
            key_label="p384",
        )


def test_mismatched_key_pair_is_refused(
    provisioned: Provisioned, raw_session: pkcs11.Session
) -> None:
    # A public key from one pair and a private key from another under one label.
    template = {Attribute.EC_PARAMS: hsm.P256_EC_PARAMS}
    private_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
    _, private_a = raw_session.generate_keypair(
        KeyType.EC,
        label="mixed",
        store=True,
        public_template=template,
        private_template=private_template,
    )
    public_b, _ = raw_session.generate_keypair(
        KeyType.EC,
        label="other",
        store=True,
        public_template=template,
        private_template=private_template,
    )
    raw_session.get_key(object_class=ObjectClass.PUBLIC_KEY, label="mixed").destroy()
    public_b[Attribute.LABEL] = "mixed"
    assert private_a[Attribute.LABEL] == "mixed"
    raw_session.close()
    with pytest.raises(ConfigurationError, match="do not form a pair"):
        Pkcs11Signer.open(
            library_path=provisioned.library_path,
            token_label=provisioned.token_label,
            pin=provisioned.pin,
            key_label="mixed",
        )


def test_one_signer_per_token_per_process(provisioned: Provisioned, signer: Pkcs11Signer) -> None:
    with pytest.raises(ConfigurationError, match="already logged in"):
        provisioned.open()
    assert signer.sign_digest(_digest(0))


def test_reinitialize_refused_while_a_signer_is_open(signer: Pkcs11Signer) -> None:
    with pytest.raises(ConfigurationError, match="while a Pkcs11Signer"):
        reinitialize_library(library_path=signer.library_path)


def test_key_survives_reinitialization(provisioned: Provisioned) -> None:
    reinitialize_library(library_path=provisioned.library_path)
    with provisioned.open() as opened:
        assert opened.public_key == provisioned.public_key


# --- signing ------------------------------------------------------------------------------------


def test_signatures_verify(provisioned: Provisioned, signer: Pkcs11Signer) -> None:
    assert isinstance(signer, DigestSigner)
    assert signer.algorithm == "ecdsa-p256-sha256"
    assert signer.public_key == provisioned.public_key
    assert signer.key_id == compute_key_id(
        algorithm="ecdsa-p256-sha256", public_key=provisioned.public_key
    )
    digest = _digest(1)
    signature = signer.sign_digest(digest)
    assert len(signature) == 64
    verify_p256_digest(public_key=signer.public_key, digest=digest, signature=signature)
    assert _independently_verifies(signer.public_key, digest, signature)
    assert not _independently_verifies(signer.public_key, _digest(2), signature)


def test_repr_does_not_show_the_pin(provisioned: Provisioned, signer: Pkcs11Signer) -> None:
    assert provisioned.pin not in repr(signer)
    assert signer.key_id in repr(signer)


@pytest.mark.parametrize("digest", [b"", b"\x00" * 31, b"\x00" * 33, "00" * 32])
def test_digest_of_wrong_shape_is_rejected(signer: Pkcs11Signer, digest: bytes) -> None:
    with pytest.raises(DecodeError):
        signer.sign_digest(digest)


def test_concurrent_signing_from_threads(signer: Pkcs11Signer) -> None:
    digests = [_digest(i) for i in range(200)]
    start = threading.Barrier(8)

    def sign(digest: bytes) -> bytes:
        if digest in digests[:8]:
            start.wait(timeout=10)  # make the first eight really overlap
        return signer.sign_digest(digest)

    with ThreadPoolExecutor(max_workers=8) as pool:
        signatures = list(pool.map(sign, digests))
    assert len(set(signatures)) == len(digests)
    for digest, signature in zip(digests, signatures, strict=True):
        assert _independently_verifies(signer.public_key, digest, signature)


async def test_concurrent_signing_from_tasks(signer: Pkcs11Signer) -> None:
    digests = [_digest(i) for i in range(200)]
    signatures = await asyncio.gather(*(signer.sign_digest_async(d) for d in digests))
    for digest, signature in zip(digests, signatures, strict=True):
        assert _independently_verifies(signer.public_key, digest, signature)


async def test_threads_and_tasks_share_the_session(signer: Pkcs11Signer) -> None:
    thread_digests = [_digest(i) for i in range(100)]
    task_digests = [_digest(1000 + i) for i in range(100)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        from_threads = pool.map(signer.sign_digest, thread_digests)
        from_tasks = await asyncio.gather(*(signer.sign_digest_async(d) for d in task_digests))
        thread_signatures = list(from_threads)
    for digest, signature in [
        *zip(thread_digests, thread_signatures, strict=True),
        *zip(task_digests, from_tasks, strict=True),
    ]:
        assert _independently_verifies(signer.public_key, digest, signature)


async def test_async_signing_does_not_block_the_event_loop(
    signer: Pkcs11Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sign = hsm._sign_raw

    def slow_sign(private: object, digest: bytes) -> bytes:
        time.sleep(0.3)  # a slow device
        return real_sign(private, digest)  # type: ignore[arg-type]

    monkeypatch.setattr(hsm, "_sign_raw", slow_sign)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    signature = await signer.sign_digest_async(_digest(7))
    stop.set()
    await ticking
    assert ticks >= 10, f"the event loop ticked only {ticks} times during a 0.3 s signature"
    assert _independently_verifies(signer.public_key, _digest(7), signature)


# --- device faults ------------------------------------------------------------------------------


def test_device_error_is_retriable_and_the_next_call_recovers(
    signer: Pkcs11Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(private: object, digest: bytes) -> bytes:
        raise p11.DeviceError

    with monkeypatch.context() as patch:
        patch.setattr(hsm, "_sign_raw", broken)
        with pytest.raises(TokenUnavailable) as caught:
            signer.sign_digest(_digest(1))
    assert caught.value.retriable
    assert isinstance(caught.value.__cause__, p11.DeviceError)
    signature = signer.sign_digest(_digest(1))
    assert _independently_verifies(signer.public_key, _digest(1), signature)


def test_lost_session_is_retriable_and_reopened(signer: Pkcs11Signer) -> None:
    # Close the session behind the signer's back, as a token reset would.
    session = signer._session
    assert session is not None
    session.close()
    with pytest.raises(TokenUnavailable) as caught:
        signer.sign_digest(_digest(1))
    assert isinstance(caught.value.__cause__, p11.PKCS11Error)
    signature = signer.sign_digest(_digest(1))
    assert _independently_verifies(signer.public_key, _digest(1), signature)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda sig: sig[:-1] + bytes([sig[-1] ^ 1]),
        lambda sig: sig[:63],
        lambda sig: sig + b"\x00",
        lambda sig: b"\x00" * 64,
    ],
    ids=["bit-flip", "short", "long", "zeros"],
)
def test_faulty_device_signature_is_never_returned(
    signer: Pkcs11Signer,
    monkeypatch: pytest.MonkeyPatch,
    corrupt: Callable[[bytes], bytes],
) -> None:
    real_sign = hsm._sign_raw
    monkeypatch.setattr(
        hsm,
        "_sign_raw",
        lambda private, digest: corrupt(real_sign(private, digest)),
    )
    with pytest.raises(InvariantViolation, match="does not verify"):
        signer.sign_digest(_digest(3))


def test_real_ecdsa_mechanism_is_raw_r_s(signer: Pkcs11Signer) -> None:
    # The token's CKM_ECDSA output is used as is: 64 bytes r || s, no DER.
    private = signer._private_key
    assert private is not None
    raw = private.sign(_digest(4), mechanism=Mechanism.ECDSA)
    assert len(raw) == 64
    verify_p256_digest(public_key=signer.public_key, digest=_digest(4), signature=raw)


# --- lifecycle ----------------------------------------------------------------------------------


async def test_closed_signer_refuses(provisioned: Provisioned) -> None:
    signer = provisioned.open()
    signer.close()
    signer.close()  # idempotent
    assert signer.closed
    with pytest.raises(InvariantViolation, match="closed"):
        signer.sign_digest(_digest(1))
    with pytest.raises(InvariantViolation, match="closed"):
        await signer.sign_digest_async(_digest(1))
    # Closing logged out, so the token can be opened again.
    with provisioned.open() as again:
        assert again.sign_digest(_digest(1))


def test_context_manager_closes(provisioned: Provisioned) -> None:
    with provisioned.open() as opened:
        opened.sign_digest(_digest(1))
    assert opened.closed
