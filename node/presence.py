"""What a node has heard: signed announcements (hotkey <-> peer id), pings, and when
each member was last heard at all (any verified message), which says who is live.

Plain bookkeeping owned by the trio loop; `snapshot()` is what /status and the
status file show, and what `sealmesh testnet` checks. The liveness rule itself is
protocol/liveness.py.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping

from protocol.liveness import MIN_WINDOW_MS, is_live
from protocol.messages import Announce, Ping


@dataclass
class Presence:
    own_hotkey: str
    expected_members: frozenset[str]
    peer_of: dict[str, str] = field(default_factory=dict)  # hotkey -> libp2p peer id
    addrs_of: dict[str, list[str]] = field(default_factory=dict)
    pings_from: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    duplicate_pings: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    pings_sent: int = 0
    window_ms: int = MIN_WINDOW_MS  # heard within this long: alive (protocol/liveness.py)
    names: Mapping[str, str] = field(default_factory=dict)  # hotkey -> human name (genesis)
    roles: Mapping[str, list[str]] = field(default_factory=dict)  # hotkey -> roles (genesis)
    last_seen: dict[str, int] = field(default_factory=dict)  # hotkey -> ms of its latest verified message

    def on_heard(self, hotkey: str, at_ms: int) -> None:
        """Any verified message of `hotkey` (announce, ping, role message) arrived at `at_ms`."""
        if at_ms > self.last_seen.get(hotkey, -1):
            self.last_seen[hotkey] = at_ms

    def alive(self, now_ms: int) -> set[str]:
        return {h for h in self.others if is_live(self.last_seen.get(h), now_ms, self.window_ms)}

    def on_announce(self, hotkey: str, announce: Announce) -> bool:
        """Record a verified announcement; True if the hotkey is newly heard."""
        new = hotkey not in self.peer_of
        self.peer_of[hotkey] = announce.peer_id
        self.addrs_of[hotkey] = list(announce.addrs)
        return new

    def on_admitted(self, hotkey: str, peer_id: str, addrs: list[str]) -> bool:
        """A member admitted by a confirmed membership record (issue 15): its signed join
        request named its peer id and announce addresses, as an Announce would, so they are
        dialled at once rather than at its next Announce (a joiner hears every member early
        and announces rarely after that). An Announce already heard is newer: kept. True if
        the record's endpoint was taken."""
        if hotkey in self.peer_of or hotkey == self.own_hotkey:
            return False
        self.peer_of[hotkey] = peer_id
        self.addrs_of[hotkey] = list(addrs)
        return True

    def forget(self, hotkey: str) -> None:
        """A member that left: no longer dialled (its node may keep running)."""
        self.peer_of.pop(hotkey, None)
        self.addrs_of.pop(hotkey, None)

    def on_ping(self, hotkey: str, ping: Ping, received_ms: int) -> None:
        seen = self.pings_from[hotkey]
        if ping.seq in seen:
            self.duplicate_pings += 1
            return
        seen.add(ping.seq)
        self.latencies_ms.append(float(received_ms - ping.sent_ms))

    @property
    def others(self) -> frozenset[str]:
        return self.expected_members - {self.own_hotkey}

    def heard_everyone(self) -> bool:
        return self.others <= set(self.peer_of)

    def snapshot(self, now_ms: int, *, with_samples: bool = False) -> dict:
        """Counts for /status; the raw latency samples only when asked (the final status
        file), since /status is polled and the list grows with every ping. "heard": the
        members alive now; "missing": those never heard or gone (not heard for window_ms)."""
        alive = self.alive(now_ms)
        doc = {
            "heard": sorted(alive),
            "missing": sorted(self.others - alive),
            "gone": sorted(h for h in self.others - alive if h in self.last_seen),
            "window_s": self.window_ms / 1000,
            "members": [self._member(h, now_ms, h in alive) for h in sorted(self.others)],
            "pings_sent": self.pings_sent,
            "pings_received": {h: len(s) for h, s in sorted(self.pings_from.items())},
            "duplicate_pings": self.duplicate_pings,
            "latency_ms": {"count": len(self.latencies_ms), "p50": percentile(self.latencies_ms, 50),
                           "p99": percentile(self.latencies_ms, 99)},
        }
        if with_samples:
            doc["latencies_ms"] = list(self.latencies_ms)
        return doc

    def _member(self, hotkey: str, now_ms: int, alive: bool) -> dict:
        seen = self.last_seen.get(hotkey)
        return {"name": self.names.get(hotkey, hotkey[:8]), "hotkey": hotkey,
                "roles": list(self.roles.get(hotkey, [])), "alive": alive,
                "last_seen_s": None if seen is None else round(max(0, now_ms - seen) / 1000, 1),
                "peer_id": self.peer_of.get(hotkey)}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation): always one of the samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
