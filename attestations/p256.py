"""ECDSA P-256 signatures over 32-byte digests: the custodian's HSM signature scheme.

What it does:

* :func:`verify_p256_digest` checks one signature, failing closed: a malformed public key,
  digest or signature raises :class:`~attestations.errors.DecodeError`; a well-formed signature
  that does not verify (including ``r`` or ``s`` outside ``[1, n-1]``) raises
  :class:`~attestations.errors.BadSignature`. It returns ``None`` only for a valid signature.
* :class:`DigestSigner` is the interface every signer implements (the PKCS#11 signer in
  :mod:`attestations.hsm`, and the software signer here).
* :class:`SoftwareP256Signer` keeps its private key in process memory. It exists for
  development and tests only and refuses to start without an explicit flag.

What it does not do: it never hashes a message (callers pass the domain-separated SHA-256
digest from :mod:`attestations.canonical`), never talks to a token, and never decides whether a
key is trusted (that is the key registry's job).

Wire formats (see docs/protocol.md): the public key is the 65-byte uncompressed SEC1 point
``0x04 || X || Y``; the signature is the 64-byte ``r || s``, each a 32-byte big-endian integer.
This is also the raw output of PKCS#11 ``CKM_ECDSA`` on a P-256 key, so HSM signatures travel
unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Final, Protocol, Self, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from attestations.canonical import compute_key_id
from attestations.errors import BadSignature, ConfigurationError, DecodeError, InvariantViolation

__all__ = [
    "ALGORITHM",
    "DIGEST_SIZE",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "DigestSigner",
    "SoftwareP256Signer",
    "encode_public_key",
    "verify_p256_digest",
    "verify_p256_public_key",
]

_log = logging.getLogger(__name__)

ALGORITHM: Final = "ecdsa-p256-sha256"
"""Algorithm name carried next to every signature and bound into the key id."""

DIGEST_SIZE: Final = 32
SCALAR_SIZE: Final = 32
PUBLIC_KEY_SIZE: Final = 1 + 2 * SCALAR_SIZE
SIGNATURE_SIZE: Final = 2 * SCALAR_SIZE

# Domain parameters of P-256 (SEC 2 secp256r1 = NIST P-256 = X9.62 prime256v1). Kept here so the
# structural checks below do not depend on how a library happens to report an invalid point.
CURVE_P: Final = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
CURVE_A: Final = CURVE_P - 3
CURVE_B: Final = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
CURVE_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
"""Order of the base point; ``r`` and ``s`` must lie in ``[1, CURVE_N - 1]``."""

_UNCOMPRESSED: Final = 0x04
_PREHASHED_SHA256: Final = ec.ECDSA(Prehashed(SHA256()))


@runtime_checkable
class DigestSigner(Protocol):
    """Something that signs 32-byte digests with one P-256 key.

    Implementations check every signature they produce against :attr:`public_key` before
    returning it, so a faulty device or library can never emit an invalid signature.
    """

    @property
    def algorithm(self) -> str:
        """Always ``"ecdsa-p256-sha256"``."""
        ...

    @property
    def public_key(self) -> bytes:
        """65-byte uncompressed SEC1 point ``0x04 || X || Y``."""
        ...

    @property
    def key_id(self) -> str:
        """``canonical.compute_key_id(algorithm=..., public_key=...)``: 64 lowercase hex chars."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest; return the 64-byte ``r || s`` signature."""
        ...


def _require_bytes(value: object, *, name: str, size: int) -> bytes:
    if not isinstance(value, bytes):
        raise DecodeError(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) != size:
        raise DecodeError(f"{name} must be {size} bytes, got {len(value)}")
    return value


def _load_public_key(public_key: object) -> ec.EllipticCurvePublicKey:
    raw = _require_bytes(public_key, name="P-256 public key", size=PUBLIC_KEY_SIZE)
    if raw[0] != _UNCOMPRESSED:
        raise DecodeError(
            f"P-256 public key must start with 0x04 (uncompressed SEC1), got 0x{raw[0]:02x}"
        )
    x = int.from_bytes(raw[1 : 1 + SCALAR_SIZE], "big")
    y = int.from_bytes(raw[1 + SCALAR_SIZE :], "big")
    if x >= CURVE_P or y >= CURVE_P:
        raise DecodeError("P-256 public key coordinate is not below the field prime")
    # The encoding cannot express the point at infinity, so on-curve plus prime order of the
    # curve (cofactor 1) makes this a valid public key.
    if (y * y - (x * x * x + CURVE_A * x + CURVE_B)) % CURVE_P != 0:
        raise DecodeError("P-256 public key is not a point on the curve")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError as exc:  # pragma: no cover - the checks above are stricter
        raise DecodeError(f"P-256 public key rejected: {exc}") from exc


def verify_p256_public_key(public_key: bytes) -> None:
    """Raise :class:`DecodeError` unless ``public_key`` is a 65-byte uncompressed SEC1 encoding
    of a point on P-256 (both coordinates below the field prime)."""
    _load_public_key(public_key)


def _split_signature(signature: object) -> tuple[int, int]:
    raw = _require_bytes(signature, name="P-256 signature", size=SIGNATURE_SIZE)
    r = int.from_bytes(raw[:SCALAR_SIZE], "big")
    s = int.from_bytes(raw[SCALAR_SIZE:], "big")
    # SEC 1 v2 section 4.1.4 step 1: a signature with r or s outside [1, n-1] is invalid.
    if not 1 <= r < CURVE_N:
        raise BadSignature("P-256 signature r is zero or not below the group order")
    if not 1 <= s < CURVE_N:
        raise BadSignature("P-256 signature s is zero or not below the group order")
    return r, s


def verify_p256_digest(*, public_key: bytes, digest: bytes, signature: bytes) -> None:
    """Verify an ECDSA P-256 signature over a SHA-256 digest; return only if it is valid.

    Raises :class:`DecodeError` when ``public_key`` is not a 65-byte uncompressed point on the
    curve, ``digest`` is not 32 bytes or ``signature`` is not 64 bytes; raises
    :class:`BadSignature` when ``r`` or ``s`` is out of range or the signature does not verify.
    """
    key = _load_public_key(public_key)
    checked_digest = _require_bytes(digest, name="digest", size=DIGEST_SIZE)
    r, s = _split_signature(signature)
    try:
        key.verify(encode_dss_signature(r, s), checked_digest, _PREHASHED_SHA256)
    except InvalidSignature as exc:
        raise BadSignature("P-256 signature does not verify against the public key") from exc


def encode_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """The 65-byte uncompressed SEC1 encoding of a P-256 public key object."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise DecodeError(f"expected a P-256 key, got curve {key.curve.name}")
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


class SoftwareP256Signer:
    """A P-256 signer whose private key lives in process memory. DEVELOPMENT AND TESTS ONLY.

    Anything that can read this process's memory (a core dump, a debugger, a swap file) can read
    the key. Production signing goes through :class:`attestations.hsm.Pkcs11Signer`, where the
    key never leaves the token. Construction requires ``insecure_development_only=True`` and logs
    a warning every time.

    ``private_scalar`` (32 bytes big-endian, in ``[1, n-1]``) fixes the key, for reproducible
    test vectors; without it a fresh random key is generated.
    """

    __slots__ = ("_key", "_key_id", "_public_key")

    def __init__(
        self,
        *,
        insecure_development_only: bool = False,
        private_scalar: bytes | None = None,
    ) -> None:
        if insecure_development_only is not True:
            raise ConfigurationError(
                "SoftwareP256Signer keeps the signing key in process memory; pass "
                "insecure_development_only=True to use it in development, and use "
                "attestations.hsm.Pkcs11Signer in production"
            )
        if private_scalar is None:
            self._key = ec.generate_private_key(ec.SECP256R1())
        else:
            raw = _require_bytes(private_scalar, name="P-256 private scalar", size=SCALAR_SIZE)
            value = int.from_bytes(raw, "big")
            if not 1 <= value < CURVE_N:
                raise ConfigurationError("P-256 private scalar must be in [1, n-1]")
            self._key = ec.derive_private_key(value, ec.SECP256R1())
        self._public_key = encode_public_key(self._key.public_key())
        self._key_id = compute_key_id(algorithm=ALGORITHM, public_key=self._public_key)
        _log.warning(
            "SoftwareP256Signer %s: the private key lives in process memory; for development "
            "and tests only, it must never be used in production (use an HSM through "
            "attestations.hsm.Pkcs11Signer)",
            self._key_id,
        )

    @property
    def algorithm(self) -> str:
        return ALGORITHM

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest; return 64-byte ``r || s`` (checked before it is returned)."""
        checked = _require_bytes(digest, name="digest", size=DIGEST_SIZE)
        r, s = decode_dss_signature(self._key.sign(checked, _PREHASHED_SHA256))
        signature = r.to_bytes(SCALAR_SIZE, "big") + s.to_bytes(SCALAR_SIZE, "big")
        try:
            verify_p256_digest(public_key=self._public_key, digest=checked, signature=signature)
        except (BadSignature, DecodeError) as exc:  # pragma: no cover - would be a library bug
            raise InvariantViolation(
                f"software signer {self._key_id} produced a signature that does not verify"
            ) from exc
        return signature

    async def sign_digest_async(self, digest: bytes) -> bytes:
        """:meth:`sign_digest` run in a worker thread, as the HSM signer does."""
        return await asyncio.to_thread(self.sign_digest, digest)

    def close(self) -> None:
        """Nothing to release; present so both signers can be used the same way."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SoftwareP256Signer(key_id={self._key_id!r}, insecure_development_only=True)"
