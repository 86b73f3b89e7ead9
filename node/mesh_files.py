"""`sealmesh mesh init|add-member|add-bootstrap|show`: a mesh's genesis file by command.

People on different machines agree on one genesis file (docs/mesh-files.md): one of them
runs `init`, each member's hotkey and roles are added, and the address of a first node,
taken from the ready.json it wrote, goes into `bootstrap`. Each edit is a pure function
from one `Genesis` to the next, checked as parse_genesis checks a file, so a file these
commands wrote always loads; the file is replaced atomically (write_genesis).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from crypto.identity import is_valid_address
from node.registry.genesis import (
    BOOTSTRAP_FORM, Genesis, GenesisError, check_bootstrap_addr, genesis_doc, load_genesis, parse_genesis,
    write_genesis)
from protocol.membership import Member, Role

ROLE_NAMES = ", ".join(r.value for r in Role)


class MeshFileError(Exception):
    """A bad edit: one line saying what is wrong and what to do instead."""


# --- pure edits ------------------------------------------------------------------


def new_genesis(mesh_id: str) -> Genesis:
    try:
        return parse_genesis({"mesh_id": mesh_id, "members": [], "bootstrap": []}, source="--mesh-id")
    except GenesisError as exc:
        raise MeshFileError(f"{exc} (got {mesh_id!r})") from None


def parse_roles(text: str) -> frozenset[Role]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MeshFileError(f"--roles is empty; give one or more of {ROLE_NAMES}, comma-separated")
    unknown = [n for n in names if n not in {r.value for r in Role}]
    if unknown:
        raise MeshFileError(f"unknown role {unknown[0]!r} in --roles; roles are {ROLE_NAMES}")
    return frozenset(Role(n) for n in names)


def parse_stake(text: str) -> float:
    try:
        stake = float(text)
    except ValueError:
        raise MeshFileError(f"--stake {text!r} is not a number; give a non-negative number, e.g. 10") from None
    if not math.isfinite(stake) or stake < 0:
        raise MeshFileError(f"--stake {text!r} must be a non-negative number, e.g. 10")
    return stake


def add_member(genesis: Genesis, hotkey: str, roles: frozenset[Role], stake: float,
               name: str | None = None) -> Genesis:
    if not is_valid_address(hotkey):
        raise MeshFileError(f"--hotkey {hotkey!r} is not an SS58 address; `sealmesh wallet show "
                            "--name NAME --hotkey HOTKEY` prints one")
    if genesis.directory.member(hotkey) is not None:
        raise MeshFileError(f"hotkey {hotkey} is already a member ({genesis.name_of(hotkey)}); "
                            "each hotkey is listed once")
    names = genesis.names
    if name is not None:
        if not name.strip():
            raise MeshFileError("--name is empty; give a short name for logs, e.g. trainer-alice")
        if name in dict(genesis.names).values():
            raise MeshFileError(f"name {name!r} is already taken; names tell members apart in logs")
        names = names + ((hotkey, name),)
    return _checked(replace(genesis, members=genesis.members + (Member(hotkey, roles, stake),), names=names))


def add_bootstrap(genesis: Genesis, addrs: list[str]) -> tuple[Genesis, list[str]]:
    """`genesis` with the new ones of `addrs` appended, and which were new; a duplicate of
    a single address is an error, as is a ready.json whose every address is listed."""
    checked = [_check_addr(a) for a in addrs]
    added = [a for a in dict.fromkeys(checked) if a not in genesis.bootstrap]
    if not added:
        listed = checked[0] if len(checked) == 1 else ", ".join(checked)
        raise MeshFileError(f"bootstrap address {listed} is already listed")
    return _checked(replace(genesis, bootstrap=genesis.bootstrap + tuple(added))), added


def addrs_from_ready(doc: Any, source: str = "ready.json") -> list[str]:
    """The addresses in a node's ready.json that others can dial, each ending in /p2p/<id>.

    Wildcards (0.0.0.0, ::) are no address to dial; loopback is kept only when it is all
    there is (a mesh on one machine)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("peer_id"), str) or not isinstance(
            doc.get("addrs"), list) or not all(isinstance(a, str) for a in doc["addrs"]):
        raise MeshFileError(f"{source} is not a node's ready.json (it needs \"peer_id\" and \"addrs\")")
    peer_id = doc["peer_id"]
    dialable = [a for a in doc["addrs"] if _host_kind(a) != "wildcard"]
    remote = [a for a in dialable if _host_kind(a) != "loopback"]
    chosen = remote or dialable
    if not chosen:
        raise MeshFileError(f"{source} lists no address others can dial (only wildcards); restart that "
                            "node with --announce-addr /ip4/PUBLIC_IP/tcp/PORT")
    out = []
    for addr in chosen:
        if "/p2p/" not in addr:
            addr = f"{addr.rstrip('/')}/p2p/{peer_id}"
        elif not addr.endswith(f"/p2p/{peer_id}"):
            raise MeshFileError(f"{source}: address {addr} names another peer than its peer_id {peer_id}")
        out.append(addr)
    return out


def _host_kind(addr: str) -> str:
    parts = addr.split("/")
    if len(parts) < 3:
        return "other"
    protocol, host = parts[1], parts[2]
    if protocol in ("dns", "dns4", "dns6"):
        return "loopback" if host == "localhost" else "other"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "other"
    return "wildcard" if ip.is_unspecified else "loopback" if ip.is_loopback else "other"


def _check_addr(text: str) -> str:
    try:
        return check_bootstrap_addr(text)
    except GenesisError as exc:
        raise MeshFileError(str(exc)) from None


def _checked(genesis: Genesis) -> Genesis:
    # The same rules as loading the file: an edit never writes what a node would refuse.
    try:
        return parse_genesis(genesis_doc(genesis))
    except GenesisError as exc:
        raise MeshFileError(str(exc)) from None


def format_genesis(genesis: Genesis) -> str:
    lines = [f"mesh {genesis.mesh_id}: {_count(len(genesis.members), 'member')}, "
             f"{_count(len(genesis.bootstrap), 'bootstrap address', 'bootstrap addresses')}"]
    if genesis.members:
        rows = [(genesis.name_of(m.hotkey) if m.hotkey in dict(genesis.names) else "-",
                 ",".join(sorted(r.value for r in m.roles)), f"{m.stake:g}", short_hotkey(m.hotkey))
                for m in genesis.members]
        widths = [max(len(row[i]) for row in rows + [("NAME", "ROLES", "STAKE", "HOTKEY")]) for i in range(4)]
        for row in [("NAME", "ROLES", "STAKE", "HOTKEY")] + rows:
            lines.append("  " + "  ".join(cell.ljust(w) if i != 2 else cell.rjust(w)
                                          for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    lines.append("bootstrap:" if genesis.bootstrap else "bootstrap: none (nodes need --bootstrap to find "
                                                        "each other; see `sealmesh mesh add-bootstrap`)")
    lines += [f"  {addr}" for addr in genesis.bootstrap]
    return "\n".join(lines)


def short_hotkey(hotkey: str) -> str:
    return f"{hotkey[:6]}...{hotkey[-4:]}" if len(hotkey) > 12 else hotkey


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


# --- files and the command line -----------------------------------------------------


def add_mesh_commands(commands: argparse._SubParsersAction) -> None:
    mesh = commands.add_parser("mesh", help="write or show a mesh's genesis file (docs/mesh-files.md)")
    actions = mesh.add_subparsers(dest="mesh_command", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="write a new genesis file with no members")
    init.add_argument("--mesh-id", required=True, help="1-64 of [a-zA-Z0-9_.-]; every node checks it")
    init.add_argument("--out", type=Path, required=True, help="the genesis file to write")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    member = actions.add_parser("add-member", help="add a member: its hotkey, roles and stake")
    member.add_argument("genesis", type=Path)
    member.add_argument("--hotkey", required=True, help="SS58 address (`sealmesh wallet show` prints it)")
    member.add_argument("--roles", required=True, help=f"comma-separated: {ROLE_NAMES}")
    member.add_argument("--stake", required=True, help="non-negative number")
    member.add_argument("--name", help="a short name for logs (default: the hotkey's first characters)")
    boot = actions.add_parser("add-bootstrap", help="add a first peer to dial: a multiaddr or a node's ready.json")
    boot.add_argument("genesis", type=Path)
    boot.add_argument("addr", metavar="ADDR", help=f"{BOOTSTRAP_FORM}, or the path of the ready.json a "
                                                   "node wrote in its data dir (or that data dir)")
    show = actions.add_parser("show", help="print the mesh id, members and bootstrap addresses")
    show.add_argument("genesis", type=Path)
    show.add_argument("--json", action="store_true", help="print the genesis document as JSON")


def run_mesh(args: argparse.Namespace) -> int:
    try:
        print(_run(args))
    except (MeshFileError, GenesisError) as exc:
        print(f"sealmesh: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> str:
    if args.mesh_command == "init":
        out = Path(args.out).expanduser()
        if out.exists() and not args.force:
            raise MeshFileError(f"{out} exists; pass --force to replace it")
        genesis = new_genesis(args.mesh_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_genesis(out, genesis)
        return (f"wrote {out} (mesh {genesis.mesh_id}, no members yet); next: sealmesh mesh add-member "
                f"{out} --hotkey SS58 --roles trainer --stake 1")
    path = Path(args.genesis).expanduser()
    genesis = load_genesis(path)
    if args.mesh_command == "show":
        return json.dumps(genesis_doc(genesis), indent=2) if args.json else format_genesis(genesis)
    if args.mesh_command == "add-member":
        roles, stake = parse_roles(args.roles), parse_stake(args.stake)
        genesis = add_member(genesis, args.hotkey, roles, stake, args.name)
        write_genesis(path, genesis)
        return (f"added {genesis.name_of(args.hotkey)} ({','.join(sorted(r.value for r in roles))}, "
                f"stake {stake:g}) to {path}: {_count(len(genesis.members), 'member')}")
    genesis, added = add_bootstrap(genesis, _bootstrap_addrs(args.addr))
    write_genesis(path, genesis)
    return "\n".join([f"added bootstrap {a}" for a in added] +
                     [f"{path}: {_count(len(genesis.bootstrap), 'bootstrap address', 'bootstrap addresses')}"])


def _bootstrap_addrs(text: str) -> list[str]:
    """ADDR as given: a node's ready.json (or the data dir holding it), else one multiaddr."""
    path = Path(text).expanduser()
    if path.is_dir() and (path / "ready.json").is_file():
        path = path / "ready.json"
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MeshFileError(f"{path} is not a node's ready.json ({exc})") from None
        return addrs_from_ready(doc, source=str(path))
    if text.endswith(".json"):
        raise MeshFileError(f"{text} not found; give the ready.json a node wrote in its --data-dir, "
                            f"or a multiaddr {BOOTSTRAP_FORM}")
    return [text]


__all__ = ["MeshFileError", "add_bootstrap", "add_member", "add_mesh_commands", "addrs_from_ready",
           "format_genesis", "new_genesis", "parse_roles", "parse_stake", "run_mesh"]
