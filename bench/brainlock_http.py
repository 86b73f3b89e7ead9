"""The Brainlock HTTP path's overhead over the libp2p path, for one challenge of the tiny
synthetic CNV (issue 13): the same miner, the same validator keys, the same input, one
process.

    .venv/bin/python bench/brainlock_http.py [--iterations 2] [--repeat 2] [--bundle DIR]

Three times per repeat, in this order:
  bare     FheEngine.run_chained on the miner's engine (no protocol at all)
  frame    the libp2p protocol's miner side: a sealed ChallengeRequest frame through
           MinerService.handle_frame (open_frame, keyring, engine, seal_frame), as the
           libp2p stream handler calls it; the libp2p transport itself (noise, yamux) is
           not in it, and its iterations re-run one input (that protocol does not chain)
  http     BrainlockClient.compute against BrainlockHttp on 127.0.0.1: Epistula headers,
           multipart body, chained iterations streamed chunk by chunk, Brainlock's check
The ratio printed is http / frame (medians). FHE time dominates all three.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "synthetic-cnv-tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--bundle", type=Path, default=None, help="a compiled synthetic-cnv-tiny bundle dir")
    args = parser.parse_args()

    import numpy as np
    import trio

    from crypto.identity import Hotkey
    from fhe.bundle import ValidatorClient
    from node.fhe_service import FheConfig, ensure_bundle, now_ms
    from node.metrics import NodeMetrics
    from node.roles.base import RoleContext
    from node.roles.brainlock_http import BrainlockClient, BrainlockHttp
    from node.roles.miner import MinerService
    from node.settings import NodeSettings
    from protocol.challenge_messages import (AddKey, ChallengeRequest, ChallengeResponse, KeyAdded, open_frame,
                                             seal_frame)
    from protocol.epistula import EnvelopeVerifier
    from protocol.membership import Member, Role, StaticDirectory

    work = Path(tempfile.mkdtemp(prefix="bench-brainlock-"))
    bundle = args.bundle or work / f"bundle-{MODEL}"
    ensure_bundle(MODEL, bundle)
    miner_key, validator_key = Hotkey.from_uri("//BenchMiner"), Hotkey.from_uri("//BenchValidator")
    directory = StaticDirectory((Member(miner_key.ss58_address, frozenset({Role.MINER})),
                                 Member(validator_key.ss58_address, frozenset({Role.VALIDATOR}), stake=1000.0)))
    settings = NodeSettings(role=Role.MINER, data_dir=work / "miner")
    miner = MinerService(settings, FheConfig(model=MODEL, bundle_dir=str(bundle), max_challenges_per_epoch=1000))
    miner.ctx = RoleContext(settings=settings, hotkey=miner_key, genesis=None, mesh=None, store=None,
                            verifier=EnvelopeVerifier(directory, miner_key.ss58_address), metrics=NodeMetrics(),
                            data_dir=settings.data_dir, publish=None, peer_of=lambda hotkey: None)
    server = BrainlockHttp(miner, "127.0.0.1", 0)
    up, state = threading.Event(), {}

    async def serve():
        await miner._load()
        async with trio.open_nursery() as nursery:
            state["port"] = await nursery.start(server.serve)
            state["stop"], state["token"] = trio.Event(), trio.lowlevel.current_trio_token()
            up.set()
            await state["stop"].wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=lambda: trio.run(serve), daemon=True)
    thread.start()
    if not up.wait(600):
        raise SystemExit("the miner did not start")
    on_trio = lambda fn, *a: trio.from_thread.run(fn, *a, trio_token=state["token"])  # noqa: E731

    client = ValidatorClient(bundle, work / "keys")
    keys = client.evaluation_keys()
    x = np.random.default_rng(5).uniform(0.0, 1.0, client.input_shape).astype(np.float32)
    ciphertext = client.encrypt(x)
    answer_verifier = EnvelopeVerifier(directory, validator_key.ss58_address)

    def frame(message, payload):
        raw = on_trio(miner.handle_frame, seal_frame(validator_key, message, payload, now_ms=now_ms(),
                                                     signed_for=miner_key.ss58_address))
        return open_frame(raw, verifier=answer_verifier, now_ms=now_ms(),
                          expect=(KeyAdded, ChallengeResponse))

    key_added, _ = frame(AddKey.for_keys(MODEL, keys), keys)
    http = BrainlockClient(validator_key, miner_key.ss58_address, "127.0.0.1", state["port"])
    uid = http.add_key(keys)  # the same keys: the same key id on the miner
    assert server.uids[uid].key_id == key_added.message.key_id

    times: dict[str, list[float]] = {"bare": [], "frame": [], "http": []}
    for repeat in range(args.repeat):
        started = time.perf_counter()
        miner.engine.run_chained(validator_key.ss58_address, key_added.message.key_id, ciphertext, args.iterations,
                                 lambda *_: None)
        times["bare"].append(time.perf_counter() - started)
        request = ChallengeRequest.for_input(f"{repeat:032x}", 0, MODEL, key_added.message.key_id, args.iterations,
                                             ciphertext)
        started = time.perf_counter()
        verified, result = frame(request, ciphertext)
        times["frame"].append(time.perf_counter() - started)
        assert isinstance(verified.message, ChallengeResponse) and result
        started = time.perf_counter()
        streamed = http.compute(uid, ciphertext, args.iterations, max_chunk_bytes=client.max_result_bytes)
        times["http"].append(time.perf_counter() - started)
        assert len(streamed.chunks) == args.iterations
        print(f"repeat {repeat + 1}: bare {times['bare'][-1]:.3f} s, frame {times['frame'][-1]:.3f} s, "
              f"http {times['http'][-1]:.3f} s (first chunk at {streamed.arrivals_s[0]:.3f} s, "
              f"{len(streamed.chunks[0])} bytes a chunk)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{MODEL}, {args.iterations} iterations, median of {args.repeat}: bare run_chained {med['bare']:.3f} s, "
          f"libp2p frame path {med['frame']:.3f} s, brainlock http {med['http']:.3f} s; "
          f"http / frame = {med['http'] / med['frame']:.3f}, http - frame = {med['http'] - med['frame']:+.3f} s, "
          f"per iteration http {med['http'] / args.iterations:.3f} s")
    trio.from_thread.run_sync(state["stop"].set, trio_token=state["token"])
    thread.join(30)


if __name__ == "__main__":
    main()
