"""The node's one clock: wall-clock time in integer milliseconds.

Wall clock rather than a monotonic clock because these numbers leave the process:
Epistula envelopes carry `now_ms` timestamps that another node checks against its own
clock, and the protocol machines' timers (round deadlines, liveness windows, head
timeouts) are compared across nodes and written to state files that outlive a restart.
A monotonic clock has an arbitrary origin per process, so its readings mean nothing to a
peer. Integer milliseconds because every protocol machine takes time as `now_ms: int`.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch, as the protocol machines and envelopes take it."""
    return time.time_ns() // 1_000_000
