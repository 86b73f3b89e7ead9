"""FHE challenge latency through a miner vs the bare Concrete-ML server, in one run.

    .venv/bin/python bench/fhe.py [--model digits-cnn] [--runs 3] [--bundle DIR]

Measures, on this machine and in this process:
- compile time (skipped with --bundle, which reuses a compiled bundle), key generation
  time and evaluation key size;
- the evaluation key upload over the FHE stream protocol (once per miner);
- per challenge: the validator's view through a real miner (two libp2p hosts on
  127.0.0.1, MinerService behind FHE_PROTOCOL, signed frames both ways, timed from send
  to answer as node/roles/challenger.py does) against FHEModelServer.run on the same
  input with the same keys (serialized input in, serialized result out, keys already in
  memory as any server keeps them), each in a worker thread, alternating which goes
  first so load drift hits both. overhead_pct is the median of the paired ratios
  miner/bare (per run), miner_s and bare_s the medians of each path.

Goal: overhead_pct <= 5. Last line:
    fhe model=NAME miner_s=x bare_s=y overhead_pct=z

Chainable models (synthetic-cnv, synthetic-cnv-tiny: output shaped like the input) take
another path, `--iterations` (default 5) chained runs per challenge:
- bare: FHEModelServer.run on the serialized input, then on its own serialized output,
  and so on, as a Brainlock miner streams one chunk per iteration (keys deserialized
  once, as above);
- miner: the miner's FheEngine (fhe/engine.py, what MinerService calls) with the same
  iteration count, timed whole and divided by it. The engine (today) re-runs the same
  input instead of chaining; the circuit and its cost per run are the same.
Per iteration, the chained outputs are decrypted and compared with the clear integer
chain (fhe.zoo.chained_reference). Their results (tens of MB at 32x32) are above the
libp2p challenge's MAX_RESULT_BYTES, so no libp2p path is timed for them. Last line:
    fhe-chain model=NAME iterations=N miner_iter_s=x bare_iter_s=y ratio=z
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto.identity import Hotkey  # noqa: E402
from node.fhe_service import FheConfig, ensure_bundle, exchange  # noqa: E402
from node.mesh import Mesh, MeshConfig  # noqa: E402
from node.metrics import NodeMetrics  # noqa: E402
from node.roles.base import RoleContext  # noqa: E402
from node.roles.miner import MinerService  # noqa: E402
from node.settings import NodeSettings  # noqa: E402
from protocol.challenge_messages import FHE_PROTOCOL, MAX_REQUEST_BYTES, AddKey, ChallengeRequest, \
    ChallengeResponse, KeyAdded  # noqa: E402
from protocol.epistula import EnvelopeVerifier  # noqa: E402
from protocol.membership import Member, Role, StaticDirectory  # noqa: E402

MINER, VALIDATOR = Hotkey.from_uri("//BenchMiner"), Hotkey.from_uri("//BenchValidator")
DIRECTORY = StaticDirectory((Member(MINER.ss58_address, frozenset({Role.MINER})),
                             Member(VALIDATOR.ss58_address, frozenset({Role.VALIDATOR}))))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--runs", type=int, default=6, help="challenges through each path")
    parser.add_argument("--bundle", type=Path, help="reuse this compiled bundle (no compile timing)")
    parser.add_argument("--iterations", type=int, default=5, help="chained runs (chainable models)")
    return parser.parse_args()


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, float | None]:
    if args.bundle is not None:
        ensure_bundle(args.model, args.bundle)
        return args.bundle, None
    started = time.monotonic()
    ensure_bundle(args.model, work / "bundle")
    return work / "bundle", time.monotonic() - started


async def bench(args: argparse.Namespace, bundle: Path, work: Path) -> dict[str, float | list[float]]:
    from concrete import fhe
    from concrete.ml.deployment import FHEModelServer

    from fhe.bundle import ValidatorClient
    from fhe.inputs import draw_challenge_input

    client = ValidatorClient(bundle, work / "keys")
    started = time.monotonic()
    await trio.to_thread.run_sync(client.ensure_keys)
    eval_keys = await trio.to_thread.run_sync(client.evaluation_keys)
    keygen_s = time.monotonic() - started
    bare_server = FHEModelServer(str(bundle))
    bare_keys = fhe.EvaluationKeys.deserialize(eval_keys)

    settings = NodeSettings(role=Role.MINER, data_dir=work / "miner")
    miner = MinerService(settings, FheConfig(model=args.model, bundle_dir=str(bundle),
                                             max_challenges_per_epoch=args.runs + 1))
    validator_verifier = EnvelopeVerifier(DIRECTORY, VALIDATOR.ss58_address)
    async with Mesh.open(MeshConfig(mesh_id="bench-fhe"), os.urandom(32)) as miner_mesh:
        miner.ctx = RoleContext(settings=settings, hotkey=MINER, genesis=None, mesh=miner_mesh, store=None,
                                verifier=EnvelopeVerifier(DIRECTORY, MINER.ss58_address), metrics=NodeMetrics(),
                                data_dir=work / "miner", publish=None, peer_of=lambda hotkey: None)
        miner_mesh.set_stream_handler(FHE_PROTOCOL, miner.handle_stream, MAX_REQUEST_BYTES)
        await miner._load()
        async with Mesh.open(MeshConfig(mesh_id="bench-fhe", bootstrap=(miner_mesh.listen_addrs[0],)),
                             os.urandom(32)) as validator_mesh:

            async def ask(message, payload: bytes, expect, timeout_s: float = 300):
                return await exchange(validator_mesh, VALIDATOR, validator_verifier, peer_id=miner_mesh.peer_id,
                                      peer_hotkey=MINER.ss58_address, message=message, payload=payload,
                                      expect=expect, timeout_s=timeout_s)

            started = time.monotonic()
            answer, _ = await ask(AddKey.for_keys(args.model, eval_keys), eval_keys, (KeyAdded,))
            upload_s = time.monotonic() - started
            key_id = hashlib.sha256(eval_keys).hexdigest()
            miner_s, bare_s = [], []
            for i in range(args.runs):
                drawn = draw_challenge_input(args.model, 1000 + i)
                ciphertext = client.encrypt(drawn.image)
                request = ChallengeRequest.for_input(f"{i:032x}", 0, args.model, key_id, 1, ciphertext)

                async def through_miner() -> bytes:
                    started = time.monotonic()
                    answer, result = await ask(request, ciphertext, (ChallengeResponse,))
                    miner_s.append(time.monotonic() - started)
                    return result

                async def bare() -> bytes:
                    started = time.monotonic()
                    result = await trio.to_thread.run_sync(bare_server.run, ciphertext, bare_keys)
                    bare_s.append(time.monotonic() - started)
                    return result

                order = (through_miner, bare) if i % 2 == 0 else (bare, through_miner)
                results = [await run() for run in order]
                for result in results:  # both paths computed the right thing
                    comparison = client.compare(result, drawn.image)
                    if not comparison.argmax_match:
                        print(f"warning: run {i} disagrees with the clear reference (cosine "
                              f"{comparison.cosine:.3f}); PBS errors at p_error", file=sys.stderr)
    return {"keygen_s": keygen_s, "eval_key_bytes": len(eval_keys), "upload_s": upload_s,
            "miner_s": miner_s, "bare_s": bare_s}




def bench_chained(args: argparse.Namespace, bundle: Path, work: Path) -> dict[str, object]:
    """Chained iterations: the miner's FheEngine beside bare FHEModelServer.run, per run
    alternating which goes first so load drift hits both."""
    from concrete import fhe
    from concrete.ml.common.serialization.loaders import loads
    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    from fhe.bundle import REFERENCE_JSON, cosine_similarity, load_manifest
    from fhe.engine import FheEngine
    from fhe.inputs import draw_challenge_input
    from fhe.zoo import chained_reference

    manifest = load_manifest(bundle)
    client = FHEModelClient(str(bundle), key_dir=None)
    started = time.monotonic()
    client.generate_private_and_evaluation_keys()
    eval_keys = client.get_serialized_evaluation_keys()
    keygen_s = time.monotonic() - started
    bare_server = FHEModelServer(str(bundle))
    bare_keys = fhe.EvaluationKeys.deserialize(eval_keys)  # in memory, as any server keeps them
    started = time.monotonic()
    engine = FheEngine(bundle, manifest.server_sha256, max_iterations=args.iterations,
                       timeout_s=3600.0, key_cache_bytes=4 * len(eval_keys))
    key_id = engine.add_key(VALIDATOR.ss58_address, eval_keys)
    engine_load_s = time.monotonic() - started  # includes deriving the key layout (a child keygen)
    module = loads((bundle / REFERENCE_JSON).read_text())
    miner_iter_s: list[float] = []
    bare_iter_s: list[float] = []
    agreement: list[list[float]] = []
    sizes: dict[str, int] = {}
    for i in range(args.runs):
        x = draw_challenge_input(args.model, 1000 + i).image[None]
        ciphertext = client.quantize_encrypt_serialize(x)
        sizes["ciphertext_bytes"] = len(ciphertext)

        def bare() -> None:
            value, outputs = ciphertext, []
            for _ in range(args.iterations):
                started = time.monotonic()
                value = bare_server.run(value, bare_keys)
                bare_iter_s.append(time.monotonic() - started)
                outputs.append(value)
            sizes["result_bytes"] = len(value)
            expected = chained_reference(module, x, args.iterations)
            decrypted = [client.deserialize_decrypt_dequantize(out) for out in outputs]
            agreement.append([round(float(np.isclose(d, e).mean()), 3) for d, e in zip(decrypted, expected)])
            print(f"run {i}: chained exact fraction per iteration {agreement[-1]}, cosine of the first "
                  f"{cosine_similarity(decrypted[0], expected[0]):.4f}", file=sys.stderr)

        def miner() -> None:
            started = time.monotonic()
            engine.run(VALIDATOR.ss58_address, key_id, ciphertext, iterations=args.iterations)
            miner_iter_s.append((time.monotonic() - started) / args.iterations)

        for run in ((bare, miner) if i % 2 == 0 else (miner, bare)):
            run()
    return {"keygen_s": keygen_s, "eval_key_bytes": len(eval_keys), "engine_load_s": engine_load_s,
            "miner_iter_s": miner_iter_s, "bare_iter_s": bare_iter_s, "agreement": agreement,
            "pbs": manifest.pbs_count, **sizes}


def main_chained(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)  # compile: see fhe/compile.py
    with tempfile.TemporaryDirectory(prefix="bench-fhe-") as tmp:
        work = Path(tmp)
        bundle, compile_s = prepare(args, work)
        r = bench_chained(args, bundle, work)
    miner_s, bare_s = statistics.median(r["miner_iter_s"]), statistics.median(r["bare_iter_s"])
    print(f"compile_s={'reused' if compile_s is None else f'{compile_s:.2f}'} keygen_s={r['keygen_s']:.2f} "
          f"eval_key_bytes={r['eval_key_bytes']} engine_load_s={r['engine_load_s']:.2f} pbs={r['pbs']} "
          f"ciphertext_bytes={r['ciphertext_bytes']} result_bytes={r['result_bytes']} cores={os.cpu_count()} "
          f"load1={os.getloadavg()[0]:.1f}")
    print("per-iteration miner_s:", " ".join(f"{t:.3f}" for t in r["miner_iter_s"]))
    print("per-iteration bare_s: ", " ".join(f"{t:.3f}" for t in r["bare_iter_s"]))
    print(f"fhe-chain model={args.model} iterations={args.iterations} miner_iter_s={miner_s:.3f} "
          f"bare_iter_s={bare_s:.3f} ratio={miner_s / bare_s:.3f}")


def main() -> None:
    args = parse_args()
    from fhe.zoo import get_model

    spec = get_model(args.model)
    if spec.output_shape is not None and spec.output_shape == spec.input_shape:
        main_chained(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-fhe-") as tmp:
        work = Path(tmp)
        bundle, compile_s = prepare(args, work)
        r = trio.run(bench, args, bundle, work)
    miner_s, bare_s = statistics.median(r["miner_s"]), statistics.median(r["bare_s"])
    # Paired: each run's two paths ran back to back on the same input, so their ratio
    # cancels most of the load drift that other processes on a shared machine cause.
    overhead = 100.0 * (statistics.median(m / b for m, b in zip(r["miner_s"], r["bare_s"])) - 1.0)
    print(f"compile_s={'reused' if compile_s is None else f'{compile_s:.2f}'} keygen_s={r['keygen_s']:.2f} "
          f"eval_key_bytes={r['eval_key_bytes']} key_upload_s={r['upload_s']:.2f} cores={os.cpu_count()} "
          f"load1={os.getloadavg()[0]:.1f}")
    print("per-challenge miner_s:", " ".join(f"{t:.3f}" for t in r["miner_s"]))
    print("per-challenge bare_s: ", " ".join(f"{t:.3f}" for t in r["bare_s"]))
    print(f"fhe model={args.model} miner_s={miner_s:.3f} bare_s={bare_s:.3f} overhead_pct={overhead:.1f}")


if __name__ == "__main__":
    main()
