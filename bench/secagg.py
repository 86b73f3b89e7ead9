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
Last line: secagg params=N speedup_vs_per_value=x online_encrypt_s=y decrypt_member_s=z max_err=e
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto import packing, paillier, proofs  # noqa: E402
from crypto.randomness import RandomizerPool, fresh_randomizer_pair  # noqa: E402

MESH, ROUND = "bench", 1


def main() -> int:
    args = _parse()
    rng = np.random.default_rng(args.seed)
    updates = [rng.normal(0.0, 0.5 * args.clip, args.params).astype(np.float32)
               for _ in range(args.contributors)]
    timings: dict[str, float] = {}

    with _timed(timings, "key_setup"):
        public, shares, vks = paillier.deal(args.key_bits, args.threshold, args.parties)
    n = public.n
    layout = packing.derive_layout(args.clip, args.quant_bits, args.contributors, args.key_bits,
                                   plaintext_slack_bits=proofs.slack_bits())
    count = layout.plaintexts_needed(args.params)
    bound_bits = layout.plaintext_bits
    print(f"secagg: {args.params} params x {args.contributors} contributors, {args.key_bits}-bit key, "
          f"{args.threshold}-of-{args.parties}; {layout.slots_per_plaintext} slots of "
          f"{layout.slot_bits} bits -> {count} ciphertexts per contributor", flush=True)

    total = count * args.contributors
    with _timed(timings, "offline_all"):
        with RandomizerPool(n, size=total, workers=args.workers,
                            make=lambda n: _offline_item(n, bound_bits)) as pool:
            pool.wait_until_full()
            items = pool.take_many(total)
    print(f"secagg: offline precompute {timings['offline_all']:.1f} s for {total} ciphertexts "
          f"({args.workers} threads)", flush=True)

    contributions, online = [], []
    for i, update in enumerate(updates):
        start = time.perf_counter()
        contributions.append(_contribute(n, layout, update, items[i * count:(i + 1) * count], i, bound_bits))
        online.append(time.perf_counter() - start)
    timings["online_per_contributor"] = float(np.median(online))
    print(f"secagg: online pack+encrypt+prove {timings['online_per_contributor']:.2f} s per contributor "
          "(one core, median)", flush=True)

    with _timed(timings, "verify_all"):
        for i, (cs, range_proofs) in enumerate(contributions):
            contexts = [_context(n, i, j, proofs.PURPOSE_RANGE) for j in range(count)]
            if not proofs.verify_range_batch(n, cs, range_proofs, bound_bits, contexts):
                raise SystemExit(f"contribution {i} failed verification")
    with _timed(timings, "aggregate"):
        aggregate = [public.add_many([cs[j] for cs, _ in contributions]) for j in range(count)]

    context = _context(n, 0, 0, proofs.PURPOSE_DECRYPTION_SHARE)
    batches, member_times = [], []
    for share in shares[:args.threshold]:
        start = time.perf_counter()
        batches.append(paillier.partial_decrypt_many(share, aggregate, context, workers=args.workers))
        member_times.append(time.perf_counter() - start)
    timings["decrypt_member"] = float(np.median(member_times))
    with _timed(timings, "combine"):
        plain = paillier.combine_many(public, vks, args.threshold, aggregate, batches, context,
                                      workers=args.workers)
    with _timed(timings, "decode"):
        mean = packing.decode_mean(packing.unpack(plain, args.params, layout), args.contributors, layout)

    expected = np.mean([np.clip(u, -args.clip, args.clip) for u in updates], axis=0)
    max_err = float(np.max(np.abs(mean - expected)))
    ours = (timings["offline_all"] + timings["online_per_contributor"] * args.contributors
            + timings["verify_all"] + timings["aggregate"]
            + timings["decrypt_member"] * args.threshold + timings["combine"] + timings["decode"])
    per_value = _per_value_baseline(args, rng)
    _report(args, timings, ours, per_value, max_err, layout)
    return 0 if max_err <= args.clip / 2 ** (args.quant_bits - 1) else 1


def _offline_item(n, bound_bits):
    r, rn = fresh_randomizer_pair(n)
    return r, rn, proofs.precompute_range(int(n), bound_bits)


def _contribute(n, layout, update, items, index, bound_bits):
    n2 = n * n
    plaintexts = packing.pack(packing.quantize(update, layout), layout)
    cs, range_proofs = [], []
    for j, (m, (r, rn, pre)) in enumerate(zip(plaintexts, items)):
        c = (1 + m * n) * rn % n2  # online encryption: one multiplication
        cs.append(int(c))
        range_proofs.append(proofs.prove_range(n, int(c), int(m), int(r), bound_bits,
                                               _context(n, index, j, proofs.PURPOSE_RANGE),
                                               precomputed=pre))
    return cs, range_proofs


def _context(n, contributor, index, purpose) -> bytes:
    return proofs.ProofContext(int(n), MESH, ROUND, f"contributor-{contributor}", index, purpose).encode()


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
        print(f"secagg: {name:24s} {value:10.2f} s")
    scale_1m, scale_lora = 1_000_000 / args.params, 3_100_000 / args.params
    member_1m = t["decrypt_member"] * scale_1m
    print(f"secagg: ours (all work, serial) {ours:.1f} s vs per-value {per_value:.1f} s "
          f"(extrapolated) -> {per_value / ours:.0f}x")
    print(f"secagg: linear extrapolation: 1M params online {t['online_per_contributor'] * scale_1m:.1f} s "
          f"per contributor, decrypt {member_1m:.0f} s per member; 3.1M-param LoRA delta privacy tax "
          f"~{ours * scale_lora / args.contributors:.0f} s per contributor's share of the work")
    print(f"secagg: max abs error {max_err:.2e} (bound B/2^(b-1) = {args.clip / 2 ** (args.quant_bits - 1):.2e})")
    print(f"secagg params={args.params} speedup_vs_per_value={per_value / ours:.1f} "
          f"online_encrypt_s={t['online_per_contributor']:.3f} decrypt_member_s={t['decrypt_member']:.2f} "
          f"max_err={max_err:.2e}")


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
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
