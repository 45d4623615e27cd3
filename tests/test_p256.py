"""ECDSA P-256 verification and the development-only software signer (no token needed)."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from hypothesis import given, settings
from hypothesis import strategies as st

from attestations.canonical import compute_key_id
from attestations.errors import BadSignature, ConfigurationError, DecodeError
from attestations.p256 import (
    ALGORITHM,
    CURVE_N,
    CURVE_P,
    DigestSigner,
    SoftwareP256Signer,
    verify_p256_digest,
    verify_p256_public_key,
)

# RFC 6979 appendix A.2.5: P-256, SHA-256, message "sample". An independent known answer.
RFC6979_PUBLIC_KEY = bytes.fromhex(
    "04"
    "60fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6"
    "7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299"
)
RFC6979_PRIVATE_SCALAR = bytes.fromhex(
    "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721"
)
RFC6979_DIGEST = hashlib.sha256(b"sample").digest()
RFC6979_SIGNATURE = bytes.fromhex(
    "efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716"
    "f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8"
)

DIGEST = hashlib.sha256(b"mcb test digest").digest()


def _signer() -> SoftwareP256Signer:
    return SoftwareP256Signer(insecure_development_only=True)


def _with_scalars(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def _cryptography_verifies(public_key: bytes, digest: bytes, signature: bytes) -> bool:
    """Verification with the cryptography package alone, without attestations.p256."""
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.verify(der, digest, ec.ECDSA(Prehashed(SHA256())))
    except Exception:
        return False
    return True


# --- known answers ------------------------------------------------------------------------------


def test_rfc6979_known_answer_verifies() -> None:
    verify_p256_digest(
        public_key=RFC6979_PUBLIC_KEY, digest=RFC6979_DIGEST, signature=RFC6979_SIGNATURE
    )


def test_private_scalar_gives_the_known_public_key_and_key_id() -> None:
    signer = SoftwareP256Signer(
        insecure_development_only=True, private_scalar=RFC6979_PRIVATE_SCALAR
    )
    assert signer.public_key == RFC6979_PUBLIC_KEY
    expected = hashlib.sha256(
        b"mcb/key/v1\x00" + b"ecdsa-p256-sha256" + b"\x00" + RFC6979_PUBLIC_KEY
    ).hexdigest()
    assert signer.key_id == expected
    assert signer.key_id == compute_key_id(algorithm=ALGORITHM, public_key=RFC6979_PUBLIC_KEY)
    assert signer.algorithm == "ecdsa-p256-sha256"


# --- round trips --------------------------------------------------------------------------------


def test_software_signer_round_trip_and_independent_check() -> None:
    signer = _signer()
    signature = signer.sign_digest(DIGEST)
    assert len(signature) == 64
    assert len(signer.public_key) == 65
    verify_p256_digest(public_key=signer.public_key, digest=DIGEST, signature=signature)
    assert _cryptography_verifies(signer.public_key, DIGEST, signature)


def test_software_signer_implements_the_protocol() -> None:
    signer: DigestSigner = _signer()
    assert isinstance(signer, DigestSigner)


async def test_software_signer_async_and_context_manager() -> None:
    with _signer() as signer:
        signature = await signer.sign_digest_async(DIGEST)
    verify_p256_digest(public_key=signer.public_key, digest=DIGEST, signature=signature)


@settings(max_examples=25, deadline=None)
@given(digest=st.binary(min_size=32, max_size=32))
def test_any_digest_round_trips(digest: bytes) -> None:
    signer = SoftwareP256Signer(insecure_development_only=True, private_scalar=b"\x07" * 32)
    verify_p256_digest(
        public_key=signer.public_key, digest=digest, signature=signer.sign_digest(digest)
    )


def test_high_s_twin_also_verifies() -> None:
    # ECDSA signatures are malleable: (r, n - s) is valid whenever (r, s) is. Documented in
    # docs/protocol.md section 5.1; statements are identified by digest, never by signature.
    r = int.from_bytes(RFC6979_SIGNATURE[:32], "big")
    s = int.from_bytes(RFC6979_SIGNATURE[32:], "big")
    verify_p256_digest(
        public_key=RFC6979_PUBLIC_KEY,
        digest=RFC6979_DIGEST,
        signature=_with_scalars(r, CURVE_N - s),
    )


# --- tampering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 15, 31])
def test_tampered_digest_is_bad_signature(index: int) -> None:
    with pytest.raises(BadSignature):
        verify_p256_digest(
            public_key=RFC6979_PUBLIC_KEY,
            digest=_flip(RFC6979_DIGEST, index),
            signature=RFC6979_SIGNATURE,
        )


@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_tampered_signature_is_bad_signature(index: int) -> None:
    with pytest.raises(BadSignature):
        verify_p256_digest(
            public_key=RFC6979_PUBLIC_KEY,
            digest=RFC6979_DIGEST,
            signature=_flip(RFC6979_SIGNATURE, index),
        )


def test_other_valid_key_is_bad_signature() -> None:
    with pytest.raises(BadSignature, match="does not verify"):
        verify_p256_digest(
            public_key=_signer().public_key, digest=RFC6979_DIGEST, signature=RFC6979_SIGNATURE
        )


@pytest.mark.parametrize("index", [1, 32, 33, 64])
def test_tampered_public_key_is_rejected(index: int) -> None:
    # Flipping a coordinate bit almost surely leaves the curve (DecodeError); if it lands on
    # another point, the signature cannot verify (BadSignature). Either way: rejected.
    with pytest.raises((DecodeError, BadSignature)):
        verify_p256_digest(
            public_key=_flip(RFC6979_PUBLIC_KEY, index),
            digest=RFC6979_DIGEST,
            signature=RFC6979_SIGNATURE,
        )


def test_point_off_curve_is_decode_error() -> None:
    off_curve = RFC6979_PUBLIC_KEY[:-1] + bytes([RFC6979_PUBLIC_KEY[-1] ^ 1])
    with pytest.raises(DecodeError, match="not a point on the curve"):
        verify_p256_public_key(off_curve)


@pytest.mark.parametrize("x", [CURVE_P, CURVE_P + 1, 2**256 - 1], ids=["p", "p+1", "max"])
def test_coordinate_not_below_p_is_decode_error(x: int) -> None:
    key = b"\x04" + x.to_bytes(32, "big") + RFC6979_PUBLIC_KEY[33:]
    with pytest.raises(DecodeError, match="field prime"):
        verify_p256_public_key(key)


# --- malformed inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "public_key",
    [
        b"",
        RFC6979_PUBLIC_KEY[:64],
        RFC6979_PUBLIC_KEY + b"\x00",
        RFC6979_PUBLIC_KEY[1:],
        b"\x02" + RFC6979_PUBLIC_KEY[1:33],  # compressed form is not accepted
        b"\x02" + RFC6979_PUBLIC_KEY[1:],
        b"\x00" * 65,
        b"\x04" + b"\x00" * 64,
    ],
    ids=["empty", "64", "66", "no-prefix", "compressed", "prefix-02", "zeros", "origin"],
)
def test_malformed_public_key_is_decode_error(public_key: bytes) -> None:
    with pytest.raises(DecodeError):
        verify_p256_digest(
            public_key=public_key, digest=RFC6979_DIGEST, signature=RFC6979_SIGNATURE
        )


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_digest_of_wrong_length_is_decode_error(length: int) -> None:
    with pytest.raises(DecodeError, match="digest must be 32 bytes"):
        verify_p256_digest(
            public_key=RFC6979_PUBLIC_KEY, digest=b"\x01" * length, signature=RFC6979_SIGNATURE
        )


def test_der_signature_is_decode_error() -> None:
    r = int.from_bytes(RFC6979_SIGNATURE[:32], "big")
    s = int.from_bytes(RFC6979_SIGNATURE[32:], "big")
    with pytest.raises(DecodeError, match="64 bytes"):
        verify_p256_digest(
            public_key=RFC6979_PUBLIC_KEY,
            digest=RFC6979_DIGEST,
            signature=encode_dss_signature(r, s),
        )


@pytest.mark.parametrize("length", [0, 63, 65, 128])
def test_signature_of_wrong_length_is_decode_error(length: int) -> None:
    with pytest.raises(DecodeError):
        verify_p256_digest(
            public_key=RFC6979_PUBLIC_KEY, digest=RFC6979_DIGEST, signature=b"\x01" * length
        )


@pytest.mark.parametrize(
    ("r", "s", "which"),
    [
        (0, 1, "r"),
        (1, 0, "s"),
        (CURVE_N, 1, "r"),
        (1, CURVE_N, "s"),
        (2**256 - 1, 1, "r"),
        (1, 2**256 - 1, "s"),
    ],
)
def test_scalar_out_of_range_is_bad_signature(r: int, s: int, which: str) -> None:
    with pytest.raises(BadSignature, match=f"signature {which} is zero or not below"):
        verify_p256_digest(
            public_key=RFC6979_PUBLIC_KEY, digest=RFC6979_DIGEST, signature=_with_scalars(r, s)
        )


def test_r_plus_n_is_rejected() -> None:
    # Some broken verifiers reduce r mod n; r + n must never be accepted for a valid r.
    r = int.from_bytes(RFC6979_SIGNATURE[:32], "big")
    s = int.from_bytes(RFC6979_SIGNATURE[32:], "big")
    if r + CURVE_N < 2**256:
        with pytest.raises(BadSignature):
            verify_p256_digest(
                public_key=RFC6979_PUBLIC_KEY,
                digest=RFC6979_DIGEST,
                signature=_with_scalars(r + CURVE_N, s),
            )


@pytest.mark.parametrize("kind", [bytearray, memoryview, str])
def test_non_bytes_inputs_are_decode_error(kind: type) -> None:
    bad: object = kind(RFC6979_SIGNATURE.hex()) if kind is str else kind(RFC6979_SIGNATURE)
    with pytest.raises(DecodeError, match="must be bytes"):
        verify_p256_digest(
            public_key=RFC6979_PUBLIC_KEY,
            digest=RFC6979_DIGEST,
            signature=bad,  # type: ignore[arg-type]
        )
    with pytest.raises(DecodeError, match="must be bytes"):
        verify_p256_digest(
            public_key=bytearray(RFC6979_PUBLIC_KEY),  # type: ignore[arg-type]
            digest=RFC6979_DIGEST,
            signature=RFC6979_SIGNATURE,
        )


@settings(max_examples=200)
@given(signature=st.binary(min_size=64, max_size=64))
def test_random_signatures_never_verify_and_fail_cleanly(signature: bytes) -> None:
    with pytest.raises(BadSignature):
        verify_p256_digest(
            public_key=RFC6979_PUBLIC_KEY, digest=RFC6979_DIGEST, signature=signature
        )


@settings(max_examples=200)
@given(public_key=st.binary(min_size=0, max_size=70))
def test_arbitrary_public_key_bytes_fail_cleanly(public_key: bytes) -> None:
    with pytest.raises((DecodeError, BadSignature)):
        verify_p256_digest(
            public_key=public_key, digest=RFC6979_DIGEST, signature=RFC6979_SIGNATURE
        )


def test_signer_rejects_digest_of_wrong_length() -> None:
    with pytest.raises(DecodeError):
        _signer().sign_digest(b"\x00" * 31)


# --- the software signer is for development only ------------------------------------------------


def test_software_signer_refuses_without_the_flag() -> None:
    with pytest.raises(ConfigurationError, match="insecure_development_only=True"):
        SoftwareP256Signer()


@pytest.mark.parametrize("flag", [False, 1, "yes"])
def test_software_signer_refuses_anything_but_true(flag: object) -> None:
    with pytest.raises(ConfigurationError):
        SoftwareP256Signer(insecure_development_only=flag)  # type: ignore[arg-type]


def test_software_signer_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="attestations.p256"):
        signer = _signer()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "process memory" in message
    assert "never be used in production" in message
    assert signer.key_id in message


@pytest.mark.parametrize(
    "scalar", [b"\x00" * 32, CURVE_N.to_bytes(32, "big"), b"\xff" * 32], ids=["0", "n", "max"]
)
def test_software_signer_rejects_out_of_range_scalar(scalar: bytes) -> None:
    with pytest.raises(ConfigurationError, match=r"\[1, n-1\]"):
        SoftwareP256Signer(insecure_development_only=True, private_scalar=scalar)


def test_software_signer_rejects_short_scalar() -> None:
    with pytest.raises(DecodeError):
        SoftwareP256Signer(insecure_development_only=True, private_scalar=b"\x01" * 31)


async def test_software_signer_async_many_tasks() -> None:
    signer = _signer()
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(20)]
    signatures = await asyncio.gather(*(signer.sign_digest_async(d) for d in digests))
    for digest, signature in zip(digests, signatures, strict=True):
        verify_p256_digest(public_key=signer.public_key, digest=digest, signature=signature)
