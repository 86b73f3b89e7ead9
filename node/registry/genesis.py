"""The genesis file of a local mesh: mesh id, members (hotkey, roles, stake), bootstrap.

JSON, so that any tool can write one:
    {"mesh_id": "local", "members": [{"hotkey": "5F...", "roles": ["validator"],
     "stake": 10.0, "name": "validator-0"}], "bootstrap": ["/ip4/127.0.0.1/tcp/4001/p2p/12D3..."]}
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from crypto.identity import is_valid_address
from protocol.membership import Member, Role, StaticDirectory

_MESH_ID = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")


class GenesisError(ValueError):
    pass


@dataclass(frozen=True)
class Genesis:
    mesh_id: str
    members: tuple[Member, ...]
    bootstrap: tuple[str, ...] = ()
    names: tuple[tuple[str, str], ...] = ()  # (hotkey, human name) pairs, for logs

    @property
    def directory(self) -> StaticDirectory:
        return StaticDirectory(self.members)

    def name_of(self, hotkey: str) -> str:
        return dict(self.names).get(hotkey, hotkey[:8])


def load_genesis(path: Path) -> Genesis:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GenesisError(f"genesis file {path} not found; `sealmesh testnet up` writes one") from None
    except json.JSONDecodeError as exc:
        raise GenesisError(f"genesis file {path} is not valid JSON: {exc}") from exc
    return parse_genesis(doc, source=str(path))


def parse_genesis(doc: object, source: str = "genesis") -> Genesis:
    if not isinstance(doc, dict):
        raise GenesisError(f"{source}: top level must be an object")
    mesh_id = doc.get("mesh_id")
    if not isinstance(mesh_id, str) or not _MESH_ID.match(mesh_id):
        raise GenesisError(f"{source}: mesh_id must be 1-64 of [a-zA-Z0-9_.-]")
    members, names = [], []
    for i, entry in enumerate(doc.get("members", [])):
        member = _parse_member(entry, f"{source}: members[{i}]")
        members.append(member)
        if isinstance(entry.get("name"), str):
            names.append((member.hotkey, entry["name"]))
    if len({m.hotkey for m in members}) != len(members):
        raise GenesisError(f"{source}: a hotkey is listed twice")
    bootstrap = doc.get("bootstrap", [])
    if not isinstance(bootstrap, list) or not all(isinstance(a, str) for a in bootstrap):
        raise GenesisError(f"{source}: bootstrap must be a list of multiaddr strings")
    return Genesis(mesh_id, tuple(members), tuple(bootstrap), tuple(names))


def _parse_member(entry: object, where: str) -> Member:
    if not isinstance(entry, dict):
        raise GenesisError(f"{where}: must be an object")
    hotkey = entry.get("hotkey")
    if not isinstance(hotkey, str) or not is_valid_address(hotkey):
        raise GenesisError(f"{where}: hotkey must be an SS58 address")
    try:
        roles = frozenset(Role(r) for r in entry.get("roles", []))
    except ValueError as exc:
        raise GenesisError(f"{where}: {exc}; roles are trainer, validator, miner") from exc
    if not roles:
        raise GenesisError(f"{where}: needs at least one role")
    stake = entry.get("stake", 0.0)
    if not isinstance(stake, (int, float)) or isinstance(stake, bool) or stake < 0:
        raise GenesisError(f"{where}: stake must be a non-negative number")
    return Member(hotkey, roles, float(stake))


def write_genesis(path: Path, genesis: Genesis) -> None:
    """Atomically (write then rename), so a crash never leaves half a genesis file."""
    names = dict(genesis.names)
    doc = {
        "mesh_id": genesis.mesh_id,
        "members": [
            {"hotkey": m.hotkey, "roles": sorted(r.value for r in m.roles), "stake": m.stake,
             **({"name": names[m.hotkey]} if m.hotkey in names else {})}
            for m in genesis.members
        ],
        "bootstrap": list(genesis.bootstrap),
    }
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
