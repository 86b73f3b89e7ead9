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


RESERVE_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # between rounds of asking every relay again
LIVENESS_CHECK_S = 1.0  # how often a held reservation is checked while we wait to probe again


@dataclass
class Reachability:
    status: str = UNKNOWN
    detail: str = "not probed yet"
    relayed_addrs: list[str] = field(default_factory=list)
    # Set (and replaced by a fresh one) each time relayed_addrs changes: the daemon then
    # announces at once, so peers stop dialling a dead relayed address and learn the new one.
    changed: trio.Event = field(default_factory=trio.Event)
    reservations_lost: int = 0
    last_loss: str = ""  # why the last reservation was lost, kept while the detail moves on

    def snapshot(self) -> dict:
        return {"status": self.status, "detail": self.detail, "relayed_addrs": list(self.relayed_addrs),
                "reservations_lost": self.reservations_lost, "last_loss": self.last_loss}

    def set_relayed_addrs(self, addrs: list[str]) -> None:
        if addrs != self.relayed_addrs:
            self.relayed_addrs = list(addrs)
            self.changed.set()
            self.changed = trio.Event()


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
    no relay refuse the stream). `state.relayed_addrs` is what to announce besides `addrs`.

    A reservation that is lost (the relay restarted or dropped us, or it expired) is noticed
    within LIVENESS_CHECK_S: the state goes back to "unknown" with the reason, the dead
    address is withdrawn, and every relay is asked again with backoff (RESERVE_BACKOFF_S)."""
    failures = 0
    while True:
        _drop_lost_reservation(mesh, state)
        peers = mesh.connected_peers()
        reached, answered = await probe(mesh, addrs, peers[:4])
        if reached:
            state.status, state.detail = PUBLIC, f"reached at {reached}"
            state.set_relayed_addrs([])
        elif not answered and not state.relayed_addrs:
            state.status, state.detail = UNKNOWN, "no peer answered a dial-back probe"
        elif state.relayed_addrs:
            state.status = RELAYED
        else:
            reserved = await _reserve_any(mesh, state, relays, answered)
            failures = 0 if reserved else failures + 1
        if state.status == UNKNOWN and failures:
            wait_s = RESERVE_BACKOFF_S[min(failures, len(RESERVE_BACKOFF_S)) - 1]
        else:
            # Until decided, ask again soon: at start-up no peer may be connected yet.
            wait_s = undecided_interval_s if state.status == UNKNOWN else interval_s
        await _sleep_while_reserved(mesh, state, wait_s)


def _relay_peer_of(relayed_addr: str) -> str:
    # <relay addr>/p2p/<relay>/p2p-circuit/p2p/<us>
    return relayed_addr.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]


def _drop_lost_reservation(mesh: Mesh, state: Reachability) -> bool:
    for addr in state.relayed_addrs:
        relay = _relay_peer_of(addr)
        why = mesh.relay_reservation_lost(relay)
        if why is None:
            continue
        mesh.forget_relay_reservation(relay)
        state.reservations_lost += 1
        state.last_loss = f"relay {relay[:16]}: {why}"
        state.status, state.detail = UNKNOWN, f"reservation on relay {relay[:16]} lost ({why}); reserving again"
        state.set_relayed_addrs([])
        log.warning("phase=relay-lost relay=%s reason=%s", relay, why)
        return True
    return False


async def _sleep_while_reserved(mesh: Mesh, state: Reachability, seconds: float) -> None:
    deadline = trio.current_time() + seconds
    while (left := deadline - trio.current_time()) > 0:
        await trio.sleep(min(left, LIVENESS_CHECK_S))
        if state.relayed_addrs and _drop_lost_reservation(mesh, state):
            return


async def _reserve_any(mesh: Mesh, state: Reachability, relays: list[str], answered: int) -> bool:
    for relay in relays:
        if relay.endswith(f"/p2p/{mesh.peer_id}"):
            continue
        try:
            relayed = await mesh.reserve_relay(relay)
        except MeshRequestError as exc:
            log.info("no relay slot at %s: %s", relay, exc)
            continue
        state.status = RELAYED
        state.detail = f"{answered} peers could not dial us; reserved on a relay"
        state.set_relayed_addrs([relayed])
        log.info("phase=relayed addr=%s", relayed)
        return True
    state.status = UNKNOWN
    state.detail = f"{answered} peers could not dial us and no relay took a reservation"
    return False
