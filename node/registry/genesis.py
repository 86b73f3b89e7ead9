"""The genesis file of a local mesh: mesh id, members (hotkey, roles, stake), bootstrap.

JSON, so that any tool can write one:
    {"mesh_id": "local", "members": [{"hotkey": "5F...", "roles": ["validator"],
     "stake": 10.0, "name": "validator-0"}], "bootstrap": ["/ip4/127.0.0.1/tcp/4001/p2p/12D3..."]}

`sealmesh mesh init|add-member|add-bootstrap|show` (node/mesh_files.py) writes and reads
it; docs/mesh-files.md describes every field.
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
BOOTSTRAP_FORM = "/ip4/1.2.3.4/tcp/9000/p2p/12D3KooW... (or /ip6, /dns4, /dns6, /dns)"
_HOST_PROTOCOLS = ("ip4", "ip6", "dns4", "dns6", "dns")
# Used only when the multiaddr package (a py-libp2p dependency) is missing: host, TCP
# port, then the peer id in base58 (the only form py-libp2p's peer ids print in).
_BOOTSTRAP_RE = re.compile(
    r"^/(ip4|ip6|dns4|dns6|dns)/[^/\s]+/tcp/(\d{1,5})/p2p/[1-9A-HJ-NP-Za-km-z]{32,128}$")


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
        raise GenesisError(f"genesis file {path} not found; `sealmesh mesh init --mesh-id ID --out {path}` "
                           "writes one (`sealmesh testnet up` writes a local test mesh's)") from None
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
    checked = []
    for i, text in enumerate(bootstrap):
        try:
            checked.append(check_bootstrap_addr(text))
        except GenesisError as exc:
            raise GenesisError(f"{source}: bootstrap[{i}]: {exc}") from None
    if len(set(checked)) != len(checked):
        raise GenesisError(f"{source}: a bootstrap address is listed twice")
    return Genesis(mesh_id, tuple(members), tuple(checked), tuple(names))


def check_bootstrap_addr(text: object) -> str:
    """A peer to dial first: host (ip4/ip6/dns*), TCP port and /p2p/<peer id>, as a string.

    The peer id is required because py-libp2p dials a peer, not an address: without it
    the dial ended in a 60-line traceback (issue 12). Pure, so that the node's
    `--bootstrap` and the genesis file refuse the same things with the same words.
    """
    if not isinstance(text, str) or not text.strip():
        raise GenesisError(f"bootstrap address {text!r} is empty; expected the form {BOOTSTRAP_FORM}")
    text = text.strip()
    try:
        import multiaddr
    except ImportError:
        return _check_bootstrap_by_regex(text)
    try:
        addr = multiaddr.Multiaddr(text)
        names = [p.name for p in addr.protocols()]
    except Exception as exc:  # the multiaddr package raises several unrelated types
        raise GenesisError(f"bootstrap address {text!r} is not a multiaddr ({_reason(exc)}); "
                           f"expected the form {BOOTSTRAP_FORM}") from None
    if not names or names[0] not in _HOST_PROTOCOLS or "tcp" not in names:
        raise GenesisError(f"bootstrap address {text!r} names no host and TCP port; "
                           f"expected the form {BOOTSTRAP_FORM}")
    if names[-1] != "p2p":
        raise GenesisError(f"bootstrap address {text!r} has no peer id (/p2p/...); expected the form "
                           f"{BOOTSTRAP_FORM}; the node's ready.json lists its full addresses")
    return str(addr)


def _check_bootstrap_by_regex(text: str) -> str:
    if "/p2p/" not in text and _BOOTSTRAP_RE.match(f"{text}/p2p/{'1' * 46}"):
        raise GenesisError(f"bootstrap address {text!r} has no peer id (/p2p/...); expected the form "
                           f"{BOOTSTRAP_FORM}; the node's ready.json lists its full addresses")
    match = _BOOTSTRAP_RE.match(text)
    if not match or int(match.group(2)) > 65535:
        raise GenesisError(f"bootstrap address {text!r} is not a multiaddr; expected the form {BOOTSTRAP_FORM}")
    return text


def _reason(exc: Exception) -> str:
    """The multiaddr package's reason without the address it repeats twice around it."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    match = re.match(r"^Invalid MultiAddr '.*?': (.*?)(?: \(string: .*\))?$", text)
    return match.group(1) if match else text


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


def genesis_doc(genesis: Genesis) -> dict:
    """The JSON object of a genesis file; parse_genesis(genesis_doc(g)) == g."""
    names = dict(genesis.names)
    return {
        "mesh_id": genesis.mesh_id,
        "members": [
            {"hotkey": m.hotkey, "roles": sorted(r.value for r in m.roles), "stake": m.stake,
             **({"name": names[m.hotkey]} if m.hotkey in names else {})}
            for m in genesis.members
        ],
        "bootstrap": list(genesis.bootstrap),
    }


def write_genesis(path: Path, genesis: Genesis) -> None:
    """Atomically (write then rename), so a crash never leaves half a genesis file."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(genesis_doc(genesis), indent=2) + "\n")
    os.replace(tmp, path)
