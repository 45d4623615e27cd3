"""BLS signatures for the k-of-n co-signer quorum.

What this module does
---------------------
It implements the one ciphersuite the quorum uses, from the IETF BLS signature draft
(draft-irtf-cfrg-bls-signature), minimal-pubkey-size variant, proof-of-possession scheme::

    BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_

Public keys are 48-byte compressed points of G1, signatures (and proofs of possession) are
96-byte compressed points of G2, secret keys are integers in ``[1, r - 1]``. The functions are
the draft's ``KeyGen``, ``SkToPk``, ``Sign``, ``Aggregate``, ``Verify``, ``FastAggregateVerify``,
``PopProve`` and ``PopVerify``, with the input checks a verifier needs spelled out in our code
(below), so that the accept/reject decision never depends on which library did the arithmetic.

What it does not do
-------------------
It knows nothing about key ids, registries, validity windows, thresholds or statements. The
caller (the key registry and the statement verifier) maps key ids to registered keys, refuses
keys whose proof of possession was not verified at registration, counts the quorum against
``k`` and passes the 32-byte statement digest as the message. It reads no clock and no
environment, and it keeps no state except the selected backend and a cache of public-key
validation results (a pure function of the key bytes).

Why a proof of possession is required
-------------------------------------
``FastAggregateVerify(PK_1..PK_n, m, sigma)`` adds the public keys and checks one pairing
equation, ``e(sigma, g1) == e(H(m), PK_1 + ... + PK_n)``. That is only sound when every key was
chosen honestly. A rogue co-signer who sees the victim's key ``PK_v`` can publish
``PK_r = PK_a - PK_v`` for a key pair ``(sk_a, PK_a)`` of its own. The sum
``PK_v + PK_r`` equals ``PK_a``, so the attacker's lone signature ``sk_a * H(m)`` passes
``FastAggregateVerify([PK_v, PK_r], m, ...)``: a "2-of-n quorum" that the victim never signed.
The attacker does not know the secret key of ``PK_r`` (it is ``sk_a - sk_v``), so it cannot
produce a proof of possession for it: ``PopProve`` signs the key's own bytes under a separate
domain tag (``BLS_POP_...``), and ``PopVerify`` checks that signature against the same key.
Registering a co-signer key therefore requires :func:`verify_possession` to pass; only keys
registered that way may ever reach :func:`verify_aggregate`. This module cannot enforce that
(it sees bytes, not registrations); the registry does.

Backends
--------
``py_ecc`` (the reference implementation) is always available. ``milagro`` (the
``milagro_bls_binding`` package, byte-compatible and about 80 times faster at verification, as
measured in docs/benchmarks.md) is used automatically when it can be imported, after a
known-answer self-test against published vectors; a milagro that fails the self-test is a
configuration error, not a silent fallback.
:func:`select_backend` overrides the choice for tests and benchmarks. Key generation, proofs of
possession and public-key validation always run on py_ecc: milagro_bls_binding exposes neither
KeyGen nor the proof-of-possession domain tag. Those calls happen at registration (rare), and
key validation results are cached.

milagro_bls_binding 1.9.1 announces on import that it is deprecated and no longer maintained.
It is still byte-compatible (checked by the self-test and the test suite); py_ecc remains the
reference and the fallback, and the decision logic lives here, not in the accelerator.

Checks performed in our code, before any backend is called
----------------------------------------------------------
* types (``bytes`` only) and exact lengths (48 / 96);
* for every public key, the draft's ``KeyValidate``: canonical compressed encoding, on the curve,
  not the point at infinity, in the prime-order subgroup;
* no public key listed twice (a quorum counts distinct signers);
* for every signature, the canonical compressed encoding (compression flag set, the infinity
  flag only on the exact infinity encoding, sign flag clear on infinity, both coordinates below
  the field modulus, no flag bits in the second half) and not the point at infinity.

The remaining signature properties (on the curve, in the subgroup) and the pairing check are the
backend's; both backends reject off-curve and out-of-subgroup signatures, and the tests prove that
they agree. Every library exception is wrapped in an error of :mod:`attestations.errors`, and a
backend result that is not exactly ``True`` counts as a failed verification.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Final, Literal, Protocol

from eth_typing import BLSPubkey, BLSSignature
from py_ecc.bls.ciphersuites import G2ProofOfPossession as _PyEccSuite
from py_ecc.optimized_bls12_381.optimized_curve import curve_order, field_modulus

from attestations.errors import (
    BadSignature,
    ConfigurationError,
    DecodeError,
    InvalidProofOfPossession,
    InvariantViolation,
    MissingQuorum,
)

__all__ = [
    "CIPHERSUITE_ID",
    "MIN_IKM_SIZE",
    "POP_CIPHERSUITE_ID",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "BackendName",
    "aggregate_signatures",
    "available_backends",
    "backend_name",
    "compute_public_key",
    "generate_secret_key",
    "prove_possession",
    "select_backend",
    "sign",
    "verify_aggregate",
    "verify_possession",
    "verify_signature",
]

CIPHERSUITE_ID: Final = b"BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_"
"""Domain separation tag for signatures (hash_to_curve DST)."""

POP_CIPHERSUITE_ID: Final = b"BLS_POP_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_"
"""Domain separation tag for proofs of possession."""

PUBLIC_KEY_SIZE: Final = 48
SIGNATURE_SIZE: Final = 96
SECRET_KEY_SIZE: Final = 32
MIN_IKM_SIZE: Final = 32

BackendName = Literal["py_ecc", "milagro", "auto"]

# A different DST would change every signature byte while all our tests still pass against
# ourselves; refuse to run with a py_ecc that disagrees with the ciphersuite we document.
if _PyEccSuite.DST != CIPHERSUITE_ID or _PyEccSuite.POP_TAG != POP_CIPHERSUITE_ID:
    raise ConfigurationError("installed py_ecc does not implement the documented BLS ciphersuite")

# Byte layout of a compressed point (ZCash serialization, used by the draft): the three most
# significant bits of the first byte are flags, the rest are coordinate bits.
_COMPRESSED_FLAG: Final = 0x80
_INFINITY_FLAG: Final = 0x40
_SIGN_FLAG: Final = 0x20
_FLAG_MASK: Final = _COMPRESSED_FLAG | _INFINITY_FLAG | _SIGN_FLAG
_FP_SIZE: Final = 48
_FIELD_MODULUS: Final[int] = field_modulus
_CURVE_ORDER: Final[int] = curve_order
_COORDINATE_BOUND: Final = 1 << 381  # 48 bytes minus the three flag bits

_G1_INFINITY: Final = bytes([_COMPRESSED_FLAG | _INFINITY_FLAG]) + bytes(PUBLIC_KEY_SIZE - 1)
_G2_INFINITY: Final = bytes([_COMPRESSED_FLAG | _INFINITY_FLAG]) + bytes(SIGNATURE_SIZE - 1)

# Known-answer vector from the Ethereum consensus BLS test suite (ethereum/bls12-381-tests,
# sign_case / verify_valid_case), which uses this exact ciphersuite. It guards the automatic use
# of milagro: an accelerator that disagrees with it is never selected.
_KAT_SECRET_KEY: Final = 0x263DBD792F5B1BE47ED85F8938C0F29586AF0D3AC7B977F21C278FE1462040E3
_KAT_PUBLIC_KEY: Final = bytes.fromhex(
    "a491d1b0ecd9bb917989f0e74f0dea0422eac4a873e5e2644f368dffb9a6e20f"
    "d6e10c1b77654d067c0618f6e5a7f79a"
)
_KAT_MESSAGE: Final = bytes(32)
_KAT_WRONG_MESSAGE: Final = b"\x01" + bytes(31)
_KAT_SIGNATURE: Final = bytes.fromhex(
    "b6ed936746e01f8ecf281f020953fbf1f01debd5657c4a383940b020b26507f6"
    "076334f91e2366c96e9ab279fb5158090352ea1c5b0c9274504f4f0e7053af24"
    "802e51e4568d164fe986834f41e55c8e850ce1f98458c0cfc9ab380b55285a55"
)


# --- backends -----------------------------------------------------------------------------------


class _Backend(Protocol):
    """The arithmetic a backend provides. Inputs are already validated by this module; results
    are returned raw (``object``) and checked by the caller, never trusted by type."""

    name: str

    def secret_to_public(self, secret_key: int) -> object: ...

    def sign(self, secret_key: int, message: bytes) -> object: ...

    def aggregate(self, signatures: list[bytes]) -> object: ...

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> object: ...

    def fast_aggregate_verify(
        self, public_keys: list[bytes], message: bytes, signature: bytes
    ) -> object: ...


class _PyEccBackend:
    name = "py_ecc"

    def secret_to_public(self, secret_key: int) -> object:
        return _PyEccSuite.SkToPk(secret_key)

    def sign(self, secret_key: int, message: bytes) -> object:
        return _PyEccSuite.Sign(secret_key, message)

    def aggregate(self, signatures: list[bytes]) -> object:
        return _PyEccSuite.Aggregate([BLSSignature(sig) for sig in signatures])

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> object:
        return _PyEccSuite.Verify(BLSPubkey(public_key), message, BLSSignature(signature))

    def fast_aggregate_verify(
        self, public_keys: list[bytes], message: bytes, signature: bytes
    ) -> object:
        return _PyEccSuite.FastAggregateVerify(
            [BLSPubkey(key) for key in public_keys], message, BLSSignature(signature)
        )


class _MilagroBackend:
    name = "milagro"

    def __init__(self, module: ModuleType) -> None:
        self._lib = module

    def secret_to_public(self, secret_key: int) -> object:
        return self._lib.SkToPk(secret_key.to_bytes(SECRET_KEY_SIZE, "big"))

    def sign(self, secret_key: int, message: bytes) -> object:
        return self._lib.Sign(secret_key.to_bytes(SECRET_KEY_SIZE, "big"), message)

    def aggregate(self, signatures: list[bytes]) -> object:
        return self._lib.Aggregate(signatures)

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> object:
        return self._lib.Verify(public_key, message, signature)

    def fast_aggregate_verify(
        self, public_keys: list[bytes], message: bytes, signature: bytes
    ) -> object:
        return self._lib.FastAggregateVerify(public_keys, message, signature)


def _import_milagro() -> ModuleType | None:
    # milagro_bls_binding 1.9 warns on import that it is no longer maintained. We know (see the
    # module docstring); silence exactly that warning so that importing this module stays quiet
    # and does not fail under "warnings as errors". Any other warning still surfaces.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"milagro_bls_binding is deprecated",
            category=DeprecationWarning,
        )
        try:
            return importlib.import_module("milagro_bls_binding")
        except ImportError:
            return None


_MILAGRO_MODULE: Final = _import_milagro()
_PY_ECC: Final = _PyEccBackend()


def _self_test(backend: _Backend) -> None:
    """Refuse a backend that is not byte-compatible with the documented ciphersuite."""
    try:
        ok = (
            backend.secret_to_public(_KAT_SECRET_KEY) == _KAT_PUBLIC_KEY
            and backend.sign(_KAT_SECRET_KEY, _KAT_MESSAGE) == _KAT_SIGNATURE
            and backend.verify(_KAT_PUBLIC_KEY, _KAT_MESSAGE, _KAT_SIGNATURE) is True
            and backend.verify(_KAT_PUBLIC_KEY, _KAT_WRONG_MESSAGE, _KAT_SIGNATURE) is False
        )
    except Exception as exc:
        raise ConfigurationError(f"BLS backend {backend.name} failed its self-test") from exc
    if not ok:
        raise ConfigurationError(
            f"BLS backend {backend.name} is not byte-compatible with {CIPHERSUITE_ID!r}"
        )


@dataclass(slots=True)
class _Selection:
    requested: BackendName = "auto"
    resolved: _Backend | None = None


_SELECTION: Final = _Selection()


def _resolve(requested: BackendName) -> _Backend:
    if requested == "py_ecc":
        return _PY_ECC
    if requested not in ("milagro", "auto"):
        raise ConfigurationError(f"unknown BLS backend {requested!r}")
    if _MILAGRO_MODULE is None:
        if requested == "milagro":
            raise ConfigurationError("BLS backend 'milagro' requested but not installed")
        return _PY_ECC
    backend = _MilagroBackend(_MILAGRO_MODULE)
    _self_test(backend)
    return backend


def _backend() -> _Backend:
    if _SELECTION.resolved is None:
        _SELECTION.resolved = _resolve(_SELECTION.requested)
    return _SELECTION.resolved


def select_backend(name: BackendName) -> str:
    """Choose the arithmetic backend: ``"py_ecc"``, ``"milagro"`` or ``"auto"`` (milagro when
    importable, else py_ecc). Returns the name of the backend now in use.

    Raises :class:`ConfigurationError` for an unknown name, for ``"milagro"`` when it is not
    installed, and when milagro fails its known-answer self-test. On error the previous
    selection stays in force.
    """
    backend = _resolve(name)
    _SELECTION.requested = name
    _SELECTION.resolved = backend
    return backend.name


def backend_name() -> str:
    """Name of the backend in use: ``"py_ecc"`` or ``"milagro"``."""
    return _backend().name


def available_backends() -> tuple[str, ...]:
    """Backends that can be selected on this machine (py_ecc always, milagro when importable)."""
    if _MILAGRO_MODULE is None:
        return ("py_ecc",)
    return ("py_ecc", "milagro")


# --- input checks -------------------------------------------------------------------------------


def _require_secret_key(secret_key: object) -> int:
    # bool is an int subclass; True would otherwise be accepted as the secret key 1.
    if isinstance(secret_key, bool) or not isinstance(secret_key, int):
        raise ConfigurationError("BLS secret key must be an int")
    if not 0 < secret_key < _CURVE_ORDER:
        raise ConfigurationError("BLS secret key out of range [1, r - 1]")
    return secret_key


def _require_message(message: object) -> bytes:
    if not isinstance(message, bytes):
        raise DecodeError(f"message must be bytes, got {type(message).__name__}")
    return message


def _require_list(items: object, what: str) -> list[bytes]:
    # bytes and str are Sequences too; a lone key passed where a list belongs must not be
    # read as 48 one-byte "keys".
    if isinstance(items, bytes | bytearray | memoryview | str) or not isinstance(items, Sequence):
        raise DecodeError(f"{what} must be a list or tuple of bytes")
    return list(items)


def _require_public_key_bytes(public_key: object) -> bytes:
    if not isinstance(public_key, bytes):
        raise DecodeError(f"public key must be bytes, got {type(public_key).__name__}")
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise DecodeError(f"public key must be {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    return public_key


@functools.lru_cache(maxsize=4096)
def _key_validate(public_key: bytes) -> bool:
    """The draft's KeyValidate (decode, not infinity, subgroup check), on py_ecc.

    Cached: registered co-signer keys recur in every statement and the subgroup check costs
    milliseconds in pure Python. The result is a pure function of the bytes.
    """
    try:
        return _PyEccSuite.KeyValidate(BLSPubkey(public_key)) is True
    except Exception:  # noqa: BLE001 - any library failure means "not a valid key"
        return False


def _require_valid_public_key(public_key: object) -> bytes:
    key = _require_public_key_bytes(public_key)
    if key == _G1_INFINITY:
        raise DecodeError("public key is the point at infinity")
    if not _key_validate(key):
        raise DecodeError(f"public key fails KeyValidate: {key.hex()}")
    return key


def _require_signature_encoding(signature: object, what: str) -> bytes:
    """Type, length and canonical compressed form of a G2 point. Infinity passes this check."""
    if not isinstance(signature, bytes):
        raise DecodeError(f"{what} must be bytes, got {type(signature).__name__}")
    if len(signature) != SIGNATURE_SIZE:
        raise DecodeError(f"{what} must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    flags = signature[0] & _FLAG_MASK
    if not flags & _COMPRESSED_FLAG:
        raise DecodeError(f"{what} is not in compressed form")
    if flags & _INFINITY_FLAG:
        # Exactly one encoding of infinity exists; anything else with this flag is malformed.
        if signature != _G2_INFINITY:
            raise DecodeError(f"{what} has the infinity flag but is not the infinity encoding")
        return signature
    x_imaginary = int.from_bytes(signature[:_FP_SIZE], "big") % _COORDINATE_BOUND
    x_real = int.from_bytes(signature[_FP_SIZE:], "big")
    # x_real < p also rules out flag bits in the second half (p < 2**381).
    if x_imaginary >= _FIELD_MODULUS or x_real >= _FIELD_MODULUS:
        raise DecodeError(f"{what} has a coordinate not below the field modulus")
    if x_imaginary == 0 and x_real == 0:
        # x = 0 gives points of order 3, never in G2; py_ecc cannot even decode it (it reads
        # it as infinity and fails), so reject it here for both backends alike.
        raise DecodeError(f"{what} has x = 0, which is not a point of G2")
    return signature


def _require_signature(signature: object, what: str = "signature") -> bytes:
    sig = _require_signature_encoding(signature, what)
    if sig == _G2_INFINITY:
        raise BadSignature(f"{what} is the point at infinity")
    return sig


def _require_bytes_result(value: object, size: int, operation: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise InvariantViolation(f"BLS backend returned a malformed result from {operation}")
    return value


def _require_distinct(items: list[bytes], what: str) -> None:
    if len(set(items)) != len(items):
        raise DecodeError(f"{what} lists the same value more than once")


# --- keys ---------------------------------------------------------------------------------------


def generate_secret_key(ikm: bytes) -> int:
    """The draft's KeyGen with an empty key_info: a secret key in ``[1, r - 1]`` derived from at
    least 32 bytes of input keying material (which must be secret and uniformly random)."""
    if not isinstance(ikm, bytes):
        raise ConfigurationError("ikm must be bytes")
    if len(ikm) < MIN_IKM_SIZE:
        raise ConfigurationError(f"ikm must be at least {MIN_IKM_SIZE} bytes, got {len(ikm)}")
    try:
        secret_key = _PyEccSuite.KeyGen(ikm)
    except Exception as exc:
        raise InvariantViolation("BLS KeyGen failed") from exc
    return _require_secret_key(secret_key)


def compute_public_key(secret_key: int) -> bytes:
    """``SkToPk``: the 48-byte compressed G1 public key of ``secret_key``."""
    sk = _require_secret_key(secret_key)
    backend = _backend()
    try:
        result = backend.secret_to_public(sk)
    except Exception as exc:
        raise InvariantViolation(f"BLS {backend.name} SkToPk failed") from exc
    return _require_bytes_result(result, PUBLIC_KEY_SIZE, "SkToPk")


def prove_possession(secret_key: int) -> bytes:
    """``PopProve``: a 96-byte proof that the holder of ``secret_key`` knows it. It signs the
    public key's own bytes under :data:`POP_CIPHERSUITE_ID` (always computed on py_ecc)."""
    sk = _require_secret_key(secret_key)
    try:
        result = _PyEccSuite.PopProve(sk)
    except Exception as exc:
        raise InvariantViolation("BLS PopProve failed") from exc
    return _require_bytes_result(result, SIGNATURE_SIZE, "PopProve")


def verify_possession(*, public_key: bytes, proof: bytes) -> None:
    """``PopVerify``: accept ``public_key`` for registration only if ``proof`` proves possession
    of its secret key.

    Raises :class:`DecodeError` if the public key fails KeyValidate, and
    :class:`InvalidProofOfPossession` for any problem with the proof (malformed, infinity, or not
    verifying). Always computed on py_ecc (about 0.3 s); it runs once per key registration.
    """
    key = _require_valid_public_key(public_key)
    try:
        proof_bytes = _require_signature(proof, "proof of possession")
    except (DecodeError, BadSignature) as exc:
        raise InvalidProofOfPossession(str(exc)) from exc
    try:
        ok = _PyEccSuite.PopVerify(BLSPubkey(key), BLSSignature(proof_bytes))
    except Exception as exc:
        raise InvalidProofOfPossession("proof of possession could not be verified") from exc
    if ok is not True:
        raise InvalidProofOfPossession(f"proof of possession does not verify for {key.hex()}")


# --- signatures ---------------------------------------------------------------------------------


def sign(*, secret_key: int, message: bytes) -> bytes:
    """``Sign``: the 96-byte compressed G2 signature of ``message`` under :data:`CIPHERSUITE_ID`."""
    sk = _require_secret_key(secret_key)
    msg = _require_message(message)
    backend = _backend()
    try:
        result = backend.sign(sk, msg)
    except Exception as exc:
        raise InvariantViolation(f"BLS {backend.name} Sign failed") from exc
    return _require_bytes_result(result, SIGNATURE_SIZE, "Sign")


def aggregate_signatures(signatures: Sequence[bytes]) -> bytes:
    """``Aggregate``: the sum of the given signatures, for one aggregate over one message.

    Raises :class:`MissingQuorum` for an empty list, :class:`DecodeError` for a malformed or
    repeated signature (one signer counted twice) or one that is not a curve point, and
    :class:`BadSignature` for the infinity point, as an input or as the result.
    """
    sigs = _require_list(signatures, "signatures")
    if not sigs:
        raise MissingQuorum("no signatures to aggregate")
    checked = [_require_signature(sig) for sig in sigs]
    _require_distinct(checked, "signatures")
    backend = _backend()
    try:
        result = backend.aggregate(checked)
    except Exception as exc:
        raise DecodeError("a signature does not decode to a curve point") from exc
    aggregate = _require_bytes_result(result, SIGNATURE_SIZE, "Aggregate")
    if aggregate == _G2_INFINITY:
        raise BadSignature("signatures cancel out to the point at infinity")
    return aggregate


def verify_signature(*, public_key: bytes, message: bytes, signature: bytes) -> None:
    """``Verify``: raise unless ``signature`` is ``public_key``'s signature on ``message``.

    Raises :class:`DecodeError` for a public key failing KeyValidate or a malformed signature,
    :class:`BadSignature` for an infinity signature or one that does not verify.
    """
    key = _require_valid_public_key(public_key)
    msg = _require_message(message)
    sig = _require_signature(signature)
    backend = _backend()
    try:
        ok = backend.verify(key, msg, sig)
    except Exception as exc:
        raise BadSignature(f"BLS {backend.name} Verify failed") from exc
    if ok is not True:
        raise BadSignature("signature does not verify")


def verify_aggregate(*, public_keys: Sequence[bytes], message: bytes, signature: bytes) -> None:
    """``FastAggregateVerify``: raise unless every key in ``public_keys`` signed ``message`` and
    ``signature`` is the aggregate of those signatures.

    The caller must pass only keys whose proof of possession was verified (see the module
    docstring); this function checks, in order: the list is non-empty (:class:`MissingQuorum`),
    each key is 48 bytes, no key is listed twice, each key passes KeyValidate, the message is
    bytes, the signature is 96 canonical bytes (all :class:`DecodeError`), the signature is not
    infinity and the pairing check holds (:class:`BadSignature`).
    """
    keys = _require_list(public_keys, "public_keys")
    if not keys:
        raise MissingQuorum("no public keys to verify against")
    raw = [_require_public_key_bytes(key) for key in keys]
    _require_distinct(raw, "public_keys")
    checked = [_require_valid_public_key(key) for key in raw]
    msg = _require_message(message)
    sig = _require_signature(signature)
    backend = _backend()
    try:
        ok = backend.fast_aggregate_verify(checked, msg, sig)
    except Exception as exc:
        raise BadSignature(f"BLS {backend.name} FastAggregateVerify failed") from exc
    if ok is not True:
        raise BadSignature(f"aggregate signature does not verify for {len(checked)} signers")
