"""`sealmesh committee keygen ...`: the dealer-free key ceremony from the command line.

One member:   --index I --members SS58@host:port,... --wallet-name W [--hotkey H]
              --threshold T --bits B --out DIR
All, locally: --local N --threshold T --bits B --out DIR   (DIR/member-1 .. member-N)

A finished member's DIR is a complete committee directory (committee.json with the
round policy, public.msgpack, member_key.msgpack as the share): copy it to that
validator's <node data dir>/committee. DIR/public (no share) goes to every trainer.

Exit status: 0 finished (or already finished), 1 the ceremony failed (the state file and
the log say why), 2 bad usage, 130 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

PUBLIC_DIR = "public"  # in each member's --out: the committee files without a share

EXAMPLES = """\
examples:
  sealmesh committee keygen --local 3 --threshold 2 --bits 2048 --out committee-key
  sealmesh committee keygen --index 1 --wallet-name alice --hotkey default \\
      --members 5Grw...@10.0.0.1:8801,5FHn...@10.0.0.2:8801,5DAA...@10.0.0.3:8801 \\
      --threshold 2 --bits 2048 --out ~/.sealmesh/committee-key
"""


def build_keygen_parser(prog: str = "sealmesh committee keygen") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Make the committee's threshold Paillier key without a dealer (TNO's "
                    "distributed key generation, semi-honest members, n >= 2·threshold - 1). "
                    "Every member runs this at the same time; nobody ever holds the whole key.")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--index", type=int, help="this member's 1-based position in --members")
    who.add_argument("--local", type=int, metavar="N",
                     help="run all N members as processes on 127.0.0.1 (tests, demos)")
    parser.add_argument("--members", help="SS58hotkey@host:port of every member, comma-separated, "
                                          "in the same order on every member (with --index); "
                                          "each member's messages must be signed by its hotkey")
    parser.add_argument("--wallet-name", help="btcli wallet holding this member's hotkey "
                                              "(with --index)")
    parser.add_argument("--hotkey", default="default", help="btcli hotkey name (default %(default)s)")
    parser.add_argument("--wallet-path", type=Path, default=Path("~/.bittensor/wallets"),
                        help="btcli wallets directory (default %(default)s)")
    parser.add_argument("--listen", help="host:port to bind instead of this member's --members "
                                         "entry (behind NAT or a port forward)")
    parser.add_argument("--threshold", type=int,
                        help="members needed to decrypt (default: the most TNO allows, (n+1)/2)")
    parser.add_argument("--bits", type=int, default=2048, help="modulus size (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for state.json and the key files (0600)")
    parser.add_argument("--min-contributors", type=int,
                        help="committee.json's round policy: fewest updates a round decrypts the sum "
                             "of (default 2); the same on every member")
    parser.add_argument("--max-contributors", type=int,
                        help="committee.json's round policy: most updates per round (default 16); "
                             "the same on every member")
    parser.add_argument("--allow-weak", action="store_true",
                        help="admit key sizes below 2048 bits (tests and measurements only)")
    parser.add_argument("--timeout", type=float, default=7200.0,
                        help="seconds before the whole ceremony gives up (default %(default)s)")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds to wait on a member whose port refuses connections "
                             "before failing (default %(default)s)")
    parser.add_argument("--join-timeout", type=float, default=300.0,
                        help="the same while members are still starting (default %(default)s)")
    parser.add_argument("--heartbeat", type=float, default=5.0,
                        help="seconds between progress lines and state updates")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="TNO p, q candidates per round (default %(default)s)")
    parser.add_argument("--restart", action="store_true",
                        help="start a new ceremony after a crashed or failed one (a finished "
                             "one is never redone)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def keygen_main(argv: list[str] | None = None) -> int:
    parser = build_keygen_parser()
    args = parser.parse_args(argv)
    from node.progress import ProgressLogHandler
    # The ceremony's progress line (on a terminal) stays below the log records.
    logging.basicConfig(level=args.log_level, handlers=[ProgressLogHandler(sys.stderr)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported after parsing so `--help` stays fast (the ceremony pulls in TNO and sympy).
    from crypto.dkg import DkgError
    from node import keygen

    try:
        policy = _round_policy(args)
        if args.local is not None:
            return _run_local(args, policy)
        if not args.members:
            parser.error("--index needs --members SS58@host:port,...")
        hotkeys, members = keygen.parse_members(args.members)
        if not args.wallet_name:
            raise keygen.KeygenError("--index needs --wallet-name (and --hotkey): this member "
                                     "signs every ceremony message with it", reason="usage")
        settings = keygen.KeygenSettings(
            index=args.index, members=members, hotkeys=hotkeys,
            hotkey=_load_hotkey(args), listen=_listen(args.listen),
            threshold=args.threshold or (len(members) + 1) // 2, bits=args.bits,
            out_dir=args.out.expanduser(), allow_weak=args.allow_weak, timeout_s=args.timeout,
            stall_timeout_s=args.stall_timeout, join_timeout_s=args.join_timeout,
            heartbeat_s=args.heartbeat, batch_size=args.batch_size, restart=args.restart)
        summary = keygen.run_member(settings)
        summary = {**summary, **_write_committee(settings.out_dir, hotkeys, policy)}
    except keygen.CeremonyInterrupted as exc:
        print(f"keygen: {exc}", file=sys.stderr)
        return 130
    except (keygen.KeygenError, DkgError) as exc:
        print(f"keygen: {exc} [{exc.reason}]", file=sys.stderr)
        return 2 if exc.reason in ("usage", "parameters") else 1
    print(json.dumps({**keygen.describe(summary), "committee_dir": summary["committee_dir"],
                      "public_dir": summary["public_dir"]}, sort_keys=True))
    return 0


def _round_policy(args: argparse.Namespace):
    from node import keygen
    from protocol.aggregation import RoundPolicy

    defaults = RoundPolicy()
    policy = RoundPolicy(
        min_contributors=defaults.min_contributors if args.min_contributors is None else args.min_contributors,
        max_contributors=defaults.max_contributors if args.max_contributors is None else args.max_contributors)
    if policy.problem():
        raise keygen.KeygenError(f"round policy: {policy.problem()} (--min-contributors, --max-contributors)",
                                 reason="usage")
    return policy


def _write_committee(member_dir: Path, hotkeys, policy) -> dict[str, str]:
    """The node's committee files beside a finished ceremony's result, and DIR/public for
    everyone outside the committee; the same files `sealmesh committee deal` writes."""
    from node import committee as cm

    try:
        key = cm.save_ceremony_committee(member_dir, hotkeys, policy)
        cm.save_committee(member_dir / PUBLIC_DIR, cm.public_part(key))
    except cm.CommitteeKeyError as exc:
        from node import keygen
        raise keygen.KeygenError(str(exc), reason="result") from exc
    print(f"keygen: copy {member_dir} to this validator's <node data dir>/{cm.COMMITTEE_DIR}; "
          f"{member_dir / PUBLIC_DIR} (no share) to every trainer's", file=sys.stderr)
    return {"committee_dir": str(member_dir), "public_dir": str(member_dir / PUBLIC_DIR)}


def _load_hotkey(args: argparse.Namespace):
    from node import keygen
    from node.wallet import WalletError, load_hotkey

    try:
        return load_hotkey(args.wallet_name, args.hotkey, args.wallet_path)
    except WalletError as exc:
        raise keygen.KeygenError(str(exc), reason="usage") from exc


def _listen(text: str | None) -> tuple[str, int] | None:
    from node import keygen

    if text is None:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise keygen.KeygenError(f"--listen {text!r} is not host:port", reason="usage")
    return host, int(port)


def _run_local(args: argparse.Namespace, policy) -> int:
    from node import keygen as kg

    if args.members:
        print("keygen: --local picks its own loopback ports; drop --members", file=sys.stderr)
        return 2
    n = args.local
    local = kg.LocalCeremony(
        n_parties=n, threshold=args.threshold or (n + 1) // 2, bits=args.bits,
        out_dir=args.out.expanduser(), allow_weak=args.allow_weak, timeout_s=args.timeout,
        stall_timeout_s=args.stall_timeout, heartbeat_s=args.heartbeat,
        batch_size=args.batch_size, restart=args.restart)
    result = kg.run_local(local)
    keys = ("status", "phase", "elapsed_s", "protocol_s", "tno_rounds", "round", "error",
            "modulus_bits")
    report = {"ok": result["ok"], "failed": result["failed"],
              "members": {i: {k: s.get(k) for k in keys} for i, s in result["members"].items()}}
    if result["ok"]:  # the roster: member I's hotkey holds share I
        hotkeys = [kg.local_hotkey(local.out_dir, i).ss58_address for i in range(1, n + 1)]
        for i in range(1, n + 1):
            report["members"][i]["committee_dir"] = _write_committee(
                kg.member_dir(local.out_dir, i), hotkeys, policy)["committee_dir"]
    print(json.dumps(report, sort_keys=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(keygen_main(sys.argv[1:]))
