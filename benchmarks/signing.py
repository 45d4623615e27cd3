"""Benchmark of the signatures on a statement: the custodian's HSM key and the BLS co-signer quorum.

    .venv/bin/python benchmarks/signing.py [--seconds S] [--cosigners N] [--threshold K]

Creates its own SoftHSM2 token in a temporary directory, generates a non-extractable P-256 key
on it and measures, each for about S seconds (and at least a few calls):

* ``hsm_signs_per_s``          Pkcs11Signer.sign_digest from one thread. Each call includes the
                               signer's own P-256 check of the signature it got from the token.
* ``hsm_signs_per_s_4_threads`` the same from 4 threads through the signer's one shared session.
                               Every PKCS#11 call of the process runs under one lock (see
                               attestations/hsm.py), so only the check after signing overlaps.
* ``p256_verifies_per_s``      verify_p256_digest on signatures made by the token.
* ``bls_*_ms_py_ecc`` / ``bls_*_ms_milagro``  median milliseconds of one co-signer's Sign, of
                               Aggregate over K signatures and of FastAggregateVerify with K
                               keys (attestations.bls on each backend, selected with
                               select_backend). Key validation results are cached by
                               attestations.bls, as in a running verifier, so after the untimed
                               first call the verify figure is the pairing check.
* ``milagro_speedup_*``        py-ecc time / milagro time. py-ecc is the reference
                               implementation and the named peer.
* ``sign_statement_ms``        attestations.signing.sign_statement for a small statement (two
                               assets, five leaves): digest, HSM signature, its check, aggregation
                               of the K co-signatures. The co-signatures themselves are made
                               beforehand; co-signers are separate parties signing in parallel,
                               one ``bls_sign_ms`` each.
* ``verify_statement_ms``      attestations.verify.verify_statement on the wire bytes of that
                               statement, as the exchange of its stream does with no statement
                               accepted yet: decode, stream, key look-up, P-256, BLS quorum of
                               distinct co-signers, time and policy, chain (first statement),
                               and the trees rebuilt from the snapshot's leaf disclosure against
                               the signed roots (planned, not applied, so every call starts from
                               the same empty receiver). Measured with milagro when it is
                               installed and with py-ecc (``verify_statement_ms_py_ecc``).

Both backends must produce identical public keys, signatures and aggregates for the same inputs in
the same run; otherwise the benchmark fails. Human-readable lines first; the last line is one JSON
object. With the defaults the whole run takes about half a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attestations import bls
from attestations.amounts import Price
from attestations.canonical import truncate_to_millis
from attestations.disclosure import (
    DisclosedLeaf,
    LeafDisclosure,
    ReceiverTrees,
    build_trees,
    compute_asset_roots,
)
from attestations.errors import BridgeError
from attestations.hsm import Pkcs11Signer, generate_p256_key, reinitialize_library
from attestations.keys import KeyRecord, KeyRegistry, KeyRole
from attestations.p256 import verify_p256_digest
from attestations.signing import BlsCosigner, CoSignature, sign_statement
from attestations.statement import (
    GENESIS_PREVIOUS,
    PricePoint,
    SignedStatement,
    Statement,
    StatementKind,
)
from attestations.verify import verify_statement
from benchmarks.machine import fail, machine_info, package_version
from mcb.softhsm import DEFAULT_LIBRARY, find_softhsm, init_token, prepare_softhsm

CUSTODIAN = "custodian-bench"
EXCHANGE = "exchange-bench"
DECIMALS = {"BTC": 8, "USDC": 6}
TOKEN_LABEL = "mcb-bench"
KEY_LABEL = "attestation"
THREADS = 4
MIN_CALLS = 3
DIGESTS = [hashlib.sha256(b"mcb/bench/digest/%d" % i).digest() for i in range(64)]


@dataclass(frozen=True, slots=True)
class Measurement:
    """Calls made, their total wall time and each call's duration."""

    calls: int
    seconds: float
    samples_ms: tuple[float, ...]

    @property
    def per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def measure(function: Callable[[], object], *, seconds: float) -> Measurement:
    """Call ``function`` once untimed (warm-up), then repeatedly until ``seconds`` have passed
    and at least MIN_CALLS calls were made, timing each call."""
    function()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        before = time.perf_counter()
        function()
        after = time.perf_counter()
        samples.append((after - before) * 1000)
        if after - start >= seconds and len(samples) >= MIN_CALLS:
            break
    return Measurement(len(samples), time.perf_counter() - start, tuple(samples))


def softhsm_version() -> str | None:
    try:
        result = subprocess.run(
            ["softhsm2-util", "--version"], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def signing_machine_info() -> dict[str, Any]:
    return machine_info(
        py_ecc_version=package_version("py-ecc"),
        milagro_version=package_version("milagro-bls-binding"),
        cryptography_version=package_version("cryptography"),
        python_pkcs11_version=package_version("python-pkcs11"),
        softhsm_version=softhsm_version(),
    )


# --- HSM and P-256 ------------------------------------------------------------------------------


def open_hsm_signer(directory: Path) -> Pkcs11Signer:
    """A fresh SoftHSM2 token under ``directory`` with a P-256 key generated on it."""
    problem = find_softhsm(DEFAULT_LIBRARY)
    if problem is not None:
        fail(f"SoftHSM2 is needed for this benchmark: {problem}")
    pin = "1234"  # a throw-away token in a temporary directory
    try:
        softhsm = prepare_softhsm(directory)
        init_token(softhsm, label=TOKEN_LABEL, pin=pin, so_pin="123456")
        reinitialize_library(library_path=softhsm.library_path)
        generate_p256_key(
            library_path=softhsm.library_path, token_label=TOKEN_LABEL, pin=pin, key_label=KEY_LABEL
        )
        return Pkcs11Signer.open(
            library_path=softhsm.library_path, token_label=TOKEN_LABEL, pin=pin, key_label=KEY_LABEL
        )
    except BridgeError as exc:
        fail(f"could not set up the SoftHSM2 token: {type(exc).__name__}: {exc}")


def bench_hsm_one_thread(signer: Pkcs11Signer, *, seconds: float) -> Measurement:
    digests = itertools.cycle(DIGESTS)
    return measure(lambda: signer.sign_digest(next(digests)), seconds=seconds)


def bench_hsm_threads(signer: Pkcs11Signer, *, seconds: float, threads: int) -> tuple[int, float]:
    """(signatures made, wall seconds) with ``threads`` threads signing through one signer."""
    counts = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def work(index: int) -> None:
        barrier.wait()
        try:
            while time.perf_counter() < deadline[0]:
                signer.sign_digest(DIGESTS[(index + counts[index]) % len(DIGESTS)])
                counts[index] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    barrier.wait()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if errors:
        fail(f"signing from {threads} threads failed: {errors[0]!r}")
    return sum(counts), elapsed


def bench_p256_verify(signer: Pkcs11Signer, *, seconds: float) -> Measurement:
    signed = itertools.cycle([(digest, signer.sign_digest(digest)) for digest in DIGESTS[:8]])
    public_key = signer.public_key

    def verify() -> None:
        digest, signature = next(signed)
        verify_p256_digest(public_key=public_key, digest=digest, signature=signature)

    return measure(verify, seconds=seconds)


# --- BLS ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlsResult:
    backend: str
    public_keys: tuple[bytes, ...]
    signatures: tuple[bytes, ...]
    aggregate: bytes
    sign: Measurement
    aggregate_time: Measurement
    verify: Measurement


def bench_bls(
    backend: bls.BackendName, secret_keys: list[int], *, threshold: int, seconds: float
) -> BlsResult:
    """Sign, aggregate and verify on one backend; also return the bytes for the cross-check."""
    name = bls.select_backend(backend)
    if name != backend:
        fail(f"asked for BLS backend {backend}, got {name}")
    message = DIGESTS[0]
    public_keys = tuple(bls.compute_public_key(sk) for sk in secret_keys)
    signers = secret_keys[:threshold]
    signatures = tuple(bls.sign(secret_key=sk, message=message) for sk in signers)
    aggregate = bls.aggregate_signatures(signatures)
    quorum_keys = public_keys[:threshold]
    bls.verify_aggregate(public_keys=quorum_keys, message=message, signature=aggregate)

    rotation = itertools.cycle(signers)
    sign = measure(lambda: bls.sign(secret_key=next(rotation), message=message), seconds=seconds)
    aggregate_time = measure(lambda: bls.aggregate_signatures(signatures), seconds=seconds)
    verify = measure(
        lambda: bls.verify_aggregate(public_keys=quorum_keys, message=message, signature=aggregate),
        seconds=seconds,
    )
    return BlsResult(name, public_keys, signatures, aggregate, sign, aggregate_time, verify)


def check_identical(reference: BlsResult, other: BlsResult) -> None:
    for what, left, right in (
        ("public keys", reference.public_keys, other.public_keys),
        ("signatures", reference.signatures, other.signatures),
        ("aggregate", reference.aggregate, other.aggregate),
    ):
        if left != right:
            fail(f"BLS {what} differ between {reference.backend} and {other.backend}")


def print_bls(result: BlsResult, *, threshold: int) -> None:
    print(
        f"  BLS {result.backend:<8} sign {result.sign.median_ms:9.2f} ms   aggregate of "
        f"{threshold} {result.aggregate_time.median_ms:7.3f} ms   verify {threshold} signers "
        f"{result.verify.median_ms:9.2f} ms   (medians of {result.sign.calls}/"
        f"{result.aggregate_time.calls}/{result.verify.calls} calls)"
    )


# --- a small statement, end to end -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatementSetup:
    statement: Statement
    cosignatures: tuple[CoSignature, ...]
    registry: KeyRegistry
    leaves: tuple[DisclosedLeaf, ...]


def seed(label: str) -> bytes:
    return hashlib.sha256(b"mcb/bench/seed:" + label.encode()).digest()


def build_statement_setup(
    signer: Pkcs11Signer, cosigners: list[BlsCosigner], *, threshold: int, now: datetime
) -> StatementSetup:
    leaves = (
        DisclosedLeaf("alice", "BTC", 0, seed("alice-btc"), 150_000_000),
        DisclosedLeaf("bob", "BTC", 1, seed("bob-btc"), 42),
        DisclosedLeaf("carol", "BTC", 2, seed("carol-btc"), 7_000_000_000),
        DisclosedLeaf("alice", "USDC", 0, seed("alice-usdc"), 1_000_000_000_000),
        DisclosedLeaf("dave", "USDC", 1, seed("dave-usdc"), 25_000_000),
    )
    prices = (
        PricePoint(Price.parse(asset="BTC", quote="USD", text="64123.45"), "file:bench", now),
        PricePoint(Price.parse(asset="USDC", quote="USD", text="1.0000"), "file:bench", now),
    )
    statement = Statement(
        custodian=CUSTODIAN,
        exchange=EXCHANGE,
        sequence=1,
        previous=GENESIS_PREVIOUS,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        kind=StatementKind.SNAPSHOT,
        assets=compute_asset_roots(build_trees(leaves), decimals=DECIMALS),
        prices=prices,
    )
    valid_from = now - timedelta(days=1)
    records = [KeyRecord(CUSTODIAN, KeyRole.CUSTODIAN, signer.public_key, valid_from)]
    # One party per co-signer key: the quorum counts distinct parties.
    records += [
        KeyRecord(
            f"cosigner-bench-{index}",
            KeyRole.COSIGNER,
            cosigner.public_key,
            valid_from,
            proof_of_possession=cosigner.proof_of_possession(),
            signs_for=CUSTODIAN,
        )
        for index, cosigner in enumerate(cosigners)
    ]
    registry = KeyRegistry.of(records, quorums={CUSTODIAN: threshold})
    digest = statement.compute_digest()
    cosignatures = tuple(cosigner.cosign(digest) for cosigner in cosigners[:threshold])
    return StatementSetup(statement, cosignatures, registry, leaves)


def bench_statement(
    signer: Pkcs11Signer, setup: StatementSetup, *, seconds: float
) -> tuple[Measurement, SignedStatement]:
    def sign() -> SignedStatement:
        return sign_statement(
            setup.statement, custodian_signer=signer, cosignatures=setup.cosignatures
        )

    return measure(sign, seconds=seconds), sign()


def bench_verify_statement(
    wire: bytes, setup: StatementSetup, *, seconds: float, now: datetime
) -> Measurement:
    # An exchange that has accepted nothing yet, and the snapshot's disclosure (every leaf).
    receiver = ReceiverTrees(DECIMALS)
    disclosure = LeafDisclosure.for_statement(setup.statement, setup.leaves)

    def verify() -> None:
        verify_statement(
            wire,
            custodian=CUSTODIAN,
            exchange=EXCHANGE,
            registry=setup.registry,
            head=None,
            now=now,
            receiver=receiver,
            disclosure=disclosure,
        )

    return measure(verify, seconds=seconds)


# --- main ---------------------------------------------------------------------------------------


def speedup(reference: Measurement, other: Measurement | None) -> float | None:
    return None if other is None else round(reference.median_ms / other.median_ms, 1)


def ms(measurement: Measurement | None, digits: int = 3) -> float | None:
    return None if measurement is None else round(measurement.median_ms, digits)


def run_hsm(signer: Pkcs11Signer, *, seconds: float) -> dict[str, Any]:
    one = bench_hsm_one_thread(signer, seconds=seconds)
    print(
        f"  HSM sign            {one.per_s:9,.0f} /s   one thread "
        f"(median {one.median_ms:.3f} ms, {one.calls} calls)"
    )
    signed, elapsed = bench_hsm_threads(signer, seconds=seconds, threads=THREADS)
    print(
        f"  HSM sign            {signed / elapsed:9,.0f} /s   {THREADS} threads, one shared "
        f"session ({signed} signatures)"
    )
    p256 = bench_p256_verify(signer, seconds=seconds)
    print(f"  P-256 verify        {p256.per_s:9,.0f} /s")
    return {
        "hsm": "SoftHSM2",
        "hsm_signs_per_s": round(one.per_s),
        "hsm_sign_ms": ms(one),
        "hsm_signs_per_s_4_threads": round(signed / elapsed),
        "p256_verifies_per_s": round(p256.per_s),
    }


def run_bls(secret_keys: list[int], *, threshold: int, seconds: float) -> dict[str, Any]:
    backends = bls.available_backends()
    py_ecc = bench_bls("py_ecc", secret_keys, threshold=threshold, seconds=seconds)
    print_bls(py_ecc, threshold=threshold)
    milagro: BlsResult | None = None
    if "milagro" in backends:
        milagro = bench_bls("milagro", secret_keys, threshold=threshold, seconds=seconds)
        print_bls(milagro, threshold=threshold)
        check_identical(py_ecc, milagro)
        print(
            "  BLS backends        identical public keys, signatures and aggregate; "
            f"milagro is {speedup(py_ecc.sign, milagro.sign)}x (sign), "
            f"{speedup(py_ecc.aggregate_time, milagro.aggregate_time)}x (aggregate), "
            f"{speedup(py_ecc.verify, milagro.verify)}x (verify) py-ecc's speed"
        )
    else:
        print("  BLS milagro         not installed (pip install -c constraints.txt '.[fast]')")
    bls.select_backend("auto")
    return {
        "bls_backends": list(backends),
        "bls_backends_identical": None if milagro is None else True,
        "bls_sign_ms_py_ecc": ms(py_ecc.sign),
        "bls_sign_ms_milagro": ms(milagro.sign if milagro else None),
        "bls_aggregate_ms_py_ecc": ms(py_ecc.aggregate_time),
        "bls_aggregate_ms_milagro": ms(milagro.aggregate_time if milagro else None),
        "bls_aggregate_verify_ms_py_ecc": ms(py_ecc.verify),
        "bls_aggregate_verify_ms_milagro": ms(milagro.verify if milagro else None),
        "milagro_speedup_sign": speedup(py_ecc.sign, milagro.sign if milagro else None),
        "milagro_speedup_aggregate": speedup(
            py_ecc.aggregate_time, milagro.aggregate_time if milagro else None
        ),
        "milagro_speedup_verify": speedup(py_ecc.verify, milagro.verify if milagro else None),
    }


def run_statement(
    signer: Pkcs11Signer, secret_keys: list[int], *, threshold: int, seconds: float
) -> dict[str, Any]:
    backend = bls.select_backend("auto")
    now = truncate_to_millis(datetime.now(UTC))
    cosigners = [BlsCosigner(sk) for sk in secret_keys]
    setup = build_statement_setup(signer, cosigners, threshold=threshold, now=now)
    sign_m, signed = bench_statement(signer, setup, seconds=seconds)
    wire = signed.encode()
    verify_m = bench_verify_statement(wire, setup, seconds=seconds, now=now)
    print(
        f"  sign_statement      {sign_m.median_ms:9.3f} ms   (HSM signature + check + "
        f"aggregate of {threshold}; {len(wire)} wire bytes)"
    )
    print(
        f"  verify_statement    {verify_m.median_ms:9.3f} ms   ({backend}; "
        "decode, stream, keys, P-256, quorum, time, chain, leaves)"
    )
    verify_py_ecc = verify_m
    if backend != "py_ecc":
        bls.select_backend("py_ecc")
        verify_py_ecc = bench_verify_statement(wire, setup, seconds=seconds, now=now)
        bls.select_backend("auto")
        print(f"  verify_statement    {verify_py_ecc.median_ms:9.3f} ms   (py_ecc)")
    return {
        "statement_bls_backend": backend,
        "statement_wire_bytes": len(wire),
        "sign_statement_ms": ms(sign_m),
        "verify_statement_ms": ms(verify_m),
        "verify_statement_ms_py_ecc": ms(verify_py_ecc),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--cosigners", type=int, default=3, help="registered co-signers (n)")
    parser.add_argument("--threshold", type=int, default=2, help="co-signatures required (k)")
    args = parser.parse_args()
    seconds: float = args.seconds
    count: int = args.cosigners
    threshold: int = args.threshold
    if not seconds > 0:
        parser.error("--seconds must be positive")
    if not 1 <= threshold <= count:
        parser.error("need 1 <= --threshold <= --cosigners")
    quorum = f"{threshold}-of-{count}"
    started = time.perf_counter()
    print(
        f"Signing benchmark: SoftHSM2 P-256 key, BLS quorum {quorum}, ~{seconds:g} s per "
        "measurement"
    )
    secret_keys = [bls.generate_secret_key(seed(f"cosigner-{i}")) for i in range(count)]
    with (
        tempfile.TemporaryDirectory(prefix="mcb-bench-") as tmp,
        open_hsm_signer(Path(tmp)) as signer,
    ):
        hsm_result = run_hsm(signer, seconds=seconds)
        bls_result = run_bls(secret_keys, threshold=threshold, seconds=seconds)
        statement_result = run_statement(signer, secret_keys, threshold=threshold, seconds=seconds)
    total_s = time.perf_counter() - started
    print(f"  total               {total_s:9.1f} s")
    result: dict[str, Any] = {
        "seconds_per_measurement": seconds,
        "quorum": quorum,
        **hsm_result,
        **bls_result,
        **statement_result,
        "total_s": round(total_s, 1),
        **signing_machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
