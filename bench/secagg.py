"""Privacy tax of one secure-aggregation round, against the per-value method.

Pipeline (crypto/ only, no network): key setup (dealer, t-of-n threshold Paillier),
offline precomputation (r^n and range-proof commitments, in a background pool), online
pack + encrypt + prove per contributor (one core), batch proof verification per
contribution, homomorphic aggregation, partial decryption with one batch proof per
committee member (both cores), combining t of them, unpacking to the mean.

Baseline in the same run: the seed's per-value method (one TNO Paillier ciphertext per
float, no packing, no pool), timed on a sample of values and extrapolated linearly to
the same number of parameters and contributors (said so in the output).

    .venv/bin/python bench/secagg.py --params 100000
    .venv/bin/python bench/secagg.py --quick      # 20,000 params, 3 contributors: about a minute
Last line: secagg params=N speedup_vs_per_value=x online_encrypt_s=y decrypt_member_s=z max_err=e

The figures include what the contribution proof guarantees per slot (issue 11 finding 5):
the subset-sum range proof bounds each packed plaintext, not each slot, so one contributor
can put any code below 2^slot_bits in a slot. The "slot bounds" lines print that bound and
a measured lower bound on what an exact per-slot proof would cost (one RSA-group element
per value, the least any commitment-based per-value proof needs; a bit decomposition
needs b of them), against the proof in use (docs/crypto-contribution.md, "Per-slot bounds").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto import batch_powmod, contribution, paillier, proofs, subset_range  # noqa: E402
from crypto.fixed_base import FixedBase  # noqa: E402

MESH, ROUND = "bench", 1


def main() -> int:
    args = _parse()
    rng = np.random.default_rng(args.seed)
    updates = [rng.normal(0.0, 0.5 * args.clip, args.params).astype(np.float32)
               for _ in range(args.contributors)]
    timings: dict[str, float] = {}

    with _timed(timings, "key_setup"):
        public, shares, vks = paillier.deal(args.key_bits, args.threshold, args.parties)
    layout = contribution.derive_layout(args.clip, args.quant_bits, args.contributors, args.key_bits)
    count = layout.plaintexts_needed(args.params)
    print(f"secagg: {args.params} params x {args.contributors} contributors, {args.key_bits}-bit key, "
          f"{args.threshold}-of-{args.parties}; {layout.slots_per_plaintext} slots of "
          f"{layout.slot_bits} bits -> {count} ciphertexts per contributor", flush=True)

    contexts = [contribution.context_for(public, MESH, ROUND, f"contributor-{i}")
                for i in range(args.contributors)]
    pres, offline = [], []
    for _ in range(args.contributors):
        start = time.process_time()  # one core's work; CPU time ignores the other core's load
        pres.append(contribution.precompute(public, layout, args.params, workers=1))
        offline.append(time.process_time() - start)
    timings["offline_per_contributor"] = float(np.median(offline))
    print(f"secagg: offline precompute {timings['offline_per_contributor']:.2f} s CPU per contributor "
          "(DJN randomizers + subset-proof masks, done while training)", flush=True)

    sealed, online = [], []
    for update, context, pre in zip(updates, contexts, pres):
        start = time.process_time()
        sealed.append(contribution.seal(public, layout, update, context, precomputed=pre))
        online.append(time.process_time() - start)
    timings["online_per_contributor"] = float(np.median(online))
    print(f"secagg: online pack+encrypt+prove {timings['online_per_contributor']:.3f} s per contributor "
          "(one core, median)", flush=True)

    verify_times = []
    for item, context in zip(sealed, contexts):
        start = time.process_time()
        contribution.verify(public, layout, item, context, value_count=args.params)
        verify_times.append(time.process_time() - start)
    timings["verify_per_contribution"] = float(np.median(verify_times))
    print(f"secagg: verify {timings['verify_per_contribution']:.2f} s per contribution (one core)", flush=True)
    with _timed(timings, "aggregate"):
        aggregate = contribution.aggregate(public, sealed)

    blocks = contribution.decryption_blocks(count, [s.index for s in shares], args.threshold)
    batches: dict[int, list] = {b: [] for b in range(len(blocks))}
    member_times, member_cpu = [], []
    for share in shares:
        start, cpu = time.perf_counter(), time.process_time()  # wall: a member uses both cores
        for b, block in enumerate(blocks):
            if share.index in block.members:
                batches[b].append(paillier.partial_decrypt_many(
                    share, aggregate[block.start:block.stop], _block_context(public, b), workers=args.workers))
        member_times.append(time.perf_counter() - start)
        member_cpu.append(time.process_time() - cpu)
    timings["decrypt_member"] = float(np.median(member_times))
    # CPU seconds over the cores used: what the wall time is when nothing else runs.
    timings["decrypt_member_cpu_per_core"] = float(np.median(member_cpu)) / args.workers
    print(f"secagg: partial decryption {timings['decrypt_member']:.2f} s per member ({args.workers} threads; "
          f"each member decrypts {args.threshold} of {len(blocks)} blocks = {args.threshold}/{args.parties} "
          f"of the positions; alone it would take {timings['decrypt_member'] * args.parties / args.threshold:.1f} s)",
          flush=True)
    _engine_ratio(shares[0], aggregate, args.workers)
    with _timed(timings, "combine"):
        plain = []
        for b, block in enumerate(blocks):
            plain.extend(paillier.combine_many(public, vks, args.threshold, aggregate[block.start:block.stop],
                                               batches[b], _block_context(public, b), workers=args.workers))
    with _timed(timings, "decode"):
        mean = contribution.decode_sum(plain, args.params, args.contributors, layout)

    expected = np.mean([np.clip(u, -args.clip, args.clip) for u in updates], axis=0)
    max_err = float(np.max(np.abs(mean - expected)))
    c = args.contributors
    ours = ((timings["offline_per_contributor"] + timings["online_per_contributor"]
             + timings["verify_per_contribution"]) * c + timings["aggregate"]
            + sum(member_times) + timings["combine"] + timings["decode"])
    per_value = _per_value_baseline(args, rng)
    _report(args, timings, ours, per_value, max_err, layout)
    _slot_bounds(args, public, layout, sealed[0], timings)
    return 0 if max_err <= args.clip / 2 ** (args.quant_bits - 1) else 1


def _engine_ratio(share, aggregate: list[int], workers: int, sample: int = 256) -> float:
    """The partial-decryption powmods of one member on a sample, with the engine in use
    and with gmpy2 called bare (same threads), so the speedup is measured in this run."""
    bases = aggregate[:sample]
    exponent, n2 = 2 * share.delta * share.secret, share.public.n_squared
    seconds = {}
    for name in ("active", "gmpy2"):
        if name == "gmpy2":
            os.environ["SEALMESH_POWMOD"] = "gmpy2"
        batch_powmod._native.cache_clear()
        start = time.perf_counter()
        batch_powmod.powmod_many(bases, exponent, n2, workers=workers)
        seconds[name] = time.perf_counter() - start
        os.environ.pop("SEALMESH_POWMOD", None)
        batch_powmod._native.cache_clear()
    ratio = seconds["gmpy2"] / seconds["active"]
    print(f"secagg: partial-decryption powmod engine {batch_powmod.engine()}: "
          f"{seconds['active'] / len(bases) * 1e3:.2f} ms per ciphertext per {workers} threads against "
          f"gmpy2 bare {seconds['gmpy2'] / len(bases) * 1e3:.2f} ms ({ratio:.2f}x, {len(bases)}-ciphertext sample)",
          flush=True)
    return ratio


def _block_context(public, block: int) -> bytes:
    return proofs.ProofContext(public.n, MESH, ROUND, "committee", block,
                               proofs.PURPOSE_DECRYPTION_SHARE).encode()


def _per_value_baseline(args, rng) -> float:
    """Seconds the seed's method would need for the same round, from a timed sample."""
    from tno.mpc.encryption_schemes.paillier import Paillier

    scheme = Paillier.from_security_parameter(key_length=args.key_bits, precision=8)
    sample = rng.normal(0.0, 0.5, args.baseline_sample)
    start = time.perf_counter()
    encrypted = []
    for x in sample:
        c = scheme.encrypt(float(x))
        c.get_value()  # TNO randomizes lazily; force it so the cost is counted
        encrypted.append(c)
    encrypt_s = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    total = encrypted[0]
    for c in encrypted[1:]:
        total = total + c
    add_s = (time.perf_counter() - start) / max(1, len(sample) - 1)
    start = time.perf_counter()
    for c in encrypted:
        scheme.decrypt(c)
    decrypt_s = (time.perf_counter() - start) / len(sample)
    scheme.shut_down()
    print(f"secagg: per-value baseline (TNO Paillier, sample of {len(sample)}, extrapolated linearly): "
          f"encrypt {1 / encrypt_s:.0f}/s, decrypt {1 / decrypt_s:.0f}/s", flush=True)
    p, c = args.params, args.contributors
    return p * c * encrypt_s + p * (c - 1) * add_s + p * decrypt_s


def _report(args, t, ours, per_value, max_err, layout) -> None:
    for name, value in t.items():
        print(f"secagg: {name:28s} {value:10.2f} s")
    print(f"secagg: ours (all work, serial) {ours:.1f} s vs per-value {per_value:.1f} s "
          f"(extrapolated) -> {per_value / ours:.0f}x")
    for label, params in (("1M", 1_000_000), ("3.1M-param LoRA delta", 3_100_000)):
        k = params / args.params
        print(f"secagg: linear extrapolation to {label}: offline {t['offline_per_contributor'] * k:.1f} s "
              f"(overlaps training), online {t['online_per_contributor'] * k:.1f} s per contributor, verify "
              f"{t['verify_per_contribution'] * k:.1f} s per contribution, partial decryption "
              f"{t['decrypt_member'] * k:.0f} s per member ({t['decrypt_member_cpu_per_core'] * k:.0f} s "
              f"on {args.workers} idle cores)")
    print(f"secagg: max abs error {max_err:.2e} (bound B/2^(b-1) = {args.clip / 2 ** (args.quant_bits - 1):.2e})")
    print(f"secagg params={args.params} speedup_vs_per_value={per_value / ours:.1f} "
          f"online_encrypt_s={t['online_per_contributor']:.3f} decrypt_member_s={t['decrypt_member']:.2f} "
          f"max_err={max_err:.2e}")


def _slot_bounds(args, public, layout, item, t, sample: int = 64) -> None:
    """What one accepted contribution may put in a slot, and the floor of an exact per-slot proof."""
    import secrets

    from gmpy2 import mpz, powmod

    proof_bytes = len(contribution.encode(public, item)) - len(item.ciphertexts) * public.ciphertext_bytes
    print(f"secagg: slot bounds: the proof bounds each plaintext (|m'| < 2^({layout.plaintext_bits} "
          f"+ {subset_range.slack_bits(len(item.ciphertexts)) - 1})), not each slot: one contributor may put "
          f"any code in [0, 2^{layout.slot_bits}) in a slot (honest: [1, 2^{layout.quant_bits} - 1]), "
          f"up to {(1 << layout.slot_bits) // ((1 << layout.quant_bits) - 1)}x an honest code")
    n = mpz(public.n)
    h2 = proofs._generators(n)[1]
    table = FixedBase(h2, n, n.bit_length() + proofs.KAPPA)
    start = time.perf_counter()
    for _ in range(sample):  # a hiding commitment's randomness part, through a fixed-base table
        table.pow(secrets.randbits(n.bit_length() + proofs.KAPPA))
    commit_s = (time.perf_counter() - start) / sample
    bases = [mpz(secrets.randbelow(int(n))) for _ in range(sample)]
    start = time.perf_counter()
    for b in bases:  # the least a verifier does per element: a challenge-sized exponent
        powmod(b, secrets.randbits(proofs.T + proofs.BATCH_RHO_BITS), n)
    check_s = (time.perf_counter() - start) / sample
    element = (n.bit_length() + 7) // 8
    million = 1_000_000
    per_1m = million / args.params
    print(f"secagg: slot bounds: proof in use: {proof_bytes / 1e3:.0f} KB whatever the size (128 subset "
          f"proofs); per 1M values {len(item.ciphertexts) * public.ciphertext_bytes * per_1m / 1e6:.1f} MB of "
          f"ciphertexts, prove "
          f"{t['online_per_contributor'] * per_1m:.1f} s online + {t['offline_per_contributor'] * per_1m:.1f} s "
          f"offline, verify {t['verify_per_contribution'] * per_1m:.1f} s")
    _blame_cost(public, layout, item)
    for label, elements in (("one element per value", 1), (f"bit decomposition ({layout.quant_bits} per value)",
                                                           layout.quant_bits)):
        print(f"secagg: slot bounds: exact per-slot floor, {label}, per 1M values: >= "
              f"{elements * million * element / 1e6:.0f} MB, prove >= {elements * million * commit_s:.0f} s, "
              f"verify >= {elements * million * check_s:.0f} s (measured {commit_s * 1e3:.3f} ms per fixed-base "
              f"commitment, {check_s * 1e3:.3f} ms per {proofs.T + proofs.BATCH_RHO_BITS}-bit exponentiation)")


def _blame_cost(public, layout, item) -> None:
    """One contributor's answer to a blame after SlotOverflow: the exact slot proof, mid and last slot."""
    from gmpy2 import mpz

    from crypto import djn

    shape = contribution.slot_shape(layout)
    k = layout.slots_per_plaintext
    m = sum(layout.offset << (layout.slot_bits * i) for i in range(k))  # 0.0 in every slot
    rho, h = djn.randomizer(public.n)
    c = int(djn.encrypt(public.n, m, h))
    subset_range._h2_table(mpz(public.n))  # built once per key, like the other tables
    for slot, top in ((k // 2, False), (k - 1, True)):
        start = time.process_time()
        proof = subset_range.prove_slots(public.n, c, m, rho, shape, slot, b"bench", top=top)
        prove_s = time.process_time() - start
        start = time.process_time()
        assert subset_range.verify_slots(public.n, c, proof, shape, slot, b"bench", top=top)
        verify_s = time.process_time() - start
        size = len(contribution.encode_slot_proof(proof))
        print(f"secagg: blame: slot proof for slots 0..{slot}{' (whole plaintext)' if top else ''}: "
              f"{(slot + 1) * layout.quant_bits} committed bits, prove {prove_s:.2f} s, verify {verify_s:.2f} s, "
              f"{size / 1e3:.0f} KB, per contributor per blamed position")


class _timed:
    def __init__(self, timings: dict, name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.start


def _parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 parameters per update")
    parser.add_argument("--contributors", type=int, default=10)
    parser.add_argument("--threshold", type=int, default=3)
    parser.add_argument("--parties", type=int, default=5)
    parser.add_argument("--key-bits", type=int, default=2048, choices=[2048, 3072])
    parser.add_argument("--clip", type=float, default=1.0, help="clip bound B")
    parser.add_argument("--quant-bits", type=int, default=16, help="b")
    parser.add_argument("--workers", type=int, default=2, help="threads for offline work and decryption")
    parser.add_argument("--baseline-sample", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="20,000 params, 3 contributors, 2-of-3, 8-value baseline (about a minute)")
    args = parser.parse_args()
    if args.quick:
        args.params, args.contributors, args.threshold, args.parties = 20_000, 3, 2, 3
        args.baseline_sample = 8
    return args


if __name__ == "__main__":
    sys.exit(main())
