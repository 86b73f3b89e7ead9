"""Wall time of a private training round, by phase, on the demo mesh (CPU).

Starts `sealmesh testnet` (node processes on 127.0.0.1: the tiny model, the demo corpus,
a dealt committee key), runs the rounds and reads report.json's "training" section:

  collect    RoundOpen -> deadline: a fixed window (trainers train, seal, publish)
  trainer    the trainers' own work inside it: fetch, train K steps, seal (max over trainers)
  aggregate  accepted contributions multiplied
  decrypt    agreement -> final: partial decryptions, their verification, combine
  combine    t batches per block combined, mean decoded, outer step, adapter stored
  evaluate   held-out loss before and after (not part of the round's critical path)

The secure part is compared with the baseline measured in the same run, the trainers'
plain training time: `secure/train` says what privacy costs per round.

    .venv/bin/python bench/round.py --trainers 2 --validators 2 --key-bits 1024

Last line: `round trainers=T seconds=x loss_before=a loss_after=b` (the last round).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testnet import TestnetPlan, run_testnet  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--validators", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--key-bits", type=int, default=1024, choices=[1024, 2048, 3072])
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--dir", type=Path, default=None, help="testnet directory (default: a temp dir)")
    args = parser.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="sealmesh-bench-round-"))
    plan = TestnetPlan(trainers=args.trainers, validators=args.validators, miners=0, pings=0,
                       rounds=args.rounds, key_bits=args.key_bits, directory=directory, timeout_s=args.timeout)
    code = run_testnet(plan)
    report = json.loads((directory / "report.json").read_text())
    training = report["training"]
    rounds = [r for r in training["rounds"] if r.get("complete")]
    if code != 0 or len(rounds) != args.rounds:
        print(f"bench: rounds incomplete: {training['problems']}", file=sys.stderr)
        return 1
    print(f"{'round':>5} {'collect':>8} {'trainer':>8} {'aggregate':>9} {'decrypt':>8} {'partial':>8} "
          f"{'combine':>8} {'evaluate':>8} {'secure/train':>12} {'loss':>16}")
    for r in rounds:
        s = r["seconds"]
        trainer = max((t.get("work_s", 0.0) for ts in training["trainers"].values() for t in ts
                       if t["round"] == r["round"]), default=0.0)
        secure = s.get("aggregate", 0.0) + s.get("decrypt", 0.0)
        ratio = f"{secure / trainer:.2f}" if trainer else "-"
        print(f"{r['round']:>5} {s.get('collect', 0):>8.2f} {trainer:>8.2f} {s.get('aggregate', 0):>9.3f} "
              f"{s.get('decrypt', 0):>8.2f} {s.get('partial_decrypt', 0):>8.2f} {s.get('combine', 0):>8.2f} "
              f"{s.get('evaluate', 0):>8.2f} {ratio:>12} {r['loss_before']:>7.4f}->{r['loss_after']:.4f}")
    last = rounds[-1]
    s = last["seconds"]
    seconds = s.get("collect", 0.0) + s.get("aggregate", 0.0) + s.get("decrypt", 0.0)
    print(f"round trainers={args.trainers} seconds={seconds:.2f} loss_before={last['loss_before']:.4f} "
          f"loss_after={last['loss_after']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
