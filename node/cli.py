"""`sealmesh ...`: wallets, a node daemon, and a local test mesh."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from node.cli_errors import UserError  # re-exported: `from node.cli import UserError` keeps working

EXAMPLES = """\
examples:
  sealmesh wallet create --name alice --hotkey default
  sealmesh node --role validator --config node.toml
  sealmesh node --role trainer --genesis mesh/genesis.json --wallet-name alice --hotkey default
  sealmesh testnet up --trainers 2 --validators 2 --miners 1 --dir testnet
  sealmesh fhe compile --model digits-cnn --out bundles/digits-cnn
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sealmesh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A node for private, decentralized machine learning on a libp2p mesh.",
        epilog=EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    wallet = commands.add_parser("wallet", help="make or inspect btcli-compatible hotkeys")
    wallet_commands = wallet.add_subparsers(dest="wallet_command", required=True, metavar="ACTION")
    create = wallet_commands.add_parser(
        "create", help="create an sr25519 hotkey in btcli's layout (PATH/NAME/hotkeys/HOTKEY)")
    create.add_argument("--name", required=True, help="wallet name")
    create.add_argument("--hotkey", required=True, help="hotkey name")
    create.add_argument("--path", type=Path, default=Path("~/.bittensor/wallets"),
                        help="wallets directory (default: %(default)s, where btcli keeps them)")
    create.add_argument("--overwrite", action="store_true",
                        help="replace an existing hotkey (its old key is lost)")
    show = wallet_commands.add_parser("show", help="print a hotkey's SS58 address")
    show.add_argument("--name", required=True)
    show.add_argument("--hotkey", required=True)
    show.add_argument("--path", type=Path, default=Path("~/.bittensor/wallets"))

    node = commands.add_parser(
        "node", help="run a node daemon until SIGINT/SIGTERM",
        description="Run one node until SIGINT/SIGTERM, then shut down cleanly. Settings come "
                    "from --config (TOML) and these flags; flags win. State is kept under "
                    "--data-dir: node_key (libp2p identity), ready.json (peer id, addresses, "
                    "API port), status.json (written at shutdown), blobs/.")
    node.add_argument("--role", choices=["trainer", "validator", "miner"])
    node.add_argument("--config", type=Path, help="node.toml")
    node.add_argument("--data-dir", type=Path, help="state directory (default ~/.sealmesh/node)")
    node.add_argument("--wallet-name", help="btcli wallet name (default: default)")
    node.add_argument("--hotkey", help="btcli hotkey name (default: default)")
    node.add_argument("--wallet-path", type=Path, help="wallets directory (default ~/.bittensor/wallets)")
    node.add_argument("--genesis", type=Path, help="genesis file of a local mesh")
    node.add_argument("--network", help="Bittensor network (finney, test, ws://...) instead of a genesis file")
    node.add_argument("--netuid", type=int, help="subnet uid, with --network")
    node.add_argument("--listen-host", help="libp2p listen address (default 127.0.0.1)")
    node.add_argument("--listen-port", type=int, help="libp2p TCP port (default: any free)")
    node.add_argument("--bootstrap", action="append", help="peer multiaddr to dial (repeatable)")
    node.add_argument("--api-host", help="HTTP API address (default 127.0.0.1)")
    node.add_argument("--api-port", type=int, help="HTTP API port (default: any free)")
    node.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    node.add_argument("--storage", help="blob store: local (default), s3://bucket/prefix?endpoint=URL, "
                                        "storj (MY_* variables, see docs/storage.md)")
    node.add_argument("--settlement", choices=["embedded", "hydra"],
                      help="validators' ledger: the mesh's own head (default) or a hydra-node")
    node.add_argument("--hydra-url", help="hydra-node WebSocket API, e.g. ws://127.0.0.1:4001")
    node.add_argument("--db", help="validator history database URL (default sqlite under --data-dir; "
                                   "postgresql://user@host/db)")
    node.add_argument("--model", type=Path, help="base model directory (Hugging Face layout, local files "
                                                 "only); default: the built-in tiny model")
    node.add_argument("--announce-addr", action="append", dest="announce_addrs", metavar="MULTIADDR",
                      help="address others dial to reach this node, e.g. /ip4/203.0.113.7/tcp/9000 "
                           "(repeatable; needed when listening on 0.0.0.0 or behind a forwarded port)")
    node.add_argument("--relay", action="store_true", default=None,
                      help="offer circuit relay v2 to members behind NAT (validators always do)")
    node.add_argument("--data", type=Path, help="trainer: your training text, a .txt, a .jsonl of "
                                                '{"text": ...} lines, or a folder of them; it never leaves '
                                                "this machine")
    node.add_argument("--eval-data", type=Path, help="validator: held-out text (same formats as --data) "
                                                     "for the eval loss it reports")
    node.add_argument("--rounds", type=int, help="opening validator: training rounds to run (default 0: "
                                                 "until stopped)")
    node.add_argument("--epochs", type=int, help="validator: FHE challenge epochs to run (default 0: none)")
    node.add_argument("--keep-rounds", type=int, help="rounds of state, blobs and status kept (default 20)")
    node.add_argument("--join", action="store_true", default=None,
                      help="not in the genesis: ask the running mesh to admit this node (with --stake)")
    node.add_argument("--stake", type=int, help="with --join: ledger units offered into escrow")
    node.add_argument("--insecure-small-committee", action="store_true", default=None,
                      help="accept a committee of fewer than 3 members or threshold 1, which can "
                           "decrypt single updates (test meshes only)")

    testnet = commands.add_parser("testnet", help="run a local test mesh of OS processes")
    testnet_commands = testnet.add_subparsers(dest="testnet_command", required=True, metavar="ACTION")
    up = testnet_commands.add_parser(
        "up", help="make wallets and a genesis, start every node, run the scenarios, "
                   "write DIR/report.json; exit 1 if anything expected is missing")
    up.add_argument("--trainers", type=int, default=2)
    up.add_argument("--validators", type=int, default=2)
    up.add_argument("--miners", type=int, default=1)
    up.add_argument("--rounds", type=int, default=1,
                    help="private training rounds, when there are trainers (default %(default)s)")
    up.add_argument("--pings", type=int, default=10, help="pings each node sends (default %(default)s)")
    up.add_argument("--dir", type=Path, default=Path("testnet"), help="working directory")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    up.add_argument("--epochs", type=int, default=0, help="FHE challenge epochs (validators challenge miners)")
    up.add_argument("--fault", action="append", default=[], metavar="NODE=BEHAVIOUR",
                    help="make one node misbehave, e.g. miner-1=garbage, miner-2=slow, trainer-1=cheat, "
                         "validator-2=close-early")
    up.add_argument("--key-bits", type=int, default=2048, choices=[1024, 2048, 3072],
                    help="committee Paillier key size (1024 only for quick local runs)")
    from node.head_cli import add_head_commands
    add_head_commands(commands)  # sealmesh head status|close|fanout
    from node.membership_cli import add_leave_command
    add_leave_command(commands)  # sealmesh leave --data-dir DIR
    from node.membership_cli import add_member_command
    add_member_command(commands)  # sealmesh member slash --hotkey --grounds --round --data-dir DIR
    from node.mesh_files import add_mesh_commands
    add_mesh_commands(commands)  # sealmesh mesh init|add-member|add-bootstrap|show
    from node.status_cli import add_status_command
    add_status_command(commands)  # sealmesh status [--api URL | --data-dir DIR] [--json]
    from node.report_html import add_report_command
    add_report_command(commands)  # sealmesh report DATA_DIR_OR_REPORT_JSON [--out report.html]

    fhe = commands.add_parser("fhe", help="FHE inference: compile zoo models into bundles")
    fhe_commands = fhe.add_subparsers(dest="fhe_command", required=True, metavar="ACTION")
    # Listed here for --help; main() hands `fhe compile ...` to fhe.cli_compile whole, so
    # parsing any other command never imports torch.
    fhe_commands.add_parser("compile", help="compile a zoo model into client/server bundles with a "
                                            "manifest (sealmesh fhe compile --help for its flags)")
    committee = commands.add_parser("committee", help="the committee's threshold Paillier key")
    committee_commands = committee.add_subparsers(dest="committee_command", required=True, metavar="ACTION")
    # Like `fhe compile`: main() hands `committee keygen ...` to node.keygen_cli whole.
    committee_commands.add_parser(
        "keygen", help="dealer-free key ceremony (TNO distributed key generation), one member per "
                       "process or --local N (sealmesh committee keygen --help for its flags)")
    from node.committee_cli import add_deal_command
    add_deal_command(committee_commands)  # sealmesh committee deal
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["fhe", "compile"]:
        from fhe.cli_compile import fhe_compile_main
        from node.progress import PhaseProgress
        return fhe_compile_main(argv[2:], progress=PhaseProgress)
    if argv[:2] == ["committee", "keygen"]:
        from node.keygen_cli import keygen_main
        return keygen_main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "wallet":
            return _wallet(args)
        if args.command == "node":
            return _node(args)
        if args.command == "head":
            from node.head_cli import run_head
            return run_head(args)
        if args.command == "leave":
            from node.membership_cli import run_leave
            return run_leave(args)
        if args.command == "member":
            from node.membership_cli import run_member
            return run_member(args)
        if args.command == "mesh":
            from node.mesh_files import run_mesh
            return run_mesh(args)
        if args.command == "report":
            from node.report_html import run_report
            return run_report(args)
        if args.command == "status":
            from node.status_cli import run_status
            return run_status(args)
        if args.command == "committee":
            from node.committee_cli import run_committee_deal
            return run_committee_deal(args)
        if args.command == "testnet":
            from node.testnet import TestnetPlan, run_testnet
            plan = TestnetPlan(trainers=args.trainers, validators=args.validators, miners=args.miners,
                               rounds=args.rounds, pings=args.pings, directory=args.dir,
                               timeout_s=args.timeout, epochs=args.epochs,
                               faults=tuple(_parse_fault(f) for f in args.fault), key_bits=args.key_bits)
            return run_testnet(plan)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"sealmesh: error: {exc}", file=sys.stderr)
        return 2
    return 2


def _parse_fault(text: str) -> tuple[str, str]:
    name, sep, behaviour = text.partition("=")
    if not sep or not name or behaviour not in {"garbage", "slow", "cheat", "close-early", "honest"}:
        raise UserError(f"--fault {text!r}: expected NODE=garbage|slow|cheat|close-early")
    return name, behaviour


def _wallet(args: argparse.Namespace) -> int:
    from node.wallet import WalletError, create_hotkey, hotkey_path, load_hotkey
    try:
        if args.wallet_command == "create":
            hotkey = create_hotkey(args.name, args.hotkey, args.path, overwrite=args.overwrite)
            print(f"created hotkey {hotkey.ss58_address} at {hotkey_path(args.name, args.hotkey, args.path)}")
        else:
            print(load_hotkey(args.name, args.hotkey, args.path).ss58_address)
    except WalletError as exc:
        raise UserError(str(exc)) from exc
    return 0


def _node(args: argparse.Namespace) -> int:
    import trio

    from node.daemon import Node
    from node.registry.genesis import GenesisError
    from node.settings import SettingsError, load_settings
    from node.wallet import WalletError, load_hotkey

    overrides = {
        "role": args.role, "data_dir": args.data_dir, "wallet_name": args.wallet_name,
        "hotkey": args.hotkey, "wallet_path": args.wallet_path, "genesis": args.genesis,
        "network": args.network, "netuid": args.netuid, "listen_host": args.listen_host,
        "listen_port": args.listen_port, "api_host": args.api_host, "api_port": args.api_port,
        "bootstrap": tuple(args.bootstrap) if args.bootstrap else None,
        "log_level": args.log_level, "storage": args.storage, "settlement": args.settlement,
        "hydra_url": args.hydra_url, "db": args.db, "model": args.model,
        "announce_addrs": tuple(args.announce_addrs) if args.announce_addrs else None,
        "data": args.data, "eval_data": args.eval_data, "rounds": args.rounds, "epochs": args.epochs,
        "keep_rounds": args.keep_rounds, "insecure_small_committee": args.insecure_small_committee,
        "relay": args.relay, "join": args.join, "stake": args.stake,
    }
    from node.addresses import AddressError, check_announce_addr
    from node.registry.genesis import check_bootstrap_addr
    try:
        settings = load_settings(args.config, overrides)
        for addr in settings.announce_addrs:
            check_announce_addr(addr)
        for addr in settings.bootstrap:  # a bad one was a 60-line traceback from the dialler
            check_bootstrap_addr(addr)
        _setup_logging(settings.log_level)
        hotkey = load_hotkey(settings.wallet_name, settings.hotkey, settings.wallet_path)
        genesis = _registry(settings)
    except (SettingsError, WalletError, GenesisError, AddressError, ConnectionError) as exc:
        raise UserError(str(exc)) from exc
    from node.membership import is_known_member
    if settings.join and settings.stake <= 0:
        raise UserError("--join needs --stake N, the ledger units this node offers into escrow "
                        "(at least the mesh's minimum for its role; docs/membership.md)")
    if not settings.join and not is_known_member(settings.data_dir, genesis, hotkey.ss58_address):
        raise UserError(f"hotkey {hotkey.ss58_address} is not a member of mesh {genesis.mesh_id!r}; "
                        "ask the running mesh to admit it (`--join --stake N`), add it to the genesis "
                        "file, or register it on the subnet")
    from node.http_thread import HttpBindError
    try:
        trio.run(Node(settings, hotkey, genesis).run)
    except (HttpBindError, BaseExceptionGroup) as exc:
        bind = _first_of(exc, HttpBindError)  # trio's nurseries wrap it in groups
        if bind is None:
            raise
        raise UserError(f"{bind} (--api-port, --listen-port or node.toml)") from exc
    return 0


def _first_of(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _first_of(inner, kind)
        if found is not None:
            return found
    return None


def _registry(settings):
    from node.registry.genesis import Genesis, GenesisError, load_genesis
    if settings.genesis is not None:
        return load_genesis(settings.genesis)
    if settings.network is not None:
        if settings.netuid is None:
            raise GenesisError("--network needs --netuid")
        from node.registry.metagraph import load_metagraph_directory
        directory = load_metagraph_directory(settings.network, settings.netuid)
        return Genesis(f"bittensor-{settings.netuid}", directory.members)
    raise GenesisError("no registry: give --genesis FILE, or --network and --netuid")


def _setup_logging(level: str) -> None:
    from node.progress import ProgressLogHandler
    # A progress line (a large blob transfer on a terminal) stays below the records.
    logging.basicConfig(level=level, handlers=[ProgressLogHandler(sys.stderr)],
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


if __name__ == "__main__":
    sys.exit(main())
