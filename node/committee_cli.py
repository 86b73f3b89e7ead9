"""`sealmesh committee deal`: a trusted dealer's committee key for a real mesh.

The committee is the genesis file's validators, sorted by hotkey (the order the round
code and `sealmesh testnet` use: member i holds share i). The dealer writes

    DIR/<validator name or hotkey>/   committee.json, public.msgpack, share.msgpack (0600)
    DIR/public/                       committee.json, public.msgpack: trainers, everyone else

and each goes to one machine's `<node data dir>/committee` (node.committee.COMMITTEE_DIR).
The process that deals sees every share, so this is for meshes that accept a trusted
dealer; the dealer-free alternative is `sealmesh committee keygen` (node/keygen_cli.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from protocol.committee_rules import committee_shape_problem, committee_size_problem

PUBLIC_DIR = "public"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

EXAMPLES = """\
examples:
  sealmesh committee deal --genesis genesis.json --out committee-dealt
  sealmesh committee deal --genesis genesis.json --out committee-dealt --threshold 3 --bits 3072
"""


class DealError(Exception):
    """What the operator should fix; printed as one line, exit status 2."""


def add_deal_command(committee_commands: argparse._SubParsersAction) -> None:
    deal = committee_commands.add_parser(
        "deal", help="a trusted dealer's key for the genesis file's validators: one directory per "
                     "validator and a public one for everyone else",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Deal the committee's threshold Paillier key to the genesis file's validators. "
                    "This process sees every share: use it only for a mesh whose members trust "
                    "whoever runs it (else: sealmesh committee keygen, no dealer).")
    deal.add_argument("--genesis", type=Path, required=True, help="the mesh's genesis file")
    deal.add_argument("--out", type=Path, required=True, help="new (or empty) directory to write")
    deal.add_argument("--threshold", type=int,
                      help="members needed to decrypt (default: a strict majority, n//2+1)")
    deal.add_argument("--bits", type=int, default=2048, choices=[1024, 2048, 3072],
                      help="modulus size (default %(default)s; 1024 only for tests)")
    deal.add_argument("--min-contributors", type=int,
                      help="fewest updates a round may decrypt the sum of (default: RoundPolicy's, 2)")
    deal.add_argument("--max-contributors", type=int,
                      help="most updates per round; fixes the packing layout (default: RoundPolicy's, 16)")
    deal.add_argument("--insecure-small-committee", action="store_true",
                      help="write a committee of fewer than 3 members or threshold 1, which can "
                           "decrypt single updates (test meshes only)")


def run_committee_deal(args: argparse.Namespace) -> int:
    try:
        plan = _plan(args)
        print(_deal(args, *plan))
    except DealError as exc:
        print(f"sealmesh: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace):
    """(genesis, validators, threshold, policy) once every input checks out."""
    from node.registry.genesis import GenesisError, load_genesis
    from protocol.aggregation import RoundPolicy
    from protocol.membership import Role

    try:
        genesis = load_genesis(args.genesis)
    except GenesisError as exc:
        raise DealError(str(exc)) from exc
    validators = sorted(m.hotkey for m in genesis.members if Role.VALIDATOR in m.roles)
    threshold = len(validators) // 2 + 1 if args.threshold is None else args.threshold
    shape = committee_shape_problem(len(validators), threshold)
    if shape is not None:
        raise DealError(f"{args.genesis}: {shape}")
    small = committee_size_problem(len(validators), threshold)
    if small is not None and not args.insecure_small_committee:
        fix = f"add validators to {args.genesis}" if len(validators) < 3 else "raise --threshold"
        raise DealError(f"{small}; {fix}, or pass --insecure-small-committee for a test mesh")
    defaults = RoundPolicy()
    policy = RoundPolicy(min_contributors=_or(args.min_contributors, defaults.min_contributors),
                         max_contributors=_or(args.max_contributors, defaults.max_contributors))
    if policy.problem():
        raise DealError(f"round policy: {policy.problem()} (--min-contributors, --max-contributors)")
    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DealError(f"{out} exists and is not an empty directory; choose a new --out "
                        "(a second deal would be another key)")
    return genesis, validators, threshold, policy


def _or(value, default):
    return default if value is None else value


def directory_names(genesis, validators: list[str]) -> dict[str, str]:
    """hotkey -> directory name: the genesis name when it is a safe, unique file name."""
    names = dict(genesis.names)
    wanted = {h: names.get(h, h) for h in validators}
    counts: dict[str, int] = {}
    for name in wanted.values():
        counts[name] = counts.get(name, 0) + 1
    return {h: (n if _SAFE_NAME.match(n) and counts[n] == 1 and n != PUBLIC_DIR else h)
            for h, n in wanted.items()}


def _deal(args: argparse.Namespace, genesis, validators: list[str], threshold: int, policy) -> str:
    from dataclasses import replace

    from node import committee as cm

    keys = cm.deal_committee(validators, args.bits, threshold)
    keys = [replace(k, round_policy=policy) for k in keys]
    out, names = args.out, directory_names(genesis, validators)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for key in keys:
        hotkey = key.members[key.share.index - 1]
        (out / names[hotkey]).mkdir(mode=0o700)
        cm.save_committee(out / names[hotkey], key)
    cm.save_committee(out / PUBLIC_DIR, cm.public_part(keys[0]))
    key, n = keys[0], len(validators)
    lines = [f"dealt a {threshold}-of-{n} committee key ({args.bits} bits) for mesh {genesis.mesh_id!r}, "
             f"public key id {key.public_key_id[:16]}, min_contributors {policy.min_contributors}, "
             f"max_contributors {policy.max_contributors}",
             "TRUSTED DEALER: this process saw every share; whoever ran it could decrypt every update. "
             "Use it only for a mesh that accepts a trusted dealer (else: sealmesh committee keygen).",
             f"copy each directory to that machine's <node data dir>/{cm.COMMITTEE_DIR} "
             "(e.g. ~/.sealmesh/node/committee):"]
    for index, hotkey in enumerate(validators, start=1):
        lines.append(f"  {out / names[hotkey]}  ->  validator {genesis.name_of(hotkey)} ({hotkey}), share {index}; "
                     "secret: copy it privately, then delete it here")
    lines.append(f"  {out / PUBLIC_DIR}  ->  every trainer (and any other node); no share")
    small = committee_size_problem(n, threshold)
    if small is not None:
        warning = (f"WARNING: INSECURE committee: {small}. Its nodes load it only with "
                   "--insecure-small-committee (node.toml: insecure_small_committee = true).")
        print(warning, file=sys.stderr)
        lines.append(warning)
    return "\n".join(lines)


__all__ = ["DealError", "PUBLIC_DIR", "add_deal_command", "directory_names", "run_committee_deal"]
