"""PKCS#11 adapter: the custodian's P-256 signing key on a hardware security module.

What it does:

* :func:`generate_p256_key` creates an ECDSA P-256 key pair *on* the token. The private key is
  sensitive, never extractable, persistent and usable for signing only; the function reads those
  attributes back and refuses a token that did not honour them.
* :class:`Pkcs11Signer` logs in to one token, finds the key pair by label and signs 32-byte
  digests with ``CKM_ECDSA`` through one shared session. Every signature is verified against the
  public key before it is returned, so a faulty device cannot emit a bad signature.
* :func:`reinitialize_library` makes tokens created after the library was first loaded visible
  (SoftHSM2 reads its token directory only at ``C_Initialize``).

What it does not do: it never reads the environment or the clock (the caller passes the library
path, token label and PIN), never hashes (callers pass the domain-separated digest), never
decides which keys are trusted, and never exports key material.

This is the only module that imports :mod:`pkcs11`. Every exception of that package is wrapped
into :mod:`attestations.errors` here:

====================================================  ===============================
situation                                             raised
====================================================  ===============================
library cannot be loaded, no token with that label    :class:`TokenNotFound`
user PIN rejected                                     :class:`WrongPin`
no key pair with that label                           :class:`SigningKeyNotFound`
key pair unusable (not P-256, extractable, ...)       :class:`ConfigurationError`
key ever extractable or not generated on the token    :class:`ConfigurationError`
token does not report a key attribute we check        :class:`ConfigurationError`
device error while signing                            :class:`TokenUnavailable`
the token produced a signature that does not verify   :class:`InvariantViolation`
====================================================  ===============================

Concurrency: python-pkcs11 calls ``C_Initialize`` without ``CKF_OS_LOCKING_OK``, which per the
PKCS#11 specification lets the library assume the application serializes its calls. So every
PKCS#11 call made by this module, for every signer in the process, runs under one lock. A
PKCS#11 login belongs to the whole process (all sessions on a token share it, and logging out of
one logs out all), so open at most one :class:`Pkcs11Signer` per token per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.types import SignMixin

from attestations.canonical import compute_key_id
from attestations.errors import (
    BadSignature,
    ConfigurationError,
    DecodeError,
    InvariantViolation,
    SigningKeyNotFound,
    TokenNotFound,
    TokenUnavailable,
    WrongPin,
)
from attestations.p256 import (
    ALGORITHM,
    DIGEST_SIZE,
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    verify_p256_digest,
    verify_p256_public_key,
)

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as p11_lib
    from pkcs11.types import Object, PrivateKey, Session, Token

__all__ = [
    "DEFAULT_LIBRARY_PATH",
    "P256_EC_PARAMS",
    "Pkcs11Signer",
    "generate_p256_key",
    "reinitialize_library",
]

_log = logging.getLogger(__name__)

DEFAULT_LIBRARY_PATH: Final = "/usr/lib/softhsm/libsofthsm2.so"
"""SoftHSM2 as installed by Debian's ``softhsm2`` package."""

P256_EC_PARAMS: Final = bytes.fromhex("06082a8648ce3d030107")
"""``CKA_EC_PARAMS`` of P-256: the DER-encoded OID 1.2.840.10045.3.1.7 (prime256v1)."""

# A fixed digest signed once when a key is created or opened, to prove that the private and the
# public key found under one label belong together before anything real is signed.
_SELF_TEST_DIGEST: Final = hashlib.sha256(b"mcb/hsm-self-test/v1\x00").digest()

_OCTET_STRING_TAG: Final = 0x04

# One lock for every PKCS#11 call in the process (see the module docstring for why).
_PKCS11_LOCK: Final = threading.Lock()
_libraries: dict[str, p11_lib] = {}
_open_signers: weakref.WeakSet[Pkcs11Signer] = weakref.WeakSet()

_PIN_REJECTED: Final = (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange)
_PIN_UNUSABLE: Final = (p11.PinLocked, p11.PinExpired, p11.UserPinNotInitialized)
_TOKEN_GONE: Final = (p11.TokenNotPresent, p11.TokenNotRecognised, p11.SlotIDInvalid)
# Errors from key generation that retrying cannot fix: the token does not support what we ask.
_GENERATION_REFUSED: Final = (
    p11.MechanismInvalid,
    p11.MechanismParamInvalid,
    p11.DomainParamsInvalid,
    p11.TemplateInconsistent,
    p11.TemplateIncomplete,
    p11.AttributeTypeInvalid,
    p11.AttributeValueInvalid,
    p11.AttributeReadOnly,
    p11.TokenWriteProtected,
    p11.FunctionNotSupported,
    p11.SessionReadOnly,
)
# A key attribute the token will not report: it does not know the attribute or hides it. Asking
# again cannot change that, so it is a configuration problem, not a retriable one.
_ATTRIBUTE_UNREPORTED: Final = (p11.AttributeTypeInvalid, p11.AttributeSensitive)


# --- helpers (all called with _PKCS11_LOCK held) ------------------------------------------------


def _require_text(value: object, *, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name} must be a non-empty string")
    return value


def _load_library(library_path: str) -> p11_lib:
    library = _libraries.get(library_path)
    if library is not None:
        return library
    try:
        library = pkcs11.lib(library_path)
    except p11.PKCS11Error as exc:
        raise TokenNotFound(
            f"cannot load the PKCS#11 library {library_path!r} ({type(exc).__name__}: {exc}); "
            "for SoftHSM2 install it with `apt-get install -y softhsm2` and check SOFTHSM2_CONF"
        ) from exc
    _libraries[library_path] = library
    return library


def _find_token(library: p11_lib, *, library_path: str, token_label: str) -> Token:
    try:
        return library.get_token(token_label=token_label)
    except p11.NoSuchToken as exc:
        raise TokenNotFound(
            f"no PKCS#11 token labelled {token_label!r} in {library_path!r} (a SoftHSM2 token "
            "created after this process first loaded the library needs reinitialize_library "
            "or a restart)"
        ) from exc
    except p11.MultipleTokensReturned as exc:
        raise ConfigurationError(
            f"more than one PKCS#11 token is labelled {token_label!r}; labels must be unique"
        ) from exc
    except p11.PKCS11Error as exc:
        raise TokenUnavailable(
            f"listing PKCS#11 tokens failed ({type(exc).__name__}: {exc})"
        ) from exc


def _open_session(token: Token, *, token_label: str, pin: str, rw: bool) -> Session:
    try:
        return token.open(rw=rw, user_pin=pin)
    except _PIN_REJECTED as exc:
        raise WrongPin(f"token {token_label!r} rejected the user PIN") from exc
    except _PIN_UNUSABLE as exc:
        raise ConfigurationError(
            f"the user PIN of token {token_label!r} cannot be used ({type(exc).__name__}); "
            "the security officer must set or unlock it"
        ) from exc
    except p11.UserAlreadyLoggedIn as exc:
        raise ConfigurationError(
            f"this process is already logged in to token {token_label!r}; open at most one "
            "Pkcs11Signer per token per process and close it before generating keys"
        ) from exc
    except _TOKEN_GONE as exc:
        raise TokenNotFound(f"token {token_label!r} is no longer present") from exc
    except p11.PKCS11Error as exc:
        raise TokenUnavailable(
            f"opening a session on token {token_label!r} failed ({type(exc).__name__}: {exc})"
        ) from exc


def _close_quietly(session: Session, *, token_label: str) -> None:
    try:
        session.close()
    except p11.PKCS11Error as exc:
        # Closing is best effort: the session is gone either way, and raising here would mask
        # the error that made us close it.
        _log.warning(
            "closing the PKCS#11 session on token %r failed: %s: %s",
            token_label,
            type(exc).__name__,
            exc,
        )


def _find_one(session: Session, *, object_class: ObjectClass, key_label: str) -> Object:
    # Read the search to the end, so that C_FindObjectsFinal runs before the next call on the
    # shared session (an abandoned search would leave an operation active on it).
    found = list(session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: key_label}))
    if not found:
        kind = "private" if object_class is ObjectClass.PRIVATE_KEY else "public"
        raise SigningKeyNotFound(f"no {kind} key labelled {key_label!r} on the token")
    if len(found) > 1:
        raise ConfigurationError(f"more than one {object_class.name} is labelled {key_label!r}")
    return found[0]


def _decode_ec_point(value: object, *, key_label: str) -> bytes:
    """``CKA_EC_POINT`` is a DER OCTET STRING around the SEC1 point (PKCS#11 v2.40, 2.3.3);
    some tokens return the bare point, which the length tells apart."""
    if not isinstance(value, bytes):
        raise ConfigurationError(f"CKA_EC_POINT of key {key_label!r} is not a byte string")
    if (
        len(value) == PUBLIC_KEY_SIZE + 2
        and value[0] == _OCTET_STRING_TAG
        and value[1] == PUBLIC_KEY_SIZE
    ):
        point = value[2:]
    elif len(value) == PUBLIC_KEY_SIZE:
        point = value
    else:
        raise ConfigurationError(
            f"CKA_EC_POINT of key {key_label!r} has {len(value)} bytes; expected a P-256 point"
        )
    try:
        verify_p256_public_key(point)
    except DecodeError as exc:
        raise ConfigurationError(f"public key {key_label!r} on the token is invalid") from exc
    return point


def _read_attributes(
    obj: Object, attributes: list[Attribute], *, what: str
) -> dict[Attribute, Any]:
    """The values of ``attributes`` of ``obj``, every one of them reported by the token.

    python-pkcs11 raises AttributeTypeInvalid (or AttributeSensitive) only when the token reports
    none of the attributes asked for, and otherwise leaves the unreported ones out of the dict.
    Both become :class:`ConfigurationError`: a key whose properties cannot be read cannot be
    shown to stay inside the token."""
    try:
        values = obj.get_attributes(attributes)
    except _ATTRIBUTE_UNREPORTED as exc:
        names = ", ".join(attribute.name for attribute in attributes)
        raise ConfigurationError(
            f"the token does not report {names} of {what} ({type(exc).__name__})"
        ) from exc
    if missing := [attribute.name for attribute in attributes if attribute not in values]:
        raise ConfigurationError(f"the token does not report {', '.join(missing)} of {what}")
    return values


def _load_key_pair(session: Session, *, key_label: str) -> tuple[SignMixin, bytes]:
    """Find the key pair, check it is a P-256 signing key that was generated on the token and
    never left it, and return the private key object and the 65-byte public key."""
    private = _find_one(session, object_class=ObjectClass.PRIVATE_KEY, key_label=key_label)
    public = _find_one(session, object_class=ObjectClass.PUBLIC_KEY, key_label=key_label)
    attrs = _read_attributes(
        private,
        [
            Attribute.KEY_TYPE,
            Attribute.EC_PARAMS,
            Attribute.SIGN,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.LOCAL,
            Attribute.ALWAYS_AUTHENTICATE,
        ],
        what=f"private key {key_label!r}",
    )
    if attrs[Attribute.KEY_TYPE] != KeyType.EC or attrs[Attribute.EC_PARAMS] != P256_EC_PARAMS:
        raise ConfigurationError(f"key {key_label!r} is not an EC P-256 key")
    if attrs[Attribute.SIGN] is not True or not isinstance(private, SignMixin):
        raise ConfigurationError(f"key {key_label!r} is not allowed to sign (CKA_SIGN)")
    if attrs[Attribute.SENSITIVE] is not True or attrs[Attribute.EXTRACTABLE] is not False:
        raise ConfigurationError(
            f"key {key_label!r} can leave the token (CKA_SENSITIVE must be true and "
            "CKA_EXTRACTABLE false); refusing to sign with it"
        )
    # Locked now is not enough: a key that was once extractable or not sensitive, or that was
    # imported (or unwrapped) rather than generated on the token, may have a copy outside it.
    # The token sets these three itself and never turns them back to true.
    history = (Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL)
    if wrong := [attribute.name for attribute in history if attrs[attribute] is not True]:
        raise ConfigurationError(
            f"key {key_label!r} may exist outside the token: CKA_{', CKA_'.join(wrong)} "
            "false (it was extractable or not sensitive at some time, or was imported rather "
            "than generated on the token); refusing to sign with it"
        )
    if attrs[Attribute.ALWAYS_AUTHENTICATE] is not False:
        raise ConfigurationError(
            f"key {key_label!r} needs a PIN for every signature (CKA_ALWAYS_AUTHENTICATE), "
            "which this signer does not support"
        )
    public_attrs = _read_attributes(
        public, [Attribute.EC_PARAMS, Attribute.EC_POINT], what=f"public key {key_label!r}"
    )
    if public_attrs[Attribute.EC_PARAMS] != P256_EC_PARAMS:
        raise ConfigurationError(f"public key {key_label!r} is not a P-256 key")
    point = _decode_ec_point(public_attrs[Attribute.EC_POINT], key_label=key_label)
    return private, point


def _sign_raw(private: SignMixin, digest: bytes) -> bytes:
    # CKM_ECDSA signs the given bytes as the hash value (no hashing on the token) and returns
    # r || s, each as long as the group order: 64 bytes for P-256.
    signature: bytes = private.sign(digest, mechanism=Mechanism.ECDSA)
    return signature


def _check_signature(*, public_key: bytes, digest: bytes, signature: bytes) -> bool:
    try:
        verify_p256_digest(public_key=public_key, digest=digest, signature=signature)
    except (BadSignature, DecodeError):
        return False
    return True


def _self_test(private: SignMixin, public_key: bytes, *, key_label: str) -> None:
    try:
        signature = _sign_raw(private, _SELF_TEST_DIGEST)
    except p11.PKCS11Error as exc:
        raise TokenUnavailable(
            f"test signature with key {key_label!r} failed ({type(exc).__name__}: {exc})"
        ) from exc
    if not _check_signature(public_key=public_key, digest=_SELF_TEST_DIGEST, signature=signature):
        raise ConfigurationError(
            f"the private and public key labelled {key_label!r} do not form a pair: a test "
            "signature does not verify"
        )


def _destroy_quietly(objects: tuple[Object, ...], *, key_label: str) -> None:
    for obj in objects:
        try:
            obj.destroy()
        except p11.PKCS11Error as exc:
            _log.error(
                "could not remove the rejected key %r from the token (%s); remove it by hand",
                key_label,
                type(exc).__name__,
            )


# --- key generation -----------------------------------------------------------------------------


def generate_p256_key(
    *,
    library_path: str = DEFAULT_LIBRARY_PATH,
    token_label: str,
    pin: str,
    key_label: str,
) -> bytes:
    """Create a P-256 signing key pair on the token and return its 65-byte public key.

    The private key is created with ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE`` and
    ``CKA_SIGN`` true, ``CKA_EXTRACTABLE``, ``CKA_DECRYPT``, ``CKA_DERIVE`` and ``CKA_UNWRAP``
    false. Refuses (:class:`ConfigurationError`) when any object on the token already has
    ``key_label``. If the token does not report the key as always sensitive, never extractable
    and generated on the token, or a test signature does not verify, the new pair is destroyed
    and :class:`InvariantViolation` is raised.

    Must not run while a :class:`Pkcs11Signer` of this process is open on the same token.
    """
    _require_text(library_path, name="library_path")
    _require_text(token_label, name="token_label")
    _require_text(pin, name="pin")
    _require_text(key_label, name="key_label")
    with _PKCS11_LOCK:
        library = _load_library(library_path)
        token = _find_token(library, library_path=library_path, token_label=token_label)
        session = _open_session(token, token_label=token_label, pin=pin, rw=True)
        try:
            return _generate_in_session(session, token_label=token_label, key_label=key_label)
        finally:
            _close_quietly(session, token_label=token_label)


def _generate_in_session(session: Session, *, token_label: str, key_label: str) -> bytes:
    try:
        clashes = list(session.get_objects({Attribute.LABEL: key_label}))
    except p11.PKCS11Error as exc:
        raise TokenUnavailable(f"searching token {token_label!r} failed: {exc}") from exc
    if clashes:
        raise ConfigurationError(
            f"token {token_label!r} already holds an object labelled {key_label!r}; refusing "
            "to create a second key with that label"
        )
    private_template: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.DERIVE: False,
        Attribute.UNWRAP: False,
    }
    public_template: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.EC_PARAMS: P256_EC_PARAMS,
    }
    try:
        public, private = session.generate_keypair(
            KeyType.EC,
            label=key_label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            public_template=public_template,
            private_template=private_template,
        )
    except _GENERATION_REFUSED as exc:
        raise ConfigurationError(
            f"token {token_label!r} refused to create a P-256 key ({type(exc).__name__}: {exc})"
        ) from exc
    except p11.PKCS11Error as exc:
        raise TokenUnavailable(
            f"creating a key on token {token_label!r} failed ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        _check_generated(private, key_label=key_label)
        signer, public_key = _load_key_pair(session, key_label=key_label)
        _self_test(signer, public_key, key_label=key_label)
    except (ConfigurationError, SigningKeyNotFound, TokenUnavailable) as exc:
        _destroy_quietly((private, public), key_label=key_label)
        raise InvariantViolation(
            f"the key just created on token {token_label!r} as {key_label!r} is not what was "
            "requested; it was removed"
        ) from exc
    except p11.PKCS11Error as exc:
        _destroy_quietly((private, public), key_label=key_label)
        raise TokenUnavailable(
            f"checking the new key {key_label!r} failed ({type(exc).__name__}: {exc}); "
            "it was removed"
        ) from exc
    except BaseException:
        _destroy_quietly((private, public), key_label=key_label)
        raise
    _log.info(
        "created P-256 key %r on token %r, key id %s",
        key_label,
        token_label,
        compute_key_id(algorithm=ALGORITHM, public_key=public_key),
    )
    return public_key


def _check_generated(private: PrivateKey, *, key_label: str) -> None:
    expected = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.ALWAYS_SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.NEVER_EXTRACTABLE: True,
        Attribute.LOCAL: True,
        Attribute.SIGN: True,
    }
    actual = _read_attributes(private, list(expected), what=f"the new key {key_label!r}")
    wrong = sorted(attr.name for attr, value in expected.items() if actual.get(attr) is not value)
    if wrong:
        raise ConfigurationError(
            f"the token did not honour {', '.join(wrong)} for key {key_label!r}"
        )


def reinitialize_library(*, library_path: str = DEFAULT_LIBRARY_PATH) -> None:
    """Finalize and initialize the PKCS#11 library again in this process.

    SoftHSM2 reads its token directory only when the library is initialized, so a token created
    (for example with ``softhsm2-util --init-token``) after this process first loaded the library
    is invisible until this is called. It invalidates every session of the process, so it is
    refused (:class:`ConfigurationError`) while a :class:`Pkcs11Signer` on that library is open.
    """
    _require_text(library_path, name="library_path")
    with _PKCS11_LOCK:
        if any(signer.library_path == library_path for signer in _open_signers):
            raise ConfigurationError(
                f"cannot reinitialize {library_path!r} while a Pkcs11Signer on it is open"
            )
        library = _libraries.get(library_path)
        if library is None:
            _load_library(library_path)  # a first load reads the token directory anyway
            return
        try:
            library.reinitialize()
        except p11.PKCS11Error as exc:
            raise TokenUnavailable(
                f"reinitializing {library_path!r} failed ({type(exc).__name__}: {exc})"
            ) from exc


# --- the signer ---------------------------------------------------------------------------------


class Pkcs11Signer:
    """Signs 32-byte digests with a P-256 key held on a PKCS#11 token.

    Open it with :meth:`open`; use it from any number of threads (:meth:`sign_digest`) or
    asyncio tasks (:meth:`sign_digest_async`); close it with :meth:`close` or a ``with`` block.
    All calls share one logged-in session. If signing fails on the device, the call raises
    :class:`TokenUnavailable` and the session is dropped; the next call opens a fresh one and
    checks that the key under the label is still the same key.

    Implements :class:`attestations.p256.DigestSigner`.
    """

    def __init__(
        self,
        *,
        library_path: str,
        token_label: str,
        key_label: str,
        pin: str,
        session: Session,
        private_key: SignMixin,
        public_key: bytes,
    ) -> None:
        """Internal: use :meth:`open`, which finds and checks the key first."""
        self._library_path = library_path
        self._token_label = token_label
        self._key_label = key_label
        # Kept so that a lost session can be reopened; never logged or shown in repr.
        self._pin = pin
        self._session: Session | None = session
        self._private_key: SignMixin | None = private_key
        self._public_key = public_key
        self._key_id = compute_key_id(algorithm=ALGORITHM, public_key=public_key)
        self._closed = False
        # Async callers get their own worker thread, so that a burst of signatures waiting for
        # the session lock does not fill the event loop's default executor.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11-sign")

    @classmethod
    def open(
        cls,
        *,
        library_path: str = DEFAULT_LIBRARY_PATH,
        token_label: str,
        pin: str,
        key_label: str,
    ) -> Self:
        """Log in to the token labelled ``token_label`` and find the key pair ``key_label``.

        Raises :class:`TokenNotFound`, :class:`WrongPin`, :class:`SigningKeyNotFound`, or
        :class:`ConfigurationError` when the key is not a P-256 signing key that was generated
        on the token and never left it (``CKA_SENSITIVE``, ``CKA_ALWAYS_SENSITIVE``,
        ``CKA_NEVER_EXTRACTABLE`` and ``CKA_LOCAL`` true, ``CKA_EXTRACTABLE`` false), when the
        token does not report one of those attributes, or when its two halves do not match.
        """
        _require_text(library_path, name="library_path")
        _require_text(token_label, name="token_label")
        _require_text(pin, name="pin")
        _require_text(key_label, name="key_label")
        with _PKCS11_LOCK:
            library = _load_library(library_path)
            token = _find_token(library, library_path=library_path, token_label=token_label)
            session = _open_session(token, token_label=token_label, pin=pin, rw=False)
            try:
                private, public_key = _load_key_pair(session, key_label=key_label)
                _self_test(private, public_key, key_label=key_label)
            except p11.PKCS11Error as exc:
                _close_quietly(session, token_label=token_label)
                raise TokenUnavailable(
                    f"reading key {key_label!r} failed ({type(exc).__name__}: {exc})"
                ) from exc
            except BaseException:
                _close_quietly(session, token_label=token_label)
                raise
            signer = cls(
                library_path=library_path,
                token_label=token_label,
                key_label=key_label,
                pin=pin,
                session=session,
                private_key=private,
                public_key=public_key,
            )
            _open_signers.add(signer)
        _log.info(
            "opened PKCS#11 signer: token %r, key %r, key id %s",
            token_label,
            key_label,
            signer.key_id,
        )
        return signer

    @property
    def algorithm(self) -> str:
        return ALGORITHM

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def library_path(self) -> str:
        return self._library_path

    @property
    def token_label(self) -> str:
        return self._token_label

    @property
    def key_label(self) -> str:
        return self._key_label

    @property
    def closed(self) -> bool:
        return self._closed

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest with ``CKM_ECDSA``; return the 64-byte ``r || s`` signature.

        Thread-safe. Raises :class:`DecodeError` for a digest that is not 32 bytes,
        :class:`TokenUnavailable` when the device fails (retriable), and
        :class:`InvariantViolation` when the device returns a signature that does not verify.
        """
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise DecodeError(f"the digest to sign must be {DIGEST_SIZE} bytes")
        with _PKCS11_LOCK:
            private = self._ensure_session()
            try:
                signature = _sign_raw(private, digest)
            except p11.PKCS11Error as exc:
                # Whatever went wrong, the next call starts from a fresh session rather than
                # trusting one that just failed.
                self._drop_session()
                raise TokenUnavailable(
                    f"signing with key {self._key_label!r} on token {self._token_label!r} "
                    f"failed ({type(exc).__name__}: {exc})"
                ) from exc
        # Checked outside the lock: verification needs no token, so threads overlap here.
        if len(signature) != SIGNATURE_SIZE or not _check_signature(
            public_key=self._public_key, digest=digest, signature=signature
        ):
            raise InvariantViolation(
                f"token {self._token_label!r} returned a signature that does not verify with "
                f"key {self._key_id}; it was not used"
            )
        return signature

    async def sign_digest_async(self, digest: bytes) -> bytes:
        """:meth:`sign_digest` in this signer's worker thread; the event loop keeps running."""
        if self._closed:
            raise InvariantViolation(f"the signer for key {self._key_id} is closed")
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self.sign_digest, digest)
        except RuntimeError as exc:  # executor shut down by a concurrent close()
            raise InvariantViolation(f"the signer for key {self._key_id} is closed") from exc
        return await future

    def close(self) -> None:
        """Log out and close the session. Idempotent; signing afterwards raises
        :class:`InvariantViolation`."""
        with _PKCS11_LOCK:
            if self._closed:
                return
            self._closed = True
            _open_signers.discard(self)
            self._drop_session()
        self._executor.shutdown(wait=False)

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
        state = "closed" if self._closed else "open"
        return (
            f"Pkcs11Signer(token_label={self._token_label!r}, key_label={self._key_label!r}, "
            f"key_id={self._key_id!r}, {state})"
        )

    # -- session handling (called with _PKCS11_LOCK held) --

    def _drop_session(self) -> None:
        session, self._session, self._private_key = self._session, None, None
        if session is not None:
            _close_quietly(session, token_label=self._token_label)

    def _ensure_session(self) -> SignMixin:
        if self._closed:
            raise InvariantViolation(f"the signer for key {self._key_id} is closed")
        if self._private_key is not None:
            return self._private_key
        library = _load_library(self._library_path)
        token = _find_token(library, library_path=self._library_path, token_label=self._token_label)
        session = _open_session(token, token_label=self._token_label, pin=self._pin, rw=False)
        try:
            private, public_key = _load_key_pair(session, key_label=self._key_label)
        except p11.PKCS11Error as exc:
            _close_quietly(session, token_label=self._token_label)
            raise TokenUnavailable(
                f"reading key {self._key_label!r} failed ({type(exc).__name__}: {exc})"
            ) from exc
        except BaseException:
            _close_quietly(session, token_label=self._token_label)
            raise
        if public_key != self._public_key:
            _close_quietly(session, token_label=self._token_label)
            raise InvariantViolation(
                f"the key labelled {self._key_label!r} on token {self._token_label!r} is no "
                f"longer key {self._key_id}; refusing to sign with a different key"
            )
        _log.info("reopened the PKCS#11 session on token %r", self._token_label)
        self._session, self._private_key = session, private
        return private
