"""What our circuit relay v2 service refused or cut, by reason (docs/mesh.md "Reachability").

py-libp2p 0.8.1 enforces the limits itself but says little: a reservation over
`max_reservations` is refused at debug level only, and the (max+1)-th circuit to a
reserved peer is answered NO_RESERVATION, the same status as for a peer with no
reservation at all. So the two checks are wrapped here to count (and log at warning) why
a request was refused, and its warnings for circuits cut over their data or duration
limit are counted from its log records. Counts go to a callback (the mesh's
StreamStats.relay_refused_by_reason: /status mesh_stats and /metrics).

The log records carry no relay identity: with two relaying meshes in one process, each
would count the other's cuts. A node runs one mesh.
"""

from __future__ import annotations

import logging
from typing import Callable

from libp2p.relay.circuit_v2 import CircuitV2Protocol

log = logging.getLogger("sealmesh.relay")

RESERVATION_LIMIT, CIRCUIT_LIMIT, NO_RESERVATION = "reservation_limit", "circuit_limit", "no_reservation"
CIRCUIT_DATA, CIRCUIT_DURATION = "circuit_data", "circuit_duration"
_CUT_MESSAGES = (("Circuit duration limit exceeded", CIRCUIT_DURATION),
                 ("Circuit-wide data limit exceeded", CIRCUIT_DATA),
                 ("Data transfer limit exceeded", CIRCUIT_DATA))
_LIBP2P_RELAY_LOGGER = "libp2p.relay.circuit_v2.protocol"


class _CutCounter(logging.Handler):
    def __init__(self, count: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.count = count

    def emit(self, record: logging.LogRecord) -> None:
        for prefix, reason in _CUT_MESSAGES:
            if isinstance(record.msg, str) and record.msg.startswith(prefix):
                self.count(reason)
                log.warning("relay cut a circuit reason=%s peer=%s", reason, record.args[0] if record.args else "?")
                return


def watch_relay_limits(relay: CircuitV2Protocol, count: Callable[[str], None]) -> Callable[[], None]:
    """Count refusals and cuts of `relay` by reason; returns the function that stops it."""
    manager = relay.resource_manager
    accept_reservation, accept_connection = manager.can_accept_reservation, manager.can_accept_connection

    def can_accept_reservation(peer_id) -> bool:
        ok = accept_reservation(peer_id)
        if not ok:
            count(RESERVATION_LIMIT)
            log.warning("relay refused a reservation reason=%s peer=%s (max_reservations=%d)",
                        RESERVATION_LIMIT, peer_id, manager.limits.max_reservations)
        return ok

    def can_accept_connection(peer_id) -> bool:
        ok = accept_connection(peer_id)
        if not ok:
            reason = CIRCUIT_LIMIT if manager.get_reservation(peer_id) is not None else NO_RESERVATION
            count(reason)
            log.warning("relay refused a circuit reason=%s to=%s (max_circuits=%d per reserved peer)",
                        reason, peer_id, manager.limits.max_circuit_conns)
        return ok

    manager.can_accept_reservation = can_accept_reservation  # type: ignore[method-assign]
    manager.can_accept_connection = can_accept_connection  # type: ignore[method-assign]
    handler, libp2p_log = _CutCounter(count), logging.getLogger(_LIBP2P_RELAY_LOGGER)
    libp2p_log.addHandler(handler)
    if libp2p_log.getEffectiveLevel() > logging.WARNING:
        libp2p_log.setLevel(logging.WARNING)

    def stop() -> None:
        libp2p_log.removeHandler(handler)
        manager.can_accept_reservation = accept_reservation  # type: ignore[method-assign]
        manager.can_accept_connection = accept_connection  # type: ignore[method-assign]

    return stop
