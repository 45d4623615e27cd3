"""Benchmark of the Merkle sum tree (attestations.merkle) on one core, pure Python.

    .venv/bin/python benchmarks/merkle.py [--leaves N] [--repeat R] [--seed S]

Measures, for N leaves at positions 0..N-1 of one asset:

* ``commitments_s``   computing the N account commitments (done once per account; salts are stable)
* ``build_s``         SumTree.build from Leaf objects whose commitments are known (best of R runs)
* ``full_verify_s``   what a receiver of a full snapshot does: rebuild from the disclosed leaves
                      (commitments known) at the statement's depth and compare root, total, count
* ``delta_verify_ms`` what a receiver of a delta does: apply 1,000 changed leaves (new quantities
                      at random positions) to its tree with the statement's root, total and count
                      as expectations (median of 10 successive deltas)
* ``proof_verify_per_s`` client-side verify_inclusion calls per second (commitment included)
* ``pymerkle_build_s`` pymerkle.InmemoryTree over the same N leaf preimages (pymerkle hashes them
                      as RFC 6962 leaves and builds a plain Merkle tree: no sums, so it hashes
                      65-byte nodes where the sum tree hashes 97-byte ones)
* ``merkletools_build_s`` the same with merkletools when importable (it does not install on
                      Python >= 3.11, so this is normally null)

Long-lived objects are frozen out of the garbage collector after setup (``gc.freeze()``), as a
service holding a million-leaf tree would do; otherwise a full collection over those objects can
land inside any timed section. Human-readable lines first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attestations.merkle import (
    Leaf,
    SumTree,
    compute_account_commitment,
    verify_inclusion,
)
from benchmarks.machine import fail, machine_info

ASSET = "USDC"
DELTA_SIZE = 1_000
DELTA_ROUNDS = 10
PROOF_SAMPLES = 2_000

_T = TypeVar("_T")


def timed(function: Callable[[], _T]) -> tuple[_T, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def leaf_preimage(leaf: Leaf) -> bytes:
    """The bytes the sum tree hashes for a leaf, without its 0x00 prefix (pymerkle adds its own)."""
    return (
        leaf.position.to_bytes(8, "big")
        + leaf.commitment
        + bytes([len(ASSET)])
        + ASSET.encode("ascii")
        + leaf.quantity.to_bytes(16, "big")
    )


def bench_pymerkle(leaves: list[Leaf]) -> tuple[float | None, str | None]:
    try:
        import pymerkle
    except ImportError:
        return None, None
    entries = [leaf_preimage(leaf) for leaf in leaves]

    def build() -> bytes:
        tree = pymerkle.InmemoryTree(algorithm="sha256")
        tree.append_entries(entries)
        root: bytes = tree.get_root()
        return root

    root, seconds = timed(build)
    if len(root) != 32:
        fail("pymerkle returned no root")
    return seconds, pymerkle.__version__


def bench_merkletools(leaves: list[Leaf]) -> float | None:
    try:
        import merkletools
    except Exception:  # it fails to build on Python >= 3.11; any import failure means "absent"
        return None
    entries = [leaf_preimage(leaf).hex() for leaf in leaves]

    def build() -> None:
        tree = merkletools.MerkleTools(hash_type="sha256")
        tree.add_leaf(entries, True)
        tree.make_tree()

    return timed(build)[1]


def prepare(
    count: int, rng: random.Random
) -> tuple[list[str], list[bytes], list[bytes], list[Leaf], float]:
    """Accounts, salts, commitments (timed: the returned seconds) and Leaf objects."""
    accounts = [f"acct-{i:08d}" for i in range(count)]
    salts = [hashlib.sha256(b"bench-salt-%d" % i).digest() for i in range(count)]
    quantities = [rng.randrange(10**12) for _ in range(count)]
    commitments, commitments_s = timed(
        lambda: [
            compute_account_commitment(account=account, salt=salt)
            for account, salt in zip(accounts, salts, strict=True)
        ]
    )
    print(f"  commitments       {commitments_s:8.3f} s   ({count / commitments_s:,.0f}/s)")
    leaves, leaves_s = timed(
        lambda: [
            Leaf(position, commitment, quantity)
            for position, (commitment, quantity) in enumerate(
                zip(commitments, quantities, strict=True)
            )
        ]
    )
    print(f"  Leaf objects      {leaves_s:8.3f} s   (validated constructors, not in build_s)")
    return accounts, salts, commitments, leaves, commitments_s


def bench_build(leaves: list[Leaf], repeat: int) -> tuple[SumTree, list[float]]:
    runs = []
    tree = SumTree(ASSET)
    for _ in range(repeat):
        del tree
        gc.collect()
        tree, seconds = timed(lambda: SumTree.build(ASSET, leaves))
        runs.append(seconds)
    return tree, runs


def bench_deltas(
    tree: SumTree, leaves: list[Leaf], commitments: list[bytes], rng: random.Random
) -> list[float]:
    """Milliseconds per delta of DELTA_SIZE leaves at fresh random positions with new
    quantities, applied one after another. The head each delta must produce comes from an
    independent full build of the changed leaf set (not timed)."""
    depth, count = tree.depth, tree.count
    current = list(leaves)
    samples = []
    for _ in range(DELTA_ROUNDS):
        positions = rng.sample(range(count), DELTA_SIZE)
        delta = [Leaf(p, commitments[p], rng.randrange(10**12)) for p in positions]
        for leaf in delta:
            current[leaf.position] = leaf
        expected = SumTree.build(ASSET, current, depth=depth)
        new_root, new_total = expected.root, expected.total
        del expected
        gc.collect()

        def apply(
            delta: list[Leaf] = delta, new_root: bytes = new_root, new_total: int = new_total
        ) -> None:
            tree.update(
                set_leaves=delta, expect_root=new_root, expect_total=new_total, expect_count=count
            )

        samples.append(timed(apply)[1] * 1000)
    return samples


def bench_proofs(
    tree: SumTree, accounts: list[str], salts: list[bytes], rng: random.Random
) -> tuple[float, float]:
    """(proofs made per second, proofs verified per second)."""
    sample = rng.sample(range(tree.count), PROOF_SAMPLES)
    proofs, prove_s = timed(lambda: [tree.prove(position) for position in sample])
    root, total, depth = tree.root, tree.total, tree.depth

    def verify_all() -> None:
        for position, proof in zip(sample, proofs, strict=True):
            verify_inclusion(
                proof,
                account=accounts[position],
                salt=salts[position],
                root=root,
                total=total,
                depth=depth,
            )

    verify_s = timed(verify_all)[1]
    return PROOF_SAMPLES / prove_s, PROOF_SAMPLES / verify_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="builds to time (best is kept)")
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args()
    count: int = args.leaves
    if count < 2 * DELTA_SIZE:
        parser.error(f"--leaves must be at least {2 * DELTA_SIZE}")
    rng = random.Random(args.seed)

    print(f"Merkle sum tree benchmark: {count:,} leaves of {ASSET}, one core")
    accounts, salts, commitments, leaves, commitments_s = prepare(count, rng)
    gc.collect()
    gc.freeze()

    tree, build_runs = bench_build(leaves, args.repeat)
    build_s = min(build_runs)
    runs = ", ".join(f"{s:.3f}" for s in build_runs)
    print(f"  build             {build_s:8.3f} s   (best of {args.repeat}: {runs})")
    if tree.total != sum(leaf.quantity for leaf in leaves) or tree.count != count:
        fail("the tree's total or count is wrong")
    root, total, depth = tree.root, tree.total, tree.depth
    gc.freeze()

    def full_verify() -> None:
        rebuilt = SumTree.build(ASSET, leaves, depth=depth)
        rebuilt.verify_head(root=root, total=total, count=count)

    full_verify_s = timed(full_verify)[1]
    print(f"  full verify       {full_verify_s:8.3f} s   (rebuild + compare; add commitments_s")
    print("                                 when starting from accounts and salts)")

    delta_samples = bench_deltas(tree, leaves, commitments, rng)
    delta_ms = statistics.median(delta_samples)
    print(
        f"  delta verify      {delta_ms:8.2f} ms  (median of {len(delta_samples)} deltas of "
        f"{DELTA_SIZE:,} leaves; min {min(delta_samples):.2f}, max {max(delta_samples):.2f})"
    )
    prove_per_s, proof_verify_per_s = bench_proofs(tree, accounts, salts, rng)
    print(f"  prove             {prove_per_s:8,.0f} /s  (depth {depth})")
    print(f"  verify proof      {proof_verify_per_s:8,.0f} /s")

    pymerkle_build_s, pymerkle_version = bench_pymerkle(leaves)
    if pymerkle_build_s is None:
        print("  pymerkle          not installed")
    else:
        print(
            f"  pymerkle build    {pymerkle_build_s:8.3f} s   (InmemoryTree {pymerkle_version}, "
            f"{pymerkle_build_s / build_s:.1f}x the sum tree's build time)"
        )
    merkletools_build_s = bench_merkletools(leaves)
    if merkletools_build_s is None:
        print("  merkletools       not importable")
    else:
        print(f"  merkletools build {merkletools_build_s:8.3f} s")

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS          {peak_rss_mb:8.0f} MB")
    result = {
        "leaves": count,
        "asset": ASSET,
        "depth": depth,
        "commitments_s": round(commitments_s, 4),
        "build_s": round(build_s, 4),
        "build_runs_s": [round(s, 4) for s in build_runs],
        "full_verify_s": round(full_verify_s, 4),
        "delta_leaves": DELTA_SIZE,
        "delta_verify_ms": round(delta_ms, 3),
        "delta_verify_ms_min": round(min(delta_samples), 3),
        "delta_verify_ms_max": round(max(delta_samples), 3),
        "prove_per_s": round(prove_per_s),
        "proof_verify_per_s": round(proof_verify_per_s),
        "pymerkle_version": pymerkle_version,
        "pymerkle_build_s": None if pymerkle_build_s is None else round(pymerkle_build_s, 4),
        "speedup_vs_pymerkle": (
            None if pymerkle_build_s is None else round(pymerkle_build_s / build_s, 2)
        ),
        "merkletools_build_s": (
            None if merkletools_build_s is None else round(merkletools_build_s, 4)
        ),
        "peak_rss_mb": round(peak_rss_mb),
        "gc": "frozen after setup",
        **machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
