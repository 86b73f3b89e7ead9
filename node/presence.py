"""What a node has heard: signed announcements (hotkey <-> peer id) and pings.

Plain bookkeeping owned by the trio loop; `snapshot()` is what /status and the
status file show, and what `sealmesh testnet` checks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

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

    def on_announce(self, hotkey: str, announce: Announce) -> bool:
        """Record a verified announcement; True if the hotkey is newly heard."""
        new = hotkey not in self.peer_of
        self.peer_of[hotkey] = announce.peer_id
        self.addrs_of[hotkey] = list(announce.addrs)
        return new

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

    def snapshot(self, *, with_samples: bool = False) -> dict:
        """Counts for /status; the raw latency samples only when asked (the final status
        file), since /status is polled and the list grows with every ping."""
        doc = {
            "heard": sorted(self.peer_of),
            "missing": sorted(self.others - set(self.peer_of)),
            "pings_sent": self.pings_sent,
            "pings_received": {h: len(s) for h, s in sorted(self.pings_from.items())},
            "duplicate_pings": self.duplicate_pings,
            "latency_ms": {"count": len(self.latencies_ms), "p50": percentile(self.latencies_ms, 50),
                           "p99": percentile(self.latencies_ms, 99)},
        }
        if with_samples:
            doc["latencies_ms"] = list(self.latencies_ms)
        return doc


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation): always one of the samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
