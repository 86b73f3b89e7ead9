"""Is this node reachable from outside, and if not, through which relay?

`public`: a connected peer opened a fresh TCP connection to one of our announced
addresses (the mesh's dial-back probe, node/mesh.py). `relayed`: no peer could, and a
relay holds a slot for us; our relayed address is announced with the others. `unknown`:
no peer answered a probe yet, or none could reach us and no relay took us.

Why our own probe and not py-libp2p's AutoNAT (docs/mesh.md "Reachability"): its server
dials back with host.connect, which returns at once on the connection the asking peer
already has, so every connected peer would be told "public".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from node.mesh import Mesh, MeshRequestError, is_relayed_addr

log = logging.getLogger("sealmesh.reachability")

PUBLIC, RELAYED, UNKNOWN = "public", "relayed", "unknown"


@dataclass
class Reachability:
    status: str = UNKNOWN
    detail: str = "not probed yet"
    relayed_addrs: list[str] = field(default_factory=list)

    def snapshot(self) -> dict:
        return {"status": self.status, "detail": self.detail, "relayed_addrs": list(self.relayed_addrs)}


async def probe(mesh: Mesh, addrs: list[str], peers: list[str]) -> tuple[str | None, int]:
    """(the address some peer reached, how many peers answered)."""
    direct = [a for a in addrs if not is_relayed_addr(a)]
    answered = 0
    for peer in peers:
        try:
            reached = await mesh.probe_dial_back(peer, direct)
        except (MeshRequestError, TimeoutError) as exc:
            log.debug("dial-back probe via %s: %s", peer, exc)
            continue
        answered += 1
        if reached:
            return reached, answered
    return None, answered


async def keep_reachability(mesh: Mesh, state: Reachability, addrs: list[str], relays: list[str], *,
                            interval_s: float = 30.0, undecided_interval_s: float = 3.0) -> None:
    """Probe, and when no peer reaches us reserve a slot on the first relay that takes one
    (`relays`: multiaddrs ending in /p2p/<id>; bootstrap peers are tried, those that offer
    no relay refuse the stream). `state.relayed_addrs` is what to announce besides `addrs`."""
    while True:
        peers = mesh.connected_peers()
        reached, answered = await probe(mesh, addrs, peers[:4])
        if reached:
            state.status, state.detail, state.relayed_addrs = PUBLIC, f"reached at {reached}", []
        elif not answered:
            state.status, state.detail = UNKNOWN, "no peer answered a dial-back probe"
        elif state.relayed_addrs:
            state.status = RELAYED
        else:
            await _reserve_any(mesh, state, relays, answered)
        # Until decided, ask again soon: at start-up no peer may be connected yet.
        await trio.sleep(undecided_interval_s if state.status == UNKNOWN else interval_s)


async def _reserve_any(mesh: Mesh, state: Reachability, relays: list[str], answered: int) -> None:
    for relay in relays:
        if relay.endswith(f"/p2p/{mesh.peer_id}"):
            continue
        try:
            relayed = await mesh.reserve_relay(relay)
        except MeshRequestError as exc:
            log.info("no relay slot at %s: %s", relay, exc)
            continue
        state.status, state.relayed_addrs = RELAYED, [relayed]
        state.detail = f"{answered} peers could not dial us; reserved on a relay"
        log.info("phase=relayed addr=%s", relayed)
        return
    state.status = UNKNOWN
    state.detail = f"{answered} peers could not dial us and no relay took a reservation"
