"""sealmesh's secure aggregation against what a user would pick instead (issue 18).

One seeded workload (N trainers x P float32 values, clipped to [-1, 1]) goes, in one
process, through:

  plaintext   the mean of the updates, the floor (no protection)
  secagg+     Flower's SecAgg+ (flwr 1.42): the client stages are flwr's own functions
              (flwr.client.mod.secure_aggregation.secaggplus_mod: _setup = two ECDH key
              pairs, _share_keys = Shamir shares of the mask seed and sk1 encrypted to
              every neighbour, _collect_masked_vectors = quantize + private and pairwise
              masks, _unmask = the shares for the survivors and the dropout); the server
              does SecAggPlusWorkflow's routing, sum and unmask_stage arithmetic with
              flwr's primitives (combine_shares, pseudo_rand_gen, generate_shared_key,
              parameters_*, dequantize). Workflow defaults: all N are neighbours
              (num_shares = N), reconstruction threshold max(2, round(0.6 N)) (6 of 10),
              clipping_range 8.0, quantization_range 2^22, modulus_range 2^32,
              max_weight 1000 (every trainer reports 1000 examples, so weights are equal).
              One trainer drops after sharing its keys: the mean is over the N - 1 others
              and the server rebuilds the dropout's pairwise masks.
  tenseal     TenSEAL CKKS (degree 8192, coefficient moduli 60/40/40/60, scale 2^40):
              every trainer encrypts its update in 4096-slot ciphertexts under one key
              holder's public context and serializes them; the server deserializes and
              sums; the key holder decrypts the sum.
  sealmesh    the project's path as bench/secagg.py runs it: pack, DJN encrypt and prove
              (offline precompute + online seal), verify every contribution, aggregate,
              partial decryption with batch proofs by t of n members, combine t, decode.

Costs are CPU seconds (time.process_time: the machine is shared, CPU time ignores the
other agents' load); threads a step starts are included. "validator" is the server
side of a round (all trainers' uploads); "member" is one committee member (or the
TenSEAL key holder). Key setup (the sealmesh dealer, the CKKS keys) is one-time and not
in the round figures.

    .venv-peers/bin/python bench/peers.py --quick                  # 10 x 100,000
    .venv-peers/bin/python bench/peers.py --quick --sweep 3,10,30   # growth per trainer
    make bench-peers                                                # 10 x 1,000,000

Last line: peers params=P trainers=N sealmesh_trainer_s=.. secaggplus_client_s=.. ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLIP = 1.0  # the workload's clip bound (sealmesh's B); every method gets the clipped values
METHODS = ("plaintext", "secagg+", "tenseal", "sealmesh")
PROTECTS = {
    "plaintext": "none",
    "secagg+": "semi-honest",
    "tenseal": "semi-honest, one key holder",
    "sealmesh": "verified bounds + threshold",
}


@dataclass
class Result:
    method: str
    protects: str
    trainer_s: float            # CPU seconds per trainer, online (what delays its upload)
    validator_s: float          # CPU seconds of one validator / the server for the whole round
    member_s: float | None      # CPU seconds per committee member (key holder), None if none
    members: int                # committee members that work in a round
    bytes_per_trainer: int      # bytes one trainer uploads
    max_err: float              # max |mean - plaintext mean of the same contributors|
    contributors: int           # updates in the mean
    detail: dict = field(default_factory=dict)

    def round_s(self) -> float:
        """The server side of a round: validator plus every member that works."""
        return self.validator_s + (self.member_s or 0.0) * self.members


def workload(trainers: int, params: int, seed: int) -> list[np.ndarray]:
    """N seeded float32 updates, clipped to [-CLIP, CLIP] as a trainer would clip them."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(0.0, 0.5 * CLIP, params), -CLIP, CLIP).astype(np.float32)
            for _ in range(trainers)]


def _floor(updates, idx) -> np.ndarray:
    return np.mean([updates[i].astype(np.float64) for i in idx], axis=0)


def run_plaintext(updates) -> Result:
    start = time.process_time()
    mean = np.mean(np.stack(updates), axis=0, dtype=np.float64)
    server = time.process_time() - start
    return Result("plaintext", PROTECTS["plaintext"], 0.0, server, None, 0,
                  updates[0].size * 4, float(np.max(np.abs(mean - _floor(updates, range(len(updates)))))),
                  len(updates))


# ---- Flower SecAgg+ -------------------------------------------------------------------

def secaggplus_settings(trainers: int) -> dict:
    return {"num_shares": trainers, "threshold": max(2, round(0.6 * trainers)), "clipping_range": 8.0,
            "quantization_range": 2 ** 22, "modulus_range": 2 ** 32, "max_weight": 1000.0,
            "num_examples": 1000, "dropouts": 1}


def run_secaggplus(updates) -> Result:
    from flwr.app import ConfigRecord
    import importlib

    # the package re-exports the function secaggplus_mod under the module's name
    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract, get_parameters_shape, parameters_addition, parameters_mod, parameters_subtraction)
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    n = len(updates)
    s = secaggplus_settings(n)
    nids = list(range(1, n + 1))
    client_cpu = {nid: 0.0 for nid in nids}
    sent = {nid: 0 for nid in nids}
    server_cpu = 0.0

    def client(nid, fn, *args):
        start = time.process_time()
        out = fn(*args)
        client_cpu[nid] += time.process_time() - start
        return out

    states = {nid: mod.SecAggPlusState() for nid in nids}
    for nid in nids:
        states[nid].nid = nid
    setup = {Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: s["num_shares"], Key.THRESHOLD: s["threshold"],
             Key.CLIPPING_RANGE: s["clipping_range"], Key.TARGET_RANGE: s["quantization_range"],
             Key.MOD_RANGE: s["modulus_range"], Key.MAX_WEIGHT: s["max_weight"]}
    public_keys = {}
    for nid in nids:  # stage 0: two key pairs each
        res = client(nid, mod._setup, states[nid], ConfigRecord(dict(setup)))
        public_keys[nid] = (res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2])
        sent[nid] += len(public_keys[nid][0]) + len(public_keys[nid][1])
    forward = {nid: ([], []) for nid in nids}  # dst -> (ciphertexts, srcs)
    for nid in nids:  # stage 1: Shamir shares of the seed and sk1, encrypted per neighbour
        cfg = ConfigRecord({str(k): list(v) for k, v in public_keys.items()})
        res = client(nid, mod._share_keys, states[nid], cfg)
        start = time.process_time()
        for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST]):
            forward[dst][0].append(ct)
            forward[dst][1].append(nid)
            sent[nid] += len(ct)
        server_cpu += time.process_time() - start
    dropped = nids[-s["dropouts"]:]  # drop after sharing keys: its pairwise masks must be removed
    active = [nid for nid in nids if nid not in dropped]
    masked = None
    for nid in active:  # stage 2: quantize, mask, upload
        params = ndarrays_to_parameters([updates[nid - 1]])
        cfg = ConfigRecord({Key.CIPHERTEXT_LIST: forward[nid][0], Key.SOURCE_LIST: forward[nid][1]})
        res = client(nid, mod._collect_masked_vectors, states[nid], cfg, s["num_examples"], params)
        blobs = res[Key.MASKED_PARAMETERS]
        sent[nid] += sum(len(b) for b in blobs)
        start = time.process_time()
        vec = [bytes_to_ndarray(b) for b in blobs]
        masked = vec if masked is None else parameters_addition(masked, vec)
        server_cpu += time.process_time() - start
    start = time.process_time()
    masked = parameters_mod(masked, s["modulus_range"])
    server_cpu += time.process_time() - start
    collected = {nid: [] for nid in nids}
    for nid in active:  # stage 3: shares of survivors' seeds and the dropout's sk1
        cfg = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: list(active), Key.DEAD_NODE_ID_LIST: list(dropped)})
        res = client(nid, mod._unmask, states[nid], cfg)
        sent[nid] += sum(len(x) for x in res[Key.SHARE_LIST])
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST]):
            collected[owner].append(share)
    start = time.process_time()  # SecAggPlusWorkflow.unmask_stage, step by step
    shape = get_parameters_shape(masked)
    for nid, shares in collected.items():
        secret = combine_shares(shares)
        if nid in active:
            masked = parameters_subtraction(masked, pseudo_rand_gen(secret, s["modulus_range"], shape))
        else:
            for other in nids:
                if other == nid:
                    continue
                key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public_keys[other][0]))
                mask = pseudo_rand_gen(key, s["modulus_range"], shape)
                masked = (parameters_addition if nid > other else parameters_subtraction)(masked, mask)
    recon = parameters_mod(masked, s["modulus_range"])
    q_total, recon = factor_extract(recon)
    mean = dequantize(recon, s["clipping_range"], s["quantization_range"])[0]
    mean += -(len(active) - 1) * s["clipping_range"]
    mean *= s["quantization_range"] / q_total
    server_cpu += time.process_time() - start
    err = float(np.max(np.abs(mean - _floor(updates, [a - 1 for a in active]))))
    return Result("secagg+", PROTECTS["secagg+"], float(np.median([client_cpu[a] for a in active])), server_cpu,
                  None, 0, int(np.median([sent[a] for a in active])), err, len(active),
                  {"settings": s, "dropped": len(dropped)})


# ---- TenSEAL CKKS ---------------------------------------------------------------------

def tenseal_settings() -> dict:
    return {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40, 60], "global_scale_log2": 40,
            "slots": 4096}


def run_tenseal(updates) -> Result:
    import tenseal as ts

    s = tenseal_settings()
    secret_ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=s["poly_modulus_degree"],
                            coeff_mod_bit_sizes=s["coeff_mod_bit_sizes"])
    secret_ctx.global_scale = 2 ** s["global_scale_log2"]
    public_ctx = ts.context_from(secret_ctx.serialize(save_secret_key=False))
    slots = s["slots"]
    trainer_cpu, sent = [], []
    uploads = []
    for update in updates:
        start = time.process_time()
        values = update.astype(np.float64)
        blobs = [ts.ckks_vector(public_ctx, values[i:i + slots]).serialize() for i in range(0, values.size, slots)]
        trainer_cpu.append(time.process_time() - start)
        sent.append(sum(len(b) for b in blobs))
        uploads.append(blobs)
    start = time.process_time()
    total = [ts.ckks_vector_from(public_ctx, b) for b in uploads[0]]
    for blobs in uploads[1:]:
        for j, b in enumerate(blobs):
            total[j] += ts.ckks_vector_from(public_ctx, b)
    result = [t.serialize() for t in total]
    server_cpu = time.process_time() - start
    start = time.process_time()
    mean = np.concatenate([np.array(ts.ckks_vector_from(secret_ctx, b).decrypt()) for b in result]) / len(updates)
    holder_cpu = time.process_time() - start
    err = float(np.max(np.abs(mean - _floor(updates, range(len(updates))))))
    return Result("tenseal", PROTECTS["tenseal"], float(np.median(trainer_cpu)), server_cpu, holder_cpu, 1,
                  int(np.median(sent)), err, len(updates), {"settings": s, "ciphertexts": len(result)})


# ---- sealmesh -------------------------------------------------------------------------

MESH, ROUND = "bench-peers", 1


def run_sealmesh(updates, *, threshold: int = 3, parties: int = 5, key_bits: int = 2048,
                 quant_bits: int = 16, workers: int = 2, dealt=None) -> Result:
    from crypto import contribution, paillier, proofs

    n, params = len(updates), updates[0].size
    public, shares, vks = dealt or paillier.deal(key_bits, threshold, parties)
    layout = contribution.derive_layout(CLIP, quant_bits, n, key_bits)
    count = layout.plaintexts_needed(params)
    offline, online, sent, sealed, contexts = [], [], [], [], []
    for i, update in enumerate(updates):
        context = contribution.context_for(public, MESH, ROUND, f"trainer-{i}")
        start = time.process_time()
        pre = contribution.precompute(public, layout, params, workers=1)
        offline.append(time.process_time() - start)
        start = time.process_time()
        item = contribution.seal(public, layout, update, context, precomputed=pre)
        wire = contribution.encode(public, item)
        online.append(time.process_time() - start)
        sent.append(len(wire))
        sealed.append(wire)
        contexts.append(context)
    verify_cpu = []
    received = []
    start_all = time.process_time()
    for wire, context in zip(sealed, contexts):
        start = time.process_time()
        item = contribution.decode(public, wire)
        contribution.verify(public, layout, item, context, value_count=params)
        verify_cpu.append(time.process_time() - start)
        received.append(item)
    start = time.process_time()
    aggregate = contribution.aggregate(public, received)
    aggregate_cpu = time.process_time() - start
    blocks = contribution.decryption_blocks(count, [sh.index for sh in shares], threshold)

    def block_context(b):
        return proofs.ProofContext(public.n, MESH, ROUND, "committee", b, proofs.PURPOSE_DECRYPTION_SHARE).encode()

    batches = {b: [] for b in range(len(blocks))}
    member_cpu = []
    for share in shares:
        start = time.process_time()
        for b, block in enumerate(blocks):
            if share.index in block.members:
                batches[b].append(paillier.partial_decrypt_many(
                    share, aggregate[block.start:block.stop], block_context(b), workers=workers))
        member_cpu.append(time.process_time() - start)
    start = time.process_time()
    plain = []
    for b, block in enumerate(blocks):
        plain.extend(paillier.combine_many(public, vks, threshold, aggregate[block.start:block.stop],
                                           batches[b], block_context(b), workers=workers))
    mean = contribution.decode_sum(plain, params, n, layout)
    combine_cpu = time.process_time() - start
    validator = time.process_time() - start_all - sum(member_cpu)
    err = float(np.max(np.abs(mean - _floor(updates, range(n)))))
    return Result("sealmesh", PROTECTS["sealmesh"], float(np.median(online)), validator,
                  float(np.median(member_cpu)), parties, int(np.median(sent)), err, n,
                  {"offline_per_trainer_s": float(np.median(offline)),
                   "verify_per_contribution_s": float(np.median(verify_cpu)), "aggregate_s": aggregate_cpu,
                   "combine_decode_s": combine_cpu, "threshold": threshold, "parties": parties,
                   "key_bits": key_bits, "quant_bits": quant_bits, "ciphertexts_per_trainer": count,
                   "error_bound": CLIP / 2 ** (quant_bits - 1)})


# ---- report ---------------------------------------------------------------------------

def run_all(trainers: int, params: int, seed: int, methods=METHODS, dealt=None, log=print) -> dict[str, Result]:
    updates = workload(trainers, params, seed)
    runners = {"plaintext": run_plaintext, "secagg+": run_secaggplus, "tenseal": run_tenseal,
               "sealmesh": lambda u: run_sealmesh(u, dealt=dealt)}
    results = {}
    for name in methods:
        log(f"peers: running {name} ({trainers} x {params})", flush=True)
        results[name] = runners[name](updates)
    return results


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.1f}x"


def print_table(results: dict[str, Result], params: int, trainers: int) -> None:
    floor, ref = results.get("plaintext"), results.get("secagg+")
    print(f"peers: {trainers} trainers x {params} float32 values; CPU seconds; ratios: /plaintext, /secagg+")
    head = (f"{'method':10s} {'trainer_s':>10s} {'validator_s':>11s} {'member_s':>9s} {'round_s':>9s} "
            f"{'MB/trainer':>10s} {'max_err':>9s}  {'vs plain (val, bytes)':>22s} "
            f"{'vs secagg+ (trainer, round, bytes)':>35s}  protects")
    print(head)
    for r in results.values():
        member = f"{r.member_s:9.3f}" if r.member_s is not None else f"{'-':>9s}"
        plain = (f"{_ratio(r.validator_s, floor.validator_s) if floor else '-'}, "
                 f"{_ratio(r.bytes_per_trainer, floor.bytes_per_trainer) if floor else '-'}")
        peer = (f"{_ratio(r.trainer_s, ref.trainer_s) if ref else '-'}, {_ratio(r.round_s(), ref.round_s()) if ref else '-'}, "
                f"{_ratio(r.bytes_per_trainer, ref.bytes_per_trainer) if ref else '-'}")
        print(f"{r.method:10s} {r.trainer_s:10.3f} {r.validator_s:11.3f} {member} {r.round_s():9.3f} "
              f"{r.bytes_per_trainer / 1e6:10.2f} {r.max_err:9.2e}  {plain:>22s} {peer:>35s}  {r.protects}")
    if "sealmesh" in results:
        d = results["sealmesh"].detail
        print(f"peers: sealmesh detail: offline precompute {d['offline_per_trainer_s']:.2f} s per trainer (beside "
              f"training), verify {d['verify_per_contribution_s']:.3f} s per contribution, aggregate "
              f"{d['aggregate_s']:.3f} s, combine+decode {d['combine_decode_s']:.3f} s; "
              f"{d['threshold']}-of-{d['parties']} committee, each member decrypts {d['threshold']}/{d['parties']} "
              f"of {d['ciphertexts_per_trainer']} ciphertexts; error bound {d['error_bound']:.2e}")
    if "secagg+" in results:
        s = results["secagg+"].detail["settings"]
        print(f"peers: secagg+ settings: {s['num_shares']} neighbours, threshold {s['threshold']}, clipping_range "
              f"{s['clipping_range']}, quantization_range 2^{int(math.log2(s['quantization_range']))}, modulus_range "
              f"2^{int(math.log2(s['modulus_range']))}, {s['dropouts']} dropout after key sharing")


def last_line(results: dict[str, Result], params: int, trainers: int) -> str:
    def g(m, attr):
        r = results.get(m)
        return "na" if r is None else (f"{getattr(r, attr):.3f}" if attr != "bytes_per_trainer"
                                       else str(r.bytes_per_trainer))
    return (f"peers params={params} trainers={trainers} sealmesh_trainer_s={g('sealmesh', 'trainer_s')} "
            f"secaggplus_client_s={g('secagg+', 'trainer_s')} tenseal_client_s={g('tenseal', 'trainer_s')} "
            f"sealmesh_validator_s={g('sealmesh', 'validator_s')} secaggplus_server_s={g('secagg+', 'validator_s')} "
            f"tenseal_server_s={g('tenseal', 'validator_s')} sealmesh_bytes={g('sealmesh', 'bytes_per_trainer')} "
            f"secaggplus_bytes={g('secagg+', 'bytes_per_trainer')} tenseal_bytes={g('tenseal', 'bytes_per_trainer')}")


def goals(results: dict[str, Result], params: int) -> list[str]:
    """The issue's goals, measured: where sealmesh stands against SecAgg+ in this run."""
    sm, sp = results.get("sealmesh"), results.get("secagg+")
    if not (sm and sp):
        return []
    per_1m = 1e6 / params
    return [f"peers: goal trainer online <= secagg+ client: {sm.trainer_s:.3f} s vs {sp.trainer_s:.3f} s "
            f"({sm.trainer_s / sp.trainer_s:.1f}x) -> {'met' if sm.trainer_s <= sp.trainer_s else 'NOT met'}",
            f"peers: goal validator+committee <= 10x secagg+ server: {sm.round_s():.2f} s vs {sp.round_s():.3f} s "
            f"({sm.round_s() / sp.round_s():.0f}x) -> {'met' if sm.round_s() <= 10 * sp.round_s() else 'NOT met'}",
            f"peers: sealmesh verify per contribution per 1M values: "
            f"{sm.detail['verify_per_contribution_s'] * per_1m:.2f} s (goal <= 1 s per added trainer per 1M)"]


def sweep(counts: list[int], params: int, seed: int, methods) -> dict:
    from crypto import paillier

    dealt = paillier.deal(2048, 3, 5) if "sealmesh" in methods else None
    rows = {}
    for n in counts:
        results = run_all(n, params, seed, methods, dealt=dealt)
        print_table(results, params, n)
        print(last_line(results, params, n), flush=True)
        rows[n] = results
    print(f"peers: growth, {params} values, CPU seconds, per added trainer scaled to 1M values (least squares)")
    slopes = {}
    for m in methods:
        if m == "plaintext":
            continue
        xs = np.array(counts, dtype=float)
        val = np.array([rows[n][m].validator_s for n in counts])
        rnd = np.array([rows[n][m].round_s() for n in counts])
        v_slope = float(np.polyfit(xs, val, 1)[0]) if len(xs) > 1 else float("nan")
        r_slope = float(np.polyfit(xs, rnd, 1)[0]) if len(xs) > 1 else float("nan")
        k = 1e6 / params
        slopes[m] = {"validator_s_per_trainer_per_1m": v_slope * k, "round_s_per_trainer_per_1m": r_slope * k}
        cells = "  ".join(f"N={n}: val {v:.2f} round {r:.2f}" for n, v, r in zip(counts, val, rnd))
        print(f"peers: growth {m:9s} {cells}  -> validator {v_slope * k:.3f} s, round (validator+committee) "
              f"{r_slope * k:.3f} s per added trainer per 1M values")
    print("peers growth " + " ".join(f"{m.replace('+', 'plus')}_validator_s_per_trainer_per_1m="
                                      f"{v['validator_s_per_trainer_per_1m']:.3f}" for m, v in slopes.items()))
    return {"rows": {n: {m: asdict(r) for m, r in res.items()} for n, res in rows.items()}, "slopes": slopes}


def main(argv=None) -> int:
    args = _parse(argv)
    methods = [m for m in args.methods.split(",") if m]
    out: dict = {"params": args.params, "seed": args.seed}
    if args.sweep:
        out["sweep"] = sweep([int(x) for x in args.sweep.split(",")], args.params, args.seed, methods)
    else:
        results = run_all(args.trainers, args.params, args.seed, methods)
        print_table(results, args.params, args.trainers)
        for line in goals(results, args.params):
            print(line)
        out["trainers"] = args.trainers
        out["results"] = {m: asdict(r) for m, r in results.items()}
        out["last_line"] = last_line(results, args.params, args.trainers)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"peers: results written to {args.json}")
    if not args.sweep:
        print(out["last_line"])
    return 0


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 values per update")
    parser.add_argument("--trainers", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="100,000 values per update")
    parser.add_argument("--sweep", default="", help="comma-separated trainer counts, e.g. 3,10,30: prints the growth")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--json", default="", help="write the results as JSON to this path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.params = 100_000
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {','.join(sorted(unknown))}; choose from {','.join(METHODS)}")
    return args


if __name__ == "__main__":
    sys.exit(main())
