"""The addresses a node tells others to dial, and the checks on addresses given by hand.

A node listening on 0.0.0.0 is reachable on each of its interfaces, but 0.0.0.0 itself
is no address to dial: announcing it (as py-libp2p's get_addrs() reports it) made peers
dial their own machine. What a node announces, in ready.json and in its membership
Announce, is therefore `--announce-addr` when given (the operator knows the forwarded
port or the public address), else the listen addresses with a wildcard expanded to the
machine's interface addresses, loopback last.
"""

from __future__ import annotations

import logging

import multiaddr

log = logging.getLogger("sealmesh.addresses")

WILDCARDS = {"ip4": "0.0.0.0", "ip6": "::"}
_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
ANNOUNCE_FORM = "/ip4/203.0.113.7/tcp/9000 (or /dns4/node.example.org/tcp/9000)"


class AddressError(ValueError):
    """A multiaddr given on the command line or in node.toml that cannot be used."""


def _parse(text: str, what: str, form: str) -> multiaddr.Multiaddr:
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as exc:  # the multiaddr package raises several unrelated types
        raise AddressError(f"{what} {text!r} is not a multiaddr ({exc}); expected the form {form}") from None
    names = [p.name for p in addr.protocols()]
    if not names or names[0] not in _HOST_PROTOCOLS or "tcp" not in names:
        raise AddressError(f"{what} {text!r} names no host and TCP port; expected the form {form}")
    return addr


def check_announce_addr(text: str) -> str:
    """An --announce-addr: a host (ip or dns) and a TCP port, no wildcard; /p2p/ optional."""
    addr = _parse(text, "--announce-addr", ANNOUNCE_FORM)
    first = addr.protocols()[0].name
    if first in WILDCARDS and addr.value_for_protocol(first) == WILDCARDS[first]:
        raise AddressError(f"--announce-addr {text!r} is a wildcard; give the address others dial, "
                           f"e.g. {ANNOUNCE_FORM}")
    return text


def with_peer_id(text: str, peer_id: str) -> str:
    """`text` ending in /p2p/<peer_id> (added when missing); refused if it names another peer."""
    addr = multiaddr.Multiaddr(text)
    if "p2p" in [p.name for p in addr.protocols()]:
        named = addr.value_for_protocol("p2p")
        if named != peer_id:
            raise AddressError(f"{text!r} names peer {named}, but this node is {peer_id}")
        return text
    return f"{text}/p2p/{peer_id}"


def interface_ips(version: str = "ip4") -> list[str]:
    """This machine's interface addresses (loopback last); [] when they cannot be listed."""
    try:
        import psutil
        import socket
    except ImportError:  # psutil comes with the locked dependencies; a bare install may lack it
        return []
    family = socket.AF_INET if version == "ip4" else socket.AF_INET6
    ips = [a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == family]
    loopback = [ip for ip in ips if ip.startswith("127.") or ip == "::1"]
    return [ip for ip in ips if ip not in loopback] + loopback


def announced_addrs(listen_addrs: list[str], announce: tuple[str, ...], peer_id: str) -> list[str]:
    """What others should dial: `announce` if given, else `listen_addrs` with wildcards
    expanded to interface addresses; every entry ends in /p2p/<peer_id>."""
    if announce:
        return [with_peer_id(a, peer_id) for a in announce]
    out: list[str] = []
    for text in listen_addrs:
        addr = multiaddr.Multiaddr(text)
        first = addr.protocols()[0].name
        if first in WILDCARDS and addr.value_for_protocol(first) == WILDCARDS[first]:
            rest = text[len(f"/{first}/{WILDCARDS[first]}"):]
            expanded = [f"/{first}/{ip}{rest}" for ip in interface_ips(first)]
            if not expanded:
                log.warning("listening on %s but this machine's addresses cannot be listed; "
                            "set --announce-addr so that peers can dial this node", text)
            out += expanded
        else:
            out.append(text)
    return list(dict.fromkeys(with_peer_id(a, peer_id) for a in out))
