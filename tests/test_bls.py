"""Tests for attestations.bls: the quorum's BLS signatures on both backends.

py_ecc is the reference but slow (one pairing check is about 0.3 s), so it gets a few cases
per property and milagro carries the bulk. Every input is deterministic (fixed ikm seeds and
messages). Tests that need milagro fail when CI=true and skip elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace
from typing import Any, TypeVar

import pytest
from eth_typing import BLSPubkey, BLSSignature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from py_ecc.bls.ciphersuites import G2ProofOfPossession as Reference
from py_ecc.bls.g2_primitives import (
    G1_to_pubkey,
    G2_to_signature,
    pubkey_to_G1,
    signature_to_G2,
    subgroup_check,
)
from py_ecc.bls.hash_to_curve import hash_to_G2
from py_ecc.bls.point_compression import modular_squareroot_in_FQ2
from py_ecc.fields import optimized_bls12_381_FQ as FQ
from py_ecc.fields import optimized_bls12_381_FQ2 as FQ2
from py_ecc.optimized_bls12_381.optimized_curve import (
    add,
    b,
    b2,
    curve_order,
    field_modulus,
    is_on_curve,
    multiply,
    neg,
)

from attestations import bls
from attestations.errors import (
    BadSignature,
    ConfigurationError,
    CounterpartyError,
    DecodeError,
    InvalidProofOfPossession,
    InvariantViolation,
    MissingQuorum,
)

T = TypeVar("T")

BACKENDS = ("py_ecc", "milagro")

INFINITY_PUBLIC_KEY = b"\xc0" + bytes(47)
INFINITY_SIGNATURE = b"\xc0" + bytes(95)
DIGEST = hashlib.sha256(b"statement digest used by the tests").digest()
OTHER_DIGEST = hashlib.sha256(b"another statement").digest()

# Published vectors of the Ethereum consensus BLS test suite (ethereum/bls12-381-tests), which
# uses this ciphersuite: secret key, public key, and signatures over 32 zero bytes.
KAT_SECRET_KEYS = (
    0x263DBD792F5B1BE47ED85F8938C0F29586AF0D3AC7B977F21C278FE1462040E3,
    0x47B8192D77BF871B62E87859D653922725724A5C031AFEABC60BCEF5FF665138,
    0x328388AFF0D4A5B7DC9205ABD374E7E98F3CD9F3418EDB4EAFDA5FB16473D216,
)
KAT_PUBLIC_KEYS = tuple(
    bytes.fromhex(h)
    for h in (
        "a491d1b0ecd9bb917989f0e74f0dea0422eac4a873e5e2644f368dffb9a6e20f"
        "d6e10c1b77654d067c0618f6e5a7f79a",
        "b301803f8b5ac4a1133581fc676dfedc60d891dd5fa99028805e5ea5b08d3491"
        "af75d0707adab3b70c6a6a580217bf81",
        "b53d21a4cfd562c469cc81514d4ce5a6b577d8403d32a394dc265dd190b47fa9"
        "f829fdd7963afdf972e5e77854051f6f",
    )
)
KAT_MESSAGE = bytes(32)
KAT_SIGNATURES = tuple(
    bytes.fromhex(h)
    for h in (
        "b6ed936746e01f8ecf281f020953fbf1f01debd5657c4a383940b020b26507f6"
        "076334f91e2366c96e9ab279fb5158090352ea1c5b0c9274504f4f0e7053af24"
        "802e51e4568d164fe986834f41e55c8e850ce1f98458c0cfc9ab380b55285a55",
        "b23c46be3a001c63ca711f87a005c200cc550b9429d5f4eb38d74322144f1b63"
        "926da3388979e5321012fb1a0526bcd100b5ef5fe72628ce4cd5e904aeaa3279"
        "527843fae5ca9ca675f4f51ed8f83bbf7155da9ecc9663100a885d5dc6df96d9",
        "948a7cb99f76d616c2c564ce9bf4a519f1bea6b0a624a02276443c245854219f"
        "abb8d4ce061d255af5330b078d5380681751aa7053da2c98bae898edc218c75f"
        "07e24d8802a17cd1f6833b71e58f5eb5b94208b4d0bb3848cecb075ea21be115",
    )
)
KAT_AGGREGATE = bytes.fromhex(
    "9683b3e6701f9a4b706709577963110043af78a5b41991b998475a3d3fd62abf"
    "35ce03b33908418efc95a058494a8ae504354b9f626231f6b3f3c849dfdeaf50"
    "17c4780e2aee1850ceaf4b4d9ce70971a3d2cfcd97b7e5ecf6759f8da5f76d31"
)


# --- helpers ------------------------------------------------------------------------------------


def require_milagro() -> None:
    if "milagro" in bls.available_backends():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("milagro-bls-binding is not importable; CI must run the milagro tests")
    pytest.skip("milagro-bls-binding is not installed")


def raw_milagro() -> ModuleType:
    require_milagro()
    return importlib.import_module("milagro_bls_binding")


def use(name: str) -> None:
    if name == "milagro":
        require_milagro()
    bls.select_backend(name)  # type: ignore[arg-type]


def on(name: str, fn: Callable[[], T]) -> T:
    use(name)
    return fn()


def ikm(seed: int) -> bytes:
    return hashlib.sha256(b"bls test ikm %d" % seed).digest()


def secret(seed: int) -> int:
    return bls.generate_secret_key(ikm(seed))


def public(seed: int) -> bytes:
    # Reference computation, independent of the selected backend (~7 ms).
    return bytes(Reference.SkToPk(secret(seed)))


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def g1(public_key: bytes) -> Any:
    return pubkey_to_G1(BLSPubkey(public_key))


def g2(signature: bytes) -> Any:
    return signature_to_G2(BLSSignature(signature))


def negate_signature(signature: bytes) -> bytes:
    return bytes(G2_to_signature(neg(g2(signature))))


def negate_public_key(public_key: bytes) -> bytes:
    return bytes(G1_to_pubkey(neg(g1(public_key))))


def g2_point_outside_subgroup() -> bytes:
    """A point of the twisted curve E'(Fp2) that is not in G2 (the cofactor is huge)."""
    for i in range(1, 100):
        x = FQ2([i, 1])
        y = modular_squareroot_in_FQ2(x**3 + b2)
        if y is not None:
            point = (x, y, FQ2([1, 0]))
            assert is_on_curve(point, b2)
            assert not subgroup_check(point)
            return bytes(G2_to_signature(point))
    raise AssertionError("no point found")


def g2_x_off_curve() -> bytes:
    """Canonical-looking bytes whose x has no y on the curve."""
    for i in range(1, 100):
        if modular_squareroot_in_FQ2(FQ2([i, 2]) ** 3 + b2) is None:
            return ((1 << 383) | 2).to_bytes(48, "big") + i.to_bytes(48, "big")
    raise AssertionError("no x found")


def g1_point_outside_subgroup() -> bytes:
    for i in range(1, 100):
        rhs = (FQ(i) ** 3 + b).n
        y = pow(rhs, (field_modulus + 1) // 4, field_modulus)
        if y * y % field_modulus == rhs:
            point = (FQ(i), FQ(y), FQ(1))
            assert not subgroup_check(point)
            return bytes(G1_to_pubkey(point))
    raise AssertionError("no point found")


def outcome(fn: Callable[[], object]) -> str:
    """Accept/reject decision as a comparable value: "ok" or the error class name."""
    try:
        fn()
    except CounterpartyError as exc:
        return type(exc).__name__
    return "ok"


@pytest.fixture(autouse=True)
def _restore_backend() -> Iterator[None]:
    yield
    bls.select_backend("auto")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    use(name)
    return name


@pytest.fixture
def milagro() -> None:
    use("milagro")


# --- backend selection --------------------------------------------------------------------------


def test_auto_prefers_milagro_when_importable() -> None:
    assert bls.select_backend("auto") == bls.backend_name()
    expected = "milagro" if "milagro" in bls.available_backends() else "py_ecc"
    assert bls.backend_name() == expected


def test_explicit_selection_and_unknown_name() -> None:
    assert bls.select_backend("py_ecc") == "py_ecc"
    assert bls.backend_name() == "py_ecc"
    with pytest.raises(ConfigurationError):
        bls.select_backend("openssl")  # type: ignore[arg-type]
    assert bls.backend_name() == "py_ecc"  # a failed selection changes nothing


def test_milagro_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bls, "_MILAGRO_MODULE", None)
    with pytest.raises(ConfigurationError):
        bls.select_backend("milagro")
    assert bls.select_backend("auto") == "py_ecc"
    assert bls.available_backends() == ("py_ecc",)


def test_incompatible_accelerator_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(
        SkToPk=lambda sk: KAT_PUBLIC_KEYS[0],
        Sign=lambda sk, message: KAT_SIGNATURES[1],  # the wrong signature
        Verify=lambda pk, message, signature: True,
    )
    monkeypatch.setattr(bls, "_MILAGRO_MODULE", fake)
    with pytest.raises(ConfigurationError):
        bls.select_backend("auto")

    def crash(secret_key: bytes) -> bytes:
        raise RuntimeError("native library crashed")

    crashing = SimpleNamespace(SkToPk=crash)
    monkeypatch.setattr(bls, "_MILAGRO_MODULE", crashing)
    with pytest.raises(ConfigurationError):
        bls.select_backend("milagro")


# --- keys ---------------------------------------------------------------------------------------


def test_generate_secret_key_is_keygen() -> None:
    assert bls.generate_secret_key(ikm(1)) == Reference.KeyGen(ikm(1))
    assert bls.generate_secret_key(ikm(1)) == bls.generate_secret_key(ikm(1))
    assert bls.generate_secret_key(ikm(1)) != bls.generate_secret_key(ikm(2))
    assert 0 < bls.generate_secret_key(bytes(32)) < curve_order


@pytest.mark.parametrize("bad", [bytes(31), b"", bytearray(32), "x" * 32, None])
def test_generate_secret_key_rejects_short_or_untyped_ikm(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        bls.generate_secret_key(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, curve_order, curve_order + 1, True, 1.0, "1", b"\x01"])
def test_invalid_secret_keys_are_refused(backend: str, bad: object) -> None:
    with pytest.raises(ConfigurationError):
        bls.compute_public_key(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        bls.sign(secret_key=bad, message=DIGEST)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        bls.prove_possession(bad)  # type: ignore[arg-type]


# --- known answers, round trips, agreement between backends -------------------------------------


def test_known_answer_vectors(backend: str) -> None:
    for sk, pk, sig in zip(KAT_SECRET_KEYS, KAT_PUBLIC_KEYS, KAT_SIGNATURES, strict=True):
        assert bls.compute_public_key(sk) == pk
        assert bls.sign(secret_key=sk, message=KAT_MESSAGE) == sig
    assert bls.aggregate_signatures(KAT_SIGNATURES) == KAT_AGGREGATE
    bls.verify_aggregate(public_keys=KAT_PUBLIC_KEYS, message=KAT_MESSAGE, signature=KAT_AGGREGATE)


def test_round_trip(backend: str) -> None:
    sks = [secret(i) for i in (1, 2, 3)]
    pks = [bls.compute_public_key(sk) for sk in sks]
    sigs = [bls.sign(secret_key=sk, message=DIGEST) for sk in sks]
    bls.verify_signature(public_key=pks[0], message=DIGEST, signature=sigs[0])
    aggregate = bls.aggregate_signatures(sigs)
    bls.verify_aggregate(public_keys=pks, message=DIGEST, signature=aggregate)
    # Order of the keys does not matter: the quorum is a set.
    bls.verify_aggregate(public_keys=pks[::-1], message=DIGEST, signature=aggregate)


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ((10, 11, 12), DIGEST),
        ((20, 21, 22), bytes(32)),
        ((30, 31, 32), b"\xff" * 32),
        ((40, 41, 42), b""),
    ],
    ids=["digest", "zeros", "ones", "empty"],
)
def test_backends_produce_identical_bytes(seeds: tuple[int, ...], message: bytes) -> None:
    require_milagro()
    sks = [secret(s) for s in seeds]

    def run() -> tuple[list[bytes], list[bytes], bytes]:
        pks = [bls.compute_public_key(sk) for sk in sks]
        sigs = [bls.sign(secret_key=sk, message=message) for sk in sks]
        return pks, sigs, bls.aggregate_signatures(sigs)

    by_py_ecc = on("py_ecc", run)
    by_milagro = on("milagro", run)
    assert by_py_ecc == by_milagro
    assert by_py_ecc[0] == [public(s) for s in seeds]


@pytest.mark.parametrize("seed", [1, 2])
def test_proof_of_possession_bytes_do_not_depend_on_backend(seed: int) -> None:
    require_milagro()
    sk = secret(seed)
    by_py_ecc = on("py_ecc", lambda: bls.prove_possession(sk))
    by_milagro = on("milagro", lambda: bls.prove_possession(sk))
    assert by_py_ecc == by_milagro == bytes(Reference.PopProve(sk))
    assert len(by_py_ecc) == bls.SIGNATURE_SIZE


def test_cross_verification() -> None:
    require_milagro()
    sks = [secret(i) for i in (5, 6, 7)]
    pks = [public(i) for i in (5, 6, 7)]

    sig_py = on("py_ecc", lambda: bls.sign(secret_key=sks[0], message=DIGEST))
    on("milagro", lambda: bls.verify_signature(public_key=pks[0], message=DIGEST, signature=sig_py))

    sigs_m = on("milagro", lambda: [bls.sign(secret_key=sk, message=DIGEST) for sk in sks])
    on(
        "py_ecc",
        lambda: bls.verify_signature(public_key=pks[1], message=DIGEST, signature=sigs_m[1]),
    )

    agg_py = on("py_ecc", lambda: bls.aggregate_signatures(sigs_m))
    on("milagro", lambda: bls.verify_aggregate(public_keys=pks, message=DIGEST, signature=agg_py))
    agg_m = on("milagro", lambda: bls.aggregate_signatures(sigs_m))
    on("py_ecc", lambda: bls.verify_aggregate(public_keys=pks, message=DIGEST, signature=agg_m))


def test_backends_make_identical_decisions_on_adversarial_signatures() -> None:
    require_milagro()
    sk, pk = secret(1), public(1)
    good = bls.sign(secret_key=sk, message=DIGEST)
    other_key_sig = bls.sign(secret_key=secret(2), message=DIGEST)
    corpus = {
        "valid": good,
        "negated": negate_signature(good),
        "signed by another key": other_key_sig,
        "outside subgroup": g2_point_outside_subgroup(),
        "off curve": g2_x_off_curve(),
        "infinity": INFINITY_SIGNATURE,
        "infinity with sign flag": b"\xe0" + bytes(95),
        "not compressed": bytes([good[0] & 0x7F]) + good[1:],
        "x = 0": b"\x80" + bytes(95),
        "x_im = p": ((1 << 383) | field_modulus).to_bytes(48, "big") + good[48:],
        "flag in second half": good[:48] + bytes([good[48] | 0x80]) + good[49:],
        # Not in G2 (ethereum/bls12-381-tests deserialization_fails_not_in_G2).
        "published not in G2": bytes.fromhex(
            "8123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        ),
    }

    def verdict(signature: bytes) -> str:
        return outcome(
            lambda: bls.verify_signature(public_key=pk, message=DIGEST, signature=signature)
        )

    decisions: dict[str, dict[str, str]] = {}
    for name in BACKENDS:
        use(name)
        decisions[name] = {label: verdict(sig) for label, sig in corpus.items()}
    assert decisions["py_ecc"] == decisions["milagro"]
    assert decisions["py_ecc"]["valid"] == "ok"
    assert [k for k, v in decisions["py_ecc"].items() if v == "ok"] == ["valid"]
    assert decisions["py_ecc"]["infinity"] == "BadSignature"
    assert decisions["py_ecc"]["x_im = p"] == "DecodeError"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    message=st.binary(max_size=64),
    other=st.binary(max_size=64),
)
def test_property_sign_verify_milagro(seed: int, message: bytes, other: bytes) -> None:
    use("milagro")
    sk = bls.generate_secret_key(seed.to_bytes(32, "big"))
    pk = bls.compute_public_key(sk)
    sig = bls.sign(secret_key=sk, message=message)
    bls.verify_signature(public_key=pk, message=message, signature=sig)
    if other != message:
        with pytest.raises(BadSignature):
            bls.verify_signature(public_key=pk, message=other, signature=sig)


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(min_size=96, max_size=96))
def test_property_random_bytes_never_verify(junk: bytes) -> None:
    use("milagro")
    with pytest.raises((DecodeError, BadSignature)):
        bls.verify_signature(public_key=KAT_PUBLIC_KEYS[0], message=KAT_MESSAGE, signature=junk)


# --- edge cases ---------------------------------------------------------------------------------


def test_infinity_public_key_rejected(backend: str) -> None:
    with pytest.raises(DecodeError):
        bls.verify_signature(
            public_key=INFINITY_PUBLIC_KEY, message=DIGEST, signature=INFINITY_SIGNATURE
        )
    with pytest.raises(DecodeError):
        bls.verify_aggregate(
            public_keys=[KAT_PUBLIC_KEYS[0], INFINITY_PUBLIC_KEY],
            message=KAT_MESSAGE,
            signature=KAT_SIGNATURES[0],
        )
    with pytest.raises(DecodeError):
        bls.verify_possession(public_key=INFINITY_PUBLIC_KEY, proof=INFINITY_SIGNATURE)


def test_infinity_signature_rejected(backend: str) -> None:
    with pytest.raises(BadSignature):
        bls.verify_signature(
            public_key=KAT_PUBLIC_KEYS[0], message=KAT_MESSAGE, signature=INFINITY_SIGNATURE
        )
    with pytest.raises(BadSignature):
        bls.verify_aggregate(
            public_keys=KAT_PUBLIC_KEYS, message=KAT_MESSAGE, signature=INFINITY_SIGNATURE
        )
    with pytest.raises(BadSignature):
        bls.aggregate_signatures([KAT_SIGNATURES[0], INFINITY_SIGNATURE])


def test_public_keys_failing_key_validate(backend: str) -> None:
    bad_keys = [
        g1_point_outside_subgroup(),
        b"\xe0" + bytes(47),  # infinity with the sign flag
        b"\xc0" + bytes(46) + b"\x01",  # infinity flag with coordinate bits
        bytes([KAT_PUBLIC_KEYS[0][0] & 0x7F]) + KAT_PUBLIC_KEYS[0][1:],  # not compressed
        ((1 << 383) | field_modulus).to_bytes(48, "big"),  # x = p
        b"\x80" + bytes(47),  # x = 0: order-3 point, or undecodable
    ]
    for key in bad_keys:
        with pytest.raises(DecodeError):
            bls.verify_aggregate(
                public_keys=[KAT_PUBLIC_KEYS[0], key],
                message=KAT_MESSAGE,
                signature=KAT_SIGNATURES[0],
            )


def test_empty_inputs_are_missing_quorum(backend: str) -> None:
    with pytest.raises(MissingQuorum):
        bls.aggregate_signatures([])
    with pytest.raises(MissingQuorum):
        bls.verify_aggregate(public_keys=[], message=KAT_MESSAGE, signature=KAT_AGGREGATE)
    with pytest.raises(MissingQuorum):
        bls.verify_aggregate(public_keys=(), message=KAT_MESSAGE, signature=KAT_AGGREGATE)


def test_wrong_message_and_wrong_key(backend: str) -> None:
    with pytest.raises(BadSignature):
        bls.verify_signature(
            public_key=KAT_PUBLIC_KEYS[0], message=DIGEST, signature=KAT_SIGNATURES[0]
        )
    with pytest.raises(BadSignature):
        bls.verify_aggregate(
            public_keys=KAT_PUBLIC_KEYS[:2], message=KAT_MESSAGE, signature=KAT_AGGREGATE
        )


def test_wrong_message_and_key_in_bulk(milagro: None) -> None:
    aggregate = KAT_AGGREGATE
    for message in (DIGEST, OTHER_DIGEST, KAT_MESSAGE + b"\x00", KAT_MESSAGE[:31], b""):
        with pytest.raises(BadSignature):
            bls.verify_aggregate(public_keys=KAT_PUBLIC_KEYS, message=message, signature=aggregate)
    # A signer swapped for an outsider, a signer missing, an extra signer.
    outsider = public(99)
    for keys in (
        [KAT_PUBLIC_KEYS[0], KAT_PUBLIC_KEYS[1], outsider],
        list(KAT_PUBLIC_KEYS[1:]),
        [*KAT_PUBLIC_KEYS, outsider],
    ):
        with pytest.raises(BadSignature):
            bls.verify_aggregate(public_keys=keys, message=KAT_MESSAGE, signature=aggregate)


def test_truncated_and_extended_bytes(backend: str) -> None:
    pk, sig = KAT_PUBLIC_KEYS[0], KAT_SIGNATURES[0]
    for bad_pk in (pk[:-1], pk + b"\x00", b"", pk + pk):
        with pytest.raises(DecodeError):
            bls.verify_signature(public_key=bad_pk, message=KAT_MESSAGE, signature=sig)
        with pytest.raises(DecodeError):
            bls.verify_aggregate(public_keys=[bad_pk], message=KAT_MESSAGE, signature=sig)
    for bad_sig in (sig[:-1], sig + b"\x00", b"", sig[:48]):
        with pytest.raises(DecodeError):
            bls.verify_signature(public_key=pk, message=KAT_MESSAGE, signature=bad_sig)
        with pytest.raises(DecodeError):
            bls.aggregate_signatures([sig, bad_sig])


def test_wrong_types_are_decode_errors(backend: str) -> None:
    pk, sig = KAT_PUBLIC_KEYS[0], KAT_SIGNATURES[0]
    verify_aggregate: Callable[..., object] = bls.verify_aggregate
    verify_signature: Callable[..., object] = bls.verify_signature
    aggregate: Callable[..., object] = bls.aggregate_signatures
    sign: Callable[..., object] = bls.sign
    cases: list[Callable[[], object]] = [
        # One key where a list belongs must not be read as 48 one-byte keys.
        lambda: verify_aggregate(public_keys=pk, message=KAT_MESSAGE, signature=sig),
        lambda: verify_aggregate(public_keys=[bytearray(pk)], message=KAT_MESSAGE, signature=sig),
        lambda: verify_aggregate(public_keys=[pk], message="0" * 32, signature=sig),
        lambda: verify_aggregate(public_keys=[pk], message=KAT_MESSAGE, signature=bytearray(sig)),
        lambda: verify_aggregate(public_keys=None, message=KAT_MESSAGE, signature=sig),
        lambda: verify_aggregate(public_keys={pk}, message=KAT_MESSAGE, signature=sig),
        lambda: verify_signature(public_key=pk.hex(), message=KAT_MESSAGE, signature=sig),
        lambda: verify_signature(public_key=memoryview(pk), message=KAT_MESSAGE, signature=sig),
        lambda: aggregate(sig),
        lambda: aggregate([sig.hex()]),
        lambda: sign(secret_key=KAT_SECRET_KEYS[0], message="text"),
    ]
    for case in cases:
        with pytest.raises(DecodeError):
            case()


def test_bit_flips_in_signature_key_and_message(milagro: None) -> None:
    pk, sig, msg = KAT_PUBLIC_KEYS[0], KAT_SIGNATURES[0], KAT_MESSAGE
    for bit in range(8 * bls.SIGNATURE_SIZE):
        with pytest.raises((DecodeError, BadSignature)):
            bls.verify_signature(public_key=pk, message=msg, signature=flip(sig, bit))
    # Each public-key flip costs a fresh KeyValidate on py_ecc (~7 ms): sample every 5th bit.
    for bit in [*range(0, 8 * bls.PUBLIC_KEY_SIZE, 5), 2]:  # bit 2 is the sign flag: -pk
        with pytest.raises((DecodeError, BadSignature)):
            bls.verify_signature(public_key=flip(pk, bit), message=msg, signature=sig)
    for bit in range(8 * len(msg)):
        with pytest.raises(BadSignature):
            bls.verify_signature(public_key=pk, message=flip(msg, bit), signature=sig)


@pytest.mark.parametrize("bit", [0, 2, 200, 767])
def test_bit_flips_on_reference_backend(bit: int) -> None:
    use("py_ecc")
    with pytest.raises((DecodeError, BadSignature)):
        bls.verify_signature(
            public_key=KAT_PUBLIC_KEYS[0],
            message=KAT_MESSAGE,
            signature=flip(KAT_SIGNATURES[0], bit),
        )


def test_duplicate_signer_rejected(backend: str) -> None:
    pk, sig = KAT_PUBLIC_KEYS[0], KAT_SIGNATURES[0]
    doubled = bytes(G2_to_signature(add(g2(sig), g2(sig))))
    # Without our check the library would accept this as "two signers" (shown on milagro).
    if "milagro" in bls.available_backends():
        assert raw_milagro().FastAggregateVerify([pk, pk], KAT_MESSAGE, doubled) is True
    with pytest.raises(DecodeError):
        bls.verify_aggregate(public_keys=[pk, pk], message=KAT_MESSAGE, signature=doubled)
    with pytest.raises(DecodeError):
        bls.verify_aggregate(
            public_keys=[pk, KAT_PUBLIC_KEYS[1], pk], message=KAT_MESSAGE, signature=doubled
        )
    with pytest.raises(DecodeError):
        bls.aggregate_signatures([sig, KAT_SIGNATURES[1], sig])


def test_key_and_its_negation_cancel_out(backend: str) -> None:
    pk = KAT_PUBLIC_KEYS[0]
    with pytest.raises(BadSignature):
        bls.verify_aggregate(
            public_keys=[pk, negate_public_key(pk)], message=KAT_MESSAGE, signature=KAT_AGGREGATE
        )


def test_aggregate_rejects_bad_inputs_and_cancelling_result(backend: str) -> None:
    sig = KAT_SIGNATURES[0]
    with pytest.raises(DecodeError):
        bls.aggregate_signatures([sig, g2_x_off_curve()])
    with pytest.raises(BadSignature):
        bls.aggregate_signatures([sig, negate_signature(sig)])
    with pytest.raises(DecodeError):
        bls.aggregate_signatures([sig, b"\x80" + bytes(95)])


def test_single_signature_aggregate_is_identity(backend: str) -> None:
    assert bls.aggregate_signatures([KAT_SIGNATURES[0]]) == KAT_SIGNATURES[0]


# --- proof of possession and the rogue-key attack -----------------------------------------------


def test_proof_of_possession_round_trip_and_rejections() -> None:
    use("py_ecc")
    sk, pk = secret(1), public(1)
    proof = bls.prove_possession(sk)
    bls.verify_possession(public_key=pk, proof=proof)

    other_proof = bls.prove_possession(secret(2))
    # A signature over the key's bytes under the signing tag is not a proof (domain separation).
    wrong_tag = bls.sign(secret_key=sk, message=pk)
    for bad in (other_proof, wrong_tag):
        with pytest.raises(InvalidProofOfPossession):
            bls.verify_possession(public_key=pk, proof=bad)
    for malformed in (INFINITY_SIGNATURE, proof[:-1], proof + b"\x00", b"\x80" + bytes(95)):
        with pytest.raises(InvalidProofOfPossession):
            bls.verify_possession(public_key=pk, proof=malformed)
    with pytest.raises(DecodeError):
        bls.verify_possession(public_key=g1_point_outside_subgroup(), proof=proof)


def test_rogue_key_attack() -> None:
    victim_sk, attacker_sk = secret(50), secret(51)
    victim_pk, attacker_pk = public(50), public(51)
    victim_proof = bytes(Reference.PopProve(victim_sk))  # public: published at registration

    # The attacker publishes pk_r = pk_attacker - pk_victim, computed from public keys only.
    rogue_pk = bytes(G1_to_pubkey(add(g1(attacker_pk), neg(g1(victim_pk)))))
    assert Reference.KeyValidate(BLSPubkey(rogue_pk))  # a perfectly valid-looking key

    # (a) Its lone signature passes FastAggregateVerify as a "quorum" of victim + rogue.
    attacker_sig = bytes(Reference.Sign(attacker_sk, DIGEST))
    rogue_quorum = [BLSPubkey(victim_pk), BLSPubkey(rogue_pk)]
    assert Reference.FastAggregateVerify(rogue_quorum, DIGEST, BLSSignature(attacker_sig)) is True
    if "milagro" in bls.available_backends():
        raw = raw_milagro()
        assert raw.FastAggregateVerify([victim_pk, rogue_pk], DIGEST, attacker_sig) is True
        use("milagro")
        # verify_aggregate cannot tell either: the defence is at key registration.
        bls.verify_aggregate(
            public_keys=[victim_pk, rogue_pk], message=DIGEST, signature=attacker_sig
        )

    # (b) Every proof the attacker can build without sk_r = sk_a - sk_v is refused.
    use("py_ecc")
    pop_point_rogue = hash_to_G2(rogue_pk, bls.POP_CIPHERSUITE_ID, hashlib.sha256)  # type: ignore[arg-type]
    own_key_on_rogue_point = multiply(pop_point_rogue, attacker_sk)
    attempts = {
        "attacker's own proof": bls.prove_possession(attacker_sk),
        "victim's published proof": victim_proof,
        "sk_a * H_pop(pk_r)": bytes(G2_to_signature(own_key_on_rogue_point)),
        "sk_a * H_pop(pk_r) - victim proof": bytes(
            G2_to_signature(add(own_key_on_rogue_point, neg(g2(victim_proof))))
        ),
        "attacker proof - victim proof": bytes(
            G2_to_signature(
                add(
                    g2(bytes(Reference.PopProve(attacker_sk))),
                    neg(g2(victim_proof)),
                )
            )
        ),
        "signature of pk_r under the signing tag": bls.sign(
            secret_key=attacker_sk, message=rogue_pk
        ),
    }

    def verdict(proof: bytes) -> str:
        return outcome(lambda: bls.verify_possession(public_key=rogue_pk, proof=proof))

    verdicts = {label: verdict(proof) for label, proof in attempts.items()}
    assert verdicts == dict.fromkeys(attempts, "InvalidProofOfPossession")

    # Control: with the secret the attacker does not have, the proof would verify, so the
    # rejections above are about knowledge of the key, not about the key being odd.
    rogue_sk = (attacker_sk - victim_sk) % curve_order
    assert bls.compute_public_key(rogue_sk) == rogue_pk
    bls.verify_possession(public_key=rogue_pk, proof=bls.prove_possession(rogue_sk))
    bls.verify_possession(public_key=victim_pk, proof=victim_proof)


# --- library failures never escape --------------------------------------------------------------


class _FaultyBackend:
    """Implements the backend interface with a chosen misbehaviour."""

    name = "faulty"

    def __init__(self, result: object = None, error: Exception | None = None) -> None:
        self._result = result
        self._error = error

    def _answer(self) -> object:
        if self._error is not None:
            raise self._error
        return self._result

    def secret_to_public(self, secret_key: int) -> object:
        return self._answer()

    def sign(self, secret_key: int, message: bytes) -> object:
        return self._answer()

    def aggregate(self, signatures: list[bytes]) -> object:
        return self._answer()

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> object:
        return self._answer()

    def fast_aggregate_verify(
        self, public_keys: list[bytes], message: bytes, signature: bytes
    ) -> object:
        return self._answer()


@pytest.mark.parametrize(
    "faulty",
    [
        _FaultyBackend(error=RuntimeError("library crashed")),
        _FaultyBackend(error=ValueError("InvalidPoint")),
        _FaultyBackend(result=1),  # truthy but not True
        _FaultyBackend(result="True"),
        _FaultyBackend(result=None),
    ],
)
def test_backend_failures_are_wrapped(monkeypatch: pytest.MonkeyPatch, faulty: object) -> None:
    monkeypatch.setattr(bls._SELECTION, "resolved", faulty)
    pk, sig = KAT_PUBLIC_KEYS[0], KAT_SIGNATURES[0]
    with pytest.raises(BadSignature):
        bls.verify_signature(public_key=pk, message=KAT_MESSAGE, signature=sig)
    with pytest.raises(BadSignature):
        bls.verify_aggregate(public_keys=[pk], message=KAT_MESSAGE, signature=sig)
    with pytest.raises((DecodeError, InvariantViolation)):
        bls.aggregate_signatures([sig])
    with pytest.raises(InvariantViolation):
        bls.sign(secret_key=KAT_SECRET_KEYS[0], message=KAT_MESSAGE)
    with pytest.raises(InvariantViolation):
        bls.compute_public_key(KAT_SECRET_KEYS[0])
